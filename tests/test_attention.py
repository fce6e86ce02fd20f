"""Self-attention Hessian blocks (tnderive.nn.attention, tnderive.attention) against torch.func."""
from __future__ import annotations

import pytest
import torch
from torch.func import hessian, jacrev

from tnderive import TNError, Zero
from tnderive.attention import (expand, fit_slopes, hessian_blocks, report_markdown,
                                report_rows, substitute, tree_degree)
from tnderive.nn.attention import reference_output, self_attention

SIZES = dict(seq=5, d_model=4, d_k=3)

CASES = {
    "plain": dict(),
    "out_proj": dict(out_proj=True),
    "heads2_causal": dict(heads=2, causal=True),
    "heads2_out_proj_ce": dict(heads=2, out_proj=True, loss="ce", classes=3),
    "causal_out_proj_sum": dict(causal=True, out_proj=True, reduction="sum"),
    "linear_causal": dict(linear=True, causal=True),
}


_DERIVED: dict = {}


def _blocks(simplify: bool = False, **options):
    """(model, Hessian blocks of all its parameters) for `self_attention(**SIZES, **options)`,
    derived once per test process: the tests that read the same blocks share them, and with
    them the compiled code each part caches."""
    key = (simplify, tuple(sorted(options.items())))
    if key not in _DERIVED:
        model = self_attention(**SIZES, **options)
        _DERIVED[key] = model, hessian_blocks(model, params=model.params, simplify=simplify)
    return _DERIVED[key]


def _references(model, tensors, params):
    """torch.func Hessian blocks, the GGN blocks from jacrev, for the torch-written layer."""
    ps = list(params)

    def loss(*ws):
        d = dict(tensors)
        d.update(zip(ps, ws))
        return model.torch_loss(**d)

    def out(*ws):
        d = dict(tensors)
        d.update(zip(ps, ws))
        return reference_output(model.options, d["X"], d["WQ"], d["WK"], d["WV"], d.get("WO"))

    def loss_of_F(F):
        d = dict(tensors)
        d.update(zip(ps, [tensors[p] for p in ps]))
        o = model.options
        mean = o["reduction"] == "mean"
        if o["loss"] == "mse":
            s = ((F - d["Y"]) ** 2).sum()
            return s / F.numel() if mean else s
        Z = F.reshape(F.shape[0], -1) @ d["WR"].reshape(-1, d["WR"].shape[-1])
        s = (torch.logsumexp(Z, -1) - (d["Y"] * Z).sum(-1)).sum()
        return s / F.shape[0] if mean else s

    args = [tensors[p] for p in ps]
    argnums = tuple(range(len(ps)))
    H = hessian(loss, argnums=argnums)(*args)
    J = jacrev(out, argnums=argnums)(*args)
    F = out(*args)
    HF = hessian(loss_of_F)(F).reshape(F.numel(), F.numel())
    ggn = {}
    for i, p in enumerate(ps):
        for j, q in enumerate(ps):
            Jp, Jq = J[i].reshape(F.numel(), -1), J[j].reshape(F.numel(), -1)
            ggn[p, q] = (Jp.T @ HF @ Jq).reshape(H[i][j].shape)
    return {(p, q): H[i][j] for i, p in enumerate(ps) for j, q in enumerate(ps)}, ggn


def _close(a, b, tol=1e-10, scale=None):
    scale = max(b.abs().max().item() if scale is None else scale, 1e-300)
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= tol * scale


@pytest.mark.parametrize("name", list(CASES))
def test_loss_matches_torch(name):
    model = self_attention(**SIZES, **CASES[name])
    t = model.random_inputs(3)
    from tnderive import evaluate
    _close(evaluate(model.loss, **t), model.torch_loss(**t))


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_match_torch_func(name):
    """Every part of every block, through `tnderive.evaluate` (lowered and interpreted); the
    generated modules are compared with this path in the next test (compiling all 48 parts
    of six layers would take most of this file's time)."""
    model, blocks = _blocks(name == "plain", **CASES[name])
    t = model.random_inputs(1)
    H, G = _references(model, t, model.params)
    for (p, q), b in blocks.items():
        scale = H[p, q].abs().max().item()
        total, outer, functional = (part.evaluate(t, fast=False)
                                    for part in (b.total, b.outer, b.functional))
        _close(total, H[p, q])
        _close(outer, G[p, q], scale=scale)
        _close(functional, H[p, q] - G[p, q], scale=scale)
        _close(outer + functional, total)


