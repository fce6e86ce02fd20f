"""evaluate checks the memory a result needs before allocating it (issue 12, B7)."""
from __future__ import annotations

import pytest
import torch

import tnderive as tn
import tnderive.memory as memory


def test_too_large_result_is_a_tnerror(monkeypatch):
    """The Hessian of a 300x300 W has 8.1e9 entries: a TNError naming the entries, the bytes
    and the alternatives, raised before anything is allocated."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 16 * 10**9)
    e = tn.parse("loss = sum(W[o,i]*W[o,i]*c[o])")
    h = tn.hessian(e, "W", "W")
    W, c = torch.randn(300, 300, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    with pytest.raises(tn.TNError) as err:
        tn.evaluate(h, W=W, c=c)
    text = str(err.value)
    assert "8,100,000,000 entries" in text and "64.8 GB" in text and "16.0 GB" in text
    assert "compile" in text and "vjp" in text
    small = tn.evaluate(h, W=W[:3, :4], c=c[:3])  # a result that fits still evaluates
    assert small.shape == (3, 4, 3, 4)


def test_larger_than_any_machine_without_patching():
    """4e14 entries (1.6 PB as float32): refused on any machine, allocation never tried."""
    e = tn.parse("y[a,b,c,d] = u[a]*u[b]*u[c]*u[d]")
    with pytest.raises(tn.TNError, match="entries"):
        tn.evaluate(e, u=torch.randn(4500))


def test_large_intermediate_is_named(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**6)
    monkeypatch.setattr(memory, "ALWAYS_FITS", 0)   # an 8 MB intermediate is checked too
    e = tn.parse("t[a,b] = tanh(u[a]*u[b])\ns = sum(t[a,b])")
    with pytest.raises(tn.TNError, match=r"intermediate \[a,b\]"):
        tn.evaluate(e, u=torch.randn(1000))


def test_an_intermediate_the_program_never_allocates_is_not_refused(monkeypatch):
    """The check reads the lowered program, not the expression tree: the inner product
    t[a,b] = u[a]*u[b] (8 MB as a tree node) is contracted with v without being formed, so a
    1 MB limit does not refuse it (the attention benchmark's Q-Q block has a 34 GB tree node
    and needs 0.6 GB)."""
    monkeypatch.setattr(memory, "available_bytes", lambda device: 10**6)
    monkeypatch.setattr(memory, "ALWAYS_FITS", 0)
    e = tn.parse("t[a,b] = u[a]*u[b]\ns = sum(t[a,b]*v[a]*v[b])")
    u, v = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(tn.evaluate(e, u=u, v=v), (u @ v) ** 2, rtol=1e-12, atol=0)


def test_available_bytes_of_this_machine_is_positive():
    n = memory.available_bytes("cpu")
    assert n is None or n > 0
