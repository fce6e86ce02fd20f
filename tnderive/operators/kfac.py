"""`tnderive.KFAC(module, loss_func, params, data, kind=..., fisher=...)`: KFAC of a torch model
with curvlinops' conventions, one `KronBlock` per weight.

Each weight's statement in the model program is a layer network (`Statement.text()`): its KFAC
factors come from `tnderive.kfac` on it (input side A from the layer's inputs; output side B from
vectors g given at the layer output). g are the loss-Hessian square-root columns (type-2), or the
loss gradient at sampled (mc) / true (empirical) targets, pulled back to every layer output by
ONE fused network per input shape (`tnderive.operators.kfac_network`: the forward pass, the
vectors, and one reverse pass carrying all columns at once; an image batch enters it in
channels-last memory order on the CPU, where torch's convolution kernels are faster on it).
On the CPU a batch runs in micro-batches (`operators.batching`: pieces whose widest pass
tensor stays within a few MB). Factors of several batches, and of the pieces of one, are
summed as curvlinops sums batches: A weighted by the batch's share of the data, B too for a
mean reduction; so pieces give the factors of the whole batch.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import nn

from ..codegen import compile as tn_compile
from ..constants import build_constant
from ..derive import grad
from ..errors import TNError
from ..ir import Constant, Product, Variable
from ..kfac import kfac as derive_kfac
from ..kronecker import KronBlock, KronInverse
from ..models.model import Model, from_module
from ..notation import parse
from ..patterns import resolve_padding
from ..progress import track
from .batching import check_micro_batch, pieces, plan, sqrt_columns
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
    micro_batch: "auto" (on the CPU, each batch is split into pieces whose widest pass tensor
               fits `operators.batching.MICRO_BATCH_BYTES`; whole batches elsewhere), None
               (whole batches) or k (pieces of at most k samples); the factors do not change
    blocks:    torch parameter name -> KronBlock (with joint blocks under the weight's name)
    """

    label = "KFAC"

    def __init__(self, module: nn.Module, loss_func: nn.Module, params: Sequence[torch.Tensor],
                 data: Iterable, kind: str = "expand", fisher: str = "type-2",
                 separate_weight_and_bias: bool = True, mc_samples: int = 1, seed: int = 2147483647,
                 progressbar: bool = True, check: bool = True, micro_batch="auto"):
        if kind not in KINDS:
            raise TNError(f"kind must be one of {KINDS}, got {kind!r}")
        if fisher not in FISHERS:
            raise TNError(f"fisher must be one of {FISHERS}, got {fisher!r}")
        check_micro_batch(micro_batch)
        super().__init__(module, loss_func, params, data, progressbar, check)
        self.kind, self.fisher = kind, fisher
        self.joint = not separate_weight_and_bias
        self.mc_samples, self.seed = mc_samples, seed
        self.micro_batch = micro_batch
        self._layers: dict[tuple, list[_Layer]] = {}
        self._networks: dict[tuple, tuple[Model, list[_Layer], KFACNetwork]] = {}
        self._loss_grads: dict[tuple, tuple] = {}
        self._pieces: dict[tuple, list[int]] = {}
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

    def _sampled_targets(self, parts: list, generator) -> tuple[torch.Tensor, list]:
        """mc: the model output f of the whole batch (the pieces' outputs joined) and
        `mc_samples` targets drawn from it, so the draws do not depend on the pieces."""
        f = torch.cat([net.forward(**{k: v for k, v in tensors.items()
                                      if k in net.forward.signature})
                       for _, net, tensors, _ in parts])
        return f, [self.loss.sample_target(f, f.dim() - 1, generator)
                   for _ in range(self.mc_samples)]

    def _sampled_vectors(self, f: torch.Tensor, targets: list) -> torch.Tensor:
        """mc: the loss gradients at output f (a piece's rows) and the sampled `targets` (its
        rows), stacked on a last column axis [*f.shape, mc_samples]."""
        key = tuple(f.shape)
        if key not in self._loss_grads:
            F = Variable("F", tuple(f"f{k}" for k in range(f.dim())), shape=key)
            self._loss_grads[key] = (tn_compile(grad(self.loss.expr(F), "F"), "loss_grad"),
                                     self.loss.target_variable(F).name)
        fn, target = self._loss_grads[key]
        return torch.stack([fn(F=f, **{target: t}) for t in targets], -1)

    def _scale(self, model: Model) -> float:
        """The factor B is multiplied by: 1 (type-2), 1/reduction scale (empirical; mc
        divided by the number of samples too), so that B estimates the type-2 factor."""
        if self.fisher == "type-2":
            return 1.0
        out = model.output
        F = Variable("F", tuple(f"f{k}" for k in range(len(out.shape))), shape=tuple(out.shape))
        scale = 1.0 / float(self.loss.scale(F))
        return scale / self.mc_samples if self.fisher == "mc" else scale

    # ---------------------------------------------------------------- micro-batches
    def micro_batches(self, X: torch.Tensor) -> list[int]:
        """The sizes of the pieces a batch like X is split into (`operators.batching.plan`):
        the fused pass carries every vector column, and pieces keep its tensors small. One
        piece when a statement mixes samples (then only the whole batch is exact)."""
        key = (tuple(X.shape), X.dtype, X.device)
        if key not in self._pieces:
            def columns(model: Model) -> int:
                if self.fisher == "type-2":
                    return sqrt_columns(self.loss, model)
                return self.mc_samples if self.fisher == "mc" else 1
            self._pieces[key] = plan(self.module, X, columns, self.micro_batch)
        return self._pieces[key]

    def _piece_inputs(self, X: torch.Tensor) -> list[tuple]:
        """(rows, fused pass, its input tensors, (model, layers)) per piece of the batch X."""
        out = []
        for rows in pieces(self.micro_batches(X)):
            Xp = X[rows]
            model, layers, net = self.network(Xp)
            tensors = model.tensors(Xp)
            if net.convolutional:
                for a in model.inputs:
                    tensors[a.name] = _channels_last(tensors[a.name])
            out.append((rows, net, tensors, (model, layers)))
        return out

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
            parts = self._piece_inputs(X)
            if self.fisher == "mc":
                f, targets = self._sampled_targets(parts, generator)
            for rows, net, tensors, (model, layers) in parts:
                target = vectors = None
                if net.target is not None:
                    target = torch_target(self.loss, y[rows].to(self.device), model.output.shape,
                                          self.dtype)
                if net.vectors is not None:
                    vectors = self._sampled_vectors(f[rows], [t[rows] for t in targets])
                env = {**tensors, **net(tensors, target, vectors)}
                grams: dict = {}
                scale = self._scale(model)
                share = (rows.stop - rows.start) / total
                wb = share if self.reduction == "mean" else 1.0
                for l in layers:
                    for name, blk in self._layer_blocks(model, l, net, env, grams).items():
                        A = blk.A * share
                        B = blk.B * (wb * scale)
                        if name in acc:
                            acc[name][0] += B
                            acc[name][1] += A
                        else:
                            acc[name] = [B, A]
                            layouts[name] = blk.layout
                del env, grams
        torch_names = {v: k for k, v in model.param_names.items()}
        self.blocks = {torch_names[n]: KronBlock(B, A, layouts[n]) for n, (B, A) in acc.items()}
        covered = set(self.blocks) | {b for w in self.blocks if (b := self._joint_bias(w))}
        missing = [n for n in self.param_names if n not in covered]
        if missing:
            raise TNError(f"KFAC: no Kronecker block for {missing} (a bias needs its weight "
                          f"among params, in the same layer)")

    def _layer_blocks(self, model: Model, l: _Layer, net: KFACNetwork, env: dict,
                      grams: dict) -> dict:
        """One batch's KronBlocks of a layer (weight, and its bias separately or jointly)
        from the pass's values `env`: the layer's inputs and the adjoint of its output.
        `grams`: output factors B by (adjoint, factor network), shared by layers whose outputs
        have one adjoint (a residual block's second conv and its skip conv)."""
        st = model.statements[l.j]
        adjoint = net.adjoints[st.target.name]
        if adjoint:
            g = env[adjoint].movedim(0, -1)            # g_[*T.indices, col]
            key = (adjoint, l.fac.output_expr)
            if key not in grams:
                grams[key] = _output_gram(env[adjoint], l.fac)
            B = grams[key]
        else:                                          # the output does not depend on T
            g = torch.zeros(*st.target.shape, 1, dtype=self.dtype, device=self.device)
            B = None
        tensors = {a.name: env[a.name] for a in st.uses}
        A = _conv_input_gram(l.fac, tensors) if self.kind == "expand" else \
            _conv_reduce_input(l.fac, tensors)
        res = l.fac.compute(**tensors, g_=g, b_factor=B, a_factor=A)
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
    """The output factor B = Σ g gᵀ (unnormalised) computed from the adjoint [col, *T.indices]
    by a sum and a GEMM, when the layer's factor network is the plain Gram matrix of g: two
    copies of g whose axes are output legs (the Gram's rows and columns, adjacent), axes
    summed jointly (batch, columns, expand's positions) and axes summed in each copy apart
    (reduce's positions, summed first); no groups, no output-side factors. Else None (the
    compiled factor network computes B). torch reduces and multiplies the adjoint in its own
    memory order (channels last) faster than the reordered view the network gets."""
    expr = fac.output_expr
    if fac.split.group_legs or not isinstance(expr, Product) or len(expr.factors) != 2:
        return None
    a, b = expr.factors
    if not all(isinstance(f, Variable) and f.name == fac.vector_name for f in (a, b)):
        return None
    ia, ib = a.occurrence, b.occurrence
    if len(set(ia)) != len(ia) or len(set(ib)) != len(ib) or len(ia) != adjoint.dim():
        return None
    out = expr.indices
    legs = [k for k in range(len(ia)) if ia[k] != ib[k] and ia[k] in out]
    apart = [k for k in range(len(ia)) if ia[k] != ib[k] and ia[k] not in out]
    joint = [k for k in range(len(ia)) if ia[k] == ib[k]]
    if not legs or tuple(ia[k] for k in legs) + tuple(ib[k] for k in legs) != out or \
            {ia[k] for k in joint} & set(out) or set(ia) & set(ib) != {ia[k] for k in joint} or \
            any(ib[k] in out for k in apart) or len(ia) - 1 not in joint:
        return None
    # g_ axis k is adjoint axis k + 1 (the column axis, g_'s last, is the adjoint's first)
    if apart:
        adjoint = adjoint.sum(dim=tuple(k + 1 for k in apart))
        legs = [k - sum(1 for j in apart if j < k) for k in legs]
    if legs != list(range(legs[0], legs[0] + len(legs))):
        return None
    first = legs[0] + 1
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


