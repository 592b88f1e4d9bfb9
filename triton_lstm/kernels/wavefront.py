"""Stacked layers as a wavefront: every layer of a unidirectional stack in one persistent launch
each way.

Layer by layer, an L-layer stack costs about L * T steps: each layer's whole
recurrence waits for the layer below to finish. Here wavefront step s runs layer
l at time t = s - l for all layers at once, so the stack costs T + L - 1 steps.

Program (b, p, l) owns batch rows [b*BLOCK_B, (b+1)*BLOCK_B) and hidden units
[p*BLOCK_H, (p+1)*BLOCK_H) of all four gates of layer l, and keeps that slice of
the layer's W_hh on chip, and (layers l > 0) of its W_ih as well. Layer 0's input
projection is one GEMM up front (gx, as in forward.py); a layer above reads its
input h_{l-1}[t] in the step itself, since the layer below wrote it one wavefront
step earlier, and does a second dot with it. Both operands of a step were written
in the step before, so one barrier per step serves every layer: the group that
meets there is every program of a batch block, across all layers.

Each layer's h lives in slots of ``h_all`` [L, T+1, B, H]: slot 0 is h0 (the
caller's), slot t+1 is h_t. A step reads slot t of its own layer and slot t+1 of
the layer below, plain arithmetic on t: no branch between h0 and the outputs,
which would cost the loads their vector width (forward.py). c starts from
``c_state``, which the caller fills with c0.

Per-row lengths (packed sequences) work as in forward.py: a row past its length
keeps its state and writes zeros, and so reads zeros in the layer above, where it
has stopped too. Dropout between layers (HAS_DROPOUT) comes as masks drawn up front:
a layer below the top also writes h_t * keep to ``x_all``, which the layer above reads
instead of its h. Not here: both directions, projections and resets (the caller runs
those layer by layer).

With DATAFLOW (config ``dataflow``, barrier.py) there is no barrier: the slots of
h_all past h0 start as the unwritten mark and each program polls the two tiles it
reads until they are written. Nothing holds a layer back but its own inputs, so
the lower layers may run ahead; no slot is written twice, so that is safe.

Stepped mode (PERSISTENT=False) runs wavefront steps [q_begin, q_end); the launch
boundary is the barrier, c travels through ``c_state``.

The backward (``lstm_wavefront_backward_kernel``) is the mirror image: the top layer
first, layer l at reverse stage s in wavefront step s + (L - 1 - l). A layer's
gradient of its output at a step is the layer above's dG there times that layer's
W_ih, written one wavefront step earlier, so each program keeps two column slices,
of its own W_hh and of the W_ih above, per gate (backward.py has the one-layer
form). It writes every layer's dG; the weight gradients are GEMMs over them.
"""
import torch
import triton
import triton.language as tl

from .. import tuning
from ..dispatch import (ON_CHIP_BUDGET, KernelConfig, dot_precision, heuristic_config,
                        launch_recurrence, on_chip_bytes, padded, state_dtype)
from .backward import (cell_gradients, gate_rows_dot_resident, gate_rows_dot_streamed,
                       load_saved)
from .barrier import barrier_arrive, barrier_wait, fill_unwritten, published
from .forward import (_load_gx, cell_update, gate_rows, own_block, reduction_index, rounded_to,
                      save_step, split_dot, step_rows, store_gates, streamed_dot)


@triton.jit
def _input_and_recurrent_dot(p_h, p_x, running, upper, b_w, b_wx, w_hh, w_ih, w_row, m_n,
                             upper_n, o_j,
                             H: tl.constexpr, HP: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT_K: tl.constexpr, RESIDENT: tl.constexpr,
                             DOT_PRECISION: tl.constexpr, INNER_STAGES: tl.constexpr,
                             ACC: tl.constexpr, DATAFLOW: tl.constexpr, poll_h):
    """h_{t-1} W_hh^T + x_t W_ih^T for the four gates of own units, [BLOCK_B, 4*BLOCK_H]
    (the input term only for layers above the first: ``upper``, per row and per column).
    With DATAFLOW both tiles are polled until written; h_{t-1} only past h0 (poll_h)."""
    if RESIDENT:
        b_acc = split_dot(p_h, running, o_j, b_w, H, SPLIT_K, DOT_PRECISION, ACC, DATAFLOW,
                          poll_h)
        b_acc += split_dot(p_x, running & upper, o_j, b_wx, H, SPLIT_K, DOT_PRECISION, ACC,
                           DATAFLOW, True)
    else:
        b_acc = streamed_dot(p_h, running, w_hh + w_row * H, m_n, H, HP, 1, BLOCK_K,
                             DOT_PRECISION, ACC, INNER_STAGES, DATAFLOW, poll_h)
        b_acc += streamed_dot(p_x, running & upper, w_ih + w_row * H, m_n & upper_n, H, HP, 1,
                              BLOCK_K, DOT_PRECISION, ACC, INNER_STAGES, DATAFLOW, True)
    return b_acc


