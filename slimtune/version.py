"""The package's version: one module of its own, so that any layer may record it (the checkpoint's provenance)
without importing the package."""

__version__ = "0.1.0"
