"""Seconds to derive and simplify all 9 (Q,K,V) Hessian blocks of single-head self-attention
with squared loss, tnderive vs the symbolic peer tensorgrad (optional).

    python benchmarks/derive_speed.py [--repeats 5] [--peer-timeout 300] [--no-write]

Network (index notation):
    T[q,k] = X[q,d]*WQ[d,e]*WK[d2,e]*X[k,d2]/sqrt(2)
    A[q,k] = softmax(T[q,k], k)
    F[q,v] = A[q,k]*X[k,d3]*WV[d3,v]
    loss   = sum((F[q,v] - Y[q,v])**2)

Each tnderive repeat runs in a fresh child process (cold caches: derivative memo, canonical
hashes), timing `simplify(hessian(loss, a, b))` for the 9 blocks; the median over repeats is
reported with the child's peak RSS (which includes importing torch). The peer builds the same
network and times `loss.grad(WQ).grad(WQ).full_simplify()` (the W_Q–W_Q block only) in a child
process with a timeout. Results go to benchmarks/RESULTS.md between the `derive_speed` markers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from _results import kept_peer_line, write_section

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCKS = [(a, b) for a in ("WQ", "WK", "WV") for b in ("WQ", "WK", "WV")]
NOTATION = """T[q,k] = X[q,d]*WQ[d,e]*WK[d2,e]*X[k,d2]/sqrt(2)
A[q,k] = softmax(T[q,k], k)
F[q,v] = A[q,k]*X[k,d3]*WV[d3,v]
loss = sum((F[q,v] - Y[q,v])**2)"""


def attention_loss():
    """The benchmark network, parsed from notation."""
    import tnderive
    return tnderive.parse(NOTATION)


def clear_caches() -> None:
    """Forget memoised derivatives, hashes and folded coefficients (not imports)."""
    from tnderive import canonical, derive
    from tnderive.rules import algebra, elementwise
    for fn in (derive._d, derive.var_names, canonical._graph, canonical.canonical_hash,
               canonical.coarse_key, elementwise.hadamard_formula):
        fn.cache_clear()
    algebra._FOLDED.clear()


def child() -> None:
    """One fresh process: the 9 blocks cold (first use imports networkx, sympy's simplify
    machinery, the rule modules), then again with every cache cleared (compute only).
    Prints JSON {per-block seconds, totals, peak RSS MiB, term counts}."""
    import resource
    from tnderive.derive import hessian
    from tnderive.simplify import count_terms, simplify
    loss = attention_loss()
    out = {"blocks": {}, "terms": {}}
    for phase in ("cold", "compute"):
        if phase == "compute":
            clear_caches()
        t_all = time.perf_counter()
        for a, b in BLOCKS:
            t0 = time.perf_counter()
            h = simplify(hessian(loss, a, b))
            if phase == "compute":
                out["blocks"][f"{a},{b}"] = time.perf_counter() - t0
                out["terms"][f"{a},{b}"] = count_terms(h)
        out[phase] = time.perf_counter() - t_all
    out["rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def peer_child() -> None:
    """tensorgrad: the W_Q–W_Q block (grad twice, then full_simplify)."""
    import sympy
    import tensorgrad
    import tensorgrad.functions as F
    import tensorgrad.tensor as tg
    seq, d, e, o = sympy.symbols("seq d e o")
    X = tg.Variable("X", seq=seq, dim=d)
    WQ, WK = tg.Variable("WQ", dim=d, inner=e), tg.Variable("WK", dim=d, inner=e)
    WV, Y = tg.Variable("WV", dim=d, out=o), tg.Variable("Y", seq=seq, out=o)
    logits = (X @ WQ) @ (X.rename(seq="seqk") @ WK)
    Fo = F.softmax(logits, dim="seqk") @ (X.rename(seq="seqk") @ WV)
    loss = F.sum(F.pow(Fo - Y, 2))
    t0 = time.perf_counter()
    h = loss.grad(WQ, {"dim": "dim1", "inner": "inner1"}).grad(WQ, {"dim": "dim2", "inner": "inner2"})
    h.full_simplify()
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "version": getattr(tensorgrad, "__version__", "0.3.0")}))


def run_child(flag: str, python: str, timeout: float | None):
    t0 = time.perf_counter()
    try:
        r = subprocess.run([python, os.path.abspath(__file__), flag], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"child {flag} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def peer_python(explicit: str | None) -> str | None:
    """A python that can import tensorgrad (this one, or --peer-python), else None."""
    for py in ([explicit] if explicit else []) + [sys.executable]:
        r = subprocess.run([py, "-c", "import tensorgrad"], capture_output=True)
        if r.returncode == 0:
            return py
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peer-timeout", type=float, default=300.0)
    ap.add_argument("--peer-python", default=None,
                    help="python with tensorgrad installed (e.g. a separate venv: it pins networkx)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    runs = [run_child("--child", sys.executable, None)[0] for _ in range(args.repeats)]
    totals = [r["cold"] for r in runs]
    med = statistics.median(totals)
    compute = statistics.median(r["compute"] for r in runs)
    per_block = {k: statistics.median(r["blocks"][k] for r in runs) for k in runs[0]["blocks"]}
    rss = max(r["rss_mib"] for r in runs)
    print(f"tnderive: all 9 blocks derive+simplify median {med:.3f} s "
          f"(min {min(totals):.3f}, max {max(totals):.3f}, {args.repeats} cold runs), "
          f"peak RSS {rss:.0f} MiB; compute only (imports done, caches cleared) {compute:.3f} s")
    for k, s in per_block.items():
        print(f"  {k:8s} {s * 1000:8.1f} ms  {runs[0]['terms'][k]} terms")

    peer_line = kept_peer_line("derive_speed", "tensorgrad")  # never a quoted placeholder
    if not args.no_peer:
        py = peer_python(args.peer_python)
        if py is not None:
            res, wall = run_child("--peer-child", py, args.peer_timeout)
            if res is None:
                peer_line = (f"tensorgrad 0.3.0, W_Q–W_Q block only: did not finish within "
                             f"{args.peer_timeout:.0f} s (killed) → ratio > {args.peer_timeout / med:,.0f}× "
                             f"vs tnderive's {med:.2f} s for all 9 blocks (cold)")
            else:
                peer_line = (f"tensorgrad {res['version']}, W_Q–W_Q block only: {res['seconds']:.1f} s "
                             f"→ ratio {res['seconds'] / med:,.0f}× vs tnderive's {med:.2f} s "
                             f"for all 9 blocks (cold)")
    print(peer_line)
    if args.no_write:
        return
    lines = [
        "## derive_speed: 9 (Q,K,V) Hessian blocks of self-attention, derive + simplify",
        "",
        f"Command: `python benchmarks/derive_speed.py --repeats {args.repeats} "
        f"--peer-timeout {args.peer_timeout:.0f}"
        + (f" --peer-python {args.peer_python}" if args.peer_python else "") + "`  ",
        "(tensorgrad pins networkx==3.2.1, so it lives in its own venv: "
        "`python -m venv --system-site-packages /tmp/tgenv && /tmp/tgenv/bin/pip install "
        "tensorgrad==0.3.0`; the peer child runs there.)  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}.",
        "",
        "```", NOTATION, "```", "",
        f"- tnderive, all 9 blocks (cold process each run): **median {med:.2f} s** "
        f"(min {min(totals):.2f}, max {max(totals):.2f}; target < 5 s), including first-use "
        f"imports of networkx and sympy's simplify; {compute:.2f} s compute only (imports done, "
        f"caches cleared); peak RSS {rss:.0f} MiB (includes torch).",
        f"- peer: {peer_line}.",
        "",
        "| block | median ms (compute only) | terms (expanded) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {s * 1000:.1f} | {runs[0]['terms'][k]} |" for k, s in per_block.items()]
    write_section("derive_speed", "\n".join(lines))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    elif "--peer-child" in sys.argv:
        peer_child()
    else:
        main()
