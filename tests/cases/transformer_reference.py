"""Reference Hessian blocks of transformer models from torch.func, shared by the transformer
tests (built-in and imported models alike: anything with `torch_loss(**tensors)`). Holds no
tests itself."""
from __future__ import annotations

import torch
from torch.func import hessian


def torch_hessian(model, T: dict, p: str, q: str) -> torch.Tensor:
    """d²ℓ / dp dq [p's axes, q's axes] by torch.func.hessian of `model.torch_loss` at the
    tensors T (float64)."""
    def loss(a, b):
        t = dict(T)
        t[p] = a
        t[q] = b if q != p else a + b      # p = q: the Hessian of ℓ(a + b) in (a, b) is ∂²ℓ
        return model.torch_loss(**t)
    return hessian(loss, argnums=(0, 1))(T[p], T[q] if q != p else torch.zeros_like(T[q]))[0][1]
