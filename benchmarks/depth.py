"""Derivation against depth: gradients of L-layer attention and tanh-MLP stacks (issue 13, item 4).

    python benchmarks/depth.py [--max-layers 4] [--time-limit 60] [--repeats 5] [--threads 1] [--no-write]

For L = 1, 2, 3, ... (until a case runs past --time-limit seconds or L > --max-layers) and for
three stacks written in index notation (`tn.parse`):

* attention, residual:    T{l}[q,k] = X{l-1}[q,i]*WQ{l}[i,e]*WK{l}[j,e]*X{l-1}[k,j] / √d
                          A{l}[q,k] = softmax(T{l}[q,k], k)
                          X{l}[q,v] = A{l}[q,k]*X{l-1}[k,d]*WV{l}[d,v] + X{l-1}[q,v]
* attention, no residual: the same without `+ X{l-1}[q,v]`
* tanh MLP:               H{l}[n,o] = tanh(W{l}[o,i]*H{l-1}[n,i])

each with the squared loss `loss = sum((X{L} - Y)**2)` (resp. H{L} against T), it measures

* derive + simplify time of the gradient w.r.t. the first layer's weight (WQ1 / W1), split
  into `tn.grad` and `tn.simplify` (after a warm-up derivation of a tiny unrelated network, so
  the fresh process's one-off start-up cost is left out);
* the size of the simplified gradient: distinct nodes (`len(list(expr.walk()))`, shared
  sub-trees visited once) and printed length (`len(str(expr))`);
* the run time of the generated code (`tn.compile`) against torch autograd on the same stack
  written in plain torch (forward + `torch.autograd.grad`, since the generated function also
  computes from the inputs), float64, seq = d = 8 (MLP: n = d = 8), after checking that both
  agree to 1e-9 (relative to the gradient's largest entry).

Every case runs in its own process (multiprocessing, spawn); one that runs past the time
limit is killed and recorded as "> limit". Growth exponents are least-squares slopes of
log(time) against log(L) over the measured depths. The section between the depth markers of
benchmarks/RESULTS.md is replaced (unless --no-write). tensorgrad is an optional symbolic peer:
when it is not installed the section says so and holds no figures for it.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import statistics
import sys
import time
from pathlib import Path

import torch

from tnderive.errors import TNError

if str(Path(__file__).parent) not in sys.path:  # the benchmarks' shared helpers, also on import
    sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

SEQ, DIM = 8, 8            # sequence length / batch and feature width of every stack
STACKS = ("attention+residual", "attention", "mlp")
TOL = 1e-9


# --- the stacks: index notation and plain torch ------------------------------------------

def attention_source(layers: int, residual: bool, dim: int = DIM) -> str:
    """An L-layer single-head self-attention stack with squared loss, in index notation."""
    scale = f" / {math.sqrt(dim)!r}"
    lines = []
    for l in range(1, layers + 1):
        x = f"X{l - 1}"
        lines.append(f"T{l}[q,k] = {x}[q,i]*WQ{l}[i,e]*WK{l}[j,e]*{x}[k,j]{scale}")
        lines.append(f"A{l}[q,k] = softmax(T{l}[q,k], k)")
        lines.append(f"X{l}[q,v] = A{l}[q,k]*{x}[k,d]*WV{l}[d,v]" + (f" + {x}[q,v]" if residual else ""))
    lines.append(f"loss = sum((X{layers}[q,v] - Y[q,v])**2)")
    return "\n".join(lines)


def mlp_source(layers: int) -> str:
    """An L-layer tanh MLP (no biases) with squared loss, in index notation."""
    lines = [f"H{l}[n,o] = tanh(W{l}[o,i]*H{l - 1}[n,i])" for l in range(1, layers + 1)]
    lines.append(f"loss = sum((H{layers}[n,o] - T[n,o])**2)")
    return "\n".join(lines)


def attention_torch(t: dict, layers: int, residual: bool) -> torch.Tensor:
    """The attention stack's loss in plain torch (same formula as `attention_source`)."""
    x = t["X0"]
    for l in range(1, layers + 1):
        scores = (x @ t[f"WQ{l}"]) @ (x @ t[f"WK{l}"]).T / math.sqrt(x.shape[1])
        out = torch.softmax(scores, dim=-1) @ x @ t[f"WV{l}"]
        x = out + x if residual else out
    return ((x - t["Y"]) ** 2).sum()


def mlp_torch(t: dict, layers: int) -> torch.Tensor:
    """The MLP stack's loss in plain torch (same formula as `mlp_source`)."""
    h = t["H0"]
    for l in range(1, layers + 1):
        h = torch.tanh(h @ t[f"W{l}"].T)
    return ((h - t["T"]) ** 2).sum()


def source(stack: str, layers: int, dim: int = DIM) -> str:
    return mlp_source(layers) if stack == "mlp" else \
        attention_source(layers, stack == "attention+residual", dim)


