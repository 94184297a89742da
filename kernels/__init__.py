"""Fast implementations of the ``lowbit::*`` ops (Triton on CUDA).

None are registered yet: every op runs its eager reference from :mod:`lowbit.runtime.ops` on every
device. The Triton kernels, their selection rule and the switch that forces the reference arrive with
the kernels issue; this package is where they will register, imported lazily by the runtime.
"""
