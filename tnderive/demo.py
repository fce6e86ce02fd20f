"""`tnderive demo`: derive, draw, compile and verify a handful of showcase results.

    run_demo(outdir="tnderive-demo", fast=False) -> list[Outcome]

Each showcase item derives one result symbolically, draws it (SVG), writes its generated
torch code, checks it numerically against torch (torch.func in float64, or the textbook
definition for KFAC factors) and records what / terms / cost / max error / time:

    attention     the 9 (W_Q, W_K, W_V) Hessian blocks of a self-attention layer (GN + functional)
    conv-kfac     KFAC-reduce input and output factors of a 3×3 convolution (no im2col); exact
                  (= GGN from torch.func) for a sum-pooled convolution and one datum
    mlp-hessian   Hessian blocks of a 2-layer tanh MLP with softmax cross-entropy
    bilinear-kfac KFAC of a user-defined bilinear layer y = W[o,i,j] x[i] z[j] (= GGN for one datum)

An item that raises or whose check exceeds the tolerance is a failure (non-zero exit code).
Without Graphviz's `dot` program the diagrams are skipped (one warning line) and everything
else runs as usual.

The helpers here (`Artifacts`, `notation`, `plan_cost`, `compare`) are shared with the
gallery scripts (`gallery/`): they write files deterministically (no timestamps, sorted
names) so regenerating leaves checked-in files byte-identical.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from . import progress
from .draw import warn_if_no_dot
from .errors import TNError

TOL = 1e-9

__all__ = ["Artifacts", "Check", "Outcome", "SHOWCASES", "run_demo", "format_table",
           "notation", "plan_cost", "compare", "count_terms", "warn_if_no_dot"]


# ============================================================================================
# shared helpers (demo + gallery)
# ============================================================================================

@dataclass
class Check:
    """One numerical check: max relative error of a derived tensor against a reference."""

    what: str
    max_rel_err: float
    tol: float = TOL

    @property
    def ok(self) -> bool:
        return self.max_rel_err == self.max_rel_err and self.max_rel_err <= self.tol  # NaN fails


def compare(got, ref) -> float:
    """Max relative error max|got − ref| / max|ref| (absolute when ref is all zero)."""
    import torch

    got = torch.as_tensor(got, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    if tuple(got.shape) != tuple(ref.shape):
        if got.numel() != ref.numel():
            return math.inf
        got = got.reshape(ref.shape)
    if ref.numel() == 0:
        return 0.0
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    return err / scale if scale > 0 else err


def notation(expr) -> str:
    """Index notation of `expr` (`str(expr)`), or a short note when it cannot be printed."""
    try:
        return str(expr)
    except TNError as e:  # the printer refuses what has no notation
        return f"# (not printable in index notation: {e})"


def count_terms(expr) -> int:
    """Number of additive terms (products of sums expanded); via tnderive.simplify."""
    from .simplify import count_terms as ct

    return int(ct(expr))


@dataclass
class Cost:
    """Contraction cost of generated code: symbolic FLOPs and numbers at the planned sizes."""

    symbolic: str
    flops: int
    naive: int

    def short(self) -> str:
        return _si(self.flops)


def _si(n: float) -> str:
    if n < 1000:
        return f"{int(n)}"
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= f:
            return f"{n / f:.3g}{unit}"
    return str(n)


def size_symbols(expr) -> set[str]:
    """Names of the size symbols in the shapes of `expr`'s nodes."""
    out: set[str] = set()
    for node in expr.walk():
        sizes = list(node.shape) + [c for c, _ in getattr(node, "terms", ())]
        sizes += [getattr(node, "size", None)]
        for s in sizes:
            out |= {str(x) for x in getattr(s, "free_symbols", ())}
    return out


def sizes_for(expr, sizes: Mapping[str, int] | None) -> dict[str, int]:
    """`sizes` restricted to the size symbols `expr` uses (codegen rejects others)."""
    used = size_symbols(expr)
    return {k: int(v) for k, v in (sizes or {}).items() if k in used}


def bind_coefficients(expr, sizes: Mapping[str, int] | None):
    """`expr` with size symbols in sum coefficients (e.g. `2·n` of a summed loss Hessian)
    replaced by their values from `sizes`; the code generator plans numbers only."""
    from .curvature import coefficients_at

    return coefficients_at(expr, sizes, strict=False) if sizes else expr


