"""perf/bench.py on CPU: result rows, speed-ups, files, plots, the Markdown table, the CLI.

The GPU part of the benchmark needs a GPU; everything it does with the numbers
is checked here on hand-made rows, and the script itself runs end to end
without a GPU (the interpreter check).
"""
import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_DIR / "perf"))
import bench  # noqa: E402
import gemm_paths  # noqa: E402
import step_bench  # noqa: E402
import step_spread  # noqa: E402
import train_breakdown  # noqa: E402
import variants  # noqa: E402

from triton_lstm import dispatch, tuning  # noqa: E402

from .conftest import requires_interpreter  # noqa: E402

ENV = dict(gpu="NVIDIA H200", torch="2.11.0", triton="3.6.0", cudnn=91002,
           date="2025-01-01T00:00:00+00:00", commit="abc1234")


def row(peer, mode, median_us, dtype="fp16", B=8, H=512, T=256, peak_mb=None):
    ms = median_us * T / 1e3
    return bench.make_row(peer, dtype, B, H, T, mode, (ms, 0.9 * ms, 1.1 * ms), peak_mb, 1e-3, ENV)


@pytest.fixture
def rows():
    """fp16 B=8 H=512: triton 10/40 µs, cuDNN 30/100, graphed cuDNN 20; fp32 B=1 H=256: no triton."""
    return [
        row("triton", "fwd", 10.0), row("cudnn", "fwd", 30.0), row("cudnn_graph", "fwd", 20.0),
        row("cell_loop", "fwd", 200.0),
        row("triton", "train", 40.0, peak_mb=12.5), row("cudnn", "train", 100.0, peak_mb=20.0),
        row("cudnn", "fwd", 5.0, dtype="fp32", B=1, H=256),
    ]


def test_make_row_converts_sequence_ms_to_us_per_step():
    r = bench.make_row("triton", "bf16", 4, 256, 128, "train", (1.28, 1.0, 2.56), 7.5, 2e-3, ENV)
    assert (r["median_us"], r["q20_us"], r["q80_us"]) == pytest.approx((10.0, 1e3 / 128, 20.0))
    assert (r["peer"], r["dtype"], r["B"], r["H"], r["T"], r["mode"]) == ("triton", "bf16", 4, 256, 128, "train")
    assert r["peak_mb"] == 7.5 and r["rel_error"] == 2e-3 and r["commit"] == "abc1234"
    assert list(r) == bench.FIELDS


def test_speedup_is_over_the_best_cudnn_number_of_the_mode(rows):
    ratio = bench.speedups(rows)
    # fwd: the graphed cuDNN (20 µs) beats plain cuDNN (30 µs); train: plain cuDNN only.
    assert ratio[("fp16", 8, 512, 256, "fwd")] == pytest.approx(2.0)
    assert ratio[("fp16", 8, 512, 256, "train")] == pytest.approx(2.5)
    assert ("fp32", 1, 256, 256, "fwd") not in ratio   # no triton number, no speed-up
    assert len(ratio) == 2


def test_speedup_ignores_the_graph_for_training():
    rows = [row("triton", "train", 50.0), row("cudnn", "train", 100.0), row("cudnn_graph", "train", 1.0)]
    assert bench.speedups(rows) == {("fp16", 8, 512, 256, "train"): pytest.approx(2.0)}


def test_terminal_table_has_every_config_and_the_speedups(rows):
    lines = bench.format_table(rows).splitlines()
    assert lines[0].split() == ["dtype", "B", "H", "T", "mode", "triton", "cudnn", "cudnn_graph",
                                "cell_loop", "speed-up"]
    assert len(lines) == 1 + 3
    assert lines[1].split() == ["fp16", "8", "512", "256", "fwd", "10.00", "30.00", "20.00", "200.00", "2.00x"]
    assert lines[2].split() == ["fp16", "8", "512", "256", "train", "40.00", "100.00", "-", "-", "2.50x"]
    assert lines[3].split()[-1] == "-"


