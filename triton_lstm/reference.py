"""One LSTM layer in plain PyTorch ops: the math of the kernels, differentiable to any order.

It is the slow path for what the kernels' hand-written backward cannot give:
second derivatives (the backward of the backward, autograd.py) and forward-mode
AD (``torch.func.jvp``, ``torch.autograd.forward_ad``). Same arguments and
results as ``autograd.lstm_layer``; a step loop in Python, so it is only as fast
as T small matmuls per direction.
"""
from __future__ import annotations

import torch

from .dispatch import state_dtype


def row_lengths(lengths, T: int, B: int, device) -> torch.Tensor:
    """[B] int64: each row's sequence length (T for every row when lengths is None)."""
    if lengths is None:
        return torch.full((B,), T, device=device)
    return lengths.to(device=device, dtype=torch.long)


def reverse_order(lengths, T: int, B: int, device) -> torch.Tensor:
    """[T, B]: the time a reverse row processes at each step, t = length - 1 - step (the
    step itself past the row's length). The map is its own inverse: time <-> step."""
    steps = torch.arange(T, device=device)[:, None]
    length = row_lengths(lengths, T, B, device)
    return torch.where(steps < length[None, :], length[None, :] - 1 - steps, steps)


def restarts_in_processing_order(reset, lengths, num_directions: int) -> torch.Tensor:
    """The state restarts before the steps where `reset` [T, B] (bool) is set, in each
    direction's own order: [D, T, B] int8 indexed by processing step.

    A reset at time t starts a new segment. The forward direction restarts before
    processing t. The reverse direction walks each row from its last step back, so it
    restarts before processing t - 1, the last step of the segment before: at its
    processing step s where time length - s is a reset (s >= 1).
    """
    T, B = reset.shape
    per_direction = [reset]
    if num_directions == 2:
        steps = torch.arange(T, device=reset.device)[:, None]
        length = row_lengths(lengths, T, B, reset.device)[None, :]
        # Step s processes time length - 1 - s; the time just after it is length - s.
        inside = (steps >= 1) & (steps < length)
        per_direction.append(inside & reset.gather(0, (length - steps).clamp(0, T - 1)))
    return torch.stack(per_direction).to(torch.int8)


def lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, w_hr=None,
                         restarts=None):
    """x [T, B, I]; w_hh [4H, R] or [D, 4H, R]; h0 [B, R] / c0 [B, H] (or [D, B, .]) or None.

    w_ih [D*4H, I], b_ih and b_hh [D*4H] or None, lengths [B] or None, w_hr [R, H]
    ([D, R, H]) or None, restarts [D, T, B] (``restarts_in_processing_order``) or None:
    the state goes back to (h0, c0), or zeros, before those steps. Returns y [T, B, D*R]
    (zeros past each row's length), h_n and c_n, shaped like h0 and c0. Gates and
    state in fp32 (fp64 for fp64).
    """
    single = w_hh.dim() == 2
    if single:
        w_hh, h0, c0, w_hr = (None if t is None else t.unsqueeze(0) for t in (w_hh, h0, c0, w_hr))
    dtype = x.dtype
    acc = state_dtype(dtype)
    T, B, _ = x.shape
    D, four_h, R = w_hh.shape
    H = four_h // 4
    gx = x.to(acc) @ w_ih.to(acc).t()
    if b_ih is not None:
        gx = gx + (b_ih + b_hh).to(acc)
    steps = torch.arange(T, device=x.device)[:, None]
    running = steps < row_lengths(lengths, T, B, x.device)[None, :]          # [T, B]
    order = reverse_order(lengths, T, B, x.device)
    ys, h_n, c_n = [], [], []
    for d in range(D):
        g = gx[:, :, d * 4 * H:(d + 1) * 4 * H]
        if d == 1:
            g = g.gather(0, order[:, :, None].expand_as(g))
        h_init = h0[d].to(acc) if h0 is not None else gx.new_zeros(B, R)
        c_init = c0[d].to(acc) if c0 is not None else gx.new_zeros(B, H)
        h, c = h_init, c_init
        w = w_hh[d].to(acc)
        outs = []
        for t in range(T):
            if restarts is not None:
                restart = (restarts[d, t].bool() & running[t])[:, None]
                h = torch.where(restart, h_init, h)
                c = torch.where(restart, c_init, c)
            i, f, gg, o = (g[t] + h @ w.t()).chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = h_new @ w_hr[d].to(acc).t()
            keep = running[t][:, None]
            c = torch.where(keep, c_new, c)
            h = torch.where(keep, h_new, h)
            outs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
        y = torch.stack(outs)
        if d == 1:
            y = y.gather(0, order[:, :, None].expand_as(y))
        ys.append(y)
        h_n.append(h)
        c_n.append(c)
    y = torch.cat(ys, dim=-1).to(dtype)
    h_n, c_n = torch.stack(h_n).to(dtype), torch.stack(c_n).to(dtype)
    return (y, h_n[0], c_n[0]) if single else (y, h_n, c_n)


def lstm_step_reference(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step of one layer in plain PyTorch, the math of ``kernels/step.py``.

    x [B, I], h [B, R] and c [B, H] or both None (zeros), w_ih [4H, I], w_hh [4H, R],
    b_ih and b_hh [4H] or None. Returns r = o * tanh(c_t) [B, H] (input dtype),
    c_t [B, H] and the activated gates [B, 4H] (i, f, g, o), both in the state dtype.
    """
    acc = state_dtype(x.dtype)
    pre = x.to(acc) @ w_ih.to(acc).t()
    if h is not None:
        pre = pre + h.to(acc) @ w_hh.to(acc).t()
    if b_ih is not None:
        pre = pre + (b_ih.to(acc) + b_hh.to(acc))
    i, f, g, o = pre.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = i * g if c is None else f * c.to(acc) + i * g
    r = o * torch.tanh(c_new)
    return r.to(x.dtype), c_new, torch.cat([i, f, g, o], dim=1)
