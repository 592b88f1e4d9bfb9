"""A layer in chunks of steps, its GEMMs beside its recurrence (overlap.py): the backward
(``dispatch.backward_chunks``), each chunk's GEMMs beside the next chunk's reverse
recurrence, and the forward (``dispatch.forward_chunks``), each chunk's input projection
beside the recurrence of the chunk before. Outputs and gradients must equal the one launch's,
with chunk boundaries at awkward places, packed rows ending inside chunks, resets and
projections; in bf16 and fp32 they must stay as close to float64 as nn.LSTM's."""
import pytest
import torch
from torch import nn

from triton_lstm import dispatch, tuning
from triton_lstm.dispatch import KernelConfig
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


@pytest.fixture
def forward_chunks(monkeypatch):
    """Set dispatch.forward_chunks for one test."""
    def set_chunks(value):
        monkeypatch.setattr(dispatch, "forward_chunks", value)
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


def same_upstream():
    """upstream(outputs) for packed_outputs_and_grads: random on the first call, then the same."""
    drawn = []

    def upstream(outs):
        if not drawn:
            drawn.extend(torch.randn_like(t) for t in outs)
        return drawn
    return upstream


def assert_chunks_change_nothing(set_chunks, count, options, T, with_hx, lengths, resets,
                                 **forced):
    """Outputs and gradients of a float64 layer with ``set_chunks(count)`` equal those with
    ``set_chunks(0)`` (tiles forced as ``tuning.forced_configs(**forced)``)."""
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
    upstream = same_upstream()
    with tuning.forced_configs(**forced):
        set_chunks(0)
        want = packed_outputs_and_grads(module, x, hx, reset, lengths, upstream)
        set_chunks(count)
        got = packed_outputs_and_grads(module, x, hx, reset, lengths, upstream)
    for k, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, k=k: f"tensor {k}: {m}")


@pytest.mark.parametrize("backward", [None, GATE_SPLIT], ids=["", "gate-split"])
@pytest.mark.parametrize("options, T, count, with_hx, lengths, resets", CASES)
def test_chunked_backward_equals_the_one_launch_backward(options, T, count, with_hx, lengths,
                                                         resets, backward, chunks):
    assert_chunks_change_nothing(chunks, count, options, T, with_hx, lengths, resets,
                                 backward=backward)


@pytest.mark.parametrize("setting", ["backward_chunks", "forward_chunks"])
@pytest.mark.parametrize("dtype, slack", [(torch.bfloat16, 8e-3), (torch.float32, FP32_SLACK)],
                         ids=["bf16", "fp32"])
def test_chunked_layer_is_as_close_to_float64_as_nn_lstm(dtype, slack, setting, monkeypatch):
    ref, x, hx = random_problem(12, 3, 8, 16, dtype)
    monkeypatch.setattr(dispatch, setting, 4)
    ours_out, ours_grads, upstream = outputs_and_grads(triton_copy(ref), x, hx)
    theirs_out, theirs_grads, _ = outputs_and_grads(ref, x, hx, upstream)
    want_out, want_grads = float64_reference(ref, x, hx, upstream)
    names = ["x", "h0", "c0"] + [name for name, _ in ref.named_parameters()]
    assert_within_twice_the_reference_error(ours_out, theirs_out, want_out, slack,
                                            ["y", "h_n", "c_n"])
    assert_within_twice_the_reference_error(ours_grads, theirs_grads, want_grads, slack, names)


def assert_one_launch_per_chunk(set_chunks, launches, x):
    """``launches(module, x)`` of float64 layers as ``set_chunks`` asks for 0, 1, 3 and "9"
    chunks (as the environment variable gives it): one direction takes one launch, then
    one per chunk, at most one per step; both directions (twice the programs already) keep
    one launch. The last setting, "9", stays."""
    one_way = triton_copy(nn.LSTM(3, 4, dtype=torch.float64))
    both_ways = triton_copy(nn.LSTM(3, 4, bidirectional=True, dtype=torch.float64))
    for value, expected in ((0, 1), (1, 1), (3, 3), ("9", x.shape[0])):
        set_chunks(value)
        assert launches(one_way, x) == expected, f"{value!r} chunks"
    assert launches(both_ways, x) == 1


def test_the_backward_runs_one_launch_per_chunk_where_it_applies(chunks):
    x = torch.randn(7, 2, 3, dtype=torch.float64, requires_grad=True)
    assert_one_launch_per_chunk(chunks, backward_launches, x)
    # Recompute has its own segments.
    recomputing = triton_copy(nn.LSTM(3, 4, dtype=torch.float64), recompute=4)
    assert backward_launches(recomputing, x) == 2 * 2     # a forward and a backward per segment


@pytest.mark.parametrize("setting", ["backward_chunks", "forward_chunks"])
def test_chunked_layer_passes_gradcheck_with_batched_grads_and_gradgradcheck(setting,
                                                                             monkeypatch):
    """gradcheck's batched-gradient check (torch's legacy vmap) keeps the one-launch
    backward; the double backward runs the chunks, then differentiates the reference."""
    module = triton_copy(nn.LSTM(2, 3, dtype=torch.float64))
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    names = [n for n, _ in module.named_parameters()]

    def fn(x, h0, c0, *weights):
        out, (h, c) = torch.func.functional_call(module, dict(zip(names, weights)),
                                                 (x, (h0, c0)))
        return out, h, c

    inputs = (x, h0, c0, *module.parameters())
    monkeypatch.setattr(dispatch, setting, 2)
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


