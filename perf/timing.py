"""Timing helpers shared by the benchmarks: CUDA-event timing through triton.testing.do_bench."""
from __future__ import annotations

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
    """Forward and backward through every input and parameter, upstream gradient on y."""
    def run():
        y, _ = module(x, hx)
        y.backward(grad)
    y, _ = module(x, hx)
    grad = torch.randn_like(y)
    return run


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