def test_summarize_renders_the_readme_table(rows):
    lines = bench.summarize(rows).splitlines()
    assert lines[0].startswith("| dtype | B | H | T | kernels fwd µs | auto fwd µs | best cuDNN fwd µs "
                               "| speed-up | kernels train µs | auto train µs |")
    assert len(lines) == 2 + 2
    assert all(line.count("|") == 13 for line in lines)
    # fp32 sorts before fp16; missing numbers are dashes, not zeros. No recorded auto path:
    # the auto rule's pick from the numbers, marked *.
    assert lines[2] == "| fp32 | 1 | 256 | 256 | - | - | 5.00 | - | - | - | - | - |"
    assert lines[3] == ("| fp16 | 8 | 512 | 256 | 10.00 | 10.00 (kernels*) | 20.00 | 2.00x "
                        "| 40.00 | 40.00 (kernels*) | 100.00 | 2.50x |")


def test_summarize_shows_the_recorded_auto_path_with_its_time():
    # auto took nn.LSTM forward (its eager time, 30, not the graph's 20) and the kernels in training.
    rows = [bench.make_row(peer, "fp16", 8, 512, 256, mode, (us * 0.256,) * 3, None, 1e-3, ENV,
                           auto_path=path)
            for peer, mode, us, path in (("triton", "fwd", 10.0, "nn.LSTM"), ("cudnn", "fwd", 30.0, "nn.LSTM"),
                                         ("cudnn_graph", "fwd", 20.0, "nn.LSTM"),
                                         ("triton", "train", 40.0, "kernels"), ("cudnn", "train", 100.0, "kernels"))]
    cells = bench.summarize(rows).splitlines()[2].split(" | ")
    assert cells[5] == "30.00 (nn.LSTM)" and cells[9] == "40.00 (kernels)"
    # The rule itself: kernels only where they take <= 95% of nn.LSTM's time.
    assert bench.auto_cell("", 9.6, 10.0, "fwd") == "10.00 (nn.LSTM*)"
    assert bench.auto_cell("", 9.4, 10.0, "train") == "9.40 (kernels*)"


def test_auto_paths_on_cpu_say_nn_lstm():
    lstm = torch.nn.LSTM(4, 8)
    x, hx = torch.randn(3, 2, 4), None
    assert bench.auto_paths(lstm, x, hx) == {"fwd": "nn.LSTM", "train": "nn.LSTM"}


def test_compile_layer_runs_the_triton_peer_forward_and_training_and_says_why_it_failed():
    # On the CPU the kernels run under the interpreter: the same calls as on a GPU.
    assert bench.compile_layer(("fp32", 2, 8, "cpu")) == ""
    assert bench.compile_layer(("fp32", 2, 0, "cpu")).startswith("fp32 B=2 H=0: ")


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_variants_check_every_config_of_a_problem_on_the_same_inputs(kernel):
    # Under the interpreter on the CPU: configs that compute the same function agree, because
    # every config of a problem gets the same inputs, the backward's upstream gradient too.
    from triton_lstm.tuning import config_from_label
    inputs = variants.problem(torch.float32, 2, 8, 3, device="cpu")
    assert all(torch.equal(a, b) for a, b in
               zip(inputs, variants.problem(torch.float32, 2, 8, 3, device="cpu")))
    first, other = (variants.runner(kernel, *inputs, config_from_label(label))()
                    for label in ("bb16-bh4-res-bk64-sk1-w4", "bb16-bh8-res-bk64-sk4-w4"))
    assert variants.max_rel_diff(other, first) <= 1e-6


