"""LSTMFunction: one layer, one direction, as a torch.autograd.Function.

Forward: the input projection for all steps is one GEMM, then the persistent
recurrent kernel. Backward: the persistent reverse kernel produces dG (the
gradient of the gate pre-activations) for every step; all the non-recurrent
gradients are then large GEMMs and a reduction over dG.
"""
from __future__ import annotations

import torch

from .kernels.backward import lstm_backward
from .kernels.forward import lstm_forward


def input_projection(x: torch.Tensor, w_ih: torch.Tensor, b_ih, b_hh) -> torch.Tensor:
    """x [T, B, I] -> x W_ih^T + b_ih + b_hh, [T, B, 4H], one GEMM."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    if b_ih is None:
        gx = x2 @ w_ih.t()
    else:
        gx = torch.addmm(b_ih + b_hh, x2, w_ih.t())
    return gx.view(T, B, -1)


def run_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, *, save, config=None, force_stepped=False):
    """Input projection GEMM, then the recurrent kernel. Returns y, h_n, c_n (state dtype), saved."""
    x = x.contiguous()
    w_hh = w_hh.contiguous()
    h0 = h0.contiguous() if h0 is not None else None
    c0 = c0.contiguous() if c0 is not None else None
    gx = input_projection(x, w_ih, b_ih, b_hh)
    return lstm_forward(gx, w_hh, h0, c0, save=save, config=config, force_stepped=force_stepped)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, config=None, force_stepped=False):
    """One layer-direction: through LSTMFunction when a gradient is needed, else saving nothing."""
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return LSTMFunction.apply(*tensors, config, force_stepped)
    y, h_n, c_n, _, _ = run_forward(*tensors, save=False, config=config, force_stepped=force_stepped)
    return y, h_n, c_n.to(x.dtype)


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer-direction over a whole sequence.

    Args (all on one device, one dtype):
        x: [T, B, I] input, T >= 1, B >= 1.
        h0, c0: [B, H] initial state, or both None for zeros.
        w_ih: [4H, I], w_hh: [4H, H], b_ih, b_hh: [4H] or both None.
        config: optional ``dispatch.KernelConfig`` forcing the tile shape of both kernels.
        force_stepped: run one launch per step even where a persistent launch fits.
    Returns:
        y [T, B, H], h_n [B, H], c_n [B, H].

    Example:
        >>> y, h_n, c_n = LSTMFunction.apply(x, None, None, w_ih, w_hh, b_ih, b_hh)
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, config=None, force_stepped=False):
        # Under no_grad needs_input_grad still says True: lstm_layer skips this Function then.
        save = any(ctx.needs_input_grad[:7])
        y, h_n, c_n, gates, c_all = run_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, save=save,
                                                config=config, force_stepped=force_stepped)
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(x.contiguous(), h0, c0, w_ih, w_hh.contiguous(), y, gates, c_all)
            ctx.has_bias = b_ih is not None
            ctx.config, ctx.force_stepped = config, force_stepped
        return y, h_n, c_n.to(x.dtype)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, w_ih, w_hh, y, gates, c_all = ctx.saved_tensors
        T, B, I = x.shape
        H = w_hh.shape[1]
        need_x, need_h0, need_c0, need_wih, need_whh, need_bih, need_bhh = ctx.needs_input_grad[:7]
        dG, dh0, dc0 = lstm_backward(dy, dh_n, dc_n, gates, c_all, c0, w_hh, config=ctx.config,
                                     force_stepped=ctx.force_stepped)
        dG2 = dG.view(T * B, 4 * H)
        dx = (dG2 @ w_ih).view(T, B, I) if need_x else None
        dw_ih = dG2.t() @ x.reshape(T * B, I) if need_wih else None
        dw_hh = None
        if need_whh:
            # h_{t-1} is y_{t-1} for t >= 1 and h0 at t = 0.
            dw_hh = dG[1:].reshape(-1, 4 * H).t() @ y[:-1].reshape(-1, H)
            if h0 is not None:
                dw_hh = dw_hh + dG[0].t() @ h0
        db = None
        if ctx.has_bias and (need_bih or need_bhh):
            db = dG2.sum(0, dtype=c_all.dtype).to(dG.dtype)
        return (dx, dh0 if need_h0 else None, dc0.to(x.dtype) if need_c0 else None,
                dw_ih, dw_hh, db if need_bih else None, db if need_bhh else None, None, None)
