"""Hessian blocks of a self-attention loss, split into Gauss-Newton and functional parts.

`hessian_blocks(model, params=("WQ", "WK", "WV"))` returns every block (p_i, p_j) as three
expressions with indices [p_i's axes, p_j's axes] (torch.func.hessian layout):

    outer       H_o = J_pᵀ (∂²ℓ/∂P²) J_q        J_p = ∂P/∂p (derivative of the prediction)
    functional  H_f = Σ_f (∂ℓ/∂P)[f] · ∂²P[f]/∂p∂q
    total       H   = ∂²ℓ/∂p∂q                  (derived directly; H = H_o + H_f)

The split is `tnderive.curvature.hessian_split`: of an `AttentionModel`'s loss object on its
prediction P (the layer output F, or the read-out F·WR for cross-entropy), or, for a plain
expression, of the loss written on a placeholder for the output F (`ExpressionLoss`).
`substitute` is `tnderive.curvature.substitute` (re-exported).

A `TransformerModel` (tnderive.nn.transformer, a whole stack) goes to `stack.stack_blocks`:
the same three parts per block, derived on the stack's program as a `tnderive.network`
(statements kept, adjoints shared), parameters chosen by fnmatch patterns over torch-style
names, simplified statement by statement.

Each part carries its structure report (`BlockPart.structure`, see `structure.py`) and its
generated code (`BlockPart.program()`: `tnderive.compile`, which lowers a large sum of
products term by term with the output-carrying factors hoisted out of the sum).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from ..curvature import ExpressionLoss, _rename_to, hessian_split, substitute  # noqa: F401  (re-exported)
from ..derive import derivative, var_names
from ..errors import TNError
from ..ir import Expr, Func, Zero, fresh_names
from ..simplify import simplify as simplify_expr
from ..nn.transformer import TransformerModel
from .stack import stack_blocks
from .parts import Block, BlockPart, HessianBlocks  # noqa: F401  (re-exported)
from .structure import DATA


def _simplifier(choice) -> tuple[Callable[[Expr], Expr], str]:
    if callable(choice):
        return choice, getattr(choice, "__name__", "custom")
    if not choice:
        return (lambda e: e), "none"
    return simplify_expr, "tnderive.simplify"


def hessian_blocks(loss, params: Sequence[str] | None = None, include_X: bool = False,
                   simplify=None, output: Expr | None = None, loss_of_output: Expr | None = None,
                   output_name: str = "F", upper: bool = False) -> HessianBlocks:
    """Every Hessian block of `loss` for `params` (default the model's W_Q, W_K, W_V; with
    `include_X` also the data X), split into outer-product and functional parts.

    loss: an `AttentionModel` (tnderive.nn.self_attention) or a scalar expression. For a plain
          expression give `output` (the network output F) and `loss_of_output` (the loss written
          on a placeholder variable `output_name` with F's indices) to get the split; without
          them only the total blocks are derived.
    simplify: True (tnderive.simplify), False, or a callable; default True (for a
              TransformerModel: per statement of its network; False skips it).
    upper: derive only blocks (p_i, p_j) with i ≤ j.

    A `TransformerModel` (tnderive.nn.transformer) takes `params` as fnmatch patterns over its
    torch-style names ("*.q.weight", "b1.*") or variable names; default all its parameters.
    Its blocks are built by `stack.stack_blocks` on the stack's network (forward over
    reverse: the Gauss-Newton part through the loss's seed adjoint, the functional part
    through everything else, total = their sum; one shared network for all blocks).
    """
    if isinstance(loss, TransformerModel):
        return stack_blocks(loss, params, simplify=simplify is not False, upper=upper,
                            include_X=include_X)
    if simplify is None:
        simplify = True
    model = None
    if hasattr(loss, "loss_of_output"):
        model = loss
        output, loss_of_output, output_name = model.output, model.loss_of_output, model.output_name
        loss = model.loss
        if params is None:
            params = tuple(p for p in model.params if p != "WO")
    if not isinstance(loss, Expr):
        raise TNError(f"hessian_blocks expects an AttentionModel or an expression, got {type(loss).__name__}")
    if loss.indices:
        raise TNError(f"hessian_blocks needs a scalar loss; this one has free indices {list(loss.indices)}")
    if params is None:
        params = tuple(n for n in ("WQ", "WK", "WV") if n in loss.variables)
    params = tuple(params)
    if include_X and DATA not in params:
        params = params + (DATA,)
    variables = loss.variables
    for p in params:
        if p not in variables:
            raise TNError(f"parameter {p!r} does not occur in the loss (variables: {list(variables)})")
    split = output is not None and loss_of_output is not None
    if split:
        if output_name not in loss_of_output.variables:
            raise TNError(f"loss_of_output does not use the placeholder {output_name!r}")
        for p in params:
            if p in var_names(loss_of_output):
                raise TNError(f"parameter {p!r} enters the loss outside the output {output_name!r}; "
                              f"the Gauss-Newton split needs it only inside the output")
    simp, simp_name = _simplifier(simplify)
    shp = {p: variables[p].axis_shape for p in params}
    t0 = time.perf_counter()
    taken = set(loss.all_indices)
    if split:
        taken |= set(output.all_indices) | set(loss_of_output.all_indices)
    legs = {p: fresh_names(variables[p].axes, taken) for p in params}
    # a second set of legs for the diagonal blocks (p, p)
    legs2 = {p: fresh_names(variables[p].axes, taken) for p in params}
    if split:
        # the Gauss-Newton split of curvature.hessian_split: the model's loss on its prediction,
        # or the loss written on the output's placeholder
        prediction, criterion = ((model.prediction, model.criterion) if model is not None else
                                 (output, ExpressionLoss(loss_of_output, output_name)))
        softmax_args = [n.arg for n in output.walk()
                        if isinstance(n, Func) and getattr(n.fn, "name", "") == "softmax"]
        # the scores T: the softmax argument, or the model's scores (linear attention)
        score_nodes = softmax_args or ([model.scores] if model is not None else [])
        in_T = {p: any(p in var_names(a) for a in score_nodes) for p in params}
        has_softmax = bool(softmax_args)
    t_derive = time.perf_counter() - t0
    out = HessianBlocks()
    t_simp = 0.0
    for i, p in enumerate(params):
        for j, q in enumerate(params):
            if upper and j < i:
                continue
            lp, lq = legs[p], (legs2[q] if q == p else legs[q])
            t0 = time.perf_counter()
            total = _deriv(_deriv(loss, p, lp, shp[p]), q, lq, shp[q])
            outer = functional = None
            if split:
                outer, functional = (_rename_to(e, lp + lq) for e in
                                     hessian_split(prediction, criterion, p, q, simplify=False))
            t_derive += time.perf_counter() - t0
            t0 = time.perf_counter()
            total = simp(total)
            if split:
                outer = simp(outer)
                functional = simp(functional)
            t_simp += time.perf_counter() - t0
            if split:
                sp, sq = in_T[p], in_T[q]
                o1 = int((sp or sq) and has_softmax)
                second_T = False
                if sp and sq:
                    for a in score_nodes:
                        dT = _deriv(a, p, lp, shp[p])
                        if q in var_names(dT) and not isinstance(_deriv(dT, q, lq, shp[q]), Zero):
                            second_T = True
                parts_o = BlockPart("outer", outer, o1, False)
                parts_f = BlockPart("functional", functional,
                                    2 if (sp and sq and has_softmax) else o1, second_T)
                parts_t = BlockPart("total", total, max(parts_f.softmax_order, o1), second_T)
            else:
                parts_o = parts_f = None
                parts_t = BlockPart("total", total, 0, False)
            out[p, q] = Block(p, q, parts_o, parts_f, parts_t, lp + lq, tuple(total.shape))
    out.params = params
    out.seconds = {"derive": t_derive, "simplify": t_simp}
    out.simplifier = simp_name
    out.model = model
    return out


def _deriv(expr: Expr, name: str, legs: Sequence[str], shape: Sequence | None = None) -> Expr:
    """derivative(), but the Zero tensor when `name` does not occur in `expr` (`shape`: the
    variable's axis sizes, for the new legs)."""
    if name in var_names(expr):
        return derivative(expr, name, legs)
    if shape is None:
        raise TNError(f"variable {name!r} does not occur in the expression")
    return Zero(tuple(expr.indices) + tuple(legs), tuple(expr.shape) + tuple(shape))


def structure_seconds(blocks: HessianBlocks) -> float:
    """Expand and analyse every part (timed; monomials are cached on the parts)."""
    t0 = time.perf_counter()
    for b in blocks.values():
        for part in b.parts().values():
            part.structure
    return time.perf_counter() - t0
