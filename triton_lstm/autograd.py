"""LSTMFunction: one LSTM layer (one direction, or both at once) as a torch.autograd.Function.

Forward: the input projection for all steps and directions is one GEMM, then
the recurrence op (ops.py). Backward: the reverse recurrence op produces dG
(the gradient of the gate pre-activations) for every step; all the
non-recurrent gradients are then large GEMMs and a reduction over dG.

The Functions are written in the setup_context style, so that ``torch.func``
(grad, vmap) composes with them; vmap runs the ops' own rules (ops.py). Plain eager calls
go through an old-style twin of each (``eager_twin``), which skips the argument binding
that costs a setup_context Function's every call.
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

from .dispatch import state_dtype, to_dtype
from .ops import (bias_gradient, config_to_list, direct, layer_matmul, layer_matmul_plus,
                  recurrence_backward_eager, recurrence_forward_eager, step_forward_eager)
from .recompute import recompute_backward
from .reference import lstm_layer_reference, reverse_order


def input_projection(x: torch.Tensor, w_ih: torch.Tensor, b_ih, b_hh) -> torch.Tensor:
    """x [T, B, I] -> x W_ih^T + b_ih + b_hh, [T, B, D*4H], one GEMM for all directions."""
    T, B, I = x.shape
    x2 = x.reshape(T * B, I)
    gx = layer_matmul(x2, w_ih.t(), None if b_ih is None else b_ih + b_hh)
    return gx.view(T, B, -1)


def previous_hidden(y: torch.Tensor, h0, lengths, direction: int, size: int,
                    restarted=None) -> torch.Tensor:
    """h_{t-1} as seen by step t of one direction, [T, B, size] (for the W_hh gradient GEMM).

    Forward: y_{t-1}, h0 at t = 0. Reverse: y_{t+1}, h0 at each row's last step.
    restarted: [T, B] bool in time order, or None: those steps see h0 (zeros without).
    Past a row's length anything finite will do (dG is zero there).
    """
    y_d = y.unflatten(-1, (-1, size)).select(2, direction)
    first = (h0[direction] if h0 is not None else torch.zeros_like(y_d[0])).unsqueeze(0)
    if direction == 0:
        prev = torch.cat([first, y_d[:-1]])
    else:
        prev = torch.cat([y_d[1:], first])
        if lengths is not None:
            steps = torch.arange(y_d.shape[0], device=y.device)[:, None]
            last = (steps == (lengths.to(steps.dtype) - 1)[None, :])[:, :, None]
            prev = torch.where(last, first, prev)
    if restarted is not None:
        prev = torch.where(restarted[:, :, None], first, prev)
    return prev


def restarted_in_time_order(restarts, lengths, direction: int) -> torch.Tensor:
    """[T, B] bool: which steps of one direction restarted, by time (restarts is by step)."""
    per_step = restarts[direction].bool()
    if direction == 0:
        return per_step
    T, B = per_step.shape
    return per_step.gather(0, reverse_order(lengths, T, B, restarts.device))


def stacked(tensors):
    """torch.stack(tensors), one tensor as a view: a stack of one copies it (a launch)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


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


def eager_twin(function: type) -> type:
    """An old-style twin of a setup_context-style Function: the same forward, setup_context
    and backward. Function.apply binds a setup_context-style Function's arguments through
    inspect.signature on every call (on a CPU, ~50 µs of a small-batch training call's ~300
    µs of Python); the twin skips that. torch.func transforms need the setup_context style,
    and torch.compile traces the Function itself: ``applied`` takes the twin elsewhere.
    Callers pass every argument."""
    def forward(ctx, *args):
        outputs = function.forward(*args)
        function.setup_context(ctx, args, outputs)
        return outputs

    return type(f"{function.__name__}Eager", (torch.autograd.Function,),
                dict(forward=staticmethod(forward), backward=staticmethod(function.backward),
                     __doc__=f"{function.__name__} without binding its arguments (eager_twin)."))


