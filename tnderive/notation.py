"""Index notation → IR: `parse(text, sizes=None)`.

The text is Python expression syntax (parsed with `ast`), one statement a line:

    z[n,o] = W[o,i] * x[n,i]
    y[n,o] = tanh(z[n,o] + b[o])
    loss = sum((y[n,o] - t[n,o])**2) / 2

Semantics (see DESIGN.md and the README section "Index notation"):

* A chain `a*b*c/2` (numbers folded into one coefficient) is one product. It keeps an index
  that appears in the statement's target or is free somewhere in the statement outside the
  chain, and sums the others. A chain with a single tensor factor is not a product (just a
  scaling). Scopes: an index is not free inside a `sum(...)` that sums it (`sum(e)` binds all
  of e's indices, `sum(e, i)` binds i, `sum(e, keep=K)` all but K) nor inside the
  `logsumexp(e, k)` that sums k, so it keeps indices only of products inside that call
  (`_Scopes`).
* Numbers: finite real sympy numbers (else a TNError naming the text); `size(k)` is the size
  of index k in the statement (of the axis named k when no index k is written there), and
  `floor ceiling max min` apply to numbers and sizes.
* `+`/`-` chains are one `Sum`; every term has the same free index set, except scalar terms,
  which broadcast (a scalar `s` over indices I is `Product((s, δ[i] for i in I), I)`).
* Index order of a product or sum: the target's indices first (target order), then the rest
  in first-appearance order. A statement whose right side has other indices than its target
  (extra ones, or another order) is wrapped in `Product((rhs,), target)` (sums the extras).
* A name defined by an earlier statement is substituted (free indices renamed to the
  occurrence's names); the last statement is the result.
* Sizes: every variable axis gets the symbol named after its declared axis; symbols joined by
  an index are unified (ints from `sizes=` win, then variables' symbols in first-seen order).

Two comment lines are read as well (the printer writes the first):

    # vars: W[o,i]=(3, i), x[n,i]     declared axes (and sizes) of variables
    # sizes: n=3, o=4                 index sizes, like `sizes=`
"""
from __future__ import annotations

import ast
import re
import tokenize
import warnings
from collections import Counter
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence

import sympy
from sympy.parsing.sympy_parser import parse_expr

from .errors import TNError
from .functions import (LOGSUMEXP, SOFTMAX, X, Elementwise, get_elementwise, power, relu,
                        sigmoid, step)
from .ir import (ONE, Constant, Delta, Expr, Func, Product, Size, Sum, Variable, Zero,
                 Signature, fresh_name, map_sizes, rename_free, size_symbol, with_signature)
from .patterns import pattern_constant

__all__ = ["parse", "parse_statements", "unify_sizes", "broadcast", "parse_size", "substitute"]

RESERVED = ("delta", "pattern", "constant")
INDEX_FUNCTIONS = {"softmax": SOFTMAX, "logsumexp": LOGSUMEXP}
# functions of numbers only (coefficients with sizes, e.g. a convolution's output size)
NUMBER_FUNCTIONS: dict[str, Callable] = {"floor": sympy.floor, "ceiling": sympy.ceiling,
                                         "max": sympy.Max, "min": sympy.Min}
# exact forms of the sympy functions behind relu/sigmoid/step, applied to numbers
_NUMERIC_FORMS = {relu: lambda a: sympy.Max(a, 0), sigmoid: lambda a: 1 / (1 + sympy.exp(-a)),
                  step: lambda a: sympy.Piecewise((1, a > 0), (0, True))}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def parse(text: str, sizes: Mapping[str, int] | None = None) -> Expr:
    """Parse index notation into an expression (the last statement's value).

    sizes: optional {index or axis name: int}; other sizes stay symbolic.
    Raises TNError with line and column for bad input.
    """
    if not isinstance(text, str):
        raise TNError(f"parse expects a string, got {type(text).__name__}")
    return _Parser(text, sizes).run()


def parse_statements(text: str, sizes: Mapping[str, int] | None = None
                     ) -> tuple[list[tuple[str, Expr]], Signature]:
    """Parse index notation keeping every statement: [(name, expr)] in order and the
    signature of the input tensors (every variable written in the text or `# vars:`).

    A statement's expression refers to an earlier statement `h` as the variable
    `Variable("h", axes=h's target indices, ...)` instead of substituting it (`parse` is
    the same program inlined). Same notation, scoping and size rules as `parse`; sizes are
    unified over all statements at once. A redefined name gets a fresh name (`h_`); an
    unnamed last statement is named `out`."""
    if not isinstance(text, str):
        raise TNError(f"parse_network expects a string, got {type(text).__name__}")
    return _Parser(text, sizes, keep=True).run_statements()


# what sympy's parser raises for text that is not an expression ('3 +', 'f(', 'x.y', 'a[0]')
_SYMPY_PARSE_ERRORS = (SyntaxError, tokenize.TokenError, TypeError, ValueError, AttributeError,
                       NameError, sympy.SympifyError)


