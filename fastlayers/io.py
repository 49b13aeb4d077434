"""Safe saving and loading of tensors and state_dicts (the seed's File I/O section).

    fastlayers.io.save(x, "x-file")                     # a tensor
    fastlayers.io.save([x, y], "x-files")                # a list (tuple, dict) of tensors
    fastlayers.io.save(net.state_dict(), "mlp.params")   # a state_dict
    fastlayers.io.save(net.state_dict(), "mlp.safetensors")
    x2 = fastlayers.io.load("x-file")
    fastlayers.io.save_model(net, "mlp.pth"); fastlayers.io.load_model(clone, "mlp.pth")

Format: paths ending in ``.safetensors`` use the safetensors library
(:mod:`fastlayers.io_safetensors`); every other path torch's zip format (``torch.save``),
readable by plain ``torch.load`` too.

Saving is atomic and otherwise behaves like ``torch.save`` toward the file system (see
:mod:`fastlayers._atomic_write`): symbolic links are written through to their target, an
existing file keeps its mode (and owner where allowed), directories and special files
(FIFOs, device nodes, sockets) are refused with an error naming the path, and no temporary
file is left behind. :func:`save` accepts only what :func:`load` can read back safely
(tensors, numbers, strings, dtypes, devices, sizes, and lists, tuples, dicts and sets of
those) and names the offending entry otherwise.

Loading never runs code from the file (``weights_only=True``), and every failure is a
:class:`~fastlayers.io_errors.FastlayersIOError` naming the file, with the cause chained:
:class:`CorruptFileError` (damaged or not a checkpoint; a ValueError),
:class:`UnsafeFileError` (pickled objects that could run code; a pickle.UnpicklingError),
:class:`DeviceUnavailableError` (saved on a device this machine lacks; a RuntimeError) and
:class:`FileAccessError` for the file system, raised as the matching builtin too
(FileNotFoundError, PermissionError, IsADirectoryError): an unreadable file is never
called corrupt. With ``verify=True`` (default) the CRC-32s of the records torch will read
(:mod:`fastlayers.io_zip_verify`), or of every tensor of a fastlayers safetensors file, are
checked first. (Files in torch's pre-1.6 legacy format, and safetensors files written by
other tools, carry no checksums: truncation and damaged headers are still caught, flipped
data bits cannot be.)
"""
import errno
import os
import pickle
import re
import stat
from typing import Any

import torch

from ._atomic_write import atomic_write
from .io_errors import (CorruptFileError, DeviceUnavailableError, FastlayersIOError,
                        FileAccessError, SpecialFileError, StateDictMismatchError,
                        UnsafeFileError, UnsupportedTensorError, access_error, corrupt,
                        new_access_error, os_failure, special_kind)
from .io_model import LoadReport, load_model, save_model
from .io_safetensors import load_safetensors, to_safetensors
from .io_savable import check_savable
from .io_zip_verify import verify_torch_zip

__all__ = ["save", "load", "save_model", "load_model", "LoadReport", "FastlayersIOError",
           "CorruptFileError", "UnsafeFileError", "StateDictMismatchError",
           "DeviceUnavailableError", "UnsupportedTensorError", "FileAccessError",
           "SpecialFileError"]


def _as_path(path, verb: str) -> str:
    """``path`` as a str (bytes decoded as the file system does); a file object or a
    descriptor is refused: save replaces a file by renaming, load checks it first."""
    if isinstance(path, (str, bytes, os.PathLike)):
        return os.fsdecode(os.fspath(path))
    raise TypeError(f"fastlayers.io.{verb}: path must be a str, bytes or os.PathLike, got "
                    f"{type(path).__name__} (a file object or descriptor cannot be replaced "
                    f"atomically or checked first: use torch.{verb} for those)")


def _is_safetensors(path) -> bool:
    return os.fspath(path).lower().endswith(".safetensors")


def save(obj: Any, path) -> None:
    """Save ``obj`` to ``path`` atomically.

    obj: a tensor, a state_dict, or lists/tuples/dicts/sets of tensors and plain values
        (torch format); for ``.safetensors`` paths a tensor, a list/tuple of tensors or a
        flat dict of tensors with string keys (loaded back as the same container type;
        views are written as their own elements only).
    path: str, bytes or PathLike (not a file object); its directory must exist. An
        existing file is replaced only once the new one is complete; a symbolic link is
        written through to its target; the file keeps its mode (and owner where allowed).
    Raises TypeError naming any entry that could not be loaded back safely
    (:class:`UnsupportedTensorError` for complex128, quantized, sparse or meta tensors into
    ``.safetensors``), IsADirectoryError / :class:`SpecialFileError` (a FIFO, device node or
    socket) / PermissionError / FileNotFoundError (missing directory) naming the path.
    """
    path = _as_path(path, "save")
    if _is_safetensors(path):
        from safetensors.torch import save as st_save
        tensors, metadata = to_safetensors(obj)
        atomic_write(path, lambda f: f.write(st_save(tensors, metadata)))
    else:
        check_savable(obj)
        atomic_write(path, lambda f: torch.save(obj, f))


