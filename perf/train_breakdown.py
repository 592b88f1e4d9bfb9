"""Where a training call's GPU time goes: one layer's forward + backward, kernel by kernel
(or an inference call's: --mode forward).

A training step of the layer is the recurrence (the forward and backward persistent
kernels) and, around it, torch's GEMMs (x W_ih^T, then dx, dW_ih and dW_hh over dG),
elementwise and reduction kernels (bias sums, casts) and copies. This profiles one call
(torch.profiler, after warm-up), sorts its kernels into those groups and prints µs per
time step of each, the largest kernels, and the span of the call on the GPU against the
kernels' sum (the difference is time the GPU waited between kernels, or, negative, time
kernels ran side by side), then the call timed alone (do_bench, µs per step).
--backward-chunks runs ours once per count given (``dispatch.backward_chunks``: the
backward in chunks, each chunk's GEMMs beside the next chunk's recurrence; 0: one launch),
--forward-chunks the same for the forward (``dispatch.forward_chunks``: each chunk's input
projection beside the recurrence of the chunk before), every pair of the two;
--backward-config and --forward-config force a kernel's tile (a config label, e.g. a
64-program tile that leaves SMs to those GEMMs). --mode forward profiles an inference call.

    python3 perf/train_breakdown.py [--shapes bf16:512x1024 fp32:128x1024 ...] [--T 256]
                                    [--peer triton|cudnn] [--mode train|forward]
                                    [--forward-chunks 0 4] [--backward-chunks 0 4 8]
                                    [--backward-config bb64-bh32-str-bk64-sk4-w16-st3]
                                    [--forward-config bb64-bh32-str-bk64-sk4-w8-st3] [--out DIR]
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import re
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import triton_lstm  # noqa: E402
from triton_lstm import dispatch, tuning  # noqa: E402
from bench import DTYPES  # noqa: E402
from timing import bench_ms, forward_fn, random_inputs, train_fn  # noqa: E402
from variants import write_csv  # noqa: E402

DEFAULT_SHAPES = ("bf16:512x1024", "bf16:128x1024", "fp32:512x1024")
DEVICE = "cuda"
# Kernel names to groups, first match wins (Triton kernels carry their function's name;
# cuBLAS's and CUTLASS's carry gemm / xmma / nvjet; torch's own say what they do).
GROUPS = (("recurrence forward", r"lstm_forward|lstm_wavefront_kernel"),
          ("recurrence backward", r"lstm_backward|lstm_wavefront_backward"),
          ("GEMM", r"gemm|gemv|cutlass|xmma|nvjet|cublas|matmul"),
          ("copy / fill", r"copy|memcpy|memset|fill|zero"),
          ("elementwise / reduce", r"elementwise|reduce|vectorized|unrolled"))
OTHER = "other"


def group_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    return next((group for group, pattern in GROUPS if re.search(pattern, name)), OTHER)


def breakdown(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """kernels: (name, start µs, duration µs) of one call on the GPU. µs per step of each
    group and of each kernel name (with its launches), the kernels' sum and the span from
    the first kernel's start to the last one's end."""
    groups, names = collections.Counter(), collections.Counter()
    launches = collections.Counter()
    for name, _, duration in kernels:
        groups[group_of(name)] += duration / steps
        names[name] += duration / steps
        launches[name] += 1
    span = (max(start + duration for _, start, duration in kernels)
            - min(start for _, start, _ in kernels)) if kernels else 0.0
    return dict(groups=groups, names=names, launches=launches,
                kernels_us=sum(groups.values()), span_us=span / steps)


def profile_call(fn) -> list[tuple[str, float, float]]:
    """The GPU kernels one call of fn runs, as (name, start µs, duration µs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA]


def report(label: str, result: dict, top: int) -> str:
    lines = [f"== {label}: kernels {result['kernels_us']:.2f} µs/step, span on the GPU "
             f"{result['span_us']:.2f} (span - kernels "
             f"{result['span_us'] - result['kernels_us']:+.2f}: waits, or side by side where "
             f"negative)"]
    for group, us in result["groups"].most_common():
        lines.append(f"  {us:9.2f}  {100 * us / result['kernels_us']:5.1f}%  {group}")
    lines.append("  largest kernels (µs/step, launches):")
    for name, us in result["names"].most_common(top):
        lines.append(f"  {us:9.2f}  x{result['launches'][name]:<3} {name[:110]}")
    return "\n".join(lines)


