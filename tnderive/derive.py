"""Symbolic differentiation of tensor networks.

`derivative(expr, name, legs)` is d expr / d name with one new free index per axis of the
variable appended after `expr.indices` (legs given by name). `grad`, `hessian`, `jvp` and
`vjp` are built on it. Rules:

  * variable:  dW[a,b]/dW[a',b'] = δ(a,a')·δ(b,b')  (every occurrence, whatever its index names)
  * product:   Σ over factors containing the variable (product rule), other factors untouched
  * sum:       linear, coefficients kept
  * f(z):      f'(z)[I] · dz[I,new]          (Hadamard over I: copy tensors, implicit)
  * softmax:   p·dz − p·Σ_k' p[k'] dz[k']    (diag(p) − p pᵀ applied to dz)
  * logsumexp: Σ_k softmax(z)[k] dz[k]

Programs (`tnderive.Network`, a list of named statements): `reverse` appends adjoint
statements (reverse mode), `forward` tangent statements (forward mode), `hessian_blocks`
composes them (forward over reverse); each statement is differentiated on its own with
`derivative`, so the derived program grows linearly with depth. `grad`/`hessian` accept a
program and use them.

The results are not simplified; call `tnderive.simplify`. Derivatives of shared sub-networks
are memoised per (node, variable, legs). Every result keeps the signature of its source
(`Expr.signature`): the tensors that evaluate `expr` evaluate its derivatives.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Mapping, Sequence

from .errors import TNError
from .functions import SOFTMAX, Elementwise
from .ir import (Constant, Delta, Expr, Func, Product, Sum, Variable, Zero, fresh_name,
                 fresh_names, rename_free, scale, with_signature)
from .statements import Statement, Statements


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def grad(expr: Expr | Statements, name: str) -> Expr | Statements:
    """d expr / d `name`: free indices are `expr.indices` followed by one leg per axis of the
    variable, named after its declared axes (suffixed with '_' until unique).

    For a program (`tnderive.Network`): reverse mode, the program followed by one adjoint
    statement per statement between `name` and the output (`dX3`, linear in depth) and the
    gradient statement `d<name>` (the new output); see `reverse`."""
    if isinstance(expr, Statements):
        return reverse(expr, [name])
    var = _variable(expr, name)
    legs = new_leg_names(expr, var)
    return derivative(expr, name, legs)  # keeps expr's signature


def hessian(expr: Expr | Statements, a: str, b: str | None = None) -> Expr | Statements:
    """Second derivative d²expr / d`a` d`b` (b defaults to a). For a scalar the indices are
    a's axes then b's axes — the layout of `torch.func.hessian(f, argnums=(a, b))[a][b]`.

    For a program: forward over reverse (`hessian_blocks(program, [(a, b)])`): the output
    statement `d<a>_d<b>` is the block."""
    b = a if b is None else b
    if isinstance(expr, Statements):
        return hessian_blocks(expr, [(a, b)])
    va, vb = _variable(expr, a), _variable(expr, b)
    legs_a = new_leg_names(expr, va)
    first = derivative(expr, a, legs_a)
    legs_b = fresh_names(vb.axes, set(first.all_indices) | set(legs_a))
    return derivative(first, b, legs_b, var=vb)  # `first` carries expr's signature


def jvp(expr: Expr, name: str, tangent: str | None = None) -> Expr:
    """Directional derivative Σ_w d expr/d W[w] · V[w] with a new variable V (default name
    `d<name>`, same axes and sizes as W). Indices: `expr.indices`."""
    var = _variable(expr, name)
    tangent = tangent or _fresh_var_name("d" + name, expr)
    if tangent in expr.signature:
        raise TNError(f"tangent name {tangent!r} is already a tensor of the expression's "
                      f"signature ({expr.signature})")
    legs = new_leg_names(expr, var)
    d = derivative(expr, name, legs)
    v = Variable(tangent, var.axes, legs, var.axis_shape)
    if isinstance(d, Zero):
        return with_signature(Zero(expr.indices, expr.shape), expr, v)
    return with_signature(Product((d, v), expr.indices), expr)


def vjp(expr: Expr, name: str, cotangent: str | None = None) -> Expr:
    """Σ_out U[out] · d expr[out] / d W with a new variable U (default name `v`, axes and sizes
    of `expr.indices`). Indices: the variable's declared axes."""
    var = _variable(expr, name)
    cotangent = cotangent or _fresh_var_name("v", expr)
    if cotangent in expr.signature:
        raise TNError(f"cotangent name {cotangent!r} is already a tensor of the expression's "
                      f"signature ({expr.signature})")
    legs = new_leg_names(expr, var)
    d = derivative(expr, name, legs)
    u = Variable(cotangent, expr.indices, expr.indices, expr.shape) if expr.indices else None
    if isinstance(d, Zero):
        return with_signature(Zero(var.axes, var.axis_shape), expr, *([u] if u else []))
    out = Product((u, d), legs) if u is not None else d
    return with_signature(rename_free(out, dict(zip(legs, var.axes))), expr)


