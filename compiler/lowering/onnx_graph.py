"""A small ONNX graph builder: nodes, initializers (numpy arrays) and unique names.

Used by the direct decoder builder (:mod:`lowbit.compiler.lowering.onnx_llama`) and the per-format linear
lowerings (:mod:`lowbit.compiler.lowering.ort_linears`), which emit ONNX Runtime's fused contrib ops
(``com.microsoft``) that the torch exporter does not produce.
"""

from __future__ import annotations

import numpy as np

MSFT = "com.microsoft"


class GraphBuilder:
    def __init__(self):
        self.nodes = []
        self.inits = []
        self._names: set[str] = set()
        self._init_bytes = 0
        self.memo: dict = {}  # derived inputs shared by several nodes (e.g. a duplicated activation)

    def name(self, base: str) -> str:
        """A name not used yet in this graph (``base``, else ``base_1``, ...)."""
        n, i = base, 0
        while n in self._names:
            i += 1
            n = f"{base}_{i}"
        self._names.add(n)
        return n

    def init(self, base: str, array: np.ndarray) -> str:
        """Add an initializer; returns its name. Arrays are stored as given (packed bytes stay packed)."""
        from onnx import numpy_helper

        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self._init_bytes += array.nbytes
        return name

    def op(self, op_type: str, inputs: list, n_out: int = 1, domain: str = "", name: str | None = None, **attrs):
        """Add a node; ``inputs`` may hold ``None`` for omitted optional inputs. Returns the output name (or a
        list of names when ``n_out > 1``)."""
        from onnx import helper

        base = name or op_type
        outs = [self.name(f"{base}/out{i}") for i in range(n_out)]
        ins = ["" if x is None else x for x in inputs]
        while ins and ins[-1] == "":
            ins.pop()
        self.nodes.append(helper.make_node(op_type, ins, outs, name=self.name(base), domain=domain or None,
                                           **attrs))
        return outs[0] if n_out == 1 else outs

    def const_i64(self, base: str, values) -> str:
        return self.init(base, np.asarray(values, dtype=np.int64))

    def initializer_bytes(self) -> int:
        return self._init_bytes


def save_deduplicated(model, path, min_bytes: int = 4096, align: int = 4096) -> dict:
    """Save ``model`` with every initializer of ``min_bytes`` or more in ``<path>.data``, each distinct content once.

    Two initializers with the same bytes (a tied head's codes read by ``MatMulNBits`` and by
    ``GatherBlockQuantized``, their scales and zero points) point at one region of the file, so the file and the
    pages ONNX Runtime maps hold them once. Regions start on ``align`` boundaries (page-aligned, mmap-able).
    Returns ``{"bytes": file size, "shared": bytes saved}``."""
    import hashlib
    from pathlib import Path

    import onnx

    path = Path(path)
    data_name = path.name + ".data"
    seen: dict = {}
    shared = 0
    with open(path.parent / data_name, "wb") as f:
        for t in model.graph.initializer:
            raw = t.raw_data
            if len(raw) < min_bytes:
                continue
            key = (len(raw), hashlib.sha256(raw).digest())
            if key in seen:
                offset = seen[key]
                shared += len(raw)
            else:
                pos = f.tell()
                if pos % align:
                    f.write(b"\0" * (align - pos % align))
                offset = f.tell()
                f.write(raw)
                seen[key] = offset
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                e = t.external_data.add()
                e.key, e.value = k, v
        size = f.tell()
    onnx.save_model(model, str(path))
    return {"bytes": size, "shared": shared}
