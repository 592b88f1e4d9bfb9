#!/usr/bin/env bash
# A GPU session (perf/NOTES.md, "The next GPU session"), one call at a time. Each part runs
# under a `timeout`, so a slow part leaves the rest room. The tools write into a staging
# folder and the tree (tune.csv, heatmaps, configs); at the end all of it is packed into
# $OUT/results.tgz, with the logs beside it (a call brings back at most 8 files).
#
#   COMMIT=<hash> bash perf/device_session.sh 1   GPU tests alone (up to 7 min, those run 4
#                                                  did not finish first), then make perf's
#                                                  main table with the path backend="auto"
#                                                  takes per row (about 2 min)
#   COMMIT=<hash> bash perf/device_session.sh 2   the cluster barrier's and the exchange's GPU
#                                                  tests, the schedule variants (theirs first),
#                                                  make perf's stack section, call-to-call
#                                                  spread of small-batch steps, the host's
#                                                  cost per call (9.5 min)
#   COMMIT=<hash> bash perf/device_session.sh 3   make tune: resumes the committed tune.csv
#                                                  (its new candidates), then --wide (9 min)
#   COMMIT=<hash> SHAPES="512x512 ..." bash perf/device_session.sh 4
#                                                  GPU tests, the host's cost per call,
#                                                  make tune at SHAPES (about 5 min)
#   COMMIT=<hash> bash perf/device_session.sh 5   fp32 layers' GEMMs in kernels/gemm.py: their
#                                                  GPU tests, the fp32 GPU tests with them,
#                                                  then the GEMM paths and the layers with
#                                                  either engine (about 5.5 min)
#   COMMIT=<hash> bash perf/device_session.sh 6   one call for a 15-minute lease: the GPU
#                                                  tests but the cluster barrier's and the
#                                                  exchange's, make tune resumed for 2 min,
#                                                  then make perf's main table (9.5 min)
#   COMMIT=<hash> bash perf/device_session.sh 7   the dataflow waits' and the ring forward's
#                                                  GPU tests, make tune resumed for 1.6 min
#                                                  at the mid-batch and B = 512 shapes (after
#                                                  part 8), then make perf's main table
#                                                  (5.3 min)
#   COMMIT=<hash> bash perf/device_session.sh 8   the GPU tests run 5 did not finish, where a
#                                                  training call's time goes (ours, with the
#                                                  backward in chunks too, cuDNN's), make tune
#                                                  at the mid-batch shapes (their 64-row
#                                                  tiles), then at B = 512 (9.3 min)
#   COMMIT=<hash> bash perf/device_session.sh 9   the forward in one launch and in chunks beside
#                                                  its input projection (40 s)
#   COMMIT=<hash> bash perf/device_session.sh 10  the small-batch forward and backward with their
#                                                  weights in registers: their GPU tests and
#                                                  timed rows (about 3 min)
#   COMMIT=<hash> bash perf/device_session.sh 11  the cluster barrier's and the exchange's GPU
#                                                  tests and variants rows, then part 5
#                                                  (about 9.5 min)
#   COMMIT=<hash> bash perf/device_session.sh 12  the registers backward with two warps a gate
#                                                  (H = 1024, fp32 512): the registers kernels'
#                                                  GPU tests, its variants rows; the bias sums
#                                                  in the backward kernel: their GPU tests,
#                                                  training with and without (5 min)
#   COMMIT=<hash> bash perf/device_session.sh 13  the cluster barrier's and the tl
#                                                  exchange's GPU tests, part 7, the registers
#                                                  kernels' and the bias sums' GPU tests
#                                                  (8.5 min)
#   COMMIT=<hash> bash perf/device_session.sh 14  where a step's time goes, forward and
#                                                  backward, from the kernels' own clock: its
#                                                  GPU tests and the registers kernels'
#                                                  exchanges', perf/step_timeline.py, then
#                                                  those exchanges' rows beside the kernels
#                                                  reading from L2 (4.8 min)
#   COMMIT=<hash> bash perf/device_session.sh 15  torch.compile's GPU tests, the exchanges as
#                                                  make tune candidates at issue 8's small-
#                                                  batch shapes once their GPU tests pass,
#                                                  then make perf's main table (about 8.5 min)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
BACK="$OUT"
export OUT=/tmp/device-session
rm -rf "$OUT" && mkdir -p "$OUT" "$BACK"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
# The device's copy of the tree may have no .git: pass COMMIT=<hash> with the command.
export COMMIT="${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
echo "$COMMIT" > "$OUT/commit.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# GPU tests on every core where pytest-xdist is there: the time goes to compiling kernels.
# Other processes' kernels only time-slice with a persistent kernel, never share its SMs.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 16")
# -v names each test as it ends; SIGINT at the limit still prints the failures' summary
# and the slowest tests.
gpu_tests() {   # gpu_tests LIMIT_S [pytest -k expression]
    timeout -s INT -k 20 "$1" python3 -m pytest -v -rfs --tb=short --durations=25 $parallel \
        -p no:cacheprovider ${2:+-k "$2"} tests/test_gpu.py 2>&1 \
        | grep -v "PytestBenchmarkWarning\|warner(" | tee -a "$OUT/gpu-tests.log"
}
# make perf's main table, with the path backend="auto" takes per row.
main_table() {   # main_table LIMIT_S
    timeout "$1" python3 perf/bench.py --peers triton cudnn cudnn_graph --step off --stack off \
        --memory off --out "$OUT/perf" 2>&1 | tee "$OUT/perf.log"
}
# make tune resumed for BUDGET minutes (more arguments: e.g. --shapes); its budget leaves
# out its start (compiling the candidates), which LIMIT_S must leave room for.
tune_resumed() {   # tune_resumed LIMIT_S BUDGET_MIN [more tune.py arguments]
    timeout "$1" python3 perf/tune.py --budget-min "$2" "${@:3}" 2>&1 | tee -a "$OUT/tune.log"
}
# The shapes of issue 7's mid-batch rows, where make tune now also times streamed 64-row
# (wgmma) tiles in place of the heuristic's resident ones (autotune.wgmma_tiles).
MID_BATCH="64x1024 128x512 128x256 64x512 128x1024"
# And B = 512's, where the sweep's new candidates (the backward pipelined, square, with its
# gate split) have not run yet.
LARGE_BATCH="512x1024 512x512"
# The tests that did not finish in run 4's 220 s (perf/NOTES.md) go first.
LATE_TESTS="wavefront or resets or 100k or reduce_overhead or recompute"
# The cluster barrier's and the exchange's tests run apart, in part 2 before their variants:
# a kernel that traps breaks its worker's CUDA context for the tests after it.
CLUSTER_TESTS="cluster or pushed"
# Issue 8's small-batch shapes, where the exchanges would become make tune candidates.
SMALL_BATCH="8x256 8x512 1x256 1x512 16x256 16x512"

