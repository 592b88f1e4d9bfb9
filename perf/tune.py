"""`make tune`: one resumable sweep per GPU: tile configs for the kernels, and cuDNN beside them.

For every shape of the grid (dtype x batch x H x directions x projection) it
  1. checks each candidate config of the forward and of the backward kernel against a
     float64 reference and times those that pass (T = --steps; triton_lstm/autotune.py:
     the heuristic's config and its one-step neighbours); a failing candidate is
     recorded as failed, not timed;
  2. times the layer (input size = H) on the kernels with the fastest configs, forward
     and training, and nn.LSTM (cuDNN): eager forward, forward replayed from a CUDA
     graph, training (T = --layer-steps, 256: make perf's T; these decide backend="auto").
Each measurement is appended to perf/results/<gpu>/tune.csv as soon as it is made,
keyed by (kind, dtype, B, H, D, proj, config), and T for a layer timing: a rerun skips
what is there and goes on (--fresh starts over). After every shape the table
triton_lstm/configs/<gpu>.json is written again from the CSV (best configs, µs/step of
the kernels and of cuDNN at T = --layer-steps, provenance); at the end heatmaps go to
perf/results/<gpu>/heatmap_<dtype>.png. A run stops starting new measurements after
--budget-min minutes (8): run it again to go on.

    python3 perf/tune.py [--fresh] [--quick] [--dtypes bf16 fp16] [--shapes 8x512 ...]
    python3 perf/tune.py --retime='-df$'  # time those candidates (and their layers) again
    python3 perf/tune.py --plan [--csv perf/results/<gpu>/tune.csv]   # what a run would measure
                                         # (past the CSV's rows) and a time estimate, no GPU
    python3 perf/tune.py --plot-only [--csv perf/results/<gpu>/tune.csv]   # heatmaps again
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time
import warnings
from typing import Optional

import torch
from torch import nn

PERF_DIR = pathlib.Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
sys.path[:0] = [str(PERF_DIR), str(REPO_DIR)]
import triton  # noqa: E402

import triton_lstm  # noqa: E402
from timing import compile_ahead, forward_fn, train_fn, tree_commit  # noqa: E402
from triton_lstm import autotune, tuning  # noqa: E402
from triton_lstm.dispatch import CONFIG_DIR, gpu_slug, heuristic_config  # noqa: E402
from triton_lstm.tuning import DTYPES, KERNELS, MODES, config_from_label, config_label  # noqa: E402

# nn.LSTM repacks bf16 weights on every call and warns each time; the cost is part of its numbers.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")

# -- the grid ----------------------------------------------------------------------------------

SWEEP_DTYPES = ("bf16", "fp16", "fp32")
BATCHES = (1, 8, 16, 64, 128, 512)            # batch buckets of plain layers: make perf's grid
HIDDEN = (256, 512, 1024)
VARIANT_BATCHES = (8, 64, 512)                # bidirectional and projected layers: fewer
VARIANT_HIDDEN = (512,)
QUICK = dict(dtypes=("bf16",), batches=(8, 128), hidden=(512,))
STEPS = 64                                    # the candidates' T
# The layer timings decide backend="auto", so they are taken at make perf's T: a call's host
# time (~0.6 ms on the GPU machines) weighs a quarter of what it does at 64 steps.
LAYER_STEPS = 256
NUM_SMS = 132                                 # H100 / H200, for --plan without a GPU

# Time estimate (--plan), seconds. A compile: one kernel variant built for sm_90, measured
# 0.5-1.8 s (mean 1.0 s) alone and 1.2-4.7 s two at a time on a 2-core AMD EPYC (perf/NOTES.md;
# 1-3 s expected on a GPU host the first time, Triton's disk cache makes reruns cheaper). A
# candidate: the float64 check (8 steps) and do_bench (10 ms warm-up, 40 ms of runs, L2
# flushed between runs). A layer: its five timings, set-up and a CUDA-graph capture, and its
# timing again where a neighbour beat the heuristic (H200, 40a8b15: the grid's 249
# candidates and 72 layers took ~4.3 min, 47 s of it compiling ahead in 16 processes, half
# of linear speed-up; the layers then at T = 64: at LAYER_STEPS the slowest calls take
# longer, not measured yet).
COMPILE_S, CANDIDATE_S, LAYER_S, START_S = 1.5, 0.15, 2.0, 20
PARALLEL_EFFICIENCY = 0.5
GPU_HOST_CORES = 16                           # the H100 / H200 machines, for --plan elsewhere

LAYER_KINDS = ("kernels_fwd", "kernels_train", "cudnn_fwd", "cudnn_graph_fwd", "cudnn_train")
FIELDS = ["key", "kind", "dtype", "B", "H", "D", "proj", "config", "status", "us_per_step",
          "rel_error", "T", "gpu", "torch", "triton", "cuda", "cudnn", "commit", "date", "detail"]


@dataclasses.dataclass(frozen=True)
class Shape:
    dtype: str
    batch: int
    hidden: int
    directions: int = 1
    proj: int = 0          # proj_size; 0 for none

    def __str__(self) -> str:
        return (f"{self.dtype} B={self.batch} H={self.hidden} D={self.directions} "
                f"proj={self.proj}")


def default_grid(dtypes=SWEEP_DTYPES, quick: bool = False, shapes=None) -> list[Shape]:
    """Plain layers (one direction, no projection) at every batch bucket first, then
    bidirectional and projected (proj_size = H/2) layers at fewer: the order of priority
    when the budget runs out."""
    if quick:
        return [Shape(d, B, H) for d in QUICK["dtypes"] for H in QUICK["hidden"]
                for B in QUICK["batches"]]
    if shapes:
        return [Shape(d, B, H) for d in dtypes for B, H in shapes]
    plain = [Shape(d, B, H) for d in dtypes for H in HIDDEN for B in BATCHES]
    variants = [Shape(d, B, H, D, P) for D, P in ((2, 0), (1, -1)) for d in dtypes
                for H in VARIANT_HIDDEN for B in VARIANT_BATCHES]
    return plain + [dataclasses.replace(s, proj=s.hidden // 2) if s.proj < 0 else s
                    for s in variants]


def candidates_for(shape: Shape, neighbourhood: str) -> str:
    """Bidirectional and projected layers get the heuristic's tiles only (unless --wide):
    the 8 minutes go to tuning the plain layers make perf measures."""
    plain = (shape.directions, shape.proj) == (1, 0)
    return neighbourhood if plain or neighbourhood == "wide" else "heuristic"


# --exchange: each cluster tile also with h (and the backward's shares of dh) exchanged
# through distributed shared memory (kernels/dsmem.py), and the registers kernels' tiles
# with h (dG) pushed through their clusters where those are built; off until their GPU tests
# have passed.
EXCHANGE = False


def registers_push_here(kernel: str, hidden: int, dtype) -> bool:
    """Whether the registers kernel's config with dsmem pushes its state through clusters at
    this H (forward_registers.exchange_shape, backward_registers.exchange_programs), where
    otherwise it would time the same launch as without."""
    from triton_lstm.kernels import backward_registers, forward_registers   # Gluon
    if kernel == "forward":
        return forward_registers.exchange_shape(hidden) is not None
    return backward_registers.exchange_programs(hidden, dtype) is not None


def shape_candidates(shape: Shape, kernel: str, neighbourhood: str, num_sms: int) -> list:
    """The kernel's candidate configs at this shape (autotune.candidate_configs), with
    --exchange the dsmem twins of its cluster tiles and of its registers tile; at a layer
    that gets the heuristic's tiles only, also in one launch where the heuristic's need
    two."""
    dtype, chosen = DTYPES[shape.dtype], candidates_for(shape, neighbourhood)
    configs = autotune.candidate_configs(kernel, shape.batch, shape.hidden, dtype,
                                         shape.directions, num_sms, chosen, shape.proj > 0)
    if chosen == "heuristic":
        configs += autotune.one_launch_tiles(configs[0], kernel, shape.batch, shape.hidden,
                                             dtype, shape.directions, num_sms)
    if EXCHANGE and not shape.proj:
        pushing = registers_push_here(kernel, shape.hidden, dtype)
        configs += [dataclasses.replace(c, dsmem=True) for c in configs
                    if (c.cluster and c.resident) or (c.registers and pushing)]
    return configs


def shape_of(row: dict) -> Shape:
    return Shape(row["dtype"], row["B"], row["H"], row["D"], row["proj"])


def row_key(kind: str, shape: Shape, config_text: str, steps: int | None = None) -> str:
    """A row's identity in tune.csv. Layer timings name their T (``steps``), so that a sweep
    at another --layer-steps times them again; candidate keys name none."""
    key = tuning.shape_key(shape.dtype, shape.batch, shape.hidden, shape.directions, shape.proj)
    return f"{kind}|{key}|{config_text}" + (f"|T{steps}" if steps is not None else "")


def layer_config_text(best: dict) -> str | None:
    """The configs a layer timing ran with, 'forward+backward' labels (None without both)."""
    if not all(kernel in best for kernel in KERNELS):
        return None
    return "+".join(config_label(best[kernel][0]) for kernel in KERNELS)


# -- tune.csv ----------------------------------------------------------------------------------

def read_rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != FIELDS:
            sys.exit(f"{path} has other columns than this tune.py writes: run with --fresh "
                     "(it keeps the old file as tune.csv.bak)")
        rows = list(reader)
    for row in rows:
        for name in ("B", "H", "D", "proj", "T"):
            row[name] = int(row[name])
        for name in ("us_per_step", "rel_error"):
            row[name] = float(row[name]) if row[name] not in ("", None) else None
    return rows


def append_row(path: pathlib.Path, row: dict) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def write_rows(path: pathlib.Path, rows: list[dict]) -> None:
    """tune.csv rewritten with ``rows`` (written aside, then moved over the old file)."""
    part = path.with_name(path.name + ".part")
    with open(part, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    part.replace(path)


def split_for_retiming(rows: list[dict], grid: list[Shape], pattern: str) -> tuple[list, list]:
    """(kept, dropped): dropped are the rows at the grid's shapes that name a config label
    matching ``pattern`` (a regular expression, searched): candidates, and the layer timings
    that ran one, the kernels' and nn.LSTM's beside them, so that a sweep times them again.
    Shapes outside the grid keep theirs."""
    regex, shapes = re.compile(pattern), set(grid)

    def names_a_match(row):
        return shape_of(row) in shapes and any(regex.search(label)
                                                for label in row["config"].split("+"))
    return ([row for row in rows if not names_a_match(row)],
            [row for row in rows if names_a_match(row)])


def best_configs(rows: list[dict], shape: Shape) -> dict:
    """{kernel: (config, µs/step)}: the fastest candidate that passed, per kernel."""
    best = {}
    for row in rows:
        if row["kind"] in KERNELS and row["status"] == "ok" and shape_of(row) == shape:
            if row["kind"] not in best or row["us_per_step"] < best[row["kind"]][1]:
                best[row["kind"]] = (config_from_label(row["config"]), row["us_per_step"])
    return best


def layer_steps_of(rows: list[dict]) -> int:
    """The T of the newest layer timing in ``rows`` (LAYER_STEPS without one)."""
    return next((row["T"] for row in reversed(rows) if row["kind"] in LAYER_KINDS), LAYER_STEPS)


def build_table(rows: list[dict], provenance: dict) -> dict:
    """The JSON table (format in triton_lstm/tuning.py) from the rows of tune.csv. Layer
    timings count at the table's layer T (provenance["layer_steps"], else the newest layer
    row's): a sweep at another T leaves its rows in tune.csv. A shape that a sweep part-way
    through has not timed at that T yet keeps its timings at the newest T it has (the entry
    names that T): without them backend="auto" would run the kernels there unmeasured."""
    layer_steps = provenance.get("layer_steps") or layer_steps_of(rows)
    by_shape = {}
    for row in rows:
        by_shape.setdefault(shape_of(row), []).append(row)
    shapes = {}
    for shape, mine in by_shape.items():
        best = best_configs(mine, shape)
        entry = dict(dtype=shape.dtype, B=shape.batch, H=shape.hidden, D=shape.directions,
                     proj=shape.proj)
        entry.update({kernel: tuning.config_entry(config, us)
                      for kernel, (config, us) in best.items()})
        current = layer_config_text(best)
        # nn.LSTM's rows timed beside these configs, else beside none named ("-": rows from
        # before the pairing; a paired row, written later, takes their place at its T).
        timed = [row for row in mine if row["kind"] in LAYER_KINDS and row["status"] == "ok"
                 and (row["config"] == current
                      or (row["kind"].startswith("cudnn") and row["config"] == "-"))]
        # A T counts where both the kernels and nn.LSTM were timed at it: a sweep cut
        # between the two leaves the older pair in force.
        paired = [T for T in [layer_steps] + [row["T"] for row in reversed(timed)]
                  if {row["kind"].split("_")[0] for row in timed if row["T"] == T}
                  >= {"kernels", "cudnn"}]
        steps = paired[0] if paired else (timed[-1]["T"] if timed else layer_steps)
        layer = {row["kind"]: row["us_per_step"] for row in timed if row["T"] == steps}
        if layer and steps != layer_steps:
            entry["layer_steps"] = steps
        kernels_us = {mode: layer[f"kernels_{mode}"] for mode in MODES if f"kernels_{mode}" in layer}
        cudnn_us = {name: layer[kind] for name, kind in (("fwd", "cudnn_fwd"),
                    ("fwd_graph", "cudnn_graph_fwd"), ("train", "cudnn_train")) if kind in layer}
        if kernels_us:
            entry["kernels_us"] = {k: round(v, 3) for k, v in kernels_us.items()}
        if cudnn_us:
            entry["cudnn_us"] = {k: round(v, 3) for k, v in cudnn_us.items()}
        shapes[tuning.shape_key(shape.dtype, shape.batch, shape.hidden, shape.directions,
                                shape.proj)] = entry
    return {"provenance": provenance, "shapes": shapes}


def provenance(rows: list[dict], env: dict, steps: int, layer_steps: int,
               arch: Optional[tuple] = None) -> dict:
    """Where the numbers come from: this run's GPU and versions, and what the rows cover
    (steps: the candidates' T; layer_steps: the layer timings' T). arch, the GPU's (major,
    minor, SM count), names its chip: a GPU of the same chip without a table of its own
    decides kernels or nn.LSTM by this one (tuning.decision_gpu)."""
    measured = [shape_of(row) for row in rows]
    chip = {} if arch is None else dict(compute_capability=f"{arch[0]}.{arch[1]}",
                                        sm_count=arch[2])
    return dict(env, **chip, commits=sorted({row["commit"] for row in rows}), steps=steps,
                layer_steps=layer_steps, rows=len(rows), tool="perf/tune.py",
                csv=f"perf/results/{gpu_slug(env['gpu'])}/tune.csv",
                candidates="dispatch.heuristic_config and its one-step neighbours "
                           "(triton_lstm/autotune.py), each checked against float64 first",
                grid=dict(dtypes=sorted({s.dtype for s in measured}),
                          batches=sorted({s.batch for s in measured}),
                          hidden=sorted({s.hidden for s in measured}),
                          directions=sorted({s.directions for s in measured}),
                          proj=sorted({s.proj for s in measured}), shapes=len(set(measured))))


def env_from_rows(rows: list[dict]) -> dict:
    """The environment of the newest row (for --plot-only, which measures nothing)."""
    last = rows[-1] if rows else {}
    return {k: last.get(k, "") for k in ("gpu", "torch", "triton", "cuda", "cudnn", "commit", "date")}


def environment() -> dict:
    """What a number depends on besides the shape: GPU, versions, date, commit."""
    commit = tree_commit()
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                commit=commit)


# -- measuring ---------------------------------------------------------------------------------

def layer_runs(shape: Shape, best: dict, steps: int, device="cuda") -> dict:
    """kind -> (config text, configs to force, a function building the timed call)."""
    from bench import GraphedForward   # bench.py's CUDA-graph replay of nn.LSTM's forward

    dtype, H, R = DTYPES[shape.dtype], shape.hidden, shape.proj or shape.hidden
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H, bidirectional=shape.directions == 2, proj_size=shape.proj,
                   device=device, dtype=dtype)
    ours = triton_lstm.LSTM.from_torch(lstm, backend="triton")
    x = torch.randn(steps, shape.batch, H, device=device, dtype=dtype)
    hx = (torch.randn(shape.directions, shape.batch, R, device=device, dtype=dtype),
          torch.randn(shape.directions, shape.batch, H, device=device, dtype=dtype))

    def trainable():
        return x.clone().requires_grad_(), tuple(s.clone().requires_grad_() for s in hx)

    # nn.LSTM's rows name the kernels' configs they were timed beside: a layer timed with
    # new configs times nn.LSTM again, so that the table compares a pair from one run.
    text = layer_config_text(best)
    beside = "-" if text is None else text
    runs = {"cudnn_fwd": (beside, {}, lambda: forward_fn(lstm, x, hx)),
            "cudnn_graph_fwd": (beside, {}, lambda: GraphedForward(lstm, x, hx)),
            "cudnn_train": (beside, {}, lambda: train_fn(lstm, *trainable()))}
    if text is not None:
        forced = {kernel: best[kernel][0] for kernel in KERNELS}
        runs["kernels_fwd"] = (text, forced, lambda: forward_fn(ours, x, hx))
        runs["kernels_train"] = (text, forced, lambda: train_fn(ours, *trainable()))
    return runs


class Sweep:
    """tune.csv, and the measurements of a grid still missing from it."""

    def __init__(self, csv_path: pathlib.Path, env: dict, steps: int, budget_s: float,
                 device="cuda", retry_errors: bool = False, log=print,
                 layer_steps: int = LAYER_STEPS):
        self.csv_path, self.env, self.steps, self.log = csv_path, env, steps, log
        self.layer_steps = layer_steps
        self.deadline = time.monotonic() + budget_s
        self.rows = read_rows(csv_path)
        self.measured = {row["key"] for row in self.rows
                         if not (retry_errors and row["status"] == "error")}
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_sms = tuning.sm_count(self.device)
        self.arch = tuning.device_arch(self.device) if self.device.type == "cuda" else None

    def run(self, grid: list[Shape], neighbourhood: str, json_path: pathlib.Path) -> bool:
        """First the heuristic's configs and the layer timings of every shape (a complete
        table for backend="auto" early), then the other candidates shape by shape (the layer
        timed again where the best config changed). False if the budget ran out first."""
        for candidates in dict.fromkeys(("heuristic", neighbourhood)):
            for i, shape in enumerate(grid, 1):
                if not (self.measure_candidates(shape, candidates) and self.measure_layer(shape)):
                    return False
                table = build_table(self.rows, provenance(self.rows, self.env, self.steps,
                                                          self.layer_steps, self.arch))
                write_json(table, json_path)
                self.log(f"[{candidates} {i}/{len(grid)}] {summary_line(table, shape)}")
        return True

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def record(self, kind, shape, config_text, status, us=None, error=None, detail="",
               layer_steps=None) -> None:
        """One row; a layer timing passes its T (layer_steps), which its key names too."""
        row = dict(key=row_key(kind, shape, config_text, layer_steps), kind=kind,
                   dtype=shape.dtype, B=shape.batch, H=shape.hidden, D=shape.directions,
                   proj=shape.proj, config=config_text, status=status, us_per_step=us,
                   rel_error=error, T=layer_steps or self.steps, detail=detail, **self.env)
        append_row(self.csv_path, row)
        self.rows.append(row)
        self.measured.add(row["key"])
        if status != "ok":
            self.log(f"  {shape} {kind} {config_text}: {status}, {detail}")

    def measure_candidates(self, shape: Shape, neighbourhood: str) -> bool:
        """Check, then time, the kernels' candidates that tune.csv lacks (forward first: the
        backward reads what the best forward saves)."""
        problem = None
        for kernel in KERNELS:
            for config in shape_candidates(shape, kernel, neighbourhood, self.num_sms):
                if row_key(kernel, shape, config_label(config)) in self.measured:
                    continue
                if self.out_of_time():
                    return False
                problem = problem or autotune.Problem.random(
                    DTYPES[shape.dtype], shape.batch, shape.hidden, shape.directions, shape.proj,
                    self.steps, self.device, self.num_sms)
                best_forward = best_configs(self.rows, shape).get("forward")
                problem.saved_config = best_forward and best_forward[0]
                m = autotune.measure(problem, kernel, config)
                self.record(kernel, shape, config_label(config), m.status, m.us_per_step,
                            m.rel_error, m.detail)
                if m.status == "error":
                    self.check_device(f"{shape} {kernel} {config_label(config)}")
        return True

    def check_device(self, what: str) -> None:
        """After a failure: a CUDA context that broke fails everything after it, so stop."""
        if self.device.type != "cuda":
            return
        try:
            torch.cuda.synchronize(self.device)
            torch.ones(1, device=self.device).add_(1).item()
        except RuntimeError as error:
            sys.exit(f"tune: the CUDA context broke at {what} ({error}); that row is recorded: "
                     "run again to go on from the next measurement")

    def measure_layer(self, shape: Shape) -> bool:
        """The layer on the kernels (best configs) and on nn.LSTM at T = layer_steps, where
        tune.csv lacks it."""
        best = best_configs(self.rows, shape)
        steps = self.layer_steps
        runs = layer_runs(shape, best, steps, self.device)

        def timed(kind, text):
            return row_key(kind, shape, text, steps) in self.measured

        # nn.LSTM's rows from before they named the kernels' configs ("-") still pair with
        # kernels timings that need no new run.
        kernels_timed = all(timed(kind, text) for kind, (text, _, _) in runs.items()
                            if kind.startswith("kernels"))
        for kind, (text, forced, build) in runs.items():
            if timed(kind, text) or (kind.startswith("cudnn") and kernels_timed
                                     and timed(kind, "-")):
                continue
            if self.out_of_time():
                return False
            try:
                with tuning.forced_configs(**forced):
                    us = autotune.time_ms(build()) * 1e3 / steps
                self.record(kind, shape, text, "ok", us, layer_steps=steps)
            except Exception as exc:   # say why and keep going: never a number from a broken run
                self.record(kind, shape, text, "error", layer_steps=steps,
                            detail=f"{type(exc).__name__}: {str(exc).strip()[:200]}")
                self.check_device(f"{shape} {kind}")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True


def compile_jobs(grid: list[Shape], neighbourhood: str, measured: set, num_sms: int,
                 device: str = "cuda") -> list:
    """(shape, kernel, config label) of every candidate the sweep has yet to measure."""
    jobs = []
    for shape in grid:
        for kernel in KERNELS:
            for config in shape_candidates(shape, kernel, neighbourhood, num_sms):
                if row_key(kernel, shape, config_label(config)) not in measured:
                    jobs.append((shape, kernel, config_label(config), num_sms, device))
    return jobs


def compile_one(job) -> str:
    """Run one candidate once on a tiny problem (T is not specialised on), so that Triton's
    disk cache holds its kernel; a failure is left for the sweep to record."""
    shape, kernel, label, num_sms, device = job
    try:
        problem = autotune.Problem.random(DTYPES[shape.dtype], shape.batch, shape.hidden,
                                          shape.directions, shape.proj, 2, device, num_sms)
        outputs = problem.run(kernel, config_from_label(label))
        outputs[0].cpu()    # waits for the kernel
        return ""
    except Exception as exc:   # the sweep checks this candidate again and records why
        return f"{shape} {kernel} {label}: {type(exc).__name__}"


def summary_line(table: dict, shape: Shape) -> str:
    entry = table["shapes"].get(tuning.shape_key(shape.dtype, shape.batch, shape.hidden,
                                                 shape.directions, shape.proj), {})
    parts = [str(shape)]
    for kernel in KERNELS:
        if kernel in entry:
            config = tuning.config_from_entry(entry[kernel])
            parts.append(f"{kernel} {config_label(config)} {entry[kernel]['us_per_step']:.2f}")
    k, c = entry.get("kernels_us", {}), entry.get("cudnn_us", {})
    for mode in MODES:
        if mode in k and mode in c:
            auto = "kernels" if tuning.kernels_faster(entry, mode) else "nn.LSTM"
            parts.append(f"{mode} {k[mode]:.2f} vs cuDNN {c[mode]:.2f} -> {auto}")
    return " | ".join(parts) + "  (µs/step)"


def write_json(table: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


# -- plan --------------------------------------------------------------------------------------

def estimate(grid: list[Shape], neighbourhood: str = "sweep", num_sms: int = NUM_SMS,
             jobs: int = 1, measured: frozenset = frozenset()) -> dict:
    """Candidates, distinct kernel compiles, layers and seconds the sweep of ``grid`` should
    take, past what tune.csv holds (``measured``: its row keys).

    A compile is one (kernel, dtype, H, D, proj, config) variant: the candidates, and the
    forward that saves the activations (the backward's inputs, the layer's training) with
    the best forward tiles, counted as the heuristic's (an assumption). A shape's layers are
    timed where a candidate is new (the best may change) or none were timed at LAYER_STEPS.
    ``jobs`` processes compile the candidates ahead of the sweep (compile_ahead), each at
    the serial rate.
    """
    def group(shape):
        return shape.dtype, shape.hidden, shape.directions, shape.proj

    jobs_left = compile_jobs(grid, neighbourhood, measured, num_sms)
    compiles = {(kernel, group(shape), label) for shape, kernel, label, _, _ in jobs_left}
    candidates, layers = len(jobs_left), 0
    new = {shape for shape, *_ in jobs_left}
    for shape in grid:
        prefix = row_key("kernels_train", shape, "")
        if shape in new or not any(key.startswith(prefix) and key.endswith(f"|T{LAYER_STEPS}")
                                   for key in measured):
            layers += 1
            compiles.add(("forward-save", group(shape), heuristic_config(
                shape.batch, shape.hidden, DTYPES[shape.dtype],
                max(1, num_sms // shape.directions), "forward")))
    parallel = max(1.0, jobs * PARALLEL_EFFICIENCY)
    seconds = (START_S + len(compiles) * COMPILE_S / parallel + candidates * CANDIDATE_S
               + layers * LAYER_S)
    return dict(shapes=len(grid), candidates=candidates, compiles=len(compiles), layers=layers,
                seconds=seconds, jobs=max(1, jobs), parallel=parallel)


def format_plan(grid: list[Shape], plan: dict) -> str:
    kinds = {}
    for s in grid:
        batches, hidden = kinds.setdefault((s.directions, s.proj > 0), (set(), set()))
        batches.add(s.batch)
        hidden.add(s.hidden)
    covered = "; ".join(f"D={d}{' projected' if p else ''}: B {sorted(b)} x H {sorted(h)}"
                        for (d, p), (b, h) in kinds.items())
    return "\n".join([
        f"{plan['shapes']} shapes ({', '.join(sorted({s.dtype for s in grid}))}; {covered})",
        f"{plan['candidates']} candidate measurements, {plan['compiles']} kernel compiles",
        f"estimate: {plan['seconds'] / 60:.1f} min = {START_S} s start + {plan['compiles']} "
        f"compiles x {COMPILE_S} s / {plan['parallel']:g} ({plan['jobs']} processes) + "
        f"{plan['candidates']} candidates x {CANDIDATE_S} s + {plan['layers']} layers x "
        f"{LAYER_S} s"])


# -- pictures ----------------------------------------------------------------------------------

def plot_heatmaps(table: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """heatmap_<dtype>.png: over B x H, the layer's µs/step on the kernels (forward, training)
    and the speed-up over the best cuDNN number; a row of panels per kind of layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects, ticker
    from matplotlib.colors import LogNorm

    entries = list(table["shapes"].values())
    prov = table.get("provenance", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for dtype in [d for d in ("fp32", "bf16", "fp16") if any(e["dtype"] == d for e in entries)]:
        kinds = sorted({(e["D"], e["proj"] > 0) for e in entries if e["dtype"] == dtype})
        fig, axes = plt.subplots(len(kinds), 4, figsize=(19, 3.6 * len(kinds) + 1), squeeze=False)
        for row_axes, (D, projected) in zip(axes, kinds):
            chosen = [e for e in entries if e["dtype"] == dtype and e["D"] == D
                      and (e["proj"] > 0) == projected]
            batches, hidden = sorted({e["B"] for e in chosen}), sorted({e["H"] for e in chosen})
            panels = {name: np.full((len(batches), len(hidden)), np.nan)
                      for name in ("fwd", "train", "fwd_x", "train_x")}
            older = {}   # cells whose layers a sweep part-way through timed at another T
            for e in chosen:
                at = batches.index(e["B"]), hidden.index(e["H"])
                if "layer_steps" in e:
                    older[at] = e["layer_steps"]
                k, c = e.get("kernels_us", {}), e.get("cudnn_us", {})
                best_cudnn = {"fwd": min([c[n] for n in ("fwd", "fwd_graph") if n in c], default=None),
                              "train": c.get("train")}
                for mode in MODES:
                    if mode in k:
                        panels[mode][at] = k[mode]
                        if best_cudnn[mode]:
                            panels[mode + "_x"][at] = best_cudnn[mode] / k[mode]
            label = f"D={D}{', proj_size=H/2' if projected else ''}"
            titles = {"fwd": "forward µs/step", "train": "training µs/step",
                      "fwd_x": "forward speed-up vs best cuDNN",
                      "train_x": "training speed-up vs cuDNN"}
            for ax, (name, data) in zip(row_axes, panels.items()):
                ax.set_title(f"{label}: {titles[name]}", fontsize=10)
                ax.set_xticks(range(len(hidden)), [str(h) for h in hidden])
                ax.set_yticks(range(len(batches)), [str(b) for b in batches])
                ax.set(xlabel="H", ylabel="B")
                finite = data[np.isfinite(data)]
                if finite.size == 0:
                    ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                    continue
                if name.endswith("_x"):   # log scale centred on parity: green faster, red slower
                    span = max(2.0, float(np.max(np.maximum(finite, 1 / finite))))
                    cmap, norm, fmt = "RdYlGn", LogNorm(1 / span, span), "{:.2f}x"
                else:
                    top = max(finite.max(), finite.min() * 1.01)
                    cmap, norm, fmt = "viridis_r", LogNorm(finite.min(), top), "{:.2f}"
                cmap = plt.get_cmap(cmap)
                cmap = cmap.with_extremes(bad="lightgrey")
                image = ax.imshow(data, cmap=cmap, norm=norm, origin="lower", aspect="auto")
                bar = fig.colorbar(image, ax=ax, format=ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                halo = [patheffects.withStroke(linewidth=2.5, foreground="white")]   # readable on dark
                for (i, j), value in np.ndenumerate(data):
                    if math.isfinite(value):
                        text = fmt.format(value) + (f"\n(T={older[i, j]})" if (i, j) in older else "")
                        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                                path_effects=halo)
        fig.suptitle(f"triton_lstm {dtype} on {prov.get('gpu', '?')}: one layer, input size = H, "
                     f"T = {prov.get('layer_steps', prov.get('steps', '?'))}, "
                     f"commit {prov.get('commit', '?')}")
        fig.tight_layout()
        paths.append(out_dir / f"heatmap_{dtype}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# -- entry point -------------------------------------------------------------------------------

def parse_shapes(texts: list[str]) -> list[tuple[int, int]]:
    shapes = []
    for text in texts:
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {text!r} is not BxH (e.g. 8x512)")
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes


def copy_to_out(paths) -> None:
    """Also into $OUT when set (what a GPU session brings back)."""
    if os.environ.get("OUT"):
        dest = pathlib.Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        for path in paths:
            if path.exists() and (dest / path.name).resolve() != path.resolve():
                shutil.copy2(path, dest / path.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="start over (keeps tune.csv.bak)")
    parser.add_argument("--quick", action="store_true", help="a few bf16 shapes (smoke test)")
    parser.add_argument("--wide", action="store_true",
                        help="every one-step neighbour of the heuristic (longer: resume over runs)")
    parser.add_argument("--dtypes", nargs="+", choices=SWEEP_DTYPES, default=list(SWEEP_DTYPES))
    parser.add_argument("--shapes", nargs="+", metavar="BxH", help="plain layers only, e.g. 8x512")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help="sequence length the kernel candidates are timed at")
    parser.add_argument("--layer-steps", type=int, default=LAYER_STEPS,
                        help="sequence length the layer (kernels vs nn.LSTM) is timed at: "
                             "what backend='auto' decides on (default: make perf's T)")
    parser.add_argument("--budget-min", type=float, default=8.0,
                        help="start no measurement after this many minutes (rerun to go on)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="measure again what raised last time (a rerun skips it otherwise)")
    parser.add_argument("--retime", metavar="REGEX",
                        help="time again, at the grid's shapes, the candidates whose config "
                             "label matches (e.g. --retime='-df$' after a change to the "
                             "dataflow waits) and the layers timed with them; their old rows "
                             "go to tune.csv.retimed")
    parser.add_argument("--jobs", type=int,
                        help="processes that compile the candidates ahead of the sweep (1: none; "
                             f"default: the cores, at most 16; --plan assumes {GPU_HOST_CORES})")
    parser.add_argument("--exchange", action="store_true",
                        help="also each cluster tile exchanging h through distributed shared "
                             "memory (kernels/dsmem.py), and the registers kernels pushing h "
                             "(dG) through their clusters")
    parser.add_argument("--plan", action="store_true",
                        help="print the grid and time estimate (with --csv: past its rows)")
    parser.add_argument("--plot-only", action="store_true", help="heatmaps from an existing CSV")
    parser.add_argument("--csv", help="tune.csv to read/extend (default perf/results/<gpu>/tune.csv)")
    parser.add_argument("--json", help="table to write (default triton_lstm/configs/<gpu>.json)")
    args = parser.parse_args(argv)
    try:
        grid = default_grid(args.dtypes, args.quick, args.shapes and parse_shapes(args.shapes))
    except ValueError as error:
        parser.error(str(error))
    neighbourhood = "wide" if args.wide else "sweep"
    global EXCHANGE
    EXCHANGE = args.exchange
    if args.plan:
        # What a run would still measure: past the rows of --csv, where given (as --retime
        # would leave them).
        rows = read_rows(pathlib.Path(args.csv)) if args.csv else []
        if args.retime:
            rows = split_for_retiming(rows, grid, args.retime)[0]
        print(format_plan(grid, estimate(grid, neighbourhood, jobs=args.jobs or GPU_HOST_CORES,
                                         measured=frozenset(row["key"] for row in rows))))
        return 0
    has_gpu = torch.cuda.is_available()
    if args.plot_only:
        if not args.csv and not has_gpu:
            parser.error("--plot-only without a GPU needs --csv PATH")
        csv_path = pathlib.Path(args.csv or PERF_DIR / "results"
                                / gpu_slug(torch.cuda.get_device_name()) / "tune.csv")
        rows = read_rows(csv_path)
        if not rows:
            sys.exit(f"{csv_path}: no rows to plot")
        steps = next((row["T"] for row in reversed(rows) if row["kind"] in KERNELS), STEPS)
        prov = provenance(rows, env_from_rows(rows), steps, layer_steps_of(rows))
        paths = plot_heatmaps(build_table(rows, prov), csv_path.parent)
        print("wrote " + ", ".join(map(str, paths)))
        return 0
    if not has_gpu:
        sys.exit("tune: no CUDA GPU found; tuning measures real kernels "
                 "(--plan and --plot-only work without one)")

    args.jobs = args.jobs or min(16, os.cpu_count() or 1)
    env = environment()
    slug = gpu_slug(env["gpu"])
    csv_path = pathlib.Path(args.csv or PERF_DIR / "results" / slug / "tune.csv")
    json_path = pathlib.Path(args.json or CONFIG_DIR / f"{slug}.json")
    if args.fresh and csv_path.exists():
        csv_path.replace(csv_path.with_name(csv_path.name + ".bak"))
    if args.retime:
        kept, dropped = split_for_retiming(read_rows(csv_path), grid, args.retime)
        aside = csv_path.with_name(csv_path.name + ".retimed")
        for row in dropped:
            append_row(aside, row)
        write_rows(csv_path, kept)
        print(f"--retime {args.retime!r}: {len(dropped)} rows to time again, moved to {aside}")
    sweep = Sweep(csv_path, env, args.steps, args.budget_min * 60,
                  retry_errors=args.retry_errors, log=lambda line: print(line, flush=True),
                  layer_steps=args.layer_steps)
    plan = estimate(grid, neighbourhood, jobs=args.jobs, measured=frozenset(sweep.measured))
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
          f"cuDNN {env['cudnn']}, commit {env['commit']}\n{format_plan(grid, plan)}\n"
          f"past the {len(sweep.rows)} rows already in {csv_path}; budget {args.budget_min:g} min",
          flush=True)
    compile_ahead(compile_one, compile_jobs(grid, neighbourhood, sweep.measured, sweep.num_sms,
                                            str(sweep.device)), args.jobs, log=sweep.log)
    complete = sweep.run(grid, neighbourhood, json_path)
    table = build_table(sweep.rows, provenance(sweep.rows, env, args.steps, args.layer_steps,
                                               sweep.arch))
    write_json(table, json_path)
    paths = [csv_path, json_path]
    try:
        paths += plot_heatmaps(table, csv_path.parent)
    except ImportError:
        print("matplotlib not installed: no heatmaps")
    copy_to_out(paths)
    print("wrote " + ", ".join(map(str, paths)))
    if not complete:
        print(f"INCOMPLETE: the {args.budget_min:g} min budget ran out; run `make tune` again to "
              "go on from where it stopped (measured rows are kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