def applied(function: type, *args):
    """function.apply(*args), by its eager twin (``function.eager``) in plain eager code:
    not under torch.compile (which traces the Function itself) or a torch.func transform."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return function.eager.apply(*args)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, lengths=None, w_hr=None,
               config=None, force_stepped=False, restarts=None, recompute=0):
    """One layer, all its directions: y [T, B, D*R], h_n, c_n.

    Arguments as ``LSTMFunction``. Runs LSTMFunction when a gradient is needed, the
    forward op alone (saving nothing) otherwise, and the reference under forward-mode AD.
    """
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if _forward_ad_active(tensors):
        return lstm_layer_reference(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr, restarts)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, h_n, c_n, *_ = applied(LSTMFunction, x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths,
                                  config, force_stepped, w_hr, restarts, recompute)
        return y, h_n, c_n
    single = w_hh.dim() == 2
    if single:
        w_hh, h0, c0, w_hr = _add_direction_dim(w_hh, h0, c0, w_hr)
    y, h_n, c_n, *_ = _recurrence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, config,
                                  force_stepped, w_hr, restarts, False, 0)
    c_n = c_n.to(x.dtype)
    return (y, h_n[0], c_n[0]) if single else (y, h_n, c_n)


def _recurrence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, config, force_stepped, w_hr,
                restarts, save: bool, recompute: int):
    """The input projection, then the forward recurrence (w_hh [D, 4H, R]): what
    ``ops.recurrence_forward`` returns. With ``dispatch.forward_chunks`` in chunks of steps,
    each chunk's projection beside the recurrence of the chunk before (overlap.py)."""
    from .overlap import forward_chunks_for, overlapped_forward   # overlap.py imports this file
    chunks = forward_chunks_for(w_hh.shape[0], x.shape[0], (x, h0, c0, w_ih, w_hh, b_ih, w_hr))
    if chunks:
        return overlapped_forward(x, w_ih, b_ih, b_hh, w_hh, h0, c0, lengths, w_hr, save, config,
                                  force_stepped, restarts, recompute, chunks)
    gx = input_projection(x, w_ih, b_ih, b_hh)
    return direct(torch.ops.triton_lstm.recurrence_forward, recurrence_forward_eager,
                  gx, w_hh, h0, c0, lengths, w_hr, save, config_to_list(config), force_stepped,
                  restarts, h0, c0, recompute)


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
        restarts: [D, T, B] int8 (``reference.restarts_in_processing_order``) or None:
            the state goes back to (h0, c0), or zeros, before those steps, and no
            gradient flows back across them.
        recompute: 0 saves every step's gates for the backward; k > 0 saves only the
            state every k steps and recomputes the gates segment by segment (recompute.py).
    Returns:
        y [T, B, D*R] (zeros past each row's length), h_n [B, R], c_n [B, H] (or [D, B, .]),
        then what the backward needs, marked non-differentiable and [0]-shaped where
        absent: gates [D, T, B, 4H], c_all [D, T, B, H] (fp32), r_all (o * tanh(c) with a
        projection), h_ckpt and c_ckpt (the state every ``recompute`` steps).
        ``lstm_layer`` calls it and returns the first three.

    Example:
        >>> y, h_n, c_n, *saved = LSTMFunction.apply(x, None, None, w_ih, w_hh, b_ih, b_hh)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, config=None,
                force_stepped=False, w_hr=None, restarts=None, recompute=0):
        single = w_hh.dim() == 2
        if single:
            w_hh, h0, c0, w_hr = _add_direction_dim(w_hh, h0, c0, w_hr)
        y, h_n, c_n, *saved = _recurrence(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, config,
                                          force_stepped, w_hr, restarts, not recompute, recompute)
        c_n = to_dtype(c_n, x.dtype)
        if single:
            h_n, c_n = h_n[0], c_n[0]
        return (y, h_n, c_n, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, config, force_stepped, w_hr, restarts,
         recompute) = inputs
        y, _, _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, restarts, y, *saved)
        ctx.config, ctx.force_stepped, ctx.recompute = config, force_stepped, recompute

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        needs = ctx.needs_input_grad
        needs = needs[:7] + (needs[10],)    # x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
        options = (needs, ctx.config, ctx.force_stepped, ctx.recompute)
        if torch.is_grad_enabled():
            # The gradient will itself be differentiated: go through a Function that can.
            grads = LSTMBackwardFunction.apply(dy, dh_n, dc_n, *ctx.saved_tensors, *options)
        else:
            grads = lstm_layer_backward(dy, dh_n, dc_n, *ctx.saved_tensors, *options)
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = grads
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None, None, dw_hr, None, None


