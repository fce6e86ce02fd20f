"""Progress of long runs on stderr: one line redrawn in place on a terminal, nothing when stderr
is not a terminal (pipes, logs, tests). `set_enabled(False)` (the CLI's `--quiet`) turns it
off, `set_enabled(True)` on; without either, `TNDERIVE_PROGRESS=0` / `=1` does.

    with progress("σ-fit", total=45) as bar:
        for part in parts:
            ...
            bar.advance(note=part.name)

`note(text)` updates the innermost open bar from code that does not hold it (a demo check);
`echo(text)` prints a line to stdout without mixing it into a bar drawn on the same terminal.
Only the innermost bar is drawn; an outer one is redrawn at its next update.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

_setting: bool | None = None   # None: on when stderr is a terminal
_open: list["Progress"] = []
REDRAW_SECONDS = 0.1   # on a terminal
LOG_SECONDS = 2.0      # elsewhere (when enabled): at most one line per 2 s


def set_enabled(flag: bool | None) -> None:
    """True: always show progress, False: never, None: when stderr is a terminal."""
    global _setting
    _setting = flag


@contextmanager
def setting(flag: bool | None) -> Iterator[None]:
    """`set_enabled(flag)` for a `with` block, the previous setting restored after it."""
    global _setting
    before = _setting
    _setting = flag
    try:
        yield
    finally:
        _setting = before


def enabled(stream: TextIO | None = None) -> bool:
    """Whether progress is shown on `stream` (default stderr)."""
    if _setting is not None:
        return _setting
    env = os.environ.get("TNDERIVE_PROGRESS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A progress line: `label k/total [elapsed<remaining] note`; on a terminal it is redrawn
    in place and erased when closed, elsewhere (when enabled) each advance prints a line."""

    def __init__(self, label: str, total: int | None = None, stream: TextIO | None = None):
        self.label = label
        self.total = total
        self.count = 0
        self.text = ""
        self.stream = stream or sys.stderr
        self.show = enabled(self.stream)
        self.inplace = self.show and bool(getattr(self.stream, "isatty", None) and self.stream.isatty())
        self.start = time.perf_counter()
        self._drawn = 0.0

    def __enter__(self) -> "Progress":
        _open.append(self)
        self._draw(force=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """The progress line as it is drawn."""
        elapsed = time.perf_counter() - self.start
        if self.total:
            eta = ""
            if 0 < self.count < self.total:
                eta = "<" + _duration(elapsed / self.count * (self.total - self.count))
            head = f"{self.label} {self.count}/{self.total} [{_duration(elapsed)}{eta}]"
        else:
            head = f"{self.label} [{_duration(elapsed)}]"
        return f"{head} {self.text}".rstrip()

    def advance(self, n: int = 1, note: str | None = None) -> None:
        """Count `n` more done (and show `note`)."""
        self.count += n
        if note is not None:
            self.text = note
        self._draw()

    def note(self, text: str) -> None:
        """Show `text` after the counter (redrawn on a terminal only)."""
        self.text = text
        if self.inplace:
            self._draw()

    def close(self) -> None:
        if self in _open:
            _open.remove(self)
        self.erase()

    def erase(self) -> None:
        """Remove the line from the terminal (it comes back at the next update)."""
        if self.inplace:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.show or (_open and _open[-1] is not self):
            return
        now = time.perf_counter()
        done = self.total is not None and self.count >= self.total
        wait = REDRAW_SECONDS if self.inplace else LOG_SECONDS
        if not force and not done and now - self._drawn < wait:
            return
        self._drawn = now
        if self.inplace:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\x1b[K" + self.line()[:width])
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()


def progress(label: str, total: int | None = None) -> Progress:
    """A progress line for a `with` block (see the module docstring)."""
    return Progress(label, total)


def track(items: Iterable[T], label: str, total: int | None = None,
          name: Callable[[T], str] | None = None) -> Iterator[T]:
    """Yield `items`, advancing a progress line after each (noted with `name(item)` if given)."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    with Progress(label, total) as bar:
        for item in items:
            if name is not None:
                bar.note(name(item))
            yield item
            bar.advance()


def note(text: str) -> None:
    """Show `text` on the innermost open progress line, if any."""
    if _open:
        _open[-1].note(text)


def echo(text: str = "", file: TextIO | None = None) -> None:
    """`print(text, file=file or stdout)`, with the open progress line erased first and drawn
    again after it, so the two do not mix on one terminal."""
    bar = _open[-1] if _open else None
    if bar is not None:
        bar.erase()
    print(text, file=file or sys.stdout, flush=True)
    if bar is not None:
        bar._draw(force=True)
