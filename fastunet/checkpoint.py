"""Checkpoints in diffusers' on-disk format, read from and written to local directories only.

A checkpoint directory holds

* ``config.json``: the model's constructor arguments plus ``_class_name`` and ``_diffusers_version``,
  written as ``json.dumps(..., indent=2, sort_keys=True)`` and a trailing newline, as diffusers does;
* the weights: ``diffusion_pytorch_model.safetensors`` (metadata ``{"format": "pt"}``), or the pickled
  ``diffusion_pytorch_model.bin``; a variant inserts its name before the extension
  (``diffusion_pytorch_model.fp16.safetensors``); a large checkpoint written by diffusers may be split in
  shards listed by ``diffusion_pytorch_model.safetensors.index.json``.

Loading is all or nothing: the files are read, the state dict is checked against the model (missing,
unexpected, wrongly shaped and wrongly typed entries are reported together) and only then copied into it;
:func:`check_state_dict` gives ``ModelMixin.load_state_dict`` the same guarantee. ``config.json`` entries
are checked against the annotations of the model's constructor before it is built. A directory with both
``.safetensors`` and ``.bin`` weights is read from the ``.safetensors``, as diffusers reads it.
``.bin`` files are unpickled with ``weights_only=True``. Safetensors files have no checksum: damage to the
header is caught (by the JSON parser, or by the checks of names, dtypes, shapes and offsets against the
file and the model), but flipped bits in the tensor data load as different values.

Saving never leaves a directory that loads one model's config with another's weights: every file is
written under a temporary name first, and ``config.json`` is removed before the weights are swapped in
and written back last (see :func:`_commit`). Checkpoints
from before diffusers renamed the attention weights (``query``/``key``/``value``/``proj_attn`` instead of
``to_q``/``to_k``/``to_v``/``to_out.0``) are converted, but only under modules flagged
``_from_deprecated_attn_block``: other modules may use those names for their own weights.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import struct
import threading
import uuid
import warnings
import zipfile
from pathlib import PurePath
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from .configuration import ConfigMixin, config_problems, init_parameter_names

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

DEFAULT_MAX_SHARD_SIZE = "10GB"
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------- saving


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, safe_serialization: bool = True,
                    variant: str | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """Write ``model`` to ``save_directory`` (created if needed) as diffusers' ``save_pretrained`` does.

    Args:
        model: a config-registered model (``model.config`` holds its constructor arguments).
        save_directory: the directory to write ``config.json`` and the weights into.
        safe_serialization: write ``.safetensors`` (default) or ``torch.save`` pickles ``.bin``.
        variant: optional weights-name variant, e.g. ``"fp16"`` -> ``diffusion_pytorch_model.fp16.safetensors``.
        max_shard_size: the largest weights file, in bytes or as a string with a decimal unit (``"200MB"``,
            ``"10GB"``; KB, MB, GB, TB). Larger weights are split as diffusers splits them: tensors in state-dict
            order, a new shard whenever the next tensor would overflow the current one (a tensor larger than
            the limit gets a shard of its own), written as ``diffusion_pytorch_model-00001-of-00003.safetensors``
            (``diffusion_pytorch_model.fp16-00001-of-00003.safetensors`` for a variant) and listed by
            ``diffusion_pytorch_model.safetensors.index.json`` (``...safetensors.index.fp16.json``):
            ``{"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}``.

    Tensors that share memory (tied weights) are each written in full, and non-contiguous ones made
    contiguous, so that diffusers reads the result as it is. Weights files of an earlier save in the same
    format and variant that the new save does not overwrite are removed, so they cannot shadow it.
    """
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path (str or os.PathLike); got {type(save_directory).__name__}")
    _check_variant(variant)
    limit = parse_shard_size(max_shard_size)
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_directory {directory!r} exists and is not a directory")

    config_text = config_to_json_string(model)
    original = model.state_dict()
    state_dict = _saveable_state_dict(original)
    single = _add_variant(SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME, variant)
    shards, total_size = _plan_shards(original, limit)
    if len(shards) == 1:
        files = {single: shards[0]}
    else:
        stem, extension = single.rsplit(".", 1)
        files = {f"{stem}-{i:05d}-of-{len(shards):05d}.{extension}": names for i, names in enumerate(shards, 1)}
    index_name = _add_variant(SAFETENSORS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME, variant)
    writers = {}
    for name, names in files.items():
        shard = {key: state_dict[key] for key in names}
        if safe_serialization:
            writers[name] = lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"})
        else:
            writers[name] = lambda tmp, shard=shard: torch.save(shard, tmp)
    if len(files) > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {key: name for name, names in files.items() for key in names}}
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        writers[index_name] = lambda tmp: _write_text(tmp, index_text)
    os.makedirs(directory, exist_ok=True)
    _commit(directory, writers, config_text,
            stale=lambda: _remove_stale_weights(directory, safe_serialization, variant,
                                                keep=set(files) | ({index_name} if len(files) > 1 else set())))
    if not safe_serialization:
        shadowing = [n for n in (_add_variant(SAFETENSORS_INDEX_NAME, variant),
                                 _add_variant(SAFETENSORS_WEIGHTS_NAME, variant))
                     if os.path.isfile(os.path.join(directory, n))]
        if shadowing:
            warnings.warn(
                f"{directory} also holds {shadowing[0]}, which loaders (diffusers' and fastunet's) read in "
                f"preference to the {index_name if len(files) > 1 else single} just written", UserWarning,
                stacklevel=3,
            )


def save_config(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write ``model``'s ``config.json`` (as :func:`save_pretrained` writes it) into ``save_directory``."""
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path (str or os.PathLike); got {type(save_directory).__name__}")
    directory = os.fspath(save_directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"save_directory {directory!r} exists and is not a directory")
    text = config_to_json_string(model)
    os.makedirs(directory, exist_ok=True)
    _write_atomically(os.path.join(directory, CONFIG_NAME), lambda tmp: _write_text(tmp, text))


def load_config(path: str | os.PathLike, subfolder: str | None = None,
                **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, unused)``: the entries of ``path/[subfolder/]config.json`` (or of ``path`` when it is the
    file itself) as written, and the keyword arguments other than diffusers' download options."""
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        config_file = os.fspath(path)
    else:
        directory = _resolve_directory(path, subfolder)
        config_file = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}{_describe_directory(directory)}")
    unused = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS + _NO_EFFECT_KWARGS + ("mirror", "user_agent")}
    return _read_config(config_file), unused


