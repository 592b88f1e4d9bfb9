"""Shared test helpers: random problems, a float64 reference, gradient collection."""
import copy

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import triton_lstm
from triton_lstm.dispatch import KernelConfig

# The backward with its dh as a GEMM phase split by gate (kernels/backward.py), on tiles small
# enough for the interpreter's tiny shapes: the tests that force it share this one.
GATE_SPLIT = KernelConfig(block_b=16, block_h=4, resident=False, block_k=16, gate_split=True)


def random_problem(T, B, I, H, dtype, device="cpu", *, bias=True, with_state=True):
    """Random input, state and a torch.nn.LSTM holding random weights (never zeros)."""
    ref = torch.nn.LSTM(I, H, bias=bias).to(device=device, dtype=dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        hx = tuple(torch.randn(1, B, H, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(2))
    return ref, x, hx


def outputs_and_grads(module, x, hx, upstream=None):
    """Run module, backprop random upstream gradients from y, h_n and c_n.

    Returns (outputs, grads, upstream): grads in the order x, h0, c0, then parameters.
    """
    y, (h, c) = module(x, hx)
    outs = (y, h, c)
    if upstream is None:
        upstream = tuple(torch.randn_like(o) for o in outs)
    inputs = [x] + (list(hx) if hx is not None else []) + list(module.parameters())
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, upstream))
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs], [g.detach() for g in grads], upstream


def packed_outputs_and_grads(module, x, hx, reset, lengths, upstream):
    """Run module on x (packed by ``lengths`` unless None) with ``reset``, backprop
    ``upstream(outputs)`` from (y or its packed data, h_n, c_n). Returns the outputs, then
    the grads of x, hx and the parameters, in one list."""
    inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h, c) = module(inp, hx, reset=reset)
    outs = (out if lengths is None else out.data, h, c)
    leaves = [x] + (list(hx) if hx is not None else []) + list(module.parameters())
    loss = sum((t * u).sum() for t, u in zip(outs, upstream(outs)))
    return [t.detach() for t in outs] + list(torch.autograd.grad(loss, leaves))


def nn_lstm_under_cpu_autocast(control, dtype, x, hx=None):
    """nn.LSTM's forward under CPU autocast to ``dtype`` where oneDNN has that LSTM (bf16, on
    CPUs with AVX-512), else nn.LSTM run in ``dtype`` by hand, which is what autocast means
    (oneDNN has no fp16 LSTM under CPU autocast, nor a bf16 one on AVX2 CPUs): the module
    that ran (``control``, or a copy of it in ``dtype``) and its outputs."""
    if dtype == torch.bfloat16:
        try:
            with torch.autocast("cpu", dtype=dtype):
                return control, control(x, hx)
        except RuntimeError as error:
            if "primitive descriptor" not in str(error):
                raise
    by_hand = copy.deepcopy(control).to(dtype)
    return by_hand, by_hand(x.to(dtype), None if hx is None else tuple(t.to(dtype) for t in hx))


def float64_copy(module):
    """A torch.nn.LSTM in float64 on the CPU with module's options and parameters."""
    ref = torch.nn.LSTM(module.input_size, module.hidden_size, num_layers=module.num_layers,
                        bias=module.bias, batch_first=module.batch_first,
                        bidirectional=module.bidirectional, proj_size=module.proj_size,
                        dtype=torch.float64)
    ref.load_state_dict({k: v.detach().cpu().double() for k, v in module.state_dict().items()})
    return ref


def float64_reference(module, x, hx, upstream):
    """The same computation in float64 on the CPU with torch.nn.LSTM."""
    ref = float64_copy(module)
    x64 = x.detach().cpu().double().requires_grad_()
    hx64 = None if hx is None else tuple(s.detach().cpu().double().requires_grad_() for s in hx)
    up64 = tuple(u.detach().cpu().double() for u in upstream)
    return outputs_and_grads(ref, x64, hx64, up64)[:2]


# fp32 on the CPU beyond twice nn.LSTM's fp32 error against float64: eight fp32 rounding
# steps (the most seen over test_kernels' configs and shapes, three seeds: 3.7e-7).
FP32_SLACK = 2 ** -20