def derivative(expr: Expr, name: str, legs: Sequence[str], var: Variable | None = None) -> Expr:
    """d expr / d `name` with the new legs named `legs` (one per axis of the variable).
    `legs` must not be used anywhere in `expr`. Pass `var` (an occurrence of the variable) to
    differentiate an expression where it may no longer occur (the result is then Zero)."""
    if var is None or name in expr.variables:
        var = _variable(expr, name)
    legs = tuple(legs)
    if len(legs) != len(var.axes):
        raise TNError(f"variable {name!r} has {len(var.axes)} axes {list(var.axes)}; got legs {list(legs)}")
    clash = set(legs) & set(expr.all_indices)
    if clash or len(set(legs)) != len(legs):
        raise TNError(f"derivative legs {list(legs)} clash with indices of the expression: {sorted(clash)}")
    shapes = var.axis_shape
    d = _d(expr, name, legs, shapes)
    if d is None:
        sizes = dict(zip(expr.indices, expr.shape))
        d = Zero(expr.indices + legs, [sizes[i] for i in expr.indices] + list(shapes))
    return with_signature(d, expr)


def new_leg_names(expr: Expr, var: Variable) -> tuple[str, ...]:
    """Names for derivative legs: the variable's axis names, '_'-suffixed until unique."""
    return fresh_names(var.axes, set(expr.all_indices))


# --------------------------------------------------------------------------------------------
# programs: reverse mode (adjoint statements) and forward mode (tangent statements)
# --------------------------------------------------------------------------------------------

def adjoint_name(name: str) -> str:
    """The adjoint (gradient) statement of statement or tensor `name`: `d<name>`."""
    return "d" + name


def tangent_name(name: str, wrt: str) -> str:
    """The tangent statement of `name` in direction `wrt`: `<name>_d<wrt>` (with a tangent
    tensor V instead of a Jacobian: `<name>_<V>`)."""
    return f"{name}_d{wrt}"


def _leaf(program: Statements, name: str) -> Variable:
    sig = program.signature
    if name not in sig:
        what = "a statement, not an input tensor" if name in program else "not an input tensor"
        raise TNError(f"cannot differentiate with respect to {name!r}: it is {what} of the "
                      f"network (inputs: {sig})")
    return sig[name]


def _fresh_statement(base: str, taken: set[str]) -> str:
    """`fresh_name(base, taken)`, added to `taken`."""
    name = fresh_name(base, taken)
    taken.add(name)
    return name


