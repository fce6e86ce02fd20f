"""Layout-aware pairwise contraction: each pair of operands as one (batched) matmul whose
result lands in the requested output order, operand copies in a reused per-thread workspace.

`contract_fast(operands, sublists, out)` contracts operands (integer sublists) pairwise along
opt_einsum's path (`plan_path`), every pair by `pair_contract`; matrix products go through `tnderive.gemm.matmul`.
"""
from __future__ import annotations

import itertools
import threading

import opt_einsum
import torch

from . import gemm
from .codegen.cost import (ACCUMULATE_MIN_CONTRACT, BLOCK_COPY_MIN_BYTES, FOLD_BATCH_MAX_COLUMNS,
                           REGROUP_MAX_ENTRIES, REGROUP_MIN_SIDE, WORKSPACE_MAX_BYTES)


def contract_fast(operands: list[torch.Tensor], sublists: list[list[int]], out: list[int]) -> torch.Tensor:
    """Contract operands pairwise along `plan_path`, each pair by `pair_contract`."""
    if not operands:
        return torch.ones(())
    if len(operands) == 1:
        return _single(operands[0], list(sublists[0]), list(out))
    if len(operands) == 2:
        return pair_contract(operands[0], list(sublists[0]), operands[1], list(sublists[1]), list(out))
    path = plan_path([tuple(o.shape) for o in operands], sublists, out)
    ops, subs = list(operands), [list(s) for s in sublists]
    for a, b in path:
        a, b = sorted((a, b), reverse=True)
        ta, sa = ops.pop(a), subs.pop(a)
        tb, sb = ops.pop(b), subs.pop(b)
        rest = {k for s in subs for k in s} | set(out)
        keep = [k for k in out if k in sa or k in sb] if not subs else \
            [k for k in dict.fromkeys(sa + sb) if k in rest]
        ops.append(pair_contract(ta, sa, tb, sb, keep))
        subs.append(keep)
    (t,), (s,) = ops, subs
    return _single(t, s, list(out))


def _single(t: torch.Tensor, s: list[int], out: list[int]) -> torch.Tensor:
    if s == out:
        return t
    if len(set(s)) == len(s) and len(set(out)) == len(out) and set(out) <= set(s):
        extra = [j for j, k in enumerate(s) if k not in out]
        if extra:
            t = t.sum(extra)
            s = [k for k in s if k in out]
        return t.permute([s.index(k) for k in out])
    return torch.einsum(t, s, out)


def _presum(t: torch.Tensor, s: list[int], keep: set) -> tuple[torch.Tensor, list[int]]:
    """Sum the ids not in `keep` (size-1 ones are selected: a view, not a copy)."""
    s = list(s)
    for j in reversed(range(len(s))):
        if s[j] not in keep and t.shape[j] == 1:
            t = t.select(j, 0)
            s.pop(j)
    extra = [j for j, k in enumerate(s) if k not in keep]
    if not extra:
        return t, s
    return t.sum(extra), [k for k in s if k in keep]


def _grouped(t: torch.Tensor, s: list[int], groups: list[list[int]], sizes: dict) -> torch.Tensor | None:
    """t permuted to the concatenated groups and reshaped to one dim per group, as a view
    (None when that needs a copy). A group may name ids t lacks (size 1)."""
    for g in groups:  # each group's dims must merge (checked here: a failed view is slow)
        dims = [s.index(k) for k in g if k in s and t.shape[s.index(k)] != 1]
        for i, j in zip(dims, dims[1:]):
            if t.stride(i) != t.stride(j) * t.shape[j]:
                return None
    perm = [s.index(k) for g in groups for k in g if k in s]
    shape = [size_product(sizes[k] if k in s else 1 for k in g) for g in groups]
    return t.permute(perm).view(shape)


def size_product(xs) -> int:
    """Product of sizes (1 for none)."""
    r = 1
    for x in xs:
        r *= x
    return r


def _inner_score(t: torch.Tensor, s: list[int], group: list[int]) -> tuple:
    """How cheap it is to copy t with `group` innermost (lower is better): best a long
    contiguous innermost run (the group's trailing ids that are contiguous in memory, merged),
    else a long innermost dimension, then a small source stride."""
    real = [k for k in group if k in s and t.shape[s.index(k)] != 1]
    if not real:
        return (2, 0, float("inf"))
    j = s.index(real[-1])
    run, step = t.shape[j], t.stride(j) * t.shape[j]
    for k in reversed(real[:-1]):
        i = s.index(k)
        if t.stride(j) != 1 or t.stride(i) != step:
            break
        run, step = run * t.shape[i], step * t.shape[i]
    contiguous_run = t.stride(j) == 1 and run >= 16
    return (0 if contiguous_run else 1, -run, t.stride(j))