def parse_shard_size(size: int | str) -> int:
    """``max_shard_size`` in bytes: a positive int, or a string of a number and a decimal unit
    (``"200MB"`` = 200 * 10**6, ``"10GB"``, ``"1.5GB"``; KB, MB, GB, TB, any case), as diffusers reads it."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size must be positive; got {size}")
        return size
    if not isinstance(size, str):
        raise TypeError(f"max_shard_size must be an int (bytes) or a string such as '10GB'; got {size!r}")
    text = size.strip()
    unit = text[-2:].upper()
    if unit not in _SIZE_UNITS:
        raise ValueError(f"max_shard_size must end in one of {list(_SIZE_UNITS)} (e.g. '200MB'); got {size!r}")
    try:
        value = float(text[:-2].strip())
    except ValueError:
        raise ValueError(f"max_shard_size must be a number followed by a unit (e.g. '200MB'); got {size!r}") from None
    if not value > 0:
        raise ValueError(f"max_shard_size must be positive; got {size!r}")
    return int(value * _SIZE_UNITS[unit])


def _plan_shards(state_dict: Mapping[str, torch.Tensor], limit: int) -> tuple[list[list[str]], int]:
    """The names in each shard, and the total bytes, as diffusers (through huggingface_hub) plans them.

    Sizes are those of each tensor's storage; names sharing one storage go into the shard of the first
    and are counted once. A tensor larger than ``limit`` gets a shard of its own, placed before the shard
    being filled.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = total = 0
    first_of_storage: dict[tuple, str] = {}
    followers: dict[str, list[str]] = {}
    for key, tensor in state_dict.items():
        storage = tensor.untyped_storage()
        storage_id = (tensor.device, storage.data_ptr(), storage.nbytes())
        if storage_id in first_of_storage:
            followers[first_of_storage[storage_id]].append(key)
            continue
        first_of_storage[storage_id] = key
        followers[key] = []
        size = storage.nbytes()
        total += size
        if size > limit:
            shards.append([key])
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current:
        shards.append(current)
    shards = [[k for key in shard for k in (key, *followers[key])] for shard in shards] or [[]]
    return shards, total


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


