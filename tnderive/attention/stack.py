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
(`Network.evaluate`, with the lowered programs of the shared network: `Network.part`),
`HessianBlocks.evaluate_parts` all parts at once. The functional pass of a b reuses the
outer pass's tangents of the network's own statements (J_b, the same in both).

`gauss_newton` is the same outer part written on the inlined prediction for mse / ce (a
cross-check for the tests).

`block_program(model, p, q, chunk=None)` is one block (the total) as fast generated code:
derived in both forward-over-reverse orders, the one whose code states fewer flops kept,
optionally `chunk` tangent directions per run (`BlockProgram`; benchmarks/transformer.py).
"""
from __future__ import annotations

import re
import time
from typing import Sequence

import torch

from ..derive import derivative, reverse, tangent_statements, var_names
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
    taken = set(rev.names) | set(rev.signature)   # every name so far: new ones are fresh
    names: dict[tuple[str, str], dict[str, str]] = {pair: {} for pair in pairs}
    signature = net.signature
    for b in dict.fromkeys(b for _, b in pairs):
        wanted = list(dict.fromkeys(grads[a] for a, bb in pairs if bb == b))
        seeds = [(b, signature[b], None)]
        tangents: dict[str, Statement] = {}
        for kind in ("outer", "functional"):
            # each pass runs on the reverse network only (`tangent_statements`: no copy of
            # it per pass), so the passes stay linear in the number of parameters; the
            # functional pass reuses the outer pass's tangents of the network's own
            # statements (both take them through everything: the same J_b)
            tangents = {n: st for n, st in tangents.items() if n not in roles}
            new, found = tangent_statements(rev, seeds, None, wanted, taken, through[kind],
                                            tangents)
            statements += new
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


def _one(model: TransformerModel, name: str) -> str:
    """The variable of one parameter (torch-style or variable name; or the data X)."""
    if name == DATA:
        return DATA
    hits = model.select(name)
    if len(hits) != 1:
        raise TNError(f"block pair: {name!r} names {len(hits)} parameters ({', '.join(hits)}); "
                      f"give one parameter")
    return hits[0]


def stack_blocks(model: TransformerModel, params: Sequence[str] | str | None = None,
                 simplify: bool = True, upper: bool = True,
                 include_X: bool = False,
                 pairs: Sequence[tuple[str, str]] | None = None) -> HessianBlocks:
    """Every block (p, q) of the stack's Hessian for the selected parameters (fnmatch
    patterns over torch-style or variable names), each with outer / functional / total parts,
    derived on the stack's network (see the module docstring). upper: only p ≤ q in model
    order (the lower blocks are transposes). simplify: `tnderive.simplify` statement by
    statement (default; cheap on a network).

    pairs: only these blocks (p, q), each name matching one parameter (instead of `params`).
    The derivation costs one forward pass per distinct q: pairing every parameter with a few
    q is much cheaper than all pairs."""
    if pairs is not None:
        pairs = [(_one(model, p), _one(model, q)) for p, q in pairs]
        chosen = {n for pair in pairs for n in pair}
        names = tuple(n for n in model.select(None) + (DATA,) if n in chosen)
    else:
        names = model.select(params)
        if include_X and DATA not in names:
            names = names + (DATA,)
        pairs = [(p, q) for i, p in enumerate(names) for j, q in enumerate(names)
                 if not (upper and j < i)]
    t0 = time.perf_counter()
    net = parse_network(model.text)
    derived, part_names = split_network(net, pairs)
    t_derive = time.perf_counter() - t0
    t0 = time.perf_counter()
    if simplify:
        derived = simplify_net(derived)
    t_simp = time.perf_counter() - t0
    in_T = {p: _in_scores(net, p) for p in names}
    shapes = model.variables
    source = derived.signature
    degrees: dict[str, float] = {}  # σ-degrees of the shared network's statements, filled once
    out = HessianBlocks()
    for p, q in pairs:
        o1 = int(in_T[p] or in_T[q])
        o2 = 2 if (in_T[p] and in_T[q]) else o1
        parts = [NetworkPart(kind, derived, part_names[p, q][kind], order, source, degrees)
                 for kind, order in
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


# --------------------------------------------------------------------------------------------
# one block, evaluated fast: the cheaper of the two forward-over-reverse orders
# --------------------------------------------------------------------------------------------

_COST = re.compile(r"Contraction cost: (\d+) flops")


def _flops(compiled) -> int:
    """The contraction flops the generated module states in its header."""
    found = _COST.search(compiled.source)
    if found is None:
        raise TNError("compiled network: no 'Contraction cost' line in its header")
    return int(found.group(1))


CHUNK_STEP, CHUNK_BASIS, CHUNK_INDEX = "chunk_step", "chunk_basis", "zc"


def _chunked_text(text: str, b: str, axes: Sequence[str], chunk: int) -> str:
    """The program with parameter b replaced by b + Σ_zc chunk_basis[zc, b's axes]·chunk_step[zc]:
    at chunk_step = 0 it computes the same values, and ∂/∂chunk_step is the derivative along
    the `chunk` directions in chunk_basis (unit vectors: a slice of b's entries)."""
    lines = text.split("\n")
    if not lines[0].startswith("# sizes:"):
        raise TNError("chunked block: the program text must start with its '# sizes:' line")
    for name in (CHUNK_STEP, CHUNK_BASIS, f"{b}_chunked"):
        if re.search(rf"\b{name}\[", text):
            raise TNError(f"chunked block: the program already uses the name {name!r}")
    ix = ",".join(axes)
    body = re.sub(rf"\b{re.escape(b)}\[", f"{b}_chunked[", "\n".join(lines[1:]))
    head = (f"{lines[0]}, {CHUNK_INDEX}={chunk}\n"
            f"{b}_chunked[{ix}] = {b}[{ix}] + {CHUNK_BASIS}[{CHUNK_INDEX},{ix}] * {CHUNK_STEP}[{CHUNK_INDEX}]")
    return head + "\n" + body


class BlockProgram:
    """One Hessian block ∂²ℓ/∂a∂b of a stack's loss as generated code, laid out [a's axes,
    b's axes].

    Order: forward over reverse takes the tangent over b's axes through ∂ℓ/∂a
    (`Network.hessian_blocks(pairs=[(a, b)])`), or over a's axes through ∂ℓ/∂b, transposed.
    Their costs differ by orders of magnitude (a tangent over a LayerNorm weight carries 64
    axes, one over an MLP weight 16384; a parameter late in the stack has a short reverse
    pass): both are derived, simplified and compiled, and the one whose generated code states
    fewer contraction flops runs.

    chunk: the tangent parameter's entries `chunk` at a time (the program derived once with
    the parameter shifted along `chunk` unit directions, `_chunked_text`, and run once per
    slice): memory ∝ chunk instead of the parameter's size, flops about the same. None: all
    at once. Call with the stack's tensors (extra ones are ignored). `.flops`: {order:
    flops of one run × runs}; `.transposed`: the b-over-a order won; `.compiled`: the chosen
    `CompiledNetwork` (`.source` its code)."""

    def __init__(self, text: str, a: str, b: str, chunk: int | None = None):
        net = parse_network(text)
        sig = net.signature
        self.flops: dict[tuple[str, str], int] = {}
        best = None
        for x, y in [(a, b)] if a == b else [(a, b), (b, a)]:
            numel = 1
            for n in sig[y].axis_shape:
                numel *= int(n)
            if chunk is None:
                k, runs = None, 1
                derived = simplify_net(net.hessian_blocks(pairs=[(x, y)]))
            else:
                k = min(chunk, numel)
                runs = -(-numel // k)
                chunked = parse_network(_chunked_text(text, y, sig[y].axes, k))
                derived = simplify_net(chunked.hessian_blocks(pairs=[(x, CHUNK_STEP)]))
            compiled = derived.compile()
            self.flops[x, y] = _flops(compiled) * runs
            if best is None or self.flops[x, y] < best[0]:
                best = (self.flops[x, y], (x, y), derived, compiled, k)
        _, (x, y), derived, self.compiled, self.chunk = best
        self.transposed = (x, y) != (a, b)
        self.order = (x, y)
        self.shape_x = tuple(int(n) for n in sig[x].axis_shape)
        self.shape_y = tuple(int(n) for n in sig[y].axis_shape)
        self.leaves = frozenset().union(*(derived.leaves(s.name) for s in derived.statements))

    def __call__(self, **tensors):
        given = {n: t for n, t in tensors.items() if n not in (CHUNK_STEP, CHUNK_BASIS)}
        missing = sorted(n for n in self.leaves - {CHUNK_STEP, CHUNK_BASIS} if n not in given)
        if missing:
            raise TNError(f"Hessian block: missing tensor {missing[0]!r}")
        args = {n: given[n] for n in self.leaves if n in given}
        if self.chunk is None:
            H = self.compiled(**args)
        else:
            H = self._chunked(args)
        if self.transposed:    # computed [b's axes, a's axes]
            nx = len(self.shape_x)
            H = H.permute(*range(nx, H.dim()), *range(nx))
        return H

    def _chunked(self, args: dict) -> torch.Tensor:
        """[x's axes, y's axes], `chunk` of y's entries per run."""
        ref = next(iter(args.values()))
        numel, k = 1, self.chunk
        for n in self.shape_y:
            numel *= n
        out = torch.empty(*self.shape_x, numel, dtype=ref.dtype, device=ref.device)
        step = torch.zeros(k, dtype=ref.dtype, device=ref.device)
        for j0 in range(0, numel, k):
            cols = torch.arange(j0, j0 + k, device=ref.device) % numel   # the last run wraps
            basis = torch.zeros(k, numel, dtype=ref.dtype, device=ref.device)
            basis[torch.arange(k, device=ref.device), cols] = 1
            val = self.compiled(**args, **{CHUNK_STEP: step,
                                           CHUNK_BASIS: basis.reshape(k, *self.shape_y)})
            n = min(k, numel - j0)
            out[..., j0:j0 + n] = val[..., :n]
        return out.reshape(*self.shape_x, *self.shape_y)


def block_program(model: TransformerModel, p: str, q: str, chunk: int | None = None) -> BlockProgram:
    """The Hessian block (p, q) of the stack's loss (torch-style or variable names) as the
    cheaper generated program, `chunk` tangent directions per run (`BlockProgram`)."""
    return BlockProgram(model.text, _one(model, p), _one(model, q), chunk)
