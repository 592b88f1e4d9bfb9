"""A layer in chunks of steps, its GEMMs beside its recurrence: the backward, and the forward.

A layer's recurrence is latency-bound, and the GEMMs around it (x W_ih^T before the
forward; dx, dW_ih, dW_hh over dG after the backward: at bf16 B=128 H=1024 each about a
fifth and a tenth of the step) run alone. Where the recurrence's grid leaves SMs idle (a
64-program tile there leaves 68 of an H200's 132), the GEMMs of one chunk of steps can run
on them while the recurrence of another goes.

The backward: the reverse recurrence runs one chunk of steps at a time, the last chunk
first. As soon as a chunk's dG is written, that chunk's share of the GEMMs goes to a side
stream, beside the next chunk's recurrence; only the first chunk's GEMMs run after the
recurrence. What crosses a chunk boundary is the gradient of the state (dh, dc), as between
recompute.py's segments; dh is in the input dtype there, as the kernel returns it. The
weight and bias gradients are summed over the chunks in the state dtype.

The forward: the input projection of the first chunk runs alone, that of every later chunk
on the side stream beside the recurrence of the chunk before. The chunks are launches of
one forward over whole-sequence outputs (kernels.forward.lstm_forward's step_chunks), each
starting where the last one stopped, so nothing is copied and the results are the one
launch's.

Each runs where ``dispatch.backward_chunks`` (TRITON_LSTM_BACKWARD_CHUNKS) or
``dispatch.forward_chunks`` (TRITON_LSTM_FORWARD_CHUNKS) asks for two or more chunks and
the layer has one direction (a bidirectional layer's recurrence fills twice the programs),
and no compiler or functorch transform is tracing it; the backward also needs every step's
gates saved (recompute has segments of its own). While a CUDA graph is being captured the
chunks run on the current stream alone.
"""
from __future__ import annotations

import contextlib

import torch
from torch._C._functorch import is_legacy_batchedtensor
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from .autograd import gemms_over_dG, previous_hidden
from .dispatch import backward_chunk_count, forward_chunk_count, state_dtype, to_dtype
from .ops import config_to_list, layer_matmul, recurrence_forward_eager
from .reference import row_lengths

_side_streams: dict[int, torch.cuda.Stream] = {}


def backward_chunks_for(directions: int, recompute: int, steps: int, upstream) -> int:
    """How many chunks this layer's backward runs in: 0 for the one-launch backward.
    upstream: the incoming gradients (dy, dh_n, dc_n); batched ones, from gradcheck's
    batched-gradient check (torch's legacy vmap, no functorch interpreter), keep the one
    launch: the chunks write their sums in place."""
    chunks = backward_chunk_count()
    if chunks < 2 or steps < 2 or directions != 1 or recompute or _transformed(upstream):
        return 0
    return min(chunks, steps)


def forward_chunks_for(directions: int, steps: int, inputs) -> int:
    """How many chunks this layer's forward runs in: 0 for the whole projection, then one
    launch. inputs: the layer's tensors (None where absent)."""
    chunks = forward_chunk_count()
    if chunks < 2 or steps < 2 or directions != 1 or _transformed(inputs):
        return 0
    return min(chunks, steps)


def _transformed(tensors) -> bool:
    """Whether a compiler, a functorch transform or torch's legacy vmap sees these tensors."""
    return bool(torch.compiler.is_compiling() or retrieve_all_functorch_interpreters()
                or any(t is not None and is_legacy_batchedtensor(t) for t in tensors))


