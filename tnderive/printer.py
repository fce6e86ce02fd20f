"""IR → index notation: `to_notation(expr)` (also `str(expr)`).

The text parses back to an equal expression: `parse(to_notation(e)) == e` for every
expression the parser or the builder makes (and for most others). How:

* The result is printed as a statement `out[I] = ...` with `I = expr.indices`.
* A sub-expression that cannot be written inline without changing its meaning (a product
  nested directly in a product, a product whose summed index is also used outside it, an
  index order the parser would not choose, ...) is hoisted into a helper statement
  `t1[...] = ...` printed before the result and referred to by name.
* Variables whose declared axes differ from their first printed occurrence, or whose sizes
  are not the default symbols, are declared in a leading `# vars: W[o,i]=(3, i)` line; a
  delta whose size would not be recovered is written `delta(n)[i,j]`.
* Elementwise functions print by their registered name (found by formula), powers as `**`,
  anything else as `elementwise("formula in x", e)`.
* Scoping follows the parser (`notation._Scopes`): an index a `sum(...)` or `logsumexp`
  binds is seen only by the products inside that call, so a product that needs an index seen
  from outside such a call is hoisted.
* Coefficients are written in the parser's number grammar: a size symbol k as `size(k)`,
  e as `exp(1)`; `2*(size(n) + 1)` stays factored, as simplify writes it.
"""
from __future__ import annotations

import ast
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import sympy
from sympy.printing.str import StrPrinter

from .errors import TNError
from .functions import Elementwise, IndexFunction, X, registered_elementwise, registry_version
from .ir import (ONE, Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name,
                 size_symbol)
from .notation import _times, parse

__all__ = ["to_notation", "statements_notation"]

_KEYWORDS = {"delta", "pattern", "constant", "sum", "softmax", "logsumexp", "elementwise", "size",
             "floor", "ceiling", "max", "min"}


def to_notation(expr: Expr, name: str = "out") -> str:
    """Index notation for `expr`; the last statement (named `name`) is the result."""
    if not isinstance(expr, Expr):
        raise TNError(f"to_notation expects an expression, got {type(expr).__name__}")
    return _checked_notation(expr, name, registry_version())


@lru_cache(maxsize=2048)
def _checked_notation(expr: Expr, name: str, registry: int) -> str:
    """The implicit spelling when it parses back to `expr`, else the explicit one. Remembered
    per (expression, name, registry version of the elementwise functions), bounded: generated
    code prints the same statements in the docstring of every compile, and the check (a
    parse) costs more than the printing."""
    text = _Printer(expr, explicit=False).program(name)
    if not _spellings_differ(expr):  # both spellings are this text: nothing to choose
        return text
    try:
        if parse(text) == expr:
            return text
    except TNError:  # a best-effort check: fall back to the explicit spelling
        pass
    return _Printer(expr, explicit=True).program(name)


def _spellings_differ(expr: Expr) -> bool:
    """Whether the explicit spelling differs from the implicit one: only a delta whose size
    is not its first index's symbol (also the one-index deltas a zero is written with), or a
    pattern constant, is written differently (`_Render.delta`, `_Render.constant`)."""
    for node in expr.walk():
        if isinstance(node, Delta) and node.size != size_symbol(node.indices[0]):
            return True
        if isinstance(node, Zero) and any(size != size_symbol(i)
                                          for i, size in zip(node.indices, node.shape)):
            return True
        if isinstance(node, Constant) and node.kind == "pattern":
            return True
    return False


def statements_notation(statements: Sequence[tuple[str, Expr]], explicit: bool = False) -> str:
    """Index notation of a program, one statement per line (plus the helper statements a
    statement needs, named apart from every name of the program) under one `# vars:` line
    for the input tensors. A statement refers to an earlier one by its name."""
    names = {n for n, _ in statements}
    taken = set(names)
    for _, e in statements:
        taken |= set(e.variables)
    lines: list[str] = []
    declared: dict[str, str] = {}
    for name, expr in statements:
        printer = _Printer(expr, explicit, taken - {name}, references=names)
        body, items = printer.lines(name)
        taken |= printer.taken
        lines.extend(body)
        for var, item in items:
            declared.setdefault(var, item)
    header = "# vars: " + ", ".join(declared.values()) if declared else ""
    return "\n".join(([header] if header else []) + lines)


