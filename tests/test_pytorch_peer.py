"""PyTorch's own LSTM tests, ported as a peer suite for triton_lstm.LSTM(backend="triton").

Each test names the upstream test it comes from: pytorch/pytorch test/test_nn.py, or
test/test_modules.py driven by torch/testing/_internal/common_modules.py
(module_inputs_torch_nn_LSTM, module_error_inputs_torch_nn_RNN_GRU). Each runs the
upstream scenario with torch.nn.LSTM and with a triton_lstm.LSTM holding the same
weights, and asserts the same behaviour: outputs and gradients equal to 1e-10 in
float64, the same exception type and a message matched by the upstream regex.
Where the kernels run, shapes are shrunk (T <= 4, B <= 4, H <= 8) because they run in
the Triton interpreter on CPU; error cases keep upstream's shapes.
"""
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from triton_lstm import LSTM, dispatch

from .conftest import requires_interpreter

pytestmark = requires_interpreter

DTYPE = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)

PARAMETER_DEVICE = r"Input and parameter tensors are not at the same device"
HIDDEN_DEVICE = r"Input and hidden tensors are not at the same device"
HIDDEN_SIZE = r"Expected hidden.*size.*got"


# -- helpers -------------------------------------------------------------------------------------

def kernel_launches():
    return sum(dispatch.launch_counts.values())


def peer(ref):
    """The triton_lstm.LSTM that runs the Triton kernels with ref's options and weights."""
    return LSTM.from_torch(ref, backend="triton")


def randn(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=DTYPE, requires_grad=requires_grad)


def random_state(module, batch, *, requires_grad=True):
    """(h0, c0) for module: [L * D, B, R] and [L * D, B, H] ([L * D, .] when batch is None)."""
    rows = module.num_layers * (2 if module.bidirectional else 1)
    sizes = (module.proj_size or module.hidden_size, module.hidden_size)
    return tuple(randn(*((rows, s) if batch is None else (rows, batch, s)),
                       requires_grad=requires_grad) for s in sizes)


def outputs(module, inp, hx=None):
    """(output, h_n, c_n); a packed output gives its data."""
    out, (h, c) = module(inp, hx)
    return (out.data if isinstance(out, PackedSequence) else out), h, c


def assert_all_close(got, want, names):
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_results(ref, ours, inp, hx=None, leaves=(), upstream=None):
    """Same outputs, and the same gradients (of `leaves`, then of every parameter) for the
    same random upstream gradients of output, h_n and c_n. Returns ours' outputs."""
    before = kernel_launches()
    got = outputs(ours, inp, hx)
    assert kernel_launches() > before, "the Triton kernels did not run"
    want = outputs(ref, inp, hx)
    assert_all_close(got, want, ["output", "h_n", "c_n"])
    if upstream is None:
        upstream = [torch.randn_like(w) for w in want]
    names = [f"input {k}" for k in range(len(leaves))] + [n for n, _ in ours.named_parameters()]
    assert names[len(leaves):] == [n for n, _ in ref.named_parameters()]
    # retain_graph: both modules may share the graph upstream of them (packing the input).
    grads = torch.autograd.grad(got, [*leaves, *ours.parameters()], upstream, retain_graph=True)
    ref_grads = torch.autograd.grad(want, [*leaves, *ref.parameters()], upstream)
    assert_all_close(grads, ref_grads, names)
    return got


def assert_same_error(error, match, ref_call, ours_call):
    """nn.LSTM raises `error` matching `match`; ours raises the same type, same match, no launch."""
    with pytest.raises(error, match=match) as ref_error:
        ref_call()
    before = kernel_launches()
    with pytest.raises(type(ref_error.value), match=match):
        ours_call()
    assert kernel_launches() == before


def reshaped(shape, changes):
    shape = list(shape)
    for dim, size in changes.items():
        shape[dim] = size
    return tuple(shape)


def make_non_contiguous(t):
    """The same values as t in a non-contiguous view (upstream's make_noncontig, with NaN
    rather than zero in the gaps, so that reading them shows)."""
    out = torch.stack([torch.full_like(t, float("nan")), t], t.dim()).select(t.dim(), 1)
    assert not out.is_contiguous()
    return out


# -- argument, shape and device errors -----------------------------------------------------------

ARGS_CHECK_CASES = [  # changes to (input, h0, c0) shapes, as {dim: size}; 7 divides nothing
    pytest.param({1: 7}, {}, {}, id="input-batch"),
    pytest.param({2: 7}, {}, {}, id="input-size"),
    pytest.param({}, {1: 7}, {}, id="h0-batch"),
    pytest.param({}, {}, {1: 7}, id="c0-batch"),
    pytest.param({}, {2: 7}, {}, id="h0-hidden-size"),
    pytest.param({}, {}, {2: 7}, id="c0-hidden-size"),
    pytest.param({}, {0: 7}, {}, id="h0-layers"),
    pytest.param({}, {}, {0: 7}, id="c0-layers"),
]
ARGS_CHECK_REGEX = (r"Expected hidden\[[01]\] size .*, got \["
                    r"|input\.size\(-1\) must be equal to input_size")


@pytest.mark.parametrize("input_changes, h0_changes, c0_changes", ARGS_CHECK_CASES)
def test_rnn_args_check(input_changes, h0_changes, c0_changes):
    """From test_nn.py::test_rnn_args_check (the LSTM mode): a wrong batch, feature size or
    layer count in the input or in one of (h0, c0) is a RuntimeError."""
    seq_len, batch, input_size, hidden_size, num_layers = 6, 4, 3, 5, 2
    ref = nn.LSTM(input_size, hidden_size, num_layers)
    ours = peer(ref)
    x = torch.randn(reshaped((seq_len, batch, input_size), input_changes))
    state = (num_layers, batch, hidden_size)
    hx = (torch.randn(reshaped(state, h0_changes)), torch.randn(reshaped(state, c0_changes)))
    assert_same_error(RuntimeError, ARGS_CHECK_REGEX, lambda: ref(x, hx), lambda: ours(x, hx))


