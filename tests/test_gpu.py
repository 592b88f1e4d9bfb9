"""GPU tests: the persistent kernels in every dtype, against a float64 reference.

Tolerance rule (as flash-attention's tests): the error of triton_lstm against a
float64 CPU reference may be at most twice the error of torch.nn.LSTM (cuDNN) in
the same dtype, plus a small slack of about one rounding step of the dtype.
Errors are relative to the reference's largest magnitude. Run by `make gpu-check`.
"""
import contextlib
import copy
import dataclasses

import pytest
import torch

import triton_lstm
from triton_lstm import LSTMFunction
from triton_lstm import dispatch
from triton_lstm.dispatch import KernelConfig, launch_counts
from triton_lstm.kernels.forward import lstm_forward

from .conftest import requires_cuda
from .helpers import (assert_identical, assert_within_twice_the_reference_error, chained_layers,
                      float64_copy, float64_reference, outputs_and_grads, relative_error,
                      stack_weights, triton_copy)

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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_persistent_matches_float64_within_twice_cudnn_error(shape, dtype_name):
    check_persistent_against_float64(shape, dtype_name)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[4]])
@pytest.mark.parametrize("dtype_name", ["fp32", "fp32-tf32"])
def test_fp32_gemms_in_the_kernel_match_float64_within_twice_cudnn_error(shape, dtype_name,
                                                                         gemm_calls):
    check_persistent_against_float64(shape, dtype_name)
    # gx, then dx, dW_ih and dW_hh in tf32 where cuDNN's RNN may use it; else cuBLAS's.
    assert gemm_calls == (["tf32"] * 4 if DTYPES[dtype_name][1] else [])


@pytest.mark.parametrize("shape", [pytest.param((16, 300, 96, 256), id="T16-B300-H256"),
                                   pytest.param((12, 512, 64, 1024), id="T12-B512-H1024")])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp16", "fp32-tf32"])
def test_bias_sums_in_the_kernel_match_float64_within_twice_cudnn_error(shape, dtype_name,
                                                                        monkeypatch):
    """TRITON_LSTM_BIAS_SUMS=kernel: the backward's streamed tiles sum dG for the bias
    gradient as they write it (B = 300: a last batch block of 44 rows)."""
    from triton_lstm.kernels import backward
    monkeypatch.setattr(dispatch, "bias_sums", "kernel")
    decided = []

    def recorded(config):
        decided.append(dispatch.bias_sums_in_kernel(config))
        return decided[-1]
    monkeypatch.setattr(backward, "bias_sums_in_kernel", recorded)
    check_persistent_against_float64(shape, dtype_name)
    assert decided == [True], decided


def check_persistent_against_float64(shape, dtype_name):
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
    assert_within_twice_the_reference_error(our_outs + our_grads, torch_outs + torch_grads,
                                            ref_outs + ref_grads, slack, names)


@pytest.mark.parametrize("config", [None, "bb64-bh16-str-bk64-sk4-w8-gs"],
                         ids=["default", "gate-split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_two_runs_are_bitwise_equal_and_stepped_matches_persistent(dtype, config):
    from triton_lstm.tuning import config_from_label
    config = config and config_from_label(config)
    T, B, I, H = 33, 8, 128, 512
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    params = list(torch_lstm.parameters())
    runs = []
    for force_stepped in (False, False, True):
        y, h, c, *_ = LSTMFunction.apply(x, None, None, *params, None, config, force_stepped)
        grads = torch.autograd.grad((y * 1.5).sum() + h.sum() - c.sum(), [x] + params)
        runs.append([y, h, c, *grads])
    for k, (first, second, stepped) in enumerate(zip(*runs)):
        assert_identical(second, first, f"output {k}, again")
        assert_identical(stepped, first, f"output {k}, stepped")


@pytest.mark.parametrize("proj_size", [0, 128], ids=["", "proj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_in_step_chunks_is_bitwise_the_one_launch(dtype, proj_size):
    """Persistent launches from later steps (RESUMED) over the same gx and outputs: h from
    y and c from the kernel's state carry exactly what one launch keeps on chip."""
    T, B, H = 33, 64, 512
    R = proj_size or H
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=dtype)
    w_hh = torch.randn(1, 4 * H, R, device="cuda", dtype=dtype) / R ** 0.5
    w_hr = torch.randn(1, R, H, device="cuda", dtype=dtype) / H ** 0.5 if proj_size else None
    h0 = torch.randn(1, B, R, device="cuda", dtype=dtype)
    c0 = torch.randn(1, B, H, device="cuda", dtype=dtype)
    lengths = torch.randint(1, T + 1, (B,), device="cuda", dtype=torch.int32)
    before = launch_counts["persistent"]
    whole = lstm_forward(gx, w_hh, h0, c0, lengths, w_hr, save=True)
    chunked = lstm_forward(gx, w_hh, h0, c0, lengths, w_hr, save=True,
                           step_chunks=[(0, 10), (10, 11), (11, 33)])
    assert launch_counts["persistent"] >= before + 4, "the persistent path did not run"
    for k, (a, b) in enumerate(zip(whole, chunked)):
        if a is not None:
            assert_identical(b, a, f"output {k}")


@pytest.mark.parametrize("shape", [pytest.param((8, 128, 64, 1024), id="T8-B128-H1024"),
                                   SHAPES[5]])
def test_fp64_on_streamed_tiles_matches_float64(shape):
    """fp64 layers and steps accumulate in fp64 on the tiles that stream their weights (Triton
    3.6 refused their fp64 accumulators), and match a float64 nn.LSTM to fp64 rounding."""
    T, B, I, H = shape
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=torch.float64)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(1, B, H, device="cuda", dtype=torch.float64, requires_grad=True)
               for _ in range(2))
    before = launch_counts["persistent"]
    our_outs, our_grads, upstream = outputs_and_grads(ours, x, hx)
    assert launch_counts["persistent"] >= before + 2, "the persistent path did not run"
    with torch.no_grad():
        y_step, (h_step, c_step) = ours.step(x[0], hx)
    ref_outs, ref_grads = float64_reference(torch_lstm, x, hx, upstream)
    with torch.no_grad():
        want_y, want_state = float64_copy(torch_lstm)(x[:1].detach().cpu(),
                                                      tuple(s.detach().cpu() for s in hx))
    names = ["y", "h_n", "c_n", "grad x", "grad h0", "grad c0",
             "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh", "step y", "step h", "step c"]
    for name, got, want in zip(names, our_outs + our_grads + [y_step, h_step, c_step],
                               ref_outs + ref_grads + [want_y[0], *want_state]):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10,
                                   msg=lambda detail: f"{name}: {detail}")


def float64_layer(torch_lstm, x):
    """A float64 copy of a one-layer torch_lstm on the CPU, and x as a float64 leaf there."""
    return float64_copy(torch_lstm), x.detach().cpu().double().requires_grad_()


def test_streamed_weights_match_resident():
    T, B, I, H = 16, 8, 64, 256
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    params = list(torch_lstm.parameters())
    with torch.no_grad():
        resident = LSTMFunction.apply(x, None, None, *params, None, KernelConfig(16, 8, resident=True))
        streamed = LSTMFunction.apply(x, None, None, *params, None,
                                      KernelConfig(16, 8, resident=False, block_k=32))
        ref, x64 = float64_layer(torch_lstm, x)
        y64, (h64, c64) = ref(x64)
    assert_within_twice_the_reference_error(streamed[:3], resident[:3], [y64, h64[0], c64[0]],
                                            DTYPES["bf16"][2], ["y", "h_n", "c_n"],
                                            theirs_name="resident weights")


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
    if form == "packed-bidir":   # the permutations move with the data
        x = torch.nn.utils.rnn.PackedSequence(x.data.detach().double().cpu().requires_grad_(),
                                              x.batch_sizes, x.sorted_indices.cpu(),
                                              x.unsorted_indices.cpu())
    else:
        x = x.detach().double().cpu().requires_grad_()
    ref_all, _ = run(ref, [u.double().cpu() for u in upstream])
    assert_within_twice_the_reference_error(ours_all, torch_all, ref_all, slack)


@pytest.mark.parametrize("label", [None, "bb16-bh16-res-bk64-sk1-w4-cl"],
                         ids=["counter", "cluster"])
