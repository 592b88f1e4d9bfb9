"""triton_lstm.LSTM: a drop-in for torch.nn.LSTM whose recurrence runs in Triton.

It *is* a ``torch.nn.LSTM`` (subclass): same constructor, parameter names,
initialisation, ``state_dict``, ``extra_repr``, ``all_weights``; only
``forward`` changes, to run the persistent kernels. ``backend`` picks the path:
``"auto"`` (Triton for CUDA tensors, PyTorch for CPU tensors), ``"triton"``
(always the kernels; on CPU only under ``TRITON_INTERPRET=1``) or ``"torch"``
(torch.nn.LSTM's own implementation).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .dispatch import interpreting
from .functional import autocast_dtype, compute_dtype, lstm
from .policy import auto_uses_kernels
from .reference import lstm_layer_reference

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def exporting() -> bool:
    """torch.export, torch.onnx.export or torch.jit.trace is recording the model.

    They record nn.LSTM's own op (aten.lstm), which every exporter and runtime
    knows; the kernels are for running, and torch.compile keeps them.
    """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _export_flag()


def _export_flag() -> bool:
    """torch.compiler.is_exporting(), read so that torch.compile sees it as it is: Dynamo in
    torch 2.11 (not in 2.13) folds the call to True in every graph it traces, which sent every
    compiled call to nn.LSTM. torch.export sets the flag the call returns, and Dynamo reads
    (and guards on) a module attribute's value."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else bool(flag)


def _copy_requires_grad(source: nn.Module, target: nn.Module) -> None:
    for (name, p), q in zip(source.named_parameters(), target.parameters()):
        q.requires_grad_(p.requires_grad)


class LSTMInputError(ValueError, RuntimeError):
    """Bad input to LSTM. A ValueError, and a RuntimeError like torch.nn.LSTM's own checks."""


