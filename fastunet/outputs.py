"""``ModelOutput``: the dataclass base of the models' outputs, read like diffusers' ``BaseOutput``."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class ModelOutput:
    """A dataclass that also reads as a tuple: ``out[0]``, ``out["sample"]``, ``out.to_tuple()``,
    ``(sample,) = out`` and ``len(out)``."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(fields(self))
