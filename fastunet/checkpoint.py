"""Checkpoints in diffusers' on-disk format, read from and written to local directories only.

A checkpoint directory holds

* ``config.json``: the model's constructor arguments plus ``_class_name`` and ``_diffusers_version``,
  written as ``json.dumps(..., indent=2, sort_keys=True)`` and a trailing newline, as diffusers does;
* the weights: ``diffusion_pytorch_model.safetensors`` (metadata ``{"format": "pt"}``), or the pickled
  ``diffusion_pytorch_model.bin``; a variant inserts its name before the extension
  (``diffusion_pytorch_model.fp16.safetensors``); a large checkpoint written by diffusers may be split in
  shards listed by ``diffusion_pytorch_model.safetensors.index.json``.

Loading is all or nothing: the files are read, the state dict is checked against the model (missing,
unexpected and wrongly shaped entries are reported together) and only then copied into it. Checkpoints
from before diffusers renamed the attention weights (``query``/``key``/``value``/``proj_attn`` instead of
``to_q``/``to_k``/``to_v``/``to_out.0``) are converted, but only under modules flagged
``_from_deprecated_attn_block``: other modules may use those names for their own weights.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from pathlib import PurePath
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from .configuration import ConfigMixin, init_parameter_names

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.bin"
SAFETENSORS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.bin.index.json"
SAFETENSORS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# The version of diffusers' checkpoint format that fastunet mirrors, written as ``_diffusers_version``.
# diffusers reads that entry only to tell old pipelines apart; models ignore it.
DIFFUSERS_FORMAT_VERSION = "0.42.1"

# Renamed attention weights: (old name, new name), under modules flagged ``_from_deprecated_attn_block``.
_DEPRECATED_ATTENTION_NAMES = (("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))

# Keyword arguments of diffusers' from_pretrained that only steer downloads or memory use: the result of
# loading a local directory does not depend on them.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_dir")
_NO_EFFECT_KWARGS = ("local_files_only", "low_cpu_mem_usage")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------- saving


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True,
                    variant: str | None = None) -> None:
    """Write ``model`` to ``save_directory`` (created if needed) as diffusers' ``save_pretrained`` does.

    Args:
        model: a config-registered model (``model.config`` holds its constructor arguments).
        save_directory: the directory to write ``config.json`` and the weights into.
        safe_serialization: write ``.safetensors`` (default) or a ``torch.save`` pickle ``.bin``.
        variant: optional weights-name variant, e.g. ``"fp16"`` -> ``diffusion_pytorch_model.fp16.safetensors``.

    Tensors that share memory (tied weights) are each written in full, and non-contiguous ones made
    contiguous, so that diffusers reads the result as it is.
    """
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path (str or os.PathLike); got {type(save_directory).__name__}")
    _check_variant(variant)
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_directory {directory!r} exists and is not a directory")

    config_text = config_to_json_string(model)
    state_dict = _saveable_state_dict(model.state_dict())
    os.makedirs(directory, exist_ok=True)

    _write_atomically(os.path.join(directory, CONFIG_NAME), lambda tmp: _write_text(tmp, config_text))
    if safe_serialization:
        name = _add_variant(SAFETENSORS_WEIGHTS_NAME, variant)
        _write_atomically(os.path.join(directory, name),
                          lambda tmp: save_file(state_dict, tmp, metadata={"format": "pt"}))
    else:
        name = _add_variant(WEIGHTS_NAME, variant)
        _write_atomically(os.path.join(directory, name), lambda tmp: torch.save(state_dict, tmp))
        shadowing = _add_variant(SAFETENSORS_WEIGHTS_NAME, variant)
        if os.path.isfile(os.path.join(directory, shadowing)):
            warnings.warn(
                f"{directory} also holds {shadowing}, which loaders (diffusers' and fastunet's) read in "
                f"preference to the {name} just written", UserWarning, stacklevel=3,
            )
    _remove_stale_shards(directory, safe_serialization, variant)


def config_to_json_string(model: nn.Module) -> str:
    """The ``config.json`` text diffusers would write for ``model``: its config plus ``_class_name`` and
    ``_diffusers_version``, keys sorted, two-space indent, trailing newline."""
    entries = dict(model.config)
    entries.pop("_use_default_values", None)
    entries["_class_name"] = type(model).__name__
    entries["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
    saveable = {key: _json_value(value, key) for key, value in entries.items()}
    return json.dumps(saveable, indent=2, sort_keys=True) + "\n"


def _json_value(value: Any, key: str) -> Any:
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, key) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, key) for k, v in value.items()}
    if isinstance(value, PurePath):
        return value.as_posix()
    raise TypeError(
        f"config entry {key!r} holds a {type(value).__module__}.{type(value).__qualname__}, which config.json "
        "cannot hold; expected str, int, float, bool, None, or lists/dicts of them"
    )


def _saveable_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy out tensors that share memory with another entry, are views of a larger storage, or are not
    contiguous: safetensors refuses the first and last, and ``torch.save`` would write whole storages."""
    seen_storages = set()
    saveable = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if tensor.device.type == "meta":
            raise ValueError(f"cannot save {key!r}: it is on the meta device and holds no data")
        storage = tensor.untyped_storage()
        storage_id = (tensor.device, storage.data_ptr())
        whole = tensor.storage_offset() == 0 and tensor.nbytes == storage.nbytes()
        if tensor.numel() and (storage_id in seen_storages or not whole or not tensor.is_contiguous()):
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        else:
            seen_storages.add(storage_id)
        saveable[key] = tensor
    return saveable


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _write_atomically(path: str, write) -> None:
    """Write through a temporary file in the same directory, so a failure never leaves half a file."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_stale_shards(directory: str, safe_serialization: bool, variant: str | None) -> None:
    """Delete an earlier sharded save of the same format and variant: its index would take precedence
    over the single file just written."""
    extension = "safetensors" if safe_serialization else "bin"
    index = _add_variant(SAFETENSORS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME, variant)
    suffix = re.escape(f".{variant}" if variant else "")
    shard = re.compile(rf"^diffusion_pytorch_model-\d+-of-\d+{suffix}\.{extension}$")
    for name in os.listdir(directory):
        if name == index or shard.match(name):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                os.remove(path)


# -------------------------------------------------------------------------------------------- loading


def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                    torch_dtype: torch.dtype | None = None, *, variant: str | None = None,
                    use_safetensors: bool | None = None, output_loading_info: bool = False, **kwargs):
    """Build ``cls`` from a local diffusers-format directory and load its weights (strictly).

    Args:
        cls: the model class; the config's ``_class_name`` must name it (or one of its model base classes).
        pretrained_model_name_or_path: a local directory (Hub ids are refused: download first).
        subfolder: a sub-directory holding the model, e.g. ``"unet"`` in a pipeline directory.
        torch_dtype: cast floating-point parameters and buffers to this dtype.
        variant: weights-name variant, e.g. ``"fp16"`` -> ``diffusion_pytorch_model.fp16.safetensors``.
        use_safetensors: ``None`` prefers ``.safetensors`` and falls back to ``.bin``; ``True``/``False``
            accept only that format.
        output_loading_info: also return diffusers' loading-info dict (always empty lists: loading is strict).
        **kwargs: config entries that override ``config.json`` (``sample_size=64``); diffusers' download
            options are accepted and have no effect on a local directory.

    Returns:
        The model in eval mode, with ``config["_name_or_path"]`` set to the path given.
    """
    overrides = _split_kwargs(cls, kwargs)
    _check_variant(variant)
    if use_safetensors not in (None, True, False):
        raise TypeError(f"use_safetensors must be None, True or False; got {use_safetensors!r}")
    if torch_dtype is not None:
        if not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16; got {torch_dtype!r}")
        if not torch_dtype.is_floating_point:
            raise ValueError(f"torch_dtype must be a floating-point dtype; got {torch_dtype}")

    directory = _resolve_directory(pretrained_model_name_or_path, subfolder)
    config_file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}{_describe_directory(directory)}")
    config = _read_config(config_file)
    _check_class_name(cls, config, config_file)
    init_kwargs = cls.extract_init_kwargs(config)
    init_kwargs.update(overrides)

    weight_files = _find_weight_files(directory, variant, use_safetensors)
    state_dict = _read_weight_files(weight_files)

    try:
        with _SkipRandomInit():
            model = cls(**init_kwargs)
    except (TypeError, ValueError) as error:
        error.add_note(f"while building {cls.__name__} from {config_file}")
        raise
    if torch_dtype is not None:
        model.to(dtype=torch_dtype)
    load_diffusers_state_dict(model, state_dict, source=weight_files[0] if len(weight_files) == 1 else directory)
    model.eval()
    model._set_config_metadata(_name_or_path=os.fspath(pretrained_model_name_or_path))
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


class _SkipRandomInit(TorchFunctionMode):
    """Within this mode (on this thread only), random weight initialisation is skipped, leaving the freshly
    allocated values as they are: the strict load that follows overwrites every parameter and persistent
    buffer. Drawing them costs more than reading the checkpoint, and would advance the caller's random
    stream. (A non-persistent buffer drawn at random in ``__init__`` would stay uninitialised; no UNet
    has one: theirs are computed, like positional tables.)"""

    _SKIPPED = frozenset({
        torch.Tensor.uniform_, torch.Tensor.normal_, nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_,
        nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
        nn.init.orthogonal_, nn.init.sparse_,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _split_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Config overrides out of ``kwargs``; download options dropped; anything else refused."""
    accepted = set(init_parameter_names(cls))
    overrides, ignored, unknown = {}, [], []
    for key, value in kwargs.items():
        if key in accepted:
            overrides[key] = value
        elif key in _NO_EFFECT_KWARGS:
            continue
        elif key in _HUB_KWARGS:
            if value not in (None, False):
                ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise TypeError(
            f"{cls.__name__}.from_pretrained got unexpected keyword arguments {sorted(unknown)}; it accepts "
            "subfolder, torch_dtype, variant, use_safetensors, output_loading_info and the config entries "
            f"of {cls.__name__} ({sorted(accepted)})"
        )
    if ignored:
        warnings.warn(
            f"{cls.__name__}.from_pretrained ignores {sorted(ignored)}: they steer Hub downloads, and fastunet "
            "loads only local directories", UserWarning, stacklevel=4,
        )
    return overrides