def parse_size(text: str) -> Size:
    """A size written in notation ('3', 'n', 'floor((i - 1)/2) + 1') as a sympy size whose
    symbols are positive-integer size symbols (every name not followed by '(' is a symbol)."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return sympy.Integer(int(text))
    names = {m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)\s*(?!\s*\()", text)
             if not re.match(r"\s*\(", text[m.end():])}
    local = {n: size_symbol(n) for n in names}
    try:
        e = parse_expr(text, local_dict=local)
    except _SYMPY_PARSE_ERRORS as err:
        raise TNError(f"cannot read size {text!r}: {err}") from None
    if not isinstance(e, sympy.Expr):
        raise TNError(f"cannot read size {text!r}")
    return e


def broadcast(core: Expr | None, indices: Sequence[str], shape: Sequence[Size]) -> Expr:
    """`core` (None = the number 1) broadcast over the `indices` it lacks:
    Product((core, δ[i], δ[j], ...), indices) with one one-leg δ (the all-ones vector) per
    missing index, in `indices` order."""
    have = set(core.indices) if core is not None else set()
    deltas = [Delta([i], s) for i, s in zip(indices, shape) if i not in have]
    if not deltas:
        return ONE if core is None else core
    return Product(([core] if core is not None else []) + deltas, indices)


# --------------------------------------------------------------------------------------------
# size unification
# --------------------------------------------------------------------------------------------

class _Classes:
    """Union-find over sympy sizes; a class holds at most one int."""

    def __init__(self):
        self.parent: dict = {}
        self.order: list = []

    def add(self, s):
        if s not in self.parent:
            self.parent[s] = s
            self.order.append(s)

    def find(self, s):
        self.add(s)
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def union(self, a, b, index: str):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        ia, ib = self._int(ra), self._int(rb)
        if ia is not None and ib is not None and ia != ib:
            raise TNError(f"size mismatch for index {index!r}: {ia} vs {ib}")
        # keep an int (if any) at the root so conflicts are found in O(1)
        if ib is not None and ia is None:
            ra, rb = rb, ra
        self.parent[rb] = ra

    @staticmethod
    def _int(s):
        return int(s) if s.is_Integer else None

    def representatives(self) -> dict:
        """symbol -> chosen size (int > derived expression > first-seen symbol)."""
        members: dict = {}
        for s in self.order:
            members.setdefault(self.find(s), []).append(s)
        out = {}
        for group in members.values():
            ints = [s for s in group if s.is_Integer]
            derived = [s for s in group if not s.is_Integer and not s.is_Symbol]
            rep = ints[0] if ints else derived[0] if derived else group[0]
            for s in group:
                if s.is_Symbol and s != rep:
                    out[s] = rep
        return out


def unify_sizes(expr: Expr, sizes: Mapping[str, int] | None = None,
                links: Iterable[tuple[Size, Size, str]] = ()) -> Expr:
    """Make `expr` size-consistent: sizes joined by an index (in a product, a sum, a diagonal)
    are unified, `sizes` (index name -> int) are applied to every index of that name, and all
    variables, deltas, constants, zeros and the sums' coefficients are rebuilt with the chosen
    sizes. `links` are extra equalities (placeholder, size, index name), e.g. a `size(k)`
    coefficient tied to index k's size; a placeholder is never chosen as the representative.

    TNError naming the index when two different ints meet.
    """
    return unify_sizes_of([expr], sizes, links)[0]


def unify_sizes_of(exprs: Sequence[Expr], sizes: Mapping[str, int] | None = None,
                   links: Iterable[tuple[Size, Size, str]] = ()) -> list[Expr]:
    """`unify_sizes` over several expressions at once (the statements of a program): one set
    of size classes, so a symbol shared by two statements gets one size in both."""
    sizes = _check_sizes(sizes)
    links = list(links)
    uf = _Classes()
    nodes = [n for expr in exprs for n in expr.walk()]
    declared = [v for expr in exprs for v in expr.signature.values()]  # with folded-away ones
    for v in declared:  # variables' symbols first: they win ties
        for s in v.axis_shape:
            uf.add(s)
    for node in nodes:
        for s in node.shape:
            uf.add(s)
    for s in {s for expr in exprs for s in expr.signature.source_sizes}:  # dropped by a fold
        uf.add(s)
        if str(s) in sizes:
            uf.union(s, sizes[str(s)], str(s))
    for node in nodes + declared:
        if isinstance(node, Variable):
            for a, s in zip(node.axes, node.axis_shape):  # sizes by declared axis name
                if a in sizes:
                    uf.union(s, sizes[a], a)
            first: dict[str, Size] = {}
            for i, s in zip(node.occurrence, node.axis_shape):
                if i in first:
                    uf.union(first[i], s, i)
                first.setdefault(i, s)
        if isinstance(node, (Variable, Delta, Constant, Zero)):
            for i, s in zip(node.indices, node.shape):
                if i in sizes:
                    uf.union(s, sizes[i], i)
        elif isinstance(node, (Product, Sum)):
            seen: dict[str, Size] = {}
            for child in node.children:
                for i, s in zip(child.indices, child.shape):
                    if i in seen:
                        uf.union(seen[i], s, i)
                    else:
                        seen[i] = s
    for placeholder, size, index in links:
        uf.add(size)
        uf.add(placeholder)
        uf.union(size, placeholder, index)
    mapping = uf.representatives()
    if not mapping:
        return list(exprs)

    def final(s: Size) -> Size:
        for _ in range(8):
            t = _replace_symbols(s, mapping)
            if t == s:
                break
            s = t
        return s

    return [map_sizes(expr, final, coefficients=True) for expr in exprs]


def _replace_symbols(e: sympy.Expr, mapping: Mapping) -> sympy.Expr:
    """`e.xreplace(mapping)` that keeps a number times a sum unexpanded (see `_times`)."""
    if e in mapping:
        return mapping[e]
    if not e.args:
        return e
    args = [_replace_symbols(a, mapping) for a in e.args]
    if all(a is b for a, b in zip(args, e.args)):
        return e
    if e.is_Mul:
        out = sympy.Integer(1)
        for a in args:
            out = _times(out, a)
        return out
    return e.func(*args)


def _check_sizes(sizes) -> dict[str, sympy.Integer]:
    out = {}
    if sizes is None:
        return out
    if not isinstance(sizes, Mapping):
        raise TNError(f"sizes must be a mapping of index name to int, got {type(sizes).__name__}")
    for k, v in sizes.items():
        if not isinstance(k, str) or not k.isidentifier():
            raise TNError(f"sizes: {k!r} is not an index name")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise TNError(f"sizes[{k!r}] must be a positive int, got {v!r}")
        out[k] = sympy.Integer(v)
    return out


# --------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------

def _located(err: TNError) -> bool:
    """Does this TNError already carry a line and column?"""
    return getattr(err, "_tn_located", False)


_HEADER = re.compile(r"^\s*#\s*(vars|sizes)\s*:(.*)$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets/parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _call_name(node: ast.AST) -> str | None:
    """The name of the function a call `f(...)` calls, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id
    return None