def specialise_sizes(expr, sizes: Mapping[str, int] | None):
    """`expr` with every size symbol that no variable's axis carries on its own (so no argument
    of generated code determines it, e.g. `o` of the identity δ(o, o') in a Hessian) replaced by
    its value from `sizes`. Returns (expr, {name: value} substituted)."""
    import sympy

    from .ir import map_sizes

    bound = {s for v in expr.variables.values() for s in v.axis_shape if isinstance(s, sympy.Symbol)}
    used = size_symbols(expr)
    values = {sympy.Symbol(k, integer=True, positive=True): sympy.Integer(v)
              for k, v in (sizes or {}).items() if k in used}
    values = {k: v for k, v in values.items() if k not in bound}
    if not values:
        return expr, {}

    def sz(x):
        return x.xreplace(values) if isinstance(x, sympy.Basic) else x

    substituted = {str(k): int(v) for k, v in sorted(values.items(), key=lambda kv: str(kv[0]))}
    return map_sizes(expr, sz, coefficients=True), substituted


def plan_cost(expr, sizes: Mapping[str, int] | None = None) -> Cost:
    """FLOPs of the contraction plan of `expr` (tnderive.codegen.plan)."""
    from tnderive.codegen import plan

    p = plan(expr, sizes=sizes_for(expr, sizes))
    return Cost(str(p.flops), int(p.flops_at()), int(p.naive_flops_at()))


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


