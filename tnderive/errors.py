"""The one exception type of tnderive."""
from __future__ import annotations


class TNError(ValueError):
    """Bad input: the message names the offending variable, index or size."""
