"""kernels/gemm.py, the GEMM with a caller-chosen dot precision, under the interpreter:
against float64, for every layout the layer's GEMMs use (transposed operands, a bias,
sizes that are not multiples of the tiles); its custom op under vmap and torch.compile;
fp32 layers whose GEMMs run in it (dispatch.fp32_gemms = "triton")."""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import triton_lstm
from triton_lstm import dispatch
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
    # One rounding to bf16 at the end (to nearest: half an ulp, 2**-8 of the value), none
    # along the 300-term sum.
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-3)


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


# -- the op and the layer's GEMMs (dispatch.fp32_gemms = "triton") -----------------------------

def test_the_op_under_vmap_folds_mapped_rows_and_runs_mapped_weights_per_slice():
    a, b, bias = torch.randn(3, 5, 6), torch.randn(6, 4), torch.randn(4)
    rows = torch.vmap(lambda a_: torch.ops.triton_lstm.matmul(a_, b, bias, "ieee"))(a)
    want = a.double() @ b.double() + bias.double()
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=1e-5)
    bs = torch.randn(3, 6, 4)
    per_slice = torch.vmap(lambda b_: torch.ops.triton_lstm.matmul(a[0], b_, None, "ieee"))(bs)
    torch.testing.assert_close(per_slice.double(), a[0].double() @ bs.double(), rtol=1e-5,
                               atol=1e-5)


def test_the_op_compiles_fullgraph_with_its_fake_shape():
    a, b = torch.randn(7, 5), torch.randn(5, 3)
    compiled = torch.compile(lambda a_, b_: torch.ops.triton_lstm.matmul(a_, b_, None, "ieee") * 2,
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(a, b).double(), 2 * a.double() @ b.double(), rtol=1e-5,
                               atol=1e-5)


LAYERS = [
    pytest.param(dict(), None, None, id="plain"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=3), [5, 2, 4], None,
                 id="L2-bidir-proj-packed"),
    pytest.param(dict(bidirectional=True, proj_size=2), None, 2, id="bidir-proj-recompute2"),
]


def expected_gemm_calls(ref: torch.nn.LSTM, T: int, recompute: int) -> int:
    """The kernel calls of a forward and backward with every gradient wanted."""
    D = 2 if ref.bidirectional else 1
    projection = 1 if ref.proj_size else 0
    if not recompute:
        # gx (one GEMM for all directions), dx, dW_ih; per direction dW_hh (and dW_hr).
        per_layer = 3 + D * (1 + projection)
    else:
        # gx in the forward; per segment and direction gx again, dx, dW_ih, dW_hh (and dW_hr).
        segments = -(-T // recompute)
        per_layer = 1 + segments * D * (4 + projection)
    return ref.num_layers * per_layer


def outputs_and_grads(module, inp, leaf, upstream=None):
    """Output data, h_n, c_n and the gradients of x and every parameter, in float64."""
    out, (h, c) = module(inp)
    outs = (out.data if isinstance(out, PackedSequence) else out, h, c)
    if upstream is None:
        upstream = tuple(torch.randn_like(o) for o in outs)
    leaves = [leaf] + list(module.parameters())
    grads = torch.autograd.grad(sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream)),
                                leaves)
    return [t.detach().double() for t in outs + grads], upstream


@pytest.mark.parametrize("options, lengths, recompute", LAYERS)
def test_an_fp32_layer_with_its_gemms_in_the_kernel_matches_float64(gemm_calls, options,
                                                                    lengths, recompute):
    T, B, I, H = 5, 3, 4, 6
    ref = torch.nn.LSTM(I, H, **options)
    ours = triton_lstm.LSTM.from_torch(ref, backend="triton", recompute=recompute)

    def inputs(x):
        return x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths),
                                                              enforce_sorted=False)

    x = torch.randn(T, B, I, requires_grad=True)
    got, upstream = outputs_and_grads(ours, inputs(x), x)
    x64 = x.detach().double().requires_grad_()
    want, _ = outputs_and_grads(ref.double(), inputs(x64), x64, upstream)
    # Every GEMM of the forward and of the backward ran in the kernel, at nn.LSTM's rule
    # (exact on the CPU).
    assert gemm_calls == ["ieee"] * expected_gemm_calls(ref, T, recompute)
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=lambda m: f"output {k}: {m}")


def test_fp32_gemms_naming_an_unknown_engine_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "fp32_gemms", "cublas")
    layer = triton_lstm.LSTM(3, 4, backend="triton")
    with pytest.raises(ValueError, match=r"TRITON_LSTM_FP32_GEMMS .*torch, triton.*'cublas'"):
        layer(torch.randn(2, 1, 3))


@pytest.mark.parametrize("engine, dtype, rnn_tf32, expected", [
    ("triton", torch.float32, True, True),
    ("triton", torch.float32, False, False),    # exact fp32: cuBLAS's GEMM is the faster one
    ("triton", torch.bfloat16, True, False),
    ("triton", torch.float64, True, False),
    ("torch", torch.float32, True, False),
])
def test_on_a_gpu_the_kernel_takes_the_fp32_gemms_that_may_use_tf32(monkeypatch, engine, dtype,
                                                                   rnn_tf32, expected):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(dispatch, "cudnn_rnn_allows_tf32", lambda: rnn_tf32)
    monkeypatch.setattr(dispatch, "fp32_gemms", engine)
    assert dispatch.gemms_in_triton(dtype, torch.device("cuda")) is expected
    assert dispatch.gemms_in_triton(dtype, torch.device("cpu")) is False
