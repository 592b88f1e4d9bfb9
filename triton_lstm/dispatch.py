"""How a recurrence is launched: tile config, persistent or stepped, batch chunks.

A persistent launch is only safe when every program of a barrier group is
resident at once. We compile the kernel, count how many of its programs fit on
the device (registers, shared memory, threads per SM), and launch persistently
only if a whole group fits; the launch is also cooperative where Triton offers
it, so a misjudged grid fails loudly instead of hanging. Batch blocks beyond
what fits run as further persistent launches, one after another (they are
independent problems). If not even one group fits, the same kernel runs in
stepped mode: one launch per step. Under the Triton interpreter programs run one
after another, so a group of several programs would wait at the barrier forever:
there only groups of one program (one hidden block) launch persistently, which
keeps the persistent path under the CPU tests.

Tile configs come from what was measured (tuning.py: ``configs/<gpu>.json``
written by ``make tune``, or first-use autotuning), otherwise from a heuristic.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import os
import pathlib
from typing import Optional

import torch
import triton

from .kernels.barrier import interpreting, leader_increment
from .kernels.dsmem import region_bytes

CONFIG_DIR = pathlib.Path(__file__).parent / "configs"
# Shared memory a resident program may use: its weight slice plus one staged
# [BLOCK_B, HP] operand tile (Hopper has ~227 KB per SM; leave room for shuffles).
ON_CHIP_BUDGET = 200 * 1024
STAGED_BYTES = 256          # [BLOCK_B, HP] operand per thread that spills with 16 warps
PIPELINE_STAGES = 3         # of a pipelined streamed K loop (cp.async ring, one group in flight)
_COUNTER_SLOTS = 4096

try:
    from triton.backends.nvidia.compiler import CUDAOptions
    COOPERATIVE_LAUNCH = "launch_cooperative_grid" in {f.name for f in dataclasses.fields(CUDAOptions)}
except ImportError:  # pragma: no cover - Triton without the NVIDIA backend
    COOPERATIVE_LAUNCH = False


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile shape of one program.

    block_b: batch rows per program; block_h: hidden units per program (all four
    gates); resident: keep the weight slice on chip for the whole sequence,
    else stream it in block_k chunks every step; split_k: slices of the
    recurrent reduction given to different warps (resident only; with chunked, the
    accumulators the chunks take in turn within each warp: 1, 2 or 4); num_warps:
    warps per program; inner_stages: software-pipeline stages of the streamed
    K loops (1: none; the persistent time loop itself is never pipelined);
    prefetch_after_arrive: issue the next step's independent loads after this
    program's barrier arrival instead of before it; chunked (with resident):
    keep the weight slice on chip as block_k chunks of the reduction and stage
    the broadcast operand (h, or dG) one chunk at a time, for large H;
    dataflow: no grid barrier, each program polls the tile it reads until it
    is written (kernels/barrier.py); gate_split (backward, streamed, no projection,
    no dataflow): dh = dG @ W_hh as a phase of its own, split four ways along the
    reduction (kernels/backward.py); cluster: each barrier group (2-8 hidden blocks, or
    16) runs as one thread-block cluster and meets at the hardware cluster barrier
    instead of the counter (sm_90+; kernels/barrier.py, ``cluster_size``); dsmem (with
    cluster, the forward, resident, no projection): each program pushes its h into every
    program's shared memory and waits on its own mbarrier for the bytes, no barrier at all
    (kernels/dsmem.py); registers: the small-batch kernels with their weights in registers,
    on their own fixed tiles and with dataflow waits, the forward with no shared memory in a
    step (kernels/forward_registers.py), the backward with one round trip through it
    (kernels/backward_registers.py), where they run (bf16/fp16 with H <= 512, fp32 in tf32
    with H <= 256; the backward H <= 1024, fp32 512, two warps a gate past those; no
    projection, restarts, checkpoints or chunks; every program resident); with dsmem too,
    the registers kernels run each batch block's programs as one cluster that pushes h (dG)
    through shared memory (sm_90+, clusters of 2-8 programs or 16: forward_registers.
    exchange_shape, backward_registers.exchange_programs), elsewhere they read it from L2;
    elsewhere this config's tile; ring (the forward): its tile (64 rows, streamed,
    inner_stages the ring's slots) in kernels/forward_ring.py, with the weight slice in
    shared memory for the whole sequence and h read into a ring of cp.async copies, where
    that runs (bf16 / fp16, the slice in shared memory, no projection, restarts,
    checkpoints or chunks, every program resident); elsewhere, and in the backward, this
    config's tile.
    """
    block_b: int
    block_h: int
    resident: bool = True
    block_k: int = 64
    split_k: int = 4
    num_warps: int = 4
    inner_stages: int = 1
    prefetch_after_arrive: bool = False
    chunked: bool = False
    dataflow: bool = False
    gate_split: bool = False
    cluster: bool = False
    dsmem: bool = False
    registers: bool = False
    ring: bool = False

    def num_h_blocks(self, hidden_size: int) -> int:
        return cdiv(hidden_size, self.block_h)


