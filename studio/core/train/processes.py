"""The rules of a run on several processes (accelerate launch: one process per GPU, or per CPU with gloo).

- Only the main process writes: run.yaml, metrics.jsonl and spectra.jsonl, checkpoints, the adapter, the tokenizer.
  The others wait at a barrier where files are written, so no process reads a checkpoint that is half there.
- Only the main process tells listeners: the CLI's progress bar and the window see one run, not one per process.
- What the processes must agree on is decided once and shared: the run folder (its name holds the time, which
  differs between processes by a second at the wrong moment), a stop or a pause (all stop after the same step, or
  the ones still stepping would wait forever for the others).
- Under FSDP (sharding.py) each process holds a slice of the model and every forward gathers weights from all of
  them: what one process runs, all run (validation and generation the same number of batches, `rounds`), and what
  needs whole adapter weights (saving, checkpoints, spectra) gathers them in a step every process joins.
- A caller outside the processes (the CLI's `--gpus`, the window) asks for a stop or a pause by writing the run
  folder's control file; the main process reads it between steps and the request reaches every process with the
  step's metrics.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from studio.core.files import write_atomic

CONTROL_FILE = "control"  # in the run folder: "stop" or "pause", written by the caller that launched the processes
# in the processes' environment: the accelerate config file of the person's own they were launched with, which the
# checkpoints record so that a resume launches with it again
OWN_CONFIG_ENV = "LORA_STUDIO_ACCELERATE_CONFIG"
REQUESTS = ("stop", "pause")


class Processes:
    """One process's view of the group (a single process is a group of one)."""

    def __init__(self, accelerator: Any) -> None:
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process
        # FSDP (sharding.py): each process holds a slice of the model, and every forward is a collective
        self.sharded = accelerator.distributed_type == DistributedType.FSDP

    def agree(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def gather(self, values: Any) -> Any:
        """Every process's row of numbers (a 1-D tensor on this process's device) as the rows of one tensor on the
        device: one collective, queued without waiting for it."""
        return values.unsqueeze(0) if self.world == 1 else self.accelerator.gather(values.unsqueeze(0))

    def gather_objects(self, items: Sequence[Any]) -> list[Any]:
        """Every process's items, concatenated in process order (on every process)."""
        if self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    def rounds(self, items: int, batch_size: int) -> int:
        """Under FSDP, the batches every process runs over its `shard` of `items`: as many as the largest share
        needs, since each forward is a collective; 0 otherwise (each runs its own share's)."""
        return math.ceil(math.ceil(items / self.world) / batch_size) if self.sharded else 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's share of `items` (every world-th item from its rank on): shares differ by one at most."""
        return [items[i] for i in range(self.rank, len(items), self.world)]


def lost_a_peer(exc: BaseException, world: int) -> bool:
    """Whether `exc` is this process noticing that another process of the group is gone (killed, out of memory,
    failed on its own): gloo and NCCL report it as a broken connection or a failed collective."""
    if world == 1:
        return False
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return any(sign in text for sign in ("Connection reset by peer", "Connection closed by peer", "gloo", "NCCL"))


def read_request(run_dir: Path) -> str | None:
    """A stop or pause the launching caller asked for, or None."""
    try:
        text = (run_dir / CONTROL_FILE).read_text().strip()
    except OSError:
        return None
    return text if text in REQUESTS else None


def write_request(run_dir: Path, request: str) -> None:
    """Ask the processes of the run in `run_dir` to stop (with a checkpoint) or pause after the current step."""
    if request not in REQUESTS:
        raise ValueError(f"unknown request {request!r}")
    write_atomic(run_dir / CONTROL_FILE, request + "\n")


def clear_request(run_dir: Path) -> None:
    (run_dir / CONTROL_FILE).unlink(missing_ok=True)
