"""`tnderive demo`: every showcase item derives, draws, compiles and verifies (fast sizes)."""
from __future__ import annotations

import pytest

from tnderive import demo
from tnderive.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run_demo(out, fast=True)


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

    monkeypatch.setattr(demo, "SHOWCASES", [demo.Showcase("missing", "a missing feature", missing)])
    assert main(["demo", "-o", str(tmp_path / "na")]) == 0
    assert "unavailable" in capsys.readouterr().out
    monkeypatch.setattr(demo, "SHOWCASES", [demo.Showcase("bad", "a failing check", failing)])
    assert main(["demo", "-o", str(tmp_path / "bad")]) == 1
    assert "FAILED" in capsys.readouterr().out

    def broken(art, fast):
        from tnderive.derive import no_such_function  # noqa: F401  (an API change, not a missing feature)

    monkeypatch.setattr(demo, "SHOWCASES", [demo.Showcase("missing", "a missing feature", missing),
                                            demo.Showcase("broken", "a broken item", broken)])
    assert main(["demo", "-o", str(tmp_path / "broken")]) == 1
    out = capsys.readouterr().out
    assert "unavailable" in out and "error" in out


def test_unknown_item_is_an_error(tmp_path):
    from tnderive.errors import TNError

    with pytest.raises(TNError, match="nope"):
        demo.run_demo(tmp_path, only=["nope"])
