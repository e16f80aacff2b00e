"""Writing a command's output directory without ever touching its inputs or leaving half-written files.

Every command writes its whole output into a staging directory next to the destination (same filesystem)
and renames it into place at the end, so a failure, Ctrl-C or SIGTERM leaves the destination as it was. The
checks run on resolved paths (symlinks and ``..`` followed) before any work, and refuse a destination that is
an input, lies inside one or contains one, whatever ``overwrite`` says. Replacing a destination never
follows a symbolic link: a link given as the destination is itself replaced, its target is left alone.
Imports nothing beyond the standard library, so the commands check their paths before TensorFlow loads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from typing import Iterator, Sequence

from tfcompress.errors import ExportError

__all__ = [
    "STAGING_PREFIX", "check_output_dir", "describe_os_error", "remove_stale_staging", "staged_file",
    "staged_output", "write_file_atomic",
]

STAGING_PREFIX = ".tfcompress-"


def _inside(path: str, root: str) -> bool:
    """Whether the resolved ``path`` is ``root`` or lies under it."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link_path(path: str) -> str:
    """``path`` with its parent resolved but its last component kept (the link itself, if it is one).

    ``out/`` and ``out//`` name ``out``; a path ending in ``.`` or ``..`` names no link, so it is resolved whole
    (``x/../out`` is resolved as the kernel would, through ``x`` if that is a link).
    """
    path = os.path.join(os.getcwd(), os.fspath(path)).rstrip(os.sep) or os.sep
    head, tail = os.path.split(path)
    if tail in ("", ".", ".."):
        return os.path.realpath(path)
    return os.path.join(os.path.realpath(head), tail)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_output_dir(output_dir: str, inputs: Sequence[str] = (), overwrite: bool = False,
                     what: str = "output directory") -> None:
    """Raise :class:`ExportError` unless ``output_dir`` may be written (or, with ``overwrite``, replaced).

    Refused: an empty path; a destination that is a file; a non-empty directory or a symbolic link without
    ``overwrite``; a destination that is one of ``inputs``, lies inside one or contains one (compared after
    resolving symlinks and ``..``, also with ``overwrite``); a location where no directory can be created.
    """
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ExportError(f"the {what} must be a non-empty path, got {output_dir!r}")
    output_dir = os.fspath(output_dir)
    real, link = os.path.realpath(output_dir), _link_path(output_dir)
    for src in inputs:
        src_real = os.path.realpath(src)
        for dst in {real, link}:
            if _inside(dst, src_real):
                raise ExportError(f"the {what} {output_dir!r} is the input {src!r} or inside it"
                                  + ("" if dst == os.path.abspath(output_dir) else f" (it resolves to {dst!r})"))
            if _inside(src_real, dst):
                raise ExportError(f"the {what} {output_dir!r} contains the input {src!r}; replacing it would "
                                  "delete the input")
    if os.path.islink(link):
        if not overwrite:
            raise ExportError(f"the {what} {output_dir!r} is a symbolic link; give the directory's real path, "
                              "or pass --overwrite to replace the link itself (its target is left alone)")
    elif os.path.exists(link):
        if not os.path.isdir(link):
            raise ExportError(f"the {what} {output_dir!r} exists and is not a directory")
        if not overwrite and _listdir(link, what):
            raise ExportError(f"the {what} {output_dir!r} exists and is not empty (pass --overwrite)")
    _check_writable(os.path.dirname(link), what)


def _listdir(path: str, what: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise ExportError(f"cannot read the {what} {path!r}: {e.strerror}") from None


def _check_writable(parent: str, what: str) -> None:
    """Create and remove a directory where the staging directory will go, to fail before any work."""
    base = _nearest_existing(parent)
    if not os.path.isdir(base):
        raise ExportError(f"cannot create the {what}: {base!r} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX + "probe-", dir=base))
    except OSError as e:
        raise ExportError(f"cannot write the {what} under {base!r}: {e.strerror or e}") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(parent: str) -> None:
    """Delete staging directories in ``parent`` left by runs that were killed (their process is gone)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(STAGING_PREFIX):
            continue
        pid = name[len(STAGING_PREFIX):].split("-", 1)[0]
        path = os.path.join(parent, name)
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output(output_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a staging directory; on success it replaces ``output_dir``, on any exception it is removed.

    Parent directories the call had to create are removed again on failure. Call
    :func:`check_output_dir` first; this only re-checks that a non-empty destination may be replaced.
    """
    output_dir = _link_path(output_dir)
    parent = os.path.dirname(output_dir)
    created = []
    path = parent
    while not os.path.lexists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_staging(parent)
        tmp = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would become the output directory's mode
    except BaseException:
        _remove_created(created)
        raise
    try:
        yield tmp
        _commit(tmp, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _remove_created(created: list[str]) -> None:
    for path in created:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _commit(tmp: str, dst: str, overwrite: bool) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and deleted only afterwards."""
    if os.path.islink(dst) or (os.path.lexists(dst) and not os.path.isdir(dst)):
        if not overwrite:
            raise ExportError(f"output {dst!r} exists (pass --overwrite)")
        os.unlink(dst)  # the link itself, never its target
    elif os.path.isdir(dst):
        if os.listdir(dst) and not overwrite:
            raise ExportError(f"output directory {dst!r} exists and is not empty (pass --overwrite)")
        old = tmp + "-old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.rename(tmp, dst)


@contextlib.contextmanager
def staged_file(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` for a writer to fill; renamed to ``path`` (mode 0666 & ~umask)
    when the block succeeds, removed when it fails."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", suffix=os.path.splitext(path)[1],
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, (stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH)
                 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_file_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`staged_file`."""
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def describe_os_error(e: OSError) -> str:
    """One line for an OSError the user can act on (disk full, permission denied, read-only filesystem)."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}"
    return f"{reason}{where}"
