"""triton_lstm.LSTM as a drop-in torch.nn.LSTM: construction, state, forward, backward, errors.

Every numerical check compares against a torch.nn.LSTM holding the same state_dict.
Tests that run the Triton kernels on CPU tensors need the interpreter; the rest
(construction, the PyTorch path, input validation) run anywhere.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import triton_lstm
from triton_lstm import LSTM, LSTMFunction, LSTMInputError, dispatch

from .conftest import requires_interpreter
from .helpers import (FP32_SLACK, assert_within_twice_the_reference_error, float64_reference,
                      outputs_and_grads, triton_copy)

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}
OPTION_NAMES = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size")


def kernel_launches():
    return sum(dispatch.launch_counts.values())


def random_input(module, T, B, dtype, *, requires_grad=True):
    """[T, B, I] ([B, T, I] if batch_first; [T, I] when B is None) random input."""
    if B is None:
        shape = (T, module.input_size)
    else:
        shape = (B, T, module.input_size) if module.batch_first else (T, B, module.input_size)
    return torch.randn(shape, dtype=dtype, requires_grad=requires_grad)


def random_state(module, B, dtype, *, requires_grad=True):
    """(h0, c0), each [num_layers * num_directions, B, H] ([.., H] when B is None)."""
    rows = module.num_layers * (2 if module.bidirectional else 1)
    sizes = (module.proj_size or module.hidden_size, module.hidden_size)
    return tuple(torch.randn((rows, size) if B is None else (rows, B, size), dtype=dtype,
                             requires_grad=requires_grad) for size in sizes)


def grad_names(module, hx):
    state = ["h0", "c0"] if hx is not None else []
    return ["input"] + state + [n for n, _ in module.named_parameters()]


def assert_matches(got, want, names, dtype):
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def check_against_reference(module, ref, x, hx, dtype):
    """Outputs and every gradient of module and ref, for the same random upstream gradients;
    in fp32 both against float64, ours within twice ref's error."""
    before = kernel_launches()
    outs, grads, upstream = outputs_and_grads(module, x, hx)
    assert kernel_launches() > before, "the Triton kernels did not run"
    ref_outs, ref_grads, _ = outputs_and_grads(ref, x, hx, upstream)
    names = ["output", "h_n", "c_n"] + grad_names(ref, hx)
    if dtype == torch.float32:
        want_outs, want_grads = float64_reference(ref, x, hx, upstream)
        assert_within_twice_the_reference_error(outs + grads, ref_outs + ref_grads,
                                                want_outs + want_grads, FP32_SLACK, names)
        return
    assert_matches(outs + grads, ref_outs + ref_grads, names, dtype)


# -- construction, parameters, state_dict -----------------------------------------------------

CONSTRUCTOR_OPTIONS = [
    pytest.param(dict(num_layers=L, bias=bias, bidirectional=bidir, proj_size=proj),
                 id=f"L{L}-{'bias' if bias else 'nobias'}-{'bidir' if bidir else 'uni'}-proj{proj}")
    for L in (1, 2) for bias in (True, False) for bidir in (False, True) for proj in (0, 3)
]


@pytest.mark.parametrize("options", CONSTRUCTOR_OPTIONS)
def test_parameters_and_initialisation_match_nn_lstm(options, fresh_seed):
    torch.manual_seed(fresh_seed)
    ref = nn.LSTM(4, 5, **options)
    torch.manual_seed(fresh_seed)
    module = LSTM(4, 5, **options)
    assert isinstance(module, nn.LSTM)
    got = [(n, p.shape) for n, p in module.named_parameters()]
    assert got == [(n, p.shape) for n, p in ref.named_parameters()]
    assert module._flat_weights_names == ref._flat_weights_names
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert len(module.all_weights) == len(ref.all_weights)
    for layer, ref_layer in zip(module.all_weights, ref.all_weights):
        assert len(layer) == len(ref_layer)
        for p, q in zip(layer, ref_layer):
            assert torch.equal(p, q)
    for name in OPTION_NAMES:
        assert getattr(module, name) == getattr(ref, name), name


