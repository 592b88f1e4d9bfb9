"""`LSTM(..., recompute=k)`: the state every k steps instead of every step's gates, and the
gates recomputed segment by segment in the backward. Gradients must equal those without,
with segment boundaries at awkward places; the saved memory must shrink."""
import pytest
import torch
from torch import nn

import triton_lstm
from triton_lstm import dispatch, tuning

from .conftest import requires_interpreter
from .helpers import GATE_SPLIT, packed_outputs_and_grads

pytestmark = requires_interpreter
TOL = dict(rtol=1e-10, atol=1e-10)

CASES = [  # options, T, every, hx, lengths, resets
    pytest.param(dict(), 7, 3, True, None, False, id="T7-k3"),
    pytest.param(dict(), 5, 1, False, None, False, id="k1"),
    pytest.param(dict(), 4, 9, True, None, False, id="k-beyond-T"),
    pytest.param(dict(num_layers=2, bidirectional=True), 7, 2, True, [7, 3, 5], False,
                 id="L2-bidir-packed-k2"),
    pytest.param(dict(bidirectional=True, proj_size=3), 8, 3, True, [8, 2, 6], True,
                 id="bidir-proj-packed-resets-k3"),
    pytest.param(dict(num_layers=2), 6, 4, False, None, True, id="L2-resets-k4"),
]


@pytest.mark.parametrize("backward", [None, GATE_SPLIT], ids=["", "gate-split"])
@pytest.mark.parametrize("options, T, every, with_hx, lengths, resets", CASES)
def test_gradients_with_recompute_equal_those_without(options, T, every, with_hx, lengths,
                                                      resets, backward):
    B, I, H = 3, 4, 5
    ref = nn.LSTM(I, H, dtype=torch.float64, **options)
    saving = triton_lstm.LSTM.from_torch(ref, backend="triton")
    recomputing = triton_lstm.LSTM.from_torch(ref, backend="triton", recompute=every)
    D = 2 if ref.bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        hx = tuple(torch.randn(ref.num_layers * D, B, size, dtype=torch.float64,
                               requires_grad=True) for size in (ref.proj_size or H, H))
    lengths = None if lengths is None else torch.tensor(lengths)
    reset = (torch.rand(T, B) < 0.3) if resets else None
    upstreams = {}

    def upstream(outs):       # the same random upstream gradients for both
        if not upstreams:
            upstreams["u"] = [torch.randn_like(t) for t in outs]
        return upstreams["u"]

    want = packed_outputs_and_grads(saving, x, hx, reset, lengths, upstream)
    with tuning.forced_configs(backward=backward):
        got = packed_outputs_and_grads(recomputing, x, hx, reset, lengths, upstream)
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, k=k: f"tensor {k}: {m}")


def _saved_bytes(module, x):
    """Bytes the autograd graph keeps for the backward, beyond the layer's inputs and outputs."""
    owned = {p.data_ptr() for p in module.parameters()} | {x.data_ptr()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = module(x)
    owned.add(out.data_ptr())
    return sum(t.numel() * t.element_size() for t in saved
               if t.numel() and t.data_ptr() not in owned and t.untyped_storage().data_ptr()
               != out.untyped_storage().data_ptr())


def test_recompute_saves_the_state_every_k_steps_instead_of_every_steps_gates():
    T, B, H, every = 64, 2, 8, 8
    ref = nn.LSTM(H, H, dtype=torch.float32)
    x = torch.randn(T, B, H, requires_grad=True)
    full = _saved_bytes(triton_lstm.LSTM.from_torch(ref, backend="triton"), x)
    small = _saved_bytes(triton_lstm.LSTM.from_torch(ref, backend="triton", recompute=every), x)
    # Without: every step's four gates and c (fp32). With: h and c every `every` steps.
    assert full == T * B * (4 * H + H) * 4
    assert small == -(-T // every) * B * (H + H) * 4


def test_recompute_runs_more_kernel_launches_only_in_the_backward():
    ref = nn.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    def launches(module, backward):
        before = sum(dispatch.launch_counts.values())
        out, _ = module(x)
        if backward:
            out.sum().backward()
        return sum(dispatch.launch_counts.values()) - before

    plain = triton_lstm.LSTM.from_torch(ref, backend="triton")
    recomputing = triton_lstm.LSTM.from_torch(ref, backend="triton", recompute=2)
    assert launches(recomputing, False) == launches(plain, False) == 1
    assert launches(plain, True) == 2
    # The forward, then three segments, each recomputed by a forward launch before its backward.
    assert launches(recomputing, True) == 1 + 3 * 2


@pytest.mark.parametrize("recompute", [0, -1, 2.5, True, "4"])
def test_bad_recompute_is_refused(recompute):
    with pytest.raises(ValueError, match="recompute must be None or a number of steps >= 1"):
        triton_lstm.LSTM(3, 4, recompute=recompute)


def test_recompute_shows_in_repr_and_survives_from_torch():
    module = triton_lstm.LSTM.from_torch(nn.LSTM(3, 4), recompute=16)
    assert module.recompute == 16
    assert "recompute=16" in repr(module)
    assert "recompute" not in repr(triton_lstm.LSTM(3, 4))
