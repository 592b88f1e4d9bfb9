"""Small-batch backward with its weights in registers: one shared-memory round trip a step.

The `tl` backward (backward.py) leaves layouts to Triton, which puts several shared-memory
round trips with barriers between warps on every step's path from the wait to the next
dG store (perf/NOTES.md, "Open leads": 8 `bar.sync` between the barrier and the first dG
load of the small-batch default). This kernel is written in Gluon, like
forward_registers.py, whose shape it follows where the backward allows:

- A program is four warps that own 16 hidden units of one direction for 8 batch rows.
  Warp k holds gate k's slice of W_hh, W_hh[kH:(k+1)H, units]^T as a [16, HP] MMA operand
  (the units are the MMA's M side, the batch its N = 8), loaded once (along W_hh's rows
  into shared memory, a chunk at a time, then into the operand) and kept in registers
  for the whole sequence (HP * itemsize / 2 bytes a thread: H <= 512, fp32 256). Past
  that (H <= 1024, fp32 512) a program is eight warps, two a gate (SPLITS), each with half
  of the gate's reduction, [16, HP / 2]: the same registers a thread as at half the H.
- A step, each warp multiplies its slice by its part of dG_{t+1} (gate k's H columns, or
  its half of them; read from L2 straight into operand registers, in CHUNKS chunks with an
  accumulator each): the [4 SPLITS, 16, 8] product is one batched MMA, a part a warp. The
  partial sums of dh meet in shared memory, after the step's one `bar.sync`; every warp
  then reads its 2 of the 8 rows of all of them (two warps alike with SPLITS = 2), adds
  them, and runs the cell gradients of those rows and all 16 units.
- Programs wait on the data (barrier.py's dataflow protocol): dG is filled with all-ones
  bits before the launch and stored canonical, and a step reloads dG_{t+1} until none of
  it is the mark. A warp sees only its own gate's columns, so the warps agree through
  shared memory whether to poll again (a flag each, behind a second `bar.sync`).

With EXCHANGE (config ``dsmem``), where a batch block's programs make one cluster (a warp's
slice the whole of its gate's reduction: H <= 512, fp32 256), each program pushes its dG_t
into every program's shared memory instead (dsmem.py's protocol, as forward_registers.py
pushes h): a stage waits on its own mbarrier and reads dG_{t+1} from shared memory straight
into the operand registers, nothing from L2 and no polls. 16-bit
dG goes as pairs of units (a shuffle with the lane beside: the lane of unit 2u sends gates
i and f of units 2u, 2u + 1, the lane of 2u + 1 gates g and o). Past H = 256 a program is
eight warps, two a gate side by side (UNIT_WARPS), 32 units: 16 programs make H = 512.

It runs persistently or not at all: every program must be resident (the launcher checks),
for bf16 / fp16, and fp32 where its dots may use tf32 (nn.LSTM's rule), without
projection or restarts; elsewhere the `tl` kernel runs (backward.py, config
``registers``). As for the forward, the CPU tests compile it for sm_90 (test_codegen.py)
and run its code under the `tl` interpreter with the layouts stripped (test_kernels.py);
the GPU tests run it.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .. import tuning
from ..dispatch import (KernelConfig, cdiv, cluster_programs, dot_precision, padded,
                        registers_backward_fits, registers_forward_fits)
from . import forward_registers, timeline
from .backward import cell_gradients, load_saved
from .barrier import either, fill_unwritten, interpreting
from .dsmem import (arm, cluster_sync, exchange_setup, exchange_slot, region_base, send_pair_to,
                    send_to, wait_phase)
from .forward import rounded_to, step_rows, store_gates
from .forward_registers import (ROW_PAD_BYTES, ROWS, _lane_xor, _lengths, _merged_marks,
                                _pair_bits, _pause, _program_block, _shared_load,
                                _warps_barrier, _zero_shared, chunks, operand_width)


UNITS = 16                # hidden units a warp: the MMA's M side in each gate's warp
# Warps a gate, None for what the layer's size needs (``splits_of``); 2 also where one warp
# holds the slice (half the chain, twice the warps): perf/variants.py's knob.
SPLITS = None
# Warps a gate side by side along the units in the backward that pushes dG, None for the
# fewest that make a batch block's programs one cluster (``exchange_unit_warps``): 2 also at
# H <= 256 (clusters of half the programs): perf/variants.py's knob.
EXCHANGE_UNIT_WARPS = None
# Bytes a lane pushes to a program in one st.async in the backward that pushes 16-bit dG: 4
# (a pair of units of one gate), or 8 (four units of one gate, after one more shuffle: half
# the st.async, the same bytes): perf/variants.py's knob.
PUSH_BYTES = 4


@gluon.jit
def _load_dg(p_rows, m_rows, o_part, o_k, H: gl.constexpr, KC: gl.constexpr,
             CHUNKS: gl.constexpr, SPLITS: gl.constexpr):
    """dG_{t+1}^T as CHUNKS [PARTS, KC, ROWS] operand tiles, part p's columns (its piece of
    its gate's) in warp p, read from L2 (volatile: each poll reads memory again); rows not
    read come as zeros."""
    tiles = ()
    for chunk in gl.static_range(CHUNKS):
        k = (o_part % SPLITS * (CHUNKS * KC))[:, None] + (chunk * KC + o_k)[None, :]
        p = p_rows[None, None, :] + ((o_part // SPLITS) * H)[:, None, None] + k[:, :, None]
        m = m_rows[None, None, :] & (k < H)[:, :, None]
        tiles = tiles + (gl.load(p, mask=m, other=0.0, volatile=True),)
    return tiles


@gluon.jit
def _any_unwritten(tiles, flags, poll, CHUNKS: gl.constexpr, FLAGS: gl.constexpr):
    """Whether any warp's tiles still hold the all-ones mark: each warp reduces its own, the
    warps' flags meet in shared memory (slot poll % 2: a slot is rewritten only after the
    next poll's barrier, which every warp passes after reading it)."""
    merged = _merged_marks(tiles, CHUNKS)
    slot = flags.index(poll % 2)
    # k first (within a thread), then the rows (across lanes)
    slot.store(gl.reduce(gl.reduce(merged, 1, either), 1, either).to(gl.int32))
    _warps_barrier()
    return gl.reduce(slot.load(FLAGS), 0, either) != 0