@triton.jit(do_not_specialize=["T", "B", "q_begin", "q_end", "batch_start", "leader_inc"])
def lstm_wavefront_kernel(
    gx,        # [T, B, 4H]       layer 0: x_t W_ih^T + b_ih + b_hh, input dtype
    w_ih,      # [L-1, 4H, H]     input weights of layers 1 .. L-1, input dtype
    bias,      # [L-1, 4H]        b_ih + b_hh of layers 1 .. L-1, state dtype
    w_hh,      # [L, 4H, H]       input dtype
    h_all,     # [L, T+1, B, H]   in: slot 0 = h0; out: slot t+1 = h_t (zeros past a row's length)
    keep,      # [L-1, T, B, H]   dropout between layers (HAS_DROPOUT): 0 or 1 / (1 - p),
               #                  input dtype
    x_all,     # [L-1, T, B, H]   out with HAS_DROPOUT: h_t * keep, the input of the layer above
    h_n,       # [L, B, H]        out: h at each row's last step
    c_state,   # [L, B, H]        state dtype; in: c0 (c before the first launched step); out: c
    lengths,   # [B]              int32 sequence lengths, read when HAS_LENGTHS
    gates,     # [L, T, B, 4H]    state dtype, out when SAVE: activated i, f, g, o
    c_all,     # [L, T, B, H]     state dtype, out when SAVE
    counters,  # [batch blocks]   int32 barrier counters, one per batch block (all layers)
    T, B, q_begin, q_end, batch_start, leader_inc,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, RESIDENT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PERSISTENT: tl.constexpr, DOT_PRECISION: tl.constexpr, INNER_STAGES: tl.constexpr,
    PREFETCH_AFTER_ARRIVE: tl.constexpr, CHUNKED: tl.constexpr, DATAFLOW: tl.constexpr,
    CLUSTER: tl.constexpr,
):
    tl.static_assert(not CHUNKED, "the wavefront has no chunked mode")
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    ACC: tl.constexpr = c_state.dtype.element_ty    # fp32 (fp64 for fp64 inputs)
    i_p = tl.program_id(0)
    i_l = tl.program_id(1)                          # layer
    i_h = i_p % NUM_H_BLOCKS
    i_b = i_p // NUM_H_BLOCKS
    counter = counters + i_b
    # Flags as vectors: the interpreter cannot mask with a scalar flag and a tile together.
    bottom = tl.full([BLOCK_B], i_l, tl.int32) == 0         # per batch row
    upper = tl.full([BLOCK_B], i_l, tl.int32) > 0
    upper_n = tl.full([4 * BLOCK_H], i_l, tl.int32) > 0     # per weight column
    upper_u = tl.full([BLOCK_H], i_l, tl.int32) > 0         # per hidden unit
    below_top = tl.full([BLOCK_B], i_l, tl.int32) < tl.num_programs(1) - 1
    # Per-layer bases (64-bit: L * T * B * H can pass 2**31). Layer 0 has no W_ih or bias
    # here (its input projection is gx): it points at layer 1's and never reads them.
    i_l64 = tl.cast(i_l, tl.int64)
    i_below64 = tl.cast(tl.maximum(i_l - 1, 0), tl.int64)
    w_hh += i_l64 * 4 * H * H
    w_ih += i_below64 * 4 * H * H
    bias += i_below64 * 4 * H
    h_own = h_all + i_l64 * (T + 1) * B * H
    h_below = h_all + i_below64 * (T + 1) * B * H
    # This layer's dropout mask and dropped output (the top layer has none), and the dropped
    # output of the layer below.
    i_own64 = tl.cast(tl.minimum(i_l, tl.num_programs(1) - 2), tl.int64)
    keep += i_own64 * T * B * H
    x_own = x_all + i_own64 * T * B * H
    x_below = x_all + i_below64 * T * B * H
    h_n += i_l64 * B * H
    c_state += i_l64 * B * H
    gates += i_l64 * T * B * 4 * H
    c_all += i_l64 * T * B * H

    o_b, o_u, m_b, m_u, m_bu, p_bu, length = own_block(batch_start, i_b, i_h, B, T, lengths, H,
                                                       BLOCK_B, BLOCK_H, HAS_LENGTHS)
    w_row, m_n = gate_rows(i_h, BLOCK_H, H)
    o_j = reduction_index(HP, SPLIT_K)
    if RESIDENT:
        p_w = w_row * H + tl.expand_dims(o_j, -1)
        m_w = m_n & tl.expand_dims(o_j < H, -1)
        b_w = tl.load(w_hh + p_w, mask=m_w, other=0.0)
        b_wx = tl.load(w_ih + p_w, mask=m_w & upper_n, other=0.0)
    else:
        b_w = w_hh
        b_wx = w_ih
    # The input projection's bias of a layer above the first, per gate.
    m_bias = m_u & upper_u
    b_bi = tl.load(bias + o_u, mask=m_bias, other=0.0)[None, :]
    b_bf = tl.load(bias + H + o_u, mask=m_bias, other=0.0)[None, :]
    b_bg = tl.load(bias + 2 * H + o_u, mask=m_bias, other=0.0)[None, :]
    b_bo = tl.load(bias + 3 * H + o_u, mask=m_bias, other=0.0)[None, :]

    b_c = tl.load(c_state + p_bu, mask=m_bu, other=0.0)
    t_row, running = step_rows(q_begin - i_l, length, m_b, False)
    b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_row, running & bottom, B, o_b, o_u, m_u, H,
                                          4 * H, ACC)
    for s in range(q_begin, q_end):
        t = s - i_l                     # this layer's time step; idle outside [0, T)
        t_row, running = step_rows(t, length, m_b, False)
        # h_{t-1}: slot t of this layer; x_t = h_t of the layer below: its slot t + 1 (or,
        # with dropout between layers, its dropped h_t).
        p_h = h_own + (t_row * B + o_b) * H
        if HAS_DROPOUT:
            p_x = x_below + (t_row * B + o_b) * H
        else:
            p_x = h_below + ((t_row + 1) * B + o_b) * H
        b_acc = _input_and_recurrent_dot(p_h, p_x, running, upper, b_w, b_wx, w_hh, w_ih, w_row,
                                         m_n, upper_n, o_j, H, HP, BLOCK_K, SPLIT_K, RESIDENT,
                                         DOT_PRECISION, INNER_STAGES, ACC, DATAFLOW, t > 0)
        # [B, 4*BLOCK_H] -> four [B, BLOCK_H] gates (column n = 4 * unit + 2 * a + b).
        b_even, b_odd = tl.split(tl.reshape(b_acc, [BLOCK_B, BLOCK_H, 2, 2]))
        b_ai, b_ag = tl.split(b_even)
        b_af, b_ao = tl.split(b_odd)
        m_run = running[:, None] & m_u[None, :]
        b_i, b_f, b_g, b_o, b_c, b_h = cell_update(b_ai + b_gxi + b_bi, b_af + b_gxf + b_bf,
                                                   b_ag + b_gxg + b_bg, b_ao + b_gxo + b_bo, b_c,
                                                   m_run)
        b_h = rounded_to(published(b_h, DATAFLOW), h_all.dtype.element_ty)

        t_b = tl.full([BLOCK_B], t, tl.int32)
        m_step = m_bu & ((t_b >= 0) & (t_b < T))[:, None]   # an idle layer writes nothing
        tl.store(h_own + ((t_row + 1) * B + o_b)[:, None] * H + o_u[None, :], b_h, mask=m_step)
        if HAS_DROPOUT:
            p_bt = (t_row * B + o_b)[:, None] * H + o_u[None, :]
            m_drop = m_step & below_top[:, None]
            b_keep = tl.load(keep + p_bt, mask=m_drop, other=0.0).to(ACC)
            # The product of the stored (rounded) h and the mask, rounded once, in fp32: the
            # interpreter multiplies raw bf16 bits, as in tl.dot (triton-lang/triton#11584).
            b_x = published(b_h.to(ACC) * b_keep, DATAFLOW)
            tl.store(x_own + p_bt, rounded_to(b_x, x_all.dtype.element_ty), mask=m_drop)
        tl.store(h_n + p_bu, b_h, mask=m_bu & (t == length - 1)[:, None])
        if SAVE:
            save_step(gates, c_all, t_row, B, o_b, o_u, H, b_i, b_f, b_g, b_o, b_c, m_run, m_step)
        # Layer 0's next input projection: in flight while this program waits (at the
        # barrier, or for the data), or with PREFETCH_AFTER_ARRIVE issued after its arrival.
        t_next, running_next = step_rows(t + 1, length,
                                         m_b & (tl.full([BLOCK_B], s + 1, tl.int32) < q_end),
                                         False)
        if DATAFLOW or not PREFETCH_AFTER_ARRIVE:
            b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_next, running_next & bottom, B, o_b, o_u,
                                                  m_u, H, 4 * H, ACC)
        if PERSISTENT and not DATAFLOW:
            if s < q_end - 1:
                arrived = barrier_arrive(counter, leader_inc, (i_h == 0) & (i_l == 0), CLUSTER)
                if PREFETCH_AFTER_ARRIVE:
                    b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_next, running_next & bottom, B,
                                                          o_b, o_u, m_u, H, 4 * H, ACC)
                barrier_wait(counter, arrived, CLUSTER)

    tl.store(c_state + p_bu, b_c, mask=m_bu)


