"""`tnderive demo`: every showcase item derives, draws, compiles and verifies (fast sizes)."""
from __future__ import annotations

import runpy
import shutil
import sys
from pathlib import Path

import pytest

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


def test_without_graphviz_the_demo_skips_diagrams(tmp_path, monkeypatch, capsys):
    """No `dot` on PATH: one warning line, every item ok, no diagrams, exit code 0; run as
    `python -m tnderive demo ...` (the package's __main__)."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert shutil.which("dot") is None
    out = tmp_path / "demo"
    monkeypatch.setattr(sys, "argv", ["tnderive", "demo", "--fast", "--only", "mlp-hessian",
                                      "--only", "bilinear-kfac", "-o", str(out)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("tnderive", run_name="__main__", alter_sys=True)
    captured = capsys.readouterr()
    assert exit_.value.code == 0, captured.out + captured.err
    assert captured.err.count(NO_DOT_WARNING) == 1, captured.err
    assert "error" not in captured.out and "FAILED" not in captured.out
    assert not list(out.rglob("*.svg"))
    assert list(out.rglob("*.py")) and (out / "summary.md").is_file()


def test_unknown_item_is_an_error(tmp_path):
    from tnderive.errors import TNError

    with pytest.raises(TNError, match="nope"):
        demo.run_demo(tmp_path, only=["nope"])
