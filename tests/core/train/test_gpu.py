"""The same runs on a CUDA GPU: bf16 mixed precision, and a 4-bit base (QLoRA). Run on the GPU machine with
`pytest -m gpu tests/core/train/test_gpu.py`. The tokenizer comes from the built-in model, or from the folder named by
LORA_STUDIO_TEST_TOKENIZER where that package is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from studio.core import events as ev
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.engine import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A random 4-layer Llama (hidden 256) saved with a real tokenizer, in bf16."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer_dir = os.environ.get("LORA_STUDIO_TEST_TOKENIZER")
    if not tokenizer_dir:
        from studio.core.model.loading import open_model

        tokenizer_dir = open_model("default").folder  # the built-in model's converted folder
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for item in Path(tokenizer_dir).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(item, folder / item.name)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 6}) + "\n"
                            for _ in range(64)))
    return folder


def run(model_folder, tmp_path, training=None, loaded=None, **model):
    settings = dict(max_steps=8, batch_size=8, learning_rate=5e-3, eval_every=0, save_every=4, spectrum_every=4,
                    warmup_ratio=0.0)
    settings.update(training or {})
    config = RunConfig(
        model=ModelConfig(source=str(model_folder), device="cuda", **model),
        plan={"targets": "all-linear", "rank": 8, "alpha": 16, "dropout": 0.0},
        data={"train_path": str(model_folder / "train.jsonl"), "format": "text", "max_length": 64},
        training=TrainingConfig(**settings),
        output_dir=str(tmp_path),
    )
    events: list = []
    result = train(config, events.append, loaded=loaded)
    return result, events


def test_bf16_run_on_cuda_reports_gpu_memory_and_learns(model_folder, tmp_path):
    result, events = run(model_folder, tmp_path)
    assert isinstance(result, ev.Finished), result
    started = next(e for e in events if isinstance(e, ev.RunStarted))
    assert started.device.startswith("cuda")
    steps = [e for e in events if isinstance(e, ev.StepMetrics)]
    assert len(steps) == 8 and all(s.gpu_mem_bytes and s.gpu_mem_bytes > 0 for s in steps)
    assert steps[-1].loss < steps[0].loss * 0.9
    assert Path(result.adapter_dir, "adapter_model.safetensors").is_file()


def test_the_last_step_read_late_reports_its_own_time(model_folder, tmp_path):
    """This small model keeps the GPU ahead of the host: each step's report is read a step late and finds the device
    done, so its time ends when the host had queued it; the last step, read once the loop has ended, too."""
    result, events = run(model_folder, tmp_path, training=dict(max_steps=12, save_every=0, spectrum_every=0))
    assert isinstance(result, ev.Finished), result
    rates = [e.tokens_per_s for e in events if isinstance(e, ev.StepMetrics)]
    typical = sorted(rates[2:-1])[len(rates[2:-1]) // 2]
    assert rates[-1] < 3 * typical, rates


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_4bit_run_on_cuda(model_folder, tmp_path):
    from studio.core.model.loading import open_model

    loaded = open_model(str(model_folder), device="cuda", quantization="4bit")
    assert type(loaded.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    result, events = run(model_folder, tmp_path, quantization="4bit")
    assert isinstance(result, ev.Finished), result
    steps = [e for e in events if isinstance(e, ev.StepMetrics)]
    assert steps[-1].loss < steps[0].loss
    spectra = [e for e in events if isinstance(e, ev.SpectrumSnapshot)]
    assert spectra[-1].modules and spectra[-1].modules[0].values[0] > 0


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_qlora_keeps_the_stream_in_bf16_and_compiles_to_the_eager_losses(model_folder, tmp_path):
    """A 4-bit base trains with its embeddings and norms in bf16 (no float32 upcast of the residual stream), its
    adapters share products and its MLPs run the LoRA + SiLU·up kernel with the losses of PEFT's own forward, and
    compiled decoder layers (or, where the compiler fails on bitsandbytes, eager ones after a warning) give the
    eager run's losses."""
    from studio.core.model.loading import open_model

    losses, logs = {}, {}
    plain = dict(compile_layers=False, shared_adapter_input=False, fused_mlp_kernel=False)
    for name, settings in (("plain", plain), ("eager", dict(compile_layers=False)),
                           ("compiled", dict(compile_layers=True))):
        loaded = open_model(str(model_folder), device="cuda", quantization="4bit")
        result, events = run(model_folder, tmp_path / name, dict(max_steps=6, save_every=0, spectrum_every=0,
                                                                  **settings), loaded=loaded, quantization="4bit")
        assert isinstance(result, ev.Finished), result
        base = loaded.model.get_base_model()
        assert base.model.embed_tokens.weight.dtype == torch.bfloat16
        assert all(p.dtype != torch.float32 for n, p in base.named_parameters() if "norm" in n)
        losses[name] = [e.loss for e in events if isinstance(e, ev.StepMetrics)]
        logs[name] = [e.text for e in events if isinstance(e, ev.LogMessage)]
    assert any("compiling 4 decoder layers" in text for text in logs["compiled"])
    for name in ("eager", "compiled"):
        assert any(text.startswith("adapters sharing an input: 8 groups") for text in logs[name]), logs[name]
        assert any(text.startswith("gated MLPs: 4 compute") for text in logs[name]), logs[name]
    assert losses["eager"] == pytest.approx(losses["plain"], rel=1e-2)
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-2)
    assert losses["eager"][-1] < losses["eager"][0]


