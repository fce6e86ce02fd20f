"""Numeric evaluation of an expression with torch.

`evaluate(expr, **tensors)` returns a tensor whose dims follow `expr.indices`. Products are
contracted pairwise along an opt_einsum path with `torch.einsum` in sublist form (no
52-letter limit). Copy tensors are not materialised: indices joined by a delta are merged
(renamed) and only an output that really is diagonal is expanded at the end.

The tensors may be any of `expr.signature` (a derived expression accepts the tensors of its
source; unused ones bind sizes). Device and dtype follow them, with torch's type promotion
across all of them (inputs are cast to the common dtype; constants, deltas and numbers are
made in it), so a result with no variables left is made in the inputs' dtype and device.
Evaluation is differentiable by torch autograd / torch.func.
"""
from __future__ import annotations

from typing import Mapping

import opt_einsum
import sympy
import torch

from .binding import Binding, bind, unbound_message
from .constants import build_constant
from .errors import TNError
from .functions import Elementwise
from .ir import Constant, Delta, Expr, Func, Product, Sum, Variable, Zero
from .memory import check_fits
from .torch_fns import apply_elementwise
from .unionfind import delta_classes


def evaluate(expr: Expr, sizes: Mapping[str, int] | None = None, **tensors: torch.Tensor) -> torch.Tensor:
    """Evaluate `expr` on keyword tensors of its signature (every variable it uses; others of
    the signature optional). `sizes` binds size symbols no tensor determines (name -> int).
    Dims follow `expr.indices`; dtype: torch's promotion across the tensors."""
    if not isinstance(expr, Expr):
        raise TNError(f"evaluate expects an expression, got {type(expr).__name__}")
    binding = bind(expr, tensors, sizes)
    check_fits(expr, binding)  # before anything is allocated: a clear error, not the allocator's
    return Evaluator(binding).run(expr)


class Evaluator:
    """Evaluates nodes under one binding, memoising shared sub-expressions."""

    def __init__(self, binding: Binding):
        self.b = binding
        self.memo: dict[Expr, torch.Tensor] = {}

    @property
    def _opts(self):
        """device and dtype of constants: the binding's (default dtype / CPU without tensors)."""
        dtype = self.b.dtype if self.b.dtype is not None else torch.get_default_dtype()
        return dict(device=self.b.device or "cpu", dtype=dtype)

    def run(self, expr: Expr) -> torch.Tensor:
        hit = self.memo.get(expr)
        if hit is not None:
            return hit
        out = self._eval(expr)
        want = tuple(self.b.size(s, f"index {i!r}") for i, s in zip(expr.indices, expr.shape))
        if tuple(out.shape) != want:
            raise TNError(f"internal shape error at {expr!r}: got {tuple(out.shape)}, want {want}")
        self.memo[expr] = out
        return out

    def _eval(self, expr: Expr) -> torch.Tensor:
        if isinstance(expr, Variable):
            t = self.b.tensors[expr.name]
            if expr.occurrence != expr.indices:  # repeated index: take the diagonal
                pos = {i: k for k, i in enumerate(expr.indices)}
                return torch.einsum(t, [pos[i] for i in expr.occurrence], list(range(len(pos))))
            return t
        if isinstance(expr, Zero):
            return torch.zeros(self.shape_of(expr), **self._opts)
        if isinstance(expr, Delta):
            return delta_tensor(len(expr.indices), self.b.size(expr.size), **self._opts)
        if isinstance(expr, Constant):
            return build_constant(expr.kind, expr.params, self.shape_of(expr), **self._opts)
        if isinstance(expr, Func):
            return self._func(expr)
        if isinstance(expr, Sum):
            total = None
            for c, e in expr.terms:
                t = self.run(e)
                perm = [e.indices.index(i) for i in expr.indices]
                t = t.permute(perm) if perm != list(range(len(perm))) else t
                t = t * self.coefficient(c) if c != 1 else t
                total = t if total is None else total + t
            return total
        if isinstance(expr, Product):
            if not expr.factors:  # the number 1 (a constant term of a sum)
                return torch.ones((), **self._opts)
            return self._product(expr)
        raise TNError(f"cannot evaluate node {type(expr).__name__}")

    def coefficient(self, c) -> float:
        """Numeric value of a sympy coefficient (which may contain size symbols, e.g. 1/sqrt(e))."""
        if c.free_symbols:
            c = c.xreplace({s: sympy.Integer(n) for s, n in self.b.symbols.items()})
            if c.free_symbols:
                missing = map(str, c.free_symbols)
                raise TNError(f"coefficient {c}: {unbound_message(missing, self.b.signature)}")
        return float(c)

    def shape_of(self, expr: Expr) -> tuple[int, ...]:
        return tuple(self.b.size(s, f"index {i!r}") for i, s in zip(expr.indices, expr.shape))

    def _func(self, expr: Func) -> torch.Tensor:
        x = self.run(expr.arg)
        if isinstance(expr.fn, Elementwise):
            return apply_elementwise(expr.fn, x)
        dim = expr.arg.indices.index(expr.over)
        if expr.fn.name == "softmax":
            return torch.softmax(x, dim)
        if expr.fn.name == "logsumexp":
            return torch.logsumexp(x, dim)
        raise TNError(f"unknown index function {expr.fn.name!r}")

    def _product(self, expr: Product) -> torch.Tensor:
        operands, sublists, out_ids, names = product_operands(expr, self)
        return contract(operands, sublists, out_ids)


