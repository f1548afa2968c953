"""ratewarden: runtime governor for AI agents and the APIs they call.

This is the public Python facade; the compiled extension is ``ratewarden._native``.
"""

from ratewarden._native import __version__, version

__all__ = ["__version__", "version"]
