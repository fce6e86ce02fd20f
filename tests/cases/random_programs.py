"""Random multi-statement index-notation programs, built alongside an equivalent plain torch
function from the same random tree (helpers for `test_random_programs.py`; holds no tests).

A program is a list of statements `t0[..] = ...`, ..., `out[..] = ...`; each statement's
right side is a tree of `Node`s. From one tree we get
  * the notation text (`Program.text`), written so that the keep rule of DESIGN.md gives the
    tree's meaning: a bare product `a*b*c` is used only where the rule surely keeps exactly the
    tree's indices, otherwise the product is spelled `sum(a*b*c, keep=(...))`;
  * a torch function of the variables (`Program.torch_value`), evaluated node by node with
    einsum, so nothing of tnderive is involved.

Index names have fixed sizes (`INDEX_SIZES`); names are reused freely between statements and
inside one statement (a name bound by a `sum(...)` may be used again elsewhere, which is what
the notation's scoping rule is about).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Optional

import torch
from hypothesis import strategies as st

INDEX_SIZES = {"i": 2, "k": 2, "m": 2, "q": 2, "j": 3, "l": 3, "p": 3, "r": 3, "u": 1}
NAMES = tuple(INDEX_SIZES)
MAX_RANK = 3

ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus,
    "exp": torch.exp,    # only over a bounded argument (see `Gen.elementwise`)
    "log": torch.log,    # only over a positive argument
    "sqrt": torch.sqrt,  # only over a positive argument
}


# --------------------------------------------------------------------------------------------
# the tree
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Node:
    """A tree node; `free` is its free indices in the order of its torch value's dims."""

    free: tuple[str, ...]

    @property
    def children(self) -> tuple["Node", ...]:
        return ()


@dataclass(eq=False)
class Var(Node):
    name: str = ""
    occ: tuple[str, ...] = ()  # may repeat a name (a diagonal)


@dataclass(eq=False)
class DeltaN(Node):
    pass  # delta[free...]: 1 where all indices are equal


@dataclass(eq=False)
class Num(Node):
    value: Fraction = Fraction(1)


@dataclass(eq=False)
class Contract(Node):
    factors: tuple[Node, ...] = ()  # free = the kept indices, the others summed

    @property
    def children(self):
        return self.factors

    @property
    def summed(self) -> set[str]:
        return {i for f in self.factors for i in f.free} - set(self.free)


@dataclass(eq=False)
class Add(Node):
    terms: tuple[tuple[Fraction, Node], ...] = ()  # a `Num` term broadcasts

    @property
    def children(self):
        return tuple(t for _, t in self.terms)


@dataclass(eq=False)
class Elem(Node):
    fn: str = "tanh"
    arg: Node = None  # type: ignore[assignment]

    @property
    def children(self):
        return (self.arg,)


@dataclass(eq=False)
class Power(Node):
    p: int = 2
    arg: Node = None  # type: ignore[assignment]

    @property
    def children(self):
        return (self.arg,)


@dataclass(eq=False)
class Scale(Node):
    """coef·arg; with `by_size` the coefficient is size(by_size)**exponent (-1: a mean), written
    `size(k)` when `symbolic`, else as the number."""

    coef: Fraction = Fraction(1)
    by_size: Optional[str] = None
    arg: Node = None  # type: ignore[assignment]
    exponent: int = -1
    symbolic: bool = True

    @property
    def children(self):
        return (self.arg,)

    @property
    def value(self) -> Fraction:
        return Fraction(INDEX_SIZES[self.by_size]) ** self.exponent if self.by_size else self.coef


@dataclass(eq=False)
class SumOver(Node):
    """sum(arg) (over = None: every index) or sum(arg, *over)."""

    arg: Node = None  # type: ignore[assignment]
    over: Optional[tuple[str, ...]] = None

    @property
    def children(self):
        return (self.arg,)

    def binds(self, name: str) -> bool:
        return self.over is None or name in self.over