@triton.jit
def _load_layer_saved(step, length, m_b, gates, c_all, c0, B, o_b, o_u, m_u, p_bu, m_bu,
                      H: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr):
    """backward.load_saved without restarts: gates i, f, g, o, c_t and c_{t-1} of a step."""
    b_i, b_f, b_g, b_o, b_ct, b_cp, _ = load_saved(step, length, m_b, gates, c_all, c0, c_all,
                                                    c_all, B, o_b, o_u, m_u, p_bu, m_bu, H,
                                                    HAS_H0, False, False, ACC, False)
    return b_i, b_f, b_g, b_o, b_ct, b_cp


@triton.jit(do_not_specialize=["T", "B", "q_begin", "q_end", "batch_start", "leader_inc"])
def lstm_wavefront_backward_kernel(
    dy,        # [T, B, H]        grad of the top layer's output, input dtype (read when HAS_DY)
    dh_n,      # [L, B, H]        grad of h_n, input dtype (read when HAS_DHN)
    dc_state,  # [L, B, H]        state dtype; in: dc_n (zeros without); out: grad of c0
    gates,     # [L, T, B, 4H]    state dtype, activated i, f, g, o saved by the wavefront
    c_all,     # [L, T, B, H]     state dtype, c_t saved by the wavefront
    c0,        # [L, B, H]        input dtype, read when HAS_H0
    lengths,   # [B]              int32 sequence lengths, read when HAS_LENGTHS
    w_ih,      # [L-1, 4H, H]     input weights of layers 1 .. L-1, input dtype
    w_hh,      # [L, 4H, H]       input dtype
    keep,      # [L-1, T, B, H]   the forward's dropout masks (HAS_DROPOUT), input dtype
    dgates,    # [L, T, B, 4H]    out: dG_t of every layer, input dtype (zeros past a length;
               #                  all-ones bits first with DATAFLOW)
    dh0,       # [L, B, H]        out: grad of h0, input dtype
    counters,  # [batch blocks]   int32 barrier counters, one per batch block (all layers)
    T, B, q_begin, q_end, batch_start, leader_inc,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, RESIDENT: tl.constexpr,
    HAS_DY: tl.constexpr, HAS_DHN: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr, PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INNER_STAGES: tl.constexpr, PREFETCH_AFTER_ARRIVE: tl.constexpr, CHUNKED: tl.constexpr,
    DATAFLOW: tl.constexpr, CLUSTER: tl.constexpr,
):
    # Each layer walks stages s = 0 .. T (backward.py: step = T - 1 - s; at s = T its dh is
    # the gradient of h0); layer l runs stage s at wavefront step w = s + (L - 1 - l), the
    # top layer first. Its dh at a step is its own dG of the step after times W_hh, plus the
    # gradient of its output there: dy (top layer), or the layer above's dG of the same step
    # times that layer's W_ih (written one wavefront step earlier).
    tl.static_assert(not CHUNKED, "the wavefront has no chunked mode")
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    ACC: tl.constexpr = dc_state.dtype.element_ty
    i_p = tl.program_id(0)
    i_l = tl.program_id(1)                          # layer
    num_layers = tl.num_programs(1)
    i_h = i_p % NUM_H_BLOCKS
    i_b = i_p // NUM_H_BLOCKS
    counter = counters + i_b
    depth = num_layers - 1 - i_l                    # wavefront steps behind the top layer
    # Flags as vectors (the interpreter cannot mask a tile with a scalar flag).
    below_top = tl.full([BLOCK_B], i_l, tl.int32) < num_layers - 1     # per batch row
    below_top_u = tl.full([BLOCK_H], i_l, tl.int32) < num_layers - 1   # per own unit
    i_l64 = tl.cast(i_l, tl.int64)
    i_above64 = tl.cast(tl.minimum(i_l, num_layers - 2), tl.int64)     # the top reads none
    dh_n += i_l64 * B * H
    dc_state += i_l64 * B * H
    gates += i_l64 * T * B * 4 * H
    c_all += i_l64 * T * B * H
    c0 += i_l64 * B * H
    w_hh += i_l64 * 4 * H * H
    w_ih += i_above64 * 4 * H * H                   # W_ih of layer l + 1
    keep += i_above64 * T * B * H                   # the dropout mask of this layer's output
    dg_own = dgates + i_l64 * T * B * 4 * H
    dg_above = dgates + (i_above64 + 1) * T * B * 4 * H
    dh0 += i_l64 * B * H

    o_b, o_u, m_b, m_u, m_bu, p_bu, length = own_block(batch_start, i_b, i_h, B, T, lengths, H,
                                                       BLOCK_B, BLOCK_H, HAS_LENGTHS)
    m_above = m_u & below_top_u
    if RESIDENT:
        # Per gate, W_hh[gate*H + j, own units] and W_ih of the layer above the same way.
        o_j = reduction_index(HP, SPLIT_K)
        p_w = tl.expand_dims(o_j, -1) * H + o_u
        m_w = tl.expand_dims(o_j < H, -1) & m_u
        m_x = tl.expand_dims(o_j < H, -1) & m_above
        b_wi = tl.load(w_hh + p_w, mask=m_w, other=0.0)
        b_wf = tl.load(w_hh + H * H + p_w, mask=m_w, other=0.0)
        b_wg = tl.load(w_hh + 2 * H * H + p_w, mask=m_w, other=0.0)
        b_wo = tl.load(w_hh + 3 * H * H + p_w, mask=m_w, other=0.0)
        b_xi = tl.load(w_ih + p_w, mask=m_x, other=0.0)
        b_xf = tl.load(w_ih + H * H + p_w, mask=m_x, other=0.0)
        b_xg = tl.load(w_ih + 2 * H * H + p_w, mask=m_x, other=0.0)
        b_xo = tl.load(w_ih + 3 * H * H + p_w, mask=m_x, other=0.0)
    if HAS_DHN:
        b_dhn = tl.load(dh_n + p_bu, mask=m_bu, other=0.0).to(ACC)
    else:
        b_dhn = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)

    b_dc = tl.load(dc_state + p_bu, mask=m_bu, other=0.0)
    b_i, b_f, b_g, b_o, b_ct, b_cp = _load_layer_saved(
        T - 1 - (q_begin - depth), length, m_b, gates, c_all, c0, B, o_b, o_u, m_u, p_bu, m_bu,
        H, HAS_H0, ACC)
    for w in range(q_begin, q_end):
        s = w - depth                   # this layer's stage; idle outside [0, T]
        step = T - 1 - s
        t_row, running = step_rows(step, length, m_b, False)
        # dh: dh_n at s = 0 (and for rows whose sequence ended after this step), else own dG
        # of the next step @ W_hh[:, own units].
        t_next, running_next = step_rows(step + 1, length,
                                         m_b & (tl.full([BLOCK_B], s, tl.int32) > 0), False)
        p_next = dg_own + (t_next * B + o_b) * (4 * H)
        if RESIDENT:
            b_dot = gate_rows_dot_resident(p_next, running_next, o_j, b_wi, b_wf, b_wg, b_wo, H,
                                           SPLIT_K, DOT_PRECISION, ACC, DATAFLOW)
        else:
            b_dot = gate_rows_dot_streamed(p_next, running_next, w_hh, o_u, m_u, H, HP, H,
                                           BLOCK_K, BLOCK_H, DOT_PRECISION, ACC, INNER_STAGES,
                                           DATAFLOW)
        b_dh = tl.where(running_next[:, None], b_dot, b_dhn)
        # The gradient of this layer's output at the step: dy, or the layer above's dG there
        # @ W_ih of that layer [:, own units].
        if HAS_DY:
            b_dh += tl.load(dy + (t_row * B + o_b)[:, None] * H + o_u[None, :],
                            mask=(running & ~below_top)[:, None] & m_u[None, :],
                            other=0.0).to(ACC)
        p_above = dg_above + (t_row * B + o_b) * (4 * H)
        if RESIDENT:
            b_up = gate_rows_dot_resident(p_above, running & below_top, o_j, b_xi, b_xf, b_xg,
                                          b_xo, H, SPLIT_K, DOT_PRECISION, ACC, DATAFLOW)
        else:
            b_up = gate_rows_dot_streamed(p_above, running & below_top, w_ih, o_u, m_above, H,
                                          HP, H, BLOCK_K, BLOCK_H, DOT_PRECISION, ACC,
                                          INNER_STAGES, DATAFLOW)
        if HAS_DROPOUT:
            # The layer above read this layer's h_t * keep: the gradient goes through keep.
            b_up *= tl.load(keep + (t_row * B + o_b)[:, None] * H + o_u[None, :],
                            mask=(running & below_top)[:, None] & m_u[None, :],
                            other=0.0).to(ACC)
        b_dh += b_up
        tl.store(dh0 + p_bu, rounded_to(b_dh, dh0.dtype.element_ty),
                 mask=m_bu & (tl.full([BLOCK_B], s, tl.int32) == T)[:, None])
        # dG of own units at this step, from the saved gates (backward.py).
        m_run = running[:, None] & m_u[None, :]
        b_dgi, b_dgf, b_dgg, b_dgo, b_dc_t = cell_gradients(b_dh, b_dc, b_i, b_f, b_g, b_o, b_ct,
                                                            b_cp, m_run, DATAFLOW)
        s_b = tl.full([BLOCK_B], s, tl.int32)
        m_stage = m_bu & ((s_b >= 0) & (s_b < T))[:, None]   # an idle layer writes nothing
        store_gates(dg_own + (t_row * B + o_b)[:, None] * (4 * H) + o_u[None, :], b_dgi, b_dgf,
                    b_dgg, b_dgo, H, m_stage)
        b_dc = tl.where(m_run, b_dc_t * b_f, b_dc)       # stopped rows carry dc_n through
        # The next stage's saved values: in flight while this program waits (at the barrier,
        # or for the data), or with PREFETCH_AFTER_ARRIVE issued after its arrival.
        m_next = m_b & (tl.full([BLOCK_B], w + 1, tl.int32) < q_end)
        if DATAFLOW or not PREFETCH_AFTER_ARRIVE:
            b_i, b_f, b_g, b_o, b_ct, b_cp = _load_layer_saved(
                step - 1, length, m_next, gates, c_all, c0, B, o_b, o_u, m_u, p_bu, m_bu, H,
                HAS_H0, ACC)
        if PERSISTENT and not DATAFLOW:
            if w < q_end - 1:
                arrived = barrier_arrive(counter, leader_inc, (i_h == 0) & (i_l == 0), CLUSTER)
                if PREFETCH_AFTER_ARRIVE:
                    b_i, b_f, b_g, b_o, b_ct, b_cp = _load_layer_saved(
                        step - 1, length, m_next, gates, c_all, c0, B, o_b, o_u, m_u, p_bu,
                        m_bu, H, HAS_H0, ACC)
                barrier_wait(counter, arrived, CLUSTER)

    tl.store(dc_state + p_bu, b_dc, mask=m_bu)


