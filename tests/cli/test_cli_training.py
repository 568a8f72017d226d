"""The headless path a user takes: init-run, train, export, spectrum, generate, merge."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from transformers import AutoModelForCausalLM

from studio.cli import main
from studio.core.data.dataset import demo_spec
from studio.core.events import Finished, RunStarted, describe
from studio.core.train.run_folder import event_from


def test_init_train_export_spectrum_generate_merge(tmp_path, capsys, default_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init-run", "run.yaml"]) == 0
    assert main(["init-run", "run.yaml"]) == 2  # refuses to overwrite
    assert "exists: pass --force" in capsys.readouterr().err
    rows = Path(demo_spec().train_path).read_text().splitlines()[:8]
    (tmp_path / "small.jsonl").write_text("\n".join(rows) + "\n")
    config = yaml.safe_load(Path("run.yaml").read_text())
    config["data"].update(train_path="small.jsonl", val_path=None, max_length=96)
    config["plan"].update(targets="q_proj,v_proj", rank=2)
    config["training"].update(batch_size=4, eval_every=0, save_every=0, spectrum_every=0)
    Path("run.yaml").write_text(yaml.safe_dump(config))

    assert main(["train", "run.yaml", "--max-steps", "2", "--run-dir", "runs/one"]) == 0
    out = capsys.readouterr()
    assert "Finished at step 2" in out.out and "runs/one/adapter" in out.out
    assert "Run folder runs/one: " in out.err
    records = [json.loads(line) for line in Path("runs/one/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "StepMetrics"] == [1, 2]
    # the CLI says each event in the core's words, the same the window's log shows (tests/ui/test_training_run.py)
    events = {type(e): e for e in map(event_from, records)}
    assert out.out.strip() == describe(events[Finished])
    assert describe(events[RunStarted]) in out.err

    assert main(["export", "runs/one", "--out", "exported"]) == 0
    assert Path("exported/adapter_model.safetensors").is_file()
    assert "adapter written to exported" in capsys.readouterr().out
    assert main(["spectrum", "exported", "--json"]) == 0
    spectra = json.loads(capsys.readouterr().out)
    assert len(spectra["modules"]) == 60 and all(m["rank"] == 2 for m in spectra["modules"])

    assert main(["generate", "default", "--adapter", "runs/one", "--prompt", "2+2=", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()

    assert main(["merge", "runs/one", "--out", "merged", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr()
    assert "max logit difference" in out.out
    assert out.err.splitlines() == [  # a line a stage, none for each of the merged modules
        "Merging the adapter into a copy of the base weights",
        "Comparing the merged model with the adapter on a probe batch",
        "Writing the merged model to merged", "Merged model saved to merged"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.model.layers[0].self_attn.q_proj.weight.shape == (576, 576)

    assert main(["resume", "runs/one"]) == 2  # a finished run with save_every 0 has no checkpoint
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_train_with_a_broken_run_file_exits_2(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("plan: {targets: q_proj}\n")
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "lora-studio: data.train_path is missing: the training file to read"


def test_a_run_file_that_trusts_remote_code_is_warned_about_once_before_training(tiny_model_folder, tmp_path,
                                                                                capsys):
    rows = Path(demo_spec().train_path).read_text().splitlines()[:4]
    (tmp_path / "small.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": {"source": str(tiny_model_folder), "device": "cpu", "trust_remote_code": True},
        "plan": {"targets": "q_proj", "rank": 2},
        "data": {"train_path": str(tmp_path / "small.jsonl"), "max_length": 96},
        "training": {"max_steps": 2, "batch_size": 2, "eval_every": 0, "save_every": 1, "spectrum_every": 0},
    }))
    warning = (f"lora-studio: warning: model.trust_remote_code is true: Python code that comes with "
               f"{tiny_model_folder} will run on this machine with your permissions; keep it only for a model source "
               "you trust\n")
    assert main(["train", str(tmp_path / "run.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.startswith(warning) and err.count("trust_remote_code") == 1
    assert main(["resume", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(warning) and err.count("trust_remote_code") == 1
