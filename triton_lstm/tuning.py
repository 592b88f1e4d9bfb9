"""Measured tables: which tile configs, and kernels or nn.LSTM, for a shape on this GPU.

``make tune`` (perf/tune.py) writes one table per GPU, ``configs/<gpu-slug>.json``:

    {"provenance": {"gpu", "commit", "commits", "torch", "triton", "cuda", "cudnn", "date",
                    "steps", "layer_steps", "grid", ...},   # T of the candidates, of the layers
     "shapes": {"bf16/B8/H512/D1/P0": {
         "dtype": "bf16", "B": 8, "H": 512, "D": 1, "proj": 0,      # proj: proj_size, 0 for none
         "forward":  {<KernelConfig fields>, "us_per_step": 2.41},  # fastest correct candidate
         "backward": {<KernelConfig fields>, "us_per_step": 6.10},
         "kernels_us": {"fwd": 2.89, "train": 9.50},                # the layer on the kernels
         "cudnn_us": {"fwd": 12.9, "fwd_graph": 5.70, "train": 36.9},     # nn.LSTM (cuDNN)
         "layer_steps": 64}}}   # only where the layers were timed at another T than the table's

All times are µs per step of one layer (input size = H). The nearest measured shape of a
call has the same dtype, number of directions and projection-ness; the measured H nearest
on a log scale (exact first, none further than a factor MAX_H_RATIO); then the smallest
measured batch >= B, else the largest.

Where a launch gets its tile config (``dispatch.pick_config`` asks ``measured_config``):
configs forced by a sweep (``forced_configs``), then with TRITON_LSTM_AUTOTUNE=1 the
configs tuned on this machine on first use (autotune.py), then the table; else the
heuristic. Where ``backend="auto"`` runs (policy.py) comes from the same table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import re
import warnings
from typing import Optional

import torch

from .dispatch import CONFIG_DIR, ON_CHIP_BUDGET, KernelConfig, cdiv, gpu_slug, on_chip_bytes

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
               torch.float64: "fp64"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
KERNELS = ("forward", "backward")
MODES = ("fwd", "train")            # inference (forward only) and training (forward + backward)
# A config measured at another H is used up to this factor away; further, the heuristic.
MAX_H_RATIO = 2.0
# backend="auto" runs the kernels where they took at most this share of nn.LSTM's time:
# a near tie goes to nn.LSTM (the reference), and the margin covers run-to-run noise.
KERNEL_ADVANTAGE = 0.95
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(KernelConfig))


# -- names -------------------------------------------------------------------------------------

def shape_key(dtype_name: str, batch: int, hidden: int, directions: int, proj: int) -> str:
    """'bf16/B8/H512/D1/P0': a shape's key in the table (proj: proj_size, 0 for none)."""
    return f"{dtype_name}/B{batch}/H{hidden}/D{directions}/P{proj}"


def config_label(config: KernelConfig) -> str:
    """'bb16-bh8-res-bk64-sk1-w4': a config in one word (CSV cells, logs); 'chk' for resident
    weights in chunks, '-st3' for pipelined inner loops, '-pa' for prefetch after arrival,
    '-df' for dataflow waits instead of the grid barrier, '-gs' for the backward's gate split,
    '-cl' for the cluster barrier, '-ds' for h pushed through distributed shared memory, '-rg'
    for the small-batch kernels with their weights in registers, '-rn' for the forward with
    its weights in shared memory and h in a ring of copies."""
    kind = ("chk" if config.chunked else "res") if config.resident else "str"
    return (f"bb{config.block_b}-bh{config.block_h}-{kind}"
            f"-bk{config.block_k}-sk{config.split_k}-w{config.num_warps}"
            + (f"-st{config.inner_stages}" if config.inner_stages > 1 else "")
            + ("-pa" if config.prefetch_after_arrive else "")
            + ("-df" if config.dataflow else "") + ("-gs" if config.gate_split else "")
            + ("-cl" if config.cluster else "") + ("-ds" if config.dsmem else "")
            + ("-rg" if config.registers else "") + ("-rn" if config.ring else ""))


_LABEL = re.compile(r"bb(\d+)-bh(\d+)-(res|chk|str)-bk(\d+)-sk(\d+)-w(\d+)(?:-st(\d+))?(-pa)?(-df)?"
                    r"(-gs)?(-cl)?(-ds)?(-rg)?(-rn)?")


def config_from_label(label: str) -> KernelConfig:
    match = _LABEL.fullmatch(label)
    if match is None:
        raise ValueError(f"not a config label: {label!r} (e.g. bb16-bh8-res-bk64-sk1-w4)")
    (block_b, block_h, resident, block_k, split_k, num_warps, stages, after, dataflow,
     gate_split, cluster, dsmem, registers, ring) = match.groups()
    return KernelConfig(block_b=int(block_b), block_h=int(block_h), resident=resident != "str",
                        block_k=int(block_k), split_k=int(split_k), num_warps=int(num_warps),
                        inner_stages=int(stages or 1), prefetch_after_arrive=after is not None,
                        chunked=resident == "chk", dataflow=dataflow is not None,
                        gate_split=gate_split is not None, cluster=cluster is not None,
                        dsmem=dsmem is not None, registers=registers is not None,
                        ring=ring is not None)


