"""The backward in chunks of steps, each chunk's GEMMs beside the next chunk's reverse
recurrence (overlap.py, ``dispatch.backward_chunks``). The gradients must equal the one-launch
backward's, with chunk boundaries at awkward places, packed rows ending inside chunks,
resets and projections; in bf16 and fp32 they must stay as close to float64 as nn.LSTM's."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from triton_lstm import dispatch, tuning
from triton_lstm.overlap import chunk_bounds

from .conftest import requires_interpreter
from .helpers import (FP32_SLACK, GATE_SPLIT, assert_within_twice_the_reference_error,
                      float64_reference, outputs_and_grads, packed_outputs_and_grads,
                      random_problem, triton_copy)

pytestmark = requires_interpreter
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def chunks(monkeypatch):
    """Set dispatch.backward_chunks for one test."""
    def set_chunks(value):
        monkeypatch.setattr(dispatch, "backward_chunks", value)
    return set_chunks


def backward_launches(module, x):
    out, _ = module(x)
    before = sum(dispatch.launch_counts.values())
    out.sum().backward()
    return sum(dispatch.launch_counts.values()) - before


CASES = [  # options, T, chunks, hx, lengths, resets
    pytest.param(dict(), 7, 3, True, None, False, id="T7-3chunks"),
    pytest.param(dict(), 4, 9, False, None, False, id="chunks-beyond-T"),
    pytest.param(dict(num_layers=2), 7, 2, True, [7, 3, 5], False, id="L2-packed-2chunks"),
    pytest.param(dict(proj_size=3), 8, 3, True, [8, 2, 6], True, id="proj-packed-resets-3chunks"),
    pytest.param(dict(bias=False, batch_first=True), 6, 4, False, None, True,
                 id="nobias-batchfirst-resets-4chunks"),
]


@pytest.mark.parametrize("backward", [None, GATE_SPLIT], ids=["", "gate-split"])
@pytest.mark.parametrize("options, T, count, with_hx, lengths, resets", CASES)
def test_chunked_backward_equals_the_one_launch_backward(options, T, count, with_hx, lengths,
                                                         resets, backward, chunks):
    B, I, H = 3, 4, 5
    ref = nn.LSTM(I, H, dtype=torch.float64, **options)
    module = triton_copy(ref)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    if ref.batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    hx = None
    if with_hx:
        hx = tuple(torch.randn(ref.num_layers, B, size, dtype=torch.float64, requires_grad=True)
                   for size in (ref.proj_size or H, H))
    lengths = None if lengths is None else torch.tensor(lengths)
    reset = (torch.rand(T, B) < 0.3) if resets else None
    if ref.batch_first and resets:
        reset = reset.t()
    with torch.no_grad():
        out, (h, c) = module(x if lengths is None else
                             pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
    upstream = [torch.randn_like(t) for t in (out if lengths is None else out.data, h, c)]

    with tuning.forced_configs(backward=backward):
        chunks(0)
        want = packed_outputs_and_grads(module, x, hx, reset, lengths, lambda _: upstream)
        chunks(count)
        got = packed_outputs_and_grads(module, x, hx, reset, lengths, lambda _: upstream)
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, k=k: f"tensor {k}: {m}")


@pytest.mark.parametrize("dtype, slack", [(torch.bfloat16, 8e-3), (torch.float32, FP32_SLACK)],
                         ids=["bf16", "fp32"])
def test_chunked_backward_is_as_close_to_float64_as_nn_lstm(dtype, slack, chunks):
    ref, x, hx = random_problem(12, 3, 8, 16, dtype)
    chunks(4)
    ours_out, ours_grads, upstream = outputs_and_grads(triton_copy(ref), x, hx)
    theirs_out, theirs_grads, _ = outputs_and_grads(ref, x, hx, upstream)
    want_out, want_grads = float64_reference(ref, x, hx, upstream)
    names = ["x", "h0", "c0"] + [name for name, _ in ref.named_parameters()]
    assert_within_twice_the_reference_error(ours_grads, theirs_grads, want_grads, slack, names)
    assert_within_twice_the_reference_error(ours_out, theirs_out, want_out, slack,
                                            ["y", "h_n", "c_n"])


def test_the_backward_runs_one_launch_per_chunk_where_it_applies(chunks):
    T = 7
    one_way = triton_copy(nn.LSTM(3, 4, dtype=torch.float64))
    both_ways = triton_copy(nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64))
    recomputing = triton_copy(nn.LSTM(3, 4, dtype=torch.float64), recompute=4)
    x = torch.randn(T, 2, 3, dtype=torch.float64, requires_grad=True)
    chunks(0)
    assert backward_launches(one_way, x) == 1
    chunks(1)
    assert backward_launches(one_way, x) == 1
    chunks(3)
    assert backward_launches(one_way, x) == 3
    chunks("9")     # as TRITON_LSTM_BACKWARD_CHUNKS gives it; at most one chunk per step
    assert backward_launches(one_way, x) == T
    # Both directions already fill twice the programs; recompute has its own segments.
    assert backward_launches(both_ways, x) == 1
    assert backward_launches(recomputing, x) == 2 * 2     # a forward and a backward per segment


def test_chunked_backward_passes_gradcheck_with_batched_grads_and_gradgradcheck(chunks):
    """gradcheck's batched-gradient check (torch's legacy vmap) keeps the one launch; the
    double backward runs the chunks, then differentiates the reference."""
    module = triton_copy(nn.LSTM(2, 3, dtype=torch.float64))
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    names = [n for n, _ in module.named_parameters()]

    def fn(x, h0, c0, *weights):
        out, (h, c) = torch.func.functional_call(module, dict(zip(names, weights)),
                                                 (x, (h0, c0)))
        return out, h, c

    inputs = (x, h0, c0, *module.parameters())
    chunks(2)
    before = dispatch.launch_counts["persistent"]
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)
    assert dispatch.launch_counts["persistent"] > before


@pytest.mark.parametrize("steps, count", [(7, 3), (8, 8), (256, 4), (5, 2), (100, 7)])
def test_chunk_bounds_cover_every_step_once(steps, count):
    bounds = chunk_bounds(steps, count)
    assert len(bounds) == count
    assert [s for s0, s1 in bounds for s in range(s0, s1)] == list(range(steps))
    sizes = [s1 - s0 for s0, s1 in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("value", ["four", "-1", "2.5", -1, True, 2.5])
def test_bad_backward_chunks_is_refused(value, chunks):
    module = triton_copy(nn.LSTM(3, 4, dtype=torch.float64))
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = module(x)
    chunks(value)
    with pytest.raises(ValueError, match="TRITON_LSTM_BACKWARD_CHUNKS .* expected a whole "
                                         "number of chunks >= 0"):
        out.sum().backward()
