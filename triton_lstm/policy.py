"""backend="auto": the kernels or nn.LSTM for each call, and ``explain`` saying which and why.

On CUDA, "auto" runs the kernels unless the table ``make tune`` measured on this GPU
(tuning.py) says nn.LSTM (cuDNN) is faster at the nearest measured shape, in this call's
mode: inference (no gradient needed) compares forward calls, training compares forward
plus backward. The kernels must take at most KERNEL_ADVANTAGE (95%) of nn.LSTM's time.
A GPU without a table of its own decides by one measured on the same chip (same compute
capability and SM count, ``tuning.decision_gpu``), and takes that table's tiles too.
Without a measurement (a GPU of another chip, a kind of shape never measured, fp64) the
kernels run, except where PyTorch would run cuDNN's persistent fp16 kernel at a small batch
(``cudnn_persistent_wins``) and where an fp32 layer's GEMMs would run in full fp32 against
cuDNN's tf32 at a size where they outweigh the recurrence (``fp32_gemms_outweigh``); CPU
tensors run nn.LSTM. Only batched sequences (3-D
input) consult the table, which measures them; 2-D input (unbatched, the data of a
PackedSequence, one step) keeps the kernels.

The decision is a pure function of the GPU's name, the dtype, shapes and mode, read from
a table cached in memory: a few comparisons per call, no host sync, and torch.compile
traces it (the name and the table's rows are constants of the graph, the batch size a
guard).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch.nn.utils.rnn import PackedSequence

from . import tuning
from .dispatch import (BACKWARD_CHUNKS_ENV, FORWARD_CHUNKS_ENV, FP32_GEMMS_ENV,
                       backward_chunk_count, cudnn_rnn_allows_tf32, dot_precision,
                       forward_chunk_count, gemms_in_triton, heuristic_config, interpreting,
                       torch_matmul_allows_tf32)
from .functional import compute_dtype
from .kernels.wavefront import wavefront_config
from .overlap import backward_chunks_for, forward_chunks_for
from .tuning import DTYPE_NAMES, KERNEL_ADVANTAGE


def _on_cuda(input: torch.Tensor) -> bool:
    """Whether the call runs on a GPU (the one place that asks; tests stand a GPU in here)."""
    return input.is_cuda


def _mode(module, input: torch.Tensor) -> str:
    """The call's mode: "train" when autograd will need the layer's backward, else "fwd"."""
    if not torch.is_grad_enabled():
        return "fwd"
    if input.requires_grad:
        return "train"
    for p in module.parameters():
        if p.requires_grad:
            return "train"
    return "fwd"


# PyTorch runs cuDNN's persistent fp16 LSTM kernel for one-layer, one-direction layers
# without a projection, H <= 1024, H and the input size multiples of 128, a batch that is a
# multiple of 8 up to 128, on GPUs of compute capability 8.0+ but 8.6 with 98+ SMs
# (aten/src/ATen/native/cudnn/RNN.cpp, get_algo). Up to batch 16 it beat the kernels at every
# shape the H200 measured (fp16 B = 8, 16, H = 256-1024, T = 256: 1.1-2.7x, forward and
# training; perf/results/nvidia-h200/results.csv), so where no table measured a GPU, auto
# gives it those calls. Larger batches went either way there: they need a table.
PERSISTENT_CUDNN_MAX_BATCH = 16


def cudnn_persistent_wins(module, input: torch.Tensor) -> bool:
    """Whether nn.LSTM would run cuDNN's persistent fp16 kernel on this batched call at a
    batch where it beat the kernels on the H200 (rule above)."""
    if input.dim() != 3 or compute_dtype(input) != torch.float16:
        return False
    if module.num_layers != 1 or module.bidirectional or module.proj_size > 0:
        return False
    if (module.hidden_size > 1024 or module.hidden_size % 128 or module.input_size % 128
            or not torch.backends.cudnn.enabled):
        return False
    batch = _batch_of(module, input)
    if batch % 8 or batch > PERSISTENT_CUDNN_MAX_BATCH:
        return False
    major, minor, num_sms = tuning.device_arch(input.device)
    return major >= 8 and (major, minor) != (8, 6) and num_sms >= 98


# An fp32 layer's GEMMs (the input projection; in training also dx, dW_ih and dW_hh) run in
# full fp32 on the "torch" engine unless torch.matmul may use tf32, while nn.LSTM's run in
# tf32 wherever cuDNN's RNN may (its default), several times faster on tensor cores (sm_80+).
# Their work grows as B H (I + R) a step (R: proj_size, else H), and where it passed these
# sizes nn.LSTM was faster at the fp32 shapes the H200's table measured, the kernels below
# them: 47 of its 48 fp32 decisions (the 48th, B = 512 H = 256 training, kernels 45.3 against
# 50.7 µs/step, where make perf then timed nn.LSTM at 38.0: perf/NOTES.md). Where no table
# measured a GPU, auto gives such calls to nn.LSTM.
FP32_GEMM_WORK = {"fwd": 1 << 27, "train": 1 << 26}


@torch.compiler.assume_constant_result     # flags torch.compile cannot read while tracing
def _gemms_full_against_tf32(device: torch.device) -> bool:
    """Whether the kernels' fp32 GEMMs run in full fp32 where nn.LSTM's cuDNN runs tf32."""
    return (torch.backends.cudnn.enabled and cudnn_rnn_allows_tf32()
            and not torch_matmul_allows_tf32() and not gemms_in_triton(torch.float32, device))


def fp32_gemms_outweigh(module, input: torch.Tensor) -> bool:
    """Whether this batched fp32 call's GEMMs would run in full fp32 against nn.LSTM's tf32,
    at a size past FP32_GEMM_WORK for its mode (rule above)."""
    if input.dim() != 3 or compute_dtype(input) != torch.float32:
        return False
    if tuning.device_arch(input.device)[0] < 8 or not _gemms_full_against_tf32(input.device):
        return False
    outputs = module.proj_size or module.hidden_size
    inputs = module.input_size
    if module.num_layers > 1:
        inputs = max(inputs, outputs * (2 if module.bidirectional else 1))
    work = _batch_of(module, input) * module.hidden_size * (inputs + outputs)
    return work >= FP32_GEMM_WORK[_mode(module, input)]


def auto_uses_kernels(module, input: torch.Tensor) -> bool:
    """backend="auto": whether this call runs the kernels (rule in the module docstring)."""
    if not _on_cuda(input):
        return False
    dtype_name = DTYPE_NAMES.get(compute_dtype(input))
    if input.dim() != 3 or dtype_name is None:
        return True
    decisions = tuning.bucket_decisions(
        tuning.decision_gpu(input.device), dtype_name, module.hidden_size,
        2 if module.bidirectional else 1, module.proj_size > 0)
    if not decisions:
        return not (cudnn_persistent_wins(module, input) or fp32_gemms_outweigh(module, input))
    batch = _batch_of(module, input)
    bucket = tuning.batch_bucket([b for b, _, _ in decisions], batch)
    for measured, inference, training in decisions:
        if measured == bucket:
            return training if _mode(module, input) == "train" else inference
    return True


# -- explain -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Explanation:
    """Which path a call of a triton_lstm.LSTM runs, and why. ``print`` it to read it."""
    path: str                            # "kernels", "nn.LSTM", or "error" (the call raises)
    why: str
    call: str                            # the call as the decision saw it
    entry: Optional[dict] = None         # the table entry the decision came from
    provenance: Optional[dict] = None    # that table's provenance
    tiles: Optional[dict] = None         # {"forward": (config, source), "backward": ...}
    gemms: Optional[str] = None          # who runs the layers' GEMMs, and when (dispatch)

    def __str__(self) -> str:
        headline = {"kernels": "the Triton kernels run this call",
                    "nn.LSTM": "nn.LSTM runs this call", "error": "this call raises"}[self.path]
        lines = [f"triton_lstm: {headline}", f"  call:  {self.call}", f"  why:   {self.why}"]
        if self.provenance:
            # T: the layer timings' (what the choice rests on); older tables have only "steps"
            p = dict(self.provenance)
            p.setdefault("layer_steps", p.get("steps"))
            facts = [f"{name} {p[key]}" for name, key in (
                ("measured on", "gpu"), ("at commit", "commit"), ("on", "date"), ("torch", "torch"),
                ("triton", "triton"), ("CUDA", "cuda"), ("T =", "layer_steps")) if p.get(key)]
            lines.append("  table: " + ", ".join(facts))
        for kernel, (config, source) in (self.tiles or {}).items():
            lines.append(f"  {kernel} tiles: {tuning.config_label(config)} ({source})")
        if self.gemms:
            lines.append(f"  GEMMs: {self.gemms}")
        return "\n".join(lines)


def _batch_of(module, input) -> int:
    if isinstance(input, PackedSequence):
        return int(input.batch_sizes[0])
    if input.dim() == 2:
        return 1
    return input.shape[0 if module.batch_first else 1]


def _gemms(dtype: torch.dtype, device: torch.device) -> str:
    """Who runs the input projection and the gradient GEMMs of the kernels' layers."""
    if gemms_in_triton(dtype, device):
        return f"kernels/gemm.py, {dot_precision(dtype, device)} ({FP32_GEMMS_ENV}=triton)"
    return "torch"


