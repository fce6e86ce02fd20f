"""Generated torch code (tnderive.codegen) against `evaluate`, planner cost bounds, argument
errors, standalone imports and specialisation."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import opt_einsum
import pytest
import sympy
import torch
from hypothesis import given, settings, strategies as st

from tnderive import evaluate
from tnderive.codegen import codegen, compile, load, plan
from tnderive.codegen.plan import plan_contraction
from tnderive.errors import TNError
from tnderive.ir import Delta, Product, Sum, Variable, Zero, size_symbol

from tests.cases.codegen_cases import CASES, EXTRA_SIZES, SIZES, V, conv_expr as _conv_expr, random_inputs, z
from tests.background import QUICK_EXIT


@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_code_equals_evaluate(case):
    expr = CASES[case]
    tensors = random_inputs(expr)
    ref = evaluate(expr, **tensors)
    if case == "scaled_symbolic":  # the size symbol in the coefficient, by hand: z / n
        by_hand = evaluate(z, **tensors) / tensors["x"].shape[0]
        torch.testing.assert_close(ref, by_hand, rtol=1e-10, atol=1e-10)
    f = compile(expr, name="f")
    got = f(**tensors)
    assert tuple(got.shape) == tuple(ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert got.dtype == torch.float64


@pytest.mark.parametrize("case", ["mlp_hessian_WW", "attention_hessian_QK", "delta_diag_out"])
def test_float32_and_default_plan(case):
    expr = CASES[case]
    tensors = random_inputs(expr, dtype=torch.float32)
    ref = evaluate(expr, **{k: v.double() for k, v in tensors.items()})
    fn_ = load(codegen(expr, "g"), "g")
    got = fn_(**tensors)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


def test_generated_code_is_differentiable():
    expr = CASES["mlp_loss"]
    tensors = random_inputs(expr)
    f = compile(expr)
    g1 = torch.func.grad(lambda W_: f(**dict(tensors, W=W_)))(tensors["W"])
    g2 = torch.func.grad(lambda W_: evaluate(expr, **dict(tensors, W=W_)))(tensors["W"])
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


# --- standalone module -------------------------------------------------------------------------

def _imports(source: str) -> set[str]:
    tree = ast.parse(source)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_imports_only_torch(case):
    src = codegen(CASES[case], "f")
    assert _imports(src) == {"torch"}
    compiled = compile(CASES[case])
    assert compiled.source == src


@pytest.mark.slow
def test_module_runs_in_clean_interpreter(tmp_path):
    """python -I with tnderive/sympy/opt_einsum blocked: the module needs only torch."""
    conv = _conv_expr()
    exprs = {"mlp": CASES["mlp_hessian_WW"], "conv": conv}
    for name, expr in exprs.items():
        (tmp_path / f"gen_{name}.py").write_text(codegen(expr, "f"))
        torch.save(random_inputs(expr, {"c": 2, "h": 6}), tmp_path / f"{name}.pt")
        torch.save(evaluate(expr, **random_inputs(expr, {"c": 2, "h": 6})), tmp_path / f"{name}_ref.pt")
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tnderive", "sympy", "opt_einsum"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        for name in ("mlp", "conv"):
            mod = __import__("gen_" + name)
            args = torch.load({str(tmp_path)!r} + "/" + name + ".pt")
            ref = torch.load({str(tmp_path)!r} + "/" + name + "_ref.pt")
            out = mod.f(**args)
            assert torch.allclose(out, ref, atol=1e-10), name
            try:
                mod.f(**dict(args, bogus=args[next(iter(args))]))
            except mod.TNError as e:
                assert "bogus" in str(e)
            else:
                raise AssertionError("no error")
        assert "tnderive" not in sys.modules and "sympy" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-I", "-c", script + QUICK_EXIT], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok" in res.stdout


# --- constants ---------------------------------------------------------------------------------

def test_pattern_constant_codegen():
    expr = _conv_expr()
    tensors = random_inputs(expr, {"c": 2, "h": 6})
    src = codegen(expr, "f")  # the patterns read x: padded windows (views), no 0/1 tensor
    assert ".unfold(2, 3, 1)" in src and "torch.nn.functional.pad(" in src
    assert "_constant('pattern'" not in src
    f = compile(expr)
    torch.testing.assert_close(f(**tensors), evaluate(expr, **tensors), rtol=1e-10, atol=1e-10)
    # a scatter (input leg free) is folded (col2im: a strided add per kernel tap), no 0/1 tensor
    from tnderive.patterns import pattern_constant
    pat = pattern_constant(("k", "o", "h"), (3, size_symbol("h")), stride=2, padding=1)
    v = Variable("v", ("n", "c", "o"), shape=(size_symbol("n"), size_symbol("c"), pat.shape[1]))
    scatter = Product((V("w", ("c", "k")), v, pat), ("n", "c", "h"))
    f = compile(scatter, sizes={"h": 7})  # h: not determined by v's size floor((h-1)/2)+1
    assert "col2im" in f.source and "_constant('pattern'" not in f.source
    tensors = {"w": torch.randn(2, 3, dtype=torch.float64), "v": torch.randn(3, 2, 4, dtype=torch.float64)}
    ref = torch.nn.functional.conv_transpose1d(tensors["v"], tensors["w"].reshape(2, 1, 3),
                                               stride=2, padding=1, groups=2)
    torch.testing.assert_close(f(**tensors), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(evaluate(scatter, sizes={"h": 7}, **tensors), ref, rtol=1e-10,
                               atol=1e-10)
    # a pattern that is the output itself is built, by its torch-only builder copied into the module
    f = compile(Product((pat,), ("k", "o", "h")), sizes={"h": 7})
    assert "def _pattern_build_pattern" in f.source and "_constant('pattern'" in f.source
    dense = f()
    assert dense.shape == (3, 4, 7) and dense.sum() == 10  # taps landing in the 7 positions
    torch.testing.assert_close(dense, evaluate(pat, sizes={"h": 7}), rtol=0, atol=0)


def test_split_and_window_become_views():
    src = codegen(CASES["split_as_reshape"], "f")
    assert ".reshape(" in src and "_constant(" not in src
    src = codegen(CASES["window_as_narrow"], "f")
    assert ".narrow(1, 2, 3)" in src and "_constant(" not in src


# constant kinds in generated code (builder source, cache, errors): tests/test_constants.py


# --- argument checking -------------------------------------------------------------------------

def _f():
    return compile(CASES["matmul"], name="mm")


def _ok():
    return dict(W=torch.randn(4, 5), x=torch.randn(3, 5))


@pytest.mark.parametrize("use_load", [False, True])
def test_argument_errors(use_load):
    f = load(codegen(CASES["matmul"], "mm"), "mm") if use_load else _f()
    with pytest.raises(ValueError, match="missing argument 'x'"):
        f(W=torch.randn(4, 5))
    with pytest.raises(ValueError, match="unexpected argument 'y'"):
        f(**_ok(), y=torch.randn(2))
    with pytest.raises(ValueError, match=r"size mismatch for index 'i': x\[i\] has size 6"):
        f(W=torch.randn(4, 5), x=torch.randn(3, 6))
    with pytest.raises(ValueError, match="'x' has shape \\(3,\\), expected rank 2"):
        f(W=torch.randn(4, 5), x=torch.randn(3))
    with pytest.raises(ValueError, match="'W' is a list"):
        f(W=[1.0], x=torch.randn(3, 5))
    with pytest.raises(ValueError, match="keyword tensor arguments only"):
        f(torch.randn(4, 5), torch.randn(3, 5))


def test_compiled_errors_are_tnerror():
    with pytest.raises(TNError, match="missing argument 'W'"):
        _f()(x=torch.randn(3, 5))


def test_derived_size_is_checked():
    n = size_symbol("n")
    y = V("y", "m", shape=[2 * n])
    expr = Product((V("u", "n"), y), "nm")
    f = compile(expr)
    torch.testing.assert_close(f(u=torch.ones(2), y=torch.ones(4)), torch.ones(2, 4))
    with pytest.raises(TNError, match=r"size mismatch for y\[m\]: expected 2\*n = 4, got 5"):
        f(u=torch.ones(2), y=torch.ones(5))


def test_unbound_size_symbol_is_an_error():
    expr = Product((V("u", "n"), Delta("m", "m")), "nm")
    with pytest.raises(TNError, match=r"size 'm' is not bound"):
        codegen(expr)


# --- planning ----------------------------------------------------------------------------------

def _optimal_flops(p: Product, sizes) -> int:
    """opt_einsum 'optimal' FLOPs of a product with its deltas materialised as operands."""
    letters = {}
    terms, shapes = [], []
    for f in p.factors:
        labs = f.occurrence if isinstance(f, Variable) else f.indices
        for i in labs:
            letters.setdefault(i, opt_einsum.get_symbol(len(letters)))
        terms.append("".join(letters[i] for i in labs))
        shapes.append(tuple(sizes[i] for i in labs))
    eq = ",".join(terms) + "->" + "".join(letters[i] for i in p.indices)
    if len(terms) == 1:
        return None
    _, info = opt_einsum.contract_path(eq, *shapes, shapes=True, optimize="optimal")
    return int(info.opt_cost), int(info.naive_cost)


def _flat_products(expr):
    for node in expr.walk():
        if isinstance(node, Product) and all(not isinstance(f, (Product, Sum)) for f in node.factors) \
                and len(node.factors) >= 2 and len(node.factors) <= 8:
            yield node


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_not_above_optimal_or_naive(case):
    expr = CASES[case]
    for p in _flat_products(expr):
        numeric = {}
        for f in p.factors:
            labs = f.occurrence if isinstance(f, Variable) else f.indices
            shape = f.axis_shape if isinstance(f, Variable) else f.shape
            for i, s in zip(labs, shape):
                numeric[i] = int(s.subs({size_symbol(k): v for k, v in SIZES.items()} |
                                        {size_symbol(k): v for k, v in EXTRA_SIZES.items()}))
        symbols = {k: v for k, v in {**SIZES, **EXTRA_SIZES}.items()}
        prog = plan(p, sizes={str(s): symbols[str(s)] for s in _symbols(p)})
        opt = _optimal_flops(p, numeric)
        if opt is None:
            continue
        found = [cp for q, cp in prog.plans if q == p]
        if not found:  # zeros, or copy tensors only: no contraction at all
            assert any(isinstance(f, Zero) for f in p.factors) or \
                all(isinstance(f, Delta) for f in p.factors)
            continue
        cp = found[0]
        mine = cp.flops_at()
        assert mine <= opt[0], (case, mine, opt)
        assert mine <= opt[1]
        assert cp.flops_at() <= cp.naive_flops_at()


def _symbols(e):
    out = set()
    for node in e.walk():
        for s in node.shape:
            out |= s.free_symbols
        if isinstance(node, Variable):
            for s in node.axis_shape:
                out |= s.free_symbols
    return out


def test_plan_symbolic_cost():
    p = plan(CASES["matmul"])
    n, o, i = (size_symbol(s) for s in "noi")
    assert sympy.simplify(p.flops - 2 * i * n * o) == 0
    assert p.largest_intermediate == n * o
    assert p.flops_at({"n": 128, "o": 10, "i": 64}) == 2 * 128 * 10 * 64
    text = str(p)
    assert "2*i*n*o" in text and "naive" in text


def test_plan_chain_beats_naive():
    sizes = {"a": 50, "b": 2, "c": 50, "d": 50}
    syms = {k: size_symbol(k) for k in sizes}
    cp = plan_contraction([("a", "b"), ("b", "c"), ("c", "d")], ("a", "d"), syms, sizes)
    assert cp.method == "optimal"
    assert cp.flops_at() < cp.naive_flops_at()
    assert len(cp.steps) == 2


def test_plan_large_network_uses_dp():
    k = 12
    labels = [f"x{j}" for j in range(k + 1)]
    ops = [(labels[j], labels[j + 1]) for j in range(k)]
    sizes = {l: size_symbol(l) for l in labels}
    cp = plan_contraction(ops, (labels[0], labels[-1]), sizes, {l: 4 for l in labels})
    assert cp.method == "dp-combo"
    assert cp.flops_at() <= cp.naive_flops_at()


def test_plan_very_large_network_uses_cotengra():
    pytest.importorskip("cotengra")
    k = 32
    labels = [f"x{j}" for j in range(k + 1)]
    ops = [(labels[j], labels[j + 1]) for j in range(k)]
    sizes = {l: size_symbol(l) for l in labels}
    cp = plan_contraction(ops, (labels[0], labels[-1]), sizes, {l: 3 for l in labels})
    assert cp.method == "cotengra"
    assert cp.flops_at() <= cp.naive_flops_at()


def test_specialisation_replans_per_size():
    sizes = {"a": 2, "b": 40, "c": 2, "d": 40}
    expr = Product((V("P", "ab"), V("Q", "bc"), V("R", "cd")), "ad")
    f = compile(expr)
    t1 = {"P": torch.randn(2, 40), "Q": torch.randn(40, 2), "R": torch.randn(2, 40)}
    t2 = {"P": torch.randn(40, 2), "Q": torch.randn(2, 40), "R": torch.randn(40, 2)}
    for ts in (t1, t2, t1):
        torch.testing.assert_close(f(**ts), evaluate(expr, **ts))
    assert len(f.specialisations) == 2
    plans = [p for p, _ in f.specialisations.values()]
    assert all(p.flops_at() <= p.naive_flops_at() for p in plans)
    assert sizes  # sizes only document the two regimes


def test_common_subexpressions_computed_once():
    expr = CASES["cse_sum"]
    p = plan(expr)
    einsum_lines = [op for op in p.ops if op.kind == "einsum"]
    # W·x appears three times (twice inside bigger products): computed once
    wx = [op for op in einsum_lines if {v.name for v in op.inputs} == {"W", "x"}]
    assert len(wx) == 1
    assert p.reused >= 1


def test_deltas_not_materialised():
    src = codegen(CASES["delta_merge"], "f")
    assert "eye" not in src and "zeros" not in src
    # the raw Hessian's terms carry delta[o,o_,o__] next to [n,i_,i__]: kept lazy, no op ever
    # writes a rank-6 tensor; the block [o_,i_,o__,i__] is expanded once at the end
    prog = plan(CASES["mlp_hessian_WW"])
    assert max(len(op.labels) for op in prog.ops) <= 4
    assert [op.kind for op in prog.ops].count("diag") == 1


def test_common_factors_pulled_out_of_sums():
    from tnderive.codegen.factor import factor_sums
    P, Q = V("P", "ni"), V("Q", "ni")
    xo = V("xo", "no")
    s = Sum(((1, Product((P, xo), "nio")), (3, Product((Q, xo), "nio"))), "nio")
    f = factor_sums(s)
    assert isinstance(f, Product) and xo in f.factors
    tensors = random_inputs(s)
    torch.testing.assert_close(compile(s)(**tensors), evaluate(s, **tensors))


# --- random products ---------------------------------------------------------------------------

@st.composite
def random_product(draw):
    pool = list("abcdef")
    nf = draw(st.integers(1, 5))
    factors = []
    for k in range(nf):
        idx = draw(st.lists(st.sampled_from(pool), min_size=0, max_size=3, unique=True))
        if draw(st.booleans()) and len(idx) >= 2 and k == 0:
            factors.append(Delta(idx, size_symbol("a")))
        else:
            factors.append(V(f"T{k}", [f"x{j}" for j in range(len(idx))], idx,
                             [size_symbol(i) for i in idx]))
    # deltas need equal sizes: give every index of a delta the size of 'a'
    present = list(dict.fromkeys(i for f in factors for i in f.indices))
    out = draw(st.lists(st.sampled_from(present), unique=True, max_size=3)) if present else []
    return Product(factors, out)


@settings(max_examples=40, deadline=None)
@given(random_product(), st.integers(0, 3))
def test_random_products(expr, seed):
    delta_idx = {i for f in expr.factors if isinstance(f, Delta) for i in f.indices}
    # all indices joined by a delta share the size of 'a'
    expr = _unify_delta_sizes(expr, delta_idx)
    sizes = {"a": 2, "b": 3, "c": 2, "d": 4, "e": 1, "f": 3}
    tensors = {}
    gen = torch.Generator().manual_seed(seed)
    for name, var in expr.variables.items():
        shape = [int(s.subs({size_symbol(k): v for k, v in sizes.items()})) for s in var.axis_shape]
        tensors[name] = torch.randn(shape, generator=gen, dtype=torch.float64)
    if not tensors:
        return
    ref = evaluate(expr, sizes={"a": 2}, **tensors)
    f = compile(expr)
    torch.testing.assert_close(f(**tensors), ref, rtol=1e-10, atol=1e-10)
    prog = plan(expr, sizes={k: v for k, v in sizes.items() if size_symbol(k) in _symbols(expr)})
    assert prog.flops_at() <= max(prog.naive_flops_at(), 0) or prog.naive_flops_at() == 0


def _unify_delta_sizes(expr, delta_idx):
    if not delta_idx:
        return expr
    a_ = size_symbol("a")
    factors = []
    for f in expr.factors:
        if isinstance(f, Variable):
            shape = [a_ if i in delta_idx else s for i, s in zip(f.occurrence, f.axis_shape)]
            factors.append(Variable(f.name, f.axes, f.occurrence, shape))
        else:
            factors.append(f)
    # a variable must bind 'a' for the generated code to know it
    if not any(a_ in s.free_symbols for f in factors if isinstance(f, Variable) for s in f.axis_shape):
        factors.append(V("Ta", ["x0"], ["a_"], [a_]))
    return Product(factors, expr.indices)


# --- facade and CLI ----------------------------------------------------------------------------

def test_public_names():
    import tnderive
    expr = CASES["matmul"]
    import tnderive.codegen.plan  # noqa: F401  (importing a submodule must not rebind the name)
    assert "def f(" in tnderive.codegen(expr, "f")   # the function, bound eagerly by tnderive
    assert tnderive.compile(expr).plan.flops == plan(expr).flops


def test_cli_codegen(tmp_path, capsys):
    from tnderive.cli import main
    out = tmp_path / "hess.py"
    rc = main(["codegen", "z[n,o] = W[o,i]*x[n,i]\nloss = sum((tanh(z[n,o]) - t[n,o])**2)/2",
               "--wrt", "W", "--wrt", "W", "-o", str(out), "--sizes", "n=16,o=3,i=4", "--name", "hess"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "flops" in text and "naive" in text and "largest intermediate" in text
    src = out.read_text()
    assert _imports(src) == {"torch"}
    mod = {}
    exec(src, mod)
    W_, x_, t_ = torch.randn(3, 4), torch.randn(16, 4), torch.randn(16, 3)
    H = mod["hess"](W=W_, x=x_, t=t_)
    ref = torch.func.hessian(lambda w: ((torch.tanh(x_ @ w.T) - t_) ** 2).sum() / 2)(W_)
    torch.testing.assert_close(H, ref, rtol=1e-10, atol=1e-10)


def test_cli_codegen_errors(capsys):
    from tnderive.cli import main
    assert main(["codegen", "y[n] = a[n]*b[n]", "--wrt", "c"]) == 2
    assert "'c'" in capsys.readouterr().err
    assert main(["codegen", "y[n] = a[n]*b[n]", "--sizes", "q=3"]) == 2


@settings(max_examples=30, deadline=None)
@given(random_product(), st.integers(0, 10), st.sampled_from([1, -2, 0.5]))
def test_random_sums_of_products(expr, which, coef):
    """P + c·Q where Q shares all but one factor with P: exercises common-factor extraction,
    lazy diagonals across sum terms and sub-expression reuse."""
    delta_idx = {i for f in expr.factors if isinstance(f, Delta) for i in f.indices}
    p = _unify_delta_sizes(expr, delta_idx)
    variables = [k for k, f in enumerate(p.factors) if isinstance(f, Variable)]
    if not variables:
        return
    k = variables[which % len(variables)]
    old = p.factors[k]
    new = Variable(old.name + "q", old.axes, old.occurrence, old.axis_shape)
    q = Product(p.factors[:k] + (new,) + p.factors[k + 1:], p.indices)
    s = Sum(((1, p), (coef, q)), p.indices)
    sizes = {"a": 2, "b": 3, "c": 2, "d": 4, "e": 1, "f": 3}
    gen = torch.Generator().manual_seed(which)
    tensors = {}
    for name, var in s.variables.items():
        shape = [int(x.subs({size_symbol(n): v for n, v in sizes.items()})) for x in var.axis_shape]
        tensors[name] = torch.randn(shape, generator=gen, dtype=torch.float64)
    ref = evaluate(p, **{n: t for n, t in tensors.items() if n in p.variables}) + \
        coef * evaluate(q, **{n: t for n, t in tensors.items() if n in q.variables})
    torch.testing.assert_close(compile(s)(**tensors), ref, rtol=1e-10, atol=1e-10)
