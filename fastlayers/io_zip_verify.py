"""Check the CRC-32s of the records of a torch zip file that ``torch.load`` will read.

A torch zip file (``torch.save``'s default format) holds ``<archive>/data.pkl`` (the
pickled structure), a few small records (``byteorder``, ``version``, ...) and one record
``<archive>/data/<key>`` per storage. :func:`verify_torch_zip` checks, before torch reads
anything:

* every small record torch reads, and ``data.pkl``;
* the ``data/<key>`` records the pickle refers to (found by unpickling ``data.pkl`` with
  torch's weights-only unpickler onto the ``meta`` device: no data is read or allocated),
  and that each holds as many bytes as the pickle says (so a damaged size never makes
  torch allocate more than the file holds).

Members torch never reads (other names, storages nothing refers to) are neither read nor
decompressed, so the check costs one read of what ``torch.load`` reads, whatever else the
archive holds. A record the pickle refers to but the archive lacks, or a CRC-32 that does
not match, raises :class:`~fastlayers.io_errors.CorruptFileError` naming the record.
"""
import io
import zipfile

import torch

from .io_errors import corrupt

_CHUNK = 1 << 20
_SMALL_RECORDS = ("data.pkl", ".format_version", ".storage_alignment", "byteorder", "version",
                  ".data/version", ".data/serialization_id")


def _check_record(path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """Read one record through zipfile (which checks its CRC-32 at the end); return its
    bytes when it is small (data.pkl and friends), else b''."""
    keep = not info.filename.split("/", 1)[-1].startswith("data/")
    parts = []
    try:
        with archive.open(info) as member:
            while chunk := member.read(_CHUNK):
                if keep:
                    parts.append(chunk)
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):
            raise corrupt(path, exc, f"record {info.filename!r} fails its CRC-32 check (the file "
                                     f"is corrupted)") from exc
        raise corrupt(path, exc) from exc
    except OSError:
        raise  # the file system, not the file: the caller reports it as such
    except Exception as exc:  # zlib.error, NotImplementedError (zip version), encryption, ...
        raise corrupt(path, exc) from exc
    return b"".join(parts)


def _storage_keys(pickled: bytes) -> dict:
    """{storage key: its size in bytes} for the storages ``data.pkl`` refers to, without
    reading or allocating any data.
    Raises what the unpickler raises (the caller lets torch.load report unsafe files)."""
    from torch._weights_only_unpickler import Unpickler

    keys = {}

    def persistent_load(pid):
        _, storage_type, key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        nbytes = int(numel) * torch._utils._element_size(dtype)
        keys.setdefault(str(key), nbytes)  # torch.load too sizes a storage at its first use
        return torch.storage.TypedStorage(
            wrap_storage=torch.UntypedStorage(nbytes, device="meta"), dtype=dtype, _internal=True)

    unpickler = Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    unpickler.load()
    return keys


def verify_torch_zip(path, file=None) -> None:
    """Raise CorruptFileError if a record ``torch.load(path)`` reads is damaged or missing.

    path: a file (named in errors); anything that is not a zip archive (torch's legacy
        format, garbage) is left to torch.load to judge. OSErrors propagate unchanged.
    file: ``path`` opened for binary reading, to check that open file (and then hand it,
        rewound, to torch.load) rather than open the path again; left open.
    """
    source = path if file is None else file
    if not zipfile.is_zipfile(source):
        return
    try:
        archive = zipfile.ZipFile(source)
    except OSError:
        raise  # the file system, not the file: the caller reports it as such
    except Exception as exc:  # BadZipFile, NotImplementedError, ValueError, ...
        raise corrupt(path, exc) from exc
    with archive:
        infos = archive.infolist()
        if not infos:
            raise corrupt(path, cause="the zip archive is empty (not a torch file)")
        prefix = infos[0].filename.split("/", 1)[0]
        by_name, twice = {}, set()
        for info in infos:
            if info.filename in by_name:
                twice.add(info.filename)
            by_name.setdefault(info.filename, info)

        def record(name):  # which of two same-named records torch reads is unspecified
            if name in twice:
                raise corrupt(path, cause=f"record {name} appears twice in the zip archive (the "
                                          f"file is corrupted or was edited)")
            return by_name.get(name)

        pickled = None
        for name in _SMALL_RECORDS:
            info = record(f"{prefix}/{name}")
            if info is not None:
                data = _check_record(path, archive, info)
                if name == "data.pkl":
                    pickled = data
        if pickled is None:
            raise corrupt(path, cause=f"the zip archive has no {prefix}/data.pkl record (not a "
                                      f"torch file, or a damaged one)")
        try:
            keys = _storage_keys(pickled)
        except Exception:  # noqa: BLE001
            return  # unsafe, or a form this check does not know: torch.load judges the pickle
        for key, nbytes in sorted(keys.items()):
            info = record(f"{prefix}/data/{key}")
            if info is None:
                raise corrupt(path, cause=f"record {prefix}/data/{key!s}, which the file refers "
                                          f"to, is missing (the file is truncated or corrupted)")
            if info.file_size != nbytes:  # checked before torch allocates nbytes for it
                raise corrupt(path, cause=f"record {prefix}/data/{key!s} holds {info.file_size} "
                                          f"bytes but the file says {nbytes} (the file is "
                                          f"corrupted)")
            _check_record(path, archive, info)
