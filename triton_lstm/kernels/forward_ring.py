"""Mid-batch forward with its weights in shared memory and h_{t-1} in a ring of copies.

A streamed `tl` tile (forward.py) reads its weight slice from L2 every step beside h_{t-1},
and `tl` cannot keep the slice on chip while it pipelines the reads of h: a resident tile
stages h through shared memory right at each load, so every chunk of it costs one L2 round
trip, however far ahead it was asked for (perf/NOTES.md, "After run 6: five pipeline
stages at H = 1024"). This kernel is written in Gluon, Triton's language with explicit
layouts and shared memory:

- A program is one warpgroup (4 warps) that owns BLOCK_H hidden units of one direction (all
  four gates: N = 4 BLOCK_H weight columns) for 64 batch rows, wgmma's M.
- Its weight slice is copied into shared memory once, as NUM_CHUNKS [N, BLOCK_K] chunks of
  the reduction, and stays there for the whole sequence (64x16 at H = 1024: 128 KB). Column
  n of the product is gate n // BLOCK_H of unit n % BLOCK_H.
- Each step, after the grid barrier (barrier.py's counter), h_{t-1} comes from L2 in chunks
  of [64, BLOCK_K] by cp.async into a ring of STAGES slots, STAGES - 1 chunks in flight while
  one is multiplied (wgmma, h and the weight chunk both from shared memory). Only h is read
  from L2: half the bytes of a streamed 64x16 step.
- The [64, N] product goes through shared memory once more, to split it into the four gates
  in the layout of the gate math, which is forward.py's.

It runs persistently or not at all (every program resident: the launcher checks), for bf16
and fp16, without projection, restarts, checkpoints or chunks of steps; elsewhere the
config's own `tl` tile runs (forward.py, config ``ring``). Gluon kernels have no
interpreter: the CPU tests compile it for sm_90 (test_codegen.py) and run its code under the
`tl` interpreter with the layouts stripped (test_kernels.py); the GPU tests run it.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)

from ..dispatch import (RING_BLOCK_K, RING_ROWS, KernelConfig, barrier_counters, cdiv,
                        interpreting, leader_increment, padded, ring_forward_fits)
from . import timeline
from .barrier import barrier_arrive, barrier_wait
from .forward import _load_gx, cell_update, rounded_to, save_step, step_rows
from .forward_registers import (_direction_parts, _lengths, _program_block, _warps_barrier,
                                launch_resident)

# A cp.async of a tile into shared memory: async_copy_global_to_shared in Triton 3.6, async_load
# in later ones.
_copy_async = (getattr(async_copy, "async_load", None)
               or async_copy.async_copy_global_to_shared)

ROWS = gl.constexpr(RING_ROWS)   # batch rows per program: wgmma's M for one warpgroup
WARPS = 4
BLOCK_K = RING_BLOCK_K           # a chunk of the reduction: 128 bytes of a row, one swizzle span


@gluon.jit
def _copy_chunk(ring, slot, p_rows, m_rows, o_k, k0, H: gl.constexpr):
    """Start copying h_{t-1}[rows, k0:k0 + BLOCK_K] into ring slot `slot` (zeros where
    masked)."""
    k = k0 + o_k
    _copy_async(ring.index(slot), p_rows[:, None] + k[None, :],
                mask=m_rows[:, None] & (k < H)[None, :], cache_modifier=".cg")


@gluon.jit
def _recurrent_product(ring, w_chunks, p_rows, m_rows, o_k, H: gl.constexpr, N: gl.constexpr,
                       NUM_CHUNKS: gl.constexpr, STAGES: gl.constexpr, BLOCK_K: gl.constexpr,
                       ACC_LAYOUT: gl.constexpr):
    """h_{t-1} @ W_slice^T, [ROWS, N] fp32: the chunks of h through the ring, STAGES - 1 in
    flight while one is multiplied, the weight chunks where they stay."""
    for s in gl.static_range(STAGES - 1):
        if s < NUM_CHUNKS:
            _copy_chunk(ring, s, p_rows, m_rows, o_k, s * BLOCK_K, H)
        async_copy.commit_group()          # one group a chunk, empty past the last
    acc = gl.zeros([ROWS, N], gl.float32, ACC_LAYOUT)
    for kc in range(NUM_CHUNKS):
        async_copy.wait_group(STAGES - 2)  # this thread's copies of chunk kc have landed,
        fence_async_shared()               # visible to wgmma (which reads through the async
        _warps_barrier()                   # proxy), and every thread's
        acc = warpgroup_mma(ring.index(kc % STAGES), w_chunks.index(kc).permute((1, 0)), acc,
                            is_async=True)
        # Chunk kc - 1's product is done: its slot takes chunk kc + STAGES - 1.
        acc = warpgroup_mma_wait(1, deps=[acc])
        _warps_barrier()
        nxt = kc + STAGES - 1
        if nxt < NUM_CHUNKS:
            _copy_chunk(ring, nxt % STAGES, p_rows, m_rows, o_k, nxt * BLOCK_K, H)
        async_copy.commit_group()
    acc = warpgroup_mma_wait(0, deps=[acc])
    async_copy.wait_group(0)
    return acc


@gluon.jit
def _gates_apart(scratch, acc, BLOCK_H: gl.constexpr, GATE_LAYOUT: gl.constexpr):
    """The product's four [ROWS, BLOCK_H] gate tiles (i, f, g, o) in the gate math's layout,
    through shared memory (the last step's reads of it were done before this step's first
    chunk: every warp has met the others since)."""
    scratch.store(acc)
    _warps_barrier()
    return (scratch.slice(0, BLOCK_H, dim=1).load(GATE_LAYOUT),
            scratch.slice(BLOCK_H, BLOCK_H, dim=1).load(GATE_LAYOUT),
            scratch.slice(2 * BLOCK_H, BLOCK_H, dim=1).load(GATE_LAYOUT),
            scratch.slice(3 * BLOCK_H, BLOCK_H, dim=1).load(GATE_LAYOUT))


@gluon.jit(do_not_specialize=["T", "B", "leader_inc"])
def lstm_forward_ring_kernel(
    gx,        # [T, B, D, 4H]  x_t W_ih^T + b_ih + b_hh per direction, input dtype
    w_hh,      # [D, 4H, H]     input dtype
    h0,        # [D, B, H]      read when HAS_H0
    c0,        # [D, B, H]      read when HAS_H0
    lengths,   # [B]            int32, read when HAS_LENGTHS
    y,         # [T, B, D, H]   out
    h_n,       # [D, B, H]      out
    c_state,   # [D, B, H]      fp32 out: c after each row's last step
    gates,     # [D, T, B, 4H]  fp32 out when SAVE
    c_all,     # [D, T, B, H]   fp32 out when SAVE
    stamps,    # [T, MAX_PROGRAMS, EVENTS] int64 out when STAMPS: each step's timeline
    counters,  # [groups]       int32 barrier counters, one per (direction, batch block)
    T, B, leader_inc,
    H: gl.constexpr, HP: gl.constexpr, D: gl.constexpr, BLOCK_H: gl.constexpr,
    BLOCK_K: gl.constexpr, STAGES: gl.constexpr, HAS_H0: gl.constexpr,
    HAS_LENGTHS: gl.constexpr, SAVE: gl.constexpr, REVERSE: gl.constexpr, STAMPS: gl.constexpr,
):
    N: gl.constexpr = 4 * BLOCK_H
    NUM_CHUNKS: gl.constexpr = HP // BLOCK_K
    NUM_H_BLOCKS: gl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    YS: gl.constexpr = D * H          # row stride of y
    GS: gl.constexpr = D * 4 * H      # row stride of gx
    ACC_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, N, 16])
    # 16 bytes a thread along the reduction: rows of h and of W_hh as cp.async / loads take them.
    COPY: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8],
                                          warps_per_cta=[4, 1], order=[1, 0])
    GATE_LAYOUT: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4],
                                                 threads_per_warp=[8, 4],
                                                 warps_per_cta=[4, 1], order=[1, 0])
    OPERAND: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                 rank=2)
    PLAIN: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])

    i_h, i_b, i_d, reverse = _program_block(NUM_H_BLOCKS, D, REVERSE)
    counter = counters + i_d * (gl.num_programs(0) // NUM_H_BLOCKS) + i_b
    gx, w_hh, h0, c0, y, h_n, c_state, gates, c_all = _direction_parts(
        i_d, T, B, H, gx, w_hh, h0, c0, y, h_n, c_state, gates, c_all)

    # The weight slice, once: chunk kc is W_hh[rows of the N columns, kc * BLOCK_K + k],
    # every chunk's copy in flight at once.
    w_chunks = gl.allocate_shared_memory(w_hh.dtype.element_ty, [NUM_CHUNKS, N, BLOCK_K],
                                         OPERAND)
    o_n = gl.arange(0, N, layout=gl.SliceLayout(1, COPY))
    w_unit = i_h * BLOCK_H + o_n % BLOCK_H
    w_row = (o_n // BLOCK_H) * H + w_unit
    o_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, COPY))
    for kc in range(NUM_CHUNKS):
        k = kc * BLOCK_K + o_k
        _copy_async(w_chunks.index(kc), w_hh + w_row[:, None] * H + k[None, :],
                    mask=(w_unit < H)[:, None] & (k < H)[None, :])
    async_copy.commit_group()
    ring = gl.allocate_shared_memory(y.dtype.element_ty, [STAGES, ROWS, BLOCK_K], OPERAND)
    scratch = gl.allocate_shared_memory(gl.float32, [ROWS, N], PLAIN)

    # The gate math's rows and units, and the same rows as the copies take them.
    o_b = i_b * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, GATE_LAYOUT))
    o_u = i_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(0, GATE_LAYOUT))
    m_b = o_b < B
    m_u = o_u < H
    m_bu = m_b[:, None] & m_u[None, :]
    p_bu = o_b[:, None] * H + o_u[None, :]
    length = _lengths(lengths, o_b, m_b, T, HAS_LENGTHS)
    o_bk = i_b * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, COPY))
    m_bk = o_bk < B
    length_k = _lengths(lengths, o_bk, m_bk, T, HAS_LENGTHS)

    if HAS_H0:
        c = gl.load(c0 + p_bu, mask=m_bu, other=0.0).to(gl.float32)
        m_rows = m_bk
    else:
        c = gl.zeros([ROWS, BLOCK_H], gl.float32, GATE_LAYOUT)
        m_rows = m_bk & (o_bk < 0)
    p_rows = h0 + o_bk.to(gl.int64) * H           # h_{t-1} of each row, here h0
    t_row, running = step_rows(0, length, m_b, reverse)
    gx_i, gx_f, gx_g, gx_o = _load_gx(gx, t_row, running, B, o_b, o_u, m_u, H, GS, gl.float32)
    # The weight chunks landed (this thread's), visible to wgmma's async proxy, every thread's.
    async_copy.wait_group(0)
    fence_async_shared()
    _warps_barrier()

    for t in range(T):
        if STAMPS:
            timeline.step_begins(stamps, t)
        acc = _recurrent_product(ring, w_chunks, p_rows, m_rows, o_k, H, N, NUM_CHUNKS, STAGES,
                                 BLOCK_K, ACC_LAYOUT)
        a_i, a_f, a_g, a_o = _gates_apart(scratch, acc, BLOCK_H, GATE_LAYOUT)
        m_run = running[:, None] & m_u[None, :]
        b_i, b_f, b_g, b_o, c, b_h = cell_update(a_i + gx_i, a_f + gx_f, a_g + gx_g, a_o + gx_o, c,
                                                 m_run)
        b_h = rounded_to(b_h, y.dtype.element_ty)
        gl.store(y + (t_row * B + o_b)[:, None] * YS + o_u[None, :], b_h, mask=m_bu)
        if STAMPS:
            timeline.stored(stamps, t)
        gl.store(h_n + p_bu, b_h, mask=m_bu & (t == length - 1)[:, None])
        if SAVE:
            save_step(gates, c_all, t_row, B, o_b, o_u, H, b_i, b_f, b_g, b_o, c, m_run, m_bu)

        # The next step: where h_t of each row is and which rows read it, and its input
        # projection, in flight while this program waits at the barrier.
        t_row_k, _ = step_rows(t, length_k, m_bk, reverse)
        p_rows = y + (t_row_k * B + o_bk) * YS
        _, m_rows = step_rows(t + 1, length_k, m_bk, reverse)
        t_row, running = step_rows(t + 1, length, m_b, reverse)
        gx_i, gx_f, gx_g, gx_o = _load_gx(gx, t_row, running, B, o_b, o_u, m_u, H, GS,
                                          gl.float32)
        if t < T - 1:
            arrived = barrier_arrive(counter, leader_inc, i_h == 0, False)
            barrier_wait(counter, arrived, False)

    gl.store(c_state + p_bu, c, mask=m_bu)


def runs_here(config: KernelConfig, hidden_size: int, dtype: torch.dtype, device: torch.device,
              *, proj: bool, restarts: bool, ckpt_every: int, step_chunks: bool,
              force_stepped: bool) -> bool:
    """Whether a forward call is one this kernel runs: a GPU, `config`'s tile one it takes
    (dispatch.ring_forward_fits), one persistent launch without projection, restarts,
    checkpoints or chunks (residency is checked at launch)."""
    return (device.type == "cuda" and not interpreting()
            and ring_forward_fits(config, hidden_size, dtype)
            and not (proj or restarts or ckpt_every > 0 or step_chunks or force_stepped))


def lstm_forward_ring(gx, w_hh, h0, c0, lengths, config: KernelConfig, *, save: bool,
                      reverse: bool, stamps=None):
    """lstm_forward (forward.py) of a layer this kernel runs (``runs_here``) with `config`'s
    tile, persistently: (y, h_n, c_n, gates, c_all), or None, with nothing launched, where
    its programs cannot all be resident at once. ``stamps``: a timeline.stamps_buffer to
    record the steps in."""
    outputs, args, grid, constexprs = launch_arguments(gx, w_hh, h0, c0, lengths, config,
                                                       save=save, reverse=reverse, stamps=stamps)
    tile = KernelConfig(block_b=RING_ROWS, block_h=config.block_h, num_warps=WARPS)
    if not launch_resident(lstm_forward_ring_kernel, args, grid, constexprs, tile, gx.device,
                           "ring"):
        return None
    return outputs


def launch_arguments(gx, w_hh, h0, c0, lengths, config: KernelConfig, *, save: bool,
                     reverse: bool, stamps=None):
    """The outputs a launch writes, the kernel's arguments (the barrier counters of this
    device and stream among them), its grid and its compile-time constants."""
    T, B, G = gx.shape
    D = w_hh.shape[0]
    H = G // (4 * D)
    device, dtype = gx.device, gx.dtype
    y = torch.empty(T, B, D * H, dtype=dtype, device=device)
    h_n = torch.empty(D, B, H, dtype=dtype, device=device)
    c_state = torch.empty(D, B, H, dtype=torch.float32, device=device)
    gates = torch.empty(D, T, B, 4 * H, dtype=torch.float32, device=device) if save else None
    c_all = torch.empty(D, T, B, H, dtype=torch.float32, device=device) if save else None
    has_h0 = h0 is not None
    num_h = cdiv(H, config.block_h)
    args = (gx, w_hh, h0 if has_h0 else y, c0 if has_h0 else y,
            lengths if lengths is not None else c_state, y, h_n, c_state,
            gates if save else c_state, c_all if save else c_state,
            stamps if stamps is not None else c_state, barrier_counters(device), T, B,
            leader_increment(num_h))
    grid = (cdiv(B, RING_ROWS) * num_h, D)
    constexprs = kernel_constants(H, D, config, has_h0=has_h0, has_lengths=lengths is not None,
                                  save=save, reverse=reverse, stamps=stamps is not None)
    return (y, h_n, c_state, gates, c_all), args, grid, constexprs


def kernel_constants(hidden_size: int, directions: int, config: KernelConfig, *, has_h0: bool,
                     has_lengths: bool, save: bool, reverse: bool, stamps: bool = False) -> dict:
    """The kernel's compile-time constants for a layer and `config`'s tile (``stamps``: record
    each step's timeline)."""
    return dict(H=hidden_size, HP=padded(hidden_size), D=directions, BLOCK_H=config.block_h,
                BLOCK_K=BLOCK_K, STAGES=config.inner_stages, HAS_H0=has_h0,
                HAS_LENGTHS=has_lengths, SAVE=save, REVERSE=reverse, STAMPS=stamps)
