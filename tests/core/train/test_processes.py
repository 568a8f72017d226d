"""Several processes through accelerate, on the CPU (gloo): one run folder written once, the same losses as one
process at the same global batch, a killed process ends the run cleanly and `resume` continues it, and two
"machines" on one host (loopback) train one run; under FSDP (the model sharded) all of that holds too. The launcher
is the real CLI (`lora-studio train --gpus 2` with `model.device: cpu`), the processes real `accelerate launch`
children."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from studio.core import events as ev
from studio.core.data.dataset import demo_spec
from studio.core.resources import resources_root
from studio.core.runconfig import load
from studio.core.train.checkpoints import latest_checkpoint, read_state
from studio.core.train.engine import train
from studio.core.train.launch import Launch, command
from studio.core.train.run_folder import read_records

STEPS = 6


def _run_file(folder: Path, model: Path, batch_size: int, **training) -> Path:
    demo = demo_spec()
    settings = dict(learning_rate=3e-3, max_steps=STEPS, batch_size=batch_size, warmup_ratio=0.0,
                    schedule="constant", eval_every=3, eval_examples=4, save_every=2, spectrum_every=3, seed=5,
                    keep_checkpoints=0)
    settings.update(training)
    run = {
        "model": {"source": str(model), "device": "cpu"},
        "plan": {"targets": "q_proj,v_proj", "rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train_path": demo.train_path, "val_path": demo.val_path, "format": "instruction",
                 "max_length": 96},
        "training": settings,
        "output_dir": str(folder / "runs"),
    }
    path = folder / f"run-{batch_size}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(run_dir) if r["event"] == "StepMetrics"}


def test_two_processes_write_one_run_and_match_one_process_at_the_same_global_batch(tiny_model_folder, tmp_path):
    run_dir = tmp_path / "two"
    result = _cli("train", str(_run_file(tmp_path, tiny_model_folder, 2)), "--gpus", "2", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "× 2 processes" in result.stderr  # the progress the launching side showed came from the processes

    records = read_records(run_dir)
    kinds = [r["event"] for r in records]
    assert kinds.count("RunStarted") == 1 and kinds.count("Finished") == 1
    assert [r["step"] for r in records if r["event"] == "StepMetrics"] == list(range(1, STEPS + 1))
    assert next(r for r in records if r["event"] == "RunStarted")["processes"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(run_dir.glob("error*.log"))
    chunked = [r for r in records if r["event"] == "LogMessage" and r["text"].startswith("loss: in chunks")]
    assert len(chunked) == 1  # the chunked loss, inside DDP's forward: the adapters below match only if it synchronises
    spectra = (run_dir / "spectra.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in spectra] == [1, 4, 6]  # each written once, not once per process
    scores = [r for r in records if r["event"] == "EvalMetrics"]
    assert [r["step"] for r in scores] == [3, 6] and all(0 <= r["score"] <= 1 for r in scores)

    one: list = []
    single = load(_run_file(tmp_path, tiny_model_folder, 4))  # one process, twice the batch: the same rows per step
    finished = train(single, one.append, run_dir=tmp_path / "one")
    assert isinstance(finished, ev.Finished), finished
    expected = {e.step: e.loss for e in one if isinstance(e, ev.StepMetrics)}
    assert _losses(run_dir) == pytest.approx(expected, rel=1e-4)
    one_scores = [e for e in one if isinstance(e, ev.EvalMetrics)]
    assert [r["val_loss"] for r in scores] == pytest.approx([e.val_loss for e in one_scores], rel=1e-4)
    assert [r["score"] for r in scores] == [e.score for e in one_scores]  # the shares' samples, gathered
    two_weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    one_weights = load_file(Path(finished.adapter_dir) / "adapter_model.safetensors")
    # synchronised gradients give the one process's adapter up to summation order (7e-8 here); without, 2e-2
    assert max(float((two_weights[k] - one_weights[k]).abs().max()) for k in one_weights) < 1e-5


def test_a_killed_process_ends_the_run_in_one_line_and_resume_continues_it(tiny_model_folder, tmp_path):
    run_file = _run_file(tmp_path, tiny_model_folder, 2, max_steps=40, save_every=4, eval_every=0,
                         spectrum_every=0)
    run_dir = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "studio.cli", "train", str(run_file), "--gpus", "2",
                                 "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-4").is_dir():
        assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint appeared"
        time.sleep(0.1)
    rank1 = next(pid for pid in _children(launcher.pid) if _environ(pid).get("RANK") == "1")
    os.kill(rank1, signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lora-studio: ") and "process 1 of the run was ended by SIGKILL" in last, stderr
    assert f"resume it with `lora-studio resume {run_dir}`" in last and "(last checkpoint: " in last
    assert "Traceback" not in stderr
    assert read_records(run_dir)[-1]["event"] == "Failed"  # the run folder says how it ended

    refused = _cli("resume", str(run_dir), "--gpus", "1", "--max-steps", "44")  # another share of the data each
    assert refused.returncode == 2 and "resume it on 2" in refused.stderr, refused.stderr
    resumed = _cli("resume", str(run_dir))  # no --gpus: on the checkpoint's 2 processes
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming on 2 processes, as the run was trained" in resumed.stderr
    steps = [r["step"] for r in read_records(run_dir) if r["event"] == "StepMetrics"]
    assert steps[-1] == 40 and sorted(set(steps)) == list(range(1, 41))


def test_ctrl_c_stops_every_process_after_the_same_step_with_a_checkpoint(tiny_model_folder, tmp_path):
    run_file = _run_file(tmp_path, tiny_model_folder, 2, max_steps=400, save_every=0, eval_every=0,
                         spectrum_every=0)
    run_dir = tmp_path / "interrupted"
    launcher = subprocess.Popen([sys.executable, "-m", "studio.cli", "train", str(run_file), "--gpus", "2",
                                 "--run-dir", str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").is_file() or not _losses(run_dir):
        assert time.monotonic() < deadline and launcher.poll() is None, "no step was taken"
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends the launching process
    stdout, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, stderr
    records = read_records(run_dir)
    finished = records[-1]
    assert finished["event"] == "Finished" and finished["stopped_early"] and finished["step"] < 400
    assert (run_dir / "checkpoints" / f"step-{finished['step']}").is_dir()
    assert f"Stopped at step {finished['step']}" in stdout


def test_two_machines_over_loopback_train_one_run(tiny_model_folder, tmp_path):
    run_dir = tmp_path / "nodes"
    args = ["train", str(_run_file(tmp_path, tiny_model_folder, 2, max_steps=3, save_every=0)),
            "--run-dir", str(run_dir)]
    port = 29000 + os.getpid() % 1000
    nodes = [subprocess.Popen(command(Launch(1, machines=2, machine_rank=rank, main_port=port), args),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    records = read_records(run_dir)
    started = [r for r in records if r["event"] == "RunStarted"]
    assert len(started) == 1 and started[0]["processes"] == 2
    assert [r["step"] for r in records if r["event"] == "StepMetrics"] == [1, 2, 3]


def _children(pid: int) -> list[int]:
    """Every process below `pid` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_fsdp_shards_the_model_matches_one_process_saves_one_whole_adapter_and_resumes_exactly(tiny_model_folder,
                                                                                              tmp_path):
    """FSDP (resources/accelerate/fsdp.yaml) on two CPU processes: every weight sharded, the same losses as one process
    at the same global batch, one adapter whose whole weights load into PEFT and give the one-process model's
    logits, checkpoints read with weights_only, and a run killed after a checkpoint resumed to the same losses."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.core.model.loading import open_model
    from studio.core.train.checkpoints import load_tensors

    run_dir = tmp_path / "fsdp"
    # 33 scored examples: shares of 17 and 16, so one process generates a batch of 16 more and the other, a stand-in
    result = _cli("train", str(_run_file(tmp_path, tiny_model_folder, 2, eval_examples=33)), "--gpus", "2",
                  "--accelerate-config", "fsdp", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    records = read_records(run_dir)
    assert next(r for r in records if r["event"] == "RunStarted")["processes"] == 2
    said = next(r["text"] for r in records if r["event"] == "LogMessage" and r["text"].startswith("FSDP: "))
    held, whole = (int(n.replace(",", "")) for n in re.search(r"main one ([\d,]+) of ([\d,]+) param", said).groups())
    assert 0 < held <= whole / 2 + 100  # a slice of each weight (a row more where its rows are odd)
    # the optimizer state was gathered from the shards: keyed by parameter name, plain tensors of whole shape
    optimizer = load_tensors(run_dir / "checkpoints" / "step-4" / "optimizer.pt")
    moments = optimizer["state"]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert moments["exp_avg"].shape == (4, 32)

    loaded = open_model(str(tiny_model_folder), device="cpu")
    one: list = []
    finished = train(load(_run_file(tmp_path, tiny_model_folder, 4, eval_examples=33)), one.append,
                     run_dir=tmp_path / "one", loaded=loaded)
    assert isinstance(finished, ev.Finished), finished
    expected = {e.step: e.loss for e in one if isinstance(e, ev.StepMetrics)}
    assert _losses(run_dir) == pytest.approx(expected, rel=1e-4)
    scores = [r for r in records if r["event"] == "EvalMetrics"]
    one_scores = [e for e in one if isinstance(e, ev.EvalMetrics)]
    assert [r["val_loss"] for r in scores] == pytest.approx([e.val_loss for e in one_scores], rel=1e-4)
    assert [r["score"] for r in scores] == [e.score for e in one_scores]
    spectra = [json.loads(line) for line in (run_dir / "spectra.jsonl").read_text().splitlines()]
    one_spectra = [e for e in one if isinstance(e, ev.SpectrumSnapshot)]
    assert [s["step"] for s in spectra] == [e.step for e in one_spectra] == [1, 4, 6]
    assert spectra[-1]["modules"][0]["values"] == pytest.approx(one_spectra[-1].modules[0].values, rel=1e-3)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_folder)
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        untrained = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
        trained = loaded.model.eval()(input_ids=ids).logits
        assert (trained - untrained).abs().max() > 1e-3  # the adapter changes the output
        torch.testing.assert_close(adapted(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-5)

    killed_dir = tmp_path / "killed"
    run_file = _run_file(tmp_path, tiny_model_folder, 2, max_steps=12, save_every=4, eval_every=0, spectrum_every=0)
    launcher = subprocess.Popen([sys.executable, "-m", "studio.cli", "train", str(run_file), "--gpus", "2",
                                 "--accelerate-config", "fsdp", "--run-dir", str(killed_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (killed_dir / "checkpoints" / "step-4").is_dir():
        assert time.monotonic() < deadline and launcher.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(next(pid for pid in _children(launcher.pid) if _environ(pid).get("RANK") == "1"), signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode == 2 and "process 1 of the run was ended by SIGKILL" in stderr, stderr
    assert f"resume it with `lora-studio resume {killed_dir}`" in stderr  # which follows how it ran
    refused = _cli("resume", str(killed_dir), "--accelerate-config", "ddp")  # its optimizer state is stored by name
    assert refused.returncode == 2 and "resume it with FSDP" in refused.stderr, refused.stderr
    resumed = _cli("resume", str(killed_dir))  # no flags: 2 processes with FSDP, as the checkpoint says
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming on 2 processes with FSDP, as the run was trained" in resumed.stderr
    losses = _losses(killed_dir)
    assert sorted(losses) == list(range(1, 13))
    # steps 5 and 6 ran again after the resume: the same as the unbroken run's (the schedule is constant)
    assert [losses[5], losses[6]] == pytest.approx([expected[5], expected[6]], rel=1e-4)


def test_a_run_launched_with_an_accelerate_config_of_ones_own_resumes_with_it_while_it_is_there(tiny_model_folder,
                                                                                                  tmp_path):
    own = tmp_path / "my-ddp.yaml"
    own.write_text((resources_root() / "accelerate" / "ddp.yaml").read_text())
    run_file = _run_file(tmp_path, tiny_model_folder, 2, max_steps=4, save_every=2, eval_every=0, spectrum_every=0)
    run_dir = tmp_path / "own"
    first = _cli("train", str(run_file), "--gpus", "2", "--accelerate-config", str(own), "--run-dir", str(run_dir))
    assert first.returncode == 0, first.stderr
    assert read_state(latest_checkpoint(run_dir)).accelerate_config == str(own.resolve())

    resumed = _cli("resume", str(run_dir), "--max-steps", "6")  # from the step-2 checkpoint, with no other flag
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming on 2 processes under {own.resolve()}, as the run was trained" in resumed.stderr
    assert read_state(latest_checkpoint(run_dir)).accelerate_config == str(own.resolve())

    own.unlink()
    again = _cli("resume", str(run_dir), "--max-steps", "8")
    assert again.returncode == 0, again.stderr
    assert f"the accelerate config the run was launched with, {own.resolve()}, is gone: resuming with the shipped one" \
        in again.stderr
    assert "resuming on 2 processes, as the run was trained" in again.stderr
    assert [r["step"] for r in read_records(run_dir) if r["event"] == "StepMetrics"][-1] == 8
    assert read_state(latest_checkpoint(run_dir)).accelerate_config is None


def test_an_accelerate_config_the_engine_cannot_follow_is_refused_in_one_line(tiny_model_folder, tmp_path):
    run_file = str(_run_file(tmp_path, tiny_model_folder, 2))
    deepspeed = tmp_path / "deepspeed.yaml"
    deepspeed.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n")
    refused = _cli("train", run_file, "--accelerate-config", str(deepspeed))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "asks for DEEPSPEED" in refused.stderr and "DEEPSPEED is not supported" in refused.stderr

    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n")
    refused = _cli("train", run_file, "--accelerate-config", str(fsdp1))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "FSDP version 1" in refused.stderr and "fsdp_version: 2" in refused.stderr


def test_a_process_accelerate_started_never_launches_processes_of_its_own(monkeypatch):
    """What keeps `resume` (which launches as its checkpoint says) from starting processes inside its processes."""
    from studio.core.errors import TrainingError

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # as accelerate launch sets it for its children
    with pytest.raises(TrainingError, match="started by accelerate launch"):
        command(Launch(2), ["resume", "runs/x"])
