"""Grid-wide barrier for the persistent kernels.

A group of programs (the hidden-unit blocks that share one batch block) meets at
a 32-bit counter. Every arrival adds to it; the group leader adds
``2**31 - (n - 1)`` and the others ``1``, so one complete barrier adds exactly
``2**31``: the top bit flips and the low bits come back to where they were.
A program waits until the top bit differs from the one it saw on arrival.
Nothing is ever reset, so the counter survives across launches and CUDA-graph
replays (sense reversal, as in CUDA cooperative groups).

The barrier only works if every program of the group is resident at once;
``dispatch.py`` checks that before a persistent launch and asks for a
cooperative launch so that an oversized grid is an error, not a hang.
"""
import triton
import triton.language as tl


def leader_increment(num_programs: int) -> int:
    """What the leader adds: 2**31 - (n - 1), as a signed 32-bit integer."""
    value = (1 << 31) - (num_programs - 1)
    return value - (1 << 32) if value >= (1 << 31) else value


@triton.jit
def barrier_arrive(counter, leader_inc, is_leader):
    """Publish this program's stores and count it in; returns what the wait compares against."""
    # Every warp of this program has issued its stores before the release.
    tl.debug_barrier()
    increment = tl.where(is_leader, leader_inc, 1)
    return tl.atomic_add(counter, increment, sem="release", scope="gpu")


@triton.jit
def barrier_wait(counter, arrived):
    """Spin until the whole group has arrived: the top bit differs from the one seen on arrival."""
    now = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    while (arrived ^ now) >= 0:
        now = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def grid_barrier(counter, leader_inc, is_leader):
    barrier_wait(counter, barrier_arrive(counter, leader_inc, is_leader))
