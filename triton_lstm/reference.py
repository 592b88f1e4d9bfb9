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


def lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, w_hr=None):
    """x [T, B, I]; w_hh [4H, R] or [D, 4H, R]; h0 [B, R] / c0 [B, H] (or [D, B, .]) or None.

    w_ih [D*4H, I], b_ih and b_hh [D*4H] or None, lengths [B] or None, w_hr [R, H]
    ([D, R, H]) or None. Returns y [T, B, D*R] (zeros past each row's length),
    h_n and c_n, shaped like h0 and c0. Gates and state in fp32 (fp64 for fp64).
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
    length = (torch.full((B,), T, device=x.device) if lengths is None
              else lengths.to(device=x.device, dtype=torch.long))
    running = steps < length[None, :]                                       # [T, B]
    # Reverse rows walk t = length - 1 - step; the map is its own inverse.
    reverse_order = torch.where(running, length[None, :] - 1 - steps, steps)  # [T, B]
    ys, h_n, c_n = [], [], []
    for d in range(D):
        g = gx[:, :, d * 4 * H:(d + 1) * 4 * H]
        if d == 1:
            g = g.gather(0, reverse_order[:, :, None].expand_as(g))
        h = h0[d].to(acc) if h0 is not None else gx.new_zeros(B, R)
        c = c0[d].to(acc) if c0 is not None else gx.new_zeros(B, H)
        w = w_hh[d].to(acc)
        outs = []
        for t in range(T):
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
            y = y.gather(0, reverse_order[:, :, None].expand_as(y))
        ys.append(y)
        h_n.append(h)
        c_n.append(c)
    y = torch.cat(ys, dim=-1).to(dtype)
    h_n, c_n = torch.stack(h_n).to(dtype), torch.stack(c_n).to(dtype)
    return (y, h_n[0], c_n[0]) if single else (y, h_n, c_n)