@dataclass(eq=False)
class Softmax(Node):
    arg: Node = None  # type: ignore[assignment]
    k: str = ""

    @property
    def children(self):
        return (self.arg,)


@dataclass(eq=False)
class LogSumExp(Node):
    arg: Node = None  # type: ignore[assignment]
    k: str = ""

    @property
    def children(self):
        return (self.arg,)


@dataclass(eq=False)
class Ref(Node):
    stmt: int = 0
    idx: tuple[str, ...] = ()  # may repeat a name (a diagonal of the statement's result)


@dataclass
class Statement:
    name: str
    target: tuple[str, ...]
    root: Node


@dataclass
class Program:
    """Statements (the last is the result) and the variables' shapes."""

    statements: list[Statement]
    variables: dict[str, tuple[int, ...]]
    text: str = ""

    def torch_value(self, **tensors: torch.Tensor) -> torch.Tensor:
        """The program's value computed with plain torch from the tree."""
        return TorchEval(self, tensors).statement(len(self.statements) - 1)

    def torch_function(self, names: list[str]) -> Callable[..., torch.Tensor]:
        """f(*tensors of `names`) for torch.func (the other variables are not inputs)."""

        def f(*args: torch.Tensor) -> torch.Tensor:
            return self.torch_value(**dict(zip(names, args)))

        return f

    def index_sizes(self) -> dict[str, int]:
        """The size of every index name the text writes (for `parse(text, sizes=...)`)."""
        names = set()
        for s in self.statements:
            names |= set(s.target)
            for e, _ in _walk(s.root):
                names |= set(getattr(e, "occ", ())) | set(getattr(e, "idx", ()))
                if isinstance(e, (DeltaN, SumOver)):
                    names |= set(e.free) | set(getattr(e, "over", None) or ())
                elif isinstance(e, (Softmax, LogSumExp)):
                    names.add(e.k)
                elif isinstance(e, Scale) and e.by_size and e.symbolic:
                    names.add(e.by_size)
        return {n: INDEX_SIZES[n] for n in sorted(names)}

    def random_tensors(self, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {n: torch.randn(s, generator=g, dtype=torch.float64)
                for n, s in self.variables.items()}


def dedupe(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# torch evaluation of the tree
# --------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum(operands: list[tuple[torch.Tensor, tuple[str, ...]]], out: tuple[str, ...]):
    letter: dict[str, str] = {}
    for _, names in operands:
        for n in names:
            letter.setdefault(n, _LETTERS[len(letter)])
    spec = ",".join("".join(letter[n] for n in names) for _, names in operands)
    return torch.einsum(spec + "->" + "".join(letter[n] for n in out), *[t for t, _ in operands])


class TorchEval:
    """Evaluates a `Program` with torch; statement results are memoised."""

    def __init__(self, program: Program, tensors: dict[str, torch.Tensor]):
        self.program = program
        self.tensors = tensors
        self.memo: dict[int, torch.Tensor] = {}

    def statement(self, k: int) -> torch.Tensor:
        if k not in self.memo:
            s = self.program.statements[k]
            self.memo[k] = _einsum([(self.node(s.root), s.root.free)], s.target)
        return self.memo[k]

    def node(self, e: Node) -> torch.Tensor:
        return getattr(self, "_" + type(e).__name__.lower())(e)

    def _as(self, e: Node, order: tuple[str, ...]) -> torch.Tensor:
        """e's value with its dims in `order` (a permutation of e.free)."""
        return _einsum([(self.node(e), e.free)], order)

    def _var(self, e: Var) -> torch.Tensor:
        return _einsum([(self.tensors[e.name], e.occ)], e.free)

    def _deltan(self, e: DeltaN) -> torch.Tensor:
        n = INDEX_SIZES[e.free[0]]
        out = torch.zeros((n,) * len(e.free), dtype=torch.float64)
        for a in range(n):
            out[(a,) * len(e.free)] = 1.0
        return out

    def _num(self, e: Num) -> torch.Tensor:
        return torch.tensor(float(e.value), dtype=torch.float64)

    def _contract(self, e: Contract) -> torch.Tensor:
        return _einsum([(self.node(f), f.free) for f in e.factors], e.free)

    def _add(self, e: Add) -> torch.Tensor:
        """Σ c·term; a term lacking some of the indices is broadcast over them."""
        out = torch.zeros([INDEX_SIZES[i] for i in e.free], dtype=torch.float64)
        for c, t in e.terms:
            ones = [(torch.ones(INDEX_SIZES[i], dtype=torch.float64), (i,))
                    for i in e.free if i not in t.free]
            out = out + float(c) * _einsum([(self.node(t), t.free)] + ones, e.free)
        return out

    def _elem(self, e: Elem) -> torch.Tensor:
        return ELEMENTWISE[e.fn](self.node(e.arg))

    def _power(self, e: Power) -> torch.Tensor:
        return self.node(e.arg) ** e.p

    def _scale(self, e: Scale) -> torch.Tensor:
        return float(e.value) * self.node(e.arg)

    def _sumover(self, e: SumOver) -> torch.Tensor:
        return _einsum([(self.node(e.arg), e.arg.free)], e.free)

    def _softmax(self, e: Softmax) -> torch.Tensor:
        return torch.softmax(self._as(e.arg, e.free), dim=e.free.index(e.k))

    def _logsumexp(self, e: LogSumExp) -> torch.Tensor:
        order = e.free + (e.k,)
        return torch.logsumexp(self._as(e.arg, order), dim=len(e.free))

    def _ref(self, e: Ref) -> torch.Tensor:
        return _einsum([(self.statement(e.stmt), e.idx)], e.free)


# --------------------------------------------------------------------------------------------
# rendering as index notation
# --------------------------------------------------------------------------------------------

def _walk(e: Node, path: tuple[Node, ...] = ()):
    """(node, ancestors root-first) for every node of a statement (Refs not entered)."""
    yield e, path
    for c in e.children:
        yield from _walk(c, path + (e,))


def _binds(a: Node, name: str) -> bool:
    """Does `a` bind `name` for its descendants (by any means)?"""
    if isinstance(a, SumOver):
        return a.binds(name) and name in a.arg.free
    if isinstance(a, LogSumExp):
        return a.k == name
    if isinstance(a, Contract):
        return name in a.summed
    return False


def binder(node: Node, path: tuple[Node, ...], name: str) -> Optional[Node]:
    """The nearest ancestor of `node` that binds `name` (None: free in the statement)."""
    return next((a for a in reversed(path) if _binds(a, name)), None)


def _numeric(e: Node) -> bool:
    """No tensor below `e` (the parser may read it as a number)."""
    return not any(isinstance(n, (Var, DeltaN, Ref)) for n, _ in _walk(e))


def _is_sum_call(s: Node) -> bool:
    """Is `s` written as `sum(e)` or `sum(e, i, ...)` (not the keep= spelling)?"""
    return isinstance(s, SumOver) and (s.over is None or not isinstance(s.arg, Contract))


class Renderer:
    """Writes statements as notation; decides where a product may be a bare chain."""

    def __init__(self, program: Program):
        self.program = program

    def text(self) -> str:
        return "\n".join(self.statement(s) for s in self.program.statements)

    def statement(self, s: Statement) -> str:
        self.target = s.target
        self.sites = self._sites(s.root)
        lhs = f"{s.name}[{','.join(s.target)}]" if s.target else s.name
        return f"{lhs} = {self.expr(s.root, None)}"

    # ---- where each index name is written -------------------------------------------------
    def _sites(self, root: Node) -> list[tuple[str, str, Node, tuple[Node, ...]]]:
        """(name, kind, node, ancestors) for every written index name: leaf indices, the index
        argument of softmax/logsumexp/sum(e, i) and the keep= list of a merged sum."""
        out = []
        for e, path in _walk(root):
            if isinstance(e, Var):
                out += [(i, "leaf", e, path) for i in e.occ]
            elif isinstance(e, (DeltaN,)):
                out += [(i, "leaf", e, path) for i in e.free]
            elif isinstance(e, Ref):
                out += [(i, "leaf", e, path) for i in e.idx]
            elif isinstance(e, (Softmax, LogSumExp)):
                out.append((e.k, "arg", e, path))
            elif isinstance(e, SumOver) and e.over is not None:
                names = e.over if _is_sum_call(e) else e.free
                out += [(i, "arg", e, path) for i in names]
        return out

    def _outside(self, p: Node):
        for name, kind, node, path in self.sites:
            if node is not p and p not in path:
                yield name, kind, node, path

    def _shielded(self, name: str, node: Node, path: tuple[Node, ...], p_path) -> bool:
        """A site inside a sum(...) call binding `name` that does not enclose the product."""
        for s in path + (node,):
            if _is_sum_call(s) and s.binds(name) and s not in p_path:
                return True
        return False

    @staticmethod
    def _clean(name: str, path: tuple[Node, ...], p: Node, p_path) -> bool:
        """Nothing binds `name` between the site or the product and their common ancestor."""
        common = [a for a in path if a in p_path]
        start = path.index(common[-1]) + 1 if common else 0
        p_start = p_path.index(common[-1]) + 1 if common else 0
        return not any(_binds(a, name) for a in path[start:] + p_path[p_start:])

    def bare_ok(self, p: Contract, p_path: tuple[Node, ...]) -> bool:
        """Does the keep rule, read conservatively, give `p` exactly its kept indices when
        written as a bare chain?"""
        for s in p.summed:
            if s in self.target:
                return False
            for name, _, node, path in self._outside(p):
                if name == s and not self._shielded(name, node, path, p_path):
                    return False
        for k in p.free:
            if k in self.target:
                continue
            if not any(name == k and kind == "leaf" and self._clean(k, path, p, p_path)
                       for name, kind, node, path in self._outside(p)):
                return False
        return True

    # ---- expressions ----------------------------------------------------------------------
    def expr(self, e: Node, path) -> str:
        """`e` as a complete expression (an add chain is fine at this level)."""
        path = () if path is None else path
        if isinstance(e, Add):
            return self.add(e, path)
        if isinstance(e, Contract):
            return self.contract(e, path)
        if isinstance(e, Scale):
            return f"{self.scaled_core(e.arg, path + (e,))}{self.coef_suffix(e)}"
        return self.atom(e, path)

    def coef_suffix(self, e: Scale) -> str:
        if e.by_size:
            size = f"size({e.by_size})" if e.symbolic else str(INDEX_SIZES[e.by_size])
            return f"/{size}" if e.exponent == -1 else f"*{size}"
        return f"*({e.coef})"

    def scaled_core(self, e: Node, path) -> str:
        """The factor part of `core * coef`: an add chain needs parentheses."""
        if isinstance(e, Add):
            return f"({self.add(e, path)})"
        if isinstance(e, Contract):
            return self.contract(e, path)
        if isinstance(e, Scale):
            return f"{self.scaled_core(e.arg, path + (e,))}{self.coef_suffix(e)}"
        return self.atom(e, path)

    def contract(self, e: Contract, path) -> str:
        chain = "*".join(self.factor(f, path + (e,)) for f in e.factors)
        tensors = [f for f in e.factors if not _numeric(f)]
        if len(tensors) < 2 and {i for f in tensors for i in f.free} != set(e.free):
            return self.keep_form(chain, e.free)  # not a product for the parser: no keep rule
        if self.bare_ok(e, path):
            return chain
        return self.keep_form(chain, e.free)

    @staticmethod
    def keep_form(chain: str, keep: tuple[str, ...]) -> str:
        if not keep:
            return f"sum({chain})"
        return f"sum({chain}, keep=({', '.join(keep)},))"

    def factor(self, e: Node, path) -> str:
        """`e` as one factor of a chain: a product inside a product gets its own sum(...)."""
        if isinstance(e, Add):
            return f"({self.add(e, path)})"
        if isinstance(e, Contract):
            chain = "*".join(self.factor(f, path + (e,)) for f in e.factors)
            return self.keep_form(chain, e.free)
        if isinstance(e, Scale):
            return f"{self.factor(e.arg, path + (e,))}{self.coef_suffix(e)}"
        if isinstance(e, Num):
            return f"({e.value})"
        return self.atom(e, path)

    def add(self, e: Add, path) -> str:
        out = ""
        for c, t in e.terms:
            if isinstance(t, Num):
                c, body = c * t.value, str(abs(c * t.value))
            else:
                core = self.scaled_core(t, path + (e,))
                body = core if abs(c) == 1 else f"({abs(c)})*{core}"
            if not out:
                out = ("-" if c < 0 else "") + body
            else:
                out += f" {'-' if c < 0 else '+'} {body}"
        return out

    def atom(self, e: Node, path) -> str:
        inner = path + (e,)
        if isinstance(e, Var):
            return f"{e.name}[{','.join(e.occ)}]" if e.occ else e.name
        if isinstance(e, DeltaN):
            return f"delta[{','.join(e.free)}]"
        if isinstance(e, Num):
            return f"({e.value})"
        if isinstance(e, Ref):
            s = self.program.statements[e.stmt]
            return f"{s.name}[{','.join(e.idx)}]" if e.idx else s.name
        if isinstance(e, Elem):
            return f"{e.fn}({self.expr(e.arg, inner)})"
        if isinstance(e, Power):
            return f"({self.expr(e.arg, inner)})**{e.p}"
        if isinstance(e, Softmax):
            return f"softmax({self.expr(e.arg, inner)}, {e.k})"
        if isinstance(e, LogSumExp):
            return f"logsumexp({self.expr(e.arg, inner)}, {e.k})"
        if isinstance(e, SumOver):
            return self.sum_over(e, inner)
        if isinstance(e, (Add, Contract, Scale)):
            return f"({self.expr(e, path)})"
        raise TypeError(type(e).__name__)

    def sum_over(self, e: SumOver, inner) -> str:
        if e.over is None:
            arg = e.arg
            if isinstance(arg, Contract):  # sum(a*b): every kept index is summed anyway
                return f"sum({'*'.join(self.factor(f, inner + (arg,)) for f in arg.factors)})"
            return f"sum({self.expr(arg, inner)})"
        if isinstance(e.arg, Contract):  # sum(a*b, i) spelled sum(a*b, keep=(rest))
            chain = "*".join(self.factor(f, inner + (e.arg,)) for f in e.arg.factors)
            return self.keep_form(chain, e.free)
        return f"sum({self.expr(e.arg, inner)}, {', '.join(e.over)})"


def size_bindings(expr) -> dict[str, int]:
    """Sizes of the size symbols of a parsed or derived expression that no tensor may bind
    (those of deltas, zeros and coefficients); the tensors bind the others."""
    from tnderive.ir import Delta, Sum, Variable, Zero

    symbols: set = set()
    held: set = set()
    for node in expr.walk():
        if isinstance(node, Variable):
            held |= {x for s in node.axis_shape for x in s.free_symbols}
        elif isinstance(node, Delta):
            symbols |= node.size.free_symbols
        elif isinstance(node, Zero):
            symbols |= {x for s in node.shape for x in s.free_symbols}
        elif isinstance(node, Sum):
            symbols |= {x for c, _ in node.terms for x in c.free_symbols}
    return {str(x): INDEX_SIZES[str(x)] for x in symbols - held}


# --------------------------------------------------------------------------------------------
# generation (hypothesis)
# --------------------------------------------------------------------------------------------

COEFS = (Fraction(1), Fraction(-1), Fraction(2), Fraction(1, 2), Fraction(-3, 2))


@dataclass
class Gen:
    """Draws a random program; `draw` is hypothesis's."""

    draw: Callable
    statements: list[Statement] = field(default_factory=list)
    variables: dict[str, tuple[int, ...]] = field(default_factory=dict)
    constant_only: bool = False
    budget: int = 60  # nodes left; then only leaves

    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    def names_of_size(self, size: int, avoid=()) -> list[str]:
        return [n for n in NAMES if INDEX_SIZES[n] == size and n not in avoid]

    def node(self, free: tuple[str, ...], depth: int) -> Node:
        """A random node whose free index set is `set(free)` (its order may differ)."""
        self.budget -= 1
        kinds = ["leaf"] if depth <= 0 or self.budget <= 0 else [
            "leaf", "contract", "contract", "add", "elementwise", "power", "scale", "sum",
            "sum", "softmax", "logsumexp", "ref"]
        kind = self.pick(kinds)
        return getattr(self, kind)(tuple(free), depth - 1)

    # ---- leaves ---------------------------------------------------------------------------
    def leaf(self, free, depth) -> Node:
        sizes = {INDEX_SIZES[i] for i in free}
        rare = 9 if len(free) == 1 else 3  # a one-leg delta (ones) is less interesting
        if free and len(sizes) == 1 and self.draw(st.integers(0, rare)) == 0:
            return DeltaN(free)
        if self.constant_only or self.draw(st.integers(0, 9)) == 0:
            return self.constant(free)
        return self.variable(free)

    def constant(self, free) -> Node:
        if not free:
            return Num((), self.pick(COEFS))
        if len({INDEX_SIZES[i] for i in free}) == 1:
            return DeltaN(free)
        return Contract(free, tuple(DeltaN((i,)) for i in free))  # ones

    def variable(self, free) -> Var:
        order = tuple(self.draw(st.permutations(free)))
        if order and len(order) < MAX_RANK and self.draw(st.integers(0, 5)) == 0:
            at = self.draw(st.integers(0, len(order)))
            order = order[:at] + (order[min(at, len(order) - 1)],) + order[at:]  # a diagonal
        shape = tuple(INDEX_SIZES[i] for i in order)
        same = [n for n, s in self.variables.items() if s == shape]
        if same and self.draw(st.booleans()):
            name = self.pick(same)
        else:
            letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
            k = len(self.variables)
            name = letters[k] if k < len(letters) else f"V{k}"
            self.variables[name] = shape
        return Var(dedupe(order), name, order)

    # ---- composites -----------------------------------------------------------------------
    def bound_names(self, free, lo: int = 1, hi: int = 2) -> tuple[str, ...]:
        """New names to sum over (maybe reusing names bound elsewhere: scoping)."""
        room = MAX_RANK - len(free)
        if room < lo:
            return ()
        pool = [n for n in NAMES if n not in free]
        return tuple(self.draw(st.lists(st.sampled_from(pool), min_size=lo,
                                        max_size=min(hi, room), unique=True)))

    def contract(self, free, depth) -> Node:
        bound = self.bound_names(free, 0, 2)
        names = list(free) + list(bound)
        n = self.draw(st.integers(2, 3))
        legs: list[list[str]] = [[] for _ in range(n)]
        for name in names:
            copies = self.draw(st.integers(1, 2 if name in free else min(n, 3)))
            for k in self.draw(st.permutations(range(n)))[:copies]:
                if len(legs[k]) < MAX_RANK:
                    legs[k].append(name)
        for name in names:  # every index somewhere
            if not any(name in l for l in legs):
                min(legs, key=len).append(name)
        factors = tuple(self.node(tuple(l), depth) for l in legs)
        return Contract(tuple(self.draw(st.permutations(free))), factors)

    def add(self, free, depth) -> Node:
        n = self.draw(st.integers(2, 3))
        terms = [(self.pick(COEFS), self.node(free, depth))]
        if self.draw(st.integers(0, 2)) == 0:  # a look-alike of the first term
            terms.append((self.pick(COEFS), self.twin(terms[0][1])))
            n -= 1
        for _ in range(n - 1):  # later terms may lack indices (broadcast)
            part = tuple(i for i in free if self.draw(st.integers(0, 4)) > 0)
            terms.append((self.pick(COEFS), self.node(part, depth)))
        if self.draw(st.integers(0, 3)) == 0:
            terms.append((Fraction(1), Num((), self.pick(COEFS))))
        order = tuple(self.draw(st.permutations(free)))
        return Add(order, tuple(terms))

    def twin(self, e: Node) -> Node:
        """A copy of `e` with two same-size indices of one variable swapped (A[i,k] → A[k,i]),
        preferably two bound by different nodes (the same tree shape, the axes bound
        elsewhere: a look-alike that must not merge); an exact copy if there is no such pair."""
        out = copy.deepcopy(e)
        swaps = [(binder(v, path, v.occ[a]) is not binder(v, path, v.occ[b]), v, a, b)
                 for v, path in _walk(out) if isinstance(v, Var)
                 for a in range(len(v.occ)) for b in range(a + 1, len(v.occ))
                 if v.occ[a] != v.occ[b] and INDEX_SIZES[v.occ[a]] == INDEX_SIZES[v.occ[b]]]
        if swaps:
            best = [x for x in swaps if x[0]] or swaps
            _, v, a, b = self.pick(best)
            occ = list(v.occ)
            occ[a], occ[b] = occ[b], occ[a]
            v.occ = tuple(occ)
        return out

    def elementwise(self, free, depth) -> Node:
        fn = self.pick(["tanh", "sigmoid", "softplus", "exp", "log", "sqrt"])
        arg = self.node(free, depth)
        if fn == "exp":  # exp(tanh(e)): bounded
            arg = Elem(arg.free, "tanh", arg)
        elif fn in ("log", "sqrt"):  # of 1 + e**2: positive
            arg = Add(arg.free, ((Fraction(1), Num((), Fraction(1))),
                                 (Fraction(1), Power(arg.free, 2, arg))))
        return Elem(arg.free, fn, arg)

    def power(self, free, depth) -> Node:
        arg = self.node(free, depth)
        return Power(arg.free, self.pick([2, 3]), Elem(arg.free, "tanh", arg))

    def scale(self, free, depth) -> Node:
        arg = self.node(free, depth)
        if self.draw(st.booleans()):
            return Scale(arg.free, by_size=self.pick(NAMES), arg=arg,
                         exponent=self.pick([-1, 1]), symbolic=self.draw(st.booleans()))
        return Scale(arg.free, coef=self.pick(COEFS[1:]), arg=arg)

    def sum(self, free, depth) -> Node:
        bound = self.bound_names(free)
        if not bound:
            return self.leaf(free, depth)
        arg = self.node(free + bound, depth)
        if not free and self.draw(st.booleans()):
            return SumOver((), arg, None)
        return SumOver(tuple(self.draw(st.permutations(free))), arg, bound)

    def softmax(self, free, depth) -> Node:
        if not free:
            return self.sum(free, depth)
        k = self.pick(free)
        return Softmax(tuple(self.draw(st.permutations(free))), self.node(free, depth), k)

    def logsumexp(self, free, depth) -> Node:
        bound = self.bound_names(free, 1, 1)
        if not bound:
            return self.leaf(free, depth)
        return LogSumExp(tuple(self.draw(st.permutations(free))),
                         self.node(free + bound, depth), bound[0])

    def ref(self, free, depth) -> Node:
        """A named intermediate: an earlier statement of matching sizes, or a new one."""
        sizes = sorted(INDEX_SIZES[i] for i in free)
        old = [k for k, s in enumerate(self.statements)
               if sorted(INDEX_SIZES[i] for i in s.target) == sizes]
        if old and self.draw(st.integers(0, 2)) > 0:
            k = self.pick(old)
            target = self.statements[k].target
            idx = self._matching(free, target)
            return Ref(dedupe(idx), k, idx)
        idx = tuple(self.draw(st.permutations(free)))
        twin = [i for i in idx if len(self.names_of_size(INDEX_SIZES[i])) > 1]
        if twin and len(idx) < MAX_RANK and self.draw(st.integers(0, 3)) == 0:
            idx = idx + (self.pick(twin),)  # the statement is used through a diagonal
        self.new_statement(self._target_names(idx), depth)
        return Ref(dedupe(idx), len(self.statements) - 1, idx)

    def new_statement(self, target: tuple[str, ...], depth: int) -> None:
        root = self.node(target, depth)
        self.statements.append(Statement(f"t{len(self.statements)}", target, root))

    def _matching(self, free, target) -> tuple[str, ...]:
        """`free` ordered so that position k has the size of target[k]."""
        left = list(self.draw(st.permutations(free)))
        out = []
        for t in target:
            n = next(i for i in left if INDEX_SIZES[i] == INDEX_SIZES[t])
            left.remove(n)
            out.append(n)
        return tuple(out)

    def _target_names(self, idx) -> tuple[str, ...]:
        out: list[str] = []
        for i in idx:
            out.append(self.pick(self.names_of_size(INDEX_SIZES[i], avoid=out)))
        return tuple(out)


@st.composite
def programs(draw, max_depth: int = 5) -> Program:
    """A random program: up to three intermediate statements, then `out` (rank 0 to 2), which
    refers to them (and they to each other) by name; statements `out` does not reach are
    dropped."""
    gen = Gen(draw, constant_only=draw(st.integers(0, 19)) == 0)
    for _ in range(draw(st.integers(0, 3))):
        target = tuple(draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=2)))
        gen.new_statement(target, draw(st.integers(1, 3)))
    free = tuple(draw(st.lists(st.sampled_from(NAMES[:-1]), unique=True, max_size=2)))
    root = gen.node(free, draw(st.integers(3, max_depth)))
    gen.statements.append(Statement("out", tuple(draw(st.permutations(free))), root))
    program = _reachable(Program(gen.statements, gen.variables))
    program.text = Renderer(program).text()
    return program


