"""The candidates `make tune` would time, checked against float64 on a CPU (no GPU needed).

Every candidate config of the forward and backward kernels at the given shapes runs for a
few steps under the Triton interpreter, against the same float64 reference and bounds as
make tune's own check (autotune.check). That tests a new tile's index math, masks and
chunking before a GPU session spends its minutes on it; not its speed, nor what warps and
pipeline stages change (the interpreter ignores both). Slow: seconds to a minute per
candidate at B = 64-128, minutes at B = 512. Exits non-zero if any candidate fails.

    python3 perf/check_candidates.py --shapes 64x1024 128x512 [--dtypes bf16 fp32] [--wide]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"     # before triton_lstm is imported
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from tune import NUM_SMS, SWEEP_DTYPES, default_grid, parse_shapes, shape_candidates  # noqa: E402
from triton_lstm import autotune  # noqa: E402
from triton_lstm.tuning import DTYPES, KERNELS, config_label  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", metavar="BxH", required=True,
                        help="plain layers, e.g. 64x1024")
    parser.add_argument("--dtypes", nargs="+", choices=SWEEP_DTYPES, default=list(SWEEP_DTYPES))
    parser.add_argument("--wide", action="store_true", help="make tune --wide's candidates")
    parser.add_argument("--steps", type=int, default=2, help="time steps each check runs")
    args = parser.parse_args(argv)
    try:
        grid = default_grid(args.dtypes, shapes=parse_shapes(args.shapes))
    except ValueError as error:
        parser.error(str(error))
    neighbourhood = "wide" if args.wide else "sweep"
    failed = 0
    for shape in grid:
        problem = autotune.Problem.random(DTYPES[shape.dtype], shape.batch, shape.hidden,
                                          steps=args.steps, device="cpu", num_sms=NUM_SMS)
        for kernel in KERNELS:
            for config in shape_candidates(shape, kernel, neighbourhood, NUM_SMS):
                start = time.monotonic()
                m = autotune.check(problem, kernel, config)
                failed += m.status != "ok"
                error = "" if m.rel_error is None else f" {m.rel_error:.1e}"
                print(f"{shape} {kernel} {config_label(config)}: {m.status}{error} "
                      f"{m.detail} ({time.monotonic() - start:.0f} s)", flush=True)
    print(f"{failed} failed" if failed else "all passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
