"""Type stub for the compiled ``ratewarden._native`` extension module."""

__all__ = ["version", "__version__"]

__version__: str

def version() -> str:
    """Return the version of the ratewarden core library."""
