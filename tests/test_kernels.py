"""The Triton kernels themselves, on CPU under the interpreter (stepped mode).

Every output and gradient of LSTMFunction against torch.nn.LSTM in float64 (fp32: within twice
the error of nn.LSTM in fp32 against float64), with
tile configs that split the hidden units and the batch over several programs and
cover both the on-chip and the streamed-weight paths.
"""
import dataclasses
import types

import pytest
import torch
import triton
import triton.language as tl

from triton_lstm import LSTMFunction
from triton_lstm.autograd import lstm_layer
from triton_lstm.dispatch import KernelConfig, launch_counts
from triton_lstm.kernels.barrier import marks
from triton_lstm.kernels.forward import lstm_forward, rounded_to
from triton_lstm.ops import config_to_list
from triton_lstm.reference import lstm_layer_reference

from .conftest import requires_interpreter
from .helpers import (FP32_SLACK, GATE_SPLIT, assert_within_twice_the_reference_error,
                      float64_copy, random_problem)

pytestmark = requires_interpreter

CONFIGS = {
    "resident-bh4": KernelConfig(block_b=16, block_h=4, resident=True, split_k=1),
    "resident-bh8-split2": KernelConfig(block_b=16, block_h=8, resident=True, split_k=2),
    "streamed-bh8-bk16": KernelConfig(block_b=16, block_h=8, resident=False, block_k=16),
    # Pipelined K loops and loads after the barrier arrival change the schedule, not the math.
    "streamed-bh8-bk16-st3-pa": KernelConfig(block_b=16, block_h=8, resident=False, block_k=16,
                                             inner_stages=3, prefetch_after_arrive=True),
    # Weights on chip as chunks of the reduction, the broadcast operand staged chunk by chunk;
    # the chunks go to split_k accumulators in turn (up to 4 here, fewer where H is small).
    "chunked-bh8-bk16": KernelConfig(block_b=16, block_h=8, resident=True, block_k=16,
                                     chunked=True),
    "chunked-bh8-bk16-one-accumulator": KernelConfig(block_b=16, block_h=8, resident=True,
                                                     block_k=16, split_k=1, chunked=True),
    # Dataflow waits: slots filled with the unwritten mark, tiles polled until written.
    "dataflow-bh4": KernelConfig(block_b=16, block_h=4, resident=True, split_k=1, dataflow=True),
    "dataflow-streamed-bh8-bk16": KernelConfig(block_b=16, block_h=8, resident=False, block_k=16,
                                               dataflow=True),
    # The backward's dh as a GEMM phase split four ways by gate (no projection: there, and
    # with resident weights, the backward runs without it).
    "gate-split-bh4-bk16": GATE_SPLIT,
    "gate-split-bh8-bk16-st3": KernelConfig(block_b=16, block_h=8, resident=False, block_k=16,
                                            inner_stages=3, gate_split=True),
}

SHAPES = [  # T, B, I, H
    pytest.param((1, 1, 4, 20), id="T1-B1-I4-H20"),
    pytest.param((7, 3, 5, 33), id="T7-B3-I5-H33"),
    pytest.param((4, 2, 6, 16), id="T4-B2-I6-H16"),
    pytest.param((3, 17, 3, 12), id="T3-B17-I3-H12"),   # two batch blocks of 16
    # One hidden block per group: the interpreter launches these persistently.
    pytest.param((5, 3, 4, 4), id="T5-B3-I4-H4-persistent"),
]

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def run_function(x, hx, ref, config, upstream=None):
    """LSTMFunction on ref's weights; returns outputs, grads (x, h0, c0, params) and upstream."""
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    w_ih, w_hh, b_ih, b_hh = params if len(params) == 4 else params + [None, None]
    h0, c0 = (hx[0][0], hx[1][0]) if hx is not None else (None, None)
    y, h, c, *_ = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, None, config)
    outs = (y, h, c)
    if upstream is None:
        upstream = tuple(torch.randn_like(o) for o in outs)
    inputs = [x] + (list(hx) if hx is not None else []) + params
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, upstream)), inputs)
    return outs, grads, upstream


def run_reference(x, hx, ref, upstream):
    y, (h, c) = ref(x, hx)
    outs = (y, h[0], c[0])
    inputs = [x] + (list(hx) if hx is not None else []) + list(ref.parameters())
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, upstream)), inputs)
    return outs, grads


