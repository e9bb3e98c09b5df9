"""The package version (every stage and rank reads it; setup.cfg takes it from here)."""
__version__ = "0.1.0"
