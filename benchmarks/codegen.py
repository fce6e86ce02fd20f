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
      as derived by `tnderive.kfac(conv_network(...), kind="reduce")` (its rules have already
      summed Π over o: `pattern_sum` constants); without those modules the 6-operand network
      above. All three peers get the same flat network.

plus (d) the end-to-end derived MLP Hessian block (tnderive.hessian + simplify of a tanh
layer's squared loss), generated code vs torch.func.hessian (tnderive.evaluate is left out:
it materialises the block's copy-tensor structure over the batch, 17 GB at these sizes).

Peers: `tnderive.codegen.compile` (specialised to the sizes), `opt_einsum.contract` (torch
backend, its default 'auto' path, searched on every call as a user calling it would),
`opt_einsum.contract_expression` (the same with the path found once, outside the timing),
`torch.einsum` with torch's opt_einsum integration switched
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

from _results import write_section

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "codegen"
MIN_TIME = 0.2   # seconds per timing block


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

def network_expr(net: Network, device, dtype):
    """(expr, tensors, description) of a network spec; for (c) the real derived KFAC-reduce
    input factor (tnderive.kfac on tnderive.nn.conv)."""
    from tnderive.ir import Delta, Product, Variable
    from tnderive.patterns import pattern_constant

    gen = torch.Generator().manual_seed(0)
    if net.patterns:
        return kfac_reduce_expr(net, device, dtype, gen)
    tensors: dict[str, torch.Tensor] = {}
    factors = []
    var_axes: dict[str, str] = {}
    for name, labels in net.operands:
        if name == "delta":
            factors.append(Delta(tuple(labels), net.sizes[labels[0]]))
        elif name.startswith("pattern"):
            ksz, stride, pad = net.patterns[name]
            k, o, i = labels
            factors.append(pattern_constant((k, o, i), (ksz, net.sizes[i]), stride=stride,
                                            padding=pad))
        else:
            axes = var_axes.setdefault(name, labels)
            if name not in tensors:
                shape = [net.sizes[a] for a in labels]
                tensors[name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
            factors.append(Variable(name, tuple(axes), tuple(labels),
                                    tuple(net.sizes[a] for a in axes)))
    return Product(factors, tuple(net.output)), tensors, "einsum-level network"


def kfac_reduce_expr(net: Network, device, dtype, gen):
    """The KFAC-reduce input factor derived by tnderive.kfac."""
    from tnderive.kfac import kfac
    from tnderive.nn.conv import conv_network

    N, C, H = net.sizes["n"], net.sizes["c"], net.sizes["i"]
    conv = conv_network((N, C, H, H), (C, C, 3, 3), stride=1, padding=1, bias=False)
    expr = kfac(conv.expr, weight="W", batch="n", kind="reduce").input_expr
    x = torch.randn(N, C, H, H, generator=gen, dtype=torch.float64).to(device, dtype)
    w = torch.zeros(C, C, 3, 3, device=device, dtype=dtype)
    tensors = {k: v for k, v in conv.prepare(x, w).items() if k in expr.variables}
    return expr, tensors, "derived by tnderive.kfac(kind='reduce'), simplified"


def flat_network(expr, tensors, device, dtype):
    """(equation, operands, sizes) of a product of variables, constants and copy tensors
    (nested products spliced), constants and copy tensors materialised for the peers."""
    import opt_einsum
    from tnderive.constants import build_constant
    from tnderive.ir import Constant, Delta, Variable
    from tnderive.rules.algebra import flatten_product

    flat = expr
    while (spliced := flatten_product(flat)) is not None:  # one level of nesting per call
        flat = spliced
    letters: dict[str, str] = {}
    terms, ops = [], []
    sizes: dict[str, int] = {}
    for f in flat.factors:
        labels = f.occurrence if isinstance(f, Variable) else f.indices
        for i in labels:
            letters.setdefault(i, opt_einsum.get_symbol(len(letters)))
        terms.append("".join(letters[i] for i in labels))
        if isinstance(f, Variable):
            t = tensors[f.name]
        elif isinstance(f, Constant):
            t = build_constant(f.kind, f.params, tuple(int(n) for n in f.shape), device, dtype)
        elif isinstance(f, Delta):
            n = int(f.size)
            t = torch.zeros((n,) * len(f.indices), device=device, dtype=dtype)
            t[(torch.arange(n, device=device),) * len(f.indices)] = 1
        else:
            raise TypeError(f"not a plain network factor: {type(f).__name__}")
        ops.append(t)
        for i, n in zip(terms[-1], t.shape):
            sizes[i] = int(n)
    eq = ",".join(terms) + "->" + "".join(letters[i] for i in flat.indices)
    return eq, ops, sizes


def build(net: Network, device, dtype):
    """({peer: fn or skip reason}, compiled code, description, tensors) for a network."""
    import opt_einsum
    from tnderive.codegen import compile as tn_compile

    expr, tensors, what = network_expr(net, device, dtype)
    compiled = tn_compile(expr, name="block")
    eq, peer_ops, sizes = flat_network(expr, tensors, device, dtype)

    def generated():
        return compiled(**tensors)

    def oe():
        return opt_einsum.contract(eq, *peer_ops, backend="torch")

    prepared = opt_einsum.contract_expression(eq, *[tuple(t.shape) for t in peer_ops])

    def oe_prepared():
        return prepared(*peer_ops, backend="torch")

    def naive():
        with _opt_einsum_off():
            return torch.einsum(eq, *peer_ops)

    peers = {"generated": generated, "opt_einsum.contract": oe,
             "opt_einsum.contract_expression (path precomputed)": oe_prepared}
    biggest = left_to_right_largest(eq, sizes)
    if biggest * dtype.itemsize <= NAIVE_LIMIT_BYTES:
        peers["torch.einsum (naive)"] = naive
    else:
        peers["torch.einsum (naive)"] = f"skipped: its left-to-right order needs a {biggest:,}-entry " \
            f"intermediate ({biggest * dtype.itemsize / 2**30:.1f} GiB)"
    return peers, compiled, what, tensors


NAIVE_LIMIT_BYTES = 2 * 2**30


def left_to_right_largest(eq: str, sizes: dict[str, int]) -> int:
    """Largest intermediate of torch.einsum's left-to-right order (opt_einsum off): each step
    keeps the indices that later operands or the output still need."""
    lhs, output = eq.split("->")
    ops = lhs.split(",")
    acc = ops[0]
    biggest = 0
    for k in range(1, len(ops)):
        later = set("".join(ops[k + 1:])) | set(output)
        both = list(dict.fromkeys(acc + ops[k]))
        acc = "".join(i for i in both if i in later)
        size = 1
        for i in acc:
            size *= sizes[i]
        biggest = max(biggest, size)
    return biggest


class _opt_einsum_off:
    def __enter__(self):
        self.was = torch.backends.opt_einsum.enabled
        torch.backends.opt_einsum.enabled = False

    def __exit__(self, *exc):
        torch.backends.opt_einsum.enabled = self.was


def derived_mlp(device, dtype, quick: bool):
    """End-to-end derived Hessian block d²L/dW² of L = ½ Σ (tanh(W x + b) − t)²."""
    from tnderive import derive
    from tnderive.codegen import compile as tn_compile
    from tnderive.functions import get_elementwise, power
    from tnderive.ir import Delta, Func, Product, Sum, Variable
    from tnderive.simplify import simplify

    W = Variable("W", ("o", "i"))
    x = Variable("x", ("n", "i"))
    b = Variable("b", ("o",))
    t = Variable("t", ("n", "o"))
    z = Sum(((1, Product((W, x), ("n", "o"))), (1, Product((b, Delta(("n",), "n")), ("n", "o")))))
    r = Sum(((1, Func(get_elementwise("tanh"), z)), (-1, t)))
    loss = Sum(((0.5, Product((Func(power(2), r),), ())),))
    H = simplify(derive.hessian(loss, "W"))
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
        "torch.func.hessian": lambda: torch.func.hessian(loss_fn)(T["W"]),
    }
    return peers, compiled, f"n={n}, i={i}, o={o}"


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

def cpu_peak_bytes(fn: Callable) -> int:
    """Peak of the running sum of CPU allocations minus frees during one call (torch profiler
    memory events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = []
    for e in prof.events():
        v = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if v:
            events.append((e.time_range.start, v))
    cur = peak = 0
    for _, v in sorted(events):
        cur += v
        peak = max(peak, cur)
    return peak


def measure_all(peers: dict[str, Callable], device, repeats: int, min_time: float,
                log=None) -> dict[str, tuple[float, float | None, torch.Tensor]]:
    """name -> (median seconds, peak memory of one call in MiB, result) for every peer.

    Time: `repeats` rounds; in each round every peer (in rotating order) gets one
    torch.utils.benchmark blocked_autorange block (>= min_time s); the median of its block
    medians is reported, so load changes on a shared machine hit all peers alike. Memory: CUDA
    max_memory_allocated above the baseline, or on CPU the torch profiler's allocation events.
    Peers that fail (e.g. out of memory) are reported as the exception."""
    from torch.utils.benchmark import Timer

    # CPU: process CPU time (this process's threads only), robust on a shared machine; CUDA:
    # wall time around synchronised calls
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    outs, failed = {}, {}
    for name, fn in peers.items():  # warm-up: plans, constants, kernels
        if log:
            log(name)
        try:
            outs[name] = fn()
        except RuntimeError as e:
            failed[name] = e
    if device.type == "cuda":
        torch.cuda.synchronize()
    names = [n for n in peers if n not in failed]
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            timer = Timer("fn()", globals={"fn": peers[name]}, timer=clock)
            times[name].append(timer.blocked_autorange(min_run_time=min_time).median)
    results = {}
    for name in names:
        fn = peers[name]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peak = cpu_peak_bytes(fn) / 2**20
        results[name] = (statistics.median(times[name]), peak, outs[name])
    for name, e in failed.items():
        results[name] = e
    return results


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def _fmt_mem(m) -> str:
    return "n/a" if m is None else f"{max(m, 0.0):.1f} MiB"


def run(device: torch.device, dtype, repeats: int, quick: bool) -> tuple[str, list[str]]:
    rows = []
    verdicts = []
    sections = []
    for net in networks(quick):
        peers, compiled, what, _ = build(net, device, dtype)
        for name, fn in list(peers.items()):
            if isinstance(fn, str):
                rows.append(f"| {net.name} | {name} | {fn} | | |")
                del peers[name]
        results = measure_all(peers, device, repeats, MIN_TIME,
                              log=lambda n: print(f"  {net.name}: {n} ...", file=sys.stderr, flush=True))
        ref = results["opt_einsum.contract"][2]
        for name, res in results.items():
            if isinstance(res, Exception):
                rows.append(f"| {net.name} | {name} | failed: {str(res).splitlines()[0][:80]} | | |")
                continue
            t, m, out = res
            err = (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
            rows.append(f"| {net.name} | {name} | {_fmt_time(t)} | {_fmt_mem(m)} | {err:.1e} |")
        tg, to = results["generated"][0], results["opt_einsum.contract"][0]
        tp = results["opt_einsum.contract_expression (path precomputed)"][0]
        r = tg / to
        verdict = "faster" if r < 0.97 else "on par (within timing noise)" if r <= 1.05 else "slower"
        verdicts.append(f"{net.name}: generated / opt_einsum.contract time = {r:.2f} ({verdict}); "
                        f"generated / precomputed-path opt_einsum = {tg / tp:.2f}")
        p = compiled.specialisations
        plan = next(iter(p.values()))[0] if p else compiled.plan
        sections.append(f"- {net.name} ({net.note}; {what}): planned {plan.flops} flops "
                        f"= {plan.flops_at():,}; naive single loop nest {plan.naive_flops_at():,}; "
                        f"largest intermediate {plan.largest_at():,} entries")
    # end-to-end derived block
    peers, compiled, note = derived_mlp(device, dtype, quick)
    results = measure_all(peers, device, repeats, MIN_TIME,
                          log=lambda n: print(f"  derived: {n} ...", file=sys.stderr, flush=True))
    ref = results["torch.func.hessian"][2]
    for name, res in results.items():
        if isinstance(res, Exception):
            rows.append(f"| (d) derived MLP Hessian d²L/dW² ({note}) | {name} | failed: "
                        f"{str(res).splitlines()[0][:80]} | | |")
            continue
        t, m, out = res
        err = (out.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
        rows.append(f"| (d) derived MLP Hessian d²L/dW² ({note}) | {name} | {_fmt_time(t)} | "
                    f"{_fmt_mem(m)} | {err:.1e} |")
    prog = next(iter(compiled.specialisations.values()))[0]
    sections.append(f"- (d) derived MLP Hessian block ({note}): generated plan {prog.flops} flops")
    head = ["| case | peer | median time | peak extra memory | max rel. diff |",
            "| --- | --- | --- | --- | --- |"]
    return "\n".join(head + rows), verdicts + [""] + sections


def lowering_times(repeats: int) -> str:
    """Markdown: `lower` time with compile's setting and with evaluate's (opt_einsum "auto",
    structural form only), and a cached `tnderive.evaluate` call, on the test expressions of
    tests/cases/codegen_cases.py (float64, their test sizes; best of `repeats`)."""
    sys.path.insert(0, os.path.join(HERE, ".."))
    from tests.cases.codegen_cases import CASES, random_inputs
    from tnderive import evaluate
    from tnderive.binding import bind
    from tnderive.codegen import lower
    from tnderive.evaluate import EVALUATE_FORMS, EVALUATE_METHOD

    def best(f, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    rows = []
    for name, expr in CASES.items():
        tensors = random_inputs(expr)
        sizes = {str(k): v for k, v in bind(expr, tensors).symbols.items()}
        full = best(lambda: lower(expr, sizes), repeats)
        cheap = best(lambda: lower(expr, sizes, method=EVALUATE_METHOD, forms=EVALUATE_FORMS), repeats)
        evaluate(expr, **tensors)
        hot = best(lambda: evaluate(expr, **tensors), 10 * repeats)
        rows.append((name, full, cheap, hot))
    rows.sort(key=lambda r: -r[1])
    lines = ["| expression | lower (compile's setting) ms | lower (evaluate's) ms | cached evaluate µs |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {n} | {a * 1e3:.1f} | {b * 1e3:.1f} | {c * 1e6:.0f} |" for n, a, b, c in rows[:8]]
    med = [statistics.median(r[k] for r in rows) for k in (1, 2, 3)]
    lines += ["", f"Median over the {len(rows)} expressions: lowering {med[0] * 1e3:.2f} ms (compile's "
              f"setting), {med[1] * 1e3:.2f} ms (evaluate's); a cached evaluate {med[2] * 1e6:.0f} µs. "
              "Best of the repeats: opt_einsum paths are memoised after the first, so these are the "
              "symbolic-lowering costs."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timing blocks per peer (median)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--no-write", action="store_true", help="do not update benchmarks/RESULTS.md")
    ap.add_argument("--lowering", action="store_true",
                    help="only time `lower` for compile vs evaluate on the test expressions")
    args = ap.parse_args(argv)
    if args.lowering:
        torch.set_default_dtype(torch.float64)
        text = "\n".join(["## Lowering time: compile vs evaluate (`benchmarks/codegen.py --lowering`)",
                          "", f"Command: `python benchmarks/codegen.py --lowering --repeats {args.repeats}`; "
                          f"CPU, torch {torch.__version__}, float64.", "",
                          lowering_times(args.repeats)])
        print(text)
        if not args.no_write:
            write_section("codegen_lowering", text)
        return 0
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
        f"{args.dtype}. Time: median of {args.repeats} interleaved rounds of `torch.utils.benchmark` "
        f"blocks (each >= {MIN_TIME} s) after a warm-up, "
        f"{'process CPU time (the machine is shared)' if device.type == 'cpu' else 'synchronised wall time'}; "
        "peak memory: "
        f"{'CUDA max_memory_allocated above the inputs' if device.type == 'cuda' else 'torch profiler allocation events'} "
        "of one call (inputs excluded). "
        "`torch.einsum (naive)` has torch's opt_einsum integration off (left-to-right order).",
        "",
        table,
        "",
        *notes,
        "",
    ])
    print(text)
    if not args.no_write:
        write_section(MARK, text)
        print(f"(section '{MARK}' written to benchmarks/RESULTS.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
