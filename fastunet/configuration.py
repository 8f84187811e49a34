"""Model configs in diffusers' format: the constructor arguments, recorded as a read-only mapping.

A model class decorates its ``__init__`` with :func:`register_to_config`; the bound arguments (with
defaults filled in) become ``model.config``, which is written to ``config.json`` by
``save_pretrained``/``save_config`` and read back by ``from_config``/``from_pretrained``.

The decorator *sets* a new instance's config; the method of the same name,
:meth:`ConfigMixin.register_to_config`, *updates* an existing one (diffusers' semantics: the entries
given are added or replaced, nothing is rebuilt).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import json
import re
import types
import typing
import warnings
from typing import Any, Callable, Mapping


class FrozenConfig(dict):
    """A dict that also answers attribute access (``config.in_channels``) and refuses mutation."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no entry {name!r}") from None

    def _immutable(self, *args, **kwargs):
        raise TypeError("a model config is read-only; build a new model with from_config(..., key=value)")

    __setitem__ = __delitem__ = __setattr__ = _immutable
    pop = popitem = clear = update = setdefault = _immutable

    def __reduce__(self):
        # rebuilt from a plain dict: copy.deepcopy and pickle would otherwise refill it item by item
        return type(self), (dict(self),)

    def to_json_string(self) -> str:
        return json.dumps(_jsonable(dict(self)), indent=2, sort_keys=True) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def register_to_config(init: Callable) -> Callable:
    """Decorate a model's ``__init__`` so that its bound arguments become ``self.config``."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(name, {}))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                values.pop(name, None)
        init(self, *args, **kwargs)
        object.__setattr__(self, "_config", FrozenConfig(values))

    wrapper._config_signature = signature
    return wrapper


def init_parameter_names(cls) -> list[str]:
    """The keyword arguments a config-registered class accepts."""
    signature = getattr(cls.__init__, "_config_signature", None) or inspect.signature(cls.__init__)
    return [
        n for n, p in signature.parameters.items()
        if n != "self" and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]


def reject_unsupported(owner: str, name: str, value, supported: tuple) -> None:
    """Raise ``NotImplementedError`` naming ``owner``, the option and the supported values when
    ``value`` is not one of ``supported`` (diffusers options that fastunet does not implement)."""
    if value not in supported:
        raise NotImplementedError(f"{owner}: {name}={value!r} is not supported by fastunet (supported: "
                                  f"{', '.join(repr(v) for v in supported)})")


# Entries whose integers count or size something: a negative one is never meaningful.
_COUNTS = re.compile(r"channels|layers|heads|groups|_dim$|_dim_|sample_size")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON ``value`` can be what ``hint`` describes. Only the plain parts of the typing language
    are checked (``int``, ``float``, ``bool``, ``str``, unions, ``Sequence``/``tuple``/``list`` of them,
    ``dict``, ``Literal``); anything else, and ``None``, pass (the constructor judges those). A string is
    not taken for a sequence, ``True`` not for a number, and an int is accepted as a float."""
    if value is None or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return False
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(any(_matches(v, a) for a in args) for v in value)
    if container in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return True


