"""Run folders read back from files the engine's own Recorder writes: the summary read from the end of
metrics.jsonl agrees with the whole history, the curves follow a resume, and the last spectrum snapshot is read
from the end of spectra.jsonl even when a crash cut its last line. What a killed run leaves hidden goes on resume, and
only that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.core import events as ev
from studio.core.errors import StudioError
from studio.core.files import MANIFEST, temp_name
from studio.core.runconfig import RunConfig, TrainingConfig, save
from studio.core.train.run_folder import (
    event_from,
    latest_history,
    lines_from_end,
    read_curves,
    read_last_record,
    read_records,
    read_run,
    remove_leftovers,
)


def run_folder(root: Path, name: str = "run", max_steps: int = 6) -> Path:
    folder = root / name
    folder.mkdir()
    config = RunConfig(plan={"targets": "all-linear", "rank": 4}, data={"train_path": str(root / "rows.jsonl")},
                       training=TrainingConfig(max_steps=max_steps))
    save(config, folder / "run.yaml")
    return folder


def record(folder: Path, *events: object) -> None:
    recorder = ev.Recorder(folder, lambda _event: None)
    for event in events:
        recorder(event)
    recorder.close()


def started(folder: Path, start_step: int = 0) -> ev.RunStarted:
    return ev.RunStarted(str(folder), "default", "cpu", {}, {}, 8, 2, 6, start_step=start_step)


def step(n: int, loss: float) -> ev.StepMetrics:
    return ev.StepMetrics(n, 6, n / 4, loss, 1e-3, 0.5, 100.0, 64 * n, 0.1 * n, 1.0)


def spectrum(n: int) -> ev.SpectrumSnapshot:
    modules = tuple(ev.ModuleSpectrum(f"layers.{i}.q_proj", tuple(1.0 / (k + n) for k in range(1, 5)), 4, 2, 3, 0.4)
                    for i in range(3))
    return ev.SpectrumSnapshot(n, modules)


def expected_summary(folder: Path) -> tuple[int, float | None, float | None]:
    """(steps done, final loss, score) from the whole history, read forwards: what the tail reader must match."""
    steps, evals = latest_history(read_records(folder))
    scores = [r["score"] for r in evals if r.get("score") is not None]
    return (steps[-1]["step"] if steps else 0, steps[-1]["loss"] if steps else None, scores[-1] if scores else None)


def test_lines_from_end_gives_every_line_last_first_across_block_boundaries(tmp_path):
    path = tmp_path / "lines.jsonl"
    lines = [json.dumps({"n": n, "pad": "x" * (n % 13)}).encode() for n in range(200)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    for block in (1, 7, 64, 1 << 16):
        assert list(lines_from_end(path, block)) == lines[::-1]


def test_the_summary_read_from_the_end_matches_the_whole_history_after_a_resume(tmp_path):
    """A resume from step 2 written without cutting the file back (an older studio): the steps and the scored
    evaluation after step 2 from before the resume no longer count."""
    folder = run_folder(tmp_path)
    record(folder, started(folder), step(1, 2.0), step(2, 1.8), ev.EvalMetrics(2, 1.9, 0.25, "exact match"),
           step(3, 1.7), step(4, 1.6), ev.EvalMetrics(4, 1.5, 0.75, "exact match"),
           started(folder, start_step=2), step(3, 1.65), step(4, 1.55), ev.EvalMetrics(4, 1.52),
           ev.Finished(4, str(folder), str(folder / "adapter"), False, 1.55))
    summary = read_run(folder)
    assert (summary.steps_done, summary.final_loss, summary.score) == expected_summary(folder) == (4, 1.55, 0.25)
    assert (summary.status, summary.total_steps, summary.targets, summary.data) == (
        "finished", 6, "all-linear · r=4", "rows.jsonl")
    curves = read_curves(folder)
    assert curves.losses == ((1, 2.0), (2, 1.8), (3, 1.65), (4, 1.55))
    assert curves.val_losses == ((2, 1.9), (4, 1.52))


@pytest.mark.parametrize("ending, status", [
    ((), "interrupted"),
    ((ev.Failed("out of memory at step 3", 3),), "failed: out of memory at step 3"),
    ((ev.Finished(3, "r", "r/adapter", True, 1.7),), "stopped"),
])
def test_the_status_comes_from_the_last_end_record(tmp_path, ending, status):
    folder = run_folder(tmp_path)
    record(folder, started(folder), step(1, 2.0), step(2, 1.8), step(3, 1.7), *ending)
    summary = read_run(folder)
    assert summary.status == status
    assert (summary.steps_done, summary.final_loss, summary.score) == expected_summary(folder) == (3, 1.7, None)


def test_a_run_that_never_started_and_a_torn_last_metrics_line(tmp_path):
    fresh = run_folder(tmp_path, "fresh")
    summary, curves = read_run(fresh), read_curves(fresh)
    assert (summary.status, summary.steps_done, summary.final_loss) == ("not started", 0, None)
    assert curves.losses == curves.val_losses == ()
    torn = run_folder(tmp_path, "torn")
    record(torn, started(torn), step(1, 2.0), step(2, 1.8))
    line = json.dumps(ev.to_record(step(3, 1.7)))
    with (torn / "metrics.jsonl").open("a") as handle:
        handle.write(line[: len(line) // 2])  # the crash came mid-line
    summary = read_run(torn)
    assert (summary.status, summary.steps_done, summary.final_loss) == ("interrupted", 2, 1.8)


def test_a_broken_run_yaml_is_one_studio_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "run.yaml").write_text("model: [unclosed\n")
    with pytest.raises(StudioError, match="is not valid YAML at line 2"):
        read_run(folder)


def test_the_last_spectrum_is_read_from_the_end_past_a_torn_last_line(tmp_path):
    folder = run_folder(tmp_path)
    snapshots = [spectrum(n) for n in (2, 4, 6)]
    record(folder, started(folder), *snapshots)
    line = json.dumps(ev.to_record(spectrum(8)))
    with (folder / "spectra.jsonl").open("a") as handle:
        handle.write(line[: len(line) - 40])  # cut inside the last module's values
    last = read_last_record(folder, "spectra.jsonl", "SpectrumSnapshot")
    assert last is not None and event_from(last) == snapshots[-1]
    assert read_last_record(folder, "metrics.jsonl", "SpectrumSnapshot") is None  # spectra go to their own file
    assert read_last_record(tmp_path / "no-such-run", "spectra.jsonl", "SpectrumSnapshot") is None


def test_remove_leftovers_takes_every_name_the_writers_stage_and_nothing_else(tmp_path):
    run = run_folder(tmp_path)
    checkpoints, adapter, tokenizer = run / "checkpoints", run / "adapter", run / "tokenizer"
    for folder in (checkpoints / "step-2" / "adapter", adapter, tokenizer):
        folder.mkdir(parents=True)
    rewritten = temp_name(checkpoints / "step-2")  # a step written again, complete, not yet swapped in
    staged = [temp_name(run / name) for name in ("run.yaml", "metrics.jsonl", "spectra.jsonl", "error.log")]
    staged += [temp_name(run / "adapter"), temp_name(run / "tokenizer"), temp_name(checkpoints / "step-4"),
               rewritten, temp_name(rewritten), temp_name(adapter / "adapter"), temp_name(adapter / MANIFEST),
               temp_name(tokenizer / "tokenizer"), checkpoints / ".step-2.retired-0123abcd"]
    for path in staged:
        if "step" in path.name or path.name.startswith((".adapter", ".tokenizer")):
            path.mkdir()
            (path / "adapter_model.safetensors").write_text("half")
        else:
            path.write_text("half")
    kept = [run / ".notes.partial-draft", run / ".run.yaml.partial-1", adapter / MANIFEST,
            checkpoints / "step-2" / "adapter" / "adapter_model.safetensors", checkpoints / ".step-2.retired-copy"]
    for path in kept:
        path.write_text("a person's, or the studio's to keep")
    (checkpoints / "diverged-step-6").mkdir()

    assert sorted(remove_leftovers(run)) == sorted(staged)
    assert not any(path.exists() for path in staged)
    assert all(path.exists() for path in kept) and (checkpoints / "diverged-step-6").is_dir()
