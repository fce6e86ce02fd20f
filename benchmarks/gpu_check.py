"""Run generated code for the codegen test expressions on CUDA and compare with CPU float64.

For every expression of `tests/cases/codegen_cases.py` (and the einsum-level networks of
`benchmarks/codegen.py`): generate the module once, run it on CPU in float64 (the reference,
also checked against `tnderive.evaluate` where that is cheap) and on CUDA in float64 and
float32, and time the CUDA float32 call (median of synchronised repeats). Prints a table.

Without CUDA it prints a message and exits 0.

    python benchmarks/gpu_check.py [--repeats 20] [--scale 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def _time(fn, repeats: int, dev: torch.device) -> float:
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def cases(scale: int):
    """(name, expr, tensors on CPU float64) for every check."""
    from tests.cases.codegen_cases import CASES, conv_expr, random_inputs

    sizes = {k: v * scale for k, v in {"n": 3, "o": 4, "i": 5, "j": 2, "k": 3, "m": 4, "p": 2,
                                       "s": 3, "t": 3, "d": 4, "e": 2}.items()}
    for name in sorted(CASES):
        yield name, CASES[name], random_inputs(CASES[name], sizes)
    conv = conv_expr()
    yield "conv_kfac_reduce_pattern", conv, random_inputs(conv, {"c": 2 * scale, "h": 6 * scale})
    try:
        import codegen as bench
    except ImportError:
        return
    for net in bench.networks(quick=True):
        _, compiled, _, tensors = bench.build(net, torch.device("cpu"), torch.float64)
        yield "bench " + net.name, compiled.expr, tensors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--scale", type=int, default=1, help="multiply the test sizes")
    ap.add_argument("--device", default="cuda", help="target device (cpu only to test this script)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; nothing to check (skipped).")
        return 0
    from tnderive import evaluate
    from tnderive.codegen import codegen, load
    from tnderive.errors import TNError

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)
    print(f"device: {name}, torch {torch.__version__}")
    head = (f"| {'expression':42} | {'rel err f64':>11} | {'rel err f32':>11} | {'f32 time':>13} "
            f"| {'vs evaluate':>11} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    failures = 0
    for name, expr, tensors in cases(args.scale):
        try:
            fn = load(codegen(expr, "f"), "f")
            ref = fn(**tensors)                                # CPU float64
            ev = _rel(ref, evaluate(expr, **tensors)) if ref.numel() < 10**6 else float("nan")
            t64 = {k: v.to(dev) for k, v in tensors.items()}
            t32 = {k: v.to(dev, torch.float32) for k, v in tensors.items()}
            out64, out32 = fn(**t64), fn(**t32)
            assert out64.device.type == dev.type and out32.dtype == torch.float32
            e64, e32 = _rel(out64, ref), _rel(out32, ref)
            ms = _time(lambda: fn(**t32), args.repeats, dev) * 1e3
            ok = e64 < 1e-9 and e32 < 1e-3 and not ev > 1e-9
            failures += not ok
            print(f"| {name[:42]:42} | {e64:11.1e} | {e32:11.1e} | {ms:10.3f} ms | {ev:11.1e} |"
                  f"{'' if ok else '  <-- FAIL'}")
        except (TNError, RuntimeError, AssertionError) as e:  # a failing case: report, go on
            failures += 1
            print(f"| {name[:42]:42} | error: {type(e).__name__}: {str(e)[:80]}")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