@pytest.mark.parametrize("accumulators", [2, 4])
def test_chunked_dot_with_several_accumulators_equals_one(accumulators):
    """H = 64 in chunks of 16: every chunk holds real units, so each accumulator's share counts
    (at the shared SHAPES the last chunks are padding)."""
    ref, x, hx = random_problem(4, 3, 5, 64, torch.float64)
    one = KernelConfig(block_b=16, block_h=16, resident=True, block_k=16, split_k=1, chunked=True)
    outs, grads, upstream = run_function(x, hx, ref, one)
    several = dataclasses.replace(one, split_k=accumulators)
    outs_k, grads_k, _ = run_function(x, hx, ref, several, upstream)
    ref_outs, ref_grads = run_reference(x, hx, ref, upstream)
    for k, (got, base, want) in enumerate(zip(outs_k + grads_k, outs + grads,
                                              ref_outs + ref_grads)):
        torch.testing.assert_close(got, base, **TOL[torch.float64], msg=f"tensor {k}")
        torch.testing.assert_close(got, want, **TOL[torch.float64], msg=f"tensor {k}")


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_outputs_and_all_gradients(shape, dtype, config_name):
    T, B, I, H = shape
    ref, x, hx = random_problem(T, B, I, H, dtype)
    outs, grads, upstream = run_function(x, hx, ref, CONFIGS[config_name])
    ref_outs, ref_grads = run_reference(x, hx, ref, upstream)
    names = ["y", "h_n", "c_n"] + [f"grad {n}" for n in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih",
                                                          "b_hh")]
    if dtype == torch.float32:
        # Against float64: at most twice nn.LSTM's fp32 error, plus a few fp32 rounding steps.
        want = run_reference(*float64_problem(ref, x, hx), [u.double() for u in upstream])
        assert_within_twice_the_reference_error(
            list(outs) + list(grads), list(ref_outs) + list(ref_grads),
            list(want[0]) + list(want[1]), FP32_SLACK, names)
        return
    for name, got, want in zip(names, list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def float64_problem(ref, x, hx):
    """ref, x and hx as float64 copies (x and hx leaves of their own)."""
    x64 = x.detach().double().requires_grad_()
    hx64 = None if hx is None else tuple(h.detach().double().requires_grad_() for h in hx)
    return x64, hx64, float64_copy(ref)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("with_state", [True, False], ids=["hx", "no-hx"])
def test_optional_bias_and_state(bias, with_state):
    ref, x, hx = random_problem(5, 2, 3, 10, torch.float64, bias=bias, with_state=with_state)
    outs, grads, upstream = run_function(x, hx, ref, CONFIGS["resident-bh4"])
    ref_outs, ref_grads = run_reference(x, hx, ref, upstream)
    for got, want in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_only_some_outputs_used():
    """Unused outputs get no gradient (None upstream); the rest must still be right."""
    ref, x, hx = random_problem(4, 2, 3, 9, torch.float64)
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    y, h, c, *_ = LSTMFunction.apply(x, hx[0][0], hx[1][0], *params, None, CONFIGS["resident-bh4"])
    gx, = torch.autograd.grad(c.sum(), [x])
    yr, (hr, cr) = ref(x, hx)
    want, = torch.autograd.grad(cr.sum(), [x])
    torch.testing.assert_close(gx, want, **TOL[torch.float64])


def test_runs_without_autograd():
    ref, x, hx = random_problem(3, 2, 4, 8, torch.float32)
    with torch.no_grad():
        y, h, c = lstm_layer(x, hx[0][0], hx[1][0], *ref.parameters())
        yr, (hr, cr) = ref(x, hx)
    assert not y.requires_grad
    torch.testing.assert_close(y, yr, **TOL[torch.float32])
    torch.testing.assert_close(h, hr[0], **TOL[torch.float32])
    torch.testing.assert_close(c, cr[0], **TOL[torch.float32])


@pytest.mark.parametrize("proj", [5, 0], ids=["proj", "no-proj"])
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_projection_and_both_directions_with_lengths(config_name, proj):
    """Reverse direction and per-row lengths, with and without a projection, through every
    tile config."""
    T, B, I, H = 4, 17, 3, 20
    ref = torch.nn.LSTM(I, H, bidirectional=True, proj_size=proj, dtype=torch.float64)
    params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    names = [n for n, _ in ref.named_parameters()]
    fwd = dict(zip(names, params))
    w_ih = torch.cat([fwd["weight_ih_l0"], fwd["weight_ih_l0_reverse"]])
    w_hh = torch.stack([fwd["weight_hh_l0"], fwd["weight_hh_l0_reverse"]])
    b_ih = torch.cat([fwd["bias_ih_l0"], fwd["bias_ih_l0_reverse"]])
    b_hh = torch.cat([fwd["bias_hh_l0"], fwd["bias_hh_l0_reverse"]])
    w_hr = (torch.stack([fwd["weight_hr_l0"], fwd["weight_hr_l0_reverse"]]) if proj
            else None)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, proj or H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, B, H, dtype=torch.float64, requires_grad=True)
    y, h, c, *_ = LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths.to(torch.int32),
                                 CONFIGS[config_name], False, w_hr)
    valid = (torch.arange(T)[:, None] < lengths[None, :]).double()[..., None]
    upstream = [torch.randn_like(y) * valid, torch.randn_like(h), torch.randn_like(c)]
    inputs = [x, h0, c0] + params
    grads = torch.autograd.grad(sum((o * g).sum() for o, g in zip((y, h, c), upstream)), inputs)

    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (hr, cr) = ref(packed, (h0, c0))
    yr, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
    ref_grads = torch.autograd.grad(
        sum((o * g).sum() for o, g in zip((yr, hr, cr), upstream)), [x, h0, c0] + list(ref.parameters()))
    for got, want in zip([y, h, c] + list(grads), [yr, hr, cr] + list(ref_grads)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])


def test_interpreter_runs_one_program_groups_persistently_and_larger_ones_stepped():
    ref, x, hx = random_problem(3, 2, 4, 8, torch.float32)
    before = dict(launch_counts)
    LSTMFunction.apply(x, None, None, *ref.parameters(), None, CONFIGS["resident-bh4"])
    assert launch_counts["stepped"] == before.get("stepped", 0) + 3     # two hidden blocks
    assert launch_counts["persistent"] == before.get("persistent", 0)
    LSTMFunction.apply(x, None, None, *ref.parameters(), None, CONFIGS["resident-bh8-split2"])
    assert launch_counts["persistent"] == before.get("persistent", 0) + 1   # one hidden block
    assert launch_counts["stepped"] == before.get("stepped", 0) + 3


@pytest.mark.parametrize("config_name", ["resident-bh4", "dataflow-bh4", "dataflow-streamed-bh8-bk16"])
def test_nan_and_inf_flow_through_like_nn_lstm(config_name):
    """NaN and inf are values: they propagate as in nn.LSTM and are never taken for the
    dataflow kernels' unwritten mark (an all-ones NaN), not even when h0 holds that mark."""
    ref, x, hx = random_problem(4, 3, 3, 8, torch.float64)
    x = x.detach().clone()
    x[1, 0, 0] = float("nan")
    x[2, 1, 1] = float("inf")
    h0, c0 = (s.detach().clone() for s in hx)
    h0[0, 2].view(torch.int64).fill_(-1)          # the mark itself, as a caller's value
    params = [p.detach() for p in ref.parameters()]
    with torch.no_grad():
        y, h, c, *_ = LSTMFunction.apply(x, h0[0], c0[0], *params, None, CONFIGS[config_name])
        yr, (hr, cr) = ref(x, (h0, c0))
    for got, want in ((y, yr), (h, hr[0]), (c, cr[0])):
        torch.testing.assert_close(got, want, **TOL[torch.float64], equal_nan=True)
        if CONFIGS[config_name].dataflow:   # stores are canonical: the mark never leaks out
            assert not (got.view(torch.int64) == -1).any(), "an output holds the unwritten mark"


@pytest.mark.parametrize("flag, config_name", [("registers", "dataflow-bh4"),
                                               ("ring", "streamed-bh8-bk16")])
def test_gluon_config_runs_its_own_tile_where_its_kernel_cannot(flag, config_name):
    """kernels/forward_registers.py, backward_registers.py and forward_ring.py are Gluon,
    which has no interpreter: here a config that asks for them runs the tl kernels on its
    tile, exactly as the same config without the flag."""
    ref, x, hx = random_problem(5, 3, 4, 8, torch.float32)
    config = CONFIGS[config_name]
    runs = []
    for run_config in (config, dataclasses.replace(config, **{flag: True})):
        before = launch_counts[flag]
        y, h, c, *_ = LSTMFunction.apply(x, hx[0][0], hx[1][0], *ref.parameters(), None,
                                         run_config)
        grads = torch.autograd.grad(y.square().sum() + c.sum(), [x, *ref.parameters()])
        assert launch_counts[flag] == before
        runs.append([y, h, c, *grads])
    for k, (plain, flagged) in enumerate(zip(*runs)):
        assert torch.equal(plain, flagged), k


# -- the registers kernels' own code, their layouts stripped ------------------------------------