def test_variants_compile_each_config_ahead_and_say_why_one_failed():
    # A 2-step run of the config (here under the interpreter): its kernels land in the cache.
    assert variants.compile_config(("backward", "fp32", 2, 8, "bb16-bh8-res-bk64-sk1-w4",
                                    "cpu")) == ""
    assert variants.compile_config(("forward", "fp32", 2, 8, "bb16-bh8", "cpu")).startswith(
        "forward fp32 B=2 H=8 bb16-bh8: ValueError")


def test_step_spread_summarises_the_calls_and_the_share_near_the_fastest():
    times = torch.tensor([2.0, 2.05, 2.15, 3.5, 3.6], dtype=torch.float64)   # two levels
    got = step_spread.summary(times)
    assert got["calls"] == 5 and got["min_us"] == 2.0 and got["max_us"] == 3.6
    assert got["median_us"] == pytest.approx(2.15)
    assert got["near_min_share"] == pytest.approx(2 / 5)     # 2.0 and 2.05 are within 5%


def test_the_input_projection_as_a_1x1_convolution_computes_the_gemm():
    x2, w_ih, bias = torch.randn(12, 8), torch.randn(32, 8), torch.randn(32)
    want = x2.double() @ w_ih.double().t() + bias.double()
    for path in gemm_paths.PATHS:
        got = gemm_paths.projection(path, x2, w_ih, bias)()
        assert got.shape == (12, 32)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@requires_interpreter
def test_the_fp32_layer_section_checks_each_gemm_engine_then_writes_its_rows(monkeypatch,
                                                                            tmp_path, capsys):
    # The timings are the GPU's; here only the checks run (the interpreter, exact fp32).
    monkeypatch.setattr(bench, "bench_ms", lambda fn, **_: (fn(), (1.0, 0.9, 1.1))[1])
    monkeypatch.setattr(bench, "time_training", lambda *_: ((2.0, 1.9, 2.1), None))
    monkeypatch.setattr(gemm_paths, "LAYER_SHAPES", [(2, 8)])
    engine = dispatch.fp32_gemms
    rows = gemm_paths.layer_rows(4, dict(gpu="cpu", torch=torch.__version__),
                                 tmp_path / "layers.csv", device="cpu")
    assert dispatch.fp32_gemms == engine
    # nn.LSTM replayed from a CUDA graph cannot run here: said, and the others go on.
    assert "cudnn_graph gemms= fp32 B=2 H=8: skipped" in capsys.readouterr().out
    got = [(r["peer"], r["fp32_gemms"], r["mode"]) for r in rows]
    assert got == [(peer, gemms, mode) for peer, gemms in
                   (("cudnn", ""), ("triton", "torch"), ("triton", "triton"))
                   for mode in ("fwd", "train")]
    assert all(r["rel_error"] <= 1e-5 and r["B"] == 2 and r["H"] == 8 for r in rows)
    assert [r["median_us"] for r in rows] == [250.0, 500.0] * 3   # ms per 4 steps, in µs/step
    with (tmp_path / "layers.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6


def test_numbers_name_the_commit_given_for_a_copied_tree_else_git_head(monkeypatch):
    import timing
    monkeypatch.setenv("COMMIT", "1234abc")
    assert timing.tree_commit() == "1234abc"
    monkeypatch.delenv("COMMIT")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR,
                          capture_output=True, text=True).stdout.strip()
    assert timing.tree_commit() in (head, head + "+dirty")


def test_a_timed_training_call_writes_its_gradients_instead_of_adding_to_the_last_calls():
    # Each call is a training step after zero_grad(): the time holds no add into old gradients.
    import timing
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    run = timing.train_fn(lstm, x, hx)
    leaves = [*lstm.parameters(), x, *hx]
    run()
    once = [leaf.grad.clone() for leaf in leaves]
    run()
    assert all(torch.equal(leaf.grad, g) for leaf, g in zip(leaves, once))
    assert all(g.abs().sum() > 0 for g in once)