def test_cuda_graph_replay(label):
    """The barrier counters reset themselves, and a cluster launch is captured as one:
    replays of a captured forward stay correct."""
    from triton_lstm.tuning import config_from_label
    config = label and config_from_label(label)
    T, B, H = 12, 8, 256
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.bfloat16)
    w_hh = torch.randn(1, 4 * H, H, device="cuda", dtype=torch.bfloat16) / H ** 0.5
    eager = lstm_forward(gx, w_hh, None, None, None, save=False, config=config)[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):    # warm up (compile) outside capture
        lstm_forward(gx, w_hh, None, None, None, save=False, config=config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lstm_forward(gx, w_hh, None, None, None, save=False, config=config)[0]
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_identical(captured, eager, "y replayed")


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
def test_autocast_computes_in_the_autocast_dtype_within_twice_nn_lstms_error_there(dtype):
    """Ours follows the autocast dtype. nn.LSTM's cuDNN path casts to float16 under any
    autocast (torch's AutocastRNN), so its error is taken from a copy in ``dtype`` itself."""
    control = torch.nn.LSTM(64, 128, num_layers=2, device="cuda")
    ours = triton_copy(control)
    x = torch.randn(20, 8, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y, (h, c) = ours(x)
    assert y.dtype == h.dtype == c.dtype == dtype
    y_control, _ = copy.deepcopy(control).to(dtype)(x.to(dtype))
    ref = torch.nn.LSTM(64, 128, num_layers=2, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in control.state_dict().items()})
    want, _ = ref(x.double().cpu())
    slack = DTYPES["bf16" if dtype == torch.bfloat16 else "fp16"][2]
    assert relative_error(y, want) <= 2 * relative_error(y_control, want) + slack
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("chunked", [None, "backward_chunks", "forward_chunks"],
                         ids=["", "backward-chunks", "forward-chunks"])
def test_whole_training_step_captured_in_a_cuda_graph_replays_like_eager(chunked, monkeypatch):
    """With chunks, eager runs their GEMMs on the side stream, the capture on its own."""
    if chunked:
        monkeypatch.setattr(dispatch, chunked, 4)
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


@pytest.mark.parametrize("chunked", ["backward_chunks", "forward_chunks"],
                         ids=["backward-chunks", "forward-chunks"])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_chunked_layer_matches_float64_within_twice_the_one_launch_error(dtype_name, chunked,
                                                                         monkeypatch):
    """The backward (or the forward) in 4 chunks, each chunk's GEMMs on the side stream beside
    a chunk's recurrence (overlap.py), called from a stream of the caller's own. The chunks'
    GEMMs are not bitwise the whole ones (weight gradients are sums over the chunks; cuBLAS
    may pick other kernels for fewer rows): both against float64."""
    dtype, _, slack = DTYPES[dtype_name]
    T, B, I, H = 64, 64, 128, 512
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=dtype)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    hx = tuple(torch.randn(1, B, H, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(2))
    monkeypatch.setattr(dispatch, chunked, 0)
    before = launch_counts["persistent"]
    one_outs, one_grads, upstream = outputs_and_grads(ours, x, hx)
    one_launch = launch_counts["persistent"] - before
    monkeypatch.setattr(dispatch, chunked, 4)
    before = launch_counts["persistent"]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outs, grads, _ = outputs_and_grads(ours, x, hx, upstream)
    torch.cuda.current_stream().wait_stream(stream)
    # (each launch of the chunked kernel in the one-launch call is four here)
    assert launch_counts["persistent"] - before >= one_launch + 3, "the layer ran unchunked"
    ref_outs, ref_grads = float64_reference(torch_lstm, x, hx, upstream)
    names = ["y", "h_n", "c_n", "grad x", "grad h0", "grad c0",
             "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    assert_within_twice_the_reference_error(outs + grads, one_outs + one_grads,
                                            ref_outs + ref_grads, slack, names,
                                            theirs_name="the one-launch layer")


def test_compile_reduce_overhead_training_matches_eager():
    triton_lstm.enable_fullgraph()
    try:
        model = _char_model()
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        compiled_launches = 0
        for _ in range(4):
            tokens = torch.randint(0, 50, (33, 8), device="cuda")
            losses = []
            for m, fn in ((model, compiled), (eager, eager)):
                m.zero_grad()
                before = sum(launch_counts.values())
                loss = _loss(fn, tokens)
                loss.backward()
                if fn is compiled:
                    compiled_launches += sum(launch_counts.values()) - before
                losses.append(loss.detach().clone())
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-4)
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)
        # The compiled model runs the kernels (its warm-up and capture launch them through
        # Python; replays do not count), not nn.LSTM.
        assert compiled_launches > 0, "the compiled model ran no kernel"
    finally:
        triton_lstm.enable_fullgraph(False)
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_compiled_gradients_through_the_final_state_equal_eager(dtype_name):
    """torch.compile runs the kernels, and every output of a bidirectional stack takes its
    gradient as in eager, h_n and c_n included (test_compat's twin on the GPU machines' torch:
    torch 2.11's Dynamo sent compiled calls to nn.LSTM, and dropped c_n's gradient)."""
    dtype, allow_tf32, _ = DTYPES[dtype_name]
    triton_lstm.enable_fullgraph()
    try:
        ours = triton_lstm.LSTM(64, 128, num_layers=2, bidirectional=True, backend="triton",
                                device="cuda", dtype=dtype)

        def loss(x):
            y, (h, c) = ours(x)
            return (y.float().sin().sum() + h.float().square().sum()
                    + c.float().square().sum())

        compiled = torch.compile(loss, fullgraph=True)
        x = torch.randn(20, 8, 64, device="cuda", dtype=dtype, requires_grad=True)
        with tf32(allow_tf32):
            before = sum(launch_counts.values())
            got = torch.autograd.grad(compiled(x), [x, *ours.parameters()])
            assert sum(launch_counts.values()) > before, "the compiled call ran no kernel"
            want = torch.autograd.grad(loss(x), [x, *ours.parameters()])
        # Inductor fuses the ops around the kernels its own way: equal up to rounding, where
        # a dropped gradient is off by its whole size.
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        names = ["x"] + [name for name, _ in ours.named_parameters()]
        for name, g, w in zip(names, got, want):
            assert relative_error(g, w) <= limit, name
    finally:
        triton_lstm.enable_fullgraph(False)
        torch._dynamo.reset()


# -- one step (streaming inference): LSTM.step -------------------------------------------------

def _stepped(step, x, hx, upstream=None):
    """Run `step(x_t, state) -> (y_t, state)` over x, backprop random upstream gradients from
    every y_t and the final (h, c) into x, hx and nothing else; returns (tensors, upstream)."""
    ys, state = [], hx
    for x_t in x.unbind(0):
        y_t, state = step(x_t, state)
        ys.append(y_t)
    outs = (torch.stack(ys),) + tuple(state)
    if upstream is None:
        upstream = [torch.randn_like(o) for o in outs]
    loss = sum((o.float() * u.float()).sum() for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, [x, *hx])
    return [o.detach() for o in outs] + list(grads), upstream


def _length_one_steps(module):
    """A step function that runs nn.LSTM on a length-1 sequence: y_t [B, H_out], state."""
    def step(x_t, state):
        y, state = module(x_t.unsqueeze(0), state)
        return y[0], state
    return step


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("num_layers, proj_size", [(1, 0), (2, 0), (2, 64)],
                         ids=["L1", "L2", "L2-proj"])