def _chain_term(expr: Expr, wrt: str, wrt_axes: tuple[str, ...], out: tuple[str, ...],
                before: Variable | None, after: Variable | None) -> Expr | None:
    """One chain-rule term of statement `expr` through its input `wrt`, or None when zero.

    J = d expr[I] / d wrt[legs]. Reverse (`before`, the cotangent dS[O, I] of this
    statement): Σ_I dS[O, I]·J[I, legs]; output (neither): J itself. Forward (`after`, the
    tangent tW[axes, B] of `wrt`): Σ_legs J[I, legs]·tW[legs, B]. The free indices of the
    result are renamed to `out` (O + wrt_axes, resp. I + B)."""
    legs = fresh_names(wrt_axes, set(expr.all_indices))
    j = derivative(expr, wrt, legs)
    if isinstance(j, Zero):
        return None
    taken = set(j.all_indices) | set(legs) | set(out)
    if before is not None:  # reverse: contract the cotangent over the statement's indices
        k = len(before.axes) - expr.rank
        lead = fresh_names(before.axes[:k], taken)
        cot = before.with_indices(lead + expr.indices)
        now = lead + legs
        term = _spread(j, lambda t: Product((cot, t), now), now)
    elif after is not None:  # forward: contract the tangent over the input's axes
        extra = fresh_names(after.axes[len(wrt_axes):], taken)
        tan = after.with_indices(legs + extra)
        now = expr.indices + extra
        term = _spread(j, lambda t: Product((t, tan), now), now)
    else:
        term, now = j, expr.indices + legs
    return rename_free(term, dict(zip(now, out)))


def _spread(j: Expr, contract, indices: tuple[str, ...]) -> Expr:
    """`contract(j)` with the contraction taken into each term of the sums at the top of `j`
    (coefficients multiplied out), so each term's copy tensors meet the factor they rename:
    the local rules then remove them without distributing anything else."""
    terms: list[tuple[object, Expr]] = []
    stack = [(1, j)]
    while stack:
        c, e = stack.pop()
        if isinstance(e, Sum):
            stack.extend((c * k, t) for k, t in reversed(e.terms))
        else:
            terms.append((c, contract(e)))
    if len(terms) == 1 and terms[0][0] == 1:
        return terms[0][1]
    return Sum(terms, indices)


def _total(terms: list[Expr], indices: tuple[str, ...]) -> Expr | None:
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else Sum(((1, t) for t in terms), indices)


def reverse(program: Statements, params: Sequence[str], names: dict[str, str] | None = None,
            roles: dict[str, str] | None = None) -> Statements:
    """Reverse-mode derivative of a program's single output with respect to the input
    tensors `params`, as a longer program.

    Appended: one adjoint statement `dS[O, I]` = d output[O] / d S[I] for each statement S
    that depends on a parameter and that the output depends on (O: the output's indices,
    none for a scalar loss), built from each consumer's local derivative (`derivative` of one
    small statement, contracted with the consumer's adjoint) and summed over consumers; then
    one gradient statement `d<param>[O, axes]` per parameter. Each statement is derived once,
    so the result grows linearly with depth. The outputs of the result are the gradient
    statements (layout: the output's indices, then the parameter's axes, as `grad`).
    Unsimplified, like `grad`; `tnderive.simplify` simplifies each statement locally.
    `names` receives param -> gradient statement name; `roles` receives each new statement's
    role: "seed" (an adjoint fed only by the output statement: the loss's own derivative),
    "adjoint" (any other adjoint), "gradient"."""
    out = program.output
    params = list(dict.fromkeys(params))
    leaves = {p: _leaf(program, p) for p in params}
    active: set[str] = set()
    for p in params:
        active |= program.depending_on(p)
    active &= program.needed()
    taken = set(program.names) | set(program.signature)
    o_idx, o_shape = out.expr.indices, out.expr.shape
    consumers = program.consumers()
    adjoint: dict[str, Statement] = {}

    def gradient_of(name: str, axes: tuple[str, ...], users: list[str]) -> Expr | None:
        lead = fresh_names(o_idx, set(axes))
        terms = []
        for user in users:
            expr = program[user].expr
            if user == out.name:
                terms.append(_chain_term(expr, name, axes, lead + axes, None, None))
            elif user in adjoint:
                cot = adjoint[user]
                terms.append(_chain_term(expr, name, axes, lead + axes, cot.reference(), None))
        return _total(terms, lead + axes)

    for s in reversed(program.statements):
        if s.name not in active or s.name == out.name:
            continue
        users = [u for u in consumers[s.name] if u in active]
        expr = gradient_of(s.name, s.indices, users)
        if expr is not None:
            adjoint[s.name] = Statement(_fresh_statement(adjoint_name(s.name), taken), expr)
            if roles is not None:
                seed = users == [out.name]
                roles[adjoint[s.name].name] = "seed" if seed else "adjoint"
    new = [adjoint[s.name] for s in reversed(program.statements) if s.name in adjoint]
    outputs = []
    for p in params:
        var = leaves[p]
        users = [s.name for s in program.statements
                 if s.name in active and p in program.leaves(s.name)]
        expr = gradient_of(p, var.axes, users)
        lead = fresh_names(o_idx, set(var.axes))
        if expr is None:
            expr = Zero(lead + var.axes, tuple(o_shape) + tuple(var.axis_shape))
        st = Statement(_fresh_statement(adjoint_name(p), taken), with_signature(expr, var))
        new.append(st)
        outputs.append(st.name)
        if names is not None:
            names[p] = st.name
        if roles is not None:
            roles[st.name] = "gradient"
    return program.rebuilt(program.statements + tuple(new), outputs).pruned()


