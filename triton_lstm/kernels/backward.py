"""Persistent LSTM backward: the whole reverse recurrence in one launch.

Same grid and ownership as the forward kernel (see forward.py): program (b, p)
owns batch rows of block b and hidden units [p*BLOCK_H, (p+1)*BLOCK_H). It
keeps the *column* slice W_hh[:, its units] on chip, per gate a [HP, BLOCK_H]
tile (cut into SPLIT_K slices when asked) for ``split_dot`` (forward.py).

The loop runs T + 1 stages, s = 0 .. T, for t = T - 1 - s:
  1. dh for its units: dh_n at s = 0, else dG_{t+1} @ W_hh[:, units], reading
     the whole dG_{t+1} (all programs wrote it before the last barrier);
  2. for s < T, with the gates and c saved by the forward:
        dh += dy_t
        dc  = dc_next + dh * o * (1 - tanh(c_t)^2)
        dG  = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dh*tanh(c_t)*o(1-o)]
        dc_next = dc * f
     writes dG_t and meets the others at the barrier (one per step);
  3. at s = T, dh is the gradient of h0.
dc_next lives in registers and travels between launches through ``dc_state``
(in: dc_n, out: the gradient of c0). The weight, input and bias gradients are
large GEMMs over dG afterwards (autograd.py).
"""
import torch
import triton
import triton.language as tl

from ..dispatch import dot_precision, launch_recurrence, padded, pick_config, state_dtype
from .barrier import grid_barrier
from .forward import _tanh, reduction_index, split_dot


@triton.jit
def _load_saved(t, dy, gates, c_all, c0, B, p_bu, p_bg, m_bu, H: tl.constexpr,
                HAS_DY: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr):
    """What step t needs besides dh: dy_t, gates i, f, g, o, c_t, c_{t-1} (nothing read if t < 0)."""
    t64 = tl.cast(t, tl.int64)
    m = m_bu & (tl.full(m_bu.shape, t, tl.int32) >= 0)
    p_g = gates + t64 * B * 4 * H + p_bg
    b_i = tl.load(p_g, mask=m, other=0.0)
    b_f = tl.load(p_g + H, mask=m, other=0.0)
    b_g = tl.load(p_g + 2 * H, mask=m, other=0.0)
    b_o = tl.load(p_g + 3 * H, mask=m, other=0.0)
    b_ct = tl.load(c_all + t64 * B * H + p_bu, mask=m, other=0.0)
    if t > 0:
        b_cp = tl.load(c_all + (t64 - 1) * B * H + p_bu, mask=m, other=0.0)
    else:
        if HAS_H0:
            b_cp = tl.load(c0 + p_bu, mask=m, other=0.0).to(ACC)
        else:
            b_cp = tl.zeros(p_bu.shape, dtype=ACC)
    if HAS_DY:
        b_dy = tl.load(dy + t64 * B * H + p_bu, mask=m, other=0.0).to(ACC)
    else:
        b_dy = tl.zeros(p_bu.shape, dtype=ACC)
    return b_dy, b_i, b_f, b_g, b_o, b_ct, b_cp


