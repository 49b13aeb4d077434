"""The errors :mod:`fastlayers.io` raises, and helpers that build them.

Every one derives from :class:`FastlayersIOError` *and* from the builtin an older ``except``
clause would name, so ``except ValueError`` (corrupt files), ``except
pickle.UnpicklingError`` (unsafe files), ``except RuntimeError`` (state_dict mismatches,
devices), ``except TypeError`` (what a format cannot hold) and ``except OSError`` /
``FileNotFoundError`` / ``PermissionError`` (the file system) keep working. Each message
names the file; the exception that caused it is chained (``raise ... from exc``).
"""
import errno
import functools
import os
import pickle
import stat


class FastlayersIOError(Exception):
    """Base class of every error :mod:`fastlayers.io` raises on purpose."""


class CorruptFileError(FastlayersIOError, ValueError):
    """The file is truncated, corrupted, or not a torch/safetensors file at all."""


class UnsafeFileError(FastlayersIOError, pickle.UnpicklingError):
    """The file holds pickled Python objects that could run code when loaded."""


class StateDictMismatchError(FastlayersIOError, RuntimeError):
    """A saved state_dict does not fit the model (missing, unexpected, mis-shaped or
    mis-typed keys)."""


class DeviceUnavailableError(FastlayersIOError, RuntimeError):
    """The file's tensors were saved on a device this machine does not have (e.g. CUDA on a
    CPU-only machine); pass ``map_location``."""


class UnsupportedTensorError(FastlayersIOError, TypeError):
    """A tensor the chosen format cannot hold (e.g. complex128, quantized or sparse into
    ``.safetensors``)."""


class FileAccessError(FastlayersIOError, OSError):
    """The file system refused (missing file, permission denied, a directory, a special
    file). Raised as a subclass of the matching builtin too (FileNotFoundError, ...)."""


class SpecialFileError(FileAccessError):
    """The path is a FIFO, device node or socket, which fastlayers neither saves over nor
    loads from."""


def special_kind(mode: int) -> str:
    """'a FIFO', 'a socket' or 'a device node' for a non-regular, non-directory st_mode."""
    return ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device node")


@functools.lru_cache(maxsize=None)
def _access_error_type(builtin: type) -> type:
    if builtin is OSError or issubclass(FileAccessError, builtin):
        return FileAccessError
    return type(builtin.__name__, (FileAccessError, builtin),
                {"__module__": __name__, "__doc__": FileAccessError.__doc__})


def access_error(path, exc: OSError, action: str = "load") -> FileAccessError:
    """A FileAccessError (also an instance of ``type(exc)``) saying ``cannot <action>
    <path>: <what the system said>``; the caller chains ``exc``."""
    cls = _access_error_type(type(exc) if isinstance(exc, OSError) else OSError)
    reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
    message = f"cannot {action} {os.fspath(path)}: {reason}"
    if isinstance(exc, OSError) and exc.errno is not None:
        err = cls(exc.errno, message)
        err.filename = os.fspath(path)
        return err
    return cls(message)


def new_access_error(builtin: type, errno_: int, message: str, path) -> FileAccessError:
    """A FileAccessError of the builtin type ``builtin`` with ``message`` (naming ``path``)."""
    err = _access_error_type(builtin)(errno_, message)
    err.filename = os.fspath(path)
    return err


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def corrupt(path, exc: BaseException = None, cause: str = None) -> CorruptFileError:
    """CorruptFileError naming ``path`` and ``cause`` (default: the generic 'truncated,
    corrupted or not a torch/safetensors file') and the first line of ``exc``."""
    cause = cause or "the file is truncated, corrupted, or not a torch/safetensors file"
    detail = f" ({first_line(exc)})" if exc is not None else ""
    return CorruptFileError(f"cannot load {os.fspath(path)}: {cause}{detail}")


_FILE_SYSTEM_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR, errno.ENOTDIR,
                       errno.EIO, errno.EMFILE, errno.ENFILE, errno.ELOOP, errno.ENAMETOOLONG,
                       errno.ENXIO, errno.ENODEV, errno.ENOMEM, errno.ESTALE}


def os_failure(path, exc: OSError) -> FastlayersIOError:
    """An OSError met while reading ``path``: a FileAccessError when the file system failed
    (permissions, missing files, I/O errors), a CorruptFileError when a reader tripped over
    the content (e.g. EINVAL from seeking to an offset a damaged header gave)."""
    if exc.errno in _FILE_SYSTEM_ERRNOS:
        return access_error(path, exc)
    return corrupt(path, exc)