def _image_and_constants(fac, tensors: dict, kind: str, constant: str) -> tuple | None:
    """(x variable, x, constant on the first spatial axis, constant on the second) when the
    `kind` factor's input side is one 4-d image x[n, e, i1, i2] times two constants of kind
    `constant` (`pattern` [k, o, i] or `pattern_sum` [k, i]), one per spatial input axis, with
    batch n and the weight's input legs (e, k1, k2) (the constants' first indices)."""
    expr = fac.input_side_expr
    if fac.kind != kind or fac.split.group_legs or not isinstance(expr, Product) or \
            len(expr.factors) != 3:
        return None
    xs = [f for f in expr.factors if isinstance(f, Variable)]
    cs = [f for f in expr.factors if isinstance(f, Constant) and f.kind == constant]
    if len(xs) != 1 or len(cs) != 2 or xs[0].name not in tensors:
        return None
    x_var, x = xs[0], tensors[xs[0].name]
    if x.dim() != 4 or len(x_var.indices) != 4 or len(set(x_var.indices)) != 4:
        return None
    by_input = {c.indices[-1]: c for c in cs}
    n, e, i1, i2 = x_var.indices
    if set(by_input) != {i1, i2}:
        return None
    rows, cols = by_input[i1], by_input[i2]
    if fac.split.batch != n or fac.split.in_legs != (e, rows.indices[0], cols.indices[0]):
        return None
    return x_var, x, rows, cols


