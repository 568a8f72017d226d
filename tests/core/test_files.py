"""files.py: atomic writes that keep a file's mode, and the rules of where the studio may write: a new, empty or
studio-written folder; a person's files are never replaced, not even with force."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest

from studio.core.errors import WriteError
from studio.core.files import (
    MANIFEST,
    atomic_file,
    atomic_folder,
    check_output_folder,
    foreign_entries,
    output_file,
    studio_wrote,
    write_atomic,
    write_failure,
)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def write_adapter(target, text: str = "weights", **kwargs) -> None:
    with atomic_folder(target, "adapter", **kwargs) as staging:
        (staging / "adapter_config.json").write_text("{}")
        (staging / "adapter_model.safetensors").write_text(text)


def test_a_rewritten_file_keeps_its_mode_and_a_new_one_gets_the_umasks(tmp_path):
    path = tmp_path / "run.yaml"
    write_atomic(path, "first")
    assert mode(path) == 0o666 & ~umask()  # not mkstemp's 0600
    os.chmod(path, 0o640)
    write_atomic(path, "second")
    assert path.read_text() == "second" and mode(path) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]


def test_a_failed_write_leaves_the_file_as_it_was_and_no_temp(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("before")
    with pytest.raises(ZeroDivisionError):  # a bug inside the block keeps its own type
        with atomic_file(path) as temp:
            temp.write_text("half")
            1 / 0
    with pytest.raises(WriteError, match=f"cannot write the log to {path}: Permission denied"):
        with atomic_file(path, "log") as temp:
            raise PermissionError(errno.EACCES, "Permission denied")
    assert path.read_text() == "before" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_full_disk_is_said_in_words():
    reason = write_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert reason.startswith("the disk is full") and "free some space" in reason
    assert write_failure(ValueError("a bug")) is None


def test_a_new_folder_gets_its_files_a_manifest_and_the_usual_mode(tmp_path):
    target = tmp_path / "out" / "adapter"
    write_adapter(target)
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "adapter_config.json", "adapter_model.safetensors"]
    assert mode(target) == 0o777 & ~umask()  # not mkdtemp's 0700
    manifest = json.loads((target / MANIFEST).read_text())
    assert sorted(manifest["entries"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert foreign_entries(target) == [] and studio_wrote(target / "adapter_model.safetensors")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]  # no temp folder left


def test_a_folder_with_a_persons_files_is_refused_naming_it_and_force(tmp_path):
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.tex").write_text("years of work")
    (documents / "photos").mkdir()
    with pytest.raises(WriteError) as refused:
        write_adapter(documents)
    assert str(refused.value) == (f"{documents} holds files the studio did not write (photos, thesis.tex): choose a "
                                  "new or empty folder for the adapter, or use --force to write beside them (they "
                                  "are kept)")
    assert sorted(p.name for p in documents.iterdir()) == ["photos", "thesis.tex"]


def test_force_writes_beside_a_persons_files_and_replaces_only_the_studios(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    write_adapter(folder, "first", force=True)
    write_adapter(folder, "second", force=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "adapter_model.safetensors").read_text() == "second"
    assert foreign_entries(folder) == ["notes.txt"]

    (folder / "adapter_config.json").write_text('{"edited": "by hand"}')  # now the person's: never replaced
    with pytest.raises(WriteError, match="adapter_config.json was not written by the studio and is never replaced"):
        write_adapter(folder, "third", force=True)
    assert (folder / "adapter_config.json").read_text() == '{"edited": "by hand"}'
    assert (folder / "adapter_model.safetensors").read_text() == "second"
    assert not any(".partial-" in p.name for p in folder.iterdir())


def test_the_studios_own_folder_is_replaced_in_place_without_its_old_entries(tmp_path):
    target = tmp_path / "export"
    write_adapter(target, "first")
    with atomic_folder(target, "adapter") as staging:
        (staging / "adapter_model.safetensors").write_text("second")
        (staging / "README.md").write_text("new")
    os.chmod(target, 0o750)
    inode = target.stat().st_ino
    write_adapter(target, "third")
    assert target.stat().st_ino == inode and mode(target) == 0o750  # the folder itself stays
    assert sorted(snapshot(target)) == [MANIFEST, "adapter_config.json", "adapter_model.safetensors"]
    assert (target / "adapter_model.safetensors").read_text() == "third"


def test_a_failure_while_filling_leaves_the_earlier_folder_and_no_temp(tmp_path):
    target = tmp_path / "adapter"
    write_adapter(target, "good")
    before = snapshot(target)
    with pytest.raises(WriteError, match=f"cannot write the adapter to {target}: File too large"):
        with atomic_folder(target, "adapter") as staging:
            (staging / "adapter_model.safetensors").write_text("half")
            raise OSError(errno.EFBIG, "File too large")
    assert snapshot(target) == before and sorted(p.name for p in target.iterdir()) == sorted(before)


def test_temp_folders_left_by_a_crash_go_with_the_next_write(tmp_path):
    target = tmp_path / "adapter"
    write_adapter(target)
    crashed = target / ".adapter.partial-0123abcd"
    crashed.mkdir()
    (crashed / "adapter_model.safetensors").write_text("half")
    assert foreign_entries(target) == []
    write_adapter(target)
    assert not crashed.exists()


def test_home_root_run_folder_current_folder_and_a_file_in_the_way_each_get_their_line(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(WriteError, match=f"will not write the merged model into {home} itself: name a new folder"):
        check_output_folder(home, "merged model", force=True)
    with pytest.raises(WriteError, match="will not write the adapter into / itself"):
        check_output_folder("/", "adapter", force=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text("model: {}\n")
    with pytest.raises(WriteError, match=f"{run} is a run folder: write the adapter to a new folder"):
        check_output_folder(run, "adapter", force=True)
    monkeypatch.chdir(run.parent)
    with pytest.raises(WriteError, match=f"the current folder {tmp_path} holds files the studio did not write"):
        check_output_folder(".", "adapter")
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(WriteError, match=r"to .*a-file/adapter: .*a-file is a file, not a folder"):
        check_output_folder(tmp_path / "a-file" / "adapter", "adapter")


def test_an_output_file_replaces_the_studios_own_and_a_persons_only_when_forced(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_text("a person's model")
    with pytest.raises(WriteError, match=f"{target} exists and was not written by the studio: .* --force"):
        with output_file(target, "GGUF file") as temp:
            temp.write_text("ours")
    assert target.read_text() == "a person's model"
    with output_file(target, "GGUF file", force=True) as temp:
        temp.write_text("ours")
    assert studio_wrote(target)
    with output_file(target, "GGUF file") as temp:  # the studio's own now: no force needed
        temp.write_text("ours again")
    assert target.read_text() == "ours again" and foreign_entries(tmp_path) == []
