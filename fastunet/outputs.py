"""``ModelOutput``: the base of the models' outputs, with the semantics of diffusers' ``BaseOutput``.

An output is declared as a dataclass subclass and is, at the same time, an ordered dict of its fields::

    @dataclass
    class UNet2DOutput(ModelOutput):
        sample: torch.Tensor

    out = UNet2DOutput(sample=x)
    out.sample is out["sample"] is out[0]          # attribute, key, position
    list(out.keys()) == ["sample"]; out.to_tuple() == (x,); isinstance(out, dict)

Fields whose value is ``None`` are left out of the dict (and so of ``keys()``, ``len()``, ``to_tuple()``
and integer indexing), as diffusers does. Attribute and dict entry stay in step whichever is set.
Iterating yields the keys, like any dict: unpack ``out.to_tuple()``, not ``out``. Entries cannot be
deleted (``del``, ``pop``, ``update``, ``setdefault`` raise ``TypeError``). Outputs pickle, and each
subclass is registered as a pytree node so that ``torch.compile``/``torch.export`` and DDP see through it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any

import torch.utils._pytree as pytree


def _flatten(output: "ModelOutput"):
    return list(output.values()), list(output.keys())


def _unflatten_to(cls):
    def unflatten(values, keys):
        entries = dict(zip(keys, values))
        names = {f.name for f in fields(cls)}
        output = cls(**{k: v for k, v in entries.items() if k in names})
        for key, value in entries.items():
            if key not in names:
                output[key] = value
        return output

    return unflatten


class ModelOutput(OrderedDict):
    """An ordered dict of a dataclass's non-``None`` fields that also reads as attributes and as a tuple."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(cls, _flatten, _unflatten_to(cls),
                                    serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")

    def _field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self)) if is_dataclass(self) else ()

    def __post_init__(self) -> None:
        names = self._field_names()
        if not names:
            raise ValueError(f"{type(self).__name__} declares no fields; an output needs at least one")
        first = getattr(self, names[0])
        # One dict given as the first field (the others None): its items are the entries.
        if isinstance(first, dict) and all(getattr(self, n) is None for n in names[1:]):
            OrderedDict.__delitem__(self, names[0])
            for key, value in first.items():
                self[key] = value

    def _store(self, name: str, value: Any) -> None:
        """Set dict entry ``name`` to ``value``, or drop it for ``None``; entries keep the field order."""
        if value is None:
            if name in self:
                OrderedDict.__delitem__(self, name)
            return
        was_present = name in self
        OrderedDict.__setitem__(self, name, value)
        if not was_present:
            order = {n: i for i, n in enumerate(self._field_names())}
            for key in sorted(self.keys(), key=lambda k: order.get(k, len(order))):
                self.move_to_end(key)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._field_names() or name in self:
            self._store(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        self._store(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key):
        """``out["sample"]`` by name; ``out[0]`` or ``out[1:]`` by position among the non-``None`` entries."""
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} entries cannot be removed or bulk-updated; set the attribute "
                        "or the key instead")

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse

    def __reduce__(self):
        names = self._field_names()
        extra = [(k, v) for k, v in self.items() if k not in names]
        return type(self), tuple(getattr(self, n) for n in names), None, None, iter(extra)

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-``None`` entries, in field order."""
        return tuple(self.values())