def torch_loss(stack: str, tensors: dict, layers: int) -> torch.Tensor:
    return mlp_torch(tensors, layers) if stack == "mlp" else \
        attention_torch(tensors, layers, stack == "attention+residual")


def wrt(stack: str) -> str:
    """The differentiated parameter: the first layer's W_Q (attention) or W1 (MLP)."""
    return "W1" if stack == "mlp" else "WQ1"


def inputs(stack: str, layers: int, seq: int = SEQ, dim: int = DIM, seed: int = 0) -> dict:
    """Random float64 data (N(0,1)) and weights (N(0,1)/√fan_in) for a stack."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    w = 1 / math.sqrt(dim)
    if stack == "mlp":
        out = {"H0": randn(seq, dim), "T": randn(seq, dim)}
        out.update({f"W{l}": randn(dim, dim, scale=w) for l in range(1, layers + 1)})
        return out
    out = {"X0": randn(seq, dim), "Y": randn(seq, dim)}
    for l in range(1, layers + 1):
        out.update({f"{p}{l}": randn(dim, dim, scale=w) for p in ("WQ", "WK", "WV")})
    return out


# --- one case ------------------------------------------------------------------------------

def median_time(f, repeats: int, min_time: float = 0.02) -> float:
    """Median seconds per call over `repeats` rounds; fast calls repeated within a round."""
    f()
    t0 = time.perf_counter()
    f()
    inner = max(1, min(200, int(min_time / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def warm_up(tn) -> None:
    """Derive and simplify a tiny unrelated network first, so that the one-off cost of a fresh
    process (loading rules, first sympy calls: about 0.2 s) is not charged to the case."""
    tn.simplify(tn.grad(tn.parse("l = sum(tanh(z[i])*softmax(a[i], i)*u[i])"), "z"))


def autograd_gradient(stack: str, tensors: dict, layers: int, name: str) -> torch.Tensor:
    """Forward + torch.autograd.grad of the plain-torch stack w.r.t. `name`."""
    t = dict(tensors)
    t[name] = t[name].detach().requires_grad_()
    return torch.autograd.grad(torch_loss(stack, t, layers), t[name])[0]


def measure_case(stack: str, layers: int, repeats: int) -> dict:
    """Derive, simplify, size, compile, check and time one (stack, depth) case."""
    import tnderive as tn

    warm_up(tn)
    expr = tn.parse(source(stack, layers))
    name = wrt(stack)
    t0 = time.perf_counter()
    raw = tn.grad(expr, name)
    t1 = time.perf_counter()
    grad = tn.simplify(raw)
    t2 = time.perf_counter()
    nodes, chars = len(list(grad.walk())), len(str(grad))
    fn = tn.compile(grad, name=f"grad_{name}")
    tensors = inputs(stack, layers)
    args = {k: v for k, v in tensors.items() if k in expr.variables}
    ours, ref = fn(**args), autograd_gradient(stack, tensors, layers, name)
    err = ((ours.reshape(ref.shape) - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()
    if not err <= TOL:
        raise AssertionError(f"{stack} L={layers}: generated gradient differs from autograd "
                             f"(relative error {err:.2e})")
    return {"grad_s": t1 - t0, "simplify_s": t2 - t1, "derive_s": t2 - t0, "nodes": nodes,
            "chars": chars, "err": err,
            "generated_s": median_time(lambda: fn(**args), repeats),
            "autograd_s": median_time(lambda: autograd_gradient(stack, tensors, layers, name), repeats)}


def _child(queue, stack, layers, repeats, threads) -> None:
    torch.set_num_threads(threads)
    try:
        queue.put(("ok", measure_case(stack, layers, repeats)))
    except (AssertionError, TNError, RuntimeError) as exc:  # a wrong or failed case: recorded
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def run_case(stack: str, layers: int, repeats: int, threads: int, limit: float) -> dict:
    """`measure_case` in a fresh process; {"status": "ok" | "> limit" | "error", ...}."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, stack, layers, repeats, threads))
    start = time.perf_counter()
    proc.start()
    try:
        status, payload = queue.get(timeout=limit)
    except queue_module.Empty:  # past the limit (or the child died without a word)
        status, payload = ("> limit" if proc.is_alive() else "error"), None
    proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    row = {"stack": stack, "layers": layers, "status": status, "wall_s": time.perf_counter() - start}
    if status == "ok":
        row.update(payload)
    elif status == "error":
        row["error"] = payload or f"child exited with code {proc.exitcode}"
    return row


# --- fitting and the table -----------------------------------------------------------------

