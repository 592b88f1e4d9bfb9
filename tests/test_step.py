"""LSTM.step, streaming one step at a time: the step kernel (kernels/step.py) under the
Triton interpreter, its op and autograd, the module API, torch.compile; nn.LSTM is the control.

Stepping is not bitwise equal to forward: the step kernel accumulates the input
projection in fp32 with the recurrent dot, where forward rounds the input GEMM to
the input dtype first, and between steps c travels in the input dtype (as with
nn.LSTM's c_n). So fp64 and fp32 compare at a few rounding steps and bf16 at its
own tolerance. The same kernel and tiles with and without saving the gates are bitwise equal.
"""
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import triton_lstm
from triton_lstm import dispatch
from triton_lstm.autograd import StepFunction, lstm_cell_step
from triton_lstm.kernels.step import StepConfig
from triton_lstm.reference import lstm_step_reference

from .conftest import requires_interpreter
from .helpers import nn_lstm_under_cpu_autocast, triton_copy

pytestmark = requires_interpreter
TOLERANCES = {  # dtype: assert_close tolerances of a stepped sequence against forward
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
T, B, I, H = 5, 3, 5, 6


def models(num_layers=1, proj_size=0, dtype=torch.float64, **kwargs):
    """nn.LSTM with random weights, and triton_lstm.LSTM (kernels) with the same weights."""
    control = nn.LSTM(I, H, num_layers=num_layers, proj_size=proj_size, dtype=dtype, **kwargs)
    return control, triton_copy(control)


def random_state(module, batch=B, requires_grad=False):
    out = module.proj_size or module.hidden_size
    dtype = module.weight_ih_l0.dtype
    return (torch.randn(module.num_layers, batch, out, dtype=dtype, requires_grad=requires_grad),
            torch.randn(module.num_layers, batch, module.hidden_size, dtype=dtype,
                        requires_grad=requires_grad))


def run_steps(module, x, hx):
    """y [T, B, H_out] and the final (h, c), by calling module.step once per time step."""
    ys, state = [], hx
    for x_t in x.unbind(0):
        y_t, state = module.step(x_t, state)
        ys.append(y_t)
    return torch.stack(ys), state


# -- the kernel and its op ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("state", [True, False], ids=["state", "zeros"])
def test_step_op_matches_the_reference_with_several_blocks(dtype, state):
    """Several hidden and batch blocks (tiles under the GPU's minimum: fine in the interpreter)."""
    batch, inputs, hidden, out = 4, 7, 20, 9
    x = torch.randn(batch, inputs, dtype=dtype)
    h = torch.randn(batch, out, dtype=dtype) if state else None
    c = torch.randn(batch, hidden, dtype=torch.float32 if dtype != torch.float64 else dtype) \
        if state else None
    w_ih = torch.randn(4 * hidden, inputs, dtype=dtype) / 3
    w_hh = torch.randn(4 * hidden, out, dtype=dtype) / 3
    b_ih, b_hh = torch.randn(4 * hidden, dtype=dtype), torch.randn(4 * hidden, dtype=dtype)
    op = torch.ops.triton_lstm.step_forward
    tiles = StepConfig(block_b=2, block_h=4, block_k=16).as_list()
    r, c_new, gates = op(x, h, c, w_ih, w_hh, b_ih, b_hh, True, tiles)
    want_r, want_c, want_gates = lstm_step_reference(x, h, c, w_ih, w_hh, b_ih, b_hh)
    tol = TOLERANCES[dtype] if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
    assert r.dtype == dtype and c_new.dtype == gates.dtype == want_c.dtype
    torch.testing.assert_close(r, want_r, **tol)
    torch.testing.assert_close(c_new, want_c, **tol)
    torch.testing.assert_close(gates, want_gates, **tol)
    # Saving nothing: the same numbers; the heuristic's tiles: the same within rounding.
    r2, c2, empty = op(x, h, c, w_ih, w_hh, b_ih, b_hh, False, tiles)
    assert torch.equal(r, r2) and torch.equal(c_new, c2) and empty.shape == (0,)
    r3, c3, _ = op(x, h, c, w_ih, w_hh, b_ih, b_hh, False, None)
    torch.testing.assert_close((r3, c3), (r, c_new), **tol)


def test_step_op_passes_opcheck():
    x, h, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), \
        torch.randn(3, 6, dtype=torch.float64)
    w_ih, w_hh = torch.randn(24, 5, dtype=torch.float64), torch.randn(24, 4, dtype=torch.float64)
    b = torch.randn(24, dtype=torch.float64)
    op = torch.ops.triton_lstm.step_forward.default
    torch.library.opcheck(op, (x, h, c, w_ih, w_hh, b, b, True, None))
    torch.library.opcheck(op, (x, None, None, w_ih, w_hh, None, None, False, [16, 4, 16, 4, 1]))


