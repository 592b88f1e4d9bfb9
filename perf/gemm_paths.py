"""How fast can an fp32 layer's input GEMM run under nn.LSTM's tf32 rule? Four paths, timed.

An fp32 layer at large batch spends most of its forward in x W_ih^T (run 3, perf/NOTES.md:
83 of 128 µs/step at B = 512, H = 1024), which torch runs in full fp32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set, while nn.LSTM's cuDNN GEMMs follow
``torch.backends.cudnn.allow_tf32`` (on by default), as the kernels' own dots do. The same
GEMM as a 1x1 convolution runs in cuDNN and follows the cuDNN flag, so the input projection
(and the gradient GEMMs) could follow nn.LSTM's rule without touching a global flag, if
cuDNN runs it near cuBLAS's tf32 speed; so could kernels/gemm.py, which takes the precision
as an argument. Per shape, [T*B, I] x [I, 4H]:

    fp32-gemm    torch.addmm, matmul tf32 off (today's path)
    tf32-gemm    torch.addmm with torch.backends.cuda.matmul.allow_tf32 = True
    tf32-conv    F.conv1d over [T*B, I, 1] with a [4H, I, 1] weight (cudnn.allow_tf32)
    tf32-triton  triton_lstm.kernels.gemm.matmul(precision="tf32")

prints µs per step (per T rows) and TFLOP/s, and each path's max relative difference
from the fp32 GEMM. Then the fp32 layer itself, forward and training, with its GEMMs in
torch and in kernels/gemm.py (``dispatch.fp32_gemms``), beside nn.LSTM, each checked
against float64 first (make perf's check and bound). Writes gemm_paths.csv and
gemm_layers.csv to $OUT (or --out).

    python3 perf/gemm_paths.py [--steps 256] [--out DIR] [--no-layers]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import (CHECK_STEPS, ERROR_BOUNDS, MODES, TIMING, build_peer,  # noqa: E402
                   check_then_time, float64_reference, make_row, seeded_problem, skipped)
from timing import bench_ms  # noqa: E402
from variants import write_csv  # noqa: E402

from triton_lstm import dispatch  # noqa: E402
from triton_lstm.kernels.gemm import matmul  # noqa: E402

SHAPES = [(64, 1024), (128, 1024), (512, 512), (512, 1024)]    # (B, H), I = H
PATHS = ("fp32-gemm", "tf32-gemm", "tf32-conv", "tf32-triton")
FIELDS = ["path", "B", "H", "T", "us_per_step", "tflops", "max_rel_diff", "gpu", "torch"]
LAYER_SHAPES = [(64, 1024), (128, 1024), (512, 512), (512, 1024)]    # fp32 layers, I = H
# (peer, GEMM engine of the kernels' layer): nn.LSTM eager and replayed from a CUDA graph,
# then the kernels with torch's GEMMs and with kernels/gemm.py's.
LAYER_PEERS = [("cudnn", ""), ("cudnn_graph", ""), ("triton", "torch"), ("triton", "triton")]
LAYER_FIELDS = ["peer", "fp32_gemms", "B", "H", "T", "mode", "median_us", "q20_us", "q80_us",
                "rel_error", "gpu", "torch"]


def projection(path: str, x2: torch.Tensor, w_ih: torch.Tensor, bias: torch.Tensor):
    """A no-argument call computing x2 W_ih^T + bias by `path` ([T*B, 4H])."""
    if path == "tf32-conv":
        weight = w_ih.unsqueeze(-1)                       # [4H, I, 1]
        x3 = x2.unsqueeze(-1)                             # [T*B, I, 1]
        return lambda: F.conv1d(x3, weight, bias).squeeze(-1)
    if path == "tf32-triton":
        return lambda: matmul(x2, w_ih.t(), bias, precision="tf32")
    return lambda: torch.addmm(bias, x2, w_ih.t())


def layer_rows(steps: int, env: dict, out_csv: pathlib.Path, device="cuda") -> list[dict]:
    """The fp32 layer with each GEMM engine, and nn.LSTM eager and graphed (make perf's peers,
    check and bound), per shape; the CSV is rewritten after each shape."""
    rows, problems, before = [], [], dispatch.fp32_gemms
    try:
        for B, H in LAYER_SHAPES:
            lstm, x, hx = seeded_problem("fp32", steps, B, H, device)
            reference = float64_reference(lstm, x[:CHECK_STEPS], hx)
            for peer, engine in LAYER_PEERS:
                dispatch.fp32_gemms = engine or before
                label = f"{peer} gemms={engine} fp32 B={B} H={H}"
                try:
                    forward, module = build_peer(peer, lstm, x, hx)
                    measured = check_then_time(forward, module, x, hx, reference,
                                               ERROR_BOUNDS["fp32"], MODES, TIMING, label, print,
                                               problems)
                except Exception as exc:    # say why, post nothing, go on with the others
                    problems.append(skipped(label, exc, print))
                    continue
                finally:
                    forward = module = None
                if measured is None:
                    continue
                error, timings = measured
                for mode, quantiles, _ in timings:
                    row = make_row(peer, "fp32", B, H, steps, mode, quantiles, None, error, env)
                    rows.append(dict({k: row.get(k) for k in LAYER_FIELDS}, fp32_gemms=engine))
                    print(f"{label:40} {mode:5} {row['median_us']:8.2f} µs/step", flush=True)
            write_csv(out_csv, LAYER_FIELDS, rows)
    finally:
        dispatch.fp32_gemms = before
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--out", default=os.environ.get("OUT") or "perf/results")
    parser.add_argument("--no-layers", action="store_true", help="the GEMMs alone")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemm_paths: no CUDA GPU found")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    path_csv = pathlib.Path(args.out) / "gemm_paths.csv"
    path_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for B, H in SHAPES:
            torch.manual_seed(0)
            x2 = torch.randn(args.steps * B, H, device="cuda")
            w_ih = torch.randn(4 * H, H, device="cuda") / H ** 0.5
            bias = torch.randn(4 * H, device="cuda")
            torch.backends.cuda.matmul.allow_tf32 = False
            want = projection("fp32-gemm", x2, w_ih, bias)().double()
            flop = 2.0 * x2.shape[0] * H * 4 * H
            for path in PATHS:
                torch.backends.cuda.matmul.allow_tf32 = path == "tf32-gemm"
                run = projection(path, x2, w_ih, bias)
                diff = float((run().double() - want).abs().max() / want.abs().max())
                ms = bench_ms(run)[0]
                row = dict(path=path, B=B, H=H, T=args.steps, us_per_step=ms * 1e3 / args.steps,
                           tflops=flop / (ms * 1e-3) / 1e12, max_rel_diff=diff, **env)
                rows.append(row)
                print(f"B={B:<4} H={H:<5} {path:10} {row['us_per_step']:8.2f} µs/step "
                      f"{row['tflops']:7.1f} TFLOP/s  diff {diff:.1e}", flush=True)
                write_csv(path_csv, FIELDS, rows)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    print(f"wrote {path_csv}")
    if not args.no_layers:
        layers_csv = pathlib.Path(args.out) / "gemm_layers.csv"
        layer_rows(args.steps, env, layers_csv)
        print(f"wrote {layers_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