@triton.jit(do_not_specialize=["T", "B", "s_begin", "s_end", "batch_start", "leader_inc"])
def lstm_backward_kernel(
    dy,        # [T, B, H]   grad of y, input dtype (read when HAS_DY)
    dh_n,      # [B, H]      grad of h_n, input dtype (read when HAS_DHN)
    dc_state,  # [B, H]      fp32, in: dc_next at stage s_begin; out: after stage s_end - 1
    gates,     # [T, B, 4H]  fp32 activated i, f, g, o saved by the forward
    c_all,     # [T, B, H]   fp32 c_t saved by the forward
    c0,        # [B, H]      input dtype, read when HAS_H0
    w_hh,      # [4H, H]     input dtype
    dgates,    # [T, B, 4H]  out: dG_t, input dtype
    dh0,       # [B, H]      out: grad of h0, input dtype
    counters,  # [groups]    int32 barrier counters, one per batch block
    T, B, s_begin, s_end, batch_start, leader_inc,
    H: tl.constexpr, HP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    RESIDENT: tl.constexpr, HAS_DY: tl.constexpr, HAS_DHN: tl.constexpr, HAS_H0: tl.constexpr,
    PERSISTENT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    NUM_H_BLOCKS: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    ACC: tl.constexpr = dc_state.dtype.element_ty   # fp32 (fp64 for fp64 inputs)
    i_p = tl.program_id(0)
    i_h = i_p % NUM_H_BLOCKS
    i_b = i_p // NUM_H_BLOCKS

    o_b = batch_start + i_b * BLOCK_B + tl.arange(0, BLOCK_B)
    o_u = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_b = o_b < B
    m_u = o_u < H
    m_bu = m_b[:, None] & m_u[None, :]
    p_bu = o_b[:, None] * H + o_u[None, :]
    p_bg = o_b[:, None] * (4 * H) + o_u[None, :]

    if RESIDENT:
        # Per gate, W_hh[gate*H + j, own units] as [HP, BLOCK_H] (or slices) for split_dot.
        o_j = reduction_index(HP, SPLIT_K)
        p_w = w_hh + tl.expand_dims(o_j, -1) * H + o_u
        m_w = tl.expand_dims(o_j < H, -1) & m_u
        b_wi = tl.load(p_w, mask=m_w, other=0.0)
        b_wf = tl.load(p_w + H * H, mask=m_w, other=0.0)
        b_wg = tl.load(p_w + 2 * H * H, mask=m_w, other=0.0)
        b_wo = tl.load(p_w + 3 * H * H, mask=m_w, other=0.0)

    b_dc = tl.load(dc_state + p_bu, mask=m_bu, other=0.0)
    b_dy, b_i, b_f, b_g, b_o, b_ct, b_cp = _load_saved(
        T - 1 - s_begin, dy, gates, c_all, c0, B, p_bu, p_bg, m_bu, H, HAS_DY, HAS_H0, ACC)

    for s in range(s_begin, s_end):
        t = T - 1 - s
        t64 = tl.cast(t, tl.int64)
        if s == 0:
            if HAS_DHN:
                b_dh = tl.load(dh_n + p_bu, mask=m_bu, other=0.0).to(ACC)
            else:
                b_dh = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
        else:
            # dG_{t+1} of every unit, written by all programs of this batch block.
            p_dg = dgates + (t64 + 1) * B * 4 * H
            if RESIDENT:
                # One gate at a time, so only a [BLOCK_B, HP] slice of dG is staged.
                p_rows = p_dg + o_b * (4 * H)
                b_dh = split_dot(p_rows, m_b, o_j, b_wi, H, SPLIT_K, DOT_PRECISION, ACC)
                b_dh += split_dot(p_rows + H, m_b, o_j, b_wf, H, SPLIT_K, DOT_PRECISION, ACC)
                b_dh += split_dot(p_rows + 2 * H, m_b, o_j, b_wg, H, SPLIT_K, DOT_PRECISION, ACC)
                b_dh += split_dot(p_rows + 3 * H, m_b, o_j, b_wo, H, SPLIT_K, DOT_PRECISION, ACC)
            else:
                b_dh = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
                for k0 in range(0, 4 * HP, BLOCK_K):
                    o_n = k0 + tl.arange(0, BLOCK_K)     # gate o_n // HP, unit o_n % HP
                    m_n = (o_n % HP) < H
                    col_n = (o_n // HP) * H + o_n % HP
                    b_dgk = tl.load(p_dg + o_b[:, None] * (4 * H) + col_n[None, :],
                                    mask=m_b[:, None] & m_n[None, :], other=0.0, cache_modifier=".cg")
                    b_wk = tl.load(w_hh + col_n[:, None] * H + o_u[None, :],
                                   mask=m_n[:, None] & m_u[None, :], other=0.0)
                    b_dh = tl.dot(b_dgk, b_wk, b_dh, input_precision=DOT_PRECISION)

        if s < T:
            b_dh += b_dy
            b_tc = _tanh(b_ct)
            b_dc = b_dc + b_dh * b_o * (1.0 - b_tc * b_tc)
            p_out = dgates + t64 * B * 4 * H + p_bg
            dtype = dgates.dtype.element_ty
            tl.store(p_out, (b_dc * b_g * b_i * (1.0 - b_i)).to(dtype), mask=m_bu)
            tl.store(p_out + H, (b_dc * b_cp * b_f * (1.0 - b_f)).to(dtype), mask=m_bu)
            tl.store(p_out + 2 * H, (b_dc * b_i * (1.0 - b_g * b_g)).to(dtype), mask=m_bu)
            tl.store(p_out + 3 * H, (b_dh * b_tc * b_o * (1.0 - b_o)).to(dtype), mask=m_bu)
            b_dc = b_dc * b_f
            # The next step's saved values do not depend on the recurrence: their
            # loads are in flight while this program waits at the barrier.
            t_next = tl.where(s + 1 < s_end, t - 1, -1)
            b_dy, b_i, b_f, b_g, b_o, b_ct, b_cp = _load_saved(
                t_next, dy, gates, c_all, c0, B, p_bu, p_bg, m_bu, H, HAS_DY, HAS_H0, ACC)
            if PERSISTENT:
                grid_barrier(counters + i_b, leader_inc, i_h == 0)
        else:
            tl.store(dh0 + p_bu, b_dh.to(dh0.dtype.element_ty), mask=m_bu)

    tl.store(dc_state + p_bu, b_dc, mask=m_bu)


def lstm_backward(dy, dh_n, dc_n, gates, c_all, c0, w_hh, *, config=None,
                  force_stepped: bool = False):
    """Run the reverse recurrence.

    Args:
        dy: [T, B, H] gradient of y, or None. dh_n, dc_n: [B, H] or None.
        gates, c_all: what ``lstm_forward(save=True)`` returned.
        c0: [B, H] initial cell state, or None for zeros.
        w_hh: [4H, H].
    Returns:
        dgates [T, B, 4H] (w_hh's dtype), dh0 [B, H], dc0 [B, H] in the state dtype.
    """
    T, B, _ = gates.shape
    H = w_hh.shape[1]
    device, dtype = w_hh.device, w_hh.dtype
    config = config or pick_config(B, H, dtype, device, "backward")
    dgates = torch.empty(T, B, 4 * H, dtype=dtype, device=device)
    dh0 = torch.empty(B, H, dtype=dtype, device=device)
    if dc_n is None:
        dc_state = torch.zeros(B, H, dtype=state_dtype(dtype), device=device)
    else:
        dc_state = dc_n.to(state_dtype(dtype), copy=True).contiguous()
    args = (dgates if dy is None else dy.contiguous(), dh0 if dh_n is None else dh_n.contiguous(),
            dc_state, gates, c_all, dh0 if c0 is None else c0, w_hh, dgates, dh0, T, B)
    constexprs = dict(H=H, HP=padded(H), HAS_DY=dy is not None, HAS_DHN=dh_n is not None,
                      HAS_H0=c0 is not None, DOT_PRECISION=dot_precision(dtype, device))
    launch_recurrence(lstm_backward_kernel, args, constexprs, num_steps=T + 1, batch=B,
                      hidden_size=H, config=config, device=device, force_stepped=force_stepped)
    return dgates, dh0, dc_state