def _names(nodes: Iterable[ast.AST]) -> list[str]:
    return [n.id for n in nodes if isinstance(n, ast.Name)]


def _subscript_items(node: ast.AST) -> list[ast.AST]:
    return list(node.elts) if isinstance(node, ast.Tuple) else [node]


class _Scopes:
    """Which index occurrences of one statement a product sees (the keep rule's "outside").

    An occurrence is an index name written in a subscript or as an index argument of `sum`,
    `softmax` or `logsumexp`. A call binds some names: `sum(e)` every index written in e,
    `sum(e, i, j)` i and j, `sum(e, keep=(k,))` all but k, `logsumexp(e, k)` k. An occurrence
    is seen by a product iff every call that binds its name and encloses it also encloses the
    product. The statement's target counts as an occurrence seen everywhere.
    """

    def __init__(self, rhs: ast.AST):
        self.chain: dict[int, tuple[int, ...]] = {}  # node id -> binder calls around it
        self.bound: dict[int | None, Counter] = {}   # binder id (None: statement) -> its names
        self.free: dict[int, list[str]] = {}         # node id -> occurrences free in it
        self.bound[None] = Counter(self._scan(rhs, ()))

    def add_target(self, target: Sequence[str]) -> None:
        self.bound[None] += Counter(target)

    def free_list(self, node: ast.AST) -> list[str]:
        """Occurrences inside `node` that no call inside it binds, in source order."""
        return self.free[id(node)]

    def outside(self, node: ast.AST) -> Counter:
        """Occurrences outside `node` that a product at `node` sees."""
        seen = Counter(self.bound[None])
        for binder in self.chain[id(node)]:
            seen += self.bound[binder]
        return seen - Counter(self.free[id(node)])

    def _scan(self, node: ast.AST, chain: tuple[int, ...]) -> list[str]:
        self.chain[id(node)] = chain
        children, own, binds = _scope_parts(node)
        inner = chain + (id(node),) if binds is not None else chain
        free: list[str] = []
        for child in children:
            free += self._scan(child, inner)
        free += own
        if binds is not None:
            self.bound[id(node)] = Counter(i for i in free if binds(i))
            free = [i for i in free if not binds(i)]
        self.free[id(node)] = free
        return free


def _scope_parts(node: ast.AST) -> tuple[list[ast.AST], list[str], Callable[[str], bool] | None]:
    """(children to scan, index names `node` itself writes, which names it binds or None)."""
    if isinstance(node, ast.Subscript):
        return [node.value], _names(_subscript_items(node.slice)), None
    name = _call_name(node)
    if name in ("sum", "softmax", "logsumexp") and node.args:
        listed = _names(node.args[1:])
        keep = [i for kw in node.keywords for i in _names(_subscript_items(kw.value))]
        if name == "softmax":
            binds = None
        elif name == "logsumexp" or (listed and not keep):
            binds = frozenset(listed).__contains__
        elif keep:
            binds = lambda i, kept=frozenset(keep): i not in kept  # noqa: E731
        else:
            binds = lambda i: True  # noqa: E731
        return [node.args[0]], listed + keep, binds
    if name == "size" or isinstance(node, ast.Name):  # size(k) names a size, not an index
        return [], [], None
    return list(ast.iter_child_nodes(node)), [], None


