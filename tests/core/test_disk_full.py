"""A full disk (ENOSPC from a real filesystem, not a file-size limit): on a small tmpfs mounted for the test, the disk
fills up while a checkpoint, the final adapter or a merged model is being written. Each ends in one line that says
the disk is full, the previous checkpoint stays intact (a resume from it, once there is room again, finishes with the
losses of an uninterrupted run), no staging `.partial` is left behind, and the error log is written only when there
is room for it. Skipped, with the reason, where a tmpfs cannot be mounted (not root, or no mount permission)."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from pathlib import Path

import pytest

from studio.cli import main
from studio.core import events as ev
from studio.core.data.dataset import DEMO_DIR
from studio.core.files import MANIFEST
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.checkpoints import latest_checkpoint, read_state
from studio.core.train.engine import resume, train
from studio.core.train.run_folder import read_curves

FULL = "the disk is full: free some space, then try again"  # files.DISK_FULL, the same for every write


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; run as root (or in a container) to test a full disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk, then free `leave` bytes: the next write larger than that fails with ENOSPC."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle:  # unbuffered: nothing left to flush when the disk is full
        for chunk in (1 << 20, 1 << 12):
            try:
                while handle.write(b"\0" * chunk) == chunk:
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(filler.stat().st_size - leave, 0))
    return filler


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("disk-full-data")
    rows = (DEMO_DIR / "train.jsonl").read_text().splitlines()[:8]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    return folder / "train.jsonl"


def config_for(model: Path, data: Path, **training) -> RunConfig:
    settings = dict(max_steps=6, batch_size=2, learning_rate=0.01, warmup_ratio=0.0, eval_every=0, eval_examples=0,
                    save_every=2, keep_checkpoints=2, spectrum_every=0, seed=5)
    return RunConfig(
        model=ModelConfig(source=str(model), device="cpu"),
        plan={"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.1},
        data={"train_path": str(data), "format": "instruction", "max_length": 64},
        training=TrainingConfig(**{**settings, **training}),
    )


@pytest.fixture(scope="module")
def reference(tiny_model_folder, data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("disk-full-reference") / "run"
    assert isinstance(train(config_for(tiny_model_folder, data), run_dir=run_dir), ev.Finished)
    return read_curves(run_dir).losses


def _leftovers(folder: Path) -> list[str]:
    """Hidden files and folders, but for the manifests the studio keeps in the folders it wrote."""
    return [str(p.relative_to(folder)) for p in folder.rglob("*")
            if (".partial" in p.name or p.name.startswith(".")) and p.name != MANIFEST]


def _fill_after(disk: Path, event_kind: type, step: int, leave: int):
    """An on_event that fills the disk once the run reports `event_kind` at `step`."""
    def on_event(event) -> None:
        if isinstance(event, event_kind) and getattr(event, "step", None) == step and not (disk / "filler").exists():
            fill(disk, leave)
    return on_event


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resumes_once_there_is_room(
        small_disk, tiny_model_folder, data, reference):
    run_dir = small_disk / "run"
    result = train(config_for(tiny_model_folder, data), _fill_after(small_disk, ev.CheckpointSaved, 2, 8 << 10),
                   run_dir=run_dir)
    assert isinstance(result, ev.Failed), result
    assert result.message == f"cannot write the checkpoint of step 4 in {run_dir / 'checkpoints'}: {FULL}"
    assert result.checkpoint == str(run_dir / "checkpoints" / "step-2")
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-2"
    assert read_state(run_dir / "checkpoints" / "step-2").step == 2
    assert _leftovers(run_dir) == []
    assert not (run_dir / "error.log").exists()  # a full disk is not a bug: nothing to log, and no room anyway

    (small_disk / "filler").unlink()
    resumed = resume(run_dir)
    assert isinstance(resumed, ev.Finished), resumed
    assert read_curves(run_dir).losses == reference  # step-2 was whole: the run goes on as if nothing happened


def test_a_full_disk_during_the_adapter_save_fails_in_one_line_and_leaves_no_partial_folder(
        small_disk, tiny_model_folder, data, reference):
    run_dir = small_disk / "run"
    result = train(config_for(tiny_model_folder, data), _fill_after(small_disk, ev.StepMetrics, 6, 4 << 10),
                   run_dir=run_dir)
    assert isinstance(result, ev.Failed), result
    assert result.message == f"cannot write the adapter to {run_dir / 'adapter'}: {FULL}"
    assert not (run_dir / "adapter").exists() and _leftovers(run_dir) == []
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-4"
    assert not (run_dir / "error.log").exists()

    (small_disk / "filler").unlink()
    assert isinstance(resume(run_dir), ev.Finished)
    assert read_curves(run_dir).losses == reference


def test_the_error_log_is_written_only_when_there_is_room(small_disk, tiny_model_folder, data):
    def bug_at(step: int, disk_full: bool):
        def on_event(event) -> None:
            if isinstance(event, ev.StepMetrics) and event.step == step:
                if disk_full:
                    fill(small_disk, 0)
                raise RuntimeError("a bug in a listener")
        return on_event

    config = dataclasses.replace(config_for(tiny_model_folder, data), training=TrainingConfig(
        max_steps=2, batch_size=2, save_every=0, spectrum_every=0, eval_every=0))
    with_room = train(config, bug_at(1, disk_full=False), run_dir=small_disk / "roomy")
    assert isinstance(with_room, ev.Failed)
    log = small_disk / "roomy" / "error.log"
    assert with_room.message.endswith(f"details in {log}") and "a bug in a listener" in log.read_text()

    no_room = train(config, bug_at(1, disk_full=True), run_dir=small_disk / "full")
    assert isinstance(no_room, ev.Failed)
    assert no_room.message == ("internal error (RuntimeError: a bug in a listener); its details could not be saved "
                               f"(cannot write {small_disk / 'full' / 'error.log'}: {FULL})")
    assert not (small_disk / "full" / "error.log").exists() and _leftovers(small_disk / "full") == []


def test_a_full_disk_during_a_merge_ends_in_one_line_and_leaves_nothing_behind(
        small_disk, tiny_model_folder, data, tmp_path, capfd):
    run_dir = tmp_path / "run"  # the run itself is on a roomy disk; only the merged model goes to the small one
    config = dataclasses.replace(config_for(tiny_model_folder, data), training=TrainingConfig(
        max_steps=2, batch_size=2, save_every=0, spectrum_every=0, eval_every=0))
    assert isinstance(train(config, run_dir=run_dir), ev.Finished)
    fill(small_disk, 1 << 20)  # the merged tiny model needs ~10 MiB (weights and tokenizer)
    capfd.readouterr()
    code = main(["merge", str(run_dir), "--out", str(small_disk / "merged")])
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("lora-studio:")]
    assert errors == [f"lora-studio: cannot write the merged model to {small_disk / 'merged'}: {FULL}"]
    assert err.splitlines()[-1] == errors[0] and "Traceback" not in err  # progress lines, then the one error
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
