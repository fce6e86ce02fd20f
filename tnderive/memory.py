"""Memory an evaluation needs, checked before anything is allocated.

`check_fits(entries, labels, binding)` raises a TNError when the largest tensor an evaluation
holds (the result, or an intermediate the lowered program allocates: `Runner.largest`) is
larger than the memory available on the device, so a user gets the entry count, the bytes and
the alternatives instead of the allocator's error. It runs after lowering (which allocates
nothing) and before the program runs.
"""
from __future__ import annotations

import os

import torch

from .binding import Binding
from .errors import TNError

_GB = 1e9


def available_bytes(device: torch.device | str | None) -> int | None:
    """Bytes that can still be allocated on `device` (None when unknown)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type == "cpu":
        return _cpu_available()
    return None


def _cpu_available() -> int | None:
    """MemAvailable from /proc/meminfo, else the physical memory (None when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


#: a largest tensor at most this large (bytes) is not checked against the device's free
#: memory: the check is for results of gigabytes, and reading /proc/meminfo costs ~30 µs, a
#: third of a small evaluate (a KFAC input side of 1.6 MB was paying it on every call)
ALWAYS_FITS = 2**26


def check_fits(entries: int, labels: tuple[str, ...] | None, binding: Binding,
               what: str = "evaluate") -> None:
    """TNError when the largest tensor of an evaluation (`entries`; `labels` the indices of an
    intermediate, None for the result: `Runner.largest`) exceeds the device's memory."""
    dtype = binding.dtype if binding.dtype is not None else torch.get_default_dtype()
    if not dtype.is_floating_point and not dtype.is_complex:
        dtype = torch.get_default_dtype()
    need = entries * dtype.itemsize
    if need <= ALWAYS_FITS:
        return  # skip the device query (≈20 µs, 1/7 of a small evaluate): evaluate is a hot path
    device = binding.device or torch.device("cpu")
    have = available_bytes(device)
    if have is None or need <= have:
        return
    which = "the result" if labels is None else f"an intermediate [{','.join(labels)}]"
    raise TNError(
        f"{what}: {which} has {entries:,} entries ({need / _GB:.1f} GB as {dtype}), more than the "
        f"{have / _GB:.1f} GB available on {device}. Use tnderive.compile(expr) (it keeps "
        f"diagonal results lazy and frees intermediates early) or a vector product "
        f"(tnderive.jvp / tnderive.vjp, e.g. a Hessian-vector product) instead of the full tensor.")