def rows_of(peer: str, dtype_name: str, B: int, H: int, T: int, result: dict,
            backward_chunks="", timed_us=None, backward_config="", mode="train",
            forward_chunks="", forward_config="") -> list[dict]:
    base = dict(peer=peer, mode=mode, forward_chunks=forward_chunks,
                forward_config=forward_config, backward_chunks=backward_chunks,
                backward_config=backward_config,
                dtype=dtype_name, B=B, H=H, T=T)
    rows = [dict(base, group=group, kernel="", launches="", us_per_step=round(us, 3))
            for group, us in result["groups"].items()]
    rows += [dict(base, group=group_of(name), kernel=name, launches=result["launches"][name],
                  us_per_step=round(us, 3)) for name, us in result["names"].items()]
    rows.append(dict(base, group="span on the GPU", kernel="", launches="",
                     us_per_step=round(result["span_us"], 3)))
    if timed_us is not None:
        rows.append(dict(base, group="timed call", kernel="", launches="",
                         us_per_step=round(timed_us, 3)))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="dtype:BxH, e.g. bf16:512x1024")
    parser.add_argument("--T", type=int, default=256)
    parser.add_argument("--peer", default="triton", choices=("triton", "cudnn"),
                        help="cudnn: the same layer as nn.LSTM, for comparison")
    parser.add_argument("--mode", default="train", choices=("train", "forward"),
                        help="forward: an inference call (no gradient)")
    parser.add_argument("--forward-chunks", type=int, nargs="+",
                        help="ours once per count (dispatch.forward_chunks); default: "
                             "TRITON_LSTM_FORWARD_CHUNKS's")
    parser.add_argument("--backward-chunks", type=int, nargs="+",
                        help="ours once per count (dispatch.backward_chunks), in training; "
                             "default: TRITON_LSTM_BACKWARD_CHUNKS's")
    parser.add_argument("--backward-config", default="",
                        help="ours with this backward tile (a config label); default: the "
                             "table's or the heuristic's")
    parser.add_argument("--forward-config", default="",
                        help="ours with this forward tile (a config label); default: the "
                             "table's or the heuristic's")
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--out", type=pathlib.Path, help="writes train_breakdown.csv there")
    args = parser.parse_args(argv)
    labels = dict(forward=args.forward_config, backward=args.backward_config)
    if args.peer == "cudnn":
        labels = dict(forward="", backward="")
    elif args.mode == "forward":
        labels["backward"] = ""
    forced = {}
    for kernel, label in labels.items():
        try:
            forced[kernel] = tuning.config_from_label(label) if label else None
        except ValueError as e:
            parser.error(f"--{kernel}-config: {e}")
    if not torch.cuda.is_available():
        sys.exit("train_breakdown: no CUDA GPU found")
    training = args.mode == "train"
    rows = []
    for spec in args.shapes:
        match = re.fullmatch(r"(\w+):(\d+)x(\d+)", spec)
        if not match or match.group(1) not in DTYPES:
            parser.error(f"--shapes: expected dtype:BxH with dtype in {list(DTYPES)}, got {spec!r}")
        dtype_name, B, H = match.group(1), int(match.group(2)), int(match.group(3))
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        module = (torch.nn.LSTM(H, H, device=DEVICE, dtype=dtype) if args.peer == "cudnn" else
                  triton_lstm.LSTM(H, H, device=DEVICE, dtype=dtype, backend="triton"))
        x, hx = random_inputs(args.T, B, H, H, dtype, device=DEVICE, requires_grad=training)
        fn = train_fn(module, x, hx) if training else forward_fn(module, x, hx)
        settings = [("", "")]
        if args.peer == "triton":
            settings = [(f, b) for f in args.forward_chunks or [dispatch.forward_chunk_count()]
                        for b in (args.backward_chunks or [dispatch.backward_chunk_count()]
                                  if training else [""])]
        for forward_count, count in settings:
            label = args.peer
            if forward_count != "":
                dispatch.forward_chunks = forward_count
                label += (f" (forward in {forward_count} chunks)" if forward_count > 1
                          else " (forward in one launch)")
            if count != "":
                dispatch.backward_chunks = count
                label += (f" (backward in {count} chunks)" if count > 1
                          else " (backward in one launch)")
            label += "".join(f" [{kernel} {tile}]" for kernel, tile in labels.items() if tile)
            label += f" {dtype_name} B={B} H={H} T={args.T} {'training' if training else 'forward'}"
            try:
                with tuning.forced_configs(**forced):
                    for _ in range(3):           # compile, autotune caches, allocator
                        fn()
                    torch.cuda.synchronize()
                    result = breakdown(profile_call(fn), args.T)
                    timed_us = bench_ms(fn)[0] * 1e3 / args.T
            except Exception as e:     # one failing setting must not cost the others' rows
                print(f"== {label}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            print(report(label, result, args.top), flush=True)
            print(f"  timed call: {timed_us:.2f} µs/step", flush=True)
            rows += rows_of(args.peer, dtype_name, B, H, args.T, result, count, timed_us,
                            labels["backward"], args.mode, forward_count, labels["forward"])
            if args.out:             # after every setting: a run cut short keeps its rows
                args.out.mkdir(parents=True, exist_ok=True)
                write_csv(args.out / "train_breakdown.csv", list(rows[0]), rows)
    if args.out and rows:
        print(f"wrote {args.out / 'train_breakdown.csv'}")


if __name__ == "__main__":
    main()