def test_fast_path_gives_the_plain_losses_and_leaves_the_model_eager(model_folder, tmp_path, monkeypatch):
    """Chunked loss, compiled decoder layers, shared adapter inputs and SDPA without transformers' mask check
    against the model's own loss, eager layers, PEFT's forward and plain SDPA, step by step (bf16 rounding apart).
    `auto` takes the chunked loss and compiles only when the probed steps say it pays: never on this short run with
    the real costs, after its probe steps when compiling is made free."""
    from studio.core.model.loading import open_model
    from studio.core.train import compilation

    losses, logs = {}, {}
    loaded = open_model(str(model_folder), device="cuda")
    plain = dict(fused_loss=False, compile_layers=False, shared_adapter_input=False, fused_mlp_kernel=False,
                 attention="sdpa")
    for name, switches, model in (("plain", plain, None),
                                  ("fast", dict(fused_loss=True, compile_layers=True), loaded),
                                  ("auto", {}, None), ("auto, compiling free", {}, None)):
        if name == "auto, compiling free":
            monkeypatch.setattr(compilation, "COST_S", 0.0)
        result, events = run(model_folder, tmp_path / name.replace(", ", "-").replace(" ", "-"),
                             dict(max_steps=6, save_every=0, spectrum_every=0, **switches), loaded=model)
        assert isinstance(result, ev.Finished), result
        losses[name] = [e.loss for e in events if isinstance(e, ev.StepMetrics)]
        logs[name] = [(e.level, e.text) for e in events if isinstance(e, ev.LogMessage)]
    for name in ("fast", "auto, compiling free"):
        assert any("compiling 4 decoder layers" in text for _, text in logs[name]), name
    assert not any("compiling" in text for _, text in logs["auto"])
    for name in ("fast", "auto"):
        assert ("info", "adapters sharing an input: 8 groups of 2-3, one product each (shared_adapter_input)") \
            in logs[name], name
        assert ("info", "attention: SDPA, causal, no mask built (unpacked rows, padding on the right)") in logs[name]
        assert ("info", "gated MLPs: 4 compute their LoRA outputs and SiLU·up in one kernel (fused_mlp_kernel)") \
            in logs[name], name
    assert not any(word in text for _, text in logs["plain"] for word in ("sharing", "attention", "MLPs"))
    assert not [text for name in losses for level, text in logs[name] if level != "info"]  # nothing turned off
    for name in ("fast", "auto", "auto, compiling free"):
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-2), name
    assert losses["plain"][-1] < losses["plain"][0]
    layers = loaded.model.get_base_model().model.layers
    assert all(layer._compiled_call_impl is None for layer in layers)  # generation later runs eager
    assert type(layers[0].self_attn.q_proj).__name__ == "Linear"  # PEFT's forward back
    assert type(layers[0].mlp).__name__ == "LlamaMLP"  # and the MLP's own
    assert loaded.model.get_base_model().config._attn_implementation == "sdpa"


