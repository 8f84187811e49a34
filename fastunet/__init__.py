"""fastunet: drop-in, faster re-implementations of diffusers' UNets on hand-written Triton kernels.

    import fastunet
    unet = fastunet.UNet2DConditionModel.from_pretrained("path/to/sd15", subfolder="unet")
    fastunet.set_backend("auto")          # Triton on CUDA tensors, torch reference elsewhere
    diffusers_unet.set_attn_processor(fastunet.TritonAttnProcessor())   # works on diffusers models too
"""

from .layers.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    SpatialNorm,
    TritonAttnProcessor,
    TritonSlicedAttnProcessor,
)
from .checkpoint import load_diffusers_state_dict
from .kernels import get_backend, set_backend, use_backend
from .modeling import AttentionMixin, ModelMixin
from .models import (
    MotionAdapter,
    UNet1DModel,
    UNet1DOutput,
    UNet2DConditionModel,
    UNet2DConditionOutput,
    UNet2DModel,
    UNet2DOutput,
    UNet3DConditionModel,
    UNet3DConditionOutput,
    UNetMotionModel,
    UNetMotionOutput,
)

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "AttentionMixin",
    "ModelMixin",
    "MotionAdapter",
    "AttnProcessor",
    "AttnProcessor2_0",
    "SlicedAttnProcessor",
    "SpatialNorm",
    "TritonAttnProcessor",
    "TritonSlicedAttnProcessor",
    "UNet1DModel",
    "UNet1DOutput",
    "UNet2DConditionModel",
    "UNet2DConditionOutput",
    "UNet2DModel",
    "UNet2DOutput",
    "UNet3DConditionModel",
    "UNet3DConditionOutput",
    "UNetMotionModel",
    "UNetMotionOutput",
    "__version__",
    "get_backend",
    "load_diffusers_state_dict",
    "set_backend",
    "use_backend",
]
