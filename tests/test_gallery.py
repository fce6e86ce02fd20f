"""The gallery: every example runs (fast mode, into a tmp dir), writes its files and passes its
numerical checks; regenerating is deterministic (byte-identical, also across processes)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gallery  # noqa: E402
from tests import background  # noqa: E402
from tnderive.draw import NO_DOT_WARNING, dot_available  # noqa: E402

EXAMPLES = gallery.examples()
HAS_DOT = dot_available()
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="needs Graphviz's dot program (apt-get install graphviz)")


def test_at_least_ten_examples():
    assert len(EXAMPLES) >= 10
    for path in EXAMPLES:
        module = gallery.load(path)
        assert callable(module.main) and module.TITLE and module.__doc__
        assert 'if __name__ == "__main__"' in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_verifies(path, tmp_path):
    module = gallery.load(path)
    art = module.main(tmp_path / path.stem, fast=True)
    assert art.checks, "every example verifies what it derives"
    bad = [f"{c.what}: {c.max_rel_err:.2e}" for c in art.checks if not c.ok]
    assert not bad, bad
    out = tmp_path / path.stem
    for name in art.files:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "README.md").is_file()
    if HAS_DOT:
        assert list(out.glob("*.svg")), "every example draws at least one diagram"
    for name, _ in art.images:
        assert f"]({name})" in (out / "README.md").read_text(encoding="utf-8")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


DETERMINISM_EXAMPLE = next(p for p in EXAMPLES if p.stem.startswith("09"))


def _example_in_a_fresh_process(folder: Path) -> tuple[list[str], dict]:
    """The example into `folder/c`, in a fresh process under another hash seed."""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import gallery; "
            f"gallery.load(gallery.examples()[{EXAMPLES.index(DETERMINISM_EXAMPLE)}])"
            f".main({str(folder / 'c')!r}, fast=True); {background.QUICK_EXIT}")
    return [sys.executable, "-c", code], {"env": env, "cwd": str(folder)}


if HAS_DOT:  # a fresh process; it starts in the background when collection ends (tests/background.py)
    FRESH_PROCESS = background.register("test_gallery.py::test_regeneration_is_deterministic",
                                        _example_in_a_fresh_process, timeout=300)


@pytest.mark.slow
@needs_dot
def test_regeneration_is_deterministic(tmp_path):
    """The same example twice in this process and once in a fresh one (another hash seed)."""
    module = gallery.load(DETERMINISM_EXAMPLE)
    module.main(tmp_path / "a", fast=True)
    module.main(tmp_path / "b", fast=True)
    proc, folder = FRESH_PROCESS.result()
    assert proc.returncode == 0, proc.stderr[-6000:]
    a, b, c = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b"), _snapshot(folder / "c")
    assert a and a == b
    assert a == c


def test_index_links_every_example(tmp_path):
    for path in EXAMPLES[:2]:
        gallery.load(path).main(tmp_path / path.stem, fast=True)
    index = gallery.write_index(gallery.ROOT, tmp_path).read_text(encoding="utf-8")
    for path in EXAMPLES:
        assert f"({path.name})" in index
    assert f"]({EXAMPLES[0].stem}/" in index  # pictures inline


def test_checked_in_index_lists_every_example():
    index = (gallery.ROOT / "README.md").read_text(encoding="utf-8")
    for path in EXAMPLES:
        assert f"({path.stem}/README.md)" in index
        assert (gallery.ROOT / path.stem / "README.md").is_file()


@needs_dot
def test_cli_finds_the_gallery(tmp_path, capsys):
    from tnderive.cli import main
    from tnderive.commands.gallery import find_gallery

    assert find_gallery(ROOT) == gallery.ROOT
    assert main(["gallery", "--list"]) == 0
    assert "09_derivation_trace" in capsys.readouterr().out
    assert main(["gallery", "--only", "09", "--fast", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "09_derivation_trace" / "trace.svg").is_file()


def test_without_graphviz_diagrams_are_skipped(tmp_path, monkeypatch, capsys):
    """No `dot` on PATH: one warning line, the examples still run and verify, no SVGs."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    results = gallery.run(["01", "09"], fast=True, outroot=tmp_path, quiet=True)
    assert [stem for stem, _, _ in results] == ["01_linear_regression", "09_derivation_trace"]
    for stem, art, _ in results:
        assert not isinstance(art, Exception) and art.ok, (stem, art)
    err = capsys.readouterr().err
    assert err.count(NO_DOT_WARNING) == 1, err
    for stem in ("01_linear_regression", "09_derivation_trace"):
        assert (tmp_path / stem / "README.md").is_file()
        assert not list((tmp_path / stem).glob("*.svg"))


def test_output_blocked_by_a_file_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert gallery.main(["--only", "01", "--fast", "-o", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, expected a folder" in err[0]
