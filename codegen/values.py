"""`Value`: a tensor available at run time in a lowered Program (a python name and one label
per dimension). Plain data shared by the lowering (`program`) and the op builders it calls
(`taps`, `views`), so none of them imports another to name it."""
from __future__ import annotations

from dataclasses import dataclass

import sympy

Labels = tuple[str, ...]


@dataclass(frozen=True)
class Value:
    """A tensor available at run time: python name and one label per dimension.

    `ties` ((extra, rep), ...) describe a lazily diagonal value: the full tensor is this one
    times copy tensors joining each `extra` index to its `rep` label (so it has the extra
    indices too, zero off the diagonal). Products absorb ties for free (index merges); only a
    consumer that needs the full tensor materialises it (`_Lowering.materialise`)."""

    name: str
    labels: Labels
    shape: tuple[sympy.Expr, ...]
    ties: tuple[tuple[str, str], ...] = ()

    def relabel(self, labels: Labels) -> "Value":
        return Value(self.name, tuple(labels), self.shape, self.ties)

    @property
    def free(self) -> Labels:
        """All indices of the full tensor (labels, then tied extras)."""
        return self.labels + tuple(x for x, _ in self.ties)

    @property
    def sizes(self) -> dict[str, sympy.Expr]:
        return dict(zip(self.labels, self.shape))
