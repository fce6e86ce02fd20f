"""Subprocess checks started early, in the background, so that they overlap the rest of the run.

The suite runs in one process (one core); the end-to-end checks that need a fresh interpreter
(the README's Python blocks, the demo without Graphviz, the gallery under another hash seed)
mostly wait on their subprocess. `conftest.py` starts the collected ones, one after another in a
background thread, when collection ends (not under pytest-xdist, whose workers share the cores
already). A test calls `Job.result()`: it waits for its job, or runs it now when nothing started
it (a test run on its own). The assertions stay in the tests.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

#: test node id suffix -> job, registered by the test modules at import
JOBS: dict[str, "Job"] = {}

#: the last line of a job's Python code: every object to the permanent generation, so that the
#: interpreter's exit skips its full garbage collections over torch's heap (0.5-0.9 s a process)
QUICK_EXIT = "import gc; gc.freeze()"


class Job:
    """One subprocess: `prepare(folder)` returns (argv, keyword arguments of subprocess.Popen);
    stdout and stderr go to files (no pipes to drain), read back as text by `result()`."""

    def __init__(self, prepare: Callable[[Path], tuple[list[str], dict]], timeout: float = 600):
        self.prepare, self.timeout = prepare, timeout
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None

    def start(self) -> None:
        with self.lock:
            if self.proc is not None:
                return
            self.folder = Path(tempfile.mkdtemp(prefix="tnderive-bg-"))
            argv, kwargs = self.prepare(self.folder)
            self._out = open(self.folder / "stdout.txt", "w+", encoding="utf-8")
            self._err = open(self.folder / "stderr.txt", "w+", encoding="utf-8")
            self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, text=True, **kwargs)
            self.argv, self.kwargs = argv, kwargs

    def wait(self) -> None:
        self.start()
        self.proc.wait(timeout=self.timeout)

    def result(self) -> tuple[subprocess.CompletedProcess, Path]:
        """The finished process (returncode, stdout, stderr) and the folder it ran with."""
        try:
            self.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        texts = []
        for f in (self._out, self._err):
            f.flush()
            f.seek(0)
            texts.append(f.read())
        return subprocess.CompletedProcess(self.argv, self.proc.returncode, *texts), self.folder

    def stop(self) -> None:
        """Kill an unfinished process, close the files and remove the folder."""
        with self.lock:
            if self.proc is None:
                return
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._out.close()
            self._err.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            self.proc = None


def register(test_name: str, prepare: Callable[[Path], tuple[list[str], dict]], timeout: float = 600) -> Job:
    """The job of the test whose node id ends with `test_name` ("test_file.py::test_x")."""
    job = JOBS.setdefault(test_name, Job(prepare, timeout))
    return job


def start_in_background(node_ids: list[str]) -> threading.Thread | None:
    """Run the jobs of the collected tests one after another in a daemon thread."""
    jobs = [job for name, job in JOBS.items() if any(n.endswith(name) for n in node_ids)]
    if not jobs:
        return None

    def run() -> None:
        for job in jobs:
            try:
                job.wait()
            except (subprocess.SubprocessError, OSError):  # the test reports it (result() waits again)
                pass

    thread = threading.Thread(target=run, name="tnderive-background-checks", daemon=True)
    thread.start()
    return thread


def stop_all() -> None:
    for job in JOBS.values():
        job.stop()
