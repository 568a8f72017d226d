"""torch.compile for training: when the compiler itself fails, the run goes on eager and loses nothing."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from studio.core import events as ev
from studio.core.data.dataset import demo_spec
from studio.core.runconfig import ModelConfig, RunConfig, TrainingConfig
from studio.core.train import compilation
from studio.core.train.engine import train


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no C compiler on this machine")


def compile_blocks_with(backend, monkeypatch):
    """compilation.compile_blocks patched to compile each block with `backend` instead of Inductor; returns it."""
    original = compilation.compile_blocks

    def compile_with(model):
        blocks = original(model)
        for block in blocks:
            block.compile(backend=backend)
        return blocks

    monkeypatch.setattr(compilation, "compile_blocks", compile_with)
    return compile_with


def test_is_compile_failure_tells_the_compiler_from_the_model():
    compiled = torch.compile(lambda x: x * 2 + 1, backend=failing_backend)
    with pytest.raises(Exception) as caught:
        compiled(torch.ones(3))
    assert compilation.is_compile_failure(caught.value)
    assert not compilation.is_compile_failure(RuntimeError("shape mismatch in the model"))
    assert not compilation.is_compile_failure(torch.OutOfMemoryError("CUDA out of memory"))


def test_a_compiler_failure_mid_run_falls_back_to_eager_with_the_eager_losses(fresh_default_model, tmp_path,
                                                                             monkeypatch):
    demo = demo_spec()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(Path(demo.train_path).read_text().splitlines()[:8]) + "\n")

    def run(name: str) -> list:
        config = RunConfig(
            model=ModelConfig(source="default", device="cpu"),
            plan={"targets": "q_proj,v_proj", "rank": 4, "alpha": 8, "dropout": 0.0},
            data={"train_path": str(data), "format": "instruction", "max_length": 64},
            training=TrainingConfig(max_steps=2, batch_size=2, learning_rate=3e-3, warmup_ratio=0.0, eval_every=0,
                                    eval_examples=0, save_every=0, spectrum_every=0),
            output_dir=str(tmp_path / name),
        )
        loaded = copy.copy(fresh_default_model)
        loaded.model = copy.deepcopy(fresh_default_model.model)
        events: list = []
        assert isinstance(train(config, events.append, loaded=loaded), ev.Finished), events[-1]
        return events

    eager = run("eager")
    monkeypatch.setattr(compilation, "when", lambda *args, **kwargs: ("now", ""))  # as on a GPU
    compile_blocks_with(failing_backend, monkeypatch)
    fallen_back = run("fallback")

    warnings = [e.text for e in fallen_back if isinstance(e, ev.LogMessage) and e.level == "warning"]
    assert any(w.startswith("compiling the decoder layers failed (") and "without compiling" in w for w in warnings)
    losses = [e.loss for e in fallen_back if isinstance(e, ev.StepMetrics)]
    assert len(losses) == 2
    for ours, theirs in zip(losses, (e.loss for e in eager if isinstance(e, ev.StepMetrics))):
        assert math.isclose(ours, theirs, rel_tol=1e-6)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)  # 1 MiB of weights each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class _Layers(torch.nn.Module):
    _no_split_modules = ["_Block"]

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x.sum()


def test_compiled_layers_under_ddp_stay_one_graph_each(monkeypatch):
    """Dynamo splits a graph compiled inside DDP's forward where DDP's gradient buckets end (its first bucket holds
    1 MiB): a block's graph would come in pieces, its fusion and its memory broken at each cut."""
    import contextlib
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    graphs: list = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compile_counting = compile_blocks_with(counting_backend, monkeypatch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        def graphs_of_one_step(through_policy: bool) -> int:
            torch._dynamo.reset()
            graphs.clear()
            model = _Layers()
            with contextlib.ExitStack() as undo:
                if through_policy:
                    compilation.CompilePolicy(True, model, is_cuda=True, checkpointing=False, undo=undo,
                                              log=lambda text, level: None)
                else:
                    compile_counting(model)
                DistributedDataParallel(model)(torch.randn(4, 256)).backward()
            return len(graphs)

        assert graphs_of_one_step(through_policy=False) > 2  # Dynamo's DDP splitting, where nothing turns it off
        assert graphs_of_one_step(through_policy=True) == 2  # one graph a block
        assert torch._dynamo.config.optimize_ddp is True  # the run's end gave the setting back
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
