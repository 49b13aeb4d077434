"""What already held before issue 12 and must keep holding: a pickle that runs code is
refused on every route, and concurrent saves (now also through a symbolic link) never show
a reader a partial file."""
import os
import pickle
import threading

import pytest
import torch
from torch import nn

from fastlayers import io as fio


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker file
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5:UserWarning")
def test_code_running_pickle_is_refused_on_every_route(tmp_path):
    marker = str(tmp_path / "PWNED")
    payload = {"w": torch.ones(2), "p": _Payload(marker)}
    routes = []
    for protocol in (0, 2, 5):  # raw pickles, no torch container
        path = tmp_path / f"raw{protocol}.pt"
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
        routes.append(path)
    legacy = tmp_path / "legacy.pt"
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    zipped = tmp_path / "zipped.pt"
    torch.save(payload, zipped)
    renamed = tmp_path / "renamed.safetensors"
    torch.save(payload, renamed)
    routes += [legacy, zipped, renamed]
    for path in routes:
        for verify in (True, False):
            with pytest.raises((fio.UnsafeFileError, fio.CorruptFileError),
                               match=rf"{path.name}") as info:
                fio.load(path, verify=verify)
            assert isinstance(info.value, fio.FastlayersIOError)
            assert info.value.__cause__ is not None
    state = nn.Linear(2, 2).state_dict()
    state["weight"] = _Payload(marker)  # inside a state_dict, through load_model
    torch.save(state, zipped)
    with pytest.raises(fio.UnsafeFileError, match=r"zipped\.pt.*\(io\.open\)"):
        fio.load_model(nn.Linear(2, 2), zipped)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_concurrent_writers_and_a_reader_through_a_link(tmp_path, fmt):
    """4 threads save different states over one file (through a link) while a reader
    loads it: every load is one complete state, and no temporary file is left."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / f"ckpt.{fmt}"
    link = tmp_path / f"latest.{fmt}"
    link.symlink_to(target)
    states = [{"w": torch.full((257,), float(i)), "i": torch.tensor([i])} for i in range(4)]
    fio.save(states[0], link)
    errors, seen, stop = [], set(), threading.Event()

    def writer(i):
        try:
            for _ in range(12):
                fio.save(states[i], link)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    def reader():
        try:
            while not stop.is_set():
                back = fio.load(link)
                i = int(back["i"])
                assert torch.equal(back["w"], states[i]["w"])
                seen.add(i)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    read = threading.Thread(target=reader)
    read.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    read.join()
    assert not errors, errors
    assert seen and link.is_symlink()
    assert os.listdir(tmp_path / "real") == [target.name]
