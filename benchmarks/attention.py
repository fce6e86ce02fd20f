"""Self-attention Hessian blocks: tnderive's generated code vs torch.func.hessian.

One self-attention layer (softmax, one head, no W_O), squared loss (mean), CPU, float64,
2 threads, d = 64, d_k = 32. For each sequence length L the Q–Q block of the Hessian is
computed by
  * torch.func.hessian of the loss written in torch (the peer), and
  * tnderive: the block derived symbolically, split into Gauss-Newton + functional parts,
    simplified and compiled with `tnderive.compile` (`hessian_blocks(...)[WQ, WQ].total.program()`:
    the sum is expanded into terms, the factors carrying output indices hoisted out of it,
    each remainder contracted along its planned path, shared intermediates computed once).
Every measurement runs in a fresh subprocess so its peak memory (ru_maxrss above the
process's resident size before the computation) is its own. Times are medians over repeats.
The symbolic FLOP count of every block (from the plan, sizes L, d, d_k kept symbolic) shows
how each block's cost grows.

    python benchmarks/attention.py                 # L = 64, 128, 256 for tnderive; peer to 128
    python benchmarks/attention.py --peer-max 256  # also run the peer at L = 256 (≈7 GB)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_section

ROOT = Path(__file__).resolve().parents[1]
MARK = "attention"
D, DK = 64, 32


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(method: str, L: int, repeats: int, threads: int = 2) -> dict:
    import torch
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    sys.path.insert(0, str(ROOT))
    from tnderive.nn.attention import self_attention
    model = self_attention(L, D, DK)
    t = model.random_inputs(0)
    setup = 0.0
    if method == "peer":
        from torch.func import hessian
        others = {k: v for k, v in t.items() if k != "WQ"}

        def run():
            return hessian(lambda w: model.torch_loss(WQ=w, **others))(t["WQ"])
    else:
        from tnderive.attention import hessian_blocks
        t0 = time.perf_counter()
        blocks = hessian_blocks(model, params=("WQ",))
        prog = blocks["WQ", "WQ"].total.program()
        setup = time.perf_counter() - t0

        def run():
            return prog(**{k: t[k] for k in blocks["WQ", "WQ"].total.expr.variables})
    base = _rss_mb()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
        del out
    return dict(method=method, L=L, seconds=statistics.median(times), repeats=repeats,
                peak_mb=max(_peak_mb() - base, 0.0), setup=setup, threads=threads)


def spawn(method: str, L: int, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(L), str(repeats), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_agreement(L: int = 32) -> float:
    """Max relative difference of the Q–Q block, tnderive vs torch.func, at a small L."""
    import torch
    from torch.func import hessian
    from tnderive.nn.attention import self_attention
    from tnderive.attention import hessian_blocks
    torch.set_default_dtype(torch.float64)
    model = self_attention(L, D, DK)
    t = model.random_inputs(0)
    others = {k: v for k, v in t.items() if k != "WQ"}
    ref = hessian(lambda w: model.torch_loss(WQ=w, **others))(t["WQ"])
    got = hessian_blocks(model, params=("WQ",))["WQ", "WQ"].total.evaluate(t)
    return float((got - ref).abs().max() / ref.abs().max())


def symbolic_costs() -> list[tuple]:
    """(block, part, terms, FLOP polynomial, dominant term) with L, d, d_k symbolic."""
    import sympy
    from tnderive.nn.attention import self_attention
    from tnderive.attention import hessian_blocks
    model = self_attention("L", "d", "d_k")
    blocks = hessian_blocks(model, upper=True)
    plan = {"L": 256, "d": D, "d_k": DK, "d_v": D}
    rows = []
    subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in plan.items()}
    for (p, q), b in blocks.items():
        for name, part in b.parts().items():
            if part.is_zero:
                rows.append((f"{p}–{q}", name, 0, "0", "0"))
                continue
            prog = part.program(plan_sizes=plan)
            flops = sympy.expand(prog.plan.flops.subs(sympy.Symbol("d_v", integer=True, positive=True),
                                                 sympy.Symbol("d", integer=True, positive=True)))
            terms = sympy.Add.make_args(flops)
            dom = max(terms, key=lambda m: float(m.xreplace(subs)))
            rows.append((f"{p}–{q}", name, len(part.monomials), str(flops), str(dom)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "L", "REPEATS", "THREADS"))
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                    help="torch thread counts to measure (default 2, then 1)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--peer-max", type=int, default=128, help="largest L for torch.func.hessian")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.worker:
        method, L, rep, th = args.worker
        print(json.dumps(worker(method, int(L), int(rep), int(th))))
        return
    sys.path.insert(0, str(ROOT))
    err = check_agreement()
    print(f"agreement with torch.func at L=32: max rel diff {err:.1e}")
    rows = []
    for th in args.threads:
        for L in args.lengths:
            ours = spawn("tnderive", L, args.repeats, th)
            peer = spawn("peer", L, 1 if L >= 256 else args.repeats, th) if L <= args.peer_max else None
            rows.append((th, L, ours, peer))
            print(th, L, ours, peer, flush=True)
    load = os.getloadavg()
    t0 = time.perf_counter()
    costs = symbolic_costs()
    t_costs = time.perf_counter() - t0
    lines = [
        "## Self-attention Hessian blocks (tnderive.attention vs torch.func.hessian)",
        "",
        f"Q–Q block of one softmax self-attention layer, squared loss (mean), d = {D}, d_k = {DK}, "
        "float64, CPU, `torch.set_num_threads(T)`, each run in its own subprocess; time = median "
        f"over {args.repeats} repeats (1 for the peer at L ≥ 256); peak = ru_maxrss growth during "
        "the runs. tnderive runs the code `tnderive.compile` generates for the total block "
        "(Gauss-Newton + functional parts; the sum expanded into terms, the factors carrying "
        "output indices hoisted out of it, shared intermediates computed once); symbolic "
        "derivation + code generation time is listed separately (one-off per layer shape). "
        f"Agreement with torch.func at L = 32: max relative difference {err:.1e}. "
        f"The 2-core machine was shared with other jobs (load average {load[0]:.1f} / {load[1]:.1f} "
        "over 1 / 5 min at the end): with 2 threads every torch op waits for its slower thread, "
        "which penalises code made of many small contractions (tnderive) more than a few big "
        "ones; the 1-thread rows are the steadier comparison.",
        "",
        "| threads | L | torch.func.hessian s | peak MB | tnderive s | peak MB | speed-up | memory ratio | tnderive setup s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for th, L, ours, peer in rows:
        if peer:
            sp = peer["seconds"] / ours["seconds"]
            mr = ours["peak_mb"] / max(peer["peak_mb"], 1e-9)
            lines.append(f"| {th} | {L} | {peer['seconds']:.3f} | {peer['peak_mb']:.0f} | {ours['seconds']:.3f} | "
                         f"{ours['peak_mb']:.0f} | {sp:.1f}× | {mr:.2f} | {ours['setup']:.2f} |")
        else:
            lines.append(f"| {th} | {L} | not run here | — | {ours['seconds']:.3f} | {ours['peak_mb']:.0f} | — | — | "
                         f"{ours['setup']:.2f} |")
    import math
    growth = []
    for th in args.threads:
        for who, idx in (("torch.func.hessian", 3), ("tnderive", 2)):
            pts = [(r[1], r[idx]) for r in rows if r[0] == th and r[idx]]
            if len(pts) >= 2:
                (l0, a), (l1, b) = pts[0], pts[-1]
                e_t = math.log(b["seconds"] / a["seconds"]) / math.log(l1 / l0)
                e_m = math.log(max(b["peak_mb"], 1) / max(a["peak_mb"], 1)) / math.log(l1 / l0)
                growth.append(f"{who} ({th} thread{'s' if th > 1 else ''}): time ∝ L^{e_t:.1f}, "
                              f"peak memory ∝ L^{e_m:.1f} between L = {l0} and {l1}")
    lines += [
        "",
        "Issue 7 quotes the peer at L = 256 as 12.9 s and 7.1 GB peak on its machine "
        "(`--peer-max 256` runs it here). Measured growth: " + "; ".join(growth) + ". "
        "tnderive's memory is dominated by block-sized ([d, d_k, d, d_k]) temporaries and does "
        "not grow with L; its planned cost per block is below.",
        "",
        f"### Planned cost per block (FLOPs in opt_einsum's convention, L, d, d_k symbolic; "
        f"d_v = d; plan chosen at "
        f"L = 256; computed in {t_costs:.1f} s)",
        "",
        "| block | part | terms | dominant term | full count |",
        "| --- | --- | --- | --- | --- |",
    ]
    for blk, part, n, flops, dom in costs:
        lines.append(f"| {blk} | {part} | {n} | `{dom}` | `{flops}` |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(MARK, text)


if __name__ == "__main__":
    main()