PROJ_ARGS_CHECK_CASES = [
    pytest.param({1: 7}, {}, {}, id="input-batch"),
    pytest.param({}, {1: 7}, {1: 7}, id="state-batch"),
    pytest.param({2: 7}, {}, {}, id="input-size"),
    pytest.param({}, {2: 7}, {2: 7}, id="state-size"),
    pytest.param({}, {0: 7}, {0: 7}, id="state-layers"),
    pytest.param({}, {0: 5}, {}, id="h0-layers-equal-hidden-size"),
    pytest.param({}, {0: 7}, {}, id="h0-layers"),
    pytest.param({}, {}, {0: 7}, id="c0-layers"),
]


@pytest.mark.parametrize("input_changes, h0_changes, c0_changes", PROJ_ARGS_CHECK_CASES)
def test_projections_lstm_args_check(input_changes, h0_changes, c0_changes):
    """From test_nn.py::test_projections_lstm_args_check: as test_rnn_args_check with
    proj_size=2, where h0 is [L, B, proj_size] and c0 is [L, B, hidden_size]."""
    seq_len, batch, input_size, hidden_size, proj_size, num_layers = 6, 4, 3, 5, 2, 2
    ref = nn.LSTM(input_size, hidden_size, num_layers, proj_size=proj_size)
    ours = peer(ref)
    x = torch.randn(reshaped((seq_len, batch, input_size), input_changes))
    hx = (torch.randn(reshaped((num_layers, batch, proj_size), h0_changes)),
          torch.randn(reshaped((num_layers, batch, hidden_size), c0_changes)))
    assert_same_error(RuntimeError, ARGS_CHECK_REGEX, lambda: ref(x, hx), lambda: ours(x, hx))


# Where upstream uses two CUDA devices, the "meta" device plays the other device here.
DEVICE_CASES = [  # (module, input, h0, c0 devices; None: no state), expected message
    pytest.param("cpu", "meta", None, None, PARAMETER_DEVICE, id="input-elsewhere"),
    pytest.param("meta", "cpu", None, None, PARAMETER_DEVICE, id="module-elsewhere"),
    pytest.param("cpu", "cpu", "meta", "meta", HIDDEN_DEVICE, id="state-elsewhere"),
    pytest.param("meta", "meta", "cpu", "cpu", HIDDEN_DEVICE, id="module-input-elsewhere"),
    pytest.param("cpu", "cpu", "cpu", "meta", HIDDEN_DEVICE, id="c0-elsewhere"),
    pytest.param("cpu", "meta", "meta", "cpu", HIDDEN_DEVICE, id="input-h0-elsewhere"),
]


@pytest.mark.parametrize("proj_size", [0, 2], ids=["noproj", "proj"])
@pytest.mark.parametrize("module_device, input_device, h0_device, c0_device, match", DEVICE_CASES)
def test_rnn_check_device(module_device, input_device, h0_device, c0_device, match, proj_size):
    """From test_nn.py::test_rnn_check_device and ::test_projections_lstm_check_device: input,
    parameters and (h0, c0) on different devices are refused, naming which ones."""
    seq_len, batch, input_size, hidden_size, num_layers = 6, 4, 3, 5, 2
    ref = nn.LSTM(input_size, hidden_size, num_layers, proj_size=proj_size)
    ours = peer(ref)
    ref.to(module_device)
    ours.to(module_device)
    x = torch.randn(seq_len, batch, input_size, device=input_device)
    hx = None
    if h0_device is not None:
        hx = (torch.randn(num_layers, batch, proj_size or hidden_size, device=h0_device),
              torch.randn(num_layers, batch, hidden_size, device=c0_device))
    assert_same_error(RuntimeError, match, lambda: ref(x, hx), lambda: ours(x, hx))


@pytest.mark.parametrize("proj_size", [0, 10], ids=["noproj", "proj"])
def test_cudnn_forward_exception(proj_size):
    """From test_nn.py::test_cudnn_forward_exception (the LSTM entries): a wrong hidden size
    and a wrong input size, batch_first."""
    ref = nn.LSTM(10, 20, batch_first=True, proj_size=proj_size)
    ours = peer(ref)
    hidden = (torch.randn(1, 2, 19), torch.randn(1, 2, 19))
    x_right, x_wrong = torch.randn(2, 3, 10), torch.randn(2, 3, 3)
    assert_same_error(RuntimeError, HIDDEN_SIZE,
                      lambda: ref(x_right, hidden), lambda: ours(x_right, hidden))
    assert_same_error(RuntimeError,
                      r"input.size\(-1\) must be equal to input_size. Expected 10, got 3",
                      lambda: ref(x_wrong), lambda: ours(x_wrong))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bidir"])
def test_error_RNN_seq_len_zero(bidirectional):
    """From test_nn.py::test_error_RNN_seq_len_zero (the LSTM entries)."""
    ref = nn.LSTM(5, 6, bidirectional=bidirectional, dtype=DTYPE)
    ours = peer(ref)
    x = randn(0, 4, 5)
    assert_same_error(RuntimeError, r"Expected sequence length to be larger than 0 in RNN",
                      lambda: ref(x), lambda: ours(x))


HX_RANK_CASES = [
    pytest.param((4, 3), ((1, 1, 5), (1, 1, 5)),
                 r"For unbatched 2-D input, hx and cx should also be 2-D",
                 id="unbatched-3-D-state"),
    pytest.param((4, 2, 3), ((1, 5), (1, 5)),
                 r"For batched 3-D input, hx and cx should also be 3-D", id="batched-2-D-state"),
]