case "${1:-}" in
1)
    gpu_tests 200 "$LATE_TESTS"
    gpu_tests 200 "not ($LATE_TESTS or $CLUSTER_TESTS)"
    main_table 180
    ;;
2)
    # The cluster barrier's and the pushed h's rows first (issue 8), the small batch's
    # split_k, then the large-batch rows (the backward's square tile and gate split never
    # ran). variants.py compiles each group's configs first, in 16 processes.
    gpu_tests 90 "$CLUSTER_TESTS"
    timeout 140 python3 perf/variants.py --only cluster --out "$OUT/variants-cluster" 2>&1 \
        | tee "$OUT/variants.log"
    timeout 65 python3 perf/variants.py --only small --out "$OUT/variants-small" 2>&1 \
        | tee -a "$OUT/variants.log"
    timeout 110 python3 perf/variants.py --only large --out "$OUT/variants-large" 2>&1 \
        | tee -a "$OUT/variants.log"
    timeout 110 python3 perf/bench.py --stack only --dtypes bf16 fp16 --out "$OUT/stack" 2>&1 \
        | tee "$OUT/stack.log"
    timeout 30 python3 perf/step_spread.py --out "$OUT" 2>&1 | tee "$OUT/step-spread.log"
    timeout 25 python3 perf/host_cost.py 2>&1 | tee "$OUT/host-cost.log"
    ;;
3)
    tune_resumed 240 3.5
    timeout 320 python3 perf/tune.py --wide --budget-min 4.5 2>&1 | tee "$OUT/tune-wide.log"
    ;;
