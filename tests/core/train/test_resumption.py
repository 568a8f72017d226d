"""Resuming never loses a run: everything that can fail is tried before a file of the run changes, a resume that
would train nothing or replace a finished adapter with an earlier one is refused, a second run never goes into an
existing run's folder, a checkpoint that could run code is never unpickled, after the loss became NaN the last
good checkpoint resumes with a lower learning rate, and a diverged step the host reads a step late leaves the last
good weights. Real short runs of a tiny Llama (tiny_model_folder)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.cli import main
from studio.core import events as ev
from studio.core.data.dataset import demo_spec
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig, dump, load
from studio.core.train import engine
from studio.core.train.checkpoints import latest_checkpoint
from studio.core.train.engine import resume, train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(Path(demo_spec().train_path).read_text().splitlines()[:16]) + "\n")
    return path


def tiny_config(model_folder: Path, data_file: Path, out: Path, **training) -> RunConfig:
    settings = dict(learning_rate=1e-3, max_steps=4, batch_size=4, warmup_ratio=0.0, schedule="constant",
                    eval_every=0, eval_examples=0, save_every=2, spectrum_every=1, keep_checkpoints=2, seed=7)
    settings.update(training)
    return RunConfig(model=ModelConfig(source=str(model_folder), device="cpu"),
                     plan={"targets": "q_proj,v_proj", "rank": 4, "alpha": 8, "dropout": 0.0},
                     data={"train_path": str(data_file), "format": "instruction", "max_length": 96},
                     training=TrainingConfig(**settings), output_dir=str(out))


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run folder, by its path inside it."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture()
def finished_run(tiny_model_folder, data_file, tmp_path) -> Path:
    """A 4-step run that finished, with a checkpoint at step 2, metrics and spectra."""
    data = tmp_path / "data.jsonl"
    shutil.copy(data_file, data)
    result = train(tiny_config(tiny_model_folder, data, tmp_path / "runs"))
    assert isinstance(result, ev.Finished), result
    run_dir = Path(result.run_dir)
    assert latest_checkpoint(run_dir).name == "step-2" and (run_dir / "spectra.jsonl").is_file()
    return run_dir


def test_a_resume_whose_data_file_moved_fails_in_one_line_and_changes_no_file_of_the_run(finished_run):
    before = files_of(finished_run)
    data = Path(load(finished_run / "run.yaml").data["train_path"])
    data.rename(data.with_name("moved.jsonl"))
    events: list = []
    result = resume(finished_run, events.append)
    assert isinstance(result, ev.Failed) and "\n" not in result.message and str(data) in result.message
    assert isinstance(events[-1], ev.Failed)  # the caller hears of it; the run's files do not
    assert files_of(finished_run) == before  # metrics.jsonl and spectra.jsonl byte-identical, nothing trimmed


def test_resume_to_no_more_steps_than_the_checkpoint_or_the_finished_run_is_refused(finished_run, capsys):
    before = files_of(finished_run)
    assert main(["resume", str(finished_run), "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err == (f"lora-studio: the latest checkpoint of {finished_run} is at step 2: a resume needs more than 2 "
                   "steps to train (max steps is 2)\n")
    assert main(["resume", str(finished_run), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lora-studio: {finished_run} finished at step 4: resuming it to step 3 would replace its "
                          "adapter with an earlier one") and err.count("\n") == 1
    assert files_of(finished_run) == before  # the finished adapter included


def test_training_into_an_existing_run_or_a_busy_folder_is_refused_and_changes_nothing(finished_run,
                                                                                       tiny_model_folder, data_file,
                                                                                       tmp_path, capsys):
    before = files_of(finished_run)
    config = tiny_config(tiny_model_folder, data_file, tmp_path / "runs")
    result = train(config, run_dir=finished_run)
    assert isinstance(result, ev.Failed)
    assert result.message == (f"{finished_run} holds a run already: resume it (lora-studio resume {finished_run}) "
                              "or choose a new run folder")
    assert files_of(finished_run) == before  # no second RunStarted appended, the old checkpoints untouched

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = train(config, run_dir=busy)
    assert isinstance(result, ev.Failed) and result.message == f"{busy} is not empty: choose a new or empty folder " \
                                                                "for the run"
    assert [p.name for p in busy.iterdir()] == ["notes.txt"]

    (tmp_path / "run.yaml").write_text(dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--run-dir", str(finished_run)]) == 2
    assert capsys.readouterr().err == (f"lora-studio: {finished_run} holds a run already: resume it (lora-studio "
                                       f"resume {finished_run}) or choose a new run folder\n")
    assert files_of(finished_run) == before


def test_checkpoint_state_loads_weights_only_and_a_pickle_that_runs_code_is_refused_unread(finished_run, tmp_path):
    checkpoint = latest_checkpoint(finished_run)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(checkpoint / name, weights_only=True)  # tensors, numbers and lists only: no allow-list needed

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"state": {0: RunsCode()}, "param_groups": []}, checkpoint / "optimizer.pt")
    before = files_of(finished_run)
    result = resume(finished_run)
    assert isinstance(result, ev.Failed)
    assert result.message == (f"{checkpoint / 'optimizer.pt'} holds more than tensors and numbers (a pickle that "
                              "could run code when read): the studio does not open it; resume from a checkpoint the "
                              "studio wrote")
    assert not marker.exists()
    assert files_of(finished_run) == before


def test_after_the_loss_became_nan_the_last_good_checkpoint_resumes_with_a_lower_learning_rate(tiny_model_folder,
                                                                                             data_file, tmp_path):
    """lr 1e4: steps 1 and 2 are finite, the weights after step 2 make the loss infinite at step 3. The step-2
    checkpoint holds those weights: it is set aside, and step 1 resumes with a sane learning rate."""
    config = tiny_config(tiny_model_folder, data_file, tmp_path / "runs", learning_rate=1e4, max_steps=6,
                         save_every=1, spectrum_every=0)
    events: list = []
    failed = train(config, events.append)
    assert isinstance(failed, ev.Failed)
    assert failed.message == ("the loss became infinite at step 3: lower the learning rate (now 10000) or use "
                              "precision bf16 instead of fp16")
    run_dir = Path(next(e for e in events if isinstance(e, ev.RunStarted)).run_dir)
    assert failed.step == 2 and failed.checkpoint == str(run_dir / "checkpoints" / "step-1")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["diverged-step-2", "step-1"]

    lower = replace(load(run_dir / "run.yaml"), training=replace(config.training, learning_rate=1e-3))
    resumed_events: list = []
    result = train(lower, resumed_events.append, resume_from=run_dir)
    assert isinstance(result, ev.Finished) and result.step == 6
    steps = [e for e in resumed_events if isinstance(e, ev.StepMetrics)]
    assert [s.step for s in steps] == [2, 3, 4, 5, 6] and all(s.lr == 1e-3 for s in steps)
    assert load(run_dir / "run.yaml").training.learning_rate == 1e-3
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "resumed with changed settings: learning_rate 10000.0 -> 0.001" in [r.get("text") for r in records]
    assert [r["step"] for r in records if r["event"] == "StepMetrics"] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["event"] == "Finished"


def test_a_diverged_step_read_a_step_late_is_skipped_and_leaves_the_last_good_weights(tiny_model_folder, data_file,
                                                                                       tmp_path, monkeypatch):
    """Without checkpoints or spectra the host reads each step's loss after queueing the next (as on a GPU): the
    infinite step 3 (as above) and the step 4 queued after it must not change the weights, which equal a 2-step
    run's adapter."""
    from studio.core.model.loading import open_model

    monkeypatch.setattr(engine, "_reads_late", lambda run: True)

    loaded = open_model(str(tiny_model_folder), device="cpu")
    config = tiny_config(tiny_model_folder, data_file, tmp_path / "runs", learning_rate=1e4, max_steps=6,
                         save_every=0, spectrum_every=0)
    events: list = []
    failed = train(config, events.append, loaded=loaded)
    assert isinstance(failed, ev.Failed) and failed.step == 2
    assert failed.message.startswith("the loss became infinite at step 3:")
    assert [e.step for e in events if isinstance(e, ev.StepMetrics)] == [1, 2]
    kept = {k: v for k, v in loaded.model.named_parameters() if "lora_" in k}

    two = train(replace(config, training=replace(config.training, max_steps=2)))
    assert isinstance(two, ev.Finished)
    saved = load_file(Path(two.adapter_dir) / "adapter_model.safetensors")
    assert len(saved) == len(kept) == 8
    for name, tensor in saved.items():
        ours = next(v for k, v in kept.items() if k.replace(".default", "").endswith(name.split("model.", 1)[1]))
        assert torch.equal(ours.detach(), tensor), name


