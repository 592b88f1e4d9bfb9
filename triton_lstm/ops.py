"""The recurrences as PyTorch custom ops, so that compilers and transforms see them.

``triton_lstm::recurrence_forward`` and ``triton_lstm::recurrence_backward``
wrap the kernel launchers (kernels/forward.py, kernels/backward.py). Everything
decided at run time (tile config, co-residency check and warm-up compile,
barrier counters, launch counting) happens inside the op body, so
``torch.compile`` and ``torch.export`` only ever see the op and its fake
(shape-only) implementation. The input GEMM and the weight-gradient GEMMs are
not in the recurrence ops: ``layer_matmul`` runs them as ordinary torch ops that
autograd and Inductor see, or, for fp32 with ``dispatch.fp32_gemms = "triton"``,
as ``triton_lstm::matmul`` (kernels/gemm.py at nn.LSTM's tf32 rule).

Custom ops cannot return None, so absent outputs (the saved activations when
nothing is saved, ``r_all`` / ``dh_all`` without a projection) are empty
tensors of shape [0].

``torch.vmap`` over the ops folds the mapped dimension into the batch (rows of
an LSTM are independent); where the weights themselves are mapped it runs the
op once per slice.

Plain eager code, which nothing records or transforms, calls the ops' bodies
directly (``direct``): there the dispatch of a custom op is only host time.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.library import custom_op, register_fake, register_vmap

from .dispatch import KernelConfig, dot_precision, gemms_in_triton, state_dtype
from .kernels.backward import lstm_backward
from .kernels.forward import lstm_forward
from .kernels.gemm import matmul as gemm_matmul
from .kernels.step import StepConfig, lstm_step
from .kernels.wavefront import lstm_wavefront, lstm_wavefront_backward


def config_to_list(config: Optional[KernelConfig]) -> Optional[list[int]]:
    """A KernelConfig as the int list a custom op takes (None: let the dispatcher pick)."""
    return None if config is None else [int(v) for v in dataclasses.astuple(config)]


def config_from_list(values: Optional[list[int]]) -> Optional[KernelConfig]:
    if values is None:
        return None
    fields = dataclasses.fields(KernelConfig)
    return KernelConfig(*(bool(v) if isinstance(f.default, bool) else v
                          for f, v in zip(fields, values, strict=True)))


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype) if t is None else t


def plain_eager(args) -> bool:
    """Whether a call on ``args`` is plain eager code that records nothing: real tensors,
    gradients off (inside a Function's forward or backward, or no_grad), and no compiler,
    torch.func transform or dispatch mode watching. There an op's body runs directly
    (``direct``): a custom op's dispatch is ~10 µs of Python a call (on a CPU), and nothing
    needs the op. (The batched tensors of gradcheck's legacy vmap are torch.Tensor too.)"""
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0
            and all(type(a) in _PLAIN and not torch._C._functorch.is_legacy_batchedtensor(a)
                    for a in args if isinstance(a, torch.Tensor)))


_PLAIN = (torch.Tensor, torch.nn.Parameter)     # not FakeTensor, FunctionalTensor, subclasses


def direct(op, body, *args):
    """op(*args), or body(*args) where the call is plain eager code."""
    return body(*args) if plain_eager(args) else op(*args)


@custom_op("triton_lstm::recurrence_forward", mutates_args=())
def recurrence_forward(
    gx: torch.Tensor, w_hh: torch.Tensor, h0: Optional[torch.Tensor], c0: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor], w_hr: Optional[torch.Tensor], save: bool,
    config: Optional[list[int]], force_stepped: bool, restarts: Optional[torch.Tensor] = None,
    h_restart: Optional[torch.Tensor] = None, c_restart: Optional[torch.Tensor] = None,
    ckpt_every: int = 0, reverse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """The forward recurrence of one layer: ``kernels.forward.lstm_forward``.

    gx [T, B, D*4H], w_hh [D, 4H, R], h0 [D, B, R] / c0 [D, B, H] or None,
    lengths [B] int32 or None, w_hr [D, R, H] or None, restarts [D, T, B] int8 or
    None with the state they restore, h_restart [D, B, R] / c_restart [D, B, H] or
    None (zeros). Returns y [T, B, D*R], h_n [D, B, R], c_n [D, B, H] (state dtype),
    when ``save`` gates [D, T, B, 4H], c_all [D, T, B, H] (state dtype) and r_all
    [D, T, B, H] with a projection, and with ``ckpt_every`` the checkpoints h_ckpt
    [D, NC, B, R] and c_ckpt [D, NC, B, H]; [0]-shaped where absent.
    """
    return recurrence_forward_eager(gx, w_hh, h0, c0, lengths, w_hr, save, config, force_stepped,
                                    restarts, h_restart, c_restart, ckpt_every, reverse)


def recurrence_forward_eager(gx, w_hh, h0, c0, lengths, w_hr, save, config, force_stepped,
                             restarts=None, h_restart=None, c_restart=None, ckpt_every=0,
                             reverse=True, step_chunks=None):
    """The body of ``recurrence_forward``, which eager code can also call with
    ``step_chunks`` (``lstm_forward``'s; overlap.py), an iterable no op schema carries."""
    h0, c0, w_hr, h_restart, c_restart = (None if t is None else t.contiguous()
                                          for t in (h0, c0, w_hr, h_restart, c_restart))
    y, h_n, c_n, gates, c_all, r_all, h_ckpt, c_ckpt = lstm_forward(
        gx.contiguous(), w_hh.contiguous(), h0, c0, lengths, w_hr, save=save,
        config=config_from_list(config), force_stepped=force_stepped,
        restarts=None if restarts is None else restarts.contiguous(), h_restart=h_restart,
        c_restart=c_restart, ckpt_every=ckpt_every, reverse=reverse, step_chunks=step_chunks)
    acc = c_n.dtype
    return (y, h_n, c_n, _or_empty(gates, gx, acc), _or_empty(c_all, gx, acc),
            _or_empty(r_all if save else None, gx), _or_empty(h_ckpt, gx),
            _or_empty(c_ckpt, gx, acc))


@register_fake("triton_lstm::recurrence_forward")
def _recurrence_forward_fake(gx, w_hh, h0, c0, lengths, w_hr, save, config, force_stepped,
                             restarts=None, h_restart=None, c_restart=None, ckpt_every=0,
                             reverse=True):
    T, B, G = gx.shape
    D, _, R = w_hh.shape
    H = G // (4 * D)
    acc = state_dtype(gx.dtype)

    def maybe(present, *shape, dtype=None):
        return gx.new_empty(shape if present else (0,), dtype=dtype)

    num_ckpt = (T + ckpt_every - 1) // ckpt_every if ckpt_every > 0 else 0
    return (gx.new_empty(T, B, D * R), gx.new_empty(D, B, R), gx.new_empty((D, B, H), dtype=acc),
            maybe(save, D, T, B, 4 * H, dtype=acc), maybe(save, D, T, B, H, dtype=acc),
            maybe(save and w_hr is not None, D, T, B, H),
            maybe(ckpt_every > 0, D, num_ckpt, B, R), maybe(ckpt_every > 0, D, num_ckpt, B, H,
                                                            dtype=acc))


@custom_op("triton_lstm::recurrence_backward", mutates_args=())
def recurrence_backward(
    dy: Optional[torch.Tensor], dh_n: Optional[torch.Tensor], dc_n: Optional[torch.Tensor],
    gates: torch.Tensor, c_all: torch.Tensor, c0: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor], w_hh: torch.Tensor, w_hr: Optional[torch.Tensor],
    config: Optional[list[int]], force_stepped: bool, restarts: Optional[torch.Tensor] = None,
    c_restart: Optional[torch.Tensor] = None, reverse: bool = True, bias_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """The reverse recurrence of one layer: ``kernels.backward.lstm_backward``.

    Returns dG [T, B, D*4H] (w_hh's dtype), dh0 [D, B, R], dc0 [D, B, H] (state
    dtype), with a projection dh_all [D, T, B, R] (the total gradient of each h_t),
    with restarts the gradients of the restart state, dh_restart [D, B, R] and
    dc_restart [D, B, H] (state dtype), and with ``bias_grad`` the bias gradient, dG
    summed over steps and rows, db [D*4H] (state dtype); [0]-shaped where absent.
    """
    return recurrence_backward_eager(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr,
                                     config, force_stepped, restarts, c_restart, reverse,
                                     bias_grad)


def recurrence_backward_eager(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr, config,
                              force_stepped, restarts=None, c_restart=None, reverse=True,
                              bias_grad=False):
    """The body of ``recurrence_backward``."""
    c0, w_hr, c_restart = (None if t is None else t.contiguous() for t in (c0, w_hr, c_restart))
    dG, dh0, dc0, dh_all, dh_restart, dc_restart, db = lstm_backward(
        dy, dh_n, dc_n, gates.contiguous(), c_all.contiguous(), c0, lengths, w_hh.contiguous(),
        w_hr, config=config_from_list(config), force_stepped=force_stepped,
        restarts=None if restarts is None else restarts.contiguous(), c_restart=c_restart,
        reverse=reverse, bias_grad=bias_grad)
    if bias_grad and db is None:      # the kernel left the sum to torch
        db = bias_gradient(dG)
    return (dG, dh0, dc0, _or_empty(dh_all, dG), _or_empty(dh_restart, dG, dc0.dtype),
            _or_empty(dc_restart, dG, dc0.dtype), _or_empty(db, dG, dc0.dtype))


def bias_gradient(dG: torch.Tensor) -> torch.Tensor:
    """db, both biases' gradient: dG ([T, B, D*4H], or its rows) summed over every step and
    row, in the state dtype."""
    return dG.flatten(0, -2).sum(0, dtype=state_dtype(dG.dtype))


@register_fake("triton_lstm::recurrence_backward")
def _recurrence_backward_fake(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr, config,
                              force_stepped, restarts=None, c_restart=None, reverse=True,
                              bias_grad=False):
    D, T, B, G = gates.shape
    H = G // 4
    R = w_hh.shape[2]
    acc = state_dtype(w_hh.dtype)
    dh_all = w_hh.new_empty(D, T, B, R) if w_hr is not None else w_hh.new_empty(0)
    has_restarts = restarts is not None
    return (w_hh.new_empty(T, B, D * 4 * H), w_hh.new_empty(D, B, R),
            w_hh.new_empty((D, B, H), dtype=acc), dh_all,
            w_hh.new_empty((D, B, R) if has_restarts else (0,), dtype=acc),
            w_hh.new_empty((D, B, H) if has_restarts else (0,), dtype=acc),
            w_hh.new_empty((D * 4 * H,) if bias_grad else (0,), dtype=acc))


@custom_op("triton_lstm::wavefront_forward", mutates_args=())
def wavefront_forward(
    gx: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor, w_hh: torch.Tensor,
    h0: Optional[torch.Tensor], c0: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
    save: bool, config: Optional[list[int]], force_stepped: bool,
    keep: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence of a unidirectional stack as one wavefront: ``kernels.wavefront``.

    gx [T, B, 4H] (layer 0's input projection), w_ih [L-1, 4H, H], bias [L-1, 4H] (state
    dtype), w_hh [L, 4H, H], h0 / c0 [L, B, H] or None, lengths [B] int32 or None, keep
    [L-1, T, B, H] (dropout between layers) or None. Returns h_all [L, T+1, B, H] (slot
    0 h0, slot t+1 each layer's h_t), h_n [L, B, H], c_n [L, B, H] (state dtype), when
    ``save`` gates [L, T, B, 4H] and c_all [L, T, B, H] (state dtype), with keep x_all
    [L-1, T, B, H] (the dropped outputs); [0]-shaped where absent.
    """
    h_all, h_n, c_n, gates, c_all, x_all = lstm_wavefront(
        gx.contiguous(), w_ih.contiguous(), bias.contiguous(), w_hh.contiguous(), h0, c0,
        lengths, None if keep is None else keep.contiguous(), save=save,
        config=config_from_list(config), force_stepped=force_stepped)
    return (h_all, h_n, c_n, _or_empty(gates, gx, c_n.dtype), _or_empty(c_all, gx, c_n.dtype),
            _or_empty(x_all, gx))


@register_fake("triton_lstm::wavefront_forward")
def _wavefront_forward_fake(gx, w_ih, bias, w_hh, h0, c0, lengths, save, config, force_stepped,
                            keep=None):
    T, B, G = gx.shape
    L, H = w_hh.shape[0], G // 4
    acc = state_dtype(gx.dtype)
    saved = (L, T, B) if save else (0,)
    return (gx.new_empty(L, T + 1, B, H), gx.new_empty(L, B, H), gx.new_empty((L, B, H), dtype=acc),
            gx.new_empty(saved + ((4 * H,) if save else ()), dtype=acc),
            gx.new_empty(saved + ((H,) if save else ()), dtype=acc),
            gx.new_empty((L - 1, T, B, H) if keep is not None else (0,)))


@custom_op("triton_lstm::wavefront_backward", mutates_args=())
def wavefront_backward(
    dy: Optional[torch.Tensor], dh_n: Optional[torch.Tensor], dc_n: Optional[torch.Tensor],
    gates: torch.Tensor, c_all: torch.Tensor, c0: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
    config: Optional[list[int]], force_stepped: bool, keep: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reverse recurrence of a wavefront stack: ``kernels.wavefront.lstm_wavefront_backward``.

    dy [T, B, H] or None, dh_n / dc_n [L, B, H] or None, gates / c_all as
    ``wavefront_forward`` saved them, c0 [L, B, H] or None, lengths [B] int32 or None,
    w_ih [L-1, 4H, H], w_hh [L, 4H, H], keep as given to the forward or None. Returns
    every layer's dG [L, T, B, 4H] (w_hh's dtype), dh0 [L, B, H] and dc0 [L, B, H]
    (state dtype).
    """
    return lstm_wavefront_backward(
        dy, dh_n, dc_n, gates.contiguous(), c_all.contiguous(), c0, lengths, w_ih.contiguous(),
        w_hh.contiguous(), None if keep is None else keep.contiguous(),
        config=config_from_list(config), force_stepped=force_stepped)


@register_fake("triton_lstm::wavefront_backward")
def _wavefront_backward_fake(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_ih, w_hh, config,
                             force_stepped, keep=None):
    L, T, B, G = gates.shape
    H = G // 4
    return (w_hh.new_empty(L, T, B, G), w_hh.new_empty(L, B, H),
            w_hh.new_empty((L, B, H), dtype=state_dtype(w_hh.dtype)))


# -- torch.vmap ------------------------------------------------------------------------------

def _fold_into_batch(t, in_dim, batch_axis: int, size: int):
    """A tensor with a mapped dim (in_dim) or none, as one with `size` times the batch rows."""
    if t is None:
        return None
    if in_dim is None:
        t = t.unsqueeze(batch_axis).expand(*t.shape[:batch_axis], size, *t.shape[batch_axis:])
    else:
        t = t.movedim(in_dim, batch_axis)
    return t.flatten(batch_axis, batch_axis + 1)


def _unfold_from_batch(t, batch_axis: int, size: int):
    if t.numel() == 0 and t.dim() == 1:     # an absent output stays unmapped
        return t, None
    return t.unflatten(batch_axis, (size, -1)), batch_axis


def _vmap_rule(op, batch_axes: tuple, out_batch_axes: tuple, weights: tuple):
    """A vmap rule for `op`: batch_axes gives each tensor argument's batch axis (None: a weight)."""

    def rule(info, in_dims, *args):
        if any(in_dims[k] is not None for k in weights):
            # Mapped weights: one call per slice, stacked.
            per_slice = []
            for i in range(info.batch_size):
                sliced = [a if (d is None or a is None) else a.select(d, i)
                          for a, d in zip(args, in_dims)]
                per_slice.append(op(*sliced))
            outs = []
            for results in zip(*per_slice):
                empty = results[0].numel() == 0 and results[0].dim() == 1
                outs.append((results[0], None) if empty else (torch.stack(results), 0))
            return tuple(o for o, _ in outs), tuple(d for _, d in outs)
        folded = [a if axis is None else _fold_into_batch(a, d, axis, info.batch_size)
                  for a, d, axis in zip(args, in_dims, batch_axes)]
        results = op(*folded)
        outs = [_unfold_from_batch(r, axis, info.batch_size)
                for r, axis in zip(results, out_batch_axes)]
        return tuple(o for o, _ in outs), tuple(d for _, d in outs)

    return rule


# Argument order as in the op signatures; None marks weights and non-tensor arguments.
register_vmap("triton_lstm::recurrence_forward", _vmap_rule(
    recurrence_forward,
    # gx, w_hh, h0, c0, lengths, w_hr, save, config, force_stepped, restarts, h_restart,
    # c_restart, ckpt_every, reverse
    batch_axes=(1, None, 1, 1, 0, None, None, None, None, 2, 1, 1, None, None),
    # y, h_n, c_n, gates, c_all, r_all, h_ckpt, c_ckpt
    out_batch_axes=(1, 1, 1, 2, 2, 2, 2, 2),
    weights=(1, 5)))
_recurrence_backward_vmap = _vmap_rule(
    recurrence_backward,
    # dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr, config, force_stepped, restarts,
    # c_restart, reverse, bias_grad
    batch_axes=(1, 1, 1, 2, 2, 1, 0, None, None, None, None, 2, 1, None, None),
    # dG, dh0, dc0, dh_all, dh_restart, dc_restart, db
    out_batch_axes=(1, 1, 1, 2, 1, 1, None),
    weights=(7, 8))


@register_vmap("triton_lstm::recurrence_backward")
def _recurrence_backward_vmap_rule(info, in_dims, *args):
    """The rule above without the bias gradient: folded into the batch, the mapped rows
    would share one sum. It comes back [0]-shaped, and the caller sums the mapped dG."""
    args = list(args)
    if len(args) > 14:
        args[14] = False
    return _recurrence_backward_vmap(info, in_dims, *args)

register_vmap("triton_lstm::wavefront_forward", _vmap_rule(
    wavefront_forward,
    # gx, w_ih, bias, w_hh, h0, c0, lengths, save, config, force_stepped, keep
    batch_axes=(1, None, None, None, 1, 1, 0, None, None, None, 2),
    out_batch_axes=(2, 1, 1, 2, 2, 2),      # h_all, h_n, c_n, gates, c_all, x_all
    weights=(1, 2, 3)))
register_vmap("triton_lstm::wavefront_backward", _vmap_rule(
    wavefront_backward,
    # dy, dh_n, dc_n, gates, c_all, c0, lengths, w_ih, w_hh, config, force_stepped, keep
    batch_axes=(1, 1, 1, 2, 2, 1, 0, None, None, None, None, 2),
    out_batch_axes=(2, 1, 1),               # dgates, dh0, dc0
    weights=(7, 8)))

# -- a layer's GEMMs -------------------------------------------------------------------------

@custom_op("triton_lstm::matmul", mutates_args=())
def matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor],
           precision: str) -> torch.Tensor:
    """a [M, K] @ b [K, N] (+ bias [N]) in kernels/gemm.py, dot input precision `precision`."""
    return gemm_matmul(a, b, bias, precision=precision)


@register_fake("triton_lstm::matmul")
def _matmul_fake(a, b, bias, precision):
    return a.new_empty(a.shape[0], b.shape[1])


def _matmul_vmap(info, in_dims, a, b, bias, precision):
    a_dim, b_dim, bias_dim, _ = in_dims
    if b_dim is None and bias_dim is None:
        # Only a is mapped: its slices are more rows of one GEMM.
        a = a.movedim(a_dim, 0)
        out = matmul(a.flatten(0, 1), b, bias, precision)
        return out.unflatten(0, (info.batch_size, -1)), 0
    slices = [matmul(a if a_dim is None else a.select(a_dim, i),
                     b if b_dim is None else b.select(b_dim, i),
                     bias if bias_dim is None else bias.select(bias_dim, i), precision)
              for i in range(info.batch_size)]
    return torch.stack(slices), 0


register_vmap("triton_lstm::matmul", _matmul_vmap)


def layer_matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b (+ bias) for a layer's GEMMs: torch's, or kernels/gemm.py in tf32 where
    ``dispatch.gemms_in_triton`` says so (fp32, opt-in). ``out``: written in place, in eager
    code only (an op returns new tensors)."""
    if gemms_in_triton(a.dtype, a.device):
        precision = dot_precision(a.dtype, a.device)
        if out is not None:
            return gemm_matmul(a, b, bias, precision=precision, out=out)
        return torch.ops.triton_lstm.matmul(a, b, bias, precision)
    return torch.mm(a, b, out=out) if bias is None else torch.addmm(bias, a, b, out=out)


def layer_matmul_plus(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """c + a @ b for a layer's GEMMs (c [M, N]): one GEMM that rounds once where torch runs it
    (addmm), else layer_matmul's product and an add."""
    if gemms_in_triton(a.dtype, a.device):
        return layer_matmul(a, b) + c
    return torch.addmm(c, a, b)


# -- one step (streaming inference) -----------------------------------------------------------

@custom_op("triton_lstm::step_forward", mutates_args=())
def step_forward(
    x: torch.Tensor, h: Optional[torch.Tensor], c: Optional[torch.Tensor], w_ih: torch.Tensor,
    w_hh: torch.Tensor, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor], save: bool,
    config: Optional[list[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of one layer in one launch: ``kernels.step.lstm_step``.

    x [B, I], h [B, R] and c [B, H] (or both None: zeros), w_ih [4H, I], w_hh [4H, R],
    b_ih / b_hh [4H] or None; config a ``StepConfig.as_list()`` or None (heuristic).
    Returns r [B, H] (o * tanh(c_t), input dtype), c_t [B, H] (state dtype) and, when
    ``save``, the activated gates [B, 4H] (state dtype); [0]-shaped otherwise.
    """
    return step_forward_eager(x, h, c, w_ih, w_hh, b_ih, b_hh, save, config)


def step_forward_eager(x, h, c, w_ih, w_hh, b_ih, b_hh, save, config):
    """The body of ``step_forward``."""
    r, c_new, gates = lstm_step(
        x.contiguous(), None if h is None else h.contiguous(),
        None if c is None else c.contiguous(), w_ih.contiguous(), w_hh.contiguous(),
        None if b_ih is None else b_ih.contiguous(), None if b_hh is None else b_hh.contiguous(),
        save=save, config=None if config is None else StepConfig.from_list(config))
    return r, c_new, _or_empty(gates, x, c_new.dtype)


@register_fake("triton_lstm::step_forward")
def _step_forward_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, save, config):
    B = x.shape[0]
    H = w_hh.shape[0] // 4
    acc = state_dtype(x.dtype)
    gates = x.new_empty((B, 4 * H), dtype=acc) if save else x.new_empty(0, dtype=acc)
    return x.new_empty(B, H), x.new_empty((B, H), dtype=acc), gates


register_vmap("triton_lstm::step_forward", _vmap_rule(
    step_forward,
    batch_axes=(0, 0, 0, None, None, None, None, None, None),   # x, h, c, w_ih, w_hh, b_ih, b_hh
    out_batch_axes=(0, 0, 0),                                   # r, c_t, gates
    weights=(3, 4, 5, 6)))