def lstm_layer_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                        restarts, y, gates, c_all, r_all, h_ckpt, c_ckpt, needs, config=None,
                        force_stepped=False, recompute=0):
    """Gradients of one layer (kernels, then GEMMs over dG): dx, dh0, dc0, dw_ih, dw_hh,
    db_ih, db_hh, dw_hr, each None where ``needs`` (same order) says it is not wanted."""
    single = w_hh.dim() == 2
    if single:
        w_hh, h0, c0, w_hr, dh_n, dc_n, r_all = _add_direction_dim(w_hh, h0, c0, w_hr, dh_n, dc_n,
                                                                   r_all)
    from .overlap import backward_chunks_for, overlapped_backward   # overlap.py imports this
    chunks = backward_chunks_for(w_hh.shape[0], recompute, x.shape[0], (dy, dh_n, dc_n))
    if chunks:
        grads = overlapped_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, w_hr, lengths,
                                    restarts, y, gates, c_all, r_all, needs, config,
                                    force_stepped, chunks)
    elif recompute:
        grads = recompute_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   lengths, restarts, h_ckpt, c_ckpt, needs=needs, config=config,
                                   force_stepped=force_stepped, every=recompute)
    else:
        grads = _layer_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, w_hr, lengths,
                                restarts, y, gates, c_all, r_all, needs, config, force_stepped)
    dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = grads
    need_x, need_h0, need_c0, need_wih, need_whh, need_bih, need_bhh, need_whr = needs
    if single:
        dh0, dc0 = dh0[0], dc0[0]
        dw_hh = None if dw_hh is None else dw_hh[0]
        dw_hr = None if dw_hr is None else dw_hr[0]
    return (dx, dh0 if need_h0 else None, dc0 if need_c0 else None, dw_ih, dw_hh,
            *bias_grads(db, need_bih, need_bhh), dw_hr)


def bias_grads(db, need_bih: bool, need_bhh: bool) -> tuple:
    """The gradients of b_ih and b_hh (both db), each in memory of its own: autograd may keep
    an incoming gradient as a parameter's .grad, and two .grad sharing memory would each take
    the other's in-place updates (accumulation, clipping, GradScaler's unscaling)."""
    return (db if need_bih else None,
            (db.clone() if need_bih else db) if need_bhh else None)


def _layer_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, w_hr, lengths, restarts, y,
                    gates, c_all, r_all, needs, config, force_stepped):
    """The backward from every step's saved gates: one reverse-recurrence launch, then GEMMs."""
    T, B, _ = x.shape
    D, _, R = w_hh.shape
    H = c_all.shape[3]
    need_whr = needs[7]
    bias_grad = b_ih is not None and (needs[5] or needs[6])   # (the op sums dG for it)
    dG, dh0, dc0, dh_all, dh_restart, dc_restart, db = direct(
        torch.ops.triton_lstm.recurrence_backward, recurrence_backward_eager,
        dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr, config_to_list(config),
        force_stepped, restarts, c0, True, bias_grad)
    if restarts is not None:
        # The restarts restored (h0, c0): their gradients add to the initial state's.
        dh0 = to_dtype(dh0.to(dh_restart.dtype) + dh_restart, dh0.dtype)
        dc0 = dc0 + dc_restart
    summed = bias_grad and db.numel() > 0       # (under vmap the sum is left to this code)
    dx, dw_ih, dw_hh, db_over_dG = gradients_over_dG(
        dG, x, h0, w_ih, None if summed else b_ih, y, lengths, restarts, R, needs)
    db = to_dtype(db, dG.dtype) if summed else db_over_dG
    dw_hr = None
    if w_hr is not None and need_whr:
        # h_t = r_t W_hr^T: dW_hr = sum_t dh_t^T r_t, with dh_t the total gradient of h_t.
        dw_hr = stacked([layer_matmul(dh_all[d].reshape(T * B, R).t(),
                                      r_all[d].reshape(T * B, H)) for d in range(D)])
    return dx, dh0, to_dtype(dc0, x.dtype), dw_ih, dw_hh, db, dw_hr


