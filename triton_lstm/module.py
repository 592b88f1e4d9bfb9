"""triton_lstm.LSTM: a drop-in for torch.nn.LSTM whose recurrence runs in Triton.

It *is* a ``torch.nn.LSTM`` (subclass): same constructor, parameter names,
initialisation, ``state_dict``, ``extra_repr``, ``all_weights``; only
``forward`` changes, to run the persistent kernels. ``backend`` picks the path:
``"auto"`` (Triton for CUDA tensors, PyTorch for CPU tensors), ``"triton"``
(always the kernels; on CPU only under ``TRITON_INTERPRET=1``) or ``"torch"``
(torch.nn.LSTM's own implementation).
"""
from __future__ import annotations

from typing import Optional

import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .dispatch import interpreting
from .functional import lstm

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _copy_requires_grad(source: nn.Module, target: nn.Module) -> None:
    for (name, p), q in zip(source.named_parameters(), target.parameters()):
        q.requires_grad_(p.requires_grad)


class LSTMInputError(ValueError, RuntimeError):
    """Bad input to LSTM. A ValueError, and a RuntimeError like torch.nn.LSTM's own checks."""


class LSTM(nn.LSTM):
    """Long short-term memory RNN, as ``torch.nn.LSTM``, with Triton kernels.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, proj_size, device, dtype: exactly as torch.nn.LSTM.
        backend: "auto", "triton" or "torch" (keyword only).

    Inputs: input [T, B, I] ([B, T, I] if batch_first, [T, I] unbatched),
        optional (h0, c0) each [num_layers * num_directions, B, H] ([.., H] unbatched).
    Outputs: output [T, B, D * H], (h_n, c_n) each [num_layers * D, B, H].

    Example:
        >>> lstm = triton_lstm.LSTM(256, 512, device="cuda", dtype=torch.bfloat16)
        >>> lstm.load_state_dict(torch_lstm.state_dict())
        >>> out, (h_n, c_n) = lstm(x)
    """

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"

    @classmethod
    def from_torch(cls, module: nn.LSTM, *, backend: str = "auto") -> "LSTM":
        """A triton_lstm.LSTM with the same options and parameters as ``module``."""
        weight = module.weight_ih_l0
        with warnings.catch_warnings():   # the source module already warned about its options
            warnings.simplefilter("ignore")
            new = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                      bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional, proj_size=module.proj_size,
                      device=weight.device, dtype=weight.dtype, backend=backend)
        new.load_state_dict(module.state_dict())
        _copy_requires_grad(module, new)
        new.train(module.training)
        return new

    def to_torch(self) -> nn.LSTM:
        """A plain torch.nn.LSTM with the same options and parameters."""
        weight = self.weight_ih_l0
        with warnings.catch_warnings():   # this module already warned about its options
            warnings.simplefilter("ignore")
            module = nn.LSTM(self.input_size, self.hidden_size, num_layers=self.num_layers,
                             bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
                             bidirectional=self.bidirectional, proj_size=self.proj_size,
                             device=weight.device, dtype=weight.dtype)
        module.load_state_dict(self.state_dict())
        _copy_requires_grad(self, module)
        module.train(self.training)
        return module

    def _uses_triton(self, input: torch.Tensor) -> bool:
        if self.backend == "torch":
            return False
        if self.backend == "auto":
            return input.is_cuda
        if not input.is_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors; on CPU the kernels only run under the "
                "Triton interpreter (set TRITON_INTERPRET=1 before importing triton_lstm), "
                "or use backend='torch' / 'auto'")
        return True

    def forward(self, input, hx: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        self._check_input(input)
        if not self._uses_triton(input):
            return super().forward(input, hx)
        unbatched = input.dim() == 2
        batch_dim = 0 if self.batch_first else 1
        if unbatched:
            input = input.unsqueeze(batch_dim)
        checked_hx = self._check_hx(input, hx, batch_dim, unbatched)
        if input.shape[batch_dim] == 0:   # nothing to run: nn.LSTM's empty outputs keep autograd
            return super().forward(input.squeeze(batch_dim) if unbatched else input, hx)
        hx = checked_hx

        output, (h_n, c_n) = lstm(
            input, hx, self._layer_weights(), num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, training=self.training,
            batch_first=self.batch_first)
        if unbatched:
            output, h_n, c_n = output.squeeze(batch_dim), h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _forward_packed(self, packed: PackedSequence, hx):
        """Variable lengths: each row of the padded batch stops at its own length in the kernels."""
        self._check_input(packed.data, packed=True)
        if not self._uses_triton(packed.data):
            return super().forward(packed, hx)
        padded, lengths = pad_packed_sequence(packed)   # [T, B, I] in the caller's batch order
        hx = self._check_hx(padded, hx, 1, False)
        device = packed.data.device
        output, state = lstm(
            padded, hx, self._layer_weights(), num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, training=self.training,
            lengths=lengths.to(device=device, dtype=torch.int32))
        # Back to the packed layout: step t holds the first batch_sizes[t] rows in sorted order.
        sizes = packed.batch_sizes                     # on the CPU, as PackedSequence keeps it
        steps = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        ranks = (torch.arange(int(sizes.sum())) - starts).to(device)
        rows = ranks if packed.sorted_indices is None else packed.sorted_indices[ranks]
        data = output[steps.to(device), rows]
        return PackedSequence(data, sizes, packed.sorted_indices, packed.unsorted_indices), state

    # -- helpers -----------------------------------------------------------------------------

    def _layer_weights(self):
        """Per layer and direction: (w_ih, w_hh, b_ih, b_hh, w_hr), absent ones None."""
        weights = []
        for layer in range(self.num_layers):
            for suffix in ("", "_reverse")[:2 if self.bidirectional else 1]:
                names = (f"weight_ih_l{layer}{suffix}", f"weight_hh_l{layer}{suffix}",
                         f"bias_ih_l{layer}{suffix}", f"bias_hh_l{layer}{suffix}",
                         f"weight_hr_l{layer}{suffix}")
                weights.append(tuple(getattr(self, name, None) for name in names))
        return weights

    def _check_input(self, input, packed: bool = False) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor or PackedSequence, got {type(input).__name__}")
        if packed and input.dim() != 2:
            raise LSTMInputError(f"packed input data must be 2-D [sum of lengths, input_size], got "
                                 f"{input.dim()}-D with shape {tuple(input.shape)}")
        if input.dim() not in (2, 3):
            raise LSTMInputError(f"input must be 2-D (unbatched [T, input_size]) or 3-D, got "
                                 f"{input.dim()}-D with shape {tuple(input.shape)}")
        if input.shape[-1] != self.input_size:
            raise LSTMInputError(f"input.size(-1) must be input_size={self.input_size}, "
                                 f"got {input.shape[-1]} (input shape {tuple(input.shape)})")
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype:
            raise LSTMInputError(f"input dtype {input.dtype} does not match the weights' dtype "
                            f"{weight.dtype}: convert the input (input.to({weight.dtype})) "
                            f"or the module (module.to({input.dtype}))")
        if input.device != weight.device:
            raise LSTMInputError(f"input is on {input.device} but the weights are on "
                                 f"{weight.device}: move one of them")
        time_dim = 1 if (self.batch_first and input.dim() == 3) else 0
        if not packed and input.shape[time_dim] == 0:
            raise LSTMInputError("input has sequence length 0; it must be at least 1")
        if self._uses_triton(input) and input.dtype not in KERNEL_DTYPES:
            raise TypeError(f"input dtype must be one of {KERNEL_DTYPES} for the Triton kernels, "
                            f"got {input.dtype}")

    def _check_hx(self, input, hx, batch_dim, unbatched):
        if hx is None:
            return None
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2
                and all(isinstance(t, torch.Tensor) for t in hx)):
            if isinstance(hx, (tuple, list)):
                got = (f"a {type(hx).__name__} of length {len(hx)}" if len(hx) != 2 else
                       f"({', '.join(type(t).__name__ for t in hx)})")
            else:
                got = type(hx).__name__
            raise TypeError(f"hx must be a tuple (h0, c0) of two tensors, got {got}")
        num_directions = 2 if self.bidirectional else 1
        batch = input.shape[batch_dim]
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        expected = {"h0": (self.num_layers * num_directions, batch, out_size),
                    "c0": (self.num_layers * num_directions, batch, self.hidden_size)}
        checked = []
        for name, state in zip(("h0", "c0"), hx):
            if unbatched:
                if state.dim() != 2:
                    raise LSTMInputError(f"for unbatched 2-D input, {name} must be 2-D, got "
                                         f"{state.dim()}-D with shape {tuple(state.shape)}")
                state = state.unsqueeze(1)
            if tuple(state.shape) != expected[name]:
                shape = expected[name]
                want = (shape[0], shape[2]) if unbatched else shape
                have = tuple(state.shape[::2]) if unbatched else tuple(state.shape)
                raise LSTMInputError(f"{name} must have shape {want} "
                                     "(num_layers * num_directions, batch, hidden)"
                                     f", got {have}")
            if state.dtype != input.dtype:
                raise LSTMInputError(f"{name} dtype {state.dtype} does not match input dtype {input.dtype}")
            if state.device != input.device:
                raise LSTMInputError(f"{name} is on {state.device} but input is on {input.device}")
            checked.append(state)
        return checked[0], checked[1]
