"""Hessian blocks of a 2-block pre-LN transformer: tnderive vs torch.func, per block.

For each block (p, q) of a 2-block pre-LN stack (default d = 64, 4 heads, L = 128, MLP 256,
float64; mse mean with a read-out to 8 outputs) it measures, each in a fresh subprocess
under a memory cap (`--mem-gb`, RLIMIT_AS: an allocation past it fails, the row says "out of
memory" instead of the machine swapping or killing a neighbour):

  tnderive    `tnderive.attention.stack.block_program`: the block derived on the stack's
              network in both forward-over-reverse orders (tangent over q's axes through
              ∂ℓ/∂p, or over p's through ∂ℓ/∂q), each simplified and compiled
              (`Network.compile`), then the one whose generated code states fewer flops runs.
              The time includes all of it; "derive" = everything before the run.
  jvp-vmap    the fair torch.func peer: torch.func.vmap(chunk_size=C) of
              torch.func.jvp(torch.func.jacrev(ℓ, argnums=q)) over the unit directions of the
              parameter with fewer entries (forward over reverse, one block, C directions at a
              time; `torch.func.jacfwd` has no chunk_size)
  hessian     plain torch.func.hessian(ℓ, argnums=(p, q)) (`--plain-hessian`; it computes all
              four blocks of (p, q) at once and needs far more memory)

with peak memory (CUDA: max_memory_allocated; CPU: ru_maxrss growth), checks that the results
agree, and times deriving all blocks (outer, functional, total: `tnderive.hessian_blocks`,
one shared network, simplified) of a 4-block stack (`--derive-params`, default every
parameter). `--small` uses d = 8, 2 heads, L = 8, MLP 16; `--dmodel/--heads/--dmlp/--seq`
set other sizes (the section says which).

    python benchmarks/transformer.py [--device cuda] [--seq 1024] [--small] [--no-write]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

import torch

from _results import section, write_section

MARK = "transformer"
BLOCKS = [("b0.q.weight", "b0.q.weight"), ("b0.q.weight", "b1.fc1.weight"),
          ("b0.ln1.weight", "b1.v.weight")]


def _model(cfg: dict, blocks: int = 2):
    from tnderive.nn.transformer import transformer
    return transformer(blocks, seq=cfg["L"], d_model=cfg["d"], heads=cfg["H"], d_mlp=cfg["f"],
                       classes=8, pre_ln=True)


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _loss_of(model, T, vp, vq):
    """ℓ(a, b) with p = a and q = b (p = q: ℓ(a + b), whose mixed block is ∂²ℓ/∂p²)."""
    def f(a, b):
        t = dict(T)
        t[vp] = a
        t[vq] = b if vq != vp else a + b
        return model.torch_loss(**t)
    return f, T[vp], (T[vq] if vq != vp else torch.zeros_like(T[vq]))


def _hvp_column(f, a0, b0):
    """(column, x0, y0, over_a): column(v) = jvp of jacrev of f along v, a direction of the
    argument with fewer entries (x0; y0 is the other, over_a whether x0 is a)."""
    over_a = a0.numel() <= b0.numel()
    x0, y0 = (a0, b0) if over_a else (b0, a0)
    g = (torch.func.jacrev(f, argnums=1) if over_a
         else torch.func.jacrev(lambda y, x: f(y, x), argnums=0))

    def column(v):
        return torch.func.jvp(lambda x: g(x, y0) if over_a else g(y0, x), (x0,), (v,))[1]
    return column, x0, y0, over_a


def _jvp_vmap(f, a0, b0, chunk: int) -> torch.Tensor:
    """∂²f/∂a∂b [a's axes, b's axes]: vmap (chunk_size) of jvp of jacrev over the unit
    directions of the argument with fewer entries."""
    column, x0, y0, over_a = _hvp_column(f, a0, b0)
    basis = torch.eye(x0.numel(), dtype=x0.dtype, device=x0.device).reshape(x0.numel(), *x0.shape)
    H = torch.func.vmap(column, chunk_size=chunk)(basis).reshape(*x0.shape, *y0.shape)
    if not over_a:
        H = H.permute(*range(x0.dim(), H.dim()), *range(x0.dim()))
    return H


def worker(method: str, cfg: dict, p: str, q: str, device: str, mem_gb: float, chunk: int,
           tn_chunk: int | None, out) -> None:
    import tnderive as tn  # noqa: F401  (the import is not timed)
    from tnderive.attention.stack import block_program
    if not device.startswith("cuda"):
        cap = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_default_dtype(torch.float64)
    model = _model(cfg)
    T = {k: v.to(device) for k, v in model.random_inputs(seed=0).items()}
    vp, vq = model.names[p], model.names[q]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak(device)
    t0 = time.perf_counter()
    info = ""
    try:
        if method == "tnderive":
            prog = block_program(model, p, q, chunk=tn_chunk)
            t_derive = time.perf_counter() - t0
            info = (f"tangent over {p if prog.transposed else q}"
                    + (f", {prog.chunk} at a time" if prog.chunk else ""))
            H = prog(**T)
        else:
            t_derive = 0.0
            f, a0, b0 = _loss_of(model, T, vp, vq)
            if method == "hessian":
                H = torch.func.hessian(f, argnums=(0, 1))(a0, b0)[0][1]
            else:
                H = _jvp_vmap(f, a0, b0, chunk)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except (MemoryError, RuntimeError) as err:   # an allocation past the cap
        if not isinstance(err, MemoryError) and "alloc" not in str(err) and "memory" not in str(err):
            raise
        out.put(dict(oom=True, seconds=time.perf_counter() - t0))
        return
    seconds = time.perf_counter() - t0
    out.put(dict(oom=False, seconds=seconds, derive=t_derive, info=info,
                 peak_mb=max(_peak(device) - base, 0.0), norm=float(H.norm()),
                 checksum=H.flatten()[:: max(H.numel() // 997, 1)].cpu().tolist()))


def spawn(method, cfg, p, q, device, mem_gb, chunk, tn_chunk=None) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=worker, args=(method, cfg, p, q, device, mem_gb, chunk, tn_chunk, out))
    proc.start()
    proc.join()
    if out.empty():
        return dict(oom=True, seconds=float("nan"), crashed=proc.exitcode)
    return out.get()


def derive_all(cfg: dict, blocks: int, patterns) -> tuple[float, int, int, int]:
    """Seconds to derive and simplify every block (upper triangle, three parts) of the
    selected parameters of a `blocks`-block stack; the number of parameters, of blocks and
    of statements."""
    import tnderive as tn
    model = _model(cfg, blocks)
    t0 = time.perf_counter()
    res = tn.hessian_blocks(model, params=None if patterns == ["*"] else patterns, upper=True)
    return time.perf_counter() - t0, len(res.params), len(res), len(res.network)


DERIVE_ALL = "Deriving and simplifying all "


def _derive_all_line(cfg: dict, args) -> str:
    t, n_params, n, k = derive_all(cfg, 4, args.derive_params)
    print(f"4-block stack: {n} blocks ({' '.join(args.derive_params)}) derived in {t:.1f} s", flush=True)
    return (f"{DERIVE_ALL}{n} blocks (outer, functional, total; {n_params} parameters: "
            f"{' '.join(args.derive_params)}, upper triangle) of a 4-block stack, one network of "
            f"{k} statements: {t:.1f} s (load average {os.getloadavg()[0]:.2f} at its end).")


def _derive_all_only(cfg: dict, args) -> None:
    """Measure the 4-block derive time and put it into the existing section."""
    line = _derive_all_line(cfg, args)
    print(line)
    old = section(MARK)
    if args.no_write or old is None:
        return
    kept = [ln for ln in old.strip("\n").split("\n") if not ln.startswith(DERIVE_ALL)]
    write_section(MARK, "\n".join(kept) + "\n\n" + line + "\n")


FLOOR_MARK = "transformer_floor"


def _gemm_rate(device: str, n: int = 2048, repeats: int = 3) -> float:
    """Measured float64 matrix-product rate in GFLOP/s (n × n by n × n, median of repeats)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for _ in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times[1:])[repeats // 2] / 1e9


def _per_direction(run, directions: int, device: str) -> float:
    """Seconds per tangent direction of `run()` (one warm-up, then the median of three)."""
    run()
    times = []
    for _ in range(3):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1] / directions