# triton.cdiv and triton.next_power_of_2 are ConstexprFunctions: ~1.5 µs a call from host
# code (Triton 3.6 and 3.9), and the launchers size every launch with them. Host code uses
# these instead; kernels keep triton's.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded(hidden_size: int) -> int:
    """Reduction length of the recurrent dot: H rounded up to a power of two (>= 16)."""
    return max(16, next_power_of_2(hidden_size))


# The registers forward (kernels/forward_registers.py) holds a [16, HP] weight slice in the
# MMA's operand registers, 1/32 of it a thread: at most 512 bytes (128 registers, half). The
# registers backward (kernels/backward_registers.py) holds one of the same size a warp, a
# gate's whole reduction or half of it.
REGISTERS_SLICE_BYTES = 1024


def registers_forward_fits(hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the registers forward's weight slice fits in its registers: bf16 / fp16 with
    H <= 512, fp32 (which it runs in tf32 only, where nn.LSTM's rule allows) with H <= 256."""
    return (dtype in (torch.float16, torch.bfloat16, torch.float32)
            and padded(hidden_size) * dtype.itemsize <= REGISTERS_SLICE_BYTES)


# The forward with its weights in shared memory and h in a ring of copies (kernels/
# forward_ring.py): 64 batch rows a program (wgmma's M for its one warpgroup), chunks of 64.
RING_ROWS = 64
RING_BLOCK_K = 64


def ring_shared_bytes(hidden_size: int, block_h: int, stages: int) -> int:
    """Shared memory of a ring forward program (2-byte dtypes): its weight slice, its ring of
    h chunks, and the product once in fp32 to split it into the gates."""
    return (padded(hidden_size) * 4 * block_h * 2 + stages * RING_ROWS * RING_BLOCK_K * 2
            + RING_ROWS * 4 * block_h * 4)


def ring_forward_fits(config: KernelConfig, hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether `config`'s tile is one the ring forward takes: bf16 / fp16, 64 rows, 8-32
    units, a ring of 3-8 stages of chunks of 64 (two chunks at least), all within
    ON_CHIP_BUDGET of shared memory."""
    return (dtype in (torch.bfloat16, torch.float16) and config.block_b == RING_ROWS
            and config.block_h in (8, 16, 32) and config.block_k == RING_BLOCK_K
            and 3 <= config.inner_stages <= 8 and padded(hidden_size) >= 2 * RING_BLOCK_K
            and ring_shared_bytes(hidden_size, config.block_h, config.inner_stages)
            <= ON_CHIP_BUDGET)


def registers_backward_fits(hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether the registers backward's weight slices fit in its registers: as the forward's,
    or split in two halves of the reduction, a warp each (bf16 / fp16 H <= 1024, fp32 512)."""
    return (dtype in (torch.float16, torch.bfloat16, torch.float32)
            and padded(hidden_size) * dtype.itemsize <= 2 * REGISTERS_SLICE_BYTES)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tf32 for fp32 on GPU when cuDNN's RNN may use it (nn.LSTM's rule), exact otherwise."""
    if dtype == torch.float32 and device.type == "cuda" and cudnn_rnn_allows_tf32():
        return "tf32"
    return "ieee"


# Who runs an fp32 layer's GEMMs (the input projection and the gradient GEMMs over dG):
# "torch" (torch.matmul, which uses tf32 only under torch.backends.cuda.matmul's flag, off by
# default) or "triton" (kernels/gemm.py in tf32 where nn.LSTM's rule allows it, like the
# recurrence's own dots). Other dtypes always use torch's. "torch" stays the default until
# a GPU measurement (perf/gemm_paths.py) shows the kernel faster.
FP32_GEMMS_ENV = "TRITON_LSTM_FP32_GEMMS"
FP32_GEMM_ENGINES = ("torch", "triton")
fp32_gemms = os.environ.get(FP32_GEMMS_ENV, "torch")


def gemms_in_triton(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a layer's GEMMs run in kernels/gemm.py: with ``fp32_gemms = "triton"``, the
    fp32 GEMMs that may use tf32 (an exact one is faster in cuBLAS), and under the
    interpreter every fp32 GEMM, so that the CPU tests cover the path."""
    if fp32_gemms not in FP32_GEMM_ENGINES:
        raise ValueError(f"{FP32_GEMMS_ENV} (dispatch.fp32_gemms): expected one of "
                         f"{', '.join(FP32_GEMM_ENGINES)}, got {fp32_gemms!r}")
    if dtype != torch.float32 or fp32_gemms != "triton":
        return False
    return interpreting() or dot_precision(dtype, device) == "tf32"


# Where the bias gradient's sum over dG is made: "torch" sums dG after the backward kernel,
# "kernel" has the backward kernel's streamed tiles (large batch) sum each step's dG tiles
# over their rows as they write them (kernels/backward.py, BIAS_SUMS).
BIAS_SUMS_ENV = "TRITON_LSTM_BIAS_SUMS"
BIAS_SUMS_ENGINES = ("torch", "kernel")
bias_sums = os.environ.get(BIAS_SUMS_ENV, "torch")


def bias_sums_in_kernel(config: KernelConfig) -> bool:
    """Whether a backward launch of ``config`` sums dG for the bias gradient as it goes: with
    ``bias_sums = "kernel"`` (under the interpreter always, so that the CPU tests cover it) and
    streamed tiles, whose batch blocks are large: a resident tile's step is latency, which
    the sum would lengthen, and its sums ([T, batch blocks, 4H] fp32) would near dG's own
    size where a batch block holds a row or two."""
    if bias_sums not in BIAS_SUMS_ENGINES:
        raise ValueError(f"{BIAS_SUMS_ENV} (dispatch.bias_sums): expected one of "
                         f"{', '.join(BIAS_SUMS_ENGINES)}, got {bias_sums!r}")
    return (interpreting() or bias_sums == "kernel") and not config.resident


# The backward of a one-direction layer in this many chunks of steps, each chunk's GEMMs
# over dG on a side stream beside the next chunk's reverse recurrence (overlap.py); 0 or 1:
# one launch, then the GEMMs. 0 stays the default until a GPU measurement
# (perf/train_breakdown.py --backward-chunks) shows the chunks faster.
BACKWARD_CHUNKS_ENV = "TRITON_LSTM_BACKWARD_CHUNKS"
backward_chunks = os.environ.get(BACKWARD_CHUNKS_ENV, "0")
# The forward of a one-direction layer in this many chunks of steps, the input projection
# of each chunk on a side stream beside the recurrence of the chunk before (overlap.py);
# 0 or 1: the whole projection, then one launch. 0 until a GPU measurement
# (perf/train_breakdown.py --forward-chunks) shows the chunks faster.
FORWARD_CHUNKS_ENV = "TRITON_LSTM_FORWARD_CHUNKS"
forward_chunks = os.environ.get(FORWARD_CHUNKS_ENV, "0")


def backward_chunk_count() -> int:
    """``backward_chunks`` as a number (the variable's text, or an int set at run time)."""
    return _chunk_count(backward_chunks, BACKWARD_CHUNKS_ENV, "backward_chunks")


def forward_chunk_count() -> int:
    """``forward_chunks`` as a number (the variable's text, or an int set at run time)."""
    return _chunk_count(forward_chunks, FORWARD_CHUNKS_ENV, "forward_chunks")


def _chunk_count(value, env: str, name: str) -> int:
    count = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or count < 0:
        raise ValueError(f"{env} (dispatch.{name}): expected a whole number of chunks >= 0, "
                         f"got {value!r}")
    return count


def cudnn_rnn_allows_tf32() -> bool:
    """The flag nn.LSTM's cuDNN path follows: torch.backends.cudnn.rnn.fp32_precision (read
    back resolved through its parents) where torch has it, else cudnn.allow_tf32. The legacy
    flag raises once the RNN and convolution flags are set apart through the new API."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    precision = getattr(rnn, "fp32_precision", None)
    if precision is None:
        return torch.backends.cudnn.allow_tf32
    return precision == "tf32"


def torch_matmul_allows_tf32() -> bool:
    """The flag torch.matmul follows for fp32 (the layers' GEMMs on the "torch" engine):
    torch.backends.cuda.matmul.fp32_precision where torch has it, else its allow_tf32;
    off by default, unlike cuDNN's RNN flag."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return matmul.allow_tf32
    return precision == "tf32"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the cell state and gate math: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: t itself where it is in dtype already, with no op. The autograd Functions
    return their outputs through this: under torch.compile in torch 2.11 (not in 2.13), an
    output made by an op that returns its own input (``.to`` its own dtype, ``.contiguous()``
    of a contiguous tensor) got zeros for its gradient."""
    return t if t.dtype == dtype else t.to(dtype)


def staged_bytes(hidden_size: int, block_b: int, dtype: torch.dtype, num_warps: int) -> int:
    """Bytes per thread of a [BLOCK_B, HP] operand staged for the recurrent dot."""
    return block_b * padded(hidden_size) * dtype.itemsize // (32 * num_warps)


def resident_operand_spills(hidden_size: int, block_b: int, dtype: torch.dtype,
                            num_warps: int) -> bool:
    """Whether a resident program's staged [BLOCK_B, HP] operand spills registers every step:
    256+ bytes of it per thread, with 16 warps (H200: bf16 B=512 H=512 on 128x16 tiles ran
    420-1240 us/step, fp32 B=512 H=256 275) or with 128 rows (ptxas on sm_90: bf16 B=512
    H=256 on 128x8 tiles at 8 warps spills 688 bytes; it ran 24.9 us/step, the fp32 tile
    streamed 6.1)."""
    return (staged_bytes(hidden_size, block_b, dtype, num_warps) >= STAGED_BYTES
            and (num_warps >= 16 or block_b >= 128))


def on_chip_bytes(hidden_size: int, block_b: int, block_h: int, dtype: torch.dtype) -> int:
    """Shared memory of a resident program: the [HP, 4*BLOCK_H] weight slice and a [BLOCK_B, HP] tile."""
    return padded(hidden_size) * (4 * block_h + block_b) * dtype.itemsize


def pipelined_bytes(block_b: int, block_h: int, block_k: int, dtype: torch.dtype,
                    stages: int, weight_columns: Optional[int] = None) -> int:
    """Shared memory of a streamed program's pipelined K loop: `stages` chunks of its weight
    slice [BLOCK_K, weight_columns] and of the broadcast tile [BLOCK_B, BLOCK_K] (what ptxas
    reports for the wgmma tiles on sm_90; the mma.sync ones use less). The forward's slice
    has 4*BLOCK_H columns (the default), the backward's dh loop BLOCK_H (its output units),
    its gate split's GEMM phase 4*BLOCK_H."""
    columns = 4 * block_h if weight_columns is None else weight_columns
    return stages * block_k * (columns + block_b) * dtype.itemsize


@functools.lru_cache(maxsize=4096)     # asked at every launch; ~10 µs of Python to work out
def heuristic_config(batch: int, hidden_size: int, dtype: torch.dtype, num_sms: int,
                     kernel: str = "forward", proj: bool = False) -> KernelConfig:
    """A sensible tile without measurements (``make tune`` measures better ones).

    Hidden blocks of 8+ units (at most 64 blocks), batch blocks of 16+ rows, the
    grid within one launch where the tiles allow; weights on chip when they fit,
    else streamed. proj: the layer has a projection (the backward's gate split and
    pipelined loop were measured without one).
    """
    block_h = 8
    while cdiv(hidden_size, block_h) > 64 and block_h < 64:
        block_h *= 2

    def programs(bb, bh):
        return cdiv(hidden_size, bh) * cdiv(batch, bb)

    # Spread the batch over blocks of 16+ rows while the grid fits one launch ...
    block_b = 16
    while programs(block_b, block_h) > num_sms and block_b < min(128, next_power_of_2(batch)):
        block_b *= 2
    # ... then wider hidden blocks, up to a tile of 2048 cells (more would spill registers);
    # what still does not fit one launch runs as several launches over the batch.
    while programs(block_b, block_h) > num_sms and block_b * block_h < 2048:
        block_h *= 2

    def fits(bh):
        return on_chip_bytes(hidden_size, block_b, bh, dtype) <= ON_CHIP_BUDGET

    # Smaller hidden blocks (more programs) keep the weights on chip where a group still fits.
    while not fits(block_h) and block_h > 8 and programs(block_b, block_h // 2) <= num_sms:
        block_h //= 2
    split_k, num_warps = min(4, padded(hidden_size) // 16), 8
    if block_b == 16:
        # Small batch: 4 warps, one unsplit dot per step (H200: bf16 B=8 H=512 forward
        # 2.45 us/step this way, 2.89 with split_k=4 and 4 warps, more with 8 warps).
        # The backward reads its weight slice into registers gate by gate and spills
        # past ~512 bytes of slice per thread: 8 warps and a split reduction there.
        slice_per_thread = padded(hidden_size) * 4 * block_h * dtype.itemsize // (32 * 4)
        if not (kernel == "backward" and slice_per_thread > 512):
            split_k, num_warps = 1, 4
    elif block_b * block_h * (dtype.itemsize if dtype.itemsize > 2 else 1) > 1024:
        # Larger tiles: warps grow with the tile (the cell state and the prefetched
        # operands of the next step live in registers), so that nothing spills.
        num_warps = 16
    # A resident program whose staged operand would spill streams its weights instead
    # (streamed 128x16 tiles at bf16 B=512 H=1024: 24 us/step, no spill).
    resident = fits(block_h) and not resident_operand_spills(hidden_size, block_b, dtype,
                                                             num_warps)
    block_k = min(64, padded(hidden_size))
    # A streamed forward of 32+ rows pipelines its K loop where the stages fit on chip
    # (H200, kernel alone: bf16 B=128 H=1024 10.1 -> 6.4 us/step, B=512 H=1024 27.4 -> 20.2,
    # fp32 B=512 H=1024 47.7 -> 34.9). The backward's: below.
    pipelined = (kernel == "forward" and not resident and block_b >= 32 and pipelined_bytes(
        block_b, block_h, block_k, dtype, PIPELINE_STAGES) <= ON_CHIP_BUDGET)
    if (kernel == "backward" and not resident and block_b >= 64
            and (num_warps < 16 or block_b >= 128)):
        # A streamed backward step reads its rows' whole 4H-wide dG and its units' slice of
        # W_hh: half the rows and twice the units move fewer bytes for the same tile (H200,
        # every streamed backward of 64+ rows measured: 9-25% faster, e.g. bf16 B=512 H=1024
        # 87 -> 75 us/step, B=128 H=1024 33.9 -> 26.2, fp32 B=512 H=256 19.6 -> 14.3). With 16
        # warps, tiles of under 64 rows spill.
        block_b, block_h = block_b // 2, block_h * 2
    # A streamed backward at batch 64+ without projection splits dh = dG W_hh by gate: on
    # every tile make tune timed both ways it was 1.3-2.6x faster (H200, T = 64, us/step:
    # bf16 B=512 H=1024 64x32 75.1 -> 32.8, B=128 H=1024 32x32 26.2 -> 14.4, B=512 H=512
    # 19.0 -> 11.2, fp32 B=128 H=1024 49.1 -> 30.0, B=128 H=512 29.5 -> 11.1; fp16 alike).
    # In 2-byte dtypes its K loop is pipelined too (every 16-bit backward tile timed both
    # ways was faster so, e.g. 32.8 -> 24.2, 14.4 -> 10.8, and all 50 checked right).
    # fp32's stays unpipelined: there the gate split was faster without it (30.0 against
    # 36.3, 11.1 against 12.1), and one pipelined fp32 backward tile computed wrong results
    # on the GPU, not yet understood (perf/NOTES.md, run 6).
    gate_split = (kernel == "backward" and not resident and batch >= 64 and not proj
                  and dtype.itemsize <= 4)
    if gate_split and dtype.itemsize == 2:
        pipelined = pipelined_bytes(block_b, block_h, block_k, dtype, PIPELINE_STAGES,
                                    4 * block_h) <= ON_CHIP_BUDGET
    return KernelConfig(block_b=block_b, block_h=block_h, resident=resident, block_k=block_k,
                        split_k=split_k, num_warps=num_warps,
                        inner_stages=PIPELINE_STAGES if pipelined else 1, gate_split=gate_split)


def gate_split_applies(config: KernelConfig, proj: bool) -> bool:
    """Whether a backward config's gate split can run: its GEMM phase streams the weights,
    reuses one scratch buffer every step (no dataflow waits) and has no projection phase
    to share the step with. Elsewhere the config runs without it."""
    return config.gate_split and not (config.resident or config.dataflow or proj)


def cluster_programs(programs: int) -> Optional[int]:
    """Programs of a cluster that holds `programs`: as many where Triton's launcher starts a
    cluster of that size (2-8, or 16, the largest of sm_90, non-portable), 16 for 9-15 (the
    programs past `programs` have no units), None below 2 or past 16."""
    if 2 <= programs <= 8 or programs == 16:
        return programs
    return 16 if 9 <= programs <= 15 else None


def cluster_size(config: KernelConfig, hidden_size: int, device: torch.device,
                 shared_barrier: bool = False) -> int:
    """Programs per thread-block cluster of a persistent launch: the barrier group's hidden
    blocks where the config asks for the cluster barrier and it can run, else 1 (the counter
    barrier). It runs on CUDA devices of sm_90+, for groups of 2-8 programs, or 16 (the
    largest cluster of sm_90, which Triton's launcher allows at 16), of one batch block and
    direction (not the wavefront's group across layers), and only with a barrier (not
    with dataflow waits)."""
    if not config.cluster or config.dataflow or shared_barrier or device.type != "cuda":
        return 1
    num_h = config.num_h_blocks(hidden_size)
    if cluster_programs(num_h) != num_h:      # a cluster the launcher starts, of these alone
        return 1
    from . import tuning   # tuning imports this module
    return num_h if tuning.device_arch(device)[0] >= 9 else 1


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the file name of a GPU's tuned configs and results."""
    return "-".join(gpu_name.lower().replace("_", " ").split())


def pick_config(batch: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                kernel: str = "forward", num_directions: int = 1,
                proj: bool = False) -> KernelConfig:
    """The tile config of a launch: a measured one (tuning.measured_config: forced by a
    sweep, tuned on first use with TRITON_LSTM_AUTOTUNE=1, or ``make tune``'s table for this
    GPU at the nearest shape), else the heuristic.

    kernel: "forward" or "backward" (they are tuned separately); proj: the layer has a
    projection (measured apart). Both directions of a bidirectional layer share the
    device, so each gets half of it.
    """
    from . import tuning   # tuning measures through the launchers, which import this module
    measured = tuning.measured_config(kernel, batch, hidden_size, dtype, device, num_directions,
                                      proj)
    if measured is not None:
        return measured[0]
    num_sms = tuning.sm_count(device)
    return heuristic_config(batch, hidden_size, dtype, max(1, num_sms // num_directions), kernel,
                            proj)


def barrier_counters(device: torch.device) -> torch.Tensor:
    """Zero-initialised barrier counters for this device and stream; they reset themselves."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    return _counters(device, stream)


@functools.lru_cache(maxsize=None)
def _counters(device: torch.device, stream: int) -> torch.Tensor:
    return torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)


def programs_per_sm(compiled, device: torch.device) -> int:
    """How many programs of a compiled kernel one SM holds at once."""
    if hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    props = triton.runtime.driver.active.utils.get_device_properties(device.index)
    num_warps = compiled.metadata.num_warps
    by_threads = 2048 // (32 * num_warps)
    regs_per_warp = cdiv(max(compiled.n_regs, 1) * 32, 256) * 256
    by_regs = (props["max_num_regs"] // regs_per_warp) // num_warps
    shared = compiled.metadata.shared
    by_shared = (props["max_shared_mem"] + 1024) // (shared + 1024) if shared else 32
    return max(0, min(by_threads, by_regs, by_shared, 32))


_capacity_cache: dict = {}
# How many launches of each kind ran ("persistent" / "stepped"): lets tests see the path taken.
launch_counts: collections.Counter = collections.Counter()


def co_resident_programs(kernel, args: tuple, constexprs: dict, config: KernelConfig,
                         device: torch.device) -> int:
    """Programs of this kernel the whole device can hold at once (compiles it once per key)."""
    key = (kernel.fn.__name__, device, tuple(sorted(constexprs.items())), config,
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
    if key not in _capacity_cache:
        compiled = kernel.warmup(*args, grid=(1,), num_warps=config.num_warps, num_stages=1,
                                 **launch_options(), **constexprs)
        from . import tuning   # tuning imports this module
        _capacity_cache[key] = programs_per_sm(compiled, device) * tuning.sm_count(device)
    return _capacity_cache[key]


def launch_options(persistent: bool = True) -> dict:
    """A persistent launch is cooperative where Triton offers it: an oversized grid fails."""
    return {"launch_cooperative_grid": True} if (persistent and COOPERATIVE_LAUNCH) else {}


def launch_in_clusters(kernel, grid: tuple, args: tuple, kwargs: dict, cluster: int,
                       extra_shared: int = 0, pushes: int = 0) -> bool:
    """Launch ``grid`` (2-D) with each ``cluster`` consecutive programs along axis 0 as one
    thread-block cluster, each with ``extra_shared`` bytes of shared memory past Triton's
    own (kernels/dsmem.py); False, with nothing launched, where such a cluster cannot be
    resident (too much shared memory or too many registers for the SMs of one GPC), or
    where the kernel does not hold exactly ``pushes`` st.async instructions (when given).

    The exchange counts bytes, so every element must be pushed by one thread only: the
    pushes of a program's exchanges, divided among its threads, are the st.async a thread
    runs. More means Triton's layout holds some elements in two threads (small tiles),
    which would push them twice.

    Triton asks for clusters only for kernels it compiles across CTAs (num_ctas), which
    splits every tensor over the cluster. These kernels are compiled per program, so the
    launch parameters of the compiled kernel, (num_warps, num_ctas, shared) in Triton
    3.6-3.9, carry the cluster size instead: the launcher then starts
    grid[0] // cluster clusters of ``cluster`` programs, each with its own program id.
    The compiled kernel is looked up for these very arguments and launched directly, so
    no launch of it ever runs outside a cluster (where the cluster barrier would not wait)."""
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    if pushes and compiled.asm["ptx"].count("st.async") != pushes:
        return False
    packed = compiled.packed_metadata
    if packed[1] != cluster:
        if packed[1] != 1 or len(packed) != 3 or getattr(compiled.metadata,
                                                         "global_scratch_size", 0):
            raise RuntimeError(f"triton_lstm: cannot launch {kernel.fn.__name__} in clusters "
                               f"with this Triton (launch parameters {packed})")
        shared = cdiv(compiled.metadata.shared, 16) * 16 + extra_shared
        try:
            compiled._init_handles()
            # Also lets the kernel have that much dynamic shared memory.
            fits = triton.runtime.driver.active.utils.cuOccupancyMaxActiveClusters(
                compiled.function, shared, cluster) >= 1
        except (triton.runtime.errors.OutOfResources, RuntimeError):
            fits = False       # RuntimeError: more shared memory than an SM has
        if not fits:
            return False
        compiled.packed_metadata = (packed[0], cluster, shared)
    values = dict(zip(kernel.arg_names, args), **kwargs)
    compiled[(grid[0] // cluster, grid[1], 1)](*(values[name] for name in kernel.arg_names))
    return True


def lighter_on_chip(config: KernelConfig) -> Optional[KernelConfig]:
    """The config with less shared memory, for a GPU where it does not fit (the budgets here
    are Hopper's): resident weights stream, a pipelined K loop runs unpipelined; None when
    neither applies."""
    if config.resident:
        return dataclasses.replace(config, resident=False)
    if config.inner_stages > 1:
        return dataclasses.replace(config, inner_stages=1)
    return None


def launch_recurrence(kernel, args: tuple, constexprs: dict, *, num_steps: int, batch: int,
                      hidden_size: int, output_size: int, num_directions: int,
                      config: KernelConfig, device: torch.device,
                      force_stepped: bool = False, shared_barrier: bool = False,
                      pushes_per_exchange=None, first_step: int = 0) -> None:
    """Run ``kernel`` over recurrent phases [first_step, num_steps), persistently where it
    is safe.

    ``args`` are the kernel's tensors and sizes up to (and without) the barrier
    counters; ``constexprs`` its shape-independent compile-time flags (the tile
    flags come from ``config``). The grid is (hidden blocks x batch blocks,
    directions); every (direction, batch block) is one barrier group, or with
    ``shared_barrier`` every batch block across grid axis 1 (the wavefront's
    layers, passed as ``num_directions``). A resident config whose tiles do not
    fit the chip falls back to streamed weights, a pipelined one to an unpipelined loop
    (``lighter_on_chip``). ``pushes_per_exchange(config)``: the 32-bit pushes a program of a
    kernel that can push (DSMEM among its flags) makes in one exchange, two exchanges in
    its code (before the loop and in it). A kernel that takes RESUMED (the forward) is told
    per launch whether it starts past phase 0.
    """
    num_h = config.num_h_blocks(hidden_size)
    group = num_h * num_directions          # programs per batch block
    barrier_group = group if shared_barrier else num_h
    counters_per_block = 1 if shared_barrier else num_directions
    num_b = cdiv(batch, config.block_b)
    counters = barrier_counters(device)
    args = args[:-2] + (counters,) + args[-2:]   # the counters come just before T, B
    leader_inc = leader_increment(barrier_group)
    # With a projection every hidden block also owns BLOCK_R of the output units.
    block_r = max(16, next_power_of_2(cdiv(output_size, num_h)))
    if "RESUMED" in constexprs:
        constexprs = dict(constexprs, RESUMED=first_step > 0)
    constexprs = dict(constexprs, BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_R=block_r,
                      # Resident chunks of the reduction divide its padded length.
                      BLOCK_K=(min(config.block_k, padded(min(hidden_size, output_size)))
                               if config.chunked else config.block_k),
                      RESIDENT=config.resident,
                      SPLIT_K=min(config.split_k, padded(min(hidden_size, output_size)) // 16),
                      INNER_STAGES=config.inner_stages if config.inner_stages > 1 else None,
                      PREFETCH_AFTER_ARRIVE=config.prefetch_after_arrive,
                      CHUNKED=config.resident and config.chunked, DATAFLOW=config.dataflow,
                      CLUSTER=False)
    common = dict(num_warps=config.num_warps, num_stages=1, **constexprs)

    cluster = 1 if force_stepped else cluster_size(config, hidden_size, device, shared_barrier)
    # Clusters of one barrier group each: the hardware starts a cluster only when all of its
    # programs fit, and groups do not wait for each other, so every batch block goes in one
    # launch, however many fit at once. A kernel that can push h instead (DSMEM among its
    # flags: the forward) does so with a dsmem config of resident, unchunked tiles.
    if cluster > 1:
        clustered = dict(common, PERSISTENT=True, CLUSTER=True)
        exchange = pushes = 0
        if "DSMEM" in constexprs and config.dsmem and config.resident and not config.chunked:
            clustered["DSMEM"] = True
            exchange = region_bytes(config.block_b, num_h, config.block_h)
            # per thread; a share that does not divide evenly cannot be pushed once
            pushes, uneven = divmod(2 * pushes_per_exchange(config), 32 * config.num_warps)
            pushes = -1 if uneven else pushes
        if launch_in_clusters(kernel, (num_h * num_b, num_directions),
                              args + (first_step, num_steps, 0, leader_inc), clustered, cluster,
                              exchange, pushes):
            launch_counts["persistent"] += 1
            launch_counts["clustered"] += 1
            return

    groups_resident = 0     # barrier groups whose programs can all run at once
    if force_stepped:
        pass
    elif interpreting():
        # Programs run one after another: only a group of one program gets past its barrier.
        groups_resident = num_b if barrier_group == 1 else 0
    else:
        try:
            capacity = co_resident_programs(kernel, args + (first_step, num_steps, 0, leader_inc),
                                            dict(constexprs, PERSISTENT=True), config, device)
        except triton.runtime.errors.OutOfResources:
            lighter = lighter_on_chip(config)
            if lighter is None:
                raise
            return launch_recurrence(kernel, args[:-3] + args[-2:], constexprs, num_steps=num_steps,
                                     batch=batch, hidden_size=hidden_size, output_size=output_size,
                                     num_directions=num_directions, config=lighter,
                                     device=device, force_stepped=force_stepped,
                                     shared_barrier=shared_barrier,
                                     pushes_per_exchange=pushes_per_exchange,
                                     first_step=first_step)
        groups_resident = capacity // group
    groups_at_once = min(groups_resident, num_b, _COUNTER_SLOTS // counters_per_block)

    if groups_at_once >= 1:
        for b0 in range(0, num_b, groups_at_once):
            grid = (num_h * min(groups_at_once, num_b - b0), num_directions)
            kernel[grid](*args, first_step, num_steps, b0 * config.block_b, leader_inc,
                         PERSISTENT=True, **launch_options(), **common)
            launch_counts["persistent"] += 1
    else:
        grid = (num_h * num_b, num_directions)
        for step in range(first_step, num_steps):
            stepped = dict(common, RESUMED=step > 0) if "RESUMED" in constexprs else common
            kernel[grid](*args, step, step + 1, 0, leader_inc, PERSISTENT=False, **stepped)
            launch_counts["stepped"] += 1