def pair_contract(a: torch.Tensor, sa: list[int], b: torch.Tensor, sb: list[int],
                  out: list[int]) -> torch.Tensor:
    """Contract two operands (integer sublists) into `out` order with one (batched) matmul.

    The output is split as [prefix (batch, broadcast), free-of-P, free-of-Q] following `out`,
    so the matmul result needs no permutation; the contracted ids follow the memory order of
    the larger operand, and an operand that must be copied is copied in its own memory order.
    """
    if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(set(out)) != len(out):
        return torch.einsum(a, sa, b, sb, out)
    a, sa = _presum(a, list(sa), set(sb) | set(out))
    b, sb = _presum(b, list(sb), set(sa) | set(out))
    sizes = {k: int(n) for k, n in zip(sa, a.shape)}
    sizes.update({k: int(n) for k, n in zip(sb, b.shape)})
    if any(sizes[k] != int(n) for k, n in zip(sa, a.shape)):
        return torch.einsum(a, sa, b, sb, out)
    if out and out[-1] in sa and out[-1] not in sb:
        a, sa, b, sb = b, sb, a, sa
    A, B = set(sa), set(sb)
    j = len(out)

    def run(owner: set, other: set) -> list[int]:
        nonlocal j
        end = j
        while j > 0 and out[j - 1] in owner and out[j - 1] not in other:
            j -= 1
        return out[j:end]

    fq = run(B, A)
    fp = run(A, B)
    prefix = out[:j]
    final = None
    if size_product(sizes[k] for k in fq) < FOLD_BATCH_MAX_COLUMNS:
        # small matrices: fold Q-only batch ids into Q's free block (one big GEMM), permute after
        moved = [k for k in prefix if k in B and k not in A]
        if moved:
            prefix = [k for k in prefix if k not in moved]
            fq = moved + fq
            final = out
            out = prefix + fp + fq
    broadcast = [k for k in prefix if not (k in A and k in B) and sizes[k] > 1]
    mp, nq = size_product(sizes[k] for k in fp), size_product(sizes[k] for k in fq)
    if broadcast and (mp * nq < REGROUP_MAX_ENTRIES or min(mp, nq) < REGROUP_MIN_SIDE):
        # tiny matrices batched over broadcast ids: regroup as one GEMM (shared ids batch,
        # then each operand's free ids), permute after
        final = final or out
        prefix = [k for k in final if k in A and k in B]
        fp = [k for k in final if k in A and k not in B]
        fq = [k for k in final if k in B and k not in A]
        out = prefix + fp + fq
    big, sbig = (a, sa) if a.numel() >= b.numel() else (b, sb)
    contract = [k for k in sa if k in B and k not in out]
    contract.sort(key=lambda k: -big.stride(sbig.index(k)))
    M, N, Kc = (size_product(sizes[k] for k in g) for g in (fp, fq, contract))
    if M == 1 and 1 < Kc <= 64 and b.numel() > 16 * a.numel():
        y = _tap_loop(a, sa, b, sb, prefix, fp, contract, fq, sizes).reshape([sizes[k] for k in out])
        return y.permute([out.index(k) for k in final]) if final is not None else y
    pre = [[k] for k in prefix]
    P = _left_operand(a, sa, pre, fp, contract, sizes, copy=False)
    if P is None:
        k0 = _accumulable(a, sa, b, pre, fp, contract, sizes)
        if k0 is not None:
            y = _accumulated_matmul(a, sa, b, sb, k0, pre, fp, contract, fq, sizes)
            y = y.reshape([sizes[k] for k in out])
            return y.permute([out.index(k) for k in final]) if final is not None else y
        P = _left_operand(a, sa, pre, fp, contract, sizes, copy=True)
    Q = _right_operand(b, sb, pre, contract, fq, sizes, copy=False)
    if Q is None and _blocked(P, b, prefix, A, sizes):
        y = _blocked_matmul(P, b, sb, prefix, contract, fq, sizes).reshape([sizes[k] for k in out])
    else:
        if Q is None:
            Q = _right_operand(b, sb, pre, contract, fq, sizes, copy=True)
        y = _matmul(P, Q).reshape([sizes[k] for k in out])
    if final is not None:
        y = y.permute([out.index(k) for k in final])
    return y


