"""Derivation against depth: derivatives of L-layer stacks as networks (issue 13, item 4).

    python benchmarks/depth.py [--depths 1 2 4 8] [--stacks mlp ...] [--time-limit 120]
                               [--repeats 5] [--threads 1] [--peer-python PY] [--no-write]
    python benchmarks/depth.py --targets [--repeats 5] [--threads 1] [--no-write]

For each depth L (default 1, 2, 3, 4, 6, 8, 12, 16, 24; a stack stops at its first case past
--time-limit) and four stacks written in index notation (`tn.parse_network`):

* attention, residual:    T{l}[q,k] = X{l-1}[q,i]*WQ{l}[i,e]*WK{l}[j,e]*X{l-1}[k,j] / √d
                          A{l}[q,k] = softmax(T{l}[q,k], k)
                          X{l}[q,v] = A{l}[q,k]*X{l-1}[k,d]*WV{l}[d,v] + X{l-1}[q,v]
* attention, no residual: the same without `+ X{l-1}[q,v]`
* tanh MLP:               H{l}[n,o] = tanh(W{l}[o,i]*H{l-1}[n,i])
* pre-LN:                 LayerNorm (no affine, eps 1e-5, with `**(-1/2)`) before the
                          attention, residual around it

each with the squared loss `loss = sum((X{L} - Y)**2)` (resp. H{L} against T), it measures

* derive + simplify time of the gradient network w.r.t. the first layer's weight (WQ1 / W1),
  its size (statements, distinct nodes, printed length), and the compiled network's run time
  against plain-torch forward + `torch.autograd.grad`;
* the Hessian blocks of Q, K, V of layer 1 (MLP: every weight pair, L² blocks) as one
  network (`hessian_blocks`): derive + simplify time, size, run time against
  `torch.func.hessian`;
* a Hessian-vector product network (`hvp`) against `torch.func.jvp(torch.func.grad(f))`;

after checking every result against torch to 1e-9 (float64, seq = d = 8). Every case runs in
its own process (multiprocessing, spawn); one past the time limit is killed and recorded as
"> limit". Growth exponents are least-squares slopes of log(value) against log(L). The section
between the depth markers of benchmarks/RESULTS.md is replaced (unless --no-write).
`--targets` instead measures issue 13's targets table (derive times; compiled gradient and hvp
against autograd / torch.func at seq = d = 8 and seq = d = 64, 6 layers) and writes the
section `depth_targets`.
tensorgrad (the symbolic peer) runs in the python given by --peer-python (it pins networkx,
so it lives in its own venv), gradient only, depths 1.. until one runs past --peer-timeout.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from tnderive.errors import TNError

if str(Path(__file__).parent) not in sys.path:  # the benchmarks' shared helpers, also on import
    sys.path.insert(0, str(Path(__file__).parent))
from _results import write_section  # noqa: E402

SEQ, DIM = 8, 8            # sequence length / batch and feature width of every stack
STACKS = ("attention+residual", "attention", "mlp", "pre-ln")
TOL = 1e-9


# --- the stacks: index notation and plain torch ------------------------------------------

def attention_source(layers: int, residual: bool, dim: int = DIM) -> str:
    """An L-layer single-head self-attention stack with squared loss, in index notation."""
    scale = f" * {dim}**(-1/2)"
    lines = []
    for l in range(1, layers + 1):
        x = f"X{l - 1}"
        lines.append(f"T{l}[q,k] = {x}[q,i]*WQ{l}[i,e]*WK{l}[j,e]*{x}[k,j]{scale}")
        lines.append(f"A{l}[q,k] = softmax(T{l}[q,k], k)")
        lines.append(f"X{l}[q,v] = A{l}[q,k]*{x}[k,d]*WV{l}[d,v]" + (f" + {x}[q,v]" if residual else ""))
    lines.append(f"loss = sum((X{layers}[q,v] - Y[q,v])**2)")
    return "\n".join(lines)


def pre_ln_source(layers: int, dim: int = DIM) -> str:
    """An L-block pre-LayerNorm attention stack (LayerNorm without affine, eps 1e-5, written
    with `**(-1/2)`; residual around the attention) with squared loss, in index notation."""
    lines = []
    for l in range(1, layers + 1):
        x = f"X{l - 1}"
        lines += [f"C{l}[q,d] = {x}[q,d] - sum({x}[q,e], e)/{dim}",
                  f"V{l}[q] = sum(C{l}[q,d]**2, d)/{dim} + 1/100000",
                  f"N{l}[q,d] = C{l}[q,d]*V{l}[q]**(-1/2)",
                  f"T{l}[q,k] = N{l}[q,i]*WQ{l}[i,e]*WK{l}[j,e]*N{l}[k,j] * {dim}**(-1/2)",
                  f"A{l}[q,k] = softmax(T{l}[q,k], k)",
                  f"X{l}[q,v] = A{l}[q,k]*N{l}[k,d]*WV{l}[d,v] + {x}[q,v]"]
    lines.append(f"loss = sum((X{layers}[q,v] - Y[q,v])**2)")
    return "\n".join(lines)


def pre_ln_torch(t: dict, layers: int) -> torch.Tensor:
    """The pre-LN stack's loss in plain torch (same formula as `pre_ln_source`)."""
    x = t["X0"]
    for l in range(1, layers + 1):
        n = torch.nn.functional.layer_norm(x, (x.shape[1],), eps=1e-5)
        scores = (n @ t[f"WQ{l}"]) @ (n @ t[f"WK{l}"]).T / math.sqrt(x.shape[1])
        x = torch.softmax(scores, dim=-1) @ n @ t[f"WV{l}"] + x
    return ((x - t["Y"]) ** 2).sum()


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
    if stack == "pre-ln":
        return pre_ln_source(layers, dim)
    return mlp_source(layers) if stack == "mlp" else \
        attention_source(layers, stack == "attention+residual", dim)