@pytest.mark.parametrize("input_shape, state_shapes, match", HX_RANK_CASES)
def test_state_rank_must_follow_input_rank(input_shape, state_shapes, match):
    """From common_modules.py::module_inputs_torch_nn_LSTM, whose unbatched samples pass a
    2-D (h0, c0); the other ranks are refused by the check in torch/nn/modules/rnn.py
    (LSTM.forward) that guards those samples (it has no upstream test of its own)."""
    ref = nn.LSTM(3, 5, dtype=DTYPE)
    ours = peer(ref)
    x = randn(*input_shape)
    hx = tuple(randn(*s) for s in state_shapes)
    assert_same_error(RuntimeError, match, lambda: ref(x, hx), lambda: ours(x, hx))


MODULE_ERROR_CASES = [  # constructor args, kwargs, exception, regex (all construction errors)
    pytest.param((10, 0, 1), {}, ValueError, r"hidden_size must be greater than zero",
                 id="hidden-size-0"),
    pytest.param((10, 10, 0), {}, ValueError, r"num_layers must be greater than zero",
                 id="num-layers-0"),
    pytest.param((3, 5), dict(bias=0), TypeError, r"bias should be of type bool, got: int",
                 id="bias-0"),
    pytest.param((3, 5), dict(bias=1), TypeError, r"bias should be of type bool, got: int",
                 id="bias-1"),
    pytest.param((3, 5), dict(bias="True"), TypeError, r"bias should be of type bool, got: str",
                 id="bias-str"),
]


@pytest.mark.parametrize("args, kwargs, error, match", MODULE_ERROR_CASES)
def test_module_error_inputs_construction(args, kwargs, error, match):
    """From common_modules.py::module_error_inputs_torch_nn_RNN_GRU (used for nn.LSTM by
    test_modules.py::test_errors): the construction errors."""
    assert_same_error(error, match, lambda: nn.LSTM(*args, **kwargs),
                      lambda: LSTM(*args, backend="triton", **kwargs))


@pytest.mark.parametrize("module_dtype, input_dtype", [
    pytest.param(torch.float32, torch.float64, id="fp32-module-fp64-input"),
    pytest.param(torch.float64, torch.float32, id="fp64-module-fp32-input"),
])
def test_module_error_inputs_dtype_mismatch(module_dtype, input_dtype):
    """From common_modules.py::module_error_inputs_torch_nn_RNN_GRU: an input dtype other
    than the weights' is a ValueError telling both ways to fix it."""
    ref = nn.LSTM(3, 5, dtype=module_dtype)
    ours = peer(ref)
    x = torch.randn(2, 4, 3, dtype=input_dtype)
    match = (r"RNN input dtype .* does not match weight dtype .* "
             r"Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)")
    assert_same_error(ValueError, match, lambda: ref(x), lambda: ours(x))


# -- forward and backward ------------------------------------------------------------------------

@pytest.mark.parametrize("bidirectional, proj_size", [
    pytest.param(False, 0, id="plain"),
    pytest.param(False, 3, id="proj-uni"),
    pytest.param(True, 3, id="proj-bidir"),
])
def test_rnn_initial_hidden_state(bidirectional, proj_size):
    """From test_nn.py::test_rnn_initial_hidden_state and
    ::test_projections_lstm_initial_hidden_state: an all-zero (h0, c0) gives what no state
    gives."""
    ref = nn.LSTM(4, 5, 2, bidirectional=bidirectional, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 3, 4)
    zeros = tuple(torch.zeros_like(s) for s in random_state(ref, 3, requires_grad=False))
    before = kernel_launches()
    with_zeros = outputs(ours, x, zeros)
    assert kernel_launches() > before
    without = outputs(ours, x)
    assert_all_close(with_zeros, without, ["output", "h_n", "c_n"])
    assert_all_close(without, outputs(ref, x), ["output", "h_n", "c_n"])


def test_RNN_input_size_zero():
    """From test_nn.py::test_RNN_input_size_zero (the LSTM entry): batch size 0 gives empty
    outputs, and backward through them works."""
    ref = nn.LSTM(input_size=3, hidden_size=4, dtype=DTYPE)
    ours = peer(ref)
    x = randn(5, 0, 3)
    for module in (ref, ours):
        out = module(x)
        assert out[0].shape == torch.Size([5, 0, 4])
        assert out[1][0].shape == out[1][1].shape == torch.Size([1, 0, 4])
        out[0].sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **TOL)


