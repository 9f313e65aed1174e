"""The store appliance: an in-store local server for a retail commerce platform."""

__all__ = ["__version__"]

__version__ = "0.1.0"