def _check_readable(path) -> None:
    """Raise a FileAccessError naming ``path`` unless it is a regular file we may read."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise new_access_error(FileNotFoundError, errno.ENOENT,
                               f"cannot load {os.fspath(path)}: no such file", path) from exc
    except OSError as exc:
        raise access_error(path, exc) from exc
    if stat.S_ISDIR(info.st_mode):
        raise new_access_error(IsADirectoryError, errno.EISDIR,
                               f"cannot load {os.fspath(path)}: it is a directory", path)
    if not stat.S_ISREG(info.st_mode):
        raise SpecialFileError(errno.EINVAL, f"cannot load {os.fspath(path)}: it is "
                               f"{special_kind(info.st_mode)}, not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise access_error(path, exc) from exc


# torch's words for storages tagged with a device this build or machine lacks (CUDA, MPS,
# XPU, ...): the file is intact, the device is missing
_DEVICE_MESSAGES = ("Attempting to deserialize object on", "not compiled with",
                    "Storage device not recognized", "don't know how to restore data location")


def _check_map_location(map_location) -> None:
    """A string map_location must name a device (``'gpu'`` would surface as torch's failure
    to restore the data, which is not the file's fault)."""
    if isinstance(map_location, str):
        try:
            torch.device(map_location)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"fastlayers.io.load: map_location={map_location!r} is not a "
                             f"device ({str(exc).strip().splitlines()[0]}); use e.g. 'cpu' "
                             f"or 'cuda:0'") from exc


def _load_torch(path, map_location, verify: bool):
    try:  # ONE open file, checked and then read: an atomic save that replaces the path in
        # between cannot make torch read a file other than the one verified
        with open(path, "rb") as f:
            if verify:
                verify_torch_zip(path, f)
                f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True)
    except FastlayersIOError:
        raise
    except OSError as exc:  # EINVAL: torch's reader seeking past the end is a damaged file
        raise os_failure(path, exc) from exc
    except pickle.UnpicklingError as exc:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if culprit is None:
            raise corrupt(path, exc) from exc
        raise UnsafeFileError(
            f"refusing to load {os.fspath(path)}: it holds pickled Python objects "
            f"({culprit.group(1)}) that could run arbitrary code when loaded. If you trust "
            f"the file, use torch.load(path, weights_only=False); fastlayers.io.save writes "
            f"only safe content") from exc
    except (RuntimeError, AssertionError) as exc:
        if any(m.lower() in str(exc).lower() for m in _DEVICE_MESSAGES):
            raise DeviceUnavailableError(
                f"cannot load {os.fspath(path)}: its tensors were saved on a device this "
                f"machine does not have ({str(exc).strip().splitlines()[0]}); pass "
                f"map_location='cpu' (fastlayers.io.load(path, map_location='cpu')), or use "
                f"fastlayers.io.load_model, which loads onto the model's device") from exc
        raise corrupt(path, exc) from exc
    except Exception as exc:  # zip, pickle and C++ reader errors of a damaged file
        raise corrupt(path, exc) from exc


def load(path, map_location=None, *, verify: bool = True):
    """Load what :func:`save` (or ``torch.save`` / safetensors) wrote to ``path``.

    map_location: as in ``torch.load`` (a device, a string like ``'cpu'``, a dict or a
        callable) for torch files (default: the devices they were saved from; a file
        saved on a device this machine lacks raises :class:`DeviceUnavailableError`
        suggesting ``map_location='cpu'``); a device or string for ``.safetensors`` files
        (default: the CPU).
    verify: check the checksums first (one read of what torch reads); False skips it for
        large files you trust to be intact.
    Raises TypeError for a path that is not a str, bytes or PathLike, ValueError for a
    map_location string that names no device; else, each naming
    the file, with the cause chained: :class:`FileAccessError` (as
    FileNotFoundError, PermissionError, IsADirectoryError, or :class:`SpecialFileError`),
    :class:`UnsafeFileError` (the file would run code), :class:`DeviceUnavailableError`, or
    :class:`CorruptFileError` (truncated, corrupted, edited or not a checkpoint).
    """
    path = _as_path(path, "load")
    _check_map_location(map_location)
    _check_readable(path)
    if _is_safetensors(path):
        return load_safetensors(path, map_location, verify)
    return _load_torch(path, map_location, verify)