def test_off_cuda_each_step_is_reported_before_the_next_is_taken(tiny_model_folder, data_file, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    config = tiny_config(tiny_model_folder, data_file, tmp_path / "runs", max_steps=4, save_every=0,
                         spectrum_every=0)
    stepped: list[int] = []
    hook = register_optimizer_step_post_hook(lambda *args: stepped.append(len(stepped) + 1))
    reported_after: list[tuple[int, int]] = []  # (step reported, optimizer steps taken by then)

    def on_event(event) -> None:
        if isinstance(event, ev.StepMetrics):
            reported_after.append((event.step, len(stepped)))

    try:
        result = train(config, on_event)
    finally:
        hook.remove()
    assert isinstance(result, ev.Finished)
    assert reported_after == [(1, 1), (2, 2), (3, 3), (4, 4)]


def test_each_step_reports_its_own_time_also_when_read_a_step_late(tiny_model_folder, data_file, tmp_path,
                                                                    monkeypatch):
    """A step read after the next one was taken (as on a GPU) reports the time of its own work: the interval between
    its optimizer step and the one before (the last step too, which a clock read at report time gave next to none)."""
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    monkeypatch.setattr(engine, "_reads_late", lambda run: True)
    config = tiny_config(tiny_model_folder, data_file, tmp_path / "runs", max_steps=6, save_every=0,
                         spectrum_every=0)
    stepped: list[float] = []
    hook = register_optimizer_step_post_hook(lambda *args: stepped.append(time.perf_counter()))
    try:
        events: list = []
        assert isinstance(train(config, events.append), ev.Finished)
    finally:
        hook.remove()
    reported = [e.elapsed_s for e in events if isinstance(e, ev.StepMetrics)]
    assert len(reported) == len(stepped) == 6
    for step in range(1, 6):
        own = stepped[step] - stepped[step - 1]
        told = reported[step] - reported[step - 1]
        assert abs(told - own) <= 0.2 * own + 0.005, (step + 1, told, own)


def test_every_step_trains_in_training_mode_also_after_an_evaluation(tiny_model_folder, data_file, tmp_path):
    """The loop sets training mode once; the evaluation (every 2 steps here) puts it back after its eval mode."""
    from studio.core.model.loading import open_model

    loaded = open_model(str(tiny_model_folder), device="cpu")
    config = tiny_config(tiny_model_folder, data_file, tmp_path / "runs", max_steps=5, eval_every=2, save_every=0,
                         spectrum_every=0)
    config = replace(config, data={**config.data, "val_path": str(data_file)})
    modes: list[tuple[int, bool]] = []

    def on_event(event) -> None:
        if isinstance(event, ev.StepMetrics):
            modes.append((event.step, all(m.training for m in loaded.model.modules())))

    result = train(config, on_event, loaded=loaded)
    assert isinstance(result, ev.Finished), result
    assert [step for step, _ in modes] == [1, 2, 3, 4, 5]
    assert all(training for _, training in modes), modes
