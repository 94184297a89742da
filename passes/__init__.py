"""Graph passes over the exported program, and the calibration methods (``lowbit.passes.methods``).

Default pipeline: ``find-linear-sites -> replace-linears -> verify -> clean-up`` (see
:func:`default_passes`). User passes follow the same protocol (:class:`Pass`).
"""

from .base import Pass, PassContext, PassError, PassManager, PassReport, default_passes

__all__ = ["Pass", "PassContext", "PassError", "PassManager", "PassReport", "default_passes"]
