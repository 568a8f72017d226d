"""Runs survive SIGKILL: a real `lora-studio train` (then `lora-studio resume`) subprocess on a tiny model is killed
at chosen moments, aimed at its three kinds of work: optimizer steps, checkpoint writing (its staging folder, named
as files.py names temp folders, `checkpoints/.step-N.partial-XXXXXXXX`, is on disk) and the final adapter's saving
(`.adapter.partial-XXXXXXXX`, or `adapter/.adapter.partial-XXXXXXXX` when an adapter is replaced). After every kill
the run folder is read as the runs list reads it, its newest complete checkpoint loads, and `resume` (on a copy)
finishes the run with the losses, validation losses and adapter tensors of an uninterrupted run with the same seed,
exactly, and leaves nothing staged or retired behind.

The killed run itself goes on: the next kill hits a `lora-studio resume` of it, so kills land in resumed processes
too (while metrics.jsonl is cut back, while leftovers are cleared). A chain whose process finished before its kill
is checked the same way and a new chain starts.

The first kill of the default suite's five hits `python -m studio.cli train ...` started exactly as a person starts
it. The others, and the fifty of the slow test, fork each command from a warm interpreter that imported the
libraries once (warm_launcher.py): the process that is killed runs the same `studio.cli.main`, without the ~6 s of
imports that would otherwise make up most of the test's time."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from studio.core import events as ev
from studio.core.adapters.folder import read_adapter_info
from studio.core.data.dataset import DEMO_DIR
from studio.core.runconfig import load
from studio.core.train.checkpoints import latest_checkpoint, read_state
from studio.core.train.engine import resume, train
from studio.core.train.run_folder import read_curves, read_run

MAX_STEPS = 12
LAST_CHECKPOINT = 10  # save_every 2: checkpoints at steps 2 to 10; the last step writes the adapter instead
WINDOWS = ("checkpoint", "step", "adapter")  # aimed at in turn; a run's last kill is at its adapter


@dataclass
class Tally:
    tried: int = 0  # SIGKILLs that hit a live training process
    survived: int = 0  # of those, kills after which every check held
    aimed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(WINDOWS, 0))
    caught_writing: dict[str, int] = field(default_factory=lambda: {"checkpoint": 0, "adapter": 0})
    finished_before_kill: int = 0
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"kills survived / tried: {self.survived}/{self.tried}; aimed at {self.aimed}; caught mid-write: "
                f"{self.caught_writing}; processes that finished before their kill: {self.finished_before_kill}"
                + "".join(f"\n  failed: {failure}" for failure in self.failures))


@pytest.fixture(scope="module")
def kill_run_file(tiny_model_folder, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill-run")
    rows = (DEMO_DIR / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(rows[:12]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(rows[12:16]) + "\n")
    run = {
        "model": {"source": str(tiny_model_folder), "device": "cpu"},
        "plan": {"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train_path": "train.jsonl", "val_path": "val.jsonl", "format": "instruction", "max_length": 64},
        "training": {"max_steps": MAX_STEPS, "batch_size": 2, "learning_rate": 0.01, "warmup_ratio": 0.0,
                     "eval_every": 4, "eval_examples": 0, "save_every": 2, "keep_checkpoints": 2,
                     "spectrum_every": 3, "seed": 3},
        "output_dir": "runs",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(run))
    return folder / "run.yaml"


@pytest.fixture(scope="module")
def reference(kill_run_file, tmp_path_factory):
    """The uninterrupted run: its loss curves (step by step) and its final adapter's tensors."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(load(kill_run_file), run_dir=run_dir)
    assert isinstance(result, ev.Finished), result
    return read_curves(run_dir), load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _staged(run_dir: Path) -> dict[str, set[int]]:
    """The inodes of the staging folders now on disk, by the kind of write they belong to."""
    found = {"checkpoint": run_dir.glob("checkpoints/.*.partial-*"),  # files.atomic_folder's, of checkpoints.py's
             "adapter": [*run_dir.glob(".adapter.partial-*"), *run_dir.glob("adapter/.adapter.partial-*")]}
    inodes: dict[str, set[int]] = {}
    for kind, paths in found.items():
        inodes[kind] = set()
        for path in paths:
            try:
                inodes[kind].add(path.stat().st_ino)
            except FileNotFoundError:
                continue
    return inodes