class Artifacts:
    """Files and checks of one example, written under `outdir` (created).

    diagram(expr, stem)  -> stem.svg        steps(steps, stem) -> stem.svg (a derivation trace)
                         (both skipped, listed in `skipped`, without Graphviz's `dot`)
    code(expr, stem)     -> stem.py (standalone torch module), returns its `Cost`
    check(what, err)     records a numerical check; `verify(...)` runs tnderive.verify
    note(markdown)       appended to the example's README.md; `write_readme(...)` writes it
    """

    def __init__(self, outdir: str | os.PathLike, title: str, quiet: bool = False):
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.quiet = quiet
        self.files: list[str] = []
        self.images: list[tuple[str, str]] = []      # (file, caption)
        self.codes: list[tuple[str, str]] = []       # (file, caption)
        self.checks: list[Check] = []
        self.notes: list[str] = []
        self.costs: list[Cost] = []
        self.terms: list[int] = []
        self.skipped: list[str] = []                 # diagrams not drawn (no Graphviz `dot`)

    # ---- files ---------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.outdir / name

    def _add(self, name: str) -> None:
        if name not in self.files:
            self.files.append(name)
            progress.note(f"wrote {name}")

    def diagram(self, expr, stem: str, caption: str | None = None,
                title: str | None = None) -> Path | None:
        """Draw `expr` to `stem.svg` (None, nothing written, without Graphviz's `dot`)."""
        from .draw import dot_available, draw

        if not dot_available():
            self.skipped.append(f"{stem}.svg")
            return None
        path = self.path(f"{stem}.svg")
        draw(expr, str(path), title=title)
        _normalise_svg(path)
        self._add(path.name)
        self.images.append((path.name, caption or stem))
        return path

    def steps(self, steps, stem: str, caption: str | None = None) -> Path | None:
        """Draw a derivation trace (`simplify(..., trace=True)` steps) to `stem.svg` (None,
        nothing written, without Graphviz's `dot`)."""
        from .draw import dot_available, draw_steps

        if not dot_available():
            self.skipped.append(f"{stem}.svg")
            return None
        path = self.path(f"{stem}.svg")
        draw_steps(steps, str(path))
        _normalise_svg(path)
        self._add(path.name)
        self.images.append((path.name, caption or stem))
        return path

    def code(self, expr, stem: str, fn_name: str | None = None,
             sizes: Mapping[str, int] | None = None, caption: str | None = None) -> Cost | None:
        """Generated code for `expr` to `stem.py` (planned for `sizes`); returns the plan's cost."""
        from tnderive.codegen import codegen

        from .ir import Zero

        if isinstance(expr, Zero):
            self.note(f"{caption or stem} is identically zero (no code needed).")
            return None
        expr = bind_coefficients(expr, sizes)
        fixed: dict[str, int] = {}
        try:
            source = codegen(expr, fn_name or stem, sizes=sizes_for(expr, sizes))
        except TNError:
            # a size no argument determines (e.g. o of δ(o, o')): generate code for those sizes
            expr, fixed = specialise_sizes(expr, sizes)
            try:
                source = codegen(expr, fn_name or stem, sizes=sizes_for(expr, sizes))
            except TNError as e:
                self.note(f"No generated code for {caption or stem}: {e}")
                if not self.quiet:
                    print(f"    (no code for {stem}: {e})")
                return None
        if fixed:
            self.note(f"`{stem}.py` is specialised to " + ", ".join(f"{k} = {v}" for k, v in fixed.items())
                      + " (no argument's shape determines these sizes).")
        self.text(f"{stem}.py", source)
        self._run_generated(expr, source, fn_name or stem, sizes, f"{stem}.py")
        self.codes.append((f"{stem}.py", caption or stem))
        self.terms.append(count_terms(expr))
        cost = plan_cost(expr, sizes)
        self.costs.append(cost)
        return cost

    def _run_generated(self, expr, source: str, fn_name: str, sizes, filename: str) -> None:
        """Run the generated module on random float64 tensors; compare with tnderive.evaluate."""
        from tnderive.codegen import load

        from .evaluate import evaluate
        from .verify import random_tensors

        what = f"generated {filename} equals tnderive.evaluate"
        tensors = random_tensors(expr, sizes_for(expr, sizes), seed=7)
        want = evaluate(expr, sizes=sizes_for(expr, sizes) or None, **tensors)
        try:
            got = load(source, fn_name)(**tensors)
        except (ValueError, RuntimeError, TypeError, IndexError) as e:  # the generated code fails
            self.check(f"{what} ({type(e).__name__}: {e})", math.inf)
            return
        self.compare(what, got, want)

    def text(self, name: str, content: str) -> Path:
        path = self.path(name)
        if not content.endswith("\n"):
            content += "\n"
        path.write_text(content, encoding="utf-8", newline="\n")
        self._add(name)
        return path

    # ---- checks --------------------------------------------------------------------------------
    def check(self, what: str, err: float, tol: float = TOL) -> Check:
        c = Check(what, float(err), tol)
        self.checks.append(c)
        progress.note(f"checked {what}")
        if not self.quiet:
            progress.echo(f"    {'ok    ' if c.ok else 'FAILED'} {what}: max rel err {c.max_rel_err:.1e}")
        return c

    def compare(self, what: str, got, ref, tol: float = TOL) -> Check:
        return self.check(what, compare(got, ref), tol)

    def verify(self, what: str, expr, wrt, result=None, tensors=None, sizes=None, tol: float = TOL,
               **kw) -> Check:
        """`tnderive.verify` (torch.func reference, float64) recorded as a check."""
        from .verify import verify

        report = verify(expr, wrt, result=result, tensors=tensors, sizes=sizes, tol=tol, **kw)
        return self.check(what, report.max_rel_err, tol)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def max_err(self) -> float | None:
        return max((c.max_rel_err for c in self.checks), default=None)

    # ---- README --------------------------------------------------------------------------------
    def note(self, markdown: str) -> None:
        self.notes.append(markdown.strip("\n"))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
        text = markdown_table(header, rows)
        self.note(text)
        return text

    def write_readme(self, description: str = "", script: str | None = None) -> Path:
        """README.md of the example: description, notes, pictures inline, code, checks."""
        out = [f"# {self.title}", ""]
        if description:
            out += [description.strip(), ""]
        if script:
            out += [f"Script: [`{script}`](../{script})", ""]
        for n in self.notes:
            out += [n, ""]
        for name, cap in self.images:
            out += [f"**{cap}**", "", f"![{cap}]({name})", ""]
        if self.codes:
            out += ["Generated code (standalone, imports only torch):", ""]
            out += [f"- [`{name}`]({name}) — {cap}" for name, cap in self.codes]
            out.append("")
        if self.checks:
            out += ["Checks (float64, random inputs, relative tolerance shown):", ""]
            out += [f"- {'✓' if c.ok else '✗'} {c.what} (≤ {c.tol:g})" for c in self.checks]
            out.append("")
        return self.text("README.md", "\n".join(out))


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(lines)