def _steps_of(module, input) -> int:
    if isinstance(input, PackedSequence):
        return len(input.batch_sizes)
    if input.dim() == 2:
        return input.shape[0]
    return input.shape[1 if module.batch_first else 0]


def _chunks(module, input, mode: str) -> str:
    """How the call's GEMMs meet its recurrence where that is not the default, whole GEMMs
    before the forward's one launch and after the backward's (overlap.py decides)."""
    if module.wavefront and module.num_layers > 1:
        return ""   # the wavefront's own
    directions, steps = 2 if module.bidirectional else 1, _steps_of(module, input)
    said = ""
    try:
        chunks = forward_chunks_for(directions, steps, ())
    except ValueError as error:
        return f"; the forward raises ValueError: {error}"
    if chunks:
        said += (f"; the forward in {chunks} chunks of steps, each chunk's input projection "
                 f"beside the recurrence of the chunk before "
                 f"({FORWARD_CHUNKS_ENV}={forward_chunk_count()})")
    if mode != "train":
        return said     # no backward
    try:
        chunks = backward_chunks_for(directions, module.recompute or 0, steps, ())
    except ValueError as error:
        return said + f"; the backward raises ValueError: {error}"
    if chunks:
        said += (f"; the backward in {chunks} chunks of steps, each chunk's GEMMs beside the "
                 f"next chunk's recurrence ({BACKWARD_CHUNKS_ENV}={backward_chunk_count()})")
    return said