def growth_exponent(rows: list[dict], key: str) -> float | None:
    """Least-squares slope of log(row[key]) against log(L) over the measured rows."""
    pts = [(math.log(r["layers"]), math.log(r[key])) for r in rows if r["status"] == "ok" and r[key] > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def table(rows: list[dict], limit: float) -> str:
    lines = ["| stack | L | derive + simplify s | grad s | simplify s | nodes | printed chars | "
             "generated ms | autograd ms | generated / autograd | max rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['stack']} | {r['layers']} | "
        if r["status"] == "> limit":
            lines.append(head + f"> {limit:g} s (killed) |" + " – |" * 9)
        elif r["status"] == "error":
            lines.append(head + f"error: {r['error'][:80]} |" + " – |" * 9)
        else:
            lines.append(head + f"{r['derive_s']:.3g} | {r['grad_s']:.3g} | {r['simplify_s']:.3g} | "
                         f"{r['nodes']} | {r['chars']} | {r['generated_s'] * 1e3:.3f} | "
                         f"{r['autograd_s'] * 1e3:.3f} | {r['generated_s'] / r['autograd_s']:.2f}× | "
                         f"{r['err']:.1e} |")
    return "\n".join(lines)


def exponents(rows: list[dict]) -> str:
    def fmt(x):
        return "n/a (fewer than 2 measured depths)" if x is None else f"{x:.2f}"

    out = ["| stack | depths measured | derive + simplify | simplify | nodes | printed chars | "
           "generated code | autograd | derive time × per layer (last step) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for stack in STACKS:
        sel = [r for r in rows if r["stack"] == stack and r["status"] == "ok"]
        if not sel:
            continue
        depths = ", ".join(str(r["layers"]) for r in sel)
        cells = [fmt(growth_exponent(sel, k)) for k in
                 ("derive_s", "simplify_s", "nodes", "chars", "generated_s", "autograd_s")]
        last = (f"{sel[-1]['derive_s'] / sel[-2]['derive_s']:.1f}× ({sel[-2]['layers']} → "
                f"{sel[-1]['layers']})" if len(sel) > 1 and sel[-2]["derive_s"] > 0 else "n/a")
        out.append(f"| {stack} | {depths} | " + " | ".join(cells) + f" | {last} |")
    return "\n".join(out)


def tensorgrad_line() -> str:
    try:
        import tensorgrad  # noqa: F401
    except ImportError:
        return "- tensorgrad (symbolic peer): not installed; not measured."
    return ("- tensorgrad (symbolic peer): installed, but this harness does not drive it yet; "
            "not measured.")


def section(rows, args, load, elapsed, command) -> str:
    return "\n".join([
        "## Derivation against depth (benchmarks/depth.py)",
        "",
        f"Gradient w.r.t. the first layer's weight (WQ1 / W1) of L-layer stacks with squared loss; "
        f"float64, seq = d = {SEQ} (MLP n = d = {DIM}), CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} thread(s), torch {torch.__version__}, Python {platform.python_version()}; "
        f"every case in its own process, killed past {args.time_limit:g} s; run times are medians "
        f"of {args.repeats} rounds; derive times exclude a warm-up derivation of a tiny unrelated "
        f"network (the fresh process's one-off ~0.2 s). Total {elapsed:.0f} s.",
        f"Command: `{command}`. Machine load (os.getloadavg, 1/5/15 min) at start "
        f"{load[0][0]:.2f}/{load[0][1]:.2f}/{load[0][2]:.2f}, at end "
        f"{load[1][0]:.2f}/{load[1][1]:.2f}/{load[1][2]:.2f}; {os.cpu_count()} cores, shared.",
        "nodes = `len(list(expr.walk()))` of the simplified gradient (shared sub-trees once); "
        "printed chars = `len(str(expr))`. generated = the `tn.compile`d gradient function "
        "called on the inputs; autograd = plain-torch forward + `torch.autograd.grad` of the same "
        "stack; both agree to 1e-9 (relative to the largest entry) before timing.",
        tensorgrad_line(),
        "",
        table(rows, args.time_limit),
        "",
        "Growth exponents (least-squares slope of log value against log L over the measured depths):",
        "",
        exponents(rows),
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-layers", type=int, default=24)
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stacks", nargs="*", default=list(STACKS), choices=STACKS)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    command = "python benchmarks/depth.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for stack in args.stacks:
        for layers in range(1, args.max_layers + 1):
            row = run_case(stack, layers, args.repeats, args.threads, args.time_limit)
            rows.append(row)
            detail = (f"derive {row['derive_s']:.2f} s, {row['nodes']} nodes, {row['chars']} chars, "
                      f"generated {row['generated_s'] * 1e3:.3f} ms vs autograd "
                      f"{row['autograd_s'] * 1e3:.3f} ms" if row["status"] == "ok"
                      else row.get("error", row["status"]))
            print(f"{stack:20s} L={layers:2d} {detail}", flush=True)
            if row["status"] != "ok":
                break
    text = section(rows, args, (load_start, os.getloadavg()), time.perf_counter() - start,
                   command.strip())
    print(text)
    if not args.no_write:
        write_section("depth", text)


if __name__ == "__main__":
    main()