class _Parser:
    def __init__(self, text: str, sizes, keep: bool = False):
        self.keep = keep  # statements refer to earlier ones by name instead of inlining them
        self.names: dict[str, str] = {}  # keep mode: a written name -> its statement's name
        self.text = text
        self.lines = text.splitlines()
        self.sizes = _check_sizes(sizes)
        self.decls: dict[str, tuple[tuple[str, ...], tuple[Size, ...] | None]] = {}
        self.defs: dict[str, tuple[tuple[str, ...], Expr]] = {}
        self._numbers: dict[int, object] = {}
        self.links: list[tuple[Size, Size, str]] = []  # size(k) placeholders and k's sizes

    # ---- driver --------------------------------------------------------------------------
    def run(self) -> Expr:
        self._read_header()
        tree = self.syntax_tree()
        if not tree.body:
            raise TNError("empty program: expected at least one statement like 'y[i] = x[i]'")
        result = None
        for st in tree.body:
            result = self.statement(st)
        sizes = {k: int(v) for k, v in self.sizes.items()}
        return unify_sizes(self.with_written(result), sizes, self.links)

    def run_statements(self) -> tuple[list[tuple[str, Expr]], Signature]:
        """Keep mode: every statement (name, expression) and the inputs' signature."""
        self._read_header()
        tree = self.syntax_tree()
        if not tree.body:
            raise TNError("empty program: expected at least one statement like 'y[i] = x[i]'")
        for st in tree.body:
            self.statement(st)
        names = list(self.defs)
        if not names or self.last_name is None:  # an unnamed last statement
            names.append(fresh_name("out", set(self.defs) | set(self.decls)))
            self.defs[names[-1]] = (self.last.indices, self.last)
        exprs = [e for _, e in self.defs.values()]
        declared = Signature(Variable(name, axes, None, shape)
                             for name, (axes, shape) in self.decls.items())
        holder = with_signature(ONE, *exprs, declared)  # joins the leaves' signature
        sizes = {k: int(v) for k, v in self.sizes.items()}
        out = unify_sizes_of(exprs + [holder], sizes, self.links)
        leaves = Signature([v for v in out[-1].signature.values() if v.name not in self.defs],
                           out[-1].signature.source_sizes)
        return list(zip(names, out[:-1])), leaves

    def with_written(self, result: Expr) -> Expr:
        """`result` whose signature holds every variable written in the text (in statements
        the result does not use, in `# vars:`) and every statement's sizes: its own
        variables first, in the order it uses them."""
        statements = [e for _, e in self.defs.values()]
        declared = Signature(Variable(name, axes, None, shape)
                             for name, (axes, shape) in self.decls.items())
        return with_signature(result, result, *statements, declared)

    def syntax_tree(self) -> ast.Module:
        """`ast.parse` of the text; Python's syntax errors and warnings (e.g. "invalid decimal
        literal") become TNErrors with line, column and a caret (warnings stay local)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tree = ast.parse(self.text, mode="exec")
            except SyntaxError as e:
                raise self.located("syntax error", e.msg, e.lineno, e.offset) from None
        for w in caught:
            raise self.located("syntax problem", str(w.message), w.lineno, None)
        return tree

    def located(self, what: str, message: str, line: int | None, column: int | None) -> TNError:
        """TNError "what at line L, column C: message" showing the line (and a caret)."""
        if not line or line > len(self.lines):
            return TNError(f"{what}: {message}")
        where = f"line {line}" + (f", column {column}" if column else "")
        caret = f"\n    {' ' * (column - 1)}^" if column else ""
        return TNError(f"{what} at {where}: {message}\n    {self.lines[line - 1]}{caret}")

    def _read_header(self) -> None:
        for lineno, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if not m:
                continue
            kind, body = m.group(1), m.group(2)
            for item in _split_top(body):
                if kind == "sizes":
                    name, sep, value = item.partition("=")
                    if not sep or not name.strip().isidentifier() or not value.strip().isdigit() \
                            or int(value) <= 0:
                        raise TNError(f"line {lineno}: bad size {item!r} in '# sizes:' (expected NAME=INT)")
                    self.sizes.setdefault(name.strip(), sympy.Integer(int(value)))
                else:
                    self._declare_from_header(item, lineno)

    def _declare_from_header(self, item: str, lineno: int) -> None:
        m = re.fullmatch(r"([A-Za-z_]\w*)\s*(?:\[([^\]]*)\])?\s*(?:=\s*\((.*)\))?", item)
        if not m:
            raise TNError(f"line {lineno}: bad declaration {item!r} in '# vars:' "
                          f"(expected NAME[i,j] or NAME[i,j]=(3, j))")
        name, axes_text, shape_text = m.groups()
        axes = tuple(a.strip() for a in (axes_text or "").split(",") if a.strip())
        shape = None
        if shape_text is not None:
            shape = tuple(parse_size(s) for s in _split_top(shape_text))
            if len(shape) != len(axes):
                raise TNError(f"line {lineno}: variable {name!r} declares {len(axes)} axes but "
                              f"{len(shape)} sizes")
        self.decls[name] = (axes, shape)

    # ---- errors ----------------------------------------------------------------------------
    def error(self, node: ast.AST, message: str) -> TNError:
        line = getattr(node, "lineno", None)
        col = getattr(node, "col_offset", None)
        where = f"line {line}, column {col + 1}: " if line is not None else ""
        src = ""
        if line is not None and line <= len(self.lines):
            src = f"\n    {self.lines[line - 1]}\n    {' ' * col}^"
        err = TNError(f"{where}{message}{src}")
        err._tn_located = True
        return err

    # ---- statements ------------------------------------------------------------------------
    def statement(self, st: ast.stmt) -> Expr:
        if isinstance(st, ast.Assign):
            if len(st.targets) != 1:
                raise self.error(st, "one target per statement (no 'a = b = ...')")
            name, target = self.target(st.targets[0])
            rhs = st.value
        elif isinstance(st, ast.Expr):
            name, target, rhs = None, None, st.value
        else:
            raise self.error(st, f"unsupported statement {type(st).__name__}: expected "
                                 f"'y[i,j] = expression' or an expression")
        self.scopes = _Scopes(rhs)
        if target is None:  # bare expression: keep the free indices written once (einsum style)
            free = self.scopes.free_list(rhs)
            counts = Counter(free)
            target = tuple(dict.fromkeys(i for i in free if counts[i] == 1))
        self.target_indices = target
        self.scopes.add_target(target)
        self.size_refs: dict[sympy.Symbol, str] = {}
        self.index_sizes: dict[str, list[Size]] = {}
        e = self.expr(rhs)
        self._link_size_refs()
        missing = [i for i in target if i not in e.indices]
        if missing:
            raise self.error(st, f"target index {missing[0]!r} of {name or 'the result'} does not "
                                 f"appear free on the right side (free there: {list(e.indices)})")
        if e.indices != target:
            e = Product((e,), target)
        self.last, self.last_name = e, name
        if name is not None:
            if self.keep:
                new = fresh_name(name, set(self.defs) | set(self.decls))
                self.names[name] = self.last_name = name = new
            self.defs[name] = (target, e)
        return e

    def target(self, node: ast.expr) -> tuple[str, tuple[str, ...]]:
        if isinstance(node, ast.Name):
            name, idx = node.id, ()
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            name, idx = node.value.id, self.index_list(node)
        else:
            raise self.error(node, "the target must be a name or a subscripted name like y[n,o]")
        if name in RESERVED:
            raise self.error(node, f"{name!r} is reserved and cannot be defined")
        if name in self.decls:
            raise self.error(node, f"{name!r} is already an input variable; a statement cannot "
                                   f"define it")
        if len(set(idx)) != len(idx):
            raise self.error(node, f"target {name} has a repeated index in {list(idx)}")
        return name, idx

    def index_list(self, node: ast.Subscript) -> tuple[str, ...]:
        sl = node.slice
        items = sl.elts if isinstance(sl, ast.Tuple) else [sl]
        out = []
        for it in items:
            if not isinstance(it, ast.Name):
                raise self.error(it, f"indices must be names, got {ast.unparse(it)!r}")
            out.append(it.id)
        return tuple(out)

    # ---- numbers ---------------------------------------------------------------------------
    def number(self, node: ast.AST):
        """The sympy number `node` denotes, or None if it involves tensors."""
        key = id(node)
        if key in self._numbers:
            return self._numbers[key]
        v = self._number(node)
        if v is not None:
            v = self.real_number(node, v)
        self._numbers[key] = v
        return v

    def real_number(self, node: ast.AST, v: sympy.Expr) -> sympy.Expr:
        """`v` with relu/sigmoid/step of numbers written out; TNError naming the text when it
        is not a finite real number (`0**(-1)`, `log(0)`, `(-1)**(1/2)`, `1e400`)."""
        v = sympy.sympify(v)
        for fn, form in _NUMERIC_FORMS.items():
            if v.has(fn):
                v = v.replace(fn, form)
        problem = _number_problem(v)
        if problem:
            raise self.error(node, f"the number {self.source(node)!r} is {problem}; numbers in "
                                   f"notation must be finite and real")
        return v

    def source(self, node: ast.AST) -> str:
        """The text of `node` as written."""
        return ast.get_source_segment(self.text, node) or ast.unparse(node)

    def size_ref(self, node: ast.Call) -> sympy.Symbol:
        """`size(k)`: the size of index k in this statement, as a placeholder symbol that
        `unify_sizes` replaces (see `_link_size_refs`)."""
        if len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Name):
            raise self.error(node, f"size takes one index name, as in size(n), not "
                                   f"{self.source(node)!r}")
        placeholder = sympy.Dummy(f"size_{node.args[0].id}", integer=True, positive=True)
        self.size_refs[placeholder] = node.args[0].id
        return placeholder

    def _link_size_refs(self) -> None:
        """Tie each `size(k)` of the statement just read to every size of index k written in
        it; when no k is written there, to `sizes[k]` or else the size symbol k."""
        for placeholder, k in self.size_refs.items():
            found = self.index_sizes.get(k)
            if found:
                self.links += [(placeholder, s, k) for s in found]
            else:
                self.links.append((placeholder, self.sizes.get(k, size_symbol(k)), k))

    def _number(self, node):
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.error(node, f"unexpected constant {node.value!r}")
            return sympy.Integer(node.value) if isinstance(node.value, int) \
                else _rational(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.number(node.operand)
            return None if v is None else (_times(-1, v) if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
            a, b = self.number(node.left), self.number(node.right)
            if a is None or b is None:
                return None
            if isinstance(node.op, ast.Div) and b == 0:
                raise self.error(node, "division by zero")
            op = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: _times(a, b),
                  ast.Div: lambda: _times(a, 1 / b), ast.Pow: lambda: a ** b}[type(node.op)]
            v = op()
            return v if v.free_symbols else _exact_number(v)
        name = _call_name(node)
        if name == "size":
            return self.size_ref(node)
        if name in NUMBER_FUNCTIONS and node.args and not node.keywords:
            args = [self.number(a) for a in node.args]
            return None if any(a is None for a in args) else NUMBER_FUNCTIONS[name](*args)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) == 1 \
                and not node.keywords and node.func.id not in INDEX_FUNCTIONS \
                and node.func.id not in ("sum", "elementwise") + RESERVED:
            v = self.number(node.args[0])
            if v is None:
                return None
            try:
                fn = get_elementwise(node.func.id)
            except TNError as err:
                raise self.error(node.func, str(err)) from None
            return fn.formula.subs(X, v)
        return None

    # ---- expressions -----------------------------------------------------------------------
    def expr(self, node: ast.AST) -> Expr:
        try:
            return self._expr(node)
        except TNError as err:
            if _located(err):
                raise
            raise self.error(node, str(err)) from None

    def _expr(self, node: ast.AST) -> Expr:
        v = self.number(node)
        if v is not None:
            return _scaled(v, ONE)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            return self.add_chain(node)
        if _is_mult(node):
            c, core = self.mult_chain(node)
            if c == 1 and self.has_number(node):
                return Sum(((c, core),), self.ordered(core.indices))
            return _scaled(c, core, self.ordered(core.indices))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            return self.power(node)
        return self.atom(node)

    def mult_chain(self, node: ast.AST) -> tuple[sympy.Expr, Expr]:
        """(coefficient, core) of a `*`/`/`/unary-minus chain; core is a Product when the chain
        has two or more tensor factors."""
        coef = sympy.Integer(1)
        factor_nodes: list[ast.AST] = []

        def flatten(n):
            nonlocal coef
            v = self.number(n)
            if v is not None:
                coef = _times(coef, v)
            elif isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult):
                flatten(n.left)
                flatten(n.right)
            elif isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
                flatten(n.left)
                d = self.number(n.right)
                if d is None:
                    raise self.error(n.right, f"'/' divides by numbers only, not by "
                                              f"{ast.unparse(n.right)!r}")
                if d == 0:
                    raise self.error(n.right, "division by zero")
                coef = _times(coef, 1 / d)
            elif isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
                if isinstance(n.op, ast.USub):
                    coef = _times(-1, coef)
                flatten(n.operand)
            else:
                factor_nodes.append(n)

        flatten(node)
        factors = [self.expr(f) for f in factor_nodes]
        if not factors:
            return coef, ONE
        if len(factors) == 1:
            return coef, factors[0]
        return coef, Product(factors, self.kept(node, factors))

    def has_number(self, node: ast.AST) -> bool:
        """Does this `*` chain spell a numeric factor (so `1*e` is a one-term sum)?"""
        if self.number(node) is not None:
            return True
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            return self.has_number(node.left) or self.has_number(node.right)
        if isinstance(node, ast.UnaryOp):
            return self.has_number(node.operand)
        return False

    def ordered(self, indices: Sequence[str]) -> tuple[str, ...]:
        """The parser's index order for a sum or product: target order first, then the rest."""
        target = self.target_indices
        return tuple([i for i in target if i in indices] + [i for i in indices if i not in target])

    def kept(self, node: ast.AST, factors: list[Expr]) -> tuple[str, ...]:
        """The keep rule: a factor index is kept iff it is in the target or free somewhere in
        the statement outside this chain (an index a `sum(...)` binds is free only inside it).
        Order: target order, then first appearance."""
        outside = self.scopes.outside(node)
        target = self.target_indices
        seen = list(dict.fromkeys(i for f in factors for i in f.indices))
        keep = [i for i in seen if i in target or outside[i] > 0]
        return tuple([i for i in target if i in keep] + [i for i in keep if i not in target])

    def add_chain(self, node: ast.BinOp) -> Expr:
        leaves: list[tuple[int, ast.AST]] = []

        def flatten(n, sign):
            if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Sub)):
                flatten(n.left, sign)
                flatten(n.right, sign if isinstance(n.op, ast.Add) else -sign)
            else:
                leaves.append((sign, n))

        flatten(node, 1)
        parts: list[tuple[sympy.Expr, Expr | None, ast.AST]] = []
        for sign, leaf in leaves:
            v = self.number(leaf)
            if v is not None:
                parts.append((_times(sign, v), None, leaf))
            elif _is_mult(leaf):
                c, core = self.mult_chain(leaf)
                parts.append((_times(sign, c), core, leaf))
            else:
                parts.append((sympy.Integer(sign), self.expr(leaf), leaf))
        full: set[str] = set()
        for _, core, _ in parts:
            if core is not None:
                full |= set(core.indices)
        if not full:  # all scalar
            return Sum([(c, ONE if core is None else core) for c, core, _ in parts], ())
        first = next((p for p in parts if p[1] is not None and set(p[1].indices) == full), None)
        if first is None:
            a, b = [p for p in parts if p[1] is not None and p[1].indices][:2]
            raise self.error(b[2], f"index sets differ in '+'/'-': {ast.unparse(a[2])!r} has "
                                   f"{sorted(a[1].indices)} but {ast.unparse(b[2])!r} has "
                                   f"{sorted(b[1].indices)} (a term may only lack indices "
                                   f"that another term has: it is then broadcast)")
        for c, core, leaf in parts:
            if core is not None and not set(core.indices) <= full:  # pragma: no cover
                raise self.error(leaf, "index sets differ in '+'/'-'")
        target = self.target_indices
        order = tuple([i for i in target if i in full] + [i for i in first[1].indices if i not in target])
        sizes = {}
        for _, core, _ in parts:
            if core is not None:
                for i, s_ in zip(core.indices, core.shape):
                    sizes.setdefault(i, s_)
        shape = [sizes[i] for i in order]
        terms = []
        for c, core, _ in parts:
            if core is None or set(core.indices) != full:
                core = broadcast(core, order, shape)
            terms.append((c, core))
        return Sum(terms, order)

    def power(self, node: ast.BinOp) -> Expr:
        p = self.number(node.right)
        if p is None or p.free_symbols:
            raise self.error(node.right, f"'**' needs a number exponent, not {ast.unparse(node.right)!r}")
        return Func(power(p), self.expr(node.left))

    # ---- atoms -------------------------------------------------------------------------------
    def atom(self, node: ast.AST) -> Expr:
        """A tensor, defined name, constant or call; the sizes of the indices written in a
        subscript are noted for `size(k)`."""
        out = self._atom(node)
        if isinstance(node, ast.Subscript):
            for i, s in zip(out.indices, out.shape):
                self.index_sizes.setdefault(i, []).append(s)
        return out

    def _atom(self, node: ast.AST) -> Expr:
        if isinstance(node, ast.Name):
            return self.reference(node.id, (), node)
        if isinstance(node, ast.Subscript):
            idx = self.index_list(node)
            base = node.value
            if isinstance(base, ast.Name):
                if base.id == "delta":
                    return Delta(idx, self._delta_size(idx, None))
                if base.id == "pattern":
                    return self.pattern(idx, None, node)
                return self.reference(base.id, idx, node)
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name):
                if base.func.id == "pattern":
                    return self.pattern(idx, base, node)
                if base.func.id == "constant":
                    return self.constant(idx, base)
                if base.func.id == "delta":
                    if len(base.args) != 1 or base.keywords:
                        raise self.error(base, "delta(SIZE)[i,j] takes exactly one size")
                    return Delta(idx, self._delta_size(idx, base.args[0]))
            raise self.error(node, f"cannot subscript {ast.unparse(base)!r}; expected a name "
                                   f"like W[o,i], delta[i,j] or pattern(...)[k,o,i]")
        if isinstance(node, ast.Call):
            return self.call(node)
        raise self.error(node, f"unsupported syntax {type(node).__name__} "
                               f"({ast.unparse(node)!r}); expected tensors, numbers, "
                               f"+ - * / ** and function calls")

    def _delta_size(self, idx: tuple[str, ...], size_node) -> Size:
        if size_node is None:
            return self.sizes.get(idx[0], size_symbol(idx[0])) if idx else sympy.Integer(1)
        if isinstance(size_node, ast.Name):
            return size_symbol(size_node.id)
        if isinstance(size_node, ast.Constant) and isinstance(size_node.value, (int, str)):
            return parse_size(str(size_node.value))
        raise self.error(size_node, "a delta size is an int, a name or a string expression")

    def reference(self, name: str, idx: tuple[str, ...], node: ast.AST) -> Expr:
        if name in RESERVED:
            raise self.error(node, f"{name} needs indices, e.g. {name}[i,j]")
        if self.keep and name in self.names:
            name = self.names[name]
        if name in self.defs:
            target, e = self.defs[name]
            if len(idx) != len(target):
                raise self.error(node, f"{name!r} was defined with {len(target)} indices "
                                       f"{list(target)} but is used with {len(idx)} {list(idx)}")
            if self.keep:
                return Variable(name, target, idx, e.shape)
            return substitute(e, target, idx)
        return self.variable(name, idx, node)

    def variable(self, name: str, idx: tuple[str, ...], node: ast.AST) -> Variable:
        decl = self.decls.get(name)
        if decl is None:
            axes: list[str] = []
            for i in idx:
                axes.append(fresh_name(i, axes))
            decl = (tuple(axes), None)
            self.decls[name] = decl
        axes, shape = decl
        if len(idx) != len(axes):
            raise self.error(node, f"variable {name!r} is used with {len(idx)} indices {list(idx)} "
                                   f"but was declared with {len(axes)} {list(axes)}")
        return Variable(name, axes, idx, shape)

    def call(self, node: ast.Call) -> Expr:
        if not isinstance(node.func, ast.Name):
            raise self.error(node.func, f"unsupported function {ast.unparse(node.func)!r}")
        fname = node.func.id
        if node.keywords and fname not in ("pattern", "sum"):
            raise self.error(node, f"{fname}() takes no keyword arguments")
        args = node.args
        if fname in INDEX_FUNCTIONS:
            if len(args) != 2 or not isinstance(args[1], ast.Name):
                raise self.error(node, f"{fname} takes an expression and an index name: "
                                       f"{fname}(e, k)")
            return Func(INDEX_FUNCTIONS[fname], self.expr(args[0]), args[1].id)
        if fname == "sum":
            if not args:
                raise self.error(node, "sum needs an argument: sum(e) or sum(e, i, ...)")
            e = self.expr(args[0])
            if node.keywords:
                return self.sum_keep(node, e)
            over = []
            for a in args[1:]:
                if not isinstance(a, ast.Name):
                    raise self.error(a, "sum(e, i, ...) takes index names after the expression")
                if a.id not in e.indices:
                    raise self.error(a, f"sum over index {a.id!r}, which is not free in the "
                                        f"argument (free: {list(e.indices)})")
                over.append(a.id)
            keep = [i for i in e.indices if i not in over] if over else []
            return Product((e,), keep)
        if fname == "elementwise":
            if len(args) != 2 or not (isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)):
                raise self.error(node, "elementwise takes a formula string in x and an expression: "
                                       "elementwise(\"1 - tanh(x)**2\", e)")
            return Func(formula_function(args[0].value), self.expr(args[1]))
        if fname in RESERVED:
            raise self.error(node, f"{fname}(...) needs indices, e.g. {fname}(...)[i,j]")
        try:
            fn = get_elementwise(fname)
        except TNError as err:
            raise self.error(node.func, str(err)) from None
        if len(args) != 1:
            raise self.error(node, f"{fname} takes one argument, got {len(args)}")
        return Func(fn, self.expr(args[0]))

    def sum_keep(self, node: ast.Call, e: Expr) -> Expr:
        """sum(e, keep=(i, j)): keep exactly i, j in this order, sum the others."""
        if len(node.args) != 1 or len(node.keywords) != 1 or node.keywords[0].arg != "keep":
            raise self.error(node, "sum takes index names or keep=(i, j, ...), not both")
        value = node.keywords[0].value
        items = value.elts if isinstance(value, ast.Tuple) else [value]
        keep = []
        for a in items:
            if not isinstance(a, ast.Name):
                raise self.error(a, "keep=(i, j, ...) takes index names")
            if a.id not in e.indices:
                raise self.error(a, f"keep index {a.id!r} is not free in the argument "
                                    f"(free: {list(e.indices)})")
            keep.append(a.id)
        if len(set(keep)) != len(keep):
            raise self.error(value, f"keep has a repeated index: {keep}")
        return Product((e,), keep)

    def constant(self, idx: tuple[str, ...], call: ast.Call) -> Expr:
        """constant("kind", (params...), ("size", ...))[i,j,...]: any registered constant."""
        if len(call.args) != 3 or call.keywords:
            raise self.error(call, 'constant takes ("kind", (params...), ("size", ...))')
        try:
            kind, params, shape = (ast.literal_eval(a) for a in call.args)
        except ValueError:
            raise self.error(call, "constant(...) arguments must be literals") from None
        if not isinstance(kind, str) or not isinstance(params, tuple) or not isinstance(shape, tuple):
            raise self.error(call, 'constant takes ("kind", (params...), ("size", ...))')
        return Constant(kind, params, idx, [parse_size(str(x)) for x in shape])

    def pattern(self, idx: tuple[str, ...], call: ast.Call | None, node: ast.AST) -> Expr:
        kwargs = {}
        if call is not None:
            if call.args:
                raise self.error(call, "pattern takes keywords only: pattern(stride=S, padding=P, dilation=D)")
            for kw in call.keywords:
                if kw.arg not in ("stride", "padding", "dilation"):
                    raise self.error(kw.value, f"pattern: unknown keyword {kw.arg!r} "
                                               f"(expected stride, padding, dilation)")
                try:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    raise self.error(kw.value, f"pattern: {kw.arg} must be a literal") from None
                if isinstance(kwargs[kw.arg], list):
                    kwargs[kw.arg] = tuple(kwargs[kw.arg])
        if len(idx) != 3:
            raise self.error(node, f"pattern needs three indices [k,o,i], got {list(idx)}")
        sizes = {i: self.sizes.get(i, size_symbol(i)) for i in (idx[0], idx[2])}
        return pattern_constant(idx, sizes, **kwargs)