@pytest.mark.parametrize("batch", [1, 8, 70], ids=["B1", "B8", "B70"])   # 70: two batch blocks
def test_step_loop_matches_float64_within_twice_cudnn_error(dtype_name, num_layers, proj_size,
                                                            batch):
    """Stepping with LSTM.step against nn.LSTM stepped the same way (T = 1 per call, c in the
    input dtype between calls), both measured against a float64 run of the whole sequence."""
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, I, H = 12, 96, 256
    torch_lstm = torch.nn.LSTM(I, H, num_layers, proj_size=proj_size, device="cuda", dtype=dtype)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, batch, I, device="cuda", dtype=dtype, requires_grad=True)
    hx = (torch.randn(num_layers, batch, proj_size or H, device="cuda", dtype=dtype,
                      requires_grad=True),
          torch.randn(num_layers, batch, H, device="cuda", dtype=dtype, requires_grad=True))
    with tf32(allow_tf32):
        ours_all, upstream = _stepped(ours.step, x, hx)
        torch_all, _ = _stepped(_length_one_steps(torch_lstm), x, hx, upstream)
    ref = torch.nn.LSTM(I, H, num_layers, proj_size=proj_size, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in torch_lstm.state_dict().items()})
    x64 = x.detach().double().cpu().requires_grad_()
    hx64 = tuple(s.detach().double().cpu().requires_grad_() for s in hx)
    y64, (h64, c64) = ref(x64, hx64)
    outs64 = (y64, h64, c64)
    loss = sum((o * u.double().cpu()).sum() for o, u in zip(outs64, upstream))
    ref_all = [o.detach() for o in outs64] + list(torch.autograd.grad(loss, [x64, *hx64]))
    names = ["y", "h_n", "c_n", "grad x", "grad h0", "grad c0"]
    assert_within_twice_the_reference_error(ours_all, torch_all, ref_all, slack, names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("proj_size", [0, 64], ids=["plain", "proj"])
def test_step_loop_captured_in_a_cuda_graph_replays_like_eager(dtype, proj_size):
    """The README's recipe: state in buffers passed as hx and out=, one step captured, replayed."""
    L, B, I, H, T = 2, 4, 64, 256, 6
    ours = triton_lstm.LSTM(I, H, num_layers=L, proj_size=proj_size, device="cuda",
                            dtype=dtype).eval()
    xs = torch.randn(T, B, I, device="cuda", dtype=dtype)
    x_buf = torch.zeros(B, I, device="cuda", dtype=dtype)
    h_buf = torch.zeros(L, B, proj_size or H, device="cuda", dtype=dtype)
    c_buf = torch.zeros(L, B, H, device="cuda", dtype=dtype)
    with torch.no_grad():
        eager_ys, state = [], (h_buf.clone(), c_buf.clone())
        for x_t in xs:
            y_t, state = ours.step(x_t, state)
            eager_ys.append(y_t)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ours.step(x_buf, (h_buf, c_buf))                     # warm-up: compiles, no out=
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_buf, _ = ours.step(x_buf, (h_buf, c_buf), out=(h_buf, c_buf))
    for _ in range(2):
        h_buf.zero_()
        c_buf.zero_()
        for t in range(T):
            x_buf.copy_(xs[t])
            y_buf.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert_identical(y_buf, eager_ys[t], f"y of step {t}")
        assert_identical(h_buf, state[0], "h")
        assert_identical(c_buf, state[1], "c")


# -- resets, recompute, long sequences ------------------------------------------------------

@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_resets_match_the_plain_pytorch_layers_within_twice_their_error(dtype_name):
    """The kernels with resets against the same math in plain PyTorch (reference.py) in the
    same dtype, both against float64."""
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, B, I, H = 48, 6, 64, 128
    ours = triton_lstm.LSTM(I, H, num_layers=2, bidirectional=True, device="cuda", dtype=dtype,
                            backend="triton")
    plain = triton_lstm.LSTM.from_torch(ours, backend="torch")
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    reset = torch.rand(T, B, device="cuda") < 0.1
    results = []
    with tf32(allow_tf32):
        for module, inp in ((ours, x), (plain, x)):
            out, (h, c) = module(inp, reset=reset)
            grads = torch.autograd.grad(out.float().square().sum() + h.float().sum(),
                                        [x, *module.parameters()])
            results.append([out, h, c, *grads])
    ref = triton_lstm.LSTM.from_torch(ours.to_torch().double().cpu(), backend="torch")
    x64 = x.detach().double().cpu().requires_grad_()
    out, (h, c) = ref(x64, reset=reset.cpu())
    grads = torch.autograd.grad(out.square().sum() + h.sum(), [x64, *ref.parameters()])
    for k, (got, base, want) in enumerate(zip(*results, [out, h, c, *grads])):
        assert torch.isfinite(got).all(), k
        assert relative_error(got, want) <= 2 * relative_error(base, want) + slack, k


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_recompute_gradients_match_float64_within_twice_saving_every_steps_error(dtype_name):
    """Recomputing from checkpoints sums the weight gradients segment by segment, and its
    segments' input GEMMs may round differently from the whole sequence's: not bitwise the
    saving path's numbers, so both are measured against float64."""
    dtype, _, slack = DTYPES[dtype_name]
    T, B, I, H = 200, 8, 64, 256
    saving = triton_lstm.LSTM(I, H, bidirectional=True, device="cuda", dtype=dtype,
                              backend="triton")
    recomputing = triton_lstm.LSTM.from_torch(saving, backend="triton", recompute=32)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
    runs = []
    for module in (saving, recomputing):
        out, (h, c) = module(x)
        runs.append(torch.autograd.grad(out.float().square().sum() + c.float().sum(),
                                        [x, *module.parameters()]))
    ref = triton_lstm.LSTM.from_torch(saving.to_torch().double().cpu(), backend="torch")
    x64 = x.detach().double().cpu().requires_grad_()
    out, (h, c) = ref(x64)
    wants = torch.autograd.grad(out.square().sum() + c.sum(), [x64, *ref.parameters()])
    for k, (got, base, want) in enumerate(zip(runs[1], runs[0], wants)):
        assert torch.isfinite(got).all(), k
        assert relative_error(got, want) <= 2 * relative_error(base, want) + slack, k


def test_100k_steps_train_with_recompute_like_float64():
    """cuDNN fails from T = 65,536 (pytorch/pytorch#133751); the kernels take any T."""
    T, B, I, H = 100_000, 2, 16, 32
    ours = triton_lstm.LSTM(I, H, device="cuda", backend="triton", recompute=1000)
    x = torch.randn(T, B, I, device="cuda", requires_grad=True)
    # Exact fp32 (no tf32), against float64 alone: no nn.LSTM runs this T on the GPU to set a
    # bound by, so it is fixed, far above fp32's rounding and far below a wrong segment's error.
    with tf32(False):
        out, (h, c) = ours(x)
        grads = torch.autograd.grad(out[-100:].sum() + c.sum(), [x, *ours.parameters()])
    ref = ours.to_torch().double().cpu()
    x64 = x.detach().double().cpu().requires_grad_()
    out64, (h64, c64) = ref(x64)
    grads64 = torch.autograd.grad(out64[-100:].sum() + c64.sum(), [x64, *ref.parameters()])
    for k, (got, want) in enumerate(zip([out, h, c, *grads], [out64, h64, c64, *grads64])):
        assert relative_error(got, want) < 1e-3, k


def test_forward_past_2_31_elements_equals_the_same_forward_in_chunks():
    """T * B * 4H > 2**31: every index into the per-step tensors is 64-bit."""
    T, B, H, chunk = 70_000, 32, 512, 7_000     # fp32: c carries between chunks unrounded
    ours = triton_lstm.LSTM(H, H, device="cuda", backend="triton").eval()
    x = torch.randn(T, B, H, device="cuda")
    with torch.no_grad(), tf32(False):
        whole, (h, c) = ours(x)
        state = None
        for start in range(0, T, chunk):
            part, state = ours(x[start:start + chunk], state)
            torch.testing.assert_close(part, whole[start:start + chunk], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, start=start: f"chunk at {start}: {m}")
    torch.testing.assert_close(state, (h, c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("label", ["bb16-bh8-res-bk64-sk4-w4", "bb16-bh8-res-bk64-sk1-w4-pa",
                                   "bb64-bh16-str-bk64-sk4-w8-st3", "bb64-bh16-str-bk64-sk4-w8-st3-pa",
                                   "bb64-bh32-str-bk64-sk4-w8-st3", "bb64-bh16-str-bk64-sk4-w8-gs",
                                   "bb64-bh16-str-bk64-sk4-w8-st3-gs", "bb16-bh8-chk-bk64-sk4-w4"])
def test_schedule_variants_compute_what_the_default_computes(label):
    """Split reductions, pipelined K loops, loads after the arrival, the backward's gate
    split and chunks in several accumulators (perf/variants.py)."""
    from triton_lstm.tuning import config_from_label
    T, B, I, H = 24, 40, 64, 512
    torch_lstm = torch.nn.LSTM(I, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = list(torch_lstm.parameters())
    runs = []
    for config in (None, config_from_label(label)):
        y, h, c, *_ = LSTMFunction.apply(x, None, None, *params, None, config)
        grads = torch.autograd.grad(y.float().square().sum() + c.float().sum(), [x] + params)
        runs.append([y, h, c, *grads])
    ref, x64 = float64_layer(torch_lstm, x)
    y64, (h64, c64) = ref(x64)
    want = [y64, h64[0], c64[0], *torch.autograd.grad(y64.square().sum() + c64.sum(),
                                                       [x64, *ref.parameters()])]
    names = ["y", "h_n", "c_n", "grad x", "grad w_ih", "grad w_hh", "grad b_ih", "grad b_hh"]
    assert_within_twice_the_reference_error(runs[1], runs[0], want, DTYPES["bf16"][2], names,
                                            theirs_name="the default config")


@pytest.mark.timeout(120)     # a dataflow wait that never ends fails here instead of hanging
@pytest.mark.parametrize("label", ["bb16-bh8-res-bk64-sk1-w4-df", "bb16-bh8-res-bk64-sk4-w4-df",
                                   "bb64-bh16-str-bk64-sk4-w8-df"])
def test_dataflow_waits_compute_what_the_barrier_computes_nan_and_inf_included(label):
    from triton_lstm.tuning import config_from_label
    config = config_from_label(label)
    T, B, I, H = 64, 8 if config.block_b == 16 else 64, 64, 512
    torch_lstm = torch.nn.LSTM(I, H, bidirectional=True, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    x[10, 0, :4] = float("nan")
    x[20, 1, :4] = float("inf")
    x.requires_grad_()
    params = list(torch_lstm.parameters())
    w_ih = torch.cat([params[0], params[4]])
    w_hh = torch.stack([params[1], params[5]])
    b_ih, b_hh = torch.cat([params[2], params[6]]), torch.cat([params[3], params[7]])
    runs = []
    for run_config in (dataclasses.replace(config, dataflow=False), config):
        before = launch_counts["persistent"]
        y, h, c, *_ = LSTMFunction.apply(x, None, None, w_ih, w_hh, b_ih, b_hh, None, run_config)
        grads = torch.autograd.grad(y.float().nan_to_num().sum() + c.float().nan_to_num().sum(),
                                    [x, w_hh])
        assert launch_counts["persistent"] >= before + 2
        runs.append([y, h, c, *grads])
    for k, (barrier, dataflow) in enumerate(zip(*runs)):
        assert_identical(dataflow, barrier, f"output {k}")


def forwards_with_nan_and_inf(configs, count, flag):
    """lstm_forward of both directions (fp16, T = 32, B = 8, H = 256; gx with a NaN in row 0
    at step 5 and an inf in gate o of row 1 at step 9) under each config, its outputs up to
    c_all. Each run counts one launch_counts[count] where its config has `flag`; all runs
    put their NaNs in the same places. Returns gx, w_hh and the runs."""
    T, B, H = 32, 8, 256
    gx = torch.randn(T, B, 8 * H, device="cuda", dtype=torch.float16)
    gx[5, 0, :4] = float("nan")
    gx[9, 1, 3 * H:3 * H + 4] = float("inf")      # o = sigmoid(inf) = 1: row 1 stays finite
    w_hh = (torch.randn(2, 4 * H, H, device="cuda") / H ** 0.5).half()
    runs = []
    for config in configs:
        before = launch_counts[count]
        runs.append(lstm_forward(gx, w_hh, None, None, None, save=True, config=config)[:5])
        assert launch_counts[count] == before + getattr(config, flag)
    for k, outputs in enumerate(zip(*runs)):
        assert outputs[0].isnan().any(), k
        for other in outputs[1:]:
            assert_identical(other.isnan(), outputs[0].isnan(), f"the NaNs of output {k}")
    return gx, w_hh, runs


def assert_equal_but_for_nans(runs):
    """Two runs' outputs equal element for element, NaN where NaN (forwards_with_nan_and_inf
    and backwards_with_nan_and_inf have found the NaNs in the same places)."""
    for k, (first, second) in enumerate(zip(*runs)):
        assert_identical(second, first, f"output {k}")


def backwards_with_nan_and_inf(configs, count, flag):
    """lstm_backward of both directions (fp16, T = 32, B = 8, H = 256; dy with a NaN in row 0
    at step 20 and an inf in row 1 at step 9) on one forward's saved values under each
    config, its dG, dh0 and dc0. Each run counts one launch_counts[count] where its config
    has `flag`; all runs put their NaNs in the same places. Returns gx, w_hh, dy and the
    runs."""
    from triton_lstm.kernels.backward import lstm_backward
    T, B, H = 32, 8, 256
    gx = torch.randn(T, B, 8 * H, device="cuda", dtype=torch.float16)
    w_hh = (torch.randn(2, 4 * H, H, device="cuda") / H ** 0.5).half()
    gates, c_all = lstm_forward(gx, w_hh, None, None, None, save=True)[3:5]
    dy = torch.randn(T, B, 2 * H, device="cuda", dtype=torch.float16)
    dy[20, 0, :4] = float("nan")
    dy[9, 1, H:H + 4] = float("inf")
    runs = []
    for config in configs:
        before = launch_counts[count]
        runs.append(lstm_backward(dy, None, None, gates, c_all, None, None, w_hh,
                                  config=config)[:3])
        assert launch_counts[count] == before + getattr(config, flag)
    for k, outputs in enumerate(zip(*runs)):
        assert outputs[0].isnan().any(), k
        for other in outputs[1:]:
            assert_identical(other.isnan(), outputs[0].isnan(), f"the NaNs of output {k}")
    return gx, w_hh, dy, runs


def outputs_and_gradients(module, x, hx, lengths, upstream=None):
    """A layer's outputs (packed data where `lengths`) and the gradients of their sum against
    `upstream` (random when None) for the input, the parameters and the state, and upstream."""
    leaf = x.detach().requires_grad_()
    inputs = leaf
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = packed.data.detach().requires_grad_()
        inputs = torch.nn.utils.rnn.PackedSequence(leaf, packed.batch_sizes,
                                                   packed.sorted_indices, packed.unsorted_indices)
    state = None if hx is None else tuple(t.detach().requires_grad_() for t in hx)
    out, (h, c) = module(inputs, state)
    outs = (out.data if lengths is not None else out, h, c)
    if upstream is None:
        upstream = [torch.randn_like(t) for t in outs]
    loss = sum((t * u).sum() for t, u in zip(outs, upstream))
    grads = torch.autograd.grad(loss, [leaf] + list(module.parameters()) + list(state or ()))
    return [t.detach() for t in outs] + list(grads), upstream


def layer_within_twice_cudnn_error(form, batch, hidden, dtype_name, forced, count, launches):
    """A layer of 40 steps of 64 inputs ("plain"; "packed-bidir": both directions, packed
    lengths; "state": an initial h and c) run with the `forced` configs counts `launches`
    more launch_counts[count], and its outputs and every gradient lie within twice nn.LSTM's
    error of float64."""
    from triton_lstm.tuning import forced_configs
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, I = 40, 64
    torch_lstm = torch.nn.LSTM(I, hidden, bidirectional=form == "packed-bidir", device="cuda",
                               dtype=dtype)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, batch, I, device="cuda", dtype=dtype)
    lengths = torch.randint(1, T + 1, (batch,)) if form == "packed-bidir" else None
    hx = (tuple(torch.randn(1, batch, hidden, device="cuda", dtype=dtype) for _ in range(2))
          if form == "state" else None)
    before = launch_counts[count]
    with tf32(allow_tf32), forced_configs(**forced):
        ours_all, upstream = outputs_and_gradients(ours, x, hx, lengths)
    assert launch_counts[count] == before + launches
    with tf32(allow_tf32):
        torch_all, _ = outputs_and_gradients(torch_lstm, x, hx, lengths, upstream)
    to64 = [t.detach().cpu().double() for t in (hx or ())]
    ref_all, _ = outputs_and_gradients(float64_copy(torch_lstm), x.cpu().double(), to64 or None,
                                       lengths, [u.cpu().double() for u in upstream])
    assert_within_twice_the_reference_error(ours_all, torch_all, ref_all, slack)


def assert_replays_like_eager(run, static_input, count, outputs):
    """`run()` captured in a CUDA graph after an eager call (which compiles): each replay, with
    new values in `static_input`, equals an eager call in its first `outputs` outputs, and
    an eager call counts one launch_counts[count]."""
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(2):
        static_input.copy_(torch.randn_like(static_input))
        before = launch_counts[count]
        graph.replay()
        eager = run()
        assert launch_counts[count] == before + 1
        for k in range(outputs):
            assert_identical(captured[k], eager[k], f"output {k} replayed")


# The forward and the backward with their weights in registers (kernels/forward_registers.py,
# kernels/backward_registers.py); where they do not run, the config's tl tile does.
REGISTERS = "bb16-bh8-res-bk64-sk1-w4-rg"
# The registers forward pushing h through each batch block's cluster (EXCHANGE).
PUSHED = "bb16-bh8-res-bk64-sk1-w4-df-ds-rg"


@pytest.mark.timeout(120)     # a dataflow wait that never ends fails here instead of hanging
@pytest.mark.parametrize("form, batch, hidden, dtype_name, knobs, kernels", [
    ("packed-bidir", 8, 512, "bf16", {}, "forward"),
    ("packed-bidir", 8, 512, "bf16", {}, "backward"),
    ("packed-bidir", 8, 512, "bf16", {}, "both"),
    ("plain", 8, 512, "fp16", {}, "both"),
    ("plain", 8, 256, "fp16", {}, "backward"),
    ("packed-bidir", 13, 256, "fp16", {}, "both"),  # two batch blocks, the second of 5 rows
    ("state", 3, 50, "bf16", {}, "both"),   # h0 and c0; the last unit block part empty
    ("plain", 24, 200, "bf16", {}, "both"),
    ("plain", 8, 512, "fp16", {"H_LOAD_BYTES": 4}, "both"),   # the mma.sync fragments' layout
    ("packed-bidir", 8, 256, "bf16", {"POLL_BACKOFF_NS": 200}, "both"),   # a pause between polls
    ("packed-bidir", 8, 256, "fp32-tf32", {}, "both"),    # fp32 in tf32, as nn.LSTM may
    ("state", 5, 100, "fp32-tf32", {}, "both"),
    # The backward with two warps a gate, each with half of its reduction (past H = 512,
    # fp32 256); the forward's tl tile feeds it. (Grids of at most 96 programs of 8 warps,
    # one an SM: resident on any H100 or H200.)
    ("plain", 8, 1024, "fp16", {}, "backward"),
    ("packed-bidir", 8, 768, "bf16", {}, "backward"),
    ("plain", 12, 768, "fp16", {}, "backward"),    # two batch blocks, the second of 4 rows
    ("state", 5, 700, "bf16", {}, "backward"),     # the second halves partly past H
    ("packed-bidir", 8, 512, "fp32-tf32", {}, "backward"),
    ("packed-bidir", 8, 512, "fp16", {"backward_registers.SPLITS": 2}, "backward"),  # by choice
])
def test_registers_kernels_match_float64_within_twice_cudnn_error(form, batch, hidden,
                                                                  dtype_name, knobs, kernels,
                                                                  monkeypatch):
    """Outputs and every gradient of a layer whose forward, backward or both ran in the
    registers kernels (the forward's saved gates feed either backward), against float64,
    with both directions in one grid, packed lengths, an initial state, partial unit and
    batch blocks. The knobs are the forward module's (the backward reads them too), or
    another's where they name it ("module.NAME")."""
    from triton_lstm.tuning import config_from_label
    for knob, value in knobs.items():
        module, _, name = knob.rpartition(".")
        monkeypatch.setattr(f"triton_lstm.kernels.{module or 'forward_registers'}.{name}", value)
    config = config_from_label(REGISTERS)
    plain = dataclasses.replace(config, registers=False)
    forced = dict(forward=config if kernels != "backward" else plain,
                  backward=config if kernels != "forward" else plain)
    layer_within_twice_cudnn_error(form, batch, hidden, dtype_name, forced, "registers",
                                   2 if kernels == "both" else 1)


@pytest.mark.timeout(120)
def test_registers_forward_with_nan_and_inf_input_ends_and_matches_the_barrier_path():
    """A NaN or inf in the data is never taken for the unwritten mark: the kernel ends, its
    NaNs are the barrier path's, and the rows without NaN match float64 as closely."""
    from triton_lstm.reference import lstm_layer_reference
    from triton_lstm.tuning import config_from_label
    config = config_from_label(REGISTERS)
    gx, w_hh, runs = forwards_with_nan_and_inf(
        (dataclasses.replace(config, registers=False), config), "registers", "registers")
    H = w_hh.shape[2]
    finite = slice(1, None)      # rows are independent: row 0 alone has a NaN
    # gx through an identity W_ih: inf * 0 would be NaN there, and sigmoid(1e4) is 1 exactly.
    want = lstm_layer_reference(gx[:, finite].cpu().double().nan_to_num(posinf=1e4), None, None,
                                torch.eye(8 * H, dtype=torch.float64), w_hh.cpu().double())
    barrier, registers = ([y[:, finite], h[:, finite], c[:, finite]] for y, h, c, *_ in runs)
    assert_within_twice_the_reference_error(registers, barrier, want, DTYPES["fp16"][2],
                                            ["y", "h_n", "c_n"], theirs_name="the barrier path")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("label, count", [(REGISTERS, "registers"), (PUSHED, "clustered")],
                         ids=["reading", "pushed"])
def test_registers_forward_replays_from_a_cuda_graph_like_eager(label, count):
    """The launch and the fill of its polled slots (or the clustered launch pushing h) are
    captured: each replay equals an eager call on the same input."""
    from triton_lstm.tuning import config_from_label
    config = config_from_label(label)
    T, B, H = 16, 8, 256
    w_hh = (torch.randn(1, 4 * H, H, device="cuda") / H ** 0.5).half()
    static_gx = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.float16)
    assert_replays_like_eager(
        lambda: lstm_forward(static_gx, w_hh, None, None, None, save=False, config=config),
        static_gx, count, 3)


def small_layer_problem(form, batch, hidden, dtype_name, T=24):
    """A layer's recurrences' inputs (T steps, I = H, both directions where `form` is
    "packed-bidir", with lengths; an initial state, dh_n and dc_n where it is "state"): gx,
    w_hh, h0, c0, lengths, dy, dh_n, dc_n (None where the form has none)."""
    dtype = DTYPES[dtype_name][0]
    D = 2 if form == "packed-bidir" else 1
    gx = torch.randn(T, batch, D * 4 * hidden, device="cuda", dtype=dtype)
    w_hh = (torch.randn(D, 4 * hidden, hidden, device="cuda") / hidden ** 0.5).to(dtype)
    dy = torch.randn(T, batch, D * hidden, device="cuda", dtype=dtype)
    h0 = c0 = lengths = dh_n = dc_n = None
    if form == "state":
        h0, c0, dh_n = torch.randn(3, D, batch, hidden, device="cuda", dtype=dtype)
        dc_n = torch.randn(D, batch, hidden, device="cuda")
    if form == "packed-bidir":
        lengths = torch.randint(1, T + 1, (batch,), device="cuda", dtype=torch.int32)
    return gx, w_hh, h0, c0, lengths, dy, dh_n, dc_n


def assert_pushing_equals_reading(run):
    """`run(config)` with the registers kernels reading their state from L2 and pushing it
    through their cluster (PUSHED): a registers launch each, the second in clusters, and
    bitwise equal outputs (the same MMAs and sums in the same order on the same values),
    all finite."""
    from triton_lstm.tuning import config_from_label
    pushing = config_from_label(PUSHED)
    runs = []
    with tf32(True):
        for config in (dataclasses.replace(pushing, dsmem=False), pushing):
            before = launch_counts.copy()
            runs.append(run(config))
            assert launch_counts["registers"] == before["registers"] + 1
            assert launch_counts["clustered"] == before["clustered"] + config.dsmem
    for k, (read, pushed) in enumerate(zip(*runs)):
        assert torch.isfinite(read).all(), k
        assert_identical(pushed, read, f"output {k} pushed")


@pytest.mark.timeout(120)    # a push that never lands traps (dsmem.WAIT_LIMIT) before this
@pytest.mark.parametrize("form, batch, hidden, dtype_name, knobs", [
    ("packed-bidir", 8, 256, "fp16", {}),        # clusters of 16 programs of 4 warps
    ("packed-bidir", 8, 512, "bf16", {}),        # of 8 warps
    ("state", 13, 256, "fp16", {}),              # two batch blocks, the second of 5 rows
    ("state", 3, 250, "bf16", {}),               # the last program with 10 units of 16
    ("plain", 1, 64, "bf16", {}),                # programs of one warp
    ("state", 3, 30, "fp16", {}),                # clusters of 8, the last with 2 units
    ("state", 3, 100, "fp16", {}),               # 13 programs of units, 3 without: 16
    ("plain", 8, 256, "fp16", {"EXCHANGE_WARPS": 8}),   # clusters of 8 programs of 8 warps
    ("packed-bidir", 8, 256, "fp32-tf32", {}),
    ("state", 5, 30, "fp32-tf32", {}),
    ("packed-bidir", 8, 512, "fp16", {"PUSH_BYTES": 8}),   # fours of units a push
    ("state", 3, 30, "bf16", {"PUSH_BYTES": 8}),
])
def test_registers_forward_with_pushed_h_computes_what_it_computes_reading_it(
        form, batch, hidden, dtype_name, knobs, monkeypatch):
    """The registers forward with h pushed through each batch block's cluster (kernels/
    forward_registers.py, EXCHANGE) against the same kernel reading h from L2: bitwise equal
    outputs, saved gates and c (the same MMAs in the same order, the same h), with both
    directions in one grid, packed lengths, an initial state, partial unit and batch blocks,
    programs of one warp to eight, clusters with programs of no units, 16-bit h pushed in
    pairs and in fours of units."""
    from triton_lstm.kernels import forward_registers
    for name, value in knobs.items():
        monkeypatch.setattr(forward_registers, name, value)
    gx, w_hh, h0, c0, lengths, *_ = small_layer_problem(form, batch, hidden, dtype_name)
    assert_pushing_equals_reading(
        lambda config: lstm_forward(gx, w_hh, h0, c0, lengths, save=True, config=config)[:5])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_registers_kernels_with_pushed_state_and_nan_and_inf_input_end_as_reading_it(kernel):
    """The push waits on bytes, never on values: NaN and inf in the input (the backward's:
    in the gradients) change nothing about when a step ends, and the outputs equal those of
    the kernel reading h (dG) from L2."""
    from triton_lstm.tuning import config_from_label
    config = config_from_label(PUSHED)
    with_nan_and_inf = (forwards_with_nan_and_inf if kernel == "forward"
                        else backwards_with_nan_and_inf)
    runs = with_nan_and_inf((dataclasses.replace(config, dsmem=False), config), "clustered",
                            "dsmem")[-1]
    assert_equal_but_for_nans(runs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kernel, label", [
    ("forward", "bb16-bh8-res-bk64-sk1-w4"), ("forward", "bb16-bh8-res-bk64-sk1-w4-df"),
    ("forward", REGISTERS), ("forward", PUSHED), ("forward", "bb64-bh16-str-bk64-sk4-w8-st5-rn"),
    ("backward", "bb16-bh8-res-bk64-sk1-w4"), ("backward", "bb32-bh32-str-bk64-sk4-w8-st3-gs"),
    ("backward", REGISTERS), ("backward", PUSHED)])
def test_a_kernel_recording_its_timeline_computes_the_same_and_stamps_every_step(kernel, label):
    """kernels/timeline.py: stamps change nothing a kernel computes, and every program records
    every step (the backward: stage) in order: it begins, has what it waits for (where it
    waits on the data, after at least one poll), stores its part, then begins the next; on
    one SM throughout."""
    from triton_lstm.kernels import timeline
    from triton_lstm.kernels.backward import lstm_backward
    from triton_lstm.tuning import config_from_label
    config = config_from_label(label)
    T, B, H = 12, 8, 256
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.float16)
    w_hh = (torch.randn(1, 4 * H, H, device="cuda") / H ** 0.5).half()
    h0, c0 = torch.randn(2, 1, B, H, device="cuda", dtype=torch.float16)
    if kernel == "forward":
        def run(stamps=None):
            return lstm_forward(gx, w_hh, h0, c0, None, save=True, config=config, stamps=stamps)
    else:
        _, _, _, gates, c_all, *_ = lstm_forward(gx, w_hh, h0, c0, None, save=True)
        dy = torch.randn(T, B, H, device="cuda", dtype=torch.float16)

        def run(stamps=None):
            return lstm_backward(dy, None, None, gates, c_all, c0, None, w_hh, config=config,
                                 stamps=stamps)
    plain = run()
    stamps = timeline.stamps_buffer(T, "cuda")
    # the Gluon kernels' own tiles: registers forward 8 rows x 4 units, backward 8 x 16; ring
    # 64 x BLOCK_H
    kind, block_b, block_h = (("registers", 8, 16 if kernel == "backward" or config.dsmem
                               else 4)     # pushing h: programs of 4 warps at H = 256
                              if config.registers else
                              ("ring", 64, config.block_h) if config.ring else
                              ("persistent", config.block_b, config.block_h))
    before = launch_counts[kind]
    stamped = run(stamps)
    assert launch_counts[kind] == before + 1
    for k, (a, b) in enumerate(zip(plain, stamped)):
        assert (a is None) == (b is None), k
        if a is not None:
            assert_identical(b, a, f"output {k} stamped")
    programs = -(-H // block_h) * -(-B // block_b)
    stamps = stamps.cpu()
    assert (stamps[:, programs:] == 0).all()
    s = stamps[:, :programs]
    begins, arrived, stored = (s[..., e] for e in (timeline.STEP_BEGINS, timeline.WAIT_ENDS,
                                                   timeline.STORED))
    assert (begins > 0).all() and (stored >= begins).all()
    assert (begins[1:] >= stored[:-1]).all()
    sm = s[..., timeline.SM]
    assert (sm == sm[0]).all() and (sm >= 0).all()     # a program stays on its SM
    if config.registers:
        assert (arrived >= begins).all() and (stored >= arrived).all()
        assert (s[..., timeline.POLLS] >= 1).all()
    else:
        assert (arrived == 0).all()


# The forward with its weights in shared memory and h in a ring of copies
# (kernels/forward_ring.py); where it does not run, the config's tl tile does.
RING = "bb64-bh16-str-bk64-sk4-w8-st5-rn"


@pytest.mark.timeout(120)     # a barrier that never opens fails here instead of hanging
@pytest.mark.parametrize("form, batch, hidden, dtype_name, label", [
    ("packed-bidir", 64, 256, "bf16", RING),
    ("plain", 128, 1024, "fp16", RING),
    ("plain", 128, 1024, "bf16", RING),
    ("state", 70, 200, "bf16", RING),        # two batch blocks, the second of 6 rows; 13 blocks
    ("packed-bidir", 64, 512, "fp16", "bb64-bh8-str-bk64-sk4-w8-st5-rn"),   # 128 programs
    ("plain", 64, 1000, "bf16", "bb64-bh16-str-bk64-sk4-w8-st3-rn"),   # a ring of 3
    ("state", 64, 130, "fp16", "bb64-bh8-str-bk64-sk4-w8-st8-rn"),     # deeper than the chunks
])
def test_ring_forward_matches_float64_within_twice_cudnn_error(form, batch, hidden, dtype_name,
                                                               label):
    """Outputs and every gradient of a layer whose forward ran in the ring kernel (its saved
    gates feed the tl backward), against float64: both directions in one grid, packed
    lengths, an initial state, partial unit and batch blocks, H not a power of two."""
    from triton_lstm.tuning import config_from_label
    layer_within_twice_cudnn_error(form, batch, hidden, dtype_name,
                                   dict(forward=config_from_label(label)), "ring", 1)


@pytest.mark.timeout(120)
def test_ring_forward_equals_its_tl_tile_on_nan_input_and_replays_from_a_cuda_graph():
    """A NaN or inf in the input flows as in the tl tile's forward (the same NaNs, the other
    rows as close to float64), and a CUDA-graph replay equals an eager call."""
    from triton_lstm.reference import lstm_layer_reference
    from triton_lstm.tuning import config_from_label
    config = config_from_label(RING)
    T, B, H = 16, 128, 512
    w_hh = (torch.randn(1, 4 * H, H, device="cuda") / H ** 0.5).half()
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.float16)
    gx[3, 0, 5] = float("nan")
    gx[5, 0, 7] = float("inf")
    runs = []
    for run_config, ring_launches in ((dataclasses.replace(config, ring=False), 0), (config, 1)):
        before = launch_counts["ring"]
        runs.append(lstm_forward(gx, w_hh, None, None, None, save=False, config=run_config))
        assert launch_counts["ring"] == before + ring_launches
    for k in range(3):
        assert runs[1][k].isnan().any(), k
        assert_identical(runs[1][k].isnan(), runs[0][k].isnan(), f"the NaNs of output {k}")
    finite = slice(1, None)      # rows are independent: row 0 alone has a NaN and an inf
    want = lstm_layer_reference(gx[:, finite].cpu().double(), None, None,
                                torch.eye(4 * H, dtype=torch.float64), w_hh.cpu().double())
    tl_tile, ring = ([y[:, finite], h[:, finite], c[:, finite]] for y, h, c, *_ in runs)
    assert_within_twice_the_reference_error(ring, tl_tile, want, DTYPES["fp16"][2],
                                            ["y", "h_n", "c_n"], theirs_name="the tl tile")

    static_gx = gx.nan_to_num()
    assert_replays_like_eager(
        lambda: lstm_forward(static_gx, w_hh, None, None, None, save=True, config=config),
        static_gx, "ring", 5)


@pytest.mark.timeout(120)
def test_registers_backward_with_nan_and_inf_input_ends_and_matches_the_barrier_path():
    """A NaN or inf in the gradients is never taken for the unwritten mark: the backward ends,
    its NaNs are the barrier path's, and the rows without NaN match float64 as closely."""
    from triton_lstm.reference import lstm_layer_reference
    from triton_lstm.tuning import config_from_label
    config = config_from_label(REGISTERS)
    gx, w_hh, dy, runs = backwards_with_nan_and_inf(
        (dataclasses.replace(config, registers=False), config), "registers", "registers")
    H = w_hh.shape[2]
    # Rows are independent: rows 2.. have neither, against float64 (gx through an identity
    # W_ih, so the gradient of gx is dG).
    rows = slice(2, None)
    leaf = gx[:, rows].cpu().double().requires_grad_()
    y, h_n, c_n = lstm_layer_reference(leaf, None, None, torch.eye(8 * H, dtype=torch.float64),
                                       w_hh.cpu().double())
    want = torch.autograd.grad((y * dy[:, rows].cpu().double()).sum(), leaf)
    assert_within_twice_the_reference_error([runs[1][0][:, rows]], [runs[0][0][:, rows]], want,
                                            DTYPES["fp16"][2], ["dG"],
                                            theirs_name="the barrier path")


@pytest.mark.timeout(120)    # a push that never lands traps (dsmem.WAIT_LIMIT) before this
@pytest.mark.parametrize("form, batch, hidden, dtype_name, knobs", [
    ("packed-bidir", 8, 256, "fp16", {}),     # clusters of 16 programs of 4 warps
    ("state", 13, 256, "bf16", {}),           # two batch blocks, the second of 5 rows
    ("state", 3, 100, "fp16", {}),            # clusters of 7, the last program with 4 units
    ("state", 3, 200, "bf16", {}),            # 13 programs of units, 3 without: 16
    ("plain", 1, 64, "bf16", {}),
    ("packed-bidir", 8, 256, "fp32-tf32", {}),
    ("packed-bidir", 8, 512, "bf16", {}),     # 16 programs of 8 warps, 32 units each
    ("plain", 8, 512, "fp16", {}),
    ("state", 3, 300, "fp16", {}),            # 10 programs of units (the last 12), 6 without
    ("plain", 8, 256, "fp16", {"EXCHANGE_UNIT_WARPS": 2}),    # clusters of 8 of 8 warps
    ("packed-bidir", 8, 512, "fp16", {"PUSH_BYTES": 8}),      # fours of units a push
    ("state", 3, 100, "bf16", {"PUSH_BYTES": 8}),
])
def test_registers_backward_with_pushed_dg_computes_what_it_computes_reading_it(
        form, batch, hidden, dtype_name, knobs, monkeypatch):
    """The registers backward with dG pushed through each batch block's cluster (kernels/
    backward_registers.py, EXCHANGE) against the same kernel reading dG from L2 (programs of
    16 units), on one forward's saved values: bitwise equal dG, dh0 and dc0 (the same MMAs
    and sums in the same order, the same dG), with both directions in one grid, packed
    lengths, dh_n and dc_n, c0, partial unit and batch blocks, programs of 16 and 32 units,
    clusters with programs of no units, 16-bit dG pushed in pairs and in fours of units."""
    from triton_lstm.kernels import backward_registers
    from triton_lstm.kernels.backward import lstm_backward
    for name, value in knobs.items():
        monkeypatch.setattr(backward_registers, name, value)
    gx, w_hh, h0, c0, lengths, dy, dh_n, dc_n = small_layer_problem(form, batch, hidden,
                                                                    dtype_name)
    with tf32(True):
        gates, c_all = lstm_forward(gx, w_hh, h0, c0, lengths, save=True)[3:5]
    assert_pushing_equals_reading(
        lambda config: lstm_backward(dy, dh_n, dc_n, gates, c_all, c0, lengths, w_hh,
                                     config=config)[:3])


@pytest.mark.timeout(120)
def test_registers_backward_replays_from_a_cuda_graph_like_eager():
    """The launch and the fill of its polled slots are both captured: each replay equals an
    eager call on the same upstream gradient."""
    from triton_lstm.kernels.backward import lstm_backward
    from triton_lstm.tuning import config_from_label
    config = config_from_label(REGISTERS)
    T, B, H = 16, 8, 256
    gx = torch.randn(T, B, 4 * H, device="cuda", dtype=torch.float16)
    w_hh = (torch.randn(1, 4 * H, H, device="cuda") / H ** 0.5).half()
    gates, c_all = lstm_forward(gx, w_hh, None, None, None, save=True)[3:5]
    static_dy = torch.randn(T, B, H, device="cuda", dtype=torch.float16)
    lstm_backward(static_dy, None, None, gates, c_all, None, None, w_hh, config=config)  # compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lstm_backward(static_dy, None, None, gates, c_all, None, None, w_hh,
                                 config=config)
    for _ in range(2):
        static_dy.copy_(torch.randn_like(static_dy))
        before = launch_counts["registers"]
        graph.replay()
        eager = lstm_backward(static_dy, None, None, gates, c_all, None, None, w_hh,
                              config=config)
        assert launch_counts["registers"] == before + 1
        for k in range(3):
            assert_identical(captured[k], eager[k], f"output {k} replayed")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("form, hidden, label", [
    ("packed-bidir", 256, "bb16-bh16-res-bk64-sk1-w4-cl"),      # clusters of 16 programs
    ("packed-bidir", 512, "bb16-bh32-res-bk64-sk4-w8-cl"),
    ("projected", 256, "bb16-bh32-res-bk64-sk1-w4-cl"),         # of 8, two phases a step
    ("packed-bidir", 256, "bb16-bh16-res-bk64-sk1-w4-cl-ds"),   # the forward pushes h
    ("packed-bidir", 512, "bb16-bh32-res-bk64-sk1-w4-cl-ds"),
    ("projected", 256, "bb16-bh32-res-bk64-sk1-w4-cl-ds"),      # no push with a projection
])
def test_cluster_barrier_computes_what_the_counter_barrier_computes(form, hidden, label):
    """The same tiles meeting at the hardware cluster barrier (or in the forward, pushing h
    into each other's shared memory, kernels/dsmem.py) and at the counter: bitwise equal
    outputs and gradients (only how the programs wait and exchange h differs), with both
    directions in one grid, packed lengths, a projection, the backward; every batch block
    a cluster. A push that never completes traps (dsmem.WAIT_LIMIT) before the timeout."""
    from triton_lstm.tuning import config_from_label, forced_configs
    config = config_from_label(label)
    T, B, I = 48, 24, 64
    torch_lstm = torch.nn.LSTM(I, hidden, bidirectional=form == "packed-bidir",
                               proj_size=64 if form == "projected" else 0, device="cuda",
                               dtype=torch.bfloat16)
    ours = triton_copy(torch_lstm)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    if form == "packed-bidir":
        lengths = torch.randint(1, T + 1, (B,))
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = packed.data.requires_grad_()
        x = torch.nn.utils.rnn.PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices,
                                              packed.unsorted_indices)
    else:
        leaf = x.requires_grad_()
    runs = []
    for run_config in (dataclasses.replace(config, cluster=False, dsmem=False), config):
        before = launch_counts["clustered"]
        # The backward's push sums dh in another order: its own test below.
        with forced_configs(forward=run_config,
                            backward=dataclasses.replace(run_config, dsmem=False)):
            out, (h, c) = ours(x)
            y = out.data if form == "packed-bidir" else out
            grads = torch.autograd.grad(y.float().square().sum() + c.float().sum(),
                                        [leaf] + list(ours.parameters()))
        assert launch_counts["clustered"] == before + (2 if run_config.cluster else 0)
        runs.append([y, h, c, *grads])
    for k, (counter, cluster) in enumerate(zip(*runs)):
        assert torch.isfinite(counter).all(), k
        assert_identical(cluster, counter, f"output {k} in the cluster")


