"""lowbit: compress LLMs to 1-8 bits per weight through torch.export graph passes.

Layout (all importable under ``lowbit.*``):

- ``lowbit.runtime``  packed formats, bit packing, the ``lowbit::*`` custom ops, artifact save/load.
- ``lowbit.kernels``  fast implementations of the runtime ops (selected by shape; optional).
- ``lowbit.passes``   graph passes (find sites, rewrite, verify, clean up) and calibration methods.
- ``lowbit.compiler`` model loading, calibration data, capture, the block-sequential engine,
                      evaluation, reports and the command-line tools.
"""

__version__ = "0.1.0"
