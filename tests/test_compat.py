"""Works wherever nn.LSTM works: custom ops, torch.compile, AMP, export and tracing, torch.func,
second derivatives, bf16. CPU, the kernels under the Triton interpreter; nn.LSTM is the control.

Each test here is a row of the README's compatibility table.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call

import triton_lstm
from triton_lstm import dispatch
from triton_lstm.autograd import input_projection
from triton_lstm.dispatch import KernelConfig
from triton_lstm.ops import config_to_list

from .conftest import requires_interpreter
from .helpers import float64_copy, nn_lstm_under_cpu_autocast, relative_error, triton_copy

pytestmark = requires_interpreter
TOL64 = dict(rtol=1e-10, atol=1e-10)


def kernel_launches():
    return sum(dispatch.launch_counts.values())


class CharModel(nn.Module):
    """Embedding -> 2-layer LSTM -> Linear, the model of the compile and export rows."""

    def __init__(self, lstm: nn.Module, vocab: int = 11, width: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = lstm
        self.head = nn.Linear(lstm.hidden_size, vocab)

    def forward(self, tokens):
        y, _ = self.lstm(self.embed(tokens))
        return self.head(y)


def char_models():
    """The same model twice: with triton_lstm.LSTM (kernels) and with nn.LSTM."""
    ours = CharModel(triton_lstm.LSTM(6, 5, num_layers=2, backend="triton"))
    control = copy.deepcopy(ours)
    control.lstm = ours.lstm.to_torch()
    return ours, control


# -- custom ops ---------------------------------------------------------------------------------

def _op_problem(D, proj, lengths):
    T, B, I, H = 4, 3, 5, 6
    R = 4 if proj else H
    x = torch.randn(T, B, I, dtype=torch.float64)
    w_ih = torch.randn(D * 4 * H, I, dtype=torch.float64) / 3
    gx = input_projection(x, w_ih, None, None)
    w_hh = torch.randn(D, 4 * H, R, dtype=torch.float64) / 3
    w_hr = torch.randn(D, R, H, dtype=torch.float64) / 3 if proj else None
    h0, c0 = torch.randn(D, B, R, dtype=torch.float64), torch.randn(D, B, H, dtype=torch.float64)
    lens = torch.tensor([4, 1, 3], dtype=torch.int32) if lengths else None
    return gx, w_hh, h0, c0, lens, w_hr


@pytest.mark.parametrize("D, proj, lengths", [(1, False, False), (2, True, True)],
                         ids=["uni", "bidir-proj-lengths"])
def test_recurrence_ops_pass_opcheck(D, proj, lengths):
    gx, w_hh, h0, c0, lens, w_hr = _op_problem(D, proj, lengths)
    forward = torch.ops.triton_lstm.recurrence_forward.default
    for save in (False, True):
        torch.library.opcheck(forward, (gx, w_hh, h0, c0, lens, w_hr, save, None, False))
    config = config_to_list(KernelConfig(16, 4, block_k=16, split_k=1))
    torch.library.opcheck(forward, (gx, w_hh, None, None, lens, w_hr, True, config, True))
    restarts = (torch.rand(D, gx.shape[0], gx.shape[1]) < 0.3).to(torch.int8)
    torch.library.opcheck(forward, (gx, w_hh, h0, c0, lens, w_hr, False, None, False, restarts,
                                    h0, c0, 2))
    y, h_n, c_n, gates, c_all, *_ = forward(gx, w_hh, h0, c0, lens, w_hr, True, None, False)
    backward = torch.ops.triton_lstm.recurrence_backward.default
    torch.library.opcheck(backward, (torch.randn_like(y), torch.randn_like(h_n), torch.randn_like(c_n),
                                     gates, c_all, c0, lens, w_hh, w_hr, None, False))
    torch.library.opcheck(backward, (torch.randn_like(y), None, None, gates, c_all, None, lens,
                                     w_hh, w_hr, None, False, restarts, c0))
    # With the bias gradient: summed by the kernel (streamed tiles) and after it (resident).
    streamed = config_to_list(KernelConfig(16, 4, resident=False, block_k=16, split_k=1))
    for bias_config in (streamed, config):
        torch.library.opcheck(backward, (torch.randn_like(y), None, None, gates, c_all, c0, lens,
                                         w_hh, w_hr, bias_config, False, None, None, True, True))


def test_plain_eager_calls_run_the_op_body_and_recorded_or_transformed_calls_the_op():
    """ops.direct runs an op's body itself only in plain eager code (gradients off, real
    tensors, nothing watching): there the dispatch of a custom op is pure host cost. Where a
    dispatch mode, a torch.func transform, the legacy vmap of gradcheck, a tensor subclass
    or autograd could see the call, it goes through the op (its fake and vmap rules)."""
    from torch._vmap_internals import _vmap
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton_lstm.ops import direct, plain_eager

    class Watching(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    t = torch.randn(3, 2)
    seen = []

    def record(x):
        seen.append(plain_eager((x, None, 4)))
        return x * 2

    assert not plain_eager((t,))                          # gradients on: autograd may record
    with torch.no_grad():
        assert plain_eager((t, nn.Parameter(t), None, 3, [1, 2]))
        with Watching():
            assert not plain_eager((t,))
        torch.vmap(record)(t)
        _vmap(record)(t)
        assert seen == [False, False]
        assert not plain_eager((t, t.as_subclass(_Marked)))
        calls = []
        direct(lambda x: calls.append("op"), lambda x: calls.append("body"), t)
        with Watching():
            direct(lambda x: calls.append("op"), lambda x: calls.append("body"), t)
        assert calls == ["body", "op"]


class _Marked(torch.Tensor):
    """A tensor subclass (as FakeTensor and FunctionalTensor are)."""


# -- torch.compile ------------------------------------------------------------------------------

def _graph_recorder(backend):
    """A compile backend that records each graph it is given, then hands it to `backend`."""
    graphs = []

    def record(gm, example_inputs):
        # Kept only once compiled: a compile may restart its analysis midway.
        compiled = gm.forward if backend == "eager" else (
            torch._dynamo.lookup_backend(backend)(gm, example_inputs))
        graphs.append(gm)
        return compiled

    return record, graphs


def _train_and_compare(compiled, eager_model, compiled_model, shapes, vocab=11):
    for shape in shapes:
        tokens = torch.randint(0, vocab, shape)
        for model, fn in ((compiled_model, compiled), (eager_model, eager_model)):
            model.zero_grad()
            logits = fn(tokens)
            logits.logsumexp(-1).sum().backward()
            model.logits = logits.detach()
        torch.testing.assert_close(compiled_model.logits, eager_model.logits, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(compiled_model.named_parameters(), eager_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_fullgraph_dynamic_shapes_trains_like_eager(backend, fullgraph_enabled):
    """One graph for the whole model (no break at the LSTM), T and B varying, grads as eager."""
    torch._dynamo.reset()
    counters.clear()
    eager_model, _ = char_models()
    model = copy.deepcopy(eager_model)
    record, graphs = _graph_recorder(backend)
    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=True)
    before = kernel_launches()
    _train_and_compare(compiled, eager_model, model, [(4, 3), (6, 2), (3, 5)])
    assert kernel_launches() > before
    assert len(graphs) == 1, f"{len(graphs)} graphs: a graph break or a recompile"
    assert sum(counters["graph_break"].values()) == 0
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert any("embedding" in t for t in targets) and any("linear" in t for t in targets)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["one-direction", "bidirectional"])
def test_compiled_gradients_through_the_final_state_equal_eager(bidirectional, fullgraph_enabled):
    """Under torch.compile the kernels run, and every output takes its gradient as in eager,
    h_n and c_n included. (Dynamo in torch 2.11, not in 2.13, folded is_exporting() to True,
    which sent compiled calls to nn.LSTM, and gave no gradient to an autograd.Function output
    that an op returned as its own input, such as c_n cast to its own dtype.)"""
    torch._dynamo.reset()
    ours = triton_lstm.LSTM(3, 4, num_layers=2, bidirectional=bidirectional, backend="triton",
                            dtype=torch.float64)

    def loss(x):
        y, (h, c) = ours(x)
        return y.sin().sum() + (h * h).sum() + (c * c).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    before = kernel_launches()
    got = torch.autograd.grad(compiled(x), [x, *ours.parameters()])
    assert kernel_launches() > before, "the compiled call ran no kernel"
    want = torch.autograd.grad(loss(x), [x, *ours.parameters()])
    for name, g, w in zip(["x"] + [n for n, _ in ours.named_parameters()], got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_default_mode_runs_the_kernels_and_trains_like_eager(backend):
    """Without enable_fullgraph, dynamo runs the parent eagerly and compiles the LSTM on its own."""
    torch._dynamo.reset()
    eager_model, _ = char_models()
    model = copy.deepcopy(eager_model)
    record, graphs = _graph_recorder(backend)
    compiled = torch.compile(model, backend=record)
    before = kernel_launches()
    _train_and_compare(compiled, eager_model, model, [(4, 3), (5, 2)])
    assert kernel_launches() > before
    assert graphs, "nothing was compiled"
    for graph in graphs:
        targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
        # The LSTM's layers are in the graph; the embedding around them ran eagerly: Dynamo
        # refused the parent frame at the nn.LSTM, the break enable_fullgraph() removes.
        assert "autograd_function_apply" in targets
        assert not any("embedding" in t for t in targets)
    torch._dynamo.reset()


def test_plain_nn_lstm_still_refuses_fullgraph_without_enable():
    """The recipe is needed: dynamo refuses every nn.LSTM subclass under fullgraph by default."""
    torch._dynamo.reset()
    assert torch._dynamo.config.allow_rnn is False
    ours, _ = char_models()
    with pytest.raises(Exception, match="allow_rnn"):
        torch.compile(ours, backend="eager", fullgraph=True)(torch.randint(0, 11, (3, 2)))
    torch._dynamo.reset()


# -- AMP ----------------------------------------------------------------------------------------

SLACK = {torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("input_dtype", ["fp32", "autocast"], ids=["fp32-input", "lowp-input"])
def test_autocast_computes_in_the_autocast_dtype_like_nn_lstm(dtype, input_dtype):
    control = nn.LSTM(8, 16, num_layers=2, bidirectional=True)
    ours = triton_copy(control)
    x = torch.randn(5, 3, 8)
    x_in = (x if input_dtype == "fp32" else x.to(dtype)).requires_grad_()
    upstream = torch.randn(5, 3, 32)
    before = kernel_launches()
    with torch.autocast("cpu", dtype=dtype):
        y, (h, c) = ours(x_in)
    assert kernel_launches() > before
    assert y.dtype == h.dtype == c.dtype == dtype
    (y.float() * upstream).sum().backward()
    assert x_in.grad.dtype == x_in.dtype
    for name, p in ours.named_parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name

    # The control: nn.LSTM under the same autocast where its CPU kernel runs, else run in the
    # autocast dtype by hand.
    reference_in = x_in.detach().clone().requires_grad_()
    control, (y_control, _) = nn_lstm_under_cpu_autocast(control, dtype, reference_in)
    assert y_control.dtype == dtype
    (y_control.float() * upstream).sum().backward()

    ref = float64_copy(control)
    x64 = x_in.detach().double().requires_grad_()
    y64, _ = ref(x64)
    (y64 * upstream.double()).sum().backward()
    slack = SLACK[dtype]
    assert relative_error(y, y64) <= 2 * relative_error(y_control, y64) + slack
    assert (relative_error(x_in.grad, x64.grad)
            <= 2 * relative_error(reference_in.grad, x64.grad) + slack)
    for (name, p), q, r in zip(ours.named_parameters(), ref.parameters(), control.parameters()):
        assert relative_error(p.grad, q.grad) <= 2 * relative_error(r.grad, q.grad) + slack, name


def test_fp16_training_with_grad_scaler():
    torch.manual_seed(0)
    model = CharModel(triton_lstm.LSTM(6, 8, num_layers=2, backend="triton"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    tokens = torch.randint(0, 11, (6, 4))
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            logits = model(tokens[:-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[1:].flatten())
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        for name, p in model.named_parameters():
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# -- export and tracing -------------------------------------------------------------------------

def test_torch_export_records_aten_lstm_and_computes_the_same():
    ours, _ = char_models()
    ours.eval()
    tokens = torch.randint(0, 11, (4, 3))
    want = ours(tokens)
    program = torch.export.export(ours, (tokens,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert "aten.lstm.input" in targets
    torch.testing.assert_close(program.module()(tokens), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnxscript", "onnxruntime")),
                    reason="needs onnxscript and onnxruntime (the test extra)")
def test_onnx_export_runs_in_onnxruntime_with_the_same_outputs():
    ours, _ = char_models()
    ours.eval()
    tokens = torch.randint(0, 11, (4, 3))
    want = ours(tokens)
    program = torch.onnx.export(ours, (tokens,), dynamo=True, verbose=False)
    assert "LSTM" in {node.op_type for node in program.model_proto.graph.node}
    got, = program(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_jit_trace_records_aten_lstm(grad_mode):
    ours, _ = char_models()
    tokens = torch.randint(0, 11, (4, 3))
    with torch.set_grad_enabled(grad_mode):
        traced = torch.jit.trace(ours, (tokens,), check_trace=False)
        assert "aten::lstm" in str(traced.inlined_graph)
        other = torch.randint(0, 11, (4, 3))
        torch.testing.assert_close(traced(other), ours(other), rtol=1e-5, atol=1e-6)


class _Wrapper(nn.Module):
    """A model holding the LSTM, as TorchScript and torch.fx see one."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor):
        y, (h, c) = self.lstm(x)
        return y * 2 + h.sum() - c.sum()


