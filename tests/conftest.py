import os

import pytest
import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so it must be set
# before triton_lstm is imported. Without a GPU the kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton_lstm.dispatch  # noqa: E402

INTERPRETING = triton_lstm.dispatch.interpreting()
requires_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="CPU kernel tests run under TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def pytest_configure(config):
    """Under pytest-xdist (the GPU machines run the GPU tests on every core), each worker
    gets its share of the cores for torch's CPU threads: the float64 references run on the
    CPU, and one process per core each starting a thread per core oversubscribes the
    cores many times over, where OpenMP threads spend their time waiting on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_torch_empty = torch.empty


def _nan_empty(*args, **kwargs):
    """torch.empty, but floating-point tensors come NaN-filled, so unwritten outputs show."""
    out = _torch_empty(*args, **kwargs)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_empty)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different, reported seed per test: fresh random inputs, reproducible on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.fresh_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test's report names its seed (torch.manual_seed(SEED) reproduces its inputs)."""
    report = (yield).get_result()
    if report.failed and hasattr(item, "fresh_seed"):
        report.sections.append(("fresh seed", f"torch.manual_seed({item.fresh_seed})"))


@pytest.fixture
def gemm_calls(monkeypatch):
    """An fp32 layer's GEMMs in kernels/gemm.py for one test (dispatch.fp32_gemms =
    "triton"); the list of the dot precisions the kernel was called with."""
    from triton_lstm import dispatch, ops
    from triton_lstm.kernels.gemm import matmul
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["precision"])
        return matmul(*args, **kwargs)

    monkeypatch.setattr(dispatch, "fp32_gemms", "triton")
    monkeypatch.setattr(ops, "gemm_matmul", counted)
    return calls


@pytest.fixture
def fullgraph_enabled():
    """triton_lstm.enable_fullgraph() for one test, then Dynamo's setting and caches as before."""
    import triton_lstm
    before = torch._dynamo.config.allow_rnn
    triton_lstm.enable_fullgraph()
    yield
    triton_lstm.enable_fullgraph(before)
    torch._dynamo.reset()
