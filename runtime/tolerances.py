"""One table of equivalence tolerances: a fast path (ONNX Runtime, Triton, MLIR) vs the eager reference
on the same packed weights. Values bound ``max|got - ref| / max|ref|`` over the logits of a forward pass.

Why they differ: the reference dequantizes then runs a float32 matmul; ``MatMulNBits`` at
``accuracy_level`` 4 quantizes activations to int8 per block on CPU (about 1% error per layer, which a
random tiny model compounds); at level 0 it computes in float32 and only summation order differs.
"""

TOLERANCES = {
    "onnx-functions": 1e-4,   # lowbit.* ONNX functions: same float32 math, different op order
    "onnx-matmulnbits-0": 1e-4,  # MatMulNBits, float32 activations
    "onnx-matmulnbits-4": 6e-2,  # MatMulNBits, int8 activations (per-block dynamic quantization)
}


def tolerance(kind: str) -> float:
    return TOLERANCES[kind]
