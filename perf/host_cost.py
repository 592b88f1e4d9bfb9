"""Where the host's time per call goes: triton_lstm.LSTM and nn.LSTM, one call at T = 1.

A layer call at small T costs what the host spends issuing it (gpu_check_calls.csv): the
Python of the module, the custom ops and the Function, and each CUDA runtime call, whose
price depends on the machine (a sandboxed GPU host pays far more per call than bare metal).
This prints, per implementation and mode, the CUDA runtime calls one call makes (from
torch.profiler) and the Python functions that take the host's time (cProfile).

    python3 perf/host_cost.py [--B 8] [--H 512] [--dtype bf16] [--top 25]

Without a GPU, ``--python`` times the Python of a call alone on the CPU: the layer under the
Triton interpreter with every recurrence launch stubbed out (nothing is computed), best of 5
runs of 300 calls. The CPU path differs from a GPU's in a few branches (the heuristic
instead of make tune's table, no residency check), and a GPU host runs Python at its own
speed: compare two commits on one machine, not a GPU run with this.

    TRITON_INTERPRET=1 python3 perf/host_cost.py --python [--B 8] [--H 64] [--T 1]
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import io
import pathlib
import pstats
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import triton_lstm  # noqa: E402
from timing import forward_fn, host_us_per_call, random_inputs, train_fn  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CALLS = 50


def runtime_calls(fn) -> collections.Counter:
    """CUDA runtime / driver calls per call of fn, each with the ops it ran under (the
    innermost three, e.g. 'cudaMemcpyAsync <- aten::copy_ <- aten::to')."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    counts = collections.Counter()
    for event in prof.events():
        if event.name.startswith(("cuda", "cu")) and event.device_type == torch.autograd.DeviceType.CPU:
            parents, parent = [], event.cpu_parent
            while parent is not None and len(parents) < 3:
                parents.append(parent.name)
                parent = parent.cpu_parent
            counts[" <- ".join([event.name] + parents)] += 1
    return collections.Counter({name: n / 10 for name, n in counts.items()})


def python_us_per_call(fn, calls: int = 300, runs: int = 5) -> float:
    """Best over `runs` of the mean wall time of `calls` calls of fn, in µs."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def python_only(args) -> None:
    """The Python of a forward and a training call on the CPU, every launch stubbed out."""
    from triton_lstm import dispatch
    from triton_lstm.kernels import backward, forward
    if not dispatch.interpreting():
        sys.exit("host_cost --python: set TRITON_INTERPRET=1 (the CPU path of the layer)")
    for module in (dispatch, forward, backward):
        module.launch_recurrence = lambda *a, **k: None
    dtype = torch.float32      # the CPU's: the kernels compute nothing here
    ours = triton_lstm.LSTM(args.H, args.H, backend="triton", dtype=dtype)
    x, hx = random_inputs(args.T, args.B, args.H, args.H, dtype, device="cpu")
    xg, hxg = random_inputs(args.T, args.B, args.H, args.H, dtype, device="cpu",
                            requires_grad=True)
    for mode, fn in (("fwd", forward_fn(ours, x, hx)), ("train", train_fn(ours, xg, hxg))):
        print(f"{mode}: {python_us_per_call(fn):.1f} µs of Python a call (fp32 B={args.B} "
              f"H={args.H} T={args.T}, launches stubbed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--T", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--python", action="store_true",
                        help="the Python of a call alone, on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.python:
        return python_only(args)
    if not torch.cuda.is_available():
        sys.exit("host_cost: no CUDA GPU found")
    dtype = DTYPES[args.dtype]
    torch_lstm = torch.nn.LSTM(args.H, args.H, device="cuda", dtype=dtype)
    ours = triton_lstm.LSTM.from_torch(torch_lstm, backend="triton")
    x, hx = random_inputs(args.T, args.B, args.H, args.H, dtype)
    xg, hxg = random_inputs(args.T, args.B, args.H, args.H, dtype, requires_grad=True)
    for name, module in (("ours", ours), ("cudnn", torch_lstm)):
        for mode, fn in (("fwd", forward_fn(module, x, hx)), ("train", train_fn(module, xg, hxg))):
            for _ in range(5):
                fn()
            host_us = host_us_per_call(fn, CALLS)
            calls = runtime_calls(fn)
            print(f"\n== {name} {mode}, {args.dtype} B={args.B} H={args.H} T={args.T}: "
                  f"{host_us:.0f} host µs per call, {sum(calls.values()):.0f} CUDA API calls")
            for api, n in calls.most_common():
                print(f"  {n:6.1f}  {api}")
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(CALLS):
                fn()
            profiler.disable()
            torch.cuda.synchronize()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
            print("\n".join(line for line in text.getvalue().splitlines()[6:] if line.strip()))


if __name__ == "__main__":
    main()
