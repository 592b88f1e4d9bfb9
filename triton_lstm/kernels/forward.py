"""Persistent LSTM forward: the whole recurrence of a layer in one launch.

Dimensions: T steps, B batch rows, D directions (1, or 2 when bidirectional),
H hidden units, R output units (proj_size, or H without a projection), HP and
RP = H and R rounded up to powers of two (reduction lengths of the dots); gates
in PyTorch's order i, f, g, o.

Program (b, p, d) owns batch rows [b*BLOCK_B, (b+1)*BLOCK_B) and hidden units
[p*BLOCK_H, (p+1)*BLOCK_H) *of all four gates* of direction d, so the cell
update needs only its own data. Before the time loop it loads its slice of
W_hh as one [RP, 4*BLOCK_H] tile (columns ordered unit-major, gate-minor) and
keeps it on chip. Each step it reads the whole h_{t-1} of its batch rows
(written by the other programs, so the loads go to L2), does one dot for the
four gates, adds the precomputed input projection, updates c in registers,
writes h_t and meets the other programs of its (direction, batch block) at the
grid barrier. Both directions of a layer run side by side in one grid.

Variable lengths (packed sequences) are handled per row: a row whose sequence
has ended keeps its state and writes zeros; the reverse direction walks each
row from its own last step back to 0. Outputs land in time order, both
directions interleaved as torch.nn.LSTM lays them out ([T, B, D*R]).

With a projection (PROJ) a step has two phases: the cell phase writes
r = o * tanh(c) of its hidden units, then, after a barrier, each program
computes h = r W_hr^T for its BLOCK_R output units with its W_hr slice on chip.

With SPLIT_K > 1 the recurrent dot is a 3-D dot over slices of the reduction,
summed afterwards: the slices go to different warps, which shortens the chains
of MMAs (a tuning choice; small tiles do best without). The next step's input
projection is loaded before the barrier, so its latency hides behind the wait.
When the slice is too large to keep (RESIDENT=False), each step streams it from
L2 in BLOCK_K chunks instead: slower, still correct.

How a group waits is a flag (barrier.py): the counter, dataflow polls (DATAFLOW), or,
launched as one thread-block cluster, the hardware cluster barrier (CLUSTER); with
DSMEM as well, h is not read from L2 at all but pushed into every program's shared
memory, each program waiting on its own mbarrier for the bytes (dsmem.py).

Stepped mode (PERSISTENT=False) runs the same body for phases [q_begin, q_end)
and ends; the caller launches once per phase and the launch boundary is the
barrier. c travels between launches through ``c_state``. A persistent launch can
start at a later phase too (the forward in chunks of steps, overlap.py). A launch from a
phase past 0 (RESUMED, either mode) takes h_{t-1} from y and c from ``c_state``.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from ..dispatch import (cdiv, dot_precision, launch_recurrence, padded, pick_config,
                        state_dtype)
from . import timeline
from .barrier import (INTERPRETED, barrier_arrive, barrier_wait, fill_unwritten, load_written,
                      published)
from .dsmem import arm, cluster_sync, exchange_setup, exchange_slot, receive, send, wait_phase

# Two bf16 faults of the Triton interpreter, worked around there and only there (compiled
# for a GPU, the kernels are unchanged): it multiplies the raw bit patterns of bf16 operands
# in tl.dot (triton-lang/triton#11584), so bf16 dots go through fp32 (dot_operands); and it
# converts fp32 to bf16 by dropping the low 16 bits (its cast passes no rounding mode;
# subnormals come out wrong too), where a GPU rounds to nearest even (rounded_to). INTERPRETED
# (barrier.py) says which.


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def dot_operands(a, b):
    """The operands of a tl.dot as given, or as fp32 under the interpreter for bf16."""
    if INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def rounded_to(x, dtype: tl.constexpr):
    """x.to(dtype), with fp32 -> bf16 rounded to nearest even under the interpreter too."""
    if INTERPRETED and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.int32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)             # ties to even; NaNs are set apart
        bits = tl.where(x != x, 0x7FC00000, bits)
        out = (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out


@triton.jit
def reduction_index(HP: tl.constexpr, SPLIT_K: tl.constexpr):
    """Positions along the recurrent reduction: [HP], or [SPLIT_K, HP // SPLIT_K] slices."""
    if SPLIT_K == 1:
        return tl.arange(0, HP)
    else:
        KS: tl.constexpr = HP // SPLIT_K
        return tl.arange(0, SPLIT_K)[:, None] * KS + tl.arange(0, KS)[None, :]


@triton.jit
def split_dot(p_rows, m_rows, o_j, b_w, H: tl.constexpr, SPLIT_K: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, WAIT: tl.constexpr = False,
              poll=True):
    """A @ W over the reduction positions o_j, with A[r, j] = *(p_rows[r] + j) read through L2.

    With SPLIT_K > 1 the reduction comes in slices (o_j [SPLIT_K, KS], W
    [SPLIT_K, KS, N]): one batch of a 3-D dot each, spread over the warps so the
    chains of MMAs are shorter, then summed. WAIT: A's rows are polled until written
    (barrier.load_written).
    """
    b_a = load_written(p_rows[:, None] + tl.expand_dims(o_j, -2),
                       m_rows[:, None] & tl.expand_dims(o_j < H, -2), WAIT, poll)
    return _sliced_dot(b_a, b_w, SPLIT_K, DOT_PRECISION, ACC)


@triton.jit
def _sliced_dot(b_a, b_w, SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    b_a, b_w = dot_operands(b_a, b_w)
    b_acc = tl.dot(b_a, b_w, input_precision=DOT_PRECISION, out_dtype=ACC)
    if SPLIT_K > 1:
        b_acc = tl.sum(b_acc, axis=0)
    return b_acc


@triton.jit
def pushed_dot(slot, m_rows, o_j, b_w, H: tl.constexpr, HB: tl.constexpr, SPLIT_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """split_dot with A = h_{t-1} from this program's exchange slot (kernels/dsmem.py), a
    [BLOCK_B, HB] fp32 tile at shared-memory address `slot`."""
    offsets = tl.arange(0, m_rows.shape[0])[:, None] * HB + tl.expand_dims(o_j, -2)
    mask = m_rows[:, None] & tl.expand_dims(o_j < H, -2)
    bits = receive(slot + 4 * tl.where(mask, offsets, 0))
    b_a = tl.where(mask, bits.to(tl.float32, bitcast=True), 0.0).to(b_w.dtype)
    return _sliced_dot(b_a, b_w, SPLIT_K, DOT_PRECISION, ACC)


@triton.jit
def streamed_dot(p_rows, m_rows, p_cols, m_cols, K: tl.constexpr, KP: tl.constexpr,
                 K_STRIDE: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 ACC: tl.constexpr, STAGES: tl.constexpr = None, WAIT: tl.constexpr = False,
                 poll=True):
    """A @ W with both read from L2 in BLOCK_K chunks of the reduction (weights not kept on chip).

    A[r, k] = *(p_rows[r] + k), W[k, n] = *(p_cols[n] + k * K_STRIDE), for k < K.
    """
    b_acc = tl.zeros([p_rows.shape[0], p_cols.shape[0]], dtype=ACC)
    # STAGES > 1 pipelines this loop alone (a persistent kernel runs with num_stages=1,
    # so that nothing is hoisted across its barriers); None: the kernel's own setting.
    for k0 in tl.range(0, KP, BLOCK_K, num_stages=STAGES):
        o_k = k0 + tl.arange(0, BLOCK_K)
        b_a = load_written(p_rows[:, None] + o_k[None, :], m_rows[:, None] & (o_k < K)[None, :],
                           WAIT, poll)
        b_w = tl.load(p_cols[None, :] + o_k[:, None] * K_STRIDE,
                      mask=m_cols[None, :] & (o_k < K)[:, None], other=0.0)
        b_a, b_w = dot_operands(b_a, b_w)
        # out_dtype named: Triton <= 3.6 takes fp32 by default and refuses an fp64 accumulator.
        b_acc = tl.dot(b_a, b_w, b_acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return b_acc


@triton.jit
def chunk_columns(k0: tl.constexpr, o_k, K: tl.constexpr, GATE_STRIDE: tl.constexpr):
    """Where the reduction chunk starting at k0 lives, and which positions are real: columns
    k0 + o_k (< K), or with GATE_STRIDE > 0 (four gates of K units side by side, each padded
    to GATE_STRIDE, which the chunk size divides) units from k0 % GATE_STRIDE of gate
    k0 // GATE_STRIDE, at column gate * K + unit. The chunk's start is a constant: every
    chunk's addresses are one offset from o_k, nothing per chunk to keep in registers."""
    if GATE_STRIDE > 0:
        unit0: tl.constexpr = k0 % GATE_STRIDE
        col0: tl.constexpr = (k0 // GATE_STRIDE) * K + unit0
        return col0 + o_k, (unit0 + o_k) < K
    else:
        return k0 + o_k, (k0 + o_k) < K


@triton.jit
def resident_chunks(p_cols, m_cols, K: tl.constexpr, K_STRIDE: tl.constexpr,
                    BLOCK_K: tl.constexpr, NUM_CHUNKS: tl.constexpr, GATE_STRIDE: tl.constexpr):
    """W[k, n] = *(p_cols[n] + col(k) * K_STRIDE) as a tuple of [BLOCK_K, N] chunks of the
    reduction (chunk_columns), loaded once: the compiler keeps them in shared memory."""
    o_k = tl.arange(0, BLOCK_K)
    chunks = ()
    for kc in tl.static_range(NUM_CHUNKS):
        col, real = chunk_columns(kc * BLOCK_K, o_k, K, GATE_STRIDE)
        chunks = chunks + (tl.load(p_cols[None, :] + col[:, None] * K_STRIDE,
                                   mask=m_cols[None, :] & real[:, None], other=0.0),)
    return chunks


@triton.jit
def chunked_dot(p_rows, m_rows, w_chunks, K: tl.constexpr, BLOCK_K: tl.constexpr,
                NUM_CHUNKS: tl.constexpr, GATE_STRIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                ACC: tl.constexpr, WAIT: tl.constexpr = False, poll=True, ACCS: tl.constexpr = 1):
    """A @ W, W resident as chunks (resident_chunks), A[r, k] = *(p_rows[r] + col(k)) read
    from L2 one chunk ahead of the dot that uses it.

    ACCS (1, 2 or 4; the config's split_k) accumulators take the chunks in turn and are
    summed at the end: each warp then runs ACCS independent chains of MMAs instead of one
    chain over the whole reduction, with no exchange between warps (split_dot's 3-D dot
    needs one). An accumulator needs two chunks or more: Triton folds dot(a, b, 0) + c
    into dot(a, b, c), which puts a one-chunk accumulator back on the chain.
    """
    tl.static_assert(ACCS == 1 or ACCS == 2 or ACCS == 4,
                     "a chunked config's split_k (its accumulators) must be 1, 2 or 4")
    o_k = tl.arange(0, BLOCK_K)
    b_acc = tl.zeros([p_rows.shape[0], w_chunks[0].shape[1]], dtype=ACC)
    b_acc1 = b_acc
    b_acc2 = b_acc
    b_acc3 = b_acc
    col, real = chunk_columns(0, o_k, K, GATE_STRIDE)
    b_a = load_written(p_rows[:, None] + col[None, :], m_rows[:, None] & real[None, :], WAIT,
                       poll)
    for kc in tl.static_range(NUM_CHUNKS):
        b_next = b_a
        if kc + 1 < NUM_CHUNKS:
            col, real = chunk_columns((kc + 1) * BLOCK_K, o_k, K, GATE_STRIDE)
            b_next = load_written(p_rows[:, None] + col[None, :],
                                  m_rows[:, None] & real[None, :], WAIT, poll)
        b_x, b_w = dot_operands(b_a, w_chunks[kc])
        if kc % ACCS == 0:
            b_acc = tl.dot(b_x, b_w, b_acc, input_precision=DOT_PRECISION, out_dtype=ACC)
        elif kc % ACCS == 1:
            b_acc1 = tl.dot(b_x, b_w, b_acc1, input_precision=DOT_PRECISION, out_dtype=ACC)
        elif kc % ACCS == 2:
            b_acc2 = tl.dot(b_x, b_w, b_acc2, input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            b_acc3 = tl.dot(b_x, b_w, b_acc3, input_precision=DOT_PRECISION, out_dtype=ACC)
        b_a = b_next
    if ACCS == 2:
        b_acc += b_acc1
    if ACCS == 4:
        b_acc += b_acc1 + (b_acc2 + b_acc3)
    return b_acc


@triton.jit
def gate_rows(i_h, BLOCK_H: tl.constexpr, H: tl.constexpr):
    """Rows of W_hh (and W_ih, the bias) of a program's tile columns n = 4 * unit + gate, the
    four gates of each of its units side by side, and which of those units exist."""
    o_n = tl.arange(0, 4 * BLOCK_H)
    o_nu = i_h * BLOCK_H + o_n // 4
    return (o_n % 4) * H + o_nu, o_nu < H


@triton.jit
def step_rows(step, length, m_b, reverse):
    """Each row's time index at processing step `step`, and whether the row is still running.

    Forward rows walk t = step; reverse rows walk t = length - 1 - step. A row
    past its length maps to t = step, a padded slot; no row runs at a negative step.
    """
    step_b = length * 0 + step          # in length's layout (Gluon kernels call this too)
    running = m_b & (step_b >= 0) & (step_b < length)
    t_row = tl.where(running & reverse, length - 1 - step_b, step_b)
    return tl.cast(t_row, tl.int64), running


@triton.jit
def cell_update(z_i, z_f, z_g, z_o, c, m_run):
    """One step of the LSTM cell from the four gates' pre-activations (x W_ih^T + h W_hh^T +
    biases): the activated gates i, f, g, o, the new c and h = o tanh(c). Where m_run is
    false (a row past its length) c keeps its value and h is 0."""
    b_i = tl.sigmoid(z_i)
    b_f = tl.sigmoid(z_f)
    b_g = _tanh(z_g)
    b_o = tl.sigmoid(z_o)
    c = tl.where(m_run, b_f * c + b_i * b_g, c)          # stopped rows keep their state
    return b_i, b_f, b_g, b_o, c, tl.where(m_run, b_o * _tanh(c), 0.0)


@triton.jit
def program_block(counters, NUM_H_BLOCKS: tl.constexpr, D: tl.constexpr, REVERSE: tl.constexpr):
    """This program's hidden block, batch block and direction (grid axis 0 is hidden blocks x
    batch blocks, axis 1 the directions), its barrier group's counter (one per direction and
    batch block), and whether it walks time in reverse: direction 1 of two, unless the inputs
    are already in processing order (recompute segments)."""
    i_p = tl.program_id(0)
    i_d = tl.program_id(1)
    counter = counters + i_d * (tl.num_programs(0) // NUM_H_BLOCKS) + i_p // NUM_H_BLOCKS
    if D == 2 and REVERSE:
        reverse = i_d == 1
    else:
        reverse = False
    return i_p % NUM_H_BLOCKS, i_p // NUM_H_BLOCKS, i_d, counter, reverse


@triton.jit
def own_block(batch_start, i_b, i_h, B, T, lengths, H: tl.constexpr, BLOCK_B: tl.constexpr,
              BLOCK_H: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """A program's batch rows o_b and hidden units o_u, their masks, its [rows, units] offsets
    into a [B, H] tensor, and each row's sequence length (T without lengths)."""
    o_b = batch_start + i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_u = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_b = o_b < B
    m_u = o_u < H
    if HAS_LENGTHS:
        length = tl.load(lengths + o_b, mask=m_b, other=0)
    else:
        length = tl.full([BLOCK_B], T, tl.int32)
    return o_b, o_u, m_b, m_u, m_b[:, None] & m_u[None, :], o_b[:, None] * H + o_u[None, :], length


@triton.jit
def store_gates(p, b_i, b_f, b_g, b_o, H: tl.constexpr, mask):
    """Four [rows, units] tiles of the gates i, f, g, o at p, p + H, p + 2H, p + 3H (a row of
    4H gate values), in p's dtype."""
    dtype = p.dtype.element_ty
    tl.store(p, rounded_to(b_i, dtype), mask=mask)
    tl.store(p + H, rounded_to(b_f, dtype), mask=mask)
    tl.store(p + 2 * H, rounded_to(b_g, dtype), mask=mask)
    tl.store(p + 3 * H, rounded_to(b_o, dtype), mask=mask)


@triton.jit
def save_step(gates, c_all, t_row, B, o_b, o_u, H: tl.constexpr, b_i, b_f, b_g, b_o, b_c, m_run,
              mask):
    """What the backward needs of a step: the activated gates and c of own units, zeros where
    a row is not running (the saved tensors are fully defined outputs)."""
    store_gates(gates + (t_row * B + o_b)[:, None] * (4 * H) + o_u[None, :],
                tl.where(m_run, b_i, 0.0), tl.where(m_run, b_f, 0.0), tl.where(m_run, b_g, 0.0),
                tl.where(m_run, b_o, 0.0), H, mask)
    tl.store(c_all + (t_row * B + o_b)[:, None] * H + o_u[None, :], tl.where(m_run, b_c, 0.0),
             mask=mask)


@triton.jit
def _load_gx(gx, t_row, running, B, o_b, o_u, m_u, H: tl.constexpr, GS: tl.constexpr,
             ACC: tl.constexpr):
    """Input projection of own units at each row's time index, per gate (nothing read for stopped rows)."""
    p = gx + (t_row * B + o_b)[:, None] * GS + o_u[None, :]
    m = running[:, None] & m_u[None, :]
    return (tl.load(p, mask=m, other=0.0).to(ACC), tl.load(p + H, mask=m, other=0.0).to(ACC),
            tl.load(p + 2 * H, mask=m, other=0.0).to(ACC), tl.load(p + 3 * H, mask=m, other=0.0).to(ACC))


@triton.jit
def load_restarts(restarts, state, step, B, o_b, running, p_bu, m_bu,
                  HAS_STATE: tl.constexpr, ACC: tl.constexpr):
    """Rows restarting before processing step `step`, and the c they restart from (or zeros)."""
    # A running row is inside the sequence (step < length <= T): nothing else is read.
    b_restart = tl.load(restarts + tl.cast(step, tl.int64) * B + o_b, mask=running, other=0) != 0
    if HAS_STATE:
        b_state = tl.load(state + p_bu, mask=b_restart[:, None] & m_bu, other=0.0).to(ACC)
    else:
        b_state = tl.zeros(m_bu.shape, dtype=ACC)
    return b_restart, b_state


@triton.jit
def _add_restart_term(b_gxi, b_gxf, b_gxg, b_gxo, hw_restart, restarting, B, o_b, o_u, m_u,
                      H: tl.constexpr, GS: tl.constexpr, ACC: tl.constexpr):
    """The input projection plus h_restart W_hh^T, per gate, for the rows that restart."""
    r_i, r_f, r_g, r_o = _load_gx(hw_restart, tl.zeros_like(o_b).to(tl.int64), restarting, B,
                                  o_b, o_u, m_u, H, GS, ACC)
    return b_gxi + r_i, b_gxf + r_f, b_gxg + r_g, b_gxo + r_o


@triton.jit
def _step_inputs(gx, restarts, c_restart, hw_restart, step, B, length, m_b, reverse, o_b, o_u,
                 m_u, p_bu, m_bu, H: tl.constexpr, GS: tl.constexpr, HAS_RESTARTS: tl.constexpr,
                 RESTART_FROM_STATE: tl.constexpr, ACC: tl.constexpr):
    """What a step reads that does not depend on the recurrence: its input projection per gate,
    and which rows restart there with the c they restart from (with their h_restart term)."""
    t_row, running = step_rows(step, length, m_b, reverse)
    b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_row, running, B, o_b, o_u, m_u, H, GS, ACC)
    if HAS_RESTARTS:
        b_restart, b_c_restart = load_restarts(restarts, c_restart, step, B, o_b, running,
                                               p_bu, m_bu, RESTART_FROM_STATE, ACC)
        if RESTART_FROM_STATE:
            b_gxi, b_gxf, b_gxg, b_gxo = _add_restart_term(b_gxi, b_gxf, b_gxg, b_gxo, hw_restart,
                                                           b_restart, B, o_b, o_u, m_u, H, GS,
                                                           ACC)
    else:
        b_restart = running & (o_b < 0)
        b_c_restart = b_gxi
    return b_gxi, b_gxf, b_gxg, b_gxo, b_restart, b_c_restart


@triton.jit(do_not_specialize=["T", "B", "q_begin", "q_end", "batch_start", "leader_inc"])
def lstm_forward_kernel(
    gx,        # [T, B, D, 4H]  x_t W_ih^T + b_ih + b_hh per direction, input dtype
    w_hh,      # [D, 4H, R]     input dtype
    w_hr,      # [D, R, H]      projection weights, input dtype (read when PROJ)
    h0,        # [D, B, R]      input dtype, read when HAS_H0
    c0,        # [D, B, H]      input dtype, read when HAS_H0
    lengths,   # [B]            int32 sequence lengths, read when HAS_LENGTHS
    y,         # [T, B, D, R]   out: h_t (zeros past a row's length), input dtype; with DATAFLOW
               #                filled with all-ones bits by the caller (barrier.py)
    h_n,       # [D, B, R]      out: h at each row's last step, input dtype
    r_all,     # [D, T, B, H]   out when PROJ: o * tanh(c) before the projection, input dtype
               #                (filled like y with DATAFLOW)
    c_state,   # [D, B, H]      fp32, in: c before the first step when q_begin > 0; out: c after
    gates,     # [D, T, B, 4H]  fp32 out when SAVE: activated i, f, g, o (zeros past a length)
    c_all,     # [D, T, B, H]   fp32 out when SAVE (zeros past a length)
    restarts,  # [D, T, B]      int8, 1: the row's state restarts before that processing step
    hw_restart,  # [B, D, 4H]   fp32 h_restart W_hh^T: a restart's recurrent term (RESTART_FROM_STATE)
    c_restart, # [D, B, H]      the c a restart restores (RESTART_FROM_STATE, else zeros)
    h_ckpt,    # [D, NC, B, R]  out when CKPT_EVERY: h before processing steps k * CKPT_EVERY
    c_ckpt,    # [D, NC, B, H]  fp32, the same for c (slot 0, the initial state, is the caller's)
    stamps,    # [T, MAX_PROGRAMS, EVENTS] int64 out when STAMPS: each step's timeline
    counters,  # [groups]       int32 barrier counters, one per (direction, batch block)
    T, B, q_begin, q_end, batch_start, leader_inc,
    H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, RESIDENT: tl.constexpr, PROJ: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, REVERSE: tl.constexpr, HAS_RESTARTS: tl.constexpr,
    RESTART_FROM_STATE: tl.constexpr, CKPT_EVERY: tl.constexpr, INNER_STAGES: tl.constexpr,
    PREFETCH_AFTER_ARRIVE: tl.constexpr, CHUNKED: tl.constexpr, DATAFLOW: tl.constexpr,
    CLUSTER: tl.constexpr, DSMEM: tl.constexpr, RESUMED: tl.constexpr, STAMPS: tl.constexpr,
):
    # Each step is one phase (cell update), or two with a projection (PROJ): the cell
    # phase over own hidden units, a barrier, then h = r W_hr^T over own output units.
    # q counts phases; stepped mode launches once per phase.
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    PHASES: tl.constexpr = 2 if PROJ else 1
    ACC: tl.constexpr = c_state.dtype.element_ty    # fp32 (fp64 for fp64 inputs)
    YS: tl.constexpr = D * R                        # row stride of y
    GS: tl.constexpr = D * 4 * H                    # row stride of gx
    i_h, i_b, i_d, counter, reverse = program_block(counters, NUM_H_BLOCKS, D, REVERSE)
    # Per-direction bases (64-bit: T * B * 4H can pass 2**31).
    i_d64 = tl.cast(i_d, tl.int64)
    gx += i_d64 * 4 * H
    w_hh += i_d64 * 4 * H * R
    w_hr += i_d64 * R * H
    h0 += i_d64 * B * R
    c0 += i_d64 * B * H
    y += i_d64 * R
    h_n += i_d64 * B * R
    r_all += i_d64 * T * B * H
    c_state += i_d64 * B * H
    gates += i_d64 * T * B * 4 * H
    c_all += i_d64 * T * B * H
    restarts += i_d64 * T * B
    hw_restart += i_d64 * 4 * H
    c_restart += i_d64 * B * H
    if CKPT_EVERY > 0:
        num_ckpt = (T + CKPT_EVERY - 1) // CKPT_EVERY
        h_ckpt += i_d64 * num_ckpt * B * R
        c_ckpt += i_d64 * num_ckpt * B * H

    o_b, o_u, m_b, m_u, m_bu, p_bu, length = own_block(batch_start, i_b, i_h, B, T, lengths, H,
                                                       BLOCK_B, BLOCK_H, HAS_LENGTHS)
    o_r = i_h * BLOCK_R + tl.arange(0, BLOCK_R)                 # own output units (PROJ)
    m_r = o_r < R
    w_row, m_n = gate_rows(i_h, BLOCK_H, H)                     # rows of W_hh

    if RESIDENT:
        if CHUNKED:
            # Large H: [BLOCK_K, 4*BLOCK_H] chunks, so that h is staged one chunk at a time.
            w_chunks = resident_chunks(w_hh + w_row * R, m_n, R, 1, BLOCK_K, RP // BLOCK_K, 0)
        else:
            # [RP, 4*BLOCK_H], or [SPLIT_K, RP // SPLIT_K, 4*BLOCK_H] slices for split_dot.
            o_j = reduction_index(RP, SPLIT_K)
            b_w = tl.load(w_hh + w_row * R + tl.expand_dims(o_j, -1),
                          mask=m_n & tl.expand_dims(o_j < R, -1), other=0.0)
    if PROJ and RESIDENT:
        # W_hr[own output units, :] as a [HP, BLOCK_R] tile, kept on chip.
        o_jh = reduction_index(HP, SPLIT_K)
        b_whr = tl.load(w_hr + o_r * H + tl.expand_dims(o_jh, -1),
                        mask=m_r & tl.expand_dims(o_jh < H, -1), other=0.0)

    t_begin = q_begin // PHASES
    if q_begin == 0:
        if HAS_H0:
            b_c = tl.load(c0 + p_bu, mask=m_bu, other=0.0).to(ACC)
        else:
            b_c = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    else:
        b_c = tl.load(c_state + p_bu, mask=m_bu, other=0.0)
    b_gxi, b_gxf, b_gxg, b_gxo, b_restart, b_c_restart = _step_inputs(
        gx, restarts, c_restart, hw_restart, t_begin, B, length, m_b, reverse, o_b, o_u, m_u,
        p_bu, m_bu, H, GS, HAS_RESTARTS, RESTART_FROM_STATE, ACC)
    # Rows of h_{t-1} and which of them to read, carried through the loop: each cell phase
    # sets them for the next step before the barrier, so that after it only the loads
    # remain. Not chosen per step by a branch between h0 and y: through a branch the
    # compiler loses the rows' alignment and loads h one element at a time (Triton 3.6).
    if HAS_H0:
        m_first = m_b
    else:
        m_first = m_b & (o_b < 0)
    if RESUMED:
        # A launch from a later phase (a later chunk of steps, or a stepped launch after the
        # first): h_{t-1} is in y. Chosen at compile time: a select between h0 and y costs
        # the rows their alignment under Triton 3.9. (A projection phase of step 0 asks for
        # step -1's rows, and never reads them.)
        t_row_prev, _ = step_rows(t_begin - 1, length, m_b, reverse)
        p_prev_h = y + (t_row_prev * B + o_b) * YS
        _, m_prev_h = step_rows(t_begin, length, m_b, reverse)
    else:
        p_prev_h = h0 + o_b * R             # a launch from step 0
        m_prev_h = m_first

    if PERSISTENT and DSMEM:
        # h pushed into every program's shared memory (dsmem.py): h0 goes out first, as if
        # a step before step 0 had made it.
        tl.static_assert(CLUSTER and RESIDENT and not (CHUNKED or PROJ or DATAFLOW or RESUMED))
        HB: tl.constexpr = NUM_H_BLOCKS * BLOCK_H
        SLOT: tl.constexpr = BLOCK_B * HB * 4
        exchange = exchange_setup(SLOT, SLOT)
        o_push = 4 * (tl.arange(0, BLOCK_B)[:, None] * HB + o_u[None, :])
        b_h0 = tl.load(h0 + o_b[:, None] * R + o_u[None, :], mask=m_first[:, None] & m_u[None, :],
                       other=0.0)
        h_slot, h_mbar, h_parity = exchange_slot(exchange, SLOT, 0)
        send(h_slot + o_push, b_h0.to(tl.float32).to(tl.int32, bitcast=True), h_mbar,
             NUM_H_BLOCKS)

    for q in range(q_begin, q_end):
        t = q // PHASES
        t_row, running = step_rows(t, length, m_b, reverse)
        if PROJ:
            cell_phase = q % 2 == 0
        else:
            cell_phase: tl.constexpr = True
        if cell_phase:
            if STAMPS:
                timeline.step_begins(stamps, t)
            # h of the previous step of every unit, written by all programs of this group.
            p_rows = p_prev_h
            m_rows = m_prev_h
            if HAS_RESTARTS:
                # A restarting row does not read its previous h: the restart state's
                # recurrent term came with its input projection (_add_restart_term).
                m_rows = m_rows & (b_restart == 0)
                b_c = tl.where(b_restart[:, None], b_c_restart, b_c)
            # With DATAFLOW the h of steps t > 0 is polled until written (h0 is the caller's).
            if RESIDENT:
                if CHUNKED:
                    b_acc = chunked_dot(p_rows, m_rows, w_chunks, R, BLOCK_K, RP // BLOCK_K, 0,
                                        DOT_PRECISION, ACC, DATAFLOW, t > 0, SPLIT_K)
                elif PERSISTENT and DSMEM:
                    # h_{t-1} is exchange t; then its slot's next phase, exchange t + 2.
                    h_slot, h_mbar, h_parity = exchange_slot(exchange, SLOT, t)
                    wait_phase(h_mbar, h_parity)
                    if STAMPS:
                        timeline.wait_ends(stamps, t)
                    b_acc = pushed_dot(h_slot, m_rows, o_j, b_w, R, HB, SPLIT_K, DOT_PRECISION,
                                       ACC)
                    if t + 2 < q_end:
                        arm(h_mbar, SLOT)
                else:
                    b_acc = split_dot(p_rows, m_rows, o_j, b_w, R, SPLIT_K, DOT_PRECISION, ACC,
                                      DATAFLOW, t > 0)
            else:
                b_acc = streamed_dot(p_rows, m_rows, w_hh + w_row * R, m_n, R, RP, 1, BLOCK_K,
                                     DOT_PRECISION, ACC, INNER_STAGES, DATAFLOW, t > 0)
            # [B, 4*BLOCK_H] -> four [B, BLOCK_H] gates (column n = 4 * unit + 2 * a + b).
            b_even, b_odd = tl.split(tl.reshape(b_acc, [BLOCK_B, BLOCK_H, 2, 2]))
            b_ai, b_ag = tl.split(b_even)
            b_af, b_ao = tl.split(b_odd)

            m_run = running[:, None] & m_u[None, :]
            b_i, b_f, b_g, b_o, b_c, b_h = cell_update(b_ai + b_gxi, b_af + b_gxf, b_ag + b_gxg,
                                                       b_ao + b_gxo, b_c, m_run)
            b_h = rounded_to(published(b_h, DATAFLOW), y.dtype.element_ty)
            if PERSISTENT and DSMEM:
                if q < q_end - 1:
                    h_slot, h_mbar, h_parity = exchange_slot(exchange, SLOT, t + 1)
                    send(h_slot + o_push, b_h.to(tl.float32).to(tl.int32, bitcast=True), h_mbar,
                         NUM_H_BLOCKS)
            p_prev_h = y + (t_row * B + o_b) * YS      # h_t's rows, read by step t + 1
            _, m_prev_h = step_rows(t + 1, length, m_b, reverse)

            if PROJ:
                tl.store(r_all + (t_row * B + o_b)[:, None] * H + o_u[None, :], b_h, mask=m_bu)
            else:
                tl.store(y + (t_row * B + o_b)[:, None] * YS + o_u[None, :], b_h, mask=m_bu)
                if STAMPS:
                    timeline.stored(stamps, t)
                tl.store(h_n + p_bu, b_h, mask=m_bu & (t == length - 1)[:, None])
            if SAVE:
                save_step(gates, c_all, t_row, B, o_b, o_u, H, b_i, b_f, b_g, b_o, b_c, m_run,
                          m_bu)
            if CKPT_EVERY > 0:
                if ((t + 1) % CKPT_EVERY == 0) & (t + 1 < T):
                    # The state before processing step t + 1, for the recompute in the backward.
                    slot = tl.cast((t + 1) // CKPT_EVERY, tl.int64) * B
                    tl.store(c_ckpt + (slot + o_b)[:, None] * H + o_u[None, :], b_c, mask=m_bu)
                    if not PROJ:
                        tl.store(h_ckpt + (slot + o_b)[:, None] * R + o_u[None, :], b_h,
                                 mask=m_bu)
            if DATAFLOW or DSMEM or not PREFETCH_AFTER_ARRIVE:
                # The next step's inputs do not depend on the recurrence: their loads are
                # in flight while this program waits (at the barrier, or for the data).
                m_next = m_b & (tl.full([BLOCK_B], (t + 1) * PHASES, tl.int32) < q_end)
                b_gxi, b_gxf, b_gxg, b_gxo, b_restart, b_c_restart = _step_inputs(
                    gx, restarts, c_restart, hw_restart, t + 1, B, length, m_next, reverse,
                    o_b, o_u, m_u, p_bu, m_bu, H, GS, HAS_RESTARTS, RESTART_FROM_STATE, ACC)
        else:
            # Projection: h_t[:, own output units] = r_t (all hidden units) @ W_hr^T.
            p_rows = r_all + (t_row * B + o_b) * H
            if RESIDENT:
                b_y = split_dot(p_rows, running, o_jh, b_whr, H, SPLIT_K, DOT_PRECISION, ACC,
                                DATAFLOW, True)
            else:
                b_y = streamed_dot(p_rows, running, w_hr + o_r * H, m_r, H, HP, 1, BLOCK_K,
                                   DOT_PRECISION, ACC, INNER_STAGES, DATAFLOW, True)
            b_y = rounded_to(published(tl.where(running[:, None], b_y, 0.0), DATAFLOW),
                             y.dtype.element_ty)
            m_br = m_b[:, None] & m_r[None, :]
            tl.store(y + (t_row * B + o_b)[:, None] * YS + o_r[None, :], b_y, mask=m_br)
            if STAMPS:
                timeline.stored(stamps, t)
            tl.store(h_n + o_b[:, None] * R + o_r[None, :], b_y,
                     mask=m_br & (t == length - 1)[:, None])
            if CKPT_EVERY > 0:
                if ((t + 1) % CKPT_EVERY == 0) & (t + 1 < T):
                    slot = tl.cast((t + 1) // CKPT_EVERY, tl.int64) * B
                    tl.store(h_ckpt + (slot + o_b)[:, None] * R + o_r[None, :], b_y, mask=m_br)
        if PERSISTENT and not (DATAFLOW or DSMEM):
            if q < q_end - 1:
                arrived = barrier_arrive(counter, leader_inc, i_h == 0, CLUSTER)
                if PREFETCH_AFTER_ARRIVE and cell_phase:
                    # After the release: the loads do not hold up this program's arrival.
                    b_gxi, b_gxf, b_gxg, b_gxo, b_restart, b_c_restart = _step_inputs(
                        gx, restarts, c_restart, hw_restart, t + 1, B, length, m_b, reverse,
                        o_b, o_u, m_u, p_bu, m_bu, H, GS, HAS_RESTARTS, RESTART_FROM_STATE, ACC)
                barrier_wait(counter, arrived, CLUSTER)

    tl.store(c_state + p_bu, b_c, mask=m_bu)
    if PERSISTENT and DSMEM:
        cluster_sync()      # no program leaves while another's pushes may still reach it


def lstm_forward(gx, w_hh, h0, c0, lengths, w_hr=None, *, save: bool, config=None,
                 force_stepped: bool = False, restarts=None, h_restart=None, c_restart=None,
                 ckpt_every: int = 0, reverse: bool = True, step_chunks=None, stamps=None):
    """Run the recurrence of one layer (all its directions) over a precomputed input projection.

    Args:
        gx: [T, B, D*4H] input projection with both biases, contiguous, direction-major columns.
        w_hh: [D, 4H, R] recurrent weights, same dtype as gx; direction 1 runs in reverse.
        h0: [D, B, R], c0: [D, B, H] initial state, or both None for zeros.
        lengths: [B] int32 sequence lengths on gx's device (1..T), or None for all T.
        w_hr: [D, R, H] projection weights (h = (o * tanh(c)) W_hr^T), or None (then R = H).
        save: also return what the backward needs (gates and c per step, in the state dtype).
        config: a ``KernelConfig``; picked by ``dispatch.pick_config`` when None.
        force_stepped: one launch per step even where a persistent launch fits.
        restarts: [D, T, B] int8 or None: 1 where a row's state restarts, before that
            processing step (in each direction's own order), from (h_restart, c_restart),
            [D, B, R] and [D, B, H], or from zeros when those are None. A restarting row
            does not read h: its recurrent term h_restart W_hh^T is one GEMM up front.
        ckpt_every: > 0: also return the state before every ckpt_every-th processing step.
        reverse: direction 1 walks each row backwards; False when gx is already in
            processing order (the recompute segments of the backward).
        step_chunks: None, or (one direction) an iterable of step ranges (s0, s1) that cover
            [0, T) in order: each range's recurrence is launched as the iterable hands it
            over, so that a generator can get gx[s0:s1] ready in between (overlap.py).
        stamps: None, or a timeline.stamps_buffer of T steps that the kernel records each
            step's timeline in (a GPU's clock: not under the interpreter).
    Returns:
        y [T, B, D*R] (zeros past each row's length), h_n [D, B, R], c_n [D, B, H],
        gates [D, T, B, 4H] or None, c_all [D, T, B, H] or None (these three in the state
        dtype: fp32, fp64 for fp64 inputs), r_all [D, T, B, H] (o * tanh(c)) or None,
        and with ckpt_every: h_ckpt [D, NC, B, R], c_ckpt [D, NC, B, H] (state dtype),
        NC = ceil(T / ckpt_every), slot k the state before processing step k * ckpt_every.
    """
    T, B, G = gx.shape
    D, _, R = w_hh.shape
    H = G // (4 * D)
    device, dtype = gx.device, gx.dtype
    if step_chunks is not None and D != 1:
        raise ValueError(f"lstm_forward: step_chunks needs one direction, got {D}")
    timeline.check_stamps("lstm_forward", stamps, T)
    config = config or pick_config(B, H, dtype, device, "forward", D, proj=w_hr is not None)
    if config.dsmem and (w_hr is not None or dtype == torch.float64 or step_chunks is not None):
        # It pushes one h, 32 bits an element, and only from step 0 (its mbarriers' phases).
        config = dataclasses.replace(config, dsmem=False)
    if config.registers:
        from . import forward_registers   # Gluon: imported only where a config asks for it
        if forward_registers.runs_here(H, dtype, device, proj=w_hr is not None,
                                       restarts=restarts is not None, ckpt_every=ckpt_every,
                                       step_chunks=step_chunks is not None,
                                       force_stepped=force_stepped):
            # dsmem: h pushed through the cluster of each batch block's programs.
            outputs = forward_registers.lstm_forward_registers(gx, w_hh, h0, c0, lengths,
                                                               save=save, reverse=reverse,
                                                               stamps=stamps,
                                                               exchange=config.dsmem)
            if outputs is not None:
                return outputs + (None, None, None)
        config = dataclasses.replace(config, registers=False)
    if config.ring:
        from . import forward_ring        # Gluon: imported only where a config asks for it
        if forward_ring.runs_here(config, H, dtype, device, proj=w_hr is not None,
                                  restarts=restarts is not None, ckpt_every=ckpt_every,
                                  step_chunks=step_chunks is not None,
                                  force_stepped=force_stepped):
            outputs = forward_ring.lstm_forward_ring(gx, w_hh, h0, c0, lengths, config,
                                                     save=save, reverse=reverse, stamps=stamps)
            if outputs is not None:
                return outputs + (None, None, None)
        config = dataclasses.replace(config, ring=False)
    acc = state_dtype(dtype)
    proj = w_hr is not None
    y = torch.empty(T, B, D * R, dtype=dtype, device=device)
    h_n = torch.empty(D, B, R, dtype=dtype, device=device)
    r_all = torch.empty(D, T, B, H, dtype=dtype, device=device) if proj else None
    c_state = torch.empty(D, B, H, dtype=acc, device=device)
    gates = torch.empty(D, T, B, 4 * H, dtype=acc, device=device) if save else None
    c_all = torch.empty(D, T, B, H, dtype=acc, device=device) if save else None
    if config.dataflow:          # the slots other programs poll
        fill_unwritten(y)
        if proj:
            fill_unwritten(r_all)
    h_ckpt = c_ckpt = None
    if ckpt_every > 0:
        num_ckpt = cdiv(T, ckpt_every)
        h_ckpt = torch.empty(D, num_ckpt, B, R, dtype=dtype, device=device)
        c_ckpt = torch.empty(D, num_ckpt, B, H, dtype=acc, device=device)
        h_ckpt[:, 0] = 0 if h0 is None else h0      # slot 0: the initial state
        c_ckpt[:, 0] = 0 if c0 is None else c0
    has_h0 = h0 is not None
    restart_from_state = h_restart is not None
    # [B, D, 4H]: the recurrent term every restart adds instead of h_{t-1} W_hh^T, in fp32.
    hw_restart = (torch.einsum("dbr,dgr->bdg", h_restart.to(acc), w_hh.to(acc)).contiguous()
                  if restart_from_state and restarts is not None else None)
    args = (gx, w_hh, w_hr if proj else w_hh, h0 if has_h0 else y, c0 if has_h0 else y,
            lengths if lengths is not None else c_state, y, h_n, r_all if proj else y, c_state,
            gates if save else c_state, c_all if save else c_state,
            restarts if restarts is not None else c_state,
            hw_restart if hw_restart is not None else c_state,
            c_restart if restart_from_state else y,
            h_ckpt if ckpt_every > 0 else y, c_ckpt if ckpt_every > 0 else c_state,
            stamps if stamps is not None else c_state, T, B)
    constexprs = dict(H=H, HP=padded(H), R=R, RP=padded(R), D=D, PROJ=proj, HAS_H0=has_h0,
                      HAS_LENGTHS=lengths is not None, SAVE=save,
                      DOT_PRECISION=dot_precision(dtype, device), REVERSE=reverse,
                      HAS_RESTARTS=restarts is not None,
                      RESTART_FROM_STATE=hw_restart is not None,
                      CKPT_EVERY=ckpt_every, DSMEM=False, RESUMED=False,
                      STAMPS=stamps is not None)
    phases = 2 if proj else 1
    for s0, s1 in [(0, T)] if step_chunks is None else step_chunks:
        launch_recurrence(lstm_forward_kernel, args, constexprs, first_step=s0 * phases,
                          num_steps=s1 * phases, batch=B, hidden_size=H, output_size=R,
                          num_directions=D, config=config, device=device,
                          force_stepped=force_stepped,
                          # each element of h to every program of the group
                          pushes_per_exchange=lambda c: c.num_h_blocks(H) * c.block_b * c.block_h)
    return y, h_n, c_state, gates, c_all, r_all, h_ckpt, c_ckpt
