"""`tnderive.KFAC(module, loss_func, params, data, kind=..., fisher=...)`: KFAC of a torch model
with curvlinops' conventions, one `KronBlock` per weight.

Each weight's statement in the model program is a layer network (`Statement.text()`): its KFAC
factors come from `tnderive.kfac` on it (input side A from the layer's inputs; output side B from
vectors g given at the layer output). g are the loss-Hessian square-root columns (type-2), or the
loss gradient at sampled (mc) / true (empirical) targets, pulled back to every layer output by
ONE fused network per input shape (`tnderive.operators.kfac_network`: the forward pass, the
vectors, and one reverse pass carrying all columns at once; an image batch enters it in
channels-last memory order on the CPU, where torch's convolution kernels are faster on it).
Factors of several batches are summed as curvlinops does: A weighted by the batch's share of
the data, B too for a mean reduction.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from ..codegen import compile as tn_compile
from ..derive import grad
from ..errors import TNError
from ..ir import Product, Variable
from ..kfac import kfac as derive_kfac
from ..kronecker import KronBlock, KronInverse
from ..models.model import Model, from_module
from ..notation import parse
from ..progress import track
from .kfac_network import KFACNetwork, kfac_network
from .linear_operator import CurvatureOperator
from .networks import torch_target

KINDS = ("expand", "reduce")
FISHERS = ("type-2", "mc", "empirical")


class _Layer:
    """A weight's statement (index j in the model), its bias and its KFAC factor networks."""

    def __init__(self, statement_index: int, weight: str, bias: str | None, fac):
        self.j, self.weight, self.bias, self.fac = statement_index, weight, bias, fac


