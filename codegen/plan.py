"""Contraction planning for one product (a tensor network of plain operands).

`plan_contraction(operands, output, sizes, numeric)` chooses a pairwise contraction order and
returns a `ContractionPlan` that reports its own cost:

* order: opt_einsum `optimal` for <= 8 operands, dynamic programming minimising
  flops + memory (`combo`) up to 30 operands, cotengra's hyper-optimiser (when installed,
  else opt_einsum `greedy`) beyond;
* cost: FLOPs and the largest intermediate as sympy polynomials in the index sizes
  (`2*i*n*o`) and as numbers for the sizes the plan was made for, next to the naive cost of
  one einsum over all indices at once. A pairwise order that would cost more than the naive
  loop nest is replaced by the naive single einsum, so a plan is never above naive.

FLOPs follow opt_einsum's convention (size of the loop nest times the number of operand
multiplications, plus one when something is summed), so the numbers compare directly with
`opt_einsum.contract_path(...)[1].opt_cost`.

Operands are tuples of index labels (no label repeated inside one operand; take diagonals
first). Sizes map each label to a sympy expression; `numeric` maps each label to the int used
to choose the order (the bound size, or a default for unbound symbols).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Mapping, Sequence

import opt_einsum
import sympy

from tnderive.errors import TNError

DEFAULT_SIZE = 8        # planning size of an unbound size symbol
OPTIMAL_MAX = 8         # exhaustive search up to this many operands
DP_MAX = 30             # dynamic programming up to this many operands

Labels = tuple[str, ...]


@dataclass(frozen=True)
class Step:
    """One einsum: `inputs` (operand ids, SSA numbering) with their `labels` -> `output`.

    Ids 0..K-1 are the plan's operands; step k produces id K+k.
    """

    inputs: tuple[int, ...]
    labels: tuple[Labels, ...]
    output: Labels
    sizes: Mapping[str, sympy.Expr] = field(compare=False, repr=False)  # label -> size

    @cached_property
    def _cost(self) -> tuple[sympy.Expr, sympy.Expr]:
        # symbolic, so worked out on first use: a plan compares its candidates by the numeric
        # cost (`_numeric_cost`) and only the chosen one's polynomials are ever read
        return step_cost(self.labels, self.output, self.sizes)

    @property
    def flops(self) -> sympy.Expr:
        return self._cost[0]

    @property
    def size(self) -> sympy.Expr:
        """Entries of the step's output."""
        return self._cost[1]

    def equation(self) -> str:
        """The step as `[a,b],[b,c]->[a,c]`."""
        return ",".join(f"[{','.join(l)}]" for l in self.labels) + f"->[{','.join(self.output)}]"


@dataclass
class ContractionPlan:
    """A contraction order with its symbolic and numeric cost."""

    operands: tuple[Labels, ...]
    output: Labels
    sizes: dict[str, sympy.Expr]
    numeric: dict[str, int]
    steps: list[Step]
    method: str
    symbols: dict = field(default_factory=dict)  # size symbol -> planning value (all of them)

    @cached_property
    def naive_flops(self) -> sympy.Expr:
        """Cost of one einsum over all indices at once (symbolic: worked out on first use)."""
        return naive_flops(self.operands, self.output, self.sizes)

    # --- symbolic cost --------------------------------------------------------------------
    @property
    def flops(self) -> sympy.Expr:
        return sympy.expand(sum((s.flops for s in self.steps), sympy.Integer(0)))

    @property
    def largest_intermediate(self) -> sympy.Expr:
        """Largest tensor a step writes (symbolic; compared at the planning sizes)."""
        if not self.steps:
            return sympy.Integer(0)
        return max((s.size for s in self.steps), key=lambda e: _num(e, self.numeric_symbols))

    # --- numeric cost ---------------------------------------------------------------------
    @property
    def numeric_symbols(self) -> dict[sympy.Symbol, int]:
        """Planning values of the size symbols: those given (`symbols`, e.g. an input size
        that only occurs inside a derived size such as a convolution's output), then those
        implied by labels whose size is a bare symbol."""
        return {**self.symbols, **_symbol_values(self.sizes, self.numeric)}

    def flops_at(self, values: Mapping | None = None) -> int:
        """FLOPs for size-symbol values (default: the planning sizes)."""
        return _num(self.flops, self._values(values))

    def naive_flops_at(self, values: Mapping | None = None) -> int:
        return _num(self.naive_flops, self._values(values))

    def largest_at(self, values: Mapping | None = None) -> int:
        vals = self._values(values)
        return max((_num(s.size, vals) for s in self.steps), default=0)

    def _values(self, values):
        if values is None:
            return self.numeric_symbols
        return {sympy.Symbol(str(k), integer=True, positive=True): int(v) for k, v in values.items()}

    def __str__(self) -> str:
        lines = [f"contraction of {len(self.operands)} operand(s) -> [{','.join(self.output)}] "
                 f"({self.method})"]
        for k, s in enumerate(self.steps):
            ins = ", ".join(f"#{i}[{','.join(l)}]" for i, l in zip(s.inputs, s.labels))
            lines.append(f"  #{len(self.operands) + k} = {ins} -> [{','.join(s.output)}]   "
                         f"flops {s.flops}")
        lines.append(f"  flops {self.flops} (naive {self.naive_flops}); "
                     f"largest intermediate {self.largest_intermediate}")
        return "\n".join(lines)