@gluon.jit
def _receive_dg(slot, rows, o_part, o_k, ROW_BYTES: gl.constexpr, HP: gl.constexpr,
                KC: gl.constexpr, CHUNKS: gl.constexpr, K_WIDTH: gl.constexpr, dgates):
    """dG_{t+1}^T (dgates' dtype) as _load_dg's operand tiles, from this program's exchange
    slot: a row of 4 HP elements a batch row (`rows`: the batch block's, 0 ..), gate k's
    columns from k HP, rows ROW_BYTES apart."""
    ITEM: gl.constexpr = dgates.dtype.element_ty.primitive_bitwidth // 8
    tiles = ()
    for chunk in gl.static_range(CHUNKS):
        col = (o_part * HP)[:, None] + (chunk * KC + o_k)[None, :]
        addr = slot + rows[None, None, :] * ROW_BYTES + col[:, :, None] * ITEM
        tiles = tiles + (_shared_load(addr, dgates, K_WIDTH),)
    return tiles


@gluon.jit
def _lane_beside(x):
    """Each register's value in lane ^ 1: the same row of the unit beside (2u and 2u + 1)."""
    return _lane_xor(x, 1)


@gluon.jit
def _lanes_apart_2(x):
    """Each register's 32 bits in lane ^ 2: the same row, two units on."""
    return _lane_xor(x, 2)


