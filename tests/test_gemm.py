"""kernels/gemm.py, the GEMM with a caller-chosen dot precision, under the interpreter:
against float64, for every layout the layer's GEMMs use (transposed operands, a bias,
sizes that are not multiples of the tiles)."""
import pytest
import torch

from triton_lstm.kernels.gemm import matmul

from .conftest import requires_interpreter

pytestmark = requires_interpreter


@pytest.mark.parametrize("M, K, N", [(1, 1, 1), (37, 20, 130), (200, 65, 33), (129, 256, 128)])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_matmul_matches_float64(M, K, N, layout, with_bias):
    a = torch.randn(M, K) if layout[0] == "n" else torch.randn(K, M).t()
    b = torch.randn(K, N) if layout[1] == "n" else torch.randn(N, K).t()
    bias = torch.randn(N) if with_bias else None
    got = matmul(a, b, bias)
    want = a.double() @ b.double() + (bias.double() if with_bias else 0)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_matmul_in_bf16_accumulates_in_fp32():
    a, b = torch.randn(70, 300).bfloat16(), torch.randn(300, 40).bfloat16()
    got = matmul(a, b)
    want = a.double() @ b.double()
    assert got.dtype == torch.bfloat16
    # One rounding to bf16 at the end, none along the 300-term sum.
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=2 ** -8 * want.abs().max())


def test_empty_sizes():
    assert matmul(torch.randn(0, 5), torch.randn(5, 7)).shape == (0, 7)
    out = matmul(torch.randn(3, 0), torch.randn(0, 4), torch.ones(4))
    assert torch.equal(out, torch.ones(3, 4))


@pytest.mark.parametrize("a, b, bias, match", [
    (torch.randn(3, 4), torch.randn(5, 2), None, r"a \[M, K\] and b \[K, N\]"),
    (torch.randn(3, 4), torch.randn(4), None, r"a \[M, K\] and b \[K, N\]"),
    (torch.randn(3, 4), torch.randn(4, 2).double(), None, "one dtype"),
    (torch.randn(3, 4), torch.randn(4, 2), torch.randn(3), "bias"),
])
def test_bad_operands_are_refused_naming_them(a, b, bias, match):
    with pytest.raises(ValueError, match=match):
        matmul(a, b, bias)
