"""Tuned tables on CPU: the sweep's bookkeeping, the lookup, first-use autotuning, the auto policy.

No GPU: a GPU is stood in by monkeypatching torch.cuda.get_device_name / properties and
policy._on_cuda, tables are hand-made, and timings are monkeypatched; candidates that
really run (float64 checks, first-use tuning) run under the Triton interpreter at tiny shapes.
"""
import csv
import dataclasses
import json
import math
import pathlib
import re
import sys
import types

import pytest
import torch
import triton

import triton_lstm
from triton_lstm import autotune, dispatch, policy, tuning
from triton_lstm.dispatch import KernelConfig, gpu_slug, heuristic_config, pick_config

from .conftest import requires_interpreter

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "perf"))
import tune  # noqa: E402

GPU = "NVIDIA H200"
ENV = dict(gpu=GPU, torch="2.11.0", triton="3.6.0", cuda="13.0", cudnn=91900, commit="abc1234",
           date="2025-01-01T00:00:00+00:00")
CUDA = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def clean_tables(monkeypatch, tmp_path):
    """No table (the shipped ones hidden), no autotune cache in memory, autotuning off,
    before and after each test."""
    monkeypatch.delenv(autotune.ENV, raising=False)
    monkeypatch.setattr(tuning, "CONFIG_DIR", tmp_path / "no-configs")
    for caches in (tuning._tables, autotune._cache_files):
        caches.clear()
    tuning.clear_caches()
    yield
    for caches in (tuning._tables, autotune._cache_files):
        caches.clear()
    tuning.clear_caches()


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA as far as the lookup and the policy can tell: a name, an SM count, 'is_cuda'."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=132,
                                                                  major=9, minor=0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(policy, "_on_cuda", lambda input: True)


def config(block_b=16, block_h=8, split_k=1, num_warps=4, resident=True):
    return KernelConfig(block_b=block_b, block_h=block_h, resident=resident, block_k=64,
                        split_k=split_k, num_warps=num_warps)


def entry(dtype, B, H, D=1, proj=0, fwd=None, train=None, forward=None, backward=None):
    """A table entry; fwd / train: (kernels µs, nn.LSTM µs)."""
    e = dict(dtype=dtype, B=B, H=H, D=D, proj=proj)
    if forward:
        e["forward"] = tuning.config_entry(forward, 1.0)
    if backward:
        e["backward"] = tuning.config_entry(backward, 2.0)
    e["kernels_us"] = {m: v[0] for m, v in (("fwd", fwd), ("train", train)) if v}
    e["cudnn_us"] = {m: v[1] for m, v in (("fwd", fwd), ("train", train)) if v}
    return e


def table(*entries):
    return {"provenance": dict(ENV, steps=64),
            "shapes": {tuning.shape_key(e["dtype"], e["B"], e["H"], e["D"], e["proj"]): e
                       for e in entries}}


# -- lookup ------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "rnn"), reason="torch without the fp32 "
                    "precision API: cudnn.allow_tf32 is the only flag")
def test_fp32_dots_follow_the_cudnn_rnn_tf32_flag_as_nn_lstm_does():
    """With the RNN flag set apart from the convolutions' (torch's new fp32 precision API),
    the legacy cudnn.allow_tf32 raises; the kernels follow the RNN's, as nn.LSTM does."""
    cudnn, cuda = torch.backends.cudnn, torch.device("cuda")
    saved = cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision
    try:
        for rnn, conv in (("ieee", "tf32"), ("tf32", "ieee"), ("tf32", "tf32"), ("ieee", "ieee")):
            cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = rnn, conv
            assert dispatch.dot_precision(torch.float32, cuda) == rnn
            assert dispatch.dot_precision(torch.bfloat16, cuda) == "ieee"
            assert dispatch.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        cudnn.rnn.fp32_precision, cudnn.conv.fp32_precision = saved


def test_config_labels_round_trip():
    c = config(block_b=64, block_h=16, split_k=4, num_warps=16, resident=False)
    assert tuning.config_label(c) == "bb64-bh16-str-bk64-sk4-w16"
    assert tuning.config_from_label(tuning.config_label(c)) == c
    assert tuning.config_from_entry(tuning.config_entry(c, 3.14159)) == c
    assert tuning.config_entry(c, 3.14159)["us_per_step"] == 3.142
    every_flag = dataclasses.replace(c, inner_stages=3, prefetch_after_arrive=True,
                                     dataflow=True, gate_split=True, cluster=True, dsmem=True,
                                     registers=True, ring=True)
    assert tuning.config_label(every_flag) == "bb64-bh16-str-bk64-sk4-w16-st3-pa-df-gs-cl-ds-rg-rn"
    assert tuning.config_from_label(tuning.config_label(every_flag)) == every_flag
    with pytest.raises(ValueError, match="label"):
        tuning.config_from_label("bb64-bh16")



# What the registers kernels run: (change, the forward runs it, the backward runs it), and
# what only the forward's calls can ask.
REGISTERS_CASES = [
    ({}, True, True), (dict(dtype=torch.float16), True, True),
    (dict(hidden_size=1024), False, True),      # the backward: two warps a gate
    (dict(hidden_size=700, dtype=torch.float16), False, True),
    (dict(hidden_size=1100), False, False),
    (dict(dtype=torch.float32, hidden_size=256), True, True),
    (dict(dtype=torch.float32, hidden_size=256, tf32=False), False, False),
    (dict(dtype=torch.float32), False, True), (dict(dtype=torch.float32, hidden_size=600),
                                               False, False),
    (dict(dtype=torch.float64, hidden_size=128), False, False),
    (dict(device=torch.device("cpu")), False, False), (dict(proj=True), False, False),
    (dict(restarts=True), False, False), (dict(force_stepped=True), False, False)]
FORWARD_ONLY_CASES = [(dict(ckpt_every=8), False), (dict(step_chunks=True), False)]


@pytest.mark.parametrize("kernel, change, runs",
                         [("forward", change, runs) for change, runs, _ in REGISTERS_CASES]
                         + [("forward", *case) for case in FORWARD_ONLY_CASES]
                         + [("backward", change, runs) for change, _, runs in REGISTERS_CASES])
def test_registers_kernels_run_only_what_they_support(kernel, change, runs, monkeypatch):
    """kernels/forward_registers.py and backward_registers.py: bf16 / fp16 on a GPU, and fp32
    where nn.LSTM's rule lets their dots use tf32, with the weight slice in registers
    (H <= 512, fp32 256; the backward, two warps a gate, H <= 1024, fp32 512), one persistent
    launch of a layer without projection or restarts (nor, in the forward, checkpoints or
    chunks); elsewhere the config's own tile."""
    from triton_lstm.kernels import backward_registers, forward_registers
    monkeypatch.setattr(forward_registers, "interpreting", lambda: False)
    monkeypatch.setattr(backward_registers, "interpreting", lambda: False)
    change = dict(change)
    tf32 = change.pop("tf32", True)
    monkeypatch.setattr(dispatch, "cudnn_rnn_allows_tf32", lambda: tf32)
    call = dict(hidden_size=512, dtype=torch.bfloat16, device=torch.device("cuda"), proj=False,
                restarts=False, force_stepped=False)
    if kernel == "forward":
        call.update(ckpt_every=0, step_chunks=False)
    call.update(change)
    hidden_size, dtype, device = call.pop("hidden_size"), call.pop("dtype"), call.pop("device")
    module = forward_registers if kernel == "forward" else backward_registers
    assert module.runs_here(hidden_size, dtype, device, **call) is runs