def config_entry(config: KernelConfig, us_per_step: float) -> dict:
    """A config as the table stores it: its fields and its time."""
    return dict(dataclasses.asdict(config), us_per_step=round(us_per_step, 3))


def config_from_entry(entry: dict) -> KernelConfig:
    return KernelConfig(**{name: entry[name] for name in CONFIG_FIELDS if name in entry})


# -- tables ------------------------------------------------------------------------------------

_tables: dict[str, dict] = {}


def table_path(gpu_name: str) -> pathlib.Path:
    return CONFIG_DIR / f"{gpu_slug(gpu_name)}.json"


def load_table(gpu_name: str) -> dict:
    """The table ``make tune`` measured for this GPU, read once; {} when none ships."""
    if gpu_name not in _tables:
        path = table_path(gpu_name)
        try:
            _tables[gpu_name] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as error:   # a broken table must not break the model
            warnings.warn(f"triton_lstm: ignoring {path}: {error}")
            _tables[gpu_name] = {}
    return _tables[gpu_name]


def set_table(gpu_name: str, table: Optional[dict]) -> None:
    """Use ``table`` for this GPU in this process; None reads the shipped file again."""
    if table is None:
        _tables.pop(gpu_name, None)
    else:
        _tables[gpu_name] = table
    clear_caches()


_device_names: dict = {}
_device_archs: dict = {}
_decision_gpus: dict = {}
_lookups: dict = {}


def clear_caches() -> None:
    """Forget everything derived from tables and devices (after set_table, in tests)."""
    for cache in (_device_names, _device_archs, _decision_gpus, _lookups):
        cache.clear()


@torch.compiler.assume_constant_result
def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name, asked once per device (a constant under torch.compile)."""
    if device not in _device_names:
        _device_names[device] = torch.cuda.get_device_name(device)
    return _device_names[device]


@torch.compiler.assume_constant_result
def device_arch(device: torch.device) -> tuple:
    """(compute capability major, minor, SM count) of a CUDA device, asked once per device."""
    if device not in _device_archs:
        props = torch.cuda.get_device_properties(device)
        _device_archs[device] = (props.major, props.minor, props.multi_processor_count)
    return _device_archs[device]


def table_arch(table: dict) -> Optional[tuple]:
    """(major, minor, SM count) of the GPU a table was measured on, where it says."""
    provenance = table.get("provenance", {})
    capability, num_sms = provenance.get("compute_capability"), provenance.get("sm_count")
    if not capability or not num_sms:
        return None
    major, minor = (int(v) for v in str(capability).split("."))
    return major, minor, int(num_sms)


def tables_at_hand() -> list[str]:
    """The GPUs with a table: any set in this process and the shipped files', each file read
    once, into load_table's cache."""
    for path in sorted(CONFIG_DIR.glob("*.json")):
        try:
            table = json.loads(path.read_text())
            gpu = table["provenance"]["gpu"]
        except (OSError, ValueError, KeyError, TypeError):
            continue            # load_table warns about a broken table when it is asked for
        if table_path(gpu) == path:     # the file load_table reads for that GPU
            _tables.setdefault(gpu, table)
    return [name for name, table in _tables.items() if table]


@torch.compiler.assume_constant_result
def decision_gpu(device: torch.device) -> str:
    """The GPU whose table backend="auto" decides by on ``device``: its own where it has one,
    else one measured on the same chip (same compute capability and SM count: an H100 SXM
    decides by the H200's table), else its own name (no table: the rule without one)."""
    if device not in _decision_gpus:
        own = device_name(device)
        chosen = own
        if not load_table(own):
            arch = device_arch(device)
            chosen = next((name for name in tables_at_hand()
                           if table_arch(load_table(name)) == arch), own)
        _decision_gpus[device] = chosen
    return _decision_gpus[device]


# What tiles are sized for off a GPU (the interpreter): a few SMs, so grids still split.
INTERPRETER_SMS = 4


