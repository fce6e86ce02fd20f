"""Hessian blocks of a whole transformer stack (`tnderive.nn.transformer.TransformerModel`).

The blocks are derived on the stack's program as statements (`tnderive.network`, the
depth-scaling representation), not on the inlined expression: `parse_network(model.text)`,
one reverse pass for every selected parameter a (adjoint statements shared by all blocks),
then, per distinct b, two forward passes over it (`tnderive.derive.forward` with
`only_through`):

    outer (Gauss-Newton)  J_aᵀ (∂²ℓ/∂P²) J_b : the tangent enters the adjoints only through
                          the loss's own derivative (the "seed" adjoint ∂ℓ/∂P) and flows
                          back through the cotangents, every local Jacobian held constant
                          (`Network.hessian_blocks(part="gauss_newton")`)
    functional            Σ (∂ℓ/∂P)·∂²P/∂a∂b : the seed adjoint held constant, every other
                          statement's tangent taken through all its inputs
    total                 outer + functional = ∂²ℓ/∂a∂b (one statement adding the two)

By linearity of the tangent in the seed the two passes add up to the forward-over-reverse
Hessian (`Network.hessian_blocks`). All parts of all blocks live in one `Network`,
simplified statement by statement; a part evaluates the statements its output needs
(`Network.evaluate`), `HessianBlocks.evaluate_parts` all parts at once.

`gauss_newton` is the same outer part written on the inlined prediction for mse / ce (a
cross-check for the tests).
"""
from __future__ import annotations

import time
from typing import Sequence

from ..derive import derivative, forward, reverse, var_names
from ..errors import TNError
from ..functions import SOFTMAX
from ..ir import Expr, Func, Product, Sum, Zero, scale
from ..network import Network, parse_network
from ..nn.transformer import DATA, TransformerModel
from ..simplify import simplify as simplify_net
from ..statements import Statement
from .parts import Block, HessianBlocks, NetworkPart

def _d(expr: Expr, name: str, legs: Sequence[str], shape: Sequence) -> Expr:
    """derivative(), or the Zero tensor when `name` does not occur in `expr`."""
    if isinstance(expr, Zero) or name not in var_names(expr):
        return Zero(tuple(expr.indices) + tuple(legs), tuple(expr.shape) + tuple(shape))
    return derivative(expr, name, legs)


def _contract(a: Expr, b: Expr, out: Sequence[str]) -> Expr:
    if isinstance(a, Zero) or isinstance(b, Zero):
        sizes = {**dict(zip(a.indices, a.shape)), **dict(zip(b.indices, b.shape))}
        return Zero(tuple(out), tuple(sizes[i] for i in out))
    return Product((a, b), tuple(out))


