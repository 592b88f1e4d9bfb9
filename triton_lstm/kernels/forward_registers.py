"""Small-batch forward with its weights in registers: a step touches no shared memory.

The `tl` forward (forward.py) leaves layouts to Triton, which puts three shared-memory
round trips with barriers between warps on every step's critical path: h_{t-1} staged for
the dot, the weight slice read back from shared memory by `ldmatrix`, and the split of the
accumulator into the four gates (perf/NOTES.md, "Open leads"). This kernel is written in
Gluon, Triton's language with explicit layouts, so that none of them is there:

- A program is one warp that owns 4 hidden units (all four gates: 16 weight rows) of one
  direction, for 8 batch rows. Operands are swapped (gates^T = W_slice h^T), so the weight
  slice is the MMA's M side (16 rows) and the batch its N side (8 columns): at B = 8 no
  MMA row is padding.
- The [16, HP] weight slice is loaded once into the MMA's operand registers (HP * itemsize
  / 2 bytes per thread: H <= 512, fp32 256) and stays there for the whole sequence.
- h_{t-1} is loaded from global memory straight into the other operand's registers, in
  CHUNKS chunks of the reduction, each with its own accumulator: CHUNKS independent chains
  of MMAs instead of one, and no exchange between warps (there is one warp).
- Weight row r is gate 2 * (g // 4) + r // 8 of unit g % 4, g = r % 8. In the mma.sync
  accumulator layout lane 4g + t holds rows g and g + 8, so a lane holds two gates of its
  unit and lane ^ 16 the other two: one shuffle per register gives every lane all four.
  Both lanes of a pair then update the same cell; the first stores it.
- Programs wait on the data (barrier.py's dataflow protocol): every step's slot of y is
  filled with all-ones bits before the launch, producers store canonical values (any NaN
  as the standard quiet NaN), and a step reloads h_{t-1} until none of it is the mark.

A program may also be several warps side by side (WARPS: 4 * WARPS units), and with
EXCHANGE (config ``dsmem``) the programs of a batch block and direction run as one thread-
block cluster that pushes h into every program's shared memory instead (dsmem.py's
protocol): each step waits on its own mbarrier, reads h_{t-1} from shared memory straight
into the operand registers, and sends its units of h_t to every program of the cluster
(``st.async``; lanes 16-31 hold the same h as lanes 0-15, so each half sends to half the
cluster). A step then reads nothing from L2 and polls nothing; NaN or inf mean nothing to
the wait, which counts bytes. Slot rows are padded by 64 bytes, so that the 8 lanes of a
16-byte load phase hit 8 different bank groups.

It runs persistently or not at all: every program must be resident (the launcher checks),
for bf16 / fp16, and fp32 where its dots may use tf32 (nn.LSTM's rule: mma.sync has no
exact fp32), without projection, restarts or checkpoints; elsewhere the `tl` kernel runs
(forward.py, config ``registers``). Gluon kernels have no interpreter: the CPU tests compile
this one for sm_90 and check what it compiles to (test_codegen.py), and run its code under
the `tl` interpreter with the layouts stripped (test_kernels.py); the GPU tests run it.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .. import tuning
from ..dispatch import (KernelConfig, cdiv, cluster_programs, co_resident_programs,
                        dot_precision, interpreting, launch_counts, launch_in_clusters,
                        launch_options, padded, registers_forward_fits)
from . import timeline
from .barrier import canonical, either, fill_unwritten, marks
from .dsmem import (arm, cluster_sync, exchange_setup, exchange_slot, region_base, send_pair_to,
                    send_to, wait_phase)
from .forward import cell_update, rounded_to, step_rows

UNITS = 4                 # hidden units per warp (16 weight rows: one m16 MMA tile)
ROWS = 8                  # batch rows per program (one n8 MMA tile: 16 would spill at H = 256)
# Padding past each row of h in an exchange slot: 64 bytes put the 8 lanes of a 16-byte load
# phase (4 along the reduction, 2 rows) on 8 different bank groups.
ROW_PAD_BYTES = 64
# Warps of a program that pushes h (None: the fewest that make a cluster of at most 16).
EXCHANGE_WARPS = None
# Bytes a lane pushes to a program in one st.async where h is 16-bit: 4 (a pair of units of
# one row), or 8 (a warp's four units of one row, after one more shuffle; each lane then
# sends to a quarter of the cluster: half the st.async, the same bytes): perf/variants.py's
# knob.
PUSH_BYTES = 4
# Bytes of h a lane holds, and loads at once, along the reduction (the operands' k_width is
# this many elements): 16, where the mma.sync fragments' own layout gives 4 (4x the loads,
# half of every 32-byte sector unused).
H_LOAD_BYTES = 16
# Nanoseconds a step waits between polls of an h tile not all written (0: it reloads at once).
# Each poll of 128 programs reads 1 MB from L2 at H = 512; a pause trades that traffic, which
# the producers' stores and loads share, for up to its own length of latency.
POLL_BACKOFF_NS = 0
# The barrier among a program's warps (the Gluon kernels that have several): gl.thread_barrier
# in Triton 3.6, gl.barrier from 3.7.
_warps_barrier = getattr(gl, "barrier", None) or gl.thread_barrier


@gluon.constexpr_function
def gates_layout(warps):
    """The gate tiles' layout, [8 * warps, ROWS]: warp w holds rows 8w .. 8w + 7, its units'
    accumulator rows g and g + 8 apart, where they already are. Lane 4g + t holds row g and
    batch rows 2t, 2t + 1 (lane bits 2-4 are g's bits 0-2: lane ^ 16 holds row g ^ 4, which
    _partner relies on, and lane ^ 4 the unit beside, which _push relies on)."""
    return gl.DistributedLinearLayout(
        reg_bases=[[0, 1]], lane_bases=[[0, 2], [0, 4], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[8 << i, 0] for i in range(warps.bit_length() - 1)], block_bases=[],
        shape=[8 * warps, ROWS])


@gluon.constexpr_function
def _lane_xor_asm(lanes, dtype):
    """shfl.bfly of one 32-bit register with lane ^ `lanes`, and its constraints for `dtype`
    (fp32 or int32)."""
    register = "f" if dtype == gl.float32 else "r"
    return (f"shfl.sync.bfly.b32 $0, $1, {lanes}, 31, 0xffffffff;",
            f"={register},{register}")


@gluon.jit
def _lane_xor(x, LANES: gl.constexpr):
    """Each register's value (fp32 or int32) in lane ^ LANES of the warp."""
    ASM: gl.constexpr = _lane_xor_asm(LANES, x.dtype)
    return gl.inline_asm_elementwise(ASM[0], ASM[1], [x], dtype=x.dtype, is_pure=True, pack=1)