class _StrippedShared:
    """A Gluon shared-memory allocation under the interpreter: a program runs alone there, so
    a slot holds what was last stored in it (``permute`` views it transposed, ``slice`` views
    a block of its columns)."""

    def __init__(self, slots=None, key=None, order=None, columns=None):
        self.slots, self.key, self.order = ({} if slots is None else slots), key, order
        self.columns = columns

    def index(self, i):
        key = i.handle.data.reshape(-1)[0] if hasattr(i, "handle") else i
        return _StrippedShared(self.slots, int(key))

    def permute(self, order):
        return _StrippedShared(self.slots, self.key, order)

    def slice(self, start, length, dim=0):
        assert dim == 1 and start % length == 0, "a block of columns, at a multiple of its width"
        return _StrippedShared(self.slots, self.key, self.order, (start // length, length))

    def store(self, value):
        self.slots[self.key] = value

    def load(self, layout):
        value = self.slots[self.key]
        value = value if self.order is None else tl.permute(value, self.order)
        if self.columns is not None:      # block `block` of the [rows, blocks * width] value
            block, width = self.columns
            rows, blocks = value.shape[0], value.shape[1] // width
            value = tl.reshape(value, [rows, blocks, width])
            pick = tl.arange(0, blocks)[None, :, None] == block
            value = tl.sum(tl.where(pick, value, 0.0), 1)
        return value


def interpreted_gluon(module, kernel_name, helpers, namespace_extra=None):
    """A Gluon kernel of ``module``, its own code, run by the Triton interpreter with its
    layouts stripped: the Gluon names it calls bound to tl's (layouts None, layout
    conversions the identity, shared memory a slot per key, barriers nothing: a program
    runs alone there), its MMAs (2-D, or batched 3-D) as exact sums, and its mark checks
    as barrier.py's. ``helpers``: the module's Gluon functions it calls, rebuilt the same
    way; ``namespace_extra``: replacements of others. What this leaves to the GPU tests:
    the layouts themselves, which the compiler checks (test_codegen.py), and the hardware's
    pairing of the MMA operands."""
    def none(*args, **kwargs):
        return None

    class StrippedGluon:
        """gl's names as tl's, looked up when called (the interpreter patches tl for a run)."""
        constexpr = tl.constexpr
        NVMMADistributedLayout = DotOperandLayout = SliceLayout = DistributedLinearLayout = none
        BlockedLayout = SwizzledSharedLayout = none

        @staticmethod
        def arange(start, end, layout=None):
            return tl.arange(tl.constexpr(start), tl.constexpr(end))

        @staticmethod
        def zeros(shape, dtype, layout=None):
            return tl.zeros(shape, dtype)

        @staticmethod
        def convert_layout(x, layout, assert_trivial=False):
            return x

        NVMMASharedLayout = none

        @staticmethod
        def allocate_shared_memory(dtype, shape, layout):
            return _StrippedShared()

        @staticmethod
        def thread_barrier():
            return None

        def __getattr__(self, name):
            return getattr(tl, name)

    def mma_v2(a, b, acc, input_precision=None):
        a, b = a.to(tl.float32), b.to(tl.float32)
        if len(a.shape) == 2:
            return acc + tl.sum(a[:, :, None] * b[None, :, :], 1)
        return acc + tl.sum(a[:, :, :, None] * b[:, None, :, :], 2)

    # The module's own names (the tl functions it calls as they are; barrier.py's mark check
    # too, which helpers rebuilt from forward_registers.py call), then the stripped ones.
    namespace = dict(vars(module), gl=StrippedGluon(), tl=tl, mma_v2=mma_v2, marks=marks,
                     _warps_barrier=StrippedGluon.thread_barrier)

    def rebuilt(fn):
        copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__)
        copy.__annotations__ = dict(fn.__annotations__)      # which parameters are constexpr
        return triton.jit(copy)

    for name in helpers:
        namespace[name] = rebuilt(getattr(module, name).fn)
    namespace.update(namespace_extra or {})
    kernel_fn = getattr(module, kernel_name)
    kernel = rebuilt(kernel_fn.fn)
    # The interpreter re-reads the source, whose annotations say gl.constexpr, a spelling it
    # does not know: its copy of the function gets the annotations themselves.
    kernel.rewrite().__annotations__ = dict(kernel_fn.fn.__annotations__)
    return kernel, namespace


def _never_waits_on(check):
    """A poll check that fails the test where the real one would poll forever: programs run
    one after another here, so a slot unwritten when polled stays so (step 0 asks too, of
    the caller's tensors, and does not wait for the answer)."""
    polls_in_a_row = 0

    def never_waits(*args):
        nonlocal polls_in_a_row
        pending = check(*args)
        polls_in_a_row = polls_in_a_row + 1 if pending else 0
        if polls_in_a_row > 2:
            raise AssertionError("a step polled a slot that no program had written")
        return pending
    return never_waits


def interpreted_registers_kernel():
    """kernels/forward_registers.py's kernel under the interpreter (``interpreted_gluon``), with
    its lane shuffle as what it computes in the layout the kernel asserts (row g's partner
    is row g ^ 4)."""
    from triton_lstm.kernels import forward_registers as fr

    def partner(x):      # row g ^ 4 of each warp's 8: the halves g < 4 and g >= 4 swapped
        warps, n = x.shape[0] // 8, x.shape[1]
        low, high = tl.split(tl.permute(tl.reshape(x, [warps, 2, 4, n]), [0, 2, 3, 1]))
        return tl.reshape(tl.permute(tl.join(high, low), [0, 3, 1, 2]), [8 * warps, n])

    kernel, namespace = interpreted_gluon(
        fr, "lstm_forward_registers_kernel",
        ("_rows_apart", "_step_inputs", "_lengths", "_load_h", "_merged_marks",
         "_any_unwritten", "_program_block", "_direction_parts"),
        dict(_partner=triton.jit(partner), _pause=triton.jit(lambda like, NS: None)))
    namespace["_any_unwritten"] = _never_waits_on(namespace["_any_unwritten"])
    return kernel


@pytest.mark.parametrize("T, B, H, dtype, warps", [
    (6, 11, 4, torch.float32, 1),     # steps: one unit block a group (programs run one by one)
    (6, 11, 3, torch.float16, 1),     # a unit block with a unit missing
    (1, 11, 50, torch.float32, 1),    # one step: 13 unit blocks, 4 chunks of the reduction
    (1, 3, 20, torch.float16, 1),
    (6, 11, 7, torch.float32, 2),     # programs of several warps (the exchange's), steps
    (1, 11, 20, torch.float16, 2),    # 3 unit blocks of 8, the last with 4 units missing
    (1, 3, 50, torch.float32, 4),
])
def test_registers_kernel_code_matches_float64(T, B, H, dtype, warps):
    """The registers forward's index math, masks, gate order, lengths, both directions, initial
    state, saved gates and polls, in its own code (interpreted_registers_kernel), with programs
    of one warp and of several; its gates and c against the tl kernel's, which the tests above
    hold to float64."""
    from triton_lstm.kernels import forward_registers
    kernel = interpreted_registers_kernel()
    D = 2
    gx = torch.randn(T, B, D * 4 * H).to(dtype)
    w_hh = (torch.randn(D, 4 * H, H) / H ** 0.5).to(dtype)
    h0, c0 = torch.randn(D, B, H).to(dtype), torch.randn(D, B, H).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    outputs, args, grid, constexprs = forward_registers.launch_arguments(
        gx, w_hh, h0, c0, lengths, save=True, reverse=True, warps=warps)
    y, h_n, c_n, gates, c_all = outputs          # y: filled with the unwritten mark
    for out in (h_n, c_n, gates, c_all):
        out.fill_(float("nan"))                  # poisoned: what is compared must be written
    kernel[grid](*args, **constexprs)
    want = lstm_layer_reference(gx.double(), h0.double(), c0.double(),
                                torch.eye(D * 4 * H, dtype=torch.float64), w_hh.double(),
                                lengths=lengths)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-3)
    for name, got, ref in zip(("y", "h_n", "c_n"), (y, h_n, c_n), want):
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")
    tl_gates, tl_c_all = lstm_forward(gx, w_hh, h0, c0, lengths, save=True,
                                      config=CONFIGS["resident-bh4"])[3:5]
    torch.testing.assert_close(gates, tl_gates, rtol=0, atol=1e-5)
    torch.testing.assert_close(c_all, tl_c_all, rtol=0, atol=1e-5)