def _normalise_svg(path: Path) -> None:
    """Drop graphviz's version/title comments so files do not change with the graphviz build."""
    import re

    text = path.read_text(encoding="utf-8")
    text = re.sub(r"<!-- Generated by graphviz.*?-->\n", "", text, flags=re.S)
    path.write_text(text, encoding="utf-8", newline="\n")


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure without timestamps or version metadata (deterministic bytes)."""
    import matplotlib

    suffix = path.suffix.lower()
    if suffix == ".svg":
        with matplotlib.rc_context({"svg.hashsalt": "tnderive", "svg.fonttype": "path"}):
            fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})
    else:
        fig.savefig(path, metadata={"Software": None} if suffix == ".png" else None)


# ============================================================================================
# showcase items
# ============================================================================================

@dataclass
class Outcome:
    """The demo's record of one showcase item."""

    key: str
    what: str
    status: str                      # "ok", "FAILED", "error"
    terms: int | None = None
    cost: str = ""
    max_err: float | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("FAILED", "error")


@dataclass
class Showcase:
    key: str
    what: str
    run: Callable[["Artifacts", bool], None]


def _attention(art: Artifacts, fast: bool) -> None:
    """All 9 (W_Q, W_K, W_V) Hessian blocks of one self-attention layer with mean squared loss,
    each split into Gauss-Newton and functional part; checked against torch.func.hessian."""
    import torch
    from torch.func import hessian

    from .attention import assemble, hessian_blocks
    from .nn.attention import self_attention

    L, d, dk = (3, 2, 2) if fast else (4, 3, 2)
    model = self_attention(seq=L, d_model=d, d_k=dk)
    blocks = hessian_blocks(model)
    tensors = model.random_inputs(seed=0)
    params = list(blocks.params)
    H, _ = assemble(blocks, tensors, "total")
    Ho, _ = assemble(blocks, tensors, "outer")
    Hf, _ = assemble(blocks, tensors, "functional")

    def loss(*ps):
        t = dict(tensors)
        t.update(zip(params, ps))
        return model.torch_loss(**t)

    n = [tensors[p].numel() for p in params]
    hs = hessian(loss, argnums=tuple(range(len(params))))(*[tensors[p] for p in params])
    ref = torch.cat([torch.cat([hs[i][j].reshape(n[i], n[j]) for j in range(len(params))], 1)
                     for i in range(len(params))], 0)
    art.compare("full (Q,K,V) Hessian vs torch.func.hessian", H, ref)
    art.compare("outer + functional = Hessian", Ho + Hf, ref)
    sizes = {k: int(v) for k, v in model.sizes.items()}
    for (p, q), b in blocks.items():
        if p == q or (p, q) == ("WQ", "WK"):
            art.code(b.total.expr, f"hessian_{p}_{q}", sizes=sizes, caption=f"block ({p}, {q})")
        else:
            art.terms.append(count_terms(b.total.expr))
            art.costs.append(plan_cost(b.total.expr, sizes))
    art.diagram(blocks["WQ", "WQ"].total.expr, "hessian_WQ_WQ", "the (W_Q, W_Q) block")
    rows = []
    for (p, q), b in blocks.items():
        st = {part: bp.structure for part, bp in b.parts().items()}
        rows.append((f"({p}, {q})", *(f"{st[k].n_terms} / " + ("–" if st[k].predicted_slope is None
                                                               else f"{st[k].predicted_slope:g}")
                                      for k in ("outer", "functional", "total"))))
    art.table(("block", "outer: terms / slope in σ", "functional: terms / slope", "total: terms / slope"), rows)
    known = {("WQ", "WQ"): (6, 5), ("WV", "WV"): (2, None), ("WV", "WQ"): (4, 3)}
    wrong = [(k, part) for k, slopes in known.items() for part, want in zip(("outer", "functional"), slopes)
             if getattr(blocks[k], part).structure.predicted_slope != want]
    art.check("predicted σ-slopes match the known ones (QQ 6/5, VV 2/0, VQ 4/3)",
              0.0 if not wrong else math.inf)
    zero = blocks["WV", "WV"].functional.is_zero
    art.check("functional (W_V, W_V) block is symbolically zero", 0.0 if zero else math.inf)


