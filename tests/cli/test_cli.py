from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import main
from studio.core.model import inventory
from studio.core.model.plan import LoraPlan, count


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True, timeout=600)


def test_count_json_equals_the_core_count(default_model):
    result = run_cli("count", "default", "--targets", "all-linear", "--rank", "8", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    tree = inventory.build(default_model.model)
    expected = count(tree, LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=8, alpha=16))
    assert {k: record[k] for k in ("trainable", "total", "adapter_bytes")} == {
        "trainable": expected.trainable, "total": expected.total, "adapter_bytes": expected.adapter_bytes}
    assert record["share"] == pytest.approx(expected.share)
    assert record["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_count_under_fsdp_estimates_each_gpus_slice(default_model, capsys):
    from studio.core.model import memory

    totals = {}
    for sharding in ([], ["--fsdp"]):
        assert main(["count", "default", "--targets", "all-linear", "--gpus", "2", "--json", *sharding]) == 0
        totals[bool(sharding)] = json.loads(capsys.readouterr().out)["memory"]
    tree = inventory.build(default_model.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=8, alpha=16)
    expected = memory.estimate(tree, plan, count(tree, plan), gpus=2, sharded=True)
    assert totals[True]["weights"] == expected.weights and totals[True]["total"] == expected.total
    assert totals[True]["weights"] < totals[False]["weights"]
    assert main(["count", "default", "--targets", "all-linear", "--gpus", "2", "--fsdp"]) == 0
    assert "on each of 2 GPUs (FSDP: the base sharded)" in capsys.readouterr().out


def _failing_invocations(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """One invocation of every command that fails on purpose, and what its one line must say."""
    (tmp / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                                 "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100}))
    (tmp / "empty.jsonl").write_text("")
    (tmp / "empty-data.yaml").write_text(
        "plan: {targets: q_proj}\ndata: {train_path: empty.jsonl}\ntraining: {max_steps: 1}\n")
    (tmp / "taken.yaml").write_text("something the person wrote\n")
    (tmp / "not-a-run").mkdir()
    missing = str(tmp / "missing")
    return {
        "inspect": (["inspect", missing], "no such file or folder"),
        "count": (["count", "default", "--targets", "q_proj", "--rank", "1000"],
                  "rank 1000 is larger than model.layers.0.self_attn.q_proj"),
        "train": (["train", str(tmp / "empty-data.yaml")], "empty.jsonl holds no rows"),
        "resume": (["resume", str(tmp / "not-a-run")], "run.yaml"),
        "export": (["export", str(tmp / "not-a-run")], "holds no adapter yet"),
        "merge": (["merge", missing, "--out", str(tmp / "merged")], "no such adapter folder"),
        "export-gguf": (["export-gguf", missing, "--out", str(tmp / "x.gguf")], "no such adapter folder"),
        "spectrum": (["spectrum", missing], "no such adapter folder"),
        "generate (plan mode)": (["generate", str(tmp / "config.json"), "--prompt", "hi"], "plan mode (no weights)"),
        "generate (no tokens)": (["generate", "default", "--prompt", "hi", "--max-new-tokens", "0"],
                                 "--max-new-tokens must be at least 1"),
        "init-run": (["init-run", str(tmp / "taken.yaml")], "exists: pass --force"),
    }


FAILING_CASES = ["inspect", "count", "train", "resume", "export", "merge", "export-gguf", "spectrum",
                 "generate (plan mode)", "generate (no tokens)", "init-run"]


def test_the_failing_invocations_cover_every_command_but_the_window(tmp_path):
    from studio.cli import COMMANDS

    cases = _failing_invocations(tmp_path)
    assert sorted(cases) == sorted(FAILING_CASES)
    assert {args[0] for args, _ in cases.values()} == set(COMMANDS) - {"gui"}


@pytest.mark.parametrize("case", FAILING_CASES)
def test_every_command_that_fails_prints_exactly_one_line_and_exits_2(case, tmp_path):
    args, message = _failing_invocations(tmp_path)[case]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}  # the libraries' notices go to this log
    result = subprocess.run([sys.executable, "-m", "studio.cli", *args], capture_output=True, text=True,
                            timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("lora-studio: "), result.stderr
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["count", "default"], "--targets"),
        (["count", "./no/such/model", "--targets", "q_proj"], "no such file or folder"),
        (["count", "default", "--targets", "wqkv"], "matches no LoRA-targetable module"),
        (["count", "default", "--targets", "q_proj", "--rank-override", "x"], "MODULE=RANK"),
        (["count", "default", "--targets", "q_proj", "--gpus", "2", "--fsdp", "--quantization", "4bit"],
         "FSDP does not shard a 4-bit or 8-bit base"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message, capsys):
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.strip().count("\n") == 0


def test_inspect_json_groups_repeated_blocks(capsys, default_model):
    assert main(["inspect", "default", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    groups = {g["name"]: g for g in record["groups"]}
    q = groups["model.layers.*.self_attn.q_proj"]
    assert (q["count"], q["shape"], q["params"]) == (30, "576→576", 30 * 576 * 576)
    assert record["total_params"] == sum(p.numel() for p in default_model.model.parameters())
    assert record["presets"] == {"attention": 120, "mlp": 90, "all-linear": 210, "peft-default": 60}


def test_count_on_a_config_with_overrides_and_dora(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_hidden_layers": 2, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["count", str(tmp_path / "config.json"), "--targets", "q_proj,v_proj", "--rank", "4",
                 "--variant", "dora", "--rank-override", "model.layers.0.self_attn.q_proj=8", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    # q: 64->64, v: 64->64 (4 heads of 16, no GQA); r(in+out) plus one magnitude per output
    assert record["lora"] == 8 * 128 + 4 * 128 + 4 * 128 * 2
    assert record["dora"] == 4 * 64


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("inspect", "count", "gui"):
        assert command in result.stdout


def test_building_the_parser_imports_neither_torch_nor_peft_yet_help_quotes_peft():
    check = ("import sys, studio.cli as cli; cli.build_parser(); "
             "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the window's launch and every command start without seconds of imports

    from peft import LoraConfig

    first_sentence = LoraConfig.__dataclass_fields__["r"].metadata["help"].split(". ")[0]
    shown = run_cli("count", "--help")
    assert first_sentence in " ".join(shown.stdout.split())
    assert shown.stderr == ""  # what PEFT's import brings along (bitsandbytes' notes) goes to the log file


def test_the_run_file_options_quote_the_run_files_own_field_help():
    from studio.core.model.plan import LoraPlan
    from studio.core.runconfig import ModelConfig, TrainingConfig, field_help

    def bare(text: str) -> str:  # argparse wraps lines, at hyphens too
        return "".join(text.split())

    train_help = bare(run_cli("train", "--help").stdout)
    assert bare(f"override training.max_steps: {field_help(TrainingConfig, 'max_steps')}") in train_help
    count_help = bare(run_cli("count", "--help").stdout)
    for cls, name in ((LoraPlan, "targets"), (LoraPlan, "variant"), (ModelConfig, "source"), (ModelConfig, "task")):
        assert bare(field_help(cls, name)) in count_help
