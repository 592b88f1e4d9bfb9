"""The backward of a layer that kept only a checkpoint every k steps (``recompute=k``).

The forward saved h and c before every k-th step of each direction's own order
(h_ckpt, c_ckpt; the kernels write them) instead of every step's gates and c:
T * B * 20H bytes become T / k * B * (2R + 4H). The backward walks the segments
from the last to the first. For each it recomputes the segment's input
projection and gates from its checkpoint (the forward kernel, in processing
order), runs the reverse kernel over it, and adds the segment's share to the
weight gradients. What crosses a segment boundary is the gradient of the state
at the checkpoint, which the reverse kernel returns as its "dh0, dc0".

Both directions run in processing order here: the reverse direction's inputs are
gathered so that step s of segment [s0, s1) holds each row's time length-1-s,
and the kernels walk every direction forwards (reverse=False). Nothing of size
T is allocated besides dx.
"""
from __future__ import annotations

import torch

from .dispatch import state_dtype, to_dtype
from .ops import config_to_list, layer_matmul
from .reference import reverse_order, row_lengths


def _processing_order_times(lengths, T: int, B: int, D: int, device) -> list:
    """Per direction, [T, B]: the time each row processes at each step."""
    forward = torch.arange(T, device=device)[:, None].expand(T, B)
    return [forward] if D == 1 else [forward, reverse_order(lengths, T, B, device)]


def _gather_steps(t: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """t [T, B, F] -> [n, B, F]: row b of step j is t[times[j, b], b]."""
    return t.gather(0, times[:, :, None].expand(*times.shape, t.shape[-1]))


def recompute_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                       restarts, h_ckpt, c_ckpt, *, needs, config, force_stepped, every: int):
    """Gradients of one layer from its checkpoints: dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr.

    Shapes as ``autograd.lstm_layer_backward`` with the direction dim present (w_hh
    [D, 4H, R], h0 / dh_n [D, B, R], c0 / dc_n [D, B, H]); h_ckpt [D, NC, B, R] and
    c_ckpt [D, NC, B, H] from the forward op with ``ckpt_every=every``.
    """
    T, B, I = x.shape
    D, four_h, R = w_hh.shape
    H = four_h // 4
    dtype, device = x.dtype, x.device
    acc = state_dtype(dtype)
    need_x, _, _, need_wih, need_whh, need_bih, need_bhh, need_whr = needs
    need_b = b_ih is not None and (need_bih or need_bhh)
    length = row_lengths(lengths, T, B, device)
    times = _processing_order_times(lengths, T, B, D, device)
    w_ih_by_direction = w_ih.view(D, four_h, I)
    bias = None if b_ih is None else (b_ih + b_hh).view(D, four_h)
    config = config_to_list(config)

    # Sums over the segments, in the state dtype; out of place, so that vmap can batch them.
    dx = torch.zeros(T, B, I, dtype=acc, device=device) if need_x else None
    dw_ih, dw_hh, dw_hr, db = ([0.0] * D for _ in range(4))
    dh_carry = torch.zeros(D, B, R, dtype=acc, device=device)   # grad of the state at the
    dc_carry = torch.zeros(D, B, H, dtype=acc, device=device)   # start of the later segment
    dh_restart = torch.zeros(D, B, R, dtype=acc, device=device)
    dc_restart = torch.zeros(D, B, H, dtype=acc, device=device)
    zeros_h = torch.zeros(D, B, R, dtype=dtype, device=device)

    for s0 in reversed(range(0, T, every)):
        s1 = min(s0 + every, T)
        n = s1 - s0
        seg_times = [t[s0:s1] for t in times]
        x_seg = [_gather_steps(x, t) for t in seg_times]                     # per direction
        gx = torch.cat([layer_matmul(x_seg[d].reshape(n * B, I), w_ih_by_direction[d].t(),
                                     None if bias is None else bias[d])
                        for d in range(D)], dim=1).view(n, B, D * four_h)
        seg_lengths = (length - s0).clamp(0, n).to(torch.int32)
        seg_restarts = None if restarts is None else restarts[:, s0:s1]
        h_start, c_start = h_ckpt[:, s0 // every], c_ckpt[:, s0 // every]
        y, _, _, gates, c_all, r_all, _, _ = torch.ops.triton_lstm.recurrence_forward(
            gx, w_hh, h_start, c_start, seg_lengths, w_hr, True, config, force_stepped,
            seg_restarts, h0, c0, 0, False)

        # The state gradient entering the segment's end: the caller's dh_n / dc_n for rows
        # whose sequence ends in this segment, else what the later segment handed back.
        ends_here = ((length > s0) & (length <= s1))[None, :, None]
        dh_end = torch.where(ends_here, 0 if dh_n is None else dh_n.to(acc), dh_carry)
        dc_end = torch.where(ends_here, 0 if dc_n is None else dc_n.to(acc), dc_carry)
        dy_seg = None
        if dy is not None:
            dy_by_direction = dy.view(T, B, D, R)
            dy_seg = torch.cat([_gather_steps(dy_by_direction[:, :, d], seg_times[d])
                                for d in range(D)], dim=2)
        dG, dh_carry, dc_carry, dh_all, dh_rs, dc_rs = torch.ops.triton_lstm.recurrence_backward(
            dy_seg, dh_end, dc_end, gates, c_all, c_start, seg_lengths, w_hh, w_hr, config,
            force_stepped, seg_restarts, c0, False)[:6]
        dh_carry = dh_carry.to(acc)
        if restarts is not None:
            dh_restart = dh_restart + dh_rs
            dc_restart = dc_restart + dc_rs

        dG_by_direction = dG.view(n * B, D, four_h)
        for d in range(D):
            g = dG_by_direction[:, d]
            if need_x:
                dx_seg = layer_matmul(g, w_ih_by_direction[d]).view(n, B, I).to(acc)
                dx = dx.scatter_add(0, seg_times[d][:, :, None].expand(n, B, I), dx_seg)
            if need_wih:
                dw_ih[d] = dw_ih[d] + layer_matmul(g.t(), x_seg[d].reshape(n * B, I)).to(acc)
            if need_whh:
                # h_{t-1} of each step: the checkpoint, then the segment's own outputs.
                y_d = y.view(n, B, D, R)[:, :, d]
                h_prev = torch.cat([h_start[d][None].to(dtype), y_d[:-1]])
                if seg_restarts is not None:
                    h_restart = (h0 if h0 is not None else zeros_h)[d]
                    h_prev = torch.where(seg_restarts[d].bool()[:, :, None], h_restart, h_prev)
                dw_hh[d] = dw_hh[d] + layer_matmul(g.t(), h_prev.reshape(n * B, R)).to(acc)
            if w_hr is not None and need_whr:
                dw_hr[d] = dw_hr[d] + layer_matmul(dh_all[d].reshape(n * B, R).t(),
                                                    r_all[d].reshape(n * B, H)).to(acc)
            if need_b:
                db[d] = db[d] + g.sum(0, dtype=acc)

    dh0, dc0 = dh_carry + dh_restart, dc_carry + dc_restart
    return (None if dx is None else to_dtype(dx, dtype), to_dtype(dh0, dtype),
            to_dtype(dc0, dtype), to_dtype(torch.cat(dw_ih), dtype) if need_wih else None,
            to_dtype(torch.stack(dw_hh), dtype) if need_whh else None,
            to_dtype(torch.cat(db), dtype) if need_b else None,
            to_dtype(torch.stack(dw_hr), dtype) if (w_hr is not None and need_whr) else None)