@pytest.mark.timeout(120)
def test_pushed_h_with_nan_and_inf_input_ends_and_equals_the_counter_path():
    """The push waits on bytes, never on values: NaN and inf in the input change nothing
    about when a step ends (dsmem.py), and the forward equals the counter path's bitwise."""
    from triton_lstm.tuning import config_from_label
    config = config_from_label("bb16-bh16-res-bk64-sk1-w4-cl-ds")
    _, _, runs = forwards_with_nan_and_inf(
        (dataclasses.replace(config, cluster=False, dsmem=False), config), "clustered", "dsmem")
    assert_equal_but_for_nans(runs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("hidden, label, dtype_name", [
    (256, "bb16-bh16-res-bk64-sk1-w4-cl-ds", name) for name in ("fp32", "bf16", "fp16")] + [
    (512, "bb16-bh32-res-bk64-sk1-w4-cl-ds", name) for name in ("bf16", "fp16")])  # fp32: 295 KB
def test_pushed_shares_of_dh_match_float64_within_twice_cudnn_error(hidden, label, dtype_name):
    """The backward exchanging shares of dh through distributed shared memory (a reduce-
    scatter, kernels/dsmem.py) sums them in another order than the other paths: its
    gradients against float64, with both directions in one grid and packed lengths."""
    from triton_lstm.tuning import config_from_label, forced_configs
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    config = config_from_label(label)
    T, B, I = 40, 24, 64
    torch_lstm = torch.nn.LSTM(I, hidden, bidirectional=True, device="cuda", dtype=dtype)
    ours = triton_copy(torch_lstm)
    lengths = torch.randint(1, T + 1, (B,))
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)

    def run(module, x, upstream=None):
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        leaf = packed.data.detach().requires_grad_()
        out, (h, c) = module(torch.nn.utils.rnn.PackedSequence(
            leaf, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices))
        if upstream is None:
            upstream = [torch.randn_like(t) for t in (out.data, h, c)]
        loss = sum((t * u).sum() for t, u in zip((out.data, h, c), upstream))
        grads = torch.autograd.grad(loss, [leaf] + list(module.parameters()))
        return [t.detach() for t in (out.data, h, c)] + list(grads), upstream

    before = launch_counts["clustered"]
    with tf32(allow_tf32), forced_configs(forward=config, backward=config):
        ours_all, upstream = run(ours, x)
    assert launch_counts["clustered"] == before + 2
    with tf32(allow_tf32):
        torch_all, _ = run(torch_lstm, x, upstream)
    ref = torch.nn.LSTM(I, hidden, bidirectional=True, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in torch_lstm.state_dict().items()})
    ref_all, _ = run(ref, x.double().cpu(), [u.double().cpu() for u in upstream])
    assert_within_twice_the_reference_error(ours_all, torch_all, ref_all, slack)


