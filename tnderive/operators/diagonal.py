"""The exact diagonal of the generalized Gauss-Newton matrix as one derived network.

    diag G[a] = Σ_n Σ_col ( Σ_c J[n, c, a] · S[n, c, col] )²        (per parameter entry a)

J the model's Jacobian for sample n, S[n, :, :] a square root of the loss Hessian of sample n
(`Loss.hessian_sqrt`: S Sᵀ = ∂²ℓ/∂f², C columns, C−1 for cross-entropy). The network (built
per input shape):

  1. the model's statements, each selected parameter p replaced by a per-sample copy
     `p_n[b, ...]` (b: the batch index of the statement that uses it): its gradient keeps
     the samples apart;
  2. `S[*f, col]`, the loss-Hessian square root at the output f, and `z[col] = Σ f·S`;
  3. one reverse pass of z for all per-sample copies (adjoints carry the column index: C
     backward passes at once, as BackPACK's DiagGGNExact);
  4. `diag_p[axes] = Σ_{col, b} dp_n[col, b, axes] · dp_n[col, b, axes]`: the gradient
     expression multiplied by itself (the lowering plans the square; for a linear layer it
     never forms the per-sample gradient);
  5. every p_n read back as p (the copies are equal), so the forward and adjoint
     statements run with the shared parameters and the network takes the model's tensors.

S enters the reverse pass as an input tensor (held constant) and is then computed by a
statement of the same network, so a call runs the forward statements once. A statement
computed from parameters only (attention's q/k/v weights sliced from `in_proj_weight`) that
reads a per-sample copy becomes per-sample itself (a new leading index). Requires that no
statement mixes samples (each uses every activation at its own batch index); TNError names
the statement otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..derive import reverse
from ..errors import TNError
from ..ir import Delta, Expr, Func, Product, Sum, Variable, fresh_name, map_children, rewrite
from ..losses import Loss
from ..models.model import Model
from ..network import Network
from ..network_codegen import CompiledNetwork
from ..notation import substitute
from ..simplify import simplify
from ..statements import Statement
from .batching import depending_on_input, sample_mixing
from .networks import model_network


@dataclass(frozen=True)
class DiagonalNetwork:
    """A compiled GGN-diagonal network. Call with the model's tensors; returns the diagonal
    per parameter (parameter's shape), in the order of `per_sample` (parameter -> the name of
    its per-sample copy in the derivation)."""

    fn: CompiledNetwork
    per_sample: Mapping[str, str]
    outputs: Mapping[str, str]
    sqrt_input: str | None = None       # the MC version's sampled columns S[*f, col]

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        res = self.fn(**tensors)
        if len(self.outputs) == 1:
            return [res]
        return [res[self.outputs[p]] for p in self.per_sample]


def diagonal_network(model: Model, loss: Loss, params: Sequence[str],
                     columns: int | None = None) -> DiagonalNetwork:
    """The exact GGN diagonal of `loss` on `model` for parameters `params` (notation names),
    simplified and compiled (see the module docstring). columns=M: the Monte-Carlo version
    instead, where S[*f, col] (M columns) is an input tensor `sqrt_input` the caller fills
    with sampled gradients (BackPACK's DiagGGNMC)."""
    net, fresh = model_network(model)

    acts = _check_samples_apart(net, model)
    copies = {p: fresh(f"{p}_n") for p in params}
    statements = _per_sample_program(net, copies, acts, model.output.shape[0])
    out = net[model.output.name]
    f = out.reference()
    col = fresh_name("col", set(f.indices))
    sqrt_expr = loss.hessian_sqrt(f, col, reduced=True)
    if columns is not None:     # sampled columns: S is the caller's
        sqrt_expr = None
        S = Variable(fresh("loss_sqrt"), f.indices + (col,), None, tuple(f.shape) + (columns,))
    else:
        S = Variable(fresh("loss_sqrt"), sqrt_expr.indices, None, sqrt_expr.shape)
    z = Statement(fresh("z"), Product((f, S), (col,)))
    program = Network(statements + [z])
    grads: dict[str, str] = {}
    rev = simplify(reverse(program, list(copies.values()), grads))
    diag: list[Statement] = []
    outputs = {}
    for p, copy in copies.items():
        g = rev[grads[copy]]
        axes = g.indices[2:]            # after (col, b)
        if _outer(g.expr):     # e.g. a linear layer's dY[col, b, o]·X[b, i]: square planned
            sq = Product((g.expr, substitute(g.expr, g.indices, g.indices)), axes)
        else:                  # the per-sample gradient once, then its square
            diag.append(g)
            sq = Product((g.reference(), g.reference()), axes)
        name = fresh(f"diag_{p}")
        diag.append(Statement(name, sq))
        outputs[p] = name
    model_names = set(net.names)
    rest = [s for s in rev.statements if s.name not in model_names and s.name not in grads.values()]
    shared = {c: net.signature[p] for p, c in copies.items()}
    sqrt = [] if sqrt_expr is None else [Statement(S.name, sqrt_expr)]
    final = Network([Statement(s.name, _shared(s.expr, shared))
                     for s in statements + sqrt + rest + diag],
                    list(outputs.values()))
    fn = simplify(final.pruned()).compile("ggn_diagonal", inplace=True)
    return DiagonalNetwork(fn, copies, outputs, None if sqrt_expr is not None else S.name)


def _outer(expr: Expr) -> bool:
    """A product that sums over nothing (its square factors: Σ (a·b)² = Σ a²·b²)."""
    return isinstance(expr, Product) and not expr.summed


def _shared(expr: Expr, shared: Mapping[str, Variable]) -> Expr:
    """`expr` with each per-sample copy p_n[b, I] read as the parameter itself, times ones
    over b (the copies are equal): the derived statements then use p, and only the
    gradient's layout keeps the samples apart."""
    if not shared.keys() & expr.variables.keys():
        return expr

    def sub(e: Expr) -> Expr | None:
        if not isinstance(e, Variable) or e.name not in shared:
            return None
        p = shared[e.name]
        b, batch = e.indices[0], e.axis_shape[0]
        return Product((Variable(p.name, p.axes, e.indices[1:], p.axis_shape),
                        Delta((b,), batch)), e.indices)

    return rewrite(expr, sub)


def _check_samples_apart(net: Network, model: Model) -> set[str]:
    """Every statement that depends on the model's input keeps its first index as the batch
    index and reads every activation and model input at it (no statement mixes samples).
    Returns those statements' names."""
    mixed = sample_mixing(net, model)
    if mixed is not None:
        s, name, indices, b = mixed
        raise TNError(f"GGN diagonal: statement {s!r} reads {name!r} at {list(indices)}, not at "
                      f"its batch index {b!r}: it mixes samples, so per-sample Jacobians are "
                      f"not defined")
    return depending_on_input(net, model)


def _per_sample_program(net: Network, copies: Mapping[str, str], acts: set[str],
                        batch: int) -> list[Statement]:
    """The statements with each selected parameter p read as its per-sample copy p_n[b, ...]
    (b: the batch index of the reading statement). A statement computed from parameters only
    (attention's projections sliced from `in_proj_weight`) that reads a per-sample tensor
    becomes per-sample itself: a new leading index, and its readers read it at their b."""
    batched: dict[str, tuple[str, tuple[str, ...], tuple]] = {}   # name -> (name, axes, shape)
    for p, copy in copies.items():
        var = net.signature[p]
        bax = fresh_name("b", set(var.axes))
        batched[p] = (copy, (bax,) + var.axes, (batch,) + tuple(var.axis_shape))
    out = []
    for s in net.statements:
        if not batched.keys() & s.expr.variables.keys():
            out.append(s)
            continue
        if s.name in acts:
            expr = _batched(s.expr, batched, s.indices[0], s.name, add=False)
        else:
            b = fresh_name("b", set(s.expr.all_indices))
            expr = _batched(s.expr, batched, b, s.name, add=True)
            batched[s.name] = (s.name, expr.indices, tuple(expr.shape))
        out.append(Statement(s.name, expr))
    return out


def _batched(expr: Expr, batched: Mapping[str, tuple], b: str, where: str, add: bool) -> Expr:
    """`expr` reading each per-sample tensor at index b. add=False: b is the statement's batch
    index and must be free wherever such a tensor is read; add=True: b is new, and every node
    on the way gets it as a leading free index (a sum's other terms times ones over b)."""
    names = batched.keys()
    size = next(iter(batched.values()))[2][0]

    def go(e: Expr) -> Expr:
        if isinstance(e, Variable):
            if e.name not in names:
                return e
            name, axes, shape = batched[e.name]
            return Variable(name, axes, (b,) + e.indices, shape)
        if not isinstance(e, (Product, Sum, Func)) or not names & e.variables.keys():
            return e
        if b in e.indices:
            return map_children(e, go)
        if not add:
            raise TNError(f"GGN diagonal: in statement {where!r} a parameter is used inside a "
                          f"sum over the batch index {b!r}")
        out = (b,) + e.indices
        if isinstance(e, Product):
            return Product([go(f) for f in e.factors], out)
        if isinstance(e, Sum):
            terms = []
            for c, t in e.terms:
                new = go(t)
                if b not in new.indices:
                    new = Product((new, Delta((b,), size)), (b,) + new.indices)
                terms.append((c, new))
            return Sum(terms, out)
        return Func(e.fn, go(e.arg), e.over)

    return go(expr)