def _stage(directory: str, name: str, write) -> str:
    """Write ``name`` through ``write(path)`` to a new hidden temporary file in ``directory``, flushed to
    disk, and return its path; on failure nothing is left behind."""
    # a fresh name per call (not mkstemp: the writer creates the file, with the usual permissions)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return tmp


def _sync_directory(directory: str) -> None:
    """Make the renames in ``directory`` durable (where the platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(path: str, write) -> None:
    """Write through a temporary file in the same directory, so a failure never leaves half a file."""
    directory, name = os.path.split(path)
    tmp = _stage(directory, name, write)
    try:
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _sync_directory(directory)


def _commit(directory: str, writers: Mapping[str, Any], config_text: str, stale) -> None:
    """Replace the weights files (``writers``: final name -> ``write(path)``) and ``config.json`` of
    ``directory`` so that no moment of the save, nor a failure at any point, leaves a checkpoint that loads
    one model's config with another's weights.

    1. Every file is written under a temporary name first. A failure here (a full disk, an error in the
       writer, an interrupt) removes those files: the directory holds the previous checkpoint, untouched.
       The price is the disk space of both checkpoints for the duration of the save.
    2. The previous ``config.json`` is removed, then the weights (and shard index) are renamed into place
       and stale ones deleted, and the new ``config.json`` is renamed in last. Killed in between, the
       directory has no config.json: loading it fails ("no config.json in ...") rather than combining
       the new config with old weights or the reverse.
    """
    staged = {}
    try:
        for name, write in writers.items():
            staged[name] = _stage(directory, name, write)
        staged[CONFIG_NAME] = _stage(directory, CONFIG_NAME, lambda tmp: _write_text(tmp, config_text))
        config_path = os.path.join(directory, CONFIG_NAME)
        if os.path.lexists(config_path):
            os.remove(config_path)
            _sync_directory(directory)
        for name in writers:
            os.replace(staged.pop(name), os.path.join(directory, name))
        stale()
        _sync_directory(directory)
        os.replace(staged.pop(CONFIG_NAME), config_path)
        _sync_directory(directory)
    finally:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _remove_stale_weights(directory: str, safe_serialization: bool, variant: str | None, keep: set[str]) -> None:
    """Delete the weights files of an earlier save in this format and variant (the single file, its
    shards and their index) that are not in ``keep``: an index left behind would take precedence over a
    new single file, and a single file would sit unused beside new shards."""
    extension = "safetensors" if safe_serialization else "bin"
    single = _add_variant(SAFETENSORS_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME, variant)
    index = _add_variant(SAFETENSORS_INDEX_NAME if safe_serialization else WEIGHTS_INDEX_NAME, variant)
    stem = re.escape(single.rsplit(".", 1)[0])
    shard = re.compile(rf"^{stem}-\d+-of-\d+\.{extension}$")
    for name in os.listdir(directory):
        if name not in keep and (name in (single, index) or shard.match(name)):
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
    problems = config_problems(cls, init_kwargs)
    if problems:
        raise ValueError(f"{config_file} has entries of the wrong type for {cls.__name__}:\n  " + "\n  ".join(problems))
    init_kwargs.update(overrides)

    weight_files = _find_weight_files(directory, variant, use_safetensors)

    try:
        with _SkipRandomInit(), _parameters_on_meta():
            model = cls(**init_kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        error.add_note(f"while building {cls.__name__} from {config_file}")
        raise
    if torch_dtype is not None:
        _cast_floating(model, torch_dtype, keep_in_fp32=getattr(cls, "_keep_in_fp32_modules", None) or ())
    # each tensor is cast to the dtype of the model entry it loads into as soon as it is read
    targets = {key: t.dtype for key, t in model.state_dict(keep_vars=True).items()}
    state_dict = _read_weight_files(weight_files, model=model, targets=targets)
    load_diffusers_state_dict(model, state_dict, source=weight_files[0] if len(weight_files) == 1 else directory,
                              assign=True)
    model.eval()
    model._set_config_metadata(_name_or_path=os.fspath(pretrained_model_name_or_path))
    if output_loading_info:
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    return model


class _SkipRandomInit(TorchFunctionMode):
    """Within this mode (on this thread only), random weight initialisation is skipped, leaving the freshly
    allocated values as they are: the strict load that follows replaces every parameter and persistent
    buffer. Drawing them would advance the caller's random stream. (A non-persistent buffer drawn at
    random in ``__init__`` would stay uninitialised; no UNet has one: theirs are computed, like positional
    tables.)"""

    _SKIPPED = frozenset({
        torch.Tensor.uniform_, torch.Tensor.normal_, nn.init.uniform_, nn.init.normal_, nn.init.trunc_normal_,
        nn.init.kaiming_uniform_, nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
        nn.init.orthogonal_, nn.init.sparse_,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


_meta_thread = threading.local()
_meta_lock = threading.Lock()
_meta_users = 0
_register_parameter = nn.Module.register_parameter


def _register_parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """``nn.Module.register_parameter``, moving the parameter to the meta device inside
    :func:`_parameters_on_meta` on this thread."""
    _register_parameter(module, name, param)
    if param is not None and getattr(_meta_thread, "depth", 0) and param.device.type != "meta":
        module._parameters[name] = type(param)(param.detach().to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta():
    """Within this context (on this thread), modules built register their parameters on the meta device:
    no memory is allocated for weights that the load replaces. Buffers are built as usual, on the CPU, so
    computed tables (non-persistent buffers included) hold their real values. Other threads building
    modules meanwhile are unaffected."""
    global _meta_users
    with _meta_lock:
        if _meta_users == 0:
            nn.Module.register_parameter = _register_parameter_on_meta
        _meta_users += 1
    _meta_thread.depth = getattr(_meta_thread, "depth", 0) + 1
    try:
        yield
    finally:
        _meta_thread.depth -= 1
        with _meta_lock:
            _meta_users -= 1
            if _meta_users == 0:
                nn.Module.register_parameter = _register_parameter


def _cast_floating(model: nn.Module, dtype: torch.dtype, keep_in_fp32: tuple[str, ...] | list[str]) -> None:
    """``model.to(dtype)`` (cheap here: parameters are on meta), except that modules whose path contains
    one of ``keep_in_fp32`` stay in float32, as diffusers' ``from_pretrained`` keeps them."""
    model.to(dtype=dtype)
    if keep_in_fp32 and dtype != torch.float32:
        for path, module in model.named_modules():
            if any(pattern in path.split(".") for pattern in keep_in_fp32):
                module.to(dtype=torch.float32)


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