@pytest.mark.parametrize("bias, bidirectional, batch_first, contiguous, variable_len, "
                         "lens_as_tensor, proj_size, dropout", [
    pytest.param(True, True, True, True, True, True, 0, 0.0, id="bias-bidir-bf-packed"),
    pytest.param(False, False, False, False, False, False, 0, 0.0, id="nobias-uni-noncontig"),
    pytest.param(True, False, True, False, True, False, 0, 0.0, id="bias-bf-noncontig-packed"),
    pytest.param(False, True, False, True, True, True, 3, 0.0, id="proj-bidir-packed"),
    pytest.param(True, True, False, False, False, False, 3, 0.0, id="proj-bidir-noncontig"),
    pytest.param(True, True, True, True, False, False, 0, 1.0, id="dropout-1-bidir-bf"),
])
def test_RNN_cpu_vs_cudnn(bias, bidirectional, batch_first, contiguous, variable_len,
                          lens_as_tensor, proj_size, dropout):
    """From test_nn.py::test_RNN_cpu_vs_cudnn_no_dropout / _with_dropout (the LSTM and LSTM
    with projections loops, a sample of their option product; dropout 1 is the only
    non-zero dropout upstream can compare): two implementations of one module, given the
    same weights, input, state and output gradients, agree on outputs and gradients.
    Here nn.LSTM on CPU plays the CPU side and triton_lstm the cuDNN side."""
    seq_len, batch, input_size, hidden_size, num_layers = 3, 4, 4, 6, 2
    num_directions = 2 if bidirectional else 1
    out_size = proj_size or hidden_size
    ref = nn.LSTM(input_size, hidden_size, num_layers, bias=bias, dropout=dropout,
                  bidirectional=bidirectional, batch_first=batch_first, proj_size=proj_size,
                  dtype=DTYPE)
    assert ref.training
    ours = peer(ref)
    time_major = (seq_len, batch)
    x = randn(*(time_major[::-1] if batch_first else time_major), input_size)
    grad_output = randn(*x.shape[:2], num_directions * out_size)
    rows = num_layers * num_directions
    h0, c0 = randn(rows, batch, out_size), randn(rows, batch, hidden_size)
    grad_h, grad_c = randn(rows, batch, out_size), randn(rows, batch, hidden_size)
    if not contiguous:
        x, h0, c0, grad_output, grad_h, grad_c = map(make_non_contiguous,
                                                     (x, h0, c0, grad_output, grad_h, grad_c))
    x, h0, c0 = (t.requires_grad_() for t in (x, h0, c0))
    inp = x
    if variable_len:
        lengths = [3, 2, 2, 1]
        if lens_as_tensor:
            lengths = torch.tensor(lengths, dtype=torch.long)
        inp = pack_padded_sequence(x, lengths, batch_first=batch_first)
        grad_output = pack_padded_sequence(grad_output, lengths, batch_first=batch_first).data
    assert_same_results(ref, ours, inp, (h0, c0), leaves=(x, h0, c0),
                        upstream=(grad_output, grad_h, grad_c))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_rnn_fused(bias):
    """From test_nn.py::test_rnn_fused (the LSTM entries): state (hx, hx + 1), output
    gradients (grad_output, grad_hy, grad_hy + 1), all gradients compared."""
    seq_len, batch, input_size, hidden_size, num_layers = 3, 3, 4, 6, 2
    ref = nn.LSTM(input_size, hidden_size, num_layers, bias=bias, dtype=DTYPE)
    ours = peer(ref)
    x = randn(seq_len, batch, input_size, requires_grad=True)
    hx_val = randn(num_layers, batch, hidden_size)
    hx = (hx_val.clone().requires_grad_(), (hx_val + 1).requires_grad_())
    grad_hy = randn(num_layers, batch, hidden_size)
    upstream = (randn(seq_len, batch, hidden_size), grad_hy, grad_hy + 1)
    assert_same_results(ref, ours, x, hx, leaves=(x, *hx), upstream=upstream)


VARIABLE_SEQUENCE_CASES = [  # enforce_sorted, lengths, default (zero) state, proj_size
    pytest.param(True, [3], True, 0, id="sorted-one-sequence-nohx"),
    pytest.param(False, [3, 3, 1], False, 2, id="unenforced-sorted-hx-proj"),
    pytest.param(True, [3, 2, 1], False, 0, id="sorted-hx"),
    pytest.param(False, [2, 1, 3], True, 2, id="unsorted-nohx-proj"),
]


@pytest.mark.parametrize("enforce_sorted, lengths, default_hidden, proj_size",
                         VARIABLE_SEQUENCE_CASES)
def test_variable_sequence(enforce_sorted, lengths, default_hidden, proj_size):
    """From test_nn.py::test_variable_sequence: a packed batch gives what each sequence gives
    on its own (outputs, final states, input and parameter gradients), sorted or not, with
    and without an initial state and a projection; and it matches nn.LSTM on the same
    packed batch."""
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    max_length, batch = max(lengths), len(lengths)
    x = randn(max_length, batch, 3, requires_grad=True)
    hx = None if default_hidden else random_state(ref, batch)
    leaves = [x] + ([] if hx is None else list(hx))

    # Each sequence on its own, padded back to max_length.
    seq_outs, seq_h, seq_c = [], [], []
    for i, length in enumerate(lengths):
        hx_i = None if hx is None else tuple(s[:, i:i + 1] for s in hx)
        out, (h, c) = ours(x[:length, i:i + 1], hx_i)
        seq_outs.append(F.pad(out, (0, 0, 0, 0, 0, max_length - length)))
        seq_h.append(h)
        seq_c.append(c)
    seq_out, seq_h, seq_c = torch.cat(seq_outs, 1), torch.cat(seq_h, 1), torch.cat(seq_c, 1)

    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    before = kernel_launches()
    packed_out, (h, c) = ours(packed, hx)
    assert kernel_launches() > before
    unpacked, unpacked_len = pad_packed_sequence(packed_out)
    assert unpacked_len.tolist() == lengths
    assert_all_close((unpacked, h, c), (seq_out, seq_h, seq_c), ["output", "h_n", "c_n"])

    params = list(ours.parameters())
    names = [f"input {k}" for k in range(len(leaves))] + [n for n, _ in ours.named_parameters()]
    seq_grads = torch.autograd.grad(seq_out.sum(), leaves + params)
    packed_grads = torch.autograd.grad(unpacked.sum(), leaves + params, retain_graph=True)
    assert_all_close(packed_grads, seq_grads, names)

    ref_out, (ref_h, ref_c) = ref(packed, hx)
    ref_unpacked, _ = pad_packed_sequence(ref_out)
    assert_all_close((unpacked, h, c), (ref_unpacked, ref_h, ref_c), ["output", "h_n", "c_n"])
    ref_grads = torch.autograd.grad(ref_unpacked.sum(), leaves + list(ref.parameters()))
    assert_all_close(packed_grads, ref_grads, names)