def formula_function(formula: str) -> Elementwise:
    """An (unregistered) elementwise function from a sympy formula string in x."""
    local = {"x": X, "sigmoid": sigmoid, "relu": relu, "step": step}
    try:
        f = sympy.sympify(formula, locals=local)
    except (sympy.SympifyError, SyntaxError, TypeError) as err:
        raise TNError(f"cannot read formula {formula!r}: {err}") from None
    extra = f.free_symbols - {X}
    if extra:
        raise TNError(f"formula {formula!r} may only use x, found {sorted(map(str, extra))}")
    return Elementwise(formula, f)


def _times(a, b) -> sympy.Expr:
    """a·b for numbers. A number times a sum with sizes stays as written, `2*(size(n) + 1)`
    (sympy would expand it): it is the form simplify gives coefficients, so they print and
    parse back unchanged."""
    a, b = sympy.sympify(a), sympy.sympify(b)
    if a.is_Add and b.is_Rational:
        a, b = b, a
    if a.is_Rational and a != 1 and b.is_Add and b.free_symbols:
        return sympy.Mul(a, b, evaluate=False)
    return a * b


def _number_problem(v: sympy.Expr) -> str:
    """Why the number `v` is not finite and real ("" if it is; sizes in it are positive ints)."""
    if v.has(sympy.nan):
        return "undefined"
    if v.has(sympy.zoo, sympy.oo, sympy.S.NegativeInfinity) or v.is_finite is False:
        return "infinite"
    if v.is_extended_real is False:
        return f"complex ({v})"
    if v.free_symbols:
        return ""
    n = v.evalf()
    if n.is_real and n.is_finite:
        return ""
    return f"not a finite real number ({v})"