def floor_section(cfg: dict, blocks, device: str, chunks=(16, 64, 256)) -> str:
    """Why a block costs what it costs: per block, the flops of one tangent direction
    (torch.func's jvp-of-jacrev counted by torch's FlopCounterMode; tnderive's from its
    generated code's header), the whole block's flops, the time they take at the measured
    GEMM rate (a floor: every flop at matrix-product speed), and the measured seconds per
    direction of both methods at several chunk sizes, extrapolated to the whole block."""
    from torch.utils.flop_counter import FlopCounterMode
    from tnderive.attention.stack import CHUNK_BASIS, CHUNK_STEP, block_program
    torch.set_default_dtype(torch.float64)
    model = _model(cfg)
    T = {k: v.to(device) for k, v in model.random_inputs(seed=0).items()}
    rate = _gemm_rate(device)
    rows = ["| block | directions (torch.func / tnderive) | torch.func MFLOP / direction | tnderive MFLOP / direction "
            "| tnderive GFLOP (block) | at GEMM rate s | "
            + " | ".join(f"jvp-vmap s (chunk {c}) | tnderive s (chunk {c})" for c in chunks) + " |",
            "| --- " * (6 + 2 * len(chunks)) + "|"]
    for p, q in blocks:
        column, x0, _, _ = _hvp_column(*_loss_of(model, T, model.names[p], model.names[q]))
        with FlopCounterMode(display=False) as counter:
            column(torch.randn_like(x0))
        n = x0.numel()
        cells, ours_flops, directions = [], 0, 0
        for c in chunks:
            k = min(c, n)
            basis = torch.eye(n, device=device)[:k].reshape(k, *x0.shape)
            peer = _per_direction(lambda: torch.func.vmap(column)(basis), k, device)
            prog = block_program(model, p, q, chunk=c)
            ours_flops = min(prog.flops.values())
            directions = 1
            for size in prog.shape_y:
                directions *= size
            m = prog.chunk or directions
            unit = torch.zeros(m, directions, device=device)
            unit[torch.arange(m), torch.arange(m)] = 1
            args = {name: T[name] for name in prog.leaves if name in T}
            extra = {CHUNK_STEP: torch.zeros(m, device=device),
                     CHUNK_BASIS: unit.reshape(m, *prog.shape_y)}
            ours = _per_direction(lambda: prog.compiled(**args, **extra), m, device)
            cells += [f"{peer * n:.3g}", f"{ours * directions:.3g}"]
        rows.append(f"| {p} × {q} | {n} / {directions} | {counter.get_total_flops() / 1e6:.3g} | "
                    f"{ours_flops / directions / 1e6:.3g} | {ours_flops / 1e9:.3g} | "
                    f"{ours_flops / 1e9 / rate:.3g} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return ("## Transformer Hessian blocks: where the time goes (benchmarks/transformer.py --floor)\n\n"
            f"Same stack and blocks as above, device {device}, {torch.get_num_threads()} thread(s), "
            f"float64 GEMM rate {rate:.0f} GFLOP/s (2048², measured). Both methods push one tangent "
            "direction at a time through the token-mixing softmax of the second block, so the work "
            "grows with the directions; columns \"s\" are seconds per direction (median of 3 runs of "
            "one chunk) times the directions, i.e. the whole block's run time without derivation. "
            "\"at GEMM rate\": tnderive's stated contraction flops divided by the GEMM rate, a floor "
            "that ignores the elementwise softmax/LayerNorm/GELU work (memory-bound, most of the "
            "measured time).\n\n" + "\n".join(rows) + "\n")


