"""The package version, in a module that imports nothing (the CLI and `/v2` read it)."""

__version__ = "0.1.0"
