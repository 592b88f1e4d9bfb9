"""The memory section of `make perf`: training time and peak memory of long sequences.

Training (forward + backward) of one layer, I = H, at long T, for
    triton            triton_lstm.LSTM, saving every step's gates (the default)
    triton_recompute  triton_lstm.LSTM(recompute=RECOMPUTE_EVERY): the state every k
                      steps, the gates recomputed segment by segment in the backward
    cudnn             torch.nn.LSTM
Rows have mode "train" and peak_mb, the peak of allocated memory over one training
step (inputs and weights included). Targets: triton_recompute's peak >= 4x smaller
than triton's at <= 1.35x its time.
"""
from __future__ import annotations

import torch
from torch import nn

import triton_lstm
from bench import (CHECK_STEPS, ERROR_BOUNDS, _fmt, float64_reference, make_row, relative_error,
                   seeded_problem, skipped, time_training, within_bound)

MEMORY_PEERS = ("triton", "triton_recompute", "cudnn")
MEMORY_GRID = [(8, 512, 4096), (64, 1024, 1024)]        # B, H, T
QUICK_MEMORY_GRID = [(8, 512, 1024)]
MEMORY_DTYPES = ("fp32", "bf16")
RECOMPUTE_EVERY = 64


def build_memory_peer(peer: str, lstm: nn.LSTM) -> nn.Module:
    if peer == "cudnn":
        return lstm
    recompute = RECOMPUTE_EVERY if peer == "triton_recompute" else None
    return triton_lstm.LSTM.from_torch(lstm, backend="triton", recompute=recompute)


def run_memory_config(dtype_name, B, H, T, timing, env, log) -> tuple[list, list]:
    """Check the forward, then time training and take its peak memory, for every peer."""
    lstm, x, hx = seeded_problem(dtype_name, T, B, H)
    steps = min(CHECK_STEPS, T)
    reference = float64_reference(lstm, x[:steps], hx)
    bound = ERROR_BOUNDS[dtype_name]
    rows, problems = [], []
    for peer in MEMORY_PEERS:
        label = f"memory {peer} {dtype_name} B={B} H={H} T={T}"
        module = None
        try:
            module = build_memory_peer(peer, lstm)
            with torch.no_grad():
                error = relative_error(module(x[:steps], hx)[0], reference)
            if not within_bound(error, bound):
                problems.append(f"WRONG {label}: relative error {error:.2e} > {bound:.0e}, "
                                "not timed")
                log(problems[-1])
                continue
            quantiles, peak_mb = time_training(module, x, hx, timing)
            rows.append(make_row(peer, dtype_name, B, H, T, "train", quantiles, peak_mb, error,
                                 env))
        except Exception as exc:   # say why and post nothing, as bench.run_config
            problems.append(skipped(label, exc, log))
        finally:
            module = None
            torch.cuda.empty_cache()
    return rows, problems


def format_memory_table(rows: list[dict]) -> str:
    """Training µs per step and peak MB per peer; recompute's time and memory against triton's."""
    cell = {(row["peer"], row["dtype"], row["B"], row["H"], row["T"]): row for row in rows
            if row["mode"] == "train" and row["peer"] in MEMORY_PEERS}
    keys = dict.fromkeys(k[1:] for k in cell if k[0] == "triton_recompute")
    lines = [f"{'dtype':5} {'B':>4} {'H':>5} {'T':>6} "
             + " ".join(f"{p + ' us':>20} {'MB':>8}" for p in MEMORY_PEERS)
             + f" {'time x':>7} {'memory /':>9}"]
    for key in keys:
        found = [cell.get((p,) + key) for p in MEMORY_PEERS]
        cells = " ".join(f"{_fmt(r and r['median_us']):>20} {_fmt(r and r['peak_mb'], '{:.0f}'):>8}"
                         for r in found)
        full, small = found[0], found[1]
        time_x = small["median_us"] / full["median_us"] if (full and small) else None
        memory = full["peak_mb"] / small["peak_mb"] if (full and small) else None
        lines.append(f"{key[0]:5} {key[1]:4} {key[2]:5} {key[3]:6} {cells} "
                     f"{_fmt(time_x, '{:.2f}x'):>7} {_fmt(memory, '{:.1f}x'):>9}")
    return "\n".join(lines)


def memory_benchmark(args, env, log) -> tuple[list, list]:
    """The memory section of `make perf`: MEMORY_GRID in fp32 and bf16."""
    from bench import QUICK_TIMING, TIMING
    shapes = QUICK_MEMORY_GRID if args.quick else MEMORY_GRID
    timing = QUICK_TIMING if args.quick else TIMING
    rows, problems = [], []
    for dtype_name in (d for d in args.dtypes if d in MEMORY_DTYPES):
        for B, H, T in shapes:
            print(f"memory {dtype_name} B={B} H={H} T={T}", flush=True)
            new_rows, new_problems = run_memory_config(dtype_name, B, H, T, timing, env, log)
            rows += new_rows
            problems += new_problems
    return rows, problems
