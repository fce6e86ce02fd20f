"""The `tnderive` command: flags, paths, --verify/--reference, errors as one line + exit 2."""
from __future__ import annotations

import argparse
import io
import re
import shutil
import sys
import textwrap

import pytest
import torch

import tnderive
from tnderive import progress
from tnderive.cli import build_parser, main

LOSS = "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)"
HAS_DOT = shutil.which("dot") is not None


def run(argv, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tnderive: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def subparsers(parser: argparse.ArgumentParser):
    """(name, parser) for the command and every sub-command."""
    yield "tnderive", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub


# --------------------------------------------------------------------------------------------
# one vocabulary
# --------------------------------------------------------------------------------------------

def test_every_flag_of_every_command_has_help():
    for name, parser in subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help"


def test_outputs_are_dash_o_everywhere():
    for name, parser in subparsers(build_parser()):
        outputs = [a for a in parser._actions if "--output" in a.option_strings]
        writes = name in ("demo", "draw", "codegen", "kfac", "hessian-blocks", "gallery")
        assert bool(outputs) == writes, name
        for a in outputs:
            assert a.option_strings[:2] == ["-o", "--output"], name
        assert not [a for a in parser._actions if a.help != argparse.SUPPRESS
                    and "--out" in a.option_strings], name
    args = build_parser().parse_args(["gallery", "--out", "somewhere"])  # the former name
    assert args.output == "somewhere"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"tnderive {tnderive.__version__}"


def test_steps_prints_steps_in_derive_and_codegen(capsys):
    code, out, _ = run(["derive", "q = x[i]*A[i,j]*x[j]", "--wrt", "x", "--wrt", "x", "--steps"],
                       capsys)
    assert code == 0 and "simplification steps" in out and "# step 1: " in out
    code, out, _ = run(["codegen", "q = x[i]*A[i,j]*x[j]", "--wrt", "x", "--steps"], capsys)
    assert code == 0 and "#   " in out


def test_one_loss_syntax(capsys, tmp_path):
    for argv in (["kfac", "y[n,o] = W[o,i]*x[n,i]", "--loss", "mse:median"],
                 ["hessian-blocks", "--seq", "3", "--loss", "mse:median", "-o", tmp_path]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, "--loss", "'median'", ":sum or :mean")
    for argv in (["kfac", "y[n,o] = W[o,i]*x[n,i]", "--loss", "hinge"],
                 ["hessian-blocks", "--seq", "3", "--loss", "bce", "-o", tmp_path]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, "--loss", "unknown loss")
    code, out, _ = run(["kfac", "y[n,o] = W[o,i]*x[n,i]", "--loss", "ce:mean"], capsys)
    assert code == 0 and "A (input side)" in out


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["model.tn", "examples/missing_model.tn", "some/dir/layer.txt"])
def test_a_missing_file_is_no_such_file_not_a_syntax_error(capsys, arg):
    for command in (["derive", arg, "--wrt", "W"], ["draw", arg, "-o", "x.svg"], ["eval", arg],
                    ["codegen", arg], ["kfac", arg]):
        code, _, err = run(command, capsys)
        assert_one_line_error(code, err, "no such file", arg)


def test_notation_with_division_is_not_a_path(capsys):
    code, out, _ = run(["eval", "loss = sum(x[i]*x[i])/2", "--sizes", "i=2"], capsys)
    assert code == 0 and "shape ()" in out


def test_a_folder_as_expression(capsys, tmp_path):
    code, _, err = run(["derive", str(tmp_path) + "/", "--wrt", "W"], capsys)
    assert_one_line_error(code, err, "is a folder")


def test_notation_file(capsys, tmp_path):
    path = tmp_path / "layer.tn"
    path.write_text("y[n,o] = W[o,i]*x[n,i]\n")
    code, out, _ = run(["eval", path, "--sizes", "n=2,o=3,i=4"], capsys)
    assert code == 0 and "shape (2, 3)" in out


def test_output_folders_are_created(capsys, tmp_path):
    target = tmp_path / "new" / "deeper" / "hess.py"
    code, _, _ = run(["codegen", LOSS, "--wrt", "W", "--wrt", "W", "-o", target], capsys)
    assert code == 0 and target.is_file()
    target = tmp_path / "k" / "kfac.py"
    code, _, _ = run(["kfac", "y[n,o] = W[o,i]*x[n,i]", "-o", target], capsys)
    assert code == 0 and target.is_file()


@pytest.mark.skipif(not HAS_DOT, reason="needs Graphviz's dot")
def test_drawings_create_their_folders(capsys, tmp_path):
    code, _, _ = run(["draw", "z[n,o] = W[o,i]*x[n,i]", "-o", tmp_path / "d" / "m.svg"], capsys)
    assert code == 0 and (tmp_path / "d" / "m.svg").is_file()
    code, _, _ = run(["derive", "q = x[i]*A[i,j]*x[j]", "--wrt", "x", "--draw",
                      tmp_path / "e" / "h.svg", "--draw-steps", tmp_path / "f" / "s.svg"], capsys)
    assert code == 0 and (tmp_path / "e" / "h.svg").is_file() and (tmp_path / "f" / "s.svg").is_file()