def _conv_input_gram(fac, tensors: dict) -> torch.Tensor | None:
    """KFAC-expand's input factor A = Σ_{n,o} X Xᵀ / (N·S) of a 2-d convolution, stride 1 and
    dilation 1 along its first spatial axis (any padding; dilation 1 along the second), without
    the unfolded input X [N·S, C·K1·K2]: with Z[h, (c, k2), (n, o2)] the input unfolded along
    the second axis only (K2 taps), the block of taps (k1, k1 + d) is Σ_{h = k1}^{k1 + O1 − 1}
    Z[h] Z[h + d]ᵀ, so K1 batched GEMMs over the rows h (d = 0 … K1 − 1; the blocks below
    the diagonal are transposes) replace the Gram of X: ≈ H / (K1·O1) of its flops (a third
    for 3×3), and a K2-fold instead of a K1·K2-fold copy of the input. None when the input
    side is not that (then the factor network and one Gram matrix compute A)."""
    found = _image_and_constants(fac, tensors, "expand", "pattern")
    if found is None:
        return None
    x_var, x, rows, cols = found
    n, e, _, _ = x_var.indices
    (k1, o1, _), (k2, o2, _) = rows.indices, cols.indices
    if fac.input_side_expr.indices != (n, o1, o2, e, k1, k2) or fac.split.positions != (o1, o2):
        return None
    if rows.params[0] != 1 or rows.params[3] != 1 or cols.params[3] != 1:
        return None
    S2 = cols.params[0]
    K1, O1, _ = (int(v) for v in rows.shape)
    K2, O2, _ = (int(v) for v in cols.shape)
    (pt, pb), (pl, pr) = resolve_padding(rows.params, K1), resolve_padding(cols.params, K2)
    xp = torch.nn.functional.pad(x, (pl, pr, pt, pb))
    N, C, H, W = xp.shape
    if H - K1 + 1 != O1 or (W - K2) // S2 + 1 != O2:
        return None
    Z = xp.unfold(3, K2, S2).permute(2, 1, 4, 0, 3).reshape(H, C * K2, N * O2)
    A = x.new_empty(C, K1, K2, C, K1, K2)
    for d in range(K1):
        P = torch.bmm(Z[:H - d], Z[d:].mT)              # [H − d, C·K2, C·K2]: rows h, h + d
        for k in range(K1 - d):
            blk = P[k:k + O1].sum(0).view(C, K2, C, K2)
            A[:, k, :, :, k + d, :] = blk
            if d:
                A[:, k + d, :, :, k, :] = blk.permute(2, 3, 0, 1)
    return A / (N * O1 * O2)


