"""Multi-layer, bidirectional LSTM built from the one-layer op (autograd.lstm_layer).

Layout as torch.nn.LSTM: ``h_n``/``c_n`` are [num_layers * num_directions, B, H]
with the direction index fastest; each layer's output concatenates the forward
and reverse directions along the feature axis (the kernels write it that way,
both directions in one launch); dropout is applied to every layer's output
except the last, in training mode only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .autograd import dropout_masks, lstm_cell_step, lstm_layer, lstm_stack_wavefront, stacked
from .reference import restarts_in_processing_order


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype nn.LSTM computes in under an active torch.autocast for this device, else None."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(input: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in: autocast's (as nn.LSTM under autocast), else input's."""
    cast_to = autocast_dtype(input.device.type)
    return cast_to if cast_to is not None and input.dtype != torch.float64 else input.dtype


def _autocast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """As autocast casts an op's arguments: floating tensors other than fp64 go to `dtype`."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _autocast_arguments(input, hx, weights):
    """input, hx and the weights in compute_dtype (differentiable casts), as autocast would."""
    cast_to = autocast_dtype(input.device.type)
    if cast_to is None or input.dtype == torch.float64:
        return input, hx, weights
    return (_autocast(input, cast_to),
            None if hx is None else tuple(_autocast(t, cast_to) for t in hx),
            [tuple(_autocast(w, cast_to) for w in group) for group in weights])


def lstm(
    input: torch.Tensor,
    hx: Optional[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[Sequence[Optional[torch.Tensor]]],
    *,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    batch_first: bool = False,
    lengths: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    recompute: int = 0,
    layer_fn=None,
    wavefront: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run a stacked LSTM on the Triton kernels.

    Args:
        input: [T, B, I] ([B, T, I] when ``batch_first``), T >= 1.
        hx: (h0, c0), each [num_layers * num_directions, B, H], or None for zeros.
        weights: per layer and direction (layer-major, reverse after forward),
            ``(w_ih [4H, I_l], w_hh [4H, R], b_ih [4H] or None, b_hh [4H] or None,
            w_hr [R, H] or None)``, with R = proj_size if there is a projection, else H.
        num_layers, bidirectional, dropout, training, batch_first: as torch.nn.LSTM.
        lengths: [B] int32 sequence lengths on the input's device (1..T), or None:
            each row stops at its own length (h_n, c_n are its last valid step) and
            the output is zero past it.
        reset: [T, B] bool ([B, T] when ``batch_first``), or None: where set, every
            layer's state restarts from (h0, c0), or zeros, before that step, and no
            gradient flows across it. The reverse direction restarts where a segment
            ends (it walks each segment from its end): each segment between resets is
            its own sequence, as if the rows were split there.
        recompute: 0, or k > 0 to save the state every k steps instead of every step's
            gates and recompute them segment by segment in the backward.
        layer_fn: the one-layer function: ``lstm_layer`` (None, the kernels) or
            ``reference.lstm_layer_reference``.
        wavefront: run a stack of 2+ layers on the kernels as one wavefront launch (layer l
            at time t while layer l + 1 runs t - 1: T + L - 1 steps instead of L * T), where
            it applies: unidirectional, no projection, no resets or recompute (dropout
            between layers is drawn up front). Elsewhere the layers run one after another.
    Returns:
        output [T, B, num_directions * R] (batch first if asked), (h_n, c_n).

    Under ``torch.autocast`` (cuda or cpu) it computes in the autocast dtype and
    returns it, as nn.LSTM does: input, state and weights are cast (differentiably,
    so fp32 parameters get fp32 gradients).

    Example:
        >>> out, (h_n, c_n) = lstm(x, None, [(w_ih, w_hh, b_ih, b_hh)])
    """
    input, hx, weights = _autocast_arguments(input, hx, weights)
    x = input.transpose(0, 1) if batch_first else input
    num_directions = 2 if bidirectional else 1
    restarts = None
    if reset is not None:
        reset = reset.transpose(0, 1) if batch_first else reset
        restarts = restarts_in_processing_order(reset.to(device=x.device, dtype=torch.bool),
                                                lengths, num_directions)
    layer_fn = layer_fn or lstm_layer
    if (wavefront and layer_fn is lstm_layer and num_layers > 1 and not bidirectional
            and restarts is None and not recompute and all(w[4] is None for w in weights)):
        h0, c0 = (None, None) if hx is None else hx
        keep = None
        if dropout > 0 and training:
            keep = dropout_masks(num_layers, x, weights[0][1].shape[1], dropout)
        y, h_n, c_n = lstm_stack_wavefront(x, h0, c0, [w[:4] for w in weights], lengths,
                                           keep=keep)
        return (y.transpose(0, 1) if batch_first else y), (h_n, c_n)
    extra = {} if layer_fn is not lstm_layer else dict(recompute=recompute)
    h_n, c_n = [], []
    for layer in range(num_layers):
        first = layer * num_directions
        group = list(weights[first:first + num_directions])
        w_ih, w_hh, b_ih, b_hh, w_hr = (_join([w[k] for w in group], stack=k in (1, 4))
                                        for k in range(5))
        h0, c0 = (None, None) if hx is None else (_layer_rows(hx[0], first, num_directions),
                                                  _layer_rows(hx[1], first, num_directions))
        x, h, c = layer_fn(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, w_hr, restarts=restarts,
                           **extra)
        h_n.append(h)
        c_n.append(c)
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    output = x.transpose(0, 1) if batch_first else x
    return output, (_join(h_n, stack=False), _join(c_n, stack=False))


