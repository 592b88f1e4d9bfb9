"""The recurrences as PyTorch custom ops, so that compilers and transforms see them.

``triton_lstm::recurrence_forward`` and ``triton_lstm::recurrence_backward``
wrap the kernel launchers (kernels/forward.py, kernels/backward.py). Everything
decided at run time (tile config, co-residency check and warm-up compile,
barrier counters, launch counting) happens inside the op body, so
``torch.compile`` and ``torch.export`` only ever see the op and its fake
(shape-only) implementation. The input GEMM and the weight-gradient GEMMs are
not in the ops: they stay ordinary torch ops that autograd and Inductor see
(autograd.py).

Custom ops cannot return None, so absent outputs (the saved activations when
nothing is saved, ``r_all`` / ``dh_all`` without a projection) are empty
tensors of shape [0].

``torch.vmap`` over the ops folds the mapped dimension into the batch (rows of
an LSTM are independent); where the weights themselves are mapped it runs the
op once per slice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import custom_op, register_fake, register_vmap

from .dispatch import KernelConfig, state_dtype
from .kernels.backward import lstm_backward
from .kernels.forward import lstm_forward


def config_to_list(config: Optional[KernelConfig]) -> Optional[list[int]]:
    """A KernelConfig as the int list a custom op takes (None: let the dispatcher pick)."""
    if config is None:
        return None
    return [config.block_b, config.block_h, int(config.resident), config.block_k,
            config.split_k, config.num_warps]


def config_from_list(values: Optional[list[int]]) -> Optional[KernelConfig]:
    if values is None:
        return None
    block_b, block_h, resident, block_k, split_k, num_warps = values
    return KernelConfig(block_b=block_b, block_h=block_h, resident=bool(resident),
                        block_k=block_k, split_k=split_k, num_warps=num_warps)


def _or_empty(t: Optional[torch.Tensor], like: torch.Tensor, dtype=None) -> torch.Tensor:
    return like.new_empty(0, dtype=dtype) if t is None else t


@custom_op("triton_lstm::recurrence_forward", mutates_args=())
def recurrence_forward(
    gx: torch.Tensor, w_hh: torch.Tensor, h0: Optional[torch.Tensor], c0: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor], w_hr: Optional[torch.Tensor], save: bool,
    config: Optional[list[int]], force_stepped: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward recurrence of one layer: ``kernels.forward.lstm_forward``.

    gx [T, B, D*4H], w_hh [D, 4H, R], h0 [D, B, R] / c0 [D, B, H] or None,
    lengths [B] int32 or None, w_hr [D, R, H] or None. Returns y [T, B, D*R],
    h_n [D, B, R], c_n [D, B, H] (state dtype), and when ``save``: gates
    [D, T, B, 4H], c_all [D, T, B, H] (state dtype), r_all [D, T, B, H] with a
    projection; [0]-shaped otherwise.
    """
    h0 = None if h0 is None else h0.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    y, h_n, c_n, gates, c_all, r_all = lstm_forward(
        gx.contiguous(), w_hh.contiguous(), h0, c0, lengths, w_hr, save=save,
        config=config_from_list(config), force_stepped=force_stepped)
    acc = c_n.dtype
    return (y, h_n, c_n, _or_empty(gates, gx, acc), _or_empty(c_all, gx, acc),
            _or_empty(r_all if save else None, gx))


@register_fake("triton_lstm::recurrence_forward")
def _recurrence_forward_fake(gx, w_hh, h0, c0, lengths, w_hr, save, config, force_stepped):
    T, B, G = gx.shape
    D, _, R = w_hh.shape
    H = G // (4 * D)
    acc = state_dtype(gx.dtype)
    saved = (lambda *shape: gx.new_empty(shape, dtype=acc)) if save else (
        lambda *shape: gx.new_empty(0, dtype=acc))
    r_all = gx.new_empty(D, T, B, H) if (save and w_hr is not None) else gx.new_empty(0)
    return (gx.new_empty(T, B, D * R), gx.new_empty(D, B, R), gx.new_empty((D, B, H), dtype=acc),
            saved(D, T, B, 4 * H), saved(D, T, B, H), r_all)


@custom_op("triton_lstm::recurrence_backward", mutates_args=())
def recurrence_backward(
    dy: Optional[torch.Tensor], dh_n: Optional[torch.Tensor], dc_n: Optional[torch.Tensor],
    gates: torch.Tensor, c_all: torch.Tensor, c0: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor], w_hh: torch.Tensor, w_hr: Optional[torch.Tensor],
    config: Optional[list[int]], force_stepped: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reverse recurrence of one layer: ``kernels.backward.lstm_backward``.

    Returns dG [T, B, D*4H] (w_hh's dtype), dh0 [D, B, R], dc0 [D, B, H] (state
    dtype) and with a projection dh_all [D, T, B, R] (the total gradient of each
    h_t), [0]-shaped otherwise.
    """
    c0 = None if c0 is None else c0.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    dG, dh0, dc0, dh_all = lstm_backward(
        dy, dh_n, dc_n, gates.contiguous(), c_all.contiguous(), c0, lengths, w_hh.contiguous(),
        w_hr, config=config_from_list(config), force_stepped=force_stepped)
    return dG, dh0, dc0, _or_empty(dh_all, dG)


@register_fake("triton_lstm::recurrence_backward")
def _recurrence_backward_fake(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr, config,
                              force_stepped):
    D, T, B, G = gates.shape
    H = G // 4
    R = w_hh.shape[2]
    dh_all = w_hh.new_empty(D, T, B, R) if w_hr is not None else w_hh.new_empty(0)
    return (w_hh.new_empty(T, B, D * 4 * H), w_hh.new_empty(D, B, R),
            w_hh.new_empty((D, B, H), dtype=state_dtype(w_hh.dtype)), dh_all)


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
    batch_axes=(1, None, 1, 1, 0, None, None, None, None),   # gx, w_hh, h0, c0, lengths, w_hr
    out_batch_axes=(1, 1, 1, 2, 2, 2),                       # y, h_n, c_n, gates, c_all, r_all
    weights=(1, 5)))
register_vmap("triton_lstm::recurrence_backward", _vmap_rule(
    recurrence_backward,
    # dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh, w_hr
    batch_axes=(1, 1, 1, 2, 2, 1, 0, None, None, None, None),
    out_batch_axes=(1, 1, 1, 2),                             # dG, dh0, dc0, dh_all
    weights=(7, 8)))