def _reachable(program: Program) -> Program:
    """`program` without the statements its result does not use (renumbered t0, t1, ...) and
    without the variables only those used."""
    used: set[int] = set()
    todo = [len(program.statements) - 1]
    while todo:
        k = todo.pop()
        if k not in used:
            used.add(k)
            todo += [e.stmt for e, _ in _walk(program.statements[k].root) if isinstance(e, Ref)]
    new = {old: n for n, old in enumerate(sorted(used))}
    statements = [program.statements[k] for k in sorted(used)]
    variables: dict[str, tuple[int, ...]] = {}
    for n, s in enumerate(statements):
        if s.name != "out":
            s.name = f"t{n}"
        for e, _ in _walk(s.root):
            if isinstance(e, Ref):
                e.stmt = new[e.stmt]
            elif isinstance(e, Var):
                variables[e.name] = program.variables[e.name]
    return Program(statements, variables)


def example_program() -> Program:
    """A fixed small program: t0[i] = tanh(A[i,j]*B[j]); out = Σ_i (t0[i] − mean_k t0[k])²."""
    z = Contract(("i",), (Var(("i", "j"), "A", ("i", "j")), Var(("j",), "B", ("j",))))
    t0 = Statement("t0", ("i",), Elem(("i",), "tanh", z))
    mean = Scale((), by_size="k", arg=SumOver((), Ref(("k",), 0, ("k",)), None), symbolic=False)
    centred = Add(("i",), ((Fraction(1), Ref(("i",), 0, ("i",))), (Fraction(-1), mean)))
    out = Statement("out", (), SumOver((), Power(("i",), 2, centred), None))
    program = Program([t0, out], {"A": (2, 3), "B": (3,)})
    program.text = Renderer(program).text()
    return program