def _read_weight_files(files: list[str], model: nn.Module | None = None,
                       targets: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` (shards of one checkpoint), each floating-point one cast as soon as it
    is read to ``targets[name]`` (``name`` after renaming old attention names under ``model``)."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in files:
        names = _weights_file_names(path)
        repeated = sorted(set(names) & set(state_dict))
        if repeated:
            raise ValueError(f"{path} repeats weights already read from another shard: {repeated}")
        dtype_of = {}
        if targets:
            renamed = (convert_deprecated_attention_names(model, {n: n for n in names}) if model is not None
                       else {n: n for n in names})
            dtype_of = {old: targets[new] for new, old in renamed.items() if new in targets}
        state_dict.update(load_weights_file(path, dtype_of=dtype_of))
    return state_dict


def _weights_file_names(path: str) -> list[str]:
    """The tensor names in a weights file (read from the header alone for safetensors)."""
    if path.endswith(".safetensors"):
        try:
            with open(path, "rb") as f:
                return list(_read_safetensors_header(f, os.fstat(f.fileno()).st_size)[1])
        except FileNotFoundError:
            raise
        except Exception as error:
            raise OSError(f"cannot read weights file {path}: {_unreadable_reason(path, error)}") from error
    return []  # a .bin's names come with its tensors; repeats are caught by the caller's next shard


def load_weights_file(path: str | os.PathLike,
                      dtype_of: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
    """Read one ``.safetensors`` or ``.bin`` weights file onto the CPU, as a ``{name: tensor}`` dict.

    ``dtype_of`` maps names to the dtype a floating-point tensor is cast to as it is read (integer tensors
    keep theirs), so that a cast load never holds the file's copy of more than one tensor. Safetensors
    tensors are read straight into their own memory (no memory map kept): a file costs its size once.
    ``.bin`` files are unpickled with ``weights_only=True`` (they cannot run code), memory-mapped when they
    are zip archives, and each tensor copied out of the map. A file that cannot be read (truncated, not a
    checkpoint, a Git LFS pointer) raises OSError naming it.
    """
    path = os.fspath(path)
    dtype_of = dtype_of or {}
    try:
        if path.endswith(".safetensors"):
            state_dict = _read_safetensors(path, dtype_of)
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
    if path.endswith(".safetensors"):
        return dict(state_dict)
    # copied out of the memory map: the model must not depend on the file staying as it is
    return {k: v.to(dtype=_cast_target(v.dtype, dtype_of.get(k)), copy=True) for k, v in state_dict.items()}


def _cast_target(stored: torch.dtype, wanted: torch.dtype | None) -> torch.dtype:
    return wanted if wanted is not None and stored.is_floating_point and wanted.is_floating_point else stored


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}

# Larger headers are refused, as the safetensors library refuses them (a corrupt length would otherwise
# ask for an absurd read).
_MAX_SAFETENSORS_HEADER = 100_000_000


def _read_safetensors_header(f, file_size: int) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """``(data start, {name: (dtype, shape, begin, end)})`` of an open safetensors file, every entry checked
    against the file's size. Format: an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data."""
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("the file is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", head)
    if length > min(_MAX_SAFETENSORS_HEADER, file_size - 8):
        raise ValueError(f"the header length {length} does not fit in the file ({file_size} bytes)")
    header = json.loads(f.read(length).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    data_start, data_size = 8 + length, file_size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
        if (dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"the header entry of {name!r} is malformed: {entry!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= data_size or end - begin != numel * dtype.itemsize:
            raise ValueError(f"the data of {name!r} ({offsets}) does not match its shape {shape} and dtype "
                             f"{entry['dtype']} or lies past the end of the file")
        entries[name] = (dtype, shape, begin, end)
    return data_start, entries


def _read_safetensors(path: str, dtype_of: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Read a safetensors file tensor by tensor into freshly allocated memory (``readinto``, no memory
    map), casting floating-point tensors to ``dtype_of[name]`` as they arrive."""
    state_dict = {}
    with open(path, "rb", buffering=0) as f:
        data_start, entries = _read_safetensors_header(f, os.fstat(f.fileno()).st_size)
        for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda item: item[1][2]):
            tensor = torch.empty(shape, dtype=dtype)
            if end > begin:
                buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                f.seek(data_start + begin)
                filled = 0
                while filled < end - begin:
                    count = f.readinto(buffer[filled:])
                    if not count:
                        raise ValueError(f"the file ends inside the data of {name!r}")
                    filled += count
            target = _cast_target(dtype, dtype_of.get(name))
            state_dict[name] = tensor if target == dtype else tensor.to(target)
    return state_dict


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
                              source: str | None = None, assign: bool = False) -> None:
    """Load a diffusers-format state dict into ``model``, strictly, converting old attention names.

    Every entry is checked before any is copied: if a weight is missing, unexpected, of the wrong shape or
    of the wrong kind (integer or boolean data for a floating-point weight, or the reverse), one ValueError
    lists all of them and ``model`` is left untouched. Tied weights (one tensor under two
    names) may appear under either name. Values are cast to the dtype of the model's tensors. The caller's
    ``state_dict`` is not modified.

    Args:
        model: the module to load into.
        state_dict: ``{name: tensor}`` as diffusers' ``model.state_dict()`` would give.
        source: where ``state_dict`` came from, for the error message.
        assign: make the (cast) tensors of ``state_dict`` the model's parameters and buffers instead of
            copying them in (``load_state_dict(assign=True)``): a model built on the meta device is
            filled without a second copy. Tied weights stay tied; ``requires_grad`` is kept.
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
    wrong_kind = [
        (k, converted[k].dtype, expected[k].dtype) for k in expected
        if k in converted and isinstance(converted[k], torch.Tensor) and converted[k].shape == expected[k].shape
        and _dtype_kind(converted[k].dtype) != _dtype_kind(expected[k].dtype)
    ]
    if missing or unexpected or not_tensors or mismatched or wrong_kind:
        where = f" from {source}" if source else ""
        parts = [f"cannot load the state dict{where} into {type(model).__name__} (nothing was loaded):"]
        if missing:
            parts.append(f"{len(missing)} missing key(s): {missing}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {unexpected}")
        if mismatched:
            lines = [f"  {k}: checkpoint {list(got)}, model {list(want)}" for k, got, want in mismatched]
            parts.append(f"{len(mismatched)} shape mismatch(es):\n" + "\n".join(lines))
        if wrong_kind:
            lines = [f"  {k}: checkpoint {got}, model {want}" for k, got, want in wrong_kind]
            parts.append(f"{len(wrong_kind)} dtype mismatch(es) (only floating-point values are cast):\n"
                         + "\n".join(lines))
        if not_tensors:
            parts.append(f"{len(not_tensors)} value(s) that are not tensors: {not_tensors}")
        raise ValueError("\n".join(parts))
    if not assign:
        model.load_state_dict(converted, strict=True)
        return
    assigned = {}
    for names in names_of.values():
        want = expected[names[0]]
        value = converted[names[0]].detach()
        value = value.to(dtype=_cast_target(value.dtype, want.dtype) if want.is_floating_point() else want.dtype)
        if isinstance(want, nn.Parameter):
            # one Parameter object for every name of a tied weight, so the assignment keeps them tied
            value = type(want)(value, requires_grad=want.requires_grad)
        for name in names:
            assigned[name] = value
    model.load_state_dict(assigned, strict=True, assign=True)
    left = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
            if t.device.type == "meta"]
    if left:
        raise ValueError(f"{type(model).__name__} still has tensors on the meta device after loading (they are "
                         f"not in its state dict, so no checkpoint can fill them): {left}")


# ------------------------------------------------------------------------------------- atomic loads
#
# torch's ``Module.load_state_dict`` copies module by module and reports problems at the end: a state
# dict with one wrongly shaped or missing entry raises, but every entry before it (and, for missing and
# unexpected keys, every other entry) has already been copied. The functions below look at every entry
# first and copy nothing unless all of them can be loaded.


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating-point"
    if dtype.is_complex:
        return "complex"
    return "boolean" if dtype == torch.bool else "integer"


def _entry_problem(key: str, value: Any, target: torch.Tensor, assign: bool) -> str | None:
    """Why ``value`` cannot be loaded into the model's ``target`` under ``key`` (None when it can).

    Shapes must match (torch's one exception: a one-element 1-D tensor fills a 0-D one). Values are cast
    by ``copy_``, which is harmless between floating-point dtypes but would silently turn integer or
    boolean data into weights (or truncate floats into an integer buffer): the kinds must match.
    """
    if not isinstance(value, torch.Tensor):
        return f"{key}: expected a tensor, the state dict holds a {type(value).__name__}"
    if not torch.nn.parameter.is_lazy(target):
        shape, wanted = tuple(value.shape), tuple(target.shape)
        if shape != wanted and not (wanted == () and shape == (1,)):
            return (f"size mismatch for {key}: copying a param with shape {list(shape)} from checkpoint, "
                    f"the shape in current model is {list(wanted)}")
    if _dtype_kind(value.dtype) != _dtype_kind(target.dtype):
        return (f"dtype mismatch for {key}: the state dict holds {_dtype_kind(value.dtype)} {value.dtype}, the "
                f"model's tensor is {_dtype_kind(target.dtype)} {target.dtype} (only floating-point values are "
                "cast on load)")
    if value.is_meta and not target.is_meta and not assign:
        return (f"{key}: the state dict's tensor is on the meta device and holds no values to copy (pass "
                "assign=True to make it the model's tensor)")
    return None


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False,
                     prefixes: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Check that ``model.load_state_dict(state_dict, strict=strict, assign=assign)`` can load every entry,
    before anything is copied; return ``(missing_keys, unexpected_keys)`` as torch would report them.

    ``prefixes`` restricts the check to the model's entries under those module paths (and the state dict's
    entries under them; the others are ignored); every such model entry must then be given.

    Raises:
        TypeError: ``state_dict`` is not a mapping.
        RuntimeError: one message, in torch's wording, naming every missing (under ``strict``), unexpected
            (under ``strict``), wrongly shaped, wrongly typed or non-tensor entry, each with what the model
            expects and what the state dict holds.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
    expected = model.state_dict(keep_vars=True)
    given = list(state_dict)
    if prefixes is not None:
        roots = tuple(f"{p}." for p in prefixes)
        expected = {k: v for k, v in expected.items() if k.startswith(roots)}
        given = [k for k in given if isinstance(k, str) and k.startswith(roots)]
        strict = True
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in given if k not in expected]
    problems = [p for k in given if k in expected
                for p in [_entry_problem(k, state_dict[k], expected[k], assign)] if p is not None]
    if problems or (strict and (missing or unexpected)):
        lines = []
        if strict and missing:
            lines.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
        if strict and unexpected:
            lines.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
        lines += [f"{p}." for p in problems]
        raise RuntimeError(f"Error(s) in loading state_dict for {type(model).__name__} (nothing was loaded, the "
                           f"model is unchanged):\n\t" + "\n\t".join(lines))
    return missing, unexpected


def load_state_dict_under(model: nn.Module, state_dict: Mapping[str, Any], prefixes: list[str]) -> None:
    """Load the entries of ``state_dict`` under the module paths ``prefixes`` into those sub-modules of
    ``model``, all or nothing: every model entry under them must be present, of the right shape and kind
    (see :func:`check_state_dict`), or a RuntimeError names each problem and nothing is copied. Entries
    of ``state_dict`` outside ``prefixes`` are ignored. For example the motion modules of an adapter whose
    state dict uses the UNet's names::

        load_state_dict_under(unet, adapter.state_dict(),
                              [n for n, _ in unet.named_modules() if n.endswith("motion_modules")])
    """
    modules = {prefix: model.get_submodule(prefix) for prefix in prefixes}  # an unknown path raises here
    check_state_dict(model, state_dict, prefixes=list(modules))
    for prefix, module in modules.items():
        root = f"{prefix}."
        part = {k[len(root):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(root)}
        module.load_state_dict(part, strict=True)
