"""Checkpoint files: atomic writes that keep the old file on failure, and loads that refuse code,
truncation and corruption with one line naming the file."""

import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from tinylm import checkpoint, rundir
from tinylm.errors import UserError


class Exploit:
    """Unpickling this runs a shell command that creates a file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Exploit(marker)}, evil)  # a well-formed torch zip carrying the pickle
    with pytest.raises(UserError, match=rf"^cannot load checkpoint {evil}: it references \S*system, and only tensors"):
        checkpoint.load(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # control: an unsafe load does run it
    assert marker.exists()


def test_a_bare_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(UserError, match=rf"^cannot load checkpoint {evil}: it is truncated or not a checkpoint"):
        checkpoint.load(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # control
    assert marker.exists()


def member_data_offset(path: Path, name_end: str) -> tuple[int, int]:
    """(offset, size) of the stored bytes of the archive member whose name ends with name_end."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(name_end))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = struct.unpack("<4s5H3L2H", f.read(30))  # the local file header
    return info.header_offset + 30 + header[9] + header[10], info.file_size


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "checkpoint.pt"
    checkpoint.save({"model": {"w": torch.arange(10_000, dtype=torch.float32)}, "step": 3}, path)
    return path


def test_truncated_checkpoint_is_one_line_naming_the_file(saved):
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 0):
        saved.write_bytes(data[:cut])
        with pytest.raises(UserError, match=rf"^cannot load checkpoint {saved}: it is truncated or not a checkpoint") as e:
            checkpoint.load(saved)
        assert "\n" not in str(e.value)


def test_a_flipped_byte_in_a_tensor_is_caught(saved):
    offset, size = member_data_offset(saved, "data/0")
    data = bytearray(saved.read_bytes())
    data[offset + size // 2] ^= 0x01  # torch.load alone would load this as a slightly wrong number
    saved.write_bytes(bytes(data))
    with pytest.raises(UserError, match=rf"^cannot load checkpoint {saved}: it is damaged \(member \S+/data/0 fails its CRC-32"):
        checkpoint.load(saved)


def test_run_without_the_expected_contents_is_one_line(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run)
    checkpoint.save({"model": {}}, run / "checkpoint.pt")
    with pytest.raises(UserError, match=r"is not a tinylm training checkpoint \(it lacks vocab_size, config\)"):
        rundir.load(run)


def test_failed_save_keeps_the_previous_checkpoint(saved, tmp_path):
    before = saved.read_bytes()

    class Boom(Exception):
        pass

    with pytest.raises(Boom):  # the process dies half-way through writing
        with checkpoint.atomic_file(saved) as f:
            f.write(b"half a checkpoint")
            raise Boom
    assert saved.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))

    lines: list[str] = []
    saver = checkpoint.Saver(tmp_path / "gone" / "checkpoint.pt", 3, lines.append)  # its folder was removed
    assert not saver.save({"step": 4}, final=False)
    assert lines == [f"warning: could not write {tmp_path}/gone/checkpoint.pt: No such file or directory; "
                     f"{tmp_path}/gone/checkpoint.pt still holds step 3; training goes on and tries again at the next save"]
    with pytest.raises(checkpoint.SaveError, match="No such file or directory; .* still holds step 3$"):
        saver.save({"step": 5}, final=True)


def test_checkpoint_is_as_readable_as_any_file(saved):
    old = os.umask(0o022)
    try:
        checkpoint.save({"step": 1}, saved)
    finally:
        os.umask(old)
    assert saved.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600: a TensorBoard or sampling user can read it


def test_stale_temporary_files_are_removed(tmp_path, saved):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"left by a killed save")
    rundir.remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_run_directory_has_one_trainer_at_a_time(tmp_path):
    run = tmp_path / "run"
    with rundir.lock(run):
        assert (run / rundir.LOCK).read_text() == str(os.getpid())
        with pytest.raises(UserError, match=rf"^{run} is in use by another training process \(pid {os.getpid()}\);"):
            with rundir.lock(run):
                pass
    with rundir.lock(run):  # released at the end of the first
        pass
    assert run.is_dir()  # nothing failed: the folder stays


def test_a_run_that_fails_before_writing_leaves_no_empty_folder(tmp_path):
    from conftest import tiny_config

    from tinylm.console import QUIET
    from tinylm.loop import train

    (tmp_path / "short.txt").write_text("too short for a window of 32 tokens")
    cfg = tiny_config(tmp_path, [tmp_path / "short.txt"], data={"tokenizer": "char"})
    with pytest.raises(UserError, match="split has .* fewer than one training window"):
        train(cfg, run_dir=tmp_path / "fresh", console=QUIET)
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, as empty as it was (no lock file)
    with pytest.raises(UserError):
        train(cfg, run_dir=tmp_path / "kept", console=QUIET)
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())