@pytest.mark.parametrize("rank", [8, 16])
def test_the_gated_mlp_kernel_gives_peft_s_output_and_gradients(rank):
    """fused_mlp.py's kernel against the MLP's own forward through PEFT (shared adapter input on both sides), as
    the engine trains: bf16 base, float32 adapters, autocast; rank 8 is padded to the kernel's 16."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting
    from transformers import AutoModelForCausalLM, LlamaConfig

    from studio.core.train import fused_mlp, shared_input

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=1000, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)  # 1000: a width that does not fill its last tile
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                             init_lora_weights=False))
    autocast = lambda: torch.autocast("cuda", torch.bfloat16)  # noqa: E731
    mlp = model.get_base_model().model.layers[0].mlp
    x = torch.randn(2, 100, 256, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(2, 100, 256, device="cuda", dtype=torch.bfloat16)
    params = [p for p in mlp.parameters() if p.requires_grad]

    def output_and_gradients():
        read = x.clone().requires_grad_()
        for p in params:
            p.grad = None
        with autocast():
            out = mlp(read)
        out.backward(grad)
        return [out.float(), read.grad.float()] + [p.grad.float().clone() for p in params]

    with disable_input_dtype_casting(model):
        shared_input.Shared(shared_input.find_groups(model, {"input_ids": torch.ones(1, 8, dtype=torch.long,
                                                                                      device="cuda")}, autocast))
        own = output_and_gradients()
        fused = fused_mlp.FusedMLPs(fused_mlp.find_gated_mlps(model))
        assert fused.check(autocast) == ""
        got = output_and_gradients()
    assert type(mlp).__name__ == "FusedLoRALlamaMLP"
    assert len(params) == 6  # gate, up and down: A and B each
    for mine, theirs in zip(got, own):
        assert ((mine - theirs).norm() / theirs.norm()).item() < 2e-2


@pytest.mark.parametrize("name", ["varlen", "flex_attention"])
def test_packed_rows_keep_their_examples_apart_on_each_gpu_attention(model_folder, name):
    """Each example's logits in a packed row (bf16, through the engine's batch path) against the example alone."""
    from studio.core.data.dataset import Example, collate, pack
    from studio.core.model.loading import open_model
    from studio.core.train import attention, losses

    if attention.available(name, is_cuda=True):
        pytest.skip(attention.available(name, is_cuda=True))
    model = open_model(str(model_folder), device="cuda").model.eval()
    generator = torch.Generator().manual_seed(0)
    items = [Example(tuple(ids), tuple(ids), len(ids)) for ids in
             (torch.randint(3, 40000, (n,), generator=generator).tolist() for n in (50, 90, 30, 70, 60))]
    rows = list(pack(items, 160))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        expected = {e.input_ids: model(input_ids=torch.tensor([e.input_ids], device="cuda"),
                                       use_cache=False).logits[0].float() for e in items}
        attention.set_implementation(model, name)
        batch = losses.to_device(collate(rows, 0), torch.device("cuda"), fused=False, attention=name)
        batch.pop("labels")
        logits = model(**batch, use_cache=False).logits.float()
    found = 0
    for row, packed in enumerate(rows):
        starts = [i for i, p in enumerate(packed.position_ids) if p == 0] + [len(packed.input_ids)]
        for start, end in zip(starts, starts[1:]):
            own = expected[packed.input_ids[start:end]]
            assert (logits[row, start:end] - own).abs().max() <= 0.02 * own.abs().max(), (name, row, start)
            found += 1
    assert found == len(items)


def test_packed_runs_give_the_same_losses_on_every_attention(model_folder, tmp_path):
    """A packed run trained with varlen and with FlexAttention against SDPA's dense mask; `auto` takes the first
    that passes its check, and says so."""
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps({"text": "the quick brown fox " * (1 + i % 9)}) + "\n" for i in range(96)))
    losses, logs = {}, {}
    for setting in ("sdpa", "varlen", "flex_attention", "auto"):
        config = RunConfig(
            model=ModelConfig(source=str(model_folder), device="cuda"),
            plan={"targets": "all-linear", "rank": 8, "alpha": 16, "dropout": 0.0},
            data={"train_path": str(data), "format": "text", "max_length": 128, "packing": True},
            training=TrainingConfig(max_steps=6, batch_size=4, learning_rate=5e-3, eval_every=0, save_every=0,
                                    spectrum_every=0, warmup_ratio=0.0, attention=setting),
            output_dir=str(tmp_path / setting),
        )
        events: list = []
        assert isinstance(train(config, events.append), ev.Finished)
        losses[setting] = [e.loss for e in events if isinstance(e, ev.StepMetrics)]
        logs[setting] = [e.text for e in events if isinstance(e, ev.LogMessage)]
    from studio.core.train import attention

    for setting in ("varlen", "flex_attention", "auto"):
        assert losses[setting] == pytest.approx(losses["sdpa"], rel=1e-2), (setting, logs[setting])
    for setting in ("varlen", "flex_attention"):  # trained with it, not fallen back to SDPA
        if attention.available(setting, is_cuda=True) is None:
            assert f"attention: {setting} (packed rows without a dense mask)" in logs[setting], logs[setting]
    assert any(text.startswith("attention: ") for text in logs["auto"]), logs["auto"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_one_run_with_each_gpus_memory(model_folder, tmp_path):
    import subprocess
    import sys

    import yaml

    from studio.core.train.run_folder import read_records

    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "model": {"source": str(model_folder), "device": "cuda"},
        "plan": {"targets": "all-linear", "rank": 8, "alpha": 16},
        "data": {"train_path": str(model_folder / "train.jsonl"), "format": "text", "max_length": 64},
        "training": {"max_steps": 5, "batch_size": 4, "save_every": 2, "eval_every": 0, "spectrum_every": 0},
        "output_dir": str(tmp_path / "runs"),
    }))
    done = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(run_file), "--gpus", "2", "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_records(tmp_path / "run")
    assert [r["event"] for r in records].count("RunStarted") == 1
    steps = [r for r in records if r["event"] == "StepMetrics"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    assert all(len(s["gpu_mem_per_device"]) == 2 and min(s["gpu_mem_per_device"]) > 0 for s in steps)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fsdp_on_two_gpus_matches_ddp_and_saves_one_whole_adapter(model_folder, tmp_path):
    """FSDP (resources/accelerate/fsdp.yaml) against DDP on two GPUs, both from one saved initial adapter (PEFT draws
    the A matrices where the base is: on the GPU under DDP, in host memory under FSDP): the same losses to bf16's
    precision, and the adapter saved whole."""
    import subprocess
    import sys

    import yaml
    from peft import get_peft_model
    from safetensors.torch import load_file

    from studio.core.adapters.saving import save_adapter
    from studio.core.model import inventory
    from studio.core.model.loading import open_model
    from studio.core.model.plan import LoraPlan, to_peft_config
    from studio.core.train.run_folder import read_records

    loaded = open_model(str(model_folder), device="cpu", dtype="bfloat16")
    tree = inventory.build(loaded.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=8, alpha=16, dropout=0.0)
    torch.manual_seed(1)
    initial = save_adapter(get_peft_model(loaded.model, to_peft_config(plan, tree)), tmp_path / "initial",
                           base_model_spec=str(model_folder))
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump({
        "model": {"source": str(model_folder), "device": "cuda", "adapter": str(initial)},
        "data": {"train_path": str(model_folder / "train.jsonl"), "format": "text", "max_length": 64},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 5e-3, "save_every": 3, "eval_every": 0,
                     "spectrum_every": 3, "warmup_ratio": 0.0},
        "output_dir": str(tmp_path / "runs"),
    }))
    losses, adapters = {}, {}
    for kind in ("ddp", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "studio.cli", "train", str(run_file), "--gpus", "2",
                               "--accelerate-config", kind, "--run-dir", str(tmp_path / kind)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        steps = [r for r in read_records(tmp_path / kind) if r["event"] == "StepMetrics"]
        assert all(len(s["gpu_mem_per_device"]) == 2 and min(s["gpu_mem_per_device"]) > 0 for s in steps)
        losses[kind] = [s["loss"] for s in steps]
        adapters[kind] = load_file(tmp_path / kind / "adapter" / "adapter_model.safetensors")
    assert losses["fsdp"] == pytest.approx(losses["ddp"], rel=5e-3)
    assert adapters["fsdp"].keys() == adapters["ddp"].keys()
    for name, tensor in adapters["ddp"].items():
        assert adapters["fsdp"][name].shape == tensor.shape  # whole, not one process's slice
        # Adam moves a weight whose gradient is near zero by about the learning rate either way, so the two runs'
        # bf16 roundings differ elementwise there; the tensors as a whole agree
        assert (adapters["fsdp"][name].float() - tensor.float()).norm() <= 0.2 * tensor.float().norm()
