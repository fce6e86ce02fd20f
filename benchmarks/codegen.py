"""Generated code vs opt_einsum.contract vs one naive torch.einsum, side by side in one process.

Three contraction networks from curvature computations (einsum level; copy tensors and
convolution patterns are real IR nodes for the generated code and materialised tensors for
the peers):

  (a) MLP Hessian block  H[o,i,p,j] = Σ_n x[n,i] x[n,j] w[n,o] δ[o,p]       (w: the elementwise
      weight of a tanh layer with squared loss, precomputed)
  (b) self-attention Hessian block, the softmax-Jacobian term of the (W_Q, W_K) block
      H[e,d,f,g] = Σ_{s,t,u} X[s,d] k[t,e] M[s,t,u] q[s,f] X[u,g]
  (c) KFAC-reduce input factor of a 3x3 convolution
      A[c,k,l,C,K,L] = Σ_n ū[n,c,k,l] ū[n,C,K,L],  ū[n,c,k,l] = Σ_{o,p,i,j} Π[k,o,i] Π[l,p,j] x[n,c,i,j]
      written as one 6-operand network (the positions o, p are summed inside it)

plus the end-to-end derived MLP Hessian block (tnderive.hessian + simplify of a tanh layer's
squared loss), generated code vs tnderive.evaluate vs torch.func.hessian.

Peers: `tnderive.codegen.compile` (specialised to the sizes), `opt_einsum.contract` (torch
backend, its default 'auto' path), `torch.einsum` with torch's opt_einsum integration switched
off (contracts left to right: the naive order). Medians over repeats after a warm-up; peak
memory above the baseline: CPU from the process's peak RSS (reset through
/proc/self/clear_refs), CUDA from torch.cuda.max_memory_allocated.

    python benchmarks/codegen.py [--repeats 15] [--device cpu|cuda] [--no-write] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
MARK = "codegen"


@dataclass
class Network:
    """An einsum-level network: operands (name, labels), output labels, sizes."""

    name: str
    operands: list[tuple[str, str]]          # (name, labels); name "delta" = identity, "pattern*" = conv pattern
    output: str
    sizes: dict[str, int]
    note: str = ""
    patterns: dict[str, tuple] = field(default_factory=dict)  # name -> (kernel, stride, padding)


def networks(quick: bool) -> list[Network]:
    s = 0.5 if quick else 1.0
    n_mlp, i_mlp, o_mlp = int(512 * s), 64, 16
    S, d, e = int(64 * s), 32, 16
    n_c, c, hw = int(64 * s), 16, 16
    return [
        Network("(a) MLP Hessian block", [("x", "ni"), ("x", "nj"), ("w", "no"), ("delta", "op")],
                "oipj", dict(n=n_mlp, i=i_mlp, j=i_mlp, o=o_mlp, p=o_mlp),
                note=f"n={n_mlp}, i={i_mlp}, o={o_mlp}"),
        Network("(b) attention Q-K Hessian block", [("X", "sd"), ("k", "te"), ("M", "stu"),
                                                    ("q", "sf"), ("X", "ug")],
                "edfg", dict(s=S, t=S, u=S, d=d, g=d, e=e, f=e), note=f"S={S}, d={d}, e={e}"),
        Network("(c) KFAC-reduce conv 3x3 input factor",
                [("x", "ncij"), ("pattern1", "koi"), ("pattern2", "lpj"), ("x", "nCIJ"),
                 ("pattern1", "KOI"), ("pattern2", "LPJ")],
                "cklCKL", dict(n=n_c, c=c, C=c, i=hw, j=hw, I=hw, J=hw, k=3, l=3, K=3, L=3,
                               o=hw, p=hw, O=hw, P=hw),
                note=f"n={n_c}, c={c}, {hw}x{hw}, K=3, stride 1, padding 1",
                patterns={"pattern1": (3, 1, 1), "pattern2": (3, 1, 1)}),
    ]


# --------------------------------------------------------------------------------------------
# building the three peers for a network
# --------------------------------------------------------------------------------------------

def build(net: Network, device, dtype):
    """(generated fn, opt_einsum fn, naive fn, tensors) for a network."""
    import opt_einsum
    from tnderive.codegen import compile as tn_compile
    from tnderive.constants import build_constant
    from tnderive.ir import Delta, Product, Variable
    from tnderive.patterns import pattern_constant

    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    factors = []
    peer_ops = []
    var_axes: dict[str, str] = {}
    for name, labels in net.operands:
        if name == "delta":
            factors.append(Delta(tuple(labels), net.sizes[labels[0]]))
            peer_ops.append(torch.eye(net.sizes[labels[0]], device=device, dtype=dtype))
        elif name.startswith("pattern"):
            ksz, stride, pad = net.patterns[name]
            k, o, i = labels
            const = pattern_constant((k, o, i), (ksz, net.sizes[i]), stride=stride, padding=pad)
            factors.append(const)
            shape = tuple(int(x) for x in const.shape)
            peer_ops.append(build_constant("pattern", const.params, shape, device, dtype))
        else:
            axes = var_axes.setdefault(name, labels)
            shape = [net.sizes[a] for a in labels]
            if name not in tensors:
                tensors[name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
            factors.append(Variable(name, tuple(axes), tuple(labels),
                                    tuple(net.sizes[a] for a in axes)))
            peer_ops.append(tensors[name])
    expr = Product(factors, tuple(net.output))
    compiled = tn_compile(expr, name="block")
    eq = ",".join(l for _, l in net.operands) + "->" + net.output

    def generated():
        return compiled(**tensors)

    def oe():
        return opt_einsum.contract(eq, *peer_ops, backend="torch")

    def naive():
        with _opt_einsum_off():
            return torch.einsum(eq, *peer_ops)

    return {"generated": generated, "opt_einsum.contract": oe, "torch.einsum (naive)": naive}, compiled


class _opt_einsum_off:
    def __enter__(self):
        self.was = torch.backends.opt_einsum.enabled
        torch.backends.opt_einsum.enabled = False

    def __exit__(self, *exc):
        torch.backends.opt_einsum.enabled = self.was


def derived_mlp(device, dtype, quick: bool):
    """End-to-end derived Hessian block d²L/dW² of L = ½ Σ (tanh(W x + b) − t)²."""
    from tnderive import derive, evaluate
    from tnderive.codegen import compile as tn_compile
    from tnderive.functions import get_elementwise, power
    from tnderive.ir import Delta, Func, Product, Sum, Variable

    W = Variable("W", ("o", "i"))
    x = Variable("x", ("n", "i"))
    b = Variable("b", ("o",))
    t = Variable("t", ("n", "o"))
    z = Sum(((1, Product((W, x), ("n", "o"))), (1, Product((b, Delta(("n",), "n")), ("n", "o")))))
    r = Sum(((1, Func(get_elementwise("tanh"), z)), (-1, t)))
    loss = Sum(((0.5, Product((Func(power(2), r),), ())),))
    H = derive.hessian(loss, "W")
    try:
        from tnderive.simplify import simplify
        H = simplify(H)
    except Exception:  # simplify missing or failing: the raw derivative is still correct
        pass
    n, i, o = (256 if quick else 512), 64, 16
    gen = torch.Generator().manual_seed(1)
    T = {"W": torch.randn(o, i, generator=gen, dtype=torch.float64) / 8,
         "x": torch.randn(n, i, generator=gen, dtype=torch.float64),
         "b": torch.randn(o, generator=gen, dtype=torch.float64),
         "t": torch.randn(n, o, generator=gen, dtype=torch.float64)}
    T = {k: v.to(device, dtype) for k, v in T.items()}
    compiled = tn_compile(H, name="hessian_WW")

    def loss_fn(W_):
        return 0.5 * ((torch.tanh(T["x"] @ W_.T + T["b"]) - T["t"]) ** 2).sum()

    peers = {
        "generated": lambda: compiled(**T),
        "tnderive.evaluate": lambda: evaluate(H, **T),
        "torch.func.hessian": lambda: torch.func.hessian(loss_fn)(T["W"]),
    }
    return peers, compiled, f"n={n}, i={i}, o={o}"


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measure(fn: Callable, device, repeats: int) -> tuple[float, float | None, torch.Tensor]:
    """(median seconds, peak extra memory in MiB or None, result)."""
    out = fn()  # warm-up (plans, constants, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del out
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_kb("VmRSS")
        ok = _reset_peak()
        out = fn()
        peak = (_rss_kb("VmHWM") - base) / 1024 if ok else None
    return statistics.median(times), peak, out


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def _fmt_mem(m) -> str:
    return "n/a" if m is None else f"{max(m, 0.0):.1f} MiB"


def run(device: torch.device, dtype, repeats: int, quick: bool) -> tuple[str, list[str]]:
    rows = []
    verdicts = []
    sections = []
    for net in networks(quick):
        peers, compiled = build(net, device, dtype)
        results = {}
        for name, fn in peers.items():
            results[name] = measure(fn, device, repeats)
        ref = results["opt_einsum.contract"][2]
        for name, (t, m, out) in results.items():
            err = (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
            rows.append(f"| {net.name} | {name} | {_fmt_time(t)} | {_fmt_mem(m)} | {err:.1e} |")
        tg, to = results["generated"][0], results["opt_einsum.contract"][0]
        verdicts.append(f"{net.name}: generated / opt_einsum time = {tg / to:.2f}"
                        f" ({'at least as fast' if tg <= to * 1.05 else 'slower'})")
        p = compiled.specialisations
        plan = next(iter(p.values()))[0] if p else compiled.plan
        sections.append(f"- {net.name} ({net.note}): planned {plan.flops} flops "
                        f"= {plan.flops_at():,}; naive single loop nest {plan.naive_flops_at():,}; "
                        f"largest intermediate {plan.largest_at():,} entries")
    # end-to-end derived block
    try:
        peers, compiled, note = derived_mlp(device, dtype, quick)
        results = {name: measure(fn, device, max(3, repeats // 3)) for name, fn in peers.items()}
        ref = results["torch.func.hessian"][2]
        for name, (t, m, out) in results.items():
            err = (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
            rows.append(f"| (d) derived MLP Hessian d²L/dW² ({note}) | {name} | {_fmt_time(t)} | "
                        f"{_fmt_mem(m)} | {err:.1e} |")
        prog = next(iter(compiled.specialisations.values()))[0]
        sections.append(f"- (d) derived MLP Hessian block ({note}): generated plan {prog.flops} flops")
    except Exception as e:  # derive/simplify still changing: report and keep the einsum rows
        sections.append(f"- (d) derived MLP Hessian block skipped: {type(e).__name__}: {e}")
    head = ["| case | peer | median time | peak extra memory | max rel. diff |",
            "| --- | --- | --- | --- | --- |"]
    return "\n".join(head + rows), verdicts + [""] + sections


def write_section(text: str) -> None:
    begin, end = f"<!-- BEGIN {MARK} -->", f"<!-- END {MARK} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = open(RESULTS, encoding="utf-8").read() if os.path.exists(RESULTS) else "# Benchmark results\n\n"
    if begin in old and end in old:
        pre, rest = old.split(begin, 1)
        _, post = rest.split(end, 1)
        new = pre + block + post.lstrip("\n")
    else:
        new = old.rstrip() + "\n\n" + block
    with open(RESULTS, "w", encoding="utf-8") as fh:
        fh.write(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available; run with --device cpu")
        return 0
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    table, notes = run(device, dtype, args.repeats, args.quick)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    text = "\n".join([
        "## Code generation (`benchmarks/codegen.py`)",
        "",
        f"Command: `python benchmarks/codegen.py --device {args.device} --dtype {args.dtype} "
        f"--repeats {args.repeats}{' --quick' if args.quick else ''}`; {hw}, torch {torch.__version__}, "
        f"{args.dtype}. Median of {args.repeats} runs after a warm-up; peak memory is the extra "
        f"{'CUDA allocation' if device.type == 'cuda' else 'resident memory (peak RSS)'} of one call. "
        "`torch.einsum (naive)` has torch's opt_einsum integration off (left-to-right order).",
        "",
        table,
        "",
        *notes,
        "",
    ])
    print(text)
    if not args.no_write:
        write_section(text)
        print(f"(section '{MARK}' written to {RESULTS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