def _check_variant(variant: str | None) -> None:
    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant or
                                os.sep in variant):
        raise ValueError(f"variant must be None or a plain name such as 'fp16'; got {variant!r}")


def _add_variant(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors``."""
    if variant is None:
        return name
    stem, extension = name.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def _resolve_directory(path: str | os.PathLike, subfolder: str | None) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a local directory path; got {type(path).__name__}")
    directory = os.fspath(path)
    if not os.path.exists(directory):
        if _HUB_ID.match(directory) and not os.path.isabs(directory):
            raise FileNotFoundError(
                f"{directory!r} is not a local directory. If it is a Hugging Face Hub id: fastunet loads only "
                f"local directories, so download it first (e.g. `huggingface-cli download {directory} "
                "--local-dir <dir>`) and pass that directory."
            )
        raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            f"{directory!r} is a file; from_pretrained expects a directory holding {CONFIG_NAME} and the weights"
        )
    if subfolder:
        if not isinstance(subfolder, (str, os.PathLike)):
            raise TypeError(f"subfolder must be a str; got {type(subfolder).__name__}")
        inner = os.path.join(directory, subfolder)
        if not os.path.isdir(inner):
            raise FileNotFoundError(
                f"{directory!r} has no subfolder {os.fspath(subfolder)!r}{_describe_directory(directory)}"
            )
        directory = inner
    return directory


def _describe_directory(directory: str) -> str:
    names = sorted(os.listdir(directory))
    hint = ""
    if "model_index.json" in names:
        subfolders = [n for n in names if os.path.isfile(os.path.join(directory, n, CONFIG_NAME))]
        hint = f"; it is a pipeline directory: pass subfolder= one of {subfolders}"
    shown = names if len(names) <= 20 else names[:20] + [f"... {len(names) - 20} more"]
    return f" (it holds {shown}){hint}"


def _read_config(config_file: str) -> dict[str, Any]:
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OSError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object; got a JSON {type(config).__name__}")
    return config


def _accepted_class_names(cls) -> list[str]:
    """``cls``'s name and those of its model base classes, so a subclass loads its parent's checkpoints."""
    # the model classes are those whose __init__ registers a config (ModelMixin's does not)
    return [c.__name__ for c in cls.__mro__
            if issubclass(c, ConfigMixin) and hasattr(c.__init__, "_config_signature")
            and not c.__name__.startswith("_")] + list(getattr(cls, "_diffusers_class_aliases", ()))


def _check_class_name(cls, config: Mapping[str, Any], config_file: str) -> None:
    if "_class_name" not in config:
        return
    class_name = config["_class_name"]
    accepted = _accepted_class_names(cls)
    if class_name not in accepted:
        raise ValueError(
            f"{config_file} describes a {class_name!r}, but {cls.__name__}.from_pretrained was called "
            f"(it accepts _class_name in {accepted}); load it with the {class_name} class, or check subfolder="
        )


def _find_weight_files(directory: str, variant: str | None, use_safetensors: bool | None) -> list[str]:
    """The weights files to read: a shard index when there is one, else the single file; safetensors
    first unless ``use_safetensors`` is False."""
    formats = {None: (True, False), True: (True,), False: (False,)}[use_safetensors]
    tried = []
    for safe in formats:
        index = os.path.join(directory, _add_variant(SAFETENSORS_INDEX_NAME if safe else WEIGHTS_INDEX_NAME,
                                                     variant))
        single = os.path.join(directory, _add_variant(SAFETENSORS_WEIGHTS_NAME if safe else WEIGHTS_NAME, variant))
        if os.path.isfile(index):
            return _read_shard_index(index)
        if os.path.isfile(single):
            return [single]
        tried += [os.path.basename(single), os.path.basename(index)]
    raise FileNotFoundError(
        f"no weights file in {directory}: looked for {tried}{_describe_directory(directory)}"
    )


def _read_shard_index(index_file: str) -> list[str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OSError(f"{index_file} is not valid JSON: {error}") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no 'weight_map' object naming the shard of each weight")
    directory = os.path.dirname(index_file)
    shards = [os.path.join(directory, name) for name in dict.fromkeys(weight_map.values())]
    absent = [os.path.basename(s) for s in shards if not os.path.isfile(s)]
    if absent:
        raise FileNotFoundError(f"{index_file} lists shards that are not in {directory}: {absent}")
    return shards


def _read_weight_files(files: list[str]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        shard = load_weights_file(path)
        repeated = sorted(set(shard) & set(state_dict))
        if repeated:
            raise ValueError(f"{path} repeats weights already read from another shard: {repeated}")
        state_dict.update(shard)
    return state_dict


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read one ``.safetensors`` or ``.bin`` weights file onto the CPU, as a ``{name: tensor}`` dict.

    ``.bin`` files are unpickled with ``weights_only=True``: they cannot run code. A file that cannot be
    read (truncated, not a checkpoint, a Git LFS pointer) raises OSError naming it.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".safetensors"):
            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise
    except Exception as error:
        raise OSError(f"cannot read weights file {path}: {_unreadable_reason(path, error)}") from error
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict of named tensors")
    not_tensors = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ValueError(f"{path} holds entries that are not tensors: {not_tensors}")
    return dict(state_dict)


def _unreadable_reason(path: str, error: Exception) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights (run `git lfs pull` in its repository)"
    return f"it is truncated or not a checkpoint ({type(error).__name__}: {error})"


# ------------------------------------------------------------------------------ state-dict conversion


def convert_deprecated_attention_names(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` with old attention names renamed under modules flagged
    ``_from_deprecated_attn_block``: ``query``/``key``/``value``/``proj_attn`` -> ``to_q``/``to_k``/``to_v``/
    ``to_out.0`` (weight and bias). An old name whose new name is also present is left as it is."""
    converted = dict(state_dict)
    for path, module in model.named_modules(remove_duplicate=False):
        if not getattr(module, "_from_deprecated_attn_block", False):
            continue
        prefix = f"{path}." if path else ""
        for old, new in _DEPRECATED_ATTENTION_NAMES:
            for leaf in ("weight", "bias"):
                old_key, new_key = f"{prefix}{old}.{leaf}", f"{prefix}{new}.{leaf}"
                if old_key in converted and new_key not in converted:
                    converted[new_key] = converted.pop(old_key)
    return converted


def load_diffusers_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                              source: str | None = None) -> None:
    """Load a diffusers-format state dict into ``model``, strictly, converting old attention names.

    Every entry is checked before any is copied: if a weight is missing, unexpected or of the wrong shape,
    one ValueError lists all of them and ``model`` is left untouched. Tied weights (one tensor under two
    names) may appear under either name. Values are cast to the dtype of the model's tensors. The caller's
    ``state_dict`` is not modified.

    Args:
        model: the module to load into.
        state_dict: ``{name: tensor}`` as diffusers' ``model.state_dict()`` would give.
        source: where ``state_dict`` came from, for the error message.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors; got {type(state_dict).__name__}")
    converted = convert_deprecated_attention_names(model, state_dict)
    expected = model.state_dict(keep_vars=True)

    # One tensor registered under several names is written by some savers under one name only.
    names_of = {}
    for key, tensor in expected.items():
        names_of.setdefault(id(tensor), []).append(key)
    for names in names_of.values():
        present = [n for n in names if n in converted]
        if present:
            for name in names:
                converted.setdefault(name, converted[present[0]])

    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    not_tensors = [k for k in converted if k in expected and not isinstance(converted[k], torch.Tensor)]
    mismatched = [
        (k, tuple(converted[k].shape), tuple(expected[k].shape)) for k in expected
        if k in converted and isinstance(converted[k], torch.Tensor) and converted[k].shape != expected[k].shape
    ]
    if missing or unexpected or not_tensors or mismatched:
        where = f" from {source}" if source else ""
        parts = [f"cannot load the state dict{where} into {type(model).__name__} (nothing was loaded):"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected}")
        if mismatched:
            lines = [f"  {k}: checkpoint {list(got)}, model {list(want)}" for k, got, want in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es):\n" + "\n".join(lines))
        if not_tensors:
            parts.append(f"{len(not_tensors)} value(s) that are not tensors: {not_tensors}")
        raise ValueError("\n".join(parts))
    model.load_state_dict(converted, strict=True)
