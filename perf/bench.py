"""`make perf`: triton_lstm against cuDNN and the loops users write, µs per step.

Peers, at the same shapes and in one run on one GPU (one layer, input size = H):
    triton              triton_lstm.LSTM, the strategy the dispatcher picks
    cudnn               torch.nn.LSTM
    cudnn_graph         torch.nn.LSTM forward replayed from a CUDA graph (no launch cost)
    cell_loop           a Python loop over nn.LSTMCell, eager
    cell_loop_compiled  the same loop with its step under torch.compile
    flashrnn            FlashRNN, where installed
Then the memory section (--memory on|off|only, perf/memory_bench.py): training time and
peak memory at long T, with and without recompute. Then the step section (--step
on|off|only): one step per call at T = 1 (LSTM.step, nn.LSTM on a length-1 sequence,
nn.LSTMCell, each eager and replayed from a CUDA graph, perf/step_bench.py), rows with
mode "step". Then the stack section (--stack on|off|only, perf/stack_bench.py): stacks
of 2-3 layers as one wavefront, layer by layer and in cuDNN, rows with their layers.
Each (peer, dtype, shape) is first checked against
torch.nn.LSTM in float64 on the CPU; a peer that fails gets no timing. Results go
to perf/results/<gpu>/ (or --out, and $OUT when set): results.csv, results.json,
speedup_{fwd,train}.png.

    python3 perf/bench.py [--quick] [--shapes 8x512 16x768x1024] [--dtypes fp32 bf16 fp16]
                          [--modes fwd train] [--peers triton cudnn ...] [--out DIR]
                          [--step on|off|only] [--memory on|off|only] [--stack on|off|only]
    python3 perf/bench.py --summarize perf/results/<gpu>/results.json   # Markdown table

Without a GPU it runs the kernels under the Triton interpreter at a tiny shape,
checks them against float64 and times nothing.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import warnings
from typing import Optional

import torch
from torch import nn

# triton.jit reads TRITON_INTERPRET when the kernels are defined, i.e. when triton_lstm is imported.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

PERF_DIR = pathlib.Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
sys.path[:0] = [str(PERF_DIR), str(REPO_DIR)]
import triton  # noqa: E402

import triton_lstm  # noqa: E402
from timing import (bench_ms, compile_ahead, forward_then_train, random_inputs,  # noqa: E402
                    train_fn, tree_commit)
from triton_lstm import tuning  # noqa: E402
from triton_lstm.dispatch import gpu_slug  # noqa: E402

# torch.nn.LSTM never flattens bf16 weights (cudnn.is_acceptable leaves bf16 out), so every bf16
# cuDNN call repacks them and warns. That cost is part of the bf16 cuDNN numbers; the warning is noise.
warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous")

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is optional; a printed counter does the job
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEERS = ("triton", "cudnn", "cudnn_graph", "cell_loop", "cell_loop_compiled", "flashrnn")
MODES = ("fwd", "train")
# The cuDNN numbers triton is measured against: the best of them, per mode.
CUDNN_PEERS = {"fwd": ("cudnn", "cudnn_graph"), "train": ("cudnn",),
               "step": ("cudnn", "cudnn_graph")}   # step: one step per call (step section)

GRID = [(B, H, 256) for B in (1, 8, 16, 64, 128, 512) for H in (256, 512, 1024)]
GRID.append((16, 768, 1024))   # FlashRNN's published shape
QUICK_GRID = [(B, H, 128) for B in (1, 8, 64) for H in (512, 1024)]
TIMING = dict(warmup_ms=25, rep_ms=100)
QUICK_TIMING = dict(warmup_ms=10, rep_ms=30)

# max|out - ref| / max|ref| of the output; fp32 leaves room for tf32, which cuDNN uses by default.
ERROR_BOUNDS = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 1e-2}
# The reference runs in float64 on the CPU; the first steps are enough to catch a wrong kernel.
CHECK_STEPS = 32
# Without a GPU: a tiny problem through the interpreter, where fp32 is exact (no tf32).
INTERPRETER_SHAPE = dict(T=4, B=2, H=16)
# A few roundings at each dtype's precision (bf16: 2**-8 a rounding, to nearest as on a GPU:
# kernels/forward.py, rounded_to).
INTERPRETER_BOUNDS = {"fp32": 1e-5, "fp64": 1e-12, "bf16": 1e-2}

FIELDS = ["peer", "dtype", "B", "H", "T", "mode", "median_us", "q20_us", "q80_us", "peak_mb",
          "rel_error", "gpu", "torch", "triton", "cudnn", "date", "commit", "auto_path", "layers"]


# -- peers -------------------------------------------------------------------------------------

class CellLoop(nn.Module):
    """torch.nn.LSTM's forward as a Python loop over nn.LSTMCell, with the LSTM's weights.

    compiled: run the step under torch.compile. The step, not the loop: dynamo
    would unroll all T steps into one graph, minutes of compilation per shape.
    """

    def __init__(self, lstm: nn.LSTM, compiled: bool = False):
        super().__init__()
        weight = lstm.weight_ih_l0
        self.cell = nn.LSTMCell(lstm.input_size, lstm.hidden_size, device=weight.device,
                                dtype=weight.dtype)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self.cell, name).copy_(getattr(lstm, name + "_l0"))
        # fullgraph: a graph break must fail loudly, not time a half-eager step as "compiled".
        self.step = torch.compile(self.cell, fullgraph=True, dynamic=False) if compiled else self.cell

    def forward(self, x, hx):
        h, c = hx[0][0], hx[1][0]
        outputs = []
        for x_t in x.unbind(0):
            h, c = self.step(x_t, (h, c))
            outputs.append(h)
        return torch.stack(outputs), (h.unsqueeze(0), c.unsqueeze(0))


class GraphedForward:
    """A module's no-grad forward captured once in a CUDA graph; calling it replays the graph."""

    def __init__(self, module: nn.Module, x: torch.Tensor, hx: tuple):
        # The graph reads and writes fixed addresses: it owns its inputs for as long as it lives.
        self.x, self.hx = x.clone(), tuple(s.clone() for s in hx)
        side = torch.cuda.Stream()   # warm up on a side stream, as the CUDA graph docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                module(self.x, self.hx)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.output, _ = module(self.x, self.hx)

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def build_peer(peer: str, lstm: nn.LSTM, x, hx):
    """(forward, module): a call that runs peer's forward and returns its output, and the
    module to train (None where the peer has no backward)."""
    if peer == "cudnn_graph":
        return GraphedForward(lstm, x, hx), None
    if peer == "triton":
        module = triton_lstm.LSTM.from_torch(lstm, backend="triton")
    elif peer == "cudnn":
        module = lstm
    elif peer == "cell_loop":
        module = CellLoop(lstm)
    elif peer == "cell_loop_compiled":
        torch._dynamo.reset()   # a fresh cache per shape: no recompile limit, no stale graphs
        module = CellLoop(lstm, compiled=True)
    else:
        raise ValueError(f"unknown peer {peer!r}")

    def forward():
        with torch.no_grad():
            return module(x, hx)[0]
    return forward, module