def _num(e: sympy.Expr, values: Mapping[sympy.Symbol, int]) -> int:
    v = sympy.sympify(e).xreplace({k: sympy.Integer(n) for k, n in values.items()})
    if not v.is_number:
        raise TNError(f"cannot evaluate cost {e}: unbound size symbol(s) "
                      f"{sorted(map(str, v.free_symbols))}")
    return int(v)


def _symbol_values(sizes: Mapping[str, sympy.Expr], numeric: Mapping[str, int]) -> dict:
    """Size-symbol values implied by labels whose size is a bare symbol."""
    out: dict[sympy.Symbol, int] = {}
    for label, s in sizes.items():
        if isinstance(s, sympy.Symbol) and label in numeric:
            out.setdefault(s, int(numeric[label]))
    return out


def step_cost(labels: Sequence[Labels], output: Labels, sizes: Mapping[str, sympy.Expr]):
    """(flops, output size) of one einsum, opt_einsum's convention."""
    involved = list(dict.fromkeys(i for l in labels for i in l))
    inner = any(i not in output for i in involved)
    loop = sympy.Mul(*[sizes[i] for i in involved])
    factor = max(1, len(labels) - 1) + (1 if inner else 0)
    out_size = sympy.Mul(*[sizes[i] for i in output])
    return sympy.expand(factor * loop), out_size


def naive_flops(operands: Sequence[Labels], output: Labels, sizes) -> sympy.Expr:
    """Cost of one einsum over all indices in a single loop nest."""
    if not operands:
        return sympy.Integer(0)
    return step_cost(operands, output, sizes)[0]


def plan_contraction(operands: Sequence[Labels], output: Labels,
                     sizes: Mapping[str, sympy.Expr], numeric: Mapping[str, int],
                     method: str | None = None,
                     symbols: Mapping[sympy.Symbol, int] | None = None) -> ContractionPlan:
    """The contraction plan of `operands` -> `output` (see the module docstring).

    method: None (automatic), or an opt_einsum optimizer name ('optimal', 'dp', 'greedy', ...).
    symbols: planning values of size symbols that no label's size names alone.
    """
    symbols = dict(symbols or {})
    operands = tuple(tuple(o) for o in operands)
    output = tuple(output)
    for o in operands:
        if len(set(o)) != len(o):
            raise TNError(f"plan: operand {list(o)} repeats an index (take the diagonal first)")
    labels = {i for o in operands for i in o}
    missing = [i for i in output if i not in labels]
    if missing:
        raise TNError(f"plan: output index {missing[0]!r} is on no operand")
    for i in labels:
        if i not in sizes or i not in numeric:
            raise TNError(f"plan: no size for index {i!r}")
    sizes = {i: sympy.sympify(sizes[i]) for i in labels}
    numeric = {i: int(numeric[i]) for i in labels}
    live = list(enumerate(operands))
    path, used = _path(operands, output, numeric, method)
    candidates = [ContractionPlan(operands, output, sizes, numeric,
                                  _steps(live, output, path, sizes, len(operands)), used, symbols)]
    reduced, pre = _pre_reductions(operands, output, sizes)
    if pre:  # sum indices that live on one operand only before pairing (e.g. a conv pattern's o)
        path2, used2 = _path(tuple(l for _, l in reduced), output, numeric, method)
        steps = pre + _steps(reduced, output, path2, sizes, len(operands) + len(pre))
        candidates.append(ContractionPlan(operands, output, sizes, numeric, steps,
                                          used2 + "+pre-sum", symbols))
    if len(operands) > 1:
        naive = _steps(live, output, [tuple(range(len(operands)))], sizes, len(operands))
        candidates.append(ContractionPlan(operands, output, sizes, numeric, naive, "naive",
                                          symbols))
    # cheapest at the planning sizes; ties keep the earlier (pairwise) candidate
    return min(candidates, key=lambda p: _numeric_cost(p.steps, numeric))


