"""Graph passes over the exported program, and the calibration methods (``lowbit.passes.methods``).

Default pipeline: ``find-linear-sites -> replace-linears -> verify -> tie-embedding -> clean-up`` (see
:func:`default_passes`). User passes follow the same protocol (:class:`Pass`).
"""

from .base import Pass, PassContext, PassError, PassManager, PassReport
from .registry import PASS_NAMES, default_passes, pass_by_name

__all__ = ["PASS_NAMES", "Pass", "PassContext", "PassError", "PassManager", "PassReport", "default_passes",
           "pass_by_name"]
