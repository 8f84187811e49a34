"""What every fastunet model shares.

* :class:`ModelMixin` -- config, dtype/device, gradient checkpointing, diffusers-format checkpoints
  (``save_pretrained`` / ``from_pretrained``, in :mod:`fastunet.checkpoint`) and an all-or-nothing
  ``load_state_dict``;
* :class:`AttentionMixin` -- diffusers' attention-processor API for models with attention layers:
  ``attn_processors``, ``set_attn_processor``, ``set_default_attn_processor``, ``set_attention_slice``
  and ``fuse_qkv_projections`` / ``unfuse_qkv_projections``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Union

import torch
import torch.nn as nn

from . import checkpoint
from .configuration import ConfigMixin
from .layers.attention_processor import AttentionProcessor, TritonAttnProcessor, _AttnProcessorBase


class ModelMixin(nn.Module, ConfigMixin):
    """Base class of the fastunet models.

    Sub-modules that support activation checkpointing carry a boolean attribute
    ``gradient_checkpointing``; :meth:`enable_gradient_checkpointing` flips all of them.

    The class attributes below carry diffusers' values for the model of the same name (tools such as
    accelerate and diffusers' own hooks read them); the defaults are diffusers' ``ModelMixin`` defaults.
    """

    _supports_gradient_checkpointing = False
    #: sub-module names that stay in float32 whatever ``torch_dtype`` a load asks for
    _keep_in_fp32_modules: list[str] | None = None
    #: sub-module classes that a device map must not split across devices
    _no_split_modules: list[str] | None = None
    #: name patterns of sub-modules that layerwise casting leaves in their compute dtype
    _skip_layerwise_casting_patterns: list[str] | None = None

    def __getattr__(self, name: str):
        """Sub-modules, parameters and buffers as ``nn.Module`` finds them; then, as diffusers still allows
        with a ``FutureWarning``, a config entry read as an attribute (``unet.in_channels``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            found, value = self._config_entry(name)
            if not found:
                raise
        warnings.warn(
            f"reading the config entry {name!r} as an attribute of a {type(self).__name__} is deprecated "
            f"(diffusers drops it in 1.0.0); read model.config.{name} instead", FutureWarning, stacklevel=2,
        )
        return value

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter outside ``_keep_in_fp32_modules`` (else of the first
        floating-point buffer, else of the last tensor seen; float32 for a model without any)."""
        keep = self._keep_in_fp32_modules or ()
        last = None
        for name, p in self.named_parameters():
            last = p.dtype
            if p.is_floating_point() and not any(m in name for m in keep):
                return p.dtype
        for b in self.buffers():
            last = b.dtype
            if b.is_floating_point():
                return b.dtype
        return last if last is not None else torch.float32

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (else buffer; the CPU for a model without tensors)."""
        for t in itertools.chain(self.parameters(), self.buffers()):
            return t.device
        return torch.device("cpu")

    def _set_gradient_checkpointing(self, value: bool) -> None:
        if not self._supports_gradient_checkpointing:
            raise ValueError(f"{type(self).__name__} does not support gradient checkpointing "
                             f"(_supports_gradient_checkpointing is False)")
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

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameter elements (each shared parameter counted once); ``only_trainable`` counts
        those with ``requires_grad``, ``exclude_embeddings`` leaves out the weights of ``nn.Embedding`` layers."""
        skipped = set()
        if exclude_embeddings:
            skipped = {f"{path}.weight" for path, m in self.named_modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for name, p in self.named_parameters()
                   if name not in skipped and (p.requires_grad or not only_trainable))

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters, plus the buffers unless ``return_buffers=False``."""
        tensors = itertools.chain(self.parameters(), self.buffers() if return_buffers else ())
        return sum(t.numel() * t.element_size() for t in tensors)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``torch.nn.Module.load_state_dict``, all or nothing: every entry is checked first (missing and
        unexpected keys under ``strict``; shapes; dtype kinds, since only floating-point values are cast) and
        a RuntimeError in torch's wording names every problem, with the model left exactly as it was.
        Returns torch's ``_IncompatibleKeys(missing_keys, unexpected_keys)``."""
        checkpoint.check_state_dict(self, state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def save_config(self, save_directory) -> None:
        """Write ``config.json`` alone into ``save_directory`` (created if needed), as ``save_pretrained`` does."""
        checkpoint.save_config(self, save_directory)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                    return_unused_kwargs: bool = False, return_commit_hash: bool = False, **kwargs):
        """The ``config.json`` of a local model directory (or the file itself) as a dict, as diffusers'
        ``load_config``; build the model with :meth:`from_config`. Download options are accepted and
        ignored; ``return_unused_kwargs``/``return_commit_hash`` append the other keyword arguments and
        ``None`` (a local directory has no commit) to the result, as diffusers does."""
        config, unused = checkpoint.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not (return_unused_kwargs or return_commit_hash):
            return config
        result = (config,)
        if return_unused_kwargs:
            result += (unused,)
        if return_commit_hash:
            result += (None,)
        return result

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str = "10GB") -> None:
        """Write ``config.json`` and the weights as diffusers does.

        ``safe_serialization=False`` writes ``.bin`` pickles instead of ``.safetensors``; ``variant="fp16"``
        names the weights ``diffusion_pytorch_model.fp16.safetensors``; weights larger than
        ``max_shard_size`` (bytes, or a string such as ``"200MB"``, ``"10GB"``) are split into shards
        ``diffusion_pytorch_model-00001-of-0000N.safetensors`` listed by
        ``diffusion_pytorch_model.safetensors.index.json``.
        """
        checkpoint.save_pretrained(self, save_directory, safe_serialization=safe_serialization, variant=variant,
                                   max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs):
        """Load a model from a local directory written by diffusers or fastunet.

        The model is built with its parameters on the meta device and the checkpoint's tensors become its
        parameters, so a load holds about one copy of the weights; ``torch_dtype`` casts them as they are
        read. Keyword arguments: ``variant``, ``use_safetensors``, ``output_loading_info``, and config
        entries that override ``config.json``; see :func:`fastunet.checkpoint.from_pretrained`.
        """
        return checkpoint.from_pretrained(cls, pretrained_model_name_or_path, subfolder=subfolder,
                                          torch_dtype=torch_dtype, **kwargs)