class _Printer:
    def __init__(self, root: Expr, explicit: bool, taken: set[str] = frozenset(),
                 references: set[str] = frozenset()):
        self.root = root
        self.explicit = explicit
        self.references = references  # names of statements: never declared in `# vars:`
        self.taken = set(root.variables) | _KEYWORDS | set(registered_elementwise()) | set(taken)
        self.helper_names: dict[Expr, str] = {}
        self.helper_text: dict[str, tuple[str, set[str]]] = {}
        self.helper_order: list[str] = []

    def fresh(self, base: str) -> str:
        k = 0
        name = base
        while name in self.taken:
            k += 1
            name = f"{base}{k}"
        self.taken.add(name)
        return name

    # ---- program -----------------------------------------------------------------------------
    def program(self, name: str) -> str:
        lines, items = self.lines(name)
        header = "# vars: " + ", ".join(item for _, item in items) if items else ""
        return "\n".join(([header] if header else []) + lines)

    def lines(self, name: str) -> tuple[list[str], list[tuple[str, str]]]:
        """The statements (helpers, then `name`) and the `# vars:` items (variable, text)."""
        out = self.fresh(name if name.isidentifier() else "out")
        main, refs = self.statement(out, self.root)
        used: list[str] = []
        stack = list(refs)
        while stack:  # helpers reachable from the result
            h = stack.pop()
            if h not in used:
                used.append(h)
                stack.extend(self.helper_text[h][1])
        lines = [self.helper_text[h][0] for h in self.helper_order if h in used] + [main]
        return lines, self.header(lines)

    def helper(self, node: Expr) -> str:
        name = self.helper_names.get(node)
        if name is None:
            name = self.fresh("t")
            self.helper_names[node] = name
            text, refs = self.statement(name, node)
            self.helper_text[name] = (text, refs)
            self.helper_order.append(name)
        return name

    def statement(self, name: str, node: Expr) -> tuple[str, set[str]]:
        target = node.indices
        hoist: set[Expr] = set()
        while True:
            r = _Render(self, target, hoist)
            text, shown = r.top(node)
            total = Counter(shown) + Counter(target)
            bad = {rec.product for rec in r.products
                   if not _keeps_right(rec.product, r.outside(rec, total), target)}
            if not bad - hoist:
                break
            hoist |= bad
        lhs = f"{name}[{','.join(target)}]" if target else name
        return f"{lhs} = {text}", r.refs

    def header(self, lines: list[str]) -> list[tuple[str, str]]:
        first: dict[str, tuple[str, ...]] = {}
        for line in lines:
            _first_occurrences(ast.parse(line).body[0].value, first)
        items = []
        for name, v in self.root.variables.items():
            if name in self.references:
                continue
            occ = first.get(name)
            axes_ok = occ is not None and _dedupe(occ) == v.axes
            default = tuple(size_symbol(a) for a in v.axes)
            if axes_ok and v.axis_shape == default:
                continue
            item = f"{name}[{','.join(v.axes)}]" if v.axes else name
            if v.axis_shape != default:
                item += "=(" + ", ".join(_size_text(s) for s in v.axis_shape) + \
                        ("," if len(v.axes) == 1 else "") + ")"
            items.append((name, item))
        return items


def _dedupe(occ: tuple[str, ...]) -> tuple[str, ...]:
    axes: list[str] = []
    for i in occ:
        axes.append(fresh_name(i, axes))
    return tuple(axes)


def _first_occurrences(node: ast.AST, first: dict) -> None:
    """Variables' first subscripts in source order (helpers' names are not variables, but
    they never collide with variable names)."""
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        sl = node.slice
        items = sl.elts if isinstance(sl, ast.Tuple) else [sl]
        first.setdefault(node.value.id, tuple(getattr(i, "id", "") for i in items))
        return
    if isinstance(node, ast.Name):
        first.setdefault(node.id, ())
        return
    if isinstance(node, ast.Call):
        fname = getattr(node.func, "id", "")
        if fname == "size":  # size(k) names an index's size, not a variable
            return
        args = node.args[:1] if fname in ("softmax", "logsumexp", "sum") else \
            node.args[1:] if fname == "elementwise" else node.args
        for a in args:
            _first_occurrences(a, first)
        return
    for child in ast.iter_child_nodes(node):
        _first_occurrences(child, first)


def _size_text(s) -> str:
    """A size as the `# vars:` line writes it (read back by `notation.parse_size`)."""
    return str(s)


def _written_factors(p: "Product | Zero") -> list[tuple[str, ...]]:
    """The indices of each factor of an inline `*` chain: a product's factors, or the legs
    `0*delta[i]*delta[j]` that spell a zero."""
    if isinstance(p, Zero):
        return [(i,) for i in p.indices]
    return [f.indices for f in p.factors]


