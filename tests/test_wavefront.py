"""Stacked layers as one wavefront (kernels/wavefront.py), on CPU under the interpreter.

Every output and gradient (the forward and the backward wavefront) against torch.nn.LSTM
in float64 (fp32: within twice the error of nn.LSTM in fp32 against float64): the kernels directly with tile configs that split the hidden units over
several programs (on-chip and streamed weights), and through
triton_lstm.LSTM(wavefront=True) with the options a stack has. The interpreter runs the
wavefronts stepped: one launch per wavefront step.
"""
import pytest
import torch
from torch import nn

import triton_lstm
from triton_lstm.autograd import lstm_stack_wavefront
from triton_lstm.dispatch import KernelConfig, launch_counts

from .conftest import requires_interpreter
from .helpers import (FP32_SLACK, assert_within_twice_the_reference_error, chained_layers,
                      float64_reference, outputs_and_grads, relative_error, stack_weights,
                      triton_copy)

pytestmark = requires_interpreter

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

CONFIGS = {
    "heuristic": None,
    "resident-bh4": KernelConfig(block_b=16, block_h=4, resident=True, split_k=1),
    "resident-bh8-split2": KernelConfig(block_b=16, block_h=8, resident=True, split_k=2),
    "streamed-bh8-bk16-st3-pa": KernelConfig(block_b=16, block_h=8, resident=False, block_k=16,
                                             inner_stages=3, prefetch_after_arrive=True),
    # Dataflow waits: the slots past h0 start as the unwritten mark, tiles polled until written.
    "dataflow-bh4": KernelConfig(block_b=16, block_h=4, resident=True, split_k=1, dataflow=True),
    "dataflow-streamed-bh8-bk16": KernelConfig(block_b=16, block_h=8, resident=False, block_k=16,
                                               dataflow=True),
}

SHAPES = [  # T, B, I, H, L
    pytest.param((5, 3, 4, 12, 3), id="T5-B3-I4-H12-L3"),
    pytest.param((1, 2, 3, 8, 2), id="T1-B2-I3-H8-L2"),
    pytest.param((3, 17, 6, 9, 2), id="T3-B17-I6-H9-L2"),     # two batch blocks of 16
]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernel_outputs_and_all_gradients(shape, dtype, config_name):
    T, B, I, H, L = shape
    control = nn.LSTM(I, H, num_layers=L, dtype=dtype)
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    h0, c0 = (torch.randn(L, B, H, dtype=dtype, requires_grad=True) for _ in range(2))
    launch_counts.clear()
    y, h_n, c_n = lstm_stack_wavefront(x, h0, c0, stack_weights(control),
                                       config=CONFIGS[config_name])
    # One launch per wavefront step: T + L - 1, not L * T.
    assert launch_counts == {"stepped": T + L - 1}
    want = control(x, (h0, c0))
    upstream = [torch.randn_like(t) for t in (y, h_n, c_n)]
    inputs = [x, h0, c0, *control.parameters()]
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip((y, h_n, c_n), upstream)),
                                inputs)
    want_grads = torch.autograd.grad(
        sum((o * u).sum() for o, u in zip((want[0], *want[1]), upstream)), inputs)
    ours = [y, h_n, c_n, *grads]
    theirs = [want[0], *want[1], *want_grads]
    names = ["y", "h_n", "c_n"] + [f"d{n}" for n in ["x", "h0", "c0"] + [
        n for n, _ in control.named_parameters()]]
    if dtype == torch.float32:
        # Both against float64: ours within twice nn.LSTM's fp32 error.
        want64 = float64_reference(control, x, (h0, c0), upstream)
        assert_within_twice_the_reference_error(ours, theirs, want64[0] + want64[1], FP32_SLACK,
                                                names)
        return
    for name, got, ref in zip(names, ours, theirs):
        torch.testing.assert_close(got, ref, **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("options", [
    pytest.param(dict(), id="plain"),
    pytest.param(dict(bias=False), id="no-bias"),
    pytest.param(dict(batch_first=True), id="batch-first"),
    pytest.param(dict(num_layers=4), id="L4"),
])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
def test_module_matches_nn_lstm_in_float64(options, with_state):
    options = dict(dict(num_layers=2), **options)
    control = nn.LSTM(5, 7, dtype=torch.float64, **options)
    ours = triton_copy(control, wavefront=True)
    T, B = 4, 3
    shape = (B, T, 5) if control.batch_first else (T, B, 5)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_state:
        hx = tuple(torch.randn(control.num_layers, B, 7, dtype=torch.float64, requires_grad=True)
                   for _ in range(2))
    launch_counts.clear()
    outs, grads, upstream = outputs_and_grads(ours, x, hx)
    # The forward and the backward each one wavefront: T + L - 1 and T + L stepped launches.
    assert launch_counts == {"stepped": 2 * (T + control.num_layers) - 1}
    want_outs, want_grads = float64_reference(ours, x, hx, upstream)
    for got, want in zip(outs + grads, want_outs + want_grads):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_packed_sequences_stop_each_row_at_its_length():
    control = nn.LSTM(4, 6, num_layers=3, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)
    x = torch.randn(6, 4, 4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 4, 3])
    hx = tuple(torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    results = []
    for module in (ours, control):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = module(packed, hx)
        upstream = [torch.ones_like(t) * 0.5 for t in (out.data, h, c)]
        loss = sum((t * u).sum() for t, u in zip((out.data, h, c), upstream))
        results.append([out.data, h, c, *torch.autograd.grad(loss, [x, *hx,
                                                                    *module.parameters()])])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_second_derivatives_match_nn_lstm():
    """create_graph=True: a penalty on the input gradient, differentiated again."""
    control = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)

    def penalty_grads(module):
        out, (h, c) = module(x)
        gx, = torch.autograd.grad((out * out).sum() + h.sum() + (c * c).sum(), x,
                                  create_graph=True)
        return torch.autograd.grad((gx * gx).sum(), [x, *module.parameters()])

    torch.testing.assert_close(penalty_grads(ours), penalty_grads(control), **TOL[torch.float64])


