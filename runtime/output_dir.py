"""Writing an output directory so that nothing lowbit did not make is ever destroyed, and no run leaves a
half-written directory that looks complete.

* :func:`check_output` (pre-flight, before any long work): an existing ``-o`` is replaced only with
  ``overwrite`` and only if lowbit wrote it (a ``.lowbit-output`` marker, or an artifact's lowbit manifest);
  never the input or a folder that contains it; the parent must be writable and, when an estimate is given,
  have room for it.
* :func:`staging_dir` (the write): an advisory lock on the output (a second writer fails at once), stale
  ``.NAME.partial-PID`` / ``.NAME.old-PID`` folders of dead processes removed, everything written into a
  hidden ``.NAME.partial-PID`` folder, then swapped in with one atomic ``renameat2(RENAME_EXCHANGE)`` when a
  previous output exists (the old one survives any kill until the new one is complete), with SIGINT, SIGTERM
  and SIGHUP held back during the swap. On any exception the staging folder is removed.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from lowbit.errors import LowbitError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

MARKER = ".lowbit-output"
_STALE = re.compile(r"^\..+\.(partial|old|spill)-(\d+)$")  # spill: --stream's packed spill file
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def is_lowbit_output(d: Path) -> bool:
    """Whether lowbit wrote directory ``d`` (its marker, or an artifact manifest written by lowbit)."""
    d = Path(d)
    if not d.is_dir():
        return False
    if (d / MARKER).is_file():
        return True
    if d.name in ("onnx", "mlir") and d.parent != d and is_lowbit_output(d.parent):  # an artifact's lowering
        return True
    try:  # artifacts written before the marker existed
        return "lowbit_manifest" in json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or a folder above it."""
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents


def check_output(final, overwrite: bool, protect=(), need_bytes: int | None = None, what: str = "output directory"):
    """Refuse, with a :class:`LowbitError` naming the path, an output lowbit must not write or replace."""
    final = Path(final)
    for p in protect:
        if p is not None and Path(p).exists() and _within(final, Path(p)):
            raise LowbitError(f"{what} {final} is the input {p} or contains it; lowbit never replaces its input "
                              "(choose another -o)")
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise LowbitError(f"{what} {final} already exists (use --overwrite to replace it)")
        if final.is_symlink() or not is_lowbit_output(final):
            raise LowbitError(f"{what} {final} exists and is not something lowbit wrote (no {MARKER} marker or "
                              "lowbit manifest.json); --overwrite replaces only lowbit's own outputs: choose another "
                              "-o or remove it yourself")
    parent = final.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"{what} {final}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LowbitError(f"{what} {final}: cannot write in {parent} (permission denied)")
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise LowbitError(f"{what} {final}: {free / 2**20:.0f} MiB free in {parent}, the output needs about "
                              f"{need_bytes / 2**20:.0f} MiB")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` / ``.NAME.spill-PID`` folders of processes that no longer
    run."""
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _STALE.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _usual_modes(root: Path) -> None:
    """Files as ``open()`` would create them (0666 less the umask; some writers use 0600), folders 0777 less it."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def signal_handlers(signals, handler):
    """``handler`` for ``signals`` inside the block, the previous handlers restored after; yields those previous
    handlers, or None outside the main thread (where signals are not this code's to handle)."""
    try:
        old = {s: signal.signal(s, handler) for s in signals}
    except ValueError:
        yield None
        return
    try:
        yield old
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_held():
    """SIGINT/SIGTERM/SIGHUP that arrive inside the block take effect when it ends. (Python handlers run in the
    main thread, but the kernel may deliver the signal to any thread, so masking would not hold it back: the
    handlers are replaced by one that records the signal, and the recorded signals are replayed afterwards.)"""
    pending = []
    with signal_handlers(_SIGNALS, lambda signum, frame: pending.append(signum)) as old:
        yield
    for s in pending:
        if callable(old[s]):
            old[s](s, None)
        elif old[s] == signal.SIG_DFL:
            signal.raise_signal(s)


@contextmanager
def _lock(final: Path):
    import fcntl

    path = final.parent / f".{final.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LowbitError(f"another lowbit process is writing {final} (lock {path}); wait for it or choose "
                              "another -o") from None
        yield
    finally:
        os.close(fd)


def _out_of_space(e: BaseException) -> bool:
    """Whether ``e`` is a full disk, a quota or a file-size limit (writers wrap errno in their own exceptions)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "File too large", "Disk quota", "StorageFull", "FileTooLarge",
                                   "file write failed"))


@contextmanager
def staging_dir(final, overwrite: bool = False, protect=()):
    """Yield a hidden staging directory next to ``final``; put it in place of ``final`` on success."""
    final = Path(final)
    check_output(final, overwrite, protect)
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final):
        remove_stale(final.parent)
        tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            from lowbit.version import __version__

            (tmp / MARKER).write_text(json.dumps({"written_by": "lowbit", "version": __version__}) + "\n")
            yield tmp
            _usual_modes(tmp)
            check_output(final, overwrite, protect)  # the world may have changed during a long run
            with _signals_held():
                if final.exists():
                    if _exchange(tmp, final):  # tmp now holds the previous output
                        shutil.rmtree(tmp, ignore_errors=True)
                    else:
                        old = final.parent / f".{final.name}.old-{os.getpid()}"
                        final.rename(old)
                        tmp.rename(final)
                        shutil.rmtree(old, ignore_errors=True)
                else:
                    tmp.rename(final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if _out_of_space(e):
                raise LowbitError(f"{final}: out of disk space or over the file-size limit while writing "
                                  f"({str(e).splitlines()[0][:160]}); nothing was kept") from None
            raise
