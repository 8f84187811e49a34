"""``ModelMixin``: what every fastunet model shares -- config, dtype/device, gradient checkpointing,
and diffusers-format checkpoints (``save_pretrained`` / ``from_pretrained``, in fastunet/checkpoint.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .configuration import ConfigMixin


class ModelMixin(nn.Module, ConfigMixin):
    """Base class of the fastunet models.

    Sub-modules that support activation checkpointing carry a boolean attribute
    ``gradient_checkpointing``; :meth:`enable_gradient_checkpointing` flips all of them.
    """

    _supports_gradient_checkpointing = True

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter (float32 for a model without any)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _set_gradient_checkpointing(self, value: bool) -> None:
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing")
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = value

    def enable_gradient_checkpointing(self) -> None:
        """Recompute block activations in backward instead of storing them (same gradients)."""
        self._set_gradient_checkpointing(True)

    def disable_gradient_checkpointing(self) -> None:
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def num_parameters(self, only_trainable: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None) -> None:
        """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` as diffusers does.

        ``safe_serialization=False`` writes a ``.bin`` pickle instead; ``variant="fp16"`` names the weights
        ``diffusion_pytorch_model.fp16.safetensors``.
        """
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory, safe_serialization=safe_serialization, variant=variant)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a model from a local directory written by diffusers or fastunet.

        Keyword arguments: ``variant``, ``use_safetensors``, ``output_loading_info``, and config entries
        that override ``config.json``; see :func:`fastunet.checkpoint.from_pretrained`.
        """
        from .checkpoint import from_pretrained

        return from_pretrained(cls, pretrained_model_name_or_path, subfolder=subfolder,
                               torch_dtype=torch_dtype, **kwargs)