@pytest.mark.parametrize("options", CONSTRUCTOR_OPTIONS)
def test_state_dict_round_trips_with_nn_lstm(options):
    source = nn.LSTM(4, 5, **options)
    module = LSTM(4, 5, **options)        # differently initialised until loaded
    module.load_state_dict(source.state_dict())
    want = source.state_dict()
    got = module.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    back = nn.LSTM(4, 5, **options)
    back.load_state_dict(module.state_dict())   # strict: same keys both ways
    for key, value in back.state_dict().items():
        assert torch.equal(value, want[key]), key
    # The flat weights nn.LSTM's forward reads follow the loaded parameters.
    for layer, ref_layer in zip(module.all_weights, source.all_weights):
        for p, q in zip(layer, ref_layer):
            assert torch.equal(p, q)


FROM_TORCH_OPTIONS = [
    pytest.param(dict(num_layers=2, dropout=0.25, batch_first=True, bidirectional=True),
                 torch.float32, True, id="L2-dropout-bf-bidir-fp32-train"),
    pytest.param(dict(bias=False, proj_size=3), torch.float64, False, id="nobias-proj-fp64-eval"),
]


@pytest.mark.parametrize("options, dtype, training", FROM_TORCH_OPTIONS)
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_from_torch_and_to_torch_keep_options_weights_and_mode(options, dtype, training, backend):
    source = nn.LSTM(4, 5, dtype=dtype, **options).train(training)
    module = LSTM.from_torch(source, backend=backend)
    assert type(module) is LSTM and module.backend == backend
    back = module.to_torch()
    assert type(back) is nn.LSTM
    for converted in (module, back):
        for name in OPTION_NAMES:
            assert getattr(converted, name) == getattr(source, name), name
        assert converted.training is training
        assert list(converted.state_dict()) == list(source.state_dict())
        for key, value in converted.state_dict().items():
            assert value.dtype == dtype and value.device == source.weight_ih_l0.device
            assert torch.equal(value, source.state_dict()[key]), key


def test_from_torch_default_backend_is_auto():
    assert LSTM.from_torch(nn.LSTM(3, 4)).backend == "auto"
    assert LSTM(3, 4).backend == "auto"


@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_extra_repr_shows_backend_only_when_not_auto(backend):
    options = dict(num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True)
    want = nn.LSTM(3, 4, **options).extra_repr()
    module = LSTM(3, 4, backend=backend, **options)
    text = module.extra_repr()
    if backend == "auto":
        assert text == want
        assert "backend" not in repr(module)
    else:
        assert text == f"{want}, backend='{backend}'"
        assert f"backend='{backend}'" in repr(module)


@pytest.mark.parametrize("backend", ["cuda", "Triton", "", None])
def test_invalid_backend_is_refused(backend):
    with pytest.raises(ValueError, match="backend"):
        LSTM(3, 4, backend=backend)


def test_flatten_parameters_is_harmless():
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    module = LSTM.from_torch(ref, backend="torch")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.flatten_parameters()
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    x = torch.randn(3, 2, 3)
    y, (h, c) = module(x)
    yr, (hr, cr) = ref(x)
    assert torch.equal(y, yr) and torch.equal(h, hr) and torch.equal(c, cr)


