"""`tnderive hessian-blocks`: structure of the Hessian blocks of a self-attention layer, or of
a whole transformer stack (`--blocks N`).

    tnderive hessian-blocks --seq 16 --dmodel 8 --dk 4 -o attn_report/
    tnderive hessian-blocks --blocks 2 --pre-ln --mlp gelu --params "*.q.weight" "*.fc1.weight" -o stack/
    tnderive hessian-blocks --module pkg.mod:factory --input-shape 1,16,8 --params "*fc1.weight" -o m/

derives every block (W_Q, W_K, W_V; optionally W_O and X) split into Gauss-Newton and
functional parts, and writes to the output folder
    report.md          the structure table (terms, X-degree, softmax order, norms, predicted
                       vs fitted log-log slopes when X is scaled by σ ∈ [1e-3, 1e-2])
    hessian.png        heatmap of the whole Hessian with block boundaries and norms (matplotlib)
    diagrams/*.svg     one diagram per block part (tnderive.draw)
    blocks.py          generated torch code, one function per block part
A stack (`--blocks N`, or a torch model `--module`, traced by `tnderive.from_module` with the
loading code of `tnderive kfac --module`) writes report.md, layers.png / params.png (norm
heatmaps) and diagrams/<p>__<q>_<part>.svg: the statements each part needs, one diagram per
statement (`tnderive.draw` of the part's network; --no-diagrams skips them).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Iterator

import torch

from ..attention import (draw_blocks, fit_slopes, heatmap, hessian_blocks, report_markdown,
                         report_rows, structure_seconds)
from ..draw import draw, warn_if_no_dot
from ..errors import TNError
from ..nn.attention import LOSSES, self_attention
from ..attention.stack_report import write_stack_report
from ..nn.transformer import from_model, transformer
from ..progress import progress
from ._common import ensure_folder, load_factory, parse_input_shape, parse_loss



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hessian-blocks", help="Hessian blocks of a self-attention layer or a transformer stack: "
                               "structure, slopes, code",
        description="Derive the Hessian blocks of one self-attention layer's loss, split each into\n"
                    "its Gauss-Newton (outer-product) and functional part, report their structure\n"
                    "(terms, degree in the data X, softmax derivative order, norms) and the\n"
                    "predicted vs fitted log-log slope of each block's norm when X is scaled by σ.",
        epilog="examples:\n  tnderive hessian-blocks --seq 16 --dmodel 8 --dk 4 --causal -o attn/\n"
               "  tnderive hessian-blocks --blocks 2 --post-ln --mlp gelu --params '*.q.weight' "
               "'*.fc1.weight' -o stack/\n"
               "  tnderive hessian-blocks --module mymodels:tiny --input-shape 1,16,8 "
               "--params '*.fc1.weight' -o tiny/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=16, help="sequence length L (default 16)")
    p.add_argument("--dmodel", type=int, default=8, help="model width d (default 8)")
    p.add_argument("--dk", type=int, default=4, help="key/query width d_k (default 4)")
    p.add_argument("--dv", type=int, default=None, help="value width (default d, or d_k with heads/W_O)")
    p.add_argument("--heads", type=int, default=1, help="number of heads (default 1)")
    p.add_argument("--loss", default="mse:mean", metavar="NAME[:REDUCTION]",
                   help="squared error (mse) or cross-entropy (ce), optionally :sum or :mean, "
                        "as for `tnderive kfac` (default mse:mean)")
    p.add_argument("--classes", type=int, default=4, help="classes of the cross-entropy read-out")
    p.add_argument("--causal", action="store_true", help="causal mask")
    p.add_argument("--linear", action="store_true", help="linear attention (no softmax)")
    p.add_argument("--out-proj", action="store_true", help="add the output projection W_O as a parameter")
    p.add_argument("--include-x", action="store_true", help="also the blocks with the data X")
    p.add_argument("--seed", type=int, default=0, help="seed of the random data and weights (default 0)")
    p.add_argument("--slopes", action=argparse.BooleanOptionalAction, default=True,
                   help="fit the σ-scaling slopes (default on; the slowest step at large --seq)")
    p.add_argument("--simplify", action=argparse.BooleanOptionalAction, default=True,
                   help="simplify the blocks with tnderive.simplify (default on)")
    g = p.add_argument_group("transformer stack (--blocks N)")
    g.add_argument("--blocks", type=int, default=0,
                   help="number of transformer blocks; 0 (default) = one self-attention layer")
    g.add_argument("--pre-ln", dest="pre_ln", action="store_true", default=True,
                   help="pre-LN blocks x + Attn(LN(x)) (default)")
    g.add_argument("--post-ln", dest="pre_ln", action="store_false", help="post-LN blocks LN(x + Attn(x))")
    g.add_argument("--norm", default="layer", choices=("layer", "layer_noaffine", "rms"),
                   help="LayerNorm with / without affine parameters, or RMSNorm (default layer)")
    g.add_argument("--mlp", default="gelu", choices=("gelu", "gelu_tanh", "relu", "silu", "tanh"),
                   help="MLP activation (default gelu, the erf form)")
    g.add_argument("--dmlp", type=int, default=None, help="MLP hidden width (default 2·d)")
    g.add_argument("--no-bias", dest="bias", action="store_false", help="no biases in linear maps")
    g.add_argument("--eps", type=float, default=1e-12,
                   help="norm ε (default 1e-12: ε ≪ σ² over the σ-fit range)")
    g.add_argument("--params", nargs="+", default=None,
                   metavar="PATTERN", help="parameters (fnmatch over torch-style names such as "
                   "b0.q.weight; default *.q.weight *.v.weight *.fc1.weight, with --module "
                   "every weight: *weight)")
    g.add_argument("--sigmas", type=float, nargs="+", default=[1e-3, 1e-2], metavar="σ",
                   help="σ values of the slope fit (default 1e-3 1e-2)")
    g.add_argument("--diagrams", action=argparse.BooleanOptionalAction, default=True,
                   help="statement diagrams of the outer and functional part of every block "
                        "(default on; needs Graphviz's dot)")
    m = p.add_argument_group("a torch model (--module)")
    m.add_argument("--module", metavar="PKG.MOD:FACTORY",
                   help="FACTORY() returns the nn.Module (importable from the current folder), "
                        "traced with tnderive.from_module at a random input; its parameters "
                        "keep their values, --loss goes on its output")
    m.add_argument("--input-shape", metavar="N,L,D",
                   help="with --module: the shape of the model's one (float) input, e.g. 1,16,8")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output folder (created as needed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


STAGES = ("deriving blocks", "σ-fit", "norms", "heatmap", "diagrams", "code")


@contextlib.contextmanager
def float64_and_threads(threads: int | None) -> Iterator[None]:
    """float64 as torch's default dtype (and `threads` intra-op threads, when given) for the
    duration of one command, restored afterwards: `main()` may run inside a user's process."""
    dtype, before = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(before)