def gradients_over_dG(dG, x, h0, w_ih, b_ih, y, lengths, restarts, R: int, needs):
    """The non-recurrent gradients of a layer, GEMMs and a sum over its dG [T, B, D*4H]:
    dx, dw_ih, dw_hh ([D, 4H, R]) and db (both biases'), each None where ``needs`` (as
    lstm_layer_backward's) says it is not wanted. h0 [D, B, R] or None, y the layer's
    output [T, B, D*R]."""
    h_prev = None
    if needs[4]:
        D = y.shape[2] // R
        if lengths is None and restarts is None and y.shape[0] > 1:
            # Full-length rows: h_{t-1} is y one step off at every step but the one that
            # sees h0, so the GEMMs read y where it is, and h0 (if given) in a product of its
            # own (a [T, B, R] copy less: 0.5 µs/step at bf16 B = 512 H = 1024).
            y_d = y.unflatten(-1, (D, R))
            h_prev = []
            for d in range(D):   # steps after the first of this direction, and its first
                if d == 0:
                    later, first, y_before = slice(1, None), slice(0, 1), y_d[:-1, :, 0]
                else:
                    later, first, y_before = slice(None, -1), slice(-1, None), y_d[1:, :, d]
                pairs = [(later, y_before)]
                if h0 is not None:   # first: the large product adds to it in one rounding
                    pairs.insert(0, (first, h0[d].unsqueeze(0)))
                h_prev.append(pairs)
        else:
            h_prev = [previous_hidden(y, h0, lengths, d, R, None if restarts is None else
                                      restarted_in_time_order(restarts, lengths, d))
                      for d in range(D)]
    dx, dw_ih, dw_hh, db = gemms_over_dG(dG, x, h_prev, w_ih, b_ih is not None, needs)
    return dx, dw_ih, dw_hh, None if db is None else to_dtype(db, dG.dtype)