def test_deepcopy_and_dtype_conversion_keep_the_module_working():
    module = LSTM(3, 4, num_layers=2, backend="torch")
    clone = copy.deepcopy(module)
    assert type(clone) is LSTM and clone.backend == "torch"
    for key, value in clone.state_dict().items():
        assert torch.equal(value, module.state_dict()[key])
    clone.double()
    assert all(p.dtype == torch.float64 for p in clone.parameters())
    assert all(p.dtype == torch.float64 for layer in clone.all_weights for p in layer)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    y, (h, c) = clone(x)
    assert y.dtype == torch.float64
    want, (want_h, want_c) = module.to_torch().double()(x)
    for got, exp in ((y, want), (h, want_h), (c, want_c)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


def test_single_layer_dropout_warns_like_nn_lstm():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nn.LSTM(3, 4, dropout=0.5)
    want = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert want, "torch.nn.LSTM no longer warns; update this test"
    with pytest.warns(UserWarning) as record:
        LSTM(3, 4, dropout=0.5)
    assert [str(w.message) for w in record if issubclass(w.category, UserWarning)] == want
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LSTM(3, 4, num_layers=2, dropout=0.5)


# -- forward and backward through the Triton kernels ------------------------------------------

def _forward_cases():
    cases = []
    for L in (1, 2):
        for bidir in (False, True):
            for bf in (False, True):
                for with_hx in (True, False):
                    name = (f"L{L}-{'bidir' if bidir else 'uni'}-{'bf' if bf else 'tf'}-"
                            f"{'hx' if with_hx else 'nohx'}")
                    cases.append(pytest.param(L, bidir, bf, with_hx, True, 4, torch.float64,
                                              id=f"{name}-fp64"))
    cases += [
        pytest.param(2, True, True, True, True, 4, torch.float32, id="L2-bidir-bf-hx-fp32"),
        pytest.param(1, False, False, False, True, 4, torch.float32, id="L1-uni-tf-nohx-fp32"),
        pytest.param(2, True, False, True, False, 4, torch.float64,
                     id="L2-bidir-tf-hx-nobias-fp64"),
        pytest.param(2, True, False, True, True, 1, torch.float64, id="L2-bidir-tf-hx-T1-fp64"),
    ]
    return cases


@requires_interpreter
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, with_hx, bias, T, dtype",
                         _forward_cases())
def test_forward_and_all_gradients_match_nn_lstm(num_layers, bidirectional, batch_first, with_hx,
                                                  bias, T, dtype):
    ref = nn.LSTM(4, 7, num_layers=num_layers, bias=bias, batch_first=batch_first,
                  bidirectional=bidirectional, dtype=dtype)
    module = triton_copy(ref)
    x = random_input(ref, T, 3, dtype)
    hx = random_state(ref, 3, dtype) if with_hx else None
    check_against_reference(module, ref, x, hx, dtype)


@requires_interpreter
@pytest.mark.parametrize("options", [
    pytest.param(dict(), id="uni"),
    pytest.param(dict(bidirectional=True), id="bidir"),
    pytest.param(dict(num_layers=2, bidirectional=True, proj_size=3), id="L2-bidir-proj"),
    pytest.param(dict(num_layers=2, wavefront=True), id="wavefront"),
    pytest.param(dict(recompute=2, bidirectional=True), id="bidir-recompute"),
])
def test_gradients_accumulate_over_backward_passes_and_clip_like_nn_lstm(options):
    """Every parameter's .grad in memory of its own (b_ih's and b_hh's are equal values):
    two backward passes add up, and clipping scales each once, as with nn.LSTM."""
    torch_options = {k: v for k, v in options.items() if k not in ("wavefront", "recompute")}
    ref = nn.LSTM(3, 4, dtype=torch.float64, **torch_options)
    module = triton_copy(ref, **{k: v for k, v in options.items() if k not in torch_options})
    xs = [torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(2)]
    for m in (module, ref):
        for x in xs:
            (m(x)[0] * m(x)[0].detach().cos()).sum().backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm=0.1)
    pointers = [p.grad.data_ptr() for p in module.parameters()]
    assert len(set(pointers)) == len(pointers)
    for (name, p), q in zip(module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64], msg=name)


@requires_interpreter
@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
def test_gradients_when_only_one_output_is_used(used):
    dtype = torch.float64
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=dtype)
    module = triton_copy(ref)
    x = random_input(ref, 4, 2, dtype)
    hx = random_state(ref, 2, dtype)
    results = []
    for m in (module, ref):
        y, (h, c) = m(x, hx)
        out = {"output": y, "h_n": h, "c_n": c}[used]
        inputs = [x, *hx, *m.parameters()]
        results.append(torch.autograd.grad((out * out.detach().cos()).sum(), inputs))
    assert_matches(results[0], results[1], grad_names(ref, hx), dtype)


