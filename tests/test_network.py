"""Networks (programs of named statements): parsing, inlining, printing, evaluation, codegen,
and their derivatives (reverse mode, forward over reverse) against torch.func, float64."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import tnderive as tn
from tnderive.derive import block_name

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "depth.py"
_spec = importlib.util.spec_from_file_location("depth_benchmark_for_networks", _PATH)
depth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(depth)

TOL = 1e-10
SEQ, DIM = 3, 4


def _close(a, b, tol=TOL, scale=None):
    """Max error relative to the largest entry of `b` (or `scale`: a vanishing block is
    compared on the scale of the whole Hessian)."""
    a = torch.as_tensor(a).reshape(b.shape)
    scale = b.abs().max() if scale is None else torch.as_tensor(scale)
    return ((a - b).abs().max() / scale.clamp_min(1e-300)).item() <= tol


def _case(stack, layers, seed=0):
    net = tn.parse_network(depth.source(stack, layers, dim=DIM))
    tensors = depth.inputs(stack, layers, seq=SEQ, dim=DIM, seed=seed)
    return net, tensors


def _loss_of(stack, tensors, layers, names):
    def f(*xs):
        t = dict(tensors)
        t.update(zip(names, xs))
        return depth.torch_loss(stack, t, layers)
    return f


STACKS = depth.STACKS


@pytest.mark.parametrize("stack", STACKS)
def test_network_keeps_statements_and_inlines_to_parse(stack):
    net, tensors = _case(stack, 2)
    assert len(net) == len(depth.source(stack, 2).splitlines())
    assert all(isinstance(s.expr, tn.Expr) for s in net)
    assert net.inline().indices == ()
    value = net.evaluate(**tensors)
    assert _close(value, tn.evaluate(tn.parse(depth.source(stack, 2, dim=DIM)), **tensors))
    assert _close(tn.evaluate(net.inline(), **tensors), depth.torch_loss(stack, tensors, 2))
    assert set(net.signature) == set(tensors)


@pytest.mark.parametrize("stack", STACKS)
def test_notation_round_trips(stack):
    net, _ = _case(stack, 2)
    assert tn.parse_network(str(net)) == net
    g = tn.simplify(net.grad(depth.wrt(stack)))
    assert tn.parse_network(str(g)).outputs == g.outputs


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("layers", [1, 3])
def test_gradient_matches_autograd(stack, layers):
    net, tensors = _case(stack, layers, seed=layers)
    name = depth.wrt(stack)
    raw = net.grad(name)
    assert raw.outputs == ("d" + name,)
    simple = tn.simplify(raw)
    ref = torch.func.grad(_loss_of(stack, tensors, layers, [name]))(tensors[name])
    assert _close(raw.evaluate(**tensors), ref)
    assert _close(simple.evaluate(**tensors), ref)
    assert _close(simple.compile()(**tensors), ref)


def test_gradient_at_twelve_layers_is_linear_in_depth():
    sizes = {}
    for layers in (6, 12):
        net, tensors = _case("attention+residual", layers)
        g = tn.simplify(tn.grad(net, "WQ1"))
        sizes[layers] = len(g)
        if layers == 12:
            ref = torch.func.grad(_loss_of("attention+residual", tensors, 12, ["WQ1"]))(tensors["WQ1"])
            assert _close(g.evaluate(**tensors), ref)
    assert sizes[12] <= 2 * sizes[6] + 2  # statements: linear in depth


@pytest.mark.parametrize("stack", STACKS)
def test_hessian_blocks_match_torch_func(stack):
    layers = 2
    net, tensors = _case(stack, layers, seed=3)
    params = ["W1", "W2"] if stack == "mlp" else ["WQ1", "WK1", "WV2"]
    pairs = [(a, b) for a in params for b in params]
    blocks = tn.simplify(net.hessian_blocks(pairs=pairs))
    assert blocks.outputs == tuple(block_name(a, b) for a, b in pairs)
    values = blocks.evaluate(**tensors)
    compiled = blocks.compile()(**tensors)
    assert set(compiled) == set(values)
    ref = torch.func.hessian(_loss_of(stack, tensors, layers, params),
                             argnums=tuple(range(len(params))))(*(tensors[p] for p in params))
    scale = max(blk.abs().max() for row in ref for blk in row)
    for (a, b) in pairs:
        want = ref[params.index(a)][params.index(b)]
        assert _close(values[block_name(a, b)], want, scale=scale)
        assert _close(compiled[block_name(a, b)], want, scale=scale)


def test_single_hessian_and_tn_hessian_of_a_network():
    net, tensors = _case("attention", 2, seed=5)
    h = tn.simplify(tn.hessian(net, "WQ1", "WV2"))
    ref = torch.func.hessian(_loss_of("attention", tensors, 2, ["WQ1", "WV2"]),
                             argnums=(0, 1))(tensors["WQ1"], tensors["WV2"])[0][1]
    assert _close(h.evaluate(**tensors), ref)
    assert h.evaluate(**tensors).shape == ref.shape


@pytest.mark.parametrize("stack", ["attention+residual", "mlp"])
def test_hvp_matches_forward_over_reverse(stack):
    layers = 2
    net, tensors = _case(stack, layers, seed=7)
    name = depth.wrt(stack)
    v = torch.randn_like(tensors[name])
    hv = tn.simplify(net.hvp(name, "V"))
    f = _loss_of(stack, tensors, layers, [name])
    _, ref = torch.func.jvp(torch.func.grad(f), (tensors[name],), (v,))
    assert _close(hv.evaluate(V=v, **tensors), ref)
    assert _close(hv.compile()(V=v, **tensors), ref)


def test_pre_ln_stack_gradient_and_blocks():
    layers = 2
    net = tn.parse_network(depth.source("pre-ln", layers, dim=DIM))
    tensors = depth.inputs("pre-ln", layers, seq=SEQ, dim=DIM, seed=2)
    f = _loss_of("pre-ln", tensors, layers, ["WQ1", "WV2"])
    assert _close(net.evaluate(**tensors), f(tensors["WQ1"], tensors["WV2"]))
    g = tn.simplify(net.grads(["WQ1", "WV2"])).evaluate(**tensors)
    ref = torch.func.grad(f, argnums=(0, 1))(tensors["WQ1"], tensors["WV2"])
    assert _close(g["dWQ1"], ref[0]) and _close(g["dWV2"], ref[1])
    h = tn.simplify(net.hessian("WQ1", "WV2")).evaluate(**tensors)
    assert _close(h, torch.func.hessian(f, argnums=(0, 1))(tensors["WQ1"], tensors["WV2"])[0][1])


def test_simplify_drops_dead_and_zero_statements():
    net = tn.parse_network("h[n,o] = W[o,i]*x[n,i]\n"
                           "unused[n] = sum(h[n,o], o)\n"
                           "z[n,o] = 0*h[n,o]\n"
                           "y[n,o] = tanh(h[n,o]) + z[n,o]\n"
                           "loss = sum(y[n,o]*t[n,o])")
    s = tn.simplify(net)
    assert "unused" not in s and "z" not in s
    t = {"W": torch.randn(3, 2), "x": torch.randn(4, 2), "t": torch.randn(4, 3)}
    assert _close(s.evaluate(**t), net.evaluate(**t))


def test_outputs_header_and_several_outputs():
    net = tn.parse_network("# outputs: a, b\na[i] = x[i]*2\nb[i] = tanh(a[i])")
    assert net.outputs == ("a", "b")
    assert tn.parse_network(str(net)) == net
    x = torch.randn(3)
    out = net.evaluate(x=x)
    assert _close(out["a"], 2 * x) and _close(out["b"], torch.tanh(2 * x))


def test_redefined_name_and_unnamed_result():
    net = tn.parse_network("h[i] = x[i]*2\nh[i] = h[i]*h[i]\nsum(h[i])")
    assert net.names == ("h", "h_", "out")
    x = torch.randn(5)
    assert _close(net.evaluate(x=x), (4 * x * x).sum())


def test_errors_name_the_problem():
    net, tensors = _case("mlp", 2)
    with pytest.raises(tn.TNError, match="H1"):
        net.grad("H1")  # a statement, not an input
    with pytest.raises(tn.TNError, match="nope"):
        net.grad("nope")
    with pytest.raises(tn.TNError, match="defined later"):
        tn.Network([tn.network.Statement("a", tn.Variable("b", ["i"])),
                    tn.network.Statement("b", tn.Variable("x", ["i"]))])
    with pytest.raises(tn.TNError, match="axes"):
        tn.Network([tn.network.Statement("a", tn.Variable("x", ["i"])),
                    tn.network.Statement("b", tn.Variable("a", ["j"]))])
    with pytest.raises(tn.TNError, match="statement of the network"):
        net.evaluate(H1=torch.zeros(3, 4), **tensors)


# --- random chains of statements: the network's derivatives equal the inlined expression's ---

_OPS = ["h{k}[n,o] = tanh(W{k}[o,p]*{prev}[n,p])",
        "h{k}[n,o] = {prev}[n,o]*{prev}[n,o] + W{k}[o,o]*{prev}[n,o]",
        "h{k}[n,o] = softmax({prev}[n,p]*W{k}[p,o], o)",
        "h{k}[n,o] = {prev}[n,o] + {other}[n,p]*W{k}[p,o]",
        "h{k}[n,o] = exp({prev}[n,o]/2)*W{k}[o,p]*{other}[n,p]"]


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_OPS) - 1), st.integers(0, 10)), min_size=1,
                max_size=3), st.integers(0, 2**16))
def test_random_chains_match_inlined_expression(ops, seed):
    lines, names = [], ["x"]
    for k, (op, pick) in enumerate(ops, 1):
        lines.append(_OPS[op].format(k=k, prev=names[-1], other=names[pick % len(names)]))
        names.append(f"h{k}")
    lines.append(f"loss = sum({names[-1]}[n,o]*t[n,o])")
    text = "\n".join(lines)
    net = tn.parse_network(text, sizes={"n": 2, "o": 3, "p": 3})
    expr = tn.parse(text, sizes={"n": 2, "o": 3, "p": 3})
    gen = torch.Generator().manual_seed(seed)
    # entries of size ~0.5: three squaring statements in a row stay O(1) instead of saturating
    # the softmax, whose vanishing derivatives (~1e-28) would be compared on rounding noise
    tensors = {n: 0.5 * torch.randn(*[int(s) for s in v.axis_shape], generator=gen,
                                    dtype=torch.float64)
               for n, v in net.signature.items()}
    assert _close(net.evaluate(**tensors), tn.evaluate(expr, **tensors))
    for k in range(1, len(ops) + 1):
        w = f"W{k}"
        g = tn.simplify(net.grad(w))
        want = tn.evaluate(tn.grad(expr, w), **tensors)
        floor = want.abs().max().clamp_min(1e-12)  # a gradient that vanishes up to rounding
        assert _close(g.evaluate(**tensors), want, scale=floor)
        assert _close(g.compile()(**_given(g, tensors)), want, scale=floor)
    h = tn.simplify(net.hessian("W1", f"W{len(ops)}"))
    want = tn.evaluate(tn.hessian(expr, "W1", f"W{len(ops)}"), **tensors)
    floor = want.abs().max().clamp_min(1e-12)
    assert _close(h.evaluate(**tensors), want, scale=floor)
    assert _close(h.compile()(**_given(h, tensors)), want, scale=floor)


def _given(net, tensors):
    """The tensors a derived network's signature names (a block that folded to a constant
    keeps only some of its source's tensors)."""
    return {n: t for n, t in tensors.items() if n in net.signature}


