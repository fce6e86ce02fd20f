"""Walk a torch.fx graph of a module and write one notation statement per op.

`torch.fx.symbolic_trace` keeps torch.nn layers as single `call_module` nodes (with their
module path), so each layer maps to one notation builder (tnderive.models.layers) and its
parameters keep their `named_parameters()` names. Shapes come from running the graph once on
the example inputs (`ShapeProp`); sizes in the notation are those numbers.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import TNError
from . import layers as L
from .program import Act, Program


class _Tracer(fx.Tracer):
    """fx's tracer, with modules that have a user-registered notation kept as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in L.USER_MODULES or super().is_leaf_module(m, qualname)


def _shape(meta):
    if isinstance(meta, TensorMetadata):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (tuple, list)):
        return tuple(_shape(m) for m in meta)
    return None


def _has_tensor(values) -> bool:
    flat = []
    fx.node.map_aggregate(values, flat.append)
    return any(isinstance(v, (Act, L.IntInput, L.NoWeights)) for v in flat)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return ""


def _fn_name(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    return f"{mod}.{getattr(fn, '__name__', repr(fn))}".lstrip(".")


def trace(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[Program, Act]:
    """The program of `module` at the shapes of `example_inputs`, and its output."""
    if L.module_builder(module) is not None:
        return _trace_layer(module, example_inputs)
    tracer = _Tracer()
    graph = tracer.trace(module)
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    program = Program()
    env: dict[fx.Node, object] = {}
    position = 0
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if position >= len(example_inputs):
                raise TNError(f"input {node.name!r} of {type(module).__name__}.forward has no "
                              f"example input (got {len(example_inputs)})")
            t = example_inputs[position]
            base = "x" if node.target == "input" else node.target
            if t.is_floating_point():
                env[node] = program.add_input(base, t.shape, position)
            elif t.dtype == torch.bool:  # an attention mask: enters additively
                env[node] = program.add_input(base, t.shape, position, mask=True)
            else:
                env[node] = L.IntInput(base, tuple(t.shape), position)
            position += 1
        elif node.op == "get_attr":
            value = _get(module, node.target)
            if isinstance(value, nn.Parameter):
                env[node] = program.param(node.target, value.shape)
            elif isinstance(value, torch.Tensor):
                env[node] = program.buffer(node.target, value.shape)
            else:
                env[node] = value
        elif node.op == "output":
            output = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = _call(program, module, node, env)
    if not isinstance(output, Act):
        raise TNError(f"{type(module).__name__}: the output must be one floating-point tensor, "
                      f"got {type(output).__name__}")
    return program, output


def _trace_layer(module: nn.Module, example_inputs: Sequence[torch.Tensor]) -> tuple[Program, Act]:
    """A module that is one layer with a notation (nn.Linear, ...): its builder, no fx."""
    program = Program()
    args = [program.add_input(f"x{j + 1}" if len(example_inputs) > 1 else "x", t.shape, j)
            if t.is_floating_point() else L.IntInput("x", tuple(t.shape), j)
            for j, t in enumerate(example_inputs)]
    with torch.no_grad():
        out = module(*example_inputs)
    out_shape = (tuple(out[0].shape), None) if isinstance(out, tuple) else tuple(out.shape)
    source = f"{type(module).__name__}"
    layer = L.Layer(program, source, "", "y", out_shape, module)
    result = L.module_builder(module)(layer, module, *args)
    return program, result[0] if isinstance(result, tuple) else result


def _get(module: nn.Module, target: str):
    owner, _, leaf = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _call(program: Program, root: nn.Module, node: fx.Node, env: dict) -> object:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    out_shape = _shape(node.meta.get("tensor_meta"))
    if node.op == "call_module":
        sub = root.get_submodule(node.target)
        source = f"{node.target} ({type(sub).__name__})"
        builder = L.module_builder(sub)
        if builder is None:
            raise TNError(f"{source}: no notation for {type(sub).__module__}.{type(sub).__name__}; "
                          f"register one with tnderive.nn.register({type(sub).__name__}, builder) "
                          f"(see tnderive.models.layers)")
        layer = L.Layer(program, source, node.target, node.name, out_shape, sub)
        return builder(layer, sub, *args, **kwargs)
    if not _has_tensor((args, kwargs)):        # arithmetic on sizes: run it
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    where = _module_path(node)
    if node.op == "call_method":
        name = node.target
        what = f"Tensor.{name}"
        source = f"{where + ': ' if where else ''}node {node.name} ({what})"
        if name == "size" or (name == "dim"):
            x = args[0]
            shape = x.shape if isinstance(x, (Act, L.IntInput)) else None
            if name == "dim":
                return len(shape)
            return shape if len(args) == 1 and "dim" not in kwargs else shape[(args[1:] or [kwargs["dim"]])[0]]
        builder = L.METHODS.get(name)
    else:
        fn = node.target
        what = _fn_name(fn)
        source = f"{where + ': ' if where else ''}node {node.name} ({what})"
        if fn is operator.getitem:
            return _getitem(source, *args)
        if fn is getattr and args[1] == "shape":
            return args[0].shape
        builder = L.FUNCTIONS.get(fn)
    if builder is None:
        raise TNError(f"{source}: no notation for {what}; wrap it in an nn.Module and register a "
                      f"notation with tnderive.nn.register(MyModule, builder)")
    layer = L.Layer(program, source, "", node.name, out_shape)
    return builder(layer, *args, **kwargs)


def _getitem(source: str, value, index):
    if isinstance(value, tuple) and not isinstance(value, Act):
        item = value[index]
        if isinstance(item, L.NoWeights):
            raise TNError(f"{item.source}: the attention weights output has no notation "
                          f"(use only the first output, or need_weights=False)")
        return item
    if isinstance(value, Act):
        raise TNError(f"{source}: no notation for tensor indexing/slicing x[{index!r}]; wrap it "
                      f"in an nn.Module and register a notation with "
                      f"tnderive.nn.register(MyModule, builder)")
    return value[index]