def sm_count(device: torch.device) -> int:
    """The device's SM count (asked once per device), or INTERPRETER_SMS off CUDA."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return device_arch(device)[2]


# -- nearest measured shape --------------------------------------------------------------------

def nearest_hidden(measured, hidden: int) -> Optional[int]:
    """The measured H nearest to ``hidden`` on a log scale (a tie goes to the larger), or None
    when none is within MAX_H_RATIO."""
    if not measured:
        return None
    best = min(measured, key=lambda h: (abs(math.log(h / hidden)), -h))
    return best if max(best, hidden) <= MAX_H_RATIO * min(best, hidden) else None


def batch_bucket(batches, batch):
    """The smallest measured batch >= batch, else the largest (batches sorted ascending)."""
    for measured in batches:
        if measured >= batch:
            return measured
    return batches[-1]


def entries_at_nearest_hidden(table: dict, dtype_name: str, hidden: int, directions: int,
                              proj: bool) -> dict[int, dict]:
    """{B: entry} of the measured shapes of this kind at the nearest measured H ({} if none)."""
    same_kind = [e for e in table.get("shapes", {}).values()
                 if e["dtype"] == dtype_name and e["D"] == directions and (e["proj"] > 0) == proj]
    near = nearest_hidden(sorted({e["H"] for e in same_kind}), hidden)
    return dict(sorted((e["B"], e) for e in same_kind if e["H"] == near))


def nearest_entry(table: dict, dtype_name: str, batch: int, hidden: int, directions: int,
                  proj: bool) -> Optional[dict]:
    """The table entry of the nearest measured shape, or None."""
    by_batch = entries_at_nearest_hidden(table, dtype_name, hidden, directions, proj)
    return by_batch[batch_bucket(list(by_batch), batch)] if by_batch else None


def usable(config: KernelConfig, hidden: int, directions: int, dtype: torch.dtype,
           num_sms: int) -> bool:
    """A config measured at another H still forms a persistent group here, and its resident
    weights still fit on chip."""
    if cdiv(hidden, config.block_h) * directions > num_sms:
        return False
    return not config.resident or (
        on_chip_bytes(hidden, config.block_b, config.block_h, dtype) <= ON_CHIP_BUDGET)


def table_config(gpu_name: str, kernel: str, dtype: torch.dtype, batch: int, hidden: int,
                 directions: int, proj: bool, num_sms: int) -> Optional[KernelConfig]:
    """The config the table measured at the nearest shape, where it is usable here."""
    key = ("config", gpu_name, kernel, dtype, batch, hidden, directions, proj, num_sms)
    if key not in _lookups:
        entry = nearest_entry(load_table(gpu_name), DTYPE_NAMES.get(dtype, ""), batch, hidden,
                              directions, proj)
        config = None
        if entry is not None and kernel in entry:
            config = config_from_entry(entry[kernel])
            if not usable(config, hidden, directions, dtype, num_sms):
                config = None
        _lookups[key] = config
    return _lookups[key]


# -- kernels or nn.LSTM ------------------------------------------------------------------------

def kernels_faster(entry: dict, mode: str) -> Optional[bool]:
    """Whether the kernels beat nn.LSTM at this entry for the mode ("fwd" compares eager
    forward calls, "train" forward + backward), by KERNEL_ADVANTAGE; None if unmeasured."""
    kernels = entry.get("kernels_us", {}).get(mode)
    cudnn = entry.get("cudnn_us", {}).get(mode)
    if kernels is None or cudnn is None:
        return None
    return kernels <= KERNEL_ADVANTAGE * cudnn


@torch.compiler.assume_constant_result
def bucket_decisions(gpu_name: str, dtype_name: str, hidden: int, directions: int,
                     proj: bool) -> tuple:
    """((B, kernels run in inference, kernels run in training), ...) per measured batch at
    the nearest measured H, B ascending; () without measurements. A constant under
    torch.compile, so the per-call decision (policy.py) is a few comparisons on B."""
    key = ("decisions", gpu_name, dtype_name, hidden, directions, proj)
    if key not in _lookups:
        by_batch = entries_at_nearest_hidden(load_table(gpu_name), dtype_name, hidden,
                                             directions, proj)
        _lookups[key] = tuple((batch, *(kernels_faster(entry, mode) is not False
                                        for mode in MODES))
                              for batch, entry in by_batch.items())
    return _lookups[key]


# -- where a launch gets its config ------------------------------------------------------------

_forced: dict[str, KernelConfig] = {}


@contextlib.contextmanager
def forced_configs(forward: Optional[KernelConfig] = None,
                   backward: Optional[KernelConfig] = None):
    """Launches inside the block use these configs (perf/tune.py times a layer with its best
    candidates this way; the lookup would find the shape only after the table is written)."""
    saved = dict(_forced)
    _forced.update({k: c for k, c in (("forward", forward), ("backward", backward)) if c})
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def measured_config(kernel: str, batch: int, hidden: int, dtype: torch.dtype,
                    device: torch.device, directions: int = 1, proj: bool = False,
                    tune_if_missing: bool = True) -> Optional[tuple[KernelConfig, str]]:
    """(config, where from) for a launch: "forced", "autotune" or "table"; None: use the
    heuristic. With TRITON_LSTM_AUTOTUNE=1 a shape met for the first time is tuned here
    (unless ``tune_if_missing`` is False), inside the op body at run time."""
    if kernel in _forced:
        return _forced[kernel], "forced"
    if device.type != "cuda":
        return None
    from . import autotune   # autotune runs the launchers, which import dispatch, which imports us
    if autotune.enabled():
        config = autotune.autotuned_config(kernel, batch, hidden, dtype, device, directions, proj,
                                           tune_if_missing)
        if config is not None:
            return config, "autotune"
    # The table backend="auto" decides by (this GPU's, else its chip's): the kernels then run
    # the tiles whose timings the decision compared with nn.LSTM.
    config = table_config(decision_gpu(device), kernel, dtype, batch, hidden, directions, proj,
                          sm_count(device))
    return None if config is None else (config, "table")