def flashrnn_status() -> str:
    if importlib.util.find_spec("flashrnn") is None:
        return "flashrnn: not installed, skipped"
    return "flashrnn: installed, but this benchmark has no adapter for its API yet, skipped"


# -- checks and timing -------------------------------------------------------------------------

def float64_reference(lstm: nn.LSTM, x, hx) -> torch.Tensor:
    """torch.nn.LSTM's output in float64 on the CPU, with lstm's weights (and layers)."""
    ref = nn.LSTM(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers,
                  dtype=torch.float64)
    ref.load_state_dict({k: v.detach().cpu().double() for k, v in lstm.state_dict().items()})
    with torch.no_grad():
        return ref(x.cpu().double(), tuple(s.cpu().double() for s in hx))[0]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want|; NaN if got has a NaN."""
    want = want.double().cpu()
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def within_bound(error: float, bound: float) -> bool:
    return error <= bound   # False for NaN: a NaN output is wrong, not unmeasurable


def time_training(module: nn.Module, x, hx, timing: dict) -> tuple[tuple, float]:
    """Forward+backward quantiles in ms, and the peak memory of one step in MB."""
    x = x.detach().clone().requires_grad_()
    hx = tuple(s.detach().clone().requires_grad_() for s in hx)
    run = train_fn(module, x, hx)
    quantiles = bench_ms(run, **timing)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak_mb = torch.cuda.max_memory_allocated() / 2**20
    module.zero_grad(set_to_none=True)   # the next peer's peak must not hold these gradients
    return quantiles, peak_mb


def check_then_time(forward, module, x, hx, reference, bound, modes, timing, label, log,
                    problems) -> Optional[tuple[float, list]]:
    """Check forward()'s first steps against reference; within bound, time each mode:
    forward alone ("fwd"), or training `module` ("train", skipped without one). Returns
    (error, [(mode, quantiles_ms, peak_mb)]), or None for a wrong output (logged and
    added to problems, never timed)."""
    error = relative_error(forward()[:reference.shape[0]], reference)
    if not within_bound(error, bound):
        problems.append(f"WRONG {label}: relative error {error:.2e} > {bound:.0e}, not timed")
        log(problems[-1])
        return None
    timings = []
    for mode in modes:
        if mode == "fwd":
            timings.append((mode, bench_ms(forward, **timing), None))
        elif module is not None:
            timings.append((mode, *time_training(module, x, hx, timing)))
    return error, timings


def skipped(label: str, exc: Exception, log) -> str:
    """Log why a peer was not timed (the error's first line); returns the problem to report."""
    message = str(exc).strip().split("\n")[0][:200]
    reason = f"{type(exc).__name__}: {message}"
    log(f"{label}: skipped, {reason}")
    return f"ERROR {label}: {reason}"


def make_row(peer, dtype_name, B, H, T, mode, quantiles_ms, peak_mb, error, env,
             auto_path="", layers=1) -> dict:
    """One result: quantiles in ms for the whole sequence become µs per step. auto_path: the
    path backend="auto" takes at this shape and mode ("kernels" or "nn.LSTM"); layers: of
    the stack timed (the stack section), 1 elsewhere."""
    median, q20, q80 = (ms * 1e3 / T for ms in quantiles_ms)
    return dict(peer=peer, dtype=dtype_name, B=B, H=H, T=T, mode=mode, median_us=median,
                q20_us=q20, q80_us=q80, peak_mb=peak_mb, rel_error=error, **env,
                auto_path=auto_path, layers=layers)


def auto_paths(lstm: nn.LSTM, x, hx) -> dict:
    """Which path backend="auto" takes for this shape, per mode (triton_lstm.explain)."""
    module = triton_lstm.LSTM.from_torch(lstm)
    with torch.no_grad():
        fwd = triton_lstm.explain(module, x, hx).path
    return {"fwd": fwd, "train": triton_lstm.explain(module, x, hx).path}


def seeded_problem(dtype_name: str, T: int, B: int, H: int, device="cuda"):
    """The same layer and inputs for every peer of a shape: nn.LSTM(H, H), x [T, B, H], hx."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H, device=device, dtype=dtype)
    return lstm, *random_inputs(T, B, H, H, dtype, device)


def compile_layer(job) -> str:
    """Run the triton peer once at a shape, forward and training, at T = 2 (the kernels do
    not specialise on T or B), so that Triton's disk cache holds every kernel its timings
    will run; returns "" or why it failed (the run proper checks, and reports, that shape)."""
    dtype_name, B, H, device = job
    try:
        lstm, x, hx = seeded_problem(dtype_name, 2, B, H, device)
        forward_then_train(triton_lstm.LSTM.from_torch(lstm, backend="triton"), x, hx)
        return ""
    except Exception as exc:
        return f"{dtype_name} B={B} H={H}: {type(exc).__name__}"


def run_config(dtype_name, B, H, T, peers, modes, timing, env, log) -> tuple[list, list]:
    """Check, then time, every peer at one dtype and shape; returns (rows, problems)."""
    lstm, x, hx = seeded_problem(dtype_name, T, B, H)
    # The recurrence is causal: the first steps of the full output are the short run's output.
    steps = min(CHECK_STEPS, T)
    reference = float64_reference(lstm, x[:steps], hx)
    bound = ERROR_BOUNDS[dtype_name]
    auto = auto_paths(lstm, x, hx)
    rows, problems = [], []
    for peer in peers:
        label = f"{peer} {dtype_name} B={B} H={H} T={T}"
        try:
            forward, module = build_peer(peer, lstm, x, hx)
            measured = check_then_time(forward, module, x, hx, reference, bound, modes, timing,
                                       label, log, problems)
            if measured is None:
                continue
            error, timings = measured
            rows += [make_row(peer, dtype_name, B, H, T, mode, quantiles, peak_mb, error, env,
                              auto[mode]) for mode, quantiles, peak_mb in timings]
        except Exception as exc:   # say why and post nothing: never a number from a broken run
            problem = skipped(label, exc, log)
            if peer != "cell_loop_compiled":   # torch.compile failing is a finding, not our bug
                problems.append(problem)
        finally:
            forward = module = None   # free this peer (CUDA graph pool, copies) before the next
    return rows, problems


# -- results -----------------------------------------------------------------------------------

def config_key(row: dict) -> tuple:
    return row["dtype"], row["B"], row["H"], row["T"], row["mode"]


def speedups(rows: list[dict]) -> dict[tuple, float]:
    """Speed-up of triton over the best cuDNN number, per (dtype, B, H, T, mode), where both exist."""
    median = {(row["peer"],) + config_key(row): row["median_us"] for row in rows}
    result = {}
    for key in dict.fromkeys(config_key(row) for row in rows):
        ours = median.get(("triton",) + key)
        cudnn = [median[(peer,) + key] for peer in CUDNN_PEERS[key[-1]] if (peer,) + key in median]
        if ours and cudnn:
            result[key] = min(cudnn) / ours
    return result


def _fmt(value, fmt="{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: list[dict]) -> str:
    """µs per step (median) of every peer, and triton's speed-up over the best cuDNN number."""
    rows = [row for row in rows if row["peer"] in PEERS]     # not the stack section's
    peers = [peer for peer in PEERS if any(row["peer"] == peer for row in rows)]
    median = {(row["peer"],) + config_key(row): row["median_us"] for row in rows}
    ratio = speedups(rows)
    widths = [max(len(peer), 8) for peer in peers]
    lines = [f"{'dtype':5} {'B':>4} {'H':>5} {'T':>5} {'mode':5} "
             + " ".join(f"{peer:>{w}}" for peer, w in zip(peers, widths)) + f" {'speed-up':>8}"]
    for key in dict.fromkeys(config_key(row) for row in rows):
        dtype_name, B, H, T, mode = key
        cells = " ".join(f"{_fmt(median.get((peer,) + key)):>{w}}" for peer, w in zip(peers, widths))
        lines.append(f"{dtype_name:5} {B:4} {H:5} {T:5} {mode:5} {cells} "
                     f"{_fmt(ratio.get(key), '{:.2f}x'):>8}")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    """The README's Markdown table: the kernels and backend="auto" against the best cuDNN
    number, forward and training. An auto cell is the time of the path auto took (recorded
    by the run); where the run did not record it, the path the auto rule picks from these
    numbers, marked with *."""
    median = {(row["peer"],) + config_key(row): row["median_us"] for row in rows}
    ratio = speedups(rows)
    recorded = {config_key(row): row["auto_path"] for row in rows if row.get("auto_path")}
    lines = ["| dtype | B | H | T | kernels fwd µs | auto fwd µs | best cuDNN fwd µs | speed-up "
             "| kernels train µs | auto train µs | cuDNN train µs | speed-up |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    def table_order(shape):   # dtypes as in DTYPES, then T, H, B
        dtype_name, B, H, T = shape
        return list(DTYPES).index(dtype_name) if dtype_name in DTYPES else len(DTYPES), T, H, B

    # Not the step rows, nor the stack section's.
    shapes = {config_key(row)[:4] for row in rows if row["mode"] in MODES and row["peer"] in PEERS}
    for shape in sorted(shapes, key=table_order):
        cells = []
        for mode in MODES:
            key = shape + (mode,)
            cudnn = [median[(p,) + key] for p in CUDNN_PEERS[mode] if (p,) + key in median]
            cells += [_fmt(median.get(("triton",) + key)),
                      auto_cell(recorded.get(key), median.get(("triton",) + key),
                                median.get(("cudnn",) + key), mode),
                      _fmt(min(cudnn) if cudnn else None), _fmt(ratio.get(key), "{:.2f}x")]
        lines.append("| " + " | ".join([shape[0], *map(str, shape[1:])] + cells) + " |")
    return "\n".join(lines)


def auto_cell(path, kernels_us, cudnn_us, mode) -> str:
    """'3.48 (kernels)': auto's time, that of the path it takes (nn.LSTM eager for "nn.LSTM");
    without a recorded path, the auto rule's pick from these numbers, marked '*'."""
    rule = ""
    if not path and kernels_us and cudnn_us:
        entry = {"kernels_us": {mode: kernels_us}, "cudnn_us": {mode: cudnn_us}}
        path, rule = ("kernels" if tuning.kernels_faster(entry, mode) else "nn.LSTM"), "*"
    us = kernels_us if path == "kernels" else cudnn_us
    return "-" if not path or us is None else f"{us:.2f} ({path}{rule})"


def write_results(rows: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """results.csv and results.json in out_dir, one row per (peer, dtype, B, H, T, mode)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    return [csv_path, json_path]


def plot_speedups(rows: list[dict], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """speedup_<mode>.png: speed-up over best cuDNN vs batch, a line per H, a subplot per dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = speedups(rows)
    gpu = rows[0]["gpu"] if rows else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for mode, title in (("fwd", "forward"), ("train", "forward + backward")):
        dtypes = [d for d in DTYPES if any(k[0] == d and k[-1] == mode for k in ratio)]
        if not dtypes:
            continue
        fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4), squeeze=False, sharey=True)
        for ax, dtype_name in zip(axes[0], dtypes):
            lines = {}   # (H, T) -> [(B, speed-up)]
            for (d, B, H, T, m), speedup in sorted(ratio.items()):
                if d == dtype_name and m == mode:
                    lines.setdefault((H, T), []).append((B, speedup))
            for (H, T), line in sorted(lines.items()):
                ax.plot(*zip(*line), marker="o", label=f"H={H}, T={T}")
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)   # parity with cuDNN
            ax.set_xscale("log", base=2)
            batches = sorted({B for line in lines.values() for B, _ in line})
            ax.set_xticks(batches, [str(B) for B in batches])
            ax.minorticks_off()
            ax.set(title=dtype_name, xlabel="batch size")
            ax.legend(fontsize="small")
        axes[0][0].set_ylabel("speed-up over best cuDNN")
        fig.suptitle(f"triton_lstm {title}, {gpu}")
        fig.tight_layout()
        paths.append(out_dir / f"speedup_{mode}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def copy_flat(paths: list[pathlib.Path], dest: pathlib.Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in paths:
        if (dest / path.name).resolve() != path.resolve():
            shutil.copy2(path, dest / path.name)


def environment() -> dict:
    """What a number depends on besides the shape: GPU, versions, date, commit."""
    commit = tree_commit()
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), commit=commit)