def test_a_file_where_a_folder_is_needed(capsys, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for argv in (["demo", "--fast", "-o", blocker],
                 ["hessian-blocks", "--seq", "3", "-o", blocker],
                 ["hessian-blocks", "--seq", "3", "-o", blocker / "sub"],
                 ["gallery", "--only", "01", "-o", blocker],
                 ["codegen", LOSS, "-o", blocker / "f.py"],
                 ["kfac", "y[n,o] = W[o,i]*x[n,i]", "-o", blocker / "k.py"],
                 ["draw", "z[n,o] = W[o,i]*x[n,i]", "-o", blocker / "m.svg"],
                 ["derive", LOSS, "--wrt", "W", "--draw", blocker / "m.svg"]):
        code, _, err = run(argv, capsys)
        assert_one_line_error(code, err, "file.txt", "is a file, expected a folder")
    code, _, err = run(["codegen", LOSS, "-o", tmp_path], capsys)
    assert_one_line_error(code, err, "is a folder, expected a file name")


def test_unreadable_tensor_file_is_one_line(capsys, tmp_path):
    code, _, err = run(["eval", "y[i] = x[i]", "--tensor", f"x={tmp_path / 'nope.pt'}"], capsys)
    assert_one_line_error(code, err, "nope.pt")


# --------------------------------------------------------------------------------------------
# --sizes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["derive", LOSS, "--wrt", "W"], ["eval", LOSS],
                                     ["codegen", LOSS], ["draw", LOSS, "-o", "x.svg"],
                                     ["kfac", "y[n,o] = W[o,i]*x[n,i]"]])
def test_a_sizes_entry_naming_no_index_is_an_error(capsys, command):
    code, _, err = run(command + ["--sizes", "n=2,q=3"], capsys)
    assert_one_line_error(code, err, "'q'", "i, n, o")


def test_sizes_apply(capsys):
    code, out, _ = run(["eval", "y[n,o] = W[o,i]*x[n,i]", "--sizes", "n=2,o=5,i=4"], capsys)
    assert code == 0 and "shape (2, 5)" in out


# --------------------------------------------------------------------------------------------
# --verify / --reference
# --------------------------------------------------------------------------------------------

REFERENCE = textwrap.dedent("""
    import torch

    def loss(W, x, y):
        return ((x @ W.T - y) ** 2).sum()

    def transposed(W, x, y):        # a different function: W used the other way round
        return ((x @ W - y) ** 2).sum()
""")


@pytest.fixture
def reference_file(tmp_path):
    path = tmp_path / "myref.py"
    path.write_text(REFERENCE)
    return path


def test_verify_without_reference_says_self_consistency(capsys):
    code, out, _ = run(["derive", LOSS, "--wrt", "W", "--wrt", "W", "--verify"], capsys)
    assert code == 0
    assert "# verify: dW/dW: shape" in out and "(ok, tol" in out
    assert "# verify: self-consistency only" in out


def test_verify_against_a_reference_file(capsys, reference_file):
    code, out, _ = run(["derive", LOSS, "--wrt", "W", "--wrt", "W", "--sizes", "o=3,i=3",
                        "--reference", f"{reference_file}:loss"], capsys)
    assert code == 0, out
    assert "value vs" in out and "dW/dW vs" in out and "self-consistency" not in out
    code, out, _ = run(["derive", LOSS, "--wrt", "W", "--sizes", "o=3,i=3", "--verify",
                        "--reference", f"{reference_file}:transposed"], capsys)
    assert code == 1
    assert "FAILED" in out and "differ" in out


