"""Runnable tnderive examples. Each `NN_name.py` defines `main(outdir=None, fast=False)` that
derives something, verifies it numerically, and writes its diagrams (SVG), generated code and
a README.md into the folder `NN_name/` next to the script (or `outdir`).

    python -m gallery                 regenerate every example and gallery/README.md
    python -m gallery --only 01 --fast -o /tmp/g
    tnderive gallery                  the same from the command line tool

Everything written is deterministic (fixed seeds, no timestamps), so regenerating leaves the
checked-in files byte-identical.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import ModuleType

from tnderive import progress
from tnderive.commands._common import ensure_folder
from tnderive.draw import warn_if_no_dot
from tnderive.errors import TNError
from tnderive.pyfiles import import_file

ROOT = Path(__file__).resolve().parent

__all__ = ["ROOT", "examples", "load", "run", "write_index", "main"]


def examples(root: Path = ROOT) -> list[Path]:
    """The example scripts `NN_name.py`, in order."""
    return sorted(p for p in root.glob("[0-9][0-9]_*.py"))


def load(path: Path) -> ModuleType:
    """Import an example script by path (names starting with digits cannot be imported)."""
    return import_file(path, f"tnderive_gallery_{path.stem}")


def _title_and_text(module: ModuleType) -> tuple[str, str]:
    doc = (module.__doc__ or "").strip()
    title = getattr(module, "TITLE", None) or (doc.splitlines()[0] if doc else module.__name__)
    lines = doc.splitlines()
    if lines and lines[0].strip() == title:
        lines = lines[1:]
    return title, "\n".join(lines).strip()


def write_index(root: Path = ROOT, outroot: Path | None = None) -> Path:
    """gallery/README.md: every example with its description and pictures inline."""
    outroot = outroot or root
    out = ["# tnderive gallery", "",
           "Runnable examples. Each script derives a result symbolically, verifies it numerically "
           "in float64 against torch (torch.func or the textbook definition), and writes its "
           "diagrams, generated torch code and a README into the folder of the same name.", "",
           "Regenerate everything with `python -m gallery` (or `tnderive gallery`); the output is "
           "deterministic, so a clean checkout stays clean.", "",
           "| # | example | pictures | code |", "| --- | --- | --- | --- |"]
    sections = []
    for path in examples(root):
        module = load(path)
        title, text = _title_and_text(module)
        folder = outroot / path.stem
        pics = sorted(p.name for p in folder.glob("*.svg")) + sorted(p.name for p in folder.glob("*.png"))
        codes = sorted(p.name for p in folder.glob("*.py"))
        num = path.stem[:2]
        out.append(f"| {num} | [{title}](#{_anchor(num + ' ' + title)}) | {len(pics)} | {len(codes)} |")
        sec = [f"## {num} {title}", "", text.split("\n\n")[0].replace("\n", " "), "",
               f"Script: [`{path.name}`]({path.name}) · details: [`{path.stem}/README.md`]({path.stem}/README.md)", ""]
        shown = getattr(module, "SHOW", None) or pics[:2]
        for pic in shown:
            if pic in pics:
                sec += [f"![{title}: {pic}]({path.stem}/{pic})", ""]
        sections.append("\n".join(sec))
    text = "\n".join(out) + "\n\n" + "\n".join(sections)
    target = outroot / "README.md"
    target.write_text(text.rstrip("\n") + "\n", encoding="utf-8", newline="\n")
    return target


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    keep = [c for c in heading.lower() if c.isalnum() or c in " -_"]
    return "".join(keep).replace(" ", "-")


def run(only: list[str] | None = None, fast: bool = False, outroot: Path | None = None,
        index: bool = True, quiet: bool = False) -> list[tuple[str, object, float]]:
    """Run the examples (all, or those whose name starts with / contains an `only` entry).
    Returns [(stem, Artifacts or the exception, seconds)]."""
    results = []
    warn_if_no_dot()
    paths = examples()
    if only:
        paths = [p for p in paths if any(p.stem.startswith(o) or o in p.stem for o in only)]
    for path in paths:
        outdir = (outroot / path.stem) if outroot else None
        t0 = time.perf_counter()
        if not quiet:
            print(f"[{path.stem}]", flush=True)
        try:
            with progress.progress(f"  {path.stem}"):
                art = load(path).main(outdir, fast=fast)
        except Exception as e:  # report and continue with the next example
            results.append((path.stem, e, time.perf_counter() - t0))
            if not quiet:
                print(f"    ERROR {type(e).__name__}: {e}", flush=True)
            continue
        dt = time.perf_counter() - t0
        results.append((path.stem, art, dt))
        if not quiet:
            bad = [c for c in art.checks if not c.ok]
            print(f"    {'ok' if art.ok else 'FAILED'}: {len(art.checks)} checks, "
                  f"{len(art.files)} files, {dt:.1f} s" + (f" ({bad[0].what})" if bad else ""), flush=True)
    if index and not only:
        write_index(ROOT, outroot)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gallery", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.output:
        try:
            ensure_folder(args.output)
        except TNError as e:
            print(f"python -m gallery: error: {e}", file=sys.stderr)
            return 2
    with progress.setting(False if args.quiet else None):
        return run_from_args(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only examples whose name starts with / contains NAME (repeatable)")
    parser.add_argument("--fast", action="store_true", help="small sizes (what the tests run)")
    parser.add_argument("-o", "--output", metavar="DIR",
                        help="write into DIR/<example>/ instead of gallery/ (created as needed)")
    parser.add_argument("--out", dest="output", help=argparse.SUPPRESS)  # the former name
    parser.add_argument("--list", action="store_true", help="list the examples and exit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


def run_from_args(args) -> int:
    if args.list:
        for p in examples():
            print(f"{p.stem:32s} {getattr(load(p), 'TITLE', '')}")
        return 0
    t0 = time.perf_counter()
    results = run(args.only, args.fast, Path(args.output) if args.output else None)
    failed = [s for s, a, _ in results if isinstance(a, Exception) or not a.ok]
    print(f"{len(results) - len(failed)}/{len(results)} examples ok in {time.perf_counter() - t0:.1f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not results else 0