def test_slow_path_agrees_with_generated_code():
    model, blocks = _blocks(**CASES["heads2_causal"])
    t = model.random_inputs(2)
    for b in blocks.values():
        for part in b.parts().values():
            _close(part.evaluate(t, fast=True), part.evaluate(t, fast=False))


def test_blocks_with_data_X():
    model = self_attention(4, 3, 2)
    blocks = hessian_blocks(model, params=("WQ", "WV"), include_X=True, simplify=False)
    assert blocks.params == ("WQ", "WV", "X")
    t = model.random_inputs(4)
    H, G = _references(model, t, blocks.params)
    for key in [("X", "X"), ("WQ", "X"), ("X", "WV")]:
        _close(blocks[key].total.evaluate(t), H[key])
        _close(blocks[key].outer.evaluate(t), G[key], scale=H[key].abs().max().item())


def test_plain_expression_gives_totals_only():
    model = self_attention(**SIZES)
    blocks = hessian_blocks(model.loss, params=("WQ", "WV"), simplify=False)
    assert blocks["WQ", "WV"].outer is None and blocks["WQ", "WV"].functional is None
    t = model.random_inputs(0)
    H, _ = _references(model, t, ("WQ", "WV"))
    _close(blocks["WQ", "WV"].total.evaluate(t), H["WQ", "WV"])
    split = hessian_blocks(model.loss, params=("WQ",), simplify=False, output=model.output,
                           loss_of_output=model.loss_of_output)
    _close(split["WQ", "WQ"].outer.evaluate(t) + split["WQ", "WQ"].functional.evaluate(t),
           H["WQ", "WQ"])


def test_functional_VV_is_symbolically_zero():
    # the layers test_blocks_match_torch_func and the slope tests derive (shared blocks):
    # mse and ce, one and two heads, with and without the output projection
    for kw in [dict(), CASES["out_proj"], CASES["heads2_causal"], CASES["heads2_out_proj_ce"]]:
        model, blocks = _blocks(**kw)
        assert isinstance(blocks["WV", "WV"].functional.expr, Zero)
        assert blocks["WV", "WV"].functional.structure.zero
        assert blocks["WV", "WV"].functional.structure.predicted_slope is None
        if "WO" in model.params:
            assert isinstance(blocks["WO", "WO"].functional.expr, Zero)
            assert not blocks["WV", "WO"].functional.is_zero


def test_functional_VV_zero_after_simplify():
    blocks = hessian_blocks(self_attention(**SIZES), params=("WV",))
    assert blocks["WV", "WV"].functional.is_zero


KNOWN = {  # Ormaniec, Dangel, Singh: slopes of the block norms in σ (X → σX), squared loss
    ("WQ", "WQ"): (6, 5), ("WQ", "WK"): (6, 3), ("WV", "WQ"): (4, 3), ("WV", "WV"): (2, None),
    ("WK", "WK"): (6, 5), ("WV", "WK"): (4, 3),
}


def test_predicted_slopes_reproduce_known_values():
    blocks = hessian_blocks(self_attention("L", "d", "d_k"), simplify=False)
    for (p, q), (o, f) in KNOWN.items():
        assert blocks[p, q].outer.structure.predicted_slope == o
        assert blocks[p, q].functional.structure.predicted_slope == (None if f is None else f)
        s = blocks[p, q].functional.structure
        assert s.tree_slope == s.predicted_slope


def test_fitted_slopes_match_predictions():
    model, blocks = _blocks()
    t = model.random_inputs(0)
    slopes = fit_slopes(blocks, t)
    for key, b in blocks.items():
        for name, part in b.parts().items():
            pred, fit = part.structure.predicted_slope, slopes[key][name]
            if pred is None:
                assert fit is None and name == "functional" and key == ("WV", "WV")
            else:
                assert abs(pred - fit) <= 0.3, (key, name, pred, fit)


