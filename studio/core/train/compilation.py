"""torch.compile for training, one decoder layer at a time: whether a run compiles, what, and how it is undone.

Compiling each repeated block (not the whole PEFT model) gives one graph that all the blocks share, so it costs
about one block's compile time; it fuses the elementwise work around the matmuls (norms, rotary embeddings, the
gated MLP, LoRA's scale-and-add) without changing the math beyond bf16 rounding. The first step with a new batch
shape compiles (a second width recompiles once with a dynamic sequence length), so a short run is better off
eager: `auto` times a few eager steps first and compiles only when the rest of the run repays it with room to spare.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from studio.core.errors import first_line

# On an H100 (bench/bench_engine.py: Llama-3.2-1B shape, r=16 all-linear, 8 × 1024 tokens, bf16) compiling took
# 20 s and cut the step from 215 to 121 ms (44%): it paid after 215 steps. `auto` assumes less (GAIN) and more
# (COST_S: a second batch width compiles once more), and compiles only when the rest of the run, timed eager,
# is long enough to repay COST_S: 133 s of eager steps, about 3x the measured break-even.
PROBE_STEPS = 3  # eager steps timed (after the first, which warms up) before `auto` decides
COST_S = 40.0
GAIN = 0.3


def when(setting: bool | str, *, is_cuda: bool, checkpointing: bool) -> tuple[str | None, str]:
    """("now" | "probe" | None, why not): `probe` is `auto`'s measure-then-decide; the reason is "" when it can.
    A 4-bit or 8-bit base is tried too (bitsandbytes registers its matmuls as torch custom ops); where the compiler
    fails on it, the run falls back to eager (`CompilePolicy.fall_back`)."""
    import torch

    if setting is False:
        return None, ""
    reason = ("it needs a CUDA GPU" if not is_cuda else "it does not cover gradient checkpointing" if checkpointing
              else "it needs torch 2.6 or newer" if not hasattr(torch.compiler, "set_stance") else "")
    if reason:
        return None, reason
    return ("now" if setting is True else "probe"), ""


def pays(eager_step_s: float, remaining_steps: int) -> bool:
    """Whether compiling now repays its assumed cost in the steps left."""
    return remaining_steps * eager_step_s * GAIN >= COST_S


def compile_blocks(model: Any) -> list[Any]:
    """Mark each repeated decoder block (the classes transformers keeps whole on one device) for torch.compile; the
    compiling happens on the next forward. Returns the blocks, for `uncompile`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile()
    return blocks


def is_compile_failure(exc: BaseException) -> bool:
    """Whether `exc` comes from torch.compile's machinery (Dynamo tracing, Inductor code generation or a backend),
    not from the model's own computation, so that the run can go on eager."""
    return any(type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
               for e in (exc, exc.__cause__, exc.__context__) if e is not None)


def uncompile(blocks: list[Any]) -> None:
    """The caller's model runs eager again (generation would otherwise recompile for every new length)."""
    for block in blocks:
        block._compiled_call_impl = None  # what nn.Module.compile() set


def eager(blocks: list[Any]) -> Any:
    """A context in which compiled blocks run eager: evaluation and generation, whose modes and shapes would only
    recompile them."""
    import torch

    return torch.compiler.set_stance("force_eager") if blocks else contextlib.nullcontext()


class CompilePolicy:
    """One run's compiling: decided by `when` from the setting, then (for `auto`) by `pays` after timing the first
    eager steps; it keeps the compiled blocks, undoes them when the run ends (`undo`), and falls back to eager when
    the compiler, not the run, fails. `log(text, level)` tells the run's listeners."""

    def __init__(self, setting: bool | str, model: Any, *, is_cuda: bool, checkpointing: bool,
                 undo: contextlib.ExitStack, log: Callable[[str, str], None]) -> None:
        self.model, self.undo, self.log = model, undo, log
        self.blocks: list[Any] = []
        self.pending, why_not = when(setting, is_cuda=is_cuda, checkpointing=checkpointing)
        self.step_times: list[float] = []  # `auto`'s probe: eager step times
        if why_not and setting is True:
            log(f"compile_layers is off for this run: {why_not}", "warning")
        if self.pending == "now":
            self._compile()

    @property
    def active(self) -> bool:
        return bool(self.blocks)

    def before_step(self, remaining_steps: int) -> None:
        if self.pending == "probe" and len(self.step_times) == PROBE_STEPS + 1:
            self.pending = None
            if pays(sorted(self.step_times[1:])[PROBE_STEPS // 2], remaining_steps):
                self._compile()

    def after_step(self, seconds: float) -> None:
        if self.pending == "probe":
            self.step_times.append(seconds)

    def eager(self) -> Any:
        return eager(self.blocks)

    def fall_back(self, exc: BaseException) -> bool:
        """After a failed forward or backward: True when the compiler failed (the layers run eager from now on),
        False when the run itself did."""
        if not self.blocks or not is_compile_failure(exc):
            return False
        uncompile(self.blocks)
        self.blocks.clear()
        self.log(f"compiling the decoder layers failed ({first_line(exc)}); training on without compiling (set "
                 "training.compile_layers: false to skip the attempt)", "warning")
        return True

    def _compile(self) -> None:
        import torch

        # Under DDP, Dynamo would cut each layer's graph where DDP's gradient buckets end (its DDPOptimizer, made
        # for one whole-model graph); per-layer graphs overlap the all-reduce anyway (a layer's gradients are all
        # ready when its backward ends). On two H200s (1B shape) the cuts cost 2 GiB a GPU and 11% of the speed.
        self.undo.enter_context(torch._dynamo.config.patch(optimize_ddp=False))
        self.blocks.extend(compile_blocks(self.model))
        self.undo.callback(uncompile, self.blocks)
        self.log(f"compiling {len(self.blocks)} decoder layers: the next step takes longer, the rest less", "info")
