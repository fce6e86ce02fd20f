"""`tnderive gallery`: regenerate the example gallery (`gallery/` of a source checkout)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ..errors import TNError
from ._common import ensure_folder


def find_gallery(start: Path | None = None) -> Path:
    """The `gallery/` folder: in the current directory or one above it, else next to the
    installed package (an editable install / source checkout)."""
    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        cand = d / "gallery"
        if (cand / "__init__.py").is_file() and any(cand.glob("[0-9][0-9]_*.py")):
            return cand
    cand = Path(__file__).resolve().parents[2] / "gallery"
    if (cand / "__init__.py").is_file():
        return cand
    raise TNError("cannot find the gallery/ folder: run 'tnderive gallery' inside a tnderive "
                  "source checkout (the gallery is not part of the installed package)")


def load_gallery(folder: Path):
    """Import the gallery package from `folder`."""
    parent = str(folder.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    module = importlib.import_module("gallery")
    if Path(module.__file__).resolve().parent != folder.resolve():
        raise TNError(f"another module named 'gallery' is importable ({module.__file__}); "
                      f"run 'python -m gallery' in {folder.parent}")
    return module


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gallery", help="regenerate the example gallery (diagrams, code, READMEs)",
        description="Run every gallery example (gallery/NN_name.py): each derives a result, verifies "
                    "it against torch in float64 and writes its diagrams, generated code and README "
                    "into gallery/NN_name/; then gallery/README.md is rewritten. Deterministic: "
                    "re-running leaves the files byte-identical. Exit code 1 when a check fails.",
        epilog="example: tnderive gallery --only 08 --fast -o /tmp/gallery")
    p.add_argument("--only", action="append", metavar="NAME",
                   help="run only examples whose name starts with / contains NAME (repeatable)")
    p.add_argument("--fast", action="store_true", help="small sizes (what the tests run)")
    p.add_argument("-o", "--output", metavar="DIR",
                   help="write into DIR/<example>/ instead of gallery/ (created as needed)")
    p.add_argument("--out", dest="output", help=argparse.SUPPRESS)  # the former name
    p.add_argument("--list", action="store_true", help="list the examples and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--gallery", metavar="DIR", help="the gallery folder (default: found from the "
                                                    "current directory)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.output:
        ensure_folder(args.output)
    folder = Path(args.gallery) if args.gallery else find_gallery()
    if not (folder / "__init__.py").is_file():
        raise TNError(f"--gallery {str(folder)!r}: no gallery there (expected {folder}/__init__.py)")
    gallery = load_gallery(folder)
    return gallery.run_from_args(args)