NO_BATCH_DIM_CASES = [  # bias, batch_first, bidirectional, proj_size: half of upstream's product
    pytest.param(b, bf, bidir, proj,
                 id=f"{'bias' if b else 'nobias'}-{'bf' if bf else 'tf'}-"
                    f"{'bidir' if bidir else 'uni'}-proj{proj}")
    for b in (False, True) for bidir in (False, True) for proj in (0, 2)
    for bf in [(b + bidir + bool(proj)) % 2 == 1]
]


@pytest.mark.parametrize("bias, batch_first, bidirectional, proj_size", NO_BATCH_DIM_CASES)
def test_no_batch_dim_samples(bias, batch_first, bidirectional, proj_size):
    """From common_modules.py::module_inputs_torch_nn_LSTM with its reference function
    no_batch_dim_reference_lstm (test_modules.py::test_forward): a 2-D input, with and
    without a 2-D state, gives the batch-of-one result squeezed; and nn.LSTM's result."""
    ref = nn.LSTM(2, 3, num_layers=2, proj_size=proj_size, batch_first=batch_first, bias=bias,
                  bidirectional=bidirectional, dtype=DTYPE)
    ours = peer(ref)
    batch_dim = 0 if batch_first else 1
    for x, hx in ((randn(2, 2), None),
                  (randn(3, 2), random_state(ref, None, requires_grad=False))):
        before = kernel_launches()
        got = outputs(ours, x, hx)
        assert kernel_launches() > before
        hx1 = None if hx is None else tuple(s.unsqueeze(1) for s in hx)
        y1, h1, c1 = outputs(ours, x.unsqueeze(batch_dim), hx1)
        assert_all_close(got, (y1.squeeze(batch_dim), h1.squeeze(1), c1.squeeze(1)),
                         ["output", "h_n", "c_n"])
        assert_all_close(got, outputs(ref, x, hx), ["output", "h_n", "c_n"])


