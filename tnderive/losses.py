"""Losses on a model output, as tensor-network expressions, with their loss-Hessian square roots.

A `Loss` is applied to a model expression `f` (free indices e.g. ``[n, c]`` or ``[n, s, c]``);
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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import sympy
import torch

from .errors import TNError
from .functions import LOGSUMEXP, SOFTMAX, X, Elementwise, elementwise, get_elementwise, power, sigmoid
from .ir import Delta, Expr, Func, Product, Sum, Variable, fresh_name, rename_free, scale

KINDS = ("mse", "ce", "bce")
REDUCTIONS = ("sum", "mean")

SOFTPLUS = elementwise("softplus", sympy.log(1 + sympy.exp(X)))
SQRT = get_elementwise("sqrt")
SIGMOID = get_elementwise("sigmoid")
SQUARE = power(2)
#: √(σ(x)(1−σ(x))): the BCE loss-Hessian square root (one elementwise function)
BCE_SQRT = Elementwise("bce_hessian_sqrt", sympy.sqrt(sigmoid(X) * (1 - sigmoid(X))))
#: σ(x)(1−σ(x)): the BCE loss Hessian's diagonal
BCE_HESS = Elementwise("bce_hessian", sigmoid(X) * (1 - sigmoid(X)))


@dataclass(frozen=True)
class Loss:
    """A loss applied to a model output expression.

    kind:        "mse", "ce" (softmax cross-entropy on logits) or "bce" (sigmoid BCE on logits).
    reduction:   "sum" or "mean" (torch's conventions, see the module docstring).
    target:      name of the target variable (same indices as the model output).
    class_index: the model output's class / feature index (default: its last index).
    """

    kind: str
    reduction: str = "sum"
    target: str = "y"
    class_index: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise TNError(f"unknown loss {self.kind!r}; known: {', '.join(KINDS)}")
        if self.reduction not in REDUCTIONS:
            raise TNError(f"loss reduction must be 'sum' or 'mean', got {self.reduction!r}")

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
        if self.kind == "ce":
            sizes.pop(self.class_of(f))
        return 1 / sympy.Mul(*sizes.values())

    def target_variable(self, f: Expr) -> Variable:
        if self.target in f.variables:
            raise TNError(f"target name {self.target!r} is already a variable of the model")
        return Variable(self.target, f.indices, f.indices, f.shape)

    # --- the loss and its derivatives w.r.t. the model output --------------------------------
    def expr(self, f: Expr) -> Expr:
        """The scalar loss of model output `f` (target variable `self.target`)."""
        y = self.target_variable(f)
        if self.kind == "mse":
            r = Sum(((1, f), (-1, y)), f.indices)
            value = Product((Func(SQUARE, r),), ())
        elif self.kind == "ce":
            c = self.class_of(f)
            lse = Product((Func(LOGSUMEXP, f, c),), ())
            value = Sum(((1, lse), (-1, Product((y, f), ()))))
        else:
            value = Sum(((1, Product((Func(SOFTPLUS, f),), ())), (-1, Product((y, f), ()))))
        return scale(value, self.scale(f))

    def gradient(self, f: Expr) -> Expr:
        """∂loss/∂f, indices `f.indices` (closed form: 2c(f−y), c(softmax f − y), c(σ(f) − y))."""
        y = self.target_variable(f)
        c = self.scale(f)
        if self.kind == "mse":
            return Sum(((2 * c, f), (-2 * c, y)), f.indices)
        if self.kind == "ce":
            p = Func(SOFTMAX, f, self.class_of(f))
            return Sum(((c, p), (-c, y)), f.indices)
        return Sum(((c, Func(SIGMOID, f)), (-c, y)), f.indices)

    def hessian(self, f: Expr, primed: Optional[dict] = None) -> Expr:
        """∂²loss/∂f∂f' with indices `[*f.indices, *primed]` (primed names fresh by default).
        Block diagonal over every index except the class index."""
        primed = primed or _primed(f, f.indices)
        cls = self.class_of(f)
        sizes = dict(zip(f.indices, f.shape))
        deltas = [Delta((i, primed[i]), sizes[i]) for i in f.indices if i != cls]
        out = list(f.indices) + [primed[i] for i in f.indices]
        c = self.scale(f)
        if self.kind == "mse":
            return scale(Product(deltas + [Delta((cls, primed[cls]), sizes[cls])], out), 2 * c)
        if self.kind == "bce":
            return scale(Product(deltas + [Func(BCE_HESS, f), Delta((cls, primed[cls]), sizes[cls])], out), c)
        p = Func(SOFTMAX, f, cls)
        p2 = rename_free(p, {cls: primed[cls]})
        diag = Product(deltas + [p, Delta((cls, primed[cls]), sizes[cls])], out)
        outer = Product(deltas + [p, p2], out)
        return Sum(((c, diag), (-c, outer)), out)

    def hessian_sqrt(self, f: Expr, column: Optional[str] = None) -> Expr:
        """The batched square root S[*f.indices, column]: for every position of the non-class
        indices (n, s, …) the C×C matrix S[n, s, :, :] satisfies S Sᵀ = that diagonal block of
        ∂²loss/∂f² (the Hessian is zero off these blocks). Backpropagating S through a model
        sums the columns of all positions, as curvlinops does for outputs [N, S, C]."""
        cls = self.class_of(f)
        col = column or fresh_name(cls, f.all_indices)
        if col in f.all_indices:
            raise TNError(f"column index {col!r} is already used by the model output")
        sizes = dict(zip(f.indices, f.shape))
        out = list(f.indices) + [col]
        ones = [Delta((i,), sizes[i]) for i in f.indices if i != cls]
        c = self.scale(f)
        if self.kind == "mse":
            return scale(Product(ones + [Delta((cls, col), sizes[cls])], out), sympy.sqrt(2 * c))
        if self.kind == "bce":
            return scale(Product([Func(BCE_SQRT, f), Delta((cls, col), sizes[cls])], out), sympy.sqrt(c))
        p = Func(SOFTMAX, f, cls)
        sqrt_p_col = rename_free(Func(SQRT, p), {cls: col})
        diag = Product([sqrt_p_col, Delta((cls, col), sizes[cls])], out)
        outer = Product([sqrt_p_col, p], out)
        return Sum(((sympy.sqrt(c), diag), (-sympy.sqrt(c), outer)), out)

    # --- numerics --------------------------------------------------------------------------
    def sample_target(self, f_value: torch.Tensor, class_dim: int,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """A target drawn from the model's predictive distribution (for MC Fisher):
        MSE: N(f, ½ I) (so 2(f − ỹ) has covariance 2I); CE: one-hot of Categorical(softmax f);
        BCE: Bernoulli(σ(f))."""
        f_value = f_value.detach()
        if self.kind == "mse":
            noise = torch.randn(f_value.shape, generator=generator, dtype=f_value.dtype,
                                device=f_value.device)
            return f_value + noise * 0.5 ** 0.5
        if self.kind == "bce":
            return torch.bernoulli(torch.sigmoid(f_value), generator=generator)
        logits = f_value.movedim(class_dim, -1)
        probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        onehot = torch.nn.functional.one_hot(labels, logits.shape[-1]).to(f_value.dtype)
        return onehot.reshape(logits.shape).movedim(-1, class_dim)

    def torch_value(self, f_value: torch.Tensor, target: torch.Tensor, class_dim: int) -> torch.Tensor:
        """The same loss computed with torch.nn.functional (for tests)."""
        F = torch.nn.functional
        if self.kind == "mse":
            return F.mse_loss(f_value, target, reduction=self.reduction)
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(f_value, target, reduction=self.reduction)
        logits = f_value.movedim(class_dim, 1)
        probs = target.movedim(class_dim, 1)
        return F.cross_entropy(logits, probs, reduction=self.reduction)


def _primed(f: Expr, names) -> dict:
    taken = set(f.all_indices)
    out = {}
    for i in names:
        out[i] = fresh_name(i + "_", taken)
        taken.add(out[i])
    return out


def mse(reduction: str = "sum", target: str = "y", class_index: Optional[str] = None) -> Loss:
    """torch's MSELoss: Σ (f − y)² (sum) or its mean over every entry."""
    return Loss("mse", reduction, target, class_index)


def cross_entropy(reduction: str = "sum", target: str = "y", class_index: Optional[str] = None) -> Loss:
    """Softmax cross-entropy on logits (target: one-hot or probabilities over the class index)."""
    return Loss("ce", reduction, target, class_index)


def bce(reduction: str = "sum", target: str = "y", class_index: Optional[str] = None) -> Loss:
    """Sigmoid binary cross-entropy on logits (torch's BCEWithLogitsLoss)."""
    return Loss("bce", reduction, target, class_index)


def as_loss(loss) -> Loss:
    """A `Loss` from a Loss or a name ("mse", "ce"/"cross_entropy", "bce", optional ":mean")."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        name, _, red = loss.partition(":")
        name = {"cross_entropy": "ce", "crossentropy": "ce", "bce_with_logits": "bce"}.get(name, name)
        return Loss(name, red or "sum")
    raise TNError(f"expected a Loss or a loss name, got {loss!r}")
