"""Count the full-size copies and allocations a forward pass makes, from the aten ops it dispatches.

    with FullSizeCounter(threshold=x.numel()) as counter:
        layer(x)
    counter.copies, counter.allocations        # ints
    counter.table()                            # one line per op name: "aten.clone  2 copies"

An op is *full-size* when one of its outputs has ``threshold`` elements or more. It counts as

* a **copy** when it only moves data: ``clone``, ``copy_``, ``_to_copy`` (what ``.contiguous()``,
  ``.reshape`` of a non-viewable tensor and ``.to`` dispatch to under autograd), whatever buffer it
  writes to; and ``reshape``/``contiguous``/``flatten`` when they return fresh memory (below autograd,
  inside a custom op, they dispatch undecomposed);
* an **allocation** when it is any other op that returns a tensor in fresh memory (not a view of or
  in place on one of its inputs): matmuls, norms, elementwise results, ``empty``.

Views, in-place and ``out=`` ops allocate nothing and are not counted (the ``empty`` behind an ``out=``
buffer is). A ``torch.library`` custom op (fastunet's kernels) is one call: its outputs are counted,
what its implementation does inside is not, unless ``descend=True``, which runs the implementation of
every ``fastunet::`` op under the counter too (the torch path on CPU: e.g. the copy a kernel makes of
a strided input); the ops counted there are named ``"fastunet.<op> > aten.<op>"``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

COPY_OPS = frozenset({"aten.clone", "aten.copy_", "aten.copy", "aten._to_copy"})
# views when they can be, copies otherwise
VIEW_OR_COPY_OPS = frozenset({"aten.reshape", "aten.contiguous", "aten.flatten"})


def _op_name(func) -> str:
    return f"{func.namespace}.{func._schema.name.split('::')[-1]}"


def _storages(values) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in values if isinstance(t, torch.Tensor) and t.numel() > 0}


def _custom_op_impl(func):
    """The Python implementation of a ``torch.library.custom_op``, or None (private torch API, so
    ``descend`` degrades to counting the op as one call when it moves)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - other torch versions
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None)


class FullSizeCounter(TorchDispatchMode):
    """A dispatch mode counting full-size copies and allocations (see the module docstring)."""

    def __init__(self, threshold: int, descend: bool = False):
        super().__init__()
        self.threshold = threshold
        self.descend = descend
        self.by_op: Counter = Counter()  # (op name, "copy" | "alloc") -> count
        self._inside: list[str] = []  # the custom ops being descended into

    @property
    def copies(self) -> int:
        return sum(n for (_, kind), n in self.by_op.items() if kind == "copy")

    @property
    def allocations(self) -> int:
        return sum(n for (_, kind), n in self.by_op.items() if kind == "alloc")

    def copies_inside(self, op: str) -> int:
        """Full-size copies counted inside the custom op ``op`` (``"fastunet.attention_fwd"``; descend only)."""
        return sum(n for (name, kind), n in self.by_op.items() if kind == "copy" and name.startswith(op + " > "))

    def table(self) -> str:
        rows = sorted(self.by_op.items(), key=lambda item: (item[0][1], item[0][0]))
        return "\n".join(f"  {name:<56} {n:>3} {'copies' if kind == 'copy' else 'allocations'}"
                         for (name, kind), n in rows)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = " > ".join([*self._inside, _op_name(func)])
        impl = _custom_op_impl(func) if self.descend and func.namespace == "fastunet" else None
        if impl is not None:
            self._inside.append(_op_name(func))
            try:
                with self:
                    out = impl(*args, **kwargs)
            finally:
                self._inside.pop()
        else:
            out = func(*args, **kwargs)
        # meta tensors (shape computations) hold no memory
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and not t.is_meta]
        if not any(t.numel() >= self.threshold for t in outputs):
            return out
        op = _op_name(func)
        if op in COPY_OPS:
            self.by_op[(name, "copy")] += 1
            return out
        if impl is not None:  # a custom op run inside the counter: its own ops have been counted
            return out
        inputs = _storages(tree_flatten((args, kwargs))[0])
        if any(t.numel() >= self.threshold and t.untyped_storage().data_ptr() not in inputs for t in outputs):
            self.by_op[(name, "copy" if op in VIEW_OR_COPY_OPS else "alloc")] += 1
        return out


def count_forward(module: torch.nn.Module, x: torch.Tensor, descend: bool = False, **kwargs) -> FullSizeCounter:
    """Run ``module(x, **kwargs)`` without autograd under a :class:`FullSizeCounter` whose threshold is
    ``x.numel()``; return the counter."""
    counter = FullSizeCounter(x.numel(), descend=descend)
    with torch.no_grad(), counter:
        module(x, **kwargs)
    return counter