def forward(program: Statements, param: "str | Mapping[str, str]", tangent: str | None = None,
            names: dict[str, str] | None = None, var: Variable | None = None,
            only_through: dict[str, frozenset[str]] | None = None) -> Statements:
    """Forward-mode derivative of a program's outputs with respect to input tensor `param`.

    Appended: one tangent statement `S_d<param>[I, B]` = d S[I] / d param[B] per statement
    that depends on `param` and that an output needs (B: the parameter's axes, renamed apart
    from I), each from its own local derivative and the tangents of its inputs. With
    `tangent` (the name of a new input tensor V shaped like the parameter) the tangents are
    directional, `S_<V>[I]` = Σ_B dS[I]/dparam[B]·V[B] (a Jacobian-vector product).
    The outputs become the outputs' tangents (zero ones included), in order; `names`
    receives output -> tangent statement name. Applied to `reverse(...)` it gives Hessian
    blocks (forward over reverse), so all blocks of P parameters cost O(P·depth)
    statements. `var`: the parameter's declaration when `program` may no longer use it
    (a derived program): its tangents are then zero. `only_through`: statement name -> the
    inputs (statements or `param`) its tangent is taken through; the others are held
    constant (a partial derivative: the Gauss-Newton part of `hessian_blocks`).

    Several directions at once: `param` a mapping {parameter: tangent tensor name}; each
    statement gets ONE tangent `S_<tangent>[I]` = Σ_p Σ_B dS[I]/dp[B]·V_p[B] (`tangent`
    names the combined direction, default "dir"; `var` is then unused: every parameter
    is an input of the program or of its source)."""
    seeds, tangent = _seeds(program, param, tangent, var)
    taken = set(program.names) | set(program.signature)
    new, found = tangent_statements(program, seeds, tangent, program.outputs, taken, only_through)
    if names is not None:
        names.update(found)
    return program.rebuilt(program.statements + tuple(new), list(found.values())).pruned()


Seed = tuple[str, Variable, "str | None"]  # (parameter, its declaration, tangent tensor name)


def _seeds(program: Statements, param: "str | Mapping[str, str]", tangent: str | None,
           var: Variable | None) -> tuple[list[Seed], str | None]:
    """`forward`'s directions as (parameter, declaration, tangent tensor or None) and the
    name of the tangent (None: a Jacobian; several directions: default "dir")."""
    if isinstance(param, str):
        if var is None or param in program.signature:
            var = _leaf(program, param)
        return [(param, var, tangent)], tangent
    if not param:
        raise TNError("forward: give at least one (parameter, tangent) pair")
    bad = [p for p, t in param.items() if not isinstance(t, str)]
    if bad:
        raise TNError(f"forward: the direction of {bad[0]!r} needs a tangent tensor name")
    return [(p, _leaf(program, p), t) for p, t in param.items()], tangent or "dir"


