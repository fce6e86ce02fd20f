"""`tnderive demo`: every showcase item derives, draws, compiles and verifies (fast sizes)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests import background
from tnderive import demo
from tnderive.cli import main
from tnderive.draw import NO_DOT_WARNING, dot_available

needs_dot = pytest.mark.skipif(not dot_available(),
                               reason="needs Graphviz's dot program (apt-get install graphviz)")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out, fast=True)


@needs_dot
def test_every_item_ok(demo_run):
    out, outcomes = demo_run
    assert [o.key for o in outcomes] == [s.key for s in demo.SHOWCASES]
    assert {"attention", "conv-kfac", "mlp-hessian", "bilinear-kfac"} <= {o.key for o in outcomes}
    for o in outcomes:
        assert o.status == "ok", (o.key, o.status, o.note)
        assert o.max_err is not None and o.max_err < 1e-9
        assert o.terms and o.cost
        assert any(f.endswith(".svg") for f in o.files), o.key
        assert any(f.endswith(".py") for f in o.files), o.key
        for f in o.files:
            assert (out / f).is_file(), f


def test_summary_written(demo_run):
    out, outcomes = demo_run
    text = (out / "summary.md").read_text(encoding="utf-8")
    for o in outcomes:
        assert o.what in text
    table = demo.format_table(outcomes)
    for col in ("what", "terms", "cost", "max rel err", "time"):
        assert col in table


def test_generated_code_is_standalone(demo_run):
    out, _ = demo_run
    for py in out.rglob("*.py"):
        src = py.read_text(encoding="utf-8")
        assert "import torch" in src
        assert "tnderive" not in [l.split()[1].split(".")[0] for l in src.splitlines()
                                   if l.startswith(("import ", "from "))], py


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    assert main(["demo", "--fast", "--only", "bilinear-kfac", "-o", str(tmp_path / "ok")]) == 0
    assert "bilinear" in capsys.readouterr().out

    def missing(art, fast):
        raise ModuleNotFoundError("No module named 'tnderive.nothing'", name="tnderive.nothing")

    def failing(art, fast):
        art.check("a check that fails", 1.0)

    def broken(art, fast):
        from tnderive.derive import no_such_function  # noqa: F401

    # a module of ours that cannot be imported is a failure, never "unavailable"
    for key, run in (("missing", missing), ("bad", failing), ("broken", broken)):
        monkeypatch.setattr(demo, "SHOWCASES", [demo.Showcase(key, f"item {key}", run)])
        assert main(["demo", "-o", str(tmp_path / key)]) == 1, key
        out = capsys.readouterr().out
        assert ("FAILED" if key == "bad" else "error") in out and "unavailable" not in out
    assert not hasattr(demo, "_missing_feature")


def _path_without_dot(tmp_path: Path) -> str:
    """PATH with every folder that holds `dot` replaced by a copy of its links, minus `dot`."""
    folders = []
    for k, folder in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not folder or not (Path(folder) / "dot").exists():
            folders.append(folder)
            continue
        shadow = tmp_path / f"bin{k}"
        shadow.mkdir()
        for entry in Path(folder).iterdir():
            if entry.name != "dot" and not entry.name.startswith("dot"):
                (shadow / entry.name).symlink_to(entry)
        folders.append(str(shadow))
    return os.pathsep.join(folders)


def _demo_without_dot(folder: Path) -> tuple[list[str], dict]:
    env = {**os.environ, "PATH": _path_without_dot(folder)}
    return ([sys.executable, "-m", "tnderive", "demo", "--fast", "--only", "mlp-hessian",
             "--only", "bilinear-kfac", "-o", str(folder / "demo")], {"env": env})


#: a fresh process; it starts in the background when collection ends (tests/background.py)
WITHOUT_DOT = background.register("test_demo.py::test_without_graphviz_the_demo_skips_diagrams",
                                  _demo_without_dot)


def test_without_graphviz_the_demo_skips_diagrams():
    """No `dot` on PATH: one warning line, every item ok, no diagrams, exit code 0."""
    proc, folder = WITHOUT_DOT.result()
    assert shutil.which("dot", path=WITHOUT_DOT.kwargs["env"]["PATH"]) is None
    out = folder / "demo"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count(NO_DOT_WARNING) == 1, proc.stderr
    assert "error" not in proc.stdout and "FAILED" not in proc.stdout
    assert not list(out.rglob("*.svg"))
    assert list(out.rglob("*.py")) and (out / "summary.md").is_file()


def test_unknown_item_is_an_error(tmp_path):
    from tnderive.errors import TNError

    with pytest.raises(TNError, match="nope"):
        demo.run_demo(tmp_path, only=["nope"])
