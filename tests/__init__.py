"""The tnderive test suite (a package: run `python3 -m pytest -q` from the repository root)."""
