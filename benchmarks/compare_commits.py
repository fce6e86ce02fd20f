"""Before/after: run one benchmark in two source trees back to back and tabulate the change.

    git worktree add ../base <commit>       # the "before" tree (once)
    python benchmarks/compare_commits.py conv --before ../base --rounds 2 -- --repeats 1

Each round runs `benchmarks/<name>.py --no-write <args after -->` once in the "before" tree and
once in this tree (alternating in ABBA order, so both see the same machine load and a drift of
it cancels), each in its own process
importing tnderive from its own tree. The markdown tables the benchmark prints are parsed; every
time cell (a number with ms / µs / s, or in a column whose header says ms / s) of a row whose
cells or column header match `--select` is kept, its median over the rounds compared. The result
is the section `compare_<name>` of benchmarks/RESULTS.md (`--no-write`: print only): one row per
cell with before, after and after/before; rows above 1 + `--tolerance` are flagged.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import write_section

HERE = Path(__file__).resolve().parent.parent

#: a sitecustomize that makes `tnderive` (and its renamed subpackages) import from one tree
_SHIM = '''import sys
from importlib.util import spec_from_file_location

_ROOT = {root!r}
_MAP = {{"tnderive": _ROOT + "/tnderive", "tnderive.codegen": _ROOT + "/codegen",
         "tnderive.rules": _ROOT + "/rules"}}


class _TreeFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in _MAP:
            return spec_from_file_location(fullname, _MAP[fullname] + "/__init__.py",
                                           submodule_search_locations=[_MAP[fullname]])
        return None


sys.meta_path.insert(0, _TreeFinder)
'''

_UNITS = {"s": 1e3, "ms": 1.0, "µs": 1e-3, "us": 1e-3}
_TIME = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|µs|us|s)?(?:\s|$|\()")


def run_once(tree: Path, name: str, args: list[str], shim_dir: Path) -> str:
    """stdout of the benchmark in `tree` (tnderive imported from that tree)."""
    env = dict(os.environ, PYTHONPATH=str(shim_dir))
    cmd = [sys.executable, str(tree / "benchmarks" / f"{name}.py"), "--no-write", *args]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree}:\n{done.stderr[-3000:]}")
    return done.stdout


def tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables in `text`: (header, rows of cells)."""
    out: list[tuple[list[str], list[list[str]]]] = []
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
            out.append((header, []))
        elif not all(set(c) <= set("-: ") for c in cells):
            out[-1][1].append(cells)
    return out


def time_cells(runs: list[str], select: re.Pattern) -> dict[tuple[str, str], list[float]]:
    """{(row label, column): [milliseconds per run]} of the time cells of the tables the runs
    printed (rows matched by position, cells by column name: a column only one tree prints is
    left out; a row's label: its cells that are the same in every run and are not times)."""
    parsed = [tables(text) for text in runs]
    out: dict[tuple[str, str], list[float]] = {}
    for t, (header, rows) in enumerate(parsed[0]):
        for r in range(len(rows)):
            if not all(t < len(p) and r < len(p[t][1]) for p in parsed):
                continue
            versions = [dict(zip(p[t][0], p[t][1][r])) for p in parsed]
            common = [col for col in header if all(col in v for v in versions)]
            times: dict[str, list[float]] = {}
            for col in common:
                got = [_time(col, v[col]) for v in versions]
                if all(g is not None for g in got):
                    times[col] = got
            label = " / ".join(versions[0][col] for col in common if col not in times
                               and all(v[col] == versions[0][col] for v in versions))
            for col, values in times.items():
                if select.search(label) or select.search(col):
                    out[(label, col)] = values
    return out


def _time(col: str, cell: str) -> float | None:
    """Milliseconds of a time cell (a number with a unit, or in a column whose header gives
    the unit), else None."""
    m = _TIME.match(cell)
    if not m or cell.endswith("×"):
        return None
    unit = m.group(2) or _header_unit(col)
    return float(m.group(1)) * _UNITS[unit] if unit else None


def _header_unit(col: str) -> str | None:
    m = re.search(r"\b(ms|µs|us|s)\b", col)
    return m.group(1) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="benchmark: benchmarks/<name>.py")
    ap.add_argument("--before", required=True, type=Path, help="the tree to compare with")
    ap.add_argument("--rounds", type=int, default=2, help="alternating runs per tree (median)")
    ap.add_argument("--select", default="tnderive|generated",
                    help="regex: keep cells whose row or column matches")
    ap.add_argument("--tolerance", type=float, default=0.10, help="flag after/before above 1+this")
    ap.add_argument("--no-write", action="store_true")
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    opts = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    opts.args = bench_args  # everything after `--` goes to the benchmark
    select = re.compile(opts.select)
    trees = {"before": opts.before.resolve(), "after": HERE}
    runs: dict[str, list[str]] = {"before": [], "after": []}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        shims = {}
        for label, tree in trees.items():
            shims[label] = Path(tmp) / label
            shims[label].mkdir()
            (shims[label] / "sitecustomize.py").write_text(_SHIM.format(root=str(tree)))
        for r in range(opts.rounds):  # ABBA order: a linear drift of the load cancels out
            for label in (("before", "after") if r % 2 == 0 else ("after", "before")):
                runs[label].append(run_once(trees[label], opts.name, opts.args, shims[label]))
    elapsed = time.time() - start
    cells = time_cells(runs["before"] + runs["after"], select)
    keys = list(cells)
    if not keys:
        raise SystemExit("no comparable time cells found (check --select)")
    load = os.getloadavg()
    lines = [f"## Before / after: `benchmarks/{opts.name}.py`", "",
             f"Command: `python benchmarks/compare_commits.py {opts.name} --before "
             f"{opts.before} --rounds {opts.rounds}"
             + (f" -- {' '.join(opts.args)}" if opts.args else "") + "`; "
             f"before = {trees['before'].name}, after = this tree; median of {opts.rounds} "
             f"run(s) per tree in ABBA order, {elapsed:.0f} s in all; load average "
             f"{load[0]:.1f} / {load[1]:.1f} (1 / 5 min) at the end on a shared "
             f"{os.cpu_count()}-core machine (expect noise).", "",
             "| row | column | before ms | after ms | after/before |", "| --- | --- | ---: | ---: | ---: |"]
    ratios = []
    for key, col in keys:
        values = cells[(key, col)]
        b = statistics.median(values[:opts.rounds])
        a = statistics.median(values[opts.rounds:])
        ratio = a / b if b > 0 else float("nan")
        ratios.append(ratio)
        flag = " (slower)" if ratio > 1 + opts.tolerance else ""
        lines.append(f"| {key} | {col} | {b:.3f} | {a:.3f} | {ratio:.2f}{flag} |")
    worse = sum(r > 1 + opts.tolerance for r in ratios)
    lines += ["", f"after/before: median {statistics.median(ratios):.2f}, range "
              f"{min(ratios):.2f}–{max(ratios):.2f}; {worse} of {len(ratios)} cells more than "
              f"{opts.tolerance:.0%} slower."]
    text = "\n".join(lines)
    print(text)
    if not opts.no_write:
        write_section(f"compare_{opts.name}", text)


if __name__ == "__main__":
    main()
