"""The pieces of a Hessian-block result: a part (outer / functional / total), a block, the set.

A single-layer part (`BlockPart`) holds its expression, its structure report (`structure.py`,
expanded into terms) and its numeric evaluation (generated code via `tnderive.compile`). A
whole-stack part (`NetworkPart`) is one output statement of a shared `tnderive.network.Network`
(`stack.py`): structure read off the statements, evaluation statement by statement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..codegen import compile as compile_expr
from ..errors import TNError
from ..evaluate import evaluate
from ..ir import Expr, Signature, Variable, Zero
from ..network import Network
from .structure import (Monomial, Structure, analyse, analyse_network, analyse_tree, expand,
                        network_degrees)


@dataclass
class BlockPart:
    """One part (outer / functional / total) of a Hessian block."""

    kind: str
    expr: Expr
    softmax_order: int
    second_T: bool
    #: False for whole-stack parts: evaluate with `tnderive.evaluate` (compiling a large
    #: unsimplified network takes longer than evaluating it) and read the structure off the
    #: tree (no expansion into terms)
    expanded: bool = True
    _monomials: list[Monomial] | None = None
    _structure: Structure | None = None
    _programs: dict = field(default_factory=dict)

    @property
    def is_zero(self) -> bool:
        if isinstance(self.expr, Zero):
            return True
        return self.expanded and not self.monomials

    @property
    def monomials(self) -> list[Monomial]:
        if self._monomials is None:
            self._monomials = expand(self.expr)
        return self._monomials

    @property
    def structure(self) -> Structure:
        if self._structure is None:
            if self.expanded:
                self._structure = analyse(self.expr, self.monomials, self.softmax_order, self.second_T)
            else:
                self._structure = analyse_tree(self.expr, self.softmax_order, self.second_T)
        return self._structure

    def program(self, fn_name: str = "block", plan_sizes: Mapping[str, int] | None = None):
        """`tnderive.compile` of the part (cached per name and plan sizes): call it with the
        part's variables as keyword tensors; `.source` holds the code, `.plan` the plan."""
        planned = tuple(sorted((plan_sizes or {}).items()))
        if (fn_name, planned) not in self._programs:
            same_plan = [f for (_, p), f in self._programs.items() if p == planned]
            if same_plan:  # another name for a planned part: emit its plan again, no re-planning
                self._programs[fn_name, planned] = same_plan[0].renamed(fn_name)
            else:
                sizes = _size_symbols(self.expr)
                plan = {k: v for k, v in (plan_sizes or {}).items() if k in sizes} or None
                self._programs[fn_name, planned] = compile_expr(self.expr, fn_name, sizes=plan)
        return self._programs[fn_name, planned]

    def evaluate(self, tensors: Mapping[str, torch.Tensor], fast: bool = False) -> torch.Tensor:
        """Numeric value: `tnderive.evaluate` (the interpreter, whose program is lowered once
        and cached), or with `fast` the generated code of `program()` (the same lowering with
        a longer contraction-order search; it costs a compile first)."""
        used = {k: v for k, v in tensors.items() if k in self.expr.variables}
        missing = [k for k in self.expr.variables if k not in used]
        if missing:
            raise TNError(f"block part {self.kind!r}: missing tensor {missing[0]!r}")
        if fast or isinstance(self.expr, Zero):
            out = self.program()(**used)
            if not used:  # a zero part: the dtype of the given tensors
                ref = next(iter(tensors.values()), None)
                if ref is not None:
                    out = out.to(dtype=ref.dtype, device=ref.device)
            return out
        return evaluate(self.expr, **used)


def _size_symbols(expr: Expr) -> set[str]:
    """Names of the size symbols of `expr`."""
    names: set[str] = set()
    for node in expr.walk():
        for s in node.shape:
            names |= {str(x) for x in getattr(s, "free_symbols", ())}
        if isinstance(node, Variable):
            for s in node.axis_shape:
                names |= {str(x) for x in getattr(s, "free_symbols", ())}
    return names


