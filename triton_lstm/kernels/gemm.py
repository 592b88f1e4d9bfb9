"""A tiled GEMM whose dot precision the caller chooses: the layer's fp32 GEMMs under nn.LSTM's
TF32 rule.

nn.LSTM's cuDNN path runs its input projection and its gradient GEMMs in TF32 when cuDNN's
RNN may (``dispatch.cudnn_rnn_allows_tf32``). torch.matmul follows another flag,
``torch.backends.cuda.matmul.allow_tf32`` (off by default), and flipping a global flag
around a call is neither thread-safe nor traceable. This kernel takes the precision as an
argument instead. C = A @ B (+ bias over the columns), A [M, K] and B [K, N] of any
strides, accumulated in fp32, C in A's dtype. Program (m, n) owns a [BLOCK_M, BLOCK_N] tile
of C; programs are ordered in groups of GROUP_M tile rows so that neighbours share their
A and B tiles in L2.

An fp32 layer's GEMMs run here with ``dispatch.fp32_gemms = "triton"`` (the environment
variable TRITON_LSTM_FP32_GEMMS=triton; ``ops.layer_matmul``). perf/gemm_paths.py times it
against cuBLAS in fp32 and TF32, against cuDNN's 1x1 convolution, and in the layer.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .forward import dot_operands, rounded_to

# Hopper (sm_90): 128 x 128 tiles, 32-deep K chunks in 4 stages, 8 warps. ptxas (Triton 3.6)
# for fp32 with tf32: wgmma m64n128k8, cp.async, 128 KB of shared memory, 179-212 registers
# (the layer's three operand layouts: perf/sm90_report.py --gemm).
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, NUM_WARPS, NUM_STAGES = 128, 128, 32, 8, 8, 4


@triton.jit
def matmul_kernel(a, b, c, bias, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
                  stride_cn, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M tile rows walk the tile columns together.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    i_m = first_m + (pid % (GROUP_M * num_n)) % group_m
    i_n = (pid % (GROUP_M * num_n)) // group_m
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    # Offsets past 2**31 elements: T * B rows of 4H columns, as M (the projection) or as K
    # (dG^T x). The rows and columns start from 64-bit offsets; the K loop moves the
    # (64-bit) pointers on by one chunk at a time.
    o_k = tl.arange(0, BLOCK_K)
    p_a = a + tl.cast(o_m, tl.int64)[:, None] * stride_am + o_k[None, :] * stride_ak
    p_b = b + tl.cast(o_n, tl.int64)[None, :] * stride_bn + o_k[:, None] * stride_bk
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        m_k = k0 + o_k < K
        b_a = tl.load(p_a, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_a, b_b = dot_operands(b_a, b_b)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=DOT_PRECISION)
        p_a += BLOCK_K * stride_ak
        p_b += BLOCK_K * stride_bk
    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_c = c + tl.cast(o_m, tl.int64)[:, None] * stride_cm + o_n[None, :] * stride_cn
    tl.store(p_c, rounded_to(b_acc, c.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


def matmul(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
           precision: str = "ieee", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ b (+ bias), with tl.dot's input_precision `precision` ("ieee" or "tf32"), into
    ``out`` [M, N] (any strides) when given."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: expected a [M, K] and b [K, N], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dtype != b.dtype or (bias is not None and bias.shape != (b.shape[1],)):
        raise ValueError(f"matmul: a and b of one dtype, bias [N]; got {a.dtype}, {b.dtype}, "
                         f"{None if bias is None else tuple(bias.shape)}")
    M, K = a.shape
    N = b.shape[1]
    if out is not None and (out.shape != (M, N) or out.dtype != a.dtype):
        raise ValueError(f"matmul: out must be [{M}, {N}] {a.dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    c = torch.empty(M, N, dtype=a.dtype, device=a.device) if out is None else out
    if M == 0 or N == 0:
        return c
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    matmul_kernel[grid](a, b, c, bias if bias is not None else c, M, N, K, a.stride(0),
                        a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                        HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_M=BLOCK_M,
                        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=GROUP_M,
                        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return c