@gluon.jit
def _push_dg(b_dgi, b_dgf, b_dgg, b_dgo, o_u, rows, base, SLOT: gl.constexpr, j,
             ROW_BYTES: gl.constexpr, HP: gl.constexpr, GROUP: gl.constexpr,
             PUSH_BYTES: gl.constexpr, dgates):
    """This program's dG (four [row, unit] fp32 tiles, a lane one unit of one row; `rows`:
    the batch block's, 0 ..) into exchange j's slot of every program of the cluster, in
    dgates' dtype as the kernel stores it: gate k of unit u at column k HP + u. 16-bit dG
    goes as pairs of units (PUSH_BYTES 4) or fours (8), fp32 as it is."""
    slot, mbar, _ = exchange_slot(base, SLOT, j)
    ITEM: gl.constexpr = dgates.dtype.element_ty.primitive_bitwidth // 8
    unit = o_u[None, :] + 0 * rows[:, None]
    row = rows[:, None] + 0 * o_u[None, :]
    valid = unit >= 0
    if ITEM == 2:
        # The lane of unit 2u sends gates i, f of units 2u, 2u + 1; the lane of 2u + 1 g, o.
        odd = unit % 2
        beside_1 = _lane_beside(gl.where(odd == 1, b_dgi, b_dgg))
        beside_2 = _lane_beside(gl.where(odd == 1, b_dgf, b_dgo))
        bits_1 = _pair_bits(gl.where(odd == 1, beside_1, b_dgi),
                            gl.where(odd == 1, b_dgg, beside_1), dgates)
        bits_2 = _pair_bits(gl.where(odd == 1, beside_2, b_dgf),
                            gl.where(odd == 1, b_dgo, beside_2), dgates)
        if PUSH_BYTES == 8:
            # Lanes 4v + 2 and 4v swap a pair: lane 4v + b (b = 0, 1; + 1 where odd) then
            # holds gate 2 odd + b of units 4v .. 4v + 3, low pair first.
            upper = (unit // 2) % 2
            got = _lanes_apart_2(gl.where(upper == 1, bits_1, bits_2))
            lo = gl.where(upper == 1, got, bits_1)
            hi = gl.where(upper == 1, bits_2, got)
            addr = slot + row * ROW_BYTES + ((2 * odd + upper) * HP + unit - unit % 4) * 2
            for rank in gl.static_range(GROUP):
                send_pair_to(addr, lo, hi, mbar, rank + 0 * unit, valid)
        else:
            addr = slot + row * ROW_BYTES + (2 * odd * HP + unit - odd) * 2
            for rank in gl.static_range(GROUP):
                send_to(addr, bits_1, mbar, rank + 0 * unit, valid)
                send_to(addr + HP * 2, bits_2, mbar, rank + 0 * unit, valid)
    else:
        DT = dgates.dtype.element_ty
        bits_i = rounded_to(b_dgi, DT).to(gl.int32, bitcast=True)
        bits_f = rounded_to(b_dgf, DT).to(gl.int32, bitcast=True)
        bits_g = rounded_to(b_dgg, DT).to(gl.int32, bitcast=True)
        bits_o = rounded_to(b_dgo, DT).to(gl.int32, bitcast=True)
        addr = slot + row * ROW_BYTES + unit * 4
        for rank in gl.static_range(GROUP):
            send_to(addr, bits_i, mbar, rank + 0 * unit, valid)
            send_to(addr + HP * 4, bits_f, mbar, rank + 0 * unit, valid)
            send_to(addr + HP * 8, bits_g, mbar, rank + 0 * unit, valid)
            send_to(addr + HP * 12, bits_o, mbar, rank + 0 * unit, valid)


@gluon.jit
def _load_dy(dy, step, length, m_b, B, o_b, o_u, m_u, YS: gl.constexpr, HAS_DY: gl.constexpr,
             reverse):
    """dy at processing step `step` as a [row, unit] tile in fp32, zeros for rows not running
    there (and without dy)."""
    t_row, running = step_rows(step, length, m_b, reverse)
    m = running[:, None] & m_u[None, :]
    if HAS_DY:
        b_dy = gl.load(dy + (t_row * B + o_b)[:, None] * YS + o_u[None, :], mask=m,
                       other=0.0).to(gl.float32)
    else:
        b_dy = gl.where(m, 0.0, 0.0)
    return b_dy


@gluon.jit(do_not_specialize=["T", "B"])
def lstm_backward_registers_kernel(
    dy,        # [T, B, D, H]   grad of y, input dtype (read when HAS_DY)
    dh_n,      # [D, B, H]      grad of h_n, input dtype (read when HAS_DHN)
    dc_state,  # [D, B, H]      fp32, in: dc_n (zeros without); out: the gradient of c0
    gates,     # [D, T, B, 4H]  fp32 activated i, f, g, o saved by the forward
    c_all,     # [D, T, B, H]   fp32 c_t saved by the forward
    c0,        # [D, B, H]      input dtype, read when HAS_H0
    lengths,   # [B]            int32 sequence lengths, read when HAS_LENGTHS
    w_hh,      # [D, 4H, H]     input dtype
    dgates,    # [T, B, D, 4H]  out: dG_t, input dtype, filled with all-ones bits by the caller
               #                (but for EXCHANGE)
    dh0,       # [D, B, H]      out: grad of h0, input dtype
    stamps,    # [T, MAX_PROGRAMS, EVENTS] int64 out when STAMPS: stages 0 .. T - 1's timeline
    T, B,
    H: gl.constexpr, HP: gl.constexpr, D: gl.constexpr, UNITS: gl.constexpr,
    NUM_H_BLOCKS: gl.constexpr, BLOCK_B: gl.constexpr, CHUNKS: gl.constexpr,
    K_WIDTH: gl.constexpr, UNIT_WARPS: gl.constexpr, PUSH_BYTES: gl.constexpr,
    DOT_PRECISION: gl.constexpr, HAS_DY: gl.constexpr, HAS_DHN: gl.constexpr, HAS_H0: gl.constexpr,
    HAS_LENGTHS: gl.constexpr, REVERSE: gl.constexpr, POLL_BACKOFF_NS: gl.constexpr,
    SPLITS: gl.constexpr, EXCHANGE: gl.constexpr, STAMPS: gl.constexpr,
):
    # The batched MMA: [part, unit, k] x [part, k, row], a part UNIT_WARPS warps (16 units
    # each). Part p is piece p % SPLITS of gate p // SPLITS's reduction.
    PARTS: gl.constexpr = 4 * SPLITS
    WARPS: gl.constexpr = PARTS * UNIT_WARPS
    gl.static_assert(UNITS == 16 * UNIT_WARPS)
    gl.static_assert(SPLITS == 1 or UNIT_WARPS == 1)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0],
                                                  warps_per_cta=[PARTS, UNIT_WARPS, 1],
                                                  instr_shape=[1, 16, 8])
    W_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=K_WIDTH)
    G_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=K_WIDTH)
    # The partial sums read back as [part, row, unit] with the parts in one thread: a warp
    # has 2 rows of 16 units, a lane one unit of one row (with SPLITS = 2 warps w and w + 4
    # alike). CELL is the [row, unit] tile of the cell math.
    SUMS: gl.constexpr = gl.BlockedLayout(size_per_thread=[PARTS, 1, 1],
                                          threads_per_warp=[1, 2, 16],
                                          warps_per_cta=[1, PARTS, UNIT_WARPS], order=[2, 1, 0])
    CELL: gl.constexpr = gl.SliceLayout(0, SUMS)
    FLAGS: gl.constexpr = gl.BlockedLayout(size_per_thread=[PARTS], threads_per_warp=[32],
                                           warps_per_cta=[WARPS], order=[0])
    # Shared memory, two slots each (a slot's layout is the layout of the allocation).
    SHARED: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                   order=[2, 1, 0])
    FLAG_SHARED: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                        order=[0])
    HS: gl.constexpr = HP // SPLITS       # a part's share of the reduction
    KC: gl.constexpr = HS // CHUNKS
    YS: gl.constexpr = D * H          # row stride of dy
    GS: gl.constexpr = D * 4 * H      # row stride of dgates
    i_h, i_b, i_d, reverse = _program_block(NUM_H_BLOCKS, D, REVERSE)
    i_d64 = i_d.to(gl.int64)
    dy += i_d64 * H
    dh_n += i_d64 * B * H
    dc_state += i_d64 * B * H
    gates += i_d64 * T * B * 4 * H
    c_all += i_d64 * T * B * H
    c0 += i_d64 * B * H
    w_hh += i_d64 * 4 * H * H
    dgates += i_d64 * 4 * H
    dh0 += i_d64 * B * H

    # Part p's weight slice in its warps: W_hh[gate H + piece HS + j, unit]^T, [PARTS, UNITS,
    # HS] as CHUNKS tiles. W_hh's rows run along the units, the operand's registers along the
    # reduction: a chunk is read along the rows into shared memory, then into the operand.
    STAGE: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4, 1], threads_per_warp=[1, 4, 8],
                                           warps_per_cta=[PARTS, UNIT_WARPS, 1],
                                           order=[1, 2, 0])
    STAGE_SHARED: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                         order=[1, 2, 0])
    o_pw = gl.arange(0, PARTS, layout=gl.SliceLayout(1, gl.SliceLayout(2, STAGE)))
    o_uw = i_h * UNITS + gl.arange(0, UNITS, layout=gl.SliceLayout(0, gl.SliceLayout(2, STAGE)))
    o_kw = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(1, STAGE)))
    staged = gl.allocate_shared_memory(w_hh.dtype.element_ty, [PARTS, UNITS, KC], STAGE_SHARED)
    w_tiles = ()
    for chunk in gl.static_range(CHUNKS):
        k = (o_pw % SPLITS * HS)[:, None, None] + (chunk * KC + o_kw)[None, None, :]
        p = w_hh + ((o_pw // SPLITS * H)[:, None, None] + k) * H + o_uw[None, :, None]
        m = (o_uw < H)[None, :, None] & (k < H)
        staged.store(gl.load(p, mask=m, other=0.0))
        _warps_barrier()
        w_tiles = w_tiles + (staged.load(W_OP),)
        _warps_barrier()     # read by every warp before the next chunk overwrites it
    acc0 = gl.zeros([PARTS, UNITS, BLOCK_B], gl.float32, MMA)

    # The dG operand's parts, reduction positions and batch rows.
    o_part = gl.arange(0, PARTS, layout=gl.SliceLayout(1, gl.SliceLayout(2, G_OP)))
    o_k = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(2, G_OP)))
    o_nk = i_b * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, gl.SliceLayout(1, G_OP)))
    m_nk = o_nk < B
    length_k = _lengths(lengths, o_nk, m_nk, T, HAS_LENGTHS)

    # The cell math's rows and units.
    o_b = i_b * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, CELL))
    o_u = i_h * UNITS + gl.arange(0, UNITS, layout=gl.SliceLayout(0, CELL))
    m_b = o_b < B
    m_u = o_u < H
    m_bu = m_b[:, None] & m_u[None, :]
    p_bu = o_b[:, None] * H + o_u[None, :]
    length = _lengths(lengths, o_b, m_b, T, HAS_LENGTHS)

    sums = gl.allocate_shared_memory(gl.float32, [2, PARTS, UNITS, BLOCK_B], SHARED)
    flags = gl.allocate_shared_memory(gl.int32, [2, PARTS], FLAG_SHARED)
    poll = 0

    if HAS_DHN:
        b_dhn = gl.load(dh_n + p_bu, mask=m_bu, other=0.0).to(gl.float32)
    else:
        b_dhn = gl.zeros([BLOCK_B, UNITS], gl.float32, CELL)
    b_dc = gl.load(dc_state + p_bu, mask=m_bu, other=0.0)
    b_i, b_f, b_g, b_o, b_ct, b_cp, no_restart = load_saved(
        T - 1, length, m_b, gates, c_all, c0, gates, c_all, B, o_b, o_u, m_u, p_bu, m_bu, H,
        HAS_H0, False, False, gl.float32, reverse)
    b_dy = _load_dy(dy, T - 1, length, m_b, B, o_b, o_u, m_u, YS, HAS_DY, reverse)
    if EXCHANGE:
        # dG pushed into every program's shared memory (dsmem.py): slots of [BLOCK_B, 4 HP]
        # rows padded, zeroed first (units no program has stay zero), and zeros go out as
        # exchange 0 (no row runs at step T), as if a stage before stage 0 had made them.
        gl.static_assert(SPLITS == 1)       # a lane's dG is one unit of one row
        ITEM: gl.constexpr = dgates.dtype.element_ty.primitive_bitwidth // 8
        ROW_BYTES: gl.constexpr = 4 * HP * ITEM + 64       # ROW_PAD_BYTES
        SLOT: gl.constexpr = BLOCK_B * ROW_BYTES
        SENT: gl.constexpr = BLOCK_B * NUM_H_BLOCKS * UNITS * 4 * ITEM   # a phase's bytes
        _zero_shared(region_base(2 * SLOT + 16), 2 * SLOT, WARPS)
        exchange = exchange_setup(SLOT, SENT)
        # A slot's rows are the batch block's (0 .. BLOCK_B - 1), in both layouts.
        rows = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, CELL))
        rows_k = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, gl.SliceLayout(1, G_OP)))
        zeros = gl.zeros([BLOCK_B, UNITS], gl.float32, CELL)
        _push_dg(zeros, zeros, zeros, zeros, o_u, rows, exchange, SLOT, 0, ROW_BYTES, HP,
                 NUM_H_BLOCKS, PUSH_BYTES, dgates)

    # Stage s walks the forward's steps backwards (step = T - 1 - s); stage T gives dh0.
    for s in range(T + 1):
        step = T - 1 - s
        if STAMPS:
            if s < T:
                timeline.step_begins(stamps, s)
            polls = 1
        # dh of own units: dG_{t+1} of every unit (all programs wrote it) times W_hh's columns
        # of own units. At s = 0 no row runs at step T: nothing is read and nothing waited for.
        if EXCHANGE:
            # dG_{t+1} is exchange s; then its slot's next phase, exchange s + 2.
            dg_slot, dg_mbar, dg_parity = exchange_slot(exchange, SLOT, s)
            wait_phase(dg_mbar, dg_parity)
            tiles = _receive_dg(dg_slot, rows_k, o_part, o_k, ROW_BYTES, HP, KC, CHUNKS,
                                K_WIDTH, dgates)
            if s + 2 <= T:
                arm(dg_mbar, SENT)
        else:
            t_next_k, m_rows = step_rows(step + 1, length_k, m_nk, reverse)
            p_rows = dgates + (t_next_k * B + o_nk) * GS
            tiles = _load_dg(p_rows, m_rows, o_part, o_k, H, KC, CHUNKS, SPLITS)
            pending = _any_unwritten(tiles, flags, poll, CHUNKS, FLAGS)
            poll += 1
            while pending:
                if POLL_BACKOFF_NS > 0:
                    _pause(o_nk, POLL_BACKOFF_NS)
                tiles = _load_dg(p_rows, m_rows, o_part, o_k, H, KC, CHUNKS, SPLITS)
                pending = _any_unwritten(tiles, flags, poll, CHUNKS, FLAGS)
                poll += 1
                if STAMPS:
                    polls += 1
        if STAMPS:
            if s < T:
                timeline.wait_ends(stamps, s)
                timeline.polls(stamps, s, polls)
        acc = mma_v2(w_tiles[0], tiles[0], acc0, input_precision=DOT_PRECISION)
        for chunk in gl.static_range(1, CHUNKS):   # an accumulator per chunk: parallel chains
            acc += mma_v2(w_tiles[chunk], tiles[chunk], acc0, input_precision=DOT_PRECISION)
        # The parts' shares of dh through shared memory (slot s % 2: rewritten two stages
        # on, after the barriers of the stage between).
        slot = sums.index(s % 2)
        slot.store(acc)
        _warps_barrier()
        b_dot = gl.sum(slot.permute([0, 2, 1]).load(SUMS), axis=0)     # [row, unit]

        # Rows whose sequence ended after this step pass dh_n through unchanged.
        t_next, running_next = step_rows(step + 1, length, m_b, reverse)
        b_dh = gl.where(running_next[:, None], b_dot, b_dhn)
        if s < T:
            t_row, running = step_rows(step, length, m_b, reverse)
            b_dh += b_dy
            m_run = running[:, None] & m_u[None, :]
            b_dgi, b_dgf, b_dgg, b_dgo, b_dc_t = cell_gradients(b_dh, b_dc, b_i, b_f, b_g, b_o,
                                                                b_ct, b_cp, m_run, True)
            if EXCHANGE:
                _push_dg(b_dgi, b_dgf, b_dgg, b_dgo, o_u, rows, exchange, SLOT, s + 1,
                         ROW_BYTES, HP, NUM_H_BLOCKS, PUSH_BYTES, dgates)
            store_gates(dgates + (t_row * B + o_b)[:, None] * GS + o_u[None, :], b_dgi, b_dgf,
                        b_dgg, b_dgo, H, m_bu)
            if STAMPS:
                timeline.stored(stamps, s)
            b_dc = gl.where(m_run, b_dc_t * b_f, b_dc)      # stopped rows carry dc_n through
            # The next step's saved values and dy, in flight while this program waits for dG.
            b_i, b_f, b_g, b_o, b_ct, b_cp, no_restart = load_saved(
                step - 1, length, m_b, gates, c_all, c0, gates, c_all, B, o_b, o_u, m_u, p_bu,
                m_bu, H, HAS_H0, False, False, gl.float32, reverse)
            b_dy = _load_dy(dy, step - 1, length, m_b, B, o_b, o_u, m_u, YS, HAS_DY, reverse)
        else:
            gl.store(dh0 + p_bu, rounded_to(b_dh, dh0.dtype.element_ty), mask=m_bu)

    gl.store(dc_state + p_bu, b_dc, mask=m_bu)
    if EXCHANGE:
        cluster_sync()      # no program leaves while another's pushes may still reach it


