"""Stacked layers as a wavefront: every layer of a unidirectional stack in one persistent launch.

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
has stopped too. Not here: both directions, projections, dropout between layers and
resets (the caller runs those layer by layer).

With DATAFLOW (config ``dataflow``, barrier.py) there is no barrier: the slots of
h_all past h0 start as the unwritten mark and each program polls the two tiles it
reads until they are written. Nothing holds a layer back but its own inputs, so
the lower layers may run ahead; no slot is written twice, so that is safe.

Stepped mode (PERSISTENT=False) runs wavefront steps [q_begin, q_end); the launch
boundary is the barrier, c travels through ``c_state``.
"""
import torch
import triton
import triton.language as tl

from ..dispatch import (ON_CHIP_BUDGET, KernelConfig, dot_precision, heuristic_config,
                        launch_recurrence, on_chip_bytes, padded, state_dtype)
from .barrier import barrier_arrive, barrier_wait, fill_unwritten, published
from .forward import (_load_gx, _tanh, own_block, reduction_index, save_step, split_dot,
                      step_rows, streamed_dot)


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
    h_n,       # [L, B, H]        out: h at each row's last step
    c_state,   # [L, B, H]        state dtype; in: c0 (c before the first launched step); out: c
    lengths,   # [B]              int32 sequence lengths, read when HAS_LENGTHS
    gates,     # [L, T, B, 4H]    state dtype, out when SAVE: activated i, f, g, o
    c_all,     # [L, T, B, H]     state dtype, out when SAVE
    counters,  # [batch blocks]   int32 barrier counters, one per batch block (all layers)
    T, B, q_begin, q_end, batch_start, leader_inc,
    H: tl.constexpr, HP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, RESIDENT: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, SAVE: tl.constexpr, PERSISTENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INNER_STAGES: tl.constexpr, PREFETCH_AFTER_ARRIVE: tl.constexpr,
    CHUNKED: tl.constexpr, DATAFLOW: tl.constexpr,
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
    # Per-layer bases (64-bit: L * T * B * H can pass 2**31). Layer 0 has no W_ih or bias
    # here (its input projection is gx): it points at layer 1's and never reads them.
    i_l64 = tl.cast(i_l, tl.int64)
    i_below64 = tl.cast(tl.maximum(i_l - 1, 0), tl.int64)
    w_hh += i_l64 * 4 * H * H
    w_ih += i_below64 * 4 * H * H
    bias += i_below64 * 4 * H
    h_own = h_all + i_l64 * (T + 1) * B * H
    h_below = h_all + i_below64 * (T + 1) * B * H
    h_n += i_l64 * B * H
    c_state += i_l64 * B * H
    gates += i_l64 * T * B * 4 * H
    c_all += i_l64 * T * B * H

    o_b, o_u, m_b, m_u, m_bu, p_bu, length = own_block(batch_start, i_b, i_h, B, T, lengths, H,
                                                       BLOCK_B, BLOCK_H, HAS_LENGTHS)
    # Weight-tile columns: n = 4 * unit + gate (as forward.py).
    o_n = tl.arange(0, 4 * BLOCK_H)
    o_nu = i_h * BLOCK_H + o_n // 4
    w_row = (o_n % 4) * H + o_nu
    m_n = o_nu < H
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
        # h_{t-1}: slot t of this layer; x_t = h_t of the layer below: its slot t + 1.
        p_h = h_own + (t_row * B + o_b) * H
        p_x = h_below + ((t_row + 1) * B + o_b) * H
        b_acc = _input_and_recurrent_dot(p_h, p_x, running, upper, b_w, b_wx, w_hh, w_ih, w_row,
                                         m_n, upper_n, o_j, H, HP, BLOCK_K, SPLIT_K, RESIDENT,
                                         DOT_PRECISION, INNER_STAGES, ACC, DATAFLOW, t > 0)
        # [B, 4*BLOCK_H] -> four [B, BLOCK_H] gates (column n = 4 * unit + 2 * a + b).
        b_even, b_odd = tl.split(tl.reshape(b_acc, [BLOCK_B, BLOCK_H, 2, 2]))
        b_ai, b_ag = tl.split(b_even)
        b_af, b_ao = tl.split(b_odd)
        b_i = tl.sigmoid(b_ai + b_gxi + b_bi)
        b_f = tl.sigmoid(b_af + b_gxf + b_bf)
        b_g = _tanh(b_ag + b_gxg + b_bg)
        b_o = tl.sigmoid(b_ao + b_gxo + b_bo)
        m_run = running[:, None] & m_u[None, :]
        b_c = tl.where(m_run, b_f * b_c + b_i * b_g, b_c)      # stopped rows keep their state
        b_h = published(tl.where(m_run, b_o * _tanh(b_c), 0.0), DATAFLOW)
        b_h = b_h.to(h_all.dtype.element_ty)

        t_b = tl.full([BLOCK_B], t, tl.int32)
        m_step = m_bu & ((t_b >= 0) & (t_b < T))[:, None]   # an idle layer writes nothing
        tl.store(h_own + ((t_row + 1) * B + o_b)[:, None] * H + o_u[None, :], b_h, mask=m_step)
        tl.store(h_n + p_bu, b_h, mask=m_bu & (t == length - 1)[:, None])
        if SAVE:
            save_step(gates, c_all, t_row, B, o_b, o_u, H, b_i, b_f, b_g, b_o, b_c, m_run, m_step)
        # Layer 0's next input projection: in flight while this program waits at the barrier.
        t_next, running_next = step_rows(t + 1, length,
                                         m_b & (tl.full([BLOCK_B], s + 1, tl.int32) < q_end),
                                         False)
        if not PREFETCH_AFTER_ARRIVE:
            b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_next, running_next & bottom, B, o_b, o_u,
                                                  m_u, H, 4 * H, ACC)
        if PERSISTENT and not DATAFLOW:
            if s < q_end - 1:
                arrived = barrier_arrive(counter, leader_inc, (i_h == 0) & (i_l == 0))
                if PREFETCH_AFTER_ARRIVE:
                    b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_next, running_next & bottom, B,
                                                          o_b, o_u, m_u, H, 4 * H, ACC)
                barrier_wait(counter, arrived)
        elif PREFETCH_AFTER_ARRIVE:
            b_gxi, b_gxf, b_gxg, b_gxo = _load_gx(gx, t_next, running_next & bottom, B, o_b, o_u,
                                                  m_u, H, 4 * H, ACC)

    tl.store(c_state + p_bu, b_c, mask=m_bu)