def gauss_newton(model: TransformerModel, Jp: Expr, Jq: Expr, lp: Sequence[str],
                 lq: Sequence[str]) -> Expr:
    """J_pᵀ Λ J_q for the model's mse / ce criterion (Λ = ∂²ℓ/∂P², block-diagonal over t)."""
    P, crit = model.prediction, model.criterion
    t, c = P.indices
    s = crit.scale(P)
    out = tuple(lp) + tuple(lq)
    if crit.kind == "mse":
        return scale(_contract(Jp, Jq, out), 2 * s)
    if crit.kind != "ce":
        raise TNError(f"stack Hessian blocks support mse and ce losses, not {crit.kind!r}")
    pi = Func(SOFTMAX, P, c)
    if isinstance(Jp, Zero) or isinstance(Jq, Zero):
        return _contract(Jp, Jq, out)
    diag = Product((pi, Jp, Jq), out)
    mp = Product((pi, Jp), (t,) + tuple(lp))
    mq = Product((pi, Jq), (t,) + tuple(lq))
    return scale(Sum(((1, diag), (-1, Product((mp, mq), out))), out), s)


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def split_network(net: Network, pairs: Sequence[tuple[str, str]]
                  ) -> tuple[Network, dict[tuple[str, str], dict[str, str]]]:
    """One network computing the outer, functional and total part of every block (a, b) of
    `net`'s scalar output (see the module docstring). Returns the network (outputs: every
    part's statement) and {(a, b): {"outer": name, "functional": name, "total": name}};
    each part is laid out like `tnderive.hessian(expr, a, b)`. Unsimplified."""
    grads: dict[str, str] = {}
    roles: dict[str, str] = {}
    rev = reverse(net, [a for a, _ in pairs], grads, roles)
    through = {"outer": {}, "functional": {}}
    for st in rev.statements:
        role = roles.get(st.name)
        if role in ("adjoint", "gradient"):
            through["outer"][st.name] = frozenset(r for r in rev.refs(st.name) if r in roles)
        elif role == "seed":
            through["functional"][st.name] = frozenset()
    statements = list(rev.statements)
    taken = set(rev.names) | set(net.signature)
    names: dict[tuple[str, str], dict[str, str]] = {pair: {} for pair in pairs}
    signature = net.signature
    for b in dict.fromkeys(b for _, b in pairs):
        wanted = list(dict.fromkeys(grads[a] for a, bb in pairs if bb == b))
        for kind in ("outer", "functional"):
            found: dict[str, str] = {}
            fwd = forward(rev.rebuilt(statements, wanted), b, names=found, var=signature[b],
                          only_through=through[kind])
            statements += [s for s in fwd.statements if s.name not in taken]
            taken |= set(fwd.names)
            for a, bb in pairs:
                if bb == b:
                    names[a, b][kind] = found[grads[a]]
    by_name = {s.name: s for s in statements}
    for (a, b), parts in names.items():
        o, f = by_name[parts["outer"]], by_name[parts["functional"]]
        idx = o.indices
        expr = Sum(((1, o.reference()), (1, f.reference())), idx)
        total = Statement(_fresh(f"H_{a}_{b}", taken), expr)
        statements.append(total)
        parts["total"] = total.name
    outputs = [n for parts in names.values() for n in parts.values()]
    return net.rebuilt(statements, outputs).pruned(), names


def _in_scores(net: Network, p: str) -> bool:
    """Whether parameter p enters a softmax argument (the attention scores) of the network."""
    deps = net.depending_on(p) | {p}
    return any(var_names(f.arg) & deps for s in net.statements for f in s.expr.walk()
               if isinstance(f, Func) and f.fn is SOFTMAX)


def stack_blocks(model: TransformerModel, params: Sequence[str] | str | None = None,
                 simplify: bool = True, upper: bool = True,
                 include_X: bool = False) -> HessianBlocks:
    """Every block (p, q) of the stack's Hessian for the selected parameters (fnmatch
    patterns over torch-style or variable names), each with outer / functional / total parts,
    derived on the stack's network (see the module docstring). upper: only p ≤ q in model
    order (the lower blocks are transposes). simplify: `tnderive.simplify` statement by
    statement (default; cheap on a network)."""
    names = model.select(params)
    if include_X and DATA not in names:
        names = names + (DATA,)
    t0 = time.perf_counter()
    net = parse_network(model.text)
    pairs = [(p, q) for i, p in enumerate(names) for j, q in enumerate(names)
             if not (upper and j < i)]
    derived, part_names = split_network(net, pairs)
    t_derive = time.perf_counter() - t0
    t0 = time.perf_counter()
    if simplify:
        derived = simplify_net(derived)
    t_simp = time.perf_counter() - t0
    in_T = {p: _in_scores(net, p) for p in names}
    shapes = model.variables
    out = HessianBlocks()
    for p, q in pairs:
        o1 = int(in_T[p] or in_T[q])
        o2 = 2 if (in_T[p] and in_T[q]) else o1
        parts = [NetworkPart(kind, derived, part_names[p, q][kind], order) for kind, order in
                 (("outer", o1), ("functional", o2), ("total", o2))]
        idx = derived[part_names[p, q]["total"]].indices
        shape = tuple(shapes[p].axis_shape) + tuple(shapes[q].axis_shape)
        out[p, q] = Block(p, q, *parts, idx, shape)
    out.params = names
    out.seconds = {"derive": t_derive, "simplify": t_simp}
    out.simplifier = "tnderive.simplify (per statement)" if simplify else "none"
    out.model = model
    out.network = derived
    return out
