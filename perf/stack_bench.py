"""The stack section of `make perf`: stacked unidirectional layers, µs per time step of the stack.

A stack of L layers, I = H, T steps, for
    stack_wavefront     triton_lstm.LSTM(wavefront=True): every layer in one persistent
                        launch, layer l at time t while layer l + 1 runs t - 1 (T + L - 1
                        steps)
    stack_dataflow      the same wavefront with dataflow waits instead of its barrier (its
                        config with ``dataflow``): each program polls the tiles it reads
    stack_layers        triton_lstm.LSTM: the same layers one after another (L * T steps)
    stack_cudnn         torch.nn.LSTM
    stack_cudnn_graph   torch.nn.LSTM's forward replayed from a CUDA graph (forward only)
Forward (no grad) and training (forward + backward, each a wavefront for the wavefront
peers). Rows carry their number of layers; µs are per time step of the whole stack.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

import triton_lstm
from triton_lstm import tuning
from triton_lstm.autograd import lstm_stack_wavefront
from triton_lstm.dispatch import launch_counts
from triton_lstm.kernels.wavefront import wavefront_config
from bench import (CHECK_STEPS, CUDNN_PEERS, DTYPES, ERROR_BOUNDS, GraphedForward, _fmt,
                   check_then_time, float64_reference, make_row, skipped)
from timing import compile_ahead, forward_then_train

STACK_PEERS = ("stack_wavefront", "stack_dataflow", "stack_layers", "stack_cudnn",
               "stack_cudnn_graph")
STACK_GRID = [(B, H, L) for B in (1, 8) for H in (256, 512) for L in (2, 3)]
STACK_GRID += [(8, 1024, 2), (64, 512, 2)]
QUICK_STACK_GRID = [(8, 512, 2), (8, 512, 3)]
STACK_STEPS = 256


def seeded_stack(dtype_name: str, T: int, B: int, H: int, L: int, device="cuda"):
    """nn.LSTM(H, H, num_layers=L) on the GPU, x [T, B, H] and hx [L, B, H] each, seeded."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    lstm = nn.LSTM(H, H, num_layers=L, device=device, dtype=dtype)
    x = torch.randn(T, B, H, device=device, dtype=dtype)
    hx = tuple(torch.randn(L, B, H, device=device, dtype=dtype) for _ in range(2))
    return lstm, x, hx


class DataflowWavefront(nn.Module):
    """lstm's stack as the wavefront with dataflow waits (wavefront_config, dataflow=True)."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, hx):
        lstm = self.lstm
        weights = [tuple(getattr(lstm, f"{name}_l{k}") for name in
                         ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                   for k in range(lstm.num_layers)]
        config = dataclasses.replace(
            wavefront_config(x.shape[1], lstm.hidden_size, lstm.num_layers, x.dtype,
                             tuning.sm_count(x.device)), dataflow=True)
        y, h_n, c_n = lstm_stack_wavefront(x, hx[0], hx[1], weights, config=config)
        return y, (h_n, c_n)


def build_stack_peer(peer: str, lstm: nn.LSTM, x, hx):
    """(forward, module): peer's no-grad forward returning its output, and the module to
    train (None for the graph replay)."""
    if peer == "stack_cudnn_graph":
        return GraphedForward(lstm, x, hx), None
    if peer == "stack_cudnn":
        module = lstm
    elif peer == "stack_dataflow":
        module = DataflowWavefront(lstm)
    elif peer in ("stack_wavefront", "stack_layers"):
        module = triton_lstm.LSTM.from_torch(lstm, backend="triton",
                                             wavefront=peer == "stack_wavefront")
    else:
        raise ValueError(f"unknown stack peer {peer!r}")

    def forward():
        with torch.no_grad():
            return module(x, hx)[0]
    return forward, module


def compile_stack(job) -> str:
    """Run the kernel peers of a stack once, forward and training, at T = 2 (the kernels do
    not specialise on T or B), so that Triton's disk cache holds what their timings run;
    returns "" or why it failed (the run proper checks, and reports, that stack)."""
    dtype_name, B, H, L, device = job
    try:
        lstm, x, hx = seeded_stack(dtype_name, 2, B, H, L, device)
        for peer in ("stack_wavefront", "stack_dataflow", "stack_layers"):
            forward_then_train(build_stack_peer(peer, lstm, x, hx)[1], x, hx)
        return ""
    except Exception as exc:
        return f"stack {dtype_name} B={B} H={H} L={L}: {type(exc).__name__}"


def run_stack_config(dtype_name, B, H, L, T, modes, timing, env, log) -> tuple[list, list]:
    """Check every peer's output against float64, then time it in each mode."""
    lstm, x, hx = seeded_stack(dtype_name, T, B, H, L)
    steps = min(CHECK_STEPS, T)
    reference = float64_reference(lstm, x[:steps], hx)
    bound = ERROR_BOUNDS[dtype_name]
    rows, problems = [], []
    for peer in STACK_PEERS:
        label = f"{peer} {dtype_name} B={B} H={H} L={L} T={T}"
        forward = module = None
        try:
            forward, module = build_stack_peer(peer, lstm, x, hx)
            stepped_before = launch_counts["stepped"]
            measured = check_then_time(forward, module, x, hx, reference, bound, modes, timing,
                                       label, log, problems)
            if launch_counts["stepped"] > stepped_before:   # timed all the same, and said
                log(f"{label}: ran stepped (one launch per step): a barrier group did not fit")
            if measured is None:
                continue
            error, timings = measured
            rows += [make_row(peer, dtype_name, B, H, T, mode, quantiles, peak_mb, error, env,
                              layers=L) for mode, quantiles, peak_mb in timings]
        except Exception as exc:   # say why and post nothing, as bench.run_config
            problems.append(skipped(label, exc, log))
        finally:
            forward = module = None
    return rows, problems


