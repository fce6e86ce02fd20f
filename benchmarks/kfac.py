"""KFAC input-side factor of convolution layers: tnderive's generated code vs unfold vs einconv.

For each layer (ResNet-18 3×3 stride 1 and 2, 5×5, 1×1, a K = S = 4 patchify stem) and each
flavour (expand, reduce) the factor A (curvlinops' scaling) is computed by

  * tnderive: `tnderive.kfac(conv_network(...).expr, "W", "n", kind)` -> `input_expr`,
              compiled with `tnderive.compile` (generated torch.einsum code);
  * unfold:   what curvlinops / BackPACK do: `F.unfold` (im2col), then (expand) the Gram matrix
              over batch × positions, or (reduce) the mean over positions and a Gram matrix;
  * einconv:  the peer's einsum expressions (`convNd_kfc` / `convNd_kfac_reduce`, simplified),
              evaluated with torch.einsum (skipped when einconv is not installed).

All three results are checked against each other. Reported: median wall time over repeats and
peak memory of one call (CPU: from the torch profiler's allocation events; CUDA:
`max_memory_allocated`), and for tnderive the largest intermediate of its plan vs the im2col size.

    python benchmarks/kfac.py [--batch 4] [--repeats 5] [--device cpu] [--threads 1] [--quick]

Writes its section of benchmarks/RESULTS.md between `<!-- BEGIN kfac -->` / `<!-- END kfac -->`.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tnderive  # noqa: E402
from _results import keeps_peer_figures, write_section  # noqa: E402
from _steady import steady_allocator  # noqa: E402
from tnderive.kfac import kfac  # noqa: E402
from tnderive.nn.conv import conv_network  # noqa: E402

try:  # optional peer
    from einconv.expressions import convNd_kfac_reduce, convNd_kfc
except ImportError:  # pragma: no cover - optional
    convNd_kfac_reduce = convNd_kfc = None


# name, C_in, C_out, input size, kernel, stride, padding
LAYERS = [
    ("ResNet-18 3×3 s1 (64@56)", 64, 64, 56, 3, 1, 1),
    ("ResNet-18 3×3 s1 (256@14)", 256, 256, 14, 3, 1, 1),
    ("ResNet-18 3×3 s2 (64→128@56)", 64, 128, 56, 3, 2, 1),
    ("ResNet-18 3×3 s2 (256→512@14)", 256, 512, 14, 3, 2, 1),
    ("5×5 s1 (32→64@28)", 32, 64, 28, 5, 1, 2),
    ("1×1 s2 (64→128@56, downsample)", 64, 128, 56, 1, 2, 0),
    ("1×1 s1 (128→128@28)", 128, 128, 28, 1, 1, 0),
    ("patchify K=S=4 (3→96@224)", 3, 96, 224, 4, 4, 0),
]
QUICK = [LAYERS[0], LAYERS[2], LAYERS[5], LAYERS[7]]


# --------------------------------------------------------------------------------------------
# the three implementations
# --------------------------------------------------------------------------------------------

def unfold_factor(x, k, s, p, kind):
    """curvlinops/BackPACK: im2col, then Gram matrix (expand) or mean over positions (reduce)."""
    u = F.unfold(x, k, padding=p, stride=s)  # [N, C*K*K, L]
    N, _, L = u.shape
    if kind == "expand":
        u = u.transpose(1, 2).reshape(N * L, -1)
        return u.T @ u / (N * L)
    ur = u.mean(-1)
    return ur.T @ ur / N


def einconv_factor(x, k, s, p, kind):
    mod = convNd_kfc if kind == "expand" else convNd_kfac_reduce
    eq, ops, shape = mod.einsum_expression(x, k, stride=s, padding=p)
    A = torch.einsum(eq, *ops).reshape(shape)
    if kind == "expand":  # einconv's KFC factor is scaled by 1/N; curvlinops' by 1/(N·L)
        O = (x.shape[-1] + 2 * p - k) // s + 1
        A = A / (O * O)
    return A


class TNFactor:
    """tnderive's factor: `KFACFactors.input_factor` (generated code; expand in two stages:
    X by generated code, then one Gram matrix), and the same networks through the interpreter
    (`evaluated`: `tnderive.evaluate`, the same lowering run op by op)."""

    def __init__(self, x_shape, c_out, k, s, p, kind):
        net = conv_network(x_shape, (c_out, x_shape[1], k, k), stride=s, padding=p, bias=False)
        self.fac = kfac(net.expr, "W", "n", kind=kind)
        self.kind = kind
        N, C, I, _ = x_shape
        O = (I + 2 * p - k) // s + 1
        self.N, self.S = N, O * O
        self.im2col = N * C * k * k * O * O
        expr = self.fac.input_side_expr if kind == "expand" else self.fac.input_expr
        self.fn = tnderive.compile(expr, f"kfac_{kind}")
        self.largest = self.fn.plan.largest_at()
        if kind == "expand":  # the Gram stage's output
            self.largest = max(self.largest, (C * k * k) ** 2)
        self.source = self.fn.source

    def __call__(self, x):
        xg = x.reshape(x.shape[0], 1, *x.shape[1:])
        A = self.fac.input_factor(x=xg)
        return A.reshape(int(math.isqrt(A.numel())), -1)

    def generated(self, x):
        """Generated code only (expand: X by tnderive.compile, then the Gram matrix)."""
        xg = x.reshape(x.shape[0], 1, *x.shape[1:])
        if self.kind == "reduce":
            A = self.fn(x=xg) / (self.N * self.S * self.S)
            return A.reshape(int(math.isqrt(A.numel())), -1)
        X = self.fn(x=xg)
        Xm = X.reshape(self.N * self.S, -1)
        return Xm.T @ Xm / (self.N * self.S)

    def evaluated(self, x):
        xg = x.reshape(x.shape[0], 1, *x.shape[1:])
        if self.kind == "reduce":
            A = tnderive.evaluate(self.fac.input_expr, x=xg) / (self.N * self.S * self.S)
            return A.reshape(int(math.isqrt(A.numel())), -1)
        X = tnderive.evaluate(self.fac.input_side_expr, x=xg)
        Xm = X.reshape(self.N * self.S, -1)
        return Xm.T @ Xm / (self.N * self.S)


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], torch.Tensor], repeats: int, device) -> float:
    fn()  # warm-up (builds constants, plans)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(impls: dict, repeats: int, device) -> dict:
    """Median time of each implementation, the repeats interleaved (round robin) so that load
    changes on a shared machine hit all of them alike."""
    for fn in impls.values():
        fn()  # warm-up (builds constants, plans)
    sync(device)
    times: dict = {label: [] for label in impls}
    for _ in range(repeats):
        for label, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[label].append(time.perf_counter() - t0)
    return {label: (statistics.median(ts), min(ts)) for label, ts in times.items()}


def peak_memory(fn: Callable[[], torch.Tensor], device) -> int:
    """Peak bytes allocated during one call (beyond what was allocated before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    cur = best = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        best = max(best, cur)
    return best


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.1f}"