def chunk_bounds(steps: int, chunks: int) -> list[tuple[int, int]]:
    """[(s0, s1)] of the chunks in time order, as equal as whole steps allow."""
    cuts = [round(k * steps / chunks) for k in range(chunks + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _side_stream(device: torch.device):
    """The stream the chunks' GEMMs run on, or None: on the current one (CPU, capture)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


@contextlib.contextmanager
def _after(side, done, *reads):
    """Run the block on ``side`` once event ``done`` has passed, with ``reads`` (made on the
    current stream) kept from reuse until ``side`` is through with them."""
    if side is None:
        yield
        return
    side.wait_event(done)
    for t in reads:
        if t.numel():
            t.record_stream(side)
    with torch.cuda.stream(side):
        yield


def overlapped_backward(dy, dh_n, dc_n, x, h0, c0, w_ih, w_hh, b_ih, w_hr, lengths, restarts,
                        y, gates, c_all, r_all, needs, config, force_stepped, chunks: int):
    """Gradients of a one-direction layer, chunk by chunk: dx, dh0, dc0, dw_ih, dw_hh, db,
    dw_hr, shaped as ``autograd._layer_backward`` returns them (the direction dim present:
    w_hh [1, 4H, R], h0 / dh_n [1, B, R], c0 / dc_n [1, B, H], r_all [1, T, B, H])."""
    T, B, I = x.shape
    _, four_h, R = w_hh.shape
    H = four_h // 4
    dtype, device = x.dtype, x.device
    acc = state_dtype(dtype)
    need_x, _, _, need_wih, need_whh, need_bih, need_bhh, need_whr = needs
    need_b = b_ih is not None and (need_bih or need_bhh)
    need_whr = w_hr is not None and need_whr
    h_prev = None
    if need_whh:   # one direction: processing order is time order
        h_prev = previous_hidden(y, h0, lengths, 0, R,
                                 None if restarts is None else restarts[0].bool())
    length = row_lengths(lengths, T, B, device)
    config = config_to_list(config)

    # Every result lives on the current stream, allocated before the side stream forks.
    dx = torch.empty(T, B, I, dtype=dtype, device=device) if need_x else None
    dw_ih = x.new_zeros((four_h, I), dtype=acc) if need_wih else None
    dw_hh = x.new_zeros((four_h, R), dtype=acc) if need_whh else None
    db = x.new_zeros(four_h, dtype=acc) if need_b else None
    dw_hr = x.new_zeros((R, H), dtype=acc) if need_whr else None
    dh_restart = x.new_zeros((1, B, R), dtype=acc)
    dc_restart = x.new_zeros((1, B, H), dtype=acc)
    dh_carry = x.new_zeros((1, B, R))     # the state's gradient at the later chunk's start
    dc_carry = x.new_zeros((1, B, H), dtype=acc)
    dh_last = dh_carry if dh_n is None else dh_n
    dc_last = dc_carry if dc_n is None else dc_n.to(acc)
    side = _side_stream(device)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))

    def chunk_gemms(s0, s1, dG, dh_all, done):
        with _after(side, done, dG, dh_all):
            n = s1 - s0
            dx_c, dw_ih_c, dw_hh_c, db_c = gemms_over_dG(
                dG, x[s0:s1], None if h_prev is None else [h_prev[s0:s1]], w_ih,
                b_ih is not None, needs)
            if need_x:
                dx[s0:s1].copy_(dx_c)
            if need_wih:
                dw_ih.add_(dw_ih_c)
            if need_whh:
                dw_hh.add_(dw_hh_c[0])
            if need_b:
                db.add_(db_c)
            if need_whr:
                dw_hr.add_(layer_matmul(dh_all[0].reshape(n * B, R).t(),
                                        r_all[0, s0:s1].reshape(n * B, H)))

    pending = None
    for s0, s1 in reversed(chunk_bounds(T, chunks)):
        n = s1 - s0
        # The state's gradient at the chunk's end: dh_n / dc_n for the rows whose sequence
        # ends in it, else what the later chunk handed back.
        ends_here = ((length > s0) & (length <= s1))[None, :, None]
        dh_end = torch.where(ends_here, dh_last, dh_carry)
        dc_end = torch.where(ends_here, dc_last, dc_carry)
        dG, dh_carry, dc_carry, dh_all, dh_rs, dc_rs = torch.ops.triton_lstm.recurrence_backward(
            None if dy is None else dy[s0:s1], dh_end, dc_end, gates[:, s0:s1],
            c_all[:, s0:s1], c0 if s0 == 0 else c_all[:, s0 - 1],
            None if lengths is None else (length - s0).clamp(0, n).to(torch.int32),
            w_hh, w_hr, config, force_stepped,
            None if restarts is None else restarts[:, s0:s1], c0, True)[:6]
        if restarts is not None:
            dh_restart += dh_rs
            dc_restart += dc_rs
        # This chunk's GEMMs are queued behind the next chunk's recurrence, so that the
        # recurrence is first in line for the SMs.
        done = None if side is None else torch.cuda.current_stream(device).record_event()
        if pending is not None:
            chunk_gemms(*pending)
        pending = (s0, s1, dG, dh_all, done)
    chunk_gemms(*pending)
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)

    dh0 = to_dtype(dh_carry.to(acc) + dh_restart, dtype)
    dc0 = to_dtype(dc_carry + dc_restart, dtype)
    return (dx, dh0, dc0, None if dw_ih is None else to_dtype(dw_ih, dtype),
            None if dw_hh is None else dw_hh.to(dtype)[None],
            None if db is None else to_dtype(db, dtype),
            None if dw_hr is None else dw_hr.to(dtype)[None])


def overlapped_forward(x, w_ih, b_ih, b_hh, w_hh, h0, c0, lengths, w_hr, save, config,
                       force_stepped, restarts, recompute, chunks: int):
    """The forward of a one-direction layer, chunk by chunk: what
    ``ops.recurrence_forward`` returns for the input projection of x (w_hh [1, 4H, R], h0
    [1, B, R] and c0 [1, B, H] or None, w_hr [1, R, H] or None)."""
    T, B, I = x.shape
    G = w_ih.shape[0]
    device = x.device
    current = torch.cuda.current_stream(device) if device.type == "cuda" else None
    # Every tensor lives on the current stream, made before the side stream forks. The
    # current stream waits for each chunk's projection before that chunk's recurrence, so
    # the side stream is through with all of them when this returns.
    gx = x.new_empty(T, B, G)
    rows_of_x, rows_of_gx = x.reshape(T * B, I), gx.view(T * B, G)
    w_t = w_ih.t()
    bias = None if b_ih is None else b_ih + b_hh
    side = _side_stream(device)
    bounds = chunk_bounds(T, chunks)

    def project(s0, s1):
        layer_matmul(rows_of_x[s0 * B:s1 * B], w_t, bias, out=rows_of_gx[s0 * B:s1 * B])

    def chunks_as_ready():
        project(*bounds[0])
        if side is not None:
            side.wait_stream(current)
        ready = None
        for k, (s0, s1) in enumerate(bounds):
            if ready is not None:
                current.wait_event(ready)
            yield s0, s1                # lstm_forward launches this chunk's recurrence
            if k + 1 < len(bounds):
                # Queued behind that launch, so that the recurrence is first in line.
                with contextlib.nullcontext() if side is None else torch.cuda.stream(side):
                    project(*bounds[k + 1])
                ready = None if side is None else side.record_event()

    return recurrence_forward_eager(gx, w_hh, h0, c0, lengths, w_hr, save, config_to_list(config),
                                    force_stepped, restarts, h0, c0, recompute,
                                    step_chunks=chunks_as_ready())