def _runs_started(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text(errors="replace").count('"event": "RunStarted"')
    except FileNotFoundError:
        return 0


class FreshProcess:
    """A command started as its own interpreter: `python -m studio.cli ARGV`."""

    def __init__(self, argv: list[str], log: Path) -> None:
        with log.open("ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "studio.cli", *argv], stdout=subprocess.DEVNULL,
                                         stderr=err)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()


class WarmLauncher:
    """warm_launcher.py as a subprocess; `start(argv)` gives a handle on one forked command."""

    def __init__(self, log: Path) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_launcher.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)

    def start(self, argv: list[str]) -> "WarmProcess":
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the warm launcher ended"
        return WarmProcess(self, json.loads(line)["pid"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


class WarmProcess:
    def __init__(self, launcher: WarmLauncher, pid: int) -> None:
        self.launcher, self.pid, self.status = launcher, pid, None

    def running(self) -> bool:
        if self.status is None and select.select([self.launcher.proc.stdout], [], [], 0)[0]:
            self.status = json.loads(self.launcher.proc.stdout.readline())["status"]
        return self.status is None

    def kill(self) -> int:
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
        if self.status is None:
            self.status = json.loads(self.launcher.proc.stdout.readline())["status"]
        return self.status


def _wait_for(proc, condition, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.running():
        if condition():
            return True
        assert time.monotonic() < deadline, "the training process neither progressed nor ended"
        time.sleep(0.0005)
    return False


def _steps_since_start(run_dir: Path) -> int:
    """StepMetrics records after the last RunStarted: the steps the running process has made."""
    text = (run_dir / "metrics.jsonl").read_text(errors="replace")
    return text[text.rfind('"event": "RunStarted"'):].count('"event": "StepMetrics"')


def _kill_once(start, argv: list[str], run_dir: Path, window: str, rng: random.Random) -> tuple[int, set[str]]:
    """Start the command and SIGKILL it in `window`: after a random number of its steps, or a random moment into a
    checkpoint's or the adapter's write. Returns its exit status (-9 when the kill hit it running) and the writes
    it was caught in."""
    started_before = _runs_started(run_dir)
    stale = _staged(run_dir)
    first_step = _resume_step(run_dir)
    proc = start(argv)
    # every window opens once training has begun: the process's own RunStarted record is on disk
    if _wait_for(proc, lambda: _runs_started(run_dir) > started_before):
        if window == "step":
            steps = rng.randint(1, MAX_STEPS - first_step)
            if _wait_for(proc, lambda: _steps_since_start(run_dir) >= steps):
                time.sleep(rng.uniform(0.0, 0.03))
        else:  # the n-th checkpoint it writes (of those left), or its one adapter
            writes = len(range(first_step + 2, LAST_CHECKPOINT + 1, 2)) if window == "checkpoint" else 1
            nth = rng.randint(1, max(writes, 1))
            seen: set[int] = set()

            def writing() -> bool:
                seen.update(_staged(run_dir)[window] - stale[window])
                return len(seen) >= nth

            if _wait_for(proc, writing):
                time.sleep(rng.uniform(0.0, 0.012 if window == "checkpoint" else 0.004))
    caught = {kind for kind, inodes in _staged(run_dir).items() if inodes - stale[kind]}
    return proc.kill(), caught


def _resume_step(run_dir: Path) -> int:
    checkpoint = latest_checkpoint(run_dir)
    return read_state(checkpoint).step if checkpoint is not None else 0


def _check_survives(run_dir: Path, copy: Path, reference) -> None:
    """The checks after a kill, on a copy of the killed run folder (the original goes on to the next kill)."""
    expected_curves, expected_tensors = reference
    shutil.copytree(run_dir, copy)
    summary = read_run(copy)  # as the runs list reads it
    assert summary.steps_done <= MAX_STEPS
    checkpoint = latest_checkpoint(copy)
    if checkpoint is not None:  # the newest complete checkpoint loads
        assert read_state(checkpoint).step == int(checkpoint.name.removeprefix("step-"))
        assert read_adapter_info(checkpoint / "adapter").modules == 14
        assert load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    result = resume(copy)
    assert isinstance(result, ev.Finished), result
    assert result.step == MAX_STEPS and not result.stopped_early
    assert read_run(copy).status == "finished"
    finished = read_curves(copy)
    assert finished.losses == expected_curves.losses  # step by step, exactly
    assert finished.val_losses == expected_curves.val_losses
    tensors = load_file(str(copy / "adapter" / "adapter_model.safetensors"))
    assert tensors.keys() == expected_tensors.keys()
    assert all(tensors[k].equal(expected_tensors[k]) for k in tensors)
    assert not [p.name for p in copy.rglob("*") if ".partial" in p.name or ".retired-" in p.name]


def run_kills(kills: int, seed: int, start, run_file: Path, reference, scratch: Path) -> Tally:
    """Kill `kills` training processes started by `start(argv)`; every check after every kill is asserted."""
    rng = random.Random(seed)
    tally = Tally()
    chain = 0
    run_dir: Path | None = None
    attempts = 0
    while tally.tried < kills:
        attempts += 1
        assert attempts <= 3 * kills, tally.line()
        window = WINDOWS[tally.tried % len(WINDOWS)]
        if window == "checkpoint" and run_dir is not None and _resume_step(run_dir) >= LAST_CHECKPOINT:
            run_dir = None  # this run has no checkpoint left to write: a new one has
        if run_dir is None:
            chain += 1
            run_dir = scratch / f"chain-{chain}"
            argv = ["train", str(run_file), "--run-dir", str(run_dir)]
        else:
            argv = ["resume", str(run_dir)]
        status, caught = _kill_once(start, argv, run_dir, window, rng)
        killed = status == -signal.SIGKILL
        if killed:
            tally.tried += 1
            tally.aimed[window] += 1
            for kind in caught:
                tally.caught_writing[kind] += 1
        else:  # it finished first: not a kill, but it must have succeeded and left the run whole
            tally.finished_before_kill += 1
            if status != 0:
                tally.failures.append(f"attempt {attempts} ({argv[0]}) exited {status}: see {scratch / 'stderr.log'}")
        try:
            _check_survives(run_dir, scratch / f"check-{attempts}", reference)
        except Exception as exc:  # noqa: BLE001 - every failure is listed; the run is abandoned, a new one starts
            tally.failures.append(f"attempt {attempts} ({' '.join(argv[:1])}, aimed at {window}, caught in "
                                  f"{sorted(caught)}): {type(exc).__name__}: {exc}")
            run_dir = None
            continue
        tally.survived += killed
        if not killed or read_run(run_dir).status == "finished":
            run_dir = None
    return tally


def _report(tally: Tally, capsys) -> None:
    with capsys.disabled():
        print(f"\n{tally.line()}")


def test_five_kills_at_steps_checkpoints_and_adapter_saves_all_resume_to_the_same_adapter(
        kill_run_file, reference, tmp_path, capsys):
    log = tmp_path / "stderr.log"
    launcher = WarmLauncher(log)  # imports while the first, fresh, process runs
    fresh: list[FreshProcess] = []

    def start(argv: list[str]):
        if not fresh:  # the first as a person starts it; the others forked warm
            fresh.append(FreshProcess(argv, log))
            return fresh[0]
        return launcher.start(argv)

    try:
        tally = run_kills(5, 1, start, kill_run_file, reference, tmp_path)
    finally:
        launcher.close()
    _report(tally, capsys)
    assert tally.survived == tally.tried == 5 and not tally.failures, tally.line()


@pytest.mark.slow
def test_fifty_kills_all_resume_to_the_same_adapter(kill_run_file, reference, tmp_path, capsys):
    launcher = WarmLauncher(tmp_path / "stderr.log")
    try:
        tally = run_kills(50, 50, lambda argv: launcher.start(argv), kill_run_file, reference, tmp_path)
    finally:
        launcher.close()
    _report(tally, capsys)
    assert tally.survived == tally.tried == 50 and not tally.failures, tally.line()
    assert all(tally.aimed[w] >= 16 for w in WINDOWS), tally.line()
    assert tally.caught_writing["checkpoint"] >= 8 and tally.caught_writing["adapter"] >= 8, tally.line()


def test_a_line_cut_by_a_kill_does_not_swallow_the_next_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"event": "StepMetrics", "step": 1}\n{"event": "StepMe')
    recorder = ev.Recorder(tmp_path, lambda _e: None)
    recorder(ev.Resumed(1))
    recorder.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
               if line.endswith("}")]
    assert [r["event"] for r in records] == ["StepMetrics", "Resumed"]


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_the_start(kill_run_file, reference, tmp_path):
    def die_at_step_one(event) -> None:
        if isinstance(event, ev.StepMetrics) and event.step == 1:
            raise RuntimeError("the process died here")

    run_dir = tmp_path / "run"
    first = train(load(kill_run_file), die_at_step_one, run_dir=run_dir)
    assert isinstance(first, ev.Failed) and latest_checkpoint(run_dir) is None
    result = resume(run_dir)
    assert isinstance(result, ev.Finished) and result.step == MAX_STEPS
    assert read_curves(run_dir).losses == reference[0].losses
