"""The tensor-network IR: immutable, hashable expression nodes.

Every node has
  * `indices`: its free indices, in output order (evaluating gives dims in this order);
  * `shape`:   the size of each free index (sympy expressions; ints become sympy Integers);
  * `children`: the sub-expressions it is built from.

Nodes compare structurally (`==` is equality of the tree, never isomorphism) and cache their
hash. They are never mutated: every transformation builds new nodes.

Node kinds
  Variable(name, axes, indices, shape)  an input/parameter seen once; `axes` are its declared
                                         axis names (from the first occurrence), `indices` the
                                         names this occurrence gives them.
  Delta(indices, size)                   copy tensor / hyperedge; identity with two legs.
  Constant(kind, params, indices, shape) a structured constant (e.g. kind "pattern").
  Func(fn, arg, over=None)               elementwise function or function over index `over`.
  Product(factors, indices)              contraction; factor indices not in `indices` are summed.
  Sum(terms, indices)                    sum of (coefficient, expr); all terms share one index set.
  Zero(indices, shape)                   the zero tensor.
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import sympy

from .errors import TNError
from .functions import Elementwise, IndexFunction

Size = sympy.Expr
SizeLike = Union[int, sympy.Expr, str]


def as_size(size: SizeLike, what: str = "size") -> Size:
    """Normalise an int / sympy expr / symbol name into a sympy size."""
    if isinstance(size, bool):
        raise TNError(f"{what}: expected an int or sympy expression, got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise TNError(f"{what} must be positive, got {size}")
        return sympy.Integer(size)
    if isinstance(size, str):
        return sympy.Symbol(size, integer=True, positive=True)
    if isinstance(size, sympy.Integer):  # the common case, without sympy's comparison
        if size.p <= 0:
            raise TNError(f"{what} must be a positive integer, got {size}")
        return size
    if isinstance(size, sympy.Basic):
        if size.is_number and (not size.is_integer or size <= 0):
            raise TNError(f"{what} must be a positive integer, got {size}")
        return size
    raise TNError(f"{what}: expected an int or sympy expression, got {size!r}")


def size_symbol(name: str) -> sympy.Symbol:
    """The default symbolic size of an axis named `name` (a positive integer symbol)."""
    return sympy.Symbol(name, integer=True, positive=True)


def as_coef(c) -> sympy.Expr:
    c = sympy.nsimplify(c) if isinstance(c, float) else sympy.sympify(c)
    return c


class Expr:
    """Base class of all IR nodes."""

    __slots__ = ("_hash", "_indices", "_shape", "_all", "_sig", "_signature", "_size_symbols",
                 "_vars")

    # --- to be provided by subclasses -------------------------------------------------------
    def _key(self) -> tuple:
        raise NotImplementedError

    @property
    def children(self) -> tuple["Expr", ...]:
        return ()

    # --- structural identity ----------------------------------------------------------------
    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            h = hash((type(self).__name__, self._key()))
            object.__setattr__(self, "_hash", h)
            return h

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        if type(self) is not type(other) or hash(self) != hash(other):
            return False
        return self._key() == other._key()

    def __ne__(self, other) -> bool:
        return not self == other

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **fields) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)

    # --- shape -------------------------------------------------------------------------------
    @property
    def indices(self) -> tuple[str, ...]:
        return self._indices

    @property
    def shape(self) -> tuple[Size, ...]:
        return self._shape

    @property
    def rank(self) -> int:
        return len(self._indices)

    def size_of(self, index: str) -> Size:
        """Size of free index `index`."""
        try:
            return self._shape[self._indices.index(index)]
        except ValueError:
            raise TNError(f"index {index!r} is not a free index of this expression "
                          f"(free: {list(self._indices)})") from None

    @property
    def sizes(self) -> dict[str, Size]:
        return dict(zip(self._indices, self._shape))

    # --- traversal -------------------------------------------------------------------------
    def walk(self) -> Iterator["Expr"]:
        """All nodes, pre-order (shared sub-trees visited once)."""
        seen: set[int] = set()
        stack = [self]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            yield node
            stack.extend(reversed(node.children))

    @property
    def variables(self) -> dict[str, "Variable"]:
        """Variables by name (one representative occurrence each), in first-seen pre-order
        (a new dict each call; worked out once per node from its children's)."""
        return dict(bottom_up(self, "_vars", _own_variables))

    @property
    def signature(self) -> "Signature":
        """The tensors this expression is evaluated from: the signature of the expression it
        was derived from (explicit, see `with_signature`; not part of equality or hash) merged
        with the variables it uses, name -> declaration. Tensors of the signature bind sizes
        even where the expression no longer uses them. Computed once per node (nodes are
        immutable; a copy with another explicit signature does not inherit it, `_attach`)."""
        try:
            return self._signature
        except AttributeError:
            pass
        decls: list[Variable] = []
        sizes: set[sympy.Symbol] = set()
        for node in self.walk():
            explicit = getattr(node, "_sig", None)
            if explicit is not None:
                decls.extend(explicit.values())
                sizes |= explicit.source_sizes
            if isinstance(node, Variable):
                decls.append(node.declaration)
        signature = Signature(decls, sizes)
        object.__setattr__(self, "_signature", signature)
        return signature

    @property
    def all_indices(self) -> frozenset[str]:
        """Every index name used anywhere (free or bound), for picking fresh names."""
        try:
            return self._all
        except AttributeError:
            names = set(self._indices)
            for c in self.children:
                names |= c.all_indices
            names |= self._own_indices()
            out = frozenset(names)
            object.__setattr__(self, "_all", out)
            return out

    def _own_indices(self) -> set[str]:
        return set()

    # --- conveniences ----------------------------------------------------------------------
    def __str__(self) -> str:
        return _view("text")(self)

    def __repr__(self) -> str:
        """`<Product [n,o]: out[n,o] = W[o,i]*x[n,i]>`: the notation on one line, shortened."""
        return _short_repr(self)

    def rename(self, mapping: Mapping[str, str]) -> "Expr":
        """Rename free indices (bound indices are untouched, renamed fresh if they would clash)."""
        return with_signature(rename_free(self, mapping), self)

    def _repr_svg_(self) -> str | None:
        return _view("svg")(self)  # None without Graphviz: notebooks show the text repr


# How an expression reads and looks (its notation, its notebook picture) is defined by the
# layers above the IR, `tnderive.printer` and `tnderive.draw`; `import tnderive` registers
# them here, so `ir` imports neither.
_VIEWS: dict[str, Callable[["Expr"], "str | None"]] = {}


def register_views(text: Callable[["Expr"], str], svg: Callable[["Expr"], "str | None"]) -> None:
    """Set how `str(expr)`/`repr(expr)` (`text`) and notebooks (`svg`) show an expression."""
    _VIEWS.update(text=text, svg=svg)


def _view(kind: str) -> Callable[["Expr"], "str | None"]:
    try:
        return _VIEWS[kind]
    except KeyError:
        raise TNError(f"no {kind} view of expressions is registered: import tnderive, "
                      f"which registers tnderive.printer and tnderive.draw") from None


REPR_WIDTH = 100        # characters of notation in `repr(expr)`
REPR_MAX_NODES = 2000   # larger expressions are not printed by `repr` (it stays cheap)


def _short_repr(expr: Expr) -> str:
    """`repr` of an expression: its type, free indices and notation (statements joined by
    `; `, cut to REPR_WIDTH characters). Never raises for a printable or unprintable node."""
    head = f"{type(expr).__name__} [{','.join(expr.indices)}]"
    if sum(1 for _ in itertools.islice(expr.walk(), REPR_MAX_NODES + 1)) > REPR_MAX_NODES:
        return f"<{head}: more than {REPR_MAX_NODES} nodes>"
    try:
        text = "; ".join(_view("text")(expr).splitlines())
    except (TNError, RecursionError) as e:  # no notation for it, or nested too deeply
        return f"<{head}: not printable: {type(e).__name__}>"
    if len(text) > REPR_WIDTH:
        text = text[:REPR_WIDTH - 1] + "…"
    return f"<{head}: {text}>"


def _check_names(indices: Sequence[str], what: str) -> tuple[str, ...]:
    indices = tuple(indices)
    for i in indices:
        if not isinstance(i, str) or not i.isidentifier():
            raise TNError(f"{what}: index {i!r} is not a valid index name")
    return indices


class Variable(Expr):
    """One occurrence of an input/parameter tensor.

    name:    the variable's identity.
    axes:    declared axis names (the indices of its first occurrence), used for naming new
             derivative legs.
    indices: this occurrence's index names (a repeated name takes a diagonal).
    shape:   size of each axis, in axis order.
    """

    __slots__ = ("name", "axes", "axis_shape", "occ")

    def __init__(self, name: str, axes: Sequence[str], indices: Sequence[str] | None = None,
                 shape: Sequence[SizeLike] | None = None):
        if not isinstance(name, str) or not name.isidentifier():
            raise TNError(f"variable name {name!r} is not an identifier")
        axes = _check_names(axes, f"variable {name!r}")
        occ = axes if indices is None else _check_names(indices, f"variable {name!r}")
        if len(occ) != len(axes):
            raise TNError(f"variable {name!r} has {len(axes)} axes {list(axes)} but is used with "
                          f"{len(occ)} indices {list(occ)}")
        if shape is None:
            shape = tuple(size_symbol(a) for a in axes)
        shape = tuple(as_size(s, f"variable {name!r} axis {a!r}") for s, a in zip(shape, axes))
        if len(shape) != len(axes):
            raise TNError(f"variable {name!r}: {len(shape)} sizes given for {len(axes)} axes")
        free: list[str] = []
        free_shape: list[Size] = []
        for i, s in zip(occ, shape):
            if i not in free:
                free.append(i)
                free_shape.append(s)
        self._set(name=name, axes=axes, occ=occ, axis_shape=shape,
                  _indices=tuple(free), _shape=tuple(free_shape))

    @property
    def occurrence(self) -> tuple[str, ...]:
        """Index names in axis order (may repeat, unlike `indices`)."""
        return self.occ

    def _key(self):
        return (self.name, self.axes, self.occ, self.axis_shape)

    def _own_indices(self):
        return set(self.occ)

    def with_indices(self, indices: Sequence[str]) -> "Variable":
        """The same variable seen with other index names."""
        return Variable(self.name, self.axes, indices, self.axis_shape)

    @property
    def declaration(self) -> "Variable":
        """The variable seen with its declared axes (its entry in a signature)."""
        return self if self.occ == self.axes else Variable(self.name, self.axes, None, self.axis_shape)

    def describe(self) -> str:
        """`W[o,i]`, with sizes that differ from the axis name: `x[n,i=I+2]`."""
        dims = ",".join(a if str(s) == a else f"{a}={s}" for a, s in zip(self.axes, self.axis_shape))
        return f"{self.name}[{dims}]" if self.axes else self.name


class Delta(Expr):
    """Copy tensor: 1 where all its indices are equal, else 0. All legs have the same size."""

    __slots__ = ("size",)

    def __init__(self, indices: Sequence[str], size: SizeLike):
        indices = _check_names(indices, "delta")
        if not indices:
            raise TNError("delta needs at least one index")
        if len(set(indices)) != len(indices):
            raise TNError(f"delta has repeated index in {list(indices)}")
        size = as_size(size, f"delta[{','.join(indices)}] size")
        self._set(size=size, _indices=indices, _shape=(size,) * len(indices))

    def _key(self):
        return (self._indices, self.size)


class Constant(Expr):
    """A structured constant built lazily on the target device.

    kind:   registry key (see `tnderive.constants`), e.g. "pattern".
    params: hashable tuple of hyper-parameters.
    """

    __slots__ = ("kind", "params")

    def __init__(self, kind: str, params: tuple, indices: Sequence[str], shape: Sequence[SizeLike]):
        indices = _check_names(indices, f"constant {kind!r}")
        if len(set(indices)) != len(indices):
            raise TNError(f"constant {kind!r} has repeated index in {list(indices)}")
        shape = tuple(as_size(s, f"constant {kind!r} axis {i!r}") for s, i in zip(shape, indices))
        if len(shape) != len(indices):
            raise TNError(f"constant {kind!r}: {len(shape)} sizes for {len(indices)} indices")
        self._set(kind=kind, params=tuple(params), _indices=indices, _shape=shape)

    def _key(self):
        return (self.kind, self.params, self._indices, self._shape)

    def with_indices(self, indices: Sequence[str]) -> "Constant":
        return Constant(self.kind, self.params, indices, self._shape)


class Func(Expr):
    """fn applied to arg. Elementwise: same indices as arg. IndexFunction: over index `over`
    (softmax keeps it, logsumexp removes it)."""

    __slots__ = ("fn", "arg", "over")

    def __init__(self, fn: Elementwise | IndexFunction, arg: Expr, over: str | None = None):
        if not isinstance(arg, Expr):
            raise TNError(f"function {fn}: argument is not an expression: {arg!r}")
        if isinstance(fn, IndexFunction):
            if over is None or over not in arg.indices:
                raise TNError(f"{fn.name} over index {over!r}: the argument's free indices are "
                              f"{list(arg.indices)}")
            if fn.removes_index:
                keep = [k for k, i in enumerate(arg.indices) if i != over]
                indices = tuple(arg.indices[k] for k in keep)
                shape = tuple(arg.shape[k] for k in keep)
            else:
                indices, shape = arg.indices, arg.shape
        elif isinstance(fn, Elementwise):
            if over is not None:
                raise TNError(f"elementwise function {fn.name} takes no index")
            indices, shape = arg.indices, arg.shape
        else:
            raise TNError(f"not a function: {fn!r}")
        self._set(fn=fn, arg=arg, over=over, _indices=indices, _shape=shape)

    @property
    def children(self):
        return (self.arg,)

    def _key(self):
        return (self.fn, self.arg, self.over)

    def _own_indices(self):
        return {self.over} if self.over else set()


class Product(Expr):
    """Contraction of `factors`. Output `indices` (order given) must each appear in a factor;
    every other factor index is summed (an index in 3+ factors is a hyperedge)."""

    __slots__ = ("factors",)

    def __init__(self, factors: Iterable[Expr], indices: Sequence[str]):
        factors = tuple(factors)
        for f in factors:
            if not isinstance(f, Expr):
                raise TNError(f"product factor is not an expression: {f!r}")
        indices = _check_names(indices, "product")
        if len(set(indices)) != len(indices):
            raise TNError(f"product output has a repeated index: {list(indices)}")
        sizes: dict[str, Size] = {}
        for f in factors:
            for i, s in zip(f.indices, f.shape):
                sizes.setdefault(i, s)
        missing = [i for i in indices if i not in sizes]
        if missing:
            raise TNError(f"output index {missing[0]!r} does not appear in any factor "
                          f"(factor indices: {sorted(sizes)})")
        self._set(factors=factors, _indices=indices, _shape=tuple(sizes[i] for i in indices))

    @property
    def children(self):
        return self.factors

    def _key(self):
        return (self.factors, self._indices)

    def index_sizes(self) -> dict[str, Size]:
        """Size of every index used by the factors (free and summed)."""
        sizes: dict[str, Size] = {}
        for f in self.factors:
            for i, s in zip(f.indices, f.shape):
                sizes.setdefault(i, s)
        return sizes

    @property
    def summed(self) -> tuple[str, ...]:
        """Indices contracted by this product, in first-appearance order."""
        out: list[str] = []
        for f in self.factors:
            for i in f.indices:
                if i not in self._indices and i not in out:
                    out.append(i)
        return tuple(out)


class Sum(Expr):
    """Weighted sum Σ c_t · term_t. All terms have the same free index set; `indices` fixes the
    output order (default: the first term's)."""

    __slots__ = ("terms",)

    def __init__(self, terms: Iterable[tuple], indices: Sequence[str] | None = None):
        terms = tuple((as_coef(c), e) for c, e in terms)
        if not terms:
            raise TNError("a sum needs at least one term (use Zero for an empty sum)")
        first = terms[0][1]
        if indices is None:
            indices = first.indices
        indices = tuple(indices)
        want = set(indices)
        sizes = {}
        for c, e in terms:
            if not isinstance(e, Expr):
                raise TNError(f"sum term is not an expression: {e!r}")
            if set(e.indices) != want:
                raise TNError(f"index sets differ in a sum: {sorted(want)} vs {sorted(e.indices)}")
            for i, s in zip(e.indices, e.shape):
                sizes.setdefault(i, s)
        self._set(terms=terms, _indices=indices, _shape=tuple(sizes[i] for i in indices))

    @property
    def children(self):
        return tuple(e for _, e in self.terms)

    def _key(self):
        return (self.terms, self._indices)


class Zero(Expr):
    """The zero tensor with the given free indices and sizes."""

    __slots__ = ()

    def __init__(self, indices: Sequence[str] = (), shape: Sequence[SizeLike] = ()):
        indices = _check_names(indices, "zero")
        shape = tuple(as_size(s, f"zero axis {i!r}") for s, i in zip(shape, indices))
        if len(shape) != len(indices):
            raise TNError("zero: one size per index needed")
        self._set(_indices=indices, _shape=shape)

    def _key(self):
        return (self._indices, self._shape)


# --------------------------------------------------------------------------------------------
# signatures: the tensors an expression (and everything derived from it) is evaluated from
# --------------------------------------------------------------------------------------------

class Signature(Mapping[str, Variable]):
    """Variable declarations by name, in order (first declaration of a name wins), and the
    size symbols of the source's indices (`source_sizes`: those of its deltas, zeros and
    coefficients too, so `sizes=` may name them after a derivation or a fold dropped them).

    `expr.signature` of a derived expression is its source's: `evaluate`, `compile` and
    `codegen` accept every tensor in it, and an unused one still binds sizes."""

    __slots__ = ("_decls", "source_sizes", "_symbols")

    def __init__(self, decls: Iterable[Variable] = (), sizes: Iterable[sympy.Symbol] = ()):
        out: dict[str, Variable] = {}
        for d in decls:
            out.setdefault(d.name, d.declaration)
        self._decls = out
        self.source_sizes: frozenset[sympy.Symbol] = frozenset(sizes)

    def __getitem__(self, name: str) -> Variable:
        return self._decls[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._decls)

    def __len__(self) -> int:
        return len(self._decls)

    def __eq__(self, other) -> bool:
        return isinstance(other, Signature) and tuple(self.items()) == tuple(other.items()) \
            and self.source_sizes == other.source_sizes

    def __hash__(self) -> int:
        return hash((tuple(self.items()), self.source_sizes))

    def __str__(self) -> str:
        return ", ".join(d.describe() for d in self._decls.values()) or "(no tensors)"

    def __repr__(self) -> str:
        return f"Signature({self})"

    def symbols(self) -> set[sympy.Symbol]:
        """Every size symbol in the declared axis sizes and the source's index sizes."""
        try:
            return set(self._symbols)
        except AttributeError:
            pass
        out: set[sympy.Symbol] = set(self.source_sizes)
        for d in self._decls.values():
            for s in d.axis_shape:
                out |= free_symbols(s)
        self._symbols = frozenset(out)
        return out

    def merged(self, used: "Signature") -> "Signature":
        """This signature followed by the names only `used` has; where both declare a name
        differently, `used`'s declaration (the one an expression actually uses) wins."""
        decls = [used[n] if n in used else d for n, d in self._decls.items()]
        return Signature(decls + list(used.values()), self.source_sizes | used.source_sizes)


@lru_cache(maxsize=4096)
def free_symbols(size: Size | sympy.Expr) -> frozenset[sympy.Symbol]:
    """The symbols of a size or coefficient (sympy's `free_symbols`, remembered)."""
    return frozenset(size.free_symbols)


def size_symbols(expr: Expr) -> set[sympy.Symbol]:
    """Size symbols of `expr`: in its nodes' shapes, variables' axes and sums' coefficients
    (computed once per node from its children's; a new set each call)."""
    return set(bottom_up(expr, "_size_symbols", _own_size_symbols))


def bottom_up(root: Expr, slot: str, compute: Callable[[Expr], object]):
    """`root`'s cached `slot`, filling it (and its descendants' first: `compute(node)` reads
    its children's) without recursion, so any depth of expression works."""
    stack = [root]
    while stack:
        node = stack[-1]
        if hasattr(node, slot):
            stack.pop()
            continue
        pending = [c for c in node.children if not hasattr(c, slot)]
        if pending:
            stack.extend(pending)
            continue
        stack.pop()
        object.__setattr__(node, slot, compute(node))
    return getattr(root, slot)


def _own_variables(node: Expr) -> dict[str, Variable]:
    if isinstance(node, Variable):
        return {node.name: node}
    out: dict[str, Variable] = {}
    for child in node.children:
        for name, v in child._vars.items():
            out.setdefault(name, v)
    return out


def _own_size_symbols(node: Expr) -> frozenset[sympy.Symbol]:
    out: set[sympy.Symbol] = set()
    for child in node.children:
        out |= child._size_symbols
    for s in node.shape:
        out |= free_symbols(s)
    if isinstance(node, Variable):
        for s in node.axis_shape:
            out |= free_symbols(s)
    for c, _ in getattr(node, "terms", ()):
        out |= free_symbols(c)
    return frozenset(out)


def source_signature(src: Expr) -> Signature:
    """What an expression derived from `src` keeps: `src`'s signature and its size symbols."""
    sig = src.signature
    return Signature(sig.values(), sig.source_sizes | size_symbols(src))


def with_signature(expr: Expr, *sources: "Expr | Signature") -> Expr:
    """`expr` carrying the signatures of `sources` (theirs first, then its own variables); an
    expression source also passes on its size symbols (`source_signature`).

    The signature is metadata: the result equals `expr` and has its hash; `expr` itself is
    returned when nothing is added."""
    own = expr.signature
    merged = Signature()
    for src in sources:
        merged = merged.merged(source_signature(src) if isinstance(src, Expr) else src)
    merged = merged.merged(own)
    extra = merged.source_sizes - own.symbols() - size_symbols(expr)
    if tuple(merged.items()) == tuple(own.items()) and not extra:
        return expr
    return _attach(expr, Signature(merged.values(), own.source_sizes | extra))


def _attach(expr: Expr, signature: Signature) -> Expr:
    """A copy of the node `expr` (children shared) whose explicit signature is `signature`."""
    out = object.__new__(type(expr))
    for cls in type(expr).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if slot not in ("_sig", "_signature") and hasattr(expr, slot):
                object.__setattr__(out, slot, getattr(expr, slot))
    object.__setattr__(out, "_sig", signature)
    return out


def _carry_signature(new: Expr, old: Expr) -> Expr:
    """`new` (the same tensor as `old` with indices renamed or reordered) with `old`'s
    explicit signature, if it has one."""
    sig = getattr(old, "_sig", None)
    if sig is None or new is old or getattr(new, "_sig", None) is not None:
        return new
    return _attach(new, sig)


ONE = Product((), ())


def scalar(c) -> Expr:
    """The scalar constant c."""
    c = as_coef(c)
    if c == 0:
        return Zero()
    return Sum(((c, ONE),))


def scale(expr: Expr, c) -> Expr:
    """c · expr (folds into an existing Sum's coefficients)."""
    c = as_coef(c)
    if c == 0:
        return Zero(expr.indices, expr.shape)
    if c == 1:
        return expr
    if isinstance(expr, Sum):
        return Sum(((c * k, e) for k, e in expr.terms), expr.indices)
    return Sum(((c, expr),))


def fresh_name(base: str, taken: Iterable[str]) -> str:
    """`base` suffixed with '_' until it is not in `taken` (DESIGN.md convention; a set is
    read as it is, not copied: a large derived program's names are many)."""
    if not isinstance(taken, (set, frozenset, dict)):
        taken = set(taken)
    name = base
    while name in taken:
        name += "_"
    return name


def fresh_names(bases: Iterable[str], taken: set[str]) -> tuple[str, ...]:
    """`fresh_name` of each base in turn; every new name is added to `taken` (so they also
    differ from each other)."""
    out = []
    for base in bases:
        out.append(fresh_name(base, taken))
        taken.add(out[-1])
    return tuple(out)


def rename_free(expr: Expr, mapping: Mapping[str, str]) -> Expr:
    """Rename free indices per `mapping`; bound indices that would capture a new name are
    renamed fresh first (alpha-renaming)."""
    mapping = {k: v for k, v in mapping.items() if k != v and k in expr.indices}
    if not mapping:
        return expr
    return _rename(expr, mapping)


def _rename(expr: Expr, mapping: dict[str, str]) -> Expr:
    return _carry_signature(_rename_node(expr, mapping), expr)


def _rename_node(expr: Expr, mapping: dict[str, str]) -> Expr:
    if isinstance(expr, Variable):
        return expr.with_indices([mapping.get(i, i) for i in expr.occurrence])
    if isinstance(expr, Delta):
        return Delta([mapping.get(i, i) for i in expr.indices], expr.size)
    if isinstance(expr, Constant):
        return expr.with_indices([mapping.get(i, i) for i in expr.indices])
    if isinstance(expr, Zero):
        return Zero([mapping.get(i, i) for i in expr.indices], expr.shape)
    if isinstance(expr, Sum):
        return Sum(((c, _rename(e, mapping)) for c, e in expr.terms),
                   [mapping.get(i, i) for i in expr.indices])
    if isinstance(expr, Func):
        over = expr.over
        inner = dict(mapping)
        if over is not None and over not in expr.indices:
            # logsumexp: `over` is bound here; avoid capture.
            inner.pop(over, None)
            if over in inner.values():
                new_over = fresh_name(over, expr.all_indices | set(inner.values()))
                arg = _rename(expr.arg, {over: new_over})
                return Func(expr.fn, _rename(arg, inner), new_over)
        elif over is not None:
            over = inner.get(over, over)
        return Func(expr.fn, _rename(expr.arg, inner), over)
    if isinstance(expr, Product):
        targets = set(mapping.values())
        bound = set(expr.summed)
        inner = {k: v for k, v in mapping.items() if k not in bound}
        clash = bound & targets
        if clash:
            taken = set(expr.all_indices) | targets
            alpha = {}
            for b in sorted(clash):
                alpha[b] = fresh_name(b, taken)
                taken.add(alpha[b])
            inner.update(alpha)
        factors = [rename_free(f, {k: v for k, v in inner.items() if k in f.indices})
                   for f in expr.factors]
        return Product(factors, [inner.get(i, i) for i in expr.indices])
    raise TNError(f"cannot rename indices of {type(expr).__name__}")


def transpose(expr: Expr, indices: Sequence[str]) -> Expr:
    """Same tensor with its free indices in the order `indices` (a permutation)."""
    indices = tuple(indices)
    if sorted(indices) != sorted(expr.indices):
        raise TNError(f"transpose: {list(indices)} is not a permutation of {list(expr.indices)}")
    if indices == expr.indices:
        return expr
    if isinstance(expr, Sum):
        return _carry_signature(Sum(expr.terms, indices), expr)
    if isinstance(expr, Product):
        return _carry_signature(Product(expr.factors, indices), expr)
    if isinstance(expr, Zero):
        sizes = expr.sizes
        return _carry_signature(Zero(indices, [sizes[i] for i in indices]), expr)
    return Product((expr,), indices)


# --------------------------------------------------------------------------------------------
# rebuilding trees (shared by simplify, curvature, kfac, notation, demo)
# --------------------------------------------------------------------------------------------

def map_children(expr: Expr, fn: Callable[[Expr], Expr]) -> Expr:
    """`expr` rebuilt with `fn` applied to each child (a sum keeps its coefficients), or `expr`
    itself when every child comes back as the same object. Leaves are returned unchanged."""
    if isinstance(expr, Product):
        factors = tuple(fn(f) for f in expr.factors)
        if all(a is b for a, b in zip(factors, expr.factors)):
            return expr
        return Product(factors, expr.indices)
    if isinstance(expr, Sum):
        terms = tuple(fn(t) for _, t in expr.terms)
        if all(a is b for a, (_, b) in zip(terms, expr.terms)):
            return expr
        return Sum(((c, t) for (c, _), t in zip(expr.terms, terms)), expr.indices)
    if isinstance(expr, Func):
        arg = fn(expr.arg)
        return expr if arg is expr.arg else Func(expr.fn, arg, expr.over)
    return expr


def rewrite(expr: Expr, fn: Callable[[Expr], Optional[Expr]]) -> Expr:
    """`expr` with every node for which `fn(node)` returns an expression replaced by it (top
    down: a replaced node is not visited further); each distinct node object is visited once,
    and unchanged sub-trees are kept as the same objects."""
    memo: dict[int, Expr] = {}

    def go(e: Expr) -> Expr:
        hit = memo.get(id(e))
        if hit is None:
            new = fn(e)
            hit = memo[id(e)] = map_children(e, go) if new is None else new
        return hit

    return go(expr)


def replace(expr: Expr, old: Expr, new: Expr) -> Expr:
    """`expr` with every occurrence of the sub-tree `old` replaced by `new` (structural)."""
    return rewrite(expr, lambda e: new if e == old else None)


def map_sizes(expr: Expr, fn: Callable[[Size], Size], coefficients: bool = False) -> Expr:
    """`expr` with `fn` applied to every size (variables' axis sizes, delta sizes, shapes of
    constants and zeros), and to the sums' coefficients too when `coefficients` is set."""
    memo: dict[Expr, Expr] = {}

    def go(e: Expr) -> Expr:
        hit = memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, Variable):
            out: Expr = Variable(e.name, e.axes, e.occurrence, [fn(s) for s in e.axis_shape])
        elif isinstance(e, Delta):
            out = Delta(e.indices, fn(e.size))
        elif isinstance(e, Constant):
            out = Constant(e.kind, e.params, e.indices, [fn(s) for s in e.shape])
        elif isinstance(e, Zero):
            out = Zero(e.indices, [fn(s) for s in e.shape])
        elif isinstance(e, Func):
            out = Func(e.fn, go(e.arg), e.over)
        elif isinstance(e, Product):
            out = Product([go(f) for f in e.factors], e.indices)
        elif isinstance(e, Sum):
            out = Sum([(fn(c) if coefficients else c, go(t)) for c, t in e.terms], e.indices)
        else:
            raise TNError(f"map_sizes: unknown node {type(e).__name__}")
        memo[e] = out
        return out

    out = go(expr)
    signature = expr.signature
    declared = [Variable(d.name, d.axes, None, [fn(n) for n in d.axis_shape])
                for d in signature.values()]
    sizes = set().union(*(sympy.sympify(fn(s)).free_symbols for s in signature.source_sizes))
    return with_signature(out, Signature(declared, sizes))
