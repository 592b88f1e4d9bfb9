"""Does a kernel call take the same time every call? The forward kernel alone, timed call by
call, under launch conditions that differ in what runs right before it.

In run 4 (perf/NOTES.md) the same small-batch config ran 2.2 µs/step in one `make perf`
run and 3.3-3.7 in the other, while large-batch kernels repeated within 1%. A step at
small batch is a chain of dependent L2 round trips, so where the persistent programs
land (which SMs, how far from the L2 slice holding the barrier counter and h) could set
it, and that depends on what occupies the GPU when the kernel launches:

    back-to-back   calls queued one after another (a training loop)
    idle           the GPU synchronised before each launch
    flushed        an L2 flush (a 256 MB write, as do_bench does) before each call
    after-gemm     a GEMM over every SM right before each call, no sync

Per shape and condition: min, q20, median, q80 and max µs/step over the calls, and the
share of calls within 5% of the fastest. Writes step_spread.csv to $OUT (or --out).

    python3 perf/step_spread.py [--calls 200] [--steps 256] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from variants import DTYPES, problem, runner, write_csv  # noqa: E402
from triton_lstm.dispatch import heuristic_config  # noqa: E402
from triton_lstm.tuning import config_label  # noqa: E402

SHAPES = [("bf16", 8, 512), ("fp16", 8, 256), ("bf16", 1, 512), ("bf16", 128, 1024)]
CONDITIONS = ("back-to-back", "idle", "flushed", "after-gemm")
FIELDS = ["dtype", "B", "H", "T", "config", "condition", "calls", "min_us", "q20_us",
          "median_us", "q80_us", "max_us", "near_min_share", "gpu", "torch", "triton"]


def call_times_us(run, condition: str, calls: int, steps: int) -> torch.Tensor:
    """µs per step of each of `calls` calls of run() under `condition`."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(calls)]
    for _ in range(3):   # warm-up: compiled, allocated
        run()
    torch.cuda.synchronize()
    for start, end in events:
        if condition == "idle":
            torch.cuda.synchronize()
        elif condition == "flushed":
            flush.zero_()
        elif condition == "after-gemm":
            a @ a
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return torch.tensor([s.elapsed_time(e) * 1e3 / steps for s, e in events], dtype=torch.float64)


def summary(times: torch.Tensor) -> dict:
    fastest = float(times.min())
    q = [float(torch.quantile(times, p)) for p in (0.2, 0.5, 0.8)]
    return dict(calls=len(times), min_us=fastest, q20_us=q[0], median_us=q[1], q80_us=q[2],
                max_us=float(times.max()),
                near_min_share=float((times <= 1.05 * fastest).double().mean()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--out", default=os.environ.get("OUT") or "perf/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step_spread: no CUDA GPU found")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    path = pathlib.Path(args.out) / "step_spread.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for dtype_name, B, H in SHAPES:
        dtype = DTYPES[dtype_name]
        config = heuristic_config(B, H, dtype, num_sms, "forward")
        run = runner("forward", *problem(dtype, B, H, args.steps), config)
        for condition in CONDITIONS:
            row = dict(dtype=dtype_name, B=B, H=H, T=args.steps, config=config_label(config),
                       condition=condition, **env,
                       **summary(call_times_us(run, condition, args.calls, args.steps)))
            rows.append(row)
            print(f"{dtype_name:4} B={B:<4} H={H:<5} {condition:12} min {row['min_us']:6.2f} "
                  f"q20 {row['q20_us']:6.2f} median {row['median_us']:6.2f} "
                  f"q80 {row['q80_us']:6.2f} max {row['max_us']:6.2f} µs/step, "
                  f"{row['near_min_share']:.0%} within 5% of the fastest", flush=True)
            write_csv(path, FIELDS, rows)   # after every row: a run cut short keeps them
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
