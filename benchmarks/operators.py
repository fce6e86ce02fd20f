"""Whole-model curvature operators: tnderive.{KFAC, GGN, Hessian} vs curvlinops, same process.

Models (issue 14), CrossEntropyLoss (mean), one batch of `--batch` images of `--image`²
pixels (default 64 of 32², as in issue 14), width C = `--channels` (default 16):
  * ResNet-style CNN (the KFAC rows): Conv3x3 stem – 3 residual blocks (3x3 convs; the second
    strided, C → 2C, with a 1x1 strided skip conv) – global average pool – Linear(2C→10);
  * 3-conv CNN (the other rows): Conv(3→C, 3, p1) – ReLU – Conv(C→C, 3, s2, p1) – Flatten –
    Linear(→10).
For float32 and float64, medians over `--repeats` of:

  * KFAC factors (expand and reduce, type-2) and one product: tnderive recomputes them with
    its compiled pass (`KFAC._compute`: one fused network per input shape, forward and one
    reverse pass carrying all C−1 loss-Hessian square-root columns, the batch in pieces of
    `operators.batching.MICRO_BATCH_BYTES`); curvlinops builds a fresh
    `KFACLinearOperator` (its `compute_kronecker_factors()` adds to the factors it holds);
  * the KFAC-preconditioned gradient: `(KFAC + λI)⁻¹ g` with exact damping (inverse built and
    applied; both sides);
  * one GGN-vector and one Hessian-vector product;
  * scipy `eigsh` (top 3 by magnitude, same v0 and tol) on the Hessian's `to_scipy()`;
  * the exact GGN diagonal (`GGN.diagonal()`; peer: BackPACK's `DiagGGNExact`);

plus the one-off cost of tnderive's first call (tracing, deriving, compiling) and the largest
deviation between the two results. Peak memory: CUDA `max_memory_allocated` on a GPU; on CPU
the torch profiler's allocation events are not used (too slow for whole operators), so the
column shows the process's resident-set high-water mark growth during the timed calls.

    python benchmarks/operators.py [--batch 64] [--image 32] [--channels 16] [--repeats 5]
                                   [--device cpu|cuda] [--no-write]

It re-executes itself once under glibc tunables that keep freed memory in the process
(benchmarks/_steady.py, as benchmarks/kfac.py and conv.py do): otherwise a call that
allocates tens of MB pays page faults or not depending on what ran before it (both sides:
tnderive's float32 KFAC-reduce measured 275–350 ms in one process depending on the calls
before it, curvlinops' float64 KFAC-expand 4.1 s against 2.4 s steady).
TNDERIVE_BENCH_NO_REEXEC=1 keeps the default allocator.

Writes its section of benchmarks/RESULTS.md between `<!-- BEGIN operators -->` and
`<!-- END operators -->`.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from importlib.metadata import version
from typing import Callable

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import tnderive as tn  # noqa: E402
from tests.resnet_model import ResNet  # noqa: E402
from tests.vit_model import ViT  # noqa: E402
from _results import write_section  # noqa: E402
from _steady import steady_allocator  # noqa: E402

try:  # the peer (the bench extra)
    import curvlinops
except ImportError:  # pragma: no cover - optional
    curvlinops = None
try:  # the diagonal's peer
    import backpack
    from backpack.extensions import DiagGGNExact
except ImportError:  # pragma: no cover - optional
    backpack = None


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


def _problem(model: nn.Module, args, dtype: torch.dtype):
    """(CrossEntropyLoss, every parameter, one batch of `--batch` random `--image`² images
    with 10-class targets, a random vector shaped like the parameters)."""
    device = args.device
    X = torch.randn(args.batch, 3, args.image, args.image, device=device, dtype=dtype)
    y = torch.randint(0, 10, (args.batch,), device=device)
    params = list(model.parameters())
    return nn.CrossEntropyLoss(), params, [(X, y)], [torch.randn_like(p) for p in params]


def run(dtype: torch.dtype, args) -> list[tuple]:
    torch.manual_seed(0)
    device = args.device
    model = cnn(args.channels, args.image).to(device, dtype)
    loss_func, params, data, v = _problem(model, args, dtype)
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

    _kfac_rows(dtype, args, row)
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
    _eigsh_and_diagonal_rows(model, loss_func, params, data, args, row)
    _vit_rows(dtype, args, row)
    return rows


def _vit_rows(dtype: torch.dtype, args, row) -> None:
    """The ViT-style model (tests/vit_model.py: patchify conv, 2 pre-LN blocks with
    MultiheadAttention and GELU MLPs, LayerNorm, mean pooling, head; d = 32, 4 heads, 64
    tokens), every parameter: tnderive only (curvlinops' KFAC refuses the model, its
    Hessian operator needs forward-mode AD through CPU flash attention)."""
    torch.manual_seed(0)
    device = args.device
    model = ViT(d=32, heads=4, depth=2, classes=10, patch=4).to(device, dtype).eval()
    loss_func, params, data, v = _problem(model, args, dtype)
    for what, make in (("KFAC-expand factors (+ one product)",
                        lambda: tn.KFAC(model, loss_func, params, data, progressbar=False)),
                       ("GGN-vector product", lambda: tn.GGN(model, loss_func, params, data,
                                                             progressbar=False)),
                       ("Hessian-vector product", lambda: tn.Hessian(model, loss_func, params, data,
                                                                     progressbar=False))):
        t = time.perf_counter()
        op = make()
        op @ v
        first = time.perf_counter() - t
        if isinstance(op, tn.KFAC):
            mine = measure(lambda: (op._compute(), op @ v)[1], args.repeats, device)
        else:
            mine = measure(lambda: op @ v, args.repeats, device)
        row(f"ViT ({sum(p.numel() for p in params):,} parameters): {what}", mine, None, first)


def _kfac_rows(dtype: torch.dtype, args, row) -> None:
    """KFAC factors (expand, reduce; type-2) and the preconditioned gradient on the
    ResNet-style CNN, batch `--batch` of `--image`² images, width `--channels`."""
    torch.manual_seed(0)
    device = args.device
    model = ResNet(3, (args.channels, args.channels, 2 * args.channels, 2 * args.channels), (1, 2, 1), 10).to(device, dtype)
    loss_func, params, data, v = _problem(model, args, dtype)
    (X, y), = data
    grads = torch.autograd.grad(loss_func(model(X), y), params)
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
        row(f"ResNet: KFAC-{kind} factors (+ one product)", mine, peer, first)
        if kind == "expand":
            mine = measure(lambda: ours.precondition(grads, damping=1e-3), args.repeats, device)
            peer = None
            if curvlinops is not None:
                peer = measure(lambda: curvlinops.KFACInverseLinearOperator(
                    ref, damping=1e-3, use_exact_damping=True) @ list(grads), args.repeats, device)
            row("ResNet: KFAC-preconditioned gradient (exact damping)", mine, peer)


def _eigsh_and_diagonal_rows(model, loss_func, params, data, args, row) -> None:
    """scipy eigsh (top 3 by magnitude, same v0 and tol for both) on the Hessian operators,
    and the exact GGN diagonal (peer: BackPACK's DiagGGNExact when installed)."""
    device = args.device
    dim = sum(p.numel() for p in params)
    v0 = np.random.default_rng(0).standard_normal(dim)

    def top3(linop):
        vals = eigsh(linop, k=3, which="LM", v0=v0, tol=1e-5, return_eigenvectors=False)
        return [torch.as_tensor(np.sort(vals))]
    reps = max(1, args.repeats // 3)     # each eigsh runs tens of products
    op = tn.Hessian(model, loss_func, params, data, progressbar=False)
    t = time.perf_counter()
    op @ torch.zeros(dim, device=device, dtype=params[0].dtype)
    first = time.perf_counter() - t
    mine = measure(lambda: top3(op.to_scipy()), reps, device)
    peer = None
    if curvlinops is not None:
        ref = curvlinops.HessianLinearOperator(model, loss_func, params, data,
                                               check_deterministic=False).to_scipy()
        peer = measure(lambda: top3(ref), reps, device)
    row("eigsh top-3 of the Hessian (scipy, tol 1e-5)", mine, peer, first)
    op = tn.GGN(model, loss_func, params, data, progressbar=False)
    t = time.perf_counter()
    op.diagonal()
    first = time.perf_counter() - t
    mine = measure(lambda: [op.diagonal()], args.repeats, device)
    peer = None
    if backpack is not None:
        bp_model = backpack.extend(copy.deepcopy(model))
        bp_loss = backpack.extend(copy.deepcopy(loss_func))

        def diag_ggn_exact():
            X, y = data[0]
            loss = bp_loss(bp_model(X), y)
            with backpack.backpack(DiagGGNExact()), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Full backward hook")   # X needs no grad
                loss.backward()
            return [p.diag_ggn_exact for p in bp_model.parameters()]
        peer = measure(diag_ggn_exact, args.repeats, device)
    row("exact GGN diagonal (peer: BackPACK DiagGGNExact)", mine, peer, first)


def table(rows_by_dtype: dict) -> str:
    head = ("| dtype | what | tnderive (median) | peak MiB | peer (median) | peak MiB | "
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
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image", type=int, default=32)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    allocator = steady_allocator()
    torch.set_num_threads(args.threads)
    rows = {}
    load0 = os.getloadavg()
    for dtype in (torch.float32, torch.float64):
        rows[str(dtype).replace("torch.", "")] = run(dtype, args)
    peer = (f"curvlinops {getattr(curvlinops, '__version__', '(installed)')}" if curvlinops
            else "curvlinops: not installed (tnderive only)")
    peer += (f"; for the diagonal BackPACK {version('backpack-for-pytorch')}"
             if backpack else "; BackPACK not installed (diagonal: tnderive only)")
    load = " → ".join("/".join(f"{x:.1f}" for x in avg) for avg in (load0, os.getloadavg()))
    command = " ".join(["python", "benchmarks/operators.py",
                        *(sys.argv[1:] if argv is None else argv)])
    text = (f"## Curvature operators on a CNN (`benchmarks/operators.py`)\n\n"
            f"Command: `{command}`; {allocator} (benchmarks/_steady.py).\n"
            f"Rows \"ResNet: …\": ResNet-style CNN (Conv3x3 stem {args.channels} channels, 3 "
            f"residual blocks of 3x3 convs, the second strided to {2 * args.channels} channels "
            f"with a 1x1 skip conv, global average pool, Linear(→10)); rows \"ViT …\": "
            f"patchify conv (4×4), 2 pre-LN blocks (MultiheadAttention, 4 heads, d = 32, GELU "
            f"MLP), LayerNorm, mean pooling, Linear(→10), every parameter, tnderive only "
            f"(curvlinops' KFAC refuses it); other rows: "
            f"Conv(3→{args.channels})–ReLU–Conv(s2)–Flatten–Linear(→10). CrossEntropyLoss (mean), "
            f"batch {args.batch}, {args.image}×{args.image} images; device {args.device}, "
            f"{args.threads} thread(s), torch {torch.__version__}, {platform.machine()}; "
            f"medians over {args.repeats} calls after a warm-up; ratio = tnderive / peer "
            f"(< 1: tnderive faster). Peak MiB: CUDA max_memory_allocated, or on CPU the growth of "
            f"the process's RSS high-water mark during the timed calls (0: no new pages). "
            f"Load average (1/5/15 min) at start → end: {load}.\n"
            f"- peer: {peer}.\n\n" + table(rows) + "\n")
    print(text)
    if not args.no_write:
        write_section("operators" if args.device == "cpu" else f"operators-{args.device}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
