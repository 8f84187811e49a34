"""Helpers shared by the attention-processor tests (tests/ is on sys.path under pytest)."""

from fastunet.layers.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    TritonAttnProcessor,
    TritonSlicedAttnProcessor,
)

RTOL = 1e-4


def processor_factories(slice_size: int) -> dict:
    """Zero-argument constructors of fastunet's processors by short name; the sliced ones use ``slice_size``."""
    return {
        "plain": AttnProcessor,
        "sdpa": AttnProcessor2_0,
        "sliced": lambda: SlicedAttnProcessor(slice_size),
        "triton": TritonAttnProcessor,
        "triton_sliced": lambda: TritonSlicedAttnProcessor(slice_size),
    }


def backend_for(processor_name: str) -> str:
    """The backend a processor runs under: the Triton one under 'triton' (the interpreter on CPU)."""
    return "triton" if processor_name.startswith("triton") else "auto"
