"""LSTMFunction: one LSTM layer (one direction, or both at once) as a torch.autograd.Function.

Forward: the input projection for all steps and directions is one GEMM, then
the persistent recurrent kernel. Backward: the persistent reverse kernel
produces dG (the gradient of the gate pre-activations) for every step; all the
non-recurrent gradients are then large GEMMs and a reduction over dG.
"""
from __future__ import annotations

import torch

from .kernels.backward import lstm_backward
from .kernels.forward import lstm_forward


def input_projection(x: torch.Tensor, w_ih: torch.Tensor, b_ih, b_hh) -> torch.Tensor:
    """x [T, B, I] -> x W_ih^T + b_ih + b_hh, [T, B, D*4H], one GEMM for all directions."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    if b_ih is None:
        gx = x2 @ w_ih.t()
    else:
        gx = torch.addmm(b_ih + b_hh, x2, w_ih.t())
    return gx.view(T, B, -1)


def previous_hidden(y: torch.Tensor, h0, lengths, direction: int, size: int) -> torch.Tensor:
    """h_{t-1} as seen by step t of one direction, [T, B, size] (for the W_hh gradient GEMM).

    Forward: y_{t-1}, h0 at t = 0. Reverse: y_{t+1}, h0 at each row's last step.
    Past a row's length anything finite will do (dG is zero there).
    """
    y_d = y[:, :, direction * size:(direction + 1) * size]
    prev = torch.zeros_like(y_d)
    T, B, _ = y_d.shape
    if direction == 0:
        prev[1:] = y_d[:-1]
        if h0 is not None:
            prev[0] = h0[0]
    else:
        prev[:-1] = y_d[1:]
        last = lengths.long() - 1 if lengths is not None else torch.full((B,), T - 1, device=y.device)
        rows = torch.arange(B, device=y.device)
        prev[last, rows] = h0[1] if h0 is not None else 0.0
    return prev


def run_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr, *, save, config=None,
                force_stepped=False):
    """Input projection GEMM, then the recurrent kernel (w_hh [D, 4H, R], h0 [D, B, R])."""
    gx = input_projection(x.contiguous(), w_ih, b_ih, b_hh)
    h0 = h0.contiguous() if h0 is not None else None
    c0 = c0.contiguous() if c0 is not None else None
    w_hr = w_hr.contiguous() if w_hr is not None else None
    return lstm_forward(gx, w_hh.contiguous(), h0, c0, lengths, w_hr, save=save, config=config,
                        force_stepped=force_stepped)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, w_hr=None,
               config=None, force_stepped=False):
    """One layer: through LSTMFunction when a gradient is needed, else saving nothing."""
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors + (w_hr,)):
        return LSTMFunction.apply(*tensors, lengths, config, force_stepped, w_hr)
    single = w_hh.dim() == 2
    if single:
        w_hh, h0, c0, w_hr = _add_direction_dim(w_hh, h0, c0, w_hr)
    y, h_n, c_n, _, _, _ = run_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr,
                                       save=False, config=config, force_stepped=force_stepped)
    c_n = c_n.to(x.dtype)
    return (y, h_n[0], c_n[0]) if single else (y, h_n, c_n)


def _add_direction_dim(*tensors):
    return tuple(None if t is None else t.unsqueeze(0) for t in tensors)


class LSTMFunction(torch.autograd.Function):
    """One LSTM layer over a whole sequence: one direction, or both directions in one launch.

    Args (all on one device, one dtype):
        x: [T, B, I] input, T >= 1, B >= 1.
        h0: [B, R], c0: [B, H] initial state ([D, B, .] with 3-D w_hh), or both None for zeros.
        w_ih: [D*4H, I]; w_hh: [4H, R] for one direction, or [D, 4H, R] (direction 1
            runs in reverse); b_ih, b_hh: [D*4H] or both None.
        lengths: [B] int32 sequence lengths on x's device (packed sequences), or None.
        config: optional ``dispatch.KernelConfig`` forcing the tile shape of both kernels.
        force_stepped: run one launch per step even where a persistent launch fits.
        w_hr: projection weights [R, H] ([D, R, H]), or None: then R = H.
    Returns:
        y [T, B, D*R] (zeros past each row's length), h_n [B, R], c_n [B, H] (or [D, B, .]).

    Example:
        >>> y, h_n, c_n = LSTMFunction.apply(x, None, None, w_ih, w_hh, b_ih, b_hh)
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, config=None,
                force_stepped=False, w_hr=None):
        ctx.single = w_hh.dim() == 2
        if ctx.single:
            w_hh, h0, c0, w_hr = _add_direction_dim(w_hh, h0, c0, w_hr)
        # The kernels and the backward read these as dense blocks.
        x, h0, c0 = (None if t is None else t.contiguous() for t in (x, h0, c0))
        # Under no_grad needs_input_grad still says True: lstm_layer skips this Function then.
        save = any(ctx.needs_input_grad)
        y, h_n, c_n, gates, c_all, r_all = run_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths,
                                                       w_hr, save=save, config=config,
                                                       force_stepped=force_stepped)
        ctx.set_materialize_grads(False)
        if save:
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh.contiguous(), y, gates, c_all, lengths,
                                  w_hr, r_all)
            ctx.has_bias = b_ih is not None
            ctx.config, ctx.force_stepped = config, force_stepped
        c_n = c_n.to(x.dtype)
        return (y, h_n[0], c_n[0]) if ctx.single else (y, h_n, c_n)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():
            # The kernels' backward is not itself differentiable: refuse rather than return
            # second derivatives that silently miss the recurrence.
            raise RuntimeError("triton_lstm: gradients of gradients (backward with create_graph=True) "
                               "are not supported; use backend='torch' for double backward")
        x, h0, c0, w_ih, w_hh, y, gates, c_all, lengths, w_hr, r_all = ctx.saved_tensors
        T, B, I = x.shape
        D, _, R = w_hh.shape
        H = c_all.shape[3]
        if ctx.single:
            dh_n, dc_n = _add_direction_dim(dh_n, dc_n)
        need_x, need_h0, need_c0, need_wih, need_whh, need_bih, need_bhh = ctx.needs_input_grad[:7]
        dG, dh0, dc0, dh_all = lstm_backward(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr,
                                             config=ctx.config, force_stepped=ctx.force_stepped)
        dG2 = dG.view(T * B, D * 4 * H)
        dx = (dG2 @ w_ih).view(T, B, I) if need_x else None
        dw_ih = dG2.t() @ x.reshape(T * B, I) if need_wih else None
        dw_hh = None
        if need_whh:
            dw_hh = torch.stack([
                dG2[:, d * 4 * H:(d + 1) * 4 * H].t()
                @ previous_hidden(y, h0, lengths, d, R).reshape(T * B, R)
                for d in range(D)])
        dw_hr = None
        if w_hr is not None and ctx.needs_input_grad[10]:
            # h_t = r_t W_hr^T: dW_hr = sum_t dh_t^T r_t, with dh_t the total gradient of h_t.
            dw_hr = torch.stack([dh_all[d].reshape(T * B, R).t() @ r_all[d].reshape(T * B, H)
                                 for d in range(D)])
        db = None
        if ctx.has_bias and (need_bih or need_bhh):
            db = dG2.sum(0, dtype=c_all.dtype).to(dG.dtype)
        dc0 = dc0.to(x.dtype)
        if ctx.single:
            dh0, dc0 = dh0[0], dc0[0]
            dw_hh = None if dw_hh is None else dw_hh[0]
            dw_hr = None if dw_hr is None else dw_hr[0]
        return (dx, dh0 if need_h0 else None, dc0 if need_c0 else None, dw_ih, dw_hh,
                db if need_bih else None, db if need_bhh else None, None, None, None, dw_hr)