def test_registers_kernel_code_ends_on_nan_input_and_on_the_mark_in_h0():
    """A NaN in the input is a value, never the unwritten mark: the polls end and the NaN
    flows as in the tl kernel (held to nn.LSTM's NaNs above); h0 holding the mark's bits is
    the caller's value, read once."""
    from triton_lstm.kernels import forward_registers
    kernel = interpreted_registers_kernel()
    T, B, H, D = 5, 3, 4, 1
    gx = torch.randn(T, B, 4 * H).half()
    gx[1, 0, 0] = float("nan")
    w_hh = (torch.randn(D, 4 * H, H) / H ** 0.5).half()
    h0, c0 = torch.randn(D, B, H).half(), torch.randn(D, B, H).half()
    h0[0, 2, 1:2].view(torch.int16).fill_(-1)
    outputs, args, grid, constexprs = forward_registers.launch_arguments(
        gx, w_hh, h0, c0, None, save=False, reverse=True)
    kernel[grid](*args, **constexprs)
    y, h_n, c_n = outputs[:3]
    # (Not float64 through an identity W_ih: NaN * 0 would spread the NaN over the row.)
    want = lstm_forward(gx, w_hh, h0, c0, None, save=False, config=CONFIGS["dataflow-bh4"])
    for got, ref in zip((y, h_n, c_n), want):
        assert torch.equal(got.isnan(), ref.isnan())
        assert got.isnan().any()
        torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), rtol=0, atol=3e-3)
    assert not (y.view(torch.int16) == -1).any(), "an output holds the unwritten mark"

