"""Where a step's time goes, from the kernels' own clock (kernels/timeline.py).

A persistent forward at small batch spends ~2 µs a step (perf/NOTES.md, run 6) where the
model adds up to ~1-1.4: the host's timer cannot say whether the rest is the wait for the
other programs, the read of their state, the dot, the gate math or programs running apart.
Each row here runs one kernel (T steps, D = 1, I = H; the forward for inference, without
saved gates; the backward on a training forward's saved values) with its programs
recording, every step (the backward: every stage but its last), the GPU's global clock when
the step begins, when what it reads from the others is in (h_{t-1}, dG_{t+1}: kernels that
wait on the data) and when its own part is stored (h_t, dG_t), and how many polls the wait
took. Per row, in µs (medians over the steps between the first and the last):

    period      one step of the whole grid: from the last program's store of step t - 1 to
                the last program's store of step t (the host's µs/step, seen from inside)
    busy        a program's step, from its beginning to its store
    wait        from the step's beginning to its input in (dataflow polls, pushed state)
    after_wait  from the input in to the store: the dot, the gate math, the store
    release     from the last program's store of step t to the first program's start of
                step t + 1: the barrier's latency past its last arrival (below zero where
                programs begin a step before the data is there: dataflow, pushed state)
    handoff     from the last program's store of step t to a (median) program having all
                of it: the store's way to the other SMs and the poll or wait that sees it
    skew        from the first program's store of a step to the last's
    crit_*      the step's critical program (the last to store): when it began (start) and
                had its input (in) after the step before ended, and its busy time; step by
                step, period = crit_start + crit_busy
    last_sms    the SMs of the programs most often last to store, with their share of steps
    polls       rounds a step's wait took (the registers kernels' polls)

and the host's µs/step of the same call with and without the recording. Writes
step_timeline.csv and the raw stamps (step_timeline.pt: ns from the first, per row) to $OUT
(or --out), and with matplotlib a picture of a few steps of every row (step_timeline.png;
`--plot FILE.pt` draws it again from saved stamps, on any machine). A row's config is a label (tuning.config_label, with variants.py's "@knob=value"
for the registers kernels), or "layer" for the config the layer picks on this GPU.

    python3 perf/step_timeline.py [--steps 256] [--only small|large] [--out DIR]
    python3 perf/step_timeline.py --plot DIR/step_timeline.pt [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from timing import bench_ms, compile_ahead  # noqa: E402
from variants import DTYPES, knobs_set, problem, variant, write_csv  # noqa: E402
from triton_lstm.dispatch import launch_counts, pick_config  # noqa: E402
from triton_lstm.kernels.backward import lstm_backward  # noqa: E402
from triton_lstm.kernels.forward import lstm_forward  # noqa: E402
from triton_lstm.kernels.timeline import (POLLS, SM, STEP_BEGINS, STORED,  # noqa: E402
                                          WAIT_ENDS, stamps_buffer)
from triton_lstm.tuning import config_label  # noqa: E402

# (group, kernel, dtype, B, H, configs): the safe ones first; the cluster's exchange last,
# where a push that never lands traps and ends the process (written rows stay in the CSV).
ROWS = [
    ("small", "forward", "fp16", 8, 256, ["layer", "bb16-bh8-res-bk64-sk1-w4",
                                          "bb16-bh8-res-bk64-sk1-w4-df",
                                          "bb16-bh8-res-bk64-sk1-w4-rg",
                                          "bb16-bh8-res-bk64-sk1-w4-rg@backoff=100",
                                          "bb16-bh16-res-bk64-sk1-w4-cl"]),
    ("small", "forward", "bf16", 8, 512, ["layer", "bb16-bh8-res-bk64-sk1-w4",
                                          "bb16-bh8-res-bk64-sk1-w4-df",
                                          "bb16-bh8-res-bk64-sk1-w4-rg",
                                          "bb16-bh8-res-bk64-sk1-w4-rg@backoff=400",
                                          "bb16-bh32-res-bk64-sk1-w4-cl"]),
    ("small", "forward", "fp16", 8, 1024, ["layer"]),
    ("small", "backward", "fp16", 8, 256, ["layer", "bb16-bh8-res-bk64-sk1-w4"]),
    ("small", "backward", "bf16", 8, 512, ["layer"]),
    ("large", "forward", "bf16", 128, 1024, ["layer", "bb64-bh16-str-bk64-sk4-w8-st5-rn"]),
    ("large", "forward", "bf16", 512, 1024, ["layer"]),
    ("large", "backward", "bf16", 128, 1024, ["layer"]),
    ("large", "backward", "bf16", 512, 1024, ["layer"]),
    ("small", "forward", "fp16", 8, 256, ["bb16-bh16-res-bk64-sk1-w4-cl-ds"]),
    ("small", "forward", "bf16", 8, 512, ["bb16-bh32-res-bk64-sk1-w4-cl-ds"]),
    ("small", "backward", "fp16", 8, 256, ["bb16-bh16-res-bk64-sk1-w4-cl-ds"]),
    # The registers kernels pushing h (dG) through their cluster (EXCHANGE).
    ("small", "forward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("small", "forward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("small", "backward", "fp16", 8, 256, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),
    ("small", "backward", "bf16", 8, 512, ["bb16-bh8-res-bk64-sk1-w4-df-ds-rg"]),  # 32 units
]
FIELDS = ["group", "kernel", "dtype", "B", "H", "T", "config", "ran", "programs", "period_us",
          "busy_us", "wait_us", "after_wait_us", "release_us", "handoff_us", "skew_us",
          "crit_start_us", "crit_in_us", "crit_busy_us", "last_sms", "polls", "timer_ns", "host_us", "host_stamped_us", "gpu", "torch", "triton"]


def summarize(stamps: torch.Tensor) -> dict:
    """The row's figures (module docstring) from a launch's stamps, [T, MAX_PROGRAMS, EVENTS]
    int64 (ns; zero where a program or event recorded nothing). Steps 1 .. T - 2 count: the
    first has no wait and the last no successor."""
    ran = stamps[0, :, STEP_BEGINS] != 0
    steps, programs = stamps.shape[0], int(ran.sum())
    if programs == 0 or steps < 3:
        return dict(programs=programs)
    # ns from the first stamp (the clock counts from 1970: past float64's 2^53 ns as it is)
    events = stamps[:, ran][..., [STEP_BEGINS, WAIT_ENDS, STORED]]
    s = (events - events[0, :, 0].min()).double().masked_fill(events == 0, float("nan"))
    begins, arrived, stored = s[..., 0], s[..., 1], s[..., 2]
    polls = stamps[1:-1, ran, POLLS].double()
    last_stored = stored.max(dim=1).values                     # [T]
    # Per step t = 1 .. T - 2: what t took, and how step t + 1 got going after it.
    period = last_stored[1:-1] - last_stored[:-2]
    release = begins[2:].min(dim=1).values - last_stored[1:-1]
    handoff = arrived[2:].nanmedian(dim=1).values - last_stored[1:-1]
    skew = last_stored[1:-1] - stored[1:-1].min(dim=1).values
    # The step's critical program, the last to store: when it began and had its input after
    # the step before ended (period = crit_start + crit_busy, step by step).
    crit = stored[1:-1].argmax(dim=1, keepdim=True)
    before = last_stored[:-2, None]
    crit_start = begins[1:-1].gather(1, crit) - before
    crit_in = arrived[1:-1].gather(1, crit) - before
    crit_busy = (stored - begins)[1:-1].gather(1, crit)
    # Which programs store last, by their SM: a place that is slow every step shows here.
    last = torch.bincount(crit.flatten(), minlength=programs)
    sms = stamps[0, ran, SM]
    last_sms = ", ".join(f"sm {int(sms[p])} {100 * int(last[p]) // (steps - 2)}%"
                         for p in last.argsort(descending=True)[:3] if last[p] > 0)
    # The clock's resolution: the smallest step between two stamps of one program.
    times = s.permute(1, 0, 2).reshape(programs, -1)
    gaps = times.sort(dim=1).values.diff(dim=1)
    gaps = gaps[gaps > 0]
    return dict(
        programs=programs, period_us=_us(period), busy_us=_us((stored - begins)[1:-1]),
        wait_us=_us((arrived - begins)[1:-1]), after_wait_us=_us((stored - arrived)[1:-1]),
        release_us=_us(release), handoff_us=_us(handoff), skew_us=_us(skew),
        crit_start_us=_us(crit_start), crit_in_us=_us(crit_in), crit_busy_us=_us(crit_busy),
        last_sms=last_sms,
        polls=float(polls[polls > 0].median()) if (polls > 0).any() else None,
        timer_ns=float(gaps.min()) if gaps.numel() else None)


def _us(ns: torch.Tensor):
    """The median of the known values (ns) in µs, or None if none is known."""
    ns = ns.flatten()
    ns = ns[~ns.isnan()]
    return float(ns.median()) * 1e-3 if ns.numel() else None


def kernel_call(kernel: str, dtype_name: str, B: int, H: int, T: int, label: str,
                device="cuda"):
    """(config, knob settings, call(stamps=None)) of a row: its kernel on fresh inputs (the
    backward on the saved values of a training forward with the layer's config)."""
    dtype = DTYPES[dtype_name]
    gx, w_hh, h0, c0, dy = problem(dtype, B, H, T, device)
    if label == "layer":
        config, settings = pick_config(B, H, dtype, gx.device, kernel, 1), {}
    else:
        config, settings = variant(label)
    if kernel == "forward":
        def call(stamps=None):
            return lstm_forward(gx, w_hh, h0, c0, None, save=False, config=config,
                                stamps=stamps)
        return config, settings, call
    _, _, _, gates, c_all, *_ = lstm_forward(gx, w_hh, h0, c0, None, save=True)

    def call(stamps=None):
        return lstm_backward(dy, None, None, gates, c_all, c0, None, w_hh, config=config,
                             stamps=stamps)
    return config, settings, call


def compile_row(job) -> str:
    """Compile a row's kernel with and without stamps on a 2-step run (workers of
    compile_ahead); "" or why it failed (the row itself records that)."""
    kernel, dtype_name, B, H, label = job
    try:
        config, settings, call = kernel_call(kernel, dtype_name, B, H, 2, label)
        with knobs_set(settings):
            call()
            call(stamps_buffer(2, "cuda"))
        torch.cuda.synchronize()
        return ""
    except Exception as exc:
        return f"{kernel} {dtype_name} B={B} H={H} {label}: {type(exc).__name__}"


def run_row(kernel: str, dtype_name: str, B: int, H: int, T: int, label: str, device="cuda"):
    """(config label, the kernel that ran, figures, raw stamps, host µs/step without and with
    the stamps)."""
    config, settings, call = kernel_call(kernel, dtype_name, B, H, T, label, device)
    stamps = stamps_buffer(T, device)
    with knobs_set(settings):
        call()
        before = dict(launch_counts)
        call(stamps)
        torch.cuda.synchronize()
        ran = next((kind for kind in ("registers", "ring")
                    if launch_counts[kind] > before.get(kind, 0)), "tl")
        if ran == "registers" and launch_counts["clustered"] > before.get("clustered", 0):
            ran = "registers-exchange"
        recorded = stamps.cpu()
        host = bench_ms(call)[0] * 1e3 / T
        host_stamped = bench_ms(lambda: call(stamps))[0] * 1e3 / T
    # The programs that ran: their times in ns from the first stamp (int32), polls and SMs as
    # they are.
    programs = recorded[0, :, STEP_BEGINS] != 0
    raw = recorded[:, programs]
    if programs.any():
        times = raw[..., [STEP_BEGINS, WAIT_ENDS, STORED]]
        raw[..., [STEP_BEGINS, WAIT_ENDS, STORED]] = torch.where(
            times == 0, -1, times - times[0, :, 0].min())
    return config_label(config), ran, summarize(recorded), raw.to(torch.int32), host, \
        host_stamped


def plot_steps(raw: dict, path: pathlib.Path, first: int = 100, count: int = 6) -> None:
    """A panel a row: `count` steps from `first` (from the middle of a shorter run) of every
    program (one line each), the wait (light) and the work after it (dark) from the step's
    begin to its store, a tick at each store; time in µs from the first step's begin."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(raw), 1, figsize=(11, 2.2 * len(raw)), squeeze=False)
    for ax, (name, stamps) in zip(axes[:, 0], raw.items()):
        start = min(first, stamps.shape[0] // 2)
        steps = stamps[start:start + count].double()
        origin = steps[0, :, STEP_BEGINS].min()
        for p in range(steps.shape[1]):
            for begin, arrived, stored in steps[:, p, [STEP_BEGINS, WAIT_ENDS, STORED]].tolist():
                middle = arrived if arrived >= 0 else begin
                ax.plot([(begin - origin) * 1e-3, (middle - origin) * 1e-3], [p, p],
                        color="#9ecae1", linewidth=1.5)
                ax.plot([(middle - origin) * 1e-3, (stored - origin) * 1e-3], [p, p],
                        color="#08519c", linewidth=1.5)
                ax.plot([(stored - origin) * 1e-3], [p], marker="|", color="black",
                        markersize=4)
        ax.set_title(name, fontsize="small")
        ax.set_ylabel("program")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("µs from the first step's first begin")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--only", choices=("small", "large"))
    parser.add_argument("--out", default=os.environ.get("OUT") or "perf/results")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1),
                        help="processes that compile the kernels ahead (1: none)")
    parser.add_argument("--plot", metavar="FILE.pt",
                        help="only draw step_timeline.png from stamps saved by a run")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    if args.plot:
        out.mkdir(parents=True, exist_ok=True)
        plot_steps(torch.load(args.plot), out / "step_timeline.png")
        print(f"wrote {out / 'step_timeline.png'}")
        return 0
    if not torch.cuda.is_available():
        sys.exit("step_timeline: no CUDA GPU found")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__)
    out.mkdir(parents=True, exist_ok=True)
    rows, raw = [], {}
    jobs = [(group, kernel, dtype_name, B, H, label)
            for group, kernel, dtype_name, B, H, labels in ROWS
            if not args.only or group == args.only for label in labels]
    # not the exchange's rows: a trap there would end the worker pool
    compile_ahead(compile_row, [job[1:] for job in jobs if not job[5].endswith("-ds")],
                  args.jobs)
    for group, kernel, dtype_name, B, H, label in jobs:
        row = dict(group=group, kernel=kernel, dtype=dtype_name, B=B, H=H, T=args.steps,
                   config=label, **env)
        try:
            config, ran, figures, stamps, host, stamped = run_row(kernel, dtype_name, B, H,
                                                                  args.steps, label)
            row.update(figures, ran=ran, host_us=host, host_stamped_us=stamped)
            if label == "layer":
                row["config"] = f"layer: {config}"
            raw[f"{kernel} {dtype_name} B={B} H={H} {row['config']}"] = stamps
        except Exception as exc:   # recorded, never timed
            row["ran"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        rows.append(row)
        print("  ".join(f"{k}={row.get(k)}" for k in FIELDS[:21]), flush=True)
        write_csv(out / "step_timeline.csv", FIELDS, rows)
        torch.save(raw, out / "step_timeline.pt")
    print(f"wrote {out / 'step_timeline.csv'}")
    try:
        plot_steps(raw, out / "step_timeline.png")
    except ImportError:
        print("matplotlib not installed: no picture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
