"""Contraction planning and torch.einsum code generation."""