def test_inference_without_gradients_runs_one_wavefront():
    control = nn.LSTM(3, 5, num_layers=3, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    launch_counts.clear()
    with torch.no_grad():
        out, (h, c) = ours(x)
    assert launch_counts == {"stepped": 4 + 3 - 1}
    want, (want_h, want_c) = control(x)
    for got, ref in ((out, want), (h, want_h), (c, want_c)):
        torch.testing.assert_close(got, ref, **TOL[torch.float64])


@pytest.mark.parametrize("why, module_options, call", [
    ("a reset", dict(), dict(reset=True)),
    ("one layer", dict(num_layers=1), dict()),
])
def test_where_the_wavefront_does_not_apply_the_layers_run_one_after_another(why, module_options,
                                                                           call):
    options = dict(dict(num_layers=2), **module_options)
    control = nn.LSTM(3, 4, dtype=torch.float64, **options)
    ours = triton_copy(control, wavefront=True).train(call.get("train", False))
    T, B = 3, 2
    x = torch.randn(T, B, 3, dtype=torch.float64)
    reset = torch.zeros(T, B, dtype=torch.bool) if call.get("reset") else None
    launch_counts.clear()
    with torch.no_grad():
        out, _ = ours(x, reset=reset)
    # One launch per layer (H = 4 is one hidden block: persistent under the interpreter), where
    # the wavefront would be T + L - 1 stepped launches.
    assert launch_counts == {"persistent": ours.num_layers}, why
    if not call.get("train"):
        torch.testing.assert_close(out, control(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("config_name", ["heuristic", "streamed-bh8-bk16-st3-pa", "dataflow-bh4"])
def test_dropout_masks_between_layers_match_nn_lstm_layers_with_the_same_masks(config_name):
    T, B, I, H, L = 4, 3, 5, 6, 3
    control = nn.LSTM(I, H, num_layers=L, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(L, B, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keep = (torch.rand(L - 1, T, B, H, dtype=torch.float64) > 0.4).double() / 0.6
    launch_counts.clear()
    got = lstm_stack_wavefront(x, *hx, stack_weights(control), config=CONFIGS[config_name],
                               keep=keep)
    want = chained_layers(control, x, hx, keep)
    upstream = [torch.randn_like(t) for t in got]
    inputs = [x, *hx, *control.parameters()]
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(got, upstream)), inputs)
    assert launch_counts == {"stepped": 2 * (T + L) - 1}
    want_grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(want, upstream)), inputs)
    for k, (g, w) in enumerate(zip(list(got) + list(grads), list(want) + list(want_grads))):
        torch.testing.assert_close(g, w, **TOL[torch.float64], msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("with_dropout", [False, True], ids=["plain", "dropout"])
def test_bf16_within_twice_the_error_of_the_same_layers_chained(with_dropout):
    """bf16 through both wavefronts (the interpreter's bf16 arithmetic goes through fp32),
    against the same layers chained one by one in bf16, on the kernels and as nn.LSTMs, all
    measured in float64."""
    T, B, I, H, L = 5, 3, 8, 16, 3
    control = nn.LSTM(I, H, num_layers=L).to(torch.bfloat16)
    x = torch.randn(T, B, I).to(torch.bfloat16)
    keep = ((torch.rand(L - 1, T, B, H) > 0.3) / 0.7).to(torch.bfloat16) if with_dropout else None
    chain_keep = keep if with_dropout else torch.ones(L - 1, T, B, H, dtype=torch.bfloat16)
    upstream = [torch.randn(T, B, H), torch.randn(L, B, H)]
    reference = nn.LSTM(I, H, num_layers=L, dtype=torch.float64)
    reference.load_state_dict({k: v.double() for k, v in control.state_dict().items()})

    def run(fn, x, module):
        x = x.detach().requires_grad_()
        y, c = fn(x)
        loss = (y.double() * upstream[0].double()).sum() + (c.double() * upstream[1].double()).sum()
        return [y, c, *torch.autograd.grad(loss, [x, *module.parameters()])]

    ours = run(lambda x: lstm_stack_wavefront(x, None, None, stack_weights(control),
                                              keep=keep)[::2], x, control)
    want = run(lambda x: chained_layers(reference, x, None, chain_keep.double())[::2],
               x.double(), reference)
    bases = [run(lambda x: chained_layers(control, x, None, chain_keep, backend)[::2], x, control)
             for backend in ("triton", None)]
    for base in bases:
        for k, (got, b, w) in enumerate(zip(ours, base, want)):
            assert relative_error(got, w) <= 2 * relative_error(b, w) + 8e-3, (
                k, relative_error(got, w), relative_error(b, w))


def test_training_with_dropout_runs_the_wavefront_with_masks_drawn_up_front():
    """The module draws the masks (dropout_masks, torch's RNG) and runs both wavefronts."""
    from triton_lstm.autograd import dropout_masks
    control = nn.LSTM(3, 5, num_layers=3, dropout=0.5, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True).train()
    T, B = 4, 2
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1234)
    launch_counts.clear()
    out, (h, c) = ours(x)
    grads = torch.autograd.grad(out.sum() + c.sum(), [x, *ours.parameters()])
    assert launch_counts == {"stepped": 2 * (T + 3) - 1}
    torch.manual_seed(1234)
    keep = dropout_masks(3, x, 5, 0.5)
    assert set(keep.unique().tolist()) == {0.0, 2.0}
    want, _, want_c = chained_layers(control, x, None, keep)
    want_grads = torch.autograd.grad(want.sum() + want_c.sum(), [x, *control.parameters()])
    torch.testing.assert_close(out, want, **TOL[torch.float64])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_eval_mode_with_dropout_runs_the_wavefront():
    control = nn.LSTM(3, 4, num_layers=2, dropout=0.5, dtype=torch.float64).eval()
    ours = triton_copy(control, wavefront=True).eval()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    launch_counts.clear()
    with torch.no_grad():
        out, _ = ours(x)
    assert launch_counts == {"stepped": 3 + 2 - 1}
    torch.testing.assert_close(out, control(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("options, error", [
    (dict(bidirectional=True), "bidirectional=True"),
    (dict(proj_size=2), "proj_size=2"),
    (dict(recompute=4), "recompute=4"),
])
def test_options_the_wavefront_cannot_run_are_refused_at_construction(options, error):
    with pytest.raises(ValueError, match=f"wavefront=True runs unidirectional.*{error}"):
        triton_lstm.LSTM(3, 4, num_layers=2, wavefront=True, **options)


def test_wavefront_must_be_a_bool():
    with pytest.raises(TypeError, match="wavefront must be True or False, got 'yes'"):
        triton_lstm.LSTM(3, 4, num_layers=2, wavefront="yes")


def test_chunked_configs_are_refused():
    control = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="config: the wavefront runs resident or streamed"):
        lstm_stack_wavefront(x, None, None, [tuple(w.detach() for w in layer)
                                             for layer in stack_weights(control)],
                             config=KernelConfig(16, 4, chunked=True))


@pytest.mark.timeout(300)     # a wait that never ends fails here instead of hanging
@pytest.mark.parametrize("mark_in_h0", [False, True], ids=["h0", "h0-holding-the-mark"])
def test_dataflow_with_nan_inf_input_computes_what_the_barrier_computes(mark_in_h0):
    """A NaN or inf in the input is a value like any other, never "not yet written"; an h0
    holding the unwritten mark itself is read, not waited for."""
    T, B, I, H, L = 4, 3, 4, 8, 3
    control = nn.LSTM(I, H, num_layers=L)
    weights = [tuple(w.detach() for w in layer) for layer in stack_weights(control)]
    x = torch.randn(T, B, I)
    x[1, 0, :2] = float("nan")
    x[2, 1, :2] = float("inf")
    h0, c0 = torch.randn(L, B, H), torch.randn(L, B, H)
    if mark_in_h0:
        h0[1, 2, :3] = torch.tensor(-1, dtype=torch.int32).view(torch.float32)
    runs = []
    for dataflow in (False, True):
        config = KernelConfig(block_b=16, block_h=4, split_k=1, dataflow=dataflow)
        runs.append(lstm_stack_wavefront(x, h0, c0, weights, config=config))
    for k, (barrier, dataflow) in enumerate(zip(*runs)):
        assert torch.equal(barrier.isnan(), dataflow.isnan()), k
        assert torch.equal(barrier.nan_to_num(), dataflow.nan_to_num()), k
    # Row 2's output is NaN exactly where its h0 holds the mark (a NaN pattern).
    assert runs[0][0][:, 2].isfinite().all() != mark_in_h0


def test_state_dict_round_trip_and_repr():
    control = nn.LSTM(3, 4, num_layers=2)
    ours = triton_lstm.LSTM.from_torch(control, wavefront=True)
    assert ours.wavefront and "wavefront=True" in repr(ours)
    back = ours.to_torch()
    for (name, p), q in zip(control.named_parameters(), back.parameters()):
        assert torch.equal(p, q), name
    assert "wavefront" not in repr(triton_lstm.LSTM(3, 4, num_layers=2))


def test_wavefront_ops_pass_opcheck():
    T, B, H, L = 3, 2, 5, 3
    dtype = torch.float64
    gx = torch.randn(T, B, 4 * H, dtype=dtype)
    w_ih = torch.randn(L - 1, 4 * H, H, dtype=dtype) / 3
    bias = torch.randn(L - 1, 4 * H, dtype=dtype)
    w_hh = torch.randn(L, 4 * H, H, dtype=dtype) / 3
    h0, c0 = torch.randn(L, B, H, dtype=dtype), torch.randn(L, B, H, dtype=dtype)
    lengths = torch.tensor([3, 1], dtype=torch.int32)
    op = torch.ops.triton_lstm.wavefront_forward.default
    for save in (False, True):
        torch.library.opcheck(op, (gx, w_ih, bias, w_hh, h0, c0, lengths, save, None, False))
    torch.library.opcheck(op, (gx, w_ih, bias, w_hh, None, None, None, True, None, True))
    keep = (torch.rand(L - 1, T, B, H, dtype=dtype) > 0.5).double() * 2
    torch.library.opcheck(op, (gx, w_ih, bias, w_hh, h0, c0, lengths, True, None, False, keep))
    h_all, h_n, c_n, gates, c_all, _ = op(gx, w_ih, bias, w_hh, h0, c0, lengths, True, None,
                                          False)
    backward = torch.ops.triton_lstm.wavefront_backward.default
    dy = torch.randn(T, B, H, dtype=dtype)
    torch.library.opcheck(backward, (dy, torch.randn_like(h_n), torch.randn_like(c_n), gates,
                                     c_all, c0, lengths, w_ih, w_hh, None, False))
    torch.library.opcheck(backward, (None, torch.randn_like(h_n), None, gates, c_all, None, None,
                                     w_ih, w_hh, None, True))
    torch.library.opcheck(backward, (dy, None, None, gates, c_all, c0, lengths, w_ih, w_hh, None,
                                     False, keep))


def test_per_sample_gradients_match_nn_lstm():
    """torch.func.vmap over grad: the ops' vmap rules fold the mapped dim into the batch."""
    from torch.func import functional_call
    control = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)
    params = {k: v.detach() for k, v in control.named_parameters()}
    xs = torch.randn(3, 4, 2, 3, dtype=torch.float64)

    def loss(module, p, x):
        return functional_call(module, p, (x,))[0].sin().sum()

    per_sample = torch.func.vmap(torch.func.grad(lambda p, x: loss(ours, p, x)),
                                 in_dims=(None, 0))(params, xs)
    for k, x in enumerate(xs):
        want = torch.func.grad(lambda p: loss(control, p, x))(params)
        torch.testing.assert_close({n: g[k] for n, g in per_sample.items()}, want,
                                   **TOL[torch.float64])


def test_vmap_over_the_batch_matches_a_loop_of_nn_lstm():
    control = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)
    xs = torch.randn(3, 4, 3, dtype=torch.float64)          # 3 unbatched [T, I] sequences
    got_y, (got_h, got_c) = torch.func.vmap(ours)(xs)
    for k, x in enumerate(xs):
        y, (h, c) = control(x)
        for got, want in ((got_y[k], y), (got_h[k], h), (got_c[k], c)):
            torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_compile_fullgraph_dynamic_shapes_trains_like_eager(fullgraph_enabled):
    """One graph through the wavefront op (fullgraph raises at a break), T and B varying."""
    torch._dynamo.reset()
    control = nn.LSTM(3, 4, num_layers=2, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)

    def loss(x):
        y, (h, c) = ours(x)
        return y.sin().sum() + h.sum() + (c * c).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=True)
    for T, B in ((3, 2), (5, 3)):
        x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
        launch_counts.clear()
        got = torch.autograd.grad(compiled(x), [x, *ours.parameters()])
        assert launch_counts == {"stepped": 2 * (T + 2) - 1}     # both wavefronts, compiled
        want = torch.autograd.grad(loss(x), [x, *ours.parameters()])
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_explain_names_the_wavefront_and_its_tiles():
    control = nn.LSTM(3, 4, num_layers=3, dtype=torch.float64)
    ours = triton_copy(control, wavefront=True)
    explanation = triton_lstm.explain(ours, torch.randn(5, 2, 3, dtype=torch.float64))
    assert explanation.path == "kernels"
    for kernel in ("forward", "backward"):
        config, source = explanation.tiles[kernel]
        assert source == "wavefront heuristic" and config.block_b == 16
        assert f"{kernel} tiles" in str(explanation)
    assert "(wavefront heuristic)" in str(explanation)