def test_network_draws_one_diagram_per_statement(tmp_path):
    net, _ = _case("mlp", 2)
    g = tn.simplify(net.grad("W1"))
    text = (tmp_path / "grad.dot").read_text() if tn.draw(g, tmp_path / "grad.dot") else ""
    assert text.count("graph tnderive {") == len(g)
    for s in g:
        assert f'label="{s.name}[' in text


@pytest.mark.parametrize("stack", ["mlp", "attention+residual"])
def test_gauss_newton_part_matches_jacobian_products(stack):
    layers = 2
    net, tensors = _case(stack, layers, seed=11)
    params = ["W1", "W2"] if stack == "mlp" else ["WQ1", "WV2"]

    def model(*ws):  # the loss statement's input Z (H2 / X2), in plain torch
        t = dict(tensors)
        t.update(zip(params, ws))
        x = t["H0"] if stack == "mlp" else t["X0"]
        for l in range(1, layers + 1):
            if stack == "mlp":
                x = torch.tanh(x @ t[f"W{l}"].T)
            else:
                s = (x @ t[f"WQ{l}"]) @ (x @ t[f"WK{l}"]).T / math.sqrt(DIM)
                x = torch.softmax(s, dim=-1) @ x @ t[f"WV{l}"] + x
        return x

    ws = [tensors[p] for p in params]
    jac = torch.func.jacrev(model, argnums=(0, 1))(*ws)
    gn = tn.simplify(net.hessian_blocks(params, part="gauss_newton")).evaluate(**tensors)
    total = tn.simplify(net.hessian_blocks(params)).evaluate(**tensors)
    ref = torch.func.hessian(_loss_of(stack, tensors, layers, params), argnums=(0, 1))(*ws)
    for i, a in enumerate(params):
        for j, b in enumerate(params):
            ja, jb = jac[i].flatten(0, 1), jac[j].flatten(0, 1)
            want = 2 * torch.einsum("zab,zcd->abcd", ja, jb)  # ∂²ℓ/∂Z² = 2·I for Σ(Z − Y)²
            assert _close(gn[block_name(a, b)], want)
            assert _close(total[block_name(a, b)], ref[i][j])
    if stack == "mlp":  # tanh is not linear: the functional part is not zero
        assert not _close(gn[block_name("W1", "W1")], ref[0][0], tol=1e-3)


