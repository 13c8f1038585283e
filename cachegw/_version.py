"""The package version (read by the build, re-exported as ``cachegw.__version__``)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