def format_stack_table(rows: list[dict]) -> str:
    """µs per time step (median) of every stack peer; the wavefront's speed-up over the
    layers one after another, and over the best cuDNN number of the mode."""
    median = {(row["peer"], row["dtype"], row["B"], row["H"], row["layers"], row["mode"]):
              row["median_us"] for row in rows if row["peer"] in STACK_PEERS}
    lines = [f"{'dtype':5} {'B':>4} {'H':>5} {'L':>2} {'mode':5} "
             + " ".join(f"{p:>17}" for p in STACK_PEERS) + f" {'vs layers':>9} {'vs cuDNN':>8}"]
    for key in dict.fromkeys(k[1:] for k in median):
        cells = " ".join(f"{_fmt(median.get((p,) + key)):>17}" for p in STACK_PEERS)
        ours = median.get(("stack_wavefront",) + key)
        layers = median.get(("stack_layers",) + key)
        cudnn = [median[(f"stack_{p}",) + key] for p in CUDNN_PEERS[key[-1]]
                 if (f"stack_{p}",) + key in median]
        vs_layers = layers / ours if ours and layers else None
        vs_cudnn = min(cudnn) / ours if ours and cudnn else None
        lines.append(f"{key[0]:5} {key[1]:4} {key[2]:5} {key[3]:2} {key[4]:5} {cells} "
                     f"{_fmt(vs_layers, '{:.2f}x'):>9} {_fmt(vs_cudnn, '{:.2f}x'):>8}")
    return "\n".join(lines)


def stack_benchmark(args, env, log) -> tuple[list, list]:
    """The stack section of `make perf`: STACK_GRID at T = 256 in the run's dtypes."""
    from bench import QUICK_TIMING, TIMING
    grid = QUICK_STACK_GRID if args.quick else STACK_GRID
    timing = QUICK_TIMING if args.quick else TIMING
    rows, problems = [], []
    compile_ahead(compile_stack, [(d, B, H, L, "cuda") for d in args.dtypes for B, H, L in grid],
                  min(16, os.cpu_count() or 1), log=print)
    for dtype_name in args.dtypes:
        for B, H, L in grid:
            print(f"stack {dtype_name} B={B} H={H} L={L}", flush=True)
            new_rows, new_problems = run_stack_config(dtype_name, B, H, L, STACK_STEPS,
                                                      args.modes, timing, env, log)
            rows += new_rows
            problems += new_problems
    return rows, problems