class _ClusterMemory:
    """The shared memory of a cluster's programs as the exchange's pushes write it, element by
    element (dsmem.send_to: each valid element's 32 bits to its address in program `rank`;
    dsmem.send_pair_to: two words, the second 4 bytes on), and the loads of one program from
    it (forward_registers._shared_load: each element from its own address, as a pack's
    consecutive elements are)."""

    def __init__(self, item):
        self.item, self.words, self.reader = item, {}, 0
        self.pushes = 0       # st.async instructions, a lane's each

    def _write(self, addr, bits, rank, valid, align):
        """Each valid element's word at its address in program `rank`; how many were valid."""
        import numpy as np
        where = [a.handle.data for a in (addr, bits, rank, valid)]
        written = 0
        for a, b, r, v in zip(*(x.reshape(-1) for x in np.broadcast_arrays(*where))):
            if v:
                assert (int(r), int(a)) not in self.words, "an element pushed twice"
                assert int(a) % align == 0, "a push's words are aligned to its size"
                self.words[int(r), int(a)] = int(b) & 0xFFFFFFFF
                written += 1
        return written

    def send_to(self, addr, bits, mbar, rank, valid):
        self.pushes += self._write(addr, bits, rank, valid, 4)

    def send_pair_to(self, addr, lo, hi, mbar, rank, valid):
        self.pushes += self._write(addr, lo, rank, valid, 8)
        self._write(addr + 4, hi, rank, valid, 4)

    def shared_load(self, addr, y, K_WIDTH):
        import numpy as np
        from triton.runtime.interpreter import TensorHandle
        dtype = y.dtype.element_ty
        a = addr.handle.data
        out = np.zeros(a.shape, np.uint32)
        for i, element in enumerate(a.reshape(-1)):
            word = self.words[self.reader, int(element) // 4 * 4]   # unwritten: KeyError
            shift = 8 * (int(element) % 4)
            out.reshape(-1)[i] = (word >> shift) & (0xFFFFFFFF >> (32 - 8 * self.item))
        bits = out.astype({2: np.uint16, 4: np.uint32}[self.item]).view(
            {2: np.float16 if dtype == tl.float16 else np.uint16, 4: np.float32}[self.item])
        return tl.core.tensor(TensorHandle(bits, dtype), tl.block_type(dtype, list(a.shape)))


@pytest.mark.parametrize("H, dtype, warps, push_bytes", [
    (64, torch.float16, 1, 4), (256, torch.bfloat16, 4, 4), (250, torch.float16, 4, 4),
    (30, torch.float32, 1, 4), (64, torch.float32, 2, 4), (128, torch.bfloat16, 2, 4),
    (100, torch.float16, 2, 4),   # 13 programs of units and 3 without: a cluster of 16
    (256, torch.float16, 4, 8),   # fours of units in 8 bytes, to a quarter of the cluster
    (100, torch.bfloat16, 2, 8),
    (30, torch.float16, 1, 8)])   # 8 programs: quarters of 2
def test_registers_forward_exchange_lands_h_where_its_loads_read_it(H, dtype, warps,
                                                                   push_bytes, monkeypatch):
    """kernels/forward_registers.py's exchange, its own code (_push, _receive_h) under the
    interpreter: every program of a cluster pushes its units of h for 8 rows (16-bit h as
    pairs of units after the shuffle with the unit beside, each half of a warp to half the
    cluster, or as fours of units after a second shuffle, each quarter to a quarter; fp32
    element by element), and every program then reads h^T back as the MMA's operand tiles:
    each 32 bits of the phase pushed once to each program, as many st.async as the launch
    counts on, a phase's bytes what the mbarrier is armed for, and the tiles h^T exactly
    (zeros past H)."""
    from triton_lstm.kernels import forward_registers as fr
    monkeypatch.setattr(fr, "PUSH_BYTES", push_bytes)
    memory = _ClusterMemory(dtype.itemsize)

    def beside(x):     # lane ^ 4: unit 2u's and 2u + 1's tiles swapped (row g ^ 1)
        units, n = x.shape[0], x.shape[1]
        even, odd = tl.split(tl.permute(tl.reshape(x, [units // 2, 2, n]), [0, 2, 1]))
        return tl.reshape(tl.permute(tl.join(odd, even), [0, 2, 1]), [units, n])

    def two_apart(x):  # lane ^ 8: units 2u, 2u + 1 and the two on swapped (row g ^ 2)
        units, n = x.shape[0], x.shape[1]
        low, high = tl.split(tl.permute(tl.reshape(x, [units // 4, 2, 2, n]), [0, 2, 3, 1]))
        return tl.reshape(tl.permute(tl.join(high, low), [0, 3, 1, 2]), [units, n])

    _, namespace = interpreted_gluon(
        fr, "lstm_forward_registers_kernel", ("_row_pairs", "_pair_bits", "_push",
                                              "_receive_h"),
        dict(send_to=memory.send_to, send_pair_to=memory.send_pair_to,
             _shared_load=memory.shared_load, _unit_beside=triton.jit(beside),
             _units_apart_2=triton.jit(two_apart)))

    @triton.jit
    def push(h, y, i_h, HP: tl.constexpr, WARPS: tl.constexpr, GROUP: tl.constexpr,
             SLOT: tl.constexpr, ROW_BYTES: tl.constexpr, PUSH_BYTES: tl.constexpr,
             PUSH: tl.constexpr):
        # the kernel's gate tiles of program i_h (gates_layout; rows g >= 4 of a warp's 8:
        # the other half of the warp, which holds the same h), h of its units
        o_g = tl.arange(0, 8 * WARPS)
        first = ((o_g % 8) // 4 == 0)[:, None]
        o_u = i_h * 4 * WARPS + 4 * (o_g // 8) + o_g % 4
        o_n = tl.arange(0, 8)
        b_h = tl.load(h + o_n[None, :] * HP + o_u[:, None]).to(tl.float32)
        PUSH(b_h, o_u, o_n, first, 0, SLOT, 1, ROW_BYTES, GROUP, PUSH_BYTES, y)

    @triton.jit
    def receive(out, y, HP: tl.constexpr, KC: tl.constexpr, CHUNKS: tl.constexpr,
                K_WIDTH: tl.constexpr, SLOT: tl.constexpr, ROW_BYTES: tl.constexpr,
                EXCHANGE_SLOT: tl.constexpr, RECEIVE: tl.constexpr):
        o_k, o_nk = tl.arange(0, KC), tl.arange(0, 8)
        slot, _, _ = EXCHANGE_SLOT(0, SLOT, 1)
        tiles = RECEIVE(slot, o_k, o_nk, ROW_BYTES, KC, CHUNKS, K_WIDTH, y)
        for chunk in tl.static_range(CHUNKS):
            tl.store(out + o_nk[None, :] * HP + chunk * KC + o_k[:, None], tiles[chunk])

    warps_before, fr.EXCHANGE_WARPS = fr.EXCHANGE_WARPS, warps
    try:
        assert fr.exchange_shape(H)[0] == warps
        group = fr.exchange_shape(H)[1]
    finally:
        fr.EXCHANGE_WARPS = warps_before
    constexprs = fr.kernel_constants(H, 1, dtype, "ieee", has_h0=False, has_lengths=False,
                                     save=False, reverse=False, warps=warps, exchange=True)
    hp, kc = constexprs["HP"], constexprs["HP"] // constexprs["CHUNKS"]
    row_bytes = hp * dtype.itemsize + fr.ROW_PAD_BYTES
    slot = fr.ROWS * row_bytes
    assert 2 * slot + 16 == fr.exchange_bytes(H, dtype)
    h = torch.zeros(fr.ROWS, hp, dtype=dtype)
    h[:, :H] = torch.randn(fr.ROWS, H).to(dtype)
    y = torch.empty(1, dtype=dtype)
    assert constexprs["PUSH_BYTES"] == push_bytes
    for i_h in range(group):
        push[(1,)](h, y, i_h, hp, warps, group, slot, row_bytes, push_bytes, namespace["_push"])
    # a lane's st.async in an exchange: the launch counts two (h0's, then a step's); a
    # lane holds one element of a [8 warps, 4] tile, both halves of a warp pushing
    assert memory.pushes == group * 32 * warps * fr.exchange_pushes(group, dtype) // 2
    # each program's phase: every unit any program has (4 * warps * group) for 8 rows
    sent = fr.ROWS * 4 * warps * group * dtype.itemsize
    for rank in range(group):
        assert 4 * sum(r == rank for r, _ in memory.words) == sent, rank
    for rank in range(group):
        memory.reader = rank
        out = torch.full((fr.ROWS, hp), float("nan"), dtype=dtype)    # poisoned
        # units no program has stay as the kernel zeroes them first (_zero_shared)
        for k in range(4 * warps * group, hp):
            for n in range(fr.ROWS):
                memory.words.setdefault((rank, slot + (n * row_bytes + k * dtype.itemsize)
                                         // 4 * 4), 0)
        receive[(1,)](out, y, hp, kc, constexprs["CHUNKS"], constexprs["K_WIDTH"], slot,
                      row_bytes, fr.exchange_slot, namespace["_receive_h"])
        assert torch.equal(out, h), rank


@pytest.mark.parametrize("H, dtype, unit_warps, push_bytes", [
    (64, torch.float16, 1, 4), (256, torch.bfloat16, 1, 4), (100, torch.float16, 1, 4),
    (48, torch.float32, 1, 4),
    (200, torch.bfloat16, 1, 4),     # 13 programs of 16 units and 3 without: a cluster of 16
    (512, torch.bfloat16, 2, 4),     # 16 programs of 32 units
    (300, torch.float16, 2, 4),      # 10 programs of 32 units, the last with 12, and 6 without
    (256, torch.float16, 2, 4),      # 8 programs of 32 units (the knob)
    (512, torch.float16, 2, 8),      # fours of units in 8 bytes (the knob)
    (100, torch.bfloat16, 1, 8)])
def test_registers_backward_exchange_lands_dg_where_its_loads_read_it(H, dtype, unit_warps,
                                                                      push_bytes, monkeypatch):
    """kernels/backward_registers.py's exchange, its own code (_push_dg, _receive_dg) under the
    interpreter: every program of a cluster pushes dG of its 16 or 32 units for 8 rows
    (16-bit dG as pairs of units after the shuffle with the lane beside, the lane of unit 2u
    sending gates i and f, that of 2u + 1 gates g and o, or as fours of units after a second
    shuffle with the lane two on; fp32 gate by gate), and every program then reads each
    gate's dG^T back as the MMA's operand tiles, chunk by chunk: each 32 bits of the phase
    pushed once to each program, as many st.async as the launch counts on, a phase's bytes
    what the mbarrier is armed for, and the tiles dG^T exactly (zeros past H)."""
    from triton_lstm.kernels import backward_registers as br
    monkeypatch.setattr(br, "PUSH_BYTES", push_bytes)
    memory = _ClusterMemory(dtype.itemsize)

    def beside(x):     # lane ^ 1: unit 2u's and 2u + 1's values swapped
        rows, units = x.shape[0], x.shape[1]
        even, odd = tl.split(tl.reshape(x, [rows, units // 2, 2]))
        return tl.reshape(tl.join(odd, even), [rows, units])

    def two_apart(x):  # lane ^ 2: units 4v, 4v + 1 and 4v + 2, 4v + 3 swapped
        rows, units = x.shape[0], x.shape[1]
        low, high = tl.split(tl.permute(tl.reshape(x, [rows, units // 4, 2, 2]), [0, 1, 3, 2]))
        return tl.reshape(tl.permute(tl.join(high, low), [0, 1, 3, 2]), [rows, units])

    _, namespace = interpreted_gluon(
        br, "lstm_backward_registers_kernel", ("_pair_bits", "_push_dg", "_receive_dg"),
        dict(send_to=memory.send_to, send_pair_to=memory.send_pair_to,
             _shared_load=memory.shared_load, _lane_beside=triton.jit(beside),
             _lanes_apart_2=triton.jit(two_apart)))

    @triton.jit
    def push(dg, out, i_h, HP: tl.constexpr, UNITS: tl.constexpr, GROUP: tl.constexpr,
             SLOT: tl.constexpr, ROW_BYTES: tl.constexpr, PUSH_BYTES: tl.constexpr,
             PUSH: tl.constexpr):
        # the cell tiles of program i_h: its units of 8 rows, a gate each
        rows = tl.arange(0, 8)
        o_u = i_h * UNITS + tl.arange(0, UNITS)
        p = dg + rows[:, None] * (4 * HP) + o_u[None, :]
        PUSH(tl.load(p).to(tl.float32), tl.load(p + HP).to(tl.float32),
             tl.load(p + 2 * HP).to(tl.float32), tl.load(p + 3 * HP).to(tl.float32), o_u, rows,
             0, SLOT, 1, ROW_BYTES, HP, GROUP, PUSH_BYTES, out)

    @triton.jit
    def receive(out, HP: tl.constexpr, KC: tl.constexpr, CHUNKS: tl.constexpr,
                K_WIDTH: tl.constexpr, SLOT: tl.constexpr, ROW_BYTES: tl.constexpr,
                EXCHANGE_SLOT: tl.constexpr, RECEIVE: tl.constexpr):
        o_part, o_k, rows = tl.arange(0, 4), tl.arange(0, KC), tl.arange(0, 8)
        slot, _, _ = EXCHANGE_SLOT(0, SLOT, 1)
        tiles = RECEIVE(slot, rows, o_part, o_k, ROW_BYTES, HP, KC, CHUNKS, K_WIDTH, out)
        for chunk in tl.static_range(CHUNKS):
            tl.store(out + rows[None, None, :] * (4 * HP) + (o_part * HP)[:, None, None]
                     + (chunk * KC + o_k)[None, :, None], tiles[chunk])

    knob_before, br.EXCHANGE_UNIT_WARPS = br.EXCHANGE_UNIT_WARPS, unit_warps
    try:
        group = br.exchange_programs(H, dtype)
        constexprs = br.kernel_constants(H, 1, dtype, "ieee", has_dy=False, has_dhn=False,
                                         has_h0=False, has_lengths=False, reverse=False,
                                         exchange=True)
    finally:
        br.EXCHANGE_UNIT_WARPS = knob_before
    units = constexprs["UNITS"]
    assert units == 16 * unit_warps and constexprs["UNIT_WARPS"] == unit_warps
    if unit_warps == br.exchange_unit_warps(H):      # what the layer's size takes unasked
        assert br.kernel_constants(H, 1, dtype, "ieee", has_dy=False, has_dhn=False,
                                   has_h0=False, has_lengths=False, reverse=False,
                                   exchange=True) == constexprs
    hp, kc = constexprs["HP"], constexprs["HP"] // constexprs["CHUNKS"]
    row_bytes = 4 * hp * dtype.itemsize + br.ROW_PAD_BYTES
    slot = br.ROWS * row_bytes
    assert 2 * slot + 16 == br.exchange_bytes(H, dtype)
    dg = torch.zeros(br.ROWS, 4, hp, dtype=dtype)
    dg[:, :, :H] = torch.randn(br.ROWS, 4, H).to(dtype)
    dg = dg.reshape(br.ROWS, 4 * hp)
    assert constexprs["PUSH_BYTES"] == push_bytes
    for i_h in range(group):
        push[(1,)](dg, torch.empty(1, dtype=dtype), i_h, hp, units, group, slot, row_bytes,
                   push_bytes, namespace["_push_dg"])
    # a lane's st.async in an exchange: the launch counts two exchanges (zeros, then a stage)
    assert memory.pushes == group * br.ROWS * units * br.exchange_pushes(group, dtype) // 2
    sent = br.ROWS * units * group * 4 * dtype.itemsize     # each program's phase
    for rank in range(group):
        assert 4 * sum(r == rank for r, _ in memory.words) == sent, rank
    for rank in range(group):
        memory.reader = rank
        for k in range(units * group, hp):        # units no program has: zeroed first
            for gate in range(4):
                for n in range(br.ROWS):
                    memory.words.setdefault(
                        (rank, slot + (n * row_bytes + (gate * hp + k) * dtype.itemsize)
                         // 4 * 4), 0)
        out = torch.full((br.ROWS, 4 * hp), float("nan"), dtype=dtype)    # poisoned
        receive[(1,)](out, hp, kc, constexprs["CHUNKS"], constexprs["K_WIDTH"], slot,
                      row_bytes, br.exchange_slot, namespace["_receive_dg"])
        assert torch.equal(out, dg), rank


def interpreted_ring_kernel():
    """kernels/forward_ring.py's kernel under the interpreter (``interpreted_gluon``): a copy
    into the ring a load stored in its slot, the wgmma an exact sum, the waits and fences
    nothing (a program runs alone)."""
    from triton_lstm.kernels import forward_ring as fr

    def copy_async(smem, pointer, mask=None, cache_modifier=""):
        smem.store(tl.load(pointer, mask=mask, other=0.0))

    class StrippedCopies:
        commit_group = wait_group = staticmethod(lambda *args: None)

    def warpgroup_mma(a, b, acc, is_async=False):
        a, b = a.load(None).to(tl.float32), b.load(None).to(tl.float32)
        return acc + tl.sum(a[:, :, None] * b[None, :, :], 1)

    kernel, _ = interpreted_gluon(
        fr, "lstm_forward_ring_kernel",
        ("_copy_chunk", "_recurrent_product", "_gates_apart", "_lengths", "_program_block",
         "_direction_parts"),
        dict(async_copy=StrippedCopies(), _copy_async=copy_async, warpgroup_mma=warpgroup_mma,
             warpgroup_mma_wait=lambda n, deps: deps[0], fence_async_shared=lambda: None))
    return kernel


@pytest.mark.parametrize("T, B, H, block_h, block_k, stages, dtype", [
    (6, 70, 16, 16, 16, 3, torch.float16),   # steps: one unit block a group, one chunk
    (5, 70, 30, 32, 16, 5, torch.bfloat16),  # 2 units missing, ring deeper than the chunks
    (1, 70, 100, 16, 64, 3, torch.float16),  # one step: 7 unit blocks, 2 chunks, 2 batch blocks
    (1, 130, 120, 16, 32, 4, torch.bfloat16),  # 4 chunks through a ring of 4, 3 batch blocks
])
def test_ring_kernel_code_matches_float64(T, B, H, block_h, block_k, stages, dtype):
    """The ring forward's index math, masks, gate order, ring slots, lengths, both directions,
    initial state and saved gates, in its own code (interpreted_ring_kernel); its gates and c
    against the tl kernel's, which the tests above hold to float64. (Chunks of under 64 and
    steps of one group: the interpreter runs programs one after another, and strips the
    layouts that tie a GPU's chunks to 64.)"""
    from triton_lstm.kernels import forward_ring
    kernel = interpreted_ring_kernel()
    D = 2
    gx = torch.randn(T, B, D * 4 * H).to(dtype)
    w_hh = (torch.randn(D, 4 * H, H) / H ** 0.5).to(dtype)
    h0, c0 = torch.randn(D, B, H).to(dtype), torch.randn(D, B, H).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    config = KernelConfig(block_b=64, block_h=block_h, resident=False, num_warps=8,
                          inner_stages=stages, ring=True)
    outputs, args, grid, constexprs = forward_ring.launch_arguments(
        gx, w_hh, h0, c0, lengths, config, save=True, reverse=True)
    for out in outputs:
        out.fill_(float("nan"))           # poisoned: every element read must be written
    kernel[grid](*args, **dict(constexprs, BLOCK_K=block_k))
    y, h_n, c_n, gates, c_all = outputs
    want = lstm_layer_reference(gx.double(), h0.double(), c0.double(),
                                torch.eye(D * 4 * H, dtype=torch.float64), w_hh.double(),
                                lengths=lengths)
    # An h a step rounds to the input dtype: one ulp of it apart, and the kernels part.
    tol = dict(rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 3e-3)
    for name, got, ref in zip(("y", "h_n", "c_n"), (y, h_n, c_n), want):
        torch.testing.assert_close(got.double(), ref, **tol, msg=lambda m, n=name: f"{n}: {m}")
    tl_gates, tl_c_all = lstm_forward(gx, w_hh, h0, c0, lengths, save=True,
                                      config=CONFIGS["resident-bh4"])[3:5]
    torch.testing.assert_close(gates, tl_gates, **tol)
    torch.testing.assert_close(c_all, tl_c_all, **tol)
    # Each row's first step in each direction starts from h0 in both: there they agree to
    # fp32's rounding.
    rows = torch.arange(B)
    for d, first in enumerate((torch.zeros(B, dtype=torch.long), lengths.long() - 1)):
        torch.testing.assert_close(gates[d, first, rows], tl_gates[d, first, rows], rtol=0,
                                   atol=1e-5)
        torch.testing.assert_close(c_all[d, first, rows], tl_c_all[d, first, rows], rtol=0,
                                   atol=1e-5)


def interpreted_backward_registers_kernel():
    """kernels/backward_registers.py's kernel under the interpreter (``interpreted_gluon``)."""
    from triton_lstm.kernels import backward_registers as br
    kernel, namespace = interpreted_gluon(
        br, "lstm_backward_registers_kernel",
        ("_load_dg", "_merged_marks", "_any_unwritten", "_lengths", "_program_block",
         "_load_dy"),
        dict(_pause=triton.jit(lambda like, NS: None)))
    namespace["_any_unwritten"] = _never_waits_on(namespace["_any_unwritten"])
    return kernel


def _backward_problem(T, B, H, dtype, D=2):
    """Random inputs of one layer's backward, both directions, packed lengths and an initial
    state: the forward's saved gates from the tl kernel, then what lstm_backward takes."""
    gx = torch.randn(T, B, D * 4 * H).to(dtype)
    w_hh = (torch.randn(D, 4 * H, H) / H ** 0.5).to(dtype)
    h0, c0 = torch.randn(D, B, H).to(dtype), torch.randn(D, B, H).to(dtype)
    lengths = torch.randint(1, T + 1, (B,), dtype=torch.int32)
    gates, c_all = lstm_forward(gx, w_hh, h0, c0, lengths, save=True,
                                config=CONFIGS["resident-bh4"])[3:5]
    dy = torch.randn(T, B, D * H).to(dtype)
    dh_n, dc_n = torch.randn(D, B, H).to(dtype), torch.randn(D, B, H).to(dtype)
    return dict(dy=dy, dh_n=dh_n, dc_n=dc_n, gates=gates, c_all=c_all, c0=c0, lengths=lengths,
                w_hh=w_hh), (gx, h0)


def _float64_backward(problem, gx, h0):
    """dG, dh0 and dc0 of the layer in float64: autograd through the reference, the input
    projection being the identity (so the gradient of gx is dG)."""
    D = problem["w_hh"].shape[0]
    G = gx.shape[2]
    leaves = [t.double().requires_grad_() for t in (gx, h0, problem["c0"])]
    y, h_n, c_n = lstm_layer_reference(leaves[0], leaves[1], leaves[2],
                                       torch.eye(G, dtype=torch.float64),
                                       problem["w_hh"].double(), lengths=problem["lengths"])
    loss = ((y * problem["dy"].double()).sum() + (h_n * problem["dh_n"].double()).sum()
            + (c_n * problem["dc_n"].double()).sum())
    assert D == h_n.shape[0]
    return torch.autograd.grad(loss, leaves)


# Warps a gate: one; two with half of its reduction each (past H = 512); two side by side
# with 16 units each (the programs of 32 units that push dG at H = 512).
WARPS_A_GATE = pytest.mark.parametrize("splits, unit_warps", [(1, 1), (2, 1), (1, 2)],
                                       ids=["warp-a-gate", "two-warps-a-gate",
                                            "two-warps-side-by-side"])


@WARPS_A_GATE
@pytest.mark.parametrize("T, B, H, dtype", [
    (6, 11, 16, torch.float32),    # steps: one unit block a group (programs run one by one)
    (5, 11, 13, torch.float16),    # a unit block with units missing
    (4, 3, 7, torch.float32),
])
def test_registers_backward_code_matches_float64(T, B, H, dtype, splits, unit_warps):
    """The registers backward's index math, masks, gate order, lengths, both directions, its
    state's gradients and polls, in its own code (interpreted_backward_registers_kernel):
    within twice the tl backward's error against float64, from the same saved gates. With
    two warps a gate (a layer past H = 512) each takes half of the gate's reduction; with
    two side by side (H = 512 pushing dG) a program has 32 units."""
    from triton_lstm.kernels import backward_registers
    from triton_lstm.kernels.backward import lstm_backward
    kernel = interpreted_backward_registers_kernel()
    problem, (gx, h0) = _backward_problem(T, B, H, dtype)
    outputs, args, grid, constexprs = backward_registers.launch_arguments(
        **problem, reverse=True, splits=splits, unit_warps=unit_warps)
    assert constexprs["UNITS"] == 16 * unit_warps
    kernel[grid](*args, **constexprs)
    tl_outputs = lstm_backward(**problem, config=CONFIGS["resident-bh4"])[:3]
    want = _float64_backward(problem, gx, h0)
    for name, got, tl_got, ref in zip(("dG", "dh0", "dc0"), outputs, tl_outputs, want):
        assert got.dtype == tl_got.dtype, name
        error = (got.double() - ref).abs().max().item()
        tl_error = (tl_got.double() - ref).abs().max().item()
        assert error <= 2 * tl_error + 1e-6, (name, error, tl_error)


@WARPS_A_GATE
@pytest.mark.parametrize("T, B, H, dtype", [
    (3, 3, 40, torch.float32),     # 3 unit blocks, the last with 8 of its 16 units (32: 2, 8)
    (2, 9, 33, torch.float16),     # 2 batch blocks, 3 unit blocks (32 units: 2)
])
def test_registers_backward_code_with_many_unit_blocks(T, B, H, dtype, splits, unit_warps):
    """Programs of several unit blocks read each other's dG, which under the interpreter (one
    program after another) no program has written yet: dG starts as the tl backward's
    instead of the mark, so every read finds it written. Each program's own reads and
    writes of the whole dG and its state's gradients, against the tl backward's."""
    from triton_lstm.kernels import backward_registers
    from triton_lstm.kernels.backward import lstm_backward
    kernel = interpreted_backward_registers_kernel()
    problem, _ = _backward_problem(T, B, H, dtype)
    tl_outputs = lstm_backward(**problem, config=CONFIGS["resident-bh4"])[:3]
    outputs, args, grid, constexprs = backward_registers.launch_arguments(
        **problem, reverse=True, splits=splits, unit_warps=unit_warps)
    assert constexprs["NUM_H_BLOCKS"] >= 2
    outputs[0].copy_(tl_outputs[0])
    kernel[grid](*args, **constexprs)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for name, got, want in zip(("dG", "dh0", "dc0"), outputs, tl_outputs):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_registers_backward_code_ends_on_nan_input():
    """A NaN in the upstream gradient is a value, never the unwritten mark: the polls end and
    the NaNs land where the tl backward with dataflow waits puts them."""
    from triton_lstm.kernels import backward_registers
    from triton_lstm.kernels.backward import lstm_backward
    kernel = interpreted_backward_registers_kernel()
    problem, _ = _backward_problem(5, 3, 12, torch.float16, D=1)
    problem["lengths"][1] = 5           # (the saved gates past its old length are zeros)
    problem["dy"][2, 1, 3] = float("nan")
    outputs, args, grid, constexprs = backward_registers.launch_arguments(**problem, reverse=True)
    kernel[grid](*args, **constexprs)
    want = lstm_backward(**problem, config=CONFIGS["dataflow-bh4"])[:3]
    for got, ref in zip(outputs, want):
        assert torch.equal(got.isnan(), ref.isnan())
        assert got.isnan().any()
        torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), rtol=1e-3, atol=1e-3)
    assert not (outputs[0].view(torch.int16) == -1).any(), "dG holds the unwritten mark"


def test_pair_mark_check_flags_exactly_the_pairs_holding_the_mark():
    """barrier.marks checks two 16-bit elements at once on a GPU, from the 32 bits that hold
    both: (0xFFFEFFFE - w) & w & 0x80008000 is nonzero iff a half is all ones (the mark).
    Every value of each half, against a set of values of the other."""
    halves = torch.arange(1 << 16, dtype=torch.int64)
    others = torch.tensor([0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF, 0x1234, 0xFF00, 0x00FF],
                          dtype=torch.int64)
    lo = torch.cat([halves.repeat(len(others)), others.repeat_interleave(1 << 16)])
    hi = torch.cat([others.repeat_interleave(1 << 16), halves.repeat(len(others))])
    w = hi << 16 | lo
    flagged = ((0xFFFEFFFE - w) & w & 0x80008000) != 0
    assert torch.equal(flagged, (lo == 0xFFFF) | (hi == 0xFFFF))


# -- bf16 results rounded as a GPU rounds them ----------------------------------------------------

@triton.jit
def _converted(x, y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(y + o, rounded_to(tl.load(x + o), y.dtype.element_ty))


def test_conversion_to_bf16_rounds_to_nearest_even_bit_for_bit():
    """The interpreter's own fp32 -> bf16 conversion drops the low bits; the kernels' is
    torch's (a GPU's): ties to even, overflow to inf, subnormals, inf and NaN."""
    ties = (torch.randint(0, 2 ** 16, (2048,), dtype=torch.int32) << 16 | 0x8000)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3.4e38, -3.4e38, 1e-40,
                            -3e-39, 0.0, -0.0])
    x = torch.cat([torch.randn(2048 - special.numel()) * 10, special, ties.view(torch.float32)])
    got = torch.full_like(x, float("nan"), dtype=torch.bfloat16)
    _converted[(1,)](x, got, x.numel())
    want = x.to(torch.bfloat16)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite].view(torch.int16), want[finite].view(torch.int16))


def test_bf16_kernel_outputs_are_within_half_an_ulp_of_float64():
    """One step each way, from bf16 inputs: each bf16 result the kernels store (h, dG, dh0) is
    the float64 value of the same math rounded once to nearest: within 2**-8 of it (rounding
    toward zero would be off by up to 2**-7), plus fp32's own error."""
    B, H = 4, 32
    gx = torch.randn(1, B, 4 * H).bfloat16()
    w_hh = (torch.randn(1, 4 * H, H) / H ** 0.5).bfloat16()
    h0, c0 = torch.randn(1, B, H).bfloat16(), torch.randn(1, B, H).bfloat16()
    dy, dh_n, dc_n = (torch.randn(1, B, H).bfloat16() for _ in range(3))
    config = config_to_list(CONFIGS["resident-bh4"])
    y, _, _, gates, c_all, *_ = torch.ops.triton_lstm.recurrence_forward(
        gx, w_hh, h0, c0, None, None, True, config, False)
    dG, dh0, *_ = torch.ops.triton_lstm.recurrence_backward(
        dy, dh_n[0], dc_n[0], gates, c_all, c0, None, w_hh, None, config, False)

    a = (gx[0].double() + h0[0].double() @ w_hh[0].double().t()).requires_grad_()
    i, f, g, o = a.chunk(4, dim=1)
    c = torch.sigmoid(f) * c0[0].double() + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    (want_dG,) = torch.autograd.grad([h, c], [a], [dy[0].double() + dh_n[0].double(),
                                                 dc_n[0].double()])
    want_dh0 = dG[0].double() @ w_hh[0].double()   # from the dG the kernel stored
    for got, want in ((y[0], h), (dG[0], want_dG), (dh0[0], want_dh0)):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want.detach(), rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("with_h0", [False, True])
def test_dw_hh_over_y_in_place_equals_the_product_over_each_steps_previous_hidden(directions,
                                                                                  with_h0):
    """Full-length rows: the W_hh gradient GEMMs read y where it is (and h0 in a product of its
    own), not a [T, B, R] copy of h_{t-1}; the sum is the same as over previous_hidden's."""
    from triton_lstm.autograd import gradients_over_dG, previous_hidden
    T, B, I, H, D = 5, 3, 4, 6, directions
    dG = torch.randn(T, B, D * 4 * H, dtype=torch.float64)
    y = torch.randn(T, B, D * H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    w_ih = torch.randn(D, 4 * H, I, dtype=torch.float64)[0]
    h0 = torch.randn(D, B, H, dtype=torch.float64) if with_h0 else None
    needs = (False, False, False, False, True, False, False, False)
    _, _, dw_hh, _ = gradients_over_dG(dG, x, h0, w_ih, None, y, None, None, H, needs)
    for d in range(D):
        prev = previous_hidden(y, h0, None, d, H)           # h_{t-1} of each step, [T, B, H]
        want = torch.einsum("tbg,tbh->gh", dG.unflatten(-1, (D, 4 * H))[:, :, d], prev)
        torch.testing.assert_close(dw_hh[d], want, rtol=1e-12, atol=1e-12)
