"""lowbit's ONNX Runtime custom-op library (``lowbit.ort`` domain): build, locate, register.

Stock ONNX Runtime has no kernel for lowbit's VQ (ReALLM) and binary-residual (BiLLM) formats: their values lie on no
uniform grid, so the stock decoder rounds them onto an 8-bit ``MatMulNBits`` grid (3-3.5x the packed bytes in memory)
or a 4-bit one (ReALLM's perplexity doubles). ``runtime/ort_kernels/lowbit_ort_ops.cc`` reads the packed codes and
planes themselves (``lowbit.ort::VQMatMul``, ``lowbit.ort::BinaryMatMul``, exact; ``VQLinears`` /
``BinaryLinears``: several linears of one input in one node); ``lowbit-export DIR --onnx --ort-kernels lowbit``
writes decoders that use them.

The library is optional: nothing else in lowbit needs it. It is compiled here, from this repository's source, with
the C API headers of Debian's ``libonnxruntime-dev`` package (fetched from Debian's archive, sha256-checked, only
the headers are used; the C API is versioned, so a library built against version 21 loads in later ONNX Runtime
releases). ONNX Runtime loads a custom-op library as native code, so lowbit registers only the library it built
itself, from its own package directory: never one named by an export folder or a model file.

    python -m lowbit.runtime.ort_ops build     # or ./scripts/build-ort-kernels
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from lowbit.errors import LowbitError

DOMAIN = "lowbit.ort"
VERSION = 2  # the ops' contract (lowbit_ort_ops_version() in the source); bumped when ops or their inputs change
# (2: VQLinears, BinaryLinears; VQMatMul's bias)
SOURCE = Path(__file__).resolve().parent / "ort_kernels" / "lowbit_ort_ops.cc"
BUILD_DIR = SOURCE.parent / "build"
HEADERS_DEB = ("https://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
               "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADERS_DIR = BUILD_DIR / "onnxruntime-1.21-headers"
FLAGS = ["-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-fvisibility=hidden"]


class Unavailable(LowbitError):
    """This machine cannot build the library (no compiler, no access to Debian's archive, no AVX2); a compile error
    of the source is a plain :class:`LowbitError`."""


def _tag() -> str:
    """The build's identity: the source and flags (a changed source never loads an old build)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return BUILD_DIR / f"liblowbit_ort_ops-{_tag()}.so"


def cpu_supported() -> bool:
    """The kernels use AVX2, FMA and F16C (x86-64 from 2013 on)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


def available() -> bool:
    return library_path().is_file() and cpu_supported()


def _deb_member(data: bytes, prefix: str) -> tuple[str, bytes]:
    """A member of an ``ar`` archive (a .deb) whose name starts with ``prefix``."""
    if not data.startswith(b"!<arch>\n"):
        raise LowbitError(f"{HEADERS_DEB[0]}: not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        body = data[pos + 60:pos + 60 + size]
        if name.startswith(prefix):
            return name, body
        pos += 60 + size + (size & 1)
    raise LowbitError(f"{HEADERS_DEB[0]}: no {prefix}* member")


def _fetch_headers(progress=print) -> Path:
    if (HEADERS_DIR / "onnxruntime_c_api.h").is_file():
        return HEADERS_DIR
    url, sha = HEADERS_DEB
    progress(f"[ort-kernels] fetching ONNX Runtime's C API headers: {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise Unavailable(f"cannot download {url} ({e}); the lowbit ORT kernels need ONNX Runtime's C API headers "
                          "from Debian's libonnxruntime-dev package") from e
    if hashlib.sha256(data).hexdigest() != sha:
        raise LowbitError(f"{url}: sha256 differs from the pinned {sha} (refusing to use it)")
    name, body = _deb_member(data, "data.tar")
    tmp = Path(tempfile.mkdtemp(dir=BUILD_DIR, prefix=".headers-"))
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tf:
            for m in tf.getmembers():  # only the header files, by their base names: nothing else is written
                if m.isfile() and m.name.startswith("./usr/include/onnxruntime/") and m.name.endswith(".h") \
                        and "/core/" not in m.name:
                    (tmp / Path(m.name).name).write_bytes(tf.extractfile(m).read())
        if not (tmp / "onnxruntime_c_api.h").is_file():
            raise LowbitError(f"{url}: {name} holds no onnxruntime_c_api.h")
        try:
            tmp.rename(HEADERS_DIR)
        except OSError:  # another process (a parallel test worker) put them there first
            if not (HEADERS_DIR / "onnxruntime_c_api.h").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return HEADERS_DIR


def build(progress=print, force: bool = False) -> Path:
    """Compile the library (if not built for this source yet); returns its path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    if not cpu_supported():
        raise Unavailable("the lowbit ORT kernels need an x86-64 CPU with AVX2, FMA and F16C")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    headers = _fetch_headers(progress)
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise Unavailable(f"no C++ compiler ({cxx!r}) to build the lowbit ORT kernels")
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [cxx, *FLAGS, "-I", str(headers), str(SOURCE), "-o", str(tmp)]
    progress(f"[ort-kernels] {' '.join(cmd)}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        tmp.unlink(missing_ok=True)
        raise LowbitError(f"building {SOURCE} failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, out)  # a half-written library is never at the path lowbit loads
    for old in BUILD_DIR.glob("liblowbit_ort_ops-*.so"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def require() -> Path:
    """The built library's path, or a :class:`LowbitError` that says how to build it."""
    if not available():
        why = "this CPU lacks AVX2/FMA/F16C" if not cpu_supported() else f"{library_path().name} is not built"
        raise LowbitError(f"this ONNX model uses lowbit's ONNX Runtime kernels (domain {DOMAIN}), but {why}: "
                          "run ./scripts/build-ort-kernels (python -m lowbit.runtime.ort_ops build), or export "
                          "without --ort-kernels lowbit")
    return library_path()


def register(opts) -> None:
    """Register the built library with ``onnxruntime.SessionOptions`` (a clear error when it is not built)."""
    opts.register_custom_ops_library(str(require()))


def uses_lowbit_ops(model) -> bool:
    """Whether an ``onnx.ModelProto`` (or its opset imports) needs this library."""
    return any(o.domain == DOMAIN for o in model.opset_import)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] != ["build"]:
        print("usage: python -m lowbit.runtime.ort_ops build [--force]", file=sys.stderr)
        return 2
    try:
        path = build(force="--force" in args)
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[ort-kernels] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