def delta_tensor(rank: int, n: int, device=None, dtype=None) -> torch.Tensor:
    """A rank-`rank` copy tensor of size n (only when it must be materialised)."""
    t = torch.zeros((n,) * rank, device=device, dtype=dtype)
    idx = torch.arange(n, device=device)
    t[(idx,) * rank] = 1
    return t


def product_operands(expr: Product, ev: Evaluator):
    """Operands and integer sublists of a product, with deltas merged into index renames.

    Returns (operands, sublists, output sublist, index-name per id).
    """
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    for f in expr.factors:
        for i, s in zip(f.indices, f.shape):
            n = ev.b.size(s, f"index {i!r}")
            if i in sizes and sizes[i] != n:
                raise TNError(f"size mismatch for index {i!r}: {where[i]} has size {sizes[i]}, "
                              f"{_describe(f)} has size {n}")
            sizes.setdefault(i, n)
            where.setdefault(i, _describe(f))
    others, classes = delta_classes(expr.factors, sizes)
    ids: dict[str, int] = {}
    names: list[str] = []
    for members in classes:
        k = len(names)
        names.append(members[0])
        for m in members:
            ids[m] = k
    operands, sublists = [], []
    for f in others:
        operands.append(ev.run(f))
        sublists.append([ids[i] for i in f.indices])
    out_ids = [ids[i] for i in expr.indices]
    extra = 1
    for members in classes:
        k = ids[members[0]]
        used = any(k in sl for sl in sublists) or k in out_ids
        if not used:  # a delta closed on itself: its trace = size
            extra *= sizes[members[0]]
    # a class appearing several times in the output is a diagonal: expand with identities
    seen: dict[int, int] = {}
    final_out = []
    for pos, k in enumerate(out_ids):
        if k in seen:
            new_k = len(names)
            names.append(expr.indices[pos])
            eye = torch.eye(sizes[expr.indices[pos]], **ev._opts)
            operands.append(eye)
            sublists.append([k, new_k])
            final_out.append(new_k)
        else:
            seen[k] = pos
            final_out.append(k)
    # classes in the output that no operand carries (delta legs only in the output)
    carried = {k for sl in sublists for k in sl}
    for pos, k in enumerate(final_out):
        if k not in carried:
            operands.append(torch.ones(sizes[expr.indices[pos]], **ev._opts))
            sublists.append([k])
            carried.add(k)
    if extra != 1:
        operands.append(torch.tensor(float(extra), **ev._opts))
        sublists.append([])
    return operands, sublists, final_out, names


def _describe(f: Expr) -> str:
    if isinstance(f, Variable):
        return f"variable {f.name!r}"
    return f"{type(f).__name__.lower()}[{','.join(f.indices)}]"


def contract(operands: list[torch.Tensor], sublists: list[list[int]], out: list[int]) -> torch.Tensor:
    """Contract operands pairwise along opt_einsum's path (torch.einsum, sublist form)."""
    if not operands:
        return torch.ones(())
    if len(operands) == 1:
        return torch.einsum(operands[0], sublists[0], out)
    path = plan_path([tuple(o.shape) for o in operands], sublists, out)
    ops = list(operands)
    subs = [list(s) for s in sublists]
    for a, b in path:
        a, b = sorted((a, b), reverse=True)
        ta, sa = ops.pop(a), subs.pop(a)
        tb, sb = ops.pop(b), subs.pop(b)
        rest = {k for s in subs for k in s} | set(out)
        keep = [k for k in dict.fromkeys(sa + sb) if k in rest]
        ops.append(torch.einsum(ta, sa, tb, sb, keep))
        subs.append(keep)
    (t,), (s,) = ops, subs
    return torch.einsum(t, s, out) if s != out else t


def plan_path(shapes, sublists, out, optimize: str = "auto"):
    """opt_einsum contraction path (list of pairs) for integer sublists."""
    if len(shapes) < 2:
        return []
    letters = {}
    for s in list(sublists) + [out]:
        for k in s:
            letters.setdefault(k, opt_einsum.get_symbol(len(letters)))
    eq = ",".join("".join(letters[k] for k in s) for s in sublists) + "->" + "".join(letters[k] for k in out)
    path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimize)
    return path
