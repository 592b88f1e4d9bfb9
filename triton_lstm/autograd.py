"""LSTMFunction: one LSTM layer (one direction, or both at once) as a torch.autograd.Function.

Forward: the input projection for all steps and directions is one GEMM, then
the recurrence op (ops.py). Backward: the reverse recurrence op produces dG
(the gradient of the gate pre-activations) for every step; all the
non-recurrent gradients are then large GEMMs and a reduction over dG.

The Functions are written in the setup_context style, so that ``torch.func``
(grad, vmap) composes with them; vmap runs the ops' own rules (ops.py).
Second derivatives: when the backward itself is differentiated
(``create_graph=True``, ``torch.func.hessian``, ...) it runs as
``LSTMBackwardFunction``, whose own backward differentiates the plain-PyTorch
reference (reference.py) twice: slower, exact. Forward-mode AD (jvp, dual
tensors) runs the reference directly.
"""
from __future__ import annotations

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch._C._functorch import TransformType
import torch.autograd.forward_ad as forward_ad

from . import ops  # noqa: F401  (registers torch.ops.triton_lstm.*)
from .ops import config_to_list
from .reference import lstm_layer_reference


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
    y_d = y.unflatten(-1, (-1, size)).select(2, direction)
    first = (h0[direction] if h0 is not None else torch.zeros_like(y_d[0])).unsqueeze(0)
    if direction == 0:
        return torch.cat([first, y_d[:-1]])
    prev = torch.cat([y_d[1:], first])
    if lengths is not None:
        steps = torch.arange(y_d.shape[0], device=y.device)[:, None]
        last = (steps == (lengths.to(steps.dtype) - 1)[None, :])[:, :, None]
        prev = torch.where(last, first, prev)
    return prev


def _add_direction_dim(*tensors):
    return tuple(None if t is None else t.unsqueeze(0) for t in tensors)


def _forward_ad_active(tensors) -> bool:
    """Forward-mode AD is running: a jvp transform, or dual tensors among the arguments."""
    if torch.compiler.is_compiling():
        return False
    if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
        return True
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, w_hr=None,
               config=None, force_stepped=False):
    """One layer, all its directions: y [T, B, D*R], h_n, c_n.

    Arguments as ``LSTMFunction``. Runs LSTMFunction when a gradient is needed, the
    forward op alone (saving nothing) otherwise, and the reference under forward-mode AD.
    """
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if _forward_ad_active(tensors):
        return lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, h_n, c_n, *_ = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, config,
                                             force_stepped, w_hr)
        return y, h_n, c_n
    single = w_hh.dim() == 2
    if single:
        w_hh, h0, c0, w_hr = _add_direction_dim(w_hh, h0, c0, w_hr)
    gx = input_projection(x, w_ih, b_ih, b_hh)
    y, h_n, c_n, *_ = torch.ops.triton_lstm.recurrence_forward(
        gx, w_hh, h0, c0, lengths, w_hr, False, config_to_list(config), force_stepped)
    c_n = c_n.to(x.dtype)
    return (y, h_n[0], c_n[0]) if single else (y, h_n, c_n)


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
        y [T, B, D*R] (zeros past each row's length), h_n [B, R], c_n [B, H] (or [D, B, .]),
        then what the backward needs, marked non-differentiable: gates [D, T, B, 4H],
        c_all [D, T, B, H] (fp32) and r_all (o * tanh(c) with a projection, else [0]).
        ``lstm_layer`` calls it and returns the first three.

    Example:
        >>> y, h_n, c_n, *saved = LSTMFunction.apply(x, None, None, w_ih, w_hh, b_ih, b_hh)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, config=None,
                force_stepped=False, w_hr=None):
        single = w_hh.dim() == 2
        if single:
            w_hh, h0, c0, w_hr = _add_direction_dim(w_hh, h0, c0, w_hr)
        gx = input_projection(x, w_ih, b_ih, b_hh)
        y, h_n, c_n, gates, c_all, r_all = torch.ops.triton_lstm.recurrence_forward(
            gx, w_hh, h0, c0, lengths, w_hr, True, config_to_list(config), force_stepped)
        c_n = c_n.to(x.dtype)
        if single:
            h_n, c_n = h_n[0], c_n[0]
        return y, h_n, c_n, gates, c_all, r_all

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, config, force_stepped, w_hr = inputs
        y, _, _, gates, c_all, r_all = output
        ctx.mark_non_differentiable(gates, c_all, r_all)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, gates, c_all,
                              r_all)
        ctx.config, ctx.force_stepped = config, force_stepped

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, _gates, _c_all, _r_all):
        needs = ctx.needs_input_grad
        needs = needs[:7] + (needs[10],)    # x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
        if torch.is_grad_enabled():
            # The gradient will itself be differentiated: go through a Function that can.
            grads = LSTMBackwardFunction.apply(dy, dh_n, dc_n, *ctx.saved_tensors, needs,
                                               ctx.config, ctx.force_stepped)
        else:
            grads = lstm_layer_backward(dy, dh_n, dc_n, *ctx.saved_tensors, needs=needs,
                                        config=ctx.config, force_stepped=ctx.force_stepped)
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = grads
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, dw_hr


