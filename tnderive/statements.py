"""Programs of named statements: the shared form of deep networks and their derivatives.

A `Statements` program is an ordered tuple of `Statement(name, expr)`. A statement's
expression refers to an earlier statement `h` as an ordinary leaf, `Variable("h",
axes=h's indices, shape=h's shape)`, so every tool that works on an expression (derive,
simplify, evaluate, codegen, the printer) works on one statement unchanged, and a statement
used by many others is stored, hashed and computed once (DESIGN.md, "Keeping derivation fast
and exact", the Depth point). `outputs` name the statements the program computes (default:
the last one).

This module is the data structure (checks, references, inlining, dead-statement pruning);
`tnderive.network.Network` adds evaluation, compilation and the calculus methods. Functions
that transform a program (`tnderive.grad`, `tnderive.simplify`) build their result with
`program.rebuilt(...)`, which keeps the program's class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .errors import TNError
from .ir import Expr, Signature, Variable, rewrite, with_signature
from .notation import parse_statements, substitute
from .printer import statements_notation

OUTPUTS_HEADER = "# outputs: "


@dataclass(frozen=True)
class Statement:
    """`name[indices] = expr`: one named intermediate of a program."""

    name: str
    expr: Expr

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise TNError(f"statement name {self.name!r} is not an identifier")
        if not isinstance(self.expr, Expr):
            raise TNError(f"statement {self.name!r}: expected an expression, got "
                          f"{type(self.expr).__name__}")

    @property
    def indices(self) -> tuple[str, ...]:
        return self.expr.indices

    def reference(self, indices: Sequence[str] | None = None) -> Variable:
        """This statement seen from a later one: a variable with the statement's indices as
        axes (`indices`: the names this occurrence gives them; default the axes)."""
        return Variable(self.name, self.expr.indices, indices, self.expr.shape)


class Statements:
    """An ordered program of statements with named outputs (see the module docstring).

    Checks: names are unique identifiers, a statement refers only to earlier statements,
    with that statement's index count, axis names and sizes; outputs name statements."""

    def __init__(self, statements: Iterable[Statement], outputs: Sequence[str] | None = None,
                 source: Signature | None = None):
        self.statements: tuple[Statement, ...] = tuple(statements)
        self._source = source  # the signature of the network this one was derived from
        if not self.statements:
            raise TNError("a network needs at least one statement")
        self._by_name: dict[str, Statement] = {}
        self._refs: dict[str, frozenset[str]] = {}
        self._leaves: dict[str, frozenset[str]] = {}
        every = {s.name for s in self.statements}
        for s in self.statements:
            if not isinstance(s, Statement):
                raise TNError(f"a network holds Statement objects, got {type(s).__name__}")
            if s.name in self._by_name:
                raise TNError(f"statement {s.name!r} is defined twice")
            refs, leaves = set(), set()
            for name, v in s.expr.variables.items():
                if name in self._by_name:
                    self._check_reference(s, v)
                    refs.add(name)
                elif name in every:
                    raise TNError(f"statement {s.name!r} uses {name!r}, which is defined later "
                                  f"(a statement may refer only to earlier ones)")
                else:
                    leaves.add(name)
            self._by_name[s.name] = s
            self._refs[s.name] = frozenset(refs)
            self._leaves[s.name] = frozenset(leaves)
        self.outputs: tuple[str, ...] = tuple(outputs) if outputs is not None \
            else (self.statements[-1].name,)
        for o in self.outputs:
            if o not in self._by_name:
                raise TNError(f"output {o!r} is not a statement (statements: "
                              f"{', '.join(self._by_name)})")
        self._hash: int | None = None
        self._pos = {s.name: k for k, s in enumerate(self.statements)}

    def _check_reference(self, user: Statement, v: Variable) -> None:
        target = self._by_name[v.name]
        if v.axes != target.indices or v.axis_shape != target.expr.shape:
            raise TNError(f"statement {user.name!r} uses {v.name!r} with axes {list(v.axes)} and "
                          f"sizes {list(v.axis_shape)}, but {v.name!r} has indices "
                          f"{list(target.indices)} and sizes {list(target.expr.shape)}")

    # --- the program's shape -------------------------------------------------------------
    def __iter__(self) -> Iterator[Statement]:
        return iter(self.statements)

    def __len__(self) -> int:
        return len(self.statements)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Statement:
        try:
            return self._by_name[name]
        except KeyError:
            raise TNError(f"no statement {name!r} (statements: {', '.join(self._by_name)})") from None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.statements)

    def position(self, name: str) -> int:
        """Index of statement `name` in the program."""
        return self._pos[self[name].name]

    @property
    def output(self) -> Statement:
        """The single output statement (TNError when there are several)."""
        if len(self.outputs) != 1:
            raise TNError(f"the network has {len(self.outputs)} outputs ({', '.join(self.outputs)}); "
                          f"name one")
        return self._by_name[self.outputs[0]]

    def refs(self, name: str) -> frozenset[str]:
        """Names of the earlier statements statement `name` uses."""
        return self._refs[self[name].name]

    def leaves(self, name: str) -> frozenset[str]:
        """Names of the input tensors statement `name` uses directly."""
        return self._leaves[self[name].name]

    def consumers(self) -> dict[str, list[str]]:
        """Statement name -> the statements that use it, in program order."""
        out: dict[str, list[str]] = {s.name: [] for s in self.statements}
        for s in self.statements:
            for r in sorted(self._refs[s.name], key=self._pos.__getitem__):
                out[r].append(s.name)
        return out

    def needed(self, outputs: Iterable[str] | None = None) -> set[str]:
        """The statements `outputs` (default: the program's) depend on, themselves included."""
        stack = list(self.outputs if outputs is None else outputs)
        seen: set[str] = set()
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                stack.extend(self._refs[self[n].name])
        return seen

    def depending_on(self, leaf: str) -> set[str]:
        """The statements whose value depends on input tensor `leaf`."""
        out: set[str] = set()
        for s in self.statements:
            if leaf in self._leaves[s.name] or self._refs[s.name] & out:
                out.add(s.name)
        return out

    @property
    def signature(self) -> Signature:
        """The input tensors (leaves only: statements are not inputs), in first-use order.

        A derived network keeps its source's signature (DESIGN "Signatures"): the tensors that
        evaluate a network evaluate every derivative of it, even when a statement folded away
        the last use of one. Names a derivation introduced and then removed (an adjoint that
        simplification substituted away) are not inputs."""
        used, sizes = [], set()
        for s in self.statements:
            sig = s.expr.signature
            used.extend(v for n, v in sig.items()
                        if n not in self._by_name and (self._source is None or n in self._source
                                                       or n in self._leaves[s.name]))
            sizes |= sig.source_sizes
        own = Signature(used, sizes)
        return own if self._source is None else self._source.merged(own)

    def node_count(self) -> int:
        """Distinct IR nodes over all statements (each statement's shared sub-trees once)."""
        return sum(sum(1 for _ in s.expr.walk()) for s in self.statements)

    # --- building ------------------------------------------------------------------------
    def rebuilt(self, statements: Iterable[Statement], outputs: Sequence[str] | None = None):
        """A program of this class with other statements (and outputs), keeping this one's
        signature as its source's."""
        return type(self)(statements, outputs, source=self.signature)

    def pruned(self) -> "Statements":
        """Without the statements no output needs."""
        keep = self.needed()
        if len(keep) == len(self.statements):
            return self
        return self.rebuilt((s for s in self.statements if s.name in keep), self.outputs)

    def with_outputs(self, outputs: Sequence[str]) -> "Statements":
        """The same statements computing `outputs`, pruned to what they need."""
        return self.rebuilt(self.statements, outputs).pruned()

    def inline(self, name: str | None = None) -> Expr:
        """Statement `name` (default: the single output) as one expression, every reference
        substituted by the expression it names: what `tnderive.parse` makes of the text."""
        name = self.output.name if name is None else self[name].name
        memo: dict[str, Expr] = {}
        need = self.needed([name])
        for s in self.statements:
            if s.name not in need:
                continue

            def sub(node: Expr) -> Expr | None:
                if isinstance(node, Variable) and node.name in memo:
                    return substitute(memo[node.name], self._by_name[node.name].indices,
                                      node.occurrence)
                return None

            memo[s.name] = rewrite(s.expr, sub) if self._refs[s.name] else s.expr
            if s.name == name:
                break
        return with_signature(memo[name], self.signature)

    # --- notation ------------------------------------------------------------------------
    def __str__(self) -> str:
        """One statement per line (`parse_network` reads it back); a `# outputs:` line when
        the outputs are not just the last statement."""
        items = [(s.name, s.expr) for s in self.statements]
        text = statements_notation(items)
        if not self._reads_back(text):
            text = statements_notation(items, explicit=True)
        if self.outputs != (self.statements[-1].name,):
            text = OUTPUTS_HEADER + ", ".join(self.outputs) + "\n" + text
        return text

    def _reads_back(self, text: str) -> bool:
        """Whether `text` parses to these statements (helper statements the printer hoisted
        substituted back)."""
        try:
            parsed, _ = parse_statements(text)
        except TNError:
            return False
        mine = {s.name for s in self.statements}
        helpers: dict[str, tuple[tuple[str, ...], Expr]] = {}

        def sub(node: Expr) -> Expr | None:
            if isinstance(node, Variable) and node.name in helpers:
                target, e = helpers[node.name]
                return substitute(e, target, node.occurrence)
            return None

        for name, expr in parsed:
            expr = rewrite(expr, sub) if helpers else expr
            if name in mine:
                if expr != self._by_name[name].expr:
                    return False
            else:
                helpers[name] = (expr.indices, expr)
        return True

    # --- identity ------------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        return isinstance(other, Statements) and self.statements == other.statements \
            and self.outputs == other.outputs

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.statements, self.outputs))
        return self._hash

    def __repr__(self) -> str:
        outs = ", ".join(self.outputs)
        return f"<{type(self).__name__}: {len(self.statements)} statements -> {outs}>"
