"""The package version (the one place it is written; pyproject.toml reads it from here)."""

__version__ = "0.2.0"
"""steerlab's version (0.2: the subpackage layout; 0.1's flat module paths still import)."""
