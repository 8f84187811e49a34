"""Adapters on fastunet's UNets, with diffusers' model-side loader API.

* :class:`PeftAdapterMixin` -- LoRA through `peft <https://github.com/huggingface/peft>`_ (the optional
  ``lora`` extra): ``load_lora_adapter`` / ``save_lora_adapter`` in diffusers' file format, ``add_adapter``
  for training, ``set_adapters`` with weights, ``fuse_lora`` / ``unfuse_lora``, ``unload_lora``,
  ``disable_lora`` / ``enable_lora``, ``delete_adapters``, ``active_adapters``; and :func:`scales_lora`, which
  gives a forward diffusers' ``cross_attention_kwargs["scale"]``.  peft wraps the ``nn.Linear`` projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ...); the processors call them as before, so attention stays on
  ``fastunet.kernels.attention``.
* :class:`UNet2DConditionLoadersMixin` -- IP-Adapter weights (``_load_ip_adapter_weights``, which
  diffusers' ``pipe.load_ip_adapter`` calls; ``set_ip_adapter_scale``) and Custom Diffusion weights
  (``load_attn_procs`` / ``save_attn_procs``).

Files are diffusers': ``pytorch_lora_weights.safetensors`` with the adapter's ``LoraConfig`` as JSON under
the ``lora_adapter_metadata`` header key, ``pytorch_custom_diffusion_weights.{safetensors,bin}``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors.torch
import torch
import torch.nn as nn

from .checkpoint import _unreadable_reason, check_state_dict
from .layers.attention_processor import TritonCustomDiffusionAttnProcessor, TritonIPAdapterAttnProcessor
from .layers.embeddings import ImageProjection, MultiIPAdapterImageProjection

try:  # the optional ``lora`` extra
    from peft import (LoraConfig, PeftConfig, get_peft_model_state_dict, inject_adapter_in_model,
                      set_peft_model_state_dict)
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:  # pragma: no cover - exercised only without peft
    LoraConfig = PeftConfig = BaseTunerLayer = None

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
CUSTOM_DIFFUSION_WEIGHT_NAME = "pytorch_custom_diffusion_weights.bin"
CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE = "pytorch_custom_diffusion_weights.safetensors"

# older diffusers LoRA key spellings -> peft's
_LEGACY_LORA_KEYS = (
    (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
    (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
    (".processor.to_out_lora.down.", ".to_out.0.lora_A."), (".processor.to_out_lora.up.", ".to_out.0.lora_B."),
    *((f".processor.to_{p}_lora.{d}.", f".to_{p}.lora_{ab}.") for p in "qkv" for d, ab in (("down", "A"), ("up", "B"))),
)


def _require_peft(what: str) -> None:
    if BaseTunerLayer is None:
        raise ImportError(f"{what} needs peft>=0.13 (LoRA): pip install 'fastunet[lora]'")


def _tuner_layers(model: nn.Module):
    """``(name, module)`` for every peft adapter layer in ``model``."""
    if BaseTunerLayer is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def _weights_file(source, weight_name: str | None, subfolder: str | None, use_safetensors: bool | None,
                  defaults: tuple[str, str]) -> Path:
    """The weights file named by a directory (+ ``subfolder``, ``weight_name``) or a file path."""
    path = Path(source)
    if subfolder:
        path = path / subfolder
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"expected a state dict, a weights file or a local directory; {str(path)!r} is neither "
                         "(fastunet loads local files only)")
    if weight_name is not None:
        candidates = [path / weight_name]
    else:
        safe, pickled = defaults
        candidates = [path / safe] if use_safetensors else [path / safe, path / pickled]
        if use_safetensors is False:
            candidates = [path / pickled]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"no weights file in {str(path)!r}: looked for {[c.name for c in candidates]}; "
                     f"found {sorted(p.name for p in path.iterdir())}")


def _read_weights(file: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A safetensors or torch file -> (state dict, LoRA metadata or ``None``). A file that cannot be read
    (truncated, corrupt, a pickle of anything but tensors and containers) raises OSError naming it; ``.bin``
    files are unpickled with ``weights_only=True``, so they cannot run code."""
    try:
        if file.suffix == ".safetensors":
            with safetensors.safe_open(str(file), framework="pt", device="cpu") as handle:
                header = handle.metadata() or {}
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
        else:
            state_dict, header = torch.load(file, map_location="cpu", weights_only=True), {}
    except FileNotFoundError:
        raise
    except Exception as error:
        raise OSError(f"cannot read weights file {file}: {_unreadable_reason(str(file), error)}") from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{file} holds a {type(state_dict).__name__}, not a state dict of named tensors")
    raw = header.get(LORA_ADAPTER_METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: its {LORA_ADAPTER_METADATA_KEY!r} header entry is not valid JSON: {error}") from None
    return dict(state_dict), metadata


def _fetch_state_dict(source, weight_name=None, subfolder=None, use_safetensors=None, metadata=None):
    """A state dict (copied) or a local file/directory -> (state dict, metadata)."""
    if isinstance(source, Mapping):
        return dict(source), metadata
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a state dict or a path; got {type(source).__name__}")
    state_dict, file_metadata = _read_weights(
        _weights_file(source, weight_name, subfolder, use_safetensors, (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME)))
    return state_dict, metadata if metadata is not None else file_metadata


def _to_peft_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename older diffusers LoRA keys (``.lora.down.``, ``processor.to_q_lora.up.``, ...) to peft's
    ``lora_A`` / ``lora_B``; peft keys pass unchanged."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in _LEGACY_LORA_KEYS:
            key = key.replace(old, new)
        renamed[key] = value
    return renamed


def _module_path(key: str) -> str:
    """``down_blocks.0....to_q.lora_A.weight`` (or an alpha key) -> ``down_blocks.0....to_q``."""
    key = key.removesuffix(".alpha")
    return key.split(".lora")[0]


def _lora_config(state_dict: dict[str, torch.Tensor], network_alphas: dict[str, float] | None,
                 metadata: dict | None):
    """The ``LoraConfig`` of a peft-keyed LoRA state dict: from the saved metadata when there is some, else
    read off the weights (the most common rank as ``r``, others in ``rank_pattern``; kohya ``network_alphas``
    as ``lora_alpha`` / ``alpha_pattern``, or alpha = rank)."""
    if metadata:
        accepted = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        return LoraConfig(**{k: v for k, v in metadata.items() if k in accepted})
    ranks = {_module_path(k): v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    if not ranks:
        raise ValueError("the LoRA state dict has no lora_B weights to read the rank from; got keys "
                         f"{sorted(state_dict)[:5]}...")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {f"^{path}": rank for path, rank in ranks.items() if rank != r}
    if network_alphas:
        alphas = {_module_path(k): float(v) for k, v in network_alphas.items()}
        lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
        alpha_pattern = {f"^{path}": a for path, a in alphas.items() if a != lora_alpha}
    else:
        lora_alpha, alpha_pattern = r, dict(rank_pattern)
    return LoraConfig(
        r=r, lora_alpha=lora_alpha, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        target_modules=sorted({_module_path(k) for k in state_dict}),
        use_dora=any("lora_magnitude_vector" in k for k in state_dict),
        lora_bias=any("lora_B" in k and k.endswith(".bias") for k in state_dict),
    )


def _jsonable_config(config) -> dict:
    out = {}
    for key, value in config.to_dict().items():
        out[key] = sorted(value) if isinstance(value, set) else value
    return out


def scales_lora(kwargs_name: str = "cross_attention_kwargs"):
    """Decorate a model's ``forward`` so that ``<kwargs_name>["scale"]`` scales the active LoRA adapters for
    that call (the key is removed before ``forward`` sees the dict; the adapters' scales are restored after).
    Without LoRA layers a scale other than 1 is ignored with a warning."""

    def decorate(forward):
        signature = inspect.signature(forward)

        @functools.wraps(forward)
        def scaled_forward(self, *args, **kwargs):
            bound = signature.bind(self, *args, **kwargs)
            options = bound.arguments.get(kwargs_name)
            if options is not None and not isinstance(options, Mapping):
                raise TypeError(f"{kwargs_name} must be a dict or None; got {type(options).__name__}")
            if not options or "scale" not in options:
                return forward(*bound.args, **bound.kwargs)
            options = dict(options)
            scale = options.pop("scale")
            bound.arguments[kwargs_name] = options
            layers = [module for _, module in _tuner_layers(self)]
            if not layers:
                if scale != 1.0:
                    logger.warning("%s['scale']=%s is a LoRA scale and this model has no LoRA adapter; ignored",
                                   kwargs_name, scale)
                return forward(*bound.args, **bound.kwargs)
            saved = [dict(module.scaling) for module in layers]
            for module in layers:
                module.scale_layer(scale)
            try:
                return forward(*bound.args, **bound.kwargs)
            finally:
                for module, scaling in zip(layers, saved):
                    module.scaling.update(scaling)

        return scaled_forward

    return decorate


class PeftAdapterMixin:
    """LoRA (and other peft adapters) on a model, with diffusers' ``PeftAdapterMixin`` methods.

    ``peft_config`` maps adapter names to their ``LoraConfig``; ``_hf_peft_config_loaded`` is true while
    any adapter is loaded. Loading refuses a model whose q/k/v projections are fused
    (``fuse_qkv_projections``), since the fused copy would bypass the adapter; fusing refuses LoRA layers
    for the same reason.
    """

    _hf_peft_config_loaded: bool = False

    # -- loading and saving ----------------------------------------------------------------------------

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer",
                          hotswap: bool = False, **kwargs) -> None:
        """Load a LoRA from a state dict, a ``.safetensors``/``.bin`` file or a local directory
        (``weight_name``, ``subfolder``, ``use_safetensors`` pick the file; ``pytorch_lora_weights.safetensors``
        by default) as adapter ``adapter_name`` (``default_<n>`` when not given), and make it active.

        ``prefix`` (``"unet"`` in pipeline files) selects the keys ``"<prefix>.<module path>..."``; keys that
        already start with a module of this model are taken as they are. ``network_alphas`` (kohya alphas by
        key) or ``metadata`` (a ``LoraConfig`` as a dict; read from the file when saved) set the scaling;
        otherwise alpha equals the rank.
        """
        _require_peft("load_lora_adapter")
        if hotswap:
            raise NotImplementedError("load_lora_adapter(hotswap=True) is not supported by fastunet")
        known = {"weight_name", "subfolder", "use_safetensors", "adapter_name", "network_alphas", "metadata",
                 "low_cpu_mem_usage", "_pipeline", "cache_dir", "force_download", "proxies", "local_files_only",
                 "token", "revision"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"load_lora_adapter got unexpected keyword arguments {unknown}")
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict, kwargs.get("weight_name"), kwargs.get("subfolder"),
            kwargs.get("use_safetensors"), kwargs.get("metadata"))
        network_alphas = kwargs.get("network_alphas")
        adapter_name = kwargs.get("adapter_name")
        low_cpu_mem_usage = bool(kwargs.get("low_cpu_mem_usage", False))
        if network_alphas and metadata:
            raise ValueError("pass either network_alphas or metadata, not both")

        state_dict = self._own_keys(state_dict, prefix)
        if metadata is not None and prefix is not None and any(k.startswith(f"{prefix}.") for k in metadata):
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        if network_alphas and prefix is not None and any(k.startswith(f"{prefix}.") for k in network_alphas):
            network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                              if k.startswith(f"{prefix}.")}
        if not state_dict:
            logger.warning("no LoRA keys for %s with prefix=%r; nothing loaded", type(self).__name__, prefix)
            return
        if any(getattr(m, "fused_projections", False) for m in self.modules()):
            raise ValueError("load_lora_adapter on fused q/k/v projections would bypass the adapter: call "
                             "unfuse_qkv_projections() first")
        peft_config = getattr(self, "peft_config", {})
        if adapter_name is None:
            adapter_name = f"default_{len(peft_config)}"
        if adapter_name in peft_config:
            raise ValueError(f"adapter name {adapter_name!r} is already in use; loaded: {sorted(peft_config)}")

        state_dict = _to_peft_keys(state_dict)
        config = _lora_config(state_dict, network_alphas, metadata)
        try:
            inject_adapter_in_model(config, self, adapter_name=adapter_name, state_dict=state_dict,
                                    low_cpu_mem_usage=low_cpu_mem_usage)
            result = set_peft_model_state_dict(self, state_dict, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        except Exception as error:
            # back to the model as it was: the adapter's weights gone, and the layers it alone wrapped unwrapped
            self._drop_adapter(adapter_name)
            self._unwrap_bare_tuner_layers()
            if not getattr(self, "peft_config", {}):
                self.unload_lora()
            error.add_note(f"while loading LoRA adapter {adapter_name!r} into {type(self).__name__} (the model "
                           "is left as it was)")
            raise
        self._hf_peft_config_loaded = True
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and adapter_name in k]
        if unexpected or missing:
            logger.warning("LoRA %r: unexpected keys %s, missing keys %s", adapter_name, unexpected, missing)

    def _own_keys(self, state_dict: dict, prefix: str | None) -> dict:
        if prefix is None:
            return state_dict
        marked = f"{prefix}."
        if any(k.startswith(marked) for k in state_dict):
            return {k.removeprefix(marked): v for k, v in state_dict.items() if k.startswith(marked)}
        children = {name for name, _ in self.named_children()}
        return {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in children}

    def save_lora_adapter(self, save_directory, adapter_name: str = "default", upcast_before_saving: bool = False,
                          safe_serialization: bool = True, weight_name: str | None = None) -> None:
        """Write adapter ``adapter_name``'s weights (peft keys, no prefix) and its ``LoraConfig`` (as
        safetensors metadata) to ``save_directory/pytorch_lora_weights.safetensors`` (or ``.bin``)."""
        _require_peft("save_lora_adapter")
        peft_config = getattr(self, "peft_config", {})
        if adapter_name not in peft_config:
            raise ValueError(f"no adapter {adapter_name!r} to save; loaded: {sorted(peft_config)}")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory; {str(save_directory)!r} is a file")
        state = None
        if upcast_before_saving:
            state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        weights = get_peft_model_state_dict(self, state_dict=state, adapter_name=adapter_name)
        weights = {k: v.detach().contiguous() for k, v in weights.items()}
        os.makedirs(save_directory, exist_ok=True)
        name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
        path = Path(save_directory, name)
        if safe_serialization:
            header = {"format": "pt",
                      LORA_ADAPTER_METADATA_KEY: json.dumps(_jsonable_config(peft_config[adapter_name]),
                                                            indent=2, sort_keys=True)}
            safetensors.torch.save_file(weights, str(path), metadata=header)
        else:
            torch.save(weights, path)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """Add a new, freshly initialised adapter (for training) and make it the active one."""
        _require_peft("add_adapter")
        if not isinstance(adapter_config, PeftConfig):
            raise TypeError(f"adapter_config must be a peft config such as LoraConfig; got "
                            f"{type(adapter_config).__name__}")
        if adapter_name in getattr(self, "peft_config", {}):
            raise ValueError(f"adapter name {adapter_name!r} is already in use; loaded: {sorted(self.peft_config)}")
        if any(getattr(m, "fused_projections", False) for m in self.modules()):
            raise ValueError("add_adapter on fused q/k/v projections would bypass the adapter: call "
                             "unfuse_qkv_projections() first")
        adapter_config.base_model_name_or_path = None
        inject_adapter_in_model(adapter_config, self, adapter_name=adapter_name)
        self._hf_peft_config_loaded = True
        self.set_adapter(adapter_name)

    # -- which adapters act, and how much -----------------------------------------------------------

    def _check_adapters(self, adapter_names: Sequence[str]) -> None:
        _require_peft("LoRA adapters")
        loaded = getattr(self, "peft_config", {})
        if not self._hf_peft_config_loaded or not loaded:
            raise ValueError("no LoRA adapter is loaded (load_lora_adapter / add_adapter first)")
        missing = [name for name in adapter_names if name not in loaded]
        if missing:
            raise ValueError(f"adapters {missing} are not loaded; loaded: {sorted(loaded)}")

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or several) the active adapters, at their current weights."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self._check_adapters(names)
        for _, module in _tuner_layers(self):
            module.set_adapter(names)

    def set_adapters(self, adapter_names: str | Sequence[str],
                     weights: float | Sequence[float | None] | None = None) -> None:
        """Activate ``adapter_names`` with one weight each (a float applied to every layer; ``None`` is 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = list(weights) if isinstance(weights, (list, tuple)) else [weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters needs one weight per adapter: {len(names)} names, {len(weights)} weights")
        weights = [1.0 if w is None else w for w in weights]
        for w in weights:
            if isinstance(w, dict):
                raise NotImplementedError("per-block LoRA weights (a dict) are not supported by fastunet; pass floats")
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise TypeError(f"adapter weights must be floats; got {type(w).__name__}")
        self._check_adapters(names)
        for _, module in _tuner_layers(self):
            module.set_adapter(names)
            for name, w in zip(names, weights):
                module.set_scale(name, w)

    def active_adapters(self) -> list[str]:
        """The names of the active adapters."""
        _require_peft("active_adapters")
        if not self._hf_peft_config_loaded:
            raise ValueError("no LoRA adapter is loaded (load_lora_adapter / add_adapter first)")
        for _, module in _tuner_layers(self):
            return list(module.active_adapters)
        return []

    def _enable(self, enabled: bool) -> None:
        _require_peft("LoRA adapters")
        if not self._hf_peft_config_loaded:
            raise ValueError("no LoRA adapter is loaded (load_lora_adapter / add_adapter first)")
        for _, module in _tuner_layers(self):
            module.enable_adapters(enabled=enabled)

    def disable_adapters(self) -> None:
        """Turn every adapter off (the base model computes alone) until :meth:`enable_adapters`."""
        self._enable(False)

    def enable_adapters(self) -> None:
        """Turn the active adapters back on."""
        self._enable(True)

    disable_lora = disable_adapters
    enable_lora = enable_adapters

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove adapters and their weights; with none left the model is back to plain layers."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_adapters(names)
        for name in names:
            self._drop_adapter(name)
        if not getattr(self, "peft_config", {}):
            self.unload_lora()

    def _unwrap_bare_tuner_layers(self) -> None:
        """Put the plain layer back wherever a peft layer holds no adapter any more."""
        for name, module in list(_tuner_layers(self)):
            names = getattr(module, "adapter_layer_names", ())
            if not hasattr(module, "base_layer") or any(len(getattr(module, n, {})) for n in names):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            setattr(parent, child, module.get_base_layer())

    def _drop_adapter(self, adapter_name: str) -> None:
        for _, module in _tuner_layers(self):
            if adapter_name in getattr(module, "lora_A", {}) or adapter_name in getattr(module, "r", {}):
                module.delete_adapter(adapter_name)
        getattr(self, "peft_config", {}).pop(adapter_name, None)

    # -- fusing and unloading ------------------------------------------------------------------------

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names: Sequence[str] | None = None) -> None:
        """Add ``lora_scale`` times the adapters' updates into the base weights (the active adapters, or
        ``adapter_names``); ``safe_fusing`` refuses a fusion that makes NaNs. Undo with :meth:`unfuse_lora`."""
        _require_peft("fuse_lora")
        if adapter_names is not None:
            self._check_adapters(list(adapter_names))
        fused_scales = self.__dict__.setdefault("_lora_fuse_scales", {})
        for name, module in _tuner_layers(self):
            module.scale_layer(lora_scale)
            module.merge(safe_merge=safe_fusing, adapter_names=None if adapter_names is None else list(adapter_names))
            fused_scales[name] = lora_scale

    def unfuse_lora(self) -> None:
        """Subtract the fused updates again; the adapters act unmerged at their weights from before fusing."""
        _require_peft("unfuse_lora")
        fused_scales = self.__dict__.get("_lora_fuse_scales", {})
        for name, module in _tuner_layers(self):
            module.unmerge()
            scale = fused_scales.pop(name, 1.0)
            if scale not in (0, 1):
                for adapter in module.active_adapters:
                    if adapter in module.scaling:
                        module.scaling[adapter] /= scale

    def unload_lora(self) -> None:
        """Put the plain layers back (fused updates stay in their weights) and forget every adapter."""
        _require_peft("unload_lora")
        for name, module in list(_tuner_layers(self)):
            if not hasattr(module, "base_layer"):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = self.get_submodule(parent_name) if parent_name else self
            setattr(parent, child, module.get_base_layer())
        self.__dict__.pop("_lora_fuse_scales", None)
        if "peft_config" in self.__dict__:
            del self.peft_config
        self._hf_peft_config_loaded = False


class UNet2DConditionLoadersMixin:
    """IP-Adapter and Custom Diffusion weights on a conditional UNet, with diffusers' method names.

    Needs the model to have ``attn_processors`` / ``set_attn_processor`` (:class:`AttentionMixin`),
    ``config.block_out_channels`` and ``config.cross_attention_dim``, and an ``encoder_hid_proj`` attribute.
    """

    # -- IP-Adapter ------------------------------------------------------------------------------------

    def _layer_width(self, processor_name: str) -> int:
        channels = list(self.config.block_out_channels)
        if processor_name.startswith("mid_block"):
            return channels[-1]
        stage = int(processor_name.split(".")[1])
        return channels[::-1][stage] if processor_name.startswith("up_blocks") else channels[stage]

    def _load_ip_adapter_weights(self, state_dicts, low_cpu_mem_usage: bool = False) -> None:
        """Install IP-Adapters from diffusers' split state dicts (``{"image_proj": ..., "ip_adapter": ...}``,
        one per adapter): an :class:`~fastunet.layers.embeddings.ImageProjection` per adapter as
        ``encoder_hid_proj`` (a text ``encoder_hid_proj`` moves to ``text_encoder_hid_proj``) and a
        :class:`~fastunet.layers.attention_processor.TritonIPAdapterAttnProcessor` on every cross-attention.
        ``ip_adapter`` keys are ``"<n>.to_k_ip.weight"`` with ``n`` = 1, 3, 5, ... over the cross-attention
        layers in ``attn_processors`` order (the original IP-Adapter numbering)."""
        if isinstance(state_dicts, Mapping):
            state_dicts = [state_dicts]
        for index, state_dict in enumerate(state_dicts):
            if not isinstance(state_dict, Mapping) or not {"image_proj", "ip_adapter"} <= set(state_dict):
                raise ValueError(f"IP-Adapter state dict {index} must have 'image_proj' and 'ip_adapter' entries; "
                                 f"got {sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict)}")
        projections = [self._ip_image_projection(sd["image_proj"]) for sd in state_dicts]
        num_tokens = [p.num_image_text_embeds for p in projections]

        processors = {}
        key_id = 1
        current = self.attn_processors
        for name, processor in current.items():
            if name.endswith("attn1.processor") or "motion_modules" in name:
                processors[name] = processor
                continue
            width = self._layer_width(name)
            ip = pipeline_ip_adapter_processor_class()(
                hidden_size=width, cross_attention_dim=self.config.cross_attention_dim, num_tokens=num_tokens,
                scale=1.0)
            weights = {}
            for i, sd in enumerate(state_dicts):
                for kind in ("to_k_ip", "to_v_ip"):
                    key = f"{key_id}.{kind}.weight"
                    if key not in sd["ip_adapter"]:
                        raise ValueError(f"IP-Adapter {i} has no {key!r} for {name}; its ip_adapter keys end at "
                                         f"{sorted(sd['ip_adapter'])[-2:]}")
                    weights[f"{kind}.{i}.weight"] = sd["ip_adapter"][key]
            try:
                check_state_dict(ip, weights)
            except RuntimeError as e:  # name the layer and the file's keys, not only the processor's own
                raise RuntimeError(f"IP-Adapter weights {key_id}.to_k_ip / {key_id}.to_v_ip for {name} (hidden size "
                                   f"{width}, cross_attention_dim {self.config.cross_attention_dim}): {e}") from e
            ip.load_state_dict(weights, strict=True)
            processors[name] = ip
            key_id += 2
        if isinstance(self.encoder_hid_proj, nn.Linear) and getattr(self, "text_encoder_hid_proj", None) is None:
            self.text_encoder_hid_proj = self.encoder_hid_proj
        self.set_attn_processor(processors)
        self.encoder_hid_proj = MultiIPAdapterImageProjection(projections)
        self.to(dtype=self.dtype, device=self.device)

    @staticmethod
    def _ip_image_projection(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        if "proj.weight" not in state_dict:
            raise NotImplementedError(
                "fastunet loads the original IP-Adapter image projection (image_proj keys 'proj.weight', "
                f"'proj.bias', 'norm.*'); got {sorted(state_dict)[:6]} (IP-Adapter Plus / Full / FaceID)")
        weight = state_dict["proj.weight"]
        tokens = 4
        projection = ImageProjection(image_embed_dim=weight.shape[1], cross_attention_dim=weight.shape[0] // tokens,
                                     num_image_text_embeds=tokens)
        renamed = {k.replace("proj", "image_embeds"): v for k, v in state_dict.items()}
        check_state_dict(projection, renamed)
        projection.load_state_dict(renamed, strict=True)
        return projection

    def _load_ip_adapter_loras(self, state_dicts) -> dict:
        """IP-Adapter FaceID's LoRA weights; fastunet supports none, so a file with some is refused."""
        for state_dict in state_dicts if not isinstance(state_dicts, Mapping) else [state_dicts]:
            lora = [k for k in state_dict["ip_adapter"] if "lora" in k]
            if lora:
                raise NotImplementedError(f"IP-Adapter FaceID LoRA weights are not supported by fastunet; got {lora[:3]}")
        return {}

    def set_ip_adapter_scale(self, scale: float | Sequence[float]) -> None:
        """One strength per loaded IP-Adapter (a float for all) on every IP-Adapter processor."""
        processors = [p for p in self.attn_processors.values() if isinstance(p, TritonIPAdapterAttnProcessor)]
        if not processors:
            raise ValueError("no IP-Adapter is loaded (pipe.load_ip_adapter / _load_ip_adapter_weights first)")
        count = len(processors[0].scale)
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * count
        if len(scales) != count:
            raise ValueError(f"set_ip_adapter_scale needs one scale per IP-Adapter ({count}); got {len(scales)}")
        for processor in processors:
            processor.scale = list(scales)

    # -- Custom Diffusion ----------------------------------------------------------------------------

    def load_attn_procs(self, pretrained_model_name_or_path_or_dict, **kwargs) -> None:
        """Load Custom Diffusion weights (keys ``"<layer>.processor.to_k_custom_diffusion.weight"``, ...) from a
        state dict, a file or a directory (``pytorch_custom_diffusion_weights.safetensors`` / ``.bin`` by
        default; ``weight_name``, ``subfolder``, ``use_safetensors``) as
        :class:`~fastunet.layers.attention_processor.TritonCustomDiffusionAttnProcessor` on those layers."""
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, Mapping):
            state_dict = dict(source)
        else:
            file = _weights_file(source, kwargs.get("weight_name"), kwargs.get("subfolder"),
                                 kwargs.get("use_safetensors"),
                                 (CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE, CUSTOM_DIFFUSION_WEIGHT_NAME))
            state_dict, _ = _read_weights(file)
        if not any("custom_diffusion" in k for k in state_dict):
            raise ValueError("load_attn_procs loads Custom Diffusion weights (keys with 'custom_diffusion'); got "
                             f"{sorted(state_dict)[:4]}; use load_lora_adapter for LoRA")
        grouped: dict[str, dict] = collections.defaultdict(dict)
        for key, value in state_dict.items():
            if not torch.is_tensor(value):  # a layer saved as {} (kept with its own projections) in .bin files
                grouped.setdefault(key, {})
                continue
            layer, _, sub = key.partition(".processor.")
            grouped[f"{layer}.processor"][sub] = value
        current = self.attn_processors
        unknown = sorted(set(grouped) - set(current))
        if unknown:
            raise ValueError(f"Custom Diffusion weights for layers this model lacks: {unknown[:3]}")
        processors = dict(current)
        problems = []
        for name, weights in grouped.items():
            if not weights:
                continue
            key = weights.get("to_k_custom_diffusion.weight")
            if not torch.is_tensor(key) or key.dim() != 2:
                problems.append(f"{name}: no 2-D 'to_k_custom_diffusion.weight' among {sorted(weights)}")
                continue
            processor = TritonCustomDiffusionAttnProcessor(
                train_kv=True, train_q_out="to_q_custom_diffusion.weight" in weights, hidden_size=key.shape[0],
                cross_attention_dim=key.shape[1])
            try:
                check_state_dict(processor, weights)
            except RuntimeError as error:
                problems.append(f"{name}: {str(error).partition(chr(10))[2].strip()}")
                continue
            problems += self._custom_diffusion_misfits(name.removesuffix(".processor"), weights)
            processor.load_state_dict(weights, strict=True)
            processors[name] = processor
        if problems:
            raise ValueError("cannot load the Custom Diffusion weights (nothing was loaded):\n  " + "\n  ".join(problems))
        self.set_attn_processor(processors)
        self.to(dtype=self.dtype, device=self.device)

    def _custom_diffusion_misfits(self, layer_path: str, weights: Mapping[str, torch.Tensor]) -> list[str]:
        """The Custom Diffusion projections whose shapes differ from those of the attention layer they stand
        in for (a file made for another model would otherwise load and fail only in the forward)."""
        layer = self.get_submodule(layer_path)
        out = getattr(layer, "to_out", None)
        counterparts = {"to_q_custom_diffusion.weight": getattr(layer, "to_q", None),
                        "to_k_custom_diffusion.weight": getattr(layer, "to_k", None),
                        "to_v_custom_diffusion.weight": getattr(layer, "to_v", None),
                        "to_out_custom_diffusion.0.weight": out[0] if isinstance(out, nn.ModuleList) else None}
        misfits = []
        for key, linear in counterparts.items():
            weight = getattr(linear, "weight", None)
            if key in weights and isinstance(weight, torch.Tensor) and tuple(weights[key].shape) != tuple(weight.shape):
                misfits.append(f"{layer_path}.processor.{key}: shape {list(weights[key].shape)}, the layer's "
                               f"{key.split('_custom')[0]} is {list(weight.shape)}")
        return misfits

    def save_attn_procs(self, save_directory, is_main_process: bool = True, weight_name: str | None = None,
                        save_function=None, safe_serialization: bool = True, **kwargs) -> None:
        """Write the Custom Diffusion processors' weights (diffusers' keys) to ``save_directory``."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory; {str(save_directory)!r} is a file")
        processors = {n: p for n, p in self.attn_processors.items()
                      if isinstance(p, TritonCustomDiffusionAttnProcessor)}
        if not processors:
            raise ValueError("save_attn_procs saves Custom Diffusion processors and this model has none; "
                             "use save_lora_adapter for LoRA")
        state_dict: dict[str, Any] = {f"{name}.{k}": v.detach().contiguous()
                                      for name, p in processors.items() for k, v in p.state_dict().items()}
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        name = weight_name or (CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE if safe_serialization else CUSTOM_DIFFUSION_WEIGHT_NAME)
        path = Path(save_directory, name)
        if save_function is not None:
            save_function(state_dict, str(path))
        elif safe_serialization:
            safetensors.torch.save_file(state_dict, str(path), metadata={"format": "pt"})
        else:
            torch.save(state_dict, path)



def pipeline_ip_adapter_processor_class() -> type:
    """The IP-Adapter processor class that ``_load_ip_adapter_weights`` installs.

    diffusers' ``pipe.set_ip_adapter_scale`` only updates processors that are instances of diffusers'
    own IP-Adapter classes. The weights reach this loader from diffusers' ``pipe.load_ip_adapter``, so
    when diffusers is importable the processor is a :class:`TritonIPAdapterAttnProcessor` that is also
    an instance of diffusers' ``IPAdapterAttnProcessor2_0`` (computation and ``__call__`` are
    fastunet's); without diffusers it is :class:`TritonIPAdapterAttnProcessor` itself.
    """
    global _PIPELINE_IP_CLASS
    if _PIPELINE_IP_CLASS is None:
        try:
            from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0 as diffusers_class
        except ImportError:
            _PIPELINE_IP_CLASS = TritonIPAdapterAttnProcessor
        else:
            _PIPELINE_IP_CLASS = type("PipelineTritonIPAdapterAttnProcessor",
                                      (TritonIPAdapterAttnProcessor, diffusers_class),
                                      {"__call__": TritonIPAdapterAttnProcessor.__call__,
                                       "__module__": __name__,
                                       "__doc__": TritonIPAdapterAttnProcessor.__doc__})
            globals()["PipelineTritonIPAdapterAttnProcessor"] = _PIPELINE_IP_CLASS  # so instances pickle
    return _PIPELINE_IP_CLASS


_PIPELINE_IP_CLASS: type | None = None

__all__ = ["PeftAdapterMixin", "UNet2DConditionLoadersMixin", "scales_lora"]