def _conv_reduce_input(fac, tensors: dict) -> torch.Tensor | None:
    """KFAC-reduce's input factor A = Σ_n s sᵀ / (N·S²) of a 2-d convolution, s = Σ_pos X
    [C·K1·K2]: its network Σ_{i1,i2} x[n,e,i1,i2]·Σ1[k1,i1]·Σ2[k2,i2] (Σ the patterns summed
    over their outputs) as two small matrix products Σ1 · x · Σ2ᵀ on x as it is, then one
    Gram matrix; None for any other input side (then the factor network computes A)."""
    found = _image_and_constants(fac, tensors, "reduce", "pattern_sum")
    if found is None:
        return None
    x_var, x, rows, cols = found
    n, e, _, _ = x_var.indices
    if fac.input_side_expr.indices != (n, e, rows.indices[0], cols.indices[0]):
        return None
    shape1, shape2 = tuple(int(v) for v in rows.shape), tuple(int(v) for v in cols.shape)
    if shape1[1] != x.shape[2] or shape2[1] != x.shape[3]:
        return None
    sum1 = build_constant(rows.kind, rows.params, shape1, x.device, x.dtype)     # [K1, I1]
    sum2 = build_constant(cols.kind, cols.params, shape2, x.device, x.dtype)     # [K2, I2]
    positions = 1
    for (K, I), params in ((shape1, rows.params), (shape2, cols.params)):
        pl, pr = resolve_padding(params, K)
        positions *= (I + pl + pr - params[3] * (K - 1) - 1) // params[0] + 1
    N = x.shape[0]
    rs = (sum1 @ x @ sum2.mT).reshape(N, -1)                   # [N, C·K1·K2]
    A = rs.T @ rs / (N * positions * positions)
    return A.view(*x.shape[1:2], *shape1[:1], *shape2[:1], *x.shape[1:2], *shape1[:1],
                  *shape2[:1])


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """A CPU image batch [N, C, H, W] of a convolutional model in channels-last memory order
    (same values, same shape). The layout carries through the fused pass, and torch's CPU
    convolution kernels, above all the input VJPs (`conv_transpose2d` over col × batch), run
    about 2× faster on it (float32 and float64, the ResNet of benchmarks/operators.py)."""
    if t.dim() == 4 and t.is_floating_point() and t.device.type == "cpu":
        return t.contiguous(memory_format=torch.channels_last)
    return t
