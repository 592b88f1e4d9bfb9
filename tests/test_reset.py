"""Resets inside a sequence (`forward(..., reset=mask)`), in the kernels, forward and backward.

The reference splits every row at its resets and runs torch.nn.LSTM on each piece from
the same (h0, c0): outputs, final states and every gradient must match it. For the
reverse direction the pieces are walked from their own ends, so its h_n / c_n are those
of the row's first piece (the last one it processes), as in the kernels.
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import triton_lstm
from triton_lstm import LSTMInputError, dispatch, tuning

from .conftest import requires_interpreter
from .helpers import GATE_SPLIT, triton_copy

pytestmark = requires_interpreter
TOL = dict(rtol=1e-10, atol=1e-10)


def kernel_launches():
    return sum(dispatch.launch_counts.values())


def split_reference(ref, x, hx, reset, lengths):
    """nn.LSTM on every piece of every row between resets; x [T, B, I] time-major.

    Returns output [T, B, D*R] (zeros past each row's length), h_n, c_n.
    """
    T, B, _ = x.shape
    D = 2 if ref.bidirectional else 1
    L = ref.num_layers
    R = ref.proj_size or ref.hidden_size
    rows_out, h_n, c_n = [], [], []
    for b in range(B):
        length = T if lengths is None else int(lengths[b])
        cuts = [0] + [t for t in range(1, length) if reset[t, b]] + [length]
        pieces, h_last, c_last = [], [], []
        for start, stop in zip(cuts[:-1], cuts[1:]):
            state = None if hx is None else (hx[0][:, b:b + 1], hx[1][:, b:b + 1])
            out, (h, c) = ref(x[start:stop, b:b + 1], state)
            pieces.append(out)
            h_last.append(h)
            c_last.append(c)
        out = torch.cat(pieces)
        out = torch.cat([out, out.new_zeros(T - length, 1, D * R)])
        rows_out.append(out)
        # Forward direction: the last piece's state; reverse: the first piece's.
        pick = [(k, d) for k in range(L) for d in range(D)]
        h_n.append(torch.stack([(h_last[-1] if d == 0 else h_last[0])[k * D + d]
                                for k, d in pick]))
        c_n.append(torch.stack([(c_last[-1] if d == 0 else c_last[0])[k * D + d]
                                for k, d in pick]))
    return torch.cat(rows_out, dim=1), torch.cat(h_n, dim=1), torch.cat(c_n, dim=1)


def random_reset(T, B, lengths=None):
    reset = torch.rand(T, B) < 0.3
    reset[1, 0] = True            # at least one restart, right after the first step
    if lengths is not None:
        reset[int(lengths[1]) - 1, 1] = True    # a piece of one step at a row's end
    return reset


CASES = [
    pytest.param(dict(), True, None, id="uni-hx"),
    pytest.param(dict(num_layers=2), False, None, id="L2-uni-nohx"),
    pytest.param(dict(bidirectional=True), True, None, id="bidir-hx"),
    pytest.param(dict(num_layers=2, bidirectional=True), False, [6, 3, 5], id="L2-bidir-packed"),
    pytest.param(dict(bidirectional=True, proj_size=3), True, [4, 6, 2], id="bidir-proj-packed"),
    pytest.param(dict(proj_size=3, batch_first=True), True, None, id="proj-batch-first"),
]


# Forced gate split: restarts move part of dh to the restart state, which its GEMM phase
# must leave to the sum.
@pytest.mark.parametrize("backward", [None, GATE_SPLIT], ids=["", "gate-split"])
@pytest.mark.parametrize("options, with_hx, lengths", CASES)
def test_reset_matches_nn_lstm_on_the_pieces(options, with_hx, lengths, backward):
    with tuning.forced_configs(backward=backward):
        check_reset_matches_nn_lstm_on_the_pieces(options, with_hx, lengths)


def check_reset_matches_nn_lstm_on_the_pieces(options, with_hx, lengths):
    T, B, I, H = 6, 3, 4, 5
    ref = nn.LSTM(I, H, dtype=torch.float64, **options)
    ours = triton_copy(ref)
    D = 2 if ref.bidirectional else 1
    R = ref.proj_size or H
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(ref.num_layers * D, B, size, dtype=torch.float64,
                               requires_grad=True) for size in (R, H))
    lengths = None if lengths is None else torch.tensor(lengths)
    reset = random_reset(T, B, lengths)
    batch_first = ref.batch_first
    if lengths is not None:
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    else:
        inp = x.transpose(0, 1) if batch_first else x
    before = kernel_launches()
    out, (h, c) = ours(inp, hx, reset=reset.t() if batch_first else reset)
    assert kernel_launches() > before
    if isinstance(out, PackedSequence):
        out, _ = nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    elif batch_first:
        out = out.transpose(0, 1)
    ref.batch_first = False                       # the reference takes time-major pieces
    want = split_reference(ref, x, hx, reset, lengths)
    for name, got, exp in zip(("output", "h_n", "c_n"), (out, h, c), want):
        torch.testing.assert_close(got, exp, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    upstream = [torch.randn_like(t) for t in want]
    leaves = [x] + (list(hx) if hx is not None else [])
    got = torch.autograd.grad(sum((t * u).sum() for t, u in zip((out, h, c), upstream)),
                              leaves + list(ours.parameters()))
    exp = torch.autograd.grad(sum((t * u).sum() for t, u in zip(want, upstream)),
                              leaves + list(ref.parameters()))
    names = ["x", "h0", "c0"][:len(leaves)] + [n for n, _ in ref.named_parameters()]
    for name, g, e in zip(names, got, exp):
        torch.testing.assert_close(g, e, **TOL, msg=lambda m, name=name: f"grad {name}: {m}")


def test_no_gradient_crosses_a_reset():
    ours = triton_lstm.LSTM(3, 4, num_layers=2, bidirectional=True, backend="triton",
                            dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(6, 2, dtype=torch.bool)
    reset[3] = True
    out, _ = ours(x, reset=reset)
    # Outputs of the second piece do not depend on inputs of the first, nor the reverse.
    grad_late, = torch.autograd.grad(out[3:].sum(), x, retain_graph=True)
    grad_early, = torch.autograd.grad(out[:3].sum(), x)
    assert torch.all(grad_late[:3] == 0) and torch.all(grad_late[3:] != 0)
    assert torch.all(grad_early[3:] == 0) and torch.all(grad_early[:3] != 0)


def test_no_resets_is_the_plain_forward():
    ref = nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = triton_copy(ref)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        got = ours(x, reset=torch.zeros(5, 2, dtype=torch.bool))
        want = ours(x)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_reset_on_the_pytorch_path(backend):
    """nn.LSTM has no resets: backend="torch" (and CPU tensors with "auto") run the plain
    PyTorch layers, with the same meaning."""
    ref = nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    reset = random_reset(5, 2)
    before = kernel_launches()
    out, (h, c) = triton_lstm.LSTM.from_torch(ref, backend=backend)(x, reset=reset)
    assert kernel_launches() == before
    want = split_reference(ref, x, None, reset, None)
    for got, exp in zip((out, h, c), want):
        torch.testing.assert_close(got, exp, **TOL)


def test_unbatched_reset():
    ref = nn.LSTM(3, 4, dtype=torch.float64)
    ours = triton_copy(ref)
    x = torch.randn(5, 3, dtype=torch.float64)
    reset = torch.tensor([False, False, True, False, True])
    out, (h, c) = ours(x, reset=reset)
    want = split_reference(ref, x[:, None], None, reset[:, None], None)
    torch.testing.assert_close(out, want[0][:, 0], **TOL)
    torch.testing.assert_close(h, want[1][:, 0], **TOL)
    torch.testing.assert_close(c, want[2][:, 0], **TOL)


@pytest.mark.parametrize("reset, error, match", [
    pytest.param(lambda: torch.zeros(5, 2), TypeError, r"reset must be a bool tensor", id="float"),
    pytest.param(lambda: [True] * 5, TypeError, r"reset must be a bool tensor", id="list"),
    pytest.param(lambda: torch.zeros(2, 5, dtype=torch.bool), LSTMInputError,
                 r"reset must have shape \(5, 2\) \(\[T, B\]", id="transposed"),
    pytest.param(lambda: torch.zeros(5, 2, device="meta", dtype=torch.bool), LSTMInputError,
                 r"reset is on meta but input is on cpu", id="device"),
])
def test_bad_reset_is_refused_naming_it(reset, error, match):
    ours = triton_lstm.LSTM(3, 4, backend="triton")
    before = kernel_launches()
    with pytest.raises(error, match=match):
        ours(torch.randn(5, 2, 3), reset=reset())
    assert kernel_launches() == before