def _layer_rows(state, first: int, count: int):
    """state[first:first + count]; the whole state as it is where that is all of it (one
    layer): a slice's backward allocates and copies, and a one-tensor cat copies too."""
    return state if state.shape[0] == count else state[first:first + count]


def _join(tensors, stack: bool):
    """Both directions' weights as one operand: W_hh, W_hr stacked [D, ...], the others concatenated."""
    if tensors[0] is None:
        return None
    if stack:
        return stacked(tensors)
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def lstm_step(
    input: torch.Tensor,
    hx: Optional[tuple[torch.Tensor, torch.Tensor]],
    weights: Sequence[Sequence[Optional[torch.Tensor]]],
    *,
    num_layers: int = 1,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One time step of a stacked unidirectional LSTM: one step-kernel launch per layer.

    Args:
        input: [B, I].
        hx: (h, c), [num_layers, B, R] and [num_layers, B, H] (any float dtype for c),
            or None for zeros.
        weights: per layer ``(w_ih [4H, I_l], w_hh [4H, R], b_ih [4H] or None,
            b_hh [4H] or None, w_hr [R, H] or None)``, R = proj_size if there is a
            projection, else H.
        num_layers, dropout, training: as torch.nn.LSTM (dropout between layers).
    Returns:
        y [B, R] (the last layer's h), (h_n [num_layers, B, R], c_n [num_layers, B, H]),
        all in the input dtype (the autocast dtype under torch.autocast).

    The projection h = r W_hr^T is a torch matmul after each layer's kernel: it needs
    the r of every program, which one launch without a grid barrier cannot wait for.

    Example:
        >>> y, (h, c) = lstm_step(x_t, (h, c), [(w_ih, w_hh, b_ih, b_hh, None)])
    """
    input, hx, weights = _autocast_arguments(input, hx, weights)
    x = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[layer]
        h, c = (None, None) if hx is None else (hx[0][layer], hx[1][layer])
        r, c = lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
        h = r if w_hr is None else r @ w_hr.t()
        h_n.append(h)
        c_n.append(c.to(input.dtype))
        x = h
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    return h_n[-1], (torch.stack(h_n), torch.stack(c_n))
