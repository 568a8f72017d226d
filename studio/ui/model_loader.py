"""The job that opens a model for the window: the core's `open_model`, its module tree, its presets and what
this machine's GPU offers. It runs on a worker thread, so everything slow or import-heavy (torch,
transformers, peft) happens here and never on the UI thread."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Mapping

from studio.core.model import inventory
from studio.core.model.loading import LoadedModel, open_model
from studio.core.progress import Progress, ProgressCallback, scaled


@dataclass(frozen=True)
class Machine:
    """The accelerator the studio would train on; None fields without a CUDA GPU."""

    gpu_name: str | None
    gpu_bytes: int | None
    gpu_count: int = 0  # CUDA GPUs on this machine: several can train one run (one process each)

    @property
    def has_cuda(self) -> bool:
        return self.gpu_bytes is not None

    @property
    def description(self) -> str:
        if self.gpu_name is None:
            return "CPU only (no CUDA GPU)"
        several = f"{self.gpu_count} × " if self.gpu_count > 1 else ""
        return f"{several}{self.gpu_name} ({(self.gpu_bytes or 0) / 2**30:.0f} GiB)"


@dataclass(frozen=True)
class OpenedModel:
    spec: str  # what to pass to open_model again (stored in the recent list)
    loaded: LoadedModel
    tree: inventory.ModuleTree
    presets: Mapping[str, tuple[str, ...]]
    machine: Machine

    @property
    def plan_only(self) -> bool:
        return self.loaded.plan_only


def detect_machine() -> Machine:
    import torch

    from studio.core.model.memory import gpu_memory_bytes

    if not torch.cuda.is_available():
        return Machine(None, None)
    return Machine(torch.cuda.get_device_name(0), gpu_memory_bytes(0), torch.cuda.device_count())


def import_libraries() -> None:
    """Import torch, transformers and peft with the garbage collector paused, then freeze what they made.

    The imports create about a million objects (modules, classes, functions) that live as long as the process.
    Left in the collector's generations, every full collection walks all of them while holding the GIL: a pause
    of several hundred milliseconds, on whichever thread triggers it, that stalls the window. Frozen, they are
    skipped. Only objects that exist before any model is opened are frozen, so a model can still be freed.
    """
    global _libraries_frozen
    if _libraries_frozen:
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    finally:
        gc.freeze()
        _libraries_frozen = True
        if was_enabled:
            gc.enable()


_libraries_frozen = False


def load_model(spec: str, report: ProgressCallback) -> OpenedModel:
    """Open `spec` (anything `open_model` accepts) and describe it. Raises StudioError for bad input."""
    report(Progress("libraries", 0.0, "Loading torch and transformers"))
    import_libraries()
    # open_model fills most of the bar; the last stretch is for the tree and the presets
    loaded = open_model(spec, on_progress=scaled(report, 0.0, 0.85))
    report(Progress("inventory", 0.85, f"Listing the modules of {loaded.display_name}"))
    tree = inventory.build(loaded.model, loaded.task)
    report(Progress("presets", 0.92, "Finding the layer presets"))
    presets = {name: tuple(names) for name, names in inventory.presets(tree).items()}
    return OpenedModel(loaded.source.spec, loaded, tree, presets, detect_machine())