def test_step_function_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h, c = (torch.randn(2, n, dtype=torch.float64, requires_grad=True) for n in (2, 4))
    w_ih = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    b_ih, b_hh = (torch.randn(16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    inputs = (x, h, c, w_ih, w_hh, b_ih, b_hh)

    def step(*args):
        return StepFunction.apply(*args)[:2]

    assert torch.autograd.gradcheck(step, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(step, inputs, fast_mode=True)


def test_vmap_over_the_state_matches_a_loop():
    x = torch.randn(3, 5, dtype=torch.float64)
    hs, cs = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    w_ih, w_hh = torch.randn(24, 5, dtype=torch.float64), torch.randn(24, 6, dtype=torch.float64)
    mapped = torch.func.vmap(lambda h, c: lstm_cell_step(x, h, c, w_ih, w_hh))(hs, cs)
    for k in range(2):
        want = lstm_step_reference(x, hs[k], cs[k], w_ih, w_hh)
        torch.testing.assert_close(mapped[0][k], want[0], **TOLERANCES[torch.float64])
        torch.testing.assert_close(mapped[1][k], want[1], **TOLERANCES[torch.float64])


# -- LSTM.step ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("num_layers, proj_size, with_hx", [
    pytest.param(1, 0, False, id="L1"), pytest.param(1, 0, True, id="L1-hx"),
    pytest.param(2, 0, True, id="L2-hx"), pytest.param(2, 4, False, id="L2-proj"),
    pytest.param(1, 3, True, id="L1-proj-hx")])
def test_stepping_equals_forward_on_the_whole_sequence(dtype, num_layers, proj_size, with_hx):
    control, ours = models(num_layers, proj_size, dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    hx = random_state(ours) if with_hx else None
    with torch.no_grad():
        y, (h, c) = run_steps(ours, x, hx)
        want_y, (want_h, want_c) = ours(x, hx)
        control_y, _ = control(x, hx)
    assert y.dtype == h.dtype == c.dtype == dtype
    assert y.shape == want_y.shape and h.shape == want_h.shape and c.shape == want_c.shape
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y, want_y, **tol)
    torch.testing.assert_close(h, want_h, **tol)
    torch.testing.assert_close(c, want_c, **tol)
    torch.testing.assert_close(y, control_y, **tol)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unbatched_and_batch_first_steps(backend):
    control = nn.LSTM(I, H, num_layers=2, batch_first=True, dtype=torch.float64)
    ours = triton_lstm.LSTM.from_torch(control, backend=backend)
    x = torch.randn(T, I, dtype=torch.float64)           # unbatched: [T, I]
    hx = tuple(s[:, 0] for s in random_state(ours, batch=1))
    with torch.no_grad():
        y, (h, c) = run_steps(ours, x, hx)
        want_y, (want_h, want_c) = control(x, hx)
        y_batched, _ = ours.step(x[0].unsqueeze(0), tuple(s.unsqueeze(1) for s in hx))
    assert y.shape == (T, H) and h.shape == c.shape == (2, H)
    torch.testing.assert_close(y, want_y, **TOLERANCES[torch.float64])
    torch.testing.assert_close((h, c), (want_h, want_c), **TOLERANCES[torch.float64])
    torch.testing.assert_close(y_batched[0], y[0], **TOLERANCES[torch.float64])


def test_auto_backend_on_cpu_runs_nn_lstm_and_agrees_with_the_kernels():
    control, ours = models(2, 0, torch.float32)
    auto = triton_lstm.LSTM.from_torch(control)            # CPU tensors: nn.LSTM's own step
    x = torch.randn(T, B, I)
    hx = random_state(ours)
    with torch.no_grad():
        before = dict(dispatch.launch_counts)
        y_auto, state_auto = run_steps(auto, x, hx)
        assert dict(dispatch.launch_counts) == before, "auto launched kernels on CPU tensors"
        y, state = run_steps(ours, x, hx)
    torch.testing.assert_close(y_auto, y, **TOLERANCES[torch.float32])
    torch.testing.assert_close(state_auto, state, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["fp64", "fp32", "bf16"])
def test_chunked_forward_with_carried_state_equals_the_whole_sequence(dtype):
    _, ours = models(2, 0, dtype)
    x = torch.randn(T, B, I, dtype=dtype)
    hx = random_state(ours)
    with torch.no_grad():
        want_y, want_state = ours(x, hx)
        y1, state = ours(x[:2], hx)
        y2, state = ours(x[2:], state)
    torch.testing.assert_close(torch.cat([y1, y2]), want_y, **TOLERANCES[dtype])
    torch.testing.assert_close(state, want_state, **TOLERANCES[dtype])


@pytest.mark.parametrize("proj_size, with_hx", [(0, True), (4, True), (0, False)],
                         ids=["hx", "proj-hx", "zeros"])
def test_gradients_through_steps_equal_nn_lstm_on_the_sequence(proj_size, with_hx):
    control, ours = models(2, proj_size)
    steps = 3
    x = torch.randn(steps, B, I, dtype=torch.float64, requires_grad=True)
    hx = random_state(ours, requires_grad=True) if with_hx else None
    inputs = [x] + (list(hx) if with_hx else [])

    def grads(outputs, module, upstream):
        loss = sum((o * u).sum() for o, u in zip(outputs, upstream))
        return torch.autograd.grad(loss, inputs + list(module.parameters()))

    y, (h, c) = run_steps(ours, x, hx)
    upstream = [torch.randn_like(t) for t in (y, h, c)]
    ours_grads = grads((y, h, c), ours, upstream)
    want_y, (want_h, want_c) = control(x, hx)
    want_grads = grads((want_y, want_h, want_c), control, upstream)
    names = ["x"] + (["h0", "c0"] if with_hx else []) + [n for n, _ in ours.named_parameters()]
    for name, got, want in zip(names, ours_grads, want_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float64], msg=name)


