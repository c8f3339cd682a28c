"""The package version, in a module of its own so that tools can record it without importing ``trime``'s root."""

__version__ = "0.1.0"