# -- stacked layers as one wavefront (kernels/wavefront.py) ------------------------------------

@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("batch, hidden, packed", [(1, 512, False), (8, 256, True),
                                                   (70, 256, False)],
                         ids=["B1-H512", "B8-H256-packed", "B70-H256"])   # 70: batch blocks
def test_wavefront_matches_float64_within_twice_cudnn_error(dtype_name, batch, hidden, packed):
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, I, L = 32, 96, 3
    torch_lstm = torch.nn.LSTM(I, hidden, num_layers=L, device="cuda", dtype=dtype)
    ours = triton_copy(torch_lstm, wavefront=True)
    x = torch.randn(T, batch, I, device="cuda", dtype=dtype)
    lengths = torch.randint(1, T + 1, (batch,)) if packed else None

    def run(module, x, upstream=None):
        x = x.detach().requires_grad_()
        inp = (torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
               if packed else x)
        out, (h, c) = module(inp)
        data = out.data if packed else out
        if upstream is None:
            upstream = [torch.randn_like(t) for t in (data, h, c)]
        loss = sum((t * u.to(t.device, t.dtype)).sum() for t, u in zip((data, h, c), upstream))
        grads = torch.autograd.grad(loss, [x, *module.parameters()])
        return [t.detach() for t in (data, h, c)] + list(grads), upstream

    before = launch_counts["persistent"]
    with tf32(allow_tf32):
        ours_all, upstream = run(ours, x)
        torch_all, _ = run(torch_lstm, x, upstream)
    # One persistent launch each for the forward and the backward wavefront.
    assert launch_counts["persistent"] == before + 2, "not one persistent wavefront each way"
    ref = torch.nn.LSTM(I, hidden, num_layers=L, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in torch_lstm.state_dict().items()})
    ref_all, _ = run(ref, x.double().cpu(), [u.double().cpu() for u in upstream])
    assert_within_twice_the_reference_error(ours_all, torch_all, ref_all, slack)