def test_tensor_output_reverse_forward_and_hessian_equal_the_inlined_ones():
    net = tn.parse_network("h[n,o] = tanh(W[o,i]*x[n,i])\ny[n,p] = V[p,o]*h[n,o]*h[n,o]",
                           sizes={"n": 2, "o": 3, "i": 4, "p": 5})
    expr = net.inline()
    gen = torch.Generator().manual_seed(4)
    t = {k: torch.randn(*[int(s) for s in v.axis_shape], generator=gen, dtype=torch.float64)
         for k, v in net.signature.items()}
    for ours, ref in ((net.grad("W"), tn.grad(expr, "W")), (net.jacobian("W"), tn.grad(expr, "W")),
                      (net.hessian("W", "V"), tn.hessian(expr, "W", "V"))):
        ours = tn.simplify(ours)
        assert len(ours.output.indices) == len(ref.indices)
        assert _close(ours.evaluate(**t), tn.evaluate(ref, **t))


# --- the compiled network: one generated function ---------------------------------------------

def test_compiled_network_is_one_function_with_named_statements():
    net, tensors = _case("attention+residual", 2, seed=4)
    g = tn.simplify(net.grad("WQ1"))
    c = g.compile()
    src = c.source
    assert src.count("\ndef ") == 4 and "def f(" in src  # _device_dtype, _tensor, _same, f
    assert [l for l in src.splitlines() if l.startswith(("import", "from"))] == ["import torch"]
    assert src.count("if _positional:") == 1  # arguments checked once
    assert "Contraction cost:" in src
    for s in c.statements[:-1]:  # every kept statement's value is a variable of its name
        assert f"    {s.name} = " in src
    assert "return dWQ1" in src
    ref = torch.func.grad(_loss_of("attention+residual", tensors, 2, ["WQ1"]))(tensors["WQ1"])
    assert _close(c(**tensors), ref)
    with pytest.raises(tn.TNError, match="WK1"):
        c(**{**tensors, "WK1": torch.randn(DIM + 1, DIM, dtype=torch.float64)})
    with pytest.raises(tn.TNError, match="nope"):
        c(nope=tensors["X0"], **tensors)


