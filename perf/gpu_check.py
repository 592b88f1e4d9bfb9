"""Short timing table for `make gpu-check`: triton_lstm vs torch.nn.LSTM, µs per step.

T = 256, input size = hidden size, one layer; forward (no grad) and forward+backward.
Prints the table and writes it as CSV to $OUT (or perf/results/) with the GPU's name.
Then the cost of a whole call at T = 1 and 16 (B=8 H=512 bf16), calls back to back, and
the host's share of it (time to issue a call): where the per-call overhead of the custom
ops and the Function shows. Written to gpu_check_calls.csv. Then stacks of 2-3 layers:
the wavefront against the same layers one after another and cuDNN, µs per time step of
the stack (gpu_check_stack.csv; `make perf --stack only` has the full grid).
"""
from __future__ import annotations

import csv
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import triton_lstm  # noqa: E402
from timing import (bench_calls_ms, bench_ms, forward_fn, host_us_per_call,  # noqa: E402
                    random_inputs, train_fn)

SHAPES = [(1, 512), (8, 256), (8, 512), (8, 1024), (64, 512), (128, 1024), (512, 1024)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
T = 256


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU found")
    gpu = torch.cuda.get_device_name()
    rows = []
    print(f"{gpu}, torch {torch.__version__}, T={T}, µs per step (median)")
    print(f"{'dtype':5} {'B':>4} {'H':>5} | {'ours fwd':>9} {'cuDNN fwd':>9} {'x':>5} | "
          f"{'ours f+b':>9} {'cuDNN f+b':>9} {'x':>5}")
    for dtype_name, dtype in DTYPES.items():
        for B, H in SHAPES:
            torch_lstm = torch.nn.LSTM(H, H, device="cuda", dtype=dtype)
            ours = triton_lstm.LSTM.from_torch(torch_lstm, backend="triton")
            x, hx = random_inputs(T, B, H, H, dtype)
            xg, hxg = random_inputs(T, B, H, H, dtype, requires_grad=True)
            row = dict(gpu=gpu, dtype=dtype_name, B=B, H=H, T=T)
            for name, module in (("ours", ours), ("cudnn", torch_lstm)):
                row[f"{name}_fwd_us"] = bench_ms(forward_fn(module, x, hx))[0] * 1e3 / T
                row[f"{name}_train_us"] = bench_ms(train_fn(module, xg, hxg))[0] * 1e3 / T
            rows.append(row)
            print(f"{dtype_name:5} {B:4} {H:5} | {row['ours_fwd_us']:9.2f} {row['cudnn_fwd_us']:9.2f} "
                  f"{row['cudnn_fwd_us'] / row['ours_fwd_us']:5.1f} | {row['ours_train_us']:9.2f} "
                  f"{row['cudnn_train_us']:9.2f} {row['cudnn_train_us'] / row['ours_train_us']:5.1f}",
                  flush=True)
    out_dir = pathlib.Path(os.environ.get("OUT") or pathlib.Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "gpu_check.csv", rows)
    write_csv(out_dir / "gpu_check_calls.csv", per_call_rows(gpu))
    write_csv(out_dir / "gpu_check_stack.csv", stack_rows(gpu))


def per_call_rows(gpu: str) -> list[dict]:
    B, H, dtype = 8, 512, torch.bfloat16
    torch_lstm = torch.nn.LSTM(H, H, device="cuda", dtype=dtype)
    ours = triton_lstm.LSTM.from_torch(torch_lstm, backend="triton")
    rows = []
    print(f"\nwhole calls, B={B} H={H} bf16, µs per call (back to back) / host µs to issue one")
    for steps in (1, 16):
        x, hx = random_inputs(steps, B, H, H, dtype)
        xg, hxg = random_inputs(steps, B, H, H, dtype, requires_grad=True)
        for name, module in (("ours", ours), ("cudnn", torch_lstm)):
            for mode, fn in (("fwd", forward_fn(module, x, hx)), ("train", train_fn(module, xg, hxg))):
                row = dict(gpu=gpu, impl=name, mode=mode, B=B, H=H, T=steps,
                           call_us=bench_calls_ms(fn)[0] * 1e3, host_us=host_us_per_call(fn))
                rows.append(row)
                print(f"T={steps:<3} {name:5} {mode:5} {row['call_us']:9.1f} {row['host_us']:9.1f}",
                      flush=True)
    return rows


STACKS = [("bf16", 8, 512, 2), ("bf16", 8, 512, 3), ("fp16", 8, 256, 2), ("fp32", 8, 512, 2),
          ("bf16", 1, 256, 3)]   # dtype, B, H, layers


def stack_rows(gpu: str) -> list[dict]:
    rows = []
    print(f"\nstacks, T={T}, µs per time step of the stack: wavefront, layers one after another, "
          "cuDNN (x: cuDNN / wavefront)")
    for dtype_name, B, H, L in STACKS:
        dtype = DTYPES[dtype_name]
        torch_lstm = torch.nn.LSTM(H, H, num_layers=L, device="cuda", dtype=dtype)
        x = torch.randn(T, B, H, device="cuda", dtype=dtype)
        xg = x.clone().requires_grad_()
        hx = tuple(torch.zeros(L, B, H, device="cuda", dtype=dtype) for _ in range(2))
        row = dict(gpu=gpu, dtype=dtype_name, B=B, H=H, L=L, T=T)
        for name, module in (
                ("wavefront", triton_lstm.LSTM.from_torch(torch_lstm, backend="triton",
                                                          wavefront=True)),
                ("layers", triton_lstm.LSTM.from_torch(torch_lstm, backend="triton")),
                ("cudnn", torch_lstm)):
            row[f"{name}_fwd_us"] = bench_ms(forward_fn(module, x, hx))[0] * 1e3 / T
            row[f"{name}_train_us"] = bench_ms(train_fn(module, xg, hx))[0] * 1e3 / T
        rows.append(row)
        print(f"{dtype_name:5} B={B:<3} H={H:<5} L={L} fwd " + " ".join(
            f"{row[f'{n}_fwd_us']:8.2f}" for n in ("wavefront", "layers", "cudnn"))
            + f" {row['cudnn_fwd_us'] / row['wavefront_fwd_us']:5.1f}x | train " + " ".join(
            f"{row[f'{n}_train_us']:8.2f}" for n in ("wavefront", "layers", "cudnn"))
            + f" {row['cudnn_train_us'] / row['wavefront_train_us']:5.1f}x", flush=True)
    return rows


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