def _conv_kfac(art: Artifacts, fast: bool) -> None:
    """KFAC-reduce factors of a 3×3 convolution (stride 1, padding 1): the pattern is summed
    over its output index inside the network, so the unfolded input is never built. Checked
    against the unfold-based definition, and (for a sum-pooled convolution with one datum,
    where KFAC-reduce is exact) against the GGN from torch.func."""
    import torch

    from .kfac import kfac
    from .nn.conv import conv_network

    N, C, H, O = (2, 2, 5, 3) if fast else (4, 3, 8, 4)
    net = conv_network((N, C, H, H), (O, C, 3, 3), stride=1, padding=1, bias=False)
    f = kfac(net.expr, weight="W", batch="n", kind="reduce")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, H, generator=gen, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64)
    tensors = dict(net.prepare(x, w))
    A = f.input_factor(**tensors)
    u = torch.nn.functional.unfold(x, 3, padding=1)          # [N, C·9, P]
    P = u.shape[-1]
    us = u.sum(-1)
    art.compare("A (reduce) vs unfold definition", A.reshape(C * 9, C * 9), us.T @ us / (N * P * P))
    # output side: given vectors g at the layer output (as backpropagated gradients)
    gname = f.vector_name
    gshape = [*net(x, w).shape, 2]                           # [N, O, H, W, col]
    g = torch.randn(*gshape, generator=gen, dtype=torch.float64)
    gs = g.reshape(N, O, -1, gshape[-1]).sum(2)              # [N, O, col]
    g = g.reshape(N, 1, *gshape[1:])                          # network layout [n, g, c, o1, o2, col]
    B = f.output_factor(**{**tensors, gname: g})
    art.compare("B (reduce) vs summed output gradients", B.reshape(O, O),
                torch.einsum("nac,nbc->ab", gs, gs))
    _pooled_conv_exactness(art, C, O)
    sizes = {"n": N}
    art.diagram(f.input_expr, "kfac_reduce_A", "input-side factor A (reduce)")
    art.code(f.input_expr, "kfac_reduce_A", sizes=sizes, caption="input-side factor A (Σ over N)")
    art.code(f.output_expr, "kfac_reduce_B", sizes=sizes, caption="output-side factor B")


_POOLED = ("y[n,c] = W[c,e,k1,k2]*x[n,e,i1,i2]"
           "*pattern(stride=1, padding=1)[k1,o1,i1]*pattern(stride=1, padding=1)[k2,o2,i2]")


def _pooled_conv_exactness(art: Artifacts, C: int, O: int) -> None:
    """A convolution sum-pooled over its output pixels, then squared loss: for one datum,
    type-2 KFAC-reduce equals the GGN (checked with torch.func.jacrev)."""
    import torch
    from torch.func import jacrev

    from .evaluate import evaluate
    from .kfac import kfac
    from .notation import parse

    model = parse(_POOLED, sizes={"k1": 3, "k2": 3, "i1": 5, "i2": 5})
    f = kfac(model, weight="W", batch="n", kind="reduce", fisher="type-2", loss="mse")
    gen = torch.Generator().manual_seed(1)
    t = {"W": torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64),
         "x": torch.randn(1, C, 5, 5, generator=gen, dtype=torch.float64),
         "y": torch.randn(1, O, generator=gen, dtype=torch.float64)}
    blk = f.compute(**t)
    P, Q = blk.B.shape[-1], blk.A.shape[-1]
    dense = torch.kron(blk.B.reshape(P, P).contiguous(), blk.A.reshape(Q, Q).contiguous())
    J = jacrev(lambda w: evaluate(model, W=w, x=t["x"]))(t["W"]).reshape(O, -1)
    art.compare("sum-pooled conv: KFAC-reduce = GGN 2JᵀJ (torch.func), one datum", dense, 2 * J.T @ J)


_MLP = """h[n,j] = tanh(W1[j,i]*x[n,i] + b1[j])
z[n,c] = W2[c,j]*h[n,j] + b2[c]
loss = sum(logsumexp(z[n,c], c)) - sum(t[n,c]*z[n,c])"""


