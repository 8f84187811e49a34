import os

# oneDNN advertises AMX on these VMs but the hypervisor does not enable it: bf16 matmul/SDPA on the CPU
# would die with SIGILL.  This must be set before torch is imported.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# FASTUNET_TEST_DEVICE=cuda (what `fastunet bench --device cuda` sets for its `pytest tests/ops` run) makes
# tensors created without a device land on the GPU and runs the real compiled kernels there; by default
# the kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.
TEST_DEVICE = os.environ.get("FASTUNET_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"FASTUNET_TEST_DEVICE must be 'cpu' or 'cuda'; got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would run the kernels on the host
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastunet  # noqa: E402

if TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("FASTUNET_TEST_DEVICE=cuda, but torch sees no CUDA GPU")
    torch.set_default_device("cuda")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several pytest-xdist workers (scripts/test.sh runs one per core): one torch thread each, so
    # the workers do not oversubscribe the cores with intra-op threads
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolate_backend_and_seed():
    """Every test starts on the 'auto' backend with a fixed seed, whatever the previous test did."""
    fastunet.set_backend("auto")
    torch.manual_seed(0)
    yield
    fastunet.set_backend("auto")


@pytest.fixture
def fused_nodes(monkeypatch):
    """Every GroupNorm site runs fastunet's own autograd nodes, in eager mode too.

    In eager mode a site under ``normalization.PLAIN_BELOW_ELEMENTS`` elements runs aten's plain ops,
    and the test models are that small throughout; ``torch.compile`` always traces the fused custom
    ops. A test that compares compiled with eager, or that means to exercise the nodes, takes this
    fixture so both sides run the same ops."""
    from fastunet.layers import normalization

    monkeypatch.setattr(normalization, "PLAIN_BELOW_ELEMENTS", 0)