def wavefront_config(batch: int, hidden_size: int, num_layers: int, dtype: torch.dtype,
                     num_sms: int, kernel: str = "forward") -> KernelConfig:
    """The heuristic tile (dispatch.heuristic_config) with the SMs shared by the layers.

    Both weight slices stay on chip only in small-batch tiles (16 rows) where they and
    both staged operands fit: beside a 64-row tile two resident slices spill hundreds of
    bytes (ptxas, Triton 3.6), and the wavefront is for small batches, where a step is
    latency. The backward takes its two column slices gate by gate into registers, so
    past ~512 bytes of them per thread it splits the reduction over 8 warps, as the
    one-layer backward does past ~512 bytes of one slice. Streamed 16-row tiles keep 4
    warps (a [16, 64] chunk over more threads is read 8 bytes at a time) and fp32
    streams K chunks of 32 in larger tiles (64 spills at 128 rows).
    """
    config = heuristic_config(batch, hidden_size, dtype, max(1, num_sms // num_layers), kernel)
    block_b, block_h = config.block_b, config.block_h
    resident = (block_b == 16 and 2 * on_chip_bytes(hidden_size, block_b, block_h, dtype)
                <= ON_CHIP_BUDGET)
    split_k, num_warps, block_k = config.split_k, config.num_warps, config.block_k
    if resident and kernel == "backward":
        slices_per_thread = 2 * padded(hidden_size) * 4 * block_h * dtype.itemsize // (32 * 4)
        if slices_per_thread > 512:
            split_k, num_warps = min(4, padded(hidden_size) // 16), 8
    if not resident:
        if block_b == 16:
            num_warps = 4
        elif dtype.itemsize == 4:
            block_k = min(32, block_k)
    return KernelConfig(block_b=block_b, block_h=block_h, resident=resident, block_k=block_k,
                        split_k=split_k, num_warps=num_warps)


def lstm_wavefront(gx, w_ih, bias, w_hh, h0, c0, lengths, keep=None, *, save: bool,
                   config=None, force_stepped: bool = False):
    """Run the recurrence of a unidirectional stack of L >= 2 layers as one wavefront.

    Args:
        gx: [T, B, 4H] layer 0's input projection with both biases, contiguous.
        w_ih: [L-1, 4H, H] input weights of layers 1 .. L-1, gx's dtype, contiguous.
        bias: [L-1, 4H] b_ih + b_hh of those layers in the state dtype (zeros without bias).
        w_hh: [L, 4H, H] recurrent weights, gx's dtype, contiguous.
        h0, c0: [L, B, H] initial state, or both None for zeros.
        lengths: [B] int32 sequence lengths on gx's device (1..T), or None for all T.
        keep: [L-1, T, B, H] dropout between layers, gx's dtype (0 where dropped, else
            1 / (1 - p)): layer l + 1 reads h_t * keep[l] of layer l; or None.
        save: also return every layer's activated gates and c per step (for the backward).
        config: a ``KernelConfig`` (not chunked), else ``wavefront_config``. With
            ``dataflow`` there is no barrier: each program polls the two tiles it reads.
        force_stepped: one launch per wavefront step even where a persistent launch fits.
    Returns:
        h_all [L, T+1, B, H] (slot 0 is h0, slot t+1 layer l's h_t, zeros past each row's
        length; the stack's output is h_all[-1, 1:]), h_n [L, B, H], c_n [L, B, H] (state
        dtype), gates [L, T, B, 4H] and c_all [L, T, B, H] (state dtype) or None, and with
        keep x_all [L-1, T, B, H]: the dropped outputs h_t * keep, the upper layers' inputs.
    """
    T, B, G = gx.shape
    L = w_hh.shape[0]
    H = G // 4
    device, dtype = gx.device, gx.dtype
    if config is None:
        config = wavefront_config(B, H, L, dtype, tuning.sm_count(device))
    elif config.chunked:
        raise ValueError(f"config: the wavefront runs resident or streamed tiles, not chunked "
                         f"ones; got {config}")
    acc = state_dtype(dtype)
    h_all = torch.empty(L, T + 1, B, H, dtype=dtype, device=device)
    h_all[:, 0] = 0 if h0 is None else h0
    x_all = torch.empty(L - 1, T, B, H, dtype=dtype, device=device) if keep is not None else None
    if config.dataflow:          # the slots other programs poll
        fill_unwritten(h_all[:, 1:])
        if x_all is not None:
            fill_unwritten(x_all)
    c_state = torch.zeros(L, B, H, dtype=acc, device=device)
    if c0 is not None:
        c_state.copy_(c0)
    h_n = torch.empty(L, B, H, dtype=dtype, device=device)
    gates = torch.empty(L, T, B, 4 * H, dtype=acc, device=device) if save else None
    c_all = torch.empty(L, T, B, H, dtype=acc, device=device) if save else None
    args = (gx, w_ih, bias, w_hh, h_all, h_all if keep is None else keep,
            h_all if x_all is None else x_all, h_n, c_state,
            lengths if lengths is not None else c_state,
            gates if save else c_state, c_all if save else c_state, T, B)
    constexprs = dict(H=H, HP=padded(H), HAS_LENGTHS=lengths is not None, SAVE=save,
                      HAS_DROPOUT=keep is not None, DOT_PRECISION=dot_precision(dtype, device))
    launch_recurrence(lstm_wavefront_kernel, args, constexprs, num_steps=T + L - 1, batch=B,
                      hidden_size=H, output_size=H, num_directions=L, config=config,
                      device=device, force_stepped=force_stepped, shared_barrier=True)
    return h_all, h_n, c_state, gates, c_all, x_all


def lstm_wavefront_backward(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_ih, w_hh, keep=None,
                            *, config=None, force_stepped: bool = False):
    """Run the reverse recurrence of a stack saved by ``lstm_wavefront`` as one wavefront.

    Args:
        dy: [T, B, H] gradient of the top layer's output, or None.
        dh_n, dc_n: [L, B, H] gradients of h_n and c_n, or None.
        gates, c_all: what ``lstm_wavefront(save=True)`` returned.
        c0: [L, B, H] initial cell state, or None for zeros.
        lengths: [B] int32 sequence lengths, or None.
        w_ih: [L-1, 4H, H] input weights of layers 1 .. L-1; w_hh: [L, 4H, H].
        keep: the forward's dropout masks [L-1, T, B, H], or None.
        config: a ``KernelConfig`` (not chunked), else ``wavefront_config`` for the backward.
        force_stepped: one launch per wavefront step even where a persistent launch fits.
    Returns:
        dgates [L, T, B, 4H] (w_hh's dtype; every layer's dG, zeros past each row's
        length), dh0 [L, B, H] (w_hh's dtype), dc0 [L, B, H] (state dtype).
    """
    L, T, B, G = gates.shape
    H = G // 4
    device, dtype = w_hh.device, w_hh.dtype
    if config is None:
        config = wavefront_config(B, H, L, dtype, tuning.sm_count(device), "backward")
    elif config.chunked:
        raise ValueError(f"config: the wavefront runs resident or streamed tiles, not chunked "
                         f"ones; got {config}")
    acc = state_dtype(dtype)
    dgates = torch.empty(L, T, B, 4 * H, dtype=dtype, device=device)
    if config.dataflow:          # the slots other programs poll
        fill_unwritten(dgates)
    dh0 = torch.empty(L, B, H, dtype=dtype, device=device)
    dc_state = torch.zeros(L, B, H, dtype=acc, device=device)
    if dc_n is not None:
        dc_state.copy_(dc_n)
    args = (dgates if dy is None else dy.contiguous(), dh0 if dh_n is None else dh_n.contiguous(),
            dc_state, gates, c_all, dh0 if c0 is None else c0.contiguous(),
            lengths if lengths is not None else dc_state, w_ih, w_hh,
            dgates if keep is None else keep, dgates, dh0, T, B)
    constexprs = dict(H=H, HP=padded(H), HAS_DY=dy is not None, HAS_DHN=dh_n is not None,
                      HAS_H0=c0 is not None, HAS_LENGTHS=lengths is not None,
                      HAS_DROPOUT=keep is not None, DOT_PRECISION=dot_precision(dtype, device))
    launch_recurrence(lstm_wavefront_backward_kernel, args, constexprs, num_steps=T + L,
                      batch=B, hidden_size=H, output_size=H, num_directions=L, config=config,
                      device=device, force_stepped=force_stepped, shared_barrier=True)
    return dgates, dh0, dc_state
