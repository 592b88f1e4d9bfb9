"""Persistent LSTM backward: the whole reverse recurrence of a layer in one launch.

Same grid and ownership as the forward kernel (see forward.py): program
(b, p, d) owns batch rows of block b and hidden units [p*BLOCK_H,
(p+1)*BLOCK_H) of direction d. It keeps the *column* slice W_hh[:, its units]
on chip, per gate a [HP, BLOCK_H] tile (cut into SPLIT_K slices when asked) for
``split_dot`` (forward.py).

The loop runs T + 1 stages over the forward's processing steps in reverse,
s = 0 .. T for step = T - 1 - s:
  1. dh for its units: dh_n at s = 0 (and for rows whose sequence ended after
     this step), else dG of the next step @ W_hh[:, units], reading that whole
     dG (all programs wrote it before the last barrier; at s = 0 the dot's rows are
     all masked off);
  2. for s < T, with the gates and c saved by the forward:
        dh += dy_t
        dc  = dc_next + dh * o * (1 - tanh(c_t)^2)
        dG  = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dh*tanh(c_t)*o(1-o)]
        dc_next = dc * f
     writes dG_t (zeros for rows past their length) and meets the others at the
     barrier (one per step);
  3. at s = T, dh is the gradient of h0.
With a projection (PROJ), step 1 runs over each program's BLOCK_R output units
(dh of the projected h, saved as dh_all), then a barrier, then step 2 starts
from dr = dh @ W_hr for its hidden units: two phases, two barriers per step.
With GATE_SPLIT (streamed weights, no projection) step 1 is a phase of its own, shaped
as a GEMM: the group's programs split dh = dG @ W_hh four ways along the reduction, one
gate each, for 4*BLOCK_H output units, and write fp32 partial sums to ``dh_parts``;
after a barrier each program adds the four partials of its own units and goes on with
step 2. Each program then reads a [BLOCK_B, H] slice of dG a step instead of
[BLOCK_B, 4H]: fewer bytes for the price of a second barrier.
With DSMEM (a cluster, resident weights, no projection) no program reads dG at all: each
multiplies its own dG_t by the rows of its own gates of W_hh (the forward's slice) and
sends every program of the group its block of that share of dh_{t-1}; step 1 adds the
shares that arrived in its shared memory (dsmem.py).
dc_next lives in registers and travels between launches through ``dc_state``
(in: dc_n, out: the gradient of c0). The weight and input gradients are large GEMMs
over dG afterwards (autograd.py), and the bias gradient its sum over steps and rows;
with BIAS_SUMS each program writes its share of that sum as it goes, a step's dG
tiles summed over its rows into ``bias_sums`` [T, batch blocks, D, 4H], so that the
sum left (over T and the batch blocks) reads a [T, B / BLOCK_B, ...] tensor, not dG.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from ..dispatch import (bias_sums_in_kernel, dot_precision, gate_split_applies,
                        launch_recurrence, padded, pick_config, state_dtype)
from . import timeline
from .barrier import barrier_arrive, barrier_wait, fill_unwritten, load_written, published
from .dsmem import arm, cluster_sync, exchange_setup, exchange_slot, receive, send_to, wait_phase
from .forward import (_tanh, chunked_dot, dot_operands, gate_rows, load_restarts, own_block,
                      program_block, reduction_index, resident_chunks, rounded_to, split_dot,
                      step_rows, store_gates, streamed_dot)


@triton.jit
def gate_rows_dot_resident(p_rows, m_rows, o_j, b_wi, b_wf, b_wg, b_wo, H: tl.constexpr,
                           SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
                           WAIT: tl.constexpr):
    """dG @ W[:, own units] with dG[r, :] = the four gates' 4H gradients at p_rows[r] and W's
    column slice on chip per gate (split_dot's [HP, N] tiles). One gate at a time, so only a
    [BLOCK_B, HP] slice of dG is staged."""
    b_dot = split_dot(p_rows, m_rows, o_j, b_wi, H, SPLIT_K, DOT_PRECISION, ACC, WAIT, True)
    b_dot += split_dot(p_rows + H, m_rows, o_j, b_wf, H, SPLIT_K, DOT_PRECISION, ACC, WAIT, True)
    b_dot += split_dot(p_rows + 2 * H, m_rows, o_j, b_wg, H, SPLIT_K, DOT_PRECISION, ACC, WAIT,
                       True)
    b_dot += split_dot(p_rows + 3 * H, m_rows, o_j, b_wo, H, SPLIT_K, DOT_PRECISION, ACC, WAIT,
                       True)
    return b_dot


@triton.jit
def gate_rows_dot_streamed(p_rows, m_rows, w, o_r, m_r, H: tl.constexpr, HP: tl.constexpr,
                           R: tl.constexpr, BLOCK_K: tl.constexpr, N: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
                           INNER_STAGES: tl.constexpr, WAIT: tl.constexpr):
    """The same with W [4H, R] read from L2 in BLOCK_K chunks of the four gates' reduction."""
    b_dot = tl.zeros([p_rows.shape[0], N], dtype=ACC)
    for k0 in tl.range(0, 4 * HP, BLOCK_K, num_stages=INNER_STAGES):
        o_n = k0 + tl.arange(0, BLOCK_K)     # gate o_n // HP, unit o_n % HP
        m_n = (o_n % HP) < H
        col_n = (o_n // HP) * H + o_n % HP
        b_dgk = load_written(p_rows[:, None] + col_n[None, :], m_rows[:, None] & m_n[None, :],
                             WAIT, True)
        b_wk = tl.load(w + col_n[:, None] * R + o_r[None, :], mask=m_n[:, None] & m_r[None, :],
                       other=0.0)
        b_dgk, b_wk = dot_operands(b_dgk, b_wk)
        b_dot = tl.dot(b_dgk, b_wk, b_dot, input_precision=DOT_PRECISION, out_dtype=ACC)
    return b_dot


@triton.jit
def cell_gradients(b_dr, b_dc, b_i, b_f, b_g, b_o, b_ct, b_cp, m_run, DATAFLOW: tl.constexpr):
    """A step's gradients of the gate pre-activations, i, f, g, o (zeros where a row is not
    running; published for polling with DATAFLOW), and of c_t, from the gradient of
    r = o * tanh(c_t) (b_dr), the gradient of c_t from the step after (b_dc) and what the
    forward saved: the activated gates, c_t and c_{t-1}."""
    b_tc = _tanh(b_ct)
    # The saved values' factors first, so the recurrent gradient (b_dr, the dot's result)
    # meets them in few products and fewer values are kept in both the dot's layout and the
    # loads' (see the dh phase of lstm_backward_kernel). Which products are grouped is what
    # ptxas on sm_90 left spill-free across the tiles tests/test_codegen.py checks.
    b_to = b_o * (1.0 - b_tc * b_tc)
    b_do = b_tc * b_o * (1.0 - b_o)
    b_dc_t = b_dc + b_dr * b_to
    b_dgi = published(tl.where(m_run, b_dc_t * (b_g * b_i * (1.0 - b_i)), 0.0), DATAFLOW)
    b_dgf = published(tl.where(m_run, b_dc_t * (b_cp * b_f * (1.0 - b_f)), 0.0), DATAFLOW)
    b_dgg = published(tl.where(m_run, b_dc_t * b_i * (1.0 - b_g * b_g), 0.0), DATAFLOW)
    b_dgo = published(tl.where(m_run, b_dr * b_do, 0.0), DATAFLOW)
    return b_dgi, b_dgf, b_dgg, b_dgo, b_dc_t


@triton.jit
def load_saved(step, length, m_b, gates, c_all, c0, restarts, c_restart, B, o_b, o_u, m_u,
                p_bu, m_bu, H: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESTARTS: tl.constexpr,
                RESTART_FROM_STATE: tl.constexpr, ACC: tl.constexpr, REVERSE):
    """What the cell phase of a step needs: gates i, f, g, o, c_t, c_{t-1} (zeros for stopped
    rows, and rows outside m_b), and which rows restarted at this step (their c_{t-1} is the
    restart state)."""
    t_row, running = step_rows(step, length, m_b, REVERSE)
    m = running[:, None] & m_u[None, :]
    p_g = gates + (t_row * B + o_b)[:, None] * (4 * H) + o_u[None, :]
    b_i = tl.load(p_g, mask=m, other=0.0)
    b_f = tl.load(p_g + H, mask=m, other=0.0)
    b_g = tl.load(p_g + 2 * H, mask=m, other=0.0)
    b_o = tl.load(p_g + 3 * H, mask=m, other=0.0)
    b_ct = tl.load(c_all + (t_row * B + o_b)[:, None] * H + o_u[None, :], mask=m, other=0.0)
    if step > 0:
        t_prev = tl.where(REVERSE, t_row + 1, t_row - 1)
        b_cp = tl.load(c_all + (t_prev * B + o_b)[:, None] * H + o_u[None, :], mask=m, other=0.0)
    else:
        if HAS_H0:
            b_cp = tl.load(c0 + o_b[:, None] * H + o_u[None, :], mask=m, other=0.0).to(ACC)
        else:
            b_cp = tl.where(m, 0.0, 0.0).to(ACC)       # in m's layout (Gluon callers have one)
    if HAS_RESTARTS:
        b_restart, b_c_restart = load_restarts(restarts, c_restart, step, B, o_b, running, p_bu,
                                               m_bu, RESTART_FROM_STATE, ACC)
        b_cp = tl.where(b_restart[:, None], b_c_restart, b_cp)
    else:
        b_restart = running & (o_b < 0)
    return b_i, b_f, b_g, b_o, b_ct, b_cp, b_restart


@triton.jit
def store_gate_sums(p, b_i, b_f, b_g, b_o, o_u, m_u, H: tl.constexpr):
    """The column sums of four [rows, units] gate tiles at p + gate * H + unit."""
    b_sums = tl.sum(tl.join(tl.join(b_i, b_f), tl.join(b_g, b_o)), 0)   # [unit, a, b]
    o_two = tl.arange(0, 2)
    gate = o_two[None, :, None] + 2 * o_two[None, None, :]               # (join order)
    tl.store(p + gate * H + o_u[:, None, None], b_sums, mask=m_u[:, None, None])


@triton.jit(do_not_specialize=["T", "B", "q_begin", "q_end", "batch_start", "leader_inc"])
def lstm_backward_kernel(
    dy,        # [T, B, D, R]   grad of y, input dtype (read when HAS_DY)
    dh_n,      # [D, B, R]      grad of h_n, input dtype (read when HAS_DHN)
    dc_state,  # [D, B, H]      fp32, in: dc_next before phase q_begin; out: after q_end - 1
    gates,     # [D, T, B, 4H]  fp32 activated i, f, g, o saved by the forward
    c_all,     # [D, T, B, H]   fp32 c_t saved by the forward
    c0,        # [D, B, H]      input dtype, read when HAS_H0
    lengths,   # [B]            int32 sequence lengths, read when HAS_LENGTHS
    w_hh,      # [D, 4H, R]     input dtype
    w_hr,      # [D, R, H]      projection weights, input dtype (read when PROJ)
    dgates,    # [T, B, D, 4H]  out: dG_t, input dtype (all-ones bits first with DATAFLOW)
    dh_all,    # [D, T, B, R]   out when PROJ: total grad of h_t, input dtype (zeros past length;
               #                all-ones bits first with DATAFLOW)
    dh_parts,  # [D, 4, B, R]   fp32 scratch when GATE_SPLIT: each gate's share of dG @ W_hh
    dh0,       # [D, B, R]      out: grad of h0, input dtype
    restarts,  # [D, T, B]      int8, 1: the row restarted before that processing step
    c_restart, # [D, B, H]      the c a restart restored (RESTART_FROM_STATE, else zeros)
    dh_restart,  # [D, B, R]    fp32, zeroed by the caller; out: grad of the restart h
    dc_restart,  # [D, B, H]    fp32, zeroed by the caller; out: grad of the restart c
    bias_sums,   # [T, NB, D, 4H] fp32 when BIAS_SUMS, out: each stage's dG summed over the
                 #              rows of each batch block
    stamps,    # [T, MAX_PROGRAMS, EVENTS] int64 out when STAMPS: stages 0 .. T - 1's timeline
    counters,  # [groups]       int32 barrier counters, one per (direction, batch block)
    T, B, q_begin, q_end, batch_start, leader_inc,
    H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, RESIDENT: tl.constexpr, PROJ: tl.constexpr, HAS_DY: tl.constexpr,
    HAS_DHN: tl.constexpr, HAS_H0: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    PERSISTENT: tl.constexpr, DOT_PRECISION: tl.constexpr, REVERSE: tl.constexpr,
    HAS_RESTARTS: tl.constexpr, RESTART_FROM_STATE: tl.constexpr, INNER_STAGES: tl.constexpr,
    PREFETCH_AFTER_ARRIVE: tl.constexpr, CHUNKED: tl.constexpr, DATAFLOW: tl.constexpr,
    CLUSTER: tl.constexpr,
    GATE_SPLIT: tl.constexpr, DSMEM: tl.constexpr, BIAS_SUMS: tl.constexpr, STAMPS: tl.constexpr,
):
    # Stage s = 0 .. T walks the forward's steps backwards (step = T - 1 - s). Its dh
    # phase gives dh of own output units; its cell phase (s < T) gives dG of own hidden
    # units. Without a projection both own the same units and share one phase; with
    # one (PROJ) they are separate phases with a barrier between. With GATE_SPLIT a GEMM
    # phase, the partial sums of dh, comes first. q counts phases.
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    PHASES: tl.constexpr = 2 if (PROJ or GATE_SPLIT) else 1
    BLOCK_O: tl.constexpr = BLOCK_R if PROJ else BLOCK_H    # output units per program
    ACC: tl.constexpr = dc_state.dtype.element_ty   # fp32 (fp64 for fp64 inputs)
    YS: tl.constexpr = D * R                        # row stride of dy
    GS: tl.constexpr = D * 4 * H                    # row stride of dgates
    i_h, i_b, i_d, counter, reverse = program_block(counters, NUM_H_BLOCKS, D, REVERSE)
    # Per-direction bases (64-bit: T * B * 4H can pass 2**31).
    i_d64 = tl.cast(i_d, tl.int64)
    dy += i_d64 * R
    dh_n += i_d64 * B * R
    dc_state += i_d64 * B * H
    gates += i_d64 * T * B * 4 * H
    c_all += i_d64 * T * B * H
    c0 += i_d64 * B * H
    w_hh += i_d64 * 4 * H * R
    w_hr += i_d64 * R * H
    dgates += i_d64 * 4 * H
    dh_all += i_d64 * T * B * R
    dh_parts += i_d64 * 4 * B * R
    dh0 += i_d64 * B * R
    restarts += i_d64 * T * B
    c_restart += i_d64 * B * H
    dh_restart += i_d64 * B * R
    dc_restart += i_d64 * B * H

    # Own batch rows, and own hidden units (cell phase).
    o_b, o_u, m_b, m_u, m_bu, p_bu, length = own_block(batch_start, i_b, i_h, B, T, lengths, H,
                                                       BLOCK_B, BLOCK_H, HAS_LENGTHS)
    o_r = i_h * BLOCK_O + tl.arange(0, BLOCK_O)         # own output units (dh phase)
    m_r = o_r < R
    m_br = m_b[:, None] & m_r[None, :]
    p_br = o_b[:, None] * R + o_r[None, :]

    if RESIDENT:
        if CHUNKED:
            # Large H: the four gates' columns as one reduction over 4*HP in [BLOCK_K, BLOCK_R]
            # chunks; dG is staged one chunk at a time.
            NUM_CHUNKS: tl.constexpr = 4 * HP // BLOCK_K
            w_chunks = resident_chunks(w_hh + o_r, m_r, H, R, BLOCK_K, NUM_CHUNKS, HP)
        elif not DSMEM:     # (the exchange holds W_hh's rows of own gates instead, below)
            # Per gate, W_hh[gate*H + j, own output units] as [HP, BLOCK_R] (or slices).
            o_j = reduction_index(HP, SPLIT_K)
            p_w = w_hh + tl.expand_dims(o_j, -1) * R + o_r
            m_w = tl.expand_dims(o_j < H, -1) & m_r
            b_wi = tl.load(p_w, mask=m_w, other=0.0)
            b_wf = tl.load(p_w + H * R, mask=m_w, other=0.0)
            b_wg = tl.load(p_w + 2 * H * R, mask=m_w, other=0.0)
            b_wo = tl.load(p_w + 3 * H * R, mask=m_w, other=0.0)
    if GATE_SPLIT:
        # The GEMM phase's shares: item = gate + 4 * (block of 4*BLOCK_H output units), the
        # group's items dealt round to its programs (one each when 4 divides NUM_H_BLOCKS).
        BLOCK_N: tl.constexpr = 4 * BLOCK_H
        NUM_ITEMS: tl.constexpr = 4 * ((R + BLOCK_N - 1) // BLOCK_N)
        ITEMS_PER_PROGRAM: tl.constexpr = (NUM_ITEMS + NUM_H_BLOCKS - 1) // NUM_H_BLOCKS
    if PROJ and RESIDENT:
        # W_hr[:, own hidden units] as [RP, BLOCK_H]: dr = dh @ W_hr.
        o_jr = reduction_index(RP, SPLIT_K)
        b_whr = tl.load(w_hr + tl.expand_dims(o_jr, -1) * H + o_u,
                        mask=tl.expand_dims(o_jr < R, -1) & m_u, other=0.0)
    if PERSISTENT and DSMEM:
        # Shares of dh exchanged through distributed shared memory (dsmem.py): this program's
        # dG_{t+1} @ W_hh[rows of its own gates, :], block k of it to program k, at this
        # program's piece of k's slot; zeros first, for the stage before stage 0.
        tl.static_assert(CLUSTER and RESIDENT and not (CHUNKED or PROJ or DATAFLOW or GATE_SPLIT))
        HB: tl.constexpr = NUM_H_BLOCKS * BLOCK_H
        SLOT: tl.constexpr = BLOCK_B * HB * 4
        PIECE: tl.constexpr = BLOCK_B * BLOCK_H * 4
        exchange = exchange_setup(SLOT, SLOT)
        w_row, m_n = gate_rows(i_h, BLOCK_H, H)             # own gates' rows
        o_k = tl.arange(0, HP)                              # every unit
        b_wrows = tl.load(w_hh + w_row[:, None] * R + o_k[None, :],
                          mask=m_n[:, None] & (o_k < H)[None, :], other=0.0)
        o_rows = tl.arange(0, BLOCK_B)
        p_share = i_h * PIECE + 4 * (o_rows[:, None] * BLOCK_H + (o_k % BLOCK_H)[None, :])
        rank_share = tl.broadcast_to((o_k // BLOCK_H)[None, :], [BLOCK_B, HP])
        m_share = rank_share < NUM_H_BLOCKS
        share_slot, share_mbar, share_parity = exchange_slot(exchange, SLOT, 0)
        send_to(share_slot + p_share, tl.zeros([BLOCK_B, HP], dtype=tl.int32), share_mbar,
                rank_share, m_share)
        p_own = 4 * (o_rows[:, None] * BLOCK_H + tl.arange(0, BLOCK_H)[None, :])
    if HAS_DHN:
        b_dhn = tl.load(dh_n + p_br, mask=m_br, other=0.0).to(ACC)
    else:
        b_dhn = tl.zeros([BLOCK_B, BLOCK_O], dtype=ACC)

    b_dc = tl.load(dc_state + p_bu, mask=m_bu, other=0.0)
    step = T - 1 - q_begin // PHASES
    # What the cell phase needs is loaded a step ahead, its latency hidden behind the wait;
    # with GATE_SPLIT at the start of its own phase instead, so that it is not held in
    # registers through the GEMM phase.
    PREFETCH_SAVED: tl.constexpr = not GATE_SPLIT
    if PREFETCH_SAVED:
        b_i, b_f, b_g, b_o, b_ct, b_cp, b_restarted = load_saved(
            step, length, m_b, gates, c_all, c0, restarts, c_restart, B, o_b, o_u, m_u, p_bu,
            m_bu, H, HAS_H0, HAS_RESTARTS, RESTART_FROM_STATE, ACC, reverse)
    # Whether each row restarted at the step after this one (read by the dh phase).
    _, running_after = step_rows(step + 1, length, m_b, reverse)
    if HAS_RESTARTS:
        b_restarted_after, _ = load_restarts(restarts, c_restart, step + 1, B, o_b,
                                             running_after, p_bu, m_bu, False, ACC)

    for q in range(q_begin, q_end):
        s = q // PHASES
        step = T - 1 - s
        t_row, running = step_rows(step, length, m_b, reverse)
        if PROJ:
            dh_phase = q % 2 == 0
            cell_phase = q % 2 == 1
        else:
            dh_phase: tl.constexpr = True    # with GATE_SPLIT, in the phase after the GEMM's
            cell_phase = s < T
        if GATE_SPLIT:
            gemm_phase = q % 2 == 0
            cell_phase = cell_phase & (q % 2 == 1)
        else:
            gemm_phase: tl.constexpr = False
        if STAMPS:
            if (q % PHASES == 0) & (s < T):      # a stage's first phase
                timeline.step_begins(stamps, s)
        if gemm_phase:
            # Shares of dG_{t+1} @ W_hh: gate k's H columns of dG against W_hh's rows of
            # gate k, for the item's output units; the owners add them next phase.
            t_next, running_next = step_rows(step + 1, length, m_b, reverse)
            for extra in tl.static_range(ITEMS_PER_PROGRAM):
                item = i_h + extra * NUM_H_BLOCKS
                gate = item % 4
                o_n = (item // 4) * BLOCK_N + tl.arange(0, BLOCK_N)
                m_n = o_n < R
                m_rows = running_next & (tl.full([BLOCK_B], item, tl.int32) < NUM_ITEMS)
                b_part = streamed_dot(dgates + (t_next * B + o_b) * GS + gate * H, m_rows,
                                      w_hh + gate * H * R + o_n, m_n, H, HP, R, BLOCK_K,
                                      DOT_PRECISION, ACC, INNER_STAGES)
                tl.store(dh_parts + gate * B * R + o_b[:, None] * R + o_n[None, :], b_part,
                         mask=m_b[:, None] & m_n[None, :])
        else:
            if not PREFETCH_SAVED:
                b_i, b_f, b_g, b_o, b_ct, b_cp, b_restarted = load_saved(
                    step, length, m_b, gates, c_all, c0, restarts, c_restart, B, o_b, o_u, m_u,
                    p_bu, m_bu, H, HAS_H0, HAS_RESTARTS, RESTART_FROM_STATE, ACC, reverse)
            if dh_phase:
                # dG of the next step of every unit, written by all programs of this group.
                # Rows whose sequence ended after this step pass dh_n through unchanged. At s = 0
                # no row runs at step T, so the dot reads nothing. A branch on s instead makes
                # Triton carry dh and dc in two layouts at once (with cell_gradients' order,
                # ptxas on a bf16 64x64 tile: 192 bytes of spill with both as they were, 88 with
                # either, none with neither).
                t_next, running_next = step_rows(step + 1, length, m_b, reverse)
                p_rows = dgates + (t_next * B + o_b) * GS
                if GATE_SPLIT:
                    # The four shares of own units, written by the group's programs last phase.
                    p_part = dh_parts + p_br
                    m_part = running_next[:, None] & m_r[None, :]
                    b_dot = load_written(p_part, m_part, False, True)
                    for gate in tl.static_range(1, 4):
                        b_dot += load_written(p_part + gate * B * R, m_part, False, True)
                elif RESIDENT and CHUNKED:
                    b_dot = chunked_dot(p_rows, running_next, w_chunks, H, BLOCK_K, NUM_CHUNKS,
                                        HP, DOT_PRECISION, ACC, DATAFLOW, True, SPLIT_K)
                elif PERSISTENT and DSMEM:
                    # The group's shares of own units: exchange s; then the slot's next.
                    share_slot, share_mbar, share_parity = exchange_slot(exchange, SLOT, s)
                    wait_phase(share_mbar, share_parity)
                    if STAMPS:
                        if s < T:
                            timeline.wait_ends(stamps, s)
                    b_dot = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
                    for k in tl.static_range(NUM_H_BLOCKS):
                        b_dot += receive(share_slot + k * PIECE + p_own).to(tl.float32,
                                                                           bitcast=True)
                    if s + 2 < q_end:
                        arm(share_mbar, SLOT)
                elif RESIDENT:
                    b_dot = gate_rows_dot_resident(p_rows, running_next, o_j, b_wi, b_wf, b_wg,
                                                   b_wo, H, SPLIT_K, DOT_PRECISION, ACC, DATAFLOW)
                else:
                    b_dot = gate_rows_dot_streamed(p_rows, running_next, w_hh, o_r, m_r, H, HP, R,
                                                   BLOCK_K, BLOCK_O, DOT_PRECISION, ACC,
                                                   INNER_STAGES, DATAFLOW)
                if HAS_RESTARTS:
                    # Rows that restarted at step + 1 read the restart state there, not this
                    # step's h: that part of the gradient belongs to the restart state.
                    m_acc = (running_next & b_restarted_after)[:, None] & m_r[None, :]
                    p_acc = dh_restart + p_br
                    tl.store(p_acc, tl.load(p_acc, mask=m_acc, other=0.0) + b_dot, mask=m_acc)
                    b_dot = tl.where(b_restarted_after[:, None], 0.0, b_dot)
                b_dh = tl.where(running_next[:, None], b_dot, b_dhn)
                if s < T:
                    if HAS_DY:
                        b_dh += tl.load(dy + (t_row * B + o_b)[:, None] * YS + o_r[None, :],
                                        mask=running[:, None] & m_r[None, :], other=0.0).to(ACC)
                    if PROJ:
                        b_dh_out = published(tl.where(running[:, None], b_dh, 0.0), DATAFLOW)
                        tl.store(dh_all + (t_row * B + o_b)[:, None] * R + o_r[None, :],
                                 rounded_to(b_dh_out, dh_all.dtype.element_ty), mask=m_br)
                else:
                    tl.store(dh0 + p_br, rounded_to(b_dh, dh0.dtype.element_ty), mask=m_br)
            if cell_phase:
                if PROJ:
                    # dr = dh_t @ W_hr over all output units, written by every program last phase.
                    p_rows = dh_all + (t_row * B + o_b) * R
                    if RESIDENT:
                        b_dr = split_dot(p_rows, running, o_jr, b_whr, R, SPLIT_K, DOT_PRECISION,
                                         ACC, DATAFLOW, True)
                    else:
                        b_dr = streamed_dot(p_rows, running, w_hr + o_u, m_u, R, RP, H, BLOCK_K,
                                            DOT_PRECISION, ACC, INNER_STAGES, DATAFLOW, True)
                else:
                    b_dr = b_dh
                m_run = running[:, None] & m_u[None, :]
                b_dgi, b_dgf, b_dgg, b_dgo, b_dc_t = cell_gradients(b_dr, b_dc, b_i, b_f, b_g, b_o,
                                                                    b_ct, b_cp, m_run, DATAFLOW)
                store_gates(dgates + (t_row * B + o_b)[:, None] * GS + o_u[None, :], b_dgi, b_dgf,
                            b_dgg, b_dgo, H, m_bu)
                if STAMPS:
                    timeline.stored(stamps, s)
                if BIAS_SUMS:
                    # The four gates' rows summed at once (one exchange between warps).
                    block = (s * tl.cdiv(B, BLOCK_B) + batch_start // BLOCK_B + i_b).to(tl.int64)
                    store_gate_sums(bias_sums + (block * D + i_d) * (4 * H), b_dgi, b_dgf,
                                    b_dgg, b_dgo, o_u, m_u, H)
                if PERSISTENT and DSMEM:
                    # dG_t of own units as [rows, n = 4 * unit + gate], in dgates' dtype (the
                    # operand the other paths read back), times W_hh's rows of own gates.
                    b_dg = tl.join(tl.join(b_dgi, b_dgf), tl.join(b_dgg, b_dgo))
                    b_dg = tl.reshape(tl.permute(b_dg, [0, 1, 3, 2]), [BLOCK_B, 4 * BLOCK_H])
                    b_dg, b_w_dg = dot_operands(rounded_to(b_dg, dgates.dtype.element_ty), b_wrows)
                    b_share = tl.dot(b_dg, b_w_dg, input_precision=DOT_PRECISION, out_dtype=ACC)
                    share_slot, share_mbar, share_parity = exchange_slot(exchange, SLOT, s + 1)
                    send_to(share_slot + p_share, b_share.to(tl.int32, bitcast=True), share_mbar,
                            rank_share, m_share)
                b_dc = tl.where(m_run, b_dc_t * b_f, b_dc)       # stopped rows carry dc_n through
                if HAS_RESTARTS:
                    # This step started from the restart state: dc_next is that state's gradient.
                    m_acc = b_restarted[:, None] & m_bu
                    p_acc = dc_restart + p_bu
                    tl.store(p_acc, tl.load(p_acc, mask=m_acc, other=0.0) + b_dc, mask=m_acc)
                    b_dc = tl.where(m_acc, 0.0, b_dc)
                    b_restarted_after = b_restarted
                if PREFETCH_SAVED and (DATAFLOW or DSMEM or not PREFETCH_AFTER_ARRIVE):
                    # The next step's saved values do not depend on the recurrence: their
                    # loads are in flight while this program waits (barrier, or the data).
                    q_next = tl.full([BLOCK_B], (s + 1) * PHASES, tl.int32)
                    m_next = m_b & (q_next < q_end)
                    b_i, b_f, b_g, b_o, b_ct, b_cp, b_restarted = load_saved(
                        step - 1, length, m_next, gates, c_all, c0, restarts, c_restart, B, o_b,
                        o_u, m_u, p_bu, m_bu, H, HAS_H0, HAS_RESTARTS, RESTART_FROM_STATE, ACC,
                        reverse)
        if PERSISTENT and not (DATAFLOW or DSMEM):
            if q < q_end - 1:
                arrived = barrier_arrive(counter, leader_inc, i_h == 0, CLUSTER)
                if PREFETCH_AFTER_ARRIVE and PREFETCH_SAVED and cell_phase:
                    # After the release: the loads do not hold up this program's arrival.
                    b_i, b_f, b_g, b_o, b_ct, b_cp, b_restarted = load_saved(
                        step - 1, length, m_b, gates, c_all, c0, restarts, c_restart, B, o_b,
                        o_u, m_u, p_bu, m_bu, H, HAS_H0, HAS_RESTARTS, RESTART_FROM_STATE, ACC,
                        reverse)
                barrier_wait(counter, arrived, CLUSTER)

    tl.store(dc_state + p_bu, b_dc, mask=m_bu)
    if PERSISTENT and DSMEM:
        cluster_sync()      # no program leaves while another's shares may still reach it


def lstm_backward(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr=None, *, config=None,
                  force_stepped: bool = False, restarts=None, c_restart=None,
                  reverse: bool = True, bias_grad: bool = False, stamps=None):
    """Run the reverse recurrence of one layer (all its directions).

    Args:
        dy: [T, B, D*R] gradient of y, or None. dh_n: [D, B, R] or None; dc_n: [D, B, H] or None.
        gates, c_all: what ``lstm_forward(save=True)`` returned.
        c0: [D, B, H] initial cell state, or None for zeros.
        lengths: [B] int32 sequence lengths, or None.
        w_hh: [D, 4H, R]; w_hr: [D, R, H] projection weights, or None (then R = H).
        restarts, c_restart, reverse: as given to ``lstm_forward``.
        bias_grad: the bias gradient is wanted; the kernel sums dG for it as it goes where
            ``dispatch.bias_sums_in_kernel`` says so.
        stamps: None, or a timeline.stamps_buffer of T steps that the kernel records its
            stages 0 .. T - 1 in (a GPU's clock: not under the interpreter).
    Returns:
        dgates [T, B, D*4H] (w_hh's dtype; zeros past each row's length), dh0 [D, B, R],
        dc0 [D, B, H] in the state dtype, with a projection dh_all [D, T, B, R] (the
        total gradient of each h_t, w_hh's dtype) else None, and with restarts the
        gradients of the restart state, dh_restart [D, B, R] and dc_restart [D, B, H]
        (state dtype), else None, and the bias gradient db [D*4H] (dG summed over steps
        and rows, in the state dtype, from dG before its rounding) where the kernel summed
        it, else None.
    """
    D, T, B, _ = gates.shape
    H = gates.shape[3] // 4
    R = w_hh.shape[2]
    device, dtype = w_hh.device, w_hh.dtype
    acc = state_dtype(dtype)
    proj = w_hr is not None
    timeline.check_stamps("lstm_backward", stamps, T)
    config = config or pick_config(B, H, dtype, device, "backward", D, proj=proj)
    if config.gate_split and not gate_split_applies(config, proj):
        config = dataclasses.replace(config, gate_split=False)
    if config.dsmem and (proj or config.gate_split or dtype == torch.float64):
        config = dataclasses.replace(config, dsmem=False)   # shares of dh alone, fp32 bits
    if config.registers:
        from . import backward_registers   # Gluon: imported only where a config asks for it
        if backward_registers.runs_here(H, dtype, device, proj=proj, restarts=restarts is not None,
                                        force_stepped=force_stepped):
            outputs = backward_registers.lstm_backward_registers(
                dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, reverse=reverse, stamps=stamps,
                exchange=config.dsmem)      # dsmem: dG pushed through each batch block's cluster
            if outputs is not None:
                return outputs + (None, None, None, None)
        config = dataclasses.replace(config, registers=False)
    dgates = torch.empty(T, B, D * 4 * H, dtype=dtype, device=device)
    dh0 = torch.empty(D, B, R, dtype=dtype, device=device)
    dh_all = torch.empty(D, T, B, R, dtype=dtype, device=device) if proj else None
    dh_parts = torch.empty(D, 4, B, R, dtype=acc, device=device) if config.gate_split else None
    kernel_sums = bias_grad and bias_sums_in_kernel(config)
    bias_sums = (torch.empty(T, triton.cdiv(B, config.block_b), D, 4 * H, dtype=acc,
                             device=device) if kernel_sums else None)
    if config.dataflow:          # the slots other programs poll
        fill_unwritten(dgates)
        if proj:
            fill_unwritten(dh_all)
    if dc_n is None:
        dc_state = torch.zeros(D, B, H, dtype=acc, device=device)
    else:
        dc_state = dc_n.to(acc, copy=True).contiguous()
    has_restarts = restarts is not None
    dh_restart = torch.zeros(D, B, R, dtype=acc, device=device) if has_restarts else None
    dc_restart = torch.zeros(D, B, H, dtype=acc, device=device) if has_restarts else None
    args = (dgates if dy is None else dy.contiguous(), dh0 if dh_n is None else dh_n.contiguous(),
            dc_state, gates, c_all, dh0 if c0 is None else c0,
            lengths if lengths is not None else dc_state, w_hh, w_hr if proj else w_hh, dgates,
            dh_all if proj else dc_state, dh_parts if config.gate_split else dc_state, dh0,
            restarts if has_restarts else dc_state,
            c_restart if c_restart is not None else dc_state,
            dh_restart if has_restarts else dc_state, dc_restart if has_restarts else dc_state,
            bias_sums if kernel_sums else dc_state, stamps if stamps is not None else dc_state,
            T, B)
    constexprs = dict(H=H, HP=padded(H), R=R, RP=padded(R), D=D, PROJ=proj,
                      HAS_DY=dy is not None, HAS_DHN=dh_n is not None, HAS_H0=c0 is not None,
                      HAS_LENGTHS=lengths is not None, DOT_PRECISION=dot_precision(dtype, device),
                      REVERSE=reverse, HAS_RESTARTS=has_restarts,
                      RESTART_FROM_STATE=c_restart is not None, GATE_SPLIT=config.gate_split,
                      DSMEM=False, BIAS_SUMS=kernel_sums, STAMPS=stamps is not None)
    # Phases: T + 1 stages, two each with a projection or a gate split (the last stage of a
    # projection has no cell phase).
    num_steps = 2 * (T + 1) if config.gate_split else T * (2 if proj else 1) + 1
    launch_recurrence(lstm_backward_kernel, args, constexprs, num_steps=num_steps,
                      batch=B, hidden_size=H, output_size=R, num_directions=D, config=config,
                      device=device, force_stepped=force_stepped,
                      # each element of a [rows, HP] share of dh to its owner
                      pushes_per_exchange=lambda c: c.block_b * padded(H))
    db = bias_sums.sum((0, 1)).flatten() if kernel_sums else None
    return dgates, dh0, dc_state, dh_all, dh_restart, dc_restart, db