def tangent_statements(program: Statements, seeds: Sequence[Seed], tangent: str | None,
                       outputs: Sequence[str], taken: set[str],
                       only_through: dict[str, frozenset[str]] | None = None,
                       tangents: dict[str, Statement] | None = None
                       ) -> tuple[list[Statement], dict[str, str]]:
    """The statements `forward` appends for the outputs `outputs` of `program`, named apart
    from `taken` (which receives the new names), without building the derived program: a
    caller running many passes over one program (one per Hessian-block column) keeps its
    statements instead of rebuilding (and re-checking) the whole program for every pass.
    Returns the new statements in order and output -> its tangent statement's name.

    tangents: statement name -> its tangent statement, derived already (by an earlier pass in
    the same direction whose tangent of that statement is the same: the caller vouches for
    it) and used as it is; receives this pass's new tangent statements."""
    directional = tangent is not None
    seed_vars: dict[str, Variable | None] = {}
    for p, v, t in seeds:
        if t is None:
            seed_vars[p] = None
            continue
        if t in taken:
            raise TNError(f"tangent name {t!r} is already used in the network")
        seed_vars[p] = Variable(t, v.axes, None, v.axis_shape)
        taken.add(t)
    decls = [v for _, v, _ in seeds]
    var = decls[0]

    def extra_legs(indices: tuple[str, ...]) -> tuple[str, ...]:
        """The legs a tangent statement adds: the parameter's axes (a Jacobian), or none."""
        return () if directional else fresh_names(var.axes, set(indices))

    def base(name: str) -> str:
        return f"{name}_{tangent}" if directional else tangent_name(name, seeds[0][0])

    active: set[str] = set()
    for p, _, _ in seeds:
        active |= program.depending_on(p)
    active &= program.needed(outputs)
    tangents = {} if tangents is None else tangents
    new: list[Statement] = []
    for s in program.statements:
        if s.name not in active or s.name in tangents:
            continue
        idx = s.indices + extra_legs(s.indices)
        terms = []
        through = None if only_through is None else only_through.get(s.name)
        for r in sorted(program.refs(s.name), key=program.position):
            if r in tangents and (through is None or r in through):
                terms.append(_chain_term(s.expr, r, program[r].indices, idx, None,
                                         tangents[r].reference()))
        for p, v, _ in seeds:
            if p in program.leaves(s.name) and (through is None or p in through):
                terms.append(_chain_term(s.expr, p, v.axes, idx, None, seed_vars[p]))
        expr = _total(terms, idx)
        if expr is None:
            continue
        st = Statement(_fresh_statement(base(s.name), taken), with_signature(expr, *decls))
        tangents[s.name] = st
        new.append(st)
    found: dict[str, str] = {}
    for o in outputs:
        if o not in tangents:
            e = program[o].expr
            zero = Zero(e.indices + extra_legs(e.indices), tuple(e.shape) + (
                () if directional else tuple(var.axis_shape)))
            tangents[o] = Statement(_fresh_statement(base(o), taken), with_signature(zero, *decls))
            new.append(tangents[o])
        found[o] = tangents[o].name
    return new, found


