"""A traced model and its loss as one statement network, and the derived networks the
curvature operators run (each simplified and compiled once per input shape).

    net = loss_network(model, loss)           # model statements + `loss_value = ℓ(f, y)`
    net.network                               # tnderive.Network (inputs: model tensors, y)
    product = curvature_product(net, names, "gauss_newton")   # Σ_b G[a, b]·V_b for all a

The target keeps the model output's indices (class indices one-hot, see `torch_target`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..errors import TNError
from ..ir import fresh_name
from ..losses import Loss
from ..models.model import Model
from ..network import Network, parse_network
from ..network_codegen import CompiledNetwork
from ..simplify import simplify
from ..statements import Statement

LOSS = "loss_value"


@dataclass(frozen=True)
class LossNetwork:
    """`network`: the model's statements followed by the scalar loss statement `LOSS` of its
    output; `target`: the name of the target input tensor (the output's shape)."""

    model: Model
    network: Network
    target: str


def model_network(model: Model) -> tuple[Network, Callable[[str], str]]:
    """The model program as a network (`model.text`, every statement kept), and `fresh(base)`:
    a name no statement, input or earlier `fresh` name of it uses."""
    net = parse_network(model.text)
    taken = set(net.names) | set(net.signature)

    def fresh(base: str) -> str:
        name = fresh_name(base, taken)
        taken.add(name)
        return name
    return net, fresh


def loss_network(model: Model, loss: Loss) -> LossNetwork:
    """The model program (`model.text`, every statement kept) with the loss appended."""
    net = parse_network(model.text)
    out = net[model.output.name]
    taken = set(net.names) | set(net.signature)
    target = fresh_name("target", taken)
    loss = Loss(loss.kind, loss.reduction, target, loss.class_index)
    if LOSS in taken:
        raise TNError(f"the model uses the name {LOSS!r}; rename that tensor")
    statement = Statement(LOSS, loss.expr(out.reference()))
    return LossNetwork(model, Network(net.statements + (statement,)), target)


def torch_target(loss: Loss, y: torch.Tensor, out_shape: Sequence[int], dtype) -> torch.Tensor:
    """A torch loss target in tnderive's form (class indices become one-hot rows)."""
    if loss.kind == "ce" and not y.is_floating_point():
        if y.dim() != 1 or len(out_shape) != 2:
            raise TNError(f"CrossEntropyLoss: class-index targets need an output [N, C], "
                          f"got output {tuple(out_shape)} and target {tuple(y.shape)}")
        return torch.nn.functional.one_hot(y.long(), out_shape[1]).to(dtype)
    if tuple(y.shape) != tuple(out_shape):
        raise TNError(f"target has shape {tuple(y.shape)}, the model output {tuple(out_shape)}")
    return y.to(dtype)


@dataclass(frozen=True)
class Product:
    """A compiled curvature-vector product: call with the model's tensors, the target and
    one tangent tensor per parameter (`vectors`: parameter -> tangent name); returns the
    product per parameter (`outputs`: parameter -> output name)."""

    fn: CompiledNetwork
    vectors: Mapping[str, str]
    outputs: Mapping[str, str]

    def __call__(self, tensors: Mapping[str, torch.Tensor],
                 vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        args = dict(tensors)
        args.update(zip(self.vectors.values(), vs))
        res = self.fn(**args)
        if len(self.outputs) == 1:
            return [res]
        return [res[self.outputs[p]] for p in self.vectors]


def curvature_product(net: LossNetwork, params: Sequence[str], part: str) -> Product:
    """Σ_b C[a, b]·V_b for every parameter a (notation names) as ONE compiled network:
    C the Hessian of the loss (part="total") or its Gauss-Newton part ("gauss_newton")."""
    taken = set(net.network.names) | set(net.network.signature)
    vectors = {}
    for p in params:
        vectors[p] = fresh_name(f"V_{p}", taken)
        taken.add(vectors[p])
    names: dict[str, str] = {}
    derived = simplify(net.network.hvps(vectors, part, names))
    label = "ggn_vp" if part == "gauss_newton" else "hvp"
    return Product(derived.compile(label), vectors, names)