def test_fx_symbolic_trace_keeps_the_lstm_whole_and_runs_the_kernels():
    """torch.fx (FX quantization and friends) keeps torch.nn's modules as one call_module
    node; this one too, and the traced module then runs it as it is."""
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    graph = torch.fx.symbolic_trace(_Wrapper(triton_copy(ref)))
    assert [n.target for n in graph.graph.nodes if n.op == "call_module"] == ["lstm"]
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    before = kernel_launches()
    got = graph(x)
    assert kernel_launches() > before
    torch.testing.assert_close(got, _Wrapper(ref)(x), rtol=1e-10, atol=1e-10)


def test_jit_script_of_a_model_holds_nn_lstm_sharing_the_parameters():
    ref = nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    model = _Wrapper(triton_copy(ref))
    scripted = torch.jit.script(model)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(scripted(x), _Wrapper(ref)(x), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        model.lstm.weight_hh_l0.mul_(0.5)     # the script sees the module's own parameters
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-10, atol=1e-10)


# -- torch.func ---------------------------------------------------------------------------------

def _bidir_pair():
    control = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    return triton_copy(control), control


def _loss(module, params, x):
    return functional_call(module, params, (x,))[0].sin().sum()


def test_func_grad_matches_nn_lstm():
    ours, control = _bidir_pair()
    params = {k: v.detach() for k, v in control.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    got = torch.func.grad(lambda p, x: _loss(ours, p, x), argnums=(0, 1))(params, x)
    want = torch.func.grad(lambda p, x: _loss(control, p, x), argnums=(0, 1))(params, x)
    torch.testing.assert_close(got, want, **TOL64)


def test_func_vmap_over_the_batch_matches_a_loop_of_nn_lstm():
    """nn.LSTM itself has no vmap rule; a loop over it is the control."""
    ours, control = _bidir_pair()
    xs = torch.randn(5, 4, 3, dtype=torch.float64)          # 5 unbatched [T, I] sequences
    got_y, (got_h, _) = torch.func.vmap(ours)(xs)
    for k, x in enumerate(xs):
        y, (h, _) = control(x)
        torch.testing.assert_close(got_y[k], y, **TOL64)
        torch.testing.assert_close(got_h[k], h, **TOL64)


@pytest.mark.parametrize("backward", ["default", "streamed"])
def test_func_per_sample_gradients(backward):
    """Per-sample gradients, the biases' among them: vmap folds the samples into the batch,
    so a backward that sums dG for the bias (a streamed tile's, "streamed") must leave that
    sum to the samples' own dG."""
    from triton_lstm.tuning import forced_configs
    ours, control = _bidir_pair()
    params = {k: v.detach() for k, v in control.named_parameters()}
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    tile = KernelConfig(16, 4, resident=False, block_k=16, split_k=1)
    with forced_configs(**({} if backward == "default" else dict(backward=tile))):
        per_sample = torch.func.vmap(torch.func.grad(lambda p, x: _loss(ours, p, x)),
                                     in_dims=(None, 0))(params, xs)
    for k, x in enumerate(xs):
        want = torch.func.grad(lambda p: _loss(control, p, x))(params)
        torch.testing.assert_close({n: g[k] for n, g in per_sample.items()}, want, **TOL64)


def test_func_jvp_and_hessian_match_nn_lstm():
    ours, control = _bidir_pair()
    params = {k: v.detach() for k, v in control.named_parameters()}
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    tangent = torch.randn_like(x)
    got = torch.func.jvp(lambda x: ours(x)[0], (x,), (tangent,))
    want = torch.func.jvp(lambda x: control(x)[0], (x,), (tangent,))
    torch.testing.assert_close(got, want, **TOL64)
    got = torch.func.hessian(lambda x: _loss(ours, params, x))(x)
    want = torch.func.hessian(lambda x: _loss(control, params, x))(x)
    torch.testing.assert_close(got, want, **TOL64)


# -- gradcheck, second derivatives --------------------------------------------------------------

@pytest.mark.parametrize("options, T", [(dict(), 3), (dict(bidirectional=True, proj_size=2), 2)],
                         ids=["uni", "bidir-proj"])
def test_gradcheck_with_batched_grads_and_gradgradcheck(options, T):
    module = triton_lstm.LSTM(2, 3, backend="triton", dtype=torch.float64, **options)
    x = torch.randn(T, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(module.num_layers * (2 if module.bidirectional else 1), 2,
                     module.proj_size or 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(h0.shape[0], 2, 3, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    def fn(x, h0, c0, *weights):
        out, (h, c) = functional_call(module, dict(zip([n for n, _ in module.named_parameters()],
                                                       weights)), (x, (h0, c0)))
        return out, h, c

    inputs = (x, h0, c0, *params)
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_gradient_penalty_matches_nn_lstm(packed):
    """create_graph=True: a penalty on the input gradient, differentiated again."""
    control = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = triton_copy(control)
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])

    def penalty_grads(module):
        inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, (h, c) = module(inp)
        y = out.data if packed else out
        gx, = torch.autograd.grad((y * y).sum() + h.sum() + (c * c).sum(), x, create_graph=True)
        return torch.autograd.grad((gx * gx).sum(), [x, *module.parameters()])

    before = kernel_launches()
    got = penalty_grads(ours)
    assert kernel_launches() > before
    torch.testing.assert_close(got, penalty_grads(control), **TOL64)


# -- bf16 on the CPU ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, lengths", [
    pytest.param(dict(num_layers=2, bidirectional=True), None, id="L2-bidir"),
    pytest.param(dict(proj_size=4), None, id="proj"),
    pytest.param(dict(bidirectional=True), [5, 2, 4], id="bidir-packed"),
])
def test_bf16_within_twice_nn_lstm_error(options, lengths):
    """bf16 through the kernels (the interpreter's bf16 dots go through fp32), 3-way rule."""
    control = nn.LSTM(8, 12, **options).to(torch.bfloat16)
    ours = triton_copy(control)
    x = torch.randn(5, 3, 8).to(torch.bfloat16)
    upstream = None
    results = []
    for module in (ours, control, float64_copy(control)):
        xin = x.double() if module is not ours and module is not control else x
        xin = xin.detach().requires_grad_()
        inp = nn.utils.rnn.pack_padded_sequence(xin, lengths, enforce_sorted=False) if lengths else xin
        out, (h, c) = module(inp)
        data = out.data if lengths else out
        if upstream is None:
            upstream = [torch.randn(t.shape) for t in (data, h, c)]
        loss = sum((t.double() * u.double()).sum() for t, u in zip((data, h, c), upstream))
        grads = torch.autograd.grad(loss, [xin, *module.parameters()])
        results.append([data, h, c, *grads])
    for k, (got, base, want) in enumerate(zip(*results)):
        assert torch.isfinite(got).all(), k
        assert relative_error(got, want) <= 2 * relative_error(base, want) + SLACK[torch.bfloat16], k
