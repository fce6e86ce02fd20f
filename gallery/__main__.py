"""`python -m gallery`: regenerate the gallery (see gallery/__init__.py)."""
import sys

from gallery import main

sys.exit(main())