def test_compile_stack_runs_the_kernel_peers_of_a_stack_and_says_why_it_failed():
    import stack_bench
    assert stack_bench.compile_stack(("fp32", 2, 8, 2, "cpu")) == ""
    assert stack_bench.compile_stack(("fp32", 2, 0, 2, "cpu")).startswith("stack fp32 B=2 H=0 L=2: ")


def test_csv_and_json_hold_one_row_per_peer_dtype_shape_mode(rows, tmp_path):
    paths = bench.write_results(rows, tmp_path / "nvidia-h200")
    assert [p.name for p in paths] == ["results.csv", "results.json"]
    assert json.loads(paths[1].read_text()) == rows
    with open(paths[0], newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == bench.FIELDS
    assert len(table) == len(rows)
    train = next(r for r in table if r["peer"] == "triton" and r["mode"] == "train")
    assert float(train["median_us"]) == pytest.approx(40.0) and float(train["peak_mb"]) == 12.5
    assert train["gpu"] == "NVIDIA H200" and train["cudnn"] == "91002" and train["commit"] == "abc1234"
    fwd = next(r for r in table if r["peer"] == "triton" and r["mode"] == "fwd")
    assert fwd["peak_mb"] == ""   # memory is measured for training only


def test_summarize_from_the_command_line(rows, tmp_path, capsys):
    path = bench.write_results(rows, tmp_path)[1]
    assert bench.main(["--summarize", str(path)]) == 0
    assert capsys.readouterr().out.strip() == bench.summarize(rows)


def test_plots_one_png_per_mode(rows, tmp_path):
    pytest.importorskip("matplotlib")
    paths = bench.plot_speedups(rows, tmp_path)
    assert [p.name for p in paths] == ["speedup_fwd.png", "speedup_train.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_copy_flat_copies_files_and_tolerates_the_same_folder(rows, tmp_path):
    paths = bench.write_results(rows, tmp_path / "results")
    bench.copy_flat(paths, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.csv", "results.json"]
    bench.copy_flat(paths, tmp_path / "results")   # $OUT pointing at the results folder itself
    assert json.loads(paths[1].read_text()) == rows


def test_parse_shapes():
    assert bench.parse_shapes(["8x512", "16X768x1024"], 256) == [(8, 512, 256), (16, 768, 1024)]
    for bad in ("8", "8x", "8x512x1x2", "ax512", "0x512"):
        with pytest.raises(ValueError, match="BxH"):
            bench.parse_shapes([bad], 256)


def test_nan_output_fails_the_error_check():
    want = torch.ones(3, 2, 4, dtype=torch.float64)
    got = want.float().clone()
    assert bench.relative_error(got, want) == 0.0
    got[1, 0, 2] = 1.5
    assert bench.relative_error(got, want) == pytest.approx(0.5)
    got[0, 0, 0] = float("nan")
    assert not bench.within_bound(bench.relative_error(got, want), bench.ERROR_BOUNDS["fp32"])


def test_default_grid():
    assert len(bench.GRID) == 6 * 3 + 1 and (16, 768, 1024) in bench.GRID
    assert {T for _, _, T in bench.GRID[:-1]} == {256}
    assert {(B, H) for B, H, _ in bench.QUICK_GRID} == {(B, H) for B in (1, 8, 64) for H in (512, 1024)}


def test_script_runs_without_a_gpu():
    # No visible GPU even on a GPU machine: this is the CPU path, the kernels under the interpreter.
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "perf/bench.py"], cwd=REPO_DIR, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No CUDA GPU found" in result.stdout
    for label in ("interpreter", "interpreter step", "interpreter wavefront"):
        for dtype_name in ("fp32", "fp64", "bf16"):
            match = re.search(rf"{label} {dtype_name}: relative error (\S+) vs float64 .* ok",
                              result.stdout)
            assert match, result.stdout
            assert float(match.group(1)) <= bench.INTERPRETER_BOUNDS[dtype_name]
    assert "µs" not in result.stdout   # no timings without a GPU


def test_step_rows_get_their_own_table_and_stay_out_of_the_readme_table(rows):
    """The step section's rows (mode "step", T = 1): ratios eager/eager and graph/graph."""
    step_us = dict(zip(step_bench.STEP_PEERS, (5.0, 3.0, 20.0, 6.0, 30.0, 9.0)))
    step_rows = [row(peer, "step", us, dtype="bf16", T=1) for peer, us in step_us.items()]
    table = step_bench.format_step_table(rows + step_rows)
    assert table.splitlines()[1].split()[-2:] == ["4.00x", "2.00x"]   # 20/5 eager, 6/3 graphed
    assert len(table.splitlines()) == 2                                 # the sequence rows left out
    assert bench.speedups(step_rows)[("bf16", 8, 512, 1, "step")] == pytest.approx(6.0 / 5.0)
    assert bench.summarize(rows + step_rows) == bench.summarize(rows)


def test_memory_rows_get_their_own_table_with_recompute_against_the_default(rows):
    """The memory section's rows: recompute's time (x slower) and peak memory (/ smaller)."""
    import memory_bench
    long_rows = [row("triton", "train", 40.0, T=4096, peak_mb=800.0),
                 row("triton_recompute", "train", 50.0, T=4096, peak_mb=100.0),
                 row("cudnn", "train", 60.0, T=4096, peak_mb=300.0)]
    lines = memory_bench.format_memory_table(rows + long_rows).splitlines()
    assert len(lines) == 2          # the header and one shape: rows without recompute stay out
    cells = lines[1].split()
    assert cells[:4] == ["fp16", "8", "512", "4096"]
    assert cells[-2:] == ["1.25x", "8.0x"]


def test_stack_rows_get_their_own_table_and_stay_out_of_the_others(rows):
    """The stack section's rows (their layers, stack_* peers): the wavefront against the layers
    one after another and the best cuDNN number of the mode."""
    import stack_bench

    def stack_row(peer, mode, us, layers):
        r = row(peer, mode, us)
        r["layers"] = layers
        return r

    stack_rows = [stack_row("stack_wavefront", "fwd", 4.0, 2), stack_row("stack_layers", "fwd", 6.0, 2),
                  stack_row("stack_cudnn", "fwd", 10.0, 2), stack_row("stack_cudnn_graph", "fwd", 8.0, 2),
                  stack_row("stack_wavefront", "train", 20.0, 2),
                  stack_row("stack_cudnn", "train", 30.0, 2),
                  stack_row("stack_wavefront", "fwd", 5.0, 3), stack_row("stack_layers", "fwd", 9.0, 3)]
    lines = stack_bench.format_stack_table(rows + stack_rows).splitlines()
    assert len(lines) == 4          # the header, L = 2 fwd and train, L = 3 fwd
    assert lines[1].split()[:5] == ["fp16", "8", "512", "2", "fwd"]
    assert lines[1].split()[-2:] == ["1.50x", "2.00x"]      # 6/4 layers, min(10, 8)/4 cuDNN
    assert lines[2].split()[-2:] == ["-", "1.50x"]          # training: cuDNN eager only
    assert lines[3].split()[-2:] == ["1.80x", "-"]
    assert bench.summarize(rows + stack_rows) == bench.summarize(rows)
    assert bench.format_table(rows + stack_rows) == bench.format_table(rows)
    assert bench.speedups(rows + stack_rows) == bench.speedups(rows)


@requires_interpreter
def test_train_breakdown_runs_each_backward_setting_and_keeps_its_rows(tmp_path, monkeypatch):
    """The script's own loop on the CPU (the interpreter runs the kernels; the profiler and
    the timer are stubs): one row set per chunk count, the forced tile used, the CSV written."""
    T, B, H = 3, 2, 8
    kernels_seen, tiles_seen = [], []

    def fake_profile(fn):
        before = dispatch.launch_counts["persistent"]
        fn()
        kernels_seen.append(dispatch.launch_counts["persistent"] - before)
        tiles_seen.append((tuning._forced.get("forward"), tuning._forced.get("backward")))
        return [("lstm_forward_kernel", 0.0, 3.0), ("lstm_backward_kernel", 3.0, 6.0)]

    monkeypatch.setattr(train_breakdown, "DEVICE", "cpu")
    monkeypatch.setattr(train_breakdown, "profile_call", fake_profile)
    monkeypatch.setattr(train_breakdown, "bench_ms", lambda fn: (0.03, 0.02, 0.04))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(dispatch, "backward_chunks", 0)     # main() sets both
    monkeypatch.setattr(dispatch, "forward_chunks", 0)
    label = "bb16-bh8-str-bk16-sk1-w4"     # one program a group: persistent here
    train_breakdown.main(["--shapes", f"fp32:{B}x{H}", "--T", str(T), "--backward-chunks", "0",
                          "3", "--backward-config", label, "--out", str(tmp_path)])
    # A training call: the forward launch, then one backward launch per chunk.
    assert kernels_seen == [1 + 1, 1 + 3]
    assert tiles_seen == [(None, tuning.config_from_label(label))] * 2
    with open(tmp_path / "train_breakdown.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["backward_chunks"] for r in rows} == {"0", "3"}
    assert {r["backward_config"] for r in rows} == {label}
    timed = [r for r in rows if r["group"] == "timed call"]
    assert [float(r["us_per_step"]) for r in timed] == [10.0, 10.0]    # 0.03 ms over T = 3

    # Inference calls, the forward in one launch and in chunks (one launch per chunk), its
    # tile forced; a backward tile means nothing there.
    kernels_seen.clear()
    tiles_seen.clear()
    train_breakdown.main(["--shapes", f"fp32:{B}x{H}", "--T", str(T), "--mode", "forward",
                          "--forward-chunks", "0", "3", "--forward-config", label,
                          "--backward-config", label, "--out", str(tmp_path / "fwd")])
    assert kernels_seen == [1, 3]
    assert tiles_seen == [(tuning.config_from_label(label), None)] * 2
    with open(tmp_path / "fwd" / "train_breakdown.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["mode"], r["forward_chunks"], r["backward_chunks"], r["forward_config"],
             r["backward_config"]) for r in rows} == {("forward", "0", "", label, ""),
                                                      ("forward", "3", "", label, "")}


def test_train_breakdown_groups_a_calls_kernels_per_step(tmp_path):
    T = 4
    kernels = [  # (name, start µs, duration µs) as the profiler gives them, one call
        ("lstm_forward_kernel", 0.0, 40.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 45.0, 12.0),
        ("nvjet_tst_192x128_64x4_1x2_h_bz_coopB_NNT", 60.0, 8.0),
        ("lstm_backward_kernel", 70.0, 80.0),
        ("lstm_backward_kernel", 155.0, 80.0),          # B = 512: two launches
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>",
         240.0, 2.0),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", 245.0, 3.0),
        ("Memcpy DtoD (Device -> Device)", 250.0, 1.0),
        ("some_other_kernel", 252.0, 4.0),
    ]
    result = train_breakdown.breakdown(kernels, T)
    assert result["groups"] == {"recurrence forward": 10.0, "recurrence backward": 40.0,
                                "GEMM": 5.0, "copy / fill": 0.75,
                                "elementwise / reduce": 0.75, "other": 1.0}
    assert result["kernels_us"] == pytest.approx(57.5)
    assert result["span_us"] == pytest.approx(256.0 / T)      # first start to last end
    assert result["launches"]["lstm_backward_kernel"] == 2
    assert result["names"]["lstm_backward_kernel"] == 40.0
    text = train_breakdown.report("triton bf16 B=512 H=1024 T=4 training", result, top=3)
    assert "kernels 57.50 µs/step, span on the GPU 64.00 (span - kernels +6.50" in text
    assert "x2" in text and "69.6%  recurrence backward" in text
    rows = train_breakdown.rows_of("triton", "bf16", 512, 1024, T, result)
    assert {r["group"] for r in rows} >= {"GEMM", "span on the GPU"}
    assert sum(r["us_per_step"] for r in rows if r["kernel"]) == pytest.approx(57.5)
    assert not any(r["group"] == "timed call" for r in rows)
    timed = train_breakdown.rows_of("triton", "bf16", 512, 1024, T, result, 4, timed_us=61.0)
    assert timed[-1]["group"] == "timed call" and timed[-1]["us_per_step"] == 61.0
    assert {r["backward_chunks"] for r in timed} == {4}
    assert train_breakdown.breakdown([], T)["span_us"] == 0.0



def _timeline(steps, programs, with_wait=True, start=1_764_000_000_000_000_000):
    """Stamps of a made-up launch: step t begins at start + 2000 t ns, program p 100 p ns
    later; its wait ends 300 ns after the step begins and it stores 500 ns after that; two
    polls."""
    from triton_lstm.kernels import timeline
    stamps = torch.zeros(steps, timeline.MAX_PROGRAMS, timeline.EVENTS, dtype=torch.int64)
    t = torch.arange(steps)[:, None]
    p = torch.arange(programs)[None, :]
    begins = start + 2000 * t + 100 * p
    stamps[:, :programs, timeline.STEP_BEGINS] = begins
    if with_wait:
        stamps[:, :programs, timeline.WAIT_ENDS] = begins + 300
        stamps[:, :programs, timeline.POLLS] = 2
    stamps[:, :programs, timeline.STORED] = begins + 800
    stamps[:, :programs, timeline.SM] = 2 * p + 1
    return stamps


def test_step_timeline_takes_a_step_apart_from_the_kernels_stamps():
    import step_timeline
    got = step_timeline.summarize(_timeline(6, 3))
    assert got["programs"] == 3
    # the last store of a step: its begin + 200 (program 2) + 800
    assert got["period_us"] == pytest.approx(2.0)
    assert got["busy_us"] == pytest.approx(0.8)
    assert got["wait_us"] == pytest.approx(0.3)
    assert got["after_wait_us"] == pytest.approx(0.5)
    assert got["release_us"] == pytest.approx(1.0)      # next begin (+2000) - last store (+1000)
    assert got["handoff_us"] == pytest.approx(1.4)      # program 1's h in (+2400) - (+1000)
    assert got["skew_us"] == pytest.approx(0.2)
    # the critical program (2) begins 2000 + 200 - 1000 after the last store, waits 300
    assert got["crit_start_us"] == pytest.approx(1.2) and got["crit_in_us"] == pytest.approx(1.5)
    assert got["crit_busy_us"] == pytest.approx(0.8)
    assert got["crit_start_us"] + got["crit_busy_us"] == pytest.approx(got["period_us"])
    assert got["last_sms"] == "sm 5 100%"               # program 2 stores last every step
    assert got["polls"] == 2
    assert got["timer_ns"] == 300                       # a program's closest stamps


def test_step_timeline_leaves_out_what_a_kernel_does_not_record():
    # A kernel at a barrier records no end of a wait and no polls; programs that never ran, nothing.
    import step_timeline
    got = step_timeline.summarize(_timeline(6, 2, with_wait=False))
    assert got["programs"] == 2
    assert got["wait_us"] is None and got["after_wait_us"] is None
    assert got["handoff_us"] is None and got["polls"] is None and got["crit_in_us"] is None
    assert got["busy_us"] == pytest.approx(0.8) and got["release_us"] == pytest.approx(1.1)
    assert step_timeline.summarize(_timeline(2, 2)) == dict(programs=2)


def test_step_timeline_rows_name_configs_and_knobs_that_exist():
    import step_timeline
    from triton_lstm.kernels import forward_registers
    labels = [label for *_, labels in step_timeline.ROWS for label in labels if label != "layer"]
    assert {row[1] for row in step_timeline.ROWS} == {"forward", "backward"}
    for label in labels:
        config, settings = step_timeline.variant(label)
        assert step_timeline.config_label(config) == label.split("@")[0]
        for (module, name), _ in settings.items():
            assert hasattr(forward_registers, name) and module == "forward_registers"
    # the exchange's rows come last: a push that never lands traps and ends the process
    exchange = [i for i, label in enumerate(labels) if "-ds" in label]
    assert exchange == list(range(len(labels) - len(exchange), len(labels))) and exchange


def test_step_timeline_row_runs_the_labelled_forward_and_keeps_its_stamps(monkeypatch):
    # The row's plumbing on the CPU: the forward it calls stands in for the kernel, recording
    # a made-up timeline (_timeline) where the GPU's clock would; no timer runs.
    import step_timeline
    calls = []

    def forward(gx, w_hh, h0, c0, lengths, *, save, config, stamps=None):
        calls.append((config, stamps is not None, gx.shape))
        if stamps is not None:
            stamps.copy_(_timeline(gx.shape[0], 3))
            dispatch.launch_counts["registers"] += config.registers
        return None

    monkeypatch.setattr(step_timeline, "lstm_forward", forward)
    monkeypatch.setattr(step_timeline, "bench_ms", lambda fn: (fn() or 2e-3, 0.0, 0.0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    label, ran, figures, raw, host, stamped = step_timeline.run_row(
        "forward", "fp16", 8, 16, 6, "bb16-bh8-res-bk64-sk1-w4-rg@backoff=100", device="cpu")
    assert label == "bb16-bh8-res-bk64-sk1-w4-rg" and ran == "registers"
    assert [c[1] for c in calls] == [False, True, False, True]
    assert all(c[0].registers and c[2] == (6, 8, 64) for c in calls)
    assert figures["period_us"] == pytest.approx(2.0) and figures["polls"] == 2
    assert host == stamped == pytest.approx(2e-3 * 1e3 / 6)
    # ns from the first stamp, per program that ran; the polls as counted
    assert raw.dtype == torch.int32 and raw.shape == (6, 3, 5)
    assert raw[0, 0, 0] == 0 and raw[1, 2, 2] == 2000 + 200 + 800
    assert (raw[..., 3] == 2).all() and raw[0, :, 4].tolist() == [1, 3, 5]


def test_step_timeline_draws_saved_stamps_without_a_gpu(tmp_path):
    pytest.importorskip("matplotlib")
    # Raw stamps as a run saves them (ns from the first, int32; -1 where nothing was recorded).
    stamps = _timeline(8, 3)
    raw = (stamps - stamps[0, 0, 0]).to(torch.int32)[:, :3]
    raw[..., 3:] = stamps[:, :3, 3:].to(torch.int32)
    barrier = raw.clone()
    barrier[..., 1] = -1                                 # a kernel at a barrier
    torch.save({"forward fp16 B=8 H=16 a": raw, "backward fp16 B=8 H=16 b": barrier},
               tmp_path / "step_timeline.pt")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "perf/step_timeline.py", "--plot",
                             str(tmp_path / "step_timeline.pt"), "--out", str(tmp_path)],
                            cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    png = tmp_path / "step_timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_step_timeline_stamps_need_a_gpu():
    from triton_lstm.kernels import timeline
    from triton_lstm.kernels.forward import lstm_forward
    gx, w_hh, h0, c0, _ = variants.problem(torch.float32, 2, 8, 3, device="cpu")
    with pytest.raises(ValueError, match="stamps"):
        lstm_forward(gx, w_hh, h0, c0, None, save=False, stamps=timeline.stamps_buffer(3, "cpu"))