def _matmul(P: torch.Tensor, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.matmul (into `out` if given), with batch dims that are 1 on both sides dropped
    first: a single matrix product runs as a plain GEMM (the batched kernel is slower on CPU)."""
    while P.dim() > 2 and Q.dim() > 2 and P.shape[0] == 1 and Q.shape[0] == 1:
        P, Q = P[0], Q[0]
        out = out[0] if out is not None else None
    return gemm.matmul(P, Q, out)


def _matrix_operand(t, s, pre, rows, cols, sizes, copy: bool, slot: int) -> torch.Tensor | None:
    """t as a matmul operand [*pre, rows, cols]: a view, else (with `copy`) a copy into
    workspace `slot` in the cheaper memory order (returned transposed if need be), else None."""
    M = _grouped(t, s, pre + [rows, cols], sizes)
    if M is not None:
        return M
    Mt = _grouped(t, s, pre + [cols, rows], sizes)
    if Mt is not None:
        return Mt.transpose(-1, -2)
    if not copy:
        return None
    if _inner_score(t, s, rows) < _inner_score(t, s, cols):
        return _copy(t, s, pre + [cols, rows], sizes, slot=slot).transpose(-1, -2)
    return _copy(t, s, pre + [rows, cols], sizes, slot=slot)


def _left_operand(a, sa, pre, fp, contract, sizes, copy: bool) -> torch.Tensor | None:
    """a as the matmul's left operand [*pre, fp, contract] (workspace slot 0)."""
    return _matrix_operand(a, sa, pre, fp, contract, sizes, copy, slot=0)


def _right_operand(b, sb, pre, contract, fq, sizes, copy: bool) -> torch.Tensor | None:
    """b as the matmul's right operand [*pre, contract, fq] (workspace slot 1)."""
    return _matrix_operand(b, sb, pre, contract, fq, sizes, copy, slot=1)


def _accumulable(a, sa, b, pre, fp, contract, sizes) -> int | None:
    """The contracted id to loop over when a is not a matrix view only because of it (e.g. the
    batch n of v[n, c, o] in a weight VJP, summed but outside c): then each slice a[k0 = i] is
    a view and the matmuls accumulate into the (small) result, instead of copying a."""
    if len(contract) < 2 or a.dtype != b.dtype or (torch.is_grad_enabled()
                                                   and (a.requires_grad or b.requires_grad)):
        return None
    k0 = max(contract, key=lambda k: a.stride(sa.index(k)))
    rest = [k for k in contract if k != k0]
    if size_product(sizes[k] for k in rest) < ACCUMULATE_MIN_CONTRACT:
        return None
    j = sa.index(k0)
    if _left_operand(a.select(j, 0), sa[:j] + sa[j + 1:], pre, fp, rest, sizes, copy=False) is None:
        return None
    return k0


def _accumulated_matmul(a, sa, b, sb, k0, pre, fp, contract, fq, sizes) -> torch.Tensor:
    """Σ_i matmul(a[k0 = i], b[k0 = i]) with the other contracted ids inside each matmul; b's
    slices are copied (when needed) into the workspace, the products added in place."""
    rest = [k for k in contract if k != k0]
    ja, jb = sa.index(k0), sb.index(k0)
    suba, subb = sa[:ja] + sa[ja + 1:], sb[:jb] + sb[jb + 1:]
    y = None
    for i in range(sizes[k0]):
        Pi = _left_operand(a.select(ja, i), suba, pre, fp, rest, sizes, copy=True)
        Qi = _right_operand(b.select(jb, i), subb, pre, rest, fq, sizes, copy=True)
        if y is None:
            y = _matmul(Pi, Qi)
        elif y.dim() == 2 and Pi.dim() == 2 and Qi.dim() == 2:
            y.addmm_(Pi, Qi)
        else:
            y += _matmul(Pi, Qi)
    return y


def _blocked(P: torch.Tensor, b: torch.Tensor, prefix: list[int], A: set, sizes: dict) -> bool:
    """Copy-and-multiply per entry of the leading batch id (P broadcast over it: a kernel
    shared by all images) rather than copy all of b first: each slice's copy (im2col of one
    image) stays in cache for its matmul."""
    return bool(prefix) and prefix[0] not in A and sizes[prefix[0]] > 1 and P.dtype == b.dtype \
        and b.numel() * b.element_size() > BLOCK_COPY_MIN_BYTES \
        and not ((P.requires_grad or b.requires_grad) and torch.is_grad_enabled())


def _blocked_matmul(P, b, sb, prefix, contract, fq, sizes) -> torch.Tensor:
    """matmul(P, b as [*prefix, contract, fq]) one prefix[0] entry at a time, each slice of b
    copied into the workspace and multiplied straight into its slice of the result (the copy
    layout is chosen once, by `_inner_score`, as in `_right_operand`)."""
    lead, rest = prefix[0], prefix[1:]
    j = sb.index(lead)
    sub = sb[:j] + sb[j + 1:]
    b0 = b.select(j, 0)
    fq_inner = not _inner_score(b0, sub, contract) < _inner_score(b0, sub, fq)
    groups = [[k] for k in rest] + ([contract, fq] if fq_inner else [fq, contract])
    perm = [sub.index(k) for g in groups for k in g if k in sub]
    shape = [size_product(sizes[k] if k in sub else 1 for k in g) for g in groups]
    buf = _workspace(1, size_product(shape), b.dtype, b.device)
    dst = buf.view([b0.shape[d] for d in perm])
    Q = buf.view(shape) if fq_inner else buf.view(shape).transpose(-1, -2)
    P1 = P[0]
    y = P.new_empty([sizes[lead], *[sizes[k] for k in rest], P.shape[-2], size_product(sizes[k] for k in fq)])
    ys = y
    while P1.dim() > 2 and Q.dim() > 2 and P1.shape[0] == 1 and Q.shape[0] == 1:  # as _matmul
        P1, Q, ys = P1[0], Q[0], ys.select(1, 0)
    for i in range(sizes[lead]):
        dst.copy_(b.select(j, i).permute(perm))
        gemm.matmul(P1, Q, ys[i])
    return y


def _copy(t, s, groups, sizes, slot: int | None = None) -> torch.Tensor:
    """t permuted to the concatenated groups, copied, one dim per group. With a `slot` the copy
    is a matmul operand that dies with the matmul: it goes into a reused workspace buffer
    (`_workspace`) instead of fresh memory, unless autograd records t."""
    perm = [s.index(k) for g in groups for k in g if k in s]
    shape = [size_product(sizes[k] if k in s else 1 for k in g) for g in groups]
    p = t.permute(perm)
    if slot is None or (t.requires_grad and torch.is_grad_enabled()):
        return p.reshape(shape)
    buf = _workspace(slot, t.numel(), t.dtype, t.device)
    buf.view(p.shape).copy_(p)
    return buf.view(shape)


_WORKSPACE = threading.local()


def _workspace(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of `numel` entries, reused across calls of this thread (one per slot, dtype
    and device; grown on demand). Fresh memory for a large im2col copy costs page faults on
    every call, often more than the copy itself; like a BLAS/oneDNN scratchpad, the operand
    copies of `pair_contract` live here (each is consumed by the matmul before the next). All
    buffers of a thread together hold at most `cost.WORKSPACE_MAX_BYTES`; a larger copy gets a
    buffer of its own that is not kept."""
    nbytes = numel * dtype.itemsize
    with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
        if nbytes > WORKSPACE_MAX_BYTES:  # too large to keep: a one-off buffer
            return torch.empty(numel, dtype=dtype, device=device)
        pool = getattr(_WORKSPACE, "pool", None)
        if pool is None:
            pool = _WORKSPACE.pool = {}
        key = (slot, dtype, device)
        buf = pool.get(key)
        if buf is None or buf.numel() < numel:
            pool.pop(key, None)
            kept = sum(b.numel() * b.dtype.itemsize for b in pool.values())
            if kept + nbytes > WORKSPACE_MAX_BYTES:  # bounded in bytes: forget the others
                pool.clear()
            buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's workspace buffers (they are kept at the largest size used)."""
    _WORKSPACE.pool = {}


def _tap_loop(a, sa, b, sb, prefix, fp, contract, fq, sizes) -> torch.Tensor:
    """Σ over a few contracted taps of a[..., tap] * b[..., tap, ...] without copying b
    (depthwise convolutions: M = 1, small kernel)."""
    pa = a.permute([sa.index(k) for k in prefix + fp + contract if k in sa])  # fp: all size 1
    pa = pa.reshape([sizes[k] if k in sa else 1 for k in prefix] + [sizes[k] for k in contract])
    pb = b.permute([sb.index(k) for k in prefix + contract + fq if k in sb])
    pb_shape = [sizes[k] if k in sb else 1 for k in prefix] + [sizes[k] for k in contract + fq]
    pb = pb.reshape(pb_shape) if list(pb.shape) != pb_shape else pb
    nq = len(fq)
    acc = None
    for tap in itertools.product(*[range(sizes[k]) for k in contract]):
        w = pa[(Ellipsis, *tap)].reshape(list(pa.shape[:len(prefix)]) + [1] * nq)
        x = pb[(slice(None),) * len(prefix) + tap]
        acc = x * w if acc is None else acc.addcmul_(x, w)
    return acc


def plan_path(shapes, sublists, out, optimize: str = "auto"):
    """opt_einsum contraction path (list of pairs) for integer sublists."""
    if len(shapes) < 2:
        return []
    letters = {}
    for s in list(sublists) + [out]:
        for k in s:
            letters.setdefault(k, opt_einsum.get_symbol(len(letters)))
    eq = ",".join("".join(letters[k] for k in s) for s in sublists) + "->" + "".join(letters[k] for k in out)
    path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimize)
    return path