def test_compiled_network_specialises_per_shapes():
    net = tn.parse_network(depth.source("attention", 2, dim=DIM))  # the 1/sqrt(d) fixes d
    g = tn.simplify(net.grad("WQ1"))
    c = g.compile()
    for seq in (3, 5):
        tensors = depth.inputs("attention", 2, seq=seq, dim=DIM, seed=seq)
        ref = torch.func.grad(_loss_of("attention", tensors, 2, ["WQ1"]))(tensors["WQ1"])
        assert _close(c(**tensors), ref)
        assert _close(c(**tensors), g.evaluate(**tensors))
    assert len(c.specialisations) == 2
    assert all("planned for sizes" in src for src in c.specialisations.values())


def test_compiled_network_shares_equal_work_across_statements():
    net = tn.parse_network("a[i,j] = tanh(x[i,k]*W[k,j])\n"
                           "b[i,j] = tanh(x[i,k]*W[k,j])\n"
                           "c[i,j] = exp(a[i,j]) + exp(b[i,j])\n"
                           "loss = sum(c[i,j]*a[i,j])")
    c = net.compile()
    assert c.source.count("torch.tanh(") == 1  # b is a: computed once
    x, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    a = torch.tanh(x @ w)
    assert _close(c(x=x, W=w), (2 * torch.exp(a) * a).sum())
    assert _close(c(x=x, W=w), net.evaluate(x=x, W=w))


def test_compiled_network_with_several_outputs():
    net = tn.parse_network("# outputs: a, b, c\na[i] = x[i]*2\nb[i] = tanh(a[i])\nc[i] = x[i]*2")
    x = torch.randn(3, dtype=torch.float64)
    out = net.compile()(x=x)
    want = net.evaluate(x=x)
    assert list(out) == list(want) == ["a", "b", "c"]
    for k in want:
        assert _close(out[k], want[k])