def test_non_contiguous_tensors():
    """From test_modules.py::test_non_contiguous_tensors on module_inputs_torch_nn_LSTM's
    sample with a state (proj_size=2): contiguous or not, inputs and output gradients give
    the same outputs and gradients."""
    ref = nn.LSTM(2, 3, num_layers=2, proj_size=2, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 2)
    hx = random_state(ref, None, requires_grad=False)
    want = outputs(ref, x, hx)
    grad_outputs = [torch.randn_like(w) for w in want]
    names = ["output", "h_n", "c_n"]
    grad_names = ["input", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    results = []
    for inputs in ((x, *hx), tuple(map(make_non_contiguous, (x, *hx)))):
        for grads in (grad_outputs, list(map(make_non_contiguous, grad_outputs))):
            xi, h0, c0 = (t.detach().requires_grad_() for t in inputs)
            got = outputs(ours, xi, (h0, c0))
            assert_all_close(got, want, names)
            results.append(torch.autograd.grad(got, [xi, h0, c0, *ours.parameters()], grads))
    xr, h0r, c0r = (t.detach().requires_grad_() for t in (x, *hx))
    ref_grads = torch.autograd.grad(outputs(ref, xr, (h0r, c0r)), [xr, h0r, c0r,
                                                                   *ref.parameters()],
                                    grad_outputs)
    for grads in results:
        assert_all_close(grads, ref_grads, grad_names)


@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
def test_lstmcell_backward_only_one_output_grad(used):
    """From test_nn.py::test_lstmcell_backward_only_one_output_grad, for nn.LSTM on a
    one-step unbatched input (an LSTMCell's call): a loss on one output alone (the others
    get no gradient) still reaches the input."""
    ref = nn.LSTM(2, 3, dtype=DTYPE)
    ours = peer(ref)
    s = randn(1, 2)
    grads = []
    for module in (ref, ours):
        x = s.clone().requires_grad_()
        out = dict(zip(["output", "h_n", "c_n"], outputs(module, x)))[used]
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum().item() != 0
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    assert_all_close(grads[1], grads[0], ["input"] + [n for n, _ in ref.named_parameters()])


def test_rnn_retain_variables():
    """From test_nn.py::test_rnn_retain_variables (the LSTM entry): backward through the same
    graph again (retain_graph=True) gives the same gradients every time."""
    ref = nn.LSTM(4, 6, num_layers=2, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 3, 4, requires_grad=True)
    for module in (ref, ours):
        x.grad = None
        output = module(x)
        output[0].sum().backward(retain_graph=True)
        grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
        for _ in range(4):
            module.zero_grad()
            x.grad.zero_()
            output[0].sum().backward(retain_graph=True)
            assert_all_close([x.grad] + [p.grad for p in module.parameters()], grads,
                             ["input"] + [n for n, _ in module.named_parameters()])
        if module is ref:
            ref_grads = grads
    assert_all_close(grads, ref_grads, ["input"] + [n for n, _ in ref.named_parameters()])


# -- gradcheck and second derivatives ------------------------------------------------------------

def _flat_outputs(module):
    def run(*args):
        out, (h, c) = module(*args)
        return out, h, c
    return run


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_LSTM_grad_and_gradgrad(bias):
    """From test_nn.py::test_LSTM_grad_and_gradgrad: gradcheck and gradgradcheck of the module
    on a float64 input [1, 3, 4] (upstream's testing gradcheck: fast mode), here also with
    check_batched_grad=True (the gradients under vmap)."""
    hsize = 4
    ref = nn.LSTM(hsize, hsize, bias=bias, dtype=DTYPE)
    ours = peer(ref)
    inp = torch.rand(1, 3, hsize, dtype=DTYPE, requires_grad=True)
    for module in (ref, ours):
        before = kernel_launches()
        assert torch.autograd.gradcheck(_flat_outputs(module), (inp,), check_batched_grad=True,
                                        fast_mode=True)
        assert torch.autograd.gradgradcheck(_flat_outputs(module), (inp,),
                                            check_batched_grad=True, fast_mode=True)
        assert (kernel_launches() > before) == (module is ours)


def test_module_gradcheck_with_parameters():
    """From test_modules.py::test_grad on module_inputs_torch_nn_LSTM's unbatched sample with
    a state, no bias and proj_size=2 (one layer instead of two, for time): gradcheck (fast
    mode, as upstream's) of output, h_n and c_n w.r.t. the input, h0, c0 and every
    parameter, check_batched_grad=True."""
    ref = nn.LSTM(2, 3, bias=False, proj_size=2, dtype=DTYPE)
    names = [n for n, _ in ref.named_parameters()]
    x = randn(2, 2, requires_grad=True)
    h0, c0 = random_state(ref, None)
    params = tuple(p.detach().clone().requires_grad_() for p in ref.parameters())
    ours = peer(ref)
    for module in (ref, ours):
        def run(x, h0, c0, *ps, module=module):
            out, (h, c) = torch.func.functional_call(module, dict(zip(names, ps)), (x, (h0, c0)))
            return out, h, c
        before = kernel_launches()
        assert torch.autograd.gradcheck(run, (x, h0, c0, *params), check_batched_grad=True,
                                        fast_mode=True)
        assert (kernel_launches() > before) == (module is ours)


@pytest.mark.parametrize("options, with_state", [
    pytest.param(dict(num_layers=2), False, id="L2-upstream"),
    pytest.param(dict(bidirectional=True, proj_size=2), True, id="bidir-proj-hx"),
])
def test_LSTM_differentiable_backward(options, with_state):
    """From test_nn.py::test_LSTM_differentiable_backward_using_oneDNN (upstream: 20 layers,
    two CPU backends of nn.LSTM; here 2 layers, nn.LSTM against triton_lstm, and a second
    case with a state and a projection): d(output)/d(input) taken with create_graph=True,
    then backward through it, gives the same first and second derivatives."""
    ref = nn.LSTM(3, 3, batch_first=True, dtype=DTYPE, **options)
    ours = peer(ref)
    x = torch.rand(2, 4, 3, dtype=DTYPE)
    hx = random_state(ref, 2, requires_grad=False) if with_state else None
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        state = None if hx is None else tuple(s.clone().requires_grad_() for s in hx)
        before = kernel_launches()
        out, _ = module(xi, state)
        der_out, = torch.autograd.grad(out, xi, grad_outputs=torch.ones_like(out),
                                       retain_graph=True, create_graph=True)
        der_out.sum().backward(retain_graph=True)
        assert (kernel_launches() > before) == (module is ours)
        second = [xi.grad] + ([] if state is None else [s.grad for s in state])
        results.append([der_out] + second + [p.grad for p in module.parameters()])
    names = (["d output / d input", "input"] + ([] if hx is None else ["h0", "c0"])
             + [n for n, _ in ref.named_parameters()])
    assert_all_close(results[1], results[0], names)


# -- dropout, train and eval ---------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.1234], ids=["p0", "p0.1234"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_RNN_dropout_state(p, train, fresh_seed):
    """From test_nn.py::test_RNN_dropout_state (nn.RNN upstream, the same for nn.LSTM): two
    calls, and a pickled and reloaded copy, agree unless dropout is active; each call
    draws nn.LSTM's dropout masks for the same seed."""
    ref = nn.LSTM(6, 8, 2, bias=False, dropout=p, dtype=DTYPE).train(train)
    ours = peer(ref)
    x = torch.rand(3, 4, 6, dtype=DTYPE)
    hx = tuple(torch.rand(2, 4, 8, dtype=DTYPE) for _ in range(2))
    torch.manual_seed(fresh_seed + 1)
    out1 = outputs(ours, x, hx)
    torch.manual_seed(fresh_seed + 1)
    assert_all_close(out1, outputs(ref, x, hx), ["output", "h_n", "c_n"])
    out2 = outputs(ours, x, hx)

    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    ours2 = torch.load(buf, weights_only=False)
    assert type(ours2) is LSTM and ours2.backend == "triton" and ours2.training is train
    ours2.flatten_parameters()
    out3 = outputs(ours2, x, hx)
    if p == 0 or not train:
        for again in (out2, out3):
            assert_all_close(again, out1, ["output", "h_n", "c_n"])
    else:
        for again in (out2, out3):
            assert not torch.equal(again[0], out1[0])
            assert not torch.equal(again[1], out1[1])


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_RNN_change_dropout(train, fresh_seed):
    """From test_nn.py::test_RNN_change_dropout (nn.RNN upstream, the same for nn.LSTM):
    setting `dropout` after construction takes effect on the next call (fewer values of p
    than upstream, for time); each call draws nn.LSTM's masks for the same seed."""
    ref = nn.LSTM(6, 8, 2, dropout=0, dtype=DTYPE).train(train)
    ours = peer(ref)
    x = torch.rand(2, 4, 6, dtype=DTYPE)
    prev_output = None
    for k, p in enumerate((0, 0.5, 0, 1, 0.2)):
        ref.dropout = ours.dropout = p
        torch.manual_seed(fresh_seed + k)
        output1, hy1 = ours(x)
        torch.manual_seed(fresh_seed + k)
        ref_output, (ref_h, ref_c) = ref(x)
        assert_all_close((output1, *hy1), (ref_output, ref_h, ref_c), ["output", "h_n", "c_n"])
        output2, hy2 = ours(x)
        if p == 0 or p == 1 or not train:
            assert_all_close((output2, *hy2), (output1, *hy1), ["output", "h_n", "c_n"])
        else:
            assert not torch.equal(output1, output2)
            assert not torch.equal(hy1[0], hy2[0])
        if prev_output is not None:
            if train:
                assert not torch.equal(output1, prev_output)
            else:
                torch.testing.assert_close(output1, prev_output, **TOL)
        prev_output = output1


@pytest.mark.parametrize("p", [0.0, 0.276, 1.0], ids=["p0", "p0.276", "p1"])
def test_RNN_dropout(p, fresh_seed):
    """From test_nn.py::test_RNN_dropout (nn.RNN upstream, the same for nn.LSTM): dropout sits
    between layers, in training mode only; p=1 silences the first layer's output (so the
    last layer sees a zero input) and the first layer's final state is never touched."""
    ref = nn.LSTM(5, 8, 2, bias=False, dropout=p, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 2, 5)
    hx = random_state(ref, 2, requires_grad=False)
    eval_out = outputs(ours.eval(), x, hx)
    assert_all_close(eval_out, outputs(ref.eval(), x, hx), ["output", "h_n", "c_n"])
    ours.train()
    ref.train()
    torch.manual_seed(fresh_seed + 1)
    train_out = outputs(ours, x, hx)
    torch.manual_seed(fresh_seed + 1)
    assert_all_close(train_out, outputs(ref, x, hx), ["output", "h_n", "c_n"])
    for state, eval_state in zip(train_out[1:], eval_out[1:]):
        torch.testing.assert_close(state[0], eval_state[0], **TOL)   # layer 0: no dropout
    if p == 0:
        assert_all_close(train_out, eval_out, ["output", "h_n", "c_n"])
    elif p == 1:
        top = nn.LSTM(8, 8, bias=False, dtype=DTYPE)
        top.weight_ih_l0, top.weight_hh_l0 = ref.weight_ih_l1, ref.weight_hh_l1
        zero_input = torch.zeros(3, 2, 8, dtype=DTYPE)
        want = outputs(top, zero_input, (hx[0][1:], hx[1][1:]))
        torch.testing.assert_close(train_out[0], want[0], **TOL)
    else:
        assert not torch.equal(train_out[0], eval_out[0])


def test_if_train_and_eval_modes_differ():
    """From test_modules.py::test_if_train_and_eval_modes_differ (nn.LSTM's ModuleInfo has
    train_and_eval_differ=True): with the `training` attribute deleted, forward fails with
    an AttributeError naming it."""
    ref = nn.LSTM(2, 3, num_layers=2, dropout=0.5, dtype=DTYPE)
    ours = peer(ref)
    x = randn(2, 2)
    for module in (ref, ours):
        delattr(module, "training")
    assert_same_error(AttributeError, r"'training'", lambda: ref(x), lambda: ours(x))


# -- parameters: weight norm, parametrizations, tying, replacement, pickling ---------------------

@pytest.mark.parametrize("name, proj_size, num_params", [
    pytest.param("weight_ih_l0", 0, 4, id="weight_ih_l0"),
    pytest.param("weight_hr_l0", 2, 5, id="weight_hr_l0-proj"),
])
def test_rnn_weight_norm(name, proj_size, num_params):
    """From test_nn.py::test_rnn_weight_norm: weight_norm turns the weight into a plain tensor
    among _flat_weights and remove_weight_norm restores the Parameter; in between the
    module computes with the normalised weight and its gradients reach weight_g and
    weight_v as nn.LSTM's do."""
    ref = nn.LSTM(4, 5, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 2, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # weight_norm is deprecated
        for module in (ref, ours):
            torch.nn.utils.weight_norm(module, name=name)
            assert sum(isinstance(p, nn.Parameter) for p in module._flat_weights) == num_params - 1
    assert_same_results(ref, ours, x, leaves=(x,))
    for module in (ref, ours):
        torch.nn.utils.remove_weight_norm(module, name=name)
        assert sum(isinstance(p, nn.Parameter) for p in module._flat_weights) == num_params
        params = dict(module.named_parameters())
        assert name in module._parameters and module._parameters[name] is not None
        assert name in params and name + "_v" not in params and name + "_g" not in params
    assert_same_results(ref, ours, x, leaves=(x,))


@pytest.mark.parametrize("name, proj_size", [
    pytest.param("weight_hh_l0", 0, id="weight_hh_l0"),
    pytest.param("weight_hr_l0", 3, id="weight_hr_l0-proj"),
])
def test_RNN_cudnn_weight_norm(name, proj_size):
    """From test_nn.py::test_RNN_cudnn_weight_norm: adding weight normalisation, and removing
    it, leaves the output as it was (upstream: computed on CPU, then compared on cuDNN;
    here computed by nn.LSTM, then compared on the Triton kernels)."""
    ref = nn.LSTM(4, 6, 2, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 3, 4)
    expected = outputs(ref, x)
    names = ["output", "h_n", "c_n"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # weight_norm is deprecated
        for module in (ref, ours):
            torch.nn.utils.weight_norm(module, name=name)
    before = kernel_launches()
    assert_all_close(outputs(ours, x), expected, names)
    assert kernel_launches() > before
    assert_all_close(outputs(ref, x), expected, names)
    for module in (ref, ours):
        torch.nn.utils.remove_weight_norm(module, name=name)
        assert_all_close(outputs(module, x), expected, names)


@pytest.mark.parametrize("name, proj_size", [
    pytest.param("weight_hh_l0", 0, id="weight_hh_l0"),
    pytest.param("weight_hr_l0", 3, id="weight_hr_l0-proj"),
])
def test_RNN_weight_parametrization(name, proj_size):
    """From test_nn.py::test_RNN_cudnn_weight_norm, with torch.nn.utils.parametrizations.
    weight_norm (the replacement its deprecation points to): the parametrized module
    computes what it computed before, and gradients reach the parametrization's
    original0/original1 as nn.LSTM's do."""
    ref = nn.LSTM(4, 6, 2, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 3, 4, requires_grad=True)
    expected = outputs(ref, x)
    for module in (ref, ours):
        parametrizations.weight_norm(module, name=name)
    got = assert_same_results(ref, ours, x, leaves=(x,))
    assert_all_close(got, expected, ["output", "h_n", "c_n"])
    assert type(ours).__name__ == "ParametrizedLSTM" and isinstance(ours, LSTM)


@pytest.mark.parametrize("proj_size", [0, 3], ids=["noproj", "proj"])
def test_cudnn_weight_format(proj_size):
    """From test_nn.py::test_cudnn_weight_format: after a weight's storage is replaced
    (weight.set_ on a copy, so the weights no longer share one flat buffer) the module gives
    the same outputs and gradients as before, and the weight still shares the new storage."""
    ref = nn.LSTM(4, 6, batch_first=True, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 2, 4, requires_grad=True)
    hx = random_state(ref, 3)
    upstream = [torch.randn_like(t) for t in outputs(ref, x, hx)]
    leaves = (x, *hx)
    first = assert_same_results(ref, ours, x, hx, leaves=leaves, upstream=upstream)
    grads = torch.autograd.grad(outputs(ours, x, hx), [*leaves, *ours.parameters()], upstream)
    for module in (ref, ours):
        weight = module.weight_hh_l0
        weight_data = weight.data.clone()
        with torch.no_grad():
            weight.set_(weight_data)
    again = assert_same_results(ref, ours, x, hx, leaves=leaves, upstream=upstream)
    assert_all_close(again, first, ["output", "h_n", "c_n"])
    regrads = torch.autograd.grad(outputs(ours, x, hx), [*leaves, *ours.parameters()], upstream)
    names = ["input", "h0", "c0"] + [n for n, _ in ours.named_parameters()]
    assert_all_close(regrads, grads, names)
    weight_data[:] = 4
    assert torch.equal(ours.weight_hh_l0.data, weight_data)


@pytest.mark.parametrize("proj_size", [0, 3], ids=["noproj", "proj"])
def test_cudnn_weight_tying(proj_size):
    """From test_nn.py::test_cudnn_weight_tying (the LSTM entries): with bias_ih_l0_reverse
    tied to bias_ih_l0, forward, backward, an SGD step and a second forward agree with
    nn.LSTM's."""
    ref = nn.LSTM(4, 6, batch_first=True, bidirectional=True, proj_size=proj_size, dtype=DTYPE)
    ours = peer(ref)
    for module in (ref, ours):
        module.bias_ih_l0_reverse = module.bias_ih_l0
        assert len(list(module.parameters())) == (9 if proj_size else 7)
    x = randn(3, 2, 4, requires_grad=True)
    hx = random_state(ref, 3)
    assert_same_results(ref, ours, x, hx, leaves=(x, *hx))
    for module in (ref, ours):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        opt.zero_grad()
        module(x, hx)[0].sum().backward()
        opt.step()
        assert module.bias_ih_l0_reverse is module.bias_ih_l0
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    assert_same_results(ref, ours, x, hx, leaves=(x, *hx))


def test_partial_flat_weights():
    """From test_nn.py::test_partial_flat_weights: with one weight deleted the module can
    still be moved (upstream: to CUDA; here to the CPU again and to float64), and once the
    weight is put back it computes what it computed before."""
    ref = nn.LSTM(4, 6, 2, dtype=DTYPE)
    ours = peer(ref)
    x = randn(3, 2, 4)
    expected = outputs(ref, x)
    weight_orig = ours.weight_hh_l0
    del ours.weight_hh_l0
    assert not hasattr(ours, "weight_hh_l0")
    ours.to("cpu", DTYPE)
    ours.weight_hh_l0 = weight_orig
    before = kernel_launches()
    assert_all_close(outputs(ours, x), expected, ["output", "h_n", "c_n"])
    assert kernel_launches() > before


def test_save_lstm_compatibility():
    """From test_nn.py::test_save_lstm_compatibility: the state of an LSTM saved before
    PyTorch 1.8 (no proj_size) loads with __setstate__ and computes the same output."""
    model = nn.LSTM(2, 3, dtype=DTYPE)
    x = randn(4, 3, 2)
    expected = outputs(model, x)
    assert model.proj_size == 0
    state_dict = model.__dict__
    del state_dict["proj_size"]
    loaded_model = LSTM(2, 3, dtype=DTYPE, backend="triton")
    loaded_model.__setstate__(state_dict)
    assert loaded_model.proj_size == 0 and loaded_model.backend == "triton"
    before = kernel_launches()
    assert_all_close(outputs(loaded_model, x), expected, ["output", "h_n", "c_n"])
    assert kernel_launches() > before


def test_pickle():
    """From test_modules.py::test_pickle on nn.LSTM: a pickled and unpickled module is the
    same module (class, backend, options, weights) and computes the same output."""
    ref = nn.LSTM(2, 3, num_layers=2, bidirectional=True, proj_size=2, dtype=DTYPE).eval()
    ours = peer(ref)
    copy = pickle.loads(pickle.dumps(ours))
    assert type(copy) is LSTM and copy.backend == "triton" and not copy.training
    assert repr(copy) == repr(ours)
    for (name, p), q in zip(copy.named_parameters(), ours.parameters()):
        assert torch.equal(p, q), name
    x = randn(3, 2)
    hx = random_state(ref, None, requires_grad=False)
    got = outputs(copy, x, hx)
    assert_all_close(got, outputs(ours, x, hx), ["output", "h_n", "c_n"])
    assert_all_close(got, outputs(ref, x, hx), ["output", "h_n", "c_n"])
