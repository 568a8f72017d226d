"""Train on several GPUs: `accelerate launch` starts one process per GPU, each running `lora-studio train` (or
`resume`) on the same run file; processes.py holds the rules they keep. The caller here (the CLI's `--gpus`, the
window's "GPUs: N") stays outside the processes and follows the run as if it ran in-process:

- the main process's CLI mirrors every event it hears into a file named by LORA_STUDIO_EVENTS, which this side
  reads as it grows and passes to `on_event` (the same events, the same progress bar and plots);
- a stop or pause asked of `control` becomes the run folder's control file, which the main process reads between
  steps;
- what the processes print goes to a log file; a run that ends without a result (a process killed, a launcher
  error) ends here in one line naming that log, instead of torchrun's wall of tracebacks.

With `model.device: cpu` the processes run on the CPU and talk over gloo: the same path, testable without GPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from studio.core import events as ev
from studio.core.errors import TrainingError
from studio.core.logs import state_dir
from studio.core.resources import resources_root
from studio.core.run_layout import is_run_folder
from studio.core.runconfig import RunConfig
from studio.core.train.checkpoints import latest_checkpoint, read_state
from studio.core.train.control import TrainControl
from studio.core.train.processes import OWN_CONFIG_ENV, write_request
from studio.core.train.run_folder import event_from

EVENTS_ENV = "LORA_STUDIO_EVENTS"  # set in the processes' environment: where the main one mirrors its events
POLL_S = 0.2
ACCELERATE_CONFIGS = ("ddp", "fsdp")  # resources/accelerate/<name>.yaml
SUPPORTED_TYPES = ("MULTI_GPU", "MULTI_CPU", "NO", "FSDP")  # accelerate's distributed_type values the engine follows
# torchrun's summary when a process fails: the first one to fail, and its exit code (negative: the signal)
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(?P<rank>\d+).*?exitcode\s*:\s*(?P<code>-?\d+)", re.DOTALL)


@dataclass(frozen=True)
class Launch:
    """How to start a run's processes. `processes` per machine; several machines meet at `main_address:port`
    (machine 0's address; the same command runs on each machine with its own `machine_rank`)."""

    processes: int
    machines: int = 1
    machine_rank: int = 0
    main_address: str = "127.0.0.1"
    main_port: int = 0  # 0: a free port on this machine (one machine only)
    config_file: str | None = None  # an accelerate config file (e.g. resources/accelerate/fsdp.yaml)


def accelerate_config(name: str) -> Path:
    """A shipped accelerate config by name (`ddp`, `fsdp`), or a config file the person wrote, checked: the engine
    follows DDP (one whole model per process) and FSDP version 2 (sharding.py); DeepSpeed shards the model in ways
    it does not save or score."""
    path = resources_root() / "accelerate" / f"{name}.yaml" if name in ACCELERATE_CONFIGS else Path(name)
    import yaml

    try:
        settings = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TrainingError(
            f"cannot read the accelerate config {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    kind = str((settings or {}).get("distributed_type", "NO")) if isinstance(settings, dict) else "?"
    if kind not in SUPPORTED_TYPES:
        raise TrainingError(f"{path} asks for {kind}: LoRA Studio trains on several GPUs with DDP "
                            f"(distributed_type MULTI_GPU) or FSDP (distributed_type FSDP, fsdp_version 2); "
                            f"{kind} is not supported")
    fsdp = settings.get("fsdp_config") or {}
    version = fsdp.get("fsdp_version", 1) if isinstance(fsdp, dict) else "?"
    if kind == "FSDP" and str(version) != "2":
        raise TrainingError(f"{path} asks for FSDP version {version}: LoRA Studio shards with FSDP version 2 "
                            "(set fsdp_config.fsdp_version: 2, as resources/accelerate/fsdp.yaml does)")
    return path


def as_trained(run_dir: str | Path) -> tuple[int, bool]:
    """(processes, sharded) as the run's latest checkpoint was trained; (1, False) without one. A resume told
    nothing else launches so: each process's share of the data depends on their number, and a sharded run's
    optimizer state is stored by parameter name."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return 1, False
    state = read_state(checkpoint)
    return state.processes, state.sharded


def config_as_trained(run_dir: str | Path, sharded: bool) -> tuple[str | None, str]:
    """The accelerate config a resume launches with: the file of the person's own that the run's latest checkpoint
    was launched with, while it is there, else the shipped one its sharding needs (`fsdp`, or None: the default);
    and what to say when that file is gone ("" otherwise)."""
    checkpoint = latest_checkpoint(run_dir)
    own = read_state(checkpoint).accelerate_config if checkpoint is not None else None
    shipped = "fsdp" if sharded else None
    if own is None or Path(own).is_file():
        return own or shipped, ""
    return shipped, f"the accelerate config the run was launched with, {own}, is gone: resuming with the shipped one"


def own_config(launch: Launch) -> str | None:
    """The launch's accelerate config file when it is the person's own (None for the shipped ones)."""
    shipped = launch.config_file is None or Path(launch.config_file).parent == resources_root() / "accelerate"
    return None if shipped else str(Path(launch.config_file).resolve())


def inside_a_launch() -> bool:
    """Whether this process is one that `accelerate launch` (or torchrun) started, the studio's or a person's own:
    it trains, and must never launch processes of its own."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ


def how_trained(processes: int | None, sharded: bool, config: str | None = None) -> str:
    """'on 2 processes with FSDP': the words for a launch that follows a run's checkpoint (`processes` None: left
    out; `config`: its accelerate config, named when it is a file of the person's own)."""
    words = [f"on {processes} process{'es' if processes != 1 else ''}"] if processes is not None else []
    words += ["with FSDP"] if sharded else []
    words += [f"under {config}"] if config and config not in ACCELERATE_CONFIGS else []
    return " ".join(words)


def command(launch: Launch, cli_args: Sequence[str]) -> list[str]:
    """The `accelerate launch` command line that runs `lora-studio CLI_ARGS` in every process."""
    if launch.processes < 1 or launch.machines < 1 or not 0 <= launch.machine_rank < launch.machines:
        raise TrainingError(f"cannot launch {launch.processes} process(es) on machine {launch.machine_rank} of "
                            f"{launch.machines}: give at least one process and machine")
    if inside_a_launch():
        raise TrainingError("this process was itself started by accelerate launch: run `lora-studio` without --gpus, "
                            "--nodes or --accelerate-config there (accelerate starts the processes)")
    port = launch.main_port or _free_port()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    several = launch.processes * launch.machines > 1  # accelerate refuses --multi_gpu for one process (--gpus 1)
    cmd += ["--config_file", launch.config_file] if launch.config_file else ["--multi_gpu"] if several else []
    cmd += ["--num_processes", str(launch.processes * launch.machines), "--num_machines", str(launch.machines),
            "--machine_rank", str(launch.machine_rank), "--main_process_ip", launch.main_address,
            "--main_process_port", str(port), "--dynamo_backend", "no"]
    if not launch.config_file:
        cmd += ["--mixed_precision", "no"]  # the run file's precision decides (the engine's Accelerator)
    return cmd + ["--module", "studio.cli", *cli_args]


def check_gpus(processes: int, device: str) -> None:
    """Refuse more GPU processes than this machine has GPUs (CPU processes, for device cpu, are not counted)."""
    import torch

    if device == "cpu":
        return
    found = torch.cuda.device_count()
    if processes > found:
        where = "this machine has no CUDA GPU" if not found else f"this machine has {found}"
        raise TrainingError(f"{processes} GPUs asked for, but {where}: lower --gpus, or set model.device: cpu to "
                            "try the multi-process path on the CPU")


def run(launch: Launch, cli_args: Sequence[str], run_dir: Path, on_event: Callable[[Any], None] | None = None,
        control: TrainControl | None = None) -> ev.Finished | ev.Failed:
    """Start the processes, follow their events until they end, and return the run's last event."""
    control = control or TrainControl()
    on_event = on_event or (lambda _e: None)
    folder = state_dir() / "launches"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{run_dir.name}-{uuid.uuid4().hex[:8]}"
    events_file, log_file = folder / f"{name}.jsonl", folder / f"{name}.log"
    env = {**os.environ, EVENTS_ENV: str(events_file)}
    env.pop(OWN_CONFIG_ENV, None)
    if own_config(launch):
        env[OWN_CONFIG_ENV] = own_config(launch)
    # torchrun otherwise sets 1 thread per process and says so on stderr
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, launch.processes))))
    with log_file.open("w") as log:
        # a session of their own: the terminal's Ctrl-C reaches this side, which asks for a clean stop
        process = subprocess.Popen(command(launch, cli_args), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    reader = _EventReader(events_file)
    ends: list[Any] = []  # the Finished or Failed events the main process reported

    def forward() -> None:
        for event in reader.new_events():
            on_event(event)
            if isinstance(event, (ev.Finished, ev.Failed)):
                ends.append(event)

    asked: set[str] = set()
    while process.poll() is None:
        forward()
        for request, wanted in (("stop", control.stop_requested), ("pause", control.pause_requested)):
            if wanted and request not in asked and run_dir.is_dir():
                write_request(run_dir, request)
                asked.add(request)
        time.sleep(POLL_S)
    forward()  # what came between the last look and the end
    last = ends[-1] if ends else None
    cause = _root_cause(log_file) if process.returncode else None
    if last is not None and _main_knows(cause):
        return last
    # no process could say how the run ended, or the main one only saw another go (killed, and torchrun stopped the
    # rest): say it here, in the run folder too, now that none of them writes to it any more
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    message = _reason(log_file, process.returncode)
    if checkpoint is not None:
        # a resume follows the checkpoint's processes, sharding and config file
        message += f"; resume it with `lora-studio resume {run_dir}`"
    step = read_state(checkpoint).step if checkpoint is not None else 0
    failed = ev.Failed(message, step, str(checkpoint) if checkpoint is not None else None)
    if is_run_folder(run_dir):
        recorder = ev.Recorder(run_dir, on_event)
        recorder(failed)
        recorder.close()
    else:
        on_event(failed)
    return failed


def train_on_processes(config: RunConfig, launch: Launch, on_event: Callable[[Any], None] | None = None,
                       control: TrainControl | None = None, *, run_dir: str | Path | None = None
                       ) -> ev.Finished | ev.Failed:
    """`engine.train(config)` on `launch.processes` processes: the run file they read is written first (beside
    the launch logs), and the run folder is decided here so that a stop can reach it."""
    from studio.core.runconfig import save
    from studio.core.train.engine import new_run_dir, with_absolute_paths

    config = with_absolute_paths(config)
    folder = Path(run_dir) if run_dir is not None else new_run_dir(config)
    run_file = state_dir() / "launches" / f"{folder.name}-{uuid.uuid4().hex[:8]}.yaml"
    save(config, run_file)
    return run(launch, ["train", str(run_file), "--run-dir", str(folder)], folder, on_event, control)


def resume_on_processes(run_dir: str | Path, launch: Launch, on_event: Callable[[Any], None] | None = None,
                        control: TrainControl | None = None, *, max_steps: int | None = None
                        ) -> ev.Finished | ev.Failed:
    """`engine.resume(run_dir)` on `launch.processes` processes."""
    steps = ["--max-steps", str(max_steps)] if max_steps is not None else []
    return run(launch, ["resume", str(run_dir), *steps], Path(run_dir), on_event, control)


def event_writer(path: str) -> Callable[[Any], None]:
    """What the main process's CLI adds to its listener: each event appended to `path` as one JSON line."""
    handle = Path(path).open("a", encoding="utf-8")

    def write(event: Any) -> None:
        handle.write(json.dumps(ev.to_record(event)) + "\n")
        handle.flush()

    return write


class _EventReader:
    """The complete lines added to a growing JSON-lines file since the last call, as events."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_events(self) -> list[Any]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        events = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                event = event_from(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            if event is not None:
                events.append(event)
        return events


def _reason(log_file: Path, returncode: int | None) -> str:
    """Why the processes ended without a result: the process torchrun found failed first, when that is not the main
    one (which then only saw it go), else the first one-line error a process printed (the CLI's `lora-studio: ...`),
    else where to look."""
    try:
        text = log_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    cause = _root_cause(log_file)
    said = next((line.split("lora-studio: ", 1)[1] for line in text.splitlines() if line.startswith("lora-studio: ")),
                None)
    if said and _main_knows(cause):
        return re.sub(r"^Failed at step \d+: ", "", said)  # the Failed event made here says the step again
    if cause is None:
        return f"the run's processes ended without a result (exit code {returncode}): see {log_file}"
    rank, code = cause
    if code >= 0:
        return f"process {rank} of the run failed (exit code {code}) and the others were stopped: see {log_file}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    why = " (the system does this when memory runs out)" if name == "SIGKILL" else ""
    return f"process {rank} of the run was ended by {name}{why} and the others were stopped"


def _main_knows(cause: tuple[int, int] | None) -> bool:
    """Whether the main process's own account of the end is the whole story: no process failed, the main one did,
    or another one refused in one line (exit code 2: bad input, which every process meets alike, whichever ends
    first)."""
    return cause is None or cause[0] == 0 or cause[1] == 2


def _root_cause(log_file: Path) -> tuple[int, int] | None:
    """(rank, exit code) of the process torchrun found failed first, from its summary in the log."""
    try:
        cause = ROOT_CAUSE.search(log_file.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    return (int(cause["rank"]), int(cause["code"])) if cause else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