def run(layers, batch, repeats, device, dtype):
    rows = []
    for name, cin, cout, I, k, s, p in layers:
        x = torch.randn(batch, cin, I, I, device=device, dtype=dtype)
        for kind in ("expand", "reduce"):
            tn = TNFactor(tuple(x.shape), cout, k, s, p, kind)
            impls = {"tnderive": lambda: tn(x), "generated": lambda: tn.generated(x), "evaluated": lambda: tn.evaluated(x),
                     "unfold": lambda: unfold_factor(x, k, s, p, kind)}
            if convNd_kfc is not None:
                impls["einconv"] = lambda: einconv_factor(x, k, s, p, kind)
            ref = impls["unfold"]()
            for label, fn in impls.items():
                got = fn()
                err = (got.reshape(ref.shape) - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
                if err > (1e-4 if dtype == torch.float32 else 1e-10):
                    raise SystemExit(f"{name} {kind}: {label} differs from unfold (rel err {err:.2e})")
            times = interleaved_times(impls, repeats, device)
            res = {label: (times[label][0], peak_memory(fn, device), times[label][1]) for label, fn in impls.items()}
            rows.append((name, kind, res, tn.largest, tn.im2col))
            t_tn, t_un = res["tnderive"][0], res["unfold"][0]
            ein = res.get("einconv", (float("nan"), 0))[0]
            print(f"{name:34s} {kind:6s} tnderive {t_tn * 1e3:8.2f} ms  generated {res['generated'][0] * 1e3:8.2f} ms  "
                  f"evaluated {res['evaluated'][0] * 1e3:8.2f} ms  "
                  f"unfold {t_un * 1e3:8.2f} ms  "
                  f"einconv {ein * 1e3:8.2f} ms  speed-up vs unfold {t_un / t_tn:5.2f}x  "
                  f"peak MiB tn/unfold/einconv {mib(res['tnderive'][1])}/{mib(res['unfold'][1])}/"
                  f"{mib(res.get('einconv', (0, 0))[1])}", flush=True)
    return rows


def table(rows, args, device) -> str:
    lines = [
        "## KFAC input-side factor of convolutions (`benchmarks/kfac.py`)",
        "",
        f"Command: `python benchmarks/kfac.py --batch {args.batch} --repeats {args.repeats} "
        f"--device {args.device} --threads {args.threads}{' --quick' if args.quick else ''}`; "
        f"{device.type}, {args.dtype}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), a 2-core machine shared with other jobs (timings are noisy); "
        f"{getattr(args, 'allocator', 'allocator: default')} (benchmarks/_steady.py). "
        f"Median of {args.repeats} runs after one warm-up, the implementations' runs interleaved; "
        "peak = extra memory of one call "
        + ("(CUDA max_memory_allocated)." if device.type == "cuda" else
           "(torch profiler allocation events)."),
        "tnderive = `tnderive.kfac(conv_network(...).expr, 'W', 'n', kind).input_factor(x=...)` (no engine "
        "switch): reduce runs generated code (`tnderive.compile`, Π summed over its output index); expand evaluates the "
        "input side X (`tnderive.evaluate`: convolution constants as strided views), then one Gram matrix. generated = "
        "generated code only (expand: X by `tnderive.compile`, then the Gram matrix); evaluated = `tnderive.evaluate` "
        "for both; "
        "unfold = `F.unfold` + Gram matrix (curvlinops/BackPACK); einconv = the peer's simplified "
        "einsum expressions. \"largest\" = tnderive's largest intermediate (entries) vs the im2col size.",
        "",
        "| layer | kind | tnderive ms (min) | generated ms | evaluated ms | unfold ms (min) | einconv ms | ×unfold (min) | ×einconv | peak MiB tnderive / unfold / einconv | largest / im2col |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, kind, res, largest, im2col in rows:
        t_tn, m_tn, b_tn = res["tnderive"]
        t_un, m_un, b_un = res["unfold"]
        t_vi = res["evaluated"][0]
        t_ge = res["generated"][0]
        t_ei, m_ei, _ = res.get("einconv", (float("nan"), float("nan"), float("nan")))
        lines.append(
            f"| {name} | {kind} | {t_tn * 1e3:.2f} ({b_tn * 1e3:.2f}) | {t_ge * 1e3:.2f} | {t_vi * 1e3:.2f} | "
            f"{t_un * 1e3:.2f} ({b_un * 1e3:.2f}) | {t_ei * 1e3:.2f} | {t_un / t_tn:.2f} ({b_un / b_tn:.2f}) | "
            f"{t_ei / t_tn:.2f} | {mib(m_tn)} / {mib(m_un)} / {mib(m_ei)} | {largest:,} / {im2col:,} |")
    lines.append("")
    lines.append("×unfold, ×einconv: the peer's median time divided by tnderive's (> 1: tnderive is faster; in "
                 "brackets the same for the fastest runs, less sensitive to load from other jobs). "
                 "\"largest\" counts every tensor the plan creates, the factor itself included "
                 "([C·K², C·K²] can exceed the im2col size for deep layers).")
    lines.append("")
    lines.extend(summary(rows))
    return "\n".join(lines)


def summary(rows) -> list[str]:
    """Targets: KFAC-reduce ≥ 3× unfold on stride-1 3×3 layers; never slower than the peers."""
    out = ["Targets:"]
    s1 = [(name, res["unfold"][0] / res["tnderive"][0], res["unfold"][2] / res["tnderive"][2])
          for name, kind, res, _, _ in rows if kind == "reduce" and "3×3 s1" in name]
    if s1:
        out.append("* KFAC-reduce vs unfold on stride-1 3×3 layers (medians, mins): " + ", ".join(
            f"{name} {r:.1f}× ({b:.1f}×)" for name, r, b in s1) + " (target ≥ 3×; where the Gram matrix "
            "[C·K²]² dominates — few positions, many channels — both sides share that cost).")
    for peer in ("unfold", "einconv"):
        slow = [(name, kind, res[peer][0] / res["tnderive"][0], res[peer][2] / res["tnderive"][2])
                for name, kind, res, _, _ in rows
                if peer in res and res[peer][0] < res["tnderive"][0] and res[peer][2] < res["tnderive"][2]]
        if slow:
            out.append(f"* slower than {peer} by median and by min: " + ", ".join(
                f"{name} {kind} ({r:.2f}×, {b:.2f}×)" for name, kind, r, b in slow))
        else:
            out.append(f"* never slower than {peer} by both median and min in this run.")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="four layers only")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    args.allocator = steady_allocator()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = run(QUICK if args.quick else LAYERS, args.batch, args.repeats, device, dtype)
    text = table(rows, args, device)
    print()
    print(text)
    # an einconv figure: a number in the einconv column (the 7th) of a table row
    measured = r"^\|(?:[^|]*\|){6} *\d+\.\d+ *\|"
    if not args.no_write and not keeps_peer_figures("kfac", "einconv", convNd_kfc is not None, measured):
        write_section("kfac", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