def gemms_over_dG(dG, x, h_prev, w_ih, has_bias: bool, needs):
    """dx, dw_ih, dw_hh ([D, 4H, R]) and db (in the state dtype) over dG [T, B, D*4H], from
    each direction's h_{t-1} (``previous_hidden``, [T, B, R], or a list of (steps, h): h_{t-1}
    of dG's steps ``steps``, a slice, the products summed and the other steps' zero; None
    without dw_hh), for all T steps or for a chunk of them (overlap.py)."""
    T, B, I = x.shape
    need_x, _, _, need_wih, need_whh, need_bih, need_bhh, _ = needs
    G = dG.shape[2]
    dG2 = dG.reshape(T * B, G)
    dx = layer_matmul(dG2, w_ih).reshape(T, B, I) if need_x else None
    dw_ih = layer_matmul(dG2.t(), x.reshape(T * B, I)) if need_wih else None
    dw_hh = None
    if need_whh:
        D = len(h_prev)

        def summed_products(d, pairs):
            total = None
            for steps, h in pairs:
                a, b = dG[steps].reshape(-1, D, G // D)[:, d].t(), h.reshape(-1, h.shape[-1])
                total = layer_matmul(a, b) if total is None else layer_matmul_plus(total, a, b)
            return total

        dw_hh = stacked([summed_products(d, [(slice(None), h)] if torch.is_tensor(h) else h)
                         for d, h in enumerate(h_prev)])
    db = None
    if has_bias and (need_bih or need_bhh):
        db = bias_gradient(dG2)
    return dx, dw_ih, dw_hh, db


class LSTMBackwardFunction(torch.autograd.Function):
    """The backward of LSTMFunction as a differentiable Function (for second derivatives).

    Forward: ``lstm_layer_backward`` (the kernels). Backward: the vector-Jacobian
    product of the reference's gradient map, i.e. the reference differentiated twice.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, restarts, y,
                gates, c_all, r_all, h_ckpt, c_ckpt, needs, config, force_stepped, recompute):
        return lstm_layer_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   lengths, restarts, y, gates, c_all, r_all, h_ckpt, c_ckpt,
                                   needs, config, force_stepped, recompute)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs[:13])   # dy .. restarts

    @staticmethod
    def backward(ctx, *grad_grads):
        (dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
         restarts) = ctx.saved_tensors
        cotangents = (dy, dh_n, dc_n)
        primals = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        # Which of the first-order gradients were asked for, and which tensors exist at all.
        wanted = [k for k, (g, p) in enumerate(zip(grad_grads, primals))
                  if g is not None and p is not None]
        inputs = cotangents + primals
        present = [k for k, t in enumerate(inputs) if t is not None]
        num_inputs = len(ctx.needs_input_grad)   # forward's arguments, one gradient each

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
                return lstm_layer_reference(xx, hh0, cc0, wih, whh, bih, bhh, lengths, whr,
                                            restarts)

            outs, vjp = torch.func.vjp(layer, *(prim[k] for k in differentiable))
            grads = vjp(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outs, cot)))
            by_input = dict(zip(differentiable, grads))
            return tuple(by_input[k] for k in wanted)

        if not wanted:
            return (None,) * num_inputs
        _, vjp = torch.func.vjp(first_order, *(inputs[k] for k in present))
        grads = vjp(tuple(grad_grads[k] for k in wanted))
        result = [None] * num_inputs
        for k, g in zip(present, grads):
            result[k] = g
        return tuple(result)


# -- stacked layers as one wavefront ---------------------------------------------------------

def lstm_stack_wavefront(x, h0, c0, weights, lengths=None, config=None, force_stepped=False,
                         keep=None):
    """A unidirectional stack of L >= 2 layers without projection in one wavefront launch
    (kernels/wavefront.py): y [T, B, H] (the top layer's output), h_n, c_n [L, B, H].

    x [T, B, I]; h0, c0 [L, B, H] or both None; weights: per layer (w_ih, w_hh, b_ih, b_hh),
    the biases None without bias; lengths, config (the tile of both wavefronts; None: the
    heuristic's), force_stepped as ``LSTMFunction``; keep: dropout between layers as masks
    [L-1, T, B, H] in x's dtype (``dropout_masks``), or None. Runs WavefrontFunction when
    a gradient is needed, the op alone otherwise, the reference under forward-mode AD.
    """
    flat = tuple(t for layer in weights for t in layer)
    tensors = (x, h0, c0, *flat)
    if _forward_ad_active(tensors):
        return _stack_reference(x, h0, c0, flat, lengths, keep)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, h_n, c_n, *_ = applied(WavefrontFunction, x, h0, c0, lengths, config,
                                  force_stepped, keep, *flat)
        return y, h_n, c_n
    h_all, h_n, c_n, *_ = torch.ops.triton_lstm.wavefront_forward(
        *_wavefront_operands(x, flat), h0, c0, lengths, False, config_to_list(config),
        force_stepped, keep)
    return h_all[-1, 1:], h_n, c_n.to(x.dtype)


def dropout_masks(num_layers: int, x: torch.Tensor, hidden_size: int, p: float) -> torch.Tensor:
    """Dropout between the layers of a stack over x [T, B, I], drawn up front as F.dropout
    draws it: [L-1, T, B, H] in x's dtype, 0 where dropped (probability p), else 1 / (1 - p)."""
    T, B, _ = x.shape
    keep = torch.empty(num_layers - 1, T, B, hidden_size, dtype=x.dtype, device=x.device)
    if p >= 1:
        return keep.zero_()
    return keep.bernoulli_(1 - p).div_(1 - p)


def _wavefront_operands(x, flat):
    """gx (layer 0's input projection), the upper layers' W_ih, their biases b_ih + b_hh
    [L-1, 4H] in the state dtype (zeros without bias), and every W_hh."""
    num_layers = len(flat) // 4
    w_ih0, _, b_ih0, b_hh0 = flat[:4]
    w_ih, w_hh = _stacked_weights(flat)
    acc = state_dtype(x.dtype)
    if b_ih0 is None:
        bias = w_hh.new_zeros((num_layers - 1, w_hh.shape[1]), dtype=acc)
    else:
        bias = torch.stack([flat[4 * k + 2].to(acc) + flat[4 * k + 3].to(acc)
                            for k in range(1, num_layers)])
    return input_projection(x, w_ih0, b_ih0, b_hh0), w_ih, bias, w_hh


def _stacked_weights(flat):
    """W_ih of layers 1 .. L-1 [L-1, 4H, H] and every W_hh [L, 4H, H], as the kernels take
    them."""
    num_layers = len(flat) // 4
    return (torch.stack([flat[4 * k] for k in range(1, num_layers)]),
            torch.stack([flat[4 * k + 1] for k in range(num_layers)]))


def _stack_reference(x, h0, c0, flat, lengths, keep=None):
    """The same stack layer by layer in plain PyTorch (reference.py): y, h_n, c_n."""
    h_n, c_n = [], []
    num_layers = len(flat) // 4
    for k in range(num_layers):
        if k > 0 and keep is not None:
            x = x * keep[k - 1]
        x, h, c = lstm_layer_reference(x, None if h0 is None else h0[k],
                                       None if c0 is None else c0[k], *flat[4 * k:4 * k + 4],
                                       lengths)
        h_n.append(h)
        c_n.append(c)
    return x, torch.stack(h_n), torch.stack(c_n)


class WavefrontFunction(torch.autograd.Function):
    """A unidirectional stack without projection, forward and backward each as one wavefront
    (the backward's reverse recurrence gives every layer's dG; then each layer's GEMMs).

    Args: x, h0, c0, lengths, config, force_stepped, keep as ``lstm_stack_wavefront``, then
        per layer w_ih, w_hh, b_ih, b_hh (the biases None without bias).
    Returns: y [T, B, H], h_n, c_n [L, B, H], then what the backward needs, marked
        non-differentiable: h_all [L, T+1, B, H], gates [L, T, B, 4H], c_all [L, T, B, H],
        x_all [L-1, T, B, H] (the upper layers' dropped inputs; [0]-shaped without keep).

    When the backward is itself differentiated it differentiates the reference stack.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h0, c0, lengths, config, force_stepped, keep, *weights):
        h_all, h_n, c_n, gates, c_all, x_all = torch.ops.triton_lstm.wavefront_forward(
            *_wavefront_operands(x, weights), h0, c0, lengths, True, config_to_list(config),
            force_stepped, keep)
        # y is its own tensor, not a view of the saved h_all.
        return h_all[-1, 1:].clone(), h_n, to_dtype(c_n, x.dtype), h_all, gates, c_all, x_all

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, lengths, config, force_stepped, keep, *weights = inputs
        _, _, _, h_all, gates, c_all, x_all = output
        ctx.mark_non_differentiable(h_all, gates, c_all, x_all)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, lengths, keep, h_all, gates, c_all, x_all, *weights)
        ctx.config, ctx.force_stepped = config, force_stepped

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *_saved_grads):
        x, h0, c0, lengths, keep, h_all, gates, c_all, x_all, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            grads = _stack_grads_by_reference(dy, dh_n, dc_n, x, h0, c0, lengths, keep, weights,
                                              needs)
        else:
            grads = _stack_backward(dy, dh_n, dc_n, x, h0, c0, lengths, keep, h_all, gates,
                                    c_all, x_all, weights, needs, ctx.config, ctx.force_stepped)
        dx, dh0, dc0, *dweights = grads
        return (dx, dh0, dc0, None, None, None, None, *dweights)


def _stack_backward(dy, dh_n, dc_n, x, h0, c0, lengths, keep, h_all, gates, c_all, x_all,
                    weights, needs, config, force_stepped):
    """dx, dh0, dc0, then per layer dw_ih, dw_hh, db_ih, db_hh: the reverse recurrence of all
    layers as one wavefront (every layer's dG), then each layer's GEMMs over its dG."""
    num_layers = len(weights) // 4
    need_x, need_h0, need_c0 = needs[:3]
    w_ih, w_hh = _stacked_weights(weights)
    dgates, dh0, dc0 = torch.ops.triton_lstm.wavefront_backward(
        dy, dh_n, dc_n, gates, c_all, c0, lengths, w_ih, w_hh, config_to_list(config),
        force_stepped, keep)
    # Each layer's input: x, then the output of the layer below (dropped, with keep).
    inputs = [x] + [h_all[k, 1:] if keep is None else x_all[k] for k in range(num_layers - 1)]
    dweights = []
    for k in range(num_layers):
        w_ih_k, _, b_ih_k, _ = weights[4 * k:4 * k + 4]
        need_wih, need_whh, need_bih, need_bhh = needs[7 + 4 * k:11 + 4 * k]
        layer_needs = (k == 0 and need_x, False, False, need_wih, need_whh, need_bih, need_bhh,
                       False)
        dx_k, dw_ih, dw_hh, db = gradients_over_dG(
            dgates[k], inputs[k], None if h0 is None else h0[k:k + 1], w_ih_k, b_ih_k,
            h_all[k, 1:], lengths, None, w_hh.shape[2], layer_needs)
        if k == 0:
            dx = dx_k
        dweights += [dw_ih, None if dw_hh is None else dw_hh[0],
                     *bias_grads(db, need_bih, need_bhh)]
    return (dx, dh0 if need_h0 else None, dc0.to(x.dtype) if need_c0 else None, *dweights)


def _stack_grads_by_reference(dy, dh_n, dc_n, x, h0, c0, lengths, keep, weights, needs):
    """The same gradients through the reference stack, themselves differentiable."""
    primals = (x, h0, c0, *weights)
    # needs: x, h0, c0, lengths, config, force_stepped, keep, then the weights.
    wanted = [k for k, t in enumerate(primals) if t is not None and needs[k if k < 3 else k + 4]]
    with torch.enable_grad():
        outputs = _stack_reference(x, h0, c0, weights, lengths, keep)
        pairs = [(o, g) for o, g in zip(outputs, (dy, dh_n, dc_n)) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], [primals[k] for k in wanted],
                                    [g for _, g in pairs], create_graph=True, allow_unused=True)
    result = [None] * len(primals)
    for k, g in zip(wanted, grads):
        result[k] = g if g is not None else torch.zeros_like(primals[k])
    return result


# -- one step (streaming inference) ------------------------------------------------------------

from .reference import lstm_step_reference  # noqa: E402  (this section's own import)


def lstm_cell_step(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None):
    """One step of one layer on the step kernel: r [B, H] (o * tanh(c_t), input dtype), c_t [B, H].

    Arguments as ``StepFunction``; c_t is in the state dtype (fp32, fp64 for fp64).
    Runs StepFunction when a gradient is needed, the op alone (saving nothing)
    otherwise, and the plain-PyTorch reference under forward-mode AD.

    Example:
        >>> r, c = lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    """
    tensors = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    if _forward_ad_active(tensors):
        r, c_new, _ = lstm_step_reference(*tensors)
        return r, c_new
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        r, c_new, _ = applied(StepFunction, *tensors)
        return r, c_new
    r, c_new, _ = direct(torch.ops.triton_lstm.step_forward, step_forward_eager,
                         *tensors, False, None)
    return r, c_new


class StepFunction(torch.autograd.Function):
    """One step of one layer (``triton_lstm::step_forward``) with a plain-PyTorch backward.

    Args: x [B, I]; h [B, R] and c [B, H] (any float dtype), or both None for zeros;
        w_ih [4H, I], w_hh [4H, R] (x's dtype); b_ih, b_hh [4H] or both None.
    Returns: r [B, H] (o * tanh(c_t), x's dtype), c_t [B, H] (state dtype) and the
        activated gates [B, 4H] (state dtype, non-differentiable, saved for the backward).

    The backward of one step is a few small pointwise ops and GEMMs over the saved
    gates: no kernel. When it is itself differentiated (``create_graph=True``) it
    recomputes the gates with the reference, so that second derivatives are exact.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return direct(torch.ops.triton_lstm.step_forward, step_forward_eager,
                      x, h, c, w_ih, w_hh, b_ih, b_hh, True, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, c_new, gates = output
        ctx.mark_non_differentiable(gates)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, c_new, gates)

    @staticmethod
    def backward(ctx, dr, dc_new, _gates):
        x, h, c, w_ih, w_hh, b_ih, b_hh, c_new, gates = ctx.saved_tensors
        if torch.is_grad_enabled():
            # The gradient will be differentiated: gates and c_t as functions of the inputs.
            _, c_new, gates = lstm_step_reference(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return lstm_step_backward(dr, dc_new, x, h, c, w_ih, w_hh, b_ih, gates, c_new,
                                  ctx.needs_input_grad)


def lstm_step_backward(dr, dc_new, x, h, c, w_ih, w_hh, b_ih, gates, c_new, needs):
    """Gradients of one step (DESIGN.md §3 for T = 1) from its gates [B, 4H] and c_t [B, H].

    dr [B, H] (gradient of r = o * tanh(c_t)) and dc_new [B, H] (of c_t), either None.
    Returns dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, each None where ``needs`` (same
    order) says it is not wanted; dw_hh is zeros without a previous state.
    """
    if dr is None and dc_new is None:
        return (None,) * 7
    acc = gates.dtype
    i, f, g, o = gates.chunk(4, dim=1)
    dc = torch.zeros_like(c_new) if dc_new is None else dc_new.to(acc)
    if dr is None:
        dG_o = torch.zeros_like(o)
    else:
        dr = dr.to(acc)
        tanh_c = torch.tanh(c_new)
        dc = dc + dr * o * (1 - tanh_c * tanh_c)
        dG_o = dr * tanh_c * o * (1 - o)
    c_prev = torch.zeros_like(c_new) if c is None else c.to(acc)
    dG = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), dG_o],
                   dim=1)
    dG_w = dG.to(w_ih.dtype)     # the GEMMs run in the weights' dtype, as the layer's backward
    need_x, need_h, need_c, need_wih, need_whh, need_bih, need_bhh = needs
    dx = dG_w @ w_ih if need_x else None
    dh = dG_w @ w_hh if (need_h and h is not None) else None
    dc_prev = (dc * f).to(c.dtype) if (need_c and c is not None) else None
    dw_ih = dG_w.t() @ x if need_wih else None
    dw_hh = None
    if need_whh:
        dw_hh = torch.zeros_like(w_hh) if h is None else dG_w.t() @ h
    db = dG.sum(0).to(b_ih.dtype) if (b_ih is not None and (need_bih or need_bhh)) else None
    return (dx, dh, dc_prev, dw_ih, dw_hh, *bias_grads(db, need_bih, need_bhh))


for _function in (LSTMFunction, WavefrontFunction, StepFunction):
    _function.eager = eager_twin(_function)