def test_compiled_network_matrix_products_in_every_layout():
    """Two-operand contractions are emitted as `@` (with `.mT`): matrix-vector, vector-matrix,
    dot, and a product whose output is transposed."""
    net = tn.parse_network("# outputs: h, g, d, P, Q\n"
                           "h[i] = W[i,j]*x[j]\n"
                           "g[j] = y[i]*W[i,j]\n"
                           "d = h[i]*y[i]\n"
                           "P[j,k] = W[i,j]*B[k,i]\n"
                           "Q[k,j] = W[i,j]*B[k,i] + W[i,j]*W[i,k]")
    gen = torch.Generator().manual_seed(2)
    W, B = (torch.randn(3, 4, generator=gen, dtype=torch.float64),
            torch.randn(4, 3, generator=gen, dtype=torch.float64))
    x, y = (torch.randn(4, generator=gen, dtype=torch.float64),
            torch.randn(3, generator=gen, dtype=torch.float64))
    out = net.compile()(W=W, B=B, x=x, y=y)
    assert " @ " in net.compile().source
    want = {"h": W @ x, "g": y @ W, "d": (W @ x) @ y, "P": W.T @ B.T, "Q": (W.T @ B.T).T + W.T @ W}
    for k, v in want.items():
        assert _close(out[k], v), k


def test_compiled_network_broadcast_products():
    net = tn.parse_network("# outputs: a, b, p\na[i,j] = A[i,j]*v[i]\nb[i,j] = u[j]*A[i,j]\n"
                           "p[j,i] = A[i,j]*C[j,i]")
    A, v, u = (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64),
               torch.randn(4, dtype=torch.float64))
    C = torch.randn(4, 3, dtype=torch.float64)
    c = net.compile()
    out = c(A=A, v=v, u=u, C=C)
    assert "[:, None]" in c.source and "[None, :]" in c.source and "einsum" not in c.source
    assert _close(out["a"], A * v[:, None]) and _close(out["b"], A * u[None, :])
    assert _close(out["p"], A.T * C)


def test_compile_rejects_a_name_that_clashes_with_a_temporary():
    net = tn.parse_network("a[i] = x[i]*x[i]\nb[i] = a[i] + a_t0[i]\nloss = sum(b[i])")
    with pytest.raises(tn.TNError, match="a_t0"):
        net.compile()


def test_derived_networks_keep_the_source_signature():
    """DESIGN "Signatures": the tensors that evaluate a network evaluate every derivative of
    it, also after simplification folded a statement or substituted an adjoint away."""
    net = tn.parse_network("h1[n,o] = tanh(W1[o,i]*x[n,i])\n"
                           "h2[n,p] = tanh(W2[p,o]*h1[n,o])\n"
                           "loss = sum((h2[n,p] - t[n,p])**2)")
    g = torch.Generator().manual_seed(3)
    T = {k: torch.randn(*s, generator=g, dtype=torch.float64)
         for k, s in dict(W1=(3, 4), x=(5, 4), W2=(2, 3), t=(5, 2)).items()}
    for derived in (tn.simplify(net.grad("W1")),
                    tn.simplify(net.hessian_blocks(pairs=[("W2", "W2")]))):
        assert list(derived.signature) == list(net.signature)
        assert torch.allclose(derived.compile()(**T), derived.evaluate(**T), rtol=1e-12)


def test_compiled_network_runs_under_vmap_without_autograd():
    """Generated network code makes no in-place step by default: under torch.func.vmap an
    intermediate of the weights alone (unbatched) cannot take a batched operand in place.
    `compile(inplace=True)` (KFAC's internal pass) writes in place, with the same values."""
    net = tn.parse_network("a[o] = W[o,k]*u[k]\nb[o] = exp(x[o])\ny[o] = a[o]*b[o]",
                           sizes={"o": 3, "k": 2})
    gen = torch.Generator().manual_seed(0)
    W, u, X = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((3, 2), (2,), (5, 3)))
    want = torch.stack([(W @ u) * x.exp() for x in X])
    f = net.compile()
    with torch.no_grad():
        got = torch.func.vmap(lambda x: f(W=W, u=u, x=x))(X)
    assert "_fresh" not in f.source and _close(got, want)
    g = net.compile(inplace=True)
    assert ".mul_(" in g.source
    with torch.no_grad():
        assert _close(torch.stack([g(W=W, u=u, x=x) for x in X]), want)
