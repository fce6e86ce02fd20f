"""Transformer Hessian inspection: self-attention Hessian blocks, their structure, and code.

Modules, one job each:
    blocks     hessian_blocks(loss, params): every block, split into Gauss-Newton (outer) and
               functional parts; each part compiles with `tnderive.compile`
    parts      BlockPart / Block / HessianBlocks (a part's expression, structure, evaluation)
    stack      the blocks of a whole transformer stack (tnderive.nn.transformer)
    stack_report  the stack's report: slopes, ratios, layer × layer / parameter heatmaps
    structure  the structure of a part: zero-ness, terms, variable powers, X degree, slopes
    scaling    block norms, σ-scaling slope fits, the assembled Hessian matrix
    report     the structure table (rows, markdown)
    plots      heatmap of the Hessian, diagrams of the block networks
"""
from __future__ import annotations

from .blocks import (Block, BlockPart, HessianBlocks, hessian_blocks, structure_seconds,
                     substitute)
from .plots import draw_blocks, heatmap, norm_heatmap
from .stack import gauss_newton, stack_blocks
from .report import PART_LABEL, report_markdown, report_rows
from .scaling import assemble, block_norms, fit_slopes, group_norms, layer_of, ratio_table
from .structure import (DATA, Monomial, Structure, analyse, analyse_tree, expand,
                        monomial_degree, tree_degree)

__all__ = ["Block", "BlockPart", "HessianBlocks", "hessian_blocks", "structure_seconds",
           "substitute", "draw_blocks", "heatmap", "norm_heatmap", "group_norms", "layer_of", "ratio_table", "PART_LABEL", "report_markdown",
           "report_rows", "assemble", "block_norms", "fit_slopes", "DATA", "Monomial",
           "Structure", "analyse", "analyse_tree", "expand", "gauss_newton", "stack_blocks",
           "monomial_degree", "tree_degree"]