def _mlp(art: Artifacts, fast: bool) -> None:
    """Hessian blocks of a 2-layer tanh MLP with softmax cross-entropy, against torch.func."""
    from .derive import hessian
    from .notation import parse
    from .simplify import simplify
    from .verify import random_tensors

    expr = parse(_MLP)
    sizes = {"n": 3, "i": 3, "j": 2, "c": 2} if fast else {"n": 4, "i": 4, "j": 3, "c": 3}
    tensors = random_tensors(expr, sizes, seed=0)
    blocks = [("W1", "W1"), ("W1", "W2"), ("W2", "W2")]
    for a, b in blocks:
        h = simplify(hessian(expr, a, b))
        art.verify(f"∂²ℓ/∂{a}∂{b} vs torch.func", expr, [a, b], result=h, tensors=tensors)
        art.code(h, f"hessian_{a}_{b}", sizes=sizes, caption=f"block ({a}, {b})")
        if (a, b) == ("W1", "W1"):
            art.diagram(h, "hessian_W1_W1", "the (W1, W1) block")


def _bilinear_kfac(art: Artifacts, fast: bool) -> None:
    """KFAC (type-2, MSE) of a user-defined bilinear layer y[n,o] = W[o,i,j] x[n,i] z[n,j]; for a
    single datum type-2 KFAC equals the exact GGN, checked against torch.func."""
    import torch
    from torch.func import jacrev

    from .evaluate import evaluate
    from .kfac import kfac
    from .notation import parse

    layer = parse("y[n,o] = W[o,i,j]*x[n,i]*z[n,j]")
    O, I, J = (2, 2, 2) if fast else (3, 3, 2)
    f = kfac(layer, weight="W", batch="n", kind="expand", fisher="type-2", loss="mse")
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(O, I, J, generator=gen, dtype=torch.float64)
    for N in (1, 5):
        x = torch.randn(N, I, generator=gen, dtype=torch.float64)
        z = torch.randn(N, J, generator=gen, dtype=torch.float64)
        t = {"W": W, "x": x, "z": z, "y": torch.randn(N, O, generator=gen, dtype=torch.float64)}
        blk = f.compute(**t)
        if N == 1:
            Jw = jacrev(lambda w: evaluate(layer, W=w, x=x, z=z))(W).reshape(N * O, -1)
            ggn = 2 * Jw.T @ Jw                                  # MSE (sum): loss Hessian 2I
            dense = torch.kron(blk.B.reshape(O, O).contiguous(), blk.A.reshape(I * J, I * J).contiguous())
            art.compare("KFAC = GGN (torch.func) for one datum", dense, ggn)
        else:
            a = torch.einsum("ni,nj->nij", x, z).reshape(N, -1)
            A = a.T @ a / N
            art.compare("A = E[(x⊗z)(x⊗z)ᵀ] for a batch of 5", f.input_factor(**t).reshape(I * J, I * J), A)
    sizes = {"n": 5, "o": O, "i": I, "j": J}
    art.diagram(f.input_expr, "kfac_A", "input-side factor A (W removed)")
    art.code(f.input_expr, "kfac_A", sizes=sizes, caption="input-side factor A")
    art.code(f.output_expr, "kfac_B", sizes=sizes, caption="output-side factor B")


SHOWCASES: list[Showcase] = [
    Showcase("attention", "self-attention Hessian blocks (Q,K,V)", _attention),
    Showcase("conv-kfac", "KFAC-reduce, 3x3 convolution", _conv_kfac),
    Showcase("mlp-hessian", "2-layer MLP Hessian blocks (tanh, CE)", _mlp),
    Showcase("bilinear-kfac", "KFAC of a user-defined bilinear layer", _bilinear_kfac),
]


# what a failing item raises: ours (TNError), torch's, a missing optional module, a file error;
# a programming error (NameError, AttributeError, ...) propagates
ITEM_ERRORS = (TNError, ValueError, RuntimeError, ArithmeticError, ImportError, OSError)