def splits_of(hidden_size: int, dtype: torch.dtype) -> int:
    """Warps a gate: one where the forward's weight slice fits a warp's registers, else two,
    each with half of the gate's reduction (dispatch.registers_backward_fits); or SPLITS."""
    if SPLITS is not None:
        return SPLITS
    return 1 if registers_forward_fits(hidden_size, dtype) else 2


def runs_here(hidden_size: int, dtype: torch.dtype, device: torch.device, *, proj: bool,
              restarts: bool, force_stepped: bool) -> bool:
    """Whether a backward call is one this kernel runs: a GPU, bf16 / fp16, and fp32 where
    its dots may use tf32 (nn.LSTM's rule), a weight slice a warp that fits its registers
    (``registers_backward_fits``), one persistent launch without projection or restarts;
    residency is checked at launch."""
    return (device.type == "cuda" and not interpreting()
            and registers_backward_fits(hidden_size, dtype)
            and (dtype != torch.float32 or dot_precision(dtype, device) == "tf32")
            and not (proj or restarts or force_stepped))


def exchange_unit_warps(hidden_size: int) -> int:
    """Warps a gate, side by side along the units, in the backward that pushes dG: the fewest
    whose programs (16 units a warp) make a batch block one cluster of at most 16, 1 to
    H = 256, 2 to 512 (EXCHANGE_UNIT_WARPS where set)."""
    return EXCHANGE_UNIT_WARPS or max(1, padded(hidden_size) // (16 * UNITS))


def exchange_programs(hidden_size: int, dtype: torch.dtype):
    """Programs of a cluster of the backward that pushes dG (a batch block's), or None where
    it does not run: a warp's slice the whole of a gate's reduction (``splits_of``), and a
    cluster Triton's launcher starts (dispatch.cluster_programs: 9-15 unit blocks make 16
    programs, the last ones without units)."""
    if splits_of(hidden_size, dtype) != 1:
        return None
    return cluster_programs(cdiv(hidden_size, UNITS * exchange_unit_warps(hidden_size)))


def exchange_bytes(hidden_size: int, dtype: torch.dtype) -> int:
    """Shared memory a program of the backward that pushes dG adds past Triton's own: two
    slots of ROWS padded rows of dG (4 HP elements each), two mbarriers."""
    return 2 * ROWS * (4 * padded(hidden_size) * dtype.itemsize + ROW_PAD_BYTES) + 16


def exchange_pushes(programs: int, dtype: torch.dtype) -> int:
    """st.async instructions of the backward that pushes dG (the zeros of exchange 0 and a
    stage's): a thread sends its unit of one row to every program, 16-bit dG as two pairs
    of units (one four of units with PUSH_BYTES 8), fp32 as four gates. More would mean
    Triton's layout gives a thread two."""
    return 2 * programs * ((1 if PUSH_BYTES == 8 else 2) if dtype.itemsize == 2 else 4)


def lstm_backward_registers(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, *, reverse: bool,
                            stamps=None, exchange: bool = False):
    """lstm_backward (backward.py) of a layer this kernel runs (``runs_here``), persistently:
    (dgates, dh0, dc0), or None, with nothing launched, where its programs cannot all be
    resident at once. ``stamps``: a timeline.stamps_buffer to record the stages in.
    ``exchange``: push dG through clusters where a batch block's programs make one
    (``exchange_programs``, sm_90+), else read it from L2."""
    device, dtype = w_hh.device, w_hh.dtype
    hidden_size = gates.shape[3] // 4
    programs = exchange_programs(hidden_size, dtype) if exchange and gates.shape[1] > 0 else None
    if programs is not None and tuning.device_arch(device)[0] >= 9:
        outputs, args, grid, constexprs = launch_arguments(
            dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, reverse=reverse, stamps=stamps,
            exchange=True)
        if forward_registers.launch_clustered(lstm_backward_registers_kernel, args, grid,
                                              constexprs, 4 * constexprs["UNIT_WARPS"], programs,
                                              exchange_bytes(hidden_size, dtype),
                                              exchange_pushes(programs, dtype)):
            return outputs
    outputs, args, grid, constexprs = launch_arguments(dy, dh_n, dc_n, gates, c_all, c0, lengths,
                                                       w_hh, reverse=reverse, stamps=stamps)
    # a warp a part of the batched MMA: four gates of SPLITS parts
    tile = KernelConfig(block_b=ROWS, block_h=UNITS, num_warps=4 * constexprs["SPLITS"])
    if not forward_registers.launch_resident(lstm_backward_registers_kernel, args, grid,
                                             constexprs, tile, device):
        return None
    return outputs


def launch_arguments(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, *, reverse: bool,
                     splits=None, unit_warps=None, stamps=None, exchange: bool = False):
    """The outputs a launch writes (dgates filled with the unwritten mark where programs poll
    it), the kernel's arguments, its grid and its compile-time constants (``splits``,
    ``unit_warps``: as kernel_constants; ``exchange``: dG pushed through the cluster)."""
    D, T, B, G = gates.shape
    H = G // 4
    device, dtype = w_hh.device, w_hh.dtype
    dgates = torch.empty(T, B, D * 4 * H, dtype=dtype, device=device)
    if not exchange:
        fill_unwritten(dgates)      # polled slots
    dh0 = torch.empty(D, B, H, dtype=dtype, device=device)
    if dc_n is None:
        dc_state = torch.zeros(D, B, H, dtype=torch.float32, device=device)
    else:
        dc_state = dc_n.to(torch.float32, copy=True).contiguous()
    args = (dgates if dy is None else dy.contiguous(), dh0 if dh_n is None else dh_n.contiguous(),
            dc_state, gates, c_all, dh0 if c0 is None else c0,
            lengths if lengths is not None else dc_state, w_hh, dgates, dh0,
            stamps if stamps is not None else dc_state, T, B)
    constexprs = kernel_constants(H, D, dtype, dot_precision(dtype, device), has_dy=dy is not None,
                                  has_dhn=dh_n is not None, has_h0=c0 is not None,
                                  has_lengths=lengths is not None, reverse=reverse,
                                  splits=splits, unit_warps=unit_warps,
                                  stamps=stamps is not None, exchange=exchange)
    grid = (cdiv(B, ROWS) * constexprs["NUM_H_BLOCKS"], D)
    return (dgates, dh0, dc_state), args, grid, constexprs


def kernel_constants(hidden_size: int, directions: int, dtype: torch.dtype, precision: str, *,
                     has_dy: bool, has_dhn: bool, has_h0: bool, has_lengths: bool,
                     reverse: bool, splits=None, unit_warps=None, stamps: bool = False,
                     exchange: bool = False) -> dict:
    """The kernel's compile-time constants for a layer (``precision``: its dots' input
    precision, dispatch.dot_precision); the width of its operand loads and its pause between
    polls are the forward's knobs (forward_registers.H_LOAD_BYTES, POLL_BACKOFF_NS).
    ``splits``: warps a gate, None for what the layer's size needs (``splits_of``), each with
    a piece of its reduction; ``unit_warps``: warps a gate side by side, 16 units each, None
    for 1 (with ``exchange``, what its cluster needs: ``exchange_unit_warps``); ``stamps``:
    record each stage's timeline; ``exchange``: dG pushed through the cluster, whose programs
    may outnumber the unit blocks (``exchange_programs``)."""
    splits = splits or splits_of(hidden_size, dtype)
    unit_warps = unit_warps or (exchange_unit_warps(hidden_size) if exchange else 1)
    share = padded(hidden_size) // splits       # a warp's share of the reduction
    units = UNITS * unit_warps                  # a program's
    blocks = cdiv(hidden_size, units)
    return dict(H=hidden_size, HP=padded(hidden_size), D=directions, UNITS=units,
                NUM_H_BLOCKS=exchange_programs(hidden_size, dtype) if exchange else blocks,
                BLOCK_B=ROWS, UNIT_WARPS=unit_warps,
                CHUNKS=chunks(share, dtype), K_WIDTH=operand_width(share, dtype), SPLITS=splits,
                DOT_PRECISION=precision, HAS_DY=has_dy, HAS_DHN=has_dhn, HAS_H0=has_h0,
                HAS_LENGTHS=has_lengths, REVERSE=reverse,
                POLL_BACKOFF_NS=forward_registers.POLL_BACKOFF_NS, EXCHANGE=exchange,
                PUSH_BYTES=PUSH_BYTES, STAMPS=stamps)