def lstm_layer_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y,
                        gates, c_all, r_all, *, needs, config=None, force_stepped=False):
    """Gradients of one layer (kernels, then GEMMs over dG): dx, dh0, dc0, dw_ih, dw_hh,
    db_ih, db_hh, dw_hr, each None where ``needs`` (same order) says it is not wanted."""
    single = w_hh.dim() == 2
    if single:
        w_hh, h0, c0, w_hr, dh_n, dc_n, r_all = _add_direction_dim(w_hh, h0, c0, w_hr, dh_n, dc_n,
                                                                   r_all)
    T, B, I = x.shape
    D, _, R = w_hh.shape
    H = c_all.shape[3]
    need_x, need_h0, need_c0, need_wih, need_whh, need_bih, need_bhh, need_whr = needs
    dG, dh0, dc0, dh_all = torch.ops.triton_lstm.recurrence_backward(
        dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr, config_to_list(config),
        force_stepped)
    dG2 = dG.reshape(T * B, D * 4 * H)
    dG_by_direction = dG.reshape(T * B, D, 4 * H)
    dx = (dG2 @ w_ih).reshape(T, B, I) if need_x else None
    dw_ih = dG2.t() @ x.reshape(T * B, I) if need_wih else None
    dw_hh = None
    if need_whh:
        dw_hh = torch.stack([
            dG_by_direction[:, d].t()
            @ previous_hidden(y, h0, lengths, d, R).reshape(T * B, R)
            for d in range(D)])
    dw_hr = None
    if w_hr is not None and need_whr:
        # h_t = r_t W_hr^T: dW_hr = sum_t dh_t^T r_t, with dh_t the total gradient of h_t.
        dw_hr = torch.stack([dh_all[d].reshape(T * B, R).t() @ r_all[d].reshape(T * B, H)
                             for d in range(D)])
    db = None
    if b_ih is not None and (need_bih or need_bhh):
        db = dG2.sum(0, dtype=c_all.dtype).to(dG.dtype)
    dc0 = dc0.to(x.dtype)
    if single:
        dh0, dc0 = dh0[0], dc0[0]
        dw_hh = None if dw_hh is None else dw_hh[0]
        dw_hr = None if dw_hr is None else dw_hr[0]
    return (dx, dh0 if need_h0 else None, dc0 if need_c0 else None, dw_ih, dw_hh,
            db if need_bih else None, db if need_bhh else None, dw_hr)


class LSTMBackwardFunction(torch.autograd.Function):
    """The backward of LSTMFunction as a differentiable Function (for second derivatives).

    Forward: ``lstm_layer_backward`` (the kernels). Backward: the vector-Jacobian
    product of the reference's gradient map, i.e. the reference differentiated twice.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, y, gates, c_all,
                r_all, needs, config, force_stepped):
        return lstm_layer_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   lengths, y, gates, c_all, r_all, needs=needs, config=config,
                                   force_stepped=force_stepped)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:12])   # dy .. lengths

    @staticmethod
    def backward(ctx, *grad_grads):
        dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths = ctx.saved_tensors
        cotangents = (dy, dh_n, dc_n)
        primals = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        # Which of the first-order gradients were asked for, and which tensors exist at all.
        wanted = [k for k, (g, p) in enumerate(zip(grad_grads, primals))
                  if g is not None and p is not None]
        inputs = cotangents + primals
        present = [k for k, t in enumerate(inputs) if t is not None]

        def first_order(*tensors):
            full = list(inputs)
            for k, t in zip(present, tensors):
                full[k] = t
            cot, prim = full[:3], full[3:]
            differentiable = [k for k, p in enumerate(prim) if p is not None]

            def layer(*ps):
                args = list(prim)
                for k, p in zip(differentiable, ps):
                    args[k] = p
                xx, hh0, cc0, wih, whh, bih, bhh, whr = args
                return lstm_layer_reference(xx, hh0, cc0, wih, whh, bih, bhh, lengths, whr)

            outs, vjp = torch.func.vjp(layer, *(prim[k] for k in differentiable))
            grads = vjp(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outs, cot)))
            by_input = dict(zip(differentiable, grads))
            return tuple(by_input[k] for k in wanted)

        if not wanted:
            return (None,) * 19
        _, vjp = torch.func.vjp(first_order, *(inputs[k] for k in present))
        grads = vjp(tuple(grad_grads[k] for k in wanted))
        result = [None] * 19
        for k, g in zip(present, grads):
            result[k] = g
        return tuple(result)
