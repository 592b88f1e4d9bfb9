"""Timing helpers shared by the benchmarks: CUDA-event timing through triton.testing.do_bench."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pathlib
import subprocess
import time

import torch
import triton

QUANTILES = (0.5, 0.2, 0.8)


def bench_ms(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles of fn's run time in milliseconds (warm-up excluded)."""
    return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))


def forward_fn(module, x, hx):
    def run():
        with torch.no_grad():
            module(x, hx)
    return run


def train_fn(module, x, hx):
    """Forward and backward through every input and parameter, upstream gradient on y, each
    call from gradients set to None, as a training step after ``zero_grad()`` (PyTorch's
    default, set_to_none) has them: the gradients are written, not added to the last call's
    (which would time an elementwise add per leaf, an x-sized one among them, for either peer)."""
    leaves = [t for t in (*module.parameters(), x, *(hx or ())) if t.requires_grad]

    def run():
        for leaf in leaves:
            leaf.grad = None
        y, _ = module(x, hx)
        y.backward(grad)
    y, _ = module(x, hx)
    grad = torch.randn_like(y)
    return run


def forward_then_train(module, x, hx) -> None:
    """One no-grad forward and one training step of module (x and hx requiring gradients, as
    the timed training has them), waiting for both: every kernel they run is then built."""
    forward_fn(module, x, hx)()
    x = x.detach().requires_grad_()
    train_fn(module, x, tuple(s.detach().requires_grad_() for s in hx))()
    x.grad.cpu()


def random_inputs(T, B, I, H, dtype, device="cuda", requires_grad=False):
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=requires_grad)
    hx = tuple(torch.randn(1, B, H, device=device, dtype=dtype, requires_grad=requires_grad)
               for _ in range(2))
    return x, hx


def bench_calls_ms(fn, *, calls: int = 100, reps: int = 20,
                   warmup: int = 10) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles of the time per call of fn in ms, in steady state.

    Each sample times `calls` back-to-back calls between two CUDA events (no L2 flush,
    unlike do_bench): what a stream of one-step requests costs per step, host launch
    overhead included when the host is slower than the GPU.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        per_call.append(start.elapsed_time(end) / calls)
    samples = torch.tensor(per_call, dtype=torch.float64)
    return tuple(float(torch.quantile(samples, q)) for q in QUANTILES)


def host_us_per_call(fn, calls: int = 200) -> float:
    """Microseconds the host spends issuing one call (the GPU queue absorbs the work)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued * 1e6 / calls


def compile_ahead(compile_fn, jobs: list, processes: int, log=print) -> None:
    """Run compile_fn(job) for every job in parallel processes, so that Triton's disk cache
    holds each kernel before anything is timed: a compile is ~1.5 s of CPU work, and the GPU
    host's cores would sit idle while the timings run one by one. compile_fn returns "" or
    why it failed; nothing is measured here (the workers' GPU work overlaps)."""
    if not jobs or processes < 2:
        return
    start = time.monotonic()
    try:   # an executor, not a Pool: a worker that dies breaks it instead of being respawned
        with concurrent.futures.ProcessPoolExecutor(
                processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            failed = [msg for msg in pool.map(compile_fn, jobs) if msg]
    except concurrent.futures.process.BrokenProcessPool as error:
        log(f"compiling ahead stopped ({error}); the kernels compile as they are first run")
        return
    log(f"compiled {len(jobs)} jobs in {processes} processes in "
        f"{time.monotonic() - start:.0f} s ({len(failed)} failed; they are run, and reported, "
        "where they are measured)")


def tree_commit() -> str:
    """The commit the numbers are measured at: COMMIT where the tree is a copy whose .git (if
    any) lags behind it, else git's HEAD, "+dirty" with uncommitted changes to tracked files."""
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    repo = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
