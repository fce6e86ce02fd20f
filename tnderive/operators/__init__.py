"""Whole-model curvature operators mirroring curvlinops: `GGN`, `Hessian`.

    linear_operator.py   the operators: `@`, `.to_scipy()`, accumulation over data
    kfac.py              KFAC (per-parameter KronBlocks, damped inverse, trace/logdet)
    derived.py           a model program's statement derivatives (vjp, jvp, jvp of vjp), compiled
"""
from .kfac import KFAC, KFACInverse
from .linear_operator import GGN, CurvatureOperator, Hessian

__all__ = ["GGN", "Hessian", "KFAC", "KFACInverse", "CurvatureOperator"]