4)
    gpu_tests 150 "not ($LATE_TESTS)"
    timeout 30 python3 perf/host_cost.py 2>&1 | tee "$OUT/host-cost.log"
    timeout 90 python3 perf/tune.py --budget-min 1.1 --shapes ${SHAPES:?} 2>&1 \
        | tee "$OUT/tune.log"
    ;;
5|11)
    # Part 11: the cluster barrier's and the exchange's tests first (the table takes cluster
    # tiles since run 6), then their variants rows, then part 5.
    if [ "$1" = 11 ]; then
        gpu_tests 90 "$CLUSTER_TESTS"
        timeout 140 python3 perf/variants.py --only cluster --out "$OUT/variants-cluster" 2>&1 \
            | tee "$OUT/variants.log"
    fi
    gpu_tests 60 "fp32_gemms"
    # The fp32 GPU tests again with the engine on (those in tf32, cuDNN's default, use it).
    TRITON_LSTM_FP32_GEMMS=triton gpu_tests 90 \
        "fp32 and not ($LATE_TESTS or $CLUSTER_TESTS or fp32_gemms)"
    timeout 180 python3 perf/gemm_paths.py --out "$OUT" 2>&1 | tee "$OUT/gemm-paths.log"
    ;;
6)
    gpu_tests 90 "$LATE_TESTS"
    gpu_tests 160 "not ($LATE_TESTS or $CLUSTER_TESTS)"
    tune_resumed 150 1.9
    main_table 140
    ;;
7)
    # The dataflow waits' tests first (their polls check the marks a pair at a time since
    # 60cb0e9, and the table takes dataflow tiles) and the ring forward's
    # (kernels/forward_ring.py), whose tiles make tune times next.
    gpu_tests 60 "dataflow or ring"
    tune_resumed 130 1.6 --shapes $MID_BATCH $LARGE_BATCH
    main_table 130
    ;;
8)
    gpu_tests 150 "$LATE_TESTS"
    gpu_tests 100 "B130 or past_2_31 or schedule_variants or dataflow_waits or \
        (step_loop_matches and B70) or (options and packed) or (fp32_gemms and I33) or \
        chunked or backward-chunks or forward-chunks or step_chunks or \
        stepped_matches_persistent or fp64_on_streamed"
    # The backward in one launch and in chunks beside its GEMMs: the table's tiles, then a
    # 64-row tile that leaves SMs idle (perf/NOTES.md, "the backward's GEMMs beside its
    # recurrence").
    timeout 60 python3 perf/train_breakdown.py --shapes bf16:512x1024 bf16:128x1024 \
        fp32:512x1024 fp32:128x1024 --backward-chunks 0 4 --out "$OUT" 2>&1 \
        | tee "$OUT/train-breakdown.log"
    timeout 40 python3 perf/train_breakdown.py --shapes bf16:128x1024 bf16:64x1024 \
        --backward-chunks 0 4 8 --backward-config bb64-bh32-str-bk64-sk4-w16-st3 \
        --out "$OUT/chunks-64-rows" 2>&1 | tee -a "$OUT/train-breakdown.log"
    timeout 40 python3 perf/train_breakdown.py --peer cudnn --out "$OUT/cudnn" 2>&1 \
        | tee -a "$OUT/train-breakdown.log"
    tune_resumed 110 1.2 --shapes $MID_BATCH
    tune_resumed 60 0.5 --shapes $LARGE_BATCH
    ;;
9)
    # The forward in one launch and in chunks, each chunk's input projection beside the
    # recurrence of the chunk before (perf/NOTES.md, "the forward's input projection beside
    # its recurrence"): the table's tiles, then a 64-program tile.
    timeout 25 python3 perf/train_breakdown.py --mode forward --shapes bf16:128x1024 \
        fp32:128x1024 --forward-chunks 0 4 --out "$OUT/forward-chunks" 2>&1 \
        | tee "$OUT/forward-chunks.log"
    timeout 15 python3 perf/train_breakdown.py --mode forward --shapes bf16:128x1024 \
        --forward-chunks 0 4 --forward-config bb64-bh32-str-bk64-sk4-w8-st3 \
        --out "$OUT/forward-chunks-64-rows" 2>&1 | tee -a "$OUT/forward-chunks.log"
    ;;
