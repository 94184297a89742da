"""lowbit: compress LLMs to 1-8 bits per weight through torch.export graph passes.

Layout (all importable under ``lowbit.*``), lowest layer first; every import points down (the order is
written once, in ``tests/test_layers.py``, which checks it):

- ``lowbit.errors``, ``lowbit.version``  the user-facing error type, the version.
- ``lowbit.runtime``   packed formats, bit packing, the ``lowbit::*`` custom ops, artifact save/load,
                       compressed linears as modules.
- ``lowbit.kernels``   Triton implementations of the runtime ops, registered as their CUDA kernels.
- ``lowbit.passes``    graph passes (find sites, rewrite, verify, clean up, ONNX layout, decompose).
- ``lowbit.passes.methods``  calibration methods, and the training loop they share with lowbit-finetune.
- ``lowbit.compiler``  ``engine/`` (model loading, data, capture, block-sequential calibration, evaluation,
                       report), ``lowering/`` (ONNX, MLIR, GPTQ checkpoints), ``training/`` (lowbit-finetune),
                       ``frontend/`` (the compile pipeline and the command-line tools).
- ``lowbit.api``       the public Python API.
"""

from lowbit.version import __version__  # noqa: F401


def _gpu_driver_present() -> bool:
    # torch.cuda.is_available() is False without a GPU driver, and importing torch costs ~200 MB of resident
    # memory: the torch-free deployment runner (lowbit.runtime.onnx_runtime) must not pay it on CPU machines.
    import os

    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _register_fast_paths() -> None:
    # CUDA only: the Triton kernels replace the eager reference as the ops' CUDA implementations. Done here,
    # at the top, because the runtime (plain torch, the bottom layer) must not import the kernels above it;
    # every ``import lowbit.*`` runs this file first.
    if not _gpu_driver_present():
        return
    import torch

    if torch.cuda.is_available():
        from lowbit.kernels.dispatch import register_cuda

        register_cuda()


_register_fast_paths()
