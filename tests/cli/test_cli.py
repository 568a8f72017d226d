from __future__ import annotations

import json
import subprocess
import sys

import pytest

from studio.cli import main
from studio.core import inventory
from studio.core.plan import LoraPlan, count


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


def test_bad_input_exits_2_with_one_line_on_stderr():
    result = run_cli("count", "default", "--targets", "q_proj", "--rank", "1000")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "rank 1000 is larger than model.layers.0.self_attn.q_proj" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["count", "default"], "--targets"),
        (["count", "./no/such/model", "--targets", "q_proj"], "no such file or folder"),
        (["count", "default", "--targets", "wqkv"], "matches no LoRA-targetable module"),
        (["count", "default", "--targets", "q_proj", "--rank-override", "x"], "MODULE=RANK"),
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
    help_text = run_cli("count", "--help").stdout
    assert first_sentence in " ".join(help_text.split())