10)
    # The forward and backward with their weights in registers (issue 8; perf/NOTES.md, "The
    # small-batch forward with its weights in registers", "The small-batch backward with its
    # weights in registers"): their GPU tests, then their rows beside the tl tiles
    # (variants.py compiles them first, in 16 processes).
    gpu_tests 90 "registers"
    timeout 90 python3 perf/variants.py --only registers --out "$OUT/variants-registers" 2>&1 \
        | tee "$OUT/variants.log"
    ;;
12)
    # The registers backward with two warps a gate (issue 8: fp16 B = 8 H = 1024 training;
    # perf/NOTES.md, "The registers backward at H = 1024"): the registers kernels' GPU tests,
    # then its rows beside the table's tl tiles and beside one warp a gate.
    gpu_tests 90 "registers or bias_sums"
    timeout 110 python3 perf/variants.py --only split --out "$OUT/variants-split" 2>&1 \
        | tee "$OUT/variants.log"
    # The bias gradient's sum in the backward kernel (issue 7; perf/NOTES.md, "the bias
    # gradient summed in the backward kernel"): where a training step's time goes without
    # and with it.
    for sums in torch kernel; do
        TRITON_LSTM_BIAS_SUMS=$sums timeout 50 python3 perf/train_breakdown.py \
            --shapes bf16:512x1024 fp32:512x1024 bf16:128x1024 --out "$OUT/bias-sums-$sums" \
            2>&1 | tee -a "$OUT/train-breakdown.log"
    done
    ;;
13)
    # The next session's first call, the measurements issue 7's and 8's numbers rest on: the
    # GPU tests of what the shipped table or make tune's new candidates run and no GPU has
    # (the cluster barrier's and the exchange's apart: a trapping kernel breaks its worker's
    # CUDA context), then part 7 (make tune at the mid-batch and B = 512 shapes, make perf's
    # main table), then the registers kernels' and the bias sums' tests.
    gpu_tests 100 "($CLUSTER_TESTS) and not registers"
    gpu_tests 60 "dataflow or ring"
    tune_resumed 130 1.6 --shapes $MID_BATCH $LARGE_BATCH
    main_table 130
    gpu_tests 90 "(registers or bias_sums) and not pushed"
    ;;
14)
    # Where a step's time goes (issues 8 and 7; perf/NOTES.md, "After run 6: a step's
    # timeline from the kernels' own clock"): the stamps' GPU tests, then the timeline of
    # the small-batch variants and the table's large-batch tiles, forward and backward (the
    # exchanges' rows last: the tl forward's and backward's, then the registers kernels',
    # "After run 6: the registers kernels push h and dG through their cluster"), with the
    # GPU tests of the registers kernels' exchanges first. Then their rows beside the same
    # kernels reading h and dG from L2.
    gpu_tests 90 "timeline or (pushed and registers)"
    timeout 110 python3 perf/step_timeline.py --out "$OUT/timeline" 2>&1 | tee "$OUT/timeline.log"
    timeout 85 python3 perf/variants.py --only pushed --out "$OUT/variants-pushed" 2>&1 \
        | tee "$OUT/variants.log"
    ;;
15)
    # make tune with the exchanges (the tl exchange's cluster tiles and the registers
    # kernels pushing h and dG: tune.py --exchange) at issue 8's small-batch shapes, only if
    # all their GPU tests pass (a failure of any leaves them out), then make perf's main
    # table, where issue 8's layer rows are read (perf/NOTES.md, "After run 6: the
    # registers backward pushes dG at H = 512 too").
    # First torch.compile's GPU tests: under the machines' torch 2.11 a compiled model ran
    # nn.LSTM before module.exporting's workaround (README, the versions); they now check
    # that the kernels run.
    gpu_tests 60 "compile_reduce_overhead or compiled_gradients"
    if gpu_tests 120 "$CLUSTER_TESTS"; then
        tune_resumed 200 2.5 --exchange --shapes $SMALL_BATCH
    else
        echo "the exchanges' GPU tests did not all pass: make tune without them" \
            | tee -a "$OUT/tune.log"
    fi
    main_table 130
    ;;
*)
    echo "usage: OUT=DIR bash perf/device_session.sh 1|2|3|4|5|6|7|8|9|10|11|12|13|14|15" >&2
    exit 2
    ;;
esac
tar czf "$BACK/results.tgz" -C "$OUT" . -C "$PWD" perf/results $(ls -d triton_lstm/configs 2>/dev/null)
cp "$OUT"/*.log "$BACK"/
ls -la "$BACK"