@pytest.mark.timeout(120)     # a barrier or a wait that never ends fails instead of hanging
def test_wavefront_is_deterministic_stepped_dataflow_equal_persistent_and_nan_input_ends():
    from triton_lstm import tuning
    from triton_lstm.autograd import lstm_stack_wavefront
    from triton_lstm.kernels.wavefront import wavefront_config
    T, B, I, H, L = 40, 8, 64, 512, 3
    config = wavefront_config(B, H, L, torch.bfloat16, tuning.sm_count(torch.device("cuda")))
    torch_lstm = torch.nn.LSTM(I, H, num_layers=L, device="cuda", dtype=torch.bfloat16)
    weights = stack_weights(torch_lstm)
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    x[5, 0, :3] = float("nan")
    x[9, 1, :3] = float("inf")
    runs = []
    for run_config, force_stepped in ((config, False), (config, False), (config, True),
                                      (dataclasses.replace(config, dataflow=True), False)):
        xg = x.clone().requires_grad_()
        before = launch_counts["persistent"]
        y, h, c = lstm_stack_wavefront(xg, None, None, weights, config=run_config,
                                       force_stepped=force_stepped)
        assert launch_counts["persistent"] == before + (not force_stepped)
        grads = torch.autograd.grad(y.float().nan_to_num().sum() + c.float().nan_to_num().sum(),
                                    [xg, weights[1][1]])
        runs.append([y, h, c, *grads])
    for k, (first, *others) in enumerate(zip(*runs)):
        for run_name, other in zip(("again", "stepped", "dataflow"), others):
            assert_identical(other, first, f"output {k} {run_name}")
    assert runs[0][0][:, 2:].isfinite().all()      # rows without NaN input stay finite