def _fmt(r: dict, what: str) -> str:
    if r is None:
        return "not run"
    if r["oom"]:
        return "out of memory" if what == "s" else "—"
    return f"{r['seconds']:.2f}" if what == "s" else f"{r['peak_mb']:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=None, help="L (default 128; 8 with --small)")
    ap.add_argument("--small", action="store_true", help="d=8, 2 heads, L=8, MLP 16")
    ap.add_argument("--dmodel", type=int, default=None, help="d (default 64)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default 4)")
    ap.add_argument("--dmlp", type=int, default=None, help="MLP width (default 256)")
    ap.add_argument("--chunk", type=int, default=16,
                    help="vmap chunk_size of the jvp-vmap peer (default 16 directions: the "
                         "fastest of 16/64/256 for both methods on the 2-core CPU)")
    ap.add_argument("--tn-chunk", type=int, default=16,
                    help="tangent directions per run of tnderive's block program (default 16, "
                         "the peer's; 0 = all at once)")
    ap.add_argument("--mem-gb", type=float, default=14.0,
                    help="address-space cap of each CPU measurement in GB (default 14)")
    ap.add_argument("--plain-hessian", action="store_true",
                    help="also run plain torch.func.hessian (under the same cap)")
    ap.add_argument("--blocks", nargs="+", default=None, metavar="P:Q",
                    help="blocks to measure (torch-style names, default the three below)")
    ap.add_argument("--derive-params", nargs="+", default=["*"],
                    help="parameter patterns of the 4-block derive-time measurement (default all)")
    ap.add_argument("--no-derive-all", action="store_true", help="skip the 4-block derive time")
    ap.add_argument("--derive-all-only", action="store_true",
                    help="only the 4-block derive time: replace that paragraph of the section")
    ap.add_argument("--no-peer", action="store_true", help="skip the torch.func peers")
    ap.add_argument("--floor", action="store_true",
                    help="only the flop and per-direction analysis (its own section)")
    ap.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    args = ap.parse_args()
    cfg = dict(d=8, H=2, L=8, f=16) if args.small else dict(d=64, H=4, L=128, f=256)
    for key, v in (("L", args.seq), ("d", args.dmodel), ("H", args.heads), ("f", args.dmlp)):
        if v:
            cfg[key] = v
    blocks = [tuple(b.split(":")) for b in args.blocks] if args.blocks else BLOCKS
    if args.derive_all_only:
        return _derive_all_only(cfg, args)
    if args.floor:
        text = floor_section(cfg, blocks, args.device)
        print(text)
        if not args.no_write:
            write_section(FLOOR_MARK, text)
        return None
    load0 = os.getloadavg()
    lines = [f"2-block pre-LN stack, d = {cfg['d']}, {cfg['H']} heads, L = {cfg['L']}, MLP {cfg['f']}, "
             f"float64, device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} "
             f"thread(s)" + (" (reduced sizes: --small)" if args.small else "") + ".",
             "tnderive = `block_program`: the block derived in both forward-over-reverse orders, "
             "each simplified and compiled, the cheaper one (fewer stated flops) run"
             + (f", {args.tn_chunk} tangent directions per run" if args.tn_chunk else "")
             + "; the time includes derivation, simplification and code generation of both "
             "(\"derive\"). "
             f"jvp-vmap = torch.func.vmap(chunk_size={args.chunk}) of jvp(jacrev) over the "
             "smaller parameter's unit directions (the fair peer: one block, bounded memory). "
             "hessian = plain torch.func.hessian over (p, q). Each run in a fresh process capped "
             f"at {args.mem_gb:g} GB of address space; peak memory: ru_maxrss growth on CPU. "
             "agree: sampled entries, rtol 1e-8. One run each (minutes per run at this size).", "",
             "| block | jvp-vmap s | peak MB | hessian s | peak MB | tnderive s (derive) | peak MB "
             "| order | speed-up vs jvp-vmap | memory ratio | agree |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, q in blocks:
        ours = spawn("tnderive", cfg, p, q, args.device, args.mem_gb, args.chunk,
                     args.tn_chunk or None)
        if ours["oom"]:
            print(f"{p} × {q}: tnderive out of memory", flush=True)
        else:
            print(f"{p} × {q}: tnderive {ours['seconds']:.2f} s (derive {ours['derive']:.2f} s), "
                  f"{ours['peak_mb']:.0f} MB, {ours['info']}", flush=True)
        peer = plain = None
        if not args.no_peer:
            peer = spawn("jvp-vmap", cfg, p, q, args.device, args.mem_gb, args.chunk)
            print(f"   jvp-vmap {_fmt(peer, 's')} s, {_fmt(peer, 'mb')} MB", flush=True)
            if args.plain_hessian:
                plain = spawn("hessian", cfg, p, q, args.device, args.mem_gb, args.chunk)
                print(f"   hessian {_fmt(plain, 's')} s, {_fmt(plain, 'mb')} MB", flush=True)
        ok = not ours["oom"] and peer is not None and not peer["oom"]
        agree = ok and torch.allclose(torch.tensor(ours["checksum"]), torch.tensor(peer["checksum"]),
                                      rtol=1e-8, atol=1e-10)
        if plain is not None and not plain["oom"] and not ours["oom"]:
            agree = agree and torch.allclose(torch.tensor(ours["checksum"]),
                                             torch.tensor(plain["checksum"]), rtol=1e-8, atol=1e-10)
        tn_cell = ("out of memory" if ours["oom"] else f"{ours['seconds']:.2f} ({ours['derive']:.2f})")
        speed = f"{peer['seconds'] / ours['seconds']:.1f}×" if ok else "—"
        memory = f"{ours['peak_mb'] / max(peer['peak_mb'], 1e-9):.2f}" if ok else "—"
        lines.append(
            f"| {p} × {q} | {_fmt(peer, 's')} | {_fmt(peer, 'mb')} | {_fmt(plain, 's')} | "
            f"{_fmt(plain, 'mb')} | {tn_cell} | {_fmt(ours, 'mb')} | "
            f"{'—' if ours['oom'] else ours['info']} | {speed} | {memory} | "
            f"{'yes' if agree else ('NO' if ok else '—')} |")
    if not args.no_derive_all:
        lines += ["", _derive_all_line(cfg, args)]
    load1 = os.getloadavg()
    lines += ["", f"Load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end "
                  "(2 cores shared with other jobs)."]
    text = "## Transformer Hessian blocks (benchmarks/transformer.py)\n\n" + "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(MARK, text)


if __name__ == "__main__":
    sys.exit(main())
