"""The step section of `make perf`: one step per call (streaming inference), µs per step.

One step per call, as a server streaming requests runs it: B x H at T = 1, one layer, I = H.
    triton        triton_lstm.LSTM.step (one fused launch)
    cudnn         torch.nn.LSTM on a length-1 sequence
    cell          torch.nn.LSTMCell
and each *_graph: one step replayed from a CUDA graph, its state carried in buffers.
Rows have mode "step" and T = 1; bench.py writes them with the others.
"""
from __future__ import annotations

import torch
from torch import nn

import triton_lstm
from bench import (ERROR_BOUNDS, CellLoop, _fmt, float64_reference, make_row, parse_shapes,
                   relative_error, seeded_problem, skipped, within_bound)
from timing import bench_calls_ms

STEP_PEERS = ("triton", "triton_graph", "cudnn", "cudnn_graph", "cell", "cell_graph")
STEP_GRID = [(B, H) for B in (1, 8, 64) for H in (256, 512, 1024)]
QUICK_STEP_GRID = [(B, H) for B in (1, 8, 64) for H in (512, 1024)]
STEP_DTYPES = ("fp32", "bf16")
STEP_TIMING = dict(calls=100, reps=20)
QUICK_STEP_TIMING = dict(calls=50, reps=10)


class CapturedStep:
    """One no-grad call of `step` (which moves its state buffers on) captured in a CUDA graph."""

    def __init__(self, step, reset):
        side = torch.cuda.Stream()   # warm up on a side stream, as the CUDA graph docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.output = step()
        reset()   # the warm-up moved the state on: the first replay starts from hx

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


def build_step_peer(peer: str, lstm: nn.LSTM, x, hx):
    """A call that runs one step of `peer` on x [B, H] from hx (each [1, B, H]), returning y_t.

    The *_graph peers replay one captured step that carries its state in buffers, as
    the README's recipe does: the new state goes to fresh tensors, then into the buffers.
    """
    kind = peer.removesuffix("_graph")
    state = tuple(s.clone() for s in hx)
    if kind == "triton":
        module = triton_lstm.LSTM.from_torch(lstm, backend="triton")
        def eager():
            return module.step(x, hx)[0]

        def stateful():
            return module.step(x, state, out=state)[0]
    elif kind == "cudnn":
        def eager():
            return lstm(x.unsqueeze(0), hx)[0][0]

        def stateful():
            y, new_state = lstm(x.unsqueeze(0), state)
            for buf, new in zip(state, new_state):
                buf.copy_(new)
            return y[0]
    elif kind == "cell":
        cell = CellLoop(lstm).cell
        def eager():
            return cell(x, (hx[0][0], hx[1][0]))[0]

        def stateful():
            h, c = cell(x, (state[0][0], state[1][0]))
            state[0][0].copy_(h)
            state[1][0].copy_(c)
            return h
    else:
        raise ValueError(f"unknown step peer {peer!r}")
    if peer.endswith("_graph"):
        def reset():
            for buf, s in zip(state, hx):
                buf.copy_(s)
        return CapturedStep(stateful, reset)

    def run():
        with torch.no_grad():
            return eager()
    return run


def run_step_config(dtype_name, B, H, timing, env, log) -> tuple[list, list]:
    """Check, then time, every step peer at one dtype and shape (rows: mode "step", T = 1)."""
    lstm, x, hx = seeded_problem(dtype_name, 1, B, H)
    reference = float64_reference(lstm, x, hx)[0]
    bound = ERROR_BOUNDS[dtype_name]
    rows, problems = [], []
    for peer in STEP_PEERS:
        label = f"step {peer} {dtype_name} B={B} H={H}"
        step = None
        try:
            step = build_step_peer(peer, lstm, x[0], hx)
            error = relative_error(step(), reference)
            if not within_bound(error, bound):
                problems.append(f"WRONG {label}: relative error {error:.2e} > {bound:.0e}, "
                                "not timed")
                log(problems[-1])
                continue
            quantiles = bench_calls_ms(step, **timing)
            rows.append(make_row(peer, dtype_name, B, H, 1, "step", quantiles, None, error, env))
        except Exception as exc:   # say why and post nothing, as run_config
            problems.append(skipped(label, exc, log))
        finally:
            step = None   # free this peer (CUDA graph pool, copies) before the next
    return rows, problems


def format_step_table(rows: list[dict]) -> str:
    """µs per step (median) of every step peer; triton's speed-up over cuDNN, eager and graphed."""
    median = {(row["peer"], row["dtype"], row["B"], row["H"]): row["median_us"]
              for row in rows if row["mode"] == "step"}
    lines = [f"{'dtype':5} {'B':>4} {'H':>5} " + " ".join(f"{p:>12}" for p in STEP_PEERS)
             + f" {'eager x':>8} {'graph x':>8}"]
    for key in dict.fromkeys(k[1:] for k in median):
        cells = " ".join(f"{_fmt(median.get((p,) + key)):>12}" for p in STEP_PEERS)
        ratios = []
        for ours, cudnn in (("triton", "cudnn"), ("triton_graph", "cudnn_graph")):
            a, b = median.get((ours,) + key), median.get((cudnn,) + key)
            ratios.append(_fmt(b / a if a and b else None, "{:.2f}x"))
        lines.append(f"{key[0]:5} {key[1]:4} {key[2]:5} {cells} {ratios[0]:>8} {ratios[1]:>8}")
    return "\n".join(lines)


def step_benchmark(args, env, log) -> tuple[list, list]:
    """The step section of `make perf`: STEP_GRID (or --shapes' B x H) in fp32 and bf16."""
    if args.shapes:
        shapes = list(dict.fromkeys((B, H) for B, H, _ in parse_shapes(args.shapes, 1)))
    else:
        shapes = QUICK_STEP_GRID if args.quick else STEP_GRID
    timing = QUICK_STEP_TIMING if args.quick else STEP_TIMING
    rows, problems = [], []
    for dtype_name in (d for d in args.dtypes if d in STEP_DTYPES):
        for B, H in shapes:
            print(f"step {dtype_name} B={B} H={H}", flush=True)
            new_rows, new_problems = run_step_config(dtype_name, B, H, timing, env, log)
            rows += new_rows
            problems += new_problems
    return rows, problems


def run_steps(module, x, hx) -> torch.Tensor:
    """module.step through x [T, B, I] from hx, one call per step: the outputs [T, B, H]."""
    state, ys = hx, []
    for x_t in x.unbind(0):
        y_t, state = module.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys)