@functools.lru_cache(maxsize=None)
def _weight_plan(num_layers: int, directions: int, input_size: int, hidden_size: int,
                 proj_size: int, bias: bool) -> tuple:
    """Per layer and direction, the names of (w_ih, w_hh, b_ih, b_hh, w_hr) and the shapes the
    module's sizes give them (None: the module has no such parameter)."""
    H, R = hidden_size, proj_size or hidden_size
    plan = []
    for layer in range(num_layers):
        in_size = input_size if layer == 0 else directions * R
        shapes = ((4 * H, in_size), (4 * H, R), (4 * H,) if bias else None,
                  (4 * H,) if bias else None, (R, H) if proj_size > 0 else None)
        for suffix in ("", "_reverse")[:directions]:
            names = tuple(f"{kind}_l{layer}{suffix}"
                          for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"))
            plan.append((names, shapes))
    return tuple(plan)


def _refuse_weight(name: str, weight, shape: tuple, dtype: torch.dtype,
                   device: torch.device) -> None:
    """Raise the error naming what is wrong with one parameter of a layer."""
    if not isinstance(weight, torch.Tensor):
        raise LSTMInputError(f"{name} must be a tensor of shape {shape}, got "
                             f"{type(weight).__name__}")
    if weight.shape != shape:
        raise LSTMInputError(f"{name} has shape {tuple(weight.shape)}, expected {shape} (from "
                             "the module's input_size, hidden_size and proj_size)")
    if weight.dtype != dtype:
        raise LSTMInputError(f"{name} has dtype {weight.dtype}, expected {dtype} as "
                             "weight_ih_l0: convert the module with .to(dtype)")
    raise LSTMInputError(f"{name} is on {weight.device}, expected the input's device "
                         f"{device}: move the module or the input")


class LSTM(nn.LSTM):
    """Long short-term memory RNN, as ``torch.nn.LSTM``, with Triton kernels.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout,
        bidirectional, proj_size, device, dtype: exactly as torch.nn.LSTM.
        backend: "auto", "triton" or "torch" (keyword only).
        recompute: None (default) to save every step's gates for the backward, or k >= 1
            to save the state every k steps and recompute the gates segment by segment
            in the backward: saved activations ~10x smaller for one more forward pass
            (keyword only; training memory for long sequences).
        wavefront: False (default), or True to run a stack of 2+ layers on the kernels
            as one wavefront launch: layer l runs step t while layer l + 1 runs step
            t - 1, so the stack takes T + L - 1 steps instead of L * T (keyword only;
            unidirectional, without proj_size or recompute; dropout between layers is
            drawn up front). Calls with resets run the layers one after another.

    Inputs: input [T, B, I] ([B, T, I] if batch_first, [T, I] unbatched),
        optional (h0, c0) each [num_layers * num_directions, B, H] ([.., H] unbatched),
        keyword ``reset``: optional bool [T, B] ([B, T] if batch_first, [T] unbatched):
        where True, the row's state restarts from (h0, c0) (zeros if not given) before
        that step, in every layer, and no gradient crosses it (episode boundaries).
    Outputs: output [T, B, D * H], (h_n, c_n) each [num_layers * D, B, H].

    Example:
        >>> lstm = triton_lstm.LSTM(256, 512, device="cuda", dtype=torch.bfloat16)
        >>> lstm.load_state_dict(torch_lstm.state_dict())
        >>> out, (h_n, c_n) = lstm(x)
    """

    def __init__(self, *args, backend: str = "auto", recompute: Optional[int] = None,
                 wavefront: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if recompute is not None and (isinstance(recompute, bool) or not isinstance(recompute, int)
                                      or recompute < 1):
            raise ValueError(f"recompute must be None or a number of steps >= 1 between saved "
                             f"states, got {recompute!r}")
        if not isinstance(wavefront, bool):
            raise TypeError(f"wavefront must be True or False, got {wavefront!r}")
        if wavefront and (self.bidirectional or self.proj_size > 0 or recompute is not None):
            raise ValueError(
                "wavefront=True runs unidirectional stacks without proj_size or recompute; got "
                f"bidirectional={self.bidirectional}, proj_size={self.proj_size}, "
                f"recompute={recompute}")
        self.backend = backend
        self.recompute = recompute
        self.wavefront = wavefront

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.backend != "auto":
            text += f", backend={self.backend!r}"
        if self.recompute is not None:
            text += f", recompute={self.recompute}"
        if self.wavefront:
            text += ", wavefront=True"
        return text

    @classmethod
    def from_torch(cls, module: nn.LSTM, *, backend: str = "auto",
                   recompute: Optional[int] = None, wavefront: bool = False) -> "LSTM":
        """A triton_lstm.LSTM with the same options and parameters as ``module``."""
        weight = module.weight_ih_l0
        with warnings.catch_warnings():   # the source module already warned about its options
            warnings.simplefilter("ignore")
            new = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                      bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional, proj_size=module.proj_size,
                      device=weight.device, dtype=weight.dtype, backend=backend,
                      recompute=recompute, wavefront=wavefront)
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

    def __prepare_scriptable__(self) -> nn.LSTM:
        """torch.jit.script holds nn.LSTM, sharing this module's parameters: TorchScript takes
        no keyword-only arguments (reset=), and exporters record nn.LSTM's op too."""
        module = self.to_torch()
        for name, parameter in self.named_parameters():
            setattr(module, name, parameter)
        return module

    def _uses_triton(self, input: torch.Tensor) -> bool:
        if self.backend == "torch" or exporting():
            return False
        if self.backend == "auto":
            # CUDA: the kernels, unless make tune's table measured nn.LSTM faster here (policy.py).
            return auto_uses_kernels(self, input)
        if not input.is_cuda and not interpreting():
            raise RuntimeError(
                "backend='triton' needs CUDA tensors; on CPU the kernels only run under the "
                "Triton interpreter (set TRITON_INTERPRET=1 before importing triton_lstm), "
                "or use backend='torch' / 'auto'")
        return True

    def _runs_kernels(self, input: torch.Tensor, reset, uses_triton: bool) -> bool:
        """_uses_triton (``uses_triton``, as _check_input found it), except that "auto" keeps
        the kernels on CUDA for what only they do there (resets, recompute, the wavefront),
        whatever the table says of nn.LSTM's speed."""
        if uses_triton:
            return True
        wants_kernels = reset is not None or self.recompute is not None or self.wavefront
        return (self.backend == "auto" and input.is_cuda and wants_kernels and not exporting())

    def forward(self, input, hx: Optional[tuple[torch.Tensor, torch.Tensor]] = None, *,
                reset: Optional[torch.Tensor] = None):
        if isinstance(input, torch.fx.Proxy):
            # torch.fx keeps torch.nn's modules whole (one call_module node); this one too.
            tracer = input.tracer
            return tracer.create_proxy("call_module", tracer.path_of_module(self),
                                       (input, hx), {} if reset is None else {"reset": reset})
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, reset)
        kernels = self._runs_kernels(input, reset, self._check_input(input, hx))
        if not kernels and reset is None:
            return super().forward(input, hx)
        unbatched = input.dim() == 2
        batch_dim = 0 if self.batch_first else 1
        if unbatched:
            input = input.unsqueeze(batch_dim)
        checked_hx = self._check_hx(input, hx, batch_dim, unbatched)
        if reset is not None:
            reset = self._check_reset(reset, input, unbatched)
        if input.shape[batch_dim] == 0:   # nothing to run: nn.LSTM's empty outputs keep autograd
            return super().forward(input.squeeze(batch_dim) if unbatched else input, hx)
        hx = checked_hx

        output, (h_n, c_n) = lstm(
            input, hx, self._layer_weights(input), num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, training=self.training,
            batch_first=self.batch_first, reset=reset, **self._layer_options(kernels))
        if unbatched:
            output, h_n, c_n = output.squeeze(batch_dim), h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _forward_packed(self, packed: PackedSequence, hx, reset):
        """Variable lengths: each row of the padded batch stops at its own length in the kernels."""
        kernels = self._runs_kernels(packed.data, reset,
                                     self._check_input(packed.data, hx, packed=True))
        if not kernels and reset is None:
            return super().forward(packed, hx)
        padded, lengths = pad_packed_sequence(packed)   # [T, B, I] in the caller's batch order
        hx = self._check_hx(padded, hx, 1, False)
        if reset is not None:
            # In the padded layout of the module's batch_first, like a padded input's.
            reset = self._check_reset(reset, padded.transpose(0, 1) if self.batch_first else padded,
                                      False)
            reset = reset.transpose(0, 1) if self.batch_first else reset
        device = packed.data.device
        output, state = lstm(
            padded, hx, self._layer_weights(padded), num_layers=self.num_layers,
            bidirectional=self.bidirectional, dropout=self.dropout, training=self.training,
            lengths=lengths.to(device=device, dtype=torch.int32), reset=reset,
            **self._layer_options(kernels))
        # Back to the packed layout: step t holds the first batch_sizes[t] rows in sorted order.
        sizes = packed.batch_sizes                     # on the CPU, as PackedSequence keeps it
        steps = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        ranks = (torch.arange(int(sizes.sum())) - starts).to(device)
        rows = ranks if packed.sorted_indices is None else packed.sorted_indices[ranks]
        data = output[steps.to(device), rows]
        return PackedSequence(data, sizes, packed.sorted_indices, packed.unsorted_indices), state

    # -- helpers -----------------------------------------------------------------------------

    def _layer_options(self, kernels: bool) -> dict:
        """The kernels (with this module's recompute and wavefront), or, where nn.LSTM cannot
        do what was asked (resets), the same layers in plain PyTorch (reference.py)."""
        if kernels:
            return dict(recompute=self.recompute or 0, wavefront=self.wavefront)
        return dict(layer_fn=lstm_layer_reference)

    def _check_reset(self, reset, input, unbatched: bool) -> torch.Tensor:
        """reset as [T, B] ([B, T] with batch_first) bool on input's device (input 3-D here)."""
        time_dim, batch_dim = (1, 0) if self.batch_first else (0, 1)
        T, B = input.shape[time_dim], input.shape[batch_dim]
        if unbatched:
            want, layout = (T,), "[T] for unbatched input"
        else:
            want = (B, T) if self.batch_first else (T, B)
            layout = "[B, T] with batch_first" if self.batch_first else "[T, B]"
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool:
            got = reset.dtype if isinstance(reset, torch.Tensor) else type(reset).__name__
            raise TypeError(f"reset must be a bool tensor {layout}, True where a row's state "
                            f"restarts before that step; got {got}")
        if tuple(reset.shape) != want:
            raise LSTMInputError(f"reset must have shape {want} ({layout}, as the input), got "
                                 f"{tuple(reset.shape)}")
        if reset.device != input.device:
            raise LSTMInputError(f"reset is on {reset.device} but input is on {input.device}")
        return reset.unsqueeze(batch_dim) if unbatched else reset

    def _layer_weights(self, input: torch.Tensor):
        """Per layer and direction: (w_ih, w_hh, b_ih, b_hh, w_hr), absent ones None. Each is
        checked against what the module's sizes make it (a parameter replaced by hand can be
        anything), weight_ih_l0's dtype and the input's device: the kernels read them raw."""
        plan = _weight_plan(self.num_layers, 2 if self.bidirectional else 1, self.input_size,
                            self.hidden_size, self.proj_size, self.bias)
        params, dtype, device = self._parameters, self.weight_ih_l0.dtype, input.device
        weights = []
        for names, shapes in plan:
            layer = []
            for name, shape in zip(names, shapes):
                weight = None
                if shape is not None:
                    weight = params.get(name)
                    if weight is None:      # parametrized (weight_norm, ...), or set to None
                        weight = getattr(self, name, None)
                    if (not isinstance(weight, torch.Tensor) or weight.shape != shape
                            or weight.dtype != dtype or weight.device != device):
                        _refuse_weight(name, weight, shape, dtype, device)
                layer.append(weight)
            weights.append(tuple(layer))
        return weights

    def _check_input(self, input, hx=None, packed: bool = False) -> bool:
        """nn.LSTM's checks and messages, each also naming what was expected; returns
        _uses_triton(input), which the dtype check needs."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor or PackedSequence, got {type(input).__name__}")
        if packed and input.dim() != 2:
            raise LSTMInputError(f"packed input data must be 2-D [sum of lengths, input_size], got "
                                 f"{input.dim()}-D with shape {tuple(input.shape)}")
        if input.dim() not in (2, 3):
            raise LSTMInputError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead "
                                 f"(input shape {tuple(input.shape)}; 3-D is [T, B, input_size] or "
                                 "[B, T, input_size] with batch_first, 2-D is unbatched)")
        if input.shape[-1] != self.input_size:
            raise LSTMInputError(f"input.size(-1) must be equal to input_size. Expected "
                                 f"{self.input_size}, got {input.shape[-1]} "
                                 f"(input shape {tuple(input.shape)})")
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype and autocast_dtype(input.device.type) is None:
            raise LSTMInputError(f"RNN input dtype ({input.dtype}) does not match weight dtype "
                                 f"({weight.dtype}). Convert input: input.to({weight.dtype}), "
                                 f"or convert model: model.to({input.dtype})")
        # nn.LSTM's order: the state's device before the parameters'.
        if isinstance(hx, (tuple, list)):
            for name, state in zip(("h0", "c0"), hx):
                if isinstance(state, torch.Tensor) and state.device != input.device:
                    raise LSTMInputError(
                        f"Input and hidden tensors are not at the same device, found input "
                        f"tensor at {input.device} and hidden tensor ({name}) at {state.device}")
        if input.device != weight.device:
            raise LSTMInputError(f"Input and parameter tensors are not at the same device, found "
                                 f"input tensor at {input.device} and parameter tensor at "
                                 f"{weight.device}: move the input or the module")
        time_dim = 1 if (self.batch_first and input.dim() == 3) else 0
        if not packed and input.shape[time_dim] == 0:
            raise LSTMInputError("Expected sequence length to be larger than 0 in RNN "
                                 f"(input shape {tuple(input.shape)}, time is dim {time_dim})")
        dtype = compute_dtype(input)
        uses_triton = self._uses_triton(input)
        if uses_triton and dtype not in KERNEL_DTYPES:
            raise TypeError(f"input dtype must be one of {KERNEL_DTYPES} for the Triton kernels, "
                            f"got {dtype}")
        return uses_triton

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
        if any(state.dim() != (2 if unbatched else 3) for state in hx):
            kind = "unbatched 2-D" if unbatched else "batched 3-D"
            want = "2-D" if unbatched else "3-D"
            raise LSTMInputError(f"For {kind} input, hx and cx should also be {want} but got "
                                 f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors (h0 and c0)")
        num_directions = 2 if self.bidirectional else 1
        batch = input.shape[batch_dim]
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        expected = {"h0": (self.num_layers * num_directions, batch, out_size),
                    "c0": (self.num_layers * num_directions, batch, self.hidden_size)}
        sizes = {"h0": "proj_size" if self.proj_size > 0 else "hidden_size", "c0": "hidden_size"}
        autocasting = autocast_dtype(input.device.type) is not None
        checked = []
        for k, (name, state) in enumerate(zip(("h0", "c0"), hx)):
            if unbatched:
                state = state.unsqueeze(1)
            if tuple(state.shape) != expected[name]:
                shape = expected[name]
                want = (shape[0], shape[2]) if unbatched else shape
                have = list(state.shape[::2]) if unbatched else list(state.shape)
                layout = "num_layers * num_directions" + ("" if unbatched else ", batch")
                raise LSTMInputError(f"Expected hidden[{k}] size {want}, got {have} ({name} must "
                                     f"be ({layout}, {sizes[name]}))")
            if state.dtype != input.dtype and not autocasting:
                raise LSTMInputError(f"{name} dtype {state.dtype} does not match input dtype "
                                     f"{input.dtype}")
            checked.append(state)   # its device: _check_input, in nn.LSTM's order
        return checked[0], checked[1]

    # -- one step (streaming inference) ------------------------------------------------------

    def step(self, input: torch.Tensor, hx: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             *, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
        """One time step, for streaming inference: ``forward`` on a sequence of length 1.

        Args:
            input: [B, input_size], or [input_size] unbatched (``batch_first`` does not
                apply to one step). Chunks of several steps go to ``forward``, which
                takes the carried state as its hx just the same.
            hx: (h, c) exactly as forward's (h_n, c_n): [num_layers, B, H_out] and
                [num_layers, B, hidden_size] ([num_layers, .] unbatched), H_out =
                proj_size if set, else hidden_size; or None for zeros.
            out: optional (h_buf, c_buf) shaped like the new state: it is copied into
                them, and they are returned as (h_n, c_n). They may be hx itself.
        Returns:
            y_t [B, H_out] ([H_out] unbatched), (h_n, c_n) as forward's.

        On the Triton path each layer is one launch of the step kernel (input
        projection, recurrent dot and cell update fused; kernels/step.py), the
        projection a matmul after it. ``backend="torch"``, or CPU tensors with
        "auto", run nn.LSTM on the length-1 sequence. Unidirectional stacks only;
        dropout between layers in training mode, as forward. Gradients flow through
        any number of steps. c is handed back in the input dtype, as forward's c_n.

        CUDA graphs: a step has no host sync and keeps no Python state between calls,
        so it can be captured. Keep the state in buffers and pass them as both hx and
        ``out``: the kernels read hx and write fresh tensors, then the new state is
        copied into the buffers (device copies, ordered after every read), so no
        kernel reads a state that another is writing. Warm up once (compiles the
        kernels), capture one step, then fill the input buffer and replay::

            x_buf = torch.zeros(B, input_size, device="cuda", dtype=dtype)
            h_buf = torch.zeros(num_layers, B, hidden_size, device="cuda", dtype=dtype)
            c_buf = torch.zeros_like(h_buf)
            with torch.no_grad():
                lstm.step(x_buf, (h_buf, c_buf))                # warm-up, outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y_buf, _ = lstm.step(x_buf, (h_buf, c_buf), out=(h_buf, c_buf))
            for x_t in requests:
                x_buf.copy_(x_t)
                graph.replay()                                  # y_buf, h_buf, c_buf updated

        Example:
            >>> y, state = lstm.step(x_0)                       # x_0 [B, input_size]
            >>> y, state = lstm.step(x_1, state)
        """
        from .functional import lstm_step   # here, so that this method stays one block

        if self.bidirectional:
            raise ValueError("LSTM.step runs unidirectional LSTMs only, and this one has "
                             "bidirectional=True: the reverse direction needs the whole sequence "
                             "(run forward on it instead)")
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise LSTMInputError(f"LSTM.step: Expected input to be 1D [input_size] or 2D "
                                 f"[batch, input_size] (one time step), got {input.dim()}D with "
                                 f"shape {tuple(input.shape)}; sequences go to forward")
        if input.shape[-1] != self.input_size:
            raise LSTMInputError(f"input.size(-1) must be equal to input_size. Expected "
                                 f"{self.input_size}, got {input.shape[-1]} (step input shape "
                                 f"{tuple(input.shape)})")
        batched = input.dim() == 2
        time_dim = 1 if (batched and self.batch_first) else 0
        sequence = input.unsqueeze(time_dim)             # a sequence of one step, for nn.LSTM
        uses_triton = self._check_input(sequence, hx)    # dtype, device: forward's checks
        if not uses_triton or (batched and input.shape[0] == 0):
            output, (h_n, c_n) = super().forward(sequence, hx)
            y = output.squeeze(time_dim)
        else:
            x = input if batched else input.unsqueeze(0)
            checked = self._check_hx(x.unsqueeze(0), hx, 1, not batched)
            y, (h_n, c_n) = lstm_step(x, checked, self._layer_weights(x),
                                      num_layers=self.num_layers, dropout=self.dropout,
                                      training=self.training)
            if not batched:
                y, h_n, c_n = y.squeeze(0), h_n.squeeze(1), c_n.squeeze(1)
        if out is not None:
            h_n, c_n = self._copy_state(out, h_n, c_n)
        return y, (h_n, c_n)

    @staticmethod
    def _copy_state(out, h_n, c_n):
        """Copy the new state into the caller's buffers (step's ``out``) and return them."""
        if not (isinstance(out, (tuple, list)) and len(out) == 2
                and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError("out must be a tuple (h_buf, c_buf) of two tensors")
        for name, buf, new in (("h_buf", out[0], h_n), ("c_buf", out[1], c_n)):
            if buf.shape != new.shape:
                raise LSTMInputError(f"out {name} must have the shape of the new state "
                                     f"{tuple(new.shape)}, got {tuple(buf.shape)}")
            buf.copy_(new)
        return out[0], out[1]


def enable_fullgraph(enabled: bool = True) -> None:
    """Let ``torch.compile(..., fullgraph=True)`` trace through triton_lstm.LSTM.

    Dynamo refuses every nn.RNN / nn.GRU / nn.LSTM instance (a graph break, or an
    error under fullgraph) unless ``torch._dynamo.config.allow_rnn`` is set, and
    triton_lstm.LSTM is an nn.LSTM. This sets it. Our forward is a custom op that
    compiles cleanly; plain nn.RNN / GRU / LSTM modules in the same model are then
    traced too, through Dynamo's own (experimental) support for them.

    Example:
        >>> triton_lstm.enable_fullgraph()
        >>> model = torch.compile(model, fullgraph=True)
    """
    torch._dynamo.config.allow_rnn = enabled
