"""Peer figures in benchmarks/RESULTS.md survive a run without the peer.

A benchmark run on a machine where a peer (tensorgrad, einconv, ...) is not installed must not
replace the figures that an earlier run measured with it by a placeholder or an empty column:

    last_peer_line(name)              the `- peer: ...` line of a section, if it was measured
    kept_peer_line(name, peer)        that line marked as kept, or "<peer>: not run" without one
    keeps_peer_figures(name, peer, installed, measured)
                                      True (and says so) when the section must be left as it is
    write_section(name, body)         replace (or append) a benchmark's section of RESULTS.md
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
KEPT = " (kept from the last run that measured it; the peer was not installed for this run)"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the text between `<!-- BEGIN name -->` and `<!-- END name -->` in RESULTS.md by
    `body`, or append the section when it is not there yet."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def section(name: str, path: Path = RESULTS) -> str | None:
    """The text between `<!-- BEGIN name -->` and `<!-- END name -->`, or None."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    m = re.search(re.escape(f"<!-- BEGIN {name} -->") + "(.*?)" + re.escape(f"<!-- END {name} -->"),
                  text, re.S)
    return m.group(1) if m else None


def last_peer_line(name: str, path: Path = RESULTS) -> str | None:
    """The measured peer figure of section `name` (its `- peer: ...` line, without the final
    period or an earlier 'kept' note), or None when the section has none or it was not run."""
    body = section(name, path) or ""
    m = re.search(r"^- peer: (.*?)\.?$", body, re.M)
    if not m:
        return None
    line = m.group(1).replace(KEPT, "")
    if "not measured" in line or "not run" in line:
        return None
    return line


def kept_peer_line(name: str, peer: str, path: Path = RESULTS) -> str:
    """The peer line for a run without `peer`: the last measured one, marked as kept, or
    '<peer>: not run (not installed)' when no run measured it yet."""
    last = last_peer_line(name, path)
    return last + KEPT if last else f"{peer}: not run (not installed)"


def keeps_peer_figures(name: str, peer: str, installed: bool, measured: str,
                       path: Path = RESULTS) -> bool:
    """True when `peer` is not installed and section `name` holds figures measured with it
    (`measured`: a regular expression that matches them): the caller then leaves the section
    as it is instead of replacing those figures by an empty column. Prints why."""
    if installed:
        return False
    body = section(name, path)
    if body is None or not re.search(measured, body, re.M):
        return False
    print(f"{peer} is not installed: section '{name}' of {path.name} keeps its measured {peer} "
          f"figures and is not rewritten (install the peers with "
          f"`python3 -m pip install -e \".[bench]\" -c benchmarks/constraints.txt`, or pass "
          f"--no-write)", file=sys.stderr)
    return True
