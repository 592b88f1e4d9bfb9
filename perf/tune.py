"""`make tune`: measure tile configs per GPU / dtype / shape and keep the fastest.

For each (dtype, B, H) it times the forward and the backward recurrent kernels
over a set of candidate ``KernelConfig``s (hidden block, batch block, warps,
resident or streamed weights) and writes the best of each to
``triton_lstm/configs/<gpu>.json`` (merged with what is there), where
``dispatch.pick_config`` finds it at run time. Configs that do not compile or
fit the chip are reported and skipped.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import sys

import torch
import triton

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from timing import bench_ms  # noqa: E402

from triton_lstm import dispatch  # noqa: E402
from triton_lstm.dispatch import KernelConfig, gpu_slug, on_chip_bytes, padded, tuned_key  # noqa: E402
from triton_lstm.kernels.backward import lstm_backward  # noqa: E402
from triton_lstm.kernels.forward import lstm_forward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(B, H) for B in (1, 8, 16, 64, 128, 512) for H in (256, 512, 1024)]
QUICK_SHAPES = [(8, 512), (64, 512), (128, 1024)]
SHARED_MEMORY = 227 * 1024


def candidates(batch, hidden, dtype, num_sms, quick):
    block_bs = [b for b in (16, 32, 64, 128) if b <= max(16, triton.next_power_of_2(batch))]
    block_hs = (4, 8, 16, 32) if quick else (4, 8, 16, 32, 64)
    warps = (4, 8) if quick else (2, 4, 8)
    for block_b, block_h, num_warps, resident in itertools.product(block_bs, block_hs, warps, (True, False)):
        if triton.cdiv(hidden, block_h) > num_sms:
            continue
        if resident and on_chip_bytes(hidden, block_b, block_h, dtype) > SHARED_MEMORY:
            continue
        if quick and not resident and on_chip_bytes(hidden, block_b, block_h, dtype) <= SHARED_MEMORY:
            continue   # quick sweeps stream weights only where they cannot stay on chip
        yield KernelConfig(block_b=block_b, block_h=block_h, resident=resident,
                           block_k=min(64, padded(hidden)), num_warps=num_warps)


def tune_shape(batch, hidden, dtype, T, quick):
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    gx = torch.randn(T, batch, 4 * hidden, device="cuda", dtype=dtype)
    w_hh = torch.randn(1, 4 * hidden, hidden, device="cuda", dtype=dtype) / hidden ** 0.5
    _, _, _, gates, c_all, _ = lstm_forward(gx, w_hh, None, None, None, save=True)
    dy = torch.randn(T, batch, hidden, device="cuda", dtype=dtype)
    best = {}
    for config in candidates(batch, hidden, dtype, num_sms, quick):
        try:
            fwd = bench_ms(lambda: lstm_forward(gx, w_hh, None, None, None, save=False, config=config),
                           warmup_ms=10, rep_ms=40)[0]
            bwd = bench_ms(lambda: lstm_backward(dy, None, None, gates, c_all, None, None, w_hh, config=config),
                           warmup_ms=10, rep_ms=40)[0]
        except Exception as error:   # a config that does not compile or fit: skip it, say why
            print(f"  skip {config}: {type(error).__name__}: {str(error)[:120]}", flush=True)
            continue
        print(f"  {config}: fwd {fwd * 1e3 / T:7.2f} µs/step, bwd {bwd * 1e3 / T:7.2f} µs/step", flush=True)
        for kind, ms in (("forward", fwd), ("backward", bwd)):
            if kind not in best or ms < best[kind][0]:
                best[kind] = (ms, config)
    return {kind: dict(vars(config), us_per_step=round(ms * 1e3 / T, 3)) for kind, (ms, config) in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--shapes", nargs="+", help="BxH pairs, e.g. 8x512 64x1024")
    parser.add_argument("--quick", action="store_true", help="a few shapes and candidates")
    parser.add_argument("--steps", type=int, default=128, help="sequence length timed")
    parser.add_argument("--out", help="JSON file to write (default: triton_lstm/configs/<gpu>.json)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune: no CUDA GPU found; tuning measures real kernels")
    gpu = torch.cuda.get_device_name()
    shapes = ([tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes
              else QUICK_SHAPES if args.quick else SHAPES)
    out = pathlib.Path(args.out) if args.out else dispatch.CONFIG_DIR / f"{gpu_slug(gpu)}.json"
    table = json.loads(out.read_text()) if out.exists() else {}
    for dtype_name in args.dtypes:
        for batch, hidden in shapes:
            print(f"{gpu} {dtype_name} B={batch} H={hidden}", flush=True)
            best = tune_shape(batch, hidden, DTYPES[dtype_name], args.steps, args.quick)
            if best:
                table[tuned_key(DTYPES[dtype_name], batch, hidden)] = best
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
    if os.environ.get("OUT"):
        (pathlib.Path(os.environ["OUT"]) / out.name).write_text(out.read_text())


if __name__ == "__main__":
    main()
