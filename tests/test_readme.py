"""The README runs as written.

* Every ```python block runs, top to bottom, in one namespace (in a scratch folder). A block
  that must not run (an excerpt, illustrative output) is fenced as ```python no-run.
* The generated-code excerpt (the no-run block that starts with `def hessian_WW`) matches what
  `tnderive codegen` writes today: its lines, `...` elisions aside, appear in order.
* The shell commands that use the shipped example files (`examples/*.tn`) run.
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tnderive.cli import main
from tnderive.draw import dot_available

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)

needs_dot = pytest.mark.skipif(not dot_available(),
                               reason="the README draws diagrams: needs Graphviz's dot program")


def blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, code) of every fenced block, in order."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2))
            for m in FENCE.finditer(text)]


def python_blocks(text: str, run: bool = True) -> list[tuple[int, str]]:
    """The ```python blocks that run (`run=True`) or the ```python no-run ones."""
    out = []
    for line, info, code in blocks(text):
        words = info.split()
        if words[:1] == ["python"] and ("no-run" in words[1:]) != run:
            out.append((line, code))
    return out


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """A scratch working directory with the shipped examples/ in it."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_blocks_are_found():
    text = README.read_text(encoding="utf-8")
    assert len(python_blocks(text)) >= 10
    assert [c for _, c in python_blocks(text, run=False) if c.lstrip().startswith("def hessian_WW")]
    assert not [info for _, info, _ in blocks(text) if info.startswith("py ")], "write ```python"


def run_python_blocks(readme: Path = README) -> int:
    """Run the README's ```python blocks in order in one namespace and return 0; the first
    failure propagates with a note naming its block (the traceback has README line numbers)."""
    namespace: dict = {"__name__": "__readme__"}
    for line, code in python_blocks(readme.read_text(encoding="utf-8")):
        try:
            exec(compile("\n" * line + code, str(readme), "exec"), namespace)
        except BaseException as error:  # name the block, then re-raise
            error.add_note(f"the ```python block at {readme.name}:{line} fails")
            raise
    return 0


def _python_blocks_job(folder: Path) -> tuple[list[str], dict]:
    """`python3 tests/test_readme.py README.md` in a scratch folder with the shipped examples/."""
    scratch = folder / "scratch"
    scratch.mkdir()
    shutil.copytree(ROOT / "examples", scratch / "examples")
    return [sys.executable, str(Path(__file__).resolve()), str(README)], {"cwd": scratch}


if __name__ != "__main__" and dot_available():  # as a test module (the script only runs blocks)
    from tests import background

    PYTHON_BLOCKS = background.register("test_readme.py::test_python_blocks_run_top_to_bottom",
                                        _python_blocks_job)


@pytest.mark.slow
@needs_dot
def test_python_blocks_run_top_to_bottom():
    """In a fresh process (as a reader runs them: no test settings such as the default dtype).
    The process starts in the background when collection ends (tests/background.py)."""
    proc, _ = PYTHON_BLOCKS.result()
    assert proc.returncode == 0, proc.stderr[-6000:]


def _excerpt() -> str:
    [code] = [c for _, c in python_blocks(README.read_text(encoding="utf-8"), run=False)
              if c.lstrip().startswith("def hessian_WW")]
    return code


def _excerpt_command() -> list[str]:
    """The `tnderive codegen ...` command the README gives for the excerpt."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"\(`(tnderive codegen [^`]*--name hessian_WW[^`]*)`", text)
    assert m, "the README names the command that generates the excerpt"
    return shlex.split(m.group(1))


def _code_line(line: str) -> str:
    """A line of code without its trailing comment and spacing (comments carry costs)."""
    return line.split("  #")[0].strip()


def test_generated_code_excerpt_matches_todays_output(scratch):
    argv = _excerpt_command()
    assert main([*argv[1:], "-o", "excerpt.py"]) == 0
    generated = [_code_line(l) for l in (scratch / "excerpt.py").read_text(encoding="utf-8").splitlines()]
    position = 0
    for line in _excerpt().splitlines():
        code = _code_line(line)
        if not code or code.startswith(("...", '"""')):
            continue  # an elision, or the elided docstring
        assert code in generated[position:], (
            f"README excerpt line {line.strip()!r} is not in today's generated code (in order):\n"
            + "\n".join(generated))
        position = generated.index(code, position) + 1


def test_demo_output_shown_has_todays_format():
    """The README's `tnderive demo` output: today's table columns and closing line."""
    from tnderive import demo

    [shown] = [c for _, info, c in blocks(README.read_text(encoding="utf-8"))
               if c.startswith("tnderive demo: ")]
    lines = shown.splitlines()
    header = demo.format_table([]).splitlines()[0].split()
    assert header in [l.split() for l in lines], lines
    assert re.fullmatch(r"\d+ ok, 0 failed in [\d.]+ s; summary: \S+", lines[-1]), lines[-1]
    assert [l.split()[0] for l in lines if l.startswith("[")] == [
        f"[{k}/{len(demo.SHOWCASES)}]" for k in range(1, len(demo.SHOWCASES) + 1)]


def example_commands(text: str) -> list[str]:
    """Shell lines of the README that use the shipped examples (and the lines before them in
    the same block that make their inputs, `python3 -c ...`)."""
    out = []
    for _, info, code in blocks(text):
        if info.split()[:1] not in ([], ["bash"], ["sh"]) or "examples/" not in code:
            continue
        for line in code.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("python3 -c ") or (line.startswith("tnderive ") and "examples/" in line):
                out.append(line)
    return out


def test_example_files_ship_and_the_readme_uses_them():
    text = README.read_text(encoding="utf-8")
    for name in ("model.tn", "layer.tn"):
        assert (ROOT / "examples" / name).is_file()
        assert f"examples/{name}" in text
        for line, _, code in blocks(text):
            assert not re.search(rf"(?<![/\w]){re.escape(name)}", code), (
                f"the code block at README.md:{line} uses {name} without its folder examples/")


def test_example_commands_run(scratch):
    """In this process (`tnderive.cli.main`; `python3 -c CODE` runs CODE): no start-up costs.
    Also the commands that examples/README.md suggests."""
    commands = example_commands(README.read_text(encoding="utf-8"))
    assert len([c for c in commands if c.startswith("tnderive ")]) >= 3
    commands += re.findall(r"`(tnderive [^`]+)`", (ROOT / "examples" / "README.md").read_text(encoding="utf-8"))
    for command in commands:
        argv = shlex.split(command)
        if any(a.endswith((".svg", ".png")) for a in argv) and not dot_available():
            continue  # drawing needs Graphviz
        if argv[0] == "tnderive":
            assert main(argv[1:]) == 0, command
            if "-o" in argv:
                assert (scratch / argv[argv.index("-o") + 1]).is_file(), command
        else:
            assert argv[:2] == ["python3", "-c"], command
            exec(compile(argv[2], command, "exec"), {})


if __name__ == "__main__":  # python3 tests/test_readme.py [README.md]: run the Python blocks
    status = run_python_blocks(Path(sys.argv[1]) if len(sys.argv) > 1 else README)
    import gc

    gc.freeze()  # a quick exit (tests/background.py, QUICK_EXIT)
    sys.exit(status)