class KFAC(CurvatureOperator):
    """KFAC approximation of the GGN / Fisher, per-parameter `KronBlock`s.

    kind:      "expand" | "reduce" (weight-sharing positions as samples, or summed first)
    fisher:    "type-2" (loss-Hessian square root) | "mc" (`mc_samples` sampled targets, `seed`)
               | "empirical" (true targets)
    separate_weight_and_bias: False puts a layer's weight and bias in one joint block
    blocks:    torch parameter name -> KronBlock (with joint blocks under the weight's name)
    """

    label = "KFAC"

    def __init__(self, module: nn.Module, loss_func: nn.Module, params: Sequence[torch.Tensor],
                 data: Iterable, kind: str = "expand", fisher: str = "type-2",
                 separate_weight_and_bias: bool = True, mc_samples: int = 1, seed: int = 2147483647,
                 progressbar: bool = True, check: bool = True):
        if kind not in KINDS:
            raise TNError(f"kind must be one of {KINDS}, got {kind!r}")
        if fisher not in FISHERS:
            raise TNError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        super().__init__(module, loss_func, params, data, progressbar, check)
        self.kind, self.fisher = kind, fisher
        self.joint = not separate_weight_and_bias
        self.mc_samples, self.seed = mc_samples, seed
        self._layers: dict[tuple, list[_Layer]] = {}
        self._networks: dict[tuple, tuple[Model, list[_Layer], KFACNetwork]] = {}
        self._loss_grads: dict[tuple, tuple] = {}
        self.blocks: dict[str, KronBlock] = {}
        self._compute()

    # ---------------------------------------------------------------- factor networks
    def layers(self, model, key) -> list[_Layer]:
        """The weights' layer statements and KFAC factor networks at one input shape."""
        if key in self._layers:
            return self._layers[key]
        selected = set(self.param_names)
        out = []
        for torch_name in self.param_names:
            if _partner(torch_name, "bias", "weight") in selected:
                continue                                 # in its weight's block
            name = model.param_names[torch_name]
            users = [j for j, st in enumerate(model.statements) if any(a.name == name for a in st.uses)]
            if len(users) != 1:
                places = [model.statements[j].source for j in users]
                raise TNError(f"KFAC: parameter {torch_name!r} is used by {len(users)} statements "
                              f"{places}; KFAC needs a weight in exactly one layer")
            st = model.statements[users[0]]
            bias_t = _partner(torch_name, "weight", "bias")
            bias = model.param_names.get(bias_t) if bias_t in selected else None
            if bias is not None and not any(a.name == bias for a in st.uses):
                bias = None
            try:
                fac = derive_kfac(parse(st.text()), weight=name, batch=st.indices[0], kind=self.kind,
                                  bias=bias, joint=self.joint and bias is not None, vectors="g_")
            except TNError as err:
                raise TNError(f"KFAC: no Kronecker factors for {torch_name!r} in {st.source} "
                              f"({st.line}): {err}") from None
            out.append(_Layer(users[0], name, bias, fac))
        self._layers[key] = out
        return out

    # ---------------------------------------------------------------- the fused pass
    def network(self, X: torch.Tensor) -> tuple[Model, list[_Layer], KFACNetwork]:
        """The model, its layers and the compiled KFAC pass at X's shape (once per shape)."""
        key = (tuple(X.shape), X.dtype)
        if key not in self._networks:
            model = from_module(self.module, X, check=self.check)
            layers = self.layers(model, key)
            weights = list(dict.fromkeys(l.weight for l in layers))
            targets = [model.statements[l.j].target.name for l in layers]
            net = kfac_network(model, self.loss, weights, targets, self.fisher, self.mc_samples)
            self._networks[key] = (model, layers, net)
        return self._networks[key]

    def _sampled_vectors(self, net: KFACNetwork, tensors: dict, generator) -> torch.Tensor:
        """mc: the loss gradients at `mc_samples` targets drawn from the model's output,
        stacked on a last column axis [*f.shape, mc_samples]."""
        f = net.forward(**{k: v for k, v in tensors.items() if k in net.forward.signature})
        key = tuple(f.shape)
        if key not in self._loss_grads:
            F = Variable("F", tuple(f"f{k}" for k in range(f.dim())), shape=key)
            self._loss_grads[key] = (tn_compile(grad(self.loss.expr(F), "F"), "loss_grad"),
                                     self.loss.target_variable(F).name)
        fn, target = self._loss_grads[key]
        cdim = f.dim() - 1
        cols = [fn(F=f, **{target: self.loss.sample_target(f, cdim, generator)})
                for _ in range(self.mc_samples)]
        return torch.stack(cols, -1)

    def _scale(self, model: Model) -> float:
        """The factor B is multiplied by: 1 (type-2), 1/reduction scale (empirical; mc
        divided by the number of samples too), so that B estimates the type-2 factor."""
        if self.fisher == "type-2":
            return 1.0
        out = model.output
        F = Variable("F", tuple(f"f{k}" for k in range(len(out.shape))), shape=tuple(out.shape))
        scale = 1.0 / float(self.loss.scale(F))
        return scale / self.mc_samples if self.fisher == "mc" else scale

    # ---------------------------------------------------------------- accumulation
    @torch.no_grad()
    def _compute(self) -> None:
        batches = self._batches()
        total = sum(int(X.shape[0]) for X, _ in batches)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        acc: dict[str, list] = {}
        layouts: dict[str, tuple] = {}
        items = track(batches, "KFAC factors") if self.progressbar else batches
        for X, y in items:
            X = X.to(self.device, self.dtype) if X.is_floating_point() else X.to(self.device)
            model, layers, net = self.network(X)
            tensors = model.tensors(X)
            if net.convolutional:
                for a in model.inputs:
                    tensors[a.name] = _channels_last(tensors[a.name])
            target = vectors = None
            if net.target is not None:
                target = torch_target(self.loss, y.to(self.device), model.output.shape, self.dtype)
            if net.vectors is not None:
                vectors = self._sampled_vectors(net, tensors, generator)
            env = {**tensors, **net(tensors, target, vectors)}
            scale = self._scale(model)
            share = X.shape[0] / total
            wb = share if self.reduction == "mean" else 1.0
            for l in layers:
                for name, blk in self._layer_blocks(model, l, net, env).items():
                    A = blk.A * share
                    B = blk.B * (wb * scale)
                    if name in acc:
                        acc[name][0] += B
                        acc[name][1] += A
                    else:
                        acc[name] = [B, A]
                        layouts[name] = blk.layout
        torch_names = {v: k for k, v in model.param_names.items()}
        self.blocks = {torch_names[n]: KronBlock(B, A, layouts[n]) for n, (B, A) in acc.items()}
        covered = set(self.blocks) | {b for w in self.blocks if (b := self._joint_bias(w))}
        missing = [n for n in self.param_names if n not in covered]
        if missing:
            raise TNError(f"KFAC: no Kronecker block for {missing} (a bias needs its weight "
                          f"among params, in the same layer)")

    def _layer_blocks(self, model: Model, l: _Layer, net: KFACNetwork, env: dict) -> dict:
        """One batch's KronBlocks of a layer (weight, and its bias separately or jointly)
        from the pass's values `env`: the layer's inputs and the adjoint of its output."""
        st = model.statements[l.j]
        adjoint = net.adjoints[st.target.name]
        if adjoint:
            g = env[adjoint].movedim(0, -1)            # g_[*T.indices, col]
            B = _output_gram(env[adjoint], l.fac)
        else:                                          # the output does not depend on T
            g = torch.zeros(*st.target.shape, 1, dtype=self.dtype, device=self.device)
            B = None
        res = l.fac.compute(**{a.name: env[a.name] for a in st.uses}, g_=g, b_factor=B)
        return res if isinstance(res, dict) else {l.weight: res}

    # ---------------------------------------------------------------- products
    def _apply(self, blocks: dict, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        by_name = dict(zip(self.param_names, vs))
        out = {}
        for name, blk in blocks.items():
            bias = self._joint_bias(name)
            if bias is not None:
                w, b = blk @ (by_name[name], by_name[bias])
                out[name], out[bias] = w, b
            else:
                out[name] = blk @ by_name[name]
        return [out[n].reshape(p.shape) for n, p in zip(self.param_names, self.params)]

    def _joint_bias(self, weight: str) -> str | None:
        bias = _partner(weight, "weight", "bias")
        return bias if self.joint and bias and bias in self.param_names else None

    def matvec_list(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self._apply(self.blocks, vs)

    def inverse(self, damping=0.0, heuristic: bool = False, exact: bool = True,
                min_damping: float = 1e-8) -> "KFACInverse":
        """The damped inverse, per block, with curvlinops' three damping options:
        exact (default) `(B ⊗ A + λI)⁻¹` from eigendecompositions; exact=False damps each
        factor, `(B + λ_B I)⁻¹ ⊗ (A + λ_A I)⁻¹` (damping λ or a pair (λ_A, λ_B));
        heuristic=True damps the factors by π: `(B + max(√λ/π, min) I) ⊗ (A + max(π√λ, min) I)`,
        π² = (tr A / dim A) / (tr B / dim B)."""
        return KFACInverse(self, damping, heuristic, exact, min_damping)

    def precondition(self, grads: Sequence[torch.Tensor], damping=1e-3, **options) -> list[torch.Tensor]:
        """(KFAC + damping)⁻¹ applied to a list of gradients (params order); options as
        `inverse` (heuristic=, exact=)."""
        return self.inverse(damping, **options) @ list(grads)

    def trace(self) -> torch.Tensor:
        return sum(blk.trace() for blk in self.blocks.values())

    def logdet(self) -> torch.Tensor:
        return sum(blk.logdet() for blk in self.blocks.values())

    def frobenius_norm(self) -> torch.Tensor:
        return torch.sqrt(sum(blk.frobenius_norm() ** 2 for blk in self.blocks.values()))


class KFACInverse(CurvatureOperator):
    """The damped inverse of a `KFAC` operator (`@` and `.to_scipy()` like the others)."""

    def __init__(self, kfac: KFAC, damping, heuristic: bool, exact: bool, min_damping: float):
        self.kfac = kfac
        self.params, self.param_names = kfac.params, kfac.param_names
        self.dtype, self.device, self.dim, self.shape = kfac.dtype, kfac.device, kfac.dim, kfac.shape
        if heuristic and isinstance(damping, tuple):
            raise TNError("heuristic damping takes one damping value, not a pair")
        self.blocks: dict[str, KronInverse] = {}
        for name, blk in kfac.blocks.items():
            bias = not blk.layout.ins            # a separate bias block: B ⊗ 1
            if heuristic:
                # π of the layer (a separate bias shares its weight's), as curvlinops does
                owner = kfac.blocks.get(_partner(name, "bias", "weight") or "") if bias else blk
                if owner is None:
                    lam_a, lam_b = damping, damping
                else:
                    pi = _pi(owner)
                    root = math.sqrt(damping)
                    lam_a, lam_b = (root * pi).clamp_min(min_damping), (root / pi).clamp_min(min_damping)
                self.blocks[name] = _factor_damped(blk, 0.0 if bias else lam_a, lam_b)
            elif not exact:
                lam_a, lam_b = damping if isinstance(damping, tuple) else (damping, damping)
                self.blocks[name] = _factor_damped(blk, 0.0 if bias else lam_a, lam_b)
            else:
                if isinstance(damping, tuple):
                    raise TNError("exact damping takes one damping value, not a pair")
                self.blocks[name] = blk.inverse(damping)

    def matvec_list(self, vs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.kfac._apply(self.blocks, vs)

    def logdet(self) -> torch.Tensor:
        return sum(blk.logdet() for blk in self.blocks.values())


def _partner(name: str, this: str, other: str) -> str | None:
    """`name` with its last `this` replaced by `other` ("0.weight" -> "0.bias",
    "attn.in_proj_weight" -> "attn.in_proj_bias"), or None without `this`."""
    head, sep, tail = name.rpartition(this)
    return f"{head}{other}{tail}" if sep else None


def _pi(blk: KronBlock) -> torch.Tensor:
    """π per group [G, 1, 1]: √((tr A / dim A) / (tr B / dim B)) (Martens & Grosse, 2015)."""
    ta = torch.diagonal(blk.A, dim1=1, dim2=2).mean(-1)
    tb = torch.diagonal(blk.B, dim1=1, dim2=2).mean(-1)
    return torch.sqrt(ta / tb).view(-1, 1, 1)


def _factor_damped(blk: KronBlock, lam_a, lam_b) -> KronInverse:
    """(B + λ_B I)⁻¹ ⊗ (A + λ_A I)⁻¹ (λ scalars or [G, 1, 1])."""
    eye_a = torch.eye(blk.A.shape[-1], dtype=blk.A.dtype, device=blk.A.device)
    eye_b = torch.eye(blk.B.shape[-1], dtype=blk.B.dtype, device=blk.B.device)
    return KronBlock(blk.B + lam_b * eye_b, blk.A + lam_a * eye_a, blk.layout).inverse(0.0)


def _output_gram(adjoint: torch.Tensor, fac) -> torch.Tensor | None:
    """KFAC-expand's output factor B = Σ g gᵀ computed from the adjoint [col, *T.indices] by
    GEMMs, when the layer's factor network is the plain Gram matrix of g over a block of
    adjacent axes (its output legs; no groups, no output-side factors), else None (the
    compiled factor network computes B). torch.einsum reorders the big operand for this
    contraction; the batched product over the leading axes does not."""
    expr = fac.output_expr
    if fac.kind != "expand" or fac.split.group_legs or not isinstance(expr, Product) or \
            len(expr.factors) != 2:
        return None
    a, b = expr.factors
    if not all(isinstance(f, Variable) and f.name == fac.vector_name for f in (a, b)):
        return None
    ia, ib = a.occurrence, b.occurrence
    if len(set(ia)) != len(ia) or len(set(ib)) != len(ib):
        return None
    legs = [k for k in range(len(ia)) if ia[k] != ib[k]]
    summed = [ia[k] for k in range(len(ia)) if k not in legs]
    if not legs or tuple(ia[k] for k in legs) + tuple(ib[k] for k in legs) != expr.indices or \
            set(summed) & set(expr.indices) or legs[-1] == len(ia) - 1:
        return None
    first = legs[0] + 1                          # the adjoint has the column axis first
    if legs != list(range(legs[0], legs[0] + len(legs))):
        return None
    shape = adjoint.shape
    L = math.prod(shape[first:first + len(legs)])
    last = adjoint.movedim(tuple(range(first, first + len(legs))),
                           tuple(range(adjoint.dim() - len(legs), adjoint.dim())))
    if last.is_contiguous():                     # legs innermost in memory (channels last)
        Y = last.view(-1, L)
        return Y.T @ Y
    X = adjoint.reshape(math.prod(shape[:first]), L, -1)
    if X.shape[2] == 1:
        Y = X.reshape(-1, L)
        return Y.T @ Y
    return torch.bmm(X, X.mT).sum(0)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A CPU image batch [N, C, H, W] of a convolutional model in channels-last memory order
    (same values, same shape). The layout carries through the fused pass, and torch's CPU
    convolution kernels, above all the input VJPs (`conv_transpose2d` over col × batch), run
    about 2× faster on it (float32 and float64, the ResNet of benchmarks/operators.py)."""
    if t.dim() == 4 and t.is_floating_point() and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t
