import os

# oneDNN advertises AMX on these VMs but the hypervisor does not enable it: bf16 matmul/SDPA on the CPU
# would die with SIGILL.  This must be set before torch is imported.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
# Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastunet  # noqa: E402


@pytest.fixture(autouse=True)
def _isolate_backend_and_seed():
    """Every test starts on the 'auto' backend with a fixed seed, whatever the previous test did."""
    fastunet.set_backend("auto")
    torch.manual_seed(0)
    yield
    fastunet.set_backend("auto")
