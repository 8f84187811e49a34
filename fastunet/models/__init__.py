"""The fastunet UNet models, under diffusers' class names."""

from .unet_1d import UNet1DModel, UNet1DOutput
from .unet_2d import UNet2DModel, UNet2DOutput
from .unet_2d_blocks import UNET_2D_BLOCKS, UNetMidBlock2D, get_down_block, get_up_block
from .unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from .unet_3d_blocks import UNET_3D_BLOCKS
from .unet_3d_condition import UNet3DConditionModel, UNet3DConditionOutput
from .unet_motion import MotionAdapter, UNetMotionModel, UNetMotionOutput
from .unet_motion_blocks import UNET_MOTION_BLOCKS
from .unet_2d_condition_blocks import (
    UNET_2D_CONDITION_BLOCKS,
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    UNetMidBlock2DCrossAttn,
)

__all__ = [
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "UNET_2D_BLOCKS",
    "UNET_2D_CONDITION_BLOCKS",
    "UNet1DModel",
    "UNet1DOutput",
    "UNet2DConditionModel",
    "UNet2DConditionOutput",
    "UNet2DModel",
    "UNet2DOutput",
    "UNet3DConditionModel",
    "UNet3DConditionOutput",
    "UNET_3D_BLOCKS",
    "UNET_MOTION_BLOCKS",
    "MotionAdapter",
    "UNetMotionModel",
    "UNetMotionOutput",
    "UNetMidBlock2D",
    "UNetMidBlock2DCrossAttn",
    "get_down_block",
    "get_up_block",
]
