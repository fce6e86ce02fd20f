"""Drop-in replacements for torch.nn.functional convolutions, computed as tensor networks.

Each call builds (once per shapes and hyperparameters, cached) the layer's network from
`tnderive.nn.conv` and evaluates it with patterns applied as strided views
(`tnderive.evaluate`: lowered once per shape; convolution products become calls of
torch's convolution kernels, `codegen.convolution`). Inputs and outputs are torch tensors in torch layout.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import TNError
from .conv import Network, conv_network, conv_transpose_network, fold_network, unfold_network

__all__ = ["conv1d", "conv2d", "conv3d", "convnd", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d", "conv_transposend", "unfold", "fold"]


def _key(v):
    """Hashable form of a hyperparameter (lists -> tuples)."""
    if isinstance(v, list):
        return tuple(_key(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_key(x) for x in v)
    return v


def _check(t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TNError(f"{what} must be a torch.Tensor, got {type(t).__name__}")


def _batched(input: torch.Tensor, run) -> torch.Tensor:
    """`run(input)`, also for an empty batch (torch accepts N = 0; a network's sizes are
    positive): then run on one zero sample appended to the input and keep no rows, so the
    result has torch's shape and stays connected to the inputs for autograd."""
    if input.dim() == 0 or input.shape[0] != 0:
        return run(input)
    one = torch.cat([input, input.new_zeros((1, *input.shape[1:]))])
    return run(one)[:0]


@lru_cache(maxsize=512)
def _conv_net(xs, ws, stride, padding, dilation, groups, bias) -> Network:
    return conv_network(xs, ws, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        bias=bias)


def convnd(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
           padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """N-d convolution (any number of spatial dims); padding may also be (left, right) per dim."""
    _check(input, "input")
    _check(weight, "weight")
    if input.dim() != weight.dim():
        raise TNError(f"input of shape {tuple(input.shape)} and weight of shape {tuple(weight.shape)} "
                      f"have different ranks")
    if bias is not None:
        _check(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise TNError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")

    def run(x: torch.Tensor) -> torch.Tensor:
        net = _conv_net(tuple(x.shape), tuple(weight.shape), _key(stride), _key(padding),
                        _key(dilation), groups, bias is not None)
        return net(x, weight, bias) if bias is not None else net(x, weight)
    return _batched(input, run)


def _fixed(d: int, name: str, general, what: str):
    """`general` (convnd / conv_transposend) restricted to d spatial dims, named like torch's."""
    def fixed(input, weight, bias=None, *args, **kwargs):
        _check(input, "input")
        if input.dim() != d + 2:
            raise TNError(f"{name} expects input [N, C, {d} spatial dims], got shape {tuple(input.shape)}")
        return general(input, weight, bias, *args, **kwargs)
    fixed.__name__ = fixed.__qualname__ = name
    fixed.__doc__ = f"{d}-d {what}, drop-in for torch.nn.functional.{name}."
    return fixed


conv1d = _fixed(1, "conv1d", convnd, "convolution")
conv2d = _fixed(2, "conv2d", convnd, "convolution")
conv3d = _fixed(3, "conv3d", convnd, "convolution")


@lru_cache(maxsize=512)
def _convt_net(xs, ws, stride, padding, output_padding, dilation, groups, bias) -> Network:
    return conv_transpose_network(xs, ws, stride=stride, padding=padding, output_padding=output_padding,
                                  dilation=dilation, groups=groups, bias=bias)


def conv_transposend(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1) -> torch.Tensor:
    """N-d transpose convolution (torch argument order)."""
    _check(input, "input")
    _check(weight, "weight")

    def run(x: torch.Tensor) -> torch.Tensor:
        net = _convt_net(tuple(x.shape), tuple(weight.shape), _key(stride), _key(padding),
                         _key(output_padding), _key(dilation), groups, bias is not None)
        return net(x, weight, bias) if bias is not None else net(x, weight)
    return _batched(input, run)


conv_transpose1d = _fixed(1, "conv_transpose1d", conv_transposend, "transpose convolution")
conv_transpose2d = _fixed(2, "conv_transpose2d", conv_transposend, "transpose convolution")
conv_transpose3d = _fixed(3, "conv_transpose3d", conv_transposend, "transpose convolution")


@lru_cache(maxsize=512)
def _unfold_net(xs, kernel_size, dilation, padding, stride) -> Network:
    return unfold_network(xs, kernel_size, dilation=dilation, padding=padding, stride=stride)


def unfold(input: torch.Tensor, kernel_size, dilation=1, padding=0, stride=1) -> torch.Tensor:
    """im2col: [N, C, *I] -> [N, C·ΠK, L] (torch.nn.functional.unfold; any number of dims)."""
    _check(input, "input")
    return _batched(input, lambda x: _unfold_net(tuple(x.shape), _key(kernel_size), _key(dilation),
                                                 _key(padding), _key(stride))(x))


@lru_cache(maxsize=512)
def _fold_net(us, output_size, kernel_size, dilation, padding, stride) -> Network:
    return fold_network(us, output_size, kernel_size, dilation=dilation, padding=padding, stride=stride)


def fold(input: torch.Tensor, output_size, kernel_size, dilation=1, padding=0, stride=1) -> torch.Tensor:
    """col2im: [N, C·ΠK, L] -> [N, C, *output_size] (torch.nn.functional.fold; any dims)."""
    _check(input, "input")
    return _batched(input, lambda x: _fold_net(tuple(x.shape), _key(output_size), _key(kernel_size),
                                               _key(dilation), _key(padding), _key(stride))(x))