class NetworkPart:
    """One part (outer / functional / total) of a whole-stack block: output statement
    `output` of the shared `network` (`stack.split_network`), laid out [p's axes, q's axes]."""

    expanded = False
    second_T = False

    def __init__(self, kind: str, network: Network, output: str, softmax_order: int,
                 source: Signature | None = None, degrees: dict[str, float] | None = None):
        self.kind = kind
        self.network = network
        self.output = output
        self.softmax_order = softmax_order
        #: the shared network's signature (computed once for all parts; default: here)
        self.source = source
        #: σ-degrees of the shared network's statements, one dict for all its parts (filled
        #: by the first `structure`; a statement's degree depends only on the statements it
        #: uses, so the shared network's equals this part's own)
        self.degrees = {} if degrees is None else degrees
        self._own: Network | None = None
        self._expr: Expr | None = None
        self._structure: Structure | None = None

    @property
    def own(self) -> Network:
        """The network pruned to this part's output (the statements it needs; the same as
        `network.with_outputs([output])`, without recomputing the whole network's signature
        for every part), sharing the network's lowered programs (`Network.part`)."""
        if self._own is None:
            self._own = self.network.part([self.output], self.source)
        return self._own

    @property
    def expr(self) -> Expr:
        """The part as one inlined expression (large: for drawing and cross-checks only)."""
        if self._expr is None:
            self._expr = self.own.inline()
        return self._expr

    @property
    def is_zero(self) -> bool:
        return self.structure.zero

    @property
    def structure(self) -> Structure:
        if self._structure is None:
            if not self.degrees:
                self.degrees.update(network_degrees(self.network))
            self._structure = analyse_network(self.network, self.output, self.softmax_order,
                                              self.degrees)
        return self._structure

    def program(self, fn_name: str = "block", plan_sizes: Mapping[str, int] | None = None):
        """The part's network compiled into one generated module (`Network.compile`)."""
        return self.own.compile(fn_name)

    def evaluate(self, tensors: Mapping[str, torch.Tensor], fast: bool | None = None) -> torch.Tensor:
        """Numeric value: the needed statements, each once (`Network.evaluate`; `fast`: the
        compiled module)."""
        used = _inputs(self.own, tensors, f"block part {self.kind!r}")
        if fast:
            return self.program()(**used)
        return self.own.evaluate(**used)


def _inputs(net: Network, tensors: Mapping[str, torch.Tensor], what: str) -> dict:
    """The tensors the network's statements use (its leaves; `Network.signature` may also
    list statements pruned away, carried in a derived statement's signature)."""
    leaves = set().union(*(net.leaves(s.name) for s in net.statements))
    missing = sorted(n for n in leaves if n not in tensors)
    if missing:
        raise TNError(f"{what}: missing tensor {missing[0]!r}")
    return {n: tensors[n] for n in leaves}


@dataclass
class Block:
    """Hessian block (p, q): indices [p's axes, q's axes]."""

    p: str
    q: str
    outer: BlockPart | NetworkPart | None
    functional: BlockPart | NetworkPart | None
    total: BlockPart | NetworkPart
    indices: tuple[str, ...]
    shape: tuple

    def parts(self) -> dict[str, BlockPart]:
        out = {}
        if self.outer is not None:
            out["outer"] = self.outer
        if self.functional is not None:
            out["functional"] = self.functional
        out["total"] = self.total
        return out


class HessianBlocks(dict):
    """{(p, q): Block} in parameter order, with timing and the split's ingredients."""

    params: tuple[str, ...]
    seconds: dict
    simplifier: str
    model: object
    #: the whole-stack blocks' shared network (every part an output), None for one layer
    network: Network | None = None

    def evaluate_parts(self, tensors: Mapping[str, torch.Tensor]) -> dict:
        """{(p, q): {part: tensor}} for every block; a whole stack's network runs once."""
        if self.network is None:
            return {k: {n: part.evaluate(tensors) for n, part in b.parts().items()}
                    for k, b in self.items()}
        values = self.network.evaluate_all(**_inputs(self.network, tensors, "hessian blocks"))
        return {k: {n: values[part.output] for n, part in b.parts().items()}
                for k, b in self.items()}