def test_dropout_between_layers_in_training_mode():
    """dropout=1 zeroes the input of layer 2 in training mode, in nn.LSTM and here alike."""
    control, ours = models(2, 0, dropout=1.0)
    x = torch.randn(2, B, I, dtype=torch.float64)
    for mode in (True, False):
        control.train(mode)
        ours.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(run_steps(ours, x, None)[0], control(x)[0],
                                       **TOLERANCES[torch.float64])


def test_out_buffers_take_the_new_state_in_place():
    _, ours = models(2, 3)
    x = torch.randn(B, I, dtype=torch.float64)
    hx = random_state(ours)
    h_buf, c_buf = (s.clone() for s in hx)
    with torch.no_grad():
        y, (h, c) = ours.step(x, hx)
        y_buf, (h_out, c_out) = ours.step(x, (h_buf, c_buf), out=(h_buf, c_buf))
    assert h_out is h_buf and c_out is c_buf
    assert torch.equal(y_buf, y) and torch.equal(h_buf, h) and torch.equal(c_buf, c)
    with pytest.raises(ValueError, match=r"out h_buf must have the shape .*\(2, 3, 3\)"):
        ours.step(x, hx, out=(torch.zeros(2, 3, 6, dtype=torch.float64), c_buf))


def test_autocast_computes_in_the_autocast_dtype_and_forward_mode_ad_works():
    control, ours = models(2, 0, torch.float32)
    x = torch.randn(B, I)
    hx = random_state(ours)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, (h, c) = ours.step(x, hx)
    _, (want_y, _) = nn_lstm_under_cpu_autocast(control, torch.bfloat16, x.unsqueeze(0), hx)
    assert y.dtype == h.dtype == c.dtype == torch.bfloat16
    torch.testing.assert_close(y, want_y[0], **TOLERANCES[torch.bfloat16])
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
    # Forward-mode AD runs the plain-PyTorch step (fp64: nn.LSTM's fp32 CPU path has no jvp).
    control, ours = models(2, 0, torch.float64)
    x, hx, tangent = x.double(), random_state(ours), torch.randn(B, I, dtype=torch.float64)
    _, ours_jvp = torch.func.jvp(lambda t: ours.step(t, hx)[0], (x,), (tangent,))
    _, want_jvp = torch.func.jvp(lambda t: control(t.unsqueeze(0), hx)[0][0], (x,), (tangent,))
    torch.testing.assert_close(ours_jvp, want_jvp, **TOLERANCES[torch.float64])


