"""Derived networks of a model program, statement by statement (reverse mode over the program).

For each statement `t = F(inputs)` of a `Model` and each *active* input a (a selected
parameter, or an activation that depends on one) tnderive derives, once per input shape:

    vjp_a      v ↦ (∂F/∂a)ᵀ v                      (tnderive.vjp; backward pass)
    jvp_a      ȧ ↦ (∂F/∂a) ȧ                        (tnderive.jvp; tangent pass)
    vjp_a_b    ḃ ↦ ∂/∂b [(∂F/∂a)ᵀ v] ḃ              (jvp of the vjp; Hessian only)

each compiled with `tnderive.compile`. A matvec then runs the forward statements once and
shares every activation, tangent and adjoint across all parameter blocks.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from ..codegen import compile as tn_compile
from ..derive import grad, jvp, vjp
from ..ir import Expr, Variable, Zero
from ..losses import Loss
from ..models.model import Model
from ..notation import parse
from ..simplify import simplify

COT = "cotangent_"


def _tangent(name: str) -> str:
    return f"tangent_{name}"


def _fn(expr: Expr, name: str) -> Callable | None:
    """The derived network simplified (patterns become views, deltas go) and compiled; None
    when it is zero."""
    expr = simplify(expr)
    return None if isinstance(expr, Zero) else tn_compile(expr, name)


class DerivedProgram:
    """The compiled statement derivatives of `model` for parameters `active_params`
    (notation names), plus the loss's gradient and Hessian-vector product on the output."""

    def __init__(self, model: Model, active_params: Sequence[str], loss: Loss, second_order: bool):
        self.model = model
        self.second_order = second_order
        active = set(active_params)
        self.plan: list[tuple[int, list[str]]] = []     # statement, its active inputs
        self.vjp: dict[tuple[int, str], Callable | None] = {}
        self.jvp: dict[tuple[int, str], Callable | None] = {}
        self.vjp2: dict[tuple[int, str, str], Callable | None] = {}
        for j, st in enumerate(model.statements):
            ins = [a.name for a in st.uses if a.name in active]
            if not ins:
                continue
            active.add(st.target.name)
            self.plan.append((j, ins))
            expr = parse(st.text())
            for a in ins:
                self.jvp[j, a] = _fn(jvp(expr, a, _tangent(a)), f"jvp_{a}")
                back = vjp(expr, a, COT)
                self.vjp[j, a] = _fn(back, f"vjp_{a}")
                if second_order:
                    for b in ins:
                        self.vjp2[j, a, b] = _fn(jvp(back, b, _tangent(b)), f"vjp_{a}_{b}")
        out = model.output
        f = Variable("F", tuple(f"f{k}" for k in range(out.ndim)), shape=out.shape)
        value = loss.expr(f)
        g = grad(value, "F")
        self.loss_value = tn_compile(value, "loss")
        self.loss_grad = tn_compile(g, "loss_grad")
        self.loss_hvp = tn_compile(jvp(g, "F", "dF"), "loss_hvp")
        self.target_name = loss.target_variable(f).name

    # ------------------------------------------------------------------------------------
    def _call(self, fn: Callable, j: int, env: Mapping, **extra) -> torch.Tensor:
        st = self.model.statements[j]
        return fn(**{a.name: env[a.name] for a in st.uses}, **extra)

    def tangents(self, env: Mapping, v: Mapping[str, torch.Tensor]) -> dict:
        """J v for every active name (parameters' tangents given by v)."""
        dot = dict(v)
        for j, ins in self.plan:
            total = None
            for a in ins:
                fn = self.jvp[j, a]
                if fn is None or a not in dot:
                    continue
                t = self._call(fn, j, env, **{_tangent(a): dot[a]})
                total = t if total is None else total + t
            if total is not None:
                dot[self.model.statements[j].target.name] = total
        return dot

    def backward(self, env: Mapping, cot_out: torch.Tensor, params: Sequence[str],
                 dot: Mapping | None = None, dcot_out: torch.Tensor | None = None) -> dict:
        """Adjoints of `params` for the output cotangent `cot_out` (Jᵀ u). With tangents
        `dot` and `dcot_out`, returns the tangents of the adjoints instead (forward over
        reverse: the Hessian-vector product)."""
        out = self.model.output.name
        bar = {out: cot_out}
        dbar = {out: dcot_out} if dot is not None else None
        for j, ins in reversed(self.plan):
            name = self.model.statements[j].target.name
            if name not in bar:
                continue
            for a in ins:
                fn = self.vjp[j, a]
                if fn is None:
                    continue
                _add(bar, a, self._call(fn, j, env, **{COT: bar[name]}))
                if dbar is None:
                    continue
                if name in dbar:
                    _add(dbar, a, self._call(fn, j, env, **{COT: dbar[name]}))
                for b in ins:
                    fn2 = self.vjp2[j, a, b]
                    if fn2 is not None and b in dot:
                        _add(dbar, a, self._call(fn2, j, env, **{COT: bar[name],
                                                                 _tangent(b): dot[b]}))
        src = bar if dbar is None else dbar
        return {p: src.get(p) for p in params}


def _add(table: dict, key: str, value: torch.Tensor) -> None:
    table[key] = value if key not in table else table[key] + value
