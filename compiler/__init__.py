"""Model loading, calibration data, capture, the block-sequential engine, evaluation, reports, CLI.

Library entry point: :func:`lowbit.compiler.pipeline.compile_model` with
:class:`lowbit.compiler.pipeline.CompileOptions`.
"""

from .errors import LowbitError

__all__ = ["LowbitError"]