def _non_contiguous_problem(non_contiguous):
    """LSTM(3, 5) in float64 with input and state of batch 3, some of them strided views."""
    dtype = torch.float64
    ref = nn.LSTM(3, 5, dtype=dtype)
    x = torch.randn(4, 3, 3, dtype=dtype)
    h0, c0 = torch.randn(2, 1, 3, 5, dtype=dtype)
    if "input" in non_contiguous:
        x = torch.randn(4, 6, 3, dtype=dtype)[:, ::2]
    if "h0" in non_contiguous:
        h0 = torch.randn(1, 5, 3, dtype=dtype).transpose(1, 2)
    if "c0" in non_contiguous:
        c0 = torch.randn(1, 3, 10, dtype=dtype)[:, :, ::2]
    for name, t in (("input", x), ("h0", h0), ("c0", c0)):
        assert t.is_contiguous() != (name in non_contiguous)
    return ref, x.requires_grad_(), (h0.requires_grad_(), c0.requires_grad_())


@requires_interpreter
def test_non_contiguous_input_and_h0():
    ref, x, hx = _non_contiguous_problem(("input", "h0"))
    check_against_reference(triton_copy(ref), ref, x, hx, torch.float64)


@requires_interpreter
def test_non_contiguous_c0():
    ref, x, hx = _non_contiguous_problem(("c0",))
    check_against_reference(triton_copy(ref), ref, x, hx, torch.float64)


@requires_interpreter
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, with_hx", [
    pytest.param(1, False, False, True, id="L1-uni-tf-hx"),
    pytest.param(1, False, True, False, id="L1-uni-bf-nohx"),
    pytest.param(2, True, False, True, id="L2-bidir-tf-hx"),
    pytest.param(2, True, True, False, id="L2-bidir-bf-nohx"),
])
def test_unbatched_input_matches_nn_lstm(num_layers, bidirectional, batch_first, with_hx):
    dtype = torch.float64
    ref = nn.LSTM(3, 6, num_layers=num_layers, batch_first=batch_first,
                  bidirectional=bidirectional, dtype=dtype)
    module = triton_copy(ref)
    x = random_input(ref, 5, None, dtype)
    hx = random_state(ref, None, dtype) if with_hx else None
    y, (h, c) = module(x, hx)
    D = 2 if bidirectional else 1
    assert y.shape == (5, D * 6)
    assert h.shape == c.shape == (num_layers * D, 6)
    check_against_reference(module, ref, x, hx, dtype)


@requires_interpreter
def test_no_grad_forward_matches_grad_mode():
    dtype = torch.float64
    ref = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=dtype)
    module = triton_copy(ref)
    x = random_input(ref, 4, 2, dtype)
    hx = random_state(ref, 2, dtype)
    with_grad = module(x, hx)
    before = kernel_launches()
    with torch.no_grad():
        y, (h, c) = module(x, hx)
    assert kernel_launches() > before
    for got, want in zip((y, h, c), (with_grad[0], *with_grad[1])):
        assert not got.requires_grad and got.grad_fn is None
        assert want.requires_grad
        torch.testing.assert_close(got, want.detach(), **TOL[dtype])
    with torch.no_grad():
        yr, (hr, cr) = ref(x, hx)
    assert_matches((y, h, c), (yr, hr, cr), ["output", "h_n", "c_n"], dtype)


@requires_interpreter
@pytest.mark.parametrize("with_state_and_bias", [True, False], ids=["state-bias", "nostate-nobias"])
def test_lstm_function_gradcheck(with_state_and_bias):
    T, B, I, H = 3, 2, 3, 4

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w_ih, w_hh = leaf(T, B, I), leaf(4 * H, I), leaf(4 * H, H)
    if with_state_and_bias:
        h0, c0, b_ih, b_hh = leaf(B, H), leaf(B, H), leaf(4 * H), leaf(4 * H)
    else:
        h0 = c0 = b_ih = b_hh = None
    # fast_mode checks random projections of the Jacobian: the full one needs ~200
    # interpreted forwards, too slow here (test_kernels compares every gradient to nn.LSTM).
    assert torch.autograd.gradcheck(LSTMFunction.apply, (x, h0, c0, w_ih, w_hh, b_ih, b_hh),
                                    fast_mode=True)


@requires_interpreter
def test_double_backward_matches_nn_lstm():
    """A gradient penalty (create_graph=True) matches nn.LSTM's second derivatives."""
    dtype = torch.float64
    ref = nn.LSTM(2, 3, dtype=dtype)
    module = triton_copy(ref)
    x = random_input(ref, 3, 2, dtype)

    def penalty_grads(m):
        y, _ = m(x)
        gx, = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        grads = torch.autograd.grad((gx * gx).sum(), list(m.parameters()), allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, m.parameters())]

    assert_matches(penalty_grads(module), penalty_grads(ref), [n for n, _ in ref.named_parameters()],
                   dtype)