def _numeric_cost(steps: Sequence[Step], numeric: Mapping[str, int]) -> tuple[int, int]:
    """(FLOPs, largest intermediate) of steps at the planning sizes of their labels (the
    numbers `flops_at` / `largest_at` give, without substituting into the polynomials)."""
    flops = largest = 0
    for s in steps:
        involved = list(dict.fromkeys(i for l in s.labels for i in l))
        loop = 1
        for i in involved:
            loop *= numeric[i]
        inner = any(i not in s.output for i in involved)
        flops += (max(1, len(s.labels) - 1) + (1 if inner else 0)) * loop
        size = 1
        for i in s.output:
            size *= numeric[i]
        largest = max(largest, size)
    return flops, largest


def _pre_reductions(operands, output, sizes):
    """Single-operand sums of indices no other operand (nor the output) carries."""
    live = list(enumerate(operands))
    if len(live) < 2:
        return live, []
    pre: list[Step] = []
    next_id = len(operands)
    for pos, (i, labels) in enumerate(live):
        others = set(output) | {x for j, (_, l) in enumerate(live) if j != pos for x in l}
        keep = tuple(x for x in labels if x in others)
        if len(keep) < len(labels):
            pre.append(Step((i,), (labels,), keep, sizes))
            live[pos] = (next_id, keep)
            next_id += 1
    return live, pre


def _path(operands, output, numeric, method):
    """A linear (opt_einsum) path and the name of the method that found it."""
    k = len(operands)
    if k <= 1:
        return ([(0,)] if k == 1 else []), "single"
    if method is None:
        if k <= OPTIMAL_MAX:
            method = "optimal"
        elif k <= DP_MAX:
            method = "dp-combo"
        else:
            method = "cotengra" if _has_cotengra() else "greedy"
    position: dict[str, int] = {}  # labels numbered in order of first appearance
    for o in (*operands, output):
        for i in o:
            position.setdefault(i, len(position))
    numbered = tuple(tuple(position[i] for i in o) for o in operands)
    return (_cached_path(numbered, tuple(position[i] for i in output),
                         tuple(numeric[i] for i in position), method), method)


@lru_cache(maxsize=4096)
def _cached_path(operands, output, sizes, method):
    """opt_einsum's path for operands and output written with numbered labels (0, 1, ... in
    order of first appearance; `sizes[k]` is label k's size): contractions that differ only
    in their index names share one entry."""
    eq = ",".join("".join(opt_einsum.get_symbol(i) for i in o) for o in operands) + "->" + \
        "".join(opt_einsum.get_symbol(i) for i in output)
    shapes = [tuple(sizes[i] for i in o) for o in operands]
    if method == "dp-combo":
        optimize = opt_einsum.paths.DynamicProgramming(minimize="combo")
    elif method == "cotengra":
        import cotengra  # optional (the `bench` extra): only this method needs it
        optimize = cotengra.HyperOptimizer(minimize="combo", max_repeats=32, progbar=False,
                                           parallel=False)
    else:
        optimize = method
    with warnings.catch_warnings():  # cotengra warns when its optional kahypar is missing
        warnings.simplefilter("ignore")
        path, _ = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize=optimize)
    return tuple(tuple(p) for p in path)


@lru_cache(maxsize=1)
def _has_cotengra() -> bool:
    try:  # an optional dependency: probe it without requiring it
        import cotengra  # noqa: F401
    except ImportError:
        return False
    return True


def _intermediate_order(taken, rest, output) -> Labels:
    """Dims of an intermediate: indices a later step sums first, then the output's indices in
    output order (keeps later GEMMs free of transposing copies and the result unpermuted)."""
    seen = list(dict.fromkeys(x for _, l in taken for x in l))
    kept = [i for i in seen if i in rest]
    pos = {i: k for k, i in enumerate(output)}
    return tuple(sorted(kept, key=lambda i: (i in pos, pos.get(i, 0), seen.index(i))))


def _steps(live, output, path, sizes, next_id: int) -> list[Step]:
    """Turn a linear path (positions popped from a shrinking list) into SSA steps.

    live: (id, labels) of the operands the path refers to; new ids start at `next_id`."""
    live = list(live)
    steps: list[Step] = []
    for pos in path:
        pos = sorted(pos, reverse=True)
        taken = [live.pop(p) for p in pos][::-1]
        rest = {i for _, l in live for i in l} | set(output)
        if not live:
            out = output
        else:
            out = _intermediate_order(taken, rest, output)
        ids = tuple(t[0] for t in taken)
        labs = tuple(t[1] for t in taken)
        if len(taken) == 1 and labs[0] == out:
            live.append(taken[0])  # nothing to do
            continue
        steps.append(Step(ids, labs, out, sizes))
        live.append((next_id, out))
        next_id += 1
    if live and len(live) == 1 and live[0][1] != output:
        i, l = live[0]
        steps.append(Step((i,), (l,), output, sizes))
    return steps
