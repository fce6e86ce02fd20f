"""Whole-model curvature operators: tnderive.{KFAC, GGN, Hessian} vs curvlinops, same process.

Model (issue 14): Conv(3→C, 3, p1) – ReLU – Conv(C→C, 3, s2, p1) – Flatten – Linear(→10),
CrossEntropyLoss (mean), one batch of `--batch` images of `--image`² pixels. For float32 and
float64, medians over `--repeats` of:

  * KFAC factors (expand and reduce) and one product: tnderive recomputes them on its
    compiled programs (`KFAC._compute`); curvlinops builds a fresh `KFACLinearOperator`
    (its `compute_kronecker_factors()` adds to the factors it already holds);
  * the KFAC-preconditioned gradient: `(KFAC + λI)⁻¹ g` with exact damping (inverse built and
    applied; both sides);
  * one GGN-vector and one Hessian-vector product;

plus the one-off cost of tnderive's first call (tracing, deriving, compiling) and the largest
deviation between the two results. Peak memory: CUDA `max_memory_allocated` on a GPU; on CPU
the torch profiler's allocation events are not used (too slow for whole operators), so the
column shows the process's resident-set high-water mark growth during the timed calls.

    python benchmarks/operators.py [--batch 16] [--image 16] [--channels 8] [--repeats 5]
                                   [--device cpu|cuda] [--no-write]

Writes its section of benchmarks/RESULTS.md between `<!-- BEGIN operators -->` and
`<!-- END operators -->`.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tnderive as tn  # noqa: E402
from _results import write_section  # noqa: E402

try:  # the peer (the bench extra)
    import curvlinops
except ImportError:  # pragma: no cover - optional
    curvlinops = None


def cnn(channels: int, image: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.Flatten(),
                         nn.Linear(channels * (image // 2) ** 2, 10))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, float, object]:
    """(median seconds, peak MiB, last result) of `fn` over `repeats` calls after one warm-up."""
    out = fn()
    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return statistics.median(times), peak, out


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def run(dtype: torch.dtype, args) -> list[tuple]:
    torch.manual_seed(0)
    device = args.device
    model = cnn(args.channels, args.image).to(device, dtype)
    X = torch.randn(args.batch, 3, args.image, args.image, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    data = [(X, y)]
    grads = torch.autograd.grad(loss_func(model(X), y), params)
    v = [torch.randn_like(p) for p in params]
    rows = []

    def row(what, ours, theirs, first=None):
        (t1, m1, r1), peer = ours, theirs
        err = "-"
        line = [what, t1, m1, None, None, None, first, err]
        if peer is not None:
            t2, m2, r2 = peer
            line[3:6] = [t2, m2, t1 / t2]
            a, b = _flat(r1), _flat(r2)
            line[7] = f"{float((a - b).abs().max() / b.abs().max()):.1e}"
        rows.append(line)

    for kind in ("expand", "reduce"):
        t = time.perf_counter()
        ours = tn.KFAC(model, loss_func, params, data, kind=kind, progressbar=False)
        first = time.perf_counter() - t
        mine = measure(lambda: (ours._compute(), ours @ v)[1], args.repeats, device)
        peer = None
        if curvlinops is not None:
            def fresh():   # its compute_kronecker_factors() adds to the factors it holds
                return curvlinops.KFACLinearOperator(model, loss_func, params, data,
                                                     fisher_type="type-2", kfac_approx=kind,
                                                     check_deterministic=False)
            peer = measure(lambda: fresh() @ v, args.repeats, device)
            ref = fresh()
        row(f"KFAC-{kind} factors (+ one product)", mine, peer, first)
        if kind == "expand":
            mine = measure(lambda: ours.precondition(grads, damping=1e-3), args.repeats, device)
            peer = None
            if curvlinops is not None:
                peer = measure(lambda: curvlinops.KFACInverseLinearOperator(
                    ref, damping=1e-3, use_exact_damping=True) @ list(grads), args.repeats, device)
            row("KFAC-preconditioned gradient (exact damping)", mine, peer)
    for name, ours_cls, peer_name in (("GGN-vector product", tn.GGN, "GGNLinearOperator"),
                                      ("Hessian-vector product", tn.Hessian, "HessianLinearOperator")):
        t = time.perf_counter()
        op = ours_cls(model, loss_func, params, data, progressbar=False)
        op @ v
        first = time.perf_counter() - t
        mine = measure(lambda: op @ v, args.repeats, device)
        peer = None
        if curvlinops is not None:
            ref = getattr(curvlinops, peer_name)(model, loss_func, params, data,
                                                 check_deterministic=False)
            peer = measure(lambda: ref @ v, args.repeats, device)
        row(name, mine, peer, first)
    return rows


def table(rows_by_dtype: dict) -> str:
    head = ("| dtype | what | tnderive (median) | peak MiB | curvlinops (median) | peak MiB | "
            "ratio | tnderive first call | max rel. difference |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
    lines = []
    for dt, rows in rows_by_dtype.items():
        for what, t1, m1, t2, m2, ratio, first, err in rows:
            f = lambda x, unit="ms": "-" if x is None else f"{x * 1e3:.1f} {unit}"  # noqa: E731
            lines.append(f"| {dt} | {what} | {f(t1)} | {m1:.0f} | {f(t2)} | "
                         f"{'-' if m2 is None else f'{m2:.0f}'} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}×'} | "
                         f"{'-' if first is None else f'{first:.2f} s'} | {err} |")
    return head + "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--image", type=int, default=16)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {}
    for dtype in (torch.float32, torch.float64):
        rows[str(dtype).replace("torch.", "")] = run(dtype, args)
    peer = (f"curvlinops {getattr(curvlinops, '__version__', '(installed)')}" if curvlinops
            else "curvlinops: not installed (tnderive only)")
    text = (f"## Curvature operators on a CNN (`benchmarks/operators.py`)\n\n"
            f"Conv(3→{args.channels})–ReLU–Conv(s2)–Flatten–Linear(→10), CrossEntropyLoss (mean), "
            f"batch {args.batch}, {args.image}×{args.image} images; device {args.device}, "
            f"{args.threads} thread(s), torch {torch.__version__}, {platform.machine()}; "
            f"medians over {args.repeats} calls after a warm-up; ratio = tnderive / curvlinops "
            f"(< 1: tnderive faster). Peak MiB: CUDA max_memory_allocated, or on CPU the growth of "
            f"the process's RSS high-water mark during the timed calls (0: no new pages).\n"
            f"- peer: {peer}.\n\n" + table(rows) + "\n")
    print(text)
    if not args.no_write:
        write_section("operators" if args.device == "cpu" else f"operators-{args.device}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
