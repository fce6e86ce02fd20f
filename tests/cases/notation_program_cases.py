"""The notation programs of README.md, gallery/*.py and examples/*.tn, each written a second time by hand with
every product in its own statement (`split`), as data for test_notation_programs.py.

In its own statement a product's keep rule is plain einsum: it keeps its target and sums the
rest, so the split spelling says explicitly which indices each product of the original keeps.
`split=None`: the program already has one product per statement (checked by the test).
A program added to the README or the gallery must be added here (the test lists it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    id: str
    text: str
    split: str | None = None


PROGRAMS = [
    # ---- README ------------------------------------------------------------------------------
    Program("readme-tour", "z[n,o] = W[o,i]*x[n,i]\nloss = sum((tanh(z[n,o]) - t[n,o])**2) / 2"),
    Program("readme-mlp", "z[n,o] = W[o,i] * x[n,i]\ny[n,o] = tanh(z[n,o] + b[o])\n"
                          "loss = sum((y[n,o] - t[n,o])**2) / 2"),
    Program("readme-gelu", "loss = sum(gelu(W[o,i]*x[n,i])**2)",
            "z = W[o,i]*x[n,i]\nloss = sum(gelu(z)**2)"),
    Program("readme-quadratic", "q = x[i]*A[i,j]*x[j]"),
    Program("readme-cross-entropy", "loss = sum(t[c])*logsumexp(z[c], c) - sum(t[c]*z[c])",
            "p = sum(t[c])*logsumexp(z[c], c)\nq = t[c]*z[c]\nloss = p - q"),
    Program("readme-linear-regression", "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)",
            "z[n,o] = W[o,i]*x[n,i]\nloss = sum((z[n,o] - y[n,o])**2)"),
    Program("readme-layer", "y[n,o] = tanh(W[o,i]*x[n,i] + b[o])",
            "z[n,o] = W[o,i]*x[n,i]\ny[n,o] = tanh(z[n,o] + b[o])"),
    Program("readme-conv", "y[n,c,o] = W[c,e,k]*x[n,e,i]*pattern(stride=2, padding=1)[k,o,i]"),
    Program("readme-mlp-curvature", "h[n,h] = tanh(W1[h,i]*x[n,i] + b1[h])\n"
                                    "f[n,c] = W2[c,h]*h[n,h] + b2[c]",
            "z[n,h] = W1[h,i]*x[n,i]\nh[n,h] = tanh(z[n,h] + b1[h])\n"
            "g[n,c] = W2[c,h]*h[n,h]\nf[n,c] = g[n,c] + b2[c]"),
    Program("readme-cli-sequence", "y[n,s,o] = W[o,i]*x[n,s,i]"),
    Program("readme-cli-linear", "y[n,o] = W[o,i]*x[n,i]"),
    Program("readme-cli-z", "z[n,o] = W[o,i]*x[n,i]"),
    Program("readme-cli-tour", "z[n,o] = W[o,i]*x[n,i]\nloss = sum((tanh(z[n,o]) - t[n,o])**2)/2"),
    Program("readme-cli-sequence-bias", "y[n,s,o] = W[o,i]*x[n,s,i] + b[o]",
            "z[n,s,o] = W[o,i]*x[n,s,i]\ny[n,s,o] = z[n,s,o] + b[o]"),
    Program("readme-cli-two-layer", "f[n,c] = V[c,o]*tanh(W[o,i]*x[n,i])",
            "z[n,o] = W[o,i]*x[n,i]\nf[n,c] = V[c,o]*tanh(z[n,o])"),
    Program("readme-hadamard", "h[n,o] = a[n,o]*b[n,o]"),
    Program("readme-dot", "s = a[i]*b[i]"),
    Program("readme-nested-keep", "y[n] = tanh(W[o,i]*x[n,i]) * v[o]",
            "z[n,o] = W[o,i]*x[n,i]\ny[n] = tanh(z[n,o])*v[o]"),
    Program("readme-implicit-sum", "s = tanh(a[i])"),
    Program("readme-quadratic-form", "s = x[i]*A[i,j]*x[j]"),
    Program("readme-bilinear", "y[n,o] = W[o,i,j]*x[n,i]*z[n,j]"),
    Program("readme-pattern-split", "Π[k,o,i] = split[i,o,k]"),
    Program("readme-scope-relu", "l = sum(relu(W[o,i]*x[n,i])**2) + sum(W[o,i]*W[o,i]*c[o])",
            "z = W[o,i]*x[n,i]\nq = W[o,i]*W[o,i]*c[o]\nl = sum(relu(z)**2) + sum(q)"),
    Program("readme-scope-tanh", "s = sum(tanh(a[i])**3) + a[i]*M[i,j]*a[j]*a[j]",
            "q = a[i]*M[i,j]*a[j]*a[j]\ns = sum(tanh(a[i])**3) + q"),
    Program("readme-scope-matmul", "l = sum(relu(sum(W[o,i]*x[n,i], keep=(n, o)))**2)",
            "z[n,o] = W[o,i]*x[n,i]\nl = sum(relu(z[n,o])**2)"),
    Program("readme-scope-lse", "s = logsumexp(a[k], k) + a[k]*b[k]",
            "q = a[k]*b[k]\ns = logsumexp(a[k], k) + q"),
    Program("readme-scope-cross-entropy", "loss = sum(t[c])*logsumexp(z[c], c) - t[c]*z[c]",
            "p = sum(t[c])*logsumexp(z[c], c)\nq = t[c]*z[c]\nloss = p - q"),
    Program("readme-scope-same-sum", "s = sum(tanh(W[o,i]*x[n,i]) * v[o])",
            "z[o] = W[o,i]*x[n,i]\ns = tanh(z[o])*v[o]"),
    Program("readme-scope-target", "y[o] = sum(tanh(W[o,i]*a[i])) * v[o]",
            "z[o] = W[o,i]*a[i]\ny[o] = sum(tanh(z[o]))*v[o]"),
    Program("readme-codegen-out", "out[n,s,o] = W[o,i]*x[n,s,i] + b[o]",
            "z[n,s,o] = W[o,i]*x[n,s,i]\nout[n,s,o] = z[n,s,o] + b[o]"),
    Program("readme-signature-hessian", "l = sum(W[o,i]*W[o,i]*c[o])",
            "q = W[o,i]*W[o,i]*c[o]\nl = sum(q)"),
    Program("readme-size-coefficient", "l = sum((W[o,i]*x[n,i] + b[o] - t[n,o])**2) + sum(b[o]*b[o])",
            "z[n,o] = W[o,i]*x[n,i]\nq = b[o]*b[o]\nl = sum((z[n,o] + b[o] - t[n,o])**2) + sum(q)"),
    Program("readme-mean", "loss = sum((y[n,o] - t[n,o])**2) / size(n)"),
    Program("examples-layer", "y[n,c,o1,o2] = W[c,e,k1,k2]*x[n,e,i1,i2]*pattern(stride=1, padding=1)"
                              "[k1,o1,i1]*pattern(stride=1, padding=1)[k2,o2,i2]"),
    # ---- gallery -----------------------------------------------------------------------------
    Program("gallery-01", "loss = sum((W[o,i]*x[n,i] - y[n,o])**2)",
            "z[n,o] = W[o,i]*x[n,i]\nloss = sum((z[n,o] - y[n,o])**2)"),
    Program("gallery-02", "loss = sum(logsumexp(z[n,c], c)) - sum(t[n,c]*z[n,c])",
            "p = t[n,c]*z[n,c]\nloss = sum(logsumexp(z[n,c], c)) - p"),
    Program("gallery-03", "h[n,j] = tanh(W1[j,i]*x[n,i] + b1[j])\nz[n,c] = W2[c,j]*h[n,j] + b2[c]",
            "a[n,j] = W1[j,i]*x[n,i]\nh[n,j] = tanh(a[n,j] + b1[j])\n"
            "g[n,c] = W2[c,j]*h[n,j]\nz[n,c] = g[n,c] + b2[c]"),
    Program("gallery-04", "y[n,c,o1,o2] = W[c,e,k1,k2]*x[n,e,i1,i2]"
                          "*pattern(stride=2, padding=1)[k1,o1,i1]*pattern(stride=2, padding=1)[k2,o2,i2]"),
    Program("gallery-05-dense", "y[n,c,o] = W[c,e,k]*x[n,e,i]*pattern(stride=4)[k,o,i]"),
    Program("gallery-05-downsample", "y[n,c,o] = W[c,e,k]*x[n,e,i]*pattern(stride=3)[k,o,i]"),
    Program("gallery-07-bilinear", "y[n,o] = W[o,i,j]*x[n,i]*z[n,j]"),
    Program("gallery-07-low-rank", "y[n,o] = U[o,r]*V[r,i]*x[n,i]"),
    Program("gallery-09", "f = x[i]*A[i,j]*x[j]"),
    Program("gallery-10", "h[n,j] = swish(W[j,i]*x[n,i])\nloss = sum((V[c,j]*h[n,j] - y[n,c])**2)",
            "a[n,j] = W[j,i]*x[n,i]\nh[n,j] = swish(a[n,j])\nf[n,c] = V[c,j]*h[n,j]\n"
            "loss = sum((f[n,c] - y[n,c])**2)"),
]
