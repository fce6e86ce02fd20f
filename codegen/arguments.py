"""Argument handling of generated functions: the expression's signature as keyword tensors.

A generated function takes every tensor of `expr.signature` (the variables of the expression
it was derived from) as a keyword. The variables the expression uses are required; the others
are optional and, when given, bind size symbols (a Hessian block that no longer uses `x` still
has the batch size `n` of `x` in a coefficient). The lines emitted here

1. check the arguments: a positional argument, a name outside the signature (the message
   lists the signature), a missing required tensor, a non-tensor, a wrong rank, a size that
   disagrees with another argument, a size no argument binds;
2. read the size symbols off the argument shapes (`size_n = x.shape[0]`), solve those that
   only occur in derived sizes where that has one solution, and fix the rest from `sizes=`;
3. take device and dtype from the given tensors (torch's type promotion across them) and cast
   the used tensors to that dtype (`_dev`, `_dt`; constants are made there too).
"""
from __future__ import annotations

import sympy

from tnderive.binding import unbound_message
from tnderive.errors import TNError
from tnderive.ir import Signature, Variable

from .program import Program
from .pysource import py_size, size_var

INDENT = "    "

#: emitted into every generated module (after TNError and _MISSING): device and dtype of the
#: arguments, and the checks of one tensor argument and of one size (one line per check in the
#: generated function instead of an `if` and a `raise` each)
ARGUMENT_HELPERS = '''def _device_dtype(fn, tensors):
    """(device, dtype) of the given tensors: torch's type promotion across all of them (a
    floating type), CPU and the default dtype when none is given."""
    dev = dt = first = None
    for name, t in tensors.items():
        if t is _MISSING:
            continue
        if dev is None:
            dev, dt, first = t.device, t.dtype, name
        elif t.device != dev:
            raise TNError(f"{fn}(): tensors on different devices: {first!r} is on {dev}, "
                          f"{name!r} on {t.device}")
        else:
            dt = torch.promote_types(dt, t.dtype)
    if dev is None:
        return torch.device("cpu"), torch.get_default_dtype()
    if not (dt.is_floating_point or dt.is_complex):
        dt = torch.promote_types(dt, torch.get_default_dtype())
    return dev, dt


def _tensor(fn, name, value, rank, dims):
    """Check the tensor argument `name`: given, a torch.Tensor, of rank `rank` (`dims`: its
    axes, for the messages)."""
    if value is _MISSING:
        raise TNError(f"{fn}(): missing argument {name!r} (shape [{dims}])")
    if not isinstance(value, torch.Tensor):
        raise TNError(f"{fn}(): argument {name!r} is a {type(value).__name__}, expected a "
                      f"torch.Tensor")
    if value.dim() != rank:
        raise TNError(f"{fn}(): argument {name!r} has shape {tuple(value.shape)}, expected rank "
                      f"{rank} [{dims}]")


def _same(fn, index, where, got, other, want):
    """Check that `where` (an argument's axis, size `got`) agrees with `other` on the size of
    `index` (`want`)."""
    if got != want:
        raise TNError(f"{fn}(): size mismatch for index {index!r}: {where} has size {got} but "
                      f"{other} has size {want}")'''


def dims(var: Variable) -> str:
    """`o, i` (sizes named after their axis) or `k=3, o=O` otherwise."""
    return ", ".join(a if str(s) == a else f"{a}={s}" for a, s in zip(var.axes, var.axis_shape))


def parameters(program: Program) -> str:
    """The generated function's parameter list: one keyword per tensor of the signature."""
    names = list(program.expr.signature)
    return ", ".join(["*_positional"] + [f"{v}=_MISSING" for v in names] + ["**_unexpected"])


def argument_lines(program: Program, name: str, sizes: dict) -> list[str]:
    """Body lines checking the arguments and binding sizes, device and dtype (module doc)."""
    return _Arguments(program, name, sizes).lines()


