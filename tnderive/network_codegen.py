"""Generated code for a program of statements (`Network.compile`): one module, one function.

Each needed statement is lowered on its own (`tnderive.codegen.lower`: its contraction plan,
factoring and common sub-expressions); the ops of all statements are then renamed apart and
inlined, in order, into a single function that checks its arguments once at entry:

    def f(*_positional, X0=_MISSING, WQ1=_MISSING, ..., **_unexpected):
        <argument checks, sizes, device and dtype: once>
        T1_t0 = torch.einsum("qi,ie->eq", X0, WQ1)   # [e,q]  ...
        T1 = torch.einsum(...)                        # a statement's result: its name
        ...
        return dWQ1

Temporaries are named `<statement>_t<k>`, a statement's result is the variable of its name
(`dX3`), and every temporary is deleted after its last reader. Across statements an op equal
to an earlier one (same kind, payload, inputs and index pattern: e.g. `softmax(T1)` in the
forward statement and in its adjoint, or two identical statements) is computed once.

Before lowering, a small statement used once by a single other statement is merged into it
(the lowering plans them together; nothing is computed twice). Contraction orders are planned
for the sizes of the inputs met in a call (once per distinct set of input shapes), or
`sizes=` / the default size before the first call. `.source` is the module.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import sympy
import torch

from .codegen import DEFAULT_SIZE, load
from .codegen.program import Op, Program, lower
from .codegen.torch_emit import emit_ops_module
from .codegen.values import Value
from .errors import TNError
from .ir import Expr, Product, Variable, rewrite, size_symbols, with_signature
from .printer import to_notation
from .notation import substitute
from .statements import Statement

if TYPE_CHECKING:
    from .statements import Statements


MERGE_MAX_NODES = 12  # a statement merged into its one user is at most this big


def merged_statements(program: "Statements") -> list[Statement]:
    """The needed statements with every small statement (at most MERGE_MAX_NODES nodes, after
    its own merges) that is not an output and is used exactly once (one occurrence in one
    statement) substituted into its user. Big ones stay statements: merging a chain would
    rebuild the inlined expression the network avoids."""
    need = program.needed()
    uses: dict[str, int] = {n: 0 for n in need}
    for s in program.statements:
        if s.name in need:
            for node in _occurrences(s.expr):
                if node.name in uses:
                    uses[node.name] += 1
    inline = {n for n, k in uses.items() if k == 1 and n not in program.outputs}
    done: dict[str, Expr] = {}
    out: list[Statement] = []

    def sub(node: Expr) -> Expr | None:
        if isinstance(node, Variable) and node.name in done:
            return substitute(done[node.name], program[node.name].indices, node.occurrence)
        return None

    for s in program.statements:
        if s.name not in need:
            continue
        expr = rewrite(s.expr, sub) if program.refs(s.name) & done.keys() else s.expr
        if s.name in inline and sum(1 for _ in expr.walk()) <= MERGE_MAX_NODES:
            done[s.name] = expr
        else:
            out.append(Statement(s.name, expr))
    return out


def _occurrences(expr: Expr):
    """Every variable occurrence of `expr`, with multiplicity (a shared sub-tree counts once
    per use)."""
    stack = [expr]
    while stack:
        e = stack.pop()
        if isinstance(e, Variable):
            yield e
        stack.extend(e.children)


class CompiledNetwork:
    """A network's outputs as a callable with keyword input tensors (see the module
    docstring). One output: returns its tensor; several: a dict name -> tensor. `.source`:
    the module planned for `sizes` (or the default size); `.specialisations`: shapes -> source
    of every input-shape binding met so far."""

    def __init__(self, program: "Statements", name: str = "f",
                 sizes: Mapping[str, int] | None = None, inplace: bool = False):
        if not name.isidentifier():
            raise TNError(f"compile: function name {name!r} is not an identifier")
        self.program = program
        self.name = name
        self.sizes = dict(sizes or {})
        self.inplace = inplace
        self.statements = merged_statements(program)
        self.signature = program.signature
        self.inputs = tuple(self.signature)
        names = self.inputs + tuple(st.name for st in self.statements)
        clash = [n for n in names
                 if re.fullmatch(r"\w+_t\d+", n) and n.rsplit("_t", 1)[0] in program]
        if clash:
            raise TNError(f"compile: the name {clash[0]!r} clashes with a temporary of the "
                          f"generated code (<statement>_t<k>): rename it")
        self.source = self._source(self.sizes)
        self._default = load(self.source, name)
        self._by_shapes: dict[tuple, object] = {}
        self.specialisations: dict[tuple, str] = {}

    # --- code ----------------------------------------------------------------------------
    def _source(self, sizes: Mapping[str, int]) -> str:
        ops, results, shared, flops, numeric = self._ops(sizes)
        outs = self.program.outputs
        if len(outs) == 1:
            returns = results[outs[0]]
        else:
            returns = "{" + ", ".join(f"{o!r}: {results[o]}" for o in outs) + "}"
        entry = Program(self._entry_expr(), ops, Value(results[outs[-1]], (), ()), numeric)
        return emit_ops_module(entry, ops, self.name, returns,
                               self._doc(len(ops), shared, flops, numeric),
                               keep=frozenset(results.values()),
                               sizes={**self.sizes, **sizes}, inplace=self.inplace)

    def _ops(self, sizes: Mapping[str, int]):
        """All statements' ops, renamed apart, with equal ops shared across statements.
        Returns (ops, output name -> python name, ops shared, total flops, planning sizes)."""
        alias: dict[str, str] = {}        # a statement's temporary or result -> its python name
        seen: dict[tuple, str] = {}       # op key -> python name of the first such op
        ops: list[Op] = []
        shared = 0
        flops = sympy.Integer(0)
        numeric: dict = {}
        for s in self.statements:
            known = {str(x) for x in s.expr.signature.symbols() | size_symbols(s.expr)}
            own = {k: v for k, v in sizes.items() if k in known}
            prog = lower(s.expr, own or None, DEFAULT_SIZE)
            numeric.update(prog.numeric)
            live = prog.live_ops()
            made = {op.out for op in live}
            local = {op.out: f"{s.name}_{op.out}" for op in live}
            res = prog.result
            if res.name in made and res.labels == s.indices:
                local[res.name] = s.name
            for op in live:
                inputs = tuple(_renamed(v, local, alias) for v in op.inputs)
                new = replace(op, out=local[op.out], inputs=inputs)
                key = _key(new)
                hit = seen.get(key)
                if hit is not None:
                    alias[new.out] = hit
                    shared += 1
                    continue
                seen[key] = new.out
                ops.append(new)
                flops += op.flops
            out = _renamed(res, local, alias)
            if out.labels != s.indices:  # a permutation (or an earlier value under new labels)
                perm = Op("einsum", s.name, (out,), s.indices, s.expr.shape)
                hit = seen.get(_key(perm))
                if hit is None:
                    seen[_key(perm)] = s.name
                    ops.append(perm)
                else:
                    alias[s.name] = hit
            elif out.name != s.name:
                alias[s.name] = out.name
        results = {o: alias.get(o, o) for o in self.program.outputs}
        return ops, results, shared, sympy.expand(flops), numeric

    def _entry_expr(self) -> Expr:
        """An expression whose signature is the network's and whose variables are the inputs
        the statements use (one occurrence each, indices renamed apart): what the argument
        checks of the generated function are made from. Never evaluated."""
        occ: dict[str, Variable] = {}
        for s in self.statements:
            for n, v in s.expr.variables.items():
                if n in self.signature and n not in occ:
                    occ[n] = v
        factors = [Variable(n, v.axes, [f"{i}_{k}" for i in v.occurrence], v.axis_shape)
                   for k, (n, v) in enumerate(occ.items())]
        return with_signature(Product(factors, ()), self.signature)

    def _doc(self, n_ops: int, shared: int, flops, numeric) -> str:
        outs = ", ".join(self.program.outputs)
        lines = [f"Generated by tnderive: `{self.name}(**tensors)` computes {outs}",
                 f"of a network of {len(self.statements)} statements, each once, in one function.",
                 "",
                 "Imports only torch; runs on the device and dtype of its inputs.",
                 "Arguments are checked once at entry.", "", "Statements (index notation):"]
        for s in self.statements:  # hoisted helpers (`t1[..] = ...`) indented under it
            text = [l for l in to_notation(s.expr).strip().splitlines()
                    if l.strip() and not l.startswith("#")]
            body = text[-1].split("=", 1)[1].strip()
            for line in [f"{s.name}[{','.join(s.indices)}] = {body}"] + \
                    [f"  where {h}" for h in text[:-1]]:
                lines.append("    " + (line if len(line) <= 200 else line[:197] + "..."))
        lines += ["", f"Contraction cost: {flops} flops;",
                  f"{n_ops} ops ({shared} shared across statements, computed once)."]
        vals = ", ".join(f"{k}={v}" for k, v in sorted(numeric.items(), key=lambda kv: str(kv[0])))
        if vals:
            lines.append(f"Contraction order planned for sizes {vals}.")
        return "\n".join(lines)

    # --- calling -------------------------------------------------------------------------
    def _function(self, tensors: Mapping[str, torch.Tensor]):
        """The generated function planned for these inputs' sizes (once per shapes)."""
        key = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None
                    for t in (tensors.get(n) for n in self.inputs))
        fn = self._by_shapes.get(key)
        if fn is None:
            sizes = dict(self.sizes)
            for n, decl in self.signature.items():
                t = tensors.get(n)
                if isinstance(t, torch.Tensor) and t.dim() == len(decl.axis_shape):
                    for s, k in zip(decl.axis_shape, t.shape):
                        if isinstance(s, sympy.Symbol):
                            sizes.setdefault(str(s), int(k))
            planned = all(v == DEFAULT_SIZE for k, v in sizes.items() if k not in self.sizes)
            if planned:
                fn = self._default
            else:
                source = self._source(sizes)
                fn = load(source, self.name)
                self.specialisations[key] = source
            self._by_shapes[key] = fn
        return fn

    def __call__(self, **tensors: torch.Tensor):
        return self._function(tensors)(**tensors)

    def __repr__(self) -> str:
        return (f"<compiled network {self.name}({', '.join(self.inputs)}): "
                f"{len(self.statements)} statements>")


def _renamed(v: Value, local: Mapping[str, str], alias: Mapping[str, str]) -> Value:
    """`v` under its python name in the assembled function."""
    name = local.get(v.name, v.name)
    return Value(alias.get(name, name), v.labels, v.shape, v.ties)


def _key(op: Op) -> tuple:
    """What makes two ops compute the same tensor: kind, payload, input names and the index
    pattern (labels renamed by first appearance), shape."""
    canon: dict[str, int] = {}
    pattern = tuple(tuple(canon.setdefault(i, len(canon)) for i in labels)
                    for labels in [v.labels for v in op.inputs] + [op.labels])
    return (op.kind, repr(op.payload), tuple(v.name for v in op.inputs),
            tuple(v.ties for v in op.inputs), pattern, tuple(map(str, op.shape)))