def test_structure_flags():
    _, blocks = _blocks()
    qk = blocks["WQ", "WK"].functional.structure
    assert qk.second_T and qk.softmax_order == 2
    qq = blocks["WQ", "WQ"].functional.structure
    assert not qq.second_T and qq.softmax_order == 2
    vq = blocks["WV", "WQ"].functional.structure
    assert vq.softmax_order == 1 and not vq.second_T
    assert blocks["WV", "WV"].outer.structure.softmax_order == 0
    assert blocks["WV", "WV"].outer.structure.powers == {"X": [2]}


def test_linear_attention_slopes():
    _, blocks = _blocks(linear=True)
    assert blocks["WQ", "WQ"].functional.is_zero          # T is linear in W_Q
    assert blocks["WV", "WV"].outer.structure.predicted_slope == 6  # F ~ σ³ without softmax
    assert blocks["WQ", "WK"].functional.structure.predicted_slope == 3


def test_report_markdown():
    model, blocks = _blocks()
    rows = report_rows(blocks, model.random_inputs(0))
    md = report_markdown(blocks, rows)
    assert "| Q–Q | outer |" in md and "≡0" in md


def test_generated_code_is_standalone():
    model, blocks = _blocks(**CASES["heads2_causal"])
    part = blocks["WQ", "WQ"].total
    prog = part.program(fn_name="qq")
    assert "tnderive" not in prog.source.split('"""')[0]
    ns: dict = {}
    exec(prog.source, ns)
    t = model.random_inputs(5)
    _close(ns["qq"](**{k: t[k] for k in part.expr.variables}), part.evaluate(t, fast=False))


def test_substitute_and_expand():
    model = self_attention(**SIZES)
    back = substitute(model.loss_of_output, model.output_name, model.output)
    from tnderive import evaluate
    t = model.random_inputs(0)
    _close(evaluate(back, **t), evaluate(model.loss, **t))
    assert tree_degree(model.output) == 1
    assert len(expand(model.output)) == 1


def test_errors():
    with pytest.raises(TNError, match="loss"):
        self_attention(loss="hinge")
    with pytest.raises(TNError, match="heads"):
        self_attention(heads=0)
    model = self_attention(**SIZES)
    with pytest.raises(TNError, match="WZ"):
        hessian_blocks(model, params=("WQ", "WZ"))
    with pytest.raises(TNError, match="scalar"):
        hessian_blocks(model.output)
    with pytest.raises(TNError, match="symbolic"):
        self_attention().random_inputs()


def test_compile_lowers_blocks_term_by_term():
    """tnderive.compile hoists the output-carrying factors out of a block's sum of terms: the
    chosen form is far cheaper than lowering the simplified expression as written (at a
    length where the structural form costs more than `cost.FORMS_MIN_COST`; below it no other
    form is tried, and the next test checks that a cheap one is not)."""
    import sys

    import tnderive.codegen  # noqa: F401  (loads the submodules)
    program = sys.modules["tnderive.codegen.program"]
    model = self_attention(seq=64, d_model=8, d_k=4)
    part = hessian_blocks(model, params=("WQ",))["WQ", "WQ"].total
    compiled = part.program()
    assert compiled.plan.form.startswith("legs")
    structural = program._Lowering(part.expr, {}, 8, None).run()
    assert compiled.plan.flops_at() < structural.flops_at() / 2
    t = model.random_inputs(3)
    _close(part.evaluate(t, fast=True), part.evaluate(t))


def test_cheap_sum_is_lowered_as_written():
    """A block whose structural form costs less than `cost.FORMS_MIN_COST` is not lowered
    term-wise (that would cost more lowering time than it saves), in compile and evaluate."""
    import sys

    import tnderive.codegen  # noqa: F401  (loads the submodules)
    program, cost = sys.modules["tnderive.codegen.program"], sys.modules["tnderive.codegen.cost"]
    model = self_attention(seq=4, d_model=3, d_k=2)
    part = hessian_blocks(model, params=("WQ",))["WQ", "WQ"].total
    plan = part.program().plan
    assert plan.form == "structural" and program._cost(plan)[0] < cost.FORMS_MIN_COST
    t = model.random_inputs(4)
    _close(part.evaluate(t, fast=True), part.evaluate(t))
