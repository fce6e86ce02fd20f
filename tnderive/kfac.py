"""KFAC for any layer linear in its weight, derived from the layer's tensor network.

`kfac(expr, weight="W", batch="n", kind="expand"|"reduce", fisher="type-2"|"mc"|"empirical",
loss=None, bias=None, joint=False)` -> `KFACFactors`.

Network surgery
---------------
The product P that holds W as a factor is split: its other factors form connected components
(linked by indices other than W's legs and the batch index). Components that carry the batch
index, or no free index of P, are the **input side** (data, convolution patterns, ...); the
others (e.g. the second factor of a low-rank layer, the point-wise weight of a flat
depthwise-separable product) are the **output side**. The layer output is the sub-network
`z = W · input side`; W's legs classify as

  * output legs:  free in z, not on the input side     (o of W[o, i])
  * group legs:   free in z and on the input side       (g of a grouped convolution, c of a
                                                          depthwise one): factors per group
  * input legs:   contracted inside z                   (i; e, k1, k2 of a convolution)

and z's other free indices (besides the batch index) are the weight-sharing **positions**
(a sequence axis, the output pixels o1, o2 of a convolution).

Factors (curvlinops' scaling, so both factors match `KFACLinearOperator`)
--------------------------------------------------------------------------
X[n, pos, grp, in] is the input side with W removed. With N the batch size and S the number of
positions:

  expand:  A = Σ_{n,pos} X Xᵀ / (N·S)                B = Σ_{n,pos,col} g gᵀ · s_B
  reduce:  A = Σ_n (Σ_pos X)(Σ_pos X)ᵀ / (N·S²)      B = Σ_{n,col} (Σ_pos g)(Σ_pos g)ᵀ · s_B

The position sums of reduce are inside the network: X summed over pos before the outer
product, so for a convolution the pattern Π is summed over its output index first and the
unfolded input is never built. g[n, pos, grp, out, col] are vectors backpropagated to z:

  * no loss:   a new variable g[*expr.indices, col] at the expression's output (the CLI's
               "output-side vectors"), pulled back through the output-side factors (s_B = 1)
  * type-2:    the columns of the loss-Hessian square root S (`tnderive.losses`), s_B = 1
  * mc:        the loss gradient at targets sampled from the model's distribution
  * empirical: the loss gradient at the true targets; for both s_B = 1/scale (1 for sum,
               numel(f) for an MSE/BCE mean, numel(f)/C for a CE mean), so B estimates the
               type-2 factor.

`input_expr`/`output_expr` are the unnormalised sums (expressions); `compute(**tensors)` applies
the scaling and returns `KronBlock`s (`tnderive.kronecker`).

Flavours
--------
A kind (`Expand`, `Reduce`) says how the input side X is formed and how A is computed and
scaled from it; a Fisher type (`Type2`, `MonteCarlo`, `Empirical`) how the output-side vectors
are formed and B scaled. Each is one small class, registered in `KINDS` / `FISHERS` under its
`name` when defined. A kind's `input_factor` is a torch-only function: the library calls it
and the `tnderive kfac` command copies its source into the module it writes. The factor expressions keep the
signature of the expression, its loss target and the vectors (`Expr.signature`): the tensors
of the model evaluate every factor, in their dtype and on their device.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Mapping, Optional

import sympy
import torch

from .derive import derivative
from .errors import TNError
from .ir import (Constant, Delta, Expr, Product, Signature, Variable, Zero, fresh_name, fresh_names,
                 rename_free, replace, size_symbol, with_signature)
from .kronecker import KronBlock, ParamLayout
from .losses import Loss, as_loss
from .unionfind import UnionFind
from .curvature import (_rename_to, compile_expr, maybe_simplify, relevant_sizes, sizes_from,
                        substitute)
from .evaluate import Prepared, evaluate

__all__ = ["kfac", "KFACFactors", "LayerSplit", "split_layer", "KINDS", "FISHERS", "KFACKind",
           "FisherType"]


# --------------------------------------------------------------------------------------------
# network surgery
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerSplit:
    """The layer containing a weight, split into input side and output side.

    product:         the product of `expr` holding W as a factor.
    z:               the layer output network `W · input side` (free: z.indices).
    input_factors:   the input side (W removed).
    output_factors:  factors of `product` on the output side (may be empty).
    weight:          W's occurrence in the product.
    batch, positions, group_legs, out_legs, in_legs: index names (see module docstring).
    expr:            the expression with `product` rewritten as `output factors · z`.
    """

    product: Product
    z: Product
    input_factors: tuple
    output_factors: tuple
    weight: Variable
    batch: str
    positions: tuple
    group_legs: tuple
    out_legs: tuple
    in_legs: tuple
    expr: Expr

    def describe(self) -> str:
        w = self.weight
        return (f"layer output z[{','.join(self.z.indices)}] = {w.name}[{','.join(w.occurrence)}] · "
                f"input side ({len(self.input_factors)} factor(s)); batch {self.batch!r}, positions "
                f"{list(self.positions)}, group legs {list(self.group_legs)}, output legs "
                f"{list(self.out_legs)}, input legs {list(self.in_legs)}"
                + (f"; {len(self.output_factors)} output-side factor(s)" if self.output_factors else ""))


def _products_with(expr: Expr, name: str) -> list[Product]:
    found: list[Product] = []
    for node in expr.walk():
        if isinstance(node, Product) and any(isinstance(f, Variable) and f.name == name
                                             for f in node.factors):
            if node not in found:
                found.append(node)
    return found


def split_layer(expr: Expr, weight: str, batch: str) -> LayerSplit:
    """Find the product holding `weight` in `expr` and split it (TNError when the expression is
    not linear in the weight in the required way)."""
    if not isinstance(expr, Expr):
        raise TNError(f"expected an expression, got {type(expr).__name__}")
    if weight not in expr.variables:
        raise TNError(f"weight {weight!r} does not occur in the expression (variables: {list(expr.variables)})")
    prods = _products_with(expr, weight)
    if not prods:
        raise TNError(f"weight {weight!r} is not a factor of a product (KFAC needs a layer linear in its weight)")
    if len(prods) > 1:
        raise TNError(f"weight {weight!r} is a factor of {len(prods)} different products; KFAC needs it "
                      f"used by one layer")
    P = prods[0]
    ws = [f for f in P.factors if isinstance(f, Variable) and f.name == weight]
    if len(ws) != 1:
        raise TNError(f"weight {weight!r} appears {len(ws)} times in one product (not linear in it)")
    W = ws[0]
    if len(set(W.occurrence)) != len(W.occurrence):
        raise TNError(f"weight {weight!r} is used with a repeated index {list(W.occurrence)}")
    others = [f for f in P.factors if f is not W]
    for f in others:
        if weight in f.variables:
            raise TNError(f"weight {weight!r} also occurs inside another factor of its product "
                          f"(the layer is not linear in it)")
    if batch not in P.indices:
        raise TNError(f"batch index {batch!r} is not a free index of the layer product "
                      f"[{','.join(P.indices)}] holding {weight!r}")
    legs = set(W.occurrence)
    # connected components of the other factors (ignoring W's legs and the batch index)
    components = UnionFind(range(len(others)))
    owner: dict[str, int] = {}
    for k, f in enumerate(others):
        for i in f.indices:
            if i in legs or i == batch:
                continue
            if i in owner:
                components.union(owner[i], k)
            else:
                owner[i] = k
    comps = components.classes()
    free = set(P.indices)
    input_side, output_side = [], []
    for members in comps.values():
        idx = {i for k in members for i in others[k].indices}
        is_input = batch in idx or not (idx & free)
        (input_side if is_input else output_side).extend(members)
    input_factors = tuple(others[k] for k in sorted(input_side))
    output_factors = tuple(others[k] for k in sorted(output_side))
    if not input_factors:
        raise TNError(f"the layer of {weight!r} has no input side (no factor carries the batch index {batch!r})")
    in_idx = {i for f in input_factors for i in f.indices}
    out_idx = {i for f in output_factors for i in f.indices}
    order: list[str] = list(P.indices)
    for f in (W, *input_factors):
        for i in f.indices:
            if i not in order:
                order.append(i)
    z_indices = tuple(i for i in order
                      if (i in free or i in out_idx) and (i in in_idx or i in legs))
    if batch not in z_indices:
        raise TNError(f"batch index {batch!r} does not reach the layer output")
    group_legs = tuple(i for i in W.occurrence if i in z_indices and i in in_idx)
    out_legs = tuple(i for i in W.occurrence if i in z_indices and i not in in_idx)
    in_legs = tuple(i for i in W.occurrence if i not in z_indices)
    for i in in_legs:
        if i not in in_idx:
            raise TNError(f"axis {i!r} of weight {weight!r} is summed without touching the input side")
    positions = tuple(i for i in z_indices if i != batch and i not in legs)
    z = Product((W, *input_factors), z_indices)
    if output_factors:
        new_P = Product((*output_factors, z), P.indices)
        new_expr = replace(expr, P, new_P)
    else:
        if z_indices != P.indices:  # same index set, P's order
            z = Product((W, *input_factors), P.indices)
        new_expr = replace(expr, P, z) if z != P else expr
    return LayerSplit(P, z, input_factors, output_factors, W, batch, positions, group_legs,
                      out_legs, in_legs, new_expr)


# --------------------------------------------------------------------------------------------
# flavours: kinds (how A is formed and scaled) and Fisher types (how B's vectors are formed)
# --------------------------------------------------------------------------------------------

#: name -> kind, filled when a `KFACKind` subclass is defined
KINDS: dict[str, "KFACKind"] = {}
#: name -> Fisher type, filled when a `FisherType` subclass with a `name` is defined
FISHERS: dict[str, "FisherType"] = {}


def expand_input_factor(X, n, s, positions, groups):
    """A = Σ_{n,pos} X Xᵀ / (N·S) as [*groups, *in, *in'] from the input side X
    [N, *positions, *groups, *in]: one Gram matrix (GEMMs). Uses only torch and math (the
    `tnderive kfac` command copies this source into the module it writes)."""
    lead = 1 + positions
    gshape, ishape = tuple(X.shape[lead:lead + groups]), tuple(X.shape[lead + groups:])
    G, Q = math.prod(gshape), math.prod(ishape)
    if G == 1:
        # Q-major copy [Q, N·S]: an unfolded view's tap axes are innermost, so copying them
        # outermost-first reads memory in order (faster than the [N·S, Q] copy)
        order = tuple(range(lead + groups, X.dim())) + tuple(range(lead + groups))
        XT = X.permute(order).reshape(Q, -1)
        # symmetric: from 3×3 row blocks, the 6 on and above the diagonal (2/3 of the flops;
        # the blocks below are their transposes); it pays above 128 inputs (at 128 the one
        # GEMM is 1.4× faster than six on 43-row blocks, measured on the 2-core CPU)
        if Q <= 128:
            A = (XT @ XT.T).unsqueeze(0)
        else:
            b = -(-Q // 3)
            A = XT.new_empty(Q, Q)
            for i in range(0, Q, b):
                for j in range(i, Q, b):
                    blk = XT[i:i + b] @ XT[j:j + b].T
                    A[i:i + b, j:j + b] = blk
                    if j != i:
                        A[j:j + b, i:i + b] = blk.T
            A = A.unsqueeze(0)
    else:
        Xm = X.reshape(n * s, G, Q)
        A = torch.einsum("mgq,mgr->gqr", Xm, Xm)
    return (A / (n * s)).reshape(*gshape, *ishape, *ishape)


def reduce_input_factor(A, n, s, positions, groups):
    """A = Σ_n (Σ_pos X)(Σ_pos X)ᵀ / (N·S²) from its network's value [*groups, *in, *in'].
    Uses only torch (copied into the `tnderive kfac` module like `expand_input_factor`)."""
    return A / (n * s * s)


class KFACKind:
    """How KFAC treats the weight-sharing positions; defining a subclass registers it.

    name:          the `kind=` / `--kind` value.
    summary:       one line for help texts.
    scaling:       A's normalisation, for reports ("N·S").
    input_factor:  a torch-only function (raw, N, S, #positions, #group legs) -> A
                   [*groups, *in, *in'] with curvlinops' scaling, where raw is the value of
                   `raw_input_expr`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    scaling: ClassVar[str]
    input_factor: ClassVar[Callable[..., torch.Tensor]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        KINDS[cls.name] = cls()

    def input_side(self, s: LayerSplit) -> Product:
        """X: the input side (W removed) as a network, [batch, (positions), *groups, *in]."""
        raise NotImplementedError

    def output_vectors(self, s: LayerSplit, gz: Expr, col: str) -> Expr:
        """The vectors g whose Gram matrix is B, from g[*z.indices, col] at the layer output."""
        raise NotImplementedError

    def raw_input_expr(self, fac: "KFACFactors") -> Expr:
        """The network whose value `input_factor` turns into A."""
        raise NotImplementedError

    def raw_input(self, fac: "KFACFactors", tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The value of `raw_input_expr` at `tensors`."""
        raise NotImplementedError

    def source(self) -> str:
        """The source of `input_factor` (torch-only), for generated modules."""
        return inspect.getsource(type(self).input_factor)


class Expand(KFACKind):
    """KFAC-expand: every non-batch output position is a sample; A from X by one GEMM."""

    name = "expand"
    summary = "every non-batch output position is a sample"
    scaling = "N·S"
    input_factor = staticmethod(expand_input_factor)

    def input_side(self, s):
        return Product(s.input_factors, (s.batch, *s.positions, *s.group_legs, *s.in_legs))

    def output_vectors(self, s, gz, col):
        return gz

    def raw_input_expr(self, fac):
        return fac.input_side_expr

    def raw_input(self, fac, tensors):
        return fac.input_side(**tensors)


class Reduce(KFACKind):
    """KFAC-reduce: positions summed first, inside the network (Π summed over its output index
    for a convolution, so no unfolded input is built); A is one network."""

    name = "reduce"
    summary = "positions summed first"
    scaling = "N·S²"
    input_factor = staticmethod(reduce_input_factor)

    def input_side(self, s):
        return Product(s.input_factors, (s.batch, *s.group_legs, *s.in_legs))

    def output_vectors(self, s, gz, col):
        return Product((gz,), (s.batch, *s.group_legs, *s.out_legs, col))

    def raw_input_expr(self, fac):
        return fac.input_expr

    def raw_input(self, fac, tensors):
        return fac.input_fn(**tensors)


class FisherType:
    """How the output-side vectors of a loss are formed and B is scaled; defining a subclass
    with a `name` registers it.

    name:             the `fisher=` / `--fisher` value.
    summary:          one line for help texts.
    samples_targets:  True when B needs targets drawn at run time (not in generated code).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    samples_targets: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            FISHERS[cls.name] = cls()

    def vectors(self, loss: Loss, model: Expr, col: str) -> Expr:
        """The vectors V[*model.indices, col] at the model output."""
        raise NotImplementedError

    def output_scale(self, loss: Loss, model: Expr) -> sympy.Expr:
        """The factor B is multiplied by (a sympy expression in the size symbols)."""
        return sympy.Integer(1)

    def tensor_sets(self, fac: "KFACFactors", tensors: Mapping[str, torch.Tensor],
                    generator: Optional[torch.Generator]) -> Iterator[Mapping[str, torch.Tensor]]:
        """The tensors B is evaluated at (B is their mean): the given ones."""
        yield tensors


class Type2(FisherType):
    """Type-2 Fisher: the columns of the loss-Hessian square root (B = J_zᵀ H_loss J_z)."""

    name = "type-2"
    summary = "loss-Hessian square root"

    def vectors(self, loss, model, col):
        return loss.hessian_sqrt(model, col)


class _GradientFisher(FisherType):
    """The loss gradient as the one vector (col of size 1); B divided by the loss's reduction
    scale so that it estimates the type-2 factor."""

    def vectors(self, loss, model, col):
        return Product((loss.gradient(model), Delta((col,), 1)), (*model.indices, col))

    def output_scale(self, loss, model):
        return 1 / loss.scale(model)


class MonteCarlo(_GradientFisher):
    """MC Fisher: gradients at `mc_samples` targets sampled from the model's distribution."""

    name = "mc"
    summary = "gradients at sampled targets (Python API only)"
    samples_targets = True

    def tensor_sets(self, fac, tensors, generator):
        model, loss = fac.model, fac.loss
        f_val = evaluate(model, **{k: v for k, v in tensors.items() if k in model.variables})
        cdim = model.indices.index(loss.class_of(model))
        for _ in range(fac.mc_samples):
            yield {**tensors, loss.target: loss.sample_target(f_val, cdim, generator)}


class Empirical(_GradientFisher):
    """Empirical Fisher: gradients at the true targets."""

    name = "empirical"
    summary = "true-target gradients"


def _flavour(table: dict, name: str, what: str):
    """table[name]; TNError naming the known flavours."""
    if name not in table:
        raise TNError(f"{what} must be one of {', '.join(map(repr, table))}, got {name!r}")
    return table[name]


# --------------------------------------------------------------------------------------------
# the factors
# --------------------------------------------------------------------------------------------

@dataclass
class KFACFactors:
    """KFAC factors of one weight as expressions, compiled callables and a `compute` method.

    input_expr:   Σ X Xᵀ (unnormalised), indices [*group legs, *input legs, *input legs']
    output_expr:  Σ g gᵀ (unnormalised), indices [*group legs, *output legs, *output legs']
    bias_input_expr: Σ_{n,pos} X (joint weight+bias blocks), indices [*group legs, *input legs]
    input_side_expr: X itself, [batch, *positions, *group legs, *input legs] (expand) or
                  Σ_pos X, [batch, *group legs, *input legs] (reduce). KFAC-expand computes A in
                  two stages, X by generated code and then one Gram matrix (a single GEMM), which
                  is faster than any single-network contraction order.
    vectors:      the output-side vectors at the expression output ([*expr.indices, col]); a
                  variable (no loss) or the loss-derived expression
    """

    split: LayerSplit
    kind: str
    fisher: str
    loss: Optional[Loss]
    input_expr: Expr
    output_expr: Expr
    vectors: Expr
    backprop: Expr
    bias: Optional[str] = None
    joint: bool = False
    bias_input_expr: Optional[Expr] = None
    vector_name: Optional[str] = None
    mc_samples: int = 1
    input_side_expr: Optional[Expr] = None
    sizes: dict = field(default_factory=dict)
    _fns: dict = field(default_factory=dict, repr=False)
    _counts: dict = field(default_factory=dict, repr=False)
    _views: Optional[bool] = field(default=None, repr=False)  # `uses_views`, once

    # --- metadata ---------------------------------------------------------------------------
    @property
    def weight(self) -> str:
        return self.split.weight.name

    @property
    def model(self) -> Expr:
        return self.split.expr

    @property
    def kind_flavour(self) -> KFACKind:
        """The `KFACKind` object of `kind`."""
        return KINDS[self.kind]

    @property
    def fisher_flavour(self) -> FisherType:
        """The `FisherType` object of `fisher`."""
        return FISHERS[self.fisher]

    def describe(self) -> str:
        s = self.split
        return (f"KFAC-{self.kind} ({self.fisher if self.loss else 'given output-side vectors'}) for "
                f"{self.weight}: A [{','.join(self.input_expr.indices)}], "
                f"B [{','.join(self.output_expr.indices)}]\n  {s.describe()}")

    # --- compiled callables -----------------------------------------------------------------
    def _fn(self, key: str) -> Callable[..., torch.Tensor]:
        if key not in self._fns:
            expr = {"input": self.input_expr, "output": self.output_expr,
                    "bias_input": self.bias_input_expr, "input_side": self.input_side_expr}[key]
            self._fns[key] = compile_expr(expr, f"kfac_{key}_{self.weight}", sizes=self.sizes)
        return self._fns[key]

    @property
    def input_fn(self) -> Callable[..., torch.Tensor]:
        """Compiled Σ X Xᵀ (keyword tensors: the layer's input-side variables)."""
        return self._fn("input")

    @property
    def output_fn(self) -> Callable[..., torch.Tensor]:
        """Compiled Σ g gᵀ (keyword tensors: the vectors / model tensors)."""
        return self._fn("output")

    # --- numbers ----------------------------------------------------------------------------
    def _sizes(self, tensors: Mapping[str, torch.Tensor]) -> dict:
        ctx = self.model
        if self.vector_name:
            ctx = Product((ctx, self.vectors), ())  # bind the vectors' column size too
        return sizes_from(ctx, tensors, self.sizes)

    def counts(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """(N, S): batch size and number of weight-sharing positions (cached per shapes)."""
        key = tuple(sorted((k, tuple(v.shape)) for k, v in tensors.items() if isinstance(v, torch.Tensor)))
        hit = self._counts.get(key)
        if hit is None:
            hit = self._counts[key] = self._count(tensors)
        return hit

    def _count(self, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        sizes = self._sizes(tensors)
        vals = _size_values(sizes)
        zs = self.split.z.sizes

        vec = dict(zip(self.vectors.indices, self.vectors.shape)) if self.vector_name else {}

        def num(index):
            for s in (zs[index], vec.get(index)):  # the layer's size, else the vectors' axis
                if s is None:
                    continue
                v = sympy.sympify(s).xreplace(vals)
                if v.is_number:
                    return int(sympy.floor(v))
            raise TNError(f"cannot determine the size of index {index!r} ({zs[index]}) from the given "
                          f"tensors; pass the weight or the output-side vectors too")

        n = num(self.split.batch)
        s = math.prod(num(p) for p in self.split.positions)
        return n, s

    def uses_views(self) -> bool:
        """True when the expand input side holds convolution constants (patterns, reshapes,
        slices): then it is evaluated with them as strided views, else by generated code."""
        if self._views is None:
            self._views = any(isinstance(f, Constant) and f.kind in ("pattern", "split", "window")
                              for f in self.input_side_expr.walk())
        return self._views

    def input_side(self, **tensors: torch.Tensor) -> torch.Tensor:
        """X = the input side (W removed) evaluated: [batch, *positions, *groups, *in] (expand)."""
        if not self.uses_views():
            return self._fn("input_side")(**tensors)
        used = {k: v for k, v in tensors.items() if k in self.input_side_expr.signature}
        key = ("sizes",) + tuple(sorted((k, tuple(v.shape)) for k, v in tensors.items()
                                        if isinstance(v, torch.Tensor)))
        sizes = self._counts.get(key)
        if sizes is None:
            sizes = self._counts[key] = relevant_sizes(self.input_side_expr, self._sizes(tensors))
        if "input_side_views" not in self._fns:  # bound and lowered once per shapes
            self._fns["input_side_views"] = Prepared(self.input_side_expr)
        return self._fns["input_side_views"](sizes=sizes, **used)

    def input_factor(self, **tensors: torch.Tensor) -> torch.Tensor:
        """A [*groups, *in, *in'] with curvlinops' scaling (1/(N·S) expand, 1/(N·S²) reduce)."""
        n, s = self.counts(tensors)
        kind = self.kind_flavour
        return kind.input_factor(kind.raw_input(self, tensors), n, s, len(self.split.positions),
                                 len(self.split.group_legs))

    def output_factor(self, generator: Optional[torch.Generator] = None,
                      **tensors: torch.Tensor) -> torch.Tensor:
        """B [*groups, *out, *out'] (MC: averaged over `mc_samples` sampled targets)."""
        if self.loss is None:
            return self.output_fn(**tensors)
        fisher = self.fisher_flavour
        B, count = None, 0
        for t in fisher.tensor_sets(self, tensors, generator):
            Bt = self.output_fn(**t)
            B, count = (Bt if B is None else B + Bt), count + 1
        if count > 1:
            B = B / count
        c = fisher.output_scale(self.loss, self.model)
        if c != 1:
            B = B * float(c.xreplace(_size_values(self._sizes(tensors))))
        return B

    def compute(self, generator: Optional[torch.Generator] = None,
                b_factor: Optional[torch.Tensor] = None, a_factor: Optional[torch.Tensor] = None,
                **tensors: torch.Tensor):
        """KronBlock of the weight (joint with the bias if `joint`); with a separate bias a dict
        {weight: KronBlock, bias: KronBlock} is returned. `b_factor` / `a_factor`: B / A when
        the caller has computed them (the values `output_factor` / `input_factor` return)."""
        A = self.input_factor(**tensors) if a_factor is None else a_factor
        B = self.output_factor(generator=generator, **tensors) if b_factor is None else b_factor
        layout = self.layout(tensors)
        G, P, Q = layout.G, layout.P, math.prod(layout.ins)
        Bm = B.reshape(G, P, P)
        Am = A.reshape(G, Q, Q)
        if self.joint:
            n, s = self.counts(tensors)
            cross = self._fn("bias_input")(**tensors).reshape(G, Q) / (n * s)
            one = torch.ones(G, 1, 1, dtype=Am.dtype, device=Am.device)
            Am = torch.cat([torch.cat([Am, cross[:, :, None]], 2),
                            torch.cat([cross[:, None, :], one], 2)], 1)
            return KronBlock(Bm, Am, layout)
        blk = KronBlock(Bm, Am, layout)
        if self.bias is None:
            return blk
        bl = self.bias_layout(tensors)
        eye = torch.ones(G, 1, 1, dtype=Bm.dtype, device=Bm.device)
        return {self.weight: blk, self.bias: KronBlock(Bm, eye, bl)}

    def layout(self, tensors: Mapping[str, torch.Tensor]) -> ParamLayout:
        s = self.split
        W = s.weight
        pos = {i: k for k, i in enumerate(W.occurrence)}
        perm = tuple(pos[i] for i in (*s.group_legs, *s.out_legs, *s.in_legs))
        shape = self._axis_sizes(W, tensors)
        pick = lambda legs: tuple(shape[pos[i]] for i in legs)  # noqa: E731
        bias_shape = bias_perm = None
        if self.joint:
            bias_shape, bias_perm = self._bias_layout(tensors)
        return ParamLayout(tuple(shape), perm, pick(s.group_legs), pick(s.out_legs), pick(s.in_legs),
                           bias_shape, bias_perm)

    def bias_layout(self, tensors: Mapping[str, torch.Tensor]) -> ParamLayout:
        shape, perm = self._bias_layout(tensors)
        s = self.split
        canon = [shape[p] for p in perm]
        g = tuple(canon[:len(s.group_legs)])
        o = tuple(canon[len(s.group_legs):])
        return ParamLayout(tuple(shape), tuple(perm), g, o, ())

    def _bias_layout(self, tensors):
        b = self.model.variables[self.bias]
        occ = _bias_occurrence(self.model, self.bias)
        pos = {i: k for k, i in enumerate(occ)}
        s = self.split
        perm = tuple(pos[i] for i in (*s.group_legs, *s.out_legs))
        return tuple(self._axis_sizes(b, tensors, occ)), perm

    def _axis_sizes(self, var: Variable, tensors, occ=None) -> list[int]:
        t = tensors.get(var.name)
        if t is not None:
            return list(t.shape)
        sizes = self._sizes(tensors)
        vals = _size_values(sizes)
        out = []
        for s in var.axis_shape:
            v = sympy.sympify(s).xreplace(vals)
            if not v.is_number:
                raise TNError(f"cannot determine the shape of {var.name!r}: pass its tensor")
            out.append(int(v))
        return out


def _size_values(sizes: Mapping[str, int]) -> dict:
    """{size symbol: sympy Integer} for `sizes` (name -> int), for `xreplace`."""
    return {size_symbol(k): sympy.Integer(v) for k, v in sizes.items()}


def _bias_occurrence(expr: Expr, name: str) -> tuple:
    occs = {n.occurrence for n in expr.walk() if isinstance(n, Variable) and n.name == name}
    if len(occs) != 1:
        raise TNError(f"bias {name!r} must occur once in the expression (found {len(occs)} index patterns)")
    return next(iter(occs))


def kfac(expr: Expr, weight: str = "W", batch: str = "n", kind: str = "expand",
         fisher: str = "type-2", loss=None, bias: Optional[str] = None, joint: bool = False,
         mc_samples: int = 1, vectors: str = "g", simplify: bool = True,
         sizes: Optional[Mapping[str, int]] = None) -> KFACFactors:
    """KFAC factors of `weight` in `expr` (a layer, or a whole model when `loss` is given).

    kind:    "expand" (every non-batch output position is a sample) or "reduce" (positions
             summed first, inside the network).
    fisher:  "type-2" (loss-Hessian square root), "mc" (sampled targets) or "empirical" (true
             targets); used with `loss`. Without a loss the output-side factor is a function
             of vectors `vectors`[*expr.indices, col] given at the expression's output.
    loss:    a `tnderive.losses.Loss` (or "mse", "ce", "bce", "mse:mean", ...) on `expr`.
    bias:    name of the layer's bias (added to the layer output); `joint=True` treats weight
             and bias as one block (input side augmented with a constant 1).
    sizes:   sizes that no tensor passed to `compute` determines (e.g. a symbolic kernel size
             when the weight itself is not passed), name -> int.
    """
    kind_flavour = _flavour(KINDS, kind, "kind")
    fisher_flavour = _flavour(FISHERS, fisher, "fisher")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise TNError(f"mc_samples must be a positive int, got {mc_samples!r}")
    if joint and bias is None:
        raise TNError("joint=True needs the bias name (bias='b')")
    s = split_layer(expr, weight, batch)
    model = s.expr
    lossobj = as_loss(loss) if loss is not None else None
    if bias is not None:
        if bias not in model.variables:
            raise TNError(f"bias {bias!r} does not occur in the expression")
        occ = _bias_occurrence(model, bias)
        if set(occ) != set(s.group_legs) | set(s.out_legs):
            raise TNError(f"bias {bias!r}[{','.join(occ)}] must have the weight's output/group legs "
                          f"{list(s.group_legs + s.out_legs)}")
    # --- output-side vectors at the expression output ---
    taken = set(model.all_indices)
    col = fresh_name("col", taken)
    vector_name = None
    if lossobj is None:
        vector_name = vectors
        if vector_name in model.variables:
            raise TNError(f"vector name {vector_name!r} is already a variable of the expression")
        # derived sizes (a convolution's output size) become plain symbols so that the vectors'
        # shape binds them (generated code cannot invert floor(...) expressions)
        shape = [n if (n.is_Integer or n.is_Symbol) else size_symbol(i) for i, n in zip(model.indices, model.shape)]
        V = Variable(vector_name, (*model.indices, col), (*model.indices, col), (*shape, _col_size()))
    else:
        V = fisher_flavour.vectors(lossobj, model, col)
    gz = _pullback(model, s.z, V, col)
    # --- the factor networks, each with the signature of the model, loss and vectors ---
    source = _source_signature(expr, model, lossobj, V)
    A, bias_in, X = (with_signature(e, source) for e in _input_side(s, kind_flavour))
    X = maybe_simplify(X, simplify)
    B = with_signature(_output_side(s, gz, col, kind_flavour), source)
    A = maybe_simplify(A, simplify)
    B = maybe_simplify(B, simplify)
    if bias_in is not None:
        bias_in = maybe_simplify(bias_in, simplify)
    return KFACFactors(s, kind, fisher, lossobj, A, B, V, gz, bias, joint,
                       bias_in if joint else None, vector_name, mc_samples, X,
                       dict(sizes or {}))


def _source_signature(expr: Expr, model: Expr, loss: Optional[Loss], vectors: Expr) -> Signature:
    """The tensors every factor accepts: the expression's, the loss target's and the vectors'
    (`Expr.signature`; a factor that no longer uses one still takes it, to bind sizes)."""
    out = expr.signature.merged(vectors.signature)
    if loss is not None:
        out = out.merged(Signature([loss.target_variable(model)]))
    return out


def _col_size():
    return sympy.Symbol("col", integer=True, positive=True)


def _pullback(model: Expr, z: Product, V: Expr, col: str) -> Expr:
    """g[*z.indices, col] = Σ_out V[out, col] ∂model[out]/∂z (z's value substituted back)."""
    if model == z:
        return _rename_to(V, (*z.indices, col)) if V.indices != (*z.indices, col) else V
    zname = fresh_name("Z", set(model.variables))
    Zv = Variable(zname, z.indices, z.indices, z.shape)
    mz = replace(model, z, Zv)
    legs = fresh_names(z.indices, set(mz.all_indices) | set(V.all_indices) | {col})
    J = derivative(mz, zname, legs)
    if isinstance(J, Zero):
        raise TNError("the expression does not depend on the layer output")
    g = Product((V, J), (*legs, col))
    g = substitute(g, zname, z)
    return _rename_to(g, (*z.indices, col))


def _gram(X: Expr, groups: tuple, legs: tuple) -> Product:
    """Σ X Xᵀ: `X` times a copy of itself with `legs` primed, indices [*groups, *legs, *legs']
    (every other index of X is summed)."""
    primed = fresh_names((i + "_" for i in legs), set(X.all_indices))
    return Product((X, rename_free(X, dict(zip(legs, primed)))), (*groups, *legs, *primed))


def _input_side(s: LayerSplit, kind: KFACKind) -> tuple[Expr, Expr, Expr]:
    """(A = Σ X Xᵀ, Σ X for the joint bias block, X) of the layer's input side."""
    X = kind.input_side(s)
    return _gram(X, s.group_legs, s.in_legs), Product((X,), (*s.group_legs, *s.in_legs)), X


def _output_side(s: LayerSplit, gz: Expr, col: str, kind: KFACKind) -> Expr:
    """B = Σ g gᵀ of the output-side vectors g backpropagated to the layer output."""
    return _gram(kind.output_vectors(s, gz, col), s.group_legs, s.out_legs)
