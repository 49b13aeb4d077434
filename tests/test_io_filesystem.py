"""fastlayers.io.save toward the file system (issue 12, items 1-2): links written through,
modes and owners kept, special files refused, no temp files ever left; and loads that report
file-system failures as such, never as corruption."""
import errno
import os
import pathlib
import select
import signal
import socket
import stat
import tempfile

import pytest
import torch

from fastlayers import _atomic_write
from fastlayers import io as fio

FORMATS = ["pt", "safetensors"]
ROUTES = ["anonymous", "named"]


def _route(monkeypatch, route):
    if route == "named":
        monkeypatch.setattr(_atomic_write, "_anonymous_works", False)


def _equal(a, b):
    assert type(a) is type(b) and list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g)}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_symlinks_are_written_through_to_their_target(tmp_path, monkeypatch, fmt, route):
    _route(monkeypatch, route)
    store = tmp_path / "store"
    store.mkdir()
    target = store / f"ckpt_100.{fmt}"
    fio.save(_tensors(0), target)
    latest = tmp_path / f"latest.{fmt}"
    latest.symlink_to(os.path.relpath(target, tmp_path))  # a relative link
    chain = tmp_path / f"chain.{fmt}"
    chain.symlink_to(latest)  # a link to a link
    new = _tensors(1)
    fio.save(new, chain)
    assert chain.is_symlink() and latest.is_symlink() and os.readlink(chain) == str(latest)
    assert os.readlink(latest) == os.path.relpath(target, tmp_path)
    _equal(fio.load(target), new)  # the final target holds the new data
    _equal(fio.load(latest), new)
    assert sorted(os.listdir(tmp_path)) == sorted(["store", latest.name, chain.name])
    assert os.listdir(store) == [target.name]  # temp file made and renamed in the target's dir


@pytest.mark.parametrize("fmt", FORMATS)
def test_dangling_link_creates_its_target_and_loops_are_named(tmp_path, fmt):
    link = tmp_path / f"link.{fmt}"
    link.symlink_to(tmp_path / f"future.{fmt}")
    new = _tensors(2)
    fio.save(new, link)
    assert link.is_symlink()
    _equal(fio.load(tmp_path / f"future.{fmt}"), new)
    loop_a, loop_b = tmp_path / "a.pt", tmp_path / "b.pt"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    with pytest.raises(OSError, match=r"a\.pt: too many levels of symbolic links") as info:
        fio.save(new, loop_a)
    assert isinstance(info.value, fio.FileAccessError) and info.value.errno == errno.ELOOP
    away = tmp_path / f"away.{fmt}"
    away.symlink_to(tmp_path / "no_dir" / "x.pt")
    with pytest.raises(FileNotFoundError, match=r"away.*no_dir does not exist"):
        fio.save(new, away)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604, 0o755, 0o2664])
def test_existing_file_keeps_its_mode(tmp_path, monkeypatch, route, mode):
    _route(monkeypatch, route)
    for fmt in FORMATS:
        path = tmp_path / f"m.{fmt}"
        fio.save(_tensors(0), path)
        os.chmod(path, mode)
        new = _tensors(3)
        fio.save(new, path)
        assert stat.S_IMODE(path.stat().st_mode) == mode, oct(path.stat().st_mode)
        _equal(fio.load(path), new)
        link = tmp_path / f"l.{fmt}"
        link.symlink_to(path)
        fio.save(_tensors(4), link)  # through a link: the target's mode, not the link's
        assert stat.S_IMODE(path.stat().st_mode) == mode
        link.unlink()
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.safetensors"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
@pytest.mark.parametrize("route", ROUTES)
def test_root_keeps_the_files_owner_and_group(tmp_path, monkeypatch, route):
    _route(monkeypatch, route)
    path = tmp_path / "owned.pt"
    fio.save(_tensors(0), path)
    os.chown(path, 12345, 23456)
    os.chmod(path, 0o640)
    fio.save(_tensors(5), path)
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (12345, 23456, 0o640)
    _equal(fio.load(path), _tensors(5))


