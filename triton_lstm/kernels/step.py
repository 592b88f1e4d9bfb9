"""One LSTM step in one launch: input projection, recurrent dot and cell update, fused.

For streaming inference (one step per request) the persistent kernels have
nothing to persist: with T = 1 there is no recurrence inside the launch, so no
grid barrier and no weights kept on chip. This kernel does, per layer,

    G   = x_t W_ih^T + h_{t-1} W_hh^T + b_ih + b_hh            # [B, 4H], fp32 accumulation
    c_t = f * c_{t-1} + i * g,   r_t = o * tanh(c_t)            # gates i, f, g, o

Dimensions: B batch rows, I input size, H hidden units, R size of h_{t-1}
(proj_size, or H without a projection). Program (p, b) owns hidden units
[p*BLOCK_H, (p+1)*BLOCK_H) *of all four gates* (the cell update is local, as in
the persistent kernels) and batch rows [b*BLOCK_B, (b+1)*BLOCK_B). It reads the
whole x_t and h_{t-1} rows of its batch block and streams its W_ih and W_hh
slices ([4*BLOCK_H, I] and [4*BLOCK_H, R], columns ordered unit-major,
gate-minor) from L2/HBM in BLOCK_K chunks, accumulating both dots into one
[BLOCK_B, 4*BLOCK_H] tile in fp32 (fp64 for fp64). At small batch the step is
bound by reading the weights once, so the tiles aim for about one program per
SM and one batch block (``step_config``).

It writes r_t in the input dtype, c_t in the state dtype (fp32; the module
casts c_n to the input dtype, as forward does) and, when asked, the activated
gates for the backward. With a projection (proj_size > 0) the caller computes
h_t = r_t W_hr^T afterwards (a torch matmul: it needs every program's r_t, i.e.
a grid-wide dependency that one launch without a barrier cannot have, and
cuBLAS does that GEMV as well as we would; autograd and Inductor see it).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .. import tuning
from ..dispatch import cdiv, dot_precision, next_power_of_2, state_dtype
from .forward import _tanh, gate_rows, rounded_to, streamed_dot


@triton.jit(do_not_specialize=["B"])
def lstm_step_kernel(
    x,         # [B, I]   x_t, input dtype
    h,         # [B, R]   h_{t-1}, input dtype (read when HAS_STATE)
    c,         # [B, H]   c_{t-1}, any float dtype (read when HAS_STATE)
    w_ih,      # [4H, I]  input dtype
    w_hh,      # [4H, R]  input dtype
    b_ih,      # [4H]     read when HAS_BIAS
    b_hh,      # [4H]     read when HAS_BIAS
    r_out,     # [B, H]   out: o * tanh(c_t) (h_t without a projection), input dtype
    c_out,     # [B, H]   out: c_t, state dtype (fp32, fp64 for fp64)
    gates,     # [B, 4H]  out when SAVE: activated i, f, g, o, state dtype
    B,
    I: tl.constexpr, H: tl.constexpr, R: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    ACC: tl.constexpr = c_out.dtype.element_ty
    # The K loops run over whole chunks; the tails are masked.
    IK: tl.constexpr = (I + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    RK: tl.constexpr = (R + BLOCK_K - 1) // BLOCK_K * BLOCK_K
    i_h = tl.program_id(0)
    i_b = tl.program_id(1)
    o_b = tl.cast(i_b * BLOCK_B + tl.arange(0, BLOCK_B), tl.int64)   # rows; B * 4H > 2**31
    o_u = i_h * BLOCK_H + tl.arange(0, BLOCK_H)         # own hidden units
    m_b = o_b < B
    m_u = o_u < H
    m_bu = m_b[:, None] & m_u[None, :]
    p_bu = o_b[:, None] * H + o_u[None, :]              # into [B, H]
    w_row, m_n = gate_rows(i_h, BLOCK_H, H)             # rows of W_ih, W_hh, bias

    b_acc = streamed_dot(x + o_b * I, m_b, w_ih + w_row * I, m_n, I, IK, 1, BLOCK_K,
                         DOT_PRECISION, ACC)
    if HAS_STATE:
        b_acc += streamed_dot(h + o_b * R, m_b, w_hh + w_row * R, m_n, R, RK, 1, BLOCK_K,
                              DOT_PRECISION, ACC)
    if HAS_BIAS:
        b_bias = (tl.load(b_ih + w_row, mask=m_n, other=0.0).to(ACC)
                  + tl.load(b_hh + w_row, mask=m_n, other=0.0).to(ACC))
        b_acc += b_bias[None, :]

    # [B, 4*BLOCK_H] -> four [B, BLOCK_H] gates (column n = 4 * unit + 2 * a + b).
    b_even, b_odd = tl.split(tl.reshape(b_acc, [BLOCK_B, BLOCK_H, 2, 2]))
    b_ai, b_ag = tl.split(b_even)
    b_af, b_ao = tl.split(b_odd)
    b_i = tl.sigmoid(b_ai)
    b_f = tl.sigmoid(b_af)
    b_g = _tanh(b_ag)
    b_o = tl.sigmoid(b_ao)
    if HAS_STATE:
        b_c = b_f * tl.load(c + p_bu, mask=m_bu, other=0.0).to(ACC) + b_i * b_g
    else:
        b_c = b_i * b_g
    b_r = b_o * _tanh(b_c)

    tl.store(r_out + p_bu, rounded_to(b_r, r_out.dtype.element_ty), mask=m_bu)
    tl.store(c_out + p_bu, b_c, mask=m_bu)
    if SAVE:
        p_g = gates + o_b[:, None] * (4 * H) + o_u[None, :]
        tl.store(p_g, b_i, mask=m_bu)
        tl.store(p_g + H, b_f, mask=m_bu)
        tl.store(p_g + 2 * H, b_g, mask=m_bu)
        tl.store(p_g + 3 * H, b_o, mask=m_bu)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Tile of one program: block_b batch rows x block_h hidden units (all four gates),
    reductions in block_k chunks; num_warps, num_stages (software pipelining of the K loops)."""
    block_b: int
    block_h: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def as_list(self) -> list[int]:
        return [self.block_b, self.block_h, self.block_k, self.num_warps, self.num_stages]

    @classmethod
    def from_list(cls, values: list[int]) -> "StepConfig":
        return cls(*values)


