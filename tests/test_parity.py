"""torch.nn.LSTM parity through the Triton kernels (CPU, interpreter): layers, directions,
projections, packed sequences, batch_first, unbatched, dropout; outputs, final states and
every gradient against torch.nn.LSTM in float64 loaded with the same state_dict."""
import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import triton_lstm
import triton_lstm.functional as functional
from triton_lstm.dispatch import launch_counts

from .conftest import requires_interpreter

pytestmark = requires_interpreter
TOL = dict(rtol=1e-10, atol=1e-10)


def run(module, x, hx, upstream=None):
    """Outputs (output data, h_n, c_n) and the gradients of x, hx and every parameter."""
    out, (h, c) = module(x, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    outs = (data, h, c)
    if upstream is None:
        upstream = tuple(torch.randn_like(o) for o in outs)
    x_leaf = x.data if isinstance(x, PackedSequence) else x
    inputs = [x_leaf] + (list(hx) if hx is not None else []) + list(module.parameters())
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, upstream)), inputs)
    return outs, grads, upstream


def packed(x, lengths, enforce_sorted):
    p = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    return PackedSequence(p.data.detach().requires_grad_(), p.batch_sizes, p.sorted_indices,
                          p.unsorted_indices)


CASES = [pytest.param(layers, bidir, form, with_hx, proj,
                      id=f"L{layers}-{'bi' if bidir else 'uni'}-{form}-{'hx' if with_hx else 'nohx'}"
                      f"-P{proj}")
         for layers, bidir, form, with_hx, proj in itertools.product(
             (1, 2), (False, True), ("seq", "batch_first", "packed", "packed_sorted"), (False, True),
             (0, 4))
         if proj == 0 or with_hx]   # projections: every layout, with hx (its shapes differ)


@pytest.mark.parametrize("layers, bidir, form, with_hx, proj", CASES)
def test_matches_torch_lstm(layers, bidir, form, with_hx, proj):
    T, B, I, H = 5, 3, 4, 6
    ref = torch.nn.LSTM(I, H, num_layers=layers, bidirectional=bidir, proj_size=proj,
                        batch_first=(form == "batch_first"), dtype=torch.float64)
    ours = triton_lstm.LSTM.from_torch(ref, backend="triton")
    D = 2 if bidir else 1
    if form == "batch_first":
        x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    elif form.startswith("packed"):
        lengths = torch.tensor([5, 4, 2]) if form == "packed_sorted" else torch.tensor([3, 5, 1])
        x = packed(torch.randn(T, B, I, dtype=torch.float64), lengths, form == "packed_sorted")
    else:
        x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(layers * D, B, size, dtype=torch.float64, requires_grad=True)
                   for size in (proj or H, H))
    before = sum(launch_counts.values())
    outs, grads, upstream = run(ours, x, hx)
    assert sum(launch_counts.values()) > before, "the Triton kernels did not run"
    ref_outs, ref_grads, _ = run(ref, x, hx, upstream)
    for name, got, want in zip(("output", "h_n", "c_n"), outs, ref_outs):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{name}: {m}")
    for k, (got, want) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"gradient {k}: {m}")


def test_packed_output_keeps_the_packing():
    ref = torch.nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64)
    ours = triton_lstm.LSTM.from_torch(ref, backend="triton")
    x = packed(torch.randn(6, 4, 3, dtype=torch.float64), torch.tensor([2, 6, 3, 6]), False)
    out, _ = ours(x)
    want, _ = ref(x)
    assert torch.equal(out.batch_sizes, want.batch_sizes)
    assert torch.equal(out.sorted_indices, want.sorted_indices)
    assert torch.equal(out.unsorted_indices, want.unsorted_indices)
    torch.testing.assert_close(out.data, want.data, **TOL)
    padded, lengths = pad_packed_sequence(out)
    assert lengths.tolist() == [2, 6, 3, 6]


def test_dropout_between_layers_in_training_only():
    ref = torch.nn.LSTM(3, 8, num_layers=3, dropout=0.5, dtype=torch.float64)
    ours = triton_lstm.LSTM.from_torch(ref, backend="triton")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    ours.train()
    torch.manual_seed(7)
    first = ours(x)[0]
    torch.manual_seed(7)
    second = ours(x)[0]
    assert torch.equal(first, second), "training-mode dropout is not reproducible under a seed"
    assert not torch.allclose(first, ours.eval()(x)[0])


def test_dropout_statistics():
    """Each layer but the last sees its input scaled by 1/(1-p) or zeroed with probability p."""
    torch.manual_seed(0)
    ours = triton_lstm.LSTM(2, 16, num_layers=2, dropout=0.25, backend="triton", dtype=torch.float64)
    ours.train()
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    seen, outputs = [], []
    original = functional.lstm_layer

    def spy(x, *args, **kwargs):
        seen.append(x.detach())
        result = original(x, *args, **kwargs)
        outputs.append(result[0].detach())
        return result

    functional.lstm_layer = spy
    try:
        ours(x)
    finally:
        functional.lstm_layer = original
    layer2_input = seen[1]
    kept = layer2_input != 0
    dropped = 1 - kept.double().mean().item()
    assert 0.1 < dropped < 0.4, f"fraction dropped {dropped:.2f}, expected about 0.25"
    # What is kept is the first layer's output scaled by 1 / (1 - p).
    torch.testing.assert_close(layer2_input[kept], outputs[0][kept] / 0.75, **TOL)


def test_unbatched_input():
    ref = torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = triton_lstm.LSTM.from_torch(ref, backend="triton")
    x = torch.randn(4, 3, dtype=torch.float64)
    hx = tuple(torch.randn(4, 5, dtype=torch.float64) for _ in range(2))
    for args in ((x,), (x, hx)):
        out, (h, c) = ours(*args)
        want, (wh, wc) = ref(*args)
        assert out.shape == want.shape == (4, 10) and h.shape == wh.shape == (4, 5)
        torch.testing.assert_close(out, want, **TOL)
        torch.testing.assert_close(h, wh, **TOL)
        torch.testing.assert_close(c, wc, **TOL)