@pytest.mark.parametrize("hidden, dtype, arch, fits, want", [
    (256, torch.float16, 9, True, ("clusters", 4, 16)),     # 16 programs of 4 warps
    (512, torch.bfloat16, 9, True, ("clusters", 8, 16)),
    (30, torch.float32, 9, True, ("clusters", 1, 8)),       # 8 programs of one warp
    (256, torch.float16, 9, False, ("L2", 1, None)),         # the cluster cannot be resident
    (100, torch.float16, 9, True, ("clusters", 2, 16)),      # 13 programs of units, 3 without
    (4, torch.float16, 9, True, ("L2", 1, None)),            # one program: no cluster
    (256, torch.float16, 8, True, ("L2", 1, None)),          # no clusters before sm_90
])
def test_registers_forward_pushes_h_where_its_programs_make_a_cluster(hidden, dtype, arch, fits,
                                                                      want, monkeypatch):
    """kernels/forward_registers.py with ``exchange``: each batch block's programs (4 units
    a warp, the fewest warps that make a cluster of at most 16; 9-15 programs of units make
    16) as one cluster, with the exchange's shared memory and its count of st.async, and
    nothing polled (y not filled with the mark); where a batch block is one program, the
    cluster cannot be resident, or the GPU has none, the kernel of one-warp programs reading
    h from L2."""
    from triton_lstm.kernels import forward_registers
    launches = []

    def in_clusters(kernel, grid, args, flags, cluster, extra_shared, pushes):
        launches.append(("clusters", flags["num_warps"], cluster, grid, flags["WARPS"],
                         flags["EXCHANGE"], extra_shared, pushes, args[5]))
        return fits

    def resident(kernel, args, grid, constexprs, tile, device):
        launches.append(("L2", tile.num_warps, None, grid, constexprs["WARPS"],
                         constexprs["EXCHANGE"], None, None, args[5]))
        return True

    monkeypatch.setattr(forward_registers, "launch_in_clusters", in_clusters)
    monkeypatch.setattr(forward_registers, "launch_resident", resident)
    monkeypatch.setattr(tuning, "device_arch", lambda device: (arch, 0, 132))
    T, B = 3, 10
    gx = torch.randn(T, B, 4 * hidden).to(dtype)
    w_hh = torch.randn(1, 4 * hidden, hidden).to(dtype)
    y = forward_registers.lstm_forward_registers(gx, w_hh, None, None, None, save=False,
                                                 reverse=True, exchange=True)[0]
    kind, warps, cluster = want
    launched = launches[-1]
    assert launched[:3] == want
    assert launched[3] == (2 * (cluster or -(-hidden // 4)), 1) and launched[4] == warps
    assert launched[5] == (kind == "clusters") and launched[8] is y
    marked = (y.view(torch.int16 if dtype.itemsize == 2 else torch.int32) == -1).all()
    if kind == "clusters":
        row_bytes = triton.next_power_of_2(max(hidden, 16)) * dtype.itemsize + 64
        assert launched[6] == 2 * 8 * row_bytes + 16
        assert launched[7] == 2 * ((cluster + 1) // 2) * (1 if dtype.itemsize == 2 else 2)
        assert len(launches) == 1
    else:
        assert marked, "the slots that programs poll are filled with the unwritten mark"
    forward_registers.lstm_forward_registers(gx, w_hh, None, None, None, save=False,
                                             reverse=True)       # without exchange: L2
    assert launches[-1][0] == "L2" and launches[-1][4:6] == (1, False)


@pytest.mark.parametrize("hidden, dtype, arch, fits, want", [
    (256, torch.float16, 9, True, ("clusters", 16, 4)),  # 16 programs of 16 units
    (100, torch.float32, 9, True, ("clusters", 7, 4)),
    (256, torch.float16, 9, False, ("L2", None, 4)),      # the cluster cannot be resident
    (160, torch.float16, 9, True, ("clusters", 16, 4)),   # 10 programs of units, 6 without
    (512, torch.bfloat16, 9, True, ("clusters", 16, 8)),  # 16 programs of 32 units
    (300, torch.float16, 9, True, ("clusters", 16, 8)),   # 10 programs of 32 units, 6 without
    (512, torch.float32, 9, True, ("L2", None, 8)),       # two warps a gate's reduction
    (1024, torch.bfloat16, 9, True, ("L2", None, 8)),     # the same
    (256, torch.float16, 8, True, ("L2", None, 4)),       # no clusters before sm_90
])
def test_registers_backward_pushes_dg_where_its_programs_make_a_cluster(hidden, dtype, arch,
                                                                        fits, want,
                                                                        monkeypatch):
    """kernels/backward_registers.py with ``exchange``: each batch block's programs as one
    cluster, with the exchange's shared memory and its count of st.async, and nothing polled
    (dG not filled with the mark); elsewhere the kernel reading dG from L2."""
    from triton_lstm.kernels import backward_registers, forward_registers
    launches = []

    def in_clusters(kernel, grid, args, flags, cluster, extra_shared, pushes):
        launches.append(("clusters", cluster, flags["num_warps"], grid, flags["EXCHANGE"],
                         extra_shared, pushes, args[8]))
        return fits

    def resident(kernel, args, grid, constexprs, tile, device):
        launches.append(("L2", None, tile.num_warps, grid, constexprs["EXCHANGE"], None, None,
                         args[8]))
        return True

    monkeypatch.setattr(forward_registers, "launch_in_clusters", in_clusters)
    monkeypatch.setattr(forward_registers, "launch_resident", resident)
    monkeypatch.setattr(tuning, "device_arch", lambda device: (arch, 0, 132))
    T, B = 3, 10
    gates, c_all = torch.rand(1, T, B, 4 * hidden), torch.rand(1, T, B, hidden)
    w_hh = torch.randn(1, 4 * hidden, hidden).to(dtype)
    dy = torch.randn(T, B, hidden).to(dtype)
    dgates = backward_registers.lstm_backward_registers(dy, None, None, gates, c_all, None, None,
                                                        w_hh, reverse=True, exchange=True)[0]
    kind, cluster, warps = want
    launched = launches[-1]
    assert launched[:3] == want and launched[7] is dgates
    assert launched[3] == (2 * (cluster or -(-hidden // 16)), 1)
    assert launched[4] == (kind == "clusters")
    marked = (dgates.view(torch.int16 if dtype.itemsize == 2 else torch.int32) == -1).all()
    if kind == "clusters":
        row_bytes = 4 * triton.next_power_of_2(hidden) * dtype.itemsize + 64
        assert launched[5] == 2 * 8 * row_bytes + 16
        assert launched[6] == 2 * cluster * (2 if dtype.itemsize == 2 else 4)
        assert len(launches) == 1
    else:
        assert marked, "the slots that programs poll are filled with the unwritten mark"


def test_a_registers_config_with_dsmem_has_the_registers_kernels_push(monkeypatch):
    from triton_lstm.kernels import backward, backward_registers, forward, forward_registers
    asked = []
    for module in (forward_registers, backward_registers):
        monkeypatch.setattr(module, "runs_here", lambda *a, **k: True)
    monkeypatch.setattr(forward_registers, "lstm_forward_registers",
                        lambda *a, exchange, **k: asked.append(exchange) or (None,) * 5)
    monkeypatch.setattr(backward_registers, "lstm_backward_registers",
                        lambda *a, exchange, **k: asked.append(exchange) or (None,) * 3)
    gx, w_hh = torch.randn(2, 3, 64), torch.randn(1, 64, 16)
    gates, c_all = torch.rand(1, 2, 3, 64), torch.rand(1, 2, 3, 16)
    for dsmem in (False, True):
        config = KernelConfig(block_b=16, block_h=8, dataflow=True, registers=True, dsmem=dsmem)
        forward.lstm_forward(gx, w_hh, None, None, None, save=False, config=config)
        backward.lstm_backward(torch.randn(2, 3, 16), None, None, gates, c_all, None, None,
                               w_hh, config=config)
    assert asked == [False, False, True, True]


def test_nearest_shape_batch_bucket_and_hidden():
    t = table(*(entry("bf16", B, H, fwd=(B, H)) for B in (8, 64, 512) for H in (256, 1024)))

    def nearest(B, H):
        e = tuning.nearest_entry(t, "bf16", B, H, 1, False)
        return e and (e["B"], e["H"])

    assert nearest(8, 256) == (8, 256)                      # exact
    assert nearest(1, 256) == (8, 256)                      # smallest measured batch >= B
    assert nearest(9, 256) == (64, 256) and nearest(100, 1024) == (512, 1024)
    assert nearest(4096, 1024) == (512, 1024)               # past the largest: the largest
    assert nearest(8, 300) == (8, 256) and nearest(8, 700) == (8, 1024)   # nearest on a log scale
    assert nearest(8, 512) == (8, 1024)                     # a tie goes to the larger H
    assert nearest(8, 2048) == (8, 1024) and nearest(8, 128) == (8, 256)  # a factor 2 away
    assert nearest(8, 4096) is None and nearest(8, 100) is None           # further: none
    assert tuning.nearest_entry(t, "fp16", 8, 256, 1, False) is None      # same dtype only


def test_lookup_keeps_directions_and_projections_apart():
    one, two, projected = config(block_h=8), config(block_h=16), config(block_h=4)
    t = table(entry("bf16", 8, 512, D=1, forward=one), entry("bf16", 8, 512, D=2, forward=two),
              entry("bf16", 8, 512, D=1, proj=256, forward=projected))
    look = lambda D, proj: tuning.table_config(GPU, "forward", torch.bfloat16, 8, 512, D, proj, 132)  # noqa: E731
    tuning.set_table(GPU, t)
    assert look(1, False) == one and look(2, False) == two and look(1, True) == projected
    assert look(2, True) is None                             # never measured: the heuristic's
    assert tuning.table_config(GPU, "backward", torch.bfloat16, 8, 512, 1, False, 132) is None


def test_pick_config_uses_the_table_else_the_heuristic(fake_gpu):
    tuned = config(block_b=16, block_h=4, split_k=4, num_warps=8)
    tuning.set_table(GPU, table(entry("bf16", 8, 512, forward=tuned, backward=tuned),
                                entry("bf16", 8, 512, D=2, forward=config(block_h=16))))
    assert pick_config(8, 512, torch.bfloat16, CUDA, "forward") == tuned
    assert pick_config(3, 500, torch.bfloat16, CUDA, "backward") == tuned      # nearest shape
    assert pick_config(8, 512, torch.bfloat16, CUDA, "forward", 2) == config(block_h=16)
    # Not measured (fp16, a projection), or a config that would not form a persistent group
    # at this H (4096 / 4 = 1024 programs): the heuristic.
    for args in ((8, 512, torch.float16, CUDA, "forward"),
                 (8, 512, torch.bfloat16, CUDA, "forward", 1, True),
                 (8, 1024, torch.bfloat16, CUDA, "forward")):
        assert pick_config(*args) == heuristic_config(args[0], args[1], args[2], 132, "forward")
    tuning.set_table(GPU, table(entry("bf16", 8, 2048, forward=tuned)))
    assert pick_config(8, 4096, torch.bfloat16, CUDA, "forward") == heuristic_config(
        8, 4096, torch.bfloat16, 132, "forward")


def test_unknown_gpu_falls_back_to_the_heuristic(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU 9000")
    assert tuning.load_table("Some Future GPU 9000") == {}
    for kernel in ("forward", "backward"):
        for D in (1, 2):
            assert pick_config(64, 512, torch.float32, CUDA, kernel, D) == heuristic_config(
                64, 512, torch.float32, 132 // D, kernel)


def test_forced_configs_win_and_end_with_the_block():
    forced = config(block_h=4)
    with tuning.forced_configs(forward=forced):
        assert pick_config(8, 32, torch.float32, torch.device("cpu"), "forward") == forced
        assert pick_config(8, 32, torch.float32, torch.device("cpu"), "backward") == heuristic_config(
            8, 32, torch.float32, 4, "backward")
    assert pick_config(8, 32, torch.float32, torch.device("cpu"), "forward") != forced


# -- candidates and the float64 check -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, D", [(1, 256, 1), (8, 512, 2), (64, 1024, 1), (512, 512, 1), (128, 1024, 2)])
def test_candidates_start_with_the_heuristic_and_run_well(dtype, B, H, D):
    for kernel in ("forward", "backward"):
        base = heuristic_config(B, H, dtype, 132 // D, kernel)
        sizes = {}
        small = base.block_b == 16     # make tune also times the dataflow waits there
        streamed = not base.resident   # the K loop pipelined the other way
        large = base.block_b >= 64 and streamed   # and a tile moving fewer bytes
        # and the backward's tile with and without its gate split, pipelined and not
        split = 2 * (large and kernel == "backward")
        # and at 16 rows, tiles whose group is one cluster (cluster barrier)
        clustered = autotune.cluster_tiles(base, kernel, B, H, dtype, D, 132) if small else []
        # and from B = 64, streamed 64-row tiles in place of resident or narrower ones
        wgmma = (autotune.wgmma_tiles(base, kernel, B, H, dtype, D, 132)
                 if B >= 64 and (base.resident or base.block_b < 64) else [])
        # and at 16 rows either kernel with its weights in registers, where they fit (the
        # backward's split over two warps a gate past the forward's)
        fits = (dispatch.registers_forward_fits if kernel == "forward"
                else dispatch.registers_backward_fits)
        registers = small and fits(H, dtype)
        # and the forward's 16-row tile with its reduction in chunks four accumulators take
        chained = autotune.accumulated_chunks(base, kernel, H) if small else None
        extra = (small + streamed + large + split + len(clustered) + len(wgmma) + registers
                 + (chained is not None))
        for neighbourhood, most in (("heuristic", 1), ("sweep", 2 + extra),
                                    ("autotune", 5), ("wide", 8 + extra)):
            configs = autotune.candidate_configs(kernel, B, H, dtype, D, 132, neighbourhood)
            # make tune's pipelined candidates also with longer chunks of the reduction
            longer = [c for c in configs if c.block_k == 128]
            assert all(dataclasses.replace(c, block_k=64) in configs for c in longer)
            assert longer == [] or neighbourhood in ("sweep", "wide")
            # and with more pipeline stages
            deeper = [c for c in configs if c.inner_stages == autotune.DEEP_STAGES
                      and not c.ring]
            assert all(dataclasses.replace(c, inner_stages=3) in configs for c in deeper)
            assert deeper == [] or neighbourhood in ("sweep", "wide")
            # and the forward with its weights in shared memory
            ring = [c for c in configs if c.ring]
            assert ring == (autotune.ring_tiles(kernel, B, H, dtype, D, 132)
                            if neighbourhood in ("sweep", "wide") else [])
            assert configs[0] == base and len(set(configs)) == len(configs) <= (
                most + len(longer) + len(deeper) + len(ring))
            assert all(autotune.runs_well(c, kernel, B, H, dtype, D, 132) for c in configs[1:])
            with_dataflow = [c for c in configs if c.dataflow]
            assert with_dataflow == ([dataclasses.replace(base, dataflow=True)]
                                     if small and neighbourhood in ("sweep", "wide") else [])
            both_ways = {dataclasses.replace(base, gate_split=split_by_gate, inner_stages=stages)
                         for split_by_gate in (False, True) for stages in (1, 3)} - {base}
            assert all((c in configs) == (neighbourhood in ("sweep", "wide")) for c in both_ways
                       if split and autotune.runs_well(c, kernel, B, H, dtype, D, 132))
            assert any(c.gate_split for c in configs) == (
                base.gate_split or (split > 0 and neighbourhood in ("sweep", "wide")))
            assert [c for c in configs if c.registers] == (
                [dataclasses.replace(base, registers=True)]
                if registers and neighbourhood in ("sweep", "wide") else [])
            assert [c for c in configs if c.cluster] == (
                clustered if neighbourhood in ("sweep", "wide") else [])
            assert [c for c in configs if c.chunked] == (
                [chained] if chained and neighbourhood in ("sweep", "wide") else [])
            assert all((c in configs) == (neighbourhood in ("sweep", "wide")) for c in wgmma)
            flipped = dataclasses.replace(base, inner_stages=3 if base.inner_stages == 1 else 1)
            assert (flipped in configs) == (streamed and neighbourhood in ("sweep", "wide")
                                            and autotune.runs_well(flipped, kernel, B, H, dtype,
                                                                   D, 132))
            sizes[neighbourhood] = len(configs)
        assert sizes["heuristic"] <= sizes["sweep"] <= sizes["wide"]
        assert sizes["heuristic"] <= sizes["autotune"] <= sizes["wide"]


def test_make_tune_also_times_large_streamed_tiles_in_shapes_that_move_fewer_bytes():
    """Forward: the hidden block doubled. The backward's heuristic tile is the squarer one
    already (half the rows, twice the units of the forward's)."""
    base = heuristic_config(512, 1024, torch.bfloat16, 132, "forward")
    assert (base.block_b, base.block_h, base.resident) == (128, 16, False)
    sweep = autotune.candidate_configs("forward", 512, 1024, torch.bfloat16, 1, 132, "sweep")
    assert dataclasses.replace(base, block_h=32) in sweep


@pytest.mark.parametrize("B, H, dtype, forward, backward", [
    (512, 1024, torch.bfloat16, (128, 16), (64, 32)),
    (128, 1024, torch.bfloat16, (64, 16), (32, 32)),
    (512, 256, torch.float32, (128, 8), (64, 16)),
    (128, 1024, torch.float32, (64, 16), (64, 16)),    # 16 warps: 32 rows would spill
])
def test_the_heuristic_backward_streams_half_the_rows_and_twice_the_units(B, H, dtype, forward,
                                                                          backward):
    """H200: every streamed backward of 64+ rows measured 9-25% faster so (tune.csv)."""
    tiles = {k: heuristic_config(B, H, dtype, 132, k) for k in ("forward", "backward")}
    assert (tiles["forward"].block_b, tiles["forward"].block_h) == forward
    assert (tiles["backward"].block_b, tiles["backward"].block_h) == backward
    assert not tiles["backward"].resident
    assert autotune.runs_well(tiles["backward"], "backward", B, H, dtype, 1, 132)


def test_make_tune_also_times_64_row_streamed_tiles_from_batch_64():
    """Where the heuristic keeps the weights resident, or has fewer rows, at B = 64-128: the
    forward's 64-row tiles pipelined at its hidden block and twice it, the backward's 64x16
    (8 warps) and 64x32 (16), unpipelined and pipelined, all streamed. Not at B = 16, not
    where the heuristic's tile is streamed with 64+ rows already, not in first-use
    autotuning."""
    def rows64(kernel, B, H, dtype, neighbourhood="sweep"):
        configs = autotune.candidate_configs(kernel, B, H, dtype, 1, 132, neighbourhood)
        return sorted((c.block_h, c.num_warps, c.inner_stages) for c in configs
                      if c.block_b == 64 and not c.resident and not c.gate_split
                      and c.block_k == 64 and c.inner_stages in (1, 3))

    assert rows64("forward", 64, 1024, torch.bfloat16) == [(16, 8, 3), (32, 8, 3)]
    assert rows64("backward", 64, 1024, torch.bfloat16) == [(16, 8, 1), (16, 8, 3), (32, 16, 1),
                                                            (32, 16, 3)]
    assert rows64("forward", 128, 512, torch.float16) == [(8, 8, 3), (16, 8, 3)]
    assert rows64("forward", 64, 1024, torch.float32) == [(16, 16, 3), (32, 16, 3)]
    assert rows64("forward", 16, 512, torch.bfloat16) == []
    assert rows64("forward", 64, 1024, torch.bfloat16, "autotune") == []
    # B = 128 H = 1024: the heuristic's forward is a pipelined 64x16 already; its neighbours
    assert rows64("forward", 128, 1024, torch.bfloat16) == [(8, 8, 3), (16, 8, 1), (16, 8, 3),
                                                            (32, 8, 3)]


def test_make_tune_also_times_pipelined_tiles_with_chunks_of_128():
    """Twice the bytes in flight a round trip: pipelined streamed tiles of up to 2048 rows x
    units or the backward's square 64x64, the backward's at H >= 1024, unsplit, the forward's
    in 2-byte dtypes with 4+ chunks (ptxas: the others spill). Never the unpipelined, resident
    or gate-split ones, nor first-use tuning."""
    def longer(kernel, B, H, dtype, neighbourhood="sweep"):
        configs = autotune.candidate_configs(kernel, B, H, dtype, 1, 132, neighbourhood)
        return sorted((c.block_b, c.block_h, c.num_warps) for c in configs if c.block_k == 128)

    assert longer("backward", 512, 1024, torch.bfloat16) == [(64, 32, 16), (64, 64, 16)]
    assert longer("backward", 512, 1024, torch.float32) == [(64, 32, 16), (64, 64, 16)]
    assert longer("forward", 512, 1024, torch.bfloat16) == [(128, 8, 16), (128, 16, 16)]
    assert longer("forward", 512, 1024, torch.float32) == []
    assert longer("forward", 128, 256, torch.bfloat16) == []           # 2 chunks of 128
    assert longer("forward", 64, 1024, torch.bfloat16) == [(64, 16, 8), (64, 32, 8)]
    assert longer("backward", 64, 1024, torch.bfloat16) == [(64, 16, 8), (64, 32, 16)]
    assert longer("backward", 128, 512, torch.bfloat16) == []
    assert longer("backward", 512, 1024, torch.bfloat16, "autotune") == []
    assert longer("forward", 8, 512, torch.bfloat16) == []             # resident
    sweep = autotune.candidate_configs("backward", 512, 1024, torch.bfloat16, 1, 132, "sweep")
    assert all(c.inner_stages == 3 and not c.gate_split and not c.resident
               for c in sweep if c.block_k == 128)


def test_make_tune_also_times_pipelined_tiles_with_five_stages_at_h_1024():
    """Twice the chunks in flight: every pipelined streamed candidate in chunks of 64 at
    H >= 1024 in a 2-byte dtype (ptxas: fp32's forward tiles spill with 5 stages), forward
    and backward, gate split or not; never at smaller H, resident or unpipelined tiles, nor
    in first-use tuning."""
    def deeper(kernel, B, H, dtype, neighbourhood="sweep"):
        configs = autotune.candidate_configs(kernel, B, H, dtype, 1, 132, neighbourhood)
        five = [c for c in configs if c.inner_stages == autotune.DEEP_STAGES and not c.ring]
        assert all(dataclasses.replace(c, inner_stages=3) in configs for c in five)
        assert all(c.block_k == 64 and not c.resident for c in five)
        return sorted((c.block_b, c.block_h, c.gate_split) for c in five)

    assert deeper("forward", 128, 1024, torch.bfloat16) == [(64, 8, False), (64, 16, False),
                                                            (64, 32, False)]
    assert deeper("forward", 512, 1024, torch.float16) == [(128, 8, False), (128, 16, False),
                                                           (128, 32, False)]
    assert deeper("backward", 512, 1024, torch.bfloat16) == [
        (64, 16, True), (64, 32, False), (64, 32, True), (64, 64, False), (64, 64, True)]
    assert deeper("forward", 128, 1024, torch.float32) == []
    assert deeper("forward", 512, 512, torch.bfloat16) == []           # 8 chunks
    assert deeper("backward", 128, 512, torch.bfloat16) == []
    assert deeper("forward", 8, 1024, torch.bfloat16) == []            # resident
    assert deeper("backward", 512, 1024, torch.bfloat16, "autotune") == []


def test_make_tune_also_times_the_forward_with_its_weights_in_shared_memory():
    """kernels/forward_ring.py at 64x8 and 64x16 with a ring of 5, and from H = 1024 with the
    deepest ring that fits in shared memory too: the forward only, bf16 / fp16, from B = 64,
    no projection, where the weight slice fits in shared memory and every program on the
    device at once (B = 128 H = 1024: 64x16 only; B = 512: H = 256 at 64x16). Not in
    first-use tuning."""
    def ring(kernel, B, H, dtype=torch.bfloat16, D=1, neighbourhood="sweep", proj=False):
        return sorted((c.block_b, c.block_h, c.inner_stages) for c in autotune.candidate_configs(
            kernel, B, H, dtype, D, 132, neighbourhood, proj) if c.ring)

    assert ring("forward", 128, 512, torch.float16) == [(64, 8, 5), (64, 16, 5)]
    assert ring("forward", 64, 1024) == [(64, 8, 5), (64, 8, 8), (64, 16, 5), (64, 16, 7)]
    assert ring("forward", 128, 1024) == [(64, 16, 5), (64, 16, 7)]
    assert ring("forward", 512, 256) == [(64, 16, 5)]
    assert ring("forward", 512, 1024) == []
    assert ring("forward", 128, 1024, torch.float32) == []
    assert ring("forward", 16, 512) == []
    assert ring("backward", 128, 1024) == []
    assert ring("forward", 64, 1024, D=2) == [(64, 16, 5), (64, 16, 7)]   # 2 x 64 programs
    assert ring("forward", 128, 1024, proj=True) == []
    assert ring("forward", 128, 1024, neighbourhood="autotune") == []
    # The kernel's own bounds: 64 rows, a ring of 3-8 chunks of 64, the slice in shared memory.
    tile = KernelConfig(block_b=64, block_h=16, resident=False, num_warps=8, inner_stages=5,
                        ring=True)
    assert dispatch.ring_forward_fits(tile, 1024, torch.float16)
    assert not dispatch.ring_forward_fits(tile, 2048, torch.float16)     # a 256 KB slice
    assert not dispatch.ring_forward_fits(dataclasses.replace(tile, block_h=32), 1024,
                                          torch.bfloat16)
    assert not dispatch.ring_forward_fits(dataclasses.replace(tile, block_b=32), 512,
                                          torch.bfloat16)
    assert not dispatch.ring_forward_fits(tile, 64, torch.bfloat16)      # one chunk


def test_make_tune_also_times_the_square_backward_tile_where_it_fills_the_device():
    """64x64 reads the fewest bytes of dG and W a step for its area; bf16 / fp16 / fp32 at
    H >= 512 only (ptxas: fp32 spills 16-60 bytes there, fp64 more), and only where 3/4 of
    the SMs get a program."""
    square = dict(block_b=64, block_h=64, resident=False, num_warps=16)

    def squares(B, H, dtype, D=1):
        sweep = autotune.candidate_configs("backward", B, H, dtype, D, 132, "sweep")
        return sorted(c.inner_stages for c in sweep if not c.gate_split and c.block_k == 64
                      and all(getattr(c, k) == v for k, v in square.items()))

    # (and at H = 1024 in 2-byte dtypes with 5 stages: deeper_pipeline)
    assert squares(512, 1024, torch.bfloat16) == squares(512, 1024, torch.float16) == [1, 3, 5]
    assert squares(512, 1024, torch.float32) == [1, 3]
    assert squares(256, 1024, torch.bfloat16) == []      # 64 programs of 132
    assert squares(512, 512, torch.bfloat16) == []           # 64 programs
    assert squares(512, 512, torch.bfloat16, D=2) == [1, 3]  # 128 in one launch, not 256 in two
    assert squares(512, 1024, torch.bfloat16, D=2) == []     # 256 programs: two launches


def test_make_tune_also_times_the_backward_with_its_gate_split():
    """The heuristic's streamed backward of 64+ rows with and without the gate split (none
    with a projection), pipelined and not; where that grid needs two launches, also twice
    its units in one (split, and as the square 64x64 tile, unsplit; fp32's split one
    unpipelined: pipelined it would not fit in shared memory)."""
    def split_tiles(B, H, dtype, proj=False):
        base = heuristic_config(B, H, dtype, 132, "backward", proj)
        sweep = autotune.candidate_configs("backward", B, H, dtype, 1, 132, "sweep", proj)
        return sorted((c.block_b, c.block_h, c.inner_stages, c.gate_split) for c in sweep
                      if c.block_b == base.block_b and c.block_h in (base.block_h, 2 * base.block_h)
                      and c.block_k == 64 and not c.resident
                      and c.inner_stages != autotune.DEEP_STAGES)   # (their own test)

    both_ways = [(1, False), (1, True), (3, False), (3, True)]
    assert split_tiles(128, 1024, torch.bfloat16) == [(32, 32, *w) for w in both_ways]
    assert split_tiles(512, 1024, torch.bfloat16) == [(64, bh, *w) for bh in (32, 64)
                                                      for w in both_ways]
    assert split_tiles(512, 1024, torch.float32) == [(64, 32, *w) for w in both_ways] + [
        (64, 64, 1, False), (64, 64, 1, True), (64, 64, 3, False)]
    assert split_tiles(512, 1024, torch.bfloat16, proj=True) == [
        (64, bh, stages, False) for bh in (32, 64) for stages in (1, 3)]
    assert not any(c.gate_split for c in autotune.candidate_configs(
        "backward", 8, 512, torch.bfloat16, 1, 132, "wide"))    # resident, 16 rows
    assert not any(c.gate_split for c in autotune.candidate_configs(
        "forward", 512, 1024, torch.bfloat16, 1, 132, "wide"))


def test_make_tune_also_times_the_small_batch_forward_with_four_accumulators():
    """The heuristic's resident 16-row forward with its reduction in chunks four accumulators
    take in turn, two chunks each at least (chunks of 32 at H = 256); not the backward, not
    below H = 256, not where the tile is not resident, not on first use."""
    def chained(kernel, B, H, dtype=torch.bfloat16, neighbourhood="sweep"):
        return [tuning.config_label(c) for c in autotune.candidate_configs(
            kernel, B, H, dtype, 1, 132, neighbourhood) if c.chunked]

    assert chained("forward", 8, 256) == ["bb16-bh8-chk-bk32-sk4-w4"]
    assert chained("forward", 8, 512) == ["bb16-bh8-chk-bk64-sk4-w4"]
    assert chained("forward", 16, 1024) == ["bb16-bh16-chk-bk64-sk4-w4"]
    assert chained("forward", 8, 1024, torch.float32) == ["bb16-bh8-chk-bk64-sk4-w4"]
    assert chained("forward", 8, 128) == []                  # 128: one chunk of 32 each
    assert chained("backward", 8, 512) == []
    assert chained("forward", 128, 512) == []                # 64 rows at B = 128
    assert chained("forward", 8, 512, neighbourhood="autotune") == []


def test_make_tune_also_times_16_row_tiles_that_meet_at_the_cluster_barrier():
    """Resident tiles whose group is one cluster of 16 or 8 programs, in the base's warp
    layout or, where that does not run well, split over 8 warps; none where the weights of
    so few programs do not fit on chip, none for tiles of more rows, none on first use."""
    def clustered(kernel, B, H, dtype, neighbourhood="sweep"):
        return [tuning.config_label(c) for c in autotune.candidate_configs(
            kernel, B, H, dtype, 1, 132, neighbourhood) if c.cluster]

    assert clustered("forward", 8, 256, torch.float16) == [
        "bb16-bh16-res-bk64-sk1-w4-cl", "bb16-bh32-res-bk64-sk1-w4-cl"]
    assert clustered("forward", 8, 512, torch.bfloat16) == ["bb16-bh32-res-bk64-sk1-w4-cl"]
    assert clustered("backward", 8, 512, torch.bfloat16) == ["bb16-bh32-res-bk64-sk4-w8-cl"]
    assert clustered("forward", 8, 1024, torch.bfloat16) == []    # 512 KB of weights a program
    assert clustered("forward", 8, 512, torch.float32) == []
    assert len(clustered("forward", 64, 256, torch.bfloat16)) == 2   # 4 batch blocks of 16
    assert clustered("forward", 128, 256, torch.bfloat16) == []
    assert clustered("forward", 8, 256, torch.bfloat16, "autotune") == []


def test_the_cluster_barrier_runs_where_a_group_is_one_cluster_of_sm90(fake_gpu, monkeypatch):
    c = dataclasses.replace(config(block_h=16), cluster=True)
    assert [dispatch.cluster_size(c, H, CUDA) for H in (256, 128, 48, 160, 512, 16)] == [
        16, 8, 3, 1, 1, 1]      # 10 and 32 programs: no cluster of sm_90; one: no barrier
    assert dispatch.cluster_size(dataclasses.replace(c, cluster=False), 256, CUDA) == 1
    assert dispatch.cluster_size(dataclasses.replace(c, dataflow=True), 256, CUDA) == 1
    assert dispatch.cluster_size(c, 256, CUDA, shared_barrier=True) == 1   # the wavefront's
    assert dispatch.cluster_size(c, 256, torch.device("cpu")) == 1
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(multi_processor_count=108,
                                                                  major=8, minor=0))
    tuning.clear_caches()
    assert dispatch.cluster_size(c, 256, CUDA) == 1


class ClusterKernel:
    """A kernel as launch_in_clusters sees it: warmup gives the compiled kernel for the
    arguments, which records its launches with the launch parameters they had."""
    arg_names = ["x", "y", "T", "FLAG"]
    fn = types.SimpleNamespace(__name__="fake_kernel")

    def __init__(self, num_ctas=1, pushes=0):
        self.packed_metadata = (4, num_ctas, 1024)
        self.metadata = types.SimpleNamespace(shared=1024, global_scratch_size=0)
        self.function, self.launches = 7, []
        self.asm = {"ptx": "st.async.shared::cluster;\n" * pushes}

    def warmup(self, *args, grid, **kwargs):
        return self

    def _init_handles(self):
        pass

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args, self.packed_metadata))


def test_a_cluster_launch_runs_the_grid_as_clusters_of_one_group(monkeypatch):
    fits = []
    monkeypatch.setattr(triton.runtime.driver, "_active", types.SimpleNamespace(
        utils=types.SimpleNamespace(cuOccupancyMaxActiveClusters=lambda f, shared, size: (
            fits.append((f, shared, size)) or 2))))
    kernel = ClusterKernel()
    flags = dict(FLAG=True, num_warps=4, num_stages=1)
    assert dispatch.launch_in_clusters(kernel, (32, 2), ("x", "y", 5), flags, 16)
    assert fits == [(7, 1024, 16)]
    # 2 x 2 clusters of 16 programs, every argument in the kernel's order, constexprs included.
    assert kernel.launches == [((2, 2, 1), ("x", "y", 5, True), (4, 16, 1024))]
    assert dispatch.launch_in_clusters(kernel, (32, 2), ("x", "y", 6), flags, 16)
    assert len(fits) == 1 and kernel.launches[-1][2] == (4, 16, 1024)
    # The exchange's shared memory past Triton's own (rounded up to 16 bytes): asked of the
    # occupancy query (which also lets the kernel have it) and given to the launch.
    pushing = ClusterKernel()
    pushing.metadata.shared = 1000
    assert dispatch.launch_in_clusters(pushing, (16, 1), ("x", "y", 5), flags, 8, 4112)
    assert fits[-1] == (7, 1008 + 4112, 8) and pushing.launches[0][2] == (4, 8, 5120)


def test_a_cluster_that_cannot_be_resident_launches_nothing(monkeypatch):
    monkeypatch.setattr(triton.runtime.driver, "_active", types.SimpleNamespace(
        utils=types.SimpleNamespace(cuOccupancyMaxActiveClusters=lambda *a: 0)))
    kernel = ClusterKernel()
    assert not dispatch.launch_in_clusters(kernel, (32, 1), ("x", "y", 5), dict(FLAG=1), 16)
    assert kernel.launches == [] and kernel.packed_metadata == (4, 1, 1024)
    split = ClusterKernel(num_ctas=2)     # compiled across CTAs: not ours to cluster
    with pytest.raises(RuntimeError, match="clusters"):
        dispatch.launch_in_clusters(split, (32, 1), ("x", "y", 5), dict(FLAG=1), 16)


def test_a_kernel_that_would_push_an_element_twice_is_not_launched_in_clusters(monkeypatch):
    """An exchange counts bytes: a kernel whose st.async count is not its share of the
    pushes (Triton's layout holding some elements in two threads) runs the counter instead."""
    monkeypatch.setattr(triton.runtime.driver, "_active", types.SimpleNamespace(
        utils=types.SimpleNamespace(cuOccupancyMaxActiveClusters=lambda *a: 4)))
    flags = dict(FLAG=1)
    for has, want, launched in ((64, 64, True), (32, 16, False), (0, -1, False)):
        kernel = ClusterKernel(pushes=has)
        assert dispatch.launch_in_clusters(kernel, (32, 1), ("x", "y", 5), flags, 16, 4112,
                                           want) == launched
        assert len(kernel.launches) == launched


def test_launch_recurrence_takes_the_cluster_barrier_else_the_counter(monkeypatch):
    class Kernel:   # records each counter-barrier launch's grid and flags
        def __getitem__(self, grid):
            return lambda *args, **flags: launched.append((grid, flags))

    def in_clusters(kernel, grid, args, flags, cluster, extra_shared, pushes):
        clustered.append((grid, cluster, flags["CLUSTER"], flags["PERSISTENT"]))
        return fits

    monkeypatch.setattr(dispatch, "launch_in_clusters", in_clusters)
    monkeypatch.setattr(dispatch, "cluster_size", lambda config, *a: 8 if config.cluster else 1)
    monkeypatch.setattr(dispatch, "co_resident_programs", lambda *a: 1_000)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    c = KernelConfig(block_b=16, block_h=16, cluster=True)
    launch = dict(num_steps=4, batch=40, hidden_size=128, output_size=128, num_directions=2,
                  config=c, device=torch.device("cpu"))
    for fits in (True, False):
        launched, clustered = [], []
        dispatch.launch_recurrence(Kernel(), (1, 2, 3), {}, **launch)
        # 3 batch blocks of 8 hidden blocks, both directions: one launch either way.
        assert clustered == [((24, 2), 8, True, True)]
        assert [(grid, f["CLUSTER"]) for grid, f in launched] == ([] if fits else [((24, 2),
                                                                                    False)])
    launched, clustered = [], []
    dispatch.launch_recurrence(Kernel(), (1, 2, 3), {}, **dict(launch, force_stepped=True))
    assert clustered == [] and len(launched) == 4 and not launched[0][1]["CLUSTER"]


def test_a_pushing_launch_asks_for_its_exchange_buffer(monkeypatch):
    """With dsmem, a kernel that can push h (DSMEM among its flags) gets DSMEM and the
    exchange's shared memory in its clustered launch; other kernels, and tiles that stream
    their weights, get neither; the counter launch never pushes."""
    calls = []
    monkeypatch.setattr(dispatch, "launch_in_clusters", lambda kernel, grid, args, flags,
                        cluster, extra_shared, pushes: calls.append(
                            (flags.get("DSMEM"), extra_shared, pushes)))
    monkeypatch.setattr(dispatch, "cluster_size", lambda *a: 8)
    monkeypatch.setattr(dispatch, "co_resident_programs", lambda *a: 1_000)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **flags: calls.append((flags.get("DSMEM"), "counter", None))

    c = KernelConfig(block_b=16, block_h=16, cluster=True, dsmem=True)
    launch = dict(num_steps=4, batch=16, hidden_size=128, output_size=128, num_directions=1,
                  device=torch.device("cpu"), pushes_per_exchange=lambda c: 8 * 16 * 16)
    for constexprs, config, want in (
            ({"DSMEM": False}, c, True), ({}, c, None),
            ({"DSMEM": False}, dataclasses.replace(c, resident=False), False)):
        calls.clear()
        dispatch.launch_recurrence(Kernel(), (1, 2, 3), constexprs, config=config, **launch)
        # 8 programs of 16x16, each of its 128 threads pushing 2 x 2048 / 128 elements
        extra, pushes = (2 * 16 * 128 * 4 + 16, 32) if want else (0, 0)
        assert calls == [(want, extra, pushes), (constexprs.get("DSMEM"), "counter", None)]


@requires_interpreter
def test_every_flag_a_launch_passes_is_a_parameter_of_its_kernel(monkeypatch):
    """Triton rejects an unknown keyword at a GPU launch (the interpreter drops it): each
    persistent kernel takes every flag its launcher and launch_recurrence pass."""
    unknown = {}

    class Checked:   # the kernel, with each launch's keywords checked against its parameters
        def __init__(self, kernel):
            self.kernel, self.fn, self.arg_names = kernel, kernel.fn, kernel.arg_names

        def __getitem__(self, grid):
            def launch(*args, **flags):
                options = {"num_warps", "num_stages", "launch_cooperative_grid"}
                unknown[self.fn.__name__] = set(flags) - options - set(self.arg_names)
                return self.kernel[grid](*args, **flags)
            return launch

    original = dispatch.launch_recurrence
    for name in ("forward", "backward", "wavefront"):
        monkeypatch.setattr(sys.modules[f"triton_lstm.kernels.{name}"], "launch_recurrence",
                            lambda kernel, *a, **k: original(Checked(kernel), *a, **k))
    for wavefront in (False, True):
        lstm = triton_lstm.LSTM(16, 16, num_layers=2, backend="triton", wavefront=wavefront)
        lstm(torch.randn(3, 2, 16, requires_grad=True))[0].sum().backward()
    assert set(unknown) == {"lstm_forward_kernel", "lstm_backward_kernel", "lstm_wavefront_kernel",
                            "lstm_wavefront_backward_kernel"}
    assert all(not flags for flags in unknown.values()), unknown


def test_the_heuristic_streams_the_weights_where_a_resident_operand_would_spill():
    # 128 rows at 8 warps (bf16 B=512 H=256: 688 bytes of spill on sm_90), any 16-warp tile
    # that stages 256+ bytes a thread; 64 rows at 8 warps and small H stay resident.
    for B, H, dtype, resident in ((512, 256, torch.bfloat16, False),
                                  (512, 512, torch.bfloat16, False),
                                  (512, 256, torch.float32, False),
                                  (1024, 128, torch.bfloat16, True),
                                  (128, 512, torch.bfloat16, True),
                                  (8, 512, torch.bfloat16, True)):
        for kernel in ("forward", "backward"):
            c = heuristic_config(B, H, dtype, 132, kernel)
            assert c.resident == resident, (B, H, dtype, kernel)
            # The forward's tile is the one the rule judged (a streamed backward then takes
            # half its rows, twice its units).
            f = heuristic_config(B, H, dtype, 132, "forward")
            assert dispatch.resident_operand_spills(H, f.block_b, dtype, f.num_warps) != resident
            assert not autotune.runs_well(dataclasses.replace(f, resident=True), kernel, B, H,
                                          dtype, 1, 132) or resident


def test_the_heuristic_pipelines_streamed_forward_loops_of_32_rows_where_the_stages_fit():
    for B, H, dtype, want in ((512, 1024, torch.bfloat16, 3), (128, 1024, torch.bfloat16, 3),
                              (512, 1024, torch.float32, 3),
                              (512, 4096, torch.float32, 1),   # 3 x 96 KB stages: too many
                              (8, 4096, torch.bfloat16, 1),    # 16 rows: not measured
                              (8, 512, torch.bfloat16, 1)):    # resident
        forward = heuristic_config(B, H, dtype, 132, "forward")
        assert forward.inner_stages == want, (B, H, dtype)
        assert (want == 1) or dispatch.pipelined_bytes(
            forward.block_b, forward.block_h, forward.block_k, dtype, 3) <= dispatch.ON_CHIP_BUDGET


@pytest.mark.parametrize("B, H, dtype, proj, split, stages", [
    (512, 1024, torch.bfloat16, False, True, 3),
    (128, 1024, torch.float16, False, True, 3),
    (512, 256, torch.bfloat16, False, True, 3),
    (512, 1024, torch.float32, False, True, 1),      # fp32: split, not pipelined
    (128, 1024, torch.float32, False, True, 1),
    (512, 1024, torch.bfloat16, True, False, 1),     # a projection: as before
    (512, 1024, torch.float64, False, False, 1),     # fp64: as before
    (128, 512, torch.bfloat16, False, False, 1),     # resident
    (8, 4096, torch.bfloat16, False, False, 1),      # streamed, 16 rows
])
def test_the_heuristic_backward_splits_by_gate_and_pipelines_in_2_byte_dtypes(B, H, dtype, proj,
                                                                            split, stages):
    """A streamed backward at batch 64+ without projection takes the gate split, pipelined in
    bf16 / fp16 (H200: faster on every tile timed both ways, perf/NOTES.md); fp32 unpipelined."""
    backward = heuristic_config(B, H, dtype, 132, "backward", proj)
    assert (backward.gate_split, backward.inner_stages) == (split, stages), backward
    assert dispatch.gate_split_applies(backward, proj) == split
    assert autotune.runs_well(backward, "backward", B, H, dtype, 1, 132)
    forward = heuristic_config(B, H, dtype, 132, "forward", proj)
    assert not forward.gate_split and forward == heuristic_config(B, H, dtype, 132, "forward")


def test_a_tile_too_large_for_the_gpus_shared_memory_runs_with_less(monkeypatch):
    """The budgets are Hopper's: where a tile does not fit a GPU's shared memory, resident
    weights stream, then a pipelined K loop runs unpipelined; past that, the error."""
    def capacity(kernel, args, constexprs, config, device):
        if config.resident or config.inner_stages > 1:
            raise triton.runtime.errors.OutOfResources(300_000, 101_376, "shared memory")
        return 1_000

    class Kernel:   # records each launch's compile-time flags
        def __getitem__(self, grid):
            return lambda *args, **flags: launched.append(flags)

    monkeypatch.setattr(dispatch, "co_resident_programs", capacity)
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    launched = []
    big = KernelConfig(block_b=16, block_h=8, resident=True, block_k=64, split_k=1, num_warps=4,
                       inner_stages=3)
    launch = dict(num_steps=4, batch=16, hidden_size=16, output_size=16, num_directions=1,
                  device=torch.device("cpu"))
    dispatch.launch_recurrence(Kernel(), (1, 2, 3), {}, config=big, **launch)
    assert launched and all(not f["RESIDENT"] and f["INNER_STAGES"] is None and f["PERSISTENT"]
                            for f in launched)
    def too_big(*args):
        raise triton.runtime.errors.OutOfResources(300_000, 101_376, "shared memory")

    monkeypatch.setattr(dispatch, "co_resident_programs", too_big)
    with pytest.raises(triton.runtime.errors.OutOfResources):
        dispatch.launch_recurrence(Kernel(), (1, 2, 3), {}, config=dataclasses.replace(
            big, resident=False, inner_stages=1), **launch)


def test_runs_well_rejects_what_cannot_run_well():
    ok = config(block_b=16, block_h=8)
    assert autotune.runs_well(ok, "forward", 8, 512, torch.bfloat16, 1, 132)
    assert not autotune.runs_well(config(block_b=8), "forward", 8, 512, torch.bfloat16, 1, 132)
    assert not autotune.runs_well(config(block_b=32), "forward", 8, 512, torch.bfloat16, 1, 132)
    assert not autotune.runs_well(config(block_h=4), "forward", 8, 1024, torch.bfloat16, 1, 132)  # 256 programs
    assert not autotune.runs_well(config(block_h=8), "forward", 8, 1024, torch.bfloat16, 2, 132)  # 2 x 128
    assert not autotune.runs_well(config(block_b=128, block_h=32, num_warps=16), "forward", 512,
                                  256, torch.bfloat16, 1, 132)                # 4096-cell tile
    streamed_128x32 = config(block_b=128, block_h=32, num_warps=16, resident=False, split_k=4)
    assert autotune.runs_well(streamed_128x32, "forward", 512, 1024, torch.bfloat16, 1, 132)
    assert not autotune.runs_well(streamed_128x32, "forward", 512, 1024, torch.float32, 1, 132)
    assert not autotune.runs_well(streamed_128x32, "backward", 512, 1024, torch.bfloat16, 1, 132)
    # The backward's square 64x64 compiles spill-free in 2-byte dtypes at H >= 512 only, in
    # fp32 with 16-24 bytes of spill there (its gate split 168-176); 128-row fp32 tiles spill
    # more.
    square = dataclasses.replace(streamed_128x32, block_b=64, block_h=64)
    assert autotune.runs_well(square, "backward", 512, 1024, torch.bfloat16, 1, 132)
    assert autotune.runs_well(square, "backward", 512, 1024, torch.float32, 1, 132)
    assert autotune.runs_well(square, "backward", 1024, 512, torch.bfloat16, 1, 132)
    assert not autotune.runs_well(square, "backward", 512, 1024, torch.float64, 1, 132)
    assert not autotune.runs_well(dataclasses.replace(streamed_128x32, gate_split=True),
                                  "backward", 512, 1024, torch.float32, 1, 132)
    assert not autotune.runs_well(square, "backward", 1024, 256, torch.bfloat16, 1, 132)
    assert not autotune.runs_well(config(block_h=64), "forward", 8, 1024, torch.float32, 1, 132)  # 1 MB on chip
    # The unsplit backward spills past 512 bytes of weight slice per thread; 8 warps, split, do not.
    assert not autotune.runs_well(config(block_h=16), "backward", 8, 1024, torch.bfloat16, 1, 132)
    assert autotune.runs_well(config(block_h=16, split_k=4, num_warps=8), "backward", 8, 1024,
                              torch.bfloat16, 1, 132)


@requires_interpreter
def test_measure_checks_against_float64_before_timing(monkeypatch):
    timed = []
    monkeypatch.setattr(autotune.Problem, "time_us", lambda self, kernel, c: timed.append(c) or 7.0)
    problem = autotune.Problem.random(torch.float32, 3, 20, 2, 8, steps=4, device="cpu")
    good = heuristic_config(3, 20, torch.float32, 2, "forward")
    for kernel in ("forward", "backward"):
        m = autotune.measure(problem, kernel, good)
        assert (m.status, m.us_per_step) == ("ok", 7.0) and m.rel_error < 1e-5
    # A wrong result is recorded as wrong and never timed; a config that cannot compile as an error.
    run = autotune.Problem.run
    monkeypatch.setattr(autotune.Problem, "run", lambda self, kernel, c, steps=None: tuple(
        t + 1 for t in run(self, kernel, c, steps)))
    wrong = autotune.measure(problem, "forward", good)
    assert wrong.status == "wrong" and wrong.us_per_step is None and "relative error" in wrong.detail
    monkeypatch.setattr(autotune.Problem, "run", run)
    broken = autotune.measure(problem, "backward", config(block_h=3))
    assert broken.status == "error" and broken.detail and broken.us_per_step is None
    assert timed == [good, good]


@requires_interpreter
def test_check_candidates_checks_each_candidate_of_make_tune_on_the_cpu(capsys, monkeypatch):
    import check_candidates
    assert check_candidates.main(["--shapes", "3x20", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    for kernel in tuning.KERNELS:
        for c in tune.shape_candidates(tune.Shape("fp32", 3, 20), kernel, "sweep", tune.NUM_SMS):
            assert f" {kernel} {tuning.config_label(c)}: ok " in out
    assert out.rstrip().endswith("all passed")
    # A candidate whose outputs are off fails the run, and says how far off.
    run = autotune.Problem.run
    monkeypatch.setattr(autotune.Problem, "run", lambda self, kernel, c, steps=None: tuple(
        t + 1 for t in run(self, kernel, c, steps)))
    assert check_candidates.main(["--shapes", "3x20", "--dtypes", "fp32"]) == 1
    out = capsys.readouterr().out
    assert ": wrong " in out and "relative error" in out and "failed" in out.splitlines()[-1]


# -- first-use autotuning ----------------------------------------------------------------------

@pytest.fixture
def autotuning(monkeypatch, tmp_path, fake_gpu):
    """TRITON_LSTM_AUTOTUNE=1 with the cache in tmp_path; timings by hidden block (8 fastest)."""
    monkeypatch.setenv(autotune.ENV, "1")
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(autotune.Problem, "time_us",
                        lambda self, kernel, c: {8: 1.0, 16: 2.0}.get(c.block_h, 3.0) * c.num_warps)
    return tmp_path


@requires_interpreter
def test_autotune_tunes_on_first_use_caches_and_reuses(autotuning, monkeypatch):
    cpu = torch.device("cpu")
    got = autotune.autotuned_config("forward", 3, 20, torch.float32, cpu, 1, False)
    candidates = autotune.candidate_configs("forward", 3, 20, torch.float32, 1, 4, "autotune")
    want = min(candidates, key=lambda c: {8: 1.0, 16: 2.0}.get(c.block_h, 3.0) * c.num_warps)
    assert got == want
    files = list((autotuning / "autotune").glob("nvidia-h200-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["gpu"] == GPU and data["versions"] == autotune.versions()
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["kernels"]
    key = autotune.cache_key("forward", torch.float32, 3, 20, 1, False)
    assert key == "forward/fp32/B4/H20/D1/P0"
    assert tuning.config_from_entry(data["configs"][key]) == want
    # The next run (a fresh process: nothing in memory) reads the file and tunes nothing.
    autotune._cache_files.clear()
    monkeypatch.setattr(autotune, "tune", lambda *a: pytest.fail("tuned again"))
    assert autotune.autotuned_config("forward", 4, 20, torch.float32, cpu, 1, False) == want
    # pick_config on the (stand-in) GPU takes it, before the shipped table.
    tuning.set_table(GPU, table(entry("fp32", 4, 20, forward=config(block_h=4))))
    autotune._cache_files.clear()
    monkeypatch.setattr(autotune, "cache_path", lambda gpu: files[0])
    assert tuning.measured_config("forward", 3, 20, torch.float32, CUDA) == (want, "autotune")
    assert pick_config(3, 20, torch.float32, CUDA, "forward") == want


def test_autotune_cache_is_keyed_by_gpu_and_versions(autotuning, monkeypatch):
    tuned = []

    def fake_tune(kernel, batch, hidden, dtype, device, directions, proj):
        tuned.append(autotune.versions()["torch"])
        return autotune.Measurement(config(block_h=4), "ok", 0.0, 1.0)

    monkeypatch.setattr(autotune, "tune", fake_tune)
    args = ("backward", 8, 64, torch.bfloat16, CUDA, 2, True)
    assert autotune.autotuned_config(*args) == config(block_h=4)
    assert autotune.autotuned_config(*args) == config(block_h=4)
    assert tuned == [torch.__version__]
    first = autotune.cache_path(GPU)
    newer = dict(autotune.versions(), torch="9.9")
    monkeypatch.setattr(autotune, "versions", lambda: newer)
    assert autotune.cache_path(GPU) != first and autotune.cache_path("NVIDIA H100 80GB HBM3") != first
    autotune.autotuned_config(*args)
    assert tuned == [torch.__version__, "9.9"]
    assert autotune.cache_path(GPU).name.startswith("nvidia-h200-")
    # Off (the default), or asked not to tune (explain): nothing is tuned.
    monkeypatch.delenv(autotune.ENV)
    assert tuning.measured_config("forward", 8, 64, torch.bfloat16, CUDA) is None
    monkeypatch.setenv(autotune.ENV, "1")
    assert autotune.autotuned_config("forward", 8, 64, torch.bfloat16, CUDA,
                                     tune_if_missing=False) is None
    assert len(tuned) == 2


def test_autotune_with_no_passing_candidate_uses_the_heuristic_and_remembers(autotuning, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "tune", lambda *a: calls.append(a) and None)
    assert autotune.autotuned_config("forward", 8, 64, torch.float16, CUDA) is None
    assert autotune.autotuned_config("forward", 8, 64, torch.float16, CUDA) is None
    assert len(calls) == 1
    assert pick_config(8, 64, torch.float16, CUDA) == heuristic_config(8, 64, torch.float16, 132)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "mine"))
    assert autotune.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(autotune.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "triton_lstm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert autotune.cache_dir() == tmp_path / ".cache" / "triton_lstm"


# -- the auto policy and explain ---------------------------------------------------------------

POLICY_TABLE = table(
    # bf16, H=512: kernels faster everywhere but B=512 (and B=64 training, within the margin).
    entry("bf16", 8, 512, fwd=(3.0, 6.0), train=(9.0, 40.0)),
    entry("bf16", 64, 512, fwd=(5.0, 7.0), train=(18.0, 18.5)),
    entry("bf16", 512, 512, fwd=(30.0, 20.0), train=(130.0, 70.0)),
    # fp16, H=1024: cuDNN's persistent kernel wins at B=8, the kernels at 128.
    entry("fp16", 8, 1024, fwd=(5.6, 2.7), train=(14.6, 8.0)),
    entry("fp16", 128, 1024, fwd=(10.9, 15.9), train=(48.0, 60.0)),
    # bidirectional bf16: nn.LSTM faster.
    entry("bf16", 8, 512, D=2, fwd=(8.0, 6.0), train=(30.0, 20.0)))


def auto_module(H=512, dtype=torch.bfloat16, **options):
    return triton_lstm.LSTM(16, H, dtype=dtype, **options)


@pytest.mark.parametrize("dtype, B, H, options, want_fwd, want_train", [
    (torch.bfloat16, 1, 512, {}, True, True),
    (torch.bfloat16, 64, 512, {}, True, False),       # training: 18.0 > 95% of 18.5
    (torch.bfloat16, 600, 512, {}, False, False),     # past the largest bucket: the largest
    (torch.bfloat16, 100, 400, {}, False, False),     # nearest: H=512, bucket 512
    (torch.float16, 8, 1024, {}, False, False),
    (torch.float16, 16, 1024, {"batch_first": True}, True, True),
    (torch.bfloat16, 8, 512, {"bidirectional": True}, False, False),
    (torch.bfloat16, 8, 512, {"proj_size": 128}, True, True),      # never measured: kernels
    (torch.float32, 64, 512, {}, True, True),                       # no fp32 entries: kernels
    (torch.float32, 512, 512, {}, False, False),    # but not where full-fp32 GEMMs outweigh
    (torch.bfloat16, 8, 4096, {}, True, True),                      # H too far: kernels
])
def test_auto_picks_what_the_table_says_is_faster(fake_gpu, dtype, B, H, options, want_fwd,
                                                  want_train):
    tuning.set_table(GPU, POLICY_TABLE)
    module = auto_module(H, dtype, **options)
    x = torch.randn(B, 4, 16, dtype=dtype) if options.get("batch_first") else torch.randn(4, B, 16, dtype=dtype)
    with torch.no_grad():
        assert module._uses_triton(x) is want_fwd
        assert triton_lstm.explain(module, x).path == ("kernels" if want_fwd else "nn.LSTM")
    assert module._uses_triton(x) is want_train                    # parameters want gradients
    assert triton_lstm.explain(module, x).path == ("kernels" if want_train else "nn.LSTM")
    module.requires_grad_(False)
    assert module._uses_triton(x) is want_fwd                      # nothing wants a gradient
    assert module._uses_triton(x.requires_grad_()) is want_train   # the input does


def test_auto_without_a_table_or_on_cpu_keeps_todays_rule(fake_gpu, monkeypatch):
    module, x = auto_module(), torch.randn(4, 512, 16, dtype=torch.bfloat16)
    assert module._uses_triton(x)                                   # no table for this GPU
    tuning.set_table(GPU, POLICY_TABLE)
    assert not module._uses_triton(x)
    assert module._uses_triton(x[:, 0])                             # 2-D input: the kernels
    assert not triton_lstm.LSTM.from_torch(module, backend="torch")._uses_triton(x)
    assert triton_lstm.LSTM.from_torch(module, backend="triton")._uses_triton(x)
    monkeypatch.setattr(policy, "_on_cuda", lambda input: False)
    assert not module._uses_triton(x)                               # CPU: nn.LSTM
    assert "CPU" in triton_lstm.explain(module, x).why


def test_without_a_measurement_auto_leaves_cudnns_persistent_fp16_kernel_its_small_batches(
        fake_gpu, monkeypatch):
    def uses_kernels(B, H=512, I=512, dtype=torch.float16, arch=(9, 0, 132), x_dtype=None,
                     **options):
        tuning.clear_caches()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: (
            types.SimpleNamespace(major=arch[0], minor=arch[1], multi_processor_count=arch[2])))
        module = triton_lstm.LSTM(I, H, dtype=dtype, **options)
        with torch.no_grad():
            x = torch.randn(3, B, I, dtype=x_dtype or dtype)
            kernels = module._uses_triton(x)
            assert (triton_lstm.explain(module, x).path == "kernels") == kernels
        return kernels

    for B in (8, 16):                                  # what PyTorch gives cuDNN's persistent kernel
        assert not uses_kernels(B)
    assert "persistent" in triton_lstm.explain(triton_lstm.LSTM(512, 512, dtype=torch.float16),
                                               torch.randn(3, 8, 512, dtype=torch.float16)).why
    assert uses_kernels(1) and uses_kernels(12) and uses_kernels(64)   # batch: % 8, <= 16
    assert uses_kernels(8, dtype=torch.bfloat16)       # persistent in fp16 only
    assert uses_kernels(8, H=320) and uses_kernels(8, I=100) and uses_kernels(8, H=2048)
    assert uses_kernels(8, num_layers=2) and uses_kernels(8, bidirectional=True)
    assert uses_kernels(8, proj_size=128)
    assert uses_kernels(8, arch=(8, 6, 84)) and uses_kernels(8, arch=(8, 0, 56))   # sm_86, A30
    assert uses_kernels(8, arch=(7, 0, 80))
    assert not uses_kernels(8, arch=(8, 0, 108))       # A100
    with torch.autocast("cpu", dtype=torch.float16):   # the dtype the call computes in
        assert not uses_kernels(8, dtype=torch.float32, x_dtype=torch.float32)
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    assert uses_kernels(8)                             # no cuDNN: nn.LSTM would not be faster
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    # A table that measured the shape decides, as before.
    tuning.set_table(GPU, table(entry("fp16", 8, 512, fwd=(1.0, 2.0), train=(1.0, 2.0))))
    assert uses_kernels(8)


def test_without_a_measurement_auto_gives_nn_lstm_the_fp32_layers_its_tf32_gemms_win(
        fake_gpu, monkeypatch):
    """Where an fp32 layer's GEMMs would run in full fp32 against cuDNN's tf32, past the size
    where they outweigh the recurrence (policy.FP32_GEMM_WORK, from the H200's table)."""
    def uses_kernels(B, H, I=None, train=False, arch=(9, 0, 132), **options):
        tuning.clear_caches()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: (
            types.SimpleNamespace(major=arch[0], minor=arch[1], multi_processor_count=arch[2])))
        module = triton_lstm.LSTM(I or H, H, **options)
        x = torch.randn(3, B, I or H, requires_grad=train)
        with torch.set_grad_enabled(train):
            kernels = module._uses_triton(x)
            explained = triton_lstm.explain(module, x)
        assert (explained.path == "kernels") == kernels
        assert ("full fp32" in explained.why) != kernels
        return kernels

    monkeypatch.setattr(policy, "cudnn_rnn_allows_tf32", lambda: True)
    monkeypatch.setattr(policy, "torch_matmul_allows_tf32", lambda: False)
    # B H (I + R) against 2^27 (inference) and 2^26 (training)
    assert not uses_kernels(128, 1024) and not uses_kernels(128, 1024, train=True)
    assert uses_kernels(128, 512) and not uses_kernels(128, 512, train=True)    # 2^26
    assert uses_kernels(64, 512) and uses_kernels(64, 512, train=True)          # 2^25
    assert not uses_kernels(512, 1024, I=16, train=True)                        # 2^28 + 2^23
    assert uses_kernels(32, 1024, I=16, train=True)                             # 2^25 + 2^19
    assert not uses_kernels(32, 1024, I=16, train=True, num_layers=2)   # layer 2's input is H
    assert not uses_kernels(128, 1024, train=True, proj_size=16)        # R = 16: 2^27 + 2^21
    assert uses_kernels(16, 1024, train=True, proj_size=16)
    assert not uses_kernels(128, 512, train=True, bidirectional=True)   # per direction
    assert uses_kernels(128, 1024, train=True, arch=(7, 0, 80))         # no tf32 tensor cores
    with torch.no_grad():                                               # bf16: tf32 is moot
        assert triton_lstm.LSTM(1024, 1024, dtype=torch.bfloat16)._uses_triton(
            torch.randn(3, 128, 1024, dtype=torch.bfloat16))
    monkeypatch.setattr(policy, "torch_matmul_allows_tf32", lambda: True)
    assert uses_kernels(128, 1024, train=True)         # the GEMMs in tf32 too
    monkeypatch.setattr(policy, "torch_matmul_allows_tf32", lambda: False)
    monkeypatch.setattr(policy, "cudnn_rnn_allows_tf32", lambda: False)
    assert uses_kernels(128, 1024, train=True)         # nn.LSTM in full fp32 too
    monkeypatch.setattr(policy, "cudnn_rnn_allows_tf32", lambda: True)
    monkeypatch.setattr(dispatch, "fp32_gemms", "triton")
    assert uses_kernels(128, 1024, train=True)         # kernels/gemm.py in tf32
    monkeypatch.setattr(dispatch, "fp32_gemms", "torch")
    # A table that measured the kind of shape decides, as before.
    tuning.set_table(GPU, table(entry("fp32", 128, 1024, fwd=(1.0, 2.0), train=(1.0, 2.0))))
    assert uses_kernels(128, 1024, train=True)


def test_torch_matmul_allows_tf32_follows_torchs_flag():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not dispatch.torch_matmul_allows_tf32()
        torch.set_float32_matmul_precision("high")
        assert dispatch.torch_matmul_allows_tf32()
    finally:
        torch.set_float32_matmul_precision(before)


def test_explain_says_what_and_why(fake_gpu):
    tuning.set_table(GPU, POLICY_TABLE)
    module = auto_module(1024, torch.float16)
    with torch.no_grad():
        slower = triton_lstm.explain(module, torch.randn(4, 8, 16, dtype=torch.float16))
        faster = triton_lstm.explain(module, torch.randn(4, 100, 16, dtype=torch.float16))
    assert slower.path == "nn.LSTM" and faster.path == "kernels"
    assert slower.entry["B"] == 8 and faster.entry["B"] == 128
    assert slower.provenance["commit"] == "abc1234"
    text = str(slower)
    assert text.splitlines()[0] == "triton_lstm: nn.LSTM runs this call"
    for part in ("fp16 B=8 H=1024", "inference", GPU, "5.60 µs/step", "2.70 µs/step", "abc1234",
                 "torch 2.11.0", "95%"):
        assert part in text, (part, text)
    assert "forward tiles" in str(faster) and faster.tiles["backward"][1] == "heuristic"
    assert faster.gemms == "torch" and "GEMMs: torch" in str(faster)
    assert "T = 64" in text                  # a table with one T ("steps") names that one
    # A table names the T of the layer timings the decision rests on, not the candidates'.
    provenance = dict(POLICY_TABLE["provenance"], steps=64, layer_steps=256)
    tuning.set_table(GPU, dict(POLICY_TABLE, provenance=provenance))
    with torch.no_grad():
        text = str(triton_lstm.explain(module, torch.randn(4, 8, 16, dtype=torch.float16)))
    assert "T = 256" in text and "T = 64" not in text
    # An entry a sweep has not timed at the table's T yet names its own.
    shapes = {key: dict(e, layer_steps=64) for key, e in POLICY_TABLE["shapes"].items()}
    tuning.set_table(GPU, dict(POLICY_TABLE, provenance=provenance, shapes=shapes))
    with torch.no_grad():
        why = triton_lstm.explain(module, torch.randn(4, 8, 16, dtype=torch.float16)).why
    assert "(forward, at T = 64)" in why, why
    tuning.set_table(GPU, POLICY_TABLE)
    assert "training" in str(triton_lstm.explain(module, torch.randn(4, 8, 16, dtype=torch.float16)))
    # No table, forced backends.
    tuning.set_table(GPU, {})
    assert "no table measured for NVIDIA H200" in triton_lstm.explain(module, torch.randn(2, 8, 16)).why
    assert triton_lstm.explain(triton_lstm.LSTM(16, 8, backend="torch"), torch.randn(2, 3, 16)).path == "nn.LSTM"


@requires_interpreter
def test_explain_names_the_gemm_kernel_for_fp32_layers_that_opt_in(monkeypatch):
    monkeypatch.setattr(dispatch, "fp32_gemms", "triton")
    module = triton_lstm.LSTM(16, 8, backend="triton")
    e = triton_lstm.explain(module, torch.randn(2, 3, 16))
    # Under the interpreter every fp32 GEMM takes the kernel, exact (the CPU has no tf32).
    assert e.gemms == "kernels/gemm.py, ieee (TRITON_LSTM_FP32_GEMMS=triton)", e.gemms
    assert "GEMMs: kernels/gemm.py" in str(e)
    bf16 = triton_lstm.explain(module.bfloat16(), torch.randn(2, 3, 16, dtype=torch.bfloat16))
    assert bf16.gemms == "torch"


@requires_interpreter
def test_explain_says_when_the_backward_runs_in_chunks(monkeypatch):
    module = triton_lstm.LSTM(16, 8, backend="triton")
    x = torch.randn(4, 3, 16, requires_grad=True)
    monkeypatch.setattr(dispatch, "backward_chunks", "0")
    assert triton_lstm.explain(module, x).gemms == "torch"
    monkeypatch.setattr(dispatch, "backward_chunks", "4")
    e = triton_lstm.explain(module, x)
    assert e.gemms == ("torch; the backward in 4 chunks of steps, each chunk's GEMMs beside the "
                       "next chunk's recurrence (TRITON_LSTM_BACKWARD_CHUNKS=4)"), e.gemms
    # Inference has no backward; a bidirectional layer keeps the one launch.
    with torch.no_grad():
        assert triton_lstm.explain(module, x).gemms == "torch"
    both_ways = triton_lstm.LSTM(16, 8, bidirectional=True, backend="triton")
    assert triton_lstm.explain(both_ways, x).gemms == "torch"
    monkeypatch.setattr(dispatch, "backward_chunks", "many")
    assert "the backward raises ValueError: TRITON_LSTM_BACKWARD_CHUNKS" in (
        triton_lstm.explain(module, x).gemms)


@requires_interpreter
def test_explain_says_when_the_forward_runs_in_chunks(monkeypatch):
    module = triton_lstm.LSTM(16, 8, backend="triton")
    x = torch.randn(4, 3, 16, requires_grad=True)
    monkeypatch.setattr(dispatch, "forward_chunks", "3")
    monkeypatch.setattr(dispatch, "backward_chunks", "2")
    forward = ("; the forward in 3 chunks of steps, each chunk's input projection beside the "
               "recurrence of the chunk before (TRITON_LSTM_FORWARD_CHUNKS=3)")
    with torch.no_grad():
        assert triton_lstm.explain(module, x).gemms == "torch" + forward
    assert triton_lstm.explain(module, x).gemms == (
        "torch" + forward + "; the backward in 2 chunks of steps, each chunk's GEMMs beside the "
        "next chunk's recurrence (TRITON_LSTM_BACKWARD_CHUNKS=2)")
    both_ways = triton_lstm.LSTM(16, 8, bidirectional=True, backend="triton")
    assert triton_lstm.explain(both_ways, x).gemms == "torch"
    monkeypatch.setattr(dispatch, "forward_chunks", "-2")
    assert "the forward raises ValueError: TRITON_LSTM_FORWARD_CHUNKS" in (
        triton_lstm.explain(module, x).gemms)


H100 = "NVIDIA H100 80GB HBM3"


def measured_on(arch, *entries):
    """A table whose provenance names the chip it was measured on: (major, minor, SMs)."""
    t = table(*entries)
    t["provenance"].update(compute_capability=f"{arch[0]}.{arch[1]}", sm_count=arch[2])
    return t


@pytest.mark.parametrize("props, borrows", [
    ((9, 0, 132), True),          # an H100 SXM: the H200's chip
    ((9, 0, 114), False),         # an H100 PCIe: fewer SMs
    ((8, 0, 108), False),         # an A100
])
def test_a_gpu_without_a_table_decides_by_one_measured_on_its_chip(fake_gpu, monkeypatch, props,
                                                                   borrows):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None:
                        types.SimpleNamespace(major=props[0], minor=props[1],
                                              multi_processor_count=props[2]))
    tiles = dict(forward=KernelConfig(block_b=128, block_h=16, resident=False, inner_stages=3),
                 backward=KernelConfig(block_b=64, block_h=32, resident=False, num_warps=16))
    entries = {**POLICY_TABLE["shapes"], tuning.shape_key("bf16", 512, 512, 1, 0): entry(
        "bf16", 512, 512, fwd=(30.0, 20.0), train=(130.0, 70.0), **tiles)}
    tuning.set_table(GPU, measured_on((9, 0, 132), *entries.values()))
    assert tuning.decision_gpu(CUDA) == (GPU if borrows else H100)
    module = auto_module(512, torch.bfloat16)
    x = torch.randn(4, 512, 16, dtype=torch.bfloat16)    # the H200 measured nn.LSTM faster
    with torch.no_grad():
        assert policy.auto_uses_kernels(module, x) is not borrows
        e = triton_lstm.explain(module, x)
    assert e.path == ("nn.LSTM" if borrows else "kernels")
    if borrows:
        assert e.why.startswith(f"no table measured for {H100}; its chip's, measured on {GPU}")
        assert e.provenance["gpu"] == GPU
    # The kernels run the tiles whose timings decided: the borrowed table's.
    for kernel, config in tiles.items():
        assert tuning.measured_config(kernel, 512, 512, torch.bfloat16, CUDA) == (
            (config, "table") if borrows else None)


def test_an_h100_sxm_decides_by_the_shipped_h200_table(fake_gpu, monkeypatch):
    monkeypatch.setattr(tuning, "CONFIG_DIR", pathlib.Path(triton_lstm.__file__).parent / "configs")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    assert tuning.decision_gpu(CUDA) == GPU
    assert tuning.load_table(GPU)["provenance"]["gpu"] == GPU    # read once, kept


def test_a_table_that_does_not_name_its_chip_is_not_borrowed(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: H100)
    tuning.set_table(GPU, POLICY_TABLE)                  # no compute capability, no SM count
    assert tuning.decision_gpu(CUDA) == H100
    # A GPU with a table of its own always decides by it.
    tuning.set_table(H100, measured_on((9, 0, 132), entry("bf16", 8, 512, fwd=(9.0, 1.0))))
    tuning.set_table(GPU, measured_on((9, 0, 132), *POLICY_TABLE["shapes"].values()))
    assert tuning.decision_gpu(CUDA) == H100


def test_explain_reports_a_refused_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    e = triton_lstm.explain(triton_lstm.LSTM(4, 8, backend="triton"), torch.randn(2, 3, 4))
    assert e.path == "error" and "CUDA" in e.why and "raises" in str(e)


def test_the_auto_decision_compiles_without_graph_breaks(fake_gpu, fullgraph_enabled):
    def check(module, table, wants):   # wants: (B, 2.0 for the kernels, 3.0 for nn.LSTM)
        tuning.set_table(GPU, table)

        def run(x):   # what the module's forward does with the decision
            return x * 2 if module._uses_triton(x) else x * 3

        compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
        with torch.no_grad():
            for B, want in wants:
                x = torch.ones(4, B, module.input_size, dtype=module.weight_ih_l0.dtype)
                assert compiled(x)[0, 0, 0].item() == want, (B, want)
        torch._dynamo.reset()

    check(auto_module(), POLICY_TABLE, ((8, 2.0), (64, 2.0), (600, 3.0), (3, 2.0)))
    # No measurement: the rule that leaves cuDNN's persistent fp16 kernel its small batches.
    check(triton_lstm.LSTM(128, 128, dtype=torch.float16), {},
          ((8, 3.0), (24, 2.0), (16, 3.0), (5, 2.0)))
    # and the one that gives nn.LSTM fp32 layers whose GEMMs outweigh the recurrence
    check(triton_lstm.LSTM(1024, 1024), {}, ((64, 3.0), (32, 2.0), (200, 3.0)))


# -- make tune: bookkeeping ----------------------------------------------------------------------

def test_default_grid_covers_make_perf_and_fits_the_budget():
    grid = tune.default_grid()
    plain = {(s.dtype, s.batch, s.hidden) for s in grid if (s.directions, s.proj) == (1, 0)}
    assert plain == {(d, B, H) for d in ("fp32", "bf16", "fp16") for B in (1, 8, 16, 64, 128, 512)
                     for H in (256, 512, 1024)}
    assert {(s.directions, s.proj > 0) for s in grid} == {(1, False), (2, False), (1, True)}
    assert all(s.proj in (0, s.hidden // 2) for s in grid)
    assert len({tune.row_key("forward", s, "-") for s in grid}) == len(grid)
    plan = tune.estimate(grid, jobs=tune.GPU_HOST_CORES)   # compiled ahead on a GPU host's cores
    assert plan["seconds"] <= 8 * 60 and plan["compiles"] > 100
    assert tune.estimate(grid, "wide", jobs=tune.GPU_HOST_CORES)["seconds"] > plan["seconds"]


def test_make_tune_times_the_heuristic_tiles_of_other_layers_and_them_in_one_launch():
    """Bidirectional and projected layers get the heuristic's tiles only, and where a grid
    needs two launches (256 programs of 16 warps: both directions at B = 512 H = 512) also
    with twice its units in one (the backward's also as the square 64x64; the forward's in
    2-byte dtypes: fp32's 128x32 spills)."""
    grid = [s for s in tune.default_grid() if (s.directions, s.proj) != (1, 0)]
    for shape in grid:
        dtype = tune.DTYPES[shape.dtype]
        for kernel in tune.KERNELS:
            base = heuristic_config(shape.batch, shape.hidden, dtype, 132 // shape.directions,
                                    kernel, shape.proj > 0)
            configs = tune.shape_candidates(shape, kernel, "sweep", 132)
            assert configs[0] == base
            two_launches = ((shape.batch, shape.hidden, shape.directions) == (512, 512, 2)
                            and (kernel == "backward" or shape.dtype != "fp32"))
            assert len(configs) > 1 if two_launches else configs == [base], shape
            for c in configs[1:]:     # one launch: a program of 16 warps an SM
                assert c.block_h == 2 * base.block_h and c.num_warps == 16
                assert (-(-shape.hidden // c.block_h) * -(-shape.batch // c.block_b)
                        * shape.directions <= 132)
            assert all(autotune.runs_well(c, kernel, shape.batch, shape.hidden, dtype,
                                          shape.directions, 132) for c in configs[1:])


def test_compile_ahead_lists_each_candidate_the_sweep_still_lacks_and_builds_it():
    grid = [tune.Shape("fp32", 2, 16), tune.Shape("fp16", 2, 16)]
    jobs = tune.compile_jobs(grid, "sweep", set(), 4, "cpu")
    expected = [(s, k, tuning.config_label(c)) for s in grid for k in tuning.KERNELS
                for c in autotune.candidate_configs(k, s.batch, s.hidden, tune.DTYPES[s.dtype],
                                                    1, 4, "sweep")]
    assert [job[:3] for job in jobs] == expected and len(jobs) > 2
    measured = {tune.row_key(kernel, shape, label) for shape, kernel, label, *_ in jobs[:2]}
    assert [job[:3] for job in tune.compile_jobs(grid, "sweep", measured, 4, "cpu")] == expected[2:]
    assert tune.compile_one(jobs[0]) == ""           # runs (compiles) the candidate once
    shape, kernel, _, sms, device = jobs[0]
    assert "ValueError" in tune.compile_one((shape, kernel, "not-a-label", sms, device))
    # 2n processes compile at n times the speed of one (half of linear, as measured)
    serial, parallel = (tune.estimate(tune.default_grid(), jobs=n) for n in (1, 4))
    assert serial["seconds"] - parallel["seconds"] == pytest.approx(
        serial["compiles"] * tune.COMPILE_S / 2)


def test_plan_prints_the_estimate_without_a_gpu(capsys):
    assert tune.main(["--plan"]) == 0
    out = capsys.readouterr().out
    minutes = float(out.split("estimate: ")[1].split(" min")[0])
    assert 1 < minutes <= 8 and "kernel compiles" in out


@pytest.mark.parametrize("kernel, B, H, registers_push", [
    ("backward", 8, 256, True), ("forward", 8, 256, True), ("backward", 8, 512, True),
    ("forward", 1, 512, True),
    ("backward", 8, 1024, False)])     # two warps a gate's reduction: dG read from L2
def test_make_tune_exchange_adds_the_dsmem_twin_of_each_cluster_and_registers_tile(
        kernel, B, H, registers_push, monkeypatch):
    """--exchange: each cluster tile also exchanging through distributed shared memory, and
    the registers tile pushing its state through its clusters where it can (elsewhere its
    dsmem twin would time the same launch again); never with a projection."""
    plain, projected = tune.Shape("fp16", B, H), tune.Shape("fp16", B, H, 1, 128)
    without = tune.shape_candidates(plain, kernel, "sweep", 132)
    monkeypatch.setattr(tune, "EXCHANGE", True)
    pushing = tune.shape_candidates(plain, kernel, "sweep", 132)
    clustered = [c for c in without if c.cluster and c.resident]
    registers = [c for c in without if c.registers]
    assert len(registers) == 1 and not any(c.dsmem for c in without)
    twins = [c for c in without if c in clustered or (c in registers and registers_push)]
    assert pushing == without + [dataclasses.replace(c, dsmem=True) for c in twins]
    assert not any(c.dsmem for c in tune.shape_candidates(projected, kernel, "wide", 132))
    assert tune.main(["--plan"]) == 0 and not tune.EXCHANGE     # the flag, each run


def test_row_keys_name_kind_shape_and_config():
    shape = tune.Shape("bf16", 8, 512, 2, 256)
    assert tune.row_key("forward", shape, "bb16-bh8-res-bk64-sk1-w4") == \
        "forward|bf16/B8/H512/D2/P256|bb16-bh8-res-bk64-sk1-w4"
    assert tune.row_key("cudnn_train", shape, "-") != tune.row_key("cudnn_train", tune.Shape("bf16", 8, 512), "-")
    # A layer timing's key names its T: one at another T is another measurement.
    assert tune.row_key("cudnn_train", shape, "-", 256) == "cudnn_train|bf16/B8/H512/D2/P256|-|T256"
    assert tune.row_key("cudnn_train", shape, "-", 256) != tune.row_key("cudnn_train", shape, "-", 64)


def csv_row(kind, shape, config_text, status="ok", us=None, commit="abc1234", T=None):
    """A row as the sweep writes it: candidates at STEPS, layer timings at LAYER_STEPS."""
    layer = kind in tune.LAYER_KINDS
    T = T or (tune.LAYER_STEPS if layer else tune.STEPS)
    return dict(key=tune.row_key(kind, shape, config_text, T if layer else None), kind=kind,
                dtype=shape.dtype, B=shape.batch, H=shape.hidden, D=shape.directions,
                proj=shape.proj, config=config_text, status=status, us_per_step=us,
                rel_error=1e-3 if us else None, T=T, detail="", **dict(ENV, commit=commit))


def sweep_rows(shape, fast, slow, layer_configs, kernels=(3.0, 9.0), cudnn=(12.0, 5.0, 30.0)):
    """tune.csv rows of one shape: fast/slow candidates, a failed one, layer timings."""
    label = tuning.config_label
    rows = [csv_row(kernel, shape, label(c), us=us) for kernel in ("forward", "backward")
            for c, us in ((slow, 4.0), (fast, 2.0))]
    rows += [csv_row("forward", shape, label(config(block_h=4)), status="wrong"),
             csv_row("backward", shape, label(config(block_h=32)), status="error")]
    rows += [csv_row("kernels_fwd", shape, layer_configs, us=kernels[0]),
             csv_row("kernels_train", shape, layer_configs, us=kernels[1]),
             csv_row("cudnn_fwd", shape, "-", us=cudnn[0]),
             csv_row("cudnn_graph_fwd", shape, "-", us=cudnn[1]),
             csv_row("cudnn_train", shape, "-", us=cudnn[2], commit="def5678")]
    return rows


def test_best_configs_and_the_table_with_provenance():
    shape, fast, slow = tune.Shape("bf16", 8, 512), config(block_h=8), config(block_h=16)
    both = f"{tuning.config_label(fast)}+{tuning.config_label(fast)}"
    rows = sweep_rows(shape, fast, slow, both)
    # A layer timing with configs that are no longer the best is stale: not in the table.
    rows.append(csv_row("kernels_fwd", shape, "old+old", us=1.0))
    assert tune.best_configs(rows, shape) == {"forward": (fast, 2.0), "backward": (fast, 2.0)}
    t = tune.build_table(rows, tune.provenance(rows, ENV, 64, 256))
    e = t["shapes"]["bf16/B8/H512/D1/P0"]
    assert tuning.config_from_entry(e["forward"]) == fast and e["backward"]["us_per_step"] == 2.0
    assert e["kernels_us"] == {"fwd": 3.0, "train": 9.0}
    assert e["cudnn_us"] == {"fwd": 12.0, "fwd_graph": 5.0, "train": 30.0}
    p = t["provenance"]
    for name in ("gpu", "commit", "torch", "triton", "cuda", "cudnn", "date"):
        assert p[name] == ENV[name]
    assert p["commits"] == ["abc1234", "def5678"] and p["rows"] == len(rows)
    assert p["steps"] == 64 and p["layer_steps"] == 256
    assert p["grid"] == dict(dtypes=["bf16"], batches=[8], hidden=[512], directions=[1], proj=[0],
                             shapes=1)
    # On a GPU the sweep names its chip, which a same-chip GPU borrows the decisions by.
    assert tuning.table_arch(t) is None
    on_gpu = tune.build_table(rows, tune.provenance(rows, ENV, 64, 256, (9, 0, 132)))
    assert on_gpu["provenance"]["compute_capability"] == "9.0"
    assert tuning.table_arch(on_gpu) == (9, 0, 132)
    # The table feeds the lookup and the policy as it is.
    tuning.set_table(GPU, json.loads(json.dumps(t)))
    assert tuning.table_config(GPU, "forward", torch.bfloat16, 8, 512, 1, False, 132) == fast
    assert tuning.bucket_decisions(GPU, "bf16", 512, 1, False) == ((8, True, True),)


def test_the_table_takes_layer_timings_at_its_layer_T_only():
    shape, fast, slow = tune.Shape("bf16", 8, 512), config(block_h=8), config(block_h=16)
    both = f"{tuning.config_label(fast)}+{tuning.config_label(fast)}"
    at_64 = sweep_rows(shape, fast, slow, both)
    for row in at_64:   # an older sweep: layer timings at 64 steps, keys without T
        if row["kind"] in tune.LAYER_KINDS:
            row.update(T=64, key=tune.row_key(row["kind"], shape, row["config"]))
    at_256 = [csv_row(kind, shape, "-" if kind.startswith("cudnn") else both, us=us)
              for kind, us in (("kernels_fwd", 7.0), ("kernels_train", 20.0), ("cudnn_fwd", 6.0),
                               ("cudnn_graph_fwd", 5.5), ("cudnn_train", 25.0))]
    assert tune.layer_steps_of(at_64) == 64 and tune.layer_steps_of(at_64 + at_256) == 256
    assert tune.layer_steps_of([r for r in at_64 if r["kind"] in tune.KERNELS]) == tune.LAYER_STEPS
    for rows, layer_steps, kernels_fwd, cudnn_train in (
            (at_64 + at_256, 256, 7.0, 25.0), (at_256 + at_64, 64, 3.0, 30.0),
            (at_256 + at_64, None, 3.0, 30.0),    # no provenance: the newest layer row's T
            (at_64 + at_256, None, 7.0, 25.0)):
        prov = tune.provenance(rows, ENV, 64, layer_steps) if layer_steps else {}
        e = tune.build_table(rows, prov)["shapes"]["bf16/B8/H512/D1/P0"]
        assert e["kernels_us"]["fwd"] == kernels_fwd and e["cudnn_us"]["train"] == cudnn_train
        assert tuning.config_from_entry(e["forward"]) == fast   # candidates: whatever T
    # A shape a sweep at 256 steps has not reached: its 64-step timings, named as such, so
    # that auto keeps their decision rather than running the kernels unmeasured.
    table = tune.build_table(at_64, tune.provenance(at_64, ENV, 64, 256))
    e = table["shapes"]["bf16/B8/H512/D1/P0"]
    assert e["kernels_us"] == {"fwd": 3.0, "train": 9.0} and e["layer_steps"] == 64
    assert e["cudnn_us"]["train"] == 30.0 and e["backward"]["us_per_step"] == 2.0
    assert "layer_steps" not in tune.build_table(at_64 + at_256, {})["shapes"][
        "bf16/B8/H512/D1/P0"]
    # A sweep cut between a shape's cuDNN and its kernels at 256 steps: still the 64-step
    # pair, not cuDNN's 256 alone (auto would run the kernels unmeasured).
    cudnn_only = [r for r in at_256 if r["kind"].startswith("cudnn")]
    e = tune.build_table(at_64 + cudnn_only, tune.provenance(at_64, ENV, 64, 256))["shapes"][
        "bf16/B8/H512/D1/P0"]
    assert e["kernels_us"] == {"fwd": 3.0, "train": 9.0} and e["layer_steps"] == 64
    assert e["cudnn_us"]["train"] == 30.0


@requires_interpreter
def test_sweep_records_every_measurement_and_resumes(tmp_path, monkeypatch):
    timings = {"kernels_fwd": 2.0, "kernels_train": 6.0, "cudnn_fwd": 10.0, "cudnn_graph_fwd": 5.0,
               "cudnn_train": 30.0}

    def fake_layer_runs(shape, best, steps, device):
        text = tune.layer_config_text(best)
        return {kind: ("-" if kind.startswith("cudnn") else text, {},
                       lambda kind=kind: (kind, steps)) for kind in timings}

    monkeypatch.setattr(tune, "layer_runs", fake_layer_runs)
    monkeypatch.setattr(autotune, "time_ms", lambda run: timings[run[0]] * run[1] / 1e3)
    monkeypatch.setattr(autotune.Problem, "time_us", lambda self, kernel, c: 1.0 * c.block_h)
    broken = config(block_h=3)
    candidates = autotune.candidate_configs
    monkeypatch.setattr(autotune, "candidate_configs", lambda *a: candidates(*a) + [broken])
    grid = [tune.Shape("fp32", 2, 16), tune.Shape("fp32", 2, 16, 2, 8)]
    csv_path, json_path = tmp_path / "tune.csv", tmp_path / "cpu.json"
    lines = []
    sweep = tune.Sweep(csv_path, ENV, 4, 600, device="cpu", log=lines.append)
    assert sweep.run(grid, "sweep", json_path)
    rows = tune.read_rows(csv_path)
    assert [r["key"] for r in rows] == [r["key"] for r in sweep.rows]
    assert len({r["key"] for r in rows}) == len(rows)
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == tune.FIELDS
    for shape in grid:
        mine = [r for r in rows if tune.shape_of(r) == shape]
        failed = [r for r in mine if r["config"] == tuning.config_label(broken)]
        assert {r["kind"] for r in failed} == {"forward", "backward"}
        assert all(r["status"] == "error" and r["us_per_step"] is None and r["detail"] for r in failed)
        assert {r["kind"] for r in mine} == set(tune.KERNELS) | set(tune.LAYER_KINDS)
        assert {r["T"] for r in mine if r["kind"] in tune.KERNELS} == {4}
        assert {r["T"] for r in mine if r["kind"] in tune.LAYER_KINDS} == {tune.LAYER_STEPS}
    table = json.loads(json_path.read_text())
    assert table["provenance"]["steps"] == 4
    assert table["provenance"]["layer_steps"] == tune.LAYER_STEPS
    e = table["shapes"]["fp32/B2/H16/D2/P8"]
    assert e["kernels_us"] == {"fwd": 2.0, "train": 6.0} and e["cudnn_us"]["fwd_graph"] == 5.0
    assert tuning.config_from_entry(e["forward"]).block_h != 3
    assert any("error" in line for line in lines) and "[sweep 2/2]" in lines[-1]
    # A second run measures nothing, a run out of budget stops before measuring anything.
    monkeypatch.setattr(autotune, "measure", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(autotune, "time_ms", lambda fn: pytest.fail("timed again"))
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu", log=lines.append).run(grid, "sweep", json_path)
    assert [r["key"] for r in tune.read_rows(csv_path)] == [r["key"] for r in rows]
    # --retry-errors measures again what raised, and only that.
    again = []
    monkeypatch.setattr(autotune, "measure", lambda problem, kernel, c: again.append(c) or
                        autotune.Measurement(c, "error", detail="raised again"))
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu", retry_errors=True).run(grid, "sweep",
                                                                                  json_path)
    assert again == [broken] * 4
    assert not tune.Sweep(tmp_path / "new.csv", ENV, 4, -1, device="cpu").run(grid, "sweep", json_path)
    assert not (tmp_path / "new.csv").exists()


def fake_layer_timings(monkeypatch, per_call_ms: dict) -> list:
    """make tune's timings faked: each layer run named as tune.layer_runs names it and taking
    per_call_ms[kind] a call, each candidate block_h µs a step; returns the list the layer
    kinds are appended to as they are timed."""
    timed = []
    real_layer_runs = tune.layer_runs

    def fake_layer_runs(shape, best, steps, device):
        return {kind: (text, {}, lambda kind=kind: kind)
                for kind, (text, _, _) in real_layer_runs(shape, best, steps, "cpu").items()}

    def fake_time_ms(kind):
        timed.append(kind)
        return per_call_ms[kind]

    monkeypatch.setattr(tune, "layer_runs", fake_layer_runs)
    monkeypatch.setattr(autotune, "time_ms", fake_time_ms)
    monkeypatch.setattr(autotune, "measure", lambda problem, kernel, c: autotune.Measurement(
        c, "ok", 1e-4, 1.0 * c.block_h))
    return timed


def test_a_sweep_at_another_layer_T_times_the_layers_again_and_not_the_candidates(tmp_path,
                                                                                   monkeypatch):
    per_call_ms = {"kernels_fwd": 2.56, "kernels_train": 7.68, "cudnn_fwd": 5.12,
                   "cudnn_graph_fwd": 3.84, "cudnn_train": 10.24}   # the same per call at any T
    timed = fake_layer_timings(monkeypatch, per_call_ms)
    grid = [tune.Shape("fp32", 2, 16)]
    csv_path, json_path = tmp_path / "tune.csv", tmp_path / "cpu.json"
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu", layer_steps=64).run(grid, "sweep",
                                                                              json_path)
    first = tune.read_rows(csv_path)
    candidates = [r for r in first if r["kind"] in tune.KERNELS]
    assert candidates and set(timed) == set(tune.LAYER_KINDS)
    assert json.loads(json_path.read_text())["shapes"]["fp32/B2/H16/D1/P0"]["kernels_us"] == \
        {"fwd": 40.0, "train": 120.0}
    # Resumed at make perf's T: every layer timing again, no candidate.
    timed.clear()
    monkeypatch.setattr(autotune, "measure", lambda *a: pytest.fail("candidate measured again"))
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu", layer_steps=256).run(grid, "sweep",
                                                                               json_path)
    rows = tune.read_rows(csv_path)
    assert rows[:len(first)] == first                          # the 64-step rows stay
    new = rows[len(first):]
    assert sorted(timed) == sorted(tune.LAYER_KINDS)
    assert sorted(r["kind"] for r in new) == sorted(tune.LAYER_KINDS)
    assert all(r["T"] == 256 and r["key"].endswith("|T256") for r in new)
    table = json.loads(json_path.read_text())
    assert table["provenance"]["steps"] == 4 and table["provenance"]["layer_steps"] == 256
    assert table["shapes"]["fp32/B2/H16/D1/P0"]["kernels_us"] == {"fwd": 10.0, "train": 30.0}
    # And once more at 256: nothing left to time.
    monkeypatch.setattr(autotune, "time_ms", lambda kind: pytest.fail("timed again"))
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu").run(grid, "sweep", json_path)
    assert len(tune.read_rows(csv_path)) == len(rows)


def test_retiming_drops_the_matching_rows_at_the_grids_shapes_and_the_sweep_times_them_again(
        tmp_path, monkeypatch):
    per_call_ms = {kind: 1.0 for kind in tune.LAYER_KINDS}
    timed = fake_layer_timings(monkeypatch, per_call_ms)
    grid = [tune.Shape("fp32", 2, 16), tune.Shape("fp32", 2, 32)]
    csv_path, json_path = tmp_path / "tune.csv", tmp_path / "cpu.json"
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu").run(grid, "sweep", json_path)
    rows = tune.read_rows(csv_path)
    best = tune.best_configs(rows, grid[0])
    label = tuning.config_label(best["forward"][0])      # the forward the layers ran with
    kept, dropped = tune.split_for_retiming(rows, grid[:1], "^" + re.escape(label) + "$")
    assert kept + dropped and sorted(map(str, kept + dropped)) == sorted(map(str, rows))
    assert {tune.shape_of(r) for r in dropped} == {grid[0]}        # the other shape keeps its
    again = [r for r in rows if r["kind"] in tune.KERNELS and r["config"] == label
             and tune.shape_of(r) == grid[0]]
    assert again and [r for r in dropped if r["kind"] in tune.KERNELS] == again
    # the layers that ran it: the kernels' and nn.LSTM's timed beside them
    assert {r["kind"] for r in dropped if r["kind"] not in tune.KERNELS} == set(tune.LAYER_KINDS)
    tune.write_rows(csv_path, kept)
    assert tune.read_rows(csv_path) == kept
    measured = []
    monkeypatch.setattr(autotune, "measure", lambda problem, kernel, c: measured.append(
        (kernel, tuning.config_label(c))) or autotune.Measurement(c, "ok", 1e-4, 1.0 * c.block_h))
    timed.clear()
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu").run(grid, "sweep", json_path)
    assert measured == [(r["kind"], label) for r in again]
    assert sorted(timed) == sorted(tune.LAYER_KINDS)


def test_the_plan_counts_what_tune_csv_does_not_hold_yet(tmp_path, monkeypatch):
    timed = fake_layer_timings(monkeypatch, {kind: 1.0 for kind in tune.LAYER_KINDS})
    grid = [tune.Shape("fp32", 2, 16), tune.Shape("fp32", 2, 32)]
    fresh = tune.estimate(grid, num_sms=4)
    assert fresh["layers"] == len(grid) and fresh["candidates"] > 0
    csv_path = tmp_path / "tune.csv"
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu").run(grid, "sweep", tmp_path / "t.json")
    assert timed
    keys = frozenset(row["key"] for row in tune.read_rows(csv_path))
    done = tune.estimate(grid, num_sms=4, measured=keys)
    assert (done["candidates"], done["compiles"], done["layers"]) == (0, 0, 0)
    assert done["seconds"] == tune.START_S
    # one candidate of the first shape gone: it and that shape's layers again
    one = next(k for k in sorted(keys) if k.startswith("forward|fp32/B2/H16/"))
    again = tune.estimate(grid, num_sms=4, measured=keys - {one})
    assert (again["candidates"], again["layers"]) == (1, 1)


def test_a_csv_of_another_format_is_refused(tmp_path):
    path = tmp_path / "tune.csv"
    path.write_text("kind,dtype\nforward,bf16\n")
    with pytest.raises(SystemExit, match="--fresh"):
        tune.read_rows(path)


def test_heatmaps_from_a_synthetic_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = []
    for dtype in ("bf16", "fp32"):
        for B in (8, 64):
            for H in (256, 512):
                for shape in (tune.Shape(dtype, B, H), tune.Shape(dtype, B, H, 2)):
                    fast = config(block_h=8)
                    both = f"{tuning.config_label(fast)}+{tuning.config_label(fast)}"
                    rows += sweep_rows(shape, fast, config(block_h=16), both,
                                       kernels=(B / 8, B / 2), cudnn=(6.0, 5.0, 30.0 / H * 256))
    path = tmp_path / "nvidia-h200" / "tune.csv"
    for row in rows:
        tune.append_row(path, row)
    assert tune.main(["--plot-only", "--csv", str(path)]) == 0
    pngs = sorted(p.name for p in path.parent.glob("heatmap_*.png"))
    assert pngs == ["heatmap_bf16.png", "heatmap_fp32.png"]
    for name in pngs:
        data = (path.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert "heatmap_bf16.png" in capsys.readouterr().out
    assert not math.isnan(tune.build_table(tune.read_rows(path), {})["shapes"]["bf16/B64/H512/D2/P0"]
                          ["kernels_us"]["train"])


def test_explain_says_recompute_keeps_the_kernels(fake_gpu):
    """Where the table would pick nn.LSTM, recompute= still runs (and explains) the kernels."""
    tuning.set_table(GPU, POLICY_TABLE)
    x = torch.randn(4, 600, 16, dtype=torch.bfloat16)
    assert triton_lstm.explain(auto_module(), x).path == "nn.LSTM"
    e = triton_lstm.explain(auto_module(recompute=4), x)
    assert e.path == "kernels" and "recompute=4" in e.why


def test_the_shipped_tables_parse_and_name_their_provenance():
    paths = sorted(pathlib.Path(triton_lstm.__file__).parent.joinpath("configs").glob("*.json"))
    assert paths, "no tuned table ships"
    for path in paths:
        table = json.loads(path.read_text())
        provenance = table["provenance"]
        assert gpu_slug(provenance["gpu"]) == path.stem
        assert provenance["commits"] and provenance["torch"] and provenance["triton"]
        # The chip, by which a GPU without a table of its own borrows this one's decisions.
        assert tuning.table_arch(table) is not None
        assert table["shapes"]
        for key, entry in table["shapes"].items():
            assert key == tuning.shape_key(entry["dtype"], entry["B"], entry["H"], entry["D"],
                                           entry["proj"])
            for kernel in tuning.KERNELS:
                if kernel in entry:
                    assert isinstance(tuning.config_from_entry(entry[kernel]), KernelConfig)
                    assert entry[kernel]["us_per_step"] > 0
            for times in (entry.get("kernels_us", {}), entry.get("cudnn_us", {})):
                assert all(us > 0 for us in times.values())


def test_host_cdiv_and_next_power_of_2_agree_with_tritons():
    for n in range(1, 5000):
        assert dispatch.next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 128):
            assert dispatch.cdiv(n, d) == triton.cdiv(n, d)


def test_a_layer_whose_kernels_are_timed_again_has_nn_lstm_timed_again_beside_them(tmp_path,
                                                                                    monkeypatch):
    # The table compares the two from one run: a kernels timing never meets an older nn.LSTM one.
    shape = tune.Shape("fp32", 2, 16)
    best = {kernel: (config(), 1.0) for kernel in tune.KERNELS}
    runs = tune.layer_runs(shape, best, 4, "cpu")
    assert {text for text, _, _ in runs.values()} == {tune.layer_config_text(best)}
    per_call_ms = {"kernels_fwd": 2.0, "kernels_train": 6.0, "cudnn_fwd": 10.0,
                   "cudnn_graph_fwd": 5.0, "cudnn_train": 30.0}
    timed = fake_layer_timings(monkeypatch, per_call_ms)
    csv_path, json_path = tmp_path / "tune.csv", tmp_path / "cpu.json"
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu", layer_steps=4).run([shape], "sweep",
                                                                             json_path)
    # (the heuristic's configs first, then the sweep's best: each timed with nn.LSTM beside it)
    assert all(timed.count(kind) == timed.count("kernels_train") >= 1 for kind in tune.LAYER_KINDS)
    # A faster candidate (a new best config): both peers are timed again, and paired.
    timed.clear()
    per_call_ms.update(kernels_train=4.0, cudnn_train=20.0)
    monkeypatch.setattr(autotune, "measure", lambda problem, kernel, c: autotune.Measurement(
        c, "ok", 1e-4, 0.5 if c.block_h == 2 else 1.0 * c.block_h))
    candidates = autotune.candidate_configs
    monkeypatch.setattr(autotune, "candidate_configs",
                        lambda *a: candidates(*a) + [config(block_h=2)])
    assert tune.Sweep(csv_path, ENV, 4, 600, device="cpu", layer_steps=4).run([shape], "sweep",
                                                                             json_path)
    assert sorted(timed) == sorted(tune.LAYER_KINDS)
    entry = json.loads(json_path.read_text())["shapes"]["fp32/B2/H16/D1/P0"]
    assert entry["kernels_us"]["train"] == 1000.0 and entry["cudnn_us"]["train"] == 5000.0
    # Rows from before the pairing ("-") still count, and are not timed again, where no paired
    # row replaces them: beside kernels timings that need no new run.
    rows = [dict(r, config="-", key=tune.row_key(r["kind"], shape, "-", r["T"]))
            if r["kind"].startswith("cudnn") else r for r in tune.read_rows(csv_path)]
    table = tune.build_table(rows, dict(layer_steps=4))
    assert table["shapes"]["fp32/B2/H16/D1/P0"]["cudnn_us"]["train"] == 5000.0
    legacy = tmp_path / "legacy.csv"
    for row in rows:
        tune.append_row(legacy, row)
    timed.clear()
    assert tune.Sweep(legacy, ENV, 4, 600, device="cpu", layer_steps=4).run([shape], "sweep",
                                                                           json_path)
    assert timed == []
