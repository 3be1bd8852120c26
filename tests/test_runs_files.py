"""Atomic writes under unique temporary names, output folders, the device."""

import json
import os

import pytest
import torch

from ppl_vae.errors import InputError
from ppl_vae.runs.files import (
    make_output_dir,
    resolve_device,
    save_torch,
    write_json,
    write_text,
)


def test_writes_replace_whole_files_and_leave_no_temporary_behind(tmp_path):
    write_text("old", tmp_path / "a.txt")
    write_text("new", tmp_path / "a.txt")
    write_json({"k": [1, 2]}, tmp_path / "b.json")
    save_torch({"t": torch.arange(3)}, tmp_path / "c.pt")
    assert (tmp_path / "a.txt").read_text() == "new"
    assert json.loads((tmp_path / "b.json").read_text()) == {"k": [1, 2]}
    assert torch.equal(torch.load(tmp_path / "c.pt")["t"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    write_text("kept", tmp_path / "a.txt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_torch({"x": Unpicklable()}, tmp_path / "a.txt")
    assert (tmp_path / "a.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_temporary_names_are_unique_per_write(tmp_path, monkeypatch):
    import tempfile

    names = []
    real = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        names.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    for _ in range(3):
        write_text("x", tmp_path / "a.txt")
    assert len(set(names)) == 3 and all(".a.txt." in n for n in names)


def test_output_folders(tmp_path):
    assert make_output_dir(tmp_path / "x" / "y").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot create output directory"):
        make_output_dir(tmp_path / "file" / "run")


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "unknown device 'tpu'"), ("meta", "not supported"), ("mps", "not supported")],
)
def test_devices_other_than_cpu_and_cuda_are_refused(device, message):
    with pytest.raises(InputError, match=message):
        resolve_device(device)


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