def _is_mult(node: ast.AST) -> bool:
    return (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div))) or \
        (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)))


def _scaled(c, core: Expr, order: Sequence[str] | None = None) -> Expr:
    """c·core as the parser spells it: core itself (c = 1), Zero (c = 0), else a one-term Sum
    (indices in `order`, default the core's)."""
    if c == 0:  # the tensors and sizes written in `core` stay in the signature
        return with_signature(Zero(core.indices, core.shape), core)
    if c == 1:
        return core
    return Sum(((c, core),), order)


def substitute(e: Expr, target: tuple[str, ...], idx: tuple[str, ...]) -> Expr:
    """A defined expression seen with index names `idx` (a repeated name takes a diagonal)."""
    if len(set(idx)) == len(idx):
        return rename_free(e, dict(zip(target, idx)))
    taken = set(e.all_indices) | set(idx)
    names, deltas, first = [], [], {}
    for t, i in zip(target, idx):
        if i in first:
            j = fresh_name(i, taken)
            taken.add(j)
            names.append(j)
            deltas.append((first[i], j, e.size_of(t)))
        else:
            first[i] = i
            names.append(i)
    renamed = rename_free(e, dict(zip(target, names)))
    out = tuple(dict.fromkeys(idx))
    return Product([renamed] + [Delta([a, b], s) for a, b, s in deltas], out)


@lru_cache(maxsize=4096)
def _rational(value: float) -> sympy.Rational:
    """A float literal as the rational sympy reads it (`nsimplify(rational=True)`, ~9 ms a
    call; cached: printed programs repeat their constants)."""
    return sympy.nsimplify(value, rational=True)


@lru_cache(maxsize=4096)
def _exact_number(v: sympy.Expr) -> sympy.Expr:
    """`sympy.nsimplify` of a constant number expression (2 / sqrt(pi), 0.5 ** 2): exact where
    sympy recognises it. Cached: the search takes ~5 ms, and imported models repeat constants."""
    return sympy.nsimplify(v)