@gluon.jit
def _partner(x):
    """Each register's value in lane ^ 16: the other two gates of the same unit and rows."""
    return _lane_xor(x, 16)


@gluon.jit
def _unit_beside(x):
    """Each register's value in lane ^ 4: the same rows of the unit beside (2u and 2u + 1)."""
    return _lane_xor(x, 4)


@gluon.jit
def _units_apart_2(x):
    """Each register's 32 bits in lane ^ 8: the same rows of the unit two on (u ^ 2)."""
    return _lane_xor(x, 8)


@gluon.jit
def _rows_apart(acc, GATES: gl.constexpr):
    """The [16 * W, N] accumulator's rows g and g + 8 of each warp's 16 as two [8 * W, N]
    tiles in the GATES layout; assert_trivial: it fails to compile if that would move any
    data."""
    W: gl.constexpr = acc.shape[0] // 16
    N: gl.constexpr = acc.shape[1]
    lo, hi = gl.split(gl.permute(gl.reshape(acc, [W, 2, 8, N]), [0, 2, 3, 1]))
    return (gl.convert_layout(gl.reshape(lo, [8 * W, N]), GATES, assert_trivial=True),
            gl.convert_layout(gl.reshape(hi, [8 * W, N]), GATES, assert_trivial=True))


@gluon.jit
def _row_pairs(x):
    """A [units, ROWS] gate tile as two [units, ROWS / 2] tiles, rows 2t and 2t + 1: a lane's
    two registers apart."""
    return gl.split(gl.reshape(x, [x.shape[0], x.shape[1] // 2, 2]))


@gluon.jit
def _pair_bits(lo, hi, out):
    """Two fp32 values rounded to out's 16-bit dtype, as the kernels store them, in the low
    and high halves of 32 bits."""
    DT = out.dtype.element_ty
    lo16 = rounded_to(lo, DT).to(gl.int16, bitcast=True).to(gl.int32)
    hi16 = rounded_to(hi, DT).to(gl.int16, bitcast=True).to(gl.int32)
    return (lo16 & 0xFFFF) | (hi16 << 16)


@gluon.jit
def _push(b_h, o_u, rows, first, base, SLOT: gl.constexpr, j, ROW_BYTES: gl.constexpr,
          GROUP: gl.constexpr, PUSH_BYTES: gl.constexpr, y):
    """This program's units of h (b_h: fp32 in the gate tiles' layout, the same in both
    halves of a warp; `rows`: its rows within the batch block) into exchange j's slot of
    every program of the cluster, in y's dtype, rows ROW_BYTES apart. 16-bit h goes as pairs
    of units (a shuffle with the unit beside: 32 bits, the smallest st.async), or with
    PUSH_BYTES 8 as fours; fp32 as it is. Lanes 0-15 send to the first half of the cluster,
    lanes 16-31 to the rest (fours: each quarter of the warp to a quarter)."""
    slot, mbar, _ = exchange_slot(base, SLOT, j)
    DT = y.dtype.element_ty
    HALF: gl.constexpr = (GROUP + 1) // 2
    x_e, x_o = _row_pairs(b_h)
    unit, _ = _row_pairs(o_u[:, None] + 0 * rows[None, :])
    row, _ = _row_pairs(rows[None, :] + 0 * o_u[:, None])
    rank0, _ = _row_pairs(gl.where(first, 0, HALF) + 0 * rows[None, :])
    if DT.primitive_bitwidth == 16:
        # The lane of unit 2u sends rows 2t of units 2u, 2u + 1; the lane of 2u + 1 rows 2t + 1.
        odd = unit % 2
        beside = _unit_beside(gl.where(odd == 1, x_e, x_o))
        bits = _pair_bits(gl.where(odd == 1, beside, x_e), gl.where(odd == 1, x_o, beside), y)
        if PUSH_BYTES == 8:
            # Lanes of units u and u ^ 2 swap their pairs: both then hold the warp's four
            # units of one row, and send them to two quarters of the cluster.
            upper = (unit // 2) % 2
            other = _units_apart_2(bits)
            QUARTER: gl.constexpr = (GROUP + 3) // 4
            rank_q = 2 * rank0 // HALF * QUARTER + upper * QUARTER
            lo = gl.where(upper == 1, other, bits)
            hi = gl.where(upper == 1, bits, other)
            addr = slot + (row + odd) * ROW_BYTES + (unit - unit % 4) * 2
            for k in gl.static_range(QUARTER):
                send_pair_to(addr, lo, hi, mbar, rank_q + k, rank_q + k < GROUP)
        else:
            addr = slot + (row + odd) * ROW_BYTES + (unit - odd) * 2
            for k in gl.static_range(HALF):
                send_to(addr, bits, mbar, rank0 + k, rank0 + k < GROUP)
    else:
        addr = slot + row * ROW_BYTES + unit * 4
        for k in gl.static_range(HALF):
            send_to(addr, x_e.to(gl.int32, bitcast=True), mbar, rank0 + k, rank0 + k < GROUP)
            send_to(addr + ROW_BYTES, x_o.to(gl.int32, bitcast=True), mbar, rank0 + k,
                    rank0 + k < GROUP)


@gluon.constexpr_function
def _shared_load_asm(nbytes):
    """ld.shared of `nbytes` (4, 8 or 16) into 32-bit registers $0 ..; the address follows."""
    words = nbytes // 4
    if words == 1:
        return "ld.shared.b32 $0, [$1];"
    regs = ", ".join(f"${i}" for i in range(words))
    return f"ld.shared.v{words}.b32 {{{regs}}}, [${words}];"


@gluon.constexpr_function
def _shared_load_constraints(nbytes, elements):
    """The constraints of _shared_load_asm for `elements` elements of the tile a lane packs
    into those registers: an output a 32-bit register, an input (its address) an element."""
    return ",".join(["=r"] * (nbytes // 4) + ["r"] * elements)


@gluon.jit
def _shared_load(addr, y, K_WIDTH: gl.constexpr):
    """The elements (y's dtype) at shared-memory addresses `addr`, K_WIDTH consecutive ones a
    load: the operand layout holds them in consecutive registers, which the asm's pack takes
    in order, so a pack's first address is the one loaded from."""
    DT = y.dtype.element_ty
    ITEM: gl.constexpr = DT.primitive_bitwidth // 8
    ASM: gl.constexpr = _shared_load_asm(K_WIDTH * ITEM)
    CONSTRAINTS: gl.constexpr = _shared_load_constraints(K_WIDTH * ITEM, K_WIDTH)
    return gl.inline_asm_elementwise(ASM, CONSTRAINTS, [addr], dtype=DT, is_pure=False,
                                     pack=K_WIDTH)


@gluon.jit
def _receive_h(slot, o_k, rows, ROW_BYTES: gl.constexpr, KC: gl.constexpr,
               CHUNKS: gl.constexpr, K_WIDTH: gl.constexpr, y):
    """h_{t-1}^T (y's dtype) as CHUNKS [KC, ROWS] operand tiles from this program's exchange
    slot (`rows`: the batch block's, 0 ..), rows ROW_BYTES apart: a lane's K_WIDTH
    consecutive elements along the reduction in one load."""
    ITEM: gl.constexpr = y.dtype.element_ty.primitive_bitwidth // 8
    tiles = ()
    for chunk in gl.static_range(CHUNKS):
        addr = slot + rows[None, :] * ROW_BYTES + (chunk * KC + o_k[:, None]) * ITEM
        tiles = tiles + (_shared_load(addr, y, K_WIDTH),)
    return tiles


@gluon.jit
def _zero_shared(base, NBYTES: gl.constexpr, WARPS: gl.constexpr):
    """Zero NBYTES (a multiple of 16) of shared memory from `base`, every thread a part."""
    LINE: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    o = gl.arange(0, 32 * WARPS, layout=LINE) * 16
    for start in gl.static_range(0, NBYTES, 512 * WARPS):
        gl.inline_asm_elementwise(
            "{ .reg .pred p; setp.lt.u32 p, $1, $2; @p st.shared.v4.b32 [$1], {0, 0, 0, 0}; "
            "mov.u32 $0, 0; }", "=r,r,r", [base + start + o, base + NBYTES + 0 * o],
            dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _own_shared_memory(WARPS: gl.constexpr):
    """Triton declares the symbol that shared-memory addresses start from (global_smem, which
    dsmem.exchange_setup reads) only where a kernel allocates shared memory of its own: a
    line of 32 words, zeroed once."""
    LINE: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    line = gl.allocate_shared_memory(gl.int32, [32], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    line.store(gl.zeros([32], gl.int32, LINE))


@gluon.jit
def _step_inputs(gx, step, length, m_n, reverse, B, o_n, o_u, m_u, H: gl.constexpr,
                 GS: gl.constexpr):
    """Each row's time index and whether it runs at processing step `step`, and the input
    projection of each gate there, as [unit, row] tiles (nothing read for stopped rows)."""
    t_row, running = step_rows(step, length, m_n, reverse)
    p = gx + (t_row * B + o_n)[None, :] * GS + o_u[:, None]
    m = running[None, :] & m_u
    return (t_row, running, gl.load(p, mask=m, other=0.0), gl.load(p + H, mask=m, other=0.0),
            gl.load(p + 2 * H, mask=m, other=0.0), gl.load(p + 3 * H, mask=m, other=0.0))


@gluon.jit
def _program_block(NUM_H_BLOCKS: gl.constexpr, D: gl.constexpr, REVERSE: gl.constexpr):
    """This program's unit block, batch block and direction (grid axis 0 is unit blocks x
    batch blocks, axis 1 the directions), and whether it walks time in reverse (direction 1
    of two, unless the inputs are already in processing order)."""
    i_p = gl.program_id(0)
    i_d = gl.program_id(1)
    if D == 2 and REVERSE:
        reverse = i_d == 1
    else:
        reverse = i_d < 0
    return i_p % NUM_H_BLOCKS, i_p // NUM_H_BLOCKS, i_d, reverse


@gluon.jit
def _direction_parts(i_d, T, B, H: gl.constexpr, gx, w_hh, h0, c0, y, h_n, c_state, gates,
                     c_all):
    """A forward's tensors where direction i_d's part of each starts (64-bit offsets)."""
    i_d64 = i_d.to(gl.int64)
    return (gx + i_d64 * 4 * H, w_hh + i_d64 * 4 * H * H, h0 + i_d64 * B * H,
            c0 + i_d64 * B * H, y + i_d64 * H, h_n + i_d64 * B * H, c_state + i_d64 * B * H,
            gates + i_d64 * T * B * 4 * H, c_all + i_d64 * T * B * H)


@gluon.jit
def _lengths(lengths, o_n, m_n, T, HAS_LENGTHS: gl.constexpr):
    if HAS_LENGTHS:
        length = gl.load(lengths + o_n, mask=m_n, other=0)
    else:
        length = o_n * 0 + T                        # in o_n's layout
    return length


@gluon.jit
def _load_h(p_rows, m_rows, o_k, H: gl.constexpr, KC: gl.constexpr, CHUNKS: gl.constexpr):
    """h_{t-1}^T as CHUNKS [KC, BLOCK_B] operand tiles, read from L2 (volatile: each poll
    reads memory again); rows not read come as zeros."""
    tiles = ()
    for chunk in gl.static_range(CHUNKS):
        k = chunk * KC + o_k
        tiles = tiles + (gl.load(p_rows[None, :] + k[:, None],
                                 mask=m_rows[None, :] & (k < H)[:, None], other=0.0,
                                 volatile=True),)
    return tiles


@gluon.jit
def _pause(like, NS: gl.constexpr):
    """Every lane sleeps about NS nanoseconds (`like`: any small tensor of this warp)."""
    gl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r",
                              [gl.full(like.shape, NS, gl.int32, like.type.layout)],
                              dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _merged_marks(tiles, CHUNKS: gl.constexpr):
    """The CHUNKS tiles' marks (barrier.marks: a pair of 16-bit elements at once) merged
    element by element."""
    merged = marks(tiles[0])
    for chunk in gl.static_range(1, CHUNKS):
        merged = merged | marks(tiles[chunk])
    return merged


@gluon.jit
def _any_unwritten(tiles, CHUNKS: gl.constexpr):
    """Whether any element of the tiles still holds the all-ones mark (the tiles' marks
    merged first: one reduction across the warp's lanes, not one per tile)."""
    merged = _merged_marks(tiles, CHUNKS)
    return gl.reduce(gl.reduce(merged, 0, either), 0, either) != 0


@gluon.jit(do_not_specialize=["T", "B"])
def lstm_forward_registers_kernel(
    gx,        # [T, B, D, 4H]  x_t W_ih^T + b_ih + b_hh per direction, input dtype
    w_hh,      # [D, 4H, H]     input dtype
    h0,        # [D, B, H]      read when HAS_H0
    c0,        # [D, B, H]      read when HAS_H0
    lengths,   # [B]            int32, read when HAS_LENGTHS
    y,         # [T, B, D, H]   out, filled with all-ones bits by the caller (but for EXCHANGE)
    h_n,       # [D, B, H]      out
    c_state,   # [D, B, H]      fp32 out: c after each row's last step
    gates,     # [D, T, B, 4H]  fp32 out when SAVE
    c_all,     # [D, T, B, H]   fp32 out when SAVE
    stamps,    # [T, MAX_PROGRAMS, EVENTS] int64 out when STAMPS: each step's timeline
    T, B,
    H: gl.constexpr, HP: gl.constexpr, D: gl.constexpr, BLOCK_B: gl.constexpr,
    WARPS: gl.constexpr, NUM_H_BLOCKS: gl.constexpr, CHUNKS: gl.constexpr,
    K_WIDTH: gl.constexpr, DOT_PRECISION: gl.constexpr, HAS_H0: gl.constexpr,
    HAS_LENGTHS: gl.constexpr, SAVE: gl.constexpr, REVERSE: gl.constexpr,
    POLL_BACKOFF_NS: gl.constexpr, EXCHANGE: gl.constexpr, STAMPS: gl.constexpr,
    PUSH_BYTES: gl.constexpr,
):
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, 8])
    W_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=K_WIDTH)
    H_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=K_WIDTH)
    GATES: gl.constexpr = gates_layout(WARPS)
    KC: gl.constexpr = HP // CHUNKS
    BLOCK_U: gl.constexpr = 4 * WARPS        # hidden units of a program, 4 a warp
    YS: gl.constexpr = D * H          # row stride of y
    GS: gl.constexpr = D * 4 * H      # row stride of gx
    i_h, i_b, i_d, reverse = _program_block(NUM_H_BLOCKS, D, REVERSE)
    gx, w_hh, h0, c0, y, h_n, c_state, gates, c_all = _direction_parts(
        i_d, T, B, H, gx, w_hh, h0, c0, y, h_n, c_state, gates, c_all)

    # The weight slice, [16 * WARPS, HP] as CHUNKS operand tiles, 16 rows a warp (row r of a
    # warp's 16: see the module's docstring).
    o_r = gl.arange(0, 16 * WARPS, layout=gl.SliceLayout(1, W_OP))
    w_unit = i_h * BLOCK_U + 4 * (o_r // 16) + o_r % 4
    w_row = (2 * ((o_r % 8) // 4) + (o_r % 16) // 8) * H + w_unit
    o_kw = gl.arange(0, KC, layout=gl.SliceLayout(0, W_OP))
    w_tiles = ()
    for chunk in gl.static_range(CHUNKS):
        k = chunk * KC + o_kw
        w_tiles = w_tiles + (gl.load(w_hh + w_row[:, None] * H + k[None, :],
                                     mask=(w_unit < H)[:, None] & (k < H)[None, :],
                                     other=0.0),)

    # The gate tiles: each warp's accumulator rows g and g + 8 apart, [8, BLOCK_B] a warp
    # (gates_layout).
    acc0 = gl.zeros([16 * WARPS, BLOCK_B], gl.float32, MMA)
    o_g = gl.arange(0, 8 * WARPS, layout=gl.SliceLayout(1, GATES))
    first = ((o_g % 8) // 4 == 0)[:, None]        # this lane holds gates i, f (else g, o)
    o_u = i_h * BLOCK_U + 4 * (o_g // 8) + o_g % 4
    m_u = (o_u < H)[:, None]
    o_n = i_b * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, GATES))
    m_n = o_n < B
    length = _lengths(lengths, o_n, m_n, T, HAS_LENGTHS)
    m_cell = m_u & m_n[None, :]
    p_cell = o_n[None, :] * H + o_u[:, None]      # [unit, row] into a [B, H] tensor
    # The same batch rows as columns of the h^T operand tiles.
    o_k = gl.arange(0, KC, layout=gl.SliceLayout(1, H_OP))
    o_nk = i_b * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, H_OP))
    m_nk = o_nk < B
    length_k = _lengths(lengths, o_nk, m_nk, T, HAS_LENGTHS)

    if HAS_H0:
        c = gl.load(c0 + p_cell, mask=m_cell, other=0.0).to(gl.float32)
        m_rows = m_nk
    else:
        c = gl.zeros([8 * WARPS, BLOCK_B], gl.float32, GATES)
        m_rows = m_nk & (o_nk < 0)
    p_rows = h0 + o_nk.to(gl.int64) * H           # h_{t-1} of each row, here h0
    t_row, running, gx_i, gx_f, gx_g, gx_o = _step_inputs(gx, 0, length, m_n, reverse, B, o_n,
                                                          o_u, m_u, H, GS)
    if EXCHANGE:
        # h pushed into every program's shared memory (dsmem.py): slots of [BLOCK_B, HP]
        # rows padded, zeroed first (units no program sends stay zero), and h0 goes out as
        # exchange 0, as if a step before step 0 had made it.
        ROW_BYTES: gl.constexpr = HP * y.dtype.element_ty.primitive_bitwidth // 8 + 64
        SLOT: gl.constexpr = BLOCK_B * ROW_BYTES
        SENT: gl.constexpr = (BLOCK_B * NUM_H_BLOCKS * BLOCK_U
                              * y.dtype.element_ty.primitive_bitwidth // 8)   # a phase's bytes
        _own_shared_memory(WARPS)
        _zero_shared(region_base(2 * SLOT + 16), 2 * SLOT, WARPS)
        exchange = exchange_setup(SLOT, SENT)
        if HAS_H0:
            b_h0 = gl.load(h0 + p_cell, mask=m_cell, other=0.0).to(gl.float32)
        else:
            b_h0 = gl.zeros([8 * WARPS, BLOCK_B], gl.float32, GATES)
        # A slot's rows are the batch block's (0 .. BLOCK_B - 1), in both operands' layouts.
        rows = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, GATES))
        rows_k = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, H_OP))
        _push(b_h0, o_u, rows, first, exchange, SLOT, 0, ROW_BYTES, NUM_H_BLOCKS, PUSH_BYTES, y)

    for t in range(T):
        if STAMPS:
            timeline.step_begins(stamps, t)
            polls = 1
        if EXCHANGE:
            # h_{t-1} is exchange t; then its slot's next phase, exchange t + 2.
            h_slot, h_mbar, h_parity = exchange_slot(exchange, SLOT, t)
            wait_phase(h_mbar, h_parity)
            tiles = _receive_h(h_slot, o_k, rows_k, ROW_BYTES, KC, CHUNKS, K_WIDTH, y)
            if t + 2 < T:
                arm(h_mbar, SENT)
        else:
            tiles = _load_h(p_rows, m_rows, o_k, H, KC, CHUNKS)
            # h0 is the caller's and may hold any bits; later steps wait for their producers.
            while (t > 0) & _any_unwritten(tiles, CHUNKS):
                if POLL_BACKOFF_NS > 0:
                    _pause(o_nk, POLL_BACKOFF_NS)
                tiles = _load_h(p_rows, m_rows, o_k, H, KC, CHUNKS)
                if STAMPS:
                    polls += 1
        if STAMPS:
            timeline.wait_ends(stamps, t)
            timeline.polls(stamps, t, polls)
        acc = mma_v2(w_tiles[0], tiles[0], acc0, input_precision=DOT_PRECISION)
        for chunk in gl.static_range(1, CHUNKS):   # an accumulator per chunk: parallel chains
            acc += mma_v2(w_tiles[chunk], tiles[chunk], acc0, input_precision=DOT_PRECISION)

        x_lo, x_hi = _rows_apart(acc, GATES)
        y_lo = _partner(x_lo)
        y_hi = _partner(x_hi)
        m_run = running[None, :] & m_u
        b_i, b_f, b_g, b_o, c, b_h = cell_update(
            gl.where(first, x_lo, y_lo) + gx_i.to(gl.float32),
            gl.where(first, x_hi, y_hi) + gx_f.to(gl.float32),
            gl.where(first, y_lo, x_lo) + gx_g.to(gl.float32),
            gl.where(first, y_hi, x_hi) + gx_o.to(gl.float32), c, m_run)
        b_h = canonical(b_h)
        if EXCHANGE:
            if t < T - 1:
                _push(b_h, o_u, rows, first, exchange, SLOT, t + 1, ROW_BYTES, NUM_H_BLOCKS,
                      PUSH_BYTES, y)
        b_h = b_h.to(y.dtype.element_ty)

        p_y = y + (t_row * B + o_n)[None, :] * YS + o_u[:, None]
        gl.store(p_y, b_h, mask=first & m_cell)
        if STAMPS:
            timeline.stored(stamps, t)
        gl.store(h_n + p_cell, b_h, mask=first & m_cell & (t == length - 1)[None, :])
        if SAVE:
            p_save = (t_row * B + o_n)[None, :] * (4 * H) + o_u[:, None]
            m_save = first & m_cell
            gl.store(gates + p_save, gl.where(m_run, b_i, 0.0), mask=m_save)
            gl.store(gates + p_save + H, gl.where(m_run, b_f, 0.0), mask=m_save)
            gl.store(gates + p_save + 2 * H, gl.where(m_run, b_g, 0.0), mask=m_save)
            gl.store(gates + p_save + 3 * H, gl.where(m_run, b_o, 0.0), mask=m_save)
            gl.store(c_all + (t_row * B + o_n)[None, :] * H + o_u[:, None],
                     gl.where(m_run, c, 0.0), mask=m_save)

        # The next step: where h_t of each row is and which rows read it (reading h from
        # L2), and its input projection, in flight while the step waits for the others.
        if not EXCHANGE:
            t_row_k, running_k = step_rows(t, length_k, m_nk, reverse)
            p_rows = y + (t_row_k * B + o_nk) * YS
            t_next_k, m_rows = step_rows(t + 1, length_k, m_nk, reverse)
        t_row, running, gx_i, gx_f, gx_g, gx_o = _step_inputs(gx, t + 1, length, m_n, reverse,
                                                              B, o_n, o_u, m_u, H, GS)

    gl.store(c_state + p_cell, c, mask=first & m_cell)
    if EXCHANGE:
        cluster_sync()      # no program leaves while another's pushes may still reach it


def operand_width(hidden_size: int, dtype: torch.dtype) -> int:
    """Elements of h (dG in the backward) a lane loads at once along the reduction, the MMA
    operands' k_width: H_LOAD_BYTES' worth, at most an eighth of the padded reduction. An
    operand tile spans 8 k_width along the reduction (4 lanes, 2 registers); a chunk shorter
    than that is broadcast over the lanes, and the MMA sums each product more than once."""
    return min(H_LOAD_BYTES // dtype.itemsize, padded(hidden_size) // 8)


def chunks(hidden_size: int, dtype: torch.dtype) -> int:
    """Chunks of the reduction (independent accumulators): up to 4, each at least one operand
    tile long (8 operand_width)."""
    return max(1, min(4, padded(hidden_size) // (8 * operand_width(hidden_size, dtype))))


def fits_here(hidden_size: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this kernel can run a layer of this size and dtype on this device: a GPU, bf16
    and fp16, and fp32 where its dots may use tf32 (nn.LSTM's rule), with the weight slice in
    registers (H <= 512, fp32 256)."""
    return (device.type == "cuda" and not interpreting()
            and registers_forward_fits(hidden_size, dtype)
            and (dtype != torch.float32 or dot_precision(dtype, device) == "tf32"))


def runs_here(hidden_size: int, dtype: torch.dtype, device: torch.device, *, proj: bool,
              restarts: bool, ckpt_every: int, step_chunks: bool, force_stepped: bool) -> bool:
    """Whether a forward call is one this kernel runs (``fits_here``, one persistent launch
    without projection, restarts, checkpoints or chunks; residency is checked at launch)."""
    return (fits_here(hidden_size, dtype, device)
            and not (proj or restarts or ckpt_every > 0 or step_chunks or force_stepped))


def launch_resident(kernel, args: tuple, grid: tuple, constexprs: dict, tile: KernelConfig,
                    device: torch.device, kind: str = "registers") -> bool:
    """Launch a Gluon kernel persistently if all its programs can be resident at once (a
    program waiting on one that has not started would hang), counted as `kind`; False, with
    nothing launched, where they cannot."""
    if co_resident_programs(kernel, args, constexprs, tile, device) < grid[0] * grid[1]:
        return False
    kernel[grid](*args, num_warps=tile.num_warps, num_stages=1, **launch_options(), **constexprs)
    launch_counts["persistent"] += 1
    launch_counts[kind] += 1
    return True


def exchange_shape(hidden_size: int):
    """(warps a program, programs a cluster) of the forward that pushes h: the fewest warps
    that make a cluster of at most 16 (EXCHANGE_WARPS where set), one Triton's launcher
    starts (dispatch.cluster_programs: 9-15 programs make 16, the last without units); or
    None."""
    warps = EXCHANGE_WARPS or max(1, padded(hidden_size) // 64)
    programs = cluster_programs(cdiv(hidden_size, UNITS * warps))
    return None if programs is None else (warps, programs)


def exchange_bytes(hidden_size: int, dtype: torch.dtype) -> int:
    """Shared memory a program of the forward that pushes h adds past Triton's own: two slots of
    ROWS padded rows of h, two mbarriers (the kernel's region)."""
    return 2 * ROWS * (padded(hidden_size) * dtype.itemsize + ROW_PAD_BYTES) + 16


def exchange_pushes(programs: int, dtype: torch.dtype) -> int:
    """st.async instructions of the kernel that pushes h (h0's and a step's): a thread sends
    one element of its [units, ROWS / 2] tile to half the cluster, 16-bit h a pair of units
    at once (or four units to a quarter, PUSH_BYTES 8), fp32 its two rows one by one. More
    would mean Triton's layout gives a thread two elements, pushed twice."""
    if dtype.itemsize == 2 and PUSH_BYTES == 8:
        return 2 * ((programs + 3) // 4)
    return 2 * ((programs + 1) // 2) * (1 if dtype.itemsize == 2 else 2)


def launch_clustered(kernel, args: tuple, grid: tuple, constexprs: dict, num_warps: int,
                     programs: int, extra_shared: int, pushes: int) -> bool:
    """Launch a registers kernel that pushes its state (EXCHANGE) with each `programs`
    consecutive programs as one cluster (dispatch.launch_in_clusters, with its exchange's
    shared memory and its count of st.async), counted as a persistent, registers and
    clustered launch; False, with nothing launched, where such a cluster cannot run."""
    if not launch_in_clusters(kernel, grid, args,
                              dict(num_warps=num_warps, num_stages=1, **constexprs), programs,
                              extra_shared, pushes):
        return False
    launch_counts["persistent"] += 1
    launch_counts["registers"] += 1
    launch_counts["clustered"] += 1
    return True


def lstm_forward_registers(gx, w_hh, h0, c0, lengths, *, save: bool, reverse: bool,
                           stamps=None, exchange: bool = False):
    """lstm_forward (forward.py) of a layer this kernel runs (``runs_here``), persistently:
    (y, h_n, c_n, gates, c_all), or None, with nothing launched, where its programs cannot
    all be resident at once. ``stamps``: a timeline.stamps_buffer to record the steps in.
    ``exchange``: push h through clusters where the layer's programs make one
    (``exchange_shape``, sm_90+), else read it from L2."""
    device = gx.device
    # (T > 0: every push of a launch is waited for before its programs leave)
    shape = (exchange_shape(gx.shape[2] // (4 * w_hh.shape[0]))
             if exchange and gx.shape[0] > 0 else None)
    if shape is not None and tuning.device_arch(device)[0] >= 9:
        warps, programs = shape
        outputs, args, grid, constexprs = launch_arguments(
            gx, w_hh, h0, c0, lengths, save=save, reverse=reverse, stamps=stamps, warps=warps,
            exchange=True)
        if launch_clustered(lstm_forward_registers_kernel, args, grid, constexprs, warps,
                            programs, exchange_bytes(constexprs["H"], gx.dtype),
                            exchange_pushes(programs, gx.dtype)):
            return outputs
    outputs, args, grid, constexprs = launch_arguments(gx, w_hh, h0, c0, lengths, save=save,
                                                       reverse=reverse, stamps=stamps)
    tile = KernelConfig(block_b=ROWS, block_h=UNITS, num_warps=1)
    if not launch_resident(lstm_forward_registers_kernel, args, grid, constexprs, tile,
                           device):
        return None
    return outputs


def launch_arguments(gx, w_hh, h0, c0, lengths, *, save: bool, reverse: bool, stamps=None,
                     warps: int = 1, exchange: bool = False):
    """The outputs a launch writes (y filled with the unwritten mark where programs poll it),
    the kernel's arguments, its grid (programs of ``warps`` warps) and its compile-time
    constants."""
    T, B, G = gx.shape
    D = w_hh.shape[0]
    H = G // (4 * D)
    device, dtype = gx.device, gx.dtype
    y = torch.empty(T, B, D * H, dtype=dtype, device=device)
    if not exchange:
        fill_unwritten(y)       # polled slots
    h_n = torch.empty(D, B, H, dtype=dtype, device=device)
    c_state = torch.empty(D, B, H, dtype=torch.float32, device=device)
    gates = torch.empty(D, T, B, 4 * H, dtype=torch.float32, device=device) if save else None
    c_all = torch.empty(D, T, B, H, dtype=torch.float32, device=device) if save else None
    has_h0 = h0 is not None
    args = (gx, w_hh, h0 if has_h0 else y, c0 if has_h0 else y,
            lengths if lengths is not None else c_state, y, h_n, c_state,
            gates if save else c_state, c_all if save else c_state,
            stamps if stamps is not None else c_state, T, B)
    constexprs = kernel_constants(H, D, dtype, dot_precision(dtype, device), has_h0=has_h0,
                                  has_lengths=lengths is not None, save=save, reverse=reverse,
                                  stamps=stamps is not None, warps=warps, exchange=exchange)
    grid = (cdiv(B, ROWS) * constexprs["NUM_H_BLOCKS"], D)
    return (y, h_n, c_state, gates, c_all), args, grid, constexprs


def kernel_constants(hidden_size: int, directions: int, dtype: torch.dtype, precision: str, *,
                     has_h0: bool, has_lengths: bool, save: bool, reverse: bool,
                     stamps: bool = False, warps: int = 1, exchange: bool = False) -> dict:
    """The kernel's compile-time constants for a layer (``precision``: its dots' input
    precision, dispatch.dot_precision; ``stamps``: record each step's timeline; ``warps``:
    a program's; ``exchange``: h pushed through the cluster, whose programs may outnumber
    the unit blocks: dispatch.cluster_programs)."""
    blocks = cdiv(hidden_size, UNITS * warps)
    return dict(H=hidden_size, HP=padded(hidden_size), D=directions, BLOCK_B=ROWS, WARPS=warps,
                NUM_H_BLOCKS=cluster_programs(blocks) if exchange else blocks,
                CHUNKS=chunks(hidden_size, dtype), K_WIDTH=operand_width(hidden_size, dtype),
                DOT_PRECISION=precision, HAS_H0=has_h0, HAS_LENGTHS=has_lengths, SAVE=save,
                REVERSE=reverse, POLL_BACKOFF_NS=POLL_BACKOFF_NS, EXCHANGE=exchange,
                STAMPS=stamps, PUSH_BYTES=PUSH_BYTES)
