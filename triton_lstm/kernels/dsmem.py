"""h pushed into every program's shared memory: the exchange of a cluster (config ``dsmem``).

With the cluster barrier (barrier.py) a step still goes through L2 twice: each program
stores its h tile to global memory, a release waits for those stores to be acknowledged
(``MEMBAR.ALL.GPU``), and after the barrier every program reads the whole h back from L2.
On sm_90 the programs of a thread-block cluster can write each other's shared memory
(distributed shared memory) with asynchronous stores that count their bytes on the
receiver's mbarrier (``st.async ... mbarrier::complete_tx::bytes``). Here every program
pushes its h tile into a buffer of every program of its group, and a program waits on
its own mbarrier until all of h_{t-1} has arrived (``mbarrier.try_wait.parity``): the
hardware counts the bytes, so a consumer waits on the data itself, never on a counter,
and NaN or inf in the data mean nothing to it. No fence, no atomic, no L2 round trip.

The backward (config ``dsmem`` there too) exchanges partial sums instead: each program
multiplies its own units' dG_{t+1} by W_hh's rows of its own gates, a [BLOCK_B, H] share of
dh for every unit, and sends block k of it to program k, which adds the group's shares of
its own units (a reduce-scatter): a program never reads another's dG, and its dot's
reduction is 4 * BLOCK_H long instead of 4H. The slots then hold [group, BLOCK_B, BLOCK_H]
fp32: the same bytes as the forward's.

Layout: the launch gives each program REGION bytes of shared memory past Triton's own
buffers (``dispatch.launch_in_clusters``), found from ``%dynamic_smem_size``: two slots of
[BLOCK_B, HB] fp32 (HB = the group's hidden blocks x BLOCK_H), then one mbarrier per
slot. h_{t-1} (h0 for step 0) lives in slot t % 2, phase (t // 2) % 2 of its mbarrier.
Each element is sent as the 32 bits of an fp32, every row and unit of every block (zeros
where masked), so a phase always expects the same bytes: BLOCK_B * HB * 4.

Order of a phase: the slot's owner arms its mbarrier (arrive with the bytes it expects) when
it has waited on the slot's previous phase; the group's programs send into the slot only
after they have h_{t-1} of every program, which each sent after reading the slot's previous
contents: so a slot is never written while it is read, and no phase completes early (an
mbarrier's byte count may run ahead of its arm). A wait past WAIT_LIMIT polls traps: a
launch that would hang fails instead.
"""
import triton
import triton.language as tl

from .barrier import cluster_arrive, cluster_wait

# try_wait polls (each may suspend the thread a while) before a trap
WAIT_LIMIT = tl.constexpr(1 << 26)


def region_bytes(block_b: int, hidden_blocks: int, block_h: int) -> int:
    """Shared memory a program adds for the exchange: two slots and two mbarriers (the launch's
    twin of exchange_setup's REGION)."""
    return 2 * block_b * hidden_blocks * block_h * 4 + 16


