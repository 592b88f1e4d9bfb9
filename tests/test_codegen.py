"""What the compiler makes of the persistent kernels for sm_90 (H100/H200), checked on a CPU.

perf/sm90_report.py compiles each kernel with Triton's NVIDIA backend and assembles it
with ptxas; no GPU is involved. Two properties the kernels' speed rests on:
- every load of state other programs write (h_{t-1} in the forward, dG_{t+1} in the
  backward) is vectorised, 16 bytes per instruction: read one element at a time, a step
  issues 8x the load instructions and holds every element in its own register;
- the dispatcher's default tiles do not spill.
It also checks how the programs of each kernel wait for each other (barrier.py): the
cluster barrier's configs have no atomics left, dataflow's and the stepped fallback's
(a launch per step) neither barrier, and the dsmem
kernels exchange h (or shares of dh) with st.async (dsmem.py); having no global loads of
that state, they are not checked for its vectorised loads. The layer's fp32 GEMM kernel
(kernels/gemm.py) must multiply with tf32 wgmma, without spills.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

REPO_DIR = pathlib.Path(__file__).resolve().parents[1]
VECTOR_BYTES = 16

# (arguments of sm90_report.py, whether the tiles must not spill: the dispatcher's defaults,
# and the large tiles autotune.runs_well admits on this evidence)
CASES = {
    "defaults": (["--shapes", "8x256", "8x1024", "64x512", "128x1024", "512x256", "512x1024",
                  "--dtypes", "bf16", "fp32"], True),
    "bidirectional-projection": (["--shapes", "8x512", "128x1024", "--dtypes", "fp16",
                                  "--directions", "2", "--proj", "256"], True),
    "restarts-recompute": (["--shapes", "8x512", "--dtypes", "bf16", "--restarts",
                            "--ckpt", "16"], True),
    # The forward's launch from a later step (the forward in chunks of steps, overlap.py).
    "resumed": (["--shapes", "8x512", "64x512", "128x1024", "512x1024", "--dtypes", "bf16",
                 "fp32", "--kernels", "forward", "--resumed"], True),
    "resumed-projection-restarts": (["--shapes", "8x512", "128x1024", "--dtypes", "fp16",
                                     "--kernels", "forward", "--resumed", "--proj", "256",
                                     "--restarts"], True),
    # A launch per step (the fallback), from step 0 and from a later one.
    "stepped": (["--shapes", "8x512", "128x1024", "512x1024", "--dtypes", "bf16", "fp32",
                 "--kernels", "forward", "--stepped"], True),
    "stepped-resumed": (["--shapes", "8x512", "128x1024", "512x1024", "--dtypes", "bf16", "fp32",
                         "--kernels", "forward", "--stepped", "--resumed"], True),
    "dataflow": (["--shapes", "8x512", "--dtypes", "bf16",
                  "--config", "bb16-bh8-res-bk64-sk4-w4-df"], False),
    # Groups of 16 hidden blocks as one cluster, at the hardware cluster barrier.
    "cluster": (["--shapes", "8x256", "--dtypes", "fp16", "fp32",
                 "--config", "bb16-bh16-res-bk64-sk1-w4-cl"], True),
    "cluster-wide": (["--shapes", "8x512", "--dtypes", "fp16", "bf16",
                      "--config", "bb16-bh32-res-bk64-sk1-w4-cl"], True),
    # h pushed into every program's shared memory, and the backward's shares of dh
    # (kernels/dsmem.py).
    "dsmem": (["--shapes", "8x256", "--dtypes", "fp16", "fp32",
               "--config", "bb16-bh16-res-bk64-sk1-w4-cl-ds"], True),
    # No spill under Triton 3.6 (the GPU machines'); the forward spills 180 bytes under 3.9.
    "dsmem-wide": (["--shapes", "8x512", "--dtypes", "bf16",
                    "--config", "bb16-bh32-res-bk64-sk1-w4-cl-ds"], False),
    "chunked": (["--shapes", "128x1024", "--dtypes", "bf16", "--kernels", "forward",
                 "--config", "bb64-bh16-chk-bk64-sk1-w4"], False),
    "pipelined": (["--shapes", "512x1024", "--dtypes", "bf16",
                   "--config", "bb128-bh16-str-bk64-sk4-w16-st3"], False),
    "wide-streamed-forward": (["--shapes", "512x1024", "--dtypes", "bf16", "--kernels", "forward",
                               "--config", "bb128-bh32-str-bk64-sk4-w16"], True),
    "square-streamed-backward": (["--shapes", "512x1024", "--dtypes", "bf16", "fp32",
                                  "--kernels", "backward",
                                  "--config", "bb64-bh32-str-bk64-sk4-w16"], True),
    # The backward's square tiles (autotune.square_backward_tiles), unpipelined and pipelined
    # (fp16 pipelined spills 8 bytes under Triton 3.6: perf/NOTES.md).
    "square-backward-64x64": (["--shapes", "512x1024", "--dtypes", "bf16", "fp16",
                               "--kernels", "backward",
                               "--config", "bb64-bh64-str-bk64-sk4-w16"], True),
    "square-backward-64x64-pipelined": (["--shapes", "512x1024", "--dtypes", "bf16",
                                         "--kernels", "backward",
                                         "--config", "bb64-bh64-str-bk64-sk4-w16-st3"], True),
    # make tune's 64-row streamed tiles at B = 64-128 (autotune.wgmma_tiles).
    "wgmma-tiles-forward": (["--shapes", "64x1024", "128x256", "--dtypes", "bf16", "fp32",
                             "--kernels", "forward",
                             "--config", "bb64-bh16-str-bk64-sk4-w8-st3"], True),
    "wgmma-tiles-backward": (["--shapes", "64x1024", "128x256", "--dtypes", "bf16", "fp32",
                              "--kernels", "backward",
                              "--config", "bb64-bh16-str-bk64-sk4-w8"], True),
    # make tune's pipelined tiles with chunks of 128 of the reduction (autotune.longer_chunks).
    "wgmma-longer-chunks-forward": (["--shapes", "64x1024", "128x512", "--dtypes", "bf16",
                                     "fp16", "--kernels", "forward",
                                     "--config", "bb64-bh16-str-bk128-sk4-w8-st3"], True),
    "wgmma-longer-chunks-backward": (["--shapes", "512x1024", "64x1024", "--dtypes", "bf16",
                                      "fp32", "--kernels", "backward",
                                      "--config", "bb64-bh32-str-bk128-sk4-w16-st3"], True),
    # No spill under Triton 3.6 (the GPU machines'); bf16 spills 12 bytes under 3.9.
    "wgmma-longer-chunks-square-backward": (["--shapes", "512x1024", "--dtypes", "bf16", "fp16",
                                             "--kernels", "backward",
                                             "--config", "bb64-bh64-str-bk128-sk4-w16-st3"],
                                            False),
    # make tune's pipelined tiles with 5 stages at H >= 1024 (autotune.deeper_pipeline).
    "wgmma-five-stages-forward": (["--shapes", "128x1024", "512x1024", "--dtypes", "bf16",
                                   "fp16", "--kernels", "forward",
                                   "--config", "bb64-bh32-str-bk64-sk4-w8-st5"], True),
    "wgmma-five-stages-backward": (["--shapes", "512x1024", "64x1024", "--dtypes", "bf16",
                                    "--kernels", "backward",
                                    "--config", "bb64-bh64-str-bk64-sk4-w16-st5"], True),
    # No spill under Triton 3.6 (the GPU machines'); 84 bytes under 3.9.
    "wgmma-five-stages-gate-split": (["--shapes", "512x1024", "--dtypes", "bf16", "--kernels",
                                      "backward",
                                      "--config", "bb64-bh32-str-bk64-sk4-w16-st5-gs"], False),
    # The backward's dh as a GEMM phase split by gate (make tune's gate_split candidates).
    "gate-split": (["--shapes", "512x1024", "--dtypes", "bf16", "fp32", "--kernels", "backward",
                    "--config", "bb128-bh16-str-bk64-sk4-w16-st3-gs"], True),
    # Stacked layers as one wavefront: h (dG) of its own layer and of the layer below (above).
    "wavefront": (["--kernels", "wavefront", "wavefront-backward", "--layers", "3", "--shapes",
                   "1x256", "8x512", "8x1024", "64x512", "128x1024", "--dtypes", "bf16",
                   "fp32"], True),
    "wavefront-dropout": (["--kernels", "wavefront", "wavefront-backward", "--layers", "3",
                           "--dropout", "--shapes", "8x512", "128x1024", "--dtypes", "bf16"],
                          True),
    "wavefront-dataflow": (["--kernels", "wavefront", "wavefront-backward", "--shapes", "8x512",
                            "--dtypes", "bf16", "--config", "bb16-bh8-res-bk64-sk1-w4-df"],
                           False),
    # fp64 compiles with fp64 accumulators in every kernel (Triton 3.6's dot took fp32 unless
    # told); its streamed tiles spill, which fp64 is not tuned against.
    "fp64": (["--shapes", "8x256", "128x1024", "512x1024", "--dtypes", "fp64"], False),
    "fp64-wavefront": (["--kernels", "wavefront", "wavefront-backward", "--shapes", "8x512",
                        "128x1024", "--dtypes", "fp64"], False),
    "fp64-step": (["--step", "--shapes", "8x256", "512x1024", "--dtypes", "fp64"], False),
}


def compile_report(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "perf/sm90_report.py", "--json", *args],
                            cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("case", list(CASES))
def test_sm90_state_loads_are_vectorised(case):
    args, defaults = CASES[case]
    rows = compile_report(args)
    assert rows, "no kernel was compiled"
    for row in rows:
        where = {k: row[k] for k in ("kernel", "dtype", "B", "H", "D", "proj", "tile", "triton")}
        assert row["ptxas_ok"], where
        if expected_barrier(args) != "dsmem":
            assert row["state_load"] == vector_bytes(row), where | {"state_load": row["state_load"]}
        if defaults:
            assert row["spill"] == 0, where | {"spill": row["spill"]}
        assert row["barrier"] == expected_barrier(args), where | {"barrier": row["barrier"]}
        assert row["stamps"] == 0, where        # no clock reads unless asked (timeline.py)
        if row["barrier"] == "none" and "--stepped" not in args and "--step" not in args \
                and row["dtype"] in ("bf16", "fp16"):
            # dataflow polls check 16-bit marks a pair at a time (barrier.marks)
            assert row["pair_checks"] > 0, where
        if case.startswith("wgmma-"):
            # what these candidates are for: resident and 32-row tiles run mma.sync
            assert row["mma"] == "wgmma", where | {"mma": row["mma"]}


def vector_bytes(row) -> int:
    """A vectorised load's bytes: 16, or fewer where a thread holds fewer bytes of the tile
    read: the backward's gate split reads its fp32 partial sums of dh as [BLOCK_B, BLOCK_H]
    tiles, one a gate (64x16 at 16 warps: 2 elements, 8 bytes a thread)."""
    if not row.get("gate_split"):
        return VECTOR_BYTES
    block_b, block_h = (int(n) for n in row["tile"].split("x"))
    return min(VECTOR_BYTES, block_b * block_h * 4 // (32 * row["warps"]))


def expected_barrier(args) -> str:
    if "--stepped" in args or "--step" in args:
        return "none"       # the launch boundary is the barrier
    label = args[args.index("--config") + 1] if "--config" in args else ""
    if label.endswith("-ds"):
        return "dsmem"
    return "cluster" if label.endswith("-cl") else ("none" if "-df" in label else "counter")


def test_sm90_kernels_read_the_clock_at_each_event_of_a_step_when_asked():
    """kernels/timeline.py: with stamps a recurrence reads the global clock as a step begins
    and after its part is stored, and where it waits on the data (the registers kernels'
    polls, the exchange's wait) when that wait ends; without spilling where it did not before
    (the tl tiles, the registers kernels, the ring)."""
    rows = compile_report(["--kernels", "forward", "backward", "registers", "registers-backward",
                           "--shapes", "8x256", "--dtypes", "fp16", "--stamps"])
    rows += compile_report(["--shapes", "8x256", "--dtypes", "fp16", "--stamps", "--config",
                            "bb16-bh16-res-bk64-sk1-w4-cl-ds"])
    rows += compile_report(["--kernels", "ring", "--shapes", "128x1024", "--dtypes", "bf16",
                            "--stamps"])
    rows += compile_report(["--kernels", "registers-exchange", "--shapes", "8x256", "--dtypes",
                            "bf16", "--stamps"])
    assert [(row["kernel"], row["barrier"]) for row in rows] == [
        ("forward", "counter"), ("backward", "counter"), ("registers", "none"),
        ("registers-backward", "none"), ("forward", "dsmem"), ("backward", "dsmem"),
        ("ring", "counter"), ("registers-exchange", "dsmem")]
    for row in rows:
        where = {k: row[k] for k in ("kernel", "barrier", "regs", "spill", "triton")}
        assert row["ptxas_ok"] and row["spill"] == 0, where
        assert row["stamps"] == (2 if row["barrier"] == "counter" else 3), where


def test_sm90_layer_gemms_are_tf32_wgmma_without_spills():
    # kernels/gemm.py in the layouts an fp32 layer's GEMMs take (ops.layer_matmul).
    rows = compile_report(["--gemm", "--dtypes", "fp32"])
    assert sorted(row["kernel"] for row in rows) == ["gemm-nn", "gemm-nt", "gemm-tn"]
    for row in rows:
        where = {k: row[k] for k in ("kernel", "regs", "spill", "mma", "dot", "triton")}
        assert row["ptxas_ok"] and row["spill"] == 0, where
        assert row["mma"] == "wgmma" and row["dot"] == "tf32", where


def test_sm90_registers_forward_keeps_its_steps_out_of_shared_memory():
    """kernels/forward_registers.py's premise: weights in registers, h loaded straight into the
    MMA's operand registers 16 bytes at a time, the gates split by a shuffle; no shared
    memory, no barrier between warps, no atomics (dataflow waits). ptxas spills 52 bytes at
    bf16 H = 512 and 32 at fp32 H = 256 (scalars reloaded once a step: perf/NOTES.md)."""
    rows = compile_report(["--kernels", "registers", "--shapes", "8x256", "8x512", "3x200",
                           "--dtypes", "bf16", "fp16", "--directions", "2"])
    rows += compile_report(["--kernels", "registers", "--shapes", "8x256", "3x200", "--dtypes",
                            "fp32"])                       # tf32 MMAs
    rows += compile_report(["--kernels", "registers", "--shapes", "8x512", "--dtypes", "bf16",
                            "--poll-backoff", "200"])      # a pause between polls
    assert len(rows) == 9
    for row in rows:
        where = {k: row[k] for k in ("dtype", "B", "H", "regs", "spill", "triton")}
        assert row["ptxas_ok"], where
        assert row["shared"] == 0 and row["bar_sync"] == 0, where | {"shared": row["shared"]}
        assert row["mma"] == "mma.sync" and row["barrier"] == "none", where
        assert row["state_load"] == VECTOR_BYTES, where | {"state_load": row["state_load"]}


def assert_fours_push_half_as_often(fours, rows):
    """A registers kernel pushing 16-bit state in fours of units (PUSH_BYTES 8): half the
    st.async of the same kernel pushing pairs (its fp16 row at the same H in `rows`), 8
    bytes each."""
    for row in fours:
        pairs = [r for r in rows if (r["dtype"], r["H"]) == ("fp16", row["H"])]
        assert len(pairs) == 1 and pairs[0]["push_bytes"] == [4], pairs
        assert 2 * row["pushes"] == pairs[0]["pushes"] and row["push_bytes"] == [8], row


def test_sm90_registers_forward_pushing_h_reads_it_from_shared_memory_only():
    """The registers forward with h pushed through its cluster (forward_registers.py,
    EXCHANGE): programs of 1-8 warps; h read from the exchange slot straight into the MMA's
    operand registers, up to 16 bytes a load (the operand's k_width), never from L2
    (barrier "dsmem"); as many st.async as the launch counts on (a thread, one element of
    its tile: none pushed twice); no barrier between warps, a line of shared memory of its
    own (what declares the symbol the exchange's addresses start from); the launch
    parameters dispatch.launch_in_clusters rewrites. No spill where the kernel reading h
    from L2 has none or fewer. With 16-bit h in fours of units (forward_registers.PUSH_BYTES
    8), half the st.async, 8 bytes each."""
    rows = compile_report(["--kernels", "registers-exchange", "--shapes", "8x256", "8x512",
                           "3x64", "3x30", "3x100", "--dtypes", "bf16", "fp16", "--directions",
                           "2"])                                      # 3x100: 16 of 13 programs
    rows += compile_report(["--kernels", "registers-exchange", "--shapes", "8x256", "3x30",
                            "--dtypes", "fp32"])                      # tf32 MMAs
    pushing_fours = compile_report(["--kernels", "registers-exchange", "--shapes", "8x512",
                                    "3x30", "--dtypes", "fp16", "--push-bytes", "8"])
    assert_fours_push_half_as_often(pushing_fours, rows)
    rows += pushing_fours
    assert len(rows) == 14
    for row in rows:
        where = {k: row[k] for k in ("dtype", "H", "warps", "regs", "spill", "triton")}
        item = 4 if row["dtype"] == "fp32" else 2
        hp = triton.next_power_of_2(row["H"])
        assert row["ptxas_ok"], where
        assert row["warps"] == max(1, hp // 64), where
        assert row["barrier"] == "dsmem" and row["mma"] == "mma.sync", where
        assert row["pushes"] == row["launch_pushes"], where | {"pushes": row["pushes"]}
        assert row["shared_load_bytes"] == [min(VECTOR_BYTES, hp // 8 * item)], where
        assert row["shared"] == 128 and row["bar_sync"] == 0, where | {"shared": row["shared"]}
        assert row["launch_parameters"] == [row["warps"], 1, row["shared"]], where
        assert row["spill"] == 0 or (row["dtype"] == "fp32" and row["spill"] <= 16), where


def test_sm90_registers_backward_pushing_dg_reads_it_from_shared_memory_only():
    """The registers backward with dG pushed through its cluster (backward_registers.py,
    EXCHANGE): dG read from the exchange slot straight into the MMA's operand registers, 16
    bytes a load, never from L2 (barrier "dsmem"); as many st.async as the launch counts on;
    the partial sums of dh still meeting in shared memory (its one barrier a stage, and one
    where a slot is reused; two a chunk of the weights before the loop), the launch
    parameters dispatch.launch_in_clusters rewrites; no spill. Past H = 256 a program is 32
    units, two warps a gate side by side (8 warps). With 16-bit dG in fours of units
    (backward_registers.PUSH_BYTES 8), half the st.async, 8 bytes each."""
    rows = compile_report(["--kernels", "registers-backward-exchange", "--shapes", "8x256",
                           "3x100", "3x200", "--dtypes", "bf16", "fp16", "fp32", "--directions",
                           "2"])                                      # 3x200: 16 of 13 programs
    rows += compile_report(["--kernels", "registers-backward-exchange", "--shapes", "8x512",
                            "3x300", "--dtypes", "bf16", "fp16"])     # 3x300: 16 of 10
    pushing_fours = compile_report(["--kernels", "registers-backward-exchange", "--shapes",
                                    "8x512", "3x100", "--dtypes", "fp16", "--push-bytes", "8"])
    assert_fours_push_half_as_often(pushing_fours, rows)
    rows += pushing_fours
    assert len(rows) == 15
    for row in rows:
        where = {k: row[k] for k in ("dtype", "H", "warps", "regs", "spill", "triton")}
        assert row["ptxas_ok"] and row["spill"] == 0, where
        assert row["warps"] == (8 if row["H"] > 256 else 4), where
        assert row["tile"] == f"8x{4 * row['warps']}", where
        assert row["barrier"] == "dsmem" and row["mma"] == "mma.sync", where
        assert row["pushes"] == row["launch_pushes"], where | {"pushes": row["pushes"]}
        # 16-byte loads of dG, 4-byte ones of the partial sums
        assert row["shared_load_bytes"] == [4, VECTOR_BYTES], where
        assert row["bar_sync"] <= 2 + 2 * row["split_k"], where | {"bar_sync": row["bar_sync"]}
        assert row["launch_parameters"] == [row["warps"], 1, row["shared"]], where


def test_sm90_ring_forward_keeps_its_weights_in_shared_memory():
    """kernels/forward_ring.py's premise: the weight slice in shared memory for the whole
    sequence (the kernel's one large allocation beside a ring of [64, 64] chunks of h and the
    product's [64, 4 BLOCK_H] fp32), h copied in 16 bytes at a time (cp.async), wgmma, the
    counter barrier, no spill: at every tile make tune gives it (autotune.ring_tiles)."""
    rows = compile_report(["--kernels", "ring", "--shapes", "128x1024", "64x512", "128x256",
                           "--dtypes", "bf16", "fp16"])
    rows += compile_report(["--kernels", "ring", "--shapes", "64x1024", "128x512", "--dtypes",
                            "bf16", "--config", "bb64-bh8-str-bk64-sk4-w8-st5-rn"])
    rows += compile_report(["--kernels", "ring", "--shapes", "128x1024", "--dtypes", "fp16",
                            "--config", "bb64-bh16-str-bk64-sk4-w8-st7-rn"])   # the deepest
    assert len(rows) == 9
    for row in rows:
        where = {k: row[k] for k in ("dtype", "B", "H", "tile", "regs", "spill", "triton")}
        block_h = int(row["tile"].split("x")[1])
        hp = triton.next_power_of_2(row["H"])
        assert row["ptxas_ok"] and row["spill"] == 0, where
        ring_and_product = 5 * 64 * 64 * 2 + 64 * 4 * block_h * 4
        assert row["shared"] >= hp * 4 * block_h * 2 + ring_and_product, where | {
            "shared": row["shared"]}
        assert row["mma"] == "wgmma" and row["barrier"] == "counter", where
        assert row["state_load"] == VECTOR_BYTES, where | {"state_load": row["state_load"]}


def test_sm90_registers_operand_tiles_span_their_chunk_of_the_reduction():
    """The registers kernels' MMA operand tiles ([16, KC] weights, [KC, 8] of h or dG) in the
    layouts Triton gives them: no register or lane is a broadcast copy of another, at every
    padded size. An operand tile spans 8 k_width of the reduction; a chunk shorter than that
    is broadcast, and each product summed more than once (forward_registers.operand_width)."""
    rows = compile_report(["--kernels", "registers-operands", "--shapes", "8x1", "8x16", "8x20",
                           "8x50", "8x100", "8x200", "8x256", "8x512", "--dtypes", "bf16",
                           "fp32"])
    assert len(rows) == 16
    for row in rows:
        assert row["layouts"] == 2 and not row["broadcast"], row


def test_sm90_registers_backward_meets_in_shared_memory_once_a_step():
    """kernels/backward_registers.py's premise: each gate's weight slice in its warp's
    registers, dG loaded straight into the MMA's operand registers 16 bytes at a time, the
    partial sums of dh and the warps' poll flags the only shared memory of the steps (two
    slots each; before the loop the weights pass through shared memory a chunk at a time,
    two barriers a chunk), no atomics (dataflow waits). Past H = 512 (fp32 256) eight warps,
    two a gate. No spill."""
    rows = compile_report(["--kernels", "registers-backward", "--shapes", "8x256", "8x512",
                           "3x200", "8x1024", "--dtypes", "bf16", "fp16", "--directions", "2"])
    rows += compile_report(["--kernels", "registers-backward", "--shapes", "8x256", "3x200",
                            "8x512", "--dtypes", "fp32"])  # tf32 MMAs
    rows += compile_report(["--kernels", "registers-backward", "--shapes", "3x48", "--dtypes",
                            "bf16", "--no-state"])         # no c0 (its zeros need a layout)
    assert len(rows) == 12
    for row in rows:
        where = {k: row[k] for k in ("dtype", "B", "H", "regs", "spill", "triton")}
        parts = row["warps"]       # a gate's slice past 512 bytes a thread: two warps
        slice_bytes = triton.next_power_of_2(row["H"]) * (4 if row["dtype"] == "fp32" else 2)
        assert parts == (8 if slice_bytes > 1024 else 4), where
        assert row["ptxas_ok"] and row["spill"] == 0, where
        # [2, parts, 16, 8] fp32 partial sums and [2, parts] flags, or before them a chunk of
        # the weights (a program's [parts, 16, H / parts * 4 / chunks])
        item = 4 if row["dtype"] == "fp32" else 2
        staged = 4 * 16 * triton.next_power_of_2(row["H"]) // row["split_k"] * item
        assert row["shared"] <= max(2 * parts * 16 * 8 * 4 + 64, staged), where | {
            "shared": row["shared"]}
        assert row["bar_sync"] <= 4 + 2 * row["split_k"], where | {"bar_sync": row["bar_sync"]}
        assert row["mma"] == "mma.sync" and row["barrier"] == "none", where
        assert row["state_load"] == VECTOR_BYTES, where | {"state_load": row["state_load"]}