def _tiles(module, data: torch.Tensor, batch: int, dtype: torch.dtype) -> dict:
    """The configs the launches would take, without tuning anything."""
    directions, proj = 2 if module.bidirectional else 1, module.proj_size > 0
    num_sms = tuning.sm_count(data.device)
    if module.wavefront and module.num_layers > 1:
        return {kernel: (wavefront_config(batch, module.hidden_size, module.num_layers, dtype,
                                          num_sms, kernel), "wavefront heuristic")
                for kernel in tuning.KERNELS}
    tiles = {}
    for kernel in tuning.KERNELS:
        found = tuning.measured_config(kernel, batch, module.hidden_size, dtype, data.device,
                                       directions, proj, tune_if_missing=False)
        if found is None:
            found = (heuristic_config(batch, module.hidden_size, dtype,
                                      max(1, num_sms // directions), kernel, proj), "heuristic")
        tiles[kernel] = found
    return tiles


def explain(module, input, hx=None) -> Explanation:
    """Which path ``module(input, hx)`` runs (the kernels or nn.LSTM) and why.

    Args:
        module: a triton_lstm.LSTM. input: what you would call it with ([T, B, I],
            [B, T, I] with batch_first, [T, I] unbatched, or a PackedSequence).
        hx: the state you would pass; it does not change the path. (A call with reset=
            runs the kernels on CUDA whatever the table says: nn.LSTM has no resets.)
    Returns:
        an Explanation: ``.path`` ("kernels", "nn.LSTM" or "error"), ``.why``, the table entry and
        its provenance when one decided, the tile configs; ``print`` shows all of it.

    The mode is the one of the call: training when gradients are enabled and the input
    or a parameter requires them, inference otherwise.

    Example:
        >>> print(triton_lstm.explain(lstm, x))
        triton_lstm: the Triton kernels run this call
          call:  bf16 B=8 H=512, 1 direction, no projection, inference
          why:   table for NVIDIA H200, nearest measured shape bf16 B=8 H=512: ...
    """
    from .module import exporting   # module.py imports this file

    data = input.data if isinstance(input, PackedSequence) else input
    dtype = compute_dtype(data)
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    batch, hidden = _batch_of(module, input), module.hidden_size
    directions, proj = 2 if module.bidirectional else 1, module.proj_size > 0
    mode = _mode(module, data)
    call = (f"{dtype_name} B={batch} H={hidden}, {directions} direction{'s' * (directions - 1)}, "
            f"{'proj_size=%d' % module.proj_size if proj else 'no projection'}, "
            f"{'training' if mode == 'train' else 'inference'}, {data.device.type}")

    def kernels(why, **found):
        return Explanation("kernels", why, call, tiles=_tiles(module, data, batch, dtype),
                           gemms=_gemms(dtype, data.device) + _chunks(module, input, mode),
                           **found)

    if module.backend == "torch":
        return Explanation("nn.LSTM", "backend='torch' always runs nn.LSTM", call)
    if exporting():
        return Explanation("nn.LSTM", "an exporter is recording the model: exported programs "
                           "hold nn.LSTM's op (aten.lstm)", call)
    if module.backend == "triton":
        if not _on_cuda(data) and not interpreting():
            return Explanation("error", "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 "
                               "on CPU: the call raises RuntimeError", call)
        return kernels("backend='triton' always runs the kernels")
    if not _on_cuda(data):
        return Explanation("nn.LSTM", "CPU tensors: backend='auto' runs nn.LSTM's CPU "
                           "implementation", call)
    if data.dim() != 3:
        return kernels("2-D input (unbatched, packed data or one step): backend='auto' keeps "
                       "the kernels; the table measures batched sequences")
    if module.recompute is not None:
        return kernels(f"recompute={module.recompute}: only the kernels keep the state every "
                       "few steps instead of every step's gates (a call with reset= also keeps "
                       "the kernels: nn.LSTM has no resets)")
    if module.wavefront:
        return kernels("wavefront=True: only the kernels run a stack of layers as one "
                       "wavefront (the table measures layers one at a time)")
    own = tuning.device_name(data.device)
    gpu = tuning.decision_gpu(data.device)
    table = tuning.load_table(gpu)
    borrowed = (f"no table measured for {own}; its chip's, measured on {gpu} (same compute "
                f"capability and SM count), decides: " if gpu != own else "")

    def unmeasured(why, **found):   # the rule without a measurement (auto_uses_kernels)
        if cudnn_persistent_wins(module, data):
            return Explanation("nn.LSTM", f"{why}; nn.LSTM runs cuDNN's persistent fp16 kernel "
                               f"here (fp16, one layer, batch <= {PERSISTENT_CUDNN_MAX_BATCH}), "
                               "which beat the kernels at every such shape the H200 measured: "
                               "nn.LSTM", call, **found)
        if fp32_gemms_outweigh(module, data):
            return Explanation("nn.LSTM", f"{why}; the kernels' fp32 GEMMs would run in full "
                               "fp32 (torch.matmul without tf32) where nn.LSTM's run in tf32, "
                               "at a size where nn.LSTM beat the kernels at the fp32 shapes the "
                               "H200 measured (B x H x (input + output size) >= "
                               f"{FP32_GEMM_WORK[mode]:,}): nn.LSTM", call, **found)
        return kernels(f"{why}: the kernels, as without measurements", **found)

    if not table:
        return unmeasured(f"no table measured for {gpu} ({tuning.table_path(gpu).name} is not "
                          "in triton_lstm/configs)")
    entry = tuning.nearest_entry(table, dtype_name, batch, hidden, directions, proj)
    found = dict(entry=entry, provenance=table.get("provenance"))
    if entry is None:
        return unmeasured(f"{borrowed}the table for {gpu} has no {dtype_name} shape with "
                          f"{directions} direction(s), {'a' if proj else 'no'} projection and H "
                          f"within a factor {tuning.MAX_H_RATIO:g} of {hidden}",
                          provenance=found["provenance"])
    near = (f"{borrowed}table for {gpu}, nearest measured shape {dtype_name} B={entry['B']} "
            f"H={entry['H']}")
    faster = tuning.kernels_faster(entry, mode)
    if faster is None:
        return kernels(f"{near}: no kernel and nn.LSTM numbers for {mode} there: the kernels",
                       **found)
    timed = "forward + backward" if mode == "train" else "forward"
    if "layer_steps" in entry:
        timed += f", at T = {entry['layer_steps']}"
    numbers = (f"kernels {entry['kernels_us'][mode]:.2f} µs/step, nn.LSTM "
               f"{entry['cudnn_us'][mode]:.2f} µs/step ({timed}); "
               f"the kernels run where they take <= {KERNEL_ADVANTAGE:.0%} of nn.LSTM's time")
    if faster:
        return kernels(f"{near}: {numbers}", **found)
    return Explanation("nn.LSTM", f"{near}: {numbers}", call, **found)