# -- the forward -------------------------------------------------------------------------------

# Two hidden blocks at H = 5: a group the interpreter cannot run persistently, so stepped.
STEPPED = KernelConfig(block_b=16, block_h=4, resident=False, block_k=16)


def forward_launches(module, x):
    before = sum(dispatch.launch_counts.values())
    with torch.no_grad():
        module(x)
    return sum(dispatch.launch_counts.values()) - before


@pytest.mark.parametrize("forward", [None, STEPPED], ids=["persistent", "stepped"])
@pytest.mark.parametrize("options, T, count, with_hx, lengths, resets", CASES + [
    pytest.param(dict(proj_size=2), 6, 6, False, [4, 6, 1], False, id="proj-packed-every-step"),
])
def test_chunked_forward_equals_the_one_launch_forward(options, T, count, with_hx, lengths,
                                                       resets, forward, forward_chunks):
    """Outputs and, through the saved gates, gradients: the chunks write the one launch's."""
    assert_chunks_change_nothing(forward_chunks, count, options, T, with_hx, lengths, resets,
                                 forward=forward)


def test_chunked_forward_with_recompute_and_backward_chunks(forward_chunks, chunks):
    """The checkpoints recompute saves, written chunk by chunk; both sides chunked at once."""
    ref = nn.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(9, 2, 3, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    upstream = same_upstream()
    for module in (triton_copy(ref, recompute=4), triton_copy(ref)):
        forward_chunks(0)
        chunks(0)
        want = packed_outputs_and_grads(module, x, hx, None, None, upstream)
        forward_chunks(2)
        chunks(3)
        got = packed_outputs_and_grads(module, x, hx, None, None, upstream)
        for k, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, k=k: f"tensor {k}: {m}")


def test_chunked_forward_projects_each_chunk_into_place_with_the_fp32_gemm_kernel(
        forward_chunks, gemm_calls):
    """fp32 GEMMs in kernels/gemm.py: each chunk's projection is written where it belongs
    (to fp32 rounding: a GEMM over fewer rows may sum in another order)."""
    ref = nn.LSTM(4, 5)
    module = triton_copy(ref)
    x = torch.randn(7, 3, 4)
    forward_chunks(0)
    with torch.no_grad():
        want = module(x)
    whole = len(gemm_calls)
    forward_chunks(3)
    with torch.no_grad():
        got = module(x)
    assert len(gemm_calls) == 2 * whole + 2      # three GEMMs where there was one
    torch.testing.assert_close(got, want)


def test_the_forward_runs_one_launch_per_chunk_where_it_applies(forward_chunks):
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    assert_one_launch_per_chunk(forward_chunks, forward_launches, x)
    # Stepped: one launch a step, whatever the chunks.
    with tuning.forced_configs(forward=STEPPED):
        assert forward_launches(triton_copy(nn.LSTM(3, 5, dtype=torch.float64)), x) == 7


@pytest.mark.parametrize("value", ["four", "-1", "2.5", -1, True, 2.5])
def test_bad_forward_chunks_is_refused(value, forward_chunks):
    module = triton_copy(nn.LSTM(3, 4, dtype=torch.float64))
    forward_chunks(value)
    with pytest.raises(ValueError, match="TRITON_LSTM_FORWARD_CHUNKS .* expected a whole "
                                         "number of chunks >= 0"):
        module(torch.randn(5, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("config", [None, STEPPED], ids=["persistent", "stepped"])
@pytest.mark.parametrize("proj_size", [0, 3], ids=["", "proj"])
def test_the_launcher_in_step_chunks_is_bitwise_one_launch(config, proj_size):
    """Over one gx, launches from later steps carry exactly what one launch keeps on chip."""
    from triton_lstm.kernels.forward import lstm_forward
    T, B, H = 9, 3, 5
    R = proj_size or H
    gx = torch.randn(T, B, 4 * H)
    w_hh = torch.randn(1, 4 * H, R) / R ** 0.5
    w_hr = torch.randn(1, R, H) / H ** 0.5 if proj_size else None
    h0, c0 = torch.randn(1, B, R), torch.randn(1, B, H)
    lengths = torch.tensor([9, 4, 1], dtype=torch.int32)
    whole = lstm_forward(gx, w_hh, h0, c0, lengths, w_hr, save=True, config=config)
    chunked = lstm_forward(gx, w_hh, h0, c0, lengths, w_hr, save=True, config=config,
                           step_chunks=[(0, 3), (3, 4), (4, 9)])
    for k, (a, b) in enumerate(zip(whole, chunked)):
        assert (a is None) == (b is None), f"output {k}"
        if a is not None:
            assert torch.equal(a, b), f"output {k}"


def test_the_launcher_refuses_step_chunks_for_two_directions():
    from triton_lstm.kernels.forward import lstm_forward
    gx = torch.randn(4, 2, 2 * 4 * 3, dtype=torch.float64)
    w_hh = torch.randn(2, 4 * 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="step_chunks needs one direction, got 2"):
        lstm_forward(gx, w_hh, None, None, None, save=False, step_chunks=[(0, 2), (2, 4)])
