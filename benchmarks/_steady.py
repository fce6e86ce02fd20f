"""Run a benchmark under a steady memory allocator.

glibc hands large freed blocks back to the kernel and maps them again on the next call, so a
call that allocates a few MB pays page faults or not depending on what ran before it (torch's
own `F.conv2d` on the ConvNeXt stem measures 3.6 ms or 14 ms in the same process, depending on
allocation history). `steady_allocator()` re-executes the script once with the glibc tunables
that keep freed memory in the process, so every implementation is timed in the warm state,
as a long-running training job sees it. No effect off glibc, or when the tunables are set.
"""
from __future__ import annotations

import os
import sys

TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def steady_allocator() -> str:
    """Re-exec with TUNABLES unless already set; returns a line for the results header."""
    if not sys.platform.startswith("linux"):
        return "allocator: platform default"
    if "GLIBC_TUNABLES" not in os.environ and os.environ.get("TNDERIVE_BENCH_NO_REEXEC") != "1":
        env = dict(os.environ, GLIBC_TUNABLES=TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return f"allocator: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