def hessian_blocks(program: Statements, pairs: Sequence[tuple[str, str]],
                   part: str = "total") -> Statements:
    """The Hessian blocks d²output / d a d b for each (a, b) in `pairs` as one program: one
    reverse pass for every `a` (adjoint statements shared by all blocks), then one forward
    pass over it per distinct `b`. Outputs, in the order of `pairs`, are named
    `d<a>_d<b>` (`block_name`), each laid out like `hessian(expr, a, b)`.

    part="gauss_newton": the generalised Gauss-Newton part J_aᵀ (∂²ℓ/∂Z²) J_b, where ℓ is the
    output statement and Z the statements it uses: the tangent enters the adjoints only
    through the loss's own derivative (its "seed" adjoints) and flows back through the
    cotangents, every other local Jacobian held constant. The functional part is the total
    minus this one."""
    pairs = [(a, b) for a, b in pairs]
    if not pairs:
        raise TNError("hessian_blocks needs at least one (a, b) pair")
    if part not in ("total", "gauss_newton"):
        raise TNError(f"hessian_blocks: part must be 'total' or 'gauss_newton', got {part!r}")
    grads: dict[str, str] = {}
    roles: dict[str, str] = {}
    rev = reverse(program, [a for a, _ in pairs], grads, roles)
    through = _gauss_newton_through(rev, roles) if part == "gauss_newton" else None
    statements = list(rev.statements)
    taken = set(rev.names) | set(rev.signature)
    block: dict[tuple[str, str], str] = {}
    for b in dict.fromkeys(b for _, b in pairs):
        wanted = list(dict.fromkeys(grads[a] for a, bb in pairs if bb == b))
        seeds, _ = _seeds(rev, b, None, _leaf(program, b))
        new, names = tangent_statements(rev, seeds, None, wanted, taken, through)
        statements += new
        for a, bb in pairs:
            if bb == b:
                block[(a, b)] = names[grads[a]]
    return program.rebuilt(statements, [block[p] for p in pairs]).pruned()


def hessian_vector_products(program: Statements, vectors: Mapping[str, str],
                            part: str = "total", names: dict[str, str] | None = None,
                            direction: str = "dir") -> Statements:
    """Σ_b d²output/d a d b · V_b for every parameter a of `vectors` (parameter -> the name of
    a new input tensor V_b shaped like it) as one program: one reverse pass for all
    parameters, then ONE forward pass over it along all directions at once (tangent
    statements `S_<direction>`). Outputs, in the order of `vectors`, are the tangents of the
    gradient statements (`names` receives parameter -> output name), each laid out like the
    parameter. `part`: "total" (the Hessian) or "gauss_newton" (as in `hessian_blocks`:
    the directions enter the adjoints only through the loss's own derivative)."""
    if part not in ("total", "gauss_newton"):
        raise TNError(f"hessian_vector_products: part must be 'total' or 'gauss_newton', "
                      f"got {part!r}")
    params = list(vectors)
    if not params:
        raise TNError("hessian_vector_products needs at least one parameter")
    grads: dict[str, str] = {}
    roles: dict[str, str] = {}
    rev = reverse(program, params, grads, roles)
    through = _gauss_newton_through(rev, roles) if part == "gauss_newton" else None
    out: dict[str, str] = {}
    fwd = forward(rev, dict(vectors), direction, names=out, only_through=through)
    if names is not None:
        names.update({p: out[grads[p]] for p in params})
    return fwd


def _gauss_newton_through(rev: Statements, roles: dict[str, str]) -> dict[str, frozenset[str]]:
    """For `forward`'s only_through: adjoint and gradient statements take tangents only
    through other derived statements (the loss's seeds take them through everything)."""
    through = {}
    for st in rev.statements:
        if roles.get(st.name) in ("adjoint", "gradient"):
            through[st.name] = frozenset(r for r in rev.refs(st.name) if r in roles)
    return through


def block_name(a: str, b: str) -> str:
    """The statement `hessian_blocks` names the block (a, b): `d<a>_d<b>`."""
    return tangent_name(adjoint_name(a), b)


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=200_000)
def var_names(expr: Expr) -> frozenset[str]:
    """Names of the variables occurring in `expr` (memoised per node)."""
    if isinstance(expr, Variable):
        return frozenset((expr.name,))
    out: frozenset[str] = frozenset()
    for c in expr.children:
        out |= var_names(c)
    return out


