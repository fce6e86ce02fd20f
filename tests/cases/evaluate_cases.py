"""Index-notation test cases kept as data: (id, notation, input shapes, torch reference).

Used by test_evaluate.py (values vs hand-written torch) and test_notation.py (round trip).
`positive` cases get inputs in [0.5, 1.5) (for log / sqrt).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch



@dataclass(frozen=True)
class Case:
    id: str
    text: str
    shapes: dict
    ref: Callable
    positive: bool = False
    sizes: dict | None = field(default=None)


MLP = """
z[n,o] = W[o,i] * x[n,i]
y[n,o] = tanh(z[n,o] + b[o])
loss = sum((y[n,o] - t[n,o])**2) / 2
"""

ATTENTION = """
S[q,k] = Q[q,d] * K[k,d]
A[q,e] = softmax(S[q,k] / 2, k) * V[k,e]
"""

CASES = [
    Case("hadamard", "h[n,o] = a[n,o]*b[n,o]", {"a": (2, 3), "b": (2, 3)}, lambda a, b: a * b),
    Case("dot", "s = a[i]*b[i]", {"a": (4,), "b": (4,)}, lambda a, b: a @ b),
    Case("matvec", "y[o] = W[o,i]*x[i]", {"W": (3, 4), "x": (4,)}, lambda W, x: W @ x),
    Case("linear", "z[n,o] = W[o,i]*x[n,i]", {"W": (3, 4), "x": (2, 4)}, lambda W, x: x @ W.T),
    Case("linear-transposed-target", "y[o,n] = W[o,i]*x[n,i]", {"W": (3, 4), "x": (2, 4)},
         lambda W, x: W @ x.T),
    Case("transpose", "y[j,i] = A[i,j]", {"A": (2, 3)}, lambda A: A.T),
    Case("hyperedge-3", "y[i] = a[i]*b[i]*c[i]", {"a": (4,), "b": (4,), "c": (4,)},
         lambda a, b, c: a * b * c),
    Case("hyperedge-3-summed", "s = a[i]*b[i]*c[i]", {"a": (4,), "b": (4,), "c": (4,)},
         lambda a, b, c: (a * b * c).sum()),
    Case("hyperedge-matrices", "y[n] = A[n,i]*B[n,i]*C[n,i]", {"A": (2, 3), "B": (2, 3), "C": (2, 3)},
         lambda A, B, C: (A * B * C).sum(1)),
    Case("batched-matmul", "C[b,i,k] = A[b,i,j]*B[b,j,k]", {"A": (2, 3, 4), "B": (2, 4, 5)},
         lambda A, B: A @ B),
    Case("quadratic-form", "s = x[i]*A[i,j]*x[j]", {"x": (3,), "A": (3, 3)}, lambda x, A: x @ A @ x),
    Case("gram-repeated-variable", "G[s,t] = X[s,d]*X[t,d]", {"X": (3, 4)}, lambda X: X @ X.T),
    Case("implicit-sum", "s = a[i]", {"a": (5,)}, lambda a: a.sum()),
    Case("implicit-sum-product", "y[n] = W[o,i]*x[n,i]", {"W": (3, 4), "x": (2, 4)},
         lambda W, x: (x @ W.T).sum(1)),
    Case("nested-functions", "y[n,o] = tanh(exp(W[o,i]*x[n,i]) + b[o])",
         {"W": (3, 4), "x": (2, 4), "b": (3,)}, lambda W, x, b: torch.tanh(torch.exp(x @ W.T) + b)),
    Case("mlp-program", MLP, {"W": (3, 4), "x": (2, 4), "b": (3,), "t": (2, 3)},
         lambda W, x, b, t: ((torch.tanh(x @ W.T + b) - t) ** 2).sum() / 2),
    Case("program-renamed-reuse", "z[i,j] = A[i,k]*B[k,j]\ny[i,j] = z[j,i] + z[i,j]",
         {"A": (3, 4), "B": (4, 3)}, lambda A, B: (A @ B).T + A @ B),
    Case("program-scalar-reuse", "s = a[i]*b[i]\ny[i] = s*a[i]", {"a": (3,), "b": (3,)},
         lambda a, b: (a @ b) * a),
    Case("softmax", "p[n,k] = softmax(W[k,i]*x[n,i], k)", {"W": (3, 4), "x": (2, 4)},
         lambda W, x: torch.softmax(x @ W.T, 1)),
    Case("logsumexp", "l[n] = logsumexp(a[n,k], k)", {"a": (2, 5)}, lambda a: torch.logsumexp(a, 1)),
    Case("cross-entropy", "loss = sum(logsumexp(z[n,k], k)) - sum(z[n,k]*t[n,k])",
         {"z": (2, 4), "t": (2, 4)},
         lambda z, t: torch.logsumexp(z, 1).sum() - (z * t).sum()),
    Case("attention", ATTENTION, {"Q": (2, 3), "K": (4, 3), "V": (4, 5)},
         lambda Q, K, V: torch.softmax(Q @ K.T / 2, 1) @ V),
    Case("diagonal", "d[i] = A[i,i]", {"A": (3, 3)}, lambda A: A.diagonal()),
    Case("trace", "s = A[i,i]", {"A": (3, 3)}, lambda A: A.trace()),
    Case("diagonal-in-product", "y[i] = A[i,i]*x[i]", {"A": (3, 3), "x": (3,)},
         lambda A, x: A.diagonal() * x),
    Case("delta-identity", "y[i] = delta[i,j]*x[j]", {"x": (4,)}, lambda x: x),
    Case("delta-diag", "D[i,j] = delta[i,j]*a[i]", {"a": (3,)}, lambda a: torch.diag(a)),
    Case("delta-hyperedge", "y[i,j,k] = delta[i,j,k]*a[i]", {"a": (3,)},
         lambda a: torch.einsum("i,ij,ik->ijk", a, torch.eye(3), torch.eye(3))),
    Case("scalar-broadcast", "y[i] = a[i] + 2", {"a": (3,)}, lambda a: a + 2),
    Case("bias-broadcast", "y[n,o] = x[n,o] + b[o]", {"x": (2, 3), "b": (3,)}, lambda x, b: x + b),
    Case("powers-division", "y[i] = a[i]**2/2 - 3*b[i]", {"a": (3,), "b": (3,)},
         lambda a, b: a ** 2 / 2 - 3 * b),
    Case("log-sqrt", "y[i] = log(a[i]) + sqrt(b[i]) - a[i]**(-1)", {"a": (3,), "b": (3,)},
         lambda a, b: torch.log(a) + torch.sqrt(b) - 1 / a, positive=True),
    Case("sum-over-index", "y[i] = sum(A[i,j]*B[j,k], k)", {"A": (2, 3), "B": (3, 4)},
         lambda A, B: (A @ B).sum(1)),
    Case("sum-all", "s = sum(A[i,j]*B[j,k])", {"A": (2, 3), "B": (3, 4)}, lambda A, B: (A @ B).sum()),
    Case("scope-in-function", "s = tanh(a[i]*b[i])*c[j]", {"a": (3,), "b": (3,), "c": (2,)},
         lambda a, b, c: torch.tanh(a @ b) * c.sum()),
    Case("keep-outside-scope", "s = tanh(a[i]*b[i])*c[i]", {"a": (3,), "b": (3,), "c": (3,)},
         lambda a, b, c: (torch.tanh(a * b) * c).sum()),
    Case("sigmoid-relu", "y[n] = sigmoid(relu(w[i]*x[n,i]))", {"w": (4,), "x": (2, 4)},
         lambda w, x: torch.sigmoid(torch.relu(x @ w))),
    Case("scalar-variable", "y[i] = -a[i]*c + c", {"a": (3,), "c": ()}, lambda a, c: -a * c + c),
    Case("mse", "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)/2", {"W": (3, 4), "x": (2, 4), "y": (2, 3)},
         lambda W, x, y: ((x @ W.T - y) ** 2).sum() / 2),
    Case("parenthesised-sum-factor", "y[n] = (a[n,i] + b[n,i])*c[i]", {"a": (2, 3), "b": (2, 3), "c": (3,)},
         lambda a, b, c: (a + b) @ c),
    Case("bare-expression", "W[o,i]*x[i]", {"W": (3, 4), "x": (4,)}, lambda W, x: W @ x),
    Case("int-sizes", "y[n,o] = W[o,i]*x[n,i]", {"W": (3, 4), "x": (2, 4)}, lambda W, x: x @ W.T,
         sizes={"n": 2, "o": 3, "i": 4}),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in case.shapes.items():
        if case.positive:
            out[name] = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        else:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float64)
    return out