def relative_error(got, want):
    """max|got - want| / max|want|, in float64 on the CPU."""
    want = want.detach().double().cpu()
    return float((got.detach().double().cpu() - want).abs().max()
                 / want.abs().max().clamp_min(1e-30))


def assert_within_twice_the_reference_error(ours, theirs, want, slack, names=None,
                                            theirs_name="nn.LSTM"):
    """Each of our tensors finite and at most twice as far from float64 as theirs, + slack."""
    names = names or [f"tensor {k}" for k in range(len(want))]
    for name, got, base, ref in zip(names, ours, theirs, want):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        ours_err, their_err = relative_error(got, ref), relative_error(base, ref)
        assert ours_err <= 2 * their_err + slack, (
            f"{name}: error {ours_err:.2e} vs {theirs_name}'s {their_err:.2e} (+{slack:.0e})")


def _spans(indices):
    """Sorted integers as ranges: [0, 1, 2, 5] -> "0-2, 5"."""
    spans, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            spans.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ", ".join(spans)


def assert_identical(got, want, name):
    """got equals want element for element, NaN where want has NaN. Where not, the message says
    where they part: how many elements differ, the first index along dim 0 (the step of a
    [T, B, ...] output) with a difference, and there the rows (dim 1) and last-dim indices
    (units, gates) that differ, so one failed GPU run tells which step, rows and programs'
    units went wrong."""
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{name}: {got.dtype}{list(got.shape)} against {want.dtype}{list(want.shape)}")
    differs = ~((got == want) | (got.isnan() & want.isnan()))
    if not differs.any():
        return
    differs, got, want = differs.cpu(), got.detach().cpu(), want.detach().cpu()
    first = differs.nonzero()[0].tolist()
    where = f"first at index {first}"
    if differs.dim() >= 2:
        step = differs[first[0]]
        rows = step.flatten(1).any(1).nonzero().flatten().tolist()
        columns = step.reshape(-1, step.shape[-1]).any(0).nonzero().flatten().tolist()
        where += (f"; at dim-0 index {first[0]}: dim-1 indices {_spans(rows)}, last-dim "
                  f"indices {_spans(columns)} of {step.shape[-1]}")
    both = ~(got.isnan() | want.isnan()) & differs
    largest = (got[both].double() - want[both].double()).abs().max().item() if both.any() else 0
    raise AssertionError(
        f"{name}: {int(differs.sum())} of {differs.numel()} elements differ, {where}; "
        f"largest difference {largest:.3g}; NaNs {int(got.isnan().sum())} against "
        f"{int(want.isnan().sum())}")


def triton_copy(ref, **kwargs):
    return triton_lstm.LSTM.from_torch(ref, backend="triton", **kwargs)


def stack_weights(module):
    """Per layer (w_ih, w_hh, b_ih, b_hh) of a unidirectional nn.LSTM (the wavefront's form)."""
    return [tuple(getattr(module, f"{name}_l{k}") for name in
                  ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            for k in range(module.num_layers)]


def chained_layers(control, x, hx, keep, backend=None):
    """control's layers as separate one-layer nn.LSTMs (or triton_lstm.LSTMs on ``backend``)
    sharing its parameters, x * keep between them (dropout with given masks [L-1, T, B, H]).
    Returns y, h_n, c_n."""
    y, h_n, c_n = x, [], []
    for k in range(control.num_layers):
        sizes = (control.input_size if k == 0 else control.hidden_size, control.hidden_size)
        if backend is None:
            layer = torch.nn.LSTM(*sizes, bias=control.bias, device=x.device, dtype=x.dtype)
        else:
            layer = triton_lstm.LSTM(*sizes, bias=control.bias, device=x.device, dtype=x.dtype,
                                     backend=backend)
        for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if control.bias else ()):
            setattr(layer, name + "_l0", getattr(control, f"{name}_l{k}"))
        if k > 0:
            y = y * keep[k - 1]
        y, (h, c) = layer(y, None if hx is None else (hx[0][k:k + 1], hx[1][k:k + 1]))
        h_n.append(h[0])
        c_n.append(c[0])
    return y, torch.stack(h_n), torch.stack(c_n)
