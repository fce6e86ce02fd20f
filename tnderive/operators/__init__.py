"""Whole-model curvature operators mirroring curvlinops: `GGN`, `Hessian`.

    linear_operator.py   the operators: `@`, `.to_scipy()`, accumulation over data
    kfac.py              KFAC (per-parameter KronBlocks, damped inverse, trace/logdet)
    networks.py          the model + loss as one statement network; GGN/Hessian products derived
                         from it as ONE compiled network for all parameters
    diagonal.py          the exact GGN diagonal (`GGN.diagonal()`) as one derived network
"""
from .kfac import KFAC, KFACInverse
from .linear_operator import GGN, CurvatureOperator, Hessian

__all__ = ["GGN", "Hessian", "KFAC", "KFACInverse", "CurvatureOperator"]