# -- torch.compile --------------------------------------------------------------------------------

def test_compiled_step_loop_matches_eager(fullgraph_enabled):
    torch._dynamo.reset()
    counters.clear()
    _, ours = models(2, 0, torch.float32)
    launches = []

    def record(gm, example_inputs):
        # The op sits in the subgraphs of the traced autograd.Function, one per layer and step.
        launches.append(sum(n.target in (torch.ops.triton_lstm.step_forward,
                                         torch.ops.triton_lstm.step_forward.default)
                            for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                            for n in m.graph.nodes))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def loop(x, h, c):
        ys, state = [], (h, c)
        for x_t in x.unbind(0):
            y_t, state = ours.step(x_t, state)
            ys.append(y_t)
        return torch.stack(ys), state

    compiled = torch.compile(loop, backend=record, fullgraph=True)
    x = torch.randn(3, B, I, requires_grad=True)
    hx = random_state(ours)
    results = []
    for fn in (compiled, loop):
        y, (h, c) = fn(x, *hx)
        grads = torch.autograd.grad((y.sum() + h.sum() - c.sum()), [x] + list(ours.parameters()))
        results.append((y, h, c) + grads)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert launches == [2 * 3], f"graphs with {launches} step ops (2 layers x 3 steps in one)"
    assert sum(counters["graph_break"].values()) == 0


# -- errors ---------------------------------------------------------------------------------------

def test_bidirectional_is_refused_by_name():
    ours = triton_lstm.LSTM(I, H, bidirectional=True, backend="triton")
    with pytest.raises(ValueError, match="bidirectional=True"):
        ours.step(torch.randn(B, I))


@pytest.mark.parametrize("shape, match", [
    ((T, B, I), r"Expected input to be 1D \[input_size\] or 2D \[batch, input_size\].*3D"),
    ((B, I + 1), r"input_size. Expected 5, got 6"),
    ((I + 2,), r"input_size. Expected 5, got 7"),
])
def test_bad_input_shapes_are_named(shape, match):
    _, ours = models(1, 0, torch.float32)
    with pytest.raises(ValueError, match=match):
        ours.step(torch.randn(*shape))


def test_bad_state_shapes_are_named():
    _, ours = models(2, 0, torch.float32)
    h, c = random_state(ours)
    with pytest.raises(ValueError, match=r"Expected hidden\[0\] size \(2, 3, 6\), got \[1, 3, 6\]"):
        ours.step(torch.randn(B, I), (h[:1], c))
    with pytest.raises(ValueError, match="hx and cx should also be 3-D"):
        ours.step(torch.randn(B, I), (h[0], c[0]))