def _attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The attention layers of ``model`` by path, in diffusers' order (depth first, parents first)."""
    layers = {}

    def visit(path: str, module: nn.Module) -> None:
        if hasattr(module, "get_processor"):
            layers[path] = module
        for name, child in module.named_children():
            visit(f"{path}.{name}", child)

    for name, child in model.named_children():
        visit(name, child)
    return layers


class AttentionMixin:
    """diffusers' attention-processor API for models (mix into a ``ModelMixin`` subclass).

    Attention layers are the sub-modules with ``get_processor``/``set_processor``; their processors are
    keyed ``"<module path>.processor"``.  The methods use nothing else of the model, so they also work
    called on a diffusers model: ``AttentionMixin.set_attention_slice(diffusers_unet, "auto")``.
    """

    #: The processors in force before ``fuse_qkv_projections``, restored by ``unfuse_qkv_projections``.
    _original_attn_processors: dict[str, AttentionProcessor] | None = None

    @property
    def attn_processors(self) -> dict[str, AttentionProcessor]:
        """``{"<module path>.processor": processor}`` for every attention layer."""
        return {f"{path}.processor": m.get_processor() for path, m in _attention_layers(self).items()}

    def set_attn_processor(self, processor: AttentionProcessor | dict[str, AttentionProcessor]) -> None:
        """Set one processor on every attention layer, or a dict with exactly the keys of
        :attr:`attn_processors`, one per layer."""
        layers = _attention_layers(self)
        if isinstance(processor, dict):
            count = len(layers)
            if len(processor) != count:
                raise ValueError(
                    f"A dict of processors was passed, but the number of processors {len(processor)} does not match"
                    f" the number of attention layers: {count}. Please make sure to pass {count} processor classes."
                )
            expected = {f"{path}.processor" for path in layers}
            if set(processor) != expected:
                raise ValueError(
                    f"the processor dict must have exactly the keys of attn_processors; missing "
                    f"{sorted(expected - set(processor))}, unknown {sorted(set(processor) - expected)}"
                )
            for path, module in layers.items():
                module.set_processor(processor[f"{path}.processor"])
        else:
            for module in layers.values():
                module.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Back to fastunet's default, :class:`TritonAttnProcessor`, everywhere."""
        self.set_attn_processor(TritonAttnProcessor())

    def set_attention_slice(self, slice_size: Union[str, int, list, None] = "auto") -> None:
        """Sliced attention: ``"auto"`` halves each layer's sliceable head count, ``"max"`` slices one row
        at a time, an int applies to every layer, a list gives one size per layer (in the order of
        :attr:`attn_processors`), and ``None`` entries leave slicing off."""
        sliceable = []

        def collect(module: nn.Module) -> None:
            if hasattr(module, "set_attention_slice"):
                sliceable.append(module.sliceable_head_dim)
            for child in module.children():
                collect(child)

        for child in self.children():
            collect(child)

        if slice_size == "auto":
            # half the heads per slice; a layer with a single head gets a slice of one (diffusers asks for 0)
            sizes = [max(dim // 2, 1) for dim in sliceable]
        elif slice_size == "max":
            sizes = [1] * len(sliceable)
        elif isinstance(slice_size, str):
            raise ValueError(f"slice_size must be 'auto', 'max', an int or a list; got {slice_size!r}")
        elif isinstance(slice_size, list):
            sizes = list(slice_size)
        elif slice_size is None or (isinstance(slice_size, int) and not isinstance(slice_size, bool)):
            sizes = [slice_size] * len(sliceable)
        else:
            raise TypeError(f"slice_size must be 'auto', 'max', an int or a list; got {type(slice_size).__name__}")

        if len(sizes) != len(sliceable):
            raise ValueError(
                f"You have provided {len(sizes)}, but {getattr(self, 'config', type(self).__name__)} has "
                f"{len(sliceable)} different attention layers. Make sure to match `len(slice_size)` to be "
                f"{len(sliceable)}."
            )
        for size, dim in zip(sizes, sliceable):
            if size is not None and size > dim:
                raise ValueError(f"size {size} has to be smaller or equal to {dim}.")

        remaining = iter(sizes)

        def apply(module: nn.Module) -> None:
            if hasattr(module, "set_attention_slice"):
                module.set_attention_slice(next(remaining))
            for child in module.children():
                apply(child)

        for child in self.children():
            apply(child)

    def fuse_qkv_projections(self) -> None:
        """Fuse the q/k/v (self-attention) or k/v (cross-attention) projections of every attention layer.

        Layers keep fastunet processors (they use the fused weights); any other processor is replaced by
        :class:`TritonAttnProcessor`.  :meth:`unfuse_qkv_projections` restores the processors.
        """
        processors = self.attn_processors
        for proc in processors.values():
            if "Added" in type(proc).__name__:
                raise ValueError("`fuse_qkv_projections()` is not supported for models having added KV projections.")
        layers = _attention_layers(self)
        for module in layers.values():
            if getattr(module, "added_kv_proj_dim", None) is not None:
                raise ValueError("`fuse_qkv_projections()` is not supported for models having added KV projections.")
        self._original_attn_processors = processors
        for module in layers.values():
            module.fuse_projections()
            if not isinstance(module.get_processor(), _AttnProcessorBase):
                module.set_processor(TritonAttnProcessor())

    def unfuse_qkv_projections(self) -> None:
        """Undo :meth:`fuse_qkv_projections`: separate projections and the processors from before."""
        for module in _attention_layers(self).values():
            if hasattr(module, "unfuse_projections"):
                module.unfuse_projections()
        if self._original_attn_processors is not None:
            self.set_attn_processor(self._original_attn_processors)
            self._original_attn_processors = None