def wavefront_config(batch: int, hidden_size: int, num_layers: int, dtype: torch.dtype,
                     num_sms: int) -> KernelConfig:
    """The heuristic tile (dispatch.heuristic_config) with the SMs shared by the layers.

    Both weight slices stay on chip only in small-batch tiles (16 rows) where they and
    both staged operands fit: beside a 64-row tile two resident slices spill hundreds of
    bytes (ptxas, Triton 3.6), and the wavefront is for small batches, where a step is
    latency. Streamed fp32 tiles take K chunks of 32 (64 spills at 128 rows).
    """
    config = heuristic_config(batch, hidden_size, dtype, max(1, num_sms // num_layers), "forward")
    resident = (config.block_b == 16 and 2 * on_chip_bytes(hidden_size, config.block_b,
                                                           config.block_h, dtype) <= ON_CHIP_BUDGET)
    block_k = config.block_k if resident or dtype.itemsize < 4 else min(32, config.block_k)
    return KernelConfig(block_b=config.block_b, block_h=config.block_h, resident=resident,
                        block_k=block_k, split_k=config.split_k, num_warps=config.num_warps)


def lstm_wavefront(gx, w_ih, bias, w_hh, h0, c0, lengths, *, save: bool, config=None,
                   force_stepped: bool = False):
    """Run the recurrence of a unidirectional stack of L >= 2 layers as one wavefront.

    Args:
        gx: [T, B, 4H] layer 0's input projection with both biases, contiguous.
        w_ih: [L-1, 4H, H] input weights of layers 1 .. L-1, gx's dtype, contiguous.
        bias: [L-1, 4H] b_ih + b_hh of those layers in the state dtype (zeros without bias).
        w_hh: [L, 4H, H] recurrent weights, gx's dtype, contiguous.
        h0, c0: [L, B, H] initial state, or both None for zeros.
        lengths: [B] int32 sequence lengths on gx's device (1..T), or None for all T.
        save: also return every layer's activated gates and c per step (for the backward).
        config: a ``KernelConfig`` (not chunked), else ``wavefront_config``. With
            ``dataflow`` there is no barrier: each program polls the two tiles it reads.
        force_stepped: one launch per wavefront step even where a persistent launch fits.
    Returns:
        h_all [L, T+1, B, H] (slot 0 is h0, slot t+1 layer l's h_t, zeros past each row's
        length; the stack's output is h_all[-1, 1:]), h_n [L, B, H], c_n [L, B, H] (state
        dtype), gates [L, T, B, 4H] and c_all [L, T, B, H] (state dtype) or None.
    """
    T, B, G = gx.shape
    L = w_hh.shape[0]
    H = G // 4
    device, dtype = gx.device, gx.dtype
    if config is None:
        from .. import tuning
        num_sms = tuning.sm_count(device) if device.type == "cuda" else 4
        config = wavefront_config(B, H, L, dtype, num_sms)
    elif config.chunked:
        raise ValueError(f"config: the wavefront runs resident or streamed tiles, not chunked "
                         f"ones; got {config}")
    acc = state_dtype(dtype)
    h_all = torch.empty(L, T + 1, B, H, dtype=dtype, device=device)
    h_all[:, 0] = 0 if h0 is None else h0
    if config.dataflow:          # the slots other programs poll
        fill_unwritten(h_all[:, 1:])
    c_state = torch.zeros(L, B, H, dtype=acc, device=device)
    if c0 is not None:
        c_state.copy_(c0)
    h_n = torch.empty(L, B, H, dtype=dtype, device=device)
    gates = torch.empty(L, T, B, 4 * H, dtype=acc, device=device) if save else None
    c_all = torch.empty(L, T, B, H, dtype=acc, device=device) if save else None
    args = (gx, w_ih, bias, w_hh, h_all, h_n, c_state,
            lengths if lengths is not None else c_state,
            gates if save else c_state, c_all if save else c_state, T, B)
    constexprs = dict(H=H, HP=padded(H), HAS_LENGTHS=lengths is not None, SAVE=save,
                      DOT_PRECISION=dot_precision(dtype, device))
    launch_recurrence(lstm_wavefront_kernel, args, constexprs, num_steps=T + L - 1, batch=B,
                      hidden_size=H, output_size=H, num_directions=L, config=config,
                      device=device, force_stepped=force_stepped, shared_barrier=True)
    return h_all, h_n, c_state, gates, c_all
