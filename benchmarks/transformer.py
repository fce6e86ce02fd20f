"""Hessian blocks of a 2-block pre-LN transformer: tnderive vs torch.func.hessian, per block.

For each block (p, q) of a 2-block pre-LN stack (default d = 64, 4 heads, L = 128, MLP 256,
float64; mse mean with a read-out to 8 outputs) it measures, each in a fresh subprocess:
  tnderive    derive the block on the stack's network (total = ∂²ℓ/∂p∂q, forward over
              reverse: `tn.parse_network(model.text).hessian_blocks(pairs=[(p, q)])`),
              `tnderive.simplify` it statement by statement, compile it (`Network.compile`)
              and run it  (derivation, simplification and code generation time included)
  peer        torch.func.hessian of the torch.nn.functional reference loss in (p, q)
with peak memory (CUDA: max_memory_allocated; CPU: ru_maxrss growth), checks that both agree,
and times deriving all blocks (outer, functional, total: `tnderive.hessian_blocks`, one shared
network, simplified) of a 4-block stack (`--derive-params`). `--small` uses d = 8, 2 heads,
L = 8, MLP 16; `--dmodel/--heads/--dmlp/--seq` set other sizes (the section says which).

    python benchmarks/transformer.py [--device cuda] [--seq 1024] [--small] [--no-write]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time

import torch

from _results import write_section

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


def worker(method: str, cfg: dict, p: str, q: str, device: str, out) -> None:
    import tnderive as tn
    torch.set_default_dtype(torch.float64)
    model = _model(cfg)
    T = {k: v.to(device) for k, v in model.random_inputs(seed=0).items()}
    vp, vq = model.names[p], model.names[q]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak(device)
    t0 = time.perf_counter()
    if method == "tnderive":
        net = tn.simplify(tn.parse_network(model.text).hessian_blocks(pairs=[(vp, vq)]))
        t_derive = time.perf_counter() - t0
        leaves = set().union(*(net.leaves(s.name) for s in net.statements))
        H = net.compile()(**{k: T[k] for k in leaves})
    else:
        t_derive = 0.0

        def f(a, b):
            t = dict(T)
            t[vp] = a
            t[vq] = b if vq != vp else a + b
            return model.torch_loss(**t)
        b0 = T[vq] if vq != vp else torch.zeros_like(T[vq])
        H = torch.func.hessian(f, argnums=(0, 1))(T[vp], b0)[0][1]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out.put(dict(seconds=seconds, derive=t_derive, peak_mb=max(_peak(device) - base, 0.0),
                 norm=float(H.norm()), checksum=H.flatten()[:: max(H.numel() // 997, 1)].cpu().tolist()))


def spawn(method, cfg, p, q, device) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=worker, args=(method, cfg, p, q, device, out))
    proc.start()
    res = out.get()
    proc.join()
    return res


def derive_all(cfg: dict, blocks: int, patterns) -> tuple[float, int, int]:
    """Seconds to derive and simplify every block (upper triangle, three parts) of the
    selected parameters of a `blocks`-block stack; the number of blocks and of statements."""
    import tnderive as tn
    model = _model(cfg, blocks)
    t0 = time.perf_counter()
    res = tn.hessian_blocks(model, params=patterns, upper=True)
    return time.perf_counter() - t0, len(res), len(res.network)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int, default=None, help="L (default 128; 16 with --small)")
    ap.add_argument("--small", action="store_true", help="d=8, 2 heads, L=8, MLP 16")
    ap.add_argument("--dmodel", type=int, default=None, help="d (default 64)")
    ap.add_argument("--heads", type=int, default=None, help="heads (default 4)")
    ap.add_argument("--dmlp", type=int, default=None, help="MLP width (default 256)")
    ap.add_argument("--derive-params", nargs="+", default=["*"],
                    help="parameter patterns of the 4-block derive-time measurement (default all)")
    ap.add_argument("--no-peer", action="store_true", help="skip torch.func.hessian")
    ap.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    args = ap.parse_args()
    cfg = dict(d=8, H=2, L=8, f=16) if args.small else dict(d=64, H=4, L=128, f=256)
    for key, v in (("L", args.seq), ("d", args.dmodel), ("H", args.heads), ("f", args.dmlp)):
        if v:
            cfg[key] = v
    lines = [f"2-block pre-LN stack, d = {cfg['d']}, {cfg['H']} heads, L = {cfg['L']}, MLP {cfg['f']}, "
             f"float64, device {args.device}" + (" (reduced sizes: --small)" if args.small else "") + ".",
             "tnderive = derivation of the block on the stack's network + simplification + "
             "`Network.compile` + the run (fresh process each; peak memory: ru_maxrss growth on "
             "CPU). agree: sampled entries, rtol 1e-8.", "",
             "| block | torch.func.hessian s | peak MB | tnderive s (derive) | peak MB | speed-up | memory ratio | agree |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p, q in BLOCKS:
        ours = spawn("tnderive", cfg, p, q, args.device)
        print(f"{p} × {q}: tnderive {ours['seconds']:.2f} s (derive {ours['derive']:.2f} s), "
              f"{ours['peak_mb']:.0f} MB", flush=True)
        if args.no_peer:
            lines.append(f"| {p} × {q} | not run | — | {ours['seconds']:.2f} ({ours['derive']:.2f}) | "
                         f"{ours['peak_mb']:.0f} | — | — | — |")
            continue
        peer = spawn("peer", cfg, p, q, args.device)
        agree = torch.allclose(torch.tensor(ours["checksum"]), torch.tensor(peer["checksum"]),
                               rtol=1e-8, atol=1e-10)
        print(f"   torch.func {peer['seconds']:.2f} s, {peer['peak_mb']:.0f} MB, agree {agree}", flush=True)
        lines.append(f"| {p} × {q} | {peer['seconds']:.2f} | {peer['peak_mb']:.0f} | "
                     f"{ours['seconds']:.2f} ({ours['derive']:.2f}) | {ours['peak_mb']:.0f} | "
                     f"{peer['seconds'] / ours['seconds']:.1f}× | "
                     f"{ours['peak_mb'] / max(peer['peak_mb'], 1e-9):.2f} | {'yes' if agree else 'NO'} |")
    t, n, k = derive_all(cfg, 4, args.derive_params)
    print(f"4-block stack: {n} blocks ({' '.join(args.derive_params)}) derived in {t:.1f} s", flush=True)
    lines += ["", f"Deriving and simplifying {n} blocks (outer, functional, total; parameters "
                  f"{' '.join(args.derive_params)}, upper triangle) of a 4-block stack, one "
                  f"network of {k} statements: {t:.1f} s."]
    text = "## Transformer Hessian blocks (benchmarks/transformer.py)\n\n" + "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section(MARK, text)


if __name__ == "__main__":
    sys.exit(main())