def run_item(item: Showcase, outdir: Path, fast: bool, quiet: bool = True) -> Outcome:
    """Run one item into `outdir/<key>/`; never raises (set TNDERIVE_DEMO_RAISE=1 to debug)."""
    art = Artifacts(outdir / item.key, item.what, quiet=quiet)
    t0 = time.perf_counter()
    try:
        item.run(art, fast)
    except ITEM_ERRORS as e:  # an item's failure is reported in its row, the run goes on
        if os.environ.get("TNDERIVE_DEMO_RAISE"):
            raise
        return Outcome(item.key, item.what, "error", seconds=time.perf_counter() - t0,
                       note=f"{type(e).__name__}: {e}".splitlines()[0][:200],
                       files=[_rel(art.path(f), outdir) for f in art.files])
    seconds = time.perf_counter() - t0
    art.write_readme((item.run.__doc__ or "").strip().replace("\n    ", "\n"))
    failed = [c for c in art.checks if not c.ok]
    note = "; ".join(f"{c.what}: {c.max_rel_err:.1e}" for c in failed)
    flops = sum(c.flops for c in art.costs)
    return Outcome(item.key, item.what, "ok" if art.ok else "FAILED", terms=sum(art.terms) or None,
                   cost=_si(flops) if art.costs else "", max_err=art.max_err, seconds=seconds,
                   files=[_rel(art.path(f), outdir) for f in art.files], note=note)


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Plain-text summary table (what, status, terms, cost, max error, time)."""
    header = ("what", "status", "terms", "cost (FLOPs)", "max rel err", "time")
    rows = [(o.what, o.status, "" if o.terms is None else str(o.terms), o.cost,
             "" if o.max_err is None else f"{o.max_err:.1e}", f"{o.seconds:.1f} s") for o in outcomes]
    widths = [max(len(h), *(len(r[k]) for r in rows)) if rows else len(h) for k, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(w) if k < 2 else c.rjust(w)  # noqa: E731
                              for k, (c, w) in enumerate(zip(r, widths))).rstrip()
    lines = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
    return "\n".join(lines)


def write_summary(outcomes: Sequence[Outcome], outdir: Path, total: float) -> Path:
    rows = [(o.what, o.status, "" if o.terms is None else o.terms, o.cost,
             "" if o.max_err is None else f"{o.max_err:.1e}", f"{o.seconds:.1f} s",
             ", ".join(f"[{Path(f).name}]({f})" for f in o.files if not f.endswith("README.md")))
            for o in outcomes]
    text = ["# tnderive demo", "",
            "Every result below was derived symbolically, simplified, drawn, compiled to torch code "
            "and checked numerically in float64.", "",
            markdown_table(("what", "status", "terms", "cost (FLOPs)", "max rel err", "time", "files"), rows),
            "", f"Total: {total:.1f} s.", ""]
    for o in outcomes:
        if o.note:
            text.append(f"- {o.what}: {o.note}")
    path = outdir / "summary.md"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def run_demo(outdir: str | os.PathLike = "tnderive-demo", fast: bool = False,
             only: Sequence[str] | None = None, verbose: bool = False,
             out=None) -> list[Outcome]:
    """Run the showcase items, print progress and the summary table, write `outdir/`."""
    out = out or sys.stdout
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    items = [s for s in SHOWCASES if not only or s.key in only]
    unknown = sorted(set(only or ()) - {s.key for s in SHOWCASES})
    if unknown:
        raise TNError(f"unknown showcase item(s) {unknown}; choose from {[s.key for s in SHOWCASES]}")
    t_all = time.perf_counter()
    print(f"tnderive demo: {len(items)} showcase results -> {outdir}/", file=out, flush=True)
    warn_if_no_dot()
    outcomes = []
    for k, item in enumerate(items, 1):
        print(f"[{k}/{len(items)}] {item.what} ...", file=out, flush=True)
        with progress.progress(f"  {item.key}"):
            o = run_item(item, outdir, fast, quiet=not verbose)
        extra = f" ({o.note})" if o.note else ""
        print(f"      {o.status} in {o.seconds:.1f} s{extra}", file=out, flush=True)
        outcomes.append(o)
    total = time.perf_counter() - t_all
    print("", file=out)
    print(format_table(outcomes), file=out)
    path = write_summary(outcomes, outdir, total)
    n_fail = sum(o.failed for o in outcomes)
    print(f"\n{len(outcomes) - n_fail} ok, {n_fail} failed in {total:.1f} s; summary: {path}",
          file=out, flush=True)
    return outcomes