def _as_user(uid, fn):
    """Run ``fn()`` in a forked child with uid/gid ``uid``; return what it returned (a str)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = fn()
        except BaseException as exc:  # noqa: BLE001
            result = f"CHILD FAILED {type(exc).__name__}: {exc}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], 120)
    if not ready:  # never hang the suite on a stuck child
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode() if ready else "CHILD FAILED: no answer in 120 s"
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_user_cannot_replace_a_file_open_would_refuse():
    """As a plain user (uid 12345) in a world-writable directory: a root-owned 0644 file
    is refused like open() refuses it (although the rename would pass), and the user's
    own 0600 file stays 0600 and theirs."""
    with tempfile.TemporaryDirectory() as shared:  # pytest's tmp_path is root-only
        os.chmod(shared, 0o777)
        _another_user(pathlib.Path(shared))


def _another_user(tmp_path):
    ro, own = tmp_path / "root.pt", tmp_path / "own.pt"
    fio.save({"w": torch.zeros(2)}, ro)
    os.chmod(ro, 0o644)
    fio.save({"w": torch.zeros(3)}, own)
    os.chown(own, 12345, 12345)
    os.chmod(own, 0o600)

    def child():
        lines = []
        try:
            open(ro, "ab").close()
            lines.append("OPEN OK")
        except PermissionError:
            lines.append("OPEN REFUSED")
        try:
            fio.save({"w": torch.ones(2)}, ro)
            lines.append("SAVED")
        except PermissionError as exc:
            lines.append(f"REFUSED {isinstance(exc, fio.FileAccessError)} {exc}")
        fio.save({"w": torch.ones(3)}, own)
        info = os.stat(own)
        lines.append(f"OWN {oct(stat.S_IMODE(info.st_mode))} {info.st_uid}")
        return "\n".join(lines)

    out = _as_user(12345, child)
    assert "CHILD FAILED" not in out, out
    assert "OPEN REFUSED" in out, out
    assert f"REFUSED True [Errno 13] cannot save to {ro}: permission denied" in out, out
    assert "OWN 0o600 12345" in out, out
    assert torch.equal(fio.load(ro)["w"], torch.zeros(2))
    assert torch.equal(fio.load(own)["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["own.pt", "root.pt"]


def test_new_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        fio.save(_tensors(0), tmp_path / "a.pt")
        with open(tmp_path / "b", "wb"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640
    assert (tmp_path / "a.pt").stat().st_mode == (tmp_path / "b").stat().st_mode


def _special_files(tmp_path):
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    dev = tmp_path / "null.safetensors"
    dev.symlink_to("/dev/null")  # a character device, through a link
    sock_path = tmp_path / "sock.pt"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return sock, [(fifo, "a FIFO"), (dev, "a device node"), (sock_path, "a socket")]


def test_special_files_are_refused_by_save_and_load(tmp_path):
    sock, cases = _special_files(tmp_path)
    try:
        before = sorted(os.listdir(tmp_path))
        for path, kind in cases:
            with pytest.raises(fio.SpecialFileError, match=rf"cannot save to {path}.*it is {kind}"):
                fio.save(_tensors(0), path)
            with pytest.raises(fio.SpecialFileError, match=rf"cannot load {path}: it is {kind}"):
                fio.load(path)  # never blocks on the FIFO
        assert stat.S_ISFIFO(os.stat(tmp_path / "fifo.pt").st_mode)
        assert stat.S_ISCHR(os.stat(tmp_path / "null.safetensors").st_mode)
        assert sorted(os.listdir(tmp_path)) == before
    finally:
        sock.close()
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "to_dir.pt").symlink_to(sub)
    for path in (sub, tmp_path / "to_dir.pt"):
        with pytest.raises(IsADirectoryError, match="it is a directory") as info:
            fio.save(_tensors(0), path)
        assert isinstance(info.value, fio.FileAccessError)
        with pytest.raises(IsADirectoryError, match=rf"cannot load {path}: it is a directory"):
            fio.load(path)
    assert os.listdir(sub) == []


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_final_rename_leaves_no_temp_file(tmp_path, monkeypatch, fmt, route):
    _route(monkeypatch, route)
    path = tmp_path / f"x.{fmt}"
    old = _tensors(0)
    fio.save(old, path)

    def refuse(src, dst):
        raise OSError(errno.EXDEV, "rename refused")

    monkeypatch.setattr(_atomic_write.os, "replace", refuse)
    with pytest.raises(OSError, match="rename refused"):
        fio.save(_tensors(1), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == [path.name]
    _equal(fio.load(path), old)


def test_unwritable_directory_is_named(tmp_path, monkeypatch):
    """The temporary file cannot be created: the error names the path and says why."""
    real_open = os.open

    def deny(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    for route in ROUTES:
        _route(monkeypatch, route)
        monkeypatch.setattr(_atomic_write.os, "open", deny)
        with pytest.raises(PermissionError, match=rf"cannot save to .*x\.pt: cannot create a "
                                                  rf"temporary file in {tmp_path}"):
            fio.save(_tensors(0), tmp_path / "x.pt")
        monkeypatch.undo()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_reports_file_system_errors_as_such(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"x.{fmt}"
    fio.save(_tensors(0), path)
    with pytest.raises(FileNotFoundError, match=r"cannot load .*nope\.pt: no such file") as info:
        fio.load(tmp_path / "nope.pt")
    assert isinstance(info.value, fio.FileAccessError)
    assert not isinstance(info.value, fio.CorruptFileError)

    import builtins
    real_open = builtins.open

    def deny(file, mode="r", *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(PermissionError, match=rf"cannot load {path}: Permission denied") as info:
        fio.load(path)
    assert isinstance(info.value, fio.FileAccessError) and info.value.errno == errno.EACCES
    assert isinstance(info.value.__cause__, PermissionError)
    monkeypatch.undo()
    if fmt == "pt":  # an I/O error in the middle of torch.load: the disk, not the file
        def eio(*args, **kwargs):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(torch, "load", eio)
        with pytest.raises(OSError, match=rf"cannot load {path}: Input/output error") as info:
            fio.load(path)
        assert isinstance(info.value, fio.FileAccessError)
        assert not isinstance(info.value, fio.CorruptFileError)


def test_hard_links_keep_the_old_content_under_their_other_names(tmp_path):
    """As documented: an atomic save replaces this name; another hard link to the old
    file is a separate name for the old content (torch.save would write into both)."""
    path, other = tmp_path / "a.pt", tmp_path / "b.pt"
    fio.save(_tensors(0), path)
    os.link(path, other)
    fio.save(_tensors(1), path)
    _equal(fio.load(path), _tensors(1))
    _equal(fio.load(other), _tensors(0))
    assert path.stat().st_nlink == 1 and other.stat().st_nlink == 1


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_longest_file_names_save_like_torch(tmp_path, monkeypatch, fmt, route):
    """A 255-byte name (the most one directory entry holds) saves, as with torch.save: the
    temporary name beside it must stay legal too. No temporary file is left, and the
    anonymous route stays on for later saves."""
    _route(monkeypatch, route)
    before = _atomic_write._anonymous_works
    path = tmp_path / ("x" * (255 - len(fmt) - 1) + "." + fmt)
    fio.save(_tensors(0), path)
    _equal(fio.load(path), _tensors(0))
    fio.save(_tensors(1), path)  # replace it
    _equal(fio.load(path), _tensors(1))
    assert os.listdir(tmp_path) == [path.name]
    assert _atomic_write._anonymous_works == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_path_ending_in_a_separator_is_refused_like_open_does(tmp_path, fmt):
    """``ckpt.pt/`` names a directory: open() and torch.save refuse it; so does save,
    writing nothing (it used to write ``ckpt.pt``)."""
    path = str(tmp_path / f"ckpt.{fmt}") + os.sep
    with pytest.raises(IsADirectoryError, match="ending in a separator") as info:
        fio.save(_tensors(0), path)
    assert isinstance(info.value, fio.FileAccessError)
    assert os.listdir(tmp_path) == []
