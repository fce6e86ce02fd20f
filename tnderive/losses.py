"""Losses on a model output, as tensor-network expressions, with their loss-Hessian square roots.

A loss is applied to a model expression `f` (free indices e.g. ``[n, c]`` or ``[n, s, c]``);
its target is a variable with the same indices (default name ``y``). Conventions follow torch:

=============  =====================================  ===========================================
loss           value (reduction "sum")                 loss-Hessian square root S (S Sᵀ = ∂²ℓ/∂f²)
=============  =====================================  ===========================================
``mse``        Σ (f − y)²            (torch, no ½)      √2 · δ(d, col)            (2I)
``ce``         Σ logsumexp_c f − Σ y f  (y one-hot /     √p_col (δ(c, col) − p_c)  (diag p − ppᵀ)
               probabilities over the class index)
``bce``        Σ softplus(f) − y f  (sigmoid BCE)       √(σ(1−σ)) · δ(d, col)     (diag σ(1−σ))
=============  =====================================  ===========================================

Reduction "mean" multiplies the loss by `scale(f)`: 1/numel(f) for MSE and BCE (torch's
MSELoss/BCEWithLogitsLoss average over every entry), 1/(numel(f)/C) for cross-entropy (the
class index is not averaged). The Hessian is block-diagonal over every index except the class
index ``d`` (the last index of f unless `class_index` names another), so S has one extra
"column" index of the class size. Coefficients are sympy expressions in the size symbols; they
become numbers when tensors are bound (`tnderive.evaluate` binds them; generated code gets
them as numbers from `tnderive.curvature.numeric`).

Each loss is one small class (`MSE`, `CrossEntropy`, `BCEWithLogits`) over the base `Loss`,
which holds the bookkeeping shared by all (class index, reduction scale, target variable, the
block-diagonal wrapping of the Hessian and its square root). A loss class gives its value, its
unscaled gradient, the terms of one class×class block Λ of its Hessian and of Λ's square root,
target sampling (MC Fisher) and the torch reference; defining the class registers it under
its `kind` and `aliases`. `get("ce:mean")` (or `Loss("ce", "mean")`, as `pathlib.Path` builds
a `PosixPath`) looks a loss up by name; `from_torch(torch.nn.MSELoss())` by torch module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import sympy
import torch

from .constants import ConstantKind, register
from .errors import TNError
from .functions import LOGSUMEXP, SOFTMAX, X, Elementwise, elementwise, get_elementwise, power, sigmoid
from .ir import (Constant, Delta, Expr, Func, Product, Signature, Sum, Variable, fresh_name,
                 rename_free, scale)

REDUCTIONS = ("sum", "mean")

SOFTPLUS = elementwise("softplus", sympy.log(1 + sympy.exp(X)))
SQRT = get_elementwise("sqrt")
SIGMOID = get_elementwise("sigmoid")
SQUARE = power(2)
#: √(σ(x)(1−σ(x))): the BCE loss-Hessian square root (one elementwise function)
BCE_SQRT = Elementwise("bce_hessian_sqrt", sympy.sqrt(sigmoid(X) * (1 - sigmoid(X))))
#: σ(x)(1−σ(x)): the BCE loss Hessian's diagonal
BCE_HESS = Elementwise("bce_hessian", sigmoid(X) * (1 - sigmoid(X)))
#: 1/(1+x): the normaliser of the cross-entropy's C−1-column square root
RECIP_ONE_PLUS = Elementwise("recip_one_plus", 1 / (1 + X))


def build_class_embed(params, shape, device, dtype):
    """E[c, j] = δ(c, j) for C classes c and the first C−1 classes j: [C, C−1]."""
    return torch.eye(shape[0], shape[1], device=device, dtype=dtype)


def build_class_last(params, shape, device, dtype):
    """e[c] = δ(c, C−1), the last class as a one-hot vector [C]."""
    out = torch.zeros(shape, device=device, dtype=dtype)
    out[-1] = 1
    return out


CLASS_EMBED = register(ConstantKind("class_embed", build_class_embed, symbol="E"))
CLASS_LAST = register(ConstantKind("class_last", build_class_last, symbol="e_C"))

#: kind -> loss class, filled by `Loss.__init_subclass__` (one entry per class)
_CLASSES: dict[str, type["Loss"]] = {}
#: every accepted name (kinds and aliases) -> kind
_NAMES: dict[str, str] = {}
#: the registered kinds, a live view ("mse", "ce", "bce", ...)
KINDS = _CLASSES.keys()

#: coefficient-weighted products: the terms of a Hessian block or of its square root
Terms = Sequence[tuple[sympy.Expr, Sequence[Expr]]]


@dataclass(frozen=True, init=False)
class Loss:
    """A loss applied to a model output expression (base of the loss classes).

    reduction:   "sum" or "mean" (torch's conventions, see the module docstring).
    target:      name of the target variable (same indices as the model output).
    class_index: the model output's class / feature index (default: its last index).

    A subclass sets `kind` (its registry name), optional `aliases`, `torch_class` (the torch
    loss module it mirrors, if any) and `mean_over_class` (whether "mean" also averages over
    the class index), and implements `value`, `raw_gradient`, `hessian_terms`, `sqrt_terms`,
    `sample_target` and `torch_value`. `Loss(kind, reduction, ...)` builds the registered class.
    Instances are built in `__new__` (there is no `__init__`), so `Loss(kind, ...)` can hand
    its other arguments to the class it picks, as `pathlib.Path(...)` returns a `PosixPath`.
    """

    kind: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    torch_class: ClassVar[Optional[type]] = None
    mean_over_class: ClassVar[bool] = True

    reduction: str = "sum"
    target: str = "y"
    class_index: Optional[str] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.kind] = cls
        for name in (cls.kind, *cls.aliases):
            _NAMES[name] = cls.kind

    def __new__(cls, *args, **kwargs):
        if cls is Loss:  # Loss("mse", "mean"): the registered class of that kind
            kind = args[0] if args else kwargs.pop("kind", None)
            if kind is None:
                raise TNError(f"Loss(kind, ...) needs a loss name; known: {', '.join(KINDS)}")
            return loss_class(kind)(*args[1:], **kwargs)
        return cls._create(*args, **kwargs)

    @classmethod
    def _create(cls, reduction: str = "sum", target: str = "y",
                class_index: Optional[str] = None) -> "Loss":
        if reduction not in REDUCTIONS:
            raise TNError(f"loss reduction must be 'sum' or 'mean', got {reduction!r}")
        obj = object.__new__(cls)
        for name, value in (("reduction", reduction), ("target", target), ("class_index", class_index)):
            object.__setattr__(obj, name, value)
        return obj

    # --- bookkeeping ----------------------------------------------------------------------
    def class_of(self, f: Expr) -> str:
        """The class index of model output `f`."""
        if not f.indices:
            raise TNError("the model output is a scalar; a loss needs an output with indices")
        c = self.class_index or f.indices[-1]
        if c not in f.indices:
            raise TNError(f"class index {c!r} is not an index of the model output {list(f.indices)}")
        return c

    def scale(self, f: Expr) -> sympy.Expr:
        """The reduction coefficient: 1 (sum), 1/numel (MSE/BCE mean), 1/(numel/C) (CE mean)."""
        if self.reduction == "sum":
            return sympy.Integer(1)
        sizes = dict(zip(f.indices, f.shape))
        if not self.mean_over_class:
            sizes.pop(self.class_of(f))
        return 1 / sympy.Mul(*sizes.values())

    def targets(self, f: Expr) -> Signature:
        """The loss's own tensors: the target y (f's indices and sizes)."""
        return Signature([Variable(self.target, f.indices, f.indices, f.shape)])

    def target_variable(self, f: Expr) -> Variable:
        """The target y, a variable with f's indices and sizes."""
        if self.target in f.variables:
            raise TNError(f"target name {self.target!r} is already a variable of the model")
        return Variable(self.target, f.indices, f.indices, f.shape)

    # --- the loss and its derivatives w.r.t. the model output --------------------------------
    def expr(self, f: Expr) -> Expr:
        """The scalar loss of model output `f` (target variable `self.target`)."""
        return scale(self.value(f, self.target_variable(f), self.class_of(f)), self.scale(f))

    def gradient(self, f: Expr) -> Expr:
        """∂loss/∂f, indices `f.indices` (closed form, see `raw_gradient`)."""
        return scale(self.raw_gradient(f, self.target_variable(f), self.class_of(f)), self.scale(f))

    def hessian(self, f: Expr, primed: Optional[dict] = None) -> Expr:
        """∂²loss/∂f∂f' with indices `[*f.indices, *primed]` (primed names fresh by default).
        Block diagonal over every index except the class index: δ(i, i') for each other index
        times the class×class block Λ (`hessian_terms`)."""
        primed = primed or _primed(f, f.indices)
        cls = self.class_of(f)
        sizes = dict(zip(f.indices, f.shape))
        deltas = [Delta((i, primed[i]), sizes[i]) for i in f.indices if i != cls]
        out = list(f.indices) + [primed[i] for i in f.indices]
        return _combine(self.hessian_terms(f, cls, primed[cls]), deltas, out, self.scale(f))

    def hessian_sqrt(self, f: Expr, column: Optional[str] = None, reduced: bool = False) -> Expr:
        """The batched square root S[*f.indices, column]: for every position of the non-class
        indices (n, s, …) the C×C matrix S[n, s, :, :] satisfies S Sᵀ = that diagonal block of
        ∂²loss/∂f² (the Hessian is zero off these blocks). Backpropagating S through a model
        sums the columns of all positions, as curvlinops does for outputs [N, S, C].
        reduced=True: a square root with as many columns as the block's rank where that is
        fewer (cross-entropy: C−1, `reduced_sqrt_terms`); S Sᵀ is the same."""
        cls = self.class_of(f)
        col = column or fresh_name(cls, f.all_indices)
        if col in f.all_indices:
            raise TNError(f"column index {col!r} is already used by the model output")
        sizes = dict(zip(f.indices, f.shape))
        out = list(f.indices) + [col]
        terms = (self.reduced_sqrt_terms(f, cls, col) if reduced else None) or \
            self.sqrt_terms(f, cls, col)
        carried = {i for _, factors in terms for x in factors for i in x.indices}
        ones = [Delta((i,), sizes[i]) for i in f.indices if i != cls and i not in carried]
        return _combine(terms, ones, out, sympy.sqrt(self.scale(f)))

    # --- what a loss class gives ---------------------------------------------------------------
    def value(self, f: Expr, y: Variable, cls: str) -> Expr:
        """The unscaled ("sum") scalar loss of `f` at target `y`."""
        raise NotImplementedError

    def raw_gradient(self, f: Expr, y: Variable, cls: str) -> Expr:
        """The unscaled ∂value/∂f, indices `f.indices`."""
        raise NotImplementedError

    def hessian_terms(self, f: Expr, cls: str, cls_: str) -> Terms:
        """Λ: the unscaled class×class block of the Hessian (at every position of the other
        indices) as coefficient-weighted products with free indices in f.indices ∪ {cls_}."""
        raise NotImplementedError

    def sqrt_terms(self, f: Expr, cls: str, col: str) -> Terms:
        """A square root of Λ (S Sᵀ = Λ over cls, col) as coefficient-weighted products."""
        raise NotImplementedError

    def reduced_sqrt_terms(self, f: Expr, cls: str, col: str) -> Optional[Terms]:
        """A square root of Λ with rank(Λ) columns when Λ is singular, else None (then
        `sqrt_terms`)."""
        return None

    def sample_target(self, f_value: torch.Tensor, class_dim: int,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A target drawn from the model's predictive distribution at `f_value` (MC Fisher)."""
        raise NotImplementedError

    def torch_value(self, f_value: torch.Tensor, target: torch.Tensor, class_dim: int) -> torch.Tensor:
        """The same loss computed with torch.nn.functional (the reference in tests)."""
        raise NotImplementedError


def _combine(terms: Terms, shared: list, out: list, c: sympy.Expr) -> Expr:
    """c · Σ_k coef_k · Π (shared factors, term k's factors), indices `out`."""
    products = [(coef, Product(list(shared) + list(factors), out)) for coef, factors in terms]
    if len(products) == 1:
        coef, product = products[0]
        return scale(product, coef * c)
    return Sum(((coef * c, p) for coef, p in products), out)


def _primed(f: Expr, names) -> dict:
    taken = set(f.all_indices)
    out = {}
    for i in names:
        out[i] = fresh_name(i + "_", taken)
        taken.add(out[i])
    return out


def _residual(f: Expr, y: Variable) -> Sum:
    return Sum(((1, f), (-1, y)), f.indices)


def _class_delta(f: Expr, cls: str, other: str) -> Delta:
    return Delta((cls, other), dict(zip(f.indices, f.shape))[cls])


# --------------------------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------------------------

class MSE(Loss):
    """torch's MSELoss: Σ (f − y)² (no ½); Λ = 2I, S = √2 I; sampled targets N(f, ½I)."""

    kind = "mse"
    torch_class = torch.nn.MSELoss

    def value(self, f, y, cls):
        r = _residual(f, y)
        return Product((r, r), ())

    def raw_gradient(self, f, y, cls):
        return Sum(((2, f), (-2, y)), f.indices)

    def hessian_terms(self, f, cls, cls_):
        return [(2, [_class_delta(f, cls, cls_)])]

    def sqrt_terms(self, f, cls, col):
        return [(sympy.sqrt(2), [_class_delta(f, cls, col)])]

    def sample_target(self, f_value, class_dim, generator=None):
        f_value = f_value.detach()  # 2(f − ỹ) then has covariance 2I, the loss Hessian
        noise = torch.randn(f_value.shape, generator=generator, dtype=f_value.dtype,
                            device=f_value.device)
        return f_value + noise * 0.5 ** 0.5

    def torch_value(self, f_value, target, class_dim):
        return torch.nn.functional.mse_loss(f_value, target, reduction=self.reduction)


class CrossEntropy(Loss):
    """Softmax cross-entropy on logits (torch's CrossEntropyLoss with one-hot / probability
    targets over the class index): Λ = diag p − ppᵀ, S[c, col] = √p_col (δ(c, col) − p_c)."""

    kind = "ce"
    aliases = ("cross_entropy", "crossentropy")
    torch_class = torch.nn.CrossEntropyLoss
    mean_over_class = False

    def value(self, f, y, cls):
        lse = Product((Func(LOGSUMEXP, f, cls),), ())
        return Sum(((1, lse), (-1, Product((y, f), ()))))

    def raw_gradient(self, f, y, cls):
        return Sum(((1, Func(SOFTMAX, f, cls)), (-1, y)), f.indices)

    def hessian_terms(self, f, cls, cls_):
        p = Func(SOFTMAX, f, cls)
        return [(1, [p, _class_delta(f, cls, cls_)]), (-1, [p, rename_free(p, {cls: cls_})])]

    def sqrt_terms(self, f, cls, col):
        p = Func(SOFTMAX, f, cls)
        sqrt_p_col = rename_free(Func(SQRT, p), {cls: col})
        return [(1, [sqrt_p_col, _class_delta(f, cls, col)]), (-1, [sqrt_p_col, p])]

    def reduced_sqrt_terms(self, f, cls, col):
        """Λ = diag p − ppᵀ has rank C−1 (Λ·1 = 0), so Λ = Pᵀ Λ_r P with P = I − 1·e_Cᵀ and
        Λ_r = diag p_r − p_r p_rᵀ its leading (C−1)×(C−1) block, whose symmetric square root
        is diag √p_r − p_r √p_rᵀ / (1 + √p_C) (no cancellation: 1 + √p_C ≥ 1). Together,
        for the first C−1 classes j:

            S[c, j] = √p_j (δ(c, j) − (p_c + √p_C δ(c, C)) / (1 + √p_C))

        (one column fewer than `sqrt_terms`; every backpropagated column costs a pass)."""
        size = dict(zip(f.indices, f.shape))[cls]
        if size.is_number and size < 2:
            return None
        p = Func(SOFTMAX, f, cls)
        root = Func(SQRT, p)
        other = fresh_name(cls + "_", set(f.all_indices) | {col})
        root_other = rename_free(root, {cls: other})
        rest = tuple(i for i in f.indices if i != cls)
        embed = Constant(CLASS_EMBED.name, (), (cls, col), (size, size - 1))
        last = Constant(CLASS_LAST.name, (), (cls,), (size,))
        q = Product((embed.with_indices((other, col)), root_other), (*rest, col))   # √p_j
        s = Product((last.with_indices((other,)), root_other), rest)                 # √p_C
        r = Func(RECIP_ONE_PLUS, s)
        return [(1, [embed, root]), (-1, [q, p, r]), (-1, [q, last, s, r])]

    def sample_target(self, f_value, class_dim, generator=None):
        logits = f_value.detach().movedim(class_dim, -1)
        probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        onehot = torch.nn.functional.one_hot(labels, logits.shape[-1]).to(f_value.dtype)
        return onehot.reshape(logits.shape).movedim(-1, class_dim)

    def torch_value(self, f_value, target, class_dim):
        return torch.nn.functional.cross_entropy(f_value.movedim(class_dim, 1),
                                                 target.movedim(class_dim, 1),
                                                 reduction=self.reduction)


class BCEWithLogits(Loss):
    """Sigmoid binary cross-entropy on logits (torch's BCEWithLogitsLoss): Σ softplus(f) − y f;
    Λ = diag σ(1−σ), S = diag √(σ(1−σ)); sampled targets Bernoulli(σ(f))."""

    kind = "bce"
    aliases = ("bce_with_logits",)
    torch_class = torch.nn.BCEWithLogitsLoss

    def value(self, f, y, cls):
        return Sum(((1, Product((Func(SOFTPLUS, f),), ())), (-1, Product((y, f), ()))))

    def raw_gradient(self, f, y, cls):
        return Sum(((1, Func(SIGMOID, f)), (-1, y)), f.indices)

    def hessian_terms(self, f, cls, cls_):
        return [(1, [Func(BCE_HESS, f), _class_delta(f, cls, cls_)])]

    def sqrt_terms(self, f, cls, col):
        return [(1, [Func(BCE_SQRT, f), _class_delta(f, cls, col)])]

    def sample_target(self, f_value, class_dim, generator=None):
        return torch.bernoulli(torch.sigmoid(f_value.detach()), generator=generator)

    def torch_value(self, f_value, target, class_dim):
        return torch.nn.functional.binary_cross_entropy_with_logits(f_value, target,
                                                                    reduction=self.reduction)


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------

def names() -> tuple[str, ...]:
    """The registered loss kinds ("mse", "ce", "bce", ...)."""
    return tuple(_CLASSES)


def loss_class(name: str) -> type[Loss]:
    """The loss class registered under `name` (a kind or an alias); TNError listing the known."""
    kind = _NAMES.get(name) if isinstance(name, str) else None
    if kind is None:
        raise TNError(f"unknown loss {name!r}; known: {', '.join(KINDS)}")
    return _CLASSES[kind]


def get(spec: str, target: str = "y", class_index: Optional[str] = None) -> Loss:
    """The loss named by `spec`, NAME[:REDUCTION] ("mse", "ce:mean", "cross_entropy:sum", ...;
    the reduction defaults to "sum")."""
    if not isinstance(spec, str):
        raise TNError(f"expected a loss name such as 'mse:mean', got {spec!r}")
    name, _, reduction = spec.strip().partition(":")
    return loss_class(name)(reduction or "sum", target, class_index)


def from_torch(module: torch.nn.Module, target: str = "y", class_index: Optional[str] = None) -> Loss:
    """The loss mirroring a torch loss module (MSELoss, CrossEntropyLoss, BCEWithLogitsLoss)
    and its reduction."""
    mirrored = {cls.torch_class: cls for cls in _CLASSES.values() if cls.torch_class is not None}
    cls = mirrored.get(type(module))
    if cls is not None:
        return cls(module.reduction, target, class_index)
    known = ", ".join(t.__name__ for t in mirrored)
    raise TNError(f"no loss mirrors torch module {type(module).__name__}; known: {known}")


def as_loss(loss) -> Loss:
    """A `Loss` from a Loss or a name ("mse", "ce"/"cross_entropy", "bce", optional ":mean")."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return get(loss)
    raise TNError(f"expected a Loss or a loss name, got {loss!r}")


def mse(reduction: str = "sum", target: str = "y", class_index: Optional[str] = None) -> Loss:
    """torch's MSELoss: Σ (f − y)² (sum) or its mean over every entry."""
    return MSE(reduction, target, class_index)


def cross_entropy(reduction: str = "sum", target: str = "y", class_index: Optional[str] = None) -> Loss:
    """Softmax cross-entropy on logits (target: one-hot or probabilities over the class index)."""
    return CrossEntropy(reduction, target, class_index)


def bce(reduction: str = "sum", target: str = "y", class_index: Optional[str] = None) -> Loss:
    """Sigmoid binary cross-entropy on logits (torch's BCEWithLogitsLoss)."""
    return BCEWithLogits(reduction, target, class_index)
