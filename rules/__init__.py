"""Rewrite rules, one module per family. Each rule: Expr -> Expr | None (None = does not fire)."""