def run(args) -> int:
    if args.module:
        return run_module(args)
    if args.blocks:
        return run_stack(args)
    for name in ("seq", "dmodel", "dk", "heads", "classes"):
        if getattr(args, name) < 1:
            raise TNError(f"--{name} must be positive, got {getattr(args, name)}")
    loss, reduction = parse_loss(args.loss, LOSSES)
    ensure_folder(args.output)
    ddir = ensure_folder(os.path.join(args.output, "diagrams"))
    warn_if_no_dot()   # one line on stderr; the report and code are written either way
    threads = 1 if args.seq * args.dmodel <= 4096 else None  # many small contractions
    with float64_and_threads(threads), progress("hessian-blocks", total=len(STAGES)) as bar:
        bar.note(STAGES[0])
        model = self_attention(args.seq, args.dmodel, args.dk, d_v=args.dv, heads=args.heads,
                               out_proj=args.out_proj, causal=args.causal, linear=args.linear,
                               loss=loss, reduction=reduction, classes=args.classes)
        blocks = hessian_blocks(model, params=tuple(model.params), include_X=args.include_x,
                                simplify=args.simplify)
        t_struct = structure_seconds(blocks)
        tensors = model.random_inputs(args.seed)
        bar.advance(note=STAGES[1])
        slopes, t_slopes = None, 0.0
        if args.slopes:
            t0 = time.perf_counter()
            slopes = fit_slopes(blocks, tensors)
            t_slopes = time.perf_counter() - t0
        bar.advance(note=STAGES[2])
        rows = report_rows(blocks, tensors, slopes)
        notes = _notes(args, model.options, blocks, t_struct, t_slopes if slopes else None)
        md = report_markdown(blocks, rows, "Self-attention Hessian blocks", notes)
        bar.advance(note=STAGES[3])
        png = heatmap(blocks, tensors, os.path.join(args.output, "hessian.png"))
        md += "\n" + ("![Hessian heatmap](hessian.png)\n" if png else "(matplotlib missing: no heatmap)\n")
        bar.advance(note=STAGES[4])
        drawn = draw_blocks(blocks, ddir)
        ok = [d for d in drawn if not d.startswith("(")]
        md += f"\nDiagrams: {len(ok)} in `diagrams/`" + (
            "" if len(ok) == len(drawn) else f" ({len(drawn) - len(ok)} skipped)") + ".\n"
        bar.advance(note=STAGES[5])
        code = _code(blocks)
        bar.advance()
    with open(os.path.join(args.output, "blocks.py"), "w", encoding="utf-8") as fh:
        fh.write(code)
    with open(os.path.join(args.output, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(md)
    print(md)
    print(f"wrote {args.output}/report.md, blocks.py" + (", hessian.png" if png else "") +
          f", {len(ok)} diagrams")
    return 0


def _notes(args, opts, blocks, t_struct: float, t_slopes: float | None) -> list[str]:
    """The report's notes: the layer, the timings, how slopes are predicted and fitted."""
    return [
        f"Layer: L={args.seq}, d={args.dmodel}, d_k={args.dk}, heads={args.heads}, "
        f"{'linear' if opts['linear'] else 'softmax'} attention{', causal' if opts['causal'] else ''}"
        f"{', W_O' if opts['out_proj'] else ''}; loss {opts['loss']} ({opts['reduction']}); "
        f"random data (seed {args.seed}), weights ~ N(0, 1/fan_in).",
        f"Derivation {blocks.seconds['derive']:.2f} s, simplification ({blocks.simplifier}) "
        f"{blocks.seconds['simplify']:.2f} s, expansion + structure {t_struct:.2f} s"
        + (f", σ-fit {t_slopes:.2f} s." if t_slopes is not None else "."),
        "Predicted slope = the smallest number of X factors outside softmax among a part's terms "
        "(softmax and its derivatives are O(1) as σ → 0; targets are O(1)); fitted = least-squares "
        "slope of log ‖block‖ vs log σ over σ ∈ [1e-3, 1e-2]. ≡0: identically zero (symbolically).",
    ]


def _code(blocks) -> str:
    """blocks.py: one generated function per block part."""
    code = ["\"\"\"Generated by `tnderive hessian-blocks`: one function per Hessian block part.",
            "Each takes the layer's tensors as keywords and returns the block with the layout of",
            "torch.func.hessian (first parameter's axes, then the second's).\"\"\"", "import torch", ""]
    for (p, q), b in blocks.items():
        for name, part in b.parts().items():
            src = part.program(fn_name=f"{p}_{q}_{name}").source
            code.append(src[src.index("import torch\n") + len("import torch\n"):].strip("\n"))
    return "\n\n".join(code)


def run_stack(args) -> int:
    """The `--blocks N` mode: a stack built by `tnderive.nn.transformer`."""
    for name in ("blocks", "seq", "dmodel", "heads", "classes"):
        if getattr(args, name) < 1:
            raise TNError(f"--{name} must be positive, got {getattr(args, name)}")
    loss, reduction = parse_loss(args.loss, LOSSES)
    model = transformer(args.blocks, seq=args.seq, d_model=args.dmodel, heads=args.heads,
                        d_mlp=args.dmlp or 2 * args.dmodel, pre_ln=args.pre_ln, norm=args.norm,
                        act=args.mlp, causal=args.causal, readout=True, classes=args.classes,
                        loss=loss, reduction=reduction, bias=args.bias, eps=args.eps)
    return _stack_outputs(args, model, args.params or ["*.q.weight", "*.v.weight", "*.fc1.weight"])


def run_module(args) -> int:
    """The `--module PKG.MOD:FACTORY` mode: a torch model traced by `tnderive.from_module`
    (loaded as `tnderive kfac --module` loads it), the loss on its output."""
    from ..models import from_module

    shape = parse_input_shape(args.input_shape, "1,16,8")
    loss, reduction = parse_loss(args.loss, LOSSES)
    module = load_factory(args.module)()
    imported = from_module(module.eval(), torch.randn(*shape))   # checked in float64
    model = from_model(imported, loss=loss, reduction=reduction)
    return _stack_outputs(args, model, args.params or ["*weight"])


def _stack_outputs(args, model, params) -> int:
    """Report, heatmaps and diagrams of a stack's blocks into --output."""
    ensure_folder(args.output)
    with float64_and_threads(1):
        md, written, blocks = write_stack_report(model, params, args.output, seed=args.seed,
                                                 sigmas=args.sigmas if args.slopes else (),
                                                 quiet=args.quiet)
        drawn = _draw_stack(blocks, os.path.join(args.output, "diagrams")) if args.diagrams else []
    print(md)
    ok = [d for d in drawn if not d.startswith("(")]
    print(f"wrote {', '.join(written)}" + (f", {len(ok)} diagrams in {args.output}/diagrams" if ok else ""))
    for line in drawn:
        if line.startswith("("):
            print(line)
    return 0


def _draw_stack(blocks, ddir: str, parts=("outer", "functional")) -> list[str]:
    """One SVG per block part: the statements the part needs (`tnderive.draw` of its
    network, one diagram per statement). Paths written, "(not drawn: ...)" for failures;
    nothing (one warning line) without Graphviz's dot."""
    if warn_if_no_dot():
        return []
    ensure_folder(ddir)
    model = blocks.model
    written = []
    for (p, q), b in blocks.items():
        for name in parts:
            part = b.parts()[name]
            if part.is_zero:
                continue
            tp, tq = (model.torch_names.get(v, v) for v in (p, q))
            path = os.path.join(ddir, f"{tp}__{tq}_{name}.svg")
            try:
                draw(part.own, path)
            except TNError as e:     # graphviz failed on this part: skip it, say why
                written.append(f"(not drawn: {path}: {e})")
                continue
            written.append(path)
    return written
