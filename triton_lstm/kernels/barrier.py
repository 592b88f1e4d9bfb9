"""How the programs of a persistent kernel wait for each other: a grid barrier, or the data.

Grid barrier:

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

Cluster barrier (config ``cluster``, sm_90+): a group of 2-16 programs launched as one
thread-block cluster meets at the hardware cluster barrier instead of the counter:
``barrier.cluster.arrive.release`` then ``barrier.cluster.wait.acquire``, every thread
of every program arriving. No atomic round trip through L2 and no spinning: the SMs of a
cluster sit in one GPC and the barrier is kept there. The release orders each thread's
stores (h, dG) before the others' loads after the wait, so no counter is read and no
``bar.sync`` is needed around it. The hardware starts a cluster only when all its
programs fit at once, so a group never waits for a program that is not running.
``dispatch.py`` launches such a group as one cluster (``launch_in_clusters``).

Dataflow (config ``dataflow``): every step writes a slot of its own (y[t], dG[t]),
which the launcher fills with an all-ones bit pattern first: a NaN no arithmetic
produces. A consumer reloads the tile it needs until none of it is that pattern,
so it waits on the data it reads, not on a counter and then a separate read.
Producers store ``canonical(x)``, which turns any NaN into the standard quiet NaN:
a NaN or inf in the data is a value like any other and never reads as "unwritten".
Each element is stored whole, so a tile seen complete is the values written.
"""
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (asked at each call; dispatch
    gives the host code this function)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# The same, as the kernels were imported: the interpreter has no inline assembly.
INTERPRETED = tl.constexpr(interpreting())

_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def fill_unwritten(t: torch.Tensor) -> torch.Tensor:
    """Fill t with all-ones bits, the mark of a dataflow slot not written yet."""
    t.view(_SAME_WIDTH_INT[t.element_size()]).fill_(-1)
    return t


def leader_increment(num_programs: int) -> int:
    """What the leader adds: 2**31 - (n - 1), as a signed 32-bit integer."""
    value = (1 << 31) - (num_programs - 1)
    return value - (1 << 32) if value >= (1 << 31) else value


@triton.jit
def cluster_arrive():
    """Every thread of this program arrives at its cluster's barrier, its stores released."""
    return tl.inline_asm_elementwise("barrier.cluster.arrive.release.aligned; mov.u32 $0, 0;",
                                     "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def cluster_wait():
    """Wait until every thread of every program of the cluster has arrived (acquire)."""
    tl.inline_asm_elementwise("barrier.cluster.wait.acquire.aligned; mov.u32 $0, 0;", "=r", [],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def barrier_arrive(counter, leader_inc, is_leader, CLUSTER: tl.constexpr):
    """Publish this program's stores and count it in; returns what the wait compares against
    (with CLUSTER: every thread arrives at the cluster barrier, and the result is unused)."""
    if CLUSTER:
        return cluster_arrive()
    else:
        # Every warp of this program has issued its stores before the release.
        tl.debug_barrier()
        increment = tl.where(is_leader, leader_inc, 1)
        return tl.atomic_add(counter, increment, sem="release", scope="gpu")


@triton.jit
def barrier_wait(counter, arrived, CLUSTER: tl.constexpr):
    """Wait until the whole group has arrived: the top bit of the counter differs from the one
    seen on arrival, or with CLUSTER the cluster barrier completes."""
    if CLUSTER:
        cluster_wait()
    else:
        now = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while (arrived ^ now) >= 0:
            now = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def unwritten(x):
    """Elements still holding the all-ones fill (bitwise -1 at their width)."""
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True)
    elif x.dtype.primitive_bitwidth == 32:
        bits = x.to(tl.int32, bitcast=True)
    else:
        bits = x.to(tl.int64, bitcast=True)
    return bits == -1


@triton.jit
def either(a, b):
    """a | b: the combiner that merges marks (``tl.reduce``)."""
    return a | b


@triton.jit
def marks(x):
    """Nonzero where x holds the all-ones mark (unwritten), zero elsewhere, as an integer. For
    16-bit x on a GPU, a pair of elements at once from the 32 bits w = hi:lo that hold both:
    (~w - 0x00010001) & w & 0x80008000, i.e. (0xFFFEFFFE - w) & w & 0x80008000, is nonzero iff
    a half is 0xFFFF (a borrow out of a marked low half can flag the high one too: the pair's
    answer stays exact; a thread's odd last element is paired with a padding half whose result
    Triton drops, and no borrow runs down into the real one). Two instructions a pair, where a
    compare of each element takes about five; under the interpreter (no inline assembly)
    element by element."""
    if x.dtype.primitive_bitwidth == 16 and not INTERPRETED:
        m = tl.inline_asm_elementwise(
            "{ .reg .b32 v; sub.u32 v, 0xFFFEFFFE, $1; and.b32 v, v, $1; "
            "and.b32 $0, v, 0x80008000; }", "=r,r", [x], dtype=tl.int16, is_pure=True, pack=2)
    else:
        m = unwritten(x).to(tl.int32)
    return m


@triton.jit
def any_unwritten(x):
    """Whether any element of the tile x still holds the all-ones mark (its marks OR-ed
    together, then one compare)."""
    return tl.reduce(tl.reshape(marks(x), [x.numel]), 0, either) != 0


@triton.jit
def canonical(x):
    """x with every NaN as the standard quiet NaN, never the all-ones fill."""
    return tl.where(x != x, float("nan"), x)


@triton.jit
def published(x, DATAFLOW: tl.constexpr):
    """x as a producer stores it for others to poll: canonical with DATAFLOW, else as it is."""
    if DATAFLOW:
        x = canonical(x)
    return x


@triton.jit
def load_written(ptrs, mask, WAIT: tl.constexpr, poll):
    """A tile other programs write: with WAIT (and poll, for tiles of such a slot rather
    than the caller's own inputs), reloaded until all of it is written."""
    if WAIT:
        # Volatile: each poll reads memory again (L2); masked elements read as 0.
        b = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
        while poll & any_unwritten(b):
            b = tl.load(ptrs, mask=mask, other=0.0, volatile=True)
    else:
        b = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    return b