def _describe_hint(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def _negative_ints(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_negative_ints(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value < 0


def config_problems(cls, entries: Mapping[str, Any]) -> list[str]:
    """What is wrong with the types of ``entries`` (``cls``'s constructor arguments as read from a
    config.json), judged by the annotations of ``cls.__init__``: one line per entry, empty when none is.
    Negative numbers are refused where the entry counts or sizes something (channels, layers, heads,
    groups, dimensions)."""
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # annotations that cannot be resolved here: nothing to judge by
        hints = {}
    problems = []
    for key, value in entries.items():
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            problems.append(f"{key}={value!r} (a JSON {type(value).__name__}): expected {_describe_hint(hint)}")
        elif _COUNTS.search(key) and _negative_ints(value):
            problems.append(f"{key}={value!r}: a count or size cannot be negative")
    return problems


class ConfigMixin:
    """``config``, ``register_to_config`` and ``from_config`` for classes whose ``__init__`` uses the
    :func:`register_to_config` decorator."""

    config_name = "config.json"

    def register_to_config(self, **entries: Any) -> None:
        """Add or replace entries of ``self.config`` (the model itself is not rebuilt).

        diffusers' ``ConfigMixin.register_to_config``: ``model.register_to_config(sample_size=96)`` makes
        ``model.config.sample_size == 96`` and ``save_pretrained``/``save_config`` write it. A ``kwargs``
        entry is dropped, as diffusers does.
        """
        entries.pop("kwargs", None)
        current = self.__dict__.get("_config") or {}
        object.__setattr__(self, "_config", FrozenConfig({**current, **entries}))

    def _config_entry(self, name: str) -> tuple[bool, Any]:
        """``(True, value)`` when ``name`` is a config entry, else ``(False, None)``; for diffusers'
        deprecated ``model.<config entry>`` reads."""
        config = self.__dict__.get("_config")
        if config is not None and name in config:
            return True, config[name]
        return False, None

    @property
    def config(self) -> FrozenConfig:
        # the instance dict, not object.__getattribute__: torch.compile traces this without a graph break
        config = self.__dict__.get("_config")
        if config is None:
            raise AttributeError(f"{type(self).__name__}.__init__ is not decorated with register_to_config")
        return config

    def _set_config_metadata(self, **entries: Any) -> None:
        """Record private entries (``_name_or_path``, ...) next to the constructor arguments in ``config``."""
        public = sorted(k for k in entries if not k.startswith("_"))
        if public:
            raise ValueError(f"config metadata names start with '_'; got {public}")
        self.register_to_config(**entries)

    @classmethod
    def extract_init_kwargs(cls, config: Mapping[str, Any], warn: bool = True) -> dict[str, Any]:
        """Keep the entries of ``config`` that ``cls(**kwargs)`` accepts; warn about the others.

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are metadata and
        dropped silently.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (dict or model.config); got {type(config).__name__}")
        accepted = set(init_parameter_names(cls))
        kwargs, unknown = {}, []
        for key, value in config.items():
            if key in accepted:
                kwargs[key] = value
            elif not key.startswith("_"):
                unknown.append(key)
        if unknown and warn:
            warnings.warn(
                f"{cls.__name__} ignores unknown config keys: {sorted(unknown)}", UserWarning, stacklevel=3
            )
        return kwargs

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False,
                    **overrides):
        """Build a model from a config mapping (e.g. another model's ``.config`` or ``load_config``'s dict)
        plus keyword overrides, as diffusers' ``from_config``.

        Entries the class does not accept are ignored with a warning; private entries (``_class_name``,
        ``_name_or_path``, ...) are recorded in the new model's config, ``_class_name`` naming ``cls``;
        entries listed in ``_use_default_values`` (diffusers records those it filled from defaults) take
        ``cls``'s defaults. ``return_unused_kwargs=True`` returns ``(model, unused)``: the ignored and the
        private entries.
        """
        if config is None:
            config = {}
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (dict or model.config; read a directory with "
                            f"{cls.__name__}.load_config first); got {type(config).__name__}")
        config = dict(config)
        defaults_used = set(config.pop("_use_default_values", None) or ())
        config = {k: v for k, v in config.items() if k not in defaults_used}
        accepted = set(init_parameter_names(cls))
        kwargs = cls.extract_init_kwargs(config)
        kwargs.update(cls.extract_init_kwargs(overrides, warn=not return_unused_kwargs))
        model = cls(**kwargs)
        private = {k: v for k, v in config.items() if k.startswith("_")}
        if "_class_name" in private:
            private["_class_name"] = cls.__name__
        model.register_to_config(**private)
        if not return_unused_kwargs:
            return model
        unused = {k: v for k, v in {**config, **overrides}.items() if k not in accepted and not k.startswith("_")}
        return model, {**unused, **private}
