"""Constant kinds (`tnderive.constants`): one `ConstantKind` per kind — its builder serves
evaluation and, as source, generated code; its caption serves drawings; lookups of unknown
kinds are TNErrors; built tensors live in a bounded cache."""
from __future__ import annotations

import pytest
import torch

from tnderive import TNError, codegen, evaluate
from tnderive import constants
from tnderive.constants import ConstantKind, ViewLowering, get_kind, register
from tnderive.ir import Constant, Product, Variable, size_symbol

BUILT_IN = ("causal_mask", "causal_tril", "pattern", "pattern_sum", "split", "window")


def build_test_eye(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    """Identity [n, n] times params[0] (a module-level, torch-only builder)."""
    return _scaled(torch.eye(shape[0], device=device, dtype=dtype), params[0])


def _scaled(t: torch.Tensor, factor) -> torch.Tensor:
    return t * factor


_not_torch = {"factor": 2.0}


def build_uses_a_global(params: tuple, shape: tuple, device, dtype) -> torch.Tensor:
    return torch.ones(shape, device=device, dtype=dtype) * _not_torch["factor"]


@pytest.fixture
def eye_kind():
    kind = register(ConstantKind("test_eye", build_test_eye, helpers=(_scaled,), symbol="I"))
    yield kind
    constants._KINDS.pop("test_eye")


def _eye_product(scale: float = 3.0) -> Product:
    n = size_symbol("i")
    return Product((Constant("test_eye", (scale,), "ij", [n, n]),
                    Variable("B", "jk", shape=[n, size_symbol("k")])), "ik")


def test_importing_tnderive_registers_the_built_in_kinds():
    assert set(BUILT_IN) <= set(constants.known_kinds())


def test_unknown_kind_is_a_tnerror_listing_the_known():
    with pytest.raises(TNError, match=r"no_such_kind.*known: .*causal_mask.*pattern"):
        get_kind("no_such_kind")
    with pytest.raises(TNError, match="no_such_kind"):
        codegen(Product((Constant("no_such_kind", (), "i", [3]), Variable("y", "i", shape=[3])), ()))


@pytest.mark.parametrize("name", BUILT_IN)
def test_built_in_source_defines_the_same_builder(name):
    """The generated-code builder is the registered one, read back (not a second copy)."""
    kind = get_kind(name)
    namespace = {"torch": torch, "TNError": TNError}
    exec(kind.source, namespace)
    shape = {"pattern": (3, 4, 8), "pattern_sum": (3, 8), "split": (6, 2, 3),
             "window": (3, 7)}.get(name, (4, 4))
    params = {"pattern": (2, 1, 1, 1), "pattern_sum": (2, 1, 1, 1), "window": (2,)}.get(name, ())
    rebuilt = namespace[kind.build.__name__](params, shape, torch.device("cpu"), torch.float64)
    assert torch.equal(rebuilt, kind.tensor(params, shape, "cpu", torch.float64))


def test_one_builder_serves_evaluation_and_generated_code(eye_kind):
    expr = _eye_product()
    tensors = {"B": torch.randn(4, 5, dtype=torch.float64)}
    module: dict = {}
    exec(codegen(expr, "f"), module)
    torch.testing.assert_close(module["f"](**tensors), 3.0 * tensors["B"])
    torch.testing.assert_close(evaluate(expr, **tensors), 3.0 * tensors["B"])
    assert "def _test_eye_scaled" in codegen(expr, "f")  # the helper travels with the builder


def test_generated_constant_cache_is_per_binding_and_bounded(eye_kind):
    module: dict = {}
    exec(codegen(_eye_product(), "f"), module)
    module["f"](B=torch.randn(4, 5, dtype=torch.float32))
    module["f"](B=torch.randn(4, 5, dtype=torch.float32))
    assert len(module["_CONSTANTS"]) == 1  # built once per (sizes, device, dtype)
    module["f"](B=torch.randn(4, 5, dtype=torch.float64))
    assert len(module["_CONSTANTS"]) == 2
    for n in range(module["_CONSTANTS_KEPT"] + 3):
        module["f"](B=torch.randn(n + 1, 2))
    assert len(module["_CONSTANTS"]) == module["_CONSTANTS_KEPT"]


@pytest.mark.parametrize("builder,match", [
    (build_uses_a_global, "_not_torch"),
    (lambda params, shape, device, dtype: torch.ones(shape), "lambda"),
])
def test_builder_without_torch_only_source_is_a_tnerror_at_codegen(builder, match):
    register(ConstantKind("test_nosrc", builder))
    try:
        expr = Product((Constant("test_nosrc", (), "i", [3]), Variable("y", "i", shape=[3])), ())
        assert evaluate(expr, y=torch.ones(3)).shape == ()  # evaluation needs no source
        with pytest.raises(TNError, match=rf"test_nosrc.*{match}"):
            codegen(expr)
    finally:
        constants._KINDS.pop("test_nosrc")


def test_wrong_shape_from_a_builder_names_the_kind():
    register(ConstantKind("test_badshape", build_test_eye))
    try:
        with pytest.raises(TNError, match=r"test_badshape.*\(3, 3\), expected \(3, 4\)"):
            constants.build_constant("test_badshape", (1.0,), (3, 4), "cpu", torch.float32)
    finally:
        constants._KINDS.pop("test_badshape")


def test_captions():
    assert constants.describe_constant("pattern", (2, 1, 1, 1)) == "Π s=2 p=1 d=1"
    assert constants.describe_constant("pattern", (2, 0, 1, 1)) == "Π s=2 p=(0,1) d=1"
    assert constants.describe_constant("window", (3,)) == "slice +3"
    assert constants.describe_constant("split", ()) == "reshape"
    assert constants.describe_constant("unregistered", (("stride", 2),)) == "unregistered s=2"


def test_view_lowering_splits_legs():
    assert ViewLowering(source=2, apply=None).split_legs(("k", "o", "i")) == ("i", ("k", "o"))
    assert get_kind("split").view.split_legs(("i", "a", "b")) == ("i", ("a", "b"))
    assert get_kind("causal_mask").view is None


def test_constant_cache_is_bounded_lru(eye_kind):
    cache = constants._CACHE
    constants.clear_cache()
    first = constants.build_constant("test_eye", (1.0,), (2, 2), "cpu", torch.float32)
    assert constants.build_constant("test_eye", (1.0,), (2, 2), "cpu", torch.float32) is first
    for n in range(cache.maxsize):  # fills the cache; `first` is the least recently used
        constants.build_constant("test_eye", (1.0,), (n + 3, n + 3), "cpu", torch.float32)
    assert len(cache) == cache.maxsize
    again = constants.build_constant("test_eye", (1.0,), (2, 2), "cpu", torch.float32)
    assert again is not first and torch.equal(again, first)
    constants.clear_cache()
    assert len(cache) == 0


def test_registering_again_replaces_the_kind_and_its_tensors(eye_kind):
    old = constants.build_constant("test_eye", (1.0,), (2, 2), "cpu", torch.float32)
    register(ConstantKind("test_eye", build_uses_a_global))
    new = constants.build_constant("test_eye", (1.0,), (2, 2), "cpu", torch.float32)
    assert torch.equal(new, torch.full((2, 2), 2.0)) and not torch.equal(new, old)
