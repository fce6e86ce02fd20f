"""`tnderive.from_module(module, *example_inputs) -> Model`: a torch model as index notation.

The `Model` keeps the program TEXT (one statement per layer/op, readable names; the
interchange format), the parameter names both ways (`named_parameters()` names <-> notation
names), its statements (each parses on its own, inputs declared) and `.expr`, the whole
program parsed (`tnderive.parse`). `check()` runs the statements and compares with the
module's own output in float64.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from ..codegen import compile as tn_compile
from ..draw import draw as tn_draw
from ..errors import TNError
from ..evaluate import evaluate
from ..ir import Expr
from ..notation import parse
from ..simplify import simplify
from .program import Act, Program, Statement
from .trace import trace

#: how `Model.expr` reads the program text (a statement-preserving parser can replace it)
PARSE: Callable[[str], Expr] = parse


class Model:
    """A torch module as a program of index-notation statements (sizes of the example inputs).

    text             the program (str(model) prints it)
    expr             the whole program as one expression (`tnderive.parse(text)`)
    statements       one `Statement` per op: `.line`, `.text()` (parses alone), `.source`
    param_names      `named_parameters()` name -> notation name (`torch_names` the reverse)
    tensors(*inputs) the keyword tensors that evaluate `expr` (inputs, parameters, buffers)
    """

    def __init__(self, module: nn.Module, program: Program, output: Act):
        self.module = module
        self.program = program
        self.output = output
        self.text = program.text()
        self.param_names = {k: a.name for k, a in program.params.items()}
        self.torch_names = {v: k for k, v in self.param_names.items()}
        self.buffer_names = {k: a.name for k, a in program.buffers.items()}
        self._expr: Expr | None = None
        self._fns: dict[int, Callable] = {}

    # ---------------------------------------------------------------- notation
    @property
    def statements(self) -> list[Statement]:
        return self.program.statements

    @property
    def inputs(self) -> list[Act]:
        return self.program.inputs

    @property
    def expr(self) -> Expr:
        if self._expr is None:
            self._expr = PARSE(self.text)
        return self._expr

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return (f"Model({type(self.module).__name__}: {len(self.statements)} statements, "
                f"{len(self.param_names)} parameters)")

    def draw(self, path: str, **kwargs) -> object:
        """Draw the network (`tnderive.draw`; svg/png/dot by extension)."""
        return tn_draw(self.expr, path, **kwargs)

    # ---------------------------------------------------------------- tensors
    def input_tensors(self, *inputs: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
        """Notation name -> tensor for the module's inputs (integer ids one-hot)."""
        out = {}
        for act in self.program.inputs:
            pos, encoding = self.program.sources[act.name]
            if pos >= len(inputs):
                raise TNError(f"model input {act.name!r} (position {pos}) is missing: "
                              f"got {len(inputs)} inputs")
            t = inputs[pos]
            if encoding == "onehot":
                t = torch.nn.functional.one_hot(t.long(), act.shape[-1])
                t = t.to(dtype or torch.get_default_dtype())
            elif encoding == "mask":
                if t.dtype != torch.bool:
                    raise TNError(f"model input {act.name!r} was traced as a boolean mask, got "
                                  f"{t.dtype}")
                t = additive_mask(t, dtype or torch.get_default_dtype())
            elif dtype is not None:
                t = t.to(dtype)
            if tuple(t.shape) != act.shape:
                raise TNError(f"model input {act.name!r} has shape {tuple(t.shape)}; the model "
                              f"was traced at {act.shape} (trace again for other shapes)")
            out[act.name] = t
        return out

    def param_tensors(self, dtype: torch.dtype | None = None) -> dict:
        """Notation name -> the module's parameter and buffer tensors."""
        out = {}
        named = dict(self.module.named_parameters())
        named.update(dict(self.module.named_buffers()))
        for table in (self.program.params, self.program.buffers):
            for torch_name, act in table.items():
                t = named[torch_name]
                out[act.name] = t if dtype is None else t.to(dtype)
        return out

    def tensors(self, *inputs: torch.Tensor, dtype: torch.dtype | None = None) -> dict:
        return {**self.input_tensors(*inputs, dtype=dtype), **self.param_tensors(dtype)}

    # ---------------------------------------------------------------- running
    def statement_fn(self, j: int) -> Callable:
        """Statement j compiled (`tnderive.compile`, once)."""
        if j not in self._fns:
            st = self.statements[j]
            self._fns[j] = tn_compile(simplify(parse(st.text())), st.target.name)
        return self._fns[j]

    def run(self, tensors: dict, keep: bool = False) -> torch.Tensor | dict:
        """Run the statements on `tensors` (names as in `tensors()`); the output, or every
        value by name with keep=True."""
        env = dict(tensors)
        for j, st in enumerate(self.statements):
            env[st.target.name] = self.statement_fn(j)(**{a.name: env[a.name] for a in st.uses})
        return env if keep else env[self.output.name]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run(self.tensors(*inputs))

    def check(self, *inputs: torch.Tensor, tol: float = 1e-10, whole: bool = False) -> float:
        """Compare the network with the module in float64 (a float64 copy of the module);
        returns the max relative error, TNError when it exceeds `tol`. whole=True evaluates
        `expr` (the whole program) as well."""
        ref_module = copy.deepcopy(self.module).double()
        inputs64 = [t.double() if t.is_floating_point() else t for t in inputs]
        with torch.no_grad():
            ref = ref_module(*inputs64)
        if isinstance(ref, tuple):       # nn.MultiheadAttention: (output, weights)
            ref = ref[0]
        mine = Model(ref_module, self.program, self.output)
        mine._fns = self._fns
        tensors = mine.tensors(*inputs64, dtype=torch.float64)
        with torch.no_grad():
            err = _rel_err(mine.run(tensors), ref)
            if whole:
                err = max(err, _rel_err(evaluate(self.expr, **tensors), ref))
        if not err <= tol:
            raise TNError(f"{type(self.module).__name__}: the network differs from the module's "
                          f"output: max relative error {err:.2e} > {tol:.0e}")
        return err


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (True: not attended, torch's convention) as the float mask
    added to the scores: −inf where True, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if tuple(a.shape) != tuple(b.shape):
        raise TNError(f"network output has shape {tuple(a.shape)}, the module's {tuple(b.shape)}")
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def from_module(module: nn.Module, *example_inputs: torch.Tensor, check: bool = True) -> Model:
    """Trace `module` (torch.fx) at the shapes of `example_inputs` into a `Model`; with
    check=True (default) the network is compared with `module(*example_inputs)` in float64."""
    if not isinstance(module, nn.Module):
        raise TNError(f"from_module: expected an nn.Module, got {type(module).__name__}")
    if not example_inputs:
        raise TNError("from_module: give example inputs (their shapes fix the sizes)")
    program, output = trace(module, example_inputs)
    model = Model(module, program, output)
    if check:
        model.check(*example_inputs)
    return model