def step_config(batch: int, hidden_size: int, reduction: int, dtype: torch.dtype,
                num_sms: int) -> StepConfig:
    """Tiles for one step (a heuristic, not tuned on a GPU yet).

    - block_b: the whole batch in one block up to 64 rows (16 at least, the MMA's
      M), so each weight slice is read from memory once per step, which is the
      cost at small batch; larger batches in blocks of 64 rows.
    - block_h: the smallest of 4, 8, 16, 32 units that gives at most one program per
      SM (32 at most): as many programs as the SMs pull the weights at once.
    - block_k: 256 bytes of reduction per row (64 fp32, 128 bf16/fp16, 32 fp64),
      halved while the two operand tiles of a chunk exceed 8K elements (they
      travel through registers), never past the longest reduction (I or R).
    - num_warps: 4, 8 for accumulators of more than 4K cells.
    """
    block_b = min(64, max(16, next_power_of_2(batch)))
    num_b = cdiv(batch, block_b)
    block_h = 4
    while cdiv(hidden_size, block_h) * num_b > num_sms and block_h < 32:
        block_h *= 2
    block_k = min(128, 256 // dtype.itemsize)
    while (4 * block_h + block_b) * block_k > 8192 and block_k > 16:
        block_k //= 2
    block_k = min(block_k, max(16, next_power_of_2(reduction)))
    num_warps = 8 if block_b * 4 * block_h > 4096 else 4
    return StepConfig(block_b=block_b, block_h=block_h, block_k=block_k, num_warps=num_warps)


def pick_step_config(batch: int, hidden_size: int, reduction: int, dtype: torch.dtype,
                     device: torch.device) -> StepConfig:
    return step_config(batch, hidden_size, reduction, dtype, tuning.sm_count(device))


def lstm_step(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, *, save: bool,
              config: StepConfig | None = None):
    """One step of one layer, one launch.

    Args:
        x: [B, I] input, contiguous; h: [B, R] and c: [B, H] previous state
            (c in any float dtype), or both None for zeros.
        w_ih: [4H, I], w_hh: [4H, R], same dtype as x, contiguous; b_ih, b_hh: [4H] or both None.
        save: also return the activated gates (for the backward).
        config: a ``StepConfig``; ``pick_step_config`` when None.
    Returns:
        r [B, H] (o * tanh(c_t): h_t without a projection, input dtype), c_t [B, H]
        (state dtype: fp32, fp64 for fp64), gates [B, 4H] (state dtype) or None.

    Example:
        >>> r, c, _ = lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, save=False)
    """
    B, I = x.shape
    four_h, R = w_hh.shape
    H = four_h // 4
    if (h is None) != (c is None):
        raise ValueError("lstm_step: give both h and c, or neither (zeros)")
    device, dtype = x.device, x.dtype
    acc = state_dtype(dtype)
    config = config or pick_step_config(B, H, max(I, R), dtype, device)
    r = torch.empty(B, H, dtype=dtype, device=device)
    c_new = torch.empty(B, H, dtype=acc, device=device)
    gates = torch.empty(B, 4 * H, dtype=acc, device=device) if save else None
    has_state, has_bias = h is not None, b_ih is not None
    grid = (cdiv(H, config.block_h), cdiv(B, config.block_b))
    lstm_step_kernel[grid](
        x, h if has_state else x, c if has_state else x, w_ih, w_hh,
        b_ih if has_bias else w_ih, b_hh if has_bias else w_ih, r, c_new,
        gates if save else c_new, B,
        I=I, H=H, R=R, BLOCK_B=config.block_b, BLOCK_H=config.block_h, BLOCK_K=config.block_k,
        HAS_STATE=has_state, HAS_BIAS=has_bias, SAVE=save,
        DOT_PRECISION=dot_precision(dtype, device),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return r, c_new, gates