@lru_cache(maxsize=200_000)
def _d(expr: Expr, name: str, legs: tuple[str, ...], shapes: tuple) -> Expr | None:
    """Derivative or None when it is identically zero."""
    if name not in var_names(expr):
        return None
    if isinstance(expr, Variable):
        return _d_variable(expr, legs)
    if isinstance(expr, Sum):
        return _d_sum(expr, name, legs, shapes)
    if isinstance(expr, Product):
        return _d_product(expr, name, legs, shapes)
    if isinstance(expr, Func):
        if isinstance(expr.fn, Elementwise):
            return _d_elementwise(expr, name, legs, shapes)
        if expr.fn.name == "softmax":
            return _d_softmax(expr, name, legs, shapes)
        if expr.fn.name == "logsumexp":
            return _d_logsumexp(expr, name, legs, shapes)
    if isinstance(expr, (Delta, Constant, Zero)):
        return None
    raise TNError(f"cannot differentiate node {type(expr).__name__}")


def _d_variable(v: Variable, legs: tuple[str, ...]) -> Expr:
    deltas = [Delta((i, leg), s) for i, leg, s in zip(v.occurrence, legs, v.axis_shape)]
    return Product(deltas, v.indices + legs)


def _d_sum(expr: Sum, name, legs, shapes) -> Expr | None:
    terms = []
    for c, t in expr.terms:
        dt = _d(t, name, legs, shapes)
        if dt is not None:
            terms.append((c, dt))
    if not terms:
        return None
    return Sum(terms, expr.indices + legs)


def _d_product(expr: Product, name, legs, shapes) -> Expr | None:
    out = expr.indices + legs
    terms = []
    for j, f in enumerate(expr.factors):
        df = _d(f, name, legs, shapes)
        if df is None:
            continue
        factors = expr.factors[:j] + (df,) + expr.factors[j + 1:]
        terms.append((1, Product(factors, out)))
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0][1]
    return Sum(terms, out)


def _d_elementwise(expr: Func, name, legs, shapes) -> Expr | None:
    dz = _d(expr.arg, name, legs, shapes)
    if dz is None:
        return None
    fprime = expr.fn.derivative()
    if fprime.is_zero:
        return None
    if fprime.is_constant:
        return scale(dz, fprime.formula)
    return Product((Func(fprime, expr.arg), dz), expr.indices + legs)


def _d_softmax(p: Func, name, legs, shapes) -> Expr | None:
    z = p.arg
    dz = _d(z, name, legs, shapes)
    if dz is None:
        return None
    k = p.over
    out = p.indices + legs
    direct = Product((p, dz), out)
    k2 = fresh_name(k, set(p.all_indices) | set(dz.all_indices) | set(legs))
    inner = Product((rename_free(p, {k: k2}), rename_free(dz, {k: k2})),
                    tuple(i for i in p.indices if i != k) + legs)
    outer = Product((p, inner), out)
    return Sum(((1, direct), (-1, outer)), out)


def _d_logsumexp(expr: Func, name, legs, shapes) -> Expr | None:
    z = expr.arg
    dz = _d(z, name, legs, shapes)
    if dz is None:
        return None
    p = Func(SOFTMAX, z, expr.over)
    return Product((p, dz), expr.indices + legs)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _variable(expr: Expr, name: str) -> Variable:
    if not isinstance(expr, Expr):
        raise TNError(f"expected an expression, got {type(expr).__name__}")
    vs = expr.variables
    if name in vs:
        return vs[name]
    sig = expr.signature
    if name in sig:  # no longer used (derived expression): the derivative is zero
        return sig[name]
    raise TNError(f"variable {name!r} does not occur in the expression (signature: {sig})")


def _fresh_var_name(base: str, expr: Expr) -> str:
    taken = set(expr.signature)
    name = base
    k = 2
    while name in taken:
        name = f"{base}{k}"
        k += 1
    return name