def test_verify_against_a_module_in_the_current_folder(capsys, reference_file, monkeypatch):
    monkeypatch.chdir(reference_file.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    monkeypatch.delitem(sys.modules, "myref", raising=False)
    code, out, _ = run(["derive", LOSS, "--wrt", "W", "--reference", "myref:loss"], capsys)
    assert code == 0 and "value vs myref:loss" in out


def test_reference_errors_are_one_line(capsys, reference_file):
    for spec, words in ((f"{reference_file.parent / 'nope.py'}:loss", ("no such file",)),
                        ("tnderive_no_such_module:loss", ("cannot import module",)),
                        (f"{reference_file}:nothing", ("has no attribute",)),
                        ("noseparator", ("MODULE:FUNCTION",))):
        code, _, err = run(["derive", LOSS, "--wrt", "W", "--reference", spec], capsys)
        assert_one_line_error(code, err, *words)
    code, _, err = run(["derive", LOSS, "--wrt", "W", "--sizes", "o=3,i=4",
                        "--reference", f"{reference_file}:transposed"], capsys)
    assert_one_line_error(code, err, "failed on the expression's tensors", "W [3, 4]")


def test_reference_gradient_matches_torch(reference_file):
    """The derived gradient that --reference accepts is torch's gradient in float64."""
    expr = tnderive.parse(LOSS, sizes={"n": 4, "o": 3, "i": 3})
    g = tnderive.simplify(tnderive.grad(expr, "W"))
    t = {k: torch.randn(*s, dtype=torch.float64) for k, s in
         {"W": (3, 3), "x": (4, 3), "y": (4, 3)}.items()}
    W = t["W"].clone().requires_grad_()
    ((t["x"] @ W.T - t["y"]) ** 2).sum().backward()
    torch.testing.assert_close(tnderive.evaluate(g, **t), W.grad, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# progress
# --------------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_silent_off_a_terminal_and_with_quiet(capsys, monkeypatch):
    monkeypatch.delenv("TNDERIVE_PROGRESS", raising=False)
    with progress.progress("work", total=3) as bar:
        for _ in range(3):
            bar.advance(note="step")
    assert capsys.readouterr().err == ""
    with progress.setting(False):
        bar = progress.Progress("work", total=2, stream=Terminal())
        with bar:
            bar.advance()
        assert bar.stream.getvalue() == ""


def test_progress_on_a_terminal_redraws_one_line_and_erases_it(monkeypatch):
    monkeypatch.delenv("TNDERIVE_PROGRESS", raising=False)
    term = Terminal()
    with progress.Progress("σ-fit", total=2, stream=term) as bar:
        bar.advance(note="a")
        bar.advance(note="b")
    text = term.getvalue()
    assert "\n" not in text and "σ-fit 2/2" in text and text.endswith("\r\x1b[K")


def test_progress_enabled_off_a_terminal_writes_lines(monkeypatch):
    log = io.StringIO()
    monkeypatch.setenv("TNDERIVE_PROGRESS", "1")
    with progress.Progress("gallery", total=2, stream=log) as bar:
        bar.advance()
        bar.advance()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("gallery 0/2") and lines[-1].startswith("gallery 2/2")
    monkeypatch.setenv("TNDERIVE_PROGRESS", "0")
    assert not progress.enabled(Terminal())
    with progress.setting(True):
        assert progress.enabled(io.StringIO())


def test_echo_does_not_mix_with_a_bar(capsys, monkeypatch):
    monkeypatch.delenv("TNDERIVE_PROGRESS", raising=False)
    term = Terminal()
    with progress.Progress("demo", stream=term):
        progress.echo("a result line")
    assert capsys.readouterr().out == "a result line\n"
    assert term.getvalue().count("\r\x1b[K") >= 2


def test_sigma_fit_shows_progress(capsys):
    from tnderive.attention import fit_slopes, hessian_blocks
    from tnderive.nn.attention import self_attention

    model = self_attention(seq=3, d_model=2, d_k=2)
    blocks = hessian_blocks(model, params=("WV",), simplify=False)
    tensors = model.random_inputs(0)
    with progress.setting(True):
        slopes = fit_slopes(blocks, tensors, sigmas=(1e-3, 1e-2))
    err = capsys.readouterr().err
    total = re.search(r"σ-fit 0/(\d+)", err).group(1)
    assert f"σ-fit {total}/{total}" in err, err
    assert set(slopes) == {("WV", "WV")}
    fit_slopes(blocks, tensors, sigmas=(1e-3, 1e-2))
    assert capsys.readouterr().err == ""   # off a terminal: nothing


@pytest.mark.slow
def test_hessian_blocks_end_to_end(capsys, tmp_path, monkeypatch):
    """The `hessian-blocks` command, run once at the smallest sizes (it compiles 27 block
    parts): -q silences the progress that TNDERIVE_PROGRESS=1 turns on; --loss ce:sum is read;
    the nested output folder is created; the report has the V–V row; blocks.py runs alone."""
    monkeypatch.setenv("TNDERIVE_PROGRESS", "1")
    out_dir = tmp_path / "a" / "b"
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    code, out, err = run(["hessian-blocks", "--seq", "3", "--dmodel", "2", "--dk", "2", "-q",
                          "--loss", "ce:sum", "--no-slopes", "--no-simplify", "-o", out_dir],
                         capsys)
    assert code == 0 and "loss ce (sum)" in out
    # float64 and one thread only while the command runs: main() may run in a user's process
    assert (torch.get_default_dtype(), torch.get_num_threads()) == (dtype, threads)
    assert "hessian-blocks" not in err and "σ-fit" not in err
    assert "| V–V | functional | yes |" in (out_dir / "report.md").read_text()
    ns: dict = {}
    exec((out_dir / "blocks.py").read_text(), ns)
    assert "WQ_WQ_total" in ns