# -- dropout ------------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_dropout_eval_mode_matches_nn_lstm(bidirectional):
    dtype = torch.float64
    ref = nn.LSTM(3, 5, num_layers=2, dropout=0.5, bidirectional=bidirectional, dtype=dtype).eval()
    module = triton_copy(ref)
    assert not module.training
    x = random_input(ref, 4, 3, dtype)
    check_against_reference(module, ref, x, random_state(ref, 3, dtype), dtype)


@requires_interpreter
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_dropout_training_mode_draws_nn_lstms_masks(bidirectional, fresh_seed):
    """Dropout between layers draws the same masks, in the same order, as nn.LSTM on CPU."""
    dtype = torch.float64
    ref = nn.LSTM(3, 5, num_layers=3, dropout=0.5, bidirectional=bidirectional, dtype=dtype).train()
    module = triton_copy(ref)
    assert module.training
    x = random_input(ref, 4, 3, dtype)
    hx = random_state(ref, 3, dtype)
    torch.manual_seed(fresh_seed + 1)
    outs, grads, upstream = outputs_and_grads(module, x, hx)
    torch.manual_seed(fresh_seed + 1)
    ref_outs, ref_grads, _ = outputs_and_grads(ref, x, hx, upstream)
    assert_matches(outs, ref_outs, ["output", "h_n", "c_n"], dtype)
    assert_matches(grads, ref_grads, grad_names(ref, hx), dtype)

    torch.manual_seed(fresh_seed + 1)
    again = outputs_and_grads(module, x, hx, upstream)
    for a, b in zip(outs + grads, again[0] + again[1]):
        assert torch.equal(a, b)      # reproducible for a fixed seed

    with torch.no_grad():
        y_eval, _ = module.eval()(x, hx)
    assert not torch.allclose(outs[0], y_eval), "training-mode dropout changed nothing"


@requires_interpreter
def test_single_layer_dropout_is_a_no_op_in_training():
    dtype = torch.float64
    with pytest.warns(UserWarning):
        ref = nn.LSTM(3, 5, dropout=0.5, dtype=dtype).train()
        module = triton_copy(ref)
    x = random_input(ref, 4, 2, dtype, requires_grad=False)
    with torch.no_grad():
        y_train, (h_train, _) = module(x)
        y_eval, (h_eval, _) = module.eval()(x)
        y_ref, _ = ref(x)
    assert torch.equal(y_train, y_eval) and torch.equal(h_train, h_eval)
    torch.testing.assert_close(y_train, y_ref, **TOL[dtype])


# -- the PyTorch path ---------------------------------------------------------------------------

def _torch_path_results(module, x, hx, packed_lengths):
    """Outputs and gradients (input, hx, parameters) of a fixed nonlinear loss."""
    inp = pack_padded_sequence(x, packed_lengths, batch_first=module.batch_first,
                               enforce_sorted=False) if packed_lengths else x
    out, (h, c) = module(inp, hx)
    y = out.data if isinstance(out, PackedSequence) else out
    loss = y.sin().sum() + h.cos().sum() + (c * c).sum()
    inputs = [x] + (list(hx) if hx is not None else []) + list(module.parameters())
    return [y, h, c] + list(torch.autograd.grad(loss, inputs))


