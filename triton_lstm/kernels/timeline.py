"""Where a persistent step's time goes, recorded by the kernels themselves on request.

A kernel timed from the host gives one number a step. Whether that is the wait for the
other programs, the read of their state, the dot or the gate math, and how far apart the
programs run, only the kernel can say. Asked to (``STAMPS``; perf/step_timeline.py does),
the forwards and the backward write, for every step (the backward: every stage but the
last) and program, the GPU's global nanosecond clock (``%globaltimer``, one clock for all
SMs) at the events below into a buffer of [T, MAX_PROGRAMS, EVENTS] int64, zeros where an
event has no place in a kernel:

    STEP_BEGINS  the step starts: after the previous step's barrier, or right away where
                 the program waits on the data (dataflow waits, pushed state);
    WAIT_ENDS    what the step reads from the other programs is here (h_{t-1}; in the
                 backward dG_{t+1} or its shares of dh): the registers kernels' polls or the
                 exchange's wait have ended (the tl kernels' dataflow polls are inside their
                 dots: no stamp);
    STORED       the step's own part for the others has been stored (h_t; dG_t), issued: its
                 way to the other SMs follows;
    POLLS        rounds of polling the wait took (a count, not a time);
    SM           the SM the program runs on (%smid, recorded as the step begins).

The stamps are thread 0's (a program's warps may run apart between barriers). A warp issues
in order, and every stamp comes after an instruction that needs the data the event is about
(the branch out of a poll, the store), so no stamp is taken before its event. Without
``STAMPS`` none of this is compiled in.
"""
import torch
import triton
import triton.language as tl

from .barrier import interpreting

STEP_BEGINS, WAIT_ENDS, STORED, POLLS, SM = range(5)   # the events: a stamp's last index
EVENTS = 5
# Programs a launch may record (the stamps of higher ones are dropped): more than the
# small-batch and persistent grids of a layer have.
MAX_PROGRAMS = 1024
# The same as the kernels see them.
_STEP_BEGINS, _WAIT_ENDS, _STORED, _POLLS, _SM = (tl.constexpr(e) for e in range(EVENTS))
_EVENTS = tl.constexpr(EVENTS)
_MAX_PROGRAMS = tl.constexpr(MAX_PROGRAMS)


def stamps_buffer(steps: int, device) -> torch.Tensor:
    """A zeroed buffer for a launch of `steps` steps to record into."""
    return torch.zeros(steps, MAX_PROGRAMS, EVENTS, dtype=torch.int64, device=device)


def check_stamps(caller: str, stamps, steps: int) -> None:
    """A ValueError unless `stamps` is None or a GPU's stamps_buffer of `steps` steps (the
    clock is a GPU's: the interpreter has none)."""
    if stamps is None:
        return
    if (interpreting() or stamps.device.type != "cuda" or stamps.dtype != torch.int64
            or tuple(stamps.shape) != (steps, MAX_PROGRAMS, EVENTS)):
        raise ValueError(f"{caller}: stamps must be a timeline.stamps_buffer({steps}) on a GPU, "
                         f"got {stamps.dtype} {tuple(stamps.shape)} on {stamps.device}"
                         + (" under the interpreter" if interpreting() else ""))


@triton.jit
def now():
    """The GPU's global nanosecond clock (the same on every SM)."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _record(stamps, step, event: tl.constexpr, value):
    """Store thread 0's `value` as this program's `event` of `step` (a program's warps may
    run apart between barriers: the stamps follow its first)."""
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    thread = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r", [], dtype=tl.int32,
                                       is_pure=True, pack=1)
    slot = (step.to(tl.int64) * _MAX_PROGRAMS + program) * _EVENTS + event
    tl.store(stamps + slot, value.to(tl.int64), mask=(program < _MAX_PROGRAMS) & (thread == 0))


@triton.jit
def step_begins(stamps, step):
    _record(stamps, step, _STEP_BEGINS, now())
    _record(stamps, step, _SM, tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [],
                                                         dtype=tl.int32, is_pure=True, pack=1))


@triton.jit
def wait_ends(stamps, step):
    _record(stamps, step, _WAIT_ENDS, now())


@triton.jit
def polls(stamps, step, count):
    _record(stamps, step, _POLLS, count)


@triton.jit
def stored(stamps, step):
    _record(stamps, step, _STORED, now())