# -- entry points ------------------------------------------------------------------------------

def parse_shapes(texts: list[str], default_steps: int) -> list[tuple[int, int, int]]:
    """'8x512' -> (8, 512, default_steps); '16x768x1024' -> (16, 768, 1024)."""
    shapes = []
    for text in texts:
        parts = text.lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"shape {text!r} is not BxH or BxHxT (e.g. 8x512, 16x768x1024)")
        B, H, T = map(int, parts + [str(default_steps)] * (3 - len(parts)))
        shapes.append((B, H, T))
    return shapes


def interpreter_check() -> int:
    """No GPU: the kernels under the interpreter at a tiny shape, against float64; no timings."""
    T, B, H = INTERPRETER_SHAPE["T"], INTERPRETER_SHAPE["B"], INTERPRETER_SHAPE["H"]
    print(f"No CUDA GPU found: no GPU timings. Checking the Triton kernels under the interpreter "
          f"(TRITON_INTERPRET=1) at T={T}, B={B}, H={H} against float64.")
    from step_bench import run_steps
    failed = False
    # (label, layers, wavefront, how to run the module over x from hx)
    for label, layers, wavefront, run in (
            ("interpreter", 1, False, lambda module, x, hx: module(x, hx)[0]),
            ("interpreter step", 1, False, run_steps),
            ("interpreter wavefront", 2, True, lambda module, x, hx: module(x, hx)[0])):
        for dtype_name, dtype in (("fp32", torch.float32), ("fp64", torch.float64),
                                  ("bf16", torch.bfloat16)):
            torch.manual_seed(0)
            lstm = nn.LSTM(H, H, num_layers=layers, dtype=dtype)
            ours = triton_lstm.LSTM.from_torch(lstm, backend="triton", wavefront=wavefront)
            x, _ = random_inputs(T, B, H, H, dtype, device="cpu")
            hx = tuple(torch.randn(layers, B, H, dtype=dtype) for _ in range(2))
            with torch.no_grad():
                error = relative_error(run(ours, x, hx), float64_reference(lstm, x, hx))
            ok = within_bound(error, INTERPRETER_BOUNDS[dtype_name])
            failed |= not ok
            print(f"{label} {dtype_name}: relative error {error:.2e} vs float64 "
                  f"(bound {INTERPRETER_BOUNDS[dtype_name]:.0e}) {'ok' if ok else 'WRONG'}")
    return 1 if failed else 0