def _keeps_right(p: "Product | Zero", outside: Counter, target) -> bool:
    """Would the parser's keep rule give the chain `p` exactly its free indices (and order),
    given the occurrences `outside` it that it sees? (A zero with one leg is no chain.)"""
    if isinstance(p, Zero) and len(p.indices) < 2:
        return True
    tset = set(target)
    seen = list(dict.fromkeys(i for f in _written_factors(p) for i in f))
    keep = [i for i in seen if i in tset or outside[i] > 0]
    order = tuple([i for i in target if i in keep] + [i for i in keep if i not in tset])
    return order == p.indices


def _coef_text(c, core: str) -> str:
    """c·core for c ≠ 0 written so the parser folds c back exactly."""
    c = sympy.sympify(c)
    if c == 1:
        return core
    if c == -1:
        return "-" + core
    if c.is_Integer:
        return f"{c}*{core}"
    if c.is_Rational:
        p, q = c.p, c.q
        if p == 1:
            return f"{core}/{q}"
        if p == -1:
            return f"-{core}/{q}"
        return f"{p}*{core}/{q}"
    return f"({_SizeNotation().doprint(c)})*{core}"


def _negative(c) -> bool:
    """Write c as `- (−c)`? Only when the parser's `-` gives c back exactly (−(n + 1) is
    not −n − 1 to sympy)."""
    c = sympy.sympify(c)
    return c.could_extract_minus_sign() and _times(-1, -c) == c


def _number_text(c) -> str:
    c = sympy.sympify(c)
    if c.is_Integer:
        return str(c)
    if c.is_Rational:
        return f"{c.p}/{c.q}"
    return f"({_SizeNotation().doprint(c)})"


class _SizeNotation(StrPrinter):
    """A number the way the parser reads numbers: a size symbol k as `size(k)`, e as exp(1),
    `floor ceiling max min` in lower case (`notation.NUMBER_FUNCTIONS`)."""

    def _print_Symbol(self, expr) -> str:
        return f"size({expr.name})"

    def _print_Exp1(self, expr) -> str:
        return "exp(1)"

    def _print_Max(self, expr) -> str:
        return f"max({', '.join(self._print(a) for a in expr.args)})"

    def _print_Min(self, expr) -> str:
        return f"min({', '.join(self._print(a) for a in expr.args)})"


def _is_leg(e: Expr) -> bool:
    return isinstance(e, Delta) and len(e.indices) == 1


def _function_name(fn: Elementwise) -> str | None:
    reg = registered_elementwise()
    if fn.name in reg and reg[fn.name] == fn:
        return fn.name
    for name, f in reg.items():
        if f == fn:
            return name
    return None


@dataclass
class _Inline:
    """A product (or a zero, `0*delta[i]*delta[j]`) written inline as a `*` chain: its free
    index occurrences in the text and the binding calls (`sum`, `logsumexp`, by number)
    written around it."""

    product: Product | Zero
    inside: Counter
    binders: list[int] = field(default_factory=list)


