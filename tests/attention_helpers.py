"""Helpers shared by the attention-processor tests (tests/ is on sys.path under pytest)."""

from fastunet.layers.attention_processor import AttnProcessor, AttnProcessor2_0, SlicedAttnProcessor, TritonAttnProcessor

RTOL = 1e-4


def processor_factories(slice_size: int) -> dict:
    """Zero-argument constructors of fastunet's processors by short name; "sliced" uses ``slice_size``."""
    return {
        "plain": AttnProcessor,
        "sdpa": AttnProcessor2_0,
        "sliced": lambda: SlicedAttnProcessor(slice_size),
        "triton": TritonAttnProcessor,
    }


def backend_for(processor_name: str) -> str:
    """The backend a processor runs under: the Triton one under 'triton' (the interpreter on CPU)."""
    return "triton" if processor_name == "triton" else "auto"