def extra_sections(args) -> list:
    """The sections after the sequences, as (run, format table, title), per --memory / --step
    / --stack ("only" for one of them runs that one alone)."""
    alone = [name for name in ("memory", "step", "stack") if getattr(args, name) == "only"]

    def wanted(name):
        return getattr(args, name) != "off" and (not alone or name in alone)

    sections = []
    if wanted("memory"):
        from memory_bench import format_memory_table, memory_benchmark
        sections.append((memory_benchmark, format_memory_table,
                         "Training at long T, µs per step (median) and peak MB; recompute against "
                         "triton (time x: slower by, memory /: smaller by)"))
    if wanted("step"):
        from step_bench import format_step_table, step_benchmark
        sections.append((step_benchmark, format_step_table,
                         "One step per call, µs per step (median), speed-up = cuDNN / triton "
                         "(eager: nn.LSTM / step, graph: both replayed)"))
    if wanted("stack"):
        from stack_bench import format_stack_table, stack_benchmark
        sections.append((stack_benchmark, format_stack_table,
                         "Stacked layers, µs per time step of the whole stack (median): the "
                         "wavefront against the same layers one after another and cuDNN"))
    return sections


def benchmark(args) -> int:
    if args.shapes:
        shapes = parse_shapes(args.shapes, 128 if args.quick else 256)
    else:
        shapes = QUICK_GRID if args.quick else GRID
    timing = QUICK_TIMING if args.quick else TIMING
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
          f"commit {env['commit']}")
    if "flashrnn" in args.peers:
        print(flashrnn_status())
    peers = [peer for peer in args.peers if peer != "flashrnn"]
    out_dir = pathlib.Path(args.out) if args.out else PERF_DIR / "results" / gpu_slug(env["gpu"])
    copy_dir = pathlib.Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    log = tqdm.write if tqdm else print
    configs = [(d, B, H, T) for d in args.dtypes for B, H, T in shapes]
    if "only" in (args.step, args.memory, args.stack):
        configs = []
    if "triton" in peers:
        compile_ahead(compile_layer, [(d, B, H, "cuda") for d, B, H, _ in configs],
                      min(16, os.cpu_count() or 1), log=print)
    bar = tqdm(configs, unit="config") if tqdm else configs
    rows, problems, files = [], [], []

    def record(measured: tuple[list, list]) -> None:
        # Saved after every config: a run cut short still leaves what it measured.
        rows.extend(measured[0])
        problems.extend(measured[1])
        files[:] = write_results(rows, out_dir)
        if copy_dir:
            copy_flat(files, copy_dir)

    for i, (dtype_name, B, H, T) in enumerate(bar, 1):
        if tqdm:
            bar.set_description(f"{dtype_name} B={B} H={H} T={T}")
        else:
            print(f"[{i}/{len(configs)}] {dtype_name} B={B} H={H} T={T}", flush=True)
        record(run_config(dtype_name, B, H, T, peers, args.modes, timing, env, log))
    for run_section, format_section, title in extra_sections(args):
        record(run_section(args, env, log))
        print(f"\n{title}\n{format_section(rows)}")
    print(f"\nµs per step (median), speed-up = best cuDNN / triton\n{format_table(rows)}")
    try:
        files += plot_speedups(rows, out_dir)
    except ImportError:
        print("matplotlib not installed: no plots")
    if copy_dir:
        copy_flat(files, copy_dir)
    print("wrote " + ", ".join(str(path) for path in files))
    for problem in problems:
        print(problem)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small grid at T=128, fewer repetitions")
    parser.add_argument("--shapes", nargs="+", metavar="BxH[xT]", help="e.g. 8x512 16x768x1024")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--out", metavar="DIR", help="results folder (default perf/results/<gpu>/)")
    parser.add_argument("--summarize", metavar="JSON", help="print a results.json as a Markdown table")
    parser.add_argument("--step", choices=("on", "off", "only"), default="on",
                        help="the one-step latency section (LSTM.step against nn.LSTM at T=1 "
                             "and nn.LSTMCell, eager and CUDA graph): after the sequences, "
                             "skipped, or alone")
    parser.add_argument("--stack", choices=("on", "off", "only"), default="on",
                        help="the stacked-layer section (LSTM(wavefront=True) against the same "
                             "layers one after another and cuDNN): after the sequences, "
                             "skipped, or alone")
    parser.add_argument("--memory", choices=("on", "off", "only"), default="on",
                        help="the long-sequence training section (time and peak memory with "
                             "and without recompute, and cuDNN): after the sequences, skipped, "
                             "or alone")
    args = parser.parse_args(argv)
    if args.shapes:
        try:
            parse_shapes(args.shapes, 1)
        except ValueError as error:
            parser.error(str(error))
    if args.summarize:
        print(summarize(json.loads(pathlib.Path(args.summarize).read_text())))
        return 0
    if not HAS_GPU:
        return interpreter_check()
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
