"""Public names: functions that share a submodule's name stay functions, `tnderive.nn` exports
its layer builders, and importing tnderive registers the built-in constant kinds."""
from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

import tnderive
from tests import background


@pytest.mark.parametrize("name", ["simplify", "verify", "draw", "codegen", "kfac"])
def test_function_named_like_its_module_stays_the_function(name):
    module = importlib.import_module(f"tnderive.{name}")  # importing the submodule again
    function = getattr(tnderive, name)
    assert callable(function) and not isinstance(function, type(sys))
    assert function is getattr(module, name)


def test_kfac_and_simplify_are_plain_modules():
    for name in ("tnderive.kfac", "tnderive.simplify"):
        module = sys.modules[name] if name in sys.modules else importlib.import_module(name)
        assert type(module) is type(sys)  # no callable-module class swapped in


@pytest.mark.parametrize("name,module", [
    ("self_attention", "tnderive.nn.attention"),
    ("conv_network", "tnderive.nn.conv"),
    ("conv_transpose_network", "tnderive.nn.conv"),
    ("unfold_network", "tnderive.nn.conv"),
    ("fold_network", "tnderive.nn.conv"),
])
def test_nn_exports_layer_builders(name, module):
    assert getattr(tnderive.nn, name) is getattr(importlib.import_module(module), name)
    assert name in tnderive.nn.__all__ and name in dir(tnderive.nn)


def test_nn_functional_and_unknown_name():
    from tnderive.nn import functional

    assert tnderive.nn.functional is functional is importlib.import_module("tnderive.nn.functional")
    with pytest.raises(AttributeError, match="no_such_layer"):
        tnderive.nn.no_such_layer  # noqa: B018


def test_nn_self_attention_builds_a_layer():
    layer = tnderive.nn.self_attention(4, 3, 2)
    assert set(layer.params) >= {"WQ", "WK", "WV"}


#: in a fresh process; it starts in the background when collection ends (tests/background.py)
FRESH_IMPORT = background.register(
    "test_exports.py::test_importing_tnderive_registers_the_built_in_constant_kinds",
    lambda folder: _fresh_import_job(), timeout=120)


def _fresh_import_job() -> tuple[list[str], dict]:
    code = textwrap.dedent("""
        import torch
        import tnderive
        from tnderive.constants import get_kind
        from tnderive.ir import Constant
        # pattern: Pi[k,o,i] = 1 iff i = S*o + D*k - P_left (S=2, P=1, D=1), shape [K, O, I]
        pi = tnderive.evaluate(Constant("pattern", (2, 1, 1, 1), ("k", "o", "i"), (3, 2, 4)))
        want = torch.zeros(3, 2, 4)
        for k in range(3):
            for o in range(2):
                i = 2 * o + k - 1
                if 0 <= i < 4:
                    want[k, o, i] = 1
        assert torch.equal(pi.to(want.dtype), want), pi
        mask = tnderive.evaluate(Constant("causal_tril", (), ("q", "k"), (3, 3)))
        assert torch.equal(mask, torch.ones(3, 3, dtype=mask.dtype).tril())
        assert "def build_window" in get_kind("window").source
        print("ok")
    """)
    return [sys.executable, "-c", code + background.QUICK_EXIT], {}


@pytest.mark.slow
def test_importing_tnderive_registers_the_built_in_constant_kinds():
    """A constant evaluates (and has generated-code source) right after `import tnderive`:
    the modules defining the built-in kinds are imported with the package."""
    out, _ = FRESH_IMPORT.result()
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unknown_constant_kind_is_a_tnerror():
    from tnderive.ir import Constant

    with pytest.raises(tnderive.TNError, match="no_such_kind.*known: .*pattern"):
        tnderive.evaluate(Constant("no_such_kind", (), ("i",), (2,)))
