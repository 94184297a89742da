"""Fast implementations of the ``lowbit::*`` ops: Triton kernels, registered as the ops' CUDA implementations.

* :mod:`lowbit.kernels.triton_common` — what every kernel shares: packed-code reads, the GEMV row step,
  the fused epilogue (bias, low-rank branch / outlier columns, cast), the autotuner's tile candidates;
* :mod:`lowbit.kernels.triton_affine` — uniform 1-8 bit (any group size), GEMV and GEMM, split-K;
* :mod:`lowbit.kernels.triton_binary` — BiLLM binary-residual (salient residual plane, group bitmap,
  optional mean shift; fp16 outlier columns through the epilogue);
* :mod:`lowbit.kernels.triton_vq` — ReALLM VQ decode (packed indices, codebook, group scales, permutation);
* :mod:`lowbit.kernels.dispatch` — the selection rule (:func:`~lowbit.kernels.dispatch.choose`), the
  launch wrappers, :func:`~lowbit.kernels.dispatch.register_cuda`, and the switch that forces the eager
  reference (``LOWBIT_REFERENCE=1`` or :func:`~lowbit.kernels.dispatch.force_reference`).

``import lowbit`` (the package's top) calls :func:`~lowbit.kernels.dispatch.register_cuda` when CUDA and Triton are present; on CPU
every op runs its eager reference (tests run the kernels on CPU through ``TRITON_INTERPRET=1``).
"""
