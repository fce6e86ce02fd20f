"""Deep networks and their derivatives as programs: `Network` and `parse_network`.

    net = tn.parse_network(text)          # one statement per line, kept (not inlined)
    g = tn.simplify(net.grad("WQ1"))      # adjoint statements dX3, ..., output dWQ1
    g.evaluate(**tensors)                 # each statement once, in order
    g.compile()(**tensors)                # one generated module, `.source`
    net.hessian_blocks([("WQ1", "WK2")])  # forward over reverse, adjoints shared

A `Network` is a `tnderive.statements.Statements` program (see there for the data model:
a statement refers to an earlier one as a plain variable leaf) with evaluation, compilation
and the calculus as methods. Every derived network is linear in depth for a gradient and
O(blocks · depth) for a set of Hessian blocks; `tnderive.simplify` simplifies it statement by
statement.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import torch

from .derive import block_name, forward, hessian_blocks, hessian_vector_products, reverse
from .errors import TNError
from .evaluate import Prepared, SharedLowerings, evaluate
from .ir import Expr, Signature
from .network_codegen import CompiledNetwork
from .notation import parse_statements
from .simplify import simplify
from .statements import OUTPUTS_HEADER, Statement, Statements

__all__ = ["Network", "Statement", "parse_network", "block_name"]

_OUTPUTS = re.compile(r"^\s*" + re.escape(OUTPUTS_HEADER.strip()) + r"(.*)$", re.MULTILINE)


def parse_network(text: str, sizes: Mapping[str, int] | None = None) -> "Network":
    """Index notation (the notation of `tnderive.parse`) as a `Network` that keeps every
    statement: a statement uses an earlier one by name. `net.inline()` is `parse(text)`'s
    tensor. A `# outputs: a, b` line names the outputs (default: the last statement)."""
    statements, _ = parse_statements(text, sizes)
    outputs = None
    m = _OUTPUTS.search(text)
    if m:
        outputs = [o.strip() for o in m.group(1).split(",") if o.strip()]
    return Network((Statement(n, e) for n, e in statements), outputs)


class Network(Statements):
    """A program of named statements (see `tnderive.statements`) that evaluates, compiles
    and differentiates itself. `str(net)` is its notation, one statement per line."""

    def __init__(self, statements: Iterable[Statement], outputs: Sequence[str] | None = None,
                 source: Signature | None = None):
        super().__init__(statements, outputs, source)
        self._runs: dict[str, Prepared] = {}  # statement name -> its evaluation (`_prepared`)
        #: lowered programs shared by statements that differ only in their tensors' names
        self._lowerings = SharedLowerings()

    @property
    def lowerings(self) -> SharedLowerings:
        """The lowered programs `evaluate` ran so far (`.count`), shared by statements that
        differ only in their tensors' names and by the networks `part` made of this one."""
        return self._lowerings

    def part(self, outputs: Sequence[str], source: Signature | None = None) -> "Network":
        """The statements `outputs` need, as a network that shares this one's prepared
        evaluations and lowered programs (the same statements run the same programs: the
        parts of a set of Hessian blocks, `tnderive.attention`). `source`: this network's
        signature, when the caller has it already (default: computed)."""
        need = self.needed(outputs)
        out = type(self)([s for s in self.statements if s.name in need], outputs,
                         source=self.signature if source is None else source)
        out._runs, out._lowerings = self._runs, self._lowerings
        return out

    # --- running -------------------------------------------------------------------------
    def evaluate(self, sizes: Mapping[str, int] | None = None, **tensors: torch.Tensor):
        """Run each needed statement once, in order (`tnderive.evaluate` per statement, the
        earlier results bound by name). Returns the output tensor, or a dict name -> tensor
        when there are several outputs."""
        values = self.evaluate_all(sizes, **tensors)
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return {o: values[o] for o in self.outputs}

    def evaluate_all(self, sizes: Mapping[str, int] | None = None,
                     **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every needed statement's value by name (inputs not included)."""
        clash = [n for n in tensors if n in self]
        if clash:
            raise TNError(f"{clash[0]!r} is a statement of the network, not an input tensor "
                          f"(inputs: {self.signature})")
        need = self.needed()
        env = dict(tensors)
        out: dict[str, torch.Tensor] = {}
        for s in self.statements:
            if s.name not in need:
                continue
            args = {n: env[n] for n in s.expr.signature if n in env}
            if sizes:
                value = evaluate(s.expr, sizes, **args)
            else:
                value = self._prepared(s)(**args)
            out[s.name] = env[s.name] = value
        return out

    def _prepared(self, statement: Statement) -> Prepared:
        """The statement's `Prepared` evaluation, kept as long as this network: a network run
        again at the same shapes (a σ sweep, another batch) reuses every lowered program."""
        if statement.name not in self._runs:
            self._runs[statement.name] = Prepared(statement.expr, kept=2, shared=self._lowerings)
        return self._runs[statement.name]

    def compile(self, name: str = "f", sizes: Mapping[str, int] | None = None,
                inplace: bool = False) -> CompiledNetwork:
        """One generated module computing the outputs, each statement once (see
        `tnderive.network_codegen`); call it with keyword tensors, `.source` is the code.
        inplace: a product or sum whose operand is an intermediate read for the last time
        runs in place when autograd is off (for internal passes such as KFAC's, never called
        under torch.func.vmap, where an unbatched operand cannot take a batched one in place)."""
        return CompiledNetwork(self, name, sizes, inplace)

    # --- calculus ------------------------------------------------------------------------
    def grad(self, param: str) -> "Network":
        """Reverse mode: this network, adjoint statements `dS` for each statement between
        `param` and the output, and the output `d<param>` (layout: output indices, then the
        parameter's axes). Unsimplified; `simplify` it."""
        return reverse(self, [param])

    def grads(self, params: Sequence[str]) -> "Network":
        """One reverse pass for several parameters: outputs `d<p>` for each, sharing every
        adjoint statement."""
        return reverse(self, params)

    def jvp(self, param: str, tangent: str) -> "Network":
        """Forward mode with a new input tensor `tangent` shaped like `param`: the outputs'
        directional derivatives, statements `S_<tangent>`."""
        return forward(self, param, tangent)

    def jacobian(self, param: str) -> "Network":
        """Forward mode: outputs d out / d param (output indices, then the parameter's axes),
        one tangent statement `S_d<param>` per statement on the way."""
        return forward(self, param)

    def hessian(self, a: str, b: str | None = None) -> "Network":
        """The Hessian block d²out / d a d b (b defaults to a) as a network, forward over
        reverse; output `d<a>_d<b>` laid out as `tnderive.hessian`."""
        return hessian_blocks(self, [(a, a if b is None else b)])

    def hvp(self, param: str, vector: str) -> "Network":
        """Hessian-vector product Σ_b d²out/d param d param[b] · V[b] for a new input tensor
        `vector` shaped like `param` (forward over reverse, directional)."""
        return forward(reverse(self, [param]), param, vector, var=self.signature[param]
                       if param in self.signature else None)

    def hessian_blocks(self, params: Sequence[str] | None = None,
                       pairs: Sequence[tuple[str, str]] | None = None,
                       part: str = "total") -> "Network":
        """Many Hessian blocks of a scalar output in one network: every (a, b) of `params`
        (or the given `pairs`). One reverse pass shared by all blocks, one forward pass per
        distinct b; outputs in order, named `block_name(a, b)` = `d<a>_d<b>`.

        part: "total" (the Hessian), or "gauss_newton" (J_aᵀ·∂²ℓ/∂Z²·J_b, Z the inputs of
        the output statement ℓ, which nothing else may use); the functional part is
        total − gauss_newton."""
        if pairs is None:
            if params is None:
                raise TNError("hessian_blocks: give params or pairs")
            pairs = [(a, b) for a in params for b in params]
        return hessian_blocks(self, pairs, part)

    def hvps(self, vectors: Mapping[str, str], part: str = "total",
             names: dict[str, str] | None = None) -> "Network":
        """Hessian-vector products of a scalar output for several parameters at once:
        Σ_b d²out/d a d b · V_b for each a of `vectors` (parameter -> name of a new input
        tensor V shaped like it); outputs in that order, `names` receives parameter ->
        output. One reverse pass, one forward pass along the summed directions.
        part="gauss_newton": the Gauss-Newton part (see `hessian_blocks`)."""
        return hessian_vector_products(self, vectors, part, names)

    def simplify(self) -> "Network":
        """`tnderive.simplify(self)`: each statement simplified locally."""
        return simplify(self)

    def inline_outputs(self) -> dict[str, Expr]:
        """Each output as one inlined expression."""
        return {o: self.inline(o) for o in self.outputs}
