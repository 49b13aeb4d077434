"""Write a file so that readers see the old content or the whole new content, never a part.

:func:`atomic_write` writes into a temporary file in the target's directory, flushes and
fsyncs it, then renames it over the target with ``os.replace`` (atomic on POSIX and
Windows) and fsyncs the directory so the rename survives a crash.

On Linux the temporary file is anonymous (``O_TMPFILE``): it has no name until the data is
complete, so an exception, ``SIGKILL`` or power loss during the write leaves no litter; it
is then linked under a hidden name and renamed (a kill inside those two system calls,
microseconds apart, is the only window that leaves a ``.<name>.*.tmp`` file behind).
Elsewhere (other systems, filesystems without ``O_TMPFILE``, kernels that refuse the link)
a named hidden temporary file is used; it is removed on any exception, but a kill during
the write leaves it behind.
"""
import contextlib
import ctypes
import errno
import functools
import os
import secrets

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_anonymous_works = hasattr(os, "O_TMPFILE")  # set False once the system says it cannot
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL}


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _temp_name(directory: str, name: str) -> str:
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _link_anonymous(fd: int, dest: str) -> bool:
    """Give the O_TMPFILE file ``fd`` the name ``dest``: linkat(AT_EMPTY_PATH) (root, or
    Linux >= 6.10), else the /proc/self/fd route; False if neither works."""
    try:
        if _libc().linkat(fd, b"", _AT_FDCWD, os.fsencode(dest), _AT_EMPTY_PATH) == 0:
            return True
    except (OSError, AttributeError):  # no C library to call (not Linux/glibc-like)
        pass
    try:
        os.link(f"/proc/self/fd/{fd}", dest, follow_symlinks=True)
        return True
    except OSError:
        return False


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename_into_place(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_named(path: str, directory: str, write, source=None) -> None:
    """The portable path: a named hidden temporary file, removed on any exception.
    ``source``: an open file whose content to copy instead of calling ``write``."""
    tmp = _temp_name(directory, os.path.basename(path))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if source is None:
                write(f)
            else:
                source.seek(0)
                while chunk := source.read(1 << 24):
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _rename_into_place(tmp, path)


def atomic_write(path, write) -> None:
    """Replace ``path`` atomically with what ``write(f)`` writes to a binary file ``f``.

    path: the target file (str or PathLike); its directory must exist.
    write: a callable that writes the whole content to the file object it is given (it
        may seek; it must not close it). If it raises, ``path`` is left as it was and
        the exception propagates.
    """
    global _anonymous_works
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save to {path}: it is a directory")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save to {path}: directory {directory} does not exist")

    fd = None
    if _anonymous_works:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise  # e.g. permission denied: the named route would fail the same way
            _anonymous_works = False  # a filesystem or kernel without O_TMPFILE
    if fd is None:
        _write_named(path, directory, write)
    else:
        with os.fdopen(fd, "w+b") as f:  # closing it frees an unlinked inode
            write(f)
            f.flush()
            os.fsync(f.fileno())
            tmp = _temp_name(directory, os.path.basename(path))
            if _link_anonymous(f.fileno(), tmp):
                _rename_into_place(tmp, path)
            else:  # linking refused: copy what was written into a named temporary file
                _anonymous_works = False
                _write_named(path, directory, None, source=f)
    _fsync_directory(directory)
