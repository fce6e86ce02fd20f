"""Convolution forward / input VJP / weight VJP: tnderive vs torch.nn.functional vs einconv.

    python benchmarks/conv.py [--repeats 5] [--threads 1] [--only NAME ...] [--no-write]

Layers: the convolutions of ResNet-18 (general and 1×1 stride-2 shortcuts), a ConvNeXt/ViT
patchify stem (K = S = 4 and 16, dense), MobileNetV2 depthwise layers; batch 8, float32, CPU.

* tnderive forward: `tnderive.nn.functional.conv2d` (the network evaluated by
  `tnderive.evaluate`: its one product lowers to a call of torch's convolution kernel,
  `codegen.convolution`); VJPs: `Network.vjp(name)` — derived with `tnderive.vjp` on the
  network, simplified once, lowered the same way (torch's weight-VJP and input-VJP kernels;
  for non-overlapping windows one matmul and one copy into the layout, or views; for the
  7×7 stem one matmul per group of images and one add per kernel tap).
* torch: `F.conv2d`; VJPs: `torch.autograd.grad` on a graph built once (backward only).
* einconv (optional peer): `einconv.functionals.convNd`; VJPs: its input/weight-VJP einsum expressions
  (built and contracted each call, as its functional API does).

Rounds are interleaved (every implementation once per round), medians reported. The section
between the conv markers of benchmarks/RESULTS.md is replaced.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from _results import keeps_peer_figures, write_section
from _steady import steady_allocator
from tnderive.nn import functional as T
from tnderive.nn.conv import conv_network

try:  # optional peer
    import einconv
    from einconv.expressions import convNd_input_vjp, convNd_weight_vjp
    from einconv.functionals import convNd as einconv_convNd
except ImportError:  # pragma: no cover
    einconv = None


# name, group, x shape, weight shape, stride, padding, groups
LAYERS = [
    ("resnet18.conv1 7x7/2", "general", (8, 3, 224, 224), (64, 3, 7, 7), 2, 3, 1),
    ("resnet18.layer1 3x3", "general", (8, 64, 56, 56), (64, 64, 3, 3), 1, 1, 1),
    ("resnet18.layer2.0 3x3/2", "general", (8, 64, 56, 56), (128, 64, 3, 3), 2, 1, 1),
    ("resnet18.layer2 3x3", "general", (8, 128, 28, 28), (128, 128, 3, 3), 1, 1, 1),
    ("resnet18.layer3.0 3x3/2", "general", (8, 128, 28, 28), (256, 128, 3, 3), 2, 1, 1),
    ("resnet18.layer3 3x3", "general", (8, 256, 14, 14), (256, 256, 3, 3), 1, 1, 1),
    ("resnet18.layer4.0 3x3/2", "general", (8, 256, 14, 14), (512, 256, 3, 3), 2, 1, 1),
    ("resnet18.layer4 3x3", "general", (8, 512, 7, 7), (512, 512, 3, 3), 1, 1, 1),
    ("resnet18.layer2 shortcut 1x1/2", "down-sampling", (8, 64, 56, 56), (128, 64, 1, 1), 2, 0, 1),
    ("resnet18.layer3 shortcut 1x1/2", "down-sampling", (8, 128, 28, 28), (256, 128, 1, 1), 2, 0, 1),
    ("resnet18.layer4 shortcut 1x1/2", "down-sampling", (8, 256, 14, 14), (512, 256, 1, 1), 2, 0, 1),
    ("convnext patchify 4x4/4", "dense", (8, 3, 224, 224), (96, 3, 4, 4), 4, 0, 1),
    ("vit patchify 16x16/16", "dense", (8, 3, 224, 224), (768, 3, 16, 16), 16, 0, 1),
    ("mobilenetv2 dw 3x3 c32", "depthwise", (8, 32, 112, 112), (32, 1, 3, 3), 1, 1, 32),
    ("mobilenetv2 dw 3x3/2 c96", "depthwise", (8, 96, 112, 112), (96, 1, 3, 3), 2, 1, 96),
    ("mobilenetv2 dw 3x3 c144", "depthwise", (8, 144, 56, 56), (144, 1, 3, 3), 1, 1, 144),
    ("mobilenetv2 dw 3x3 c384", "depthwise", (8, 384, 14, 14), (384, 1, 3, 3), 1, 1, 384),
    ("mobilenetv2 dw 3x3 c960", "depthwise", (8, 960, 7, 7), (960, 1, 3, 3), 1, 1, 960),
]


def implementations(x, w, v, stride, padding, groups):
    """{op: {impl: zero-argument callable}} for one layer."""
    kw = dict(stride=stride, padding=padding, groups=groups)
    net = conv_network(tuple(x.shape), tuple(w.shape), bias=False, **kw)
    in_vjp, w_vjp = net.vjp("x"), net.vjp("W")
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.conv2d(xg, wg, **kw)
    ops = {
        "forward": {"torch": lambda: F.conv2d(x, w, **kw), "tnderive": lambda: T.conv2d(x, w, **kw)},
        "input VJP": {"torch": lambda: torch.autograd.grad(y, xg, v, retain_graph=True)[0],
                      "tnderive": lambda: in_vjp(v, x, w)},
        "weight VJP": {"torch": lambda: torch.autograd.grad(y, wg, v, retain_graph=True)[0],
                       "tnderive": lambda: w_vjp(v, x, w)},
    }
    if einconv is not None:
        def ein_in():
            eq, operands, shape = convNd_input_vjp.einsum_expression(
                w, v, tuple(x.shape[2:]), stride=stride, padding=padding, groups=groups)
            return torch.einsum(eq, *operands).reshape(shape)

        def ein_w():
            eq, operands, shape = convNd_weight_vjp.einsum_expression(
                x, v, tuple(w.shape[2:]), padding=padding, stride=stride, groups=groups)
            return torch.einsum(eq, *operands).reshape(shape)

        ops["forward"]["einconv"] = lambda: einconv_convNd(x, w, None, stride, padding, 1, groups)
        ops["input VJP"]["einconv"] = ein_in
        ops["weight VJP"]["einconv"] = ein_w
    return ops


def check(ops) -> None:
    """Every implementation agrees with torch (float32 tolerance)."""
    for op, impls in ops.items():
        ref = impls["torch"]()
        for name, f in impls.items():
            got = f()
            scale = ref.abs().max().item() + 1e-6
            err = (got.reshape(ref.shape) - ref).abs().max().item() / scale
            if err > 1e-4:
                raise AssertionError(f"{op} {name}: relative error {err:.2e}")


def measure(ops, repeats: int, min_time: float = 0.03) -> dict:
    """Interleaved rounds; median seconds per call per (op, impl). Fast calls are repeated
    within a round until it lasts `min_time` (so scheduler slices do not dominate)."""
    times = {(op, n): [] for op, impls in ops.items() for n in impls}
    inner = {}
    for op, impls in ops.items():
        for name, f in impls.items():
            f()  # warm-up (builds and caches networks, patterns)
            t0 = time.perf_counter()
            f()
            inner[(op, name)] = max(1, min(50, int(min_time / max(time.perf_counter() - t0, 1e-6))))
    for _ in range(repeats):
        for op, impls in ops.items():
            for name, f in impls.items():
                k = inner[(op, name)]
                t0 = time.perf_counter()
                for _ in range(k):
                    f()
                times[(op, name)].append((time.perf_counter() - t0) / k)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows) -> str:
    has_ein = einconv is not None
    head = "| layer | group | op | torch ms | tnderive ms | " + ("einconv ms | " if has_ein else "") + \
           "tnderive/torch | " + ("tnderive/einconv |" if has_ein else "")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for r in rows:
        cells = [r["layer"], r["group"], r["op"], f"{r['torch'] * 1e3:.2f}", f"{r['tnderive'] * 1e3:.2f}"]
        if has_ein:
            cells.append(f"{r['einconv'] * 1e3:.2f}")
        cells.append(f"{r['tnderive'] / r['torch']:.2f}×")
        if has_ein:
            cells.append(f"{r['tnderive'] / r['einconv']:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows) -> str:
    out = []
    for op in ("forward", "input VJP", "weight VJP"):
        sel = [r for r in rows if r["op"] == op]
        if not sel:
            continue
        ratios = [r["tnderive"] / r["torch"] for r in sel]
        line = (f"- {op}: tnderive/torch median {statistics.median(ratios):.2f}× "
                f"(range {min(ratios):.2f}–{max(ratios):.2f}×)")
        for group in ("dense", "down-sampling"):
            g = [r["tnderive"] / r["torch"] for r in sel if r["group"] == group]
            if g:
                line += f"; {group} {min(g):.2f}–{max(g):.2f}×"
        if einconv is not None:
            e = [r["tnderive"] / r["einconv"] for r in sel]
            slower = sum(x >= 1 for x in e)
            line += f"; vs einconv {min(e):.2f}–{max(e):.2f}× ({slower} of {len(e)} layers not faster)"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="substrings of layer names")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    allocator = steady_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    start = time.perf_counter()
    for name, group, xs, ws, stride, padding, groups in LAYERS:
        if args.only and not any(s in name for s in args.only):
            continue
        x, w = torch.randn(*xs), torch.randn(*ws)
        v = torch.randn_like(F.conv2d(x, w, stride=stride, padding=padding, groups=groups))
        ops = implementations(x, w, v, stride, padding, groups)
        check(ops)
        med = measure(ops, args.repeats)
        for op, impls in ops.items():
            row = {"layer": name, "group": group, "op": op}
            row.update({impl: med[(op, impl)] for impl in impls})
            rows.append(row)
            print(f"{name:32s} {op:10s} " + "  ".join(f"{k} {row[k] * 1e3:8.2f}ms" for k in impls),
                  flush=True)
    elapsed = time.perf_counter() - start
    peer = f"einconv {getattr(einconv, '__version__', '')}".strip() if einconv else "einconv not installed"
    section = "\n".join([
        "## Convolutions (benchmarks/conv.py)",
        "",
        f"Batch 8, float32, CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} thread(s), torch {torch.__version__}, {peer}; median of {args.repeats} "
        f"interleaved rounds (calls under 30 ms repeated within a round); total {elapsed:.0f} s. "
        f"Command: `python benchmarks/conv.py`; {allocator} (see benchmarks/_steady.py). "
        "tnderive lowers each convolution product to one call of torch's public convolution "
        "kernels (`codegen.convolution`: conv, its weight VJP, its input VJP), except two input "
        "VJPs: non-overlapping windows (one matmul, one copy into the layout; views for few "
        "positions) and the 7×7 stem (per group of images: one matmul, one add per kernel tap "
        "into its stride phase). The private oneDNN op and the eager kernels are gone (issue 16).",
        "VJPs: torch = autograd backward on a prebuilt graph; tnderive = `Network.vjp` (derived "
        "with `tnderive.vjp`, simplified, evaluated); einconv = its VJP "
        "einsum expressions. Shared 2-core machine: expect ±30 % noise.",
        "",
        summary(rows),
        "",
        table(rows),
    ])
    print()
    print(section)
    if (not args.no_write and not args.only
            and not keeps_peer_figures("conv", "einconv", einconv is not None, r"\| einconv ms \|")):
        write_section("conv", section)


if __name__ == "__main__":
    main()