def torch_loss(stack: str, tensors: dict, layers: int) -> torch.Tensor:
    if stack == "pre-ln":
        return pre_ln_torch(tensors, layers)
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


def block_params(stack: str, layers: int) -> list[str]:
    """The parameters whose Hessian blocks are measured: Q, K, V of layer 1 (9 blocks) for
    the attention stacks, every layer's W for the MLP (L² blocks)."""
    if stack == "mlp":
        return [f"W{l}" for l in range(1, layers + 1)]
    return ["WQ1", "WK1", "WV1"]


def _rel(ours: torch.Tensor, ref: torch.Tensor, scale=None) -> float:
    scale = ref.abs().max() if scale is None else scale
    return ((ours.reshape(ref.shape) - ref).abs().max() / scale.clamp_min(1e-300)).item()


def _loss_fn(stack: str, tensors: dict, layers: int, names: list[str]):
    def f(*xs):
        t = dict(tensors)
        t.update(zip(names, xs))
        return torch_loss(stack, t, layers)
    return f


def measure_case(stack: str, layers: int, repeats: int) -> dict:
    """Derive, simplify, size, compile, check and time one (stack, depth) case: the gradient,
    the Hessian blocks of `block_params` and a Hessian-vector product, all as networks."""
    import tnderive as tn

    warm_up(tn)
    net = tn.parse_network(source(stack, layers))
    name = wrt(stack)
    t0 = time.perf_counter()
    raw = net.grad(name)
    t1 = time.perf_counter()
    grad = tn.simplify(raw)
    t2 = time.perf_counter()
    out = {"grad_s": t1 - t0, "simplify_s": t2 - t1, "derive_s": t2 - t0,
           "statements": len(grad), "nodes": grad.node_count(), "chars": len(str(grad))}
    tensors = inputs(stack, layers)
    fn = grad.compile(name=f"grad_{name}")
    args = {k: v for k, v in tensors.items() if k in grad.signature}
    ref = autograd_gradient(stack, tensors, layers, name)
    out["err"] = _rel(fn(**args), ref)
    out["generated_s"] = median_time(lambda: fn(**args), repeats)
    out["autograd_s"] = median_time(lambda: autograd_gradient(stack, tensors, layers, name), repeats)

    params = block_params(stack, layers)
    t0 = time.perf_counter()
    blocks = tn.simplify(net.hessian_blocks(params))
    out["blocks_derive_s"] = time.perf_counter() - t0
    out["blocks"] = len(blocks.outputs)
    out["blocks_statements"], out["blocks_nodes"] = len(blocks), blocks.node_count()
    bfn = blocks.compile(name="blocks")
    bargs = {k: v for k, v in tensors.items() if k in blocks.signature}
    f = _loss_fn(stack, tensors, layers, params)
    hess = torch.func.hessian(f, argnums=tuple(range(len(params))))
    href = hess(*(tensors[p] for p in params))
    values = bfn(**bargs)
    if len(blocks.outputs) == 1:  # one block: the tensor itself
        values = {blocks.outputs[0]: values}
    scale = max(b.abs().max() for row in href for b in row)
    out["blocks_err"] = max(_rel(values[tn.network.block_name(a, b)], href[i][j], scale)
                            for i, a in enumerate(params) for j, b in enumerate(params))
    out["blocks_generated_s"] = median_time(lambda: bfn(**bargs), repeats)
    out["blocks_torch_s"] = median_time(lambda: hess(*(tensors[p] for p in params)), repeats)

    vec = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)
    t0 = time.perf_counter()
    hvp = tn.simplify(net.hvp(name, "V"))
    out["hvp_derive_s"] = time.perf_counter() - t0
    hfn = hvp.compile(name="hvp")
    hargs = {k: v for k, v in tensors.items() if k in hvp.signature}
    g1 = _loss_fn(stack, tensors, layers, [name])

    def torch_hvp():
        return torch.func.jvp(torch.func.grad(g1), (tensors[name],), (vec,))[1]

    out["hvp_err"] = _rel(hfn(V=vec, **hargs), torch_hvp())
    out["hvp_generated_s"] = median_time(lambda: hfn(V=vec, **hargs), repeats)
    out["hvp_torch_s"] = median_time(torch_hvp, repeats)
    worst = max(out["err"], out["blocks_err"], out["hvp_err"])
    if not worst <= TOL:
        raise AssertionError(f"{stack} L={layers}: generated derivative differs from torch "
                             f"(relative errors: gradient {out['err']:.2e}, blocks "
                             f"{out['blocks_err']:.2e}, hvp {out['hvp_err']:.2e})")
    return out


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
    cols = ["derive + simplify s", "statements", "nodes", "printed chars", "generated ms",
            "autograd ms", "gen / autograd", "blocks", "blocks derive s", "blocks nodes",
            "blocks gen ms", "torch.func.hessian ms", "gen / hessian", "hvp derive s",
            "hvp gen ms", "torch.func hvp ms", "gen / hvp", "max rel err"]
    lines = ["| stack | L | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        head = f"| {r['stack']} | {r['layers']} | "
        if r["status"] == "> limit":
            lines.append(head + f"> {limit:g} s (killed) |" + " – |" * (len(cols) - 1))
        elif r["status"] == "error":
            lines.append(head + f"error: {r['error'][:80]} |" + " – |" * (len(cols) - 1))
        else:
            err = max(r["err"], r["blocks_err"], r["hvp_err"])
            cells = [f"{r['derive_s']:.3g}", str(r["statements"]), str(r["nodes"]), str(r["chars"]),
                     f"{r['generated_s'] * 1e3:.3f}", f"{r['autograd_s'] * 1e3:.3f}",
                     f"{r['generated_s'] / r['autograd_s']:.2f}×", str(r["blocks"]),
                     f"{r['blocks_derive_s']:.3g}", str(r["blocks_nodes"]),
                     f"{r['blocks_generated_s'] * 1e3:.3f}", f"{r['blocks_torch_s'] * 1e3:.3f}",
                     f"{r['blocks_generated_s'] / r['blocks_torch_s']:.2f}×",
                     f"{r['hvp_derive_s']:.3g}", f"{r['hvp_generated_s'] * 1e3:.3f}",
                     f"{r['hvp_torch_s'] * 1e3:.3f}",
                     f"{r['hvp_generated_s'] / r['hvp_torch_s']:.2f}×", f"{err:.1e}"]
            lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


EXPONENT_KEYS = (("derive_s", "gradient derive + simplify"), ("nodes", "gradient nodes"),
                 ("generated_s", "generated gradient run"), ("autograd_s", "autograd run"),
                 ("blocks_derive_s", "blocks derive + simplify"), ("blocks_nodes", "blocks nodes"),
                 ("hvp_derive_s", "hvp derive + simplify"))


def exponents(rows: list[dict]) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.2f}"

    out = ["| stack | depths measured | " + " | ".join(t for _, t in EXPONENT_KEYS) + " |",
           "|---|---|" + "---|" * len(EXPONENT_KEYS)]
    for stack in STACKS:
        sel = [r for r in rows if r["stack"] == stack and r["status"] == "ok"]
        if not sel:
            continue
        depths = ", ".join(str(r["layers"]) for r in sel)
        cells = [fmt(growth_exponent(sel, k)) for k, _ in EXPONENT_KEYS]
        out.append(f"| {stack} | {depths} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# --- tensorgrad, the symbolic peer (its own python: it pins networkx) --------------------

def peer_child(layers: int, residual: bool) -> None:
    """tensorgrad: gradient of the L-layer attention stack w.r.t. WQ1, then full_simplify;
    prints the seconds as JSON."""
    import json

    import sympy
    import tensorgrad.functions as F
    import tensorgrad.tensor as tg
    seq, d, e = sympy.symbols("seq d e")
    x = tg.Variable("X0", seq=seq, dim=d)
    first = None
    for l in range(1, layers + 1):
        wq, wk = tg.Variable(f"WQ{l}", dim=d, inner=e), tg.Variable(f"WK{l}", dim=d, inner=e)
        wv = tg.Variable(f"WV{l}", dim=d, out=d)
        first = first or wq
        logits = (x @ wq) @ (x.rename(seq="seqk") @ wk)
        y = (F.softmax(logits, dim="seqk") @ (x.rename(seq="seqk") @ wv)).rename(out="dim")
        x = y + x if residual else y
    loss = F.sum(F.pow(x - tg.Variable("Y", seq=seq, dim=d), 2))
    t0 = time.perf_counter()
    loss.grad(first, {"dim": "dim1", "inner": "inner1"}).full_simplify()
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def peer_python(explicit: str | None) -> str | None:
    """A python that can import tensorgrad (--peer-python, else this one), or None."""
    for py in ([explicit] if explicit else []) + [sys.executable]:
        if subprocess.run([py, "-c", "import tensorgrad"], capture_output=True).returncode == 0:
            return py
    return None


def run_peer(python: str, max_layers: int, timeout: float) -> list[tuple[str, int, str]]:
    """tensorgrad's gradient time per (stack, L) until a depth runs past `timeout`."""
    import json
    out = []
    for residual, stack in ((True, "attention+residual"), (False, "attention")):
        for layers in range(1, max_layers + 1):
            cmd = [python, os.path.abspath(__file__), "--peer-child", str(layers),
                   "1" if residual else "0"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                out.append((stack, layers, f"> {timeout:g} s (killed)"))
                break
            if r.returncode != 0:
                out.append((stack, layers, "error: " + r.stderr.strip().splitlines()[-1][:100]))
                break
            secs = json.loads(r.stdout.strip().splitlines()[-1])["seconds"]
            out.append((stack, layers, f"{secs:.3g} s"))
    return out


def peer_lines(results, note: str) -> list[str]:
    if not results:
        return [f"- peer: tensorgrad, {note}."]
    text = "; ".join(f"{s} L={l}: {v}" for s, l, v in results)
    return [f"- peer: tensorgrad 0.3.0, gradient w.r.t. WQ1 (grad + full_simplify): {text}."]


def section(rows, args, load, elapsed, command, peer) -> str:
    return "\n".join([
        "## Derivation against depth (benchmarks/depth.py)",
        "",
        f"Derivatives of L-layer stacks with squared loss, derived as networks "
        f"(`tn.parse_network`, one statement per intermediate; README \"Deep networks\"): the "
        f"gradient w.r.t. the first layer's weight (WQ1 / W1), the Hessian blocks of Q, K, V of "
        f"layer 1 (9 blocks; MLP: all L² weight blocks) and a Hessian-vector product w.r.t. "
        f"WQ1 / W1. float64, seq = d = {SEQ}, CPU "
        f"({platform.processor() or platform.machine()}), {args.threads} thread(s), torch "
        f"{torch.__version__}, Python {platform.python_version()}; every case in its own "
        f"process, killed past {args.time_limit:g} s; run times are medians of {args.repeats} "
        f"rounds; derive times exclude a warm-up derivation of a tiny unrelated network. "
        f"Total {elapsed:.0f} s.",
        f"Command: `{command}`. Machine load (os.getloadavg, 1/5/15 min) at start "
        f"{load[0][0]:.2f}/{load[0][1]:.2f}/{load[0][2]:.2f}, at end "
        f"{load[1][0]:.2f}/{load[1][1]:.2f}/{load[1][2]:.2f}; {os.cpu_count()} cores, shared.",
        "statements / nodes: of the simplified gradient network (`len(net)`, "
        "`net.node_count()`: distinct IR nodes per statement); printed chars = `len(str(net))`. "
        "generated = the compiled network (`net.compile()`) called on the inputs (it computes "
        "the forward statements too); autograd = plain-torch forward + `torch.autograd.grad`; "
        "torch.func.hessian over the same parameters (all blocks at once); torch.func hvp = "
        "`jvp(grad(f))` (forward over reverse). Every generated result agrees with torch to "
        "1e-9 (relative to the largest entry; blocks: to the largest entry of all blocks) "
        "before timing.",
        *peer,
        "",
        table(rows, args.time_limit),
        "",
        "Growth exponents (least-squares slope of log value against log L over the measured depths):",
        "",
        exponents(rows),
    ])


# --- the issue-13 targets table (--targets) -------------------------------------------------

TARGET_SIZES = ((8, 8), (64, 64))  # (seq, d) of the run-time rows
TARGET_LAYERS = 6                  # depth of the attention stack timed at run time


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def measure_targets(repeats: int) -> list[tuple[str, str, str, str]]:
    """The rows of issue 13's targets table: (what, measured, size of the result, target).
    Derive rows: derive + simplify seconds. Run-time rows: the compiled network (one generated
    function) against forward + torch.autograd.grad (gradient) and torch.func's
    forward-over-reverse (hvp) on the attention stack with residuals, medians over `repeats`,
    each checked against torch to 1e-9 first."""
    import tnderive as tn

    warm_up(tn)
    rows = []
    for layers, target in ((6, "< 1 s"), (24, "< 5 s")):
        net = tn.parse_network(source("attention+residual", layers))
        sec, g = _timed(lambda: tn.simplify(net.grad("WQ1")))
        rows.append((f"gradient w.r.t. WQ1, {layers}-layer attention stack with residuals",
                     f"{sec:.2f} s", f"{len(g)} statements, {g.node_count()} nodes", target))
    net = tn.parse_network(source("attention+residual", 4))
    for lb in (1, 4):
        pairs = [(f"W{p}1", f"W{q}{lb}") for p in "QKV" for q in "QKV"]
        sec, h = _timed(lambda: tn.simplify(net.hessian_blocks(pairs=pairs)))
        rows.append((f"9 blocks (layer 1, layer {lb}) of a 4-layer stack", f"{sec:.2f} s",
                     f"{len(h)} statements, {h.node_count()} nodes", "< 20 s"))
    net = tn.parse_network(source("mlp", 16))
    sec, h = _timed(lambda: tn.simplify(net.hessian_blocks([f"W{l}" for l in range(1, 17)])))
    rows.append(("16-layer MLP, all 256 blocks", f"{sec:.2f} s",
                 f"{len(h)} statements, {h.node_count()} nodes", "< 3 s"))

    stack, layers, name = "attention+residual", TARGET_LAYERS, "WQ1"
    for seq, dim in TARGET_SIZES:
        net = tn.parse_network(source(stack, layers, dim=dim))
        tensors = inputs(stack, layers, seq=seq, dim=dim)
        grad = tn.simplify(net.grad(name))
        csec, fn = _timed(lambda: grad.compile(name="grad"))
        args = {k: v for k, v in tensors.items() if k in grad.signature}
        err = _rel(fn(**args), autograd_gradient(stack, tensors, layers, name))
        ours = median_time(lambda: fn(**args), repeats)
        peer = median_time(lambda: autograd_gradient(stack, tensors, layers, name), repeats)
        rows.append((f"generated gradient ({layers} layers, seq={seq}, d={dim}; compile "
                     f"{csec:.2f} s, error {err:.1e})",
                     f"{ours / peer:.2f}× ({ours * 1e3:.3f} ms vs {peer * 1e3:.3f} ms)",
                     f"{len(grad)} statements", "≤ 1.5× autograd's forward + backward"))
        vec = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
        hvp = tn.simplify(net.hvp(name, "V"))
        hfn = hvp.compile(name="hvp")
        hargs = {k: v for k, v in tensors.items() if k in hvp.signature}
        g1 = _loss_fn(stack, tensors, layers, [name])

        def torch_hvp():
            return torch.func.jvp(torch.func.grad(g1), (tensors[name],), (vec,))[1]

        herr = _rel(hfn(V=vec, **hargs), torch_hvp())
        ours = median_time(lambda: hfn(V=vec, **hargs), repeats)
        peer = median_time(torch_hvp, repeats)
        rows.append((f"generated hvp ({layers} layers, seq={seq}, d={dim}; error {herr:.1e})",
                     f"{ours / peer:.2f}× ({ours * 1e3:.3f} ms vs {peer * 1e3:.3f} ms)",
                     f"{len(hvp)} statements", "≤ 2× torch.func (forward-over-reverse)"))
        if not max(err, herr) <= TOL:
            raise AssertionError(f"seq={seq}, d={dim}: generated code differs from torch "
                                 f"(gradient {err:.2e}, hvp {herr:.2e})")
    return rows


def targets_section(rows, load, elapsed: float, command: str, threads: int) -> str:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    lines = ["## Depth: issue-13 targets", "",
             f"`{command}` — {threads} thread(s), {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, float64, medians; load average "
             f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end (`uptime`: {uptime}); "
             f"{elapsed:.0f} s in all.", "",
             "| what | measured | result size | target |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines += ["", "Run-time rows: the compiled network (`Network.compile()`: one generated "
              "function, arguments checked once, work shared across statements) against "
              "plain torch on the same stack; the gradient's peer is forward + "
              "`torch.autograd.grad`, the hvp's `torch.func.jvp(torch.func.grad(f))`."]
    return "\n".join(lines)


def run_targets(args, command: str) -> None:
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows = measure_targets(args.repeats)
    text = targets_section(rows, (load_start, os.getloadavg()), time.perf_counter() - start,
                           command, args.threads)
    print(text)
    if not args.no_write:
        write_section("depth_targets", text)


DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS))
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stacks", nargs="*", default=list(STACKS), choices=STACKS)
    ap.add_argument("--peer-python", default=None,
                    help="python with tensorgrad installed (a separate venv: it pins networkx)")
    ap.add_argument("--peer-timeout", type=float, default=120.0)
    ap.add_argument("--peer-max-layers", type=int, default=4)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--targets", action="store_true",
                    help="only the issue-13 targets table (section depth_targets)")
    args = ap.parse_args(argv)
    command = "python benchmarks/depth.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.targets:
        run_targets(args, command.strip())
        return
    load_start = os.getloadavg()
    start = time.perf_counter()
    rows = []
    for stack in args.stacks:
        for layers in args.depths:
            row = run_case(stack, layers, args.repeats, args.threads, args.time_limit)
            rows.append(row)
            detail = (f"derive {row['derive_s']:.3f} s, {row['nodes']} nodes, generated "
                      f"{row['generated_s'] * 1e3:.3f} ms vs autograd {row['autograd_s'] * 1e3:.3f} ms; "
                      f"{row['blocks']} blocks {row['blocks_derive_s']:.3f} s; hvp "
                      f"{row['hvp_generated_s'] * 1e3:.3f} ms vs {row['hvp_torch_s'] * 1e3:.3f} ms"
                      if row["status"] == "ok" else row.get("error", row["status"]))
            print(f"{stack:20s} L={layers:2d} {detail}", flush=True)
            if row["status"] != "ok":
                break
    python = None if args.no_peer else peer_python(args.peer_python)
    if python is None:
        peer = peer_lines([], "not run (not installed; pass --peer-python)" if not args.no_peer
                          else "not run (--no-peer)")
    else:
        peer = peer_lines(run_peer(python, args.peer_max_layers, args.peer_timeout), "")
    text = section(rows, args, (load_start, os.getloadavg()), time.perf_counter() - start,
                   command.strip(), peer)
    print(text)
    if not args.no_write:
        write_section("depth", text)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peer-child":
        peer_child(int(sys.argv[2]), sys.argv[3] == "1")
    else:
        main()
