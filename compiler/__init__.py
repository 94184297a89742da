"""The compiler, in four sub-packages, each importing only those before it:

* :mod:`lowbit.compiler.engine` -- model loading, data, capture, block-sequential calibration, evaluation, report;
* :mod:`lowbit.compiler.lowering` -- ONNX (program and KV-cache decoder), MLIR, GPTQ checkpoints;
* :mod:`lowbit.compiler.training` -- ``lowbit-finetune``;
* :mod:`lowbit.compiler.frontend` -- the compile pipeline and the command-line tools.

Library entry point: :func:`lowbit.compiler.frontend.pipeline.compile_model` with
:class:`lowbit.compiler.frontend.pipeline.CompileOptions` (or :mod:`lowbit.api`).
"""

from lowbit.errors import LowbitError

__all__ = ["LowbitError"]
