"""How fast the numbers behind every slider move are, on a Llama-2-70B-shaped tree (plan mode, no weights).

Times: opening the 70B config.json in plan mode (in a warm process, as the studio does after start-up), building
the module tree, `plan.count` for all-linear at rank 16, and `memory.estimate`; beside them, the baseline those
numbers would otherwise come from: PEFT's own count (get_peft_model on the meta model, then
get_nb_trainable_parameters). Prints medians and the ratio.

    .venv/bin/python bench/bench_count.py
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

LLAMA_2_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
    "num_hidden_layers": 80, "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
}


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    from peft import get_peft_model

    from studio.core.model import inventory, memory
    from studio.core.model.loading import open_model
    from studio.core.model.plan import LoraPlan, count, to_peft_config

    path = Path(tempfile.mkdtemp()) / "config.json"
    path.write_text(json.dumps(LLAMA_2_70B))
    started = time.perf_counter()
    loaded = open_model(str(path))
    cold = time.perf_counter() - started
    warm_open = median_ms(lambda: open_model(str(path)), 5)
    tree_ms = median_ms(lambda: inventory.build(loaded.model), 5)
    tree = inventory.build(loaded.model)
    plan = LoraPlan(targets=tuple(inventory.select(tree, "all-linear")), rank=16, alpha=32)
    count_ms = median_ms(lambda: count(tree, plan), 50)
    counts = count(tree, plan)
    estimate_ms = median_ms(lambda: memory.estimate(tree, plan, counts, batch_size=4, seq_len=4096), 50)

    def peft_count():
        get_peft_model(copy.deepcopy(loaded.model), to_peft_config(plan, tree)).get_nb_trainable_parameters()

    peft_ms = median_ms(peft_count, 3)
    print(f"Llama-2-70B config, {len(tree.modules)} modules, all-linear r=16 ({len(plan.targets)} targets)")
    print(f"  open in plan mode: first {cold:.2f} s (imports included), then {warm_open:.0f} ms")
    print(f"  module tree {tree_ms:.1f} ms; count {count_ms:.2f} ms; memory estimate {estimate_ms:.2f} ms")
    print(f"  PEFT's own count (wrap the meta model, count): {peft_ms:.0f} ms"
          f" -> count is {peft_ms / count_ms:.0f}x faster")


if __name__ == "__main__":
    main()