@triton.jit
def _thread0(asm: tl.constexpr, a, b):
    """`asm` (operands $1, $2: a, b; predicate p) run by thread 0 of the program only."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 t; mov.u32 t, %tid.x; setp.eq.u32 p, t, 0; " + asm
        + " mov.u32 $0, 0; }", "=r,r,r", [a, b], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def region_base(REGION: tl.constexpr):
    """The shared-memory address of this program's last REGION bytes."""
    return tl.inline_asm_elementwise(
        "{ .reg .u32 size; mov.u32 size, %dynamic_smem_size; mov.u32 $0, global_smem; "
        "add.u32 $0, $0, size; sub.u32 $0, $0, $1; }",
        "=r,r", [tl.cast(REGION, tl.int32)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def exchange_setup(SLOT_BYTES: tl.constexpr, PHASE_BYTES: tl.constexpr):
    """This program's exchange buffer (the last REGION bytes of its shared memory: two slots
    of SLOT_BYTES, two mbarriers) with both mbarriers initialised, armed for their first
    phase (PHASE_BYTES each: the bytes an exchange sends a program, the whole slot where
    nothing in it is padding), and seen initialised by the whole cluster. Returns the
    buffer's shared-memory address. (Its constants are tl.cast, not tl.full: Gluon kernels
    call these helpers too, and Gluon's full asks for a layout.)"""
    base = region_base(2 * SLOT_BYTES + 16)         # region_bytes
    mbar = base + 2 * SLOT_BYTES
    _thread0("@p mbarrier.init.shared::cta.b64 [$1], 1; @p mbarrier.init.shared::cta.b64 [$2], 1; "
             "fence.mbarrier_init.release.cluster;", mbar, mbar + 8)
    arm(mbar, PHASE_BYTES)
    arm(mbar + 8, PHASE_BYTES)
    cluster_sync()
    return base


@triton.jit
def exchange_slot(base, SLOT_BYTES: tl.constexpr, j):
    """Where exchange j lives (h_{j-1} in the forward; the shares of stage j in the backward):
    its slot's address and its mbarrier's, and the phase parity that j is on that mbarrier."""
    return base + SLOT_BYTES * (j % 2), base + 2 * SLOT_BYTES + 8 * (j % 2), (j // 2) % 2


@triton.jit
def cluster_sync():
    """Every thread of every program of the cluster meets here (barrier.cluster)."""
    cluster_arrive()
    cluster_wait()


@triton.jit
def arm(mbar, nbytes):
    """Thread 0 arrives at mbar, expecting nbytes for its current phase."""
    _thread0("@p mbarrier.arrive.expect_tx.shared::cta.b64 _, [$1], $2;", mbar,
             tl.cast(nbytes, tl.int32))


@triton.jit
def wait_phase(mbar, parity):
    """Wait until mbar's phase of this parity completes (all its bytes arrived); trap past
    WAIT_LIMIT polls."""
    polls = 0
    done = 0
    while (done == 0) & (polls < WAIT_LIMIT):
        done = tl.inline_asm_elementwise(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [$1], $2; "
            "selp.u32 $0, 1, 0, p; }", "=r,r,r", [mbar, parity], dtype=tl.int32,
            is_pure=False, pack=1)
        polls += 1
    if done == 0:
        tl.inline_asm_elementwise("trap; mov.u32 $0, 0;", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def send(addr, bits, mbar, GROUP: tl.constexpr):
    """Each element's 32 bits to its address in every program of the cluster (ranks 0 ..
    GROUP - 1), the bytes counted on that program's mbar."""
    for rank in tl.static_range(GROUP):
        tl.inline_asm_elementwise(
            "{ .reg .u32 a, m; mapa.shared::cluster.u32 a, $1, $4; "
            "mapa.shared::cluster.u32 m, $3, $4; "
            "st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [a], $2, [m]; "
            "mov.u32 $0, 0; }", "=r,r,r,r,r", [addr, bits, mbar, tl.cast(rank, tl.int32)],
            dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def send_to(addr, bits, mbar, rank, valid):
    """Each valid element's 32 bits to its address in program `rank` of the cluster (per
    element), the bytes counted on that program's mbar."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 a, m; setp.ne.u32 p, $5, 0; "
        "@p mapa.shared::cluster.u32 a, $1, $4; @p mapa.shared::cluster.u32 m, $3, $4; "
        "@p st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [a], $2, [m]; "
        "mov.u32 $0, 0; }", "=r,r,r,r,r,r", [addr, bits, mbar, rank, valid.to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def send_pair_to(addr, lo, hi, mbar, rank, valid):
    """Each valid element's two 32-bit words (lo at its address, hi 4 bytes on; 8-byte
    aligned) to program `rank` of the cluster in one st.async, the bytes counted on that
    program's mbar."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .u32 a, m; setp.ne.u32 p, $6, 0; "
        "@p mapa.shared::cluster.u32 a, $1, $5; @p mapa.shared::cluster.u32 m, $4, $5; "
        "@p st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [a], {$2, $3}, [m]; "
        "mov.u32 $0, 0; }", "=r,r,r,r,r,r,r", [addr, lo, hi, mbar, rank, valid.to(tl.int32)],
        dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def receive(addr):
    """The 32 bits at each shared-memory address of this program."""
    return tl.inline_asm_elementwise("ld.shared.b32 $0, [$1];", "=r,r", [addr], dtype=tl.int32,
                                     is_pure=False, pack=1)
