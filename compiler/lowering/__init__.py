"""Lowerings and exports of an artifact: ONNX (:mod:`.onnx`, the program's lowering; :mod:`.onnx_decoder`,
the decoder with key/value cache that extends it; :mod:`.onnx_artifact`, ``DIR/onnx/``), MLIR through
torch-mlir (:mod:`.mlir`), and GPTQ checkpoints in and out (:mod:`.gptq_checkpoint`)."""
