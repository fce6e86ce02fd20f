"""A torch model whose output mixes the samples of a batch (it subtracts the batch mean), shared
by the operator tests: no per-sample Jacobian, so micro-batches and the GGN diagonal refuse it
or fall back to whole batches. Holds no tests itself."""
from __future__ import annotations

from torch import nn


class Centred(nn.Module):
    """Linear(4 → 3) of x minus the batch mean of x."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0))
