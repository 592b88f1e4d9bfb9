"""A/B of kernel variants on a GPU: each checked against the heuristic config, then timed.

For the experiments of perf/NOTES.md: split_k of the small-batch backward, pipelined
inner K loops (inner_stages), the next step's loads after the barrier arrival
(prefetch_after_arrive), dataflow waits instead of the grid barrier (dataflow),
resident weights in chunks at large H (chunked), wider large-batch tiles, the
backward's gate split (gate_split), the hardware cluster barrier for groups of 8-16
programs (cluster; each beside the same tile at the counter), h (in the backward,
shares of dh) exchanged through distributed shared memory (dsmem) and the small-batch forward
and backward with their weights in registers (registers; a row says "not run" where the
config's tl tile ran instead; its rows can set the kernels' knobs after the label:
"@backoff=NS" pauses between polls, "@load=4" loads h or dG 4 bytes at a time, the mma.sync
fragments' own layout, "@splits=2" gives the backward two warps a gate, "@warps=8" the
forward that pushes h programs of 8 warps, "@unit_warps=2" the backward that pushes dG
programs of 32 units (two warps a gate side by side), "@push=8" the lanes of both kernels
that push 16-bit h and dG pushes of 8 bytes (fours of units); the group "split" has the backward's rows with
two warps a gate, the group "pushed" the registers forward pushing h (the backward dG)
through its cluster, beside it reading them from L2; a row says "not run (read from L2)"
where no cluster launched). Each row runs one kernel
(forward: lstm_forward with save as in training; backward: lstm_backward on that
forward's saved values) at T steps, D = 1, I = H, and compares its outputs with the
heuristic config's (a variant must compute the same function). Every config is first
compiled in parallel processes (--jobs; a 2-step run each), then the rows are timed one
by one. Writes variants.csv to $OUT (or --out) and prints a table: µs per step, median
and the 20-80% spread.

    python3 perf/variants.py [--steps 256]
                             [--only cluster|registers|split|small|large|pushed]
                             [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from timing import bench_ms, compile_ahead  # noqa: E402
from triton_lstm.dispatch import heuristic_config, launch_counts  # noqa: E402
from triton_lstm.kernels.backward import lstm_backward  # noqa: E402
from triton_lstm.kernels.forward import lstm_forward  # noqa: E402
from triton_lstm.tuning import config_from_label, config_label  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (group, kernel, dtype, B, H, variant labels besides the heuristic's)
EXPERIMENTS = [
    # Small batch: groups of 16 (8) wider programs at the cluster barrier, and the same tiles
    # at the counter, against the heuristic's 32-64 programs at the counter (issue 8).
    ("cluster", "forward", "fp16", 8, 256, ["bb16-bh16-res-bk64-sk1-w4",
                                            "bb16-bh16-res-bk64-sk1-w4-cl",
                                            "bb16-bh32-res-bk64-sk1-w4-cl"]),
    ("cluster", "forward", "bf16", 8, 512, ["bb16-bh32-res-bk64-sk1-w4",
                                            "bb16-bh32-res-bk64-sk1-w4-cl",
                                            "bb16-bh32-res-bk64-sk4-w8-cl"]),
    ("cluster", "forward", "fp16", 8, 512, ["bb16-bh32-res-bk64-sk1-w4-cl"]),
    ("cluster", "forward", "bf16", 1, 512, ["bb16-bh32-res-bk64-sk1-w4-cl"]),
    ("cluster", "forward", "fp32", 8, 256, ["bb16-bh16-res-bk64-sk1-w4-cl"]),
    ("cluster", "backward", "fp16", 8, 256, ["bb16-bh16-res-bk64-sk1-w4",
                                             "bb16-bh16-res-bk64-sk1-w4-cl",
                                             "bb16-bh32-res-bk64-sk1-w4-cl"]),
    ("cluster", "backward", "bf16", 8, 512, ["bb16-bh32-res-bk64-sk4-w8",
                                             "bb16-bh32-res-bk64-sk4-w8-cl"]),
    # The forward pushing h into every program's shared memory (kernels/dsmem.py), last: a
    # push that never completes traps, which ends the process.
    ("cluster", "forward", "fp16", 8, 256, ["bb16-bh16-res-bk64-sk1-w4-cl-ds",
                                            "bb16-bh32-res-bk64-sk1-w4-cl-ds"]),
    ("cluster", "forward", "bf16", 8, 512, ["bb16-bh32-res-bk64-sk1-w4-cl-ds"]),
    ("cluster", "forward", "bf16", 1, 512, ["bb16-bh32-res-bk64-sk1-w4-cl-ds"]),
    ("cluster", "forward", "fp32", 8, 256, ["bb16-bh16-res-bk64-sk1-w4-cl-ds"]),
    ("cluster", "backward", "fp16", 8, 256, ["bb16-bh16-res-bk64-sk1-w4-cl-ds",
                                             "bb16-bh32-res-bk64-sk1-w4-cl-ds"]),
    ("cluster", "backward", "bf16", 8, 512, ["bb16-bh32-res-bk64-sk1-w4-cl-ds"]),
    # Small batch: the forward with its weights in registers, no shared memory in a step and
    # dataflow waits (kernels/forward_registers.py), beside the tl tile with the same waits.
    ("registers", "forward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df",
                                              "bb16-bh8-res-bk64-sk1-w4-rg",
                                              "bb16-bh8-res-bk64-sk1-w4-rg@backoff=100",
                                              "bb16-bh8-res-bk64-sk1-w4-rg@backoff=400",
                                              "bb16-bh8-res-bk64-sk1-w4-rg@load=4"]),
    ("registers", "forward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df",
                                              "bb16-bh8-res-bk64-sk1-w4-rg",
                                              "bb16-bh8-res-bk64-sk1-w4-rg@backoff=100"]),
    ("registers", "forward", "fp16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-rg"]),
    ("registers", "forward", "bf16", 1, 512, ["bb16-bh8-res-bk64-sk1-w4-rg"]),
    ("registers", "forward", "fp16", 16, 256, ["bb16-bh8-res-bk64-sk1-w4-rg"]),
    ("registers", "forward", "fp32", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-rg"]),   # tf32
    # The backward with its weights in registers (kernels/backward_registers.py): a gate a
    # warp, one shared-memory round trip a step, beside the tl tile with the same waits.
    ("registers", "backward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df",
                                               "bb16-bh8-res-bk64-sk1-w4-rg",
                                               "bb16-bh8-res-bk64-sk1-w4-rg@backoff=100"]),
    ("registers", "backward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df",
                                               "bb16-bh8-res-bk64-sk1-w4-rg"]),
    ("registers", "backward", "fp16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-rg"]),
    ("registers", "backward", "bf16", 1, 512, ["bb16-bh8-res-bk64-sk1-w4-rg"]),
    ("registers", "backward", "fp32", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-rg"]),  # tf32
    # The registers backward with two warps a gate, half of its reduction each: past H = 512
    # (fp32 256) beside the table's tl tile, and by choice where one warp would hold the slice
    # (half the chain, twice the warps) beside one warp a gate.
    ("split", "backward", "fp16", 8, 1024, ["bb16-bh16-res-bk64-sk4-w8",
                                            "bb16-bh16-res-bk64-sk4-w8-rg",
                                            "bb16-bh16-res-bk64-sk4-w8-rg@backoff=400"]),
    ("split", "backward", "bf16", 16, 1024, ["bb16-bh16-res-bk64-sk4-w8",
                                             "bb16-bh16-res-bk64-sk4-w8-rg"]),
    ("split", "backward", "fp32", 8, 512, ["bb16-bh8-res-bk64-sk4-w8",
                                           "bb16-bh8-res-bk64-sk4-w8-rg"]),  # tf32
    ("split", "backward", "fp16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-rg",
                                           "bb16-bh8-res-bk64-sk1-w4-rg@splits=2"]),
    ("split", "backward", "bf16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-rg",
                                           "bb16-bh8-res-bk64-sk1-w4-rg@splits=2"]),
    # Small batch: the backward's split_k (PERF-MODEL.md 2.4), loads after the arrival.
    ("small", "backward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk4-w4", "bb16-bh8-res-bk64-sk4-w8",
                                           "bb16-bh8-res-bk64-sk1-w4-pa",
                                           "bb16-bh8-res-bk64-sk4-w4-df"]),
    ("small", "backward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk4-w4",
                                           "bb16-bh8-res-bk64-sk4-w4-df"]),
    ("small", "backward", "fp16", 8, 1024, ["bb16-bh16-res-bk64-sk4-w8"]),
    # ...-chk-...-sk4: W in chunks that four accumulators take in turn, four chains of MMAs
    # a warp with no exchange between warps (kernels/forward.py, chunked_dot).
    ("small", "forward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-pa",
                                          "bb16-bh8-res-bk64-sk4-w4",
                                          "bb16-bh8-res-bk64-sk1-w4-df",
                                          "bb16-bh8-chk-bk64-sk4-w4"]),
    ("small", "forward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-pa",
                                          "bb16-bh8-res-bk64-sk1-w4-df",
                                          "bb16-bh8-chk-bk32-sk4-w4"]),
    ("small", "forward", "fp16", 8, 1024, ["bb16-bh16-res-bk64-sk1-w4-pa",
                                           "bb16-bh16-res-bk64-sk1-w4-df",
                                           "bb16-bh16-chk-bk64-sk4-w4"]),
    # Large batch: pipelined K loops, wider tiles (PERF-MODEL.md 2.2). Streamed forwards of
    # 32+ rows are pipelined by the heuristic since run 4: the unpipelined tile is listed.
    ("large", "forward", "bf16", 128, 1024, ["bb64-bh16-str-bk64-sk4-w8",
                                             "bb64-bh16-str-bk64-sk4-w8-st3-pa",
                                             "bb128-bh16-str-bk64-sk4-w16-st3",
                                             "bb64-bh16-chk-bk64-sk1-w4"]),
    ("large", "forward", "fp16", 64, 512, ["bb32-bh8-str-bk64-sk4-w8-st3"]),
    # The backward's heuristic streams half the rows, twice the units since run 4 (64x16 ->
    # 32x32 here, 128x16 -> 64x32 at B=512): the old tile is listed.
    ("large", "backward", "bf16", 128, 1024, ["bb64-bh16-str-bk64-sk4-w8",
                                              "bb32-bh32-str-bk64-sk4-w8-st3",
                                              "bb64-bh16-str-bk64-sk4-w8-gs",
                                              "bb32-bh32-str-bk64-sk4-w8-gs",
                                              "bb32-bh32-str-bk64-sk4-w8-st3-gs"]),
    ("large", "forward", "bf16", 512, 1024, ["bb128-bh16-str-bk64-sk4-w16",
                                             "bb128-bh32-str-bk64-sk4-w16-st3"]),
    ("large", "backward", "bf16", 512, 1024, ["bb128-bh16-str-bk64-sk4-w16",
                                              "bb64-bh32-str-bk64-sk4-w16-st3",
                                              "bb64-bh64-str-bk64-sk4-w16",
                                              "bb64-bh64-str-bk64-sk4-w16-st3",
                                              "bb128-bh16-str-bk64-sk4-w16-gs",
                                              "bb64-bh32-str-bk64-sk4-w16-gs",
                                              "bb128-bh32-str-bk64-sk4-w16-gs",
                                              "bb64-bh64-str-bk64-sk4-w16-gs"]),
    ("large", "backward", "bf16", 512, 512, ["bb128-bh16-str-bk64-sk4-w16",
                                             "bb64-bh32-str-bk64-sk4-w16-gs"]),
    ("large", "backward", "fp32", 512, 1024, ["bb128-bh16-str-bk64-sk4-w16",
                                              "bb64-bh32-str-bk64-sk4-w16-gs"]),
    ("large", "forward", "fp32", 512, 1024, ["bb128-bh16-str-bk64-sk4-w16",
                                             "bb128-bh32-str-bk32-sk4-w16-st3"]),
    ("large", "forward", "bf16", 512, 256, ["bb128-bh4-res-bk64-sk4-w8",
                                            "bb128-bh8-str-bk64-sk4-w8"]),
    # The registers forward pushing h through its cluster (kernels/forward_registers.py,
    # EXCHANGE) beside the same kernel reading h from L2, last (a push that never completes
    # traps); "@warps=8" makes programs of 8 warps (clusters of 8 at H = 256).
    ("pushed", "forward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-rg",
                                           "bb16-bh8-res-bk64-sk1-w4-df-ds-rg",
                                           "bb16-bh8-res-bk64-sk1-w4-df-ds-rg@warps=8"]),
    ("pushed", "forward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df-rg",
                                           "bb16-bh8-res-bk64-sk1-w4-df-ds-rg",
                                           "bb16-bh8-res-bk64-sk1-w4-df-ds-rg@push=8"]),
    ("pushed", "forward", "fp16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "forward", "bf16", 1, 512, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "forward", "fp16", 16, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "forward", "fp32", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),   # tf32
    # The registers backward pushing dG through its cluster (backward_registers.py), H <= 512
    # (past 256 programs of 32 units, 8 warps); "@unit_warps=2" makes those at H = 256 too
    # (clusters of 8); "@push=8" pushes fours of units, 8 bytes a st.async.
    ("pushed", "backward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-rg",
                                            "bb16-bh8-res-bk64-sk1-w4-df-ds-rg",
                                            "bb16-bh8-res-bk64-sk1-w4-df-ds-rg@unit_warps=2",
                                            "bb16-bh8-res-bk64-sk1-w4-df-ds-rg@push=8"]),
    ("pushed", "backward", "fp16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df-rg",
                                            "bb16-bh8-res-bk64-sk1-w4-df-ds-rg",
                                            "bb16-bh8-res-bk64-sk1-w4-df-ds-rg@push=8"]),
    ("pushed", "backward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "backward", "bf16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "backward", "bf16", 1, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "backward", "fp16", 16, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("pushed", "backward", "fp32", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),  # tf32
]
FIELDS = ["group", "kernel", "dtype", "B", "H", "T", "config", "heuristic", "median_us", "q20_us",
          "q80_us", "max_rel_diff", "status", "gpu", "torch", "triton"]


def problem(dtype, B, H, T, device="cuda"):
    torch.manual_seed(0)
    gx = torch.randn(T, B, 4 * H, device=device, dtype=dtype)
    w_hh = (torch.randn(1, 4 * H, H, device=device) / H ** 0.5).to(dtype)
    h0 = torch.randn(1, B, H, device=device, dtype=dtype)
    c0 = torch.randn(1, B, H, device=device, dtype=dtype)
    dy = torch.randn(T, B, H, device=device, dtype=dtype)   # the backward's upstream gradient
    return gx, w_hh, h0, c0, dy


def runner(kernel, gx, w_hh, h0, c0, dy, config):
    """A no-argument call of the kernel with this config, and what it returns for the check.
    Every config of a problem gets the same inputs (dy included): the check compares them."""
    if kernel == "forward":
        def run():
            return lstm_forward(gx, w_hh, h0, c0, None, save=True, config=config)[:5]
        return run
    _, _, _, gates, c_all, *_ = lstm_forward(gx, w_hh, h0, c0, None, save=True)

    def run():
        return lstm_backward(dy, None, None, gates, c_all, c0, None, w_hh, config=config)[:3]
    return run


# Knobs of the registers kernels a row can set after its label, "<label>@<knob>=<value>":
# module constants, set for that row only: kernels/forward_registers.py's (the backward
# reads them too) and kernels/backward_registers.py's warps a gate (along its reduction, or
# side by side in the backward that pushes dG); a knob may set a constant in both.
REGISTERS_KNOBS = {"backoff": [("forward_registers", "POLL_BACKOFF_NS")],
                   "load": [("forward_registers", "H_LOAD_BYTES")],
                   "warps": [("forward_registers", "EXCHANGE_WARPS")],
                   "unit_warps": [("backward_registers", "EXCHANGE_UNIT_WARPS")],
                   "push": [("forward_registers", "PUSH_BYTES"),
                            ("backward_registers", "PUSH_BYTES")],
                   "splits": [("backward_registers", "SPLITS")]}


def variant(label: str):
    """(config, {(module, constant): value}) of a row's label, its knobs after an '@'."""
    label, *knobs = label.split("@")
    settings = {}
    for knob in knobs:
        name, value = knob.split("=")
        settings.update((target, int(value)) for target in REGISTERS_KNOBS[name])
    return config_from_label(label), settings


