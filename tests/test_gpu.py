"""GPU tests: the persistent kernels in every dtype, against a float64 reference.

Tolerance rule (as flash-attention's tests): the error of triton_lstm against a
float64 CPU reference may be at most twice the error of torch.nn.LSTM (cuDNN) in
the same dtype, plus a small slack of about one rounding step of the dtype.
Errors are relative to the reference's largest magnitude. Run by `make gpu-check`.
"""
import contextlib
import copy

import pytest
import torch

import triton_lstm
from triton_lstm import LSTMFunction
from triton_lstm.dispatch import KernelConfig, launch_counts
from triton_lstm.kernels.forward import lstm_forward

from .conftest import requires_cuda
from .helpers import float64_reference, outputs_and_grads, triton_copy

pytestmark = requires_cuda

DTYPES = {  # name: (dtype, allow tf32 in cuDNN and our kernels, slack)
    "fp32": (torch.float32, False, 2e-5),
    "fp32-tf32": (torch.float32, True, 1e-3),
    "bf16": (torch.bfloat16, False, 4e-3),
    "fp16": (torch.float16, False, 5e-4),
}

SHAPES = [  # T, B, I, H
    pytest.param((40, 1, 64, 512), id="T40-B1-H512"),
    pytest.param((32, 8, 256, 512), id="T32-B8-H512"),
    pytest.param((24, 64, 128, 1024), id="T24-B64-H1024"),
    pytest.param((16, 130, 64, 256), id="T16-B130-H256"),    # several batch blocks
    pytest.param((20, 5, 33, 768), id="T20-B5-I33-H768"),     # H not a power of two
    pytest.param((8, 3, 20, 2048), id="T8-B3-H2048"),         # weights streamed from L2
]


@contextlib.contextmanager
def tf32(enabled):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


