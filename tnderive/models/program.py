"""A model as a program of index-notation statements (one statement per layer or op).

`Program` collects the statements a trace emits: it names activations and parameters with
legal notation names, remembers every name's shape, and prints the whole program (a leading
`# vars:` line declares inputs and parameters with their sizes, then one statement a line).
Each statement can also be printed on its own, with its inputs declared (`Statement.text`), so
it parses as a one-layer network whose inputs are variables: the operators differentiate a
model statement by statement (reverse mode over the program, intermediates named once).
"""
from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import TNError
from ..functions import registered_elementwise
from ..notation import RESERVED

#: words a name must not take (notation keywords and functions)
_TAKEN_WORDS = {*RESERVED, "sum", "softmax", "logsumexp", "size", "elementwise", "floor",
                "ceiling", "max", "min", "keep"}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


@dataclass(frozen=True)
class Act:
    """A named tensor of the program: an input, a parameter or an activation [shape]."""
    name: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def at(self, *indices: str) -> str:
        """`name[i,j]` (or `name` for a scalar)."""
        if len(indices) != len(self.shape):
            raise TNError(f"{self.name} has {len(self.shape)} axes {self.shape}, got indices {indices}")
        return f"{self.name}[{','.join(indices)}]" if indices else self.name


@dataclass(frozen=True)
class Statement:
    """`target[indices] = rhs`, emitted for the fx node / module path `source`."""
    target: Act
    indices: tuple[str, ...]
    rhs: str
    source: str
    uses: tuple[Act, ...] = ()

    @property
    def line(self) -> str:
        return f"{self.target.at(*self.indices)} = {self.rhs}"

    def text(self) -> str:
        """The statement alone, its inputs declared: parses as a one-layer network."""
        return f"{declarations(self.uses)}\n{self.line}" if self.uses else self.line


def declarations(acts: Sequence[Act]) -> str:
    """`# vars: W[a0,a1]=(3, 4), ...`: declared axes and sizes of `acts`."""
    items = []
    for a in acts:
        if not a.shape:
            continue
        axes = ",".join(f"{a.name}_{j}" for j in range(len(a.shape)))
        items.append(f"{a.name}[{axes}]=({', '.join(map(str, a.shape))},)")
    return "# vars: " + ", ".join(items) if items else ""


@dataclass
class Program:
    """Statements plus the names and shapes of inputs, parameters and activations."""
    statements: list[Statement] = field(default_factory=list)
    inputs: list[Act] = field(default_factory=list)
    params: dict[str, Act] = field(default_factory=dict)   # torch name -> variable
    buffers: dict[str, Act] = field(default_factory=dict)  # torch name -> variable (not trained)
    acts: dict[str, Act] = field(default_factory=dict)     # every name -> Act
    sources: dict[str, tuple[int, str]] = field(default_factory=dict)  # position, encoding

    def fresh(self, base: str) -> str:
        """A legal, unused name built from `base` (dots and odd characters become `_`)."""
        name = re.sub(r"[^A-Za-z_0-9]", "_", base).strip("_") or "t"
        if name[0].isdigit():
            name = "p" + name if base[0].isdigit() else "h" + name
        if keyword.iskeyword(name) or name in _TAKEN_WORDS or name in registered_elementwise():
            name += "_"
        out, k = name, 1
        while out in self.acts:
            k += 1
            out = f"{name}{k}"
        return out

    def _new(self, base: str, shape: Sequence[int]) -> Act:
        act = Act(self.fresh(base), tuple(int(s) for s in shape))
        self.acts[act.name] = act
        return act

    def add_input(self, base: str, shape: Sequence[int], position: int,
                  onehot: bool = False, mask: bool = False) -> Act:
        """Input `position` of the module: an integer one enters one-hot (last axis added), a
        boolean attention mask as an additive float mask (−inf where True, 0 elsewhere)."""
        act = self._new(base, shape)
        self.inputs.append(act)
        self.sources[act.name] = (position, "onehot" if onehot else "mask" if mask else "float")
        return act

    def param(self, torch_name: str, shape: Sequence[int]) -> Act:
        """The variable of parameter `torch_name` (one per parameter, however often used)."""
        if torch_name not in self.params:
            self.params[torch_name] = self._new(torch_name, shape)
        return self.params[torch_name]

    def buffer(self, torch_name: str, shape: Sequence[int]) -> Act:
        if torch_name not in self.buffers:
            self.buffers[torch_name] = self._new(torch_name, shape)
        return self.buffers[torch_name]

    def emit(self, base: str, indices: Sequence[str], rhs: str, shape: Sequence[int],
             source: str) -> Act:
        """Add `base[indices] = rhs` (shape `shape`); returns the new activation."""
        indices = tuple(indices)
        if len(indices) != len(shape):
            raise TNError(f"{source}: statement for {base} has indices {indices} but shape {tuple(shape)}")
        target = self._new(base, shape)
        used = {m.group(0) for m in _IDENT.finditer(_strip_brackets_and_strings(rhs))}
        uses = tuple(self.acts[n] for n in self.acts if n in used and n != target.name)
        self.statements.append(Statement(target, indices, rhs, source, uses))
        return target

    def text(self, output: Act | None = None) -> str:
        """The whole program: declarations, then one statement a line."""
        lines = [declarations([*self.inputs, *self.params.values(), *self.buffers.values()])]
        for st in self.statements:
            lines.append(f"# {st.source}")
            lines.append(st.line)
        return "\n".join(line for line in lines if line)


def _strip_brackets_and_strings(rhs: str) -> str:
    """`rhs` without its subscripts and string literals (index names are not variables)."""
    rhs = re.sub(r"\"[^\"]*\"|'[^']*'", " ", rhs)
    return re.sub(r"\[[^\]]*\]", " ", rhs)