def test_wavefront_cuda_graph_replay():
    """Inference captured in a CUDA graph: each replay runs the whole stack on the new input."""
    T, B, I, H, L = 16, 4, 64, 256, 2
    torch_lstm = torch.nn.LSTM(I, H, num_layers=L, device="cuda", dtype=torch.bfloat16)
    ours = triton_copy(torch_lstm, wavefront=True)
    x_buf = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ours(x_buf)                                   # compiles, outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_buf, _ = ours(x_buf)
        for _ in range(3):
            x_buf.copy_(torch.randn_like(x_buf))
            graph.replay()
            assert_identical(y_buf, ours(x_buf)[0], "y replayed")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_wavefront_dropout_matches_float64_within_twice_chained_cudnn_layers_error(dtype_name):
    """Given dropout masks: the wavefront against one-layer nn.LSTMs chained with the same
    masks, each error measured against the same chain in float64."""
    from triton_lstm.autograd import lstm_stack_wavefront
    dtype, allow_tf32, slack = DTYPES[dtype_name]
    T, B, I, H, L = 32, 8, 64, 256, 3
    torch_lstm = torch.nn.LSTM(I, H, num_layers=L, device="cuda", dtype=dtype)
    keep = ((torch.rand(L - 1, T, B, H, device="cuda") > 0.3) / 0.7).to(dtype)
    x = torch.randn(T, B, I, device="cuda", dtype=dtype)

    def run(fn, x, upstream=None):
        x = x.detach().requires_grad_()
        y, c = fn(x)
        if upstream is None:
            upstream = [torch.randn_like(y), torch.randn_like(c)]
        loss = (y * upstream[0].to(y)).sum() + (c * upstream[1].to(c)).sum()
        return [y.detach(), c.detach(), *torch.autograd.grad(loss, [x])], upstream

    weights = stack_weights(torch_lstm)
    with tf32(allow_tf32):
        ours_all, upstream = run(
            lambda x: lstm_stack_wavefront(x, None, None, weights, keep=keep)[::2], x)
        torch_all, _ = run(lambda x: chained_layers(torch_lstm, x, None, keep)[::2], x, upstream)
    ref = torch.nn.LSTM(I, H, num_layers=L, dtype=torch.float64)
    ref.load_state_dict({k: v.double().cpu() for k, v in torch_lstm.state_dict().items()})
    ref_all, _ = run(lambda x: chained_layers(ref, x, None, keep.double().cpu())[::2],
                     x.double().cpu(), [u.double().cpu() for u in upstream])
    assert_within_twice_the_reference_error(ours_all, torch_all, ref_all, slack,
                                            theirs_name="chained nn.LSTM")