def relative_error(got, want):
    want = want.double().cpu()
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_persistent_matches_float64_within_twice_cudnn_error(shape, dtype_name):
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, B, I, H = shape
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=dtype)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(1, B, H, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    before = launch_counts["persistent"]
    with tf32(allow_tf32):
        our_outs, our_grads, upstream = outputs_and_grads(ours, x, hx)
        torch_outs, torch_grads, _ = outputs_and_grads(torch_lstm, x, hx, upstream)
    assert launch_counts["persistent"] >= before + 2, "the persistent path did not run"
    ref_outs, ref_grads = float64_reference(torch_lstm, x, hx, upstream)
    names = ["y", "h_n", "c_n", "grad x", "grad h0", "grad c0",
             "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    for name, got, base, want in zip(names, our_outs + our_grads, torch_outs + torch_grads,
                                     ref_outs + ref_grads):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        ours_err, torch_err = relative_error(got, want), relative_error(base, want)
        assert ours_err <= 2 * torch_err + slack, (
            f"{name}: error {ours_err:.2e} vs nn.LSTM's {torch_err:.2e} (+{slack:.0e})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_runs_are_bitwise_equal_and_stepped_matches_persistent(dtype):
    T, B, I, H = 33, 8, 128, 512
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    params = list(torch_lstm.parameters())
    runs = []
    for force_stepped in (False, False, True):
        y, h, c, *_ = LSTMFunction.apply(x, None, None, *params, None, None, force_stepped)
        grads = torch.autograd.grad((y * 1.5).sum() + h.sum() - c.sum(), [x] + params)
        runs.append([y, h, c, *grads])
    for first, second, stepped in zip(*runs):
        assert torch.equal(first, second)
        assert torch.equal(first, stepped)


def test_streamed_weights_match_resident():
    T, B, I, H = 16, 8, 64, 256
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    params = list(torch_lstm.parameters())
    with torch.no_grad():
        resident = LSTMFunction.apply(x, None, None, *params, None, KernelConfig(16, 8, resident=True))
        streamed = LSTMFunction.apply(x, None, None, *params, None,
                                      KernelConfig(16, 8, resident=False, block_k=32))
    for a, b in zip(resident, streamed):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("form", ["stacked-bidir", "projected", "packed-bidir"])
def test_options_match_float64_within_twice_cudnn_error(form, dtype_name):
    """Two layers, both directions per launch, projections, packed sequences: same rule."""
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, B, I, H = 24, 6, 48, 128
    kwargs = dict(num_layers=2, bidirectional=form != "projected",
                  proj_size=64 if form == "projected" else 0)
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=dtype, **kwargs)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    if form == "packed-bidir":
        lengths = torch.tensor([24, 7, 19, 1, 24, 12])
        packed = torch.nn.utils.rnn.pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
        x = torch.nn.utils.rnn.PackedSequence(packed.data.requires_grad_(), packed.batch_sizes,
                                              packed.sorted_indices, packed.unsorted_indices)

    def run(module, upstream=None):
        out, (h, c) = module(x, None)
        data = out.data if form == "packed-bidir" else out
        if upstream is None:
            upstream = [torch.randn_like(t) for t in (data, h, c)]
        leaf = x.data if form == "packed-bidir" else x
        loss = sum((t * u).sum() for t, u in zip((data, h, c), upstream))
        grads = torch.autograd.grad(loss, [leaf] + list(module.parameters()))
        return [t.detach() for t in (data, h, c)] + list(grads), upstream

    with tf32(allow_tf32):
        ours_all, upstream = run(ours)
        torch_all, _ = run(torch_lstm, upstream)
    ref = torch.nn.LSTM(I, H, dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.double().cpu() for k, v in torch_lstm.state_dict().items()})
    if form == "packed-bidir":
        x = torch.nn.utils.rnn.PackedSequence(x.data.detach().double().cpu().requires_grad_(),
                                              x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = x.detach().double().cpu().requires_grad_()
    ref_all, _ = run(ref, [u.double().cpu() for u in upstream])
    for k, (got, base, want) in enumerate(zip(ours_all, torch_all, ref_all)):
        assert torch.isfinite(got).all(), f"tensor {k}: non-finite values"
        ours_err, torch_err = relative_error(got, want), relative_error(base, want)
        assert ours_err <= 2 * torch_err + slack, (
            f"tensor {k}: error {ours_err:.2e} vs nn.LSTM's {torch_err:.2e} (+{slack:.0e})")


def test_cuda_graph_replay():
    """The barrier counters reset themselves: replays of a captured forward stay correct."""
    T, B, H = 12, 8, 256
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.bfloat16)
    w_hh = torch.randn(1, 4 * H, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
    eager = lstm_forward(gx, w_hh, None, None, None, save=False)[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lstm_forward(gx, w_hh, None, None, None, save=False)      # warm up (compile) outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lstm_forward(gx, w_hh, None, None, None, save=False)[0]
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


# -- integration: AMP, torch.compile, CUDA graphs of a whole training step --------------------

class CharModel(torch.nn.Module):
    def __init__(self, lstm, vocab=50, width=64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.lstm = lstm
        self.head = torch.nn.Linear(lstm.hidden_size, vocab)

    def forward(self, tokens):
        y, _ = self.lstm(self.embed(tokens))
        return self.head(y)


def _char_model():
    torch.manual_seed(0)
    return CharModel(triton_lstm.LSTM(64, 128, num_layers=2, backend="triton")).cuda()


def _loss(model, tokens):
    logits = model(tokens[:-1])
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[1:].flatten())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_matches_nn_lstm_under_the_same_autocast(dtype):
    control = torch.nn.LSTM(64, 128, num_layers=2, device="cuda")
    ours = triton_copy(control)
    x = torch.randn(20, 8, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y, (h, c) = ours(x)
        y_control, _ = control(x)
    assert y.dtype == h.dtype == c.dtype == y_control.dtype == dtype
    ref = torch.nn.LSTM(64, 128, num_layers=2, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in control.state_dict().items()})
    want, _ = ref(x.double().cpu())
    slack = DTYPES["bf16" if dtype == torch.bfloat16 else "fp16"][2]
    assert relative_error(y, want) <= 2 * relative_error(y_control, want) + slack
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


def test_whole_training_step_captured_in_a_cuda_graph_replays_like_eager():
    model = _char_model()
    eager = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    static_tokens = torch.randint(0, 50, (33, 8), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm up: compile, caches, co-residency check
        for _ in range(2):
            _loss(copy.deepcopy(model), static_tokens).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = _loss(model, static_tokens)
        static_loss.backward()
        optimizer.step()
    for _ in range(3):
        tokens = torch.randint(0, 50, (33, 8), device="cuda")
        static_tokens.copy_(tokens)
        graph.replay()
        eager_optimizer.zero_grad()
        eager_loss = _loss(eager, tokens)
        eager_loss.backward()
        eager_optimizer.step()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)


def test_compile_reduce_overhead_training_matches_eager():
    triton_lstm.enable_fullgraph()
    try:
        model = _char_model()
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(4):
            tokens = torch.randint(0, 50, (33, 8), device="cuda")
            losses = []
            for m, fn in ((model, compiled), (eager, eager)):
                m.zero_grad()
                loss = _loss(fn, tokens)
                loss.backward()
                losses.append(loss.detach().clone())
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
    finally:
        triton_lstm.enable_fullgraph(False)
        torch._dynamo.reset()