class _Arguments:
    """Generates the argument lines of one function."""

    def __init__(self, program: Program, name: str, sizes: dict):
        self.program, self.name = program, name
        self.signature: Signature = program.expr.signature
        used = program.expr.variables
        self.required = [v for v in self.signature if v in used]    # the expression uses them
        self.optional = [v for v in self.signature if v not in used]  # they bind sizes only
        self.sizes = {str(k): int(v) for k, v in (sizes or {}).items()}
        self.bound: dict[sympy.Symbol, str] = {}    # bound for sure: symbol -> where
        self.maybe: set[sympy.Symbol] = set()       # bound by an optional tensor, if given
        self.later: list[tuple[str, str, sympy.Expr, str | None]] = []  # derived sizes

    def lines(self) -> list[str]:
        """Call checks, required then optional tensors, sizes, device and dtype."""
        out = self._call_checks()
        for v in self.required:
            out += self._tensor_checks(v)
        out += self._optional_symbols()
        for v in self.optional:
            out += [f"if {v} is not _MISSING:"] + _indent(self._tensor_checks(v))
        out += self._diagonal_checks()
        out += self._remaining_symbols()
        out += self._derived_checks()
        out += self._device_dtype()
        return out

    # --- the call as a whole ---------------------------------------------------------------
    def _call_checks(self) -> list[str]:
        sig = str(self.signature) if self.signature else "no arguments"
        return [
            "if _positional:",
            f"{INDENT}raise TNError(f\"{self.name}() takes keyword tensor arguments only "
            f"({_escape(sig)}); \"",
            f"{INDENT}              f\"got {{len(_positional)}} positional argument(s)\")",
            "if _unexpected:",
            f"{INDENT}raise TNError(f\"{self.name}(): unexpected argument "
            f"{{sorted(_unexpected)[0]!r}}; the signature is {_escape(sig)}\")",
        ]

    # --- one tensor ------------------------------------------------------------------------
    def _tensor_checks(self, v: str) -> list[str]:
        var = self.signature[v]
        out = [f"_tensor({self.name!r}, {v!r}, {v}, {len(var.axes)}, {dims(var)!r})"]
        for k, (axis, s) in enumerate(zip(var.axes, var.axis_shape)):
            out += self._axis(v, k, axis, s)
        return out

    def _axis(self, v: str, k: int, axis: str, s: sympy.Expr) -> list[str]:
        where, got = f"{v}[{axis}]", f"{v}.shape[{k}]"
        if not isinstance(s, sympy.Symbol):
            self.later.append((where, got, s, None if v in self.required else v))
            return []
        if s in self.bound:
            return self._mismatch(s, where, got, self.bound[s])
        if v in self.required:
            self.bound[s] = where
            return [f"{size_var(s)} = {got}"]
        self.maybe.add(s)
        check = self._mismatch(s, where, got, "another argument")
        return [f"if {size_var(s)} is None:", f"{INDENT}{size_var(s)} = {got}",
                "else:"] + _indent(check)

    def _mismatch(self, s, where: str, got: str, other: str) -> list[str]:
        return [f"_same({self.name!r}, {str(s)!r}, {where!r}, {got}, {other!r}, {size_var(s)})"]

    def _optional_symbols(self) -> list[str]:
        """`size_n = None` (or its `sizes=` value) for symbols first met in optional tensors."""
        out, seen = [], set()
        for v in self.optional:
            for s in self.signature[v].axis_shape:
                if isinstance(s, sympy.Symbol) and s not in self.bound and s not in seen:
                    seen.add(s)
                    value = self.sizes.get(str(s))
                    if value is None:
                        out.append(f"{size_var(s)} = None  # bound by an optional argument")
                    else:
                        out.append(f"{size_var(s)} = {value}  # sizes=; checked against the "
                                   f"optional arguments")
        return out

    def _diagonal_checks(self) -> list[str]:
        """An occurrence with a repeated index (a diagonal) needs equal sizes on those axes."""
        checks = set()
        for node in self.program.expr.walk():
            if isinstance(node, Variable) and len(set(node.occurrence)) != len(node.occurrence):
                first: dict[str, int] = {}
                for k, i in enumerate(node.occurrence):
                    if i in first:
                        checks.add((node.name, first[i], k, tuple(node.occurrence)))
                    else:
                        first[i] = k
        out = []
        for v, k1, k2, occ in sorted(checks):
            out += [f"if {v}.shape[{k1}] != {v}.shape[{k2}]:",
                    f"{INDENT}raise TNError(f\"{self.name}(): argument '{v}' is used as "
                    f"{v}[{','.join(occ)}] (a diagonal) but has shape {{tuple({v}.shape)}}\")"]
        return out

    # --- size symbols no required tensor binds ---------------------------------------------
    def _needed(self) -> set[sympy.Symbol]:
        """Size symbols the program's shapes and coefficients use, and the derived sizes of
        required arguments."""
        out: set[sympy.Symbol] = set()
        for op in self.program.ops:
            for s in op.shape:
                out |= sympy.sympify(s).free_symbols
            if op.kind in ("scale", "lincomb"):
                coefs = op.payload if op.kind == "lincomb" else (op.payload,)
                for c in coefs:
                    out |= sympy.sympify(c).free_symbols
        for _, _, s, optional in self.later:
            if optional is None:
                out |= s.free_symbols
        return out

    def _remaining_symbols(self) -> list[str]:
        """Bind the needed symbols that no required tensor binds: solved from a required
        derived size (one solution), an optional tensor, `sizes=`; else a TNError."""
        out = self._solved()
        missing = []
        for u in sorted(self._needed() - set(self.bound), key=str):
            value = self.sizes.get(str(u))
            if u in self.maybe:
                msg = unbound_message([str(u)], self.signature)
                out += [f"if {size_var(u)} is None:",
                        f"{INDENT}raise TNError(f\"{self.name}(): {_escape(msg)}\")"]
                self.bound[u] = "an optional argument"
            elif value is not None:
                out.append(f"{size_var(u)} = {value}  # fixed at generation (sizes=), "
                           f"no argument's shape determines it")
                self.bound[u] = f"sizes[{str(u)!r}]"
            else:
                missing.append(str(u))
        if missing:
            raise TNError(f"codegen: {unbound_message(missing, self.signature)}")
        return out

    def _solved(self) -> list[str]:
        """Symbols solved from required derived sizes with one solution (O = I - K + 1 gives
        I = O + K - 1); a floor (stride > 1) has several and is left to `sizes=`. A symbol
        an optional tensor may bind is solved only where that tensor was not given."""
        out: list[str] = []
        shape_sym = sympy.Symbol("_shape_", integer=True, positive=True)
        progress = True
        while progress:
            progress = False
            for where, got, s, optional in self.later:
                unknown = [x for x in s.free_symbols if x not in self.bound]
                if optional is not None or len(unknown) != 1 or s.has(sympy.floor, sympy.ceiling):
                    continue
                (u,) = unknown
                try:
                    sol = sympy.solve(sympy.Eq(s, shape_sym), u)
                except (NotImplementedError, ValueError):
                    continue
                if len(sol) != 1:
                    continue
                code = py_size(sol[0]).replace(size_var(shape_sym), got)
                line = f"{size_var(u)} = {code}  # from {where} = {s}"
                out += [f"if {size_var(u)} is None:", INDENT + line] if u in self.maybe else [line]
                self.bound[u] = where
                progress = True
        return out

    def _derived_checks(self) -> list[str]:
        """Every derived argument size (a convolution output) checked against its formula."""
        out = []
        for where, got, s, optional in self.later:
            if any(x not in self.bound and x not in self.maybe for x in s.free_symbols):
                continue  # an optional tensor whose size symbols nothing else needs
            guards = [f"{optional} is not _MISSING"] if optional is not None else []
            guards += [f"{size_var(x)} is not None" for x in sorted(s.free_symbols, key=str)
                       if x in self.maybe and optional is not None]
            check = [f"if {got} != {py_size(s)}:",
                     f"{INDENT}raise TNError(f\"{self.name}(): size mismatch for {where}: "
                     f"expected {s} = {{{py_size(s)}}}, got {{{got}}}\")"]
            out += [f"if {' and '.join(guards)}:"] + _indent(check) if guards else check
        return out

    # --- device and dtype ------------------------------------------------------------------
    def _device_dtype(self) -> list[str]:
        names = list(self.signature)
        given = "{" + ", ".join(f"{v!r}: {v}" for v in names) + "}"
        out = [f"_dev, _dt = _device_dtype({self.name!r}, {given})"]
        if self.required:
            out.append(f"{', '.join(self.required)} = "
                       f"{', '.join(f'{v}.to(_dt)' for v in self.required)}")
        return out


def _indent(lines: list[str]) -> list[str]:
    return [INDENT + line for line in lines]


def _escape(text: str) -> str:
    """Text safe inside a generated f-string or plain string literal."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("{", "{{").replace("}", "}}")
