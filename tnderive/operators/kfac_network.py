"""The fused network behind `tnderive.KFAC`: the forward pass and ONE reverse pass that pulls
every output-side vector column back to every layer output at once.

    net = kfac_network(model, loss, weights, layers, fisher)    # once per input shape
    values = net(tensors, target=y, vectors=V)   # forward values and adjoints, by name

The model program (`model.text`, one statement per op) gets the statement

    z[col] = Σ_f F[f] · V[f, col]          F the model output, V[*f, col] the vectors

and reverse mode with respect to the selected weights then gives each layer output T the
adjoint dT[col, *T.indices] = Σ_f V[f, col] ∂F[f]/∂T: every column's pullback in one pass,
the column axis carried along like a second batch axis (V is held constant in the reverse
pass). V is then computed by a statement of the same network, right after F:

  * type-2:    S, the loss-Hessian square root (`Loss.hessian_sqrt`; reduced: C−1 columns
               for cross-entropy, whose Hessian block has rank C−1);
  * empirical: the loss gradient at the true targets (one column);
  * mc:        V is an input, the gradients at targets sampled from F (`forward` computes F).

The network's outputs are the adjoints of the layer outputs and the forward values the layers
read (their inputs), so the KFAC factors need nothing else; it is simplified and compiled
once (`Network.compile`: each statement computed once, one generated function).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..derive import adjoint_name, reverse
from ..errors import TNError
from ..ir import Constant, Delta, Product, Variable, fresh_name
from ..losses import Loss
from ..models.model import Model
from ..network import Network
from ..network_codegen import CompiledNetwork
from ..simplify import simplify
from ..statements import Statement
from .networks import model_network


@dataclass(frozen=True)
class KFACNetwork:
    """A compiled KFAC pass. Call with the model's tensors (and `target` / `vectors` when the
    network takes them); returns name -> tensor for `values` (forward values) and, for each
    layer output, its adjoint [col, *T.indices] under `adjoints[T]` (None: the model output
    does not depend on T; its adjoint is zero).

    target:  the name of the target input (empirical), else None
    vectors: the name of the vector input V[*f, col] (mc), else None
    forward: the model output alone, compiled (mc draws its targets from it), else None
    convolutional: whether a statement convolves (contracts a `pattern` constant)
    """

    fn: CompiledNetwork
    adjoints: Mapping[str, str | None]
    values: tuple[str, ...]
    target: str | None
    vectors: str | None
    forward: CompiledNetwork | None
    convolutional: bool

    def __call__(self, tensors: Mapping[str, torch.Tensor], target: torch.Tensor | None = None,
                 vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        args = dict(tensors)
        if self.target is not None:
            args[self.target] = target
        if self.vectors is not None:
            args[self.vectors] = vectors
        res = self.fn(**args)
        outs = self.fn.program.outputs
        return dict(zip(outs, [res])) if len(outs) == 1 else res


def kfac_network(model: Model, loss: Loss, weights: Sequence[str], layers: Sequence[str],
                 fisher: str, mc_samples: int = 1) -> KFACNetwork:
    """The fused KFAC pass of `model` (see the module docstring): adjoints of the statements
    `layers` (layer outputs of the selected `weights`, notation names) and the forward values
    those statements read, for vectors of `fisher` ("type-2", "empirical", "mc")."""
    net, fresh = model_network(model)

    clash = [t for t in layers if adjoint_name(t) in net.names or adjoint_name(t) in net.signature]
    if clash:
        raise TNError(f"KFAC: the model has a tensor named {adjoint_name(clash[0])!r}, the name "
                      f"of the adjoint of layer output {clash[0]!r}; rename it")
    out = net[model.output.name]
    f = out.reference()
    col = fresh_name("col", set(f.indices))
    target = None
    if fisher == "type-2":
        vec_expr = loss.hessian_sqrt(f, col, reduced=True)
    elif fisher == "empirical":
        target = fresh("target")
        loss = Loss(loss.kind, loss.reduction, target, loss.class_index)
        vec_expr = Product((loss.gradient(f), Delta((col,), 1)), (*f.indices, col))
    elif fisher == "mc":
        vec_expr = None
    else:
        raise TNError(f"KFAC: unknown fisher type {fisher!r}")
    shape = tuple(f.shape) + ((mc_samples,) if vec_expr is None else (vec_expr.shape[-1],))
    V = Variable(fresh("kfac_vectors"), (*f.indices, col), None, shape)
    z = Statement(fresh("kfac_z"), Product((f, V), (col,)))
    rev = reverse(Network(net.statements + (z,)), list(weights))
    adjoints = {t: (adjoint_name(t) if adjoint_name(t) in rev else None) for t in layers}
    model_names = set(net.names)
    grads = set(rev.outputs)
    backward = [s for s in rev.statements if s.name not in model_names and s.name not in grads]
    values = _layer_inputs(net, model, layers)
    outputs = list(dict.fromkeys([*values, *(a for a in adjoints.values() if a)]))
    if not outputs:
        raise TNError("KFAC: no layer output reaches the model output")
    head = [Statement(V.name, vec_expr)] if vec_expr is not None else []
    fused = Network(net.statements + tuple(head) + tuple(backward), outputs).pruned()
    fn = simplify(fused).compile("kfac_pass", inplace=True)
    forward = None
    if vec_expr is None:
        forward = simplify(net.with_outputs([out.name])).compile("kfac_forward")
    convolutional = any(isinstance(node, Constant) and node.kind == "pattern"
                        for st in net.statements for node in st.expr.walk())
    return KFACNetwork(fn, adjoints, tuple(values), target, V.name if vec_expr is None else None,
                       forward, convolutional)


def _layer_inputs(net: Network, model: Model, layers: Sequence[str]) -> list[str]:
    """The statements of `net` that the layer statements `layers` read (their activations)."""
    wanted = set(layers)
    out: list[str] = []
    for st in model.statements:
        if st.target.name in wanted:
            out += [a.name for a in st.uses if a.name in net and a.name not in out]
    return out
