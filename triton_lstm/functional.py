"""Multi-layer, bidirectional LSTM built from the one-layer op (autograd.lstm_layer).

Layout as torch.nn.LSTM: ``h_n``/``c_n`` are [num_layers * num_directions, B, H]
with the direction index fastest; each layer's output concatenates the forward
and reverse directions along the feature axis; dropout is applied to every
layer's output except the last, in training mode only.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .autograd import lstm_layer


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
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Run a stacked LSTM on the Triton kernels.

    Args:
        input: [T, B, I] ([B, T, I] when ``batch_first``), T >= 1.
        hx: (h0, c0), each [num_layers * num_directions, B, H], or None for zeros.
        weights: per layer and direction (layer-major, reverse after forward),
            ``(w_ih [4H, I_l], w_hh [4H, H], b_ih [4H] or None, b_hh [4H] or None)``.
        num_layers, bidirectional, dropout, training, batch_first: as torch.nn.LSTM.
    Returns:
        output [T, B, num_directions * H] (batch first if asked), (h_n, c_n).

    Example:
        >>> out, (h_n, c_n) = lstm(x, None, [(w_ih, w_hh, b_ih, b_hh)])
    """
    x = input.transpose(0, 1) if batch_first else input
    num_directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(num_directions):
            index = layer * num_directions + direction
            w_ih, w_hh, b_ih, b_hh = weights[index]
            h0, c0 = (hx[0][index], hx[1][index]) if hx is not None else (None, None)
            seq = x.flip(0) if direction == 1 else x
            y, h, c = lstm_layer(seq, h0, c0, w_ih, w_hh, b_ih, b_hh)
            outputs.append(y.flip(0) if direction == 1 else y)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and layer < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)
    output = x.transpose(0, 1) if batch_first else x
    return output, (torch.stack(h_n), torch.stack(c_n))
