"""A ResNet-style CNN for the operator tests and benchmarks/operators.py: a 3x3 stem, residual
blocks (a strided one gets a 1x1 skip conv), global average pooling, a linear head."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Block(nn.Module):
    """Residual block: Conv3x3(s)–ReLU–Conv3x3, plus the input (a strided 1x1 conv when the
    shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x):
        h = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(h + (x if self.skip is None else self.skip(x)))


class ResNet(nn.Module):
    """Stem Conv3x3(in_channels → widths[0])–ReLU, one block per later width (with its
    stride), global average pool, Linear(widths[-1] → classes)."""

    def __init__(self, in_channels: int, widths: Sequence[int], strides: Sequence[int],
                 classes: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.Sequential(*[Block(a, b, s) for a, b, s in
                                      zip(widths[:-1], widths[1:], strides)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        h = self.blocks(torch.relu(self.stem(x)))
        return self.head(torch.flatten(self.pool(h), 1))
