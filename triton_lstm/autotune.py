"""Measuring tile configs (candidates, a float64 check, timing) and first-use autotuning.

``make tune`` (perf/tune.py) and TRITON_LSTM_AUTOTUNE=1 measure the same way: for one
kernel and shape, each candidate ``KernelConfig`` runs on a random problem and is checked
against a float64 reference (reference.py) over CHECK_STEPS steps; only a candidate that
passes is timed (median, CUDA events, L2 flushed between runs; triton.testing.do_bench).

Candidates: the heuristic's config, then some of its one-step neighbours (half or double
the hidden block or the batch block, the next lighter or heavier warp layout, the weights
streamed instead of resident; NEIGHBOURHOODS says which), without those that cannot run
well: no persistent group on the device, a tile past the register bound, resident weights
past the on-chip budget, an unsplit backward whose weight slice spills (the rules
dispatch.heuristic_config follows, from ptxas reports; perf/NOTES.md).

First-use autotuning, TRITON_LSTM_AUTOTUNE=1: the first launch of a (kernel, dtype, batch
rounded up to a power of two, H, directions, projection) tunes the "autotune" candidates
(up to five) plus the shipped table's config, inside the op body (never at trace time, never inside
a CUDA-graph capture: the table or the heuristic then). The winner is cached as JSON in
$TRITON_LSTM_CACHE_DIR, else $XDG_CACHE_HOME/triton_lstm, else ~/.cache/triton_lstm, one
file per GPU and versions (triton_lstm, torch, triton, CUDA, the kernel sources), and
read back by the next run, as Triton's autotuner caches.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import warnings
from typing import Optional

import torch
import triton

from . import tuning
from .dispatch import (ON_CHIP_BUDGET, PIPELINE_STAGES, RING_BLOCK_K, RING_ROWS, STAGED_BYTES,
                       KernelConfig, cdiv, gpu_slug, heuristic_config, next_power_of_2,
                       on_chip_bytes, padded, pipelined_bytes, registers_backward_fits,
                       registers_forward_fits, resident_operand_spills, ring_forward_fits,
                       staged_bytes)
from .kernels.backward import lstm_backward
from .kernels.forward import lstm_forward
from .reference import lstm_layer_reference
from .tuning import DTYPE_NAMES, config_entry, config_from_entry, shape_key

log = logging.getLogger("triton_lstm")

ENV = "TRITON_LSTM_AUTOTUNE"
CACHE_ENV = "TRITON_LSTM_CACHE_DIR"
CHECK_STEPS = 8             # steps checked against float64: enough to catch a wrong tile
AUTOTUNE_STEPS = 32         # steps timed on first use (make tune times --steps, 64)
TIMING_MS = dict(warmup=10, rep=40)
# max|got - want| / max|want| over every output; fp32 leaves room for tf32 (nn.LSTM's default).
CHECK_BOUNDS = {"fp32": 1e-2, "bf16": 5e-2, "fp16": 1e-2, "fp64": 1e-9}

WARP_LAYOUTS = ((1, 4), (4, 8), (4, 16))   # (split_k, num_warps), light tiles to heavy ones
# Register bounds, from ptxas on sm_90 (perf/NOTES.md, "Which tiles spill"):
REGISTER_TILE = 2048        # batch rows x hidden units per program: larger tiles spill,
STREAMED_TILE = 4096        # but not streamed ones at 16 warps (ptxas, Triton 3.6): the
                            # 2-byte forward (106 regs at 128x32); the backward's from H = 512,
                            # 64x64 (2-byte: no spill; fp32: 16-24 bytes) and its gate split
                            # at 64x64 (96-180 bytes; fp32 168-176) or, 2-byte, 128x32, where
                            # SASS reloads loop invariants once a phase, not in the K loop.
                            # They put B = 512 H = 1024, and both directions of B = 512
                            # H = 512, in one launch instead of two.
DEEP_STAGES = 5             # make tune's deeper twin of a pipelined loop (deeper_pipeline)
BACKWARD_SLICE_BYTES = 512  # unsplit backward: weight slice per thread past which it spills


# -- candidates --------------------------------------------------------------------------------

def runs_well(config: KernelConfig, kernel: str, batch: int, hidden: int, dtype: torch.dtype,
              directions: int, num_sms: int) -> bool:
    """Statically plausible: a persistent group fits the device, nothing spills, resident
    weights fit on chip, no tile wider than the problem."""
    if config.block_b < 16 or config.block_h < 4:            # tl.dot wants 16 rows, 16 columns
        return False
    if config.block_b > max(16, next_power_of_2(batch)):
        return False
    if config.block_h > next_power_of_2(hidden):
        return False
    if cdiv(hidden, config.block_h) * directions > num_sms:
        return False
    wide = STREAMED_TILE if wide_tile_ok(config, kernel, hidden, dtype) else REGISTER_TILE
    if config.block_b * config.block_h > wide:
        return False
    if config.gate_split and (kernel != "backward" or config.resident or config.dataflow):
        return False
    if config.resident and on_chip_bytes(hidden, config.block_b, config.block_h,
                                         dtype) > ON_CHIP_BUDGET:
        return False
    unit_columns = kernel == "backward" and not config.gate_split   # (pipelined_bytes)
    if config.inner_stages > 1 and (config.resident or pipelined_bytes(
            config.block_b, config.block_h, config.block_k, dtype, config.inner_stages,
            config.block_h if unit_columns else None) > ON_CHIP_BUDGET):
        return False     # only streamed K loops are pipelined, and their stages must fit
    # 16 warps leave a thread 128 registers: tiles of under 64 rows spill there, and so do
    # resident tiles that stage a large operand row block per thread.
    staged = staged_bytes(hidden, config.block_b, dtype, config.num_warps)
    if config.num_warps >= 16 and config.block_b < 64:
        return False
    if config.resident and resident_operand_spills(hidden, config.block_b, dtype,
                                                   config.num_warps):
        return False
    if kernel == "backward" and config.split_k == 1:
        slice_per_thread = padded(hidden) * 4 * config.block_h * dtype.itemsize
        if slice_per_thread // (32 * config.num_warps) > BACKWARD_SLICE_BYTES:
            return False
        if dtype.itemsize == 4 and config.block_h < 8 and staged >= STAGED_BYTES:
            return False    # fp32, 4-unit blocks: the per-gate dots are too narrow for MMA
    return True


def wide_tile_ok(config: KernelConfig, kernel: str, hidden: int, dtype: torch.dtype) -> bool:
    """Whether `config` may have STREAMED_TILE cells (rule at STREAMED_TILE): streamed, 16
    warps, and the 2-byte forward, or the backward from H = 512 with 64 rows (2-byte: or
    its gate split at 128)."""
    if config.resident or config.num_warps < 16:
        return False
    if kernel == "forward":
        return dtype.itemsize == 2
    if padded(hidden) < 512:
        return False
    if dtype.itemsize == 4:
        return config.block_b <= 64
    return dtype.itemsize == 2 and (config.block_b <= 64 or config.gate_split)


# Which one-step neighbours of the heuristic's config are candidates, in order, and how
# many at most. "sweep" is make tune's default (its grid fits 8 minutes, perf/tune.py);
# "autotune" runs on first use; "wide" is the whole neighbourhood (make tune --wide).
NEIGHBOURHOODS = {
    "heuristic": ((), 0),
    "sweep": (("finer", "fewer_rows", "coarser", "lighter", "heavier"), 1),   # the first good one
    "autotune": (("finer", "coarser", "lighter", "heavier"), 4),
    "wide": (("finer", "coarser", "lighter", "heavier", "fewer_rows", "more_rows", "streamed"), 7),
}
# make tune also times 16-row tiles with dataflow waits: there the grid barrier is ~0.9 µs of
# a ~2.2 µs step (perf/NOTES.md, issue 8). And streamed tiles of 64+ rows in a shape that
# moves fewer bytes a step: the forward's hidden block doubled, the backward's made squarer
# (half the rows, twice the units; and square, 64x64) or with its dh as a GEMM phase split
# by gate (gate_split), since those steps are L2-bandwidth bound (issue 7); and at B >= 64
# streamed 64-row tiles (wgmma) where the heuristic's are resident or have fewer rows
# (mma.sync).
# First-use autotuning does not add them.
MAKE_TUNE_NEIGHBOURHOODS = ("sweep", "wide")


def candidate_configs(kernel: str, batch: int, hidden: int, dtype: torch.dtype, directions: int,
                      num_sms: int, neighbourhood: str = "sweep",
                      proj: bool = False) -> list[KernelConfig]:
    """The heuristic's config first, then those of its one-step neighbours that run well:
    finer / coarser (half / double the hidden block), lighter / heavier (the next warp
    layout), fewer / more rows (half / double the batch block), streamed weights; for
    make tune's neighbourhoods, the heuristic's tiles with dataflow waits at 16 rows (and,
    where the weights fit, with them in registers: kernels/forward_registers.py and
    backward_registers.py, or where those cannot run the same tile in the tl kernel; and
    the forward's with its reduction in chunks four accumulators take, ``accumulated_chunks``),
    streamed ones with their K loop pipelined or not (the other way from the heuristic's),
    streamed tiles of 64+ rows reshaped to move fewer bytes a step (and for a backward, its
    tile with and without the gate split, which has no projection phase: `proj`), and at
    B >= 64 streamed wgmma tiles of 64 rows in place of resident tiles or tiles of fewer
    rows (``wgmma_tiles``); pipelined candidates also with chunks of 128 (``longer_chunks``)
    and with 5 stages (``deeper_pipeline``) where those compile well; and the forward with
    its weights in shared memory and h in a ring of copies (``ring_tiles``)."""
    base = heuristic_config(batch, hidden, dtype, max(1, num_sms // directions), kernel, proj)
    layout = min(range(len(WARP_LAYOUTS)), key=lambda i: abs(WARP_LAYOUTS[i][1] - base.num_warps))

    def with_layout(i):
        if not 0 <= i < len(WARP_LAYOUTS):
            return base
        split_k, num_warps = WARP_LAYOUTS[i]
        return dataclasses.replace(base, split_k=min(split_k, max(1, padded(hidden) // 16)),
                                   num_warps=num_warps)

    moves = {"finer": dataclasses.replace(base, block_h=base.block_h // 2),
             "coarser": dataclasses.replace(base, block_h=base.block_h * 2),
             "lighter": with_layout(layout - 1), "heavier": with_layout(layout + 1),
             "fewer_rows": dataclasses.replace(base, block_b=base.block_b // 2),
             "more_rows": dataclasses.replace(base, block_b=base.block_b * 2),
             "streamed": dataclasses.replace(base, resident=False)}
    names, most = NEIGHBOURHOODS[neighbourhood]
    configs = [base]
    for name in names:
        config = moves[name]
        if len(configs) > most:
            break
        if config not in configs and runs_well(config, kernel, batch, hidden, dtype, directions,
                                               num_sms):
            configs.append(config)
    if neighbourhood in MAKE_TUNE_NEIGHBOURHOODS:
        if base.block_b == 16 and not base.dataflow:
            configs.append(dataclasses.replace(base, dataflow=True))
            configs += cluster_tiles(base, kernel, batch, hidden, dtype, directions, num_sms)
            fits = registers_forward_fits if kernel == "forward" else registers_backward_fits
            if not proj and fits(hidden, dtype):
                configs.append(dataclasses.replace(base, registers=True))
            chained = accumulated_chunks(base, kernel, hidden)
            if chained is not None and runs_well(chained, kernel, batch, hidden, dtype,
                                                 directions, num_sms):
                configs.append(chained)
        if not base.resident:   # the streamed K loop the other way: pipelined or not
            flipped = dataclasses.replace(
                base, inner_stages=1 if base.inner_stages > 1 else PIPELINE_STAGES)
            if runs_well(flipped, kernel, batch, hidden, dtype, directions, num_sms):
                configs.append(flipped)
        if base.block_b >= 64 and not base.resident:
            fewer_bytes = dataclasses.replace(
                base, block_h=base.block_h * 2,
                block_b=base.block_b // 2 if kernel == "backward" else base.block_b)
            if fewer_bytes not in configs and runs_well(fewer_bytes, kernel, batch, hidden, dtype,
                                                        directions, num_sms):
                configs.append(fewer_bytes)
        if batch >= 64 and (base.resident or base.block_b < 64):
            configs += [c for c in wgmma_tiles(base, kernel, batch, hidden, dtype, directions,
                                               num_sms) if c not in configs]
        if kernel == "backward" and batch >= 64 and not base.resident:
            # The heuristic's tile with and without the gate split, pipelined and not.
            gate_split = [dataclasses.replace(base, gate_split=True, inner_stages=stages)
                          for stages in (1, PIPELINE_STAGES) if not proj]
            unsplit = [dataclasses.replace(c, gate_split=False) for c in gate_split]
            # Where the heuristic's grid needs two launches, the gate split's fewer bytes a
            # step also pay for twice the units in one (64x64 at B=512 H=1024).
            if needs_two_launches(base, batch, hidden, directions, num_sms):
                gate_split += [dataclasses.replace(c, block_h=2 * c.block_h) for c in gate_split]
            configs += [c for c in square_backward_tiles(base, batch, hidden, directions, num_sms)
                        + gate_split + unsplit if c not in configs and runs_well(
                            c, kernel, batch, hidden, dtype, directions, num_sms)]
        longer = [longer_chunks(c, kernel, hidden, dtype) for c in configs]
        configs += [c for c in longer if c is not None and c not in configs
                    and runs_well(c, kernel, batch, hidden, dtype, directions, num_sms)]
        deeper = [deeper_pipeline(c, kernel, hidden, dtype) for c in configs]
        configs += [c for c in deeper if c is not None and c not in configs
                    and runs_well(c, kernel, batch, hidden, dtype, directions, num_sms)]
        configs += [c for c in ring_tiles(kernel, batch, hidden, dtype, directions, num_sms, proj)
                    if c not in configs]
    return configs


def needs_two_launches(base: KernelConfig, batch: int, hidden: int, directions: int,
                       num_sms: int) -> bool:
    """Whether `base`'s grid has more programs than SMs where one of twice its hidden block
    has no more (a program an SM: the 16-warp streamed tiles)."""
    rows = cdiv(batch, base.block_b) * directions
    return cdiv(hidden, base.block_h) * rows > num_sms >= cdiv(hidden, 2 * base.block_h) * rows


def one_launch_tiles(base: KernelConfig, kernel: str, batch: int, hidden: int,
                     dtype: torch.dtype, directions: int, num_sms: int) -> list[KernelConfig]:
    """The streamed `base` with twice its hidden block (for the backward also as the square
    64x64, unsplit), where `base` needs two launches and these one: what make tune also times
    at layers it gives the heuristic's tiles only (both directions at B = 512 H = 512)."""
    if base.resident or not needs_two_launches(base, batch, hidden, directions, num_sms):
        return []
    wider = [dataclasses.replace(base, block_h=2 * base.block_h)]
    if kernel == "backward":
        wider += square_backward_tiles(base, batch, hidden, directions, num_sms)
    return [c for i, c in enumerate(wider) if c not in wider[:i] and c != base and runs_well(
        c, kernel, batch, hidden, dtype, directions, num_sms)]


def accumulated_chunks(base: KernelConfig, kernel: str, hidden: int) -> Optional[KernelConfig]:
    """A resident forward `base` with its weight slice in chunks of the reduction that four
    accumulators take in turn: four independent chains of MMAs a warp instead of one over
    the whole reduction (perf/NOTES.md, "a split reduction with no exchange between
    warps"), chunks of 64, or of 32 where an accumulator would otherwise get fewer than two
    (Triton folds a lone chunk's sum into one chain). None for the backward (its [16, 8]
    tile at B = 8 is one MMA column that all warps compute alike), for streamed or chunked
    tiles, and below H = 256."""
    if kernel != "forward" or not base.resident or base.chunked:
        return None
    block_k = 64 if padded(hidden) >= 4 * 2 * 64 else 32
    if padded(hidden) < 4 * 2 * block_k:
        return None
    return dataclasses.replace(base, chunked=True, block_k=block_k, split_k=4)


def longer_chunks(config: KernelConfig, kernel: str, hidden: int,
                  dtype: torch.dtype) -> Optional[KernelConfig]:
    """`config` with chunks of 128 of the reduction instead of 64, if it is a pipelined
    streamed config that ptxas (sm_90, Triton 3.6) compiles without spill so: tiles of up to
    2048 rows x units, or the backward's square 64x64; in the backward, not split by gate and
    at H >= 1024 (at H = 256-512 its 64x32 spills 32-48 bytes, fp32 64x16 at 16 warps 208);
    in the forward, 2-byte dtypes with 4+ chunks of 128 (fp32 64x16 spills 168). Else None.

    A streamed step on the H200 took about the time its bytes need at the bytes each program
    keeps in flight (perf/NOTES.md, "After run 5: bytes in flight"): a loop that waits for
    one chunk at a time, or for two with 3 stages, moves 12-64 KB per L2 round trip. Chunks
    twice as long keep twice the bytes in flight, where the L2's bandwidth leaves room."""
    square = kernel == "backward" and config.block_b == config.block_h == 64
    if (config.resident or config.inner_stages == 1 or config.block_k != 64
            or config.gate_split or (config.block_b * config.block_h > REGISTER_TILE
                                     and not square)):
        return None
    if kernel == "forward" and (dtype.itemsize != 2 or padded(hidden) < 4 * 128):
        return None
    if kernel == "backward" and padded(hidden) < 1024:
        return None
    return dataclasses.replace(config, block_k=128)


def deeper_pipeline(config: KernelConfig, kernel: str, hidden: int,
                    dtype: torch.dtype) -> Optional[KernelConfig]:
    """`config` with DEEP_STAGES stages in its pipelined K loop instead of PIPELINE_STAGES, if
    it is a pipelined streamed config in chunks of 64 at H >= 1024 (16 chunks a step in the
    forward, 64 in the backward) in a 2-byte dtype; else None. (fp32's 16-warp forward tiles
    spill 116-148 bytes with 5 stages and none with 3: ptxas, sm_90, Triton 3.6.)

    A chunk is two cp.async groups (its rows of h or dG, its weight columns). With 3 stages a
    program multiplies one chunk while two are in flight (cp.async.wait_group 2), with 5 while
    four are (wait_group 6): twice the bytes in flight per L2 round trip, which is what the
    streamed steps took their time over (perf/NOTES.md, "After run 5: bytes in flight"), where
    the L2's bandwidth leaves room. ptxas: the same registers within 14, no spill where 3
    stages have none."""
    if (config.resident or config.inner_stages != PIPELINE_STAGES or config.block_k != 64
            or padded(hidden) < 1024 or dtype.itemsize != 2):
        return None
    return dataclasses.replace(config, inner_stages=DEEP_STAGES)


def ring_tiles(kernel: str, batch: int, hidden: int, dtype: torch.dtype, directions: int,
               num_sms: int, proj: bool = False) -> list[KernelConfig]:
    """The forward with its weights in shared memory and h in a ring of DEEP_STAGES copies
    (kernels/forward_ring.py) at 64x8 and 64x16, at H >= 1024 also with the deepest ring
    that fits (up to 8 slots), where the kernel takes the tile
    (dispatch.ring_forward_fits: bf16 / fp16, the weight slice in shared memory) and the
    grid fits the device at once (one program an SM, B <= 128 at H = 1024): a step reads
    only h from L2, half a streamed 64x16 tile's bytes. No projection. A config's own tile,
    which runs where the kernel cannot, is the streamed 64-row one pipelined alike."""
    if kernel != "forward" or proj or batch < RING_ROWS:
        return []
    tiles = []
    for block_h in (8, 16):
        tile = KernelConfig(block_b=RING_ROWS, block_h=block_h, resident=False,
                            block_k=RING_BLOCK_K, split_k=4, num_warps=8, ring=True)
        depths = [s for s in range(DEEP_STAGES, 9) if ring_forward_fits(
            dataclasses.replace(tile, inner_stages=s), hidden, dtype)]
        if not depths:
            continue
        # 16 chunks a step from H = 1024: also the deepest ring that fits (64x16: 7 slots).
        deepest = depths[-1] if padded(hidden) >= 1024 else depths[0]
        tiles += [dataclasses.replace(tile, inner_stages=s) for s in sorted({depths[0], deepest})]
    return [t for t in tiles
            if cdiv(batch, RING_ROWS) * cdiv(hidden, t.block_h) * directions <= num_sms
            and runs_well(t, kernel, batch, hidden, dtype, directions, num_sms)]


def wgmma_tiles(base: KernelConfig, kernel: str, batch: int, hidden: int, dtype: torch.dtype,
                directions: int, num_sms: int) -> list[KernelConfig]:
    """Streamed tiles of 64 rows at B >= 64, in place of `base` where it is resident or has
    fewer rows: the forward's with its K loop pipelined, at `base`'s hidden block and twice
    it; the backward's as 64x16 at 8 warps and 64x32 at 16, unpipelined and pipelined.
    Resident tiles and tiles of up to 32 rows run mma.sync (the resident ones re-read their
    weight slice from shared memory every step); streamed 64-row tiles run wgmma (ptxas on
    sm_90, Triton 3.6: no spill at B = 64-128, H = 256-1024, but 32 bytes in fp32's
    pipelined 64x32 backward at H = 256). Measured at larger batches, where they are the
    heuristic's, such tiles took less time for several times the rows (H200, T = 64,
    us/step): bf16 B = 512 H = 512 forward, 128x16 pipelined, 6.5 against B = 128 H = 512's
    resident 64x8, 8.4; B = 128 H = 1024 forward, 64x16 pipelined, 5.8 against B = 64
    H = 1024's resident 32x16, 9.2; B = 512 H = 256 backward, 64x16, 9.5 against B = 128's
    resident 32x8, 9.2 (perf/NOTES.md, "After run 5: 64-row tiles at B = 64-128")."""
    streamed = dataclasses.replace(base, block_b=64, resident=False)
    if kernel == "forward":
        tiles = [dataclasses.replace(streamed, block_h=bh, num_warps=max(8, base.num_warps),
                                     inner_stages=PIPELINE_STAGES)
                 for bh in (base.block_h, 2 * base.block_h)]
    else:
        tiles = [dataclasses.replace(streamed, block_h=bh, num_warps=warps, inner_stages=stages)
                 for bh, warps in ((16, 8), (32, 16)) for stages in (1, PIPELINE_STAGES)]
    split_k = min(4, max(1, padded(hidden) // 16))
    tiles = [dataclasses.replace(t, split_k=split_k) for t in tiles]
    return [t for t in tiles if runs_well(t, kernel, batch, hidden, dtype, directions, num_sms)]


def square_backward_tiles(base: KernelConfig, batch: int, hidden: int, directions: int,
                          num_sms: int) -> list[KernelConfig]:
    """`base` as a streamed 64x64 tile at 16 warps, unpipelined and pipelined, where its grid
    fills at least 3/4 of the device in one launch. A step reads each program's rows of the
    4H-wide dG and its units' slice of W: (H / block_h) * B + (B / block_b) * H rows of 4H in
    all, least for a given tile area when block_b = block_h (perf/NOTES.md, issue 7)."""
    programs = cdiv(hidden, 64) * cdiv(batch, 64) * directions
    if not 3 * num_sms <= 4 * programs <= 4 * num_sms:
        return []
    square = dataclasses.replace(base, block_b=64, block_h=64, resident=False, num_warps=16,
                                 inner_stages=1, gate_split=False)
    return [square, dataclasses.replace(square, inner_stages=PIPELINE_STAGES)]


def cluster_tiles(base: KernelConfig, kernel: str, batch: int, hidden: int, dtype: torch.dtype,
                  directions: int, num_sms: int) -> list[KernelConfig]:
    """`base` with resident weights and the cluster barrier (kernels/barrier.py), its hidden
    blocks wide enough that a group is one cluster of 16 programs, or of 8: each with base's
    warp layout, or where that does not run well, with the reduction split over 8 warps.
    Fewer, wider programs read more of their weights from shared memory each step, but
    meet without the counter's atomic round trips (perf/NOTES.md, issue 8)."""
    block_h = next_power_of_2(cdiv(hidden, 16))
    tiles = []
    for bh in (block_h, 2 * block_h):
        if cdiv(hidden, bh) not in (8, 16):
            continue
        tile = dataclasses.replace(base, block_h=bh, resident=True, chunked=False, cluster=True)
        split = dataclasses.replace(tile, split_k=min(4, padded(hidden) // 16), num_warps=8)
        tiles += [next((t for t in (tile, split) if runs_well(
            t, kernel, batch, hidden, dtype, directions, num_sms)), None)]
    return [t for t in tiles if t is not None]


# -- one problem: check and time ---------------------------------------------------------------

def time_ms(fn) -> float:
    """Median run time of fn in ms (CUDA events, L2 flushed between runs)."""
    return triton.testing.do_bench(fn, quantiles=[0.5], **TIMING_MS)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want|; NaN when got has a NaN."""
    want = want.double()
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@dataclasses.dataclass
class Problem:
    """A random recurrence of one shape on a device: the launchers' inputs, and what the
    float64 reference makes of them.

    gx [T, B, D*4H], w_hh [D, 4H, R], h0 [D, B, R], c0 [D, B, H], w_hr [D, R, H] or None,
    dy [T, B, D*R]; R = proj or H.
    """
    dtype: torch.dtype
    batch: int
    hidden: int
    directions: int
    proj: int
    steps: int
    device: torch.device
    num_sms: int
    gx: torch.Tensor
    w_hh: torch.Tensor
    h0: torch.Tensor
    c0: torch.Tensor
    w_hr: Optional[torch.Tensor]
    dy: torch.Tensor
    saved_config: Optional[KernelConfig] = None   # the forward's tiles that feed the backward
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def random(cls, dtype, batch, hidden, directions=1, proj=0, steps=64, device="cuda",
               num_sms=None, seed=0) -> "Problem":
        """Random inputs from a generator of its own: the caller's random stream is untouched."""
        device = torch.device(device)
        if num_sms is None:
            num_sms = tuning.sm_count(device)
        generator = torch.Generator(device=device).manual_seed(seed)
        R = proj or hidden

        def randn(*shape, scale=1.0):
            t = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
            return (t * scale).to(dtype)

        return cls(dtype, batch, hidden, directions, proj, steps, device, num_sms,
                   gx=randn(steps, batch, directions * 4 * hidden),
                   w_hh=randn(directions, 4 * hidden, R, scale=R ** -0.5),
                   h0=randn(directions, batch, R), c0=randn(directions, batch, hidden),
                   w_hr=randn(directions, R, hidden, scale=hidden ** -0.5) if proj else None,
                   dy=randn(steps, batch, directions * R))

    def run(self, kernel: str, config: KernelConfig, steps: Optional[int] = None) -> tuple:
        """forward: (y, h_n, c_n); backward: (dG, dh0, dc0) of loss = sum(y * dy)."""
        T = steps or self.steps
        if kernel == "forward":
            return lstm_forward(self.gx[:T], self.w_hh, self.h0, self.c0, None, self.w_hr,
                                save=False, config=config)[:3]
        gates, c_all = self._saved(T)
        return lstm_backward(self.dy[:T], None, None, gates, c_all, self.c0, None, self.w_hh,
                             self.w_hr, config=config)[:3]

    def _saved(self, T: int):
        """What the backward reads, from a forward with saved_config (else the heuristic's)."""
        if ("saved", T) not in self._cache:
            config = self.saved_config or heuristic_config(
                self.batch, self.hidden, self.dtype, max(1, self.num_sms // self.directions),
                "forward")
            out = lstm_forward(self.gx[:T], self.w_hh, self.h0, self.c0, None, self.w_hr,
                               save=True, config=config)
            self._cache["saved", T] = (out[3], out[4])
        return self._cache["saved", T]

    def reference(self, T: int) -> dict:
        """{"forward": (y, h_n, c_n), "backward": (dG, dh0, dc0)} in float64, from the
        rounded inputs: one direction at a time (the reverse one on the flipped sequence)
        through reference.py with an identity input weight, so that dG is gx's gradient."""
        if ("reference", T) not in self._cache:
            H, f64 = self.hidden, torch.float64
            with torch.enable_grad():
                gx = self.gx[:T].to(f64).requires_grad_()
                h0, c0 = (s.to(f64).requires_grad_() for s in (self.h0, self.c0))
                eye = torch.eye(4 * H, dtype=f64, device=self.device)
                ys, hs, cs = [], [], []
                for d in range(self.directions):
                    g = gx[..., d * 4 * H:(d + 1) * 4 * H]
                    w_hr = None if self.w_hr is None else self.w_hr[d].to(f64)
                    y, h, c = lstm_layer_reference(g.flip(0) if d else g, h0[d], c0[d], eye,
                                                   self.w_hh[d].to(f64), w_hr=w_hr)
                    ys.append(y.flip(0) if d else y)
                    hs.append(h)
                    cs.append(c)
                y = torch.cat(ys, dim=-1)
                grads = torch.autograd.grad((y * self.dy[:T].to(f64)).sum(), (gx, h0, c0))
            self._cache["reference", T] = {
                "forward": (y.detach(), torch.stack(hs).detach(), torch.stack(cs).detach()),
                "backward": grads}
        return self._cache["reference", T]

    def error(self, kernel: str, config: KernelConfig) -> float:
        """The largest relative error of the candidate's outputs over CHECK_STEPS steps."""
        T = min(CHECK_STEPS, self.steps)
        got = self.run(kernel, config, T)
        return max(relative_error(g, w) for g, w in zip(got, self.reference(T)[kernel]))

    def time_us(self, kernel: str, config: KernelConfig) -> float:
        """Median µs per step over self.steps steps."""
        if kernel == "backward":
            self._saved(self.steps)      # outside the timed calls
        return time_ms(lambda: self.run(kernel, config)) * 1e3 / self.steps


@dataclasses.dataclass(frozen=True)
class Measurement:
    config: KernelConfig
    status: str                      # "ok"; "wrong": failed the float64 check; "error": raised
    rel_error: Optional[float] = None
    us_per_step: Optional[float] = None
    detail: str = ""


def check(problem: Problem, kernel: str, config: KernelConfig) -> Measurement:
    """The candidate against float64, untimed: "ok", "wrong" or "error" (with the reason)."""
    bound = CHECK_BOUNDS[DTYPE_NAMES[problem.dtype]]
    try:
        error = problem.error(kernel, config)
    except Exception as exc:   # does not compile, fit or launch: recorded with its reason
        return _failed(config, exc)
    if not error <= bound:     # NaN fails too
        return Measurement(config, "wrong", error,
                           detail=f"relative error {error:.2e} > {bound:.0e}")
    return Measurement(config, "ok", error)


def measure(problem: Problem, kernel: str, config: KernelConfig) -> Measurement:
    """Check the candidate against float64; time it only if it passed."""
    checked = check(problem, kernel, config)
    if checked.status != "ok":
        return checked
    try:
        return dataclasses.replace(checked, us_per_step=problem.time_us(kernel, config))
    except Exception as exc:
        return _failed(config, exc)


def _failed(config: KernelConfig, exc: Exception) -> Measurement:
    message = (str(exc).strip().splitlines() or [""])[0][:200]
    return Measurement(config, "error", detail=f"{type(exc).__name__}: {message}")


# -- first use ---------------------------------------------------------------------------------

def enabled() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def cache_dir() -> pathlib.Path:
    """$TRITON_LSTM_CACHE_DIR, else $XDG_CACHE_HOME/triton_lstm, else ~/.cache/triton_lstm."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "triton_lstm"


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    """What a tuned config depends on besides the GPU."""
    from . import __version__
    sources = hashlib.sha256()
    for path in sorted((pathlib.Path(__file__).parent / "kernels").glob("*.py")):
        sources.update(path.read_bytes())
    return {"triton_lstm": __version__, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "none", "kernels": sources.hexdigest()[:16]}


def cache_path(gpu_name: str) -> pathlib.Path:
    digest = hashlib.sha256(json.dumps(versions(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "autotune" / f"{gpu_slug(gpu_name)}-{digest}.json"


def cache_key(kernel: str, dtype: torch.dtype, batch: int, hidden: int, directions: int,
              proj: bool) -> str:
    """'forward/bf16/B8/H512/D1/P0'; the batch rounded up to a power of two, P1: projected."""
    return f"{kernel}/" + shape_key(DTYPE_NAMES[dtype], next_power_of_2(batch), hidden,
                                    directions, int(proj))


_cache_files: dict[pathlib.Path, dict] = {}


def _read(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):   # absent, or half-written by a crashed run: tune again
        return {}


def _write(path: pathlib.Path, gpu_name: str, key: str, entry: dict) -> None:
    """Merge one entry into the file (read again first: other processes add theirs too)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path) or {"gpu": gpu_name, "versions": versions(), "configs": {}}
        data.setdefault("configs", {})[key] = entry
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)     # readers see the old file or the new one, never half
    except OSError as error:
        warnings.warn(f"triton_lstm: could not write the autotune cache {path}: {error}")


def autotuned_config(kernel: str, batch: int, hidden: int, dtype: torch.dtype,
                     device: torch.device, directions: int = 1, proj: bool = False,
                     tune_if_missing: bool = True) -> Optional[KernelConfig]:
    """The config tuned on this machine for the shape: from the cache, or tuned now."""
    if dtype not in DTYPE_NAMES:
        return None
    gpu = tuning.device_name(device)
    path = cache_path(gpu)
    if path not in _cache_files:
        _cache_files[path] = _read(path).get("configs", {})
    entries = _cache_files[path]
    key = cache_key(kernel, dtype, batch, hidden, directions, proj)
    if key not in entries:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not tune_if_missing or capturing:   # a capture must not see timing syncs
            return None
        best = tune(kernel, batch, hidden, dtype, device, directions, proj)
        entries[key] = (config_entry(best.config, best.us_per_step) if best
                        else {"failed": "no candidate passed the float64 check"})
        _write(path, gpu, key, entries[key])
    entry = entries[key]
    return config_from_entry(entry) if "block_b" in entry else None


def tune(kernel: str, batch: int, hidden: int, dtype: torch.dtype, device: torch.device,
         directions: int = 1, proj: bool = False) -> Optional[Measurement]:
    """Check and time the "autotune" candidates (and the shipped table's config) for one
    kernel and shape; the fastest that passed, or None."""
    num_sms = tuning.sm_count(device)
    candidates = candidate_configs(kernel, batch, hidden, dtype, directions, num_sms,
                                   "autotune", proj)
    if device.type == "cuda":
        shipped = tuning.table_config(tuning.decision_gpu(device), kernel, dtype, batch, hidden,
                                      directions, proj, num_sms)
        if shipped is not None and shipped not in candidates:
            candidates.append(shipped)
    # Whatever the caller's modes (inference, no grad in a backward, autocast), measure plainly.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type,
                                                                          enabled=False):
        problem = Problem.random(dtype, batch, hidden, directions,
                                 max(1, hidden // 2) if proj else 0, AUTOTUNE_STEPS, device,
                                 num_sms)
        results = [measure(problem, kernel, config) for config in candidates]
    passed = [r for r in results if r.status == "ok"]
    best = min(passed, key=lambda r: r.us_per_step) if passed else None
    log.info("triton_lstm autotune %s: %d candidates, %d passed, best %s", cache_key(
        kernel, dtype, batch, hidden, directions, proj), len(results), len(passed),
        best and f"{tuning.config_label(best.config)} {best.us_per_step:.2f} us/step")
    return best