@contextlib.contextmanager
def knobs_set(settings: dict):
    modules = {key: importlib.import_module(f"triton_lstm.kernels.{key[0]}") for key in settings}
    saved = {key: getattr(modules[key], key[1]) for key in settings}
    for key, value in settings.items():
        setattr(modules[key], key[1], value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(modules[key], key[1], value)


def compile_config(job) -> str:
    """Run one config once on a 2-step problem (the kernels do not specialise on T), so that
    Triton's disk cache holds its kernels before the rows are timed one by one; returns ""
    or why it failed (the row itself records that)."""
    kernel, dtype_name, B, H, label, device = job
    try:
        config, settings = variant(label)
        with knobs_set(settings):
            run = runner(kernel, *problem(DTYPES[dtype_name], B, H, 2, device), config)
            run()[0].cpu()
        return ""
    except Exception as exc:
        return f"{kernel} {dtype_name} B={B} H={H} {label}: {type(exc).__name__}"


def write_csv(path: pathlib.Path, fields: list, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def max_rel_diff(got, want) -> float:
    worst = 0.0
    for g, w in zip(got, want):
        if g is None:
            continue
        scale = w.double().abs().max().clamp_min(1e-30)
        worst = max(worst, float((g.double() - w.double()).abs().max() / scale))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--only", choices=("cluster", "registers", "split", "small", "large",
                                           "pushed"))
    parser.add_argument("--out", default=os.environ.get("OUT") or "perf/results")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that compile the configs ahead (1: none)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("variants: no CUDA GPU found")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "variants.csv"
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    experiments = [e for e in EXPERIMENTS if not args.only or e[0] == args.only]

    def heuristic_of(kernel, dtype_name, B, H):
        return heuristic_config(B, H, DTYPES[dtype_name], num_sms, kernel)

    compile_ahead(compile_config, list(dict.fromkeys(
        (kernel, dtype_name, B, H, label, "cuda")
        for _, kernel, dtype_name, B, H, labels in experiments
        for label in [config_label(heuristic_of(kernel, dtype_name, B, H))] + labels)),
        args.jobs)
    rows = []
    for group, kernel, dtype_name, B, H, labels in experiments:
        dtype, T = DTYPES[dtype_name], args.steps
        inputs = problem(dtype, B, H, T)
        heuristic = heuristic_of(kernel, dtype_name, B, H)
        want = runner(kernel, *inputs, heuristic)()
        bound = 1e-2 if dtype != torch.float32 else 2e-3
        for label in [config_label(heuristic)] + labels:
            config, settings = variant(label)
            row = dict(group=group, kernel=kernel, dtype=dtype_name, B=B, H=H, T=T,
                       config=label, heuristic=config == heuristic, **env)
            try:
                with knobs_set(settings):
                    run = runner(kernel, *inputs, config)
                    before = launch_counts["registers"]
                    clustered = launch_counts["clustered"]
                    row["max_rel_diff"] = max_rel_diff(run(), want)
                    if not row["max_rel_diff"] <= bound:
                        row["status"] = "wrong"
                    elif config.registers and launch_counts["registers"] == before:
                        row["status"] = "not run (its tl tile ran)"
                    elif (config.registers and config.dsmem
                          and launch_counts["clustered"] == clustered):
                        row["status"] = "not run (read from L2)"
                    else:
                        ms = bench_ms(run, warmup_ms=25, rep_ms=100)
                        row.update(median_us=ms[0] * 1e3 / T, q20_us=ms[1] * 1e3 / T,
                                   q80_us=ms[2] * 1e3 / T, status="ok")
            except Exception as exc:   # recorded, never timed
                row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
            print(f"{kernel:8} {dtype_name:4} B={B:<4} H={H:<5} {row['config']:44} "
                  f"{row.get('median_us', float('nan')):8.2f} us/step  "
                  f"diff {row.get('max_rel_diff', float('nan')):.1e}  {row['status']}", flush=True)
            write_csv(path, FIELDS, rows)   # after every row: a run cut short keeps them
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
