"""Write a file so that readers see the old content or the whole new content, never a part.

:func:`atomic_write` writes into a temporary file in the target's directory, flushes and
fsyncs it, then renames it over the target with ``os.replace`` (atomic on POSIX and
Windows) and fsyncs the directory so the rename survives a crash.

On Linux the temporary file is anonymous (``O_TMPFILE``): it has no name until the data is
complete, so an exception, ``SIGKILL`` or power loss during the write leaves no litter; it
is then linked under a hidden name and renamed (a kill inside those two system calls,
microseconds apart, is the only window that leaves a ``.<name>.*.tmp`` file behind).
Elsewhere (other systems, filesystems without ``O_TMPFILE``, kernels that refuse the link)
a named hidden temporary file is used; it is removed on any exception (the final rename
failing included), but a kill during the write leaves it behind.

Toward the file system it behaves like ``open(path, "wb")`` (what ``torch.save`` does),
atomically:

* a symbolic link is followed to its final target (through chains of links; a dangling
  link creates its target), and the target is replaced atomically in *its* directory; the
  link itself stays a link;
* an existing file keeps its permission bits, and its owner and group where the process
  may set them (root, or the file's owner for a group it belongs to);
* an existing file this process may not write raises PermissionError (as ``open`` would),
  even though the directory would allow the rename;
* directories raise IsADirectoryError, and FIFOs, device nodes and sockets raise
  :class:`~fastlayers.io_errors.SpecialFileError` naming the path: they cannot be replaced
  atomically, and replacing them by a regular file would surprise whoever reads them.
* A file with several hard links is replaced under this name only (the other names keep
  the old content), as with any atomic save.
"""
import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import secrets
import stat

from .io_errors import SpecialFileError, new_access_error, special_kind

_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_anonymous_works = hasattr(os, "O_TMPFILE")  # set False once the system says it cannot
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL}


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


_NAME_MAX = 255  # bytes in one file name (Linux, macOS, Windows)


def _temp_name(directory: str, name: str) -> str:
    """``.<name>.<pid>.<random>.tmp`` beside the target; for a name too long to carry
    those extra bytes, a short digest of it stands for it (the temp name stays legal)."""
    suffix = f".{os.getpid()}.{secrets.token_hex(4)}.tmp"
    if len(os.fsencode(f".{name}{suffix}")) > _NAME_MAX:
        name = hashlib.sha1(os.fsencode(name)).hexdigest()[:16]
    return os.path.join(directory, f".{name}{suffix}")


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


def _copy_attributes(fd: int, existing) -> None:
    """Give the new file ``fd`` the permission bits, owner and group of ``existing`` (an
    os.stat_result, or None for a new file: then the umask decided)."""
    if existing is None:
        return
    if hasattr(os, "fchown") and (os.geteuid() == 0 or os.geteuid() == existing.st_uid):
        try:
            os.fchown(fd, existing.st_uid, existing.st_gid)
        except OSError:  # not a member of that group (or no chown here): keep ours
            pass
    if hasattr(os, "fchmod"):  # after chown, which clears setuid
        with contextlib.suppress(OSError):  # filesystems without modes (vfat, some FUSE)
            os.fchmod(fd, stat.S_IMODE(existing.st_mode))


def _temp_error(path: str, directory: str, exc: OSError):
    return new_access_error(type(exc), exc.errno, f"cannot save to {path}: cannot create a "
                            f"temporary file in {directory} ({exc.strerror}); fastlayers "
                            f"saves atomically, so the directory must be writable", path)


def _write_named(path: str, directory: str, write, source=None, existing=None) -> None:
    """The portable path: a named hidden temporary file, removed on any exception.
    ``source``: an open file whose content to copy instead of calling ``write``;
    ``existing``: the stat of the file being replaced (its mode and owner are kept)."""
    tmp = _temp_name(directory, os.path.basename(path))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
    except OSError as exc:
        raise _temp_error(path, directory, exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            if source is None:
                write(f)
            else:
                source.seek(0)
                while chunk := source.read(1 << 24):
                    f.write(chunk)
            f.flush()
            _copy_attributes(f.fileno(), existing)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _rename_into_place(tmp, path)


def resolve_target(path):
    """(the absolute path that ``open(path, "wb")`` would write, its os.stat_result or None
    if it does not exist yet); raises what ``open`` would (as fastlayers errors naming the
    path) for directories, special files, unwritable files, missing directories and
    symbolic-link loops."""
    given = os.fspath(path)
    if given.endswith((os.sep, os.altsep or os.sep)):  # open() refuses it: a directory name
        raise new_access_error(IsADirectoryError, errno.EISDIR,
                               f"cannot save to {given}: a path ending in a separator names a "
                               f"directory", given)
    path = os.path.realpath(os.path.abspath(given))
    if os.path.islink(path):  # realpath stops inside a loop
        raise new_access_error(OSError, errno.ELOOP, f"cannot save to {given}: too many levels "
                               f"of symbolic links", given)
    shown = given if path == os.path.abspath(given) else f"{given} (-> {path})"
    try:
        existing = os.stat(path)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        raise new_access_error(type(exc), exc.errno, f"cannot save to {shown}: {exc.strerror}",
                               path) from exc
    if existing is not None:
        if stat.S_ISDIR(existing.st_mode):
            raise new_access_error(IsADirectoryError, errno.EISDIR,
                                   f"cannot save to {shown}: it is a directory", path)
        if not stat.S_ISREG(existing.st_mode):
            raise SpecialFileError(errno.EINVAL, f"cannot save to {shown}: it is "
                                   f"{special_kind(existing.st_mode)}, not a "
                                   f"regular file (fastlayers saves only regular files, "
                                   f"atomically); save to a file and copy it there", path)
        if not os.access(path, os.W_OK):
            raise new_access_error(PermissionError, errno.EACCES, f"cannot save to {shown}: "
                                   f"permission denied (the file is not writable)", path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise new_access_error(FileNotFoundError, errno.ENOENT, f"cannot save to {shown}: "
                               f"directory {directory} does not exist", path)
    return path, existing


def atomic_write(path, write) -> None:
    """Replace ``path`` atomically with what ``write(f)`` writes to a binary file ``f``.

    path: the target file (str or PathLike); its directory must exist. Symbolic links are
        followed; an existing file keeps its mode (and owner where allowed); see the module
        docstring for what else is refused.
    write: a callable that writes the whole content to the file object it is given (it
        may seek; it must not close it). If it raises, ``path`` is left as it was and
        the exception propagates.
    """
    global _anonymous_works
    path, existing = resolve_target(path)
    directory = os.path.dirname(path)
    fd = None
    if _anonymous_works:
        try:
            fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:  # e.g. permission denied: so would a name
                raise _temp_error(path, directory, exc) from exc
            _anonymous_works = False  # a filesystem or kernel without O_TMPFILE
    if fd is None:
        _write_named(path, directory, write, existing=existing)
    else:
        with os.fdopen(fd, "w+b") as f:  # closing it frees an unlinked inode
            write(f)
            f.flush()
            _copy_attributes(f.fileno(), existing)
            os.fsync(f.fileno())
            tmp = _temp_name(directory, os.path.basename(path))
            if _link_anonymous(f.fileno(), tmp):
                _rename_into_place(tmp, path)
            else:  # linking refused: copy what was written into a named temporary file
                _anonymous_works = False
                _write_named(path, directory, None, source=f, existing=existing)
    _fsync_directory(directory)