class _Render:
    """Renders one statement's right side with a given set of hoisted nodes, recording every
    inline product for the keep-rule check. Each rendering returns (text, the index
    occurrences free in it); a binding call keeps the occurrences it binds in `bound`, where
    only the products inside it see them (the parser's scoping, `notation._Scopes`)."""

    def __init__(self, printer: _Printer, target, hoist: set[Expr]):
        self.p = printer
        self.target = tuple(target)
        self.hoist = hoist
        self.products: list[_Inline] = []
        self.bound: list[Counter] = []
        self.refs: set[str] = set()

    def outside(self, rec: _Inline, total: Counter) -> Counter:
        """Occurrences outside an inline product that it sees (`total`: the statement's
        free occurrences and target)."""
        seen = Counter(total)
        for b in rec.binders:
            seen += self.bound[b]
        return seen - rec.inside

    def bind(self, start: int, occurrences: list[str], binds) -> list[str]:
        """Close a binding call whose argument rendered the products from `start` on and
        wrote `occurrences`: those it `binds` go to its scope; the rest are returned."""
        self.bound.append(Counter(i for i in occurrences if binds(i)))
        for rec in self.products[start:]:
            rec.binders.append(len(self.bound) - 1)
        return [i for i in occurrences if not binds(i)]

    # ---- positions ---------------------------------------------------------------------------
    def top(self, node: Expr):
        if isinstance(node, Product) and len(node.factors) == 1:
            f = node.factors[0]
            if f.indices == node.indices or isinstance(f, (Sum, Product, Zero)):
                return self.sum_call(node)
            s = self.sum_call(node, allow_keep=False)
            if s is not None:
                return s
            return self.atomic(f)  # the statement wraps it: Product((f,), target)
        return self.expr(node, root=True)

    def expr(self, node: Expr, root: bool = False):
        """Expression position: a statement's right side or a function argument."""
        if not root and node in self.hoist:
            return self.ref(node)
        if isinstance(node, Sum):
            if not root and not self.sum_order_ok(node):
                return self.ref(node)
            if len(node.terms) >= 2:
                return self.add_chain(node)
            (c, e), = node.terms
            if e == ONE:
                return _number_text(c), []
            if c == 0:
                return self.ref(node) if not root else self.add_chain(node)
            core, shown = self.term_core(e)
            return ("1*" + core if c == 1 else _coef_text(c, core)), shown
        if isinstance(node, Product):
            if len(node.factors) >= 2:
                return self.chain(node)
            if not node.factors:
                return "1", []
            s = self.sum_call(node)
            return s if s is not None else self.ref(node)
        if isinstance(node, Zero):
            return self.zero(node)
        return self.atomic(node)

    def factor(self, node: Expr):
        """Position inside a `*` chain."""
        if node in self.hoist:
            return self.ref(node)
        if isinstance(node, Sum) and len(node.terms) >= 2 and self.sum_order_ok(node):
            text, shown = self.add_chain(node)
            return f"({text})", shown
        if isinstance(node, Product) and len(node.factors) == 1:
            s = self.sum_call(node)
            return s if s is not None else self.ref(node)
        if isinstance(node, (Variable, Delta, Constant, Func)):
            return self.atomic(node)
        return self.ref(node)

    def term_core(self, e: Expr):
        """The core of a term `c*core` (a chain, or one factor)."""
        if isinstance(e, Product) and len(e.factors) >= 2 and e not in self.hoist:
            return self.chain(e)
        return self.factor(e)

    def atomic(self, node: Expr):
        if node in self.hoist:
            return self.ref(node)
        if isinstance(node, Variable):
            occ = node.occurrence
            return (f"{node.name}[{','.join(occ)}]" if occ else node.name), list(occ)
        if isinstance(node, Delta):
            return self.delta(node), list(node.indices)
        if isinstance(node, Constant):
            return self.constant(node)
        if isinstance(node, Func):
            return self.func(node)
        return self.ref(node)

    # ---- pieces ------------------------------------------------------------------------------
    def ref(self, node: Expr):
        name = self.p.helper(node)
        self.refs.add(name)
        idx = node.indices
        return (f"{name}[{','.join(idx)}]" if idx else name), list(idx)

    def chain(self, node: Product):
        texts, shown = [], []
        for f in node.factors:
            t, s = self.factor(f)
            texts.append(t)
            shown += s
        self.products.append(_Inline(node, Counter(shown)))
        return "*".join(texts), shown

    def sum_call(self, node: Product, allow_keep: bool = True):
        """`sum(f, j)` / `sum(f)` / `sum(f, keep=(i, j))` for Product((f,), indices)."""
        (f,) = node.factors
        summed = [i for i in f.indices if i not in node.indices]
        plain = not node.indices or (summed and tuple(i for i in f.indices if i in node.indices) == node.indices)
        if not plain and not allow_keep:
            return None
        start = len(self.products)
        text, shown = self.expr(f)
        if not plain:
            keep = node.indices[0] if len(node.indices) == 1 else f"({', '.join(node.indices)})"
            kept = set(node.indices)
            free = self.bind(start, shown + list(node.indices), lambda i: i not in kept)
            return f"sum({text}, keep={keep})", free
        if node.indices:
            over = set(summed)
            return f"sum({text}, {', '.join(summed)})", self.bind(start, shown + summed, over.__contains__)
        return f"sum({text})", self.bind(start, shown, lambda i: True)

    def sum_order_ok(self, node: Sum) -> bool:
        first = next((e for _, e in node.terms if e.indices and not self.is_broadcast(e, node)), None)
        if first is None:
            return not node.indices
        order = tuple([i for i in self.target if i in node.indices] +
                      [i for i in first.indices if i not in self.target])
        return order == node.indices

    def is_broadcast(self, e: Expr, s: Sum) -> bool:
        """Is term `e` of sum `s` a broadcast the parser would rebuild from a term lacking
        some of the sum's indices (`e` = Product((core?, δ[i], ...), s.indices))?"""
        if not (isinstance(e, Product) and s.indices and e.indices == s.indices and e.factors):
            return False
        core = e.factors[0] if not _is_leg(e.factors[0]) else None
        have = set(core.indices) if core is not None else set()
        if not have < set(s.indices):
            return False
        missing = [(i, size) for i, size in zip(s.indices, s.shape) if i not in have]
        deltas = e.factors[1:] if core is not None else e.factors
        if len(deltas) != len(missing):
            return False
        for d, (i, size) in zip(deltas, missing):
            if not (_is_leg(d) and d.indices == (i,) and d.size == size):
                return False
        return True

    def broadcast_core(self, e: Product):
        return None if _is_leg(e.factors[0]) else e.factors[0]

    def add_chain(self, node: Sum):
        texts, shown = [], []
        has_tensor_term = any(e.indices and not self.is_broadcast(e, node) for _, e in node.terms)
        for k, (c, e) in enumerate(node.terms):
            if has_tensor_term and self.is_broadcast(e, node):
                inner = self.broadcast_core(e)
                if inner is None:
                    core, s = None, []
                else:
                    core, s = self.add_term_core(inner)
            elif e == ONE and not node.indices:
                core, s = None, []
            else:
                core, s = self.add_term_core(e)
            shown += s
            neg = _negative(c)
            mag = -c if neg else c
            if core is None:
                t = _number_text(mag)
            elif mag == 0:
                t = f"0*{core}"
            else:
                t = _coef_text(mag, core)
            if k == 0:
                texts.append(("-" + t) if neg else t)
            else:
                texts.append((" - " if neg else " + ") + t)
        return "".join(texts), shown

    def add_term_core(self, e: Expr):
        """Core of a term in a `+` chain; a sum core needs an explicit coefficient there."""
        if isinstance(e, Sum) and e not in self.hoist and len(e.terms) >= 2 and self.sum_order_ok(e):
            text, s = self.add_chain(e)
            return f"1*({text})", s
        return self.term_core(e)

    def zero(self, node: Zero):
        """`0*delta[i]*delta[j]`: a chain under the keep rule like any product (checked, and
        hoisted where the parser would sum a leg)."""
        if not node.indices:
            return "0", []
        legs = "*".join(self.delta(Delta([i], s)) for i, s in zip(node.indices, node.shape))
        self.products.append(_Inline(node, Counter(node.indices)))
        return f"0*{legs}", list(node.indices)

    def delta(self, d: Delta) -> str:
        idx = ",".join(d.indices)
        if self.p.explicit and d.size != size_symbol(d.indices[0]):
            s = d.size
            size = str(s) if (s.is_Integer or s.is_Symbol) else repr(str(s))
            return f"delta({size})[{idx}]"
        return f"delta[{idx}]"

    def constant(self, c: Constant):
        if c.kind == "pattern" and not self.p.explicit:
            s, pl, pr, d = c.params[:4]
            pad = "'same'" if pl == "same" else (str(pl) if pl == pr else f"({pl}, {pr})")
            return (f"pattern(stride={s}, padding={pad}, dilation={d})[{','.join(c.indices)}]",
                    list(c.indices))
        return self.generic_constant(c)

    def generic_constant(self, c: Constant):
        shape = ", ".join(repr(str(x)) for x in c.shape) + ("," if len(c.shape) == 1 else "")
        return (f"constant({c.kind!r}, {c.params!r}, ({shape}))[{','.join(c.indices)}]",
                list(c.indices))

    def func(self, f: Func):
        fn = f.fn
        if isinstance(fn, IndexFunction):
            start = len(self.products)
            text, shown = self.expr(f.arg)
            shown = shown + [f.over]
            if fn.removes_index:  # logsumexp binds its index, like sum
                shown = self.bind(start, shown, lambda i: i == f.over)
            return f"{fn.name}({text}, {f.over})", shown
        name = _function_name(fn)
        if name is not None:
            text, shown = self.expr(f.arg)
            return f"{name}({text})", shown
        form = fn.formula
        if form.is_Pow and form.base == X and form.exp.is_number:
            base, shown = self.power_base(f.arg)
            e = form.exp
            exp = str(e) if (e.is_Integer and e >= 0) else f"({_number_text(e).strip('()')})"
            return f"{base}**{exp}", shown
        text, shown = self.expr(f.arg)
        return f"elementwise({str(form)!r}, {text})", shown

    def power_base(self, arg: Expr):
        if arg in self.hoist:
            return self.ref(arg)
        if isinstance(arg, (Variable, Delta, Constant)):
            return self.atomic(arg)
        if isinstance(arg, Func) and not (isinstance(arg.fn, Elementwise) and _function_name(arg.fn) is None):
            return self.atomic(arg)
        text, shown = self.expr(arg)
        return f"({text})", shown
