"""Under autocast the adapters read their input uncast: the same numbers, less kept for backward; the engine
turns PEFT's cast off for a mixed-precision run and back on when it ends."""

from __future__ import annotations

import torch


def test_under_autocast_adapters_read_their_input_uncast_with_the_same_losses_and_gradients(tiny_llama):
    """PEFT casts an adapter's bf16 input to the adapter's float32 and autocast casts it back: the same values, but
    a copy per adapter kept for backward. Without the cast (as the engine trains under autocast, DoRA apart) the
    loss and every gradient are bit for bit the same, and less is kept."""
    from peft import LoraConfig, get_peft_model
    from peft.helpers import disable_input_dtype_casting

    model = get_peft_model(tiny_llama.to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                     lora_dropout=0.0, init_lora_weights=False))
    ids = torch.randint(3, tiny_llama.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    results = []
    for uncast in (False, True):
        kept: dict[int, int] = {}

        def keep(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        model.zero_grad(set_to_none=True)
        switch = disable_input_dtype_casting(model, active=uncast)
        with switch, torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad], kept))
    (cast_loss, cast_grads, cast_kept), (loss, grads, kept) = results
    assert loss == cast_loss and all(torch.equal(a, b) for a, b in zip(grads, cast_grads))
    assert sum(kept.values()) < sum(cast_kept.values())


RUN_AND_REPORT = """
import json, sys
from peft.tuners.tuners_utils import BaseTunerLayer
from studio.core import events as ev
from studio.core.model.loading import open_model
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train.engine import train

folder, data, out = sys.argv[1:4]
config = RunConfig(
    model=ModelConfig(source=folder, device="cpu"),
    plan={"targets": "all-linear", "rank": 4, "alpha": 8, "dropout": 0.0},
    data={"train_path": data, "format": "text", "max_length": 32},
    training=TrainingConfig(max_steps=2, batch_size=4, eval_every=0, eval_examples=0, save_every=0,
                            spectrum_every=0, precision="bf16"),
    output_dir=out,
)
loaded = open_model(folder)
flags = lambda: sorted({m.cast_input_dtype_enabled for m in loaded.model.modules() if isinstance(m, BaseTunerLayer)})
during = []
result = train(config, lambda e: during.append(flags()) if isinstance(e, ev.StepMetrics) else None, loaded=loaded)
print(json.dumps({"finished": isinstance(result, ev.Finished), "during": during, "after": flags()}))
"""


def test_a_mixed_precision_run_trains_with_uncast_adapter_inputs_and_restores_peft_s_cast(tiny_model_folder, tmp_path):
    """bf16 autocast on the CPU, in a process of its own (accelerate keeps one precision per process)."""
    import json
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"text": "row {i} of the autocast test"}}\n' for i in range(8)))
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, str(tiny_model_folder), str(data),
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["finished"] and report["during"] == [[False], [False]] and report["after"] == [True]