TORCH_PATH_CASES = [
    pytest.param(dict(num_layers=2, bidirectional=True, batch_first=True), True, None,
                 id="L2-bidir-bf-hx"),
    pytest.param(dict(num_layers=2, proj_size=3), True, None, id="L2-proj-hx"),
    pytest.param(dict(bidirectional=True, proj_size=3, batch_first=True), False, None,
                 id="bidir-proj-bf-nohx"),
    pytest.param(dict(num_layers=2, bidirectional=True), True, [4, 2, 3], id="L2-bidir-packed-hx"),
    pytest.param(dict(proj_size=3, batch_first=True), False, [1, 4, 2], id="proj-bf-packed-nohx"),
]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("options, with_hx, packed_lengths", TORCH_PATH_CASES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_path_on_cpu_is_nn_lstm_exactly(backend, options, with_hx, packed_lengths):
    ref = nn.LSTM(3, 5, **options)
    module = LSTM.from_torch(ref, backend=backend)
    x = random_input(ref, 4, 3, torch.float32)
    hx = random_state(ref, 3, torch.float32) if with_hx else None
    before = dict(dispatch.launch_counts)
    got = _torch_path_results(module, x, hx, packed_lengths)
    assert dict(dispatch.launch_counts) == before, "the CPU PyTorch path launched kernels"
    want = _torch_path_results(ref, x, hx, packed_lengths)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    module = LSTM(3, 4, backend="triton")
    auto = LSTM.from_torch(module, backend="auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 1, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        module(x)
    y, _ = auto(x)                                    # "auto" still takes the PyTorch path
    assert torch.equal(y, nn.LSTM.forward(module, x)[0])


# -- bad input ----------------------------------------------------------------------------------

INPUT_ERRORS = [  # input (for a module with input_size=3), exception, match
    pytest.param(lambda: torch.randn(3), LSTMInputError, r"Expected input to be 2D or 3D, got 1D", id="1-D"),
    pytest.param(lambda: torch.randn(2, 2, 2, 3), LSTMInputError, r"Expected input to be 2D or 3D, got 4D",
                 id="4-D"),
    pytest.param(lambda: torch.randn(4, 2, 5), LSTMInputError,
                 r"input.size\(-1\) must be equal to input_size. Expected 3, got 5", id="feature-size"),
    pytest.param(lambda: torch.randn(4, 5), LSTMInputError, r"Expected 3, got 5",
                 id="feature-size-unbatched"),
    pytest.param(lambda: torch.randn(4, 2, 3, dtype=torch.float64), LSTMInputError,
                 r"RNN input dtype .* does not match weight dtype .* Convert input: input\.to\(.*\), "
                 r"or convert model: model\.to\(.*\)", id="dtype"),
    pytest.param(lambda: torch.randn(0, 2, 3), LSTMInputError,
                 r"Expected sequence length to be larger than 0 in RNN",
                 id="length-0"),
    pytest.param(lambda: torch.randn(0, 3), LSTMInputError,
                 r"Expected sequence length to be larger than 0 in RNN",
                 id="length-0-unbatched"),
    pytest.param(lambda: torch.randn(4, 2, 3, device="meta"), LSTMInputError,
                 r"not at the same device, found input tensor at meta and parameter tensor at cpu",
                 id="device"),
    pytest.param(lambda: [[0.0, 1.0, 2.0]], TypeError, r"input must be a torch.Tensor",
                 id="not-a-tensor"),
]


WEIGHT_ERRORS = [  # (parameter, replacement) of LSTM(3, 4, bidirectional, proj_size=2), match
    pytest.param("weight_hh_l0", lambda: torch.randn(16, 5), r"weight_hh_l0 has shape \(16, 5\), "
                 r"expected \(16, 2\)", id="weight-shape"),
    pytest.param("weight_ih_l0_reverse", lambda: torch.randn(12, 3), r"weight_ih_l0_reverse has "
                 r"shape \(12, 3\), expected \(16, 3\)", id="reverse-shape"),
    pytest.param("weight_hr_l0", lambda: torch.randn(4, 4), r"weight_hr_l0 has shape \(4, 4\), "
                 r"expected \(2, 4\)", id="projection-shape"),
    pytest.param("bias_hh_l0", lambda: torch.randn(16, dtype=torch.float64),
                 r"bias_hh_l0 has dtype torch.float64, expected torch.float32", id="bias-dtype"),
    pytest.param("weight_hh_l0_reverse", lambda: torch.randn(16, 2, device="meta"),
                 r"weight_hh_l0_reverse is on meta, expected the input's device cpu",
                 id="device"),
    pytest.param("bias_ih_l0", lambda: None, r"bias_ih_l0 must be a tensor of shape \(16,\), "
                 r"got NoneType", id="bias-none"),
]


@requires_interpreter
@pytest.mark.parametrize("name, make, match", WEIGHT_ERRORS)
def test_a_parameter_replaced_by_a_wrong_one_is_refused_naming_it(name, make, match):
    """The kernels read the parameters raw: one of the wrong shape, dtype or device is an
    error naming it (nn.LSTM's own path refuses these too), for a sequence and for a step."""
    weight = make()
    for bidirectional in (True, False):    # step() runs unidirectional LSTMs only
        if name.endswith("_reverse") and not bidirectional:
            continue
        module = LSTM(3, 4, bidirectional=bidirectional, proj_size=2, backend="triton")
        setattr(module, name, weight if weight is None else nn.Parameter(weight))
        with pytest.raises(LSTMInputError, match=match):
            module(torch.randn(5, 2, 3))
        if not bidirectional:
            with pytest.raises(LSTMInputError, match=match):
                module.step(torch.randn(2, 3))


@pytest.mark.parametrize("make_input, error, match", INPUT_ERRORS)
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_bad_input_is_refused_naming_it(backend, make_input, error, match):
    module = LSTM(3, 4, backend=backend)
    before = dict(dispatch.launch_counts)
    with pytest.raises(error, match=match):
        module(make_input())
    assert dict(dispatch.launch_counts) == before


def test_sequence_length_0_batch_first_is_refused():
    module = LSTM(3, 4, batch_first=True)
    with pytest.raises(LSTMInputError, match="Expected sequence length to be larger than 0"):
        module(torch.randn(2, 0, 3))


@pytest.mark.parametrize("make_input", [
    pytest.param(lambda: torch.randn(3), id="1-D"),
    pytest.param(lambda: torch.randn(4, 2, 5), id="feature-size"),
    pytest.param(lambda: torch.randn(0, 2, 3), id="length-0"),
    pytest.param(lambda: torch.randn(4, 2, 3, device="meta"), id="device"),
])
def test_input_errors_are_caught_like_nn_lstms(make_input):
    """Code that catches nn.LSTM's exception type for bad input also catches LSTMInputError."""
    assert issubclass(LSTMInputError, RuntimeError) and issubclass(LSTMInputError, ValueError)
    with pytest.raises(Exception) as ref_error:
        nn.LSTM(3, 4)(make_input())
    for catch in (type(ref_error.value), RuntimeError, ValueError):
        try:
            LSTM(3, 4)(make_input())
        except catch as error:
            assert isinstance(error, LSTMInputError)
        else:
            pytest.fail("no exception")


def _hx(*shapes, dtype=torch.float64, device="cpu"):
    return tuple(torch.randn(s, dtype=dtype, device=device) for s in shapes)


HX_ERRORS = [  # (input shape, hx factory, exception, match) for LSTM(3, 5), float64
    pytest.param((4, 2, 3), lambda: torch.randn(1, 2, 5, dtype=torch.float64), TypeError,
                 r"hx must be a tuple \(h0, c0\)", id="hx-not-a-tuple"),
    pytest.param((4, 2, 3), lambda: _hx((1, 2, 5)), TypeError, r"hx must be a tuple .* length 1",
                 id="hx-length-1"),
    pytest.param((4, 2, 3), lambda: _hx((1, 2, 5), (1, 2, 5), (1, 2, 5)), TypeError,
                 r"hx must be a tuple .* length 3", id="hx-length-3"),
    pytest.param((4, 2, 3), lambda: (_hx((1, 2, 5))[0], None), TypeError,
                 r"hx must be a tuple \(h0, c0\) of two tensors", id="hx-not-tensors"),
    pytest.param((4, 2, 3), lambda: _hx((2, 2, 5), (1, 2, 5)), LSTMInputError,
                 r"Expected hidden\[0\] size \(1, 2, 5\), got \[2, 2, 5\] \(h0", id="h0-layers"),
    pytest.param((4, 2, 3), lambda: _hx((1, 2, 4), (1, 2, 5)), LSTMInputError,
                 r"Expected hidden\[0\] size \(1, 2, 5\), got \[1, 2, 4\]", id="h0-hidden"),
    pytest.param((4, 2, 3), lambda: _hx((1, 2, 5), (1, 2, 6)), LSTMInputError,
                 r"Expected hidden\[1\] size \(1, 2, 5\), got \[1, 2, 6\] \(c0", id="c0-hidden"),
    pytest.param((4, 2, 3), lambda: _hx((1, 2, 5), (1, 2, 5, 1)), LSTMInputError,
                 r"hx and cx should also be 3-D but got \(3-D, 4-D\)", id="c0-rank"),
    pytest.param((4, 2, 3), lambda: _hx((1, 3, 5), (1, 3, 5)), LSTMInputError,
                 r"Expected hidden\[0\] size \(1, 2, 5\), got \[1, 3, 5\]", id="hx-batch"),
    pytest.param((4, 2, 3), lambda: _hx((1, 5), (1, 5)), LSTMInputError,
                 r"For batched 3-D input, hx and cx should also be 3-D", id="batched-input-2-D-hx"),
    pytest.param((4, 3), lambda: _hx((1, 1, 5), (1, 1, 5)), LSTMInputError,
                 r"For unbatched 2-D input, hx and cx should also be 2-D", id="unbatched-input-3-D-hx"),
    pytest.param((4, 3), lambda: _hx((1, 5), (2, 5)), LSTMInputError,
                 r"Expected hidden\[1\] size \(1, 5\), got \[2, 5\] \(c0", id="unbatched-c0-shape"),
    pytest.param((4, 2, 3), lambda: (_hx((1, 2, 5), dtype=torch.float32)[0], _hx((1, 2, 5))[0]),
                 LSTMInputError, r"h0 dtype torch.float32 does not match input dtype torch.float64",
                 id="h0-dtype"),
    pytest.param((4, 2, 3), lambda: (_hx((1, 2, 5))[0], _hx((1, 2, 5), dtype=torch.float32)[0]),
                 LSTMInputError, r"c0 dtype torch.float32", id="c0-dtype"),
    pytest.param((4, 2, 3), lambda: (_hx((1, 2, 5), device="meta")[0], _hx((1, 2, 5))[0]),
                 LSTMInputError, r"Input and hidden tensors are not at the same device, .* \(h0\) at meta", id="h0-device"),
    pytest.param((4, 2, 3), lambda: (_hx((1, 2, 5))[0], _hx((1, 2, 5), device="meta")[0]),
                 LSTMInputError, r"Input and hidden tensors are not at the same device, .* \(c0\) at meta", id="c0-device"),
]


@requires_interpreter
@pytest.mark.parametrize("input_shape, make_hx, error, match", HX_ERRORS)
def test_bad_state_is_refused_naming_it(input_shape, make_hx, error, match):
    module = LSTM(3, 5, backend="triton", dtype=torch.float64)
    before = dict(dispatch.launch_counts)
    with pytest.raises(error, match=match):
        module(torch.randn(input_shape, dtype=torch.float64), make_hx())
    assert dict(dispatch.launch_counts) == before


@requires_interpreter
@pytest.mark.parametrize("batch_first", [False, True], ids=["tf", "bf"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["nohx", "hx"])
def test_batch_size_0_gives_empty_outputs_like_nn_lstm(batch_first, bidirectional, with_hx):
    ref = nn.LSTM(3, 5, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    module = triton_copy(ref)
    x = random_input(ref, 4, 0, torch.float32, requires_grad=False)
    hx = random_state(ref, 0, torch.float32, requires_grad=False) if with_hx else None
    before = kernel_launches()
    got = module(x, hx)
    assert kernel_launches() == before
    want = ref(x, hx)
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device


@requires_interpreter
def test_batch_size_0_outputs_stay_in_the_autograd_graph():
    ref = nn.LSTM(3, 5)
    module = triton_copy(ref)
    x = torch.randn(4, 0, 3)
    y, (h, c) = module(x)
    ref_y, (ref_h, ref_c) = ref(x)
    assert [t.requires_grad for t in (y, h, c)] == [t.requires_grad for t in (ref_y, ref_h, ref_c)]
    grads = torch.autograd.grad(y.sum() + h.sum() + c.sum(), list(module.parameters()),
                                allow_unused=True)
    for g, p in zip(grads, module.parameters()):
        assert g is None or torch.equal(g, torch.zeros_like(p))


def test_public_names():
    assert triton_lstm.LSTM is LSTM and triton_lstm.LSTMInputError is LSTMInputError
    assert issubclass(LSTM, nn.LSTM)
