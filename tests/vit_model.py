"""A ViT-style model for the operator tests: patchify conv, one pre-LN block (self-attention,
GELU MLP), final LayerNorm, mean pooling, linear head."""
from __future__ import annotations

from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2, depth: int = 1, classes: int = 3, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))
