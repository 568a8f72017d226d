"""The training loop: a LoRA run on accelerate, reading top to bottom.

`train(config, on_event, control)` opens the model, wraps it with PEFT from the plan, prepares the data and
runs AdamW with warmup and a cosine/linear schedule (optimization.py). It reports everything as typed events
(events.py) and writes them to the run directory's metrics.jsonl as it goes. Between steps it honours stop and
pause requests from `control` (control.py); both leave a checkpoint (checkpoints.py) that `resume` continues
exactly (adapter weights, optimizer, scheduler, RNG states and the data position, which is a function of the step).

The defaults take a faster path to the same numbers: the causal-LM loss in chunks without the full logits, over
the tokens that carry loss only (losses.py, `fused_loss`); on a CUDA GPU, once a run is long enough to repay
compiling, torch.compile on each decoder layer (compilation.py, `compile_layers`); on a CUDA GPU too, gated MLPs'
LoRA outputs and SiLU·up in one kernel (fused_mlp.py, `fused_mlp_kernel`); on the CPU, LoRA's dropout masks drawn
sparsely (dropout.py). A step syncs the host once, to read its loss and norm, and does so a step late
(`_Reports`) so that the device does not wait for the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from studio.core import events as ev
from studio.core import run_layout
from studio.core.errors import DivergedError, StudioError, TrainingError, WriteError, first_line
from studio.core.files import atomic_folder, blocking_file, write_atomic, write_failure
from studio.core.run_layout import is_run_folder
from studio.core.runconfig import RunConfig, dump, load
from studio.core.train import optimization, sharding
from studio.core.train.batching import Batches, StepBatch
from studio.core.train.checkpoints import (
    RunState,
    latest_checkpoint,
    load_adapter_weights,
    load_checkpoint,
    read_state,
    save_checkpoint,
    set_aside,
)
from studio.core.train.control import TrainControl
from studio.core.train.failures import failure_line
from studio.core.train.preflight import check_run
from studio.core.train.processes import OWN_CONFIG_ENV, Processes, clear_request, lost_a_peer, read_request
from studio.core.train.resumption import HeldRecord, check_resume, resume_point
from studio.core.train.run_folder import remove_leftovers

EventCallback = Callable[[ev.Event], None]
SCORE_BATCH = 16  # validation examples generated (or classified) at once for the task score


def new_run_dir(config: RunConfig) -> Path:
    name = config.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{Path(config.model.source).stem or 'model'}"
    run_dir = Path(config.output_dir) / name
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = Path(config.output_dir) / f"{name}-{suffix}"
    return run_dir


def train(
    config: RunConfig,
    on_event: EventCallback | None = None,
    control: TrainControl | None = None,
    *,
    run_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    loaded: Any | None = None,
) -> ev.Finished | ev.Failed:
    """Run (or resume) a training run. Returns the final event; never raises for user-caused problems.

    `loaded`: an already opened LoadedModel to train; its `.model` becomes the PeftModel being trained (the base
    is wrapped in place, so pass a copy you do not need unadapted). By default the engine opens
    `config.model.source` itself. `resume_from`: a checkpoint folder (or a run folder: its latest checkpoint).
    """
    control = control or TrainControl()
    emit_to_caller = on_event or (lambda _e: None)
    try:
        procs = Processes(_accelerator(config))
    except (ValueError, RuntimeError) as exc:  # accelerate refuses a precision this machine lacks, and the like
        failed = ev.Failed(f"cannot start training here: {first_line(exc)}", 0)
        emit_to_caller(failed)
        return failed
    if not procs.is_main:
        emit_to_caller = lambda _e: None  # noqa: E731 - listeners hear the main process only
    checkpoint: Path | None = None
    emit: ev.Recorder | HeldRecord
    refused: str | None = None
    try:  # nothing below changes a file of an existing run; only the main process writes
        if resume_from is not None:
            run_dir, checkpoint = resume_point(Path(resume_from), Path(run_dir) if run_dir else None)
            start = check_resume(config, run_dir, checkpoint)
            if procs.is_main:
                remove_leftovers(run_dir)  # the hidden staging files a killed run left: the studio's, never a person's
            emit = HeldRecord(run_dir, emit_to_caller, start, config, write=procs.is_main)
        else:
            config = with_absolute_paths(config)
            run_dir = procs.agree(Path(run_dir).expanduser() if run_dir is not None else new_run_dir(config))
            if procs.is_main:
                _new_run_folder(config, run_dir)
            emit = ev.Recorder(run_dir, emit_to_caller, write=procs.is_main)
        if procs.is_main:
            clear_request(run_dir)
    except (StudioError, OSError) as exc:
        refused = (first_line(exc) if isinstance(exc, StudioError) else
                   f"cannot write the run folder {run_dir}: {write_failure(exc)}")
    refused = procs.agree(refused)  # a refusal the main process met stops every process, not only itself
    if refused is not None:
        failed = ev.Failed(refused, 0)
        emit_to_caller(failed)
        return failed
    procs.barrier()

    state = RunState()
    try:
        check_run(config, model=loaded is None)  # before seconds of loading: a run that cannot work stops here
        with contextlib.ExitStack() as undo:  # what the run changed in the caller's model, undone on every exit
            run = _setup(config, procs, emit, run_dir, checkpoint, loaded, state, undo)  # type: ignore[arg-type]
            if isinstance(emit, HeldRecord):
                emit.commit()
            return _loop(run, emit, control)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - failures.py: a person's problem in one line, a bug with its traceback
        if isinstance(exc, DivergedError) and config.training.precision != "fp16" and procs.is_main:
            _set_aside_diverged(run_dir, state.step)
        if lost_a_peer(exc, procs.world):
            return _fail(emit, f"another process of this run stopped unexpectedly (killed, out of memory, or an error "
                         f"of its own: see its output), so process {procs.rank} stopped too at step {state.step}",
                         state, run_dir)
        log = run_dir / (run_layout.ERROR_LOG if procs.is_main else f"error-{procs.rank}.log")  # each its own
        return _fail(emit, failure_line(exc, state.step, config, run_dir, log=log), state, run_dir)
    finally:
        emit.close()


def _accelerator(config: RunConfig) -> Any:
    """accelerate's Accelerator for this run: the device (auto: a CUDA GPU when there is one), mixed precision
    (auto: bf16 where the GPU has it), and under `accelerate launch` the process group it joins."""
    import torch
    from accelerate import Accelerator

    device = config.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = config.training.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not device.startswith("cuda"))
    if sharding.requested():
        sharding.enable_on_cpu(accelerator)
    return accelerator


def _check_sharding(config: RunConfig, accelerator: Any) -> None:
    """Refuse, before the model loads, what the engine does not train under FSDP."""
    if config.model.quantization:
        raise TrainingError("FSDP does not shard a 4-bit or 8-bit base here: train it on several GPUs with DDP "
                            "(--gpus N), or shard the 16-bit base")
    reason = sharding.configure(accelerator)
    if reason:
        raise TrainingError(reason)


def _check_same_processes(saved: RunState, procs: Processes) -> None:
    """A run resumes on as many processes as it was trained on (each one's share of the data depends on their
    number), sharded if it was (the optimizer state is stored differently)."""
    if saved.processes != procs.world:
        raise TrainingError(
            f"this run was trained on {saved.processes} process(es) and is resumed on {procs.world}: resume it "
            f"on {saved.processes} (leave --gpus out, or --gpus {saved.processes}), since each process's share of the "
            "data depends on it")
    if saved.sharded != procs.sharded:
        raise TrainingError("this run was trained with FSDP: resume it with FSDP (leave --accelerate-config out, or "
                            "--accelerate-config fsdp)" if saved.sharded
                            else "this run was trained without FSDP: resume it without an FSDP accelerate config")


def _new_run_folder(config: RunConfig, run_dir: Path) -> None:
    """A new run's folder with its run.yaml: `run_dir` only when it is new or empty (never an existing run, whose
    metrics and checkpoints a second run would mix with its own)."""
    if is_run_folder(run_dir):
        raise WriteError(f"{run_dir} holds a run already: resume it (lora-studio resume {run_dir}) or choose a "
                         "new run folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise WriteError(f"{run_dir} is not empty: choose a new or empty folder for the run")
    blocker = blocking_file(run_dir)
    if blocker is not None:  # said of the folder the person named, as train() says any other failure to make it
        raise WriteError(f"cannot write the run folder {run_dir}: {blocker} is a file, not a folder")
    write_atomic(run_dir / run_layout.RUN_FILE, dump(config))


def _set_aside_diverged(run_dir: Path, step: int) -> None:
    """The loss became NaN in the step after `step`: a checkpoint of `step` holds the weights that made it so."""
    newest = latest_checkpoint(run_dir)
    if newest is not None and newest.name == run_layout.checkpoint_name(step):
        with contextlib.suppress(OSError):  # not renamed: Resume would meet the NaN again and say so
            set_aside(newest)


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """run.yaml must work from anywhere: store the data files' absolute paths (a hub dataset id stays as it is)."""
    from studio.core.data.tables import absolute_source

    data = dict(config.data)
    for key in ("train_path", "val_path"):
        if data.get(key):
            data[key] = absolute_source(str(data[key]))
    return dataclasses.replace(config, data=data, output_dir=str(Path(config.output_dir).resolve()))


def _fail(emit: EventCallback, message: str, state: RunState, run_dir: Path) -> ev.Failed:
    last = latest_checkpoint(run_dir)
    failed = ev.Failed(message.splitlines()[0], state.step, str(last) if last else None)
    emit(failed)
    return failed


@dataclass
class _Run:
    """What the loop works with, set up once by `_setup`."""

    config: RunConfig
    run_dir: Path
    state: RunState
    procs: Processes
    accelerator: Any
    model: Any  # what forward and backward go through: the PeftModel, or a losses.ChunkedLoss around it, as accelerate
    # prepared it (in DDP under several processes; under FSDP the PeftModel itself, sharded in place)
    trainable: Any  # the PeftModel itself: saved, evaluated, measured
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]
    prepared: Any  # data.dataset.PreparedData
    batches: Batches
    fused: bool  # the chunked loss (losses.py) instead of the model's own
    compile: Any  # compilation.CompilePolicy
    attention: Any  # attention.TrainingAttention
    pad_id: int
    is_lm: bool

    @property
    def is_cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"


def _setup(config: RunConfig, procs: Processes, emit: ev.Recorder, run_dir: Path, checkpoint: Path | None,
           loaded: Any | None, state: RunState, undo: contextlib.ExitStack) -> _Run:
    """Open the model, wrap it with PEFT, prepare the data, the optimizer and the fast path; load the checkpoint."""
    from peft import get_peft_model

    from studio.core.adapters.folder import plan_of_adapter
    from studio.core.data import dataset as datamod
    from studio.core.data import epochs
    from studio.core.model import inventory
    from studio.core.model.loading import open_model, require_weights
    from studio.core.model.plan import LoraPlan, count, to_peft_config, validate
    from studio.core.train import compilation, losses, optimization

    t = config.training
    accelerator = procs.accelerator
    device, precision = accelerator.device.type, accelerator.mixed_precision
    _seed_everything(t.seed)  # the same on every process: the same dropout masks, as HF Trainer's default
    if procs.sharded:
        _check_sharding(config, accelerator)

    # -- model and plan
    if loaded is None:
        emit(ev.LogMessage(f"Opening {config.model.source}"))
        # a sharded base is read into host memory and each process moves only its slice to its GPU (fully_shard)
        dtype = config.model.dtype or ("bfloat16" if procs.sharded and device == "cuda" else None)
        loaded = open_model(
            config.model.source, task=config.model.task, num_labels=config.model.num_labels,  # type: ignore[arg-type]
            dtype=dtype, device="cpu" if procs.sharded else str(accelerator.device),  # type: ignore[arg-type]
            quantization=config.model.quantization, trust_remote_code=config.model.trust_remote_code,
        )
    require_weights(loaded, "train it")
    tree = inventory.build(loaded.model, config.model.task)
    if config.model.adapter:
        plan = plan_of_adapter(tree, config.model.adapter)
    else:
        plan_fields = dict(config.plan)
        plan_fields["targets"] = tuple(inventory.select(tree, plan_fields["targets"]))
        plan = LoraPlan.from_dict(plan_fields)
    validate(tree, plan)
    counts = count(tree, plan)
    model = loaded.model
    # A 4/8-bit base needs nothing more than a 16-bit one (get_peft_model freezes the base). PEFT's
    # prepare_model_for_kbit_training is not called: it casts every unquantized weight (embeddings, norms) to
    # float32, so the whole residual stream ran in float32, slower than HF Trainer + PEFT (which skips it too).
    if t.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x renamed it; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    if config.model.adapter:
        from studio.core.adapters.loading import load_adapter

        peft_model = load_adapter(loaded, config.model.adapter, trainable=True)
    else:
        peft_model = get_peft_model(model, to_peft_config(plan, tree))
    loaded.model = peft_model  # the caller's LoadedModel now holds the trained adapter model
    if device == "cpu":  # torch draws dropout masks serially there (dropout.py): the same law, drawn sparsely
        from studio.core.train.dropout import use_sparse_dropout

        undo.callback(use_sparse_dropout(peft_model))
    if precision in ("bf16", "fp16") and plan.variant != "dora":
        # under autocast an adapter reads its input as it is: PEFT would cast it to the adapter's float32 and
        # autocast back (the same values), a copy per adapter kept for backward (DoRA's math depends on the cast)
        undo.enter_context(_adapter_inputs_uncast(peft_model))

    # -- data
    tokenizer = loaded.tokenizer
    prepared = datamod.prepare(datamod.DataSpec.from_dict(config.data), tokenizer)
    for bad in prepared.bad_rows[:20]:
        emit(ev.LogMessage(f"skipped {bad.file} row {bad.row}: {bad.reason}", "warning"))
    if not prepared.train:
        raise TrainingError("the training set is empty after formatting: check the file and the column mapping")
    # a run given in epochs becomes steps now that the data is known; from here on the run counts in steps
    steps = epochs.schedule(t, len(prepared.train), procs.world)
    t = dataclasses.replace(t, max_steps=steps.total_steps, epochs=None, eval_every=steps.eval_every,
                            eval_every_epochs=None, save_every=steps.save_every, save_every_epochs=None)
    config = dataclasses.replace(config, training=t)
    start = read_state(checkpoint).step if checkpoint is not None else 0
    if start >= t.max_steps:
        raise TrainingError(f"the latest checkpoint of {run_dir} is at step {start}: {t.max_steps} steps "
                            f"({steps.epochs:g} epochs) train nothing more")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    is_lm = prepared.format != "classification"

    packed = prepared.train.piece_starts is not None
    batches = Batches(prepared.train, lambda examples: datamod.collate(examples, pad_id), batch_size=t.batch_size,
                      accumulation=t.gradient_accumulation, world=accelerator.num_processes,
                      rank=accelerator.process_index, seed=t.seed, is_lm=is_lm,
                      lengths=prepared.train.lengths if t.group_by_length and not packed else None)
    # the chunked loss (losses.py) replaces the model's own where it gives the same: checked on one row first. Under
    # FSDP the head's weight is a slice outside the model's forward, so sharded runs keep the model's loss.
    fused = is_lm and not procs.sharded and _fused_loss_on(t.fused_loss, peft_model, precision, emit)
    if fused:
        row = {k: v[:1].to(accelerator.device) for k, v in batches.for_step(start).micro[0].items()}
        labels = row.pop("labels")
        if not losses.matches_model(peft_model, row, labels, accelerator.autocast):
            emit(ev.LogMessage("the chunked loss differs from this model's own: using the model's loss", "warning"))
            fused = False
    if fused:
        emit(ev.LogMessage("loss: in chunks over the positions that carry one, without the full logits (fused_loss)"))
    if t.shared_adapter_input and not procs.sharded:  # sharded weights are gathered per module: not stacked
        _share_adapter_inputs(peft_model, batches.for_step(start).micro[0], accelerator, is_lm, undo, emit)
        if t.fused_mlp_kernel and accelerator.device.type == "cuda":
            _fuse_gated_mlps(peft_model, accelerator, undo, emit)

    # -- optimizer and schedule
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = optimization.build_optimizer(params, t, device)
    scheduler = optimization.build_scheduler(optimizer, t)
    if checkpoint is not None:
        _check_same_processes(read_state(checkpoint), procs)
        load_adapter_weights(checkpoint, peft_model)  # before prepare: a sharded model keeps its slice of them
    # DDP arms the gradients' all-reduce in its forward, so under several processes it wraps the chunked loss; one
    # process prepares the PeftModel as ever (accelerate checks a quantized base's device on it) and then wraps it
    chunked_in_ddp = fused and procs.world > 1
    to_prepare = losses.ChunkedLoss(peft_model) if chunked_in_ddp else peft_model
    wrapped, optimizer, scheduler = accelerator.prepare(to_prepare, optimizer, scheduler)
    trained = losses.ChunkedLoss(wrapped) if fused and not chunked_in_ddp else wrapped
    if procs.sharded:
        from torch.distributed.fsdp import register_fsdp_forward_method

        # fully_shard replaced the parameters with slices (DTensors); accelerate clips a sharded model's gradients
        # when given all of its parameters (the frozen ones have none)
        params = list(wrapped.parameters())
        register_fsdp_forward_method(wrapped, "generate")  # generation gathers the weights as forward does
    if checkpoint is not None:
        load_checkpoint(checkpoint, wrapped, optimizer, scheduler, state)
    state.processes, state.sharded = procs.world, procs.sharded
    state.accelerate_config = os.environ.get(OWN_CONFIG_ENV) if procs.world > 1 else None
    emit(ev.RunStarted(
        run_dir=str(run_dir), model=loaded.display_name, device=str(accelerator.device), plan=plan.to_dict(),
        counts=counts.to_dict(), train_examples=len(prepared.train), val_examples=len(prepared.val),
        total_steps=t.max_steps, start_step=state.step, processes=procs.world,
    ))
    if checkpoint is not None:
        emit(ev.Resumed(state.step))

    # -- the rest of the fast path: attention kernels, compiled decoder layers; both leave the math as it was
    is_cuda = accelerator.device.type == "cuda"
    # under FSDP the attention kernels' trial step is skipped (a kernel failing inside a sharded forward would leave
    # its layer gathered) and the layers stay eager (compiling fully_shard's hooks is not tested here)
    attention_setting = t.attention if is_lm and not procs.sharded else "sdpa"
    training_attention = _training_attention(attention_setting, peft_model, batches.for_step(state.step),
                                             accelerator, is_cuda, packed=packed, emit=emit)
    undo.callback(training_attention.restore)
    if procs.sharded:
        asked = t.attention not in ("auto", "sdpa") or t.compile_layers is True
        held, whole = sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)
        emit(ev.LogMessage(f"FSDP: each of the {procs.world} processes holds a slice of every weight (the main one "
                           f"{held:,} of {whole:,} parameters); SDPA attention and eager decoder layers (attention "
                           "and compile_layers are set aside)", "warning" if asked else "info"))
    compile_policy = compilation.CompilePolicy(
        False if procs.sharded else t.compile_layers, peft_model, is_cuda=is_cuda,
        checkpointing=t.gradient_checkpointing, undo=undo, log=lambda text, level: emit(ev.LogMessage(text, level)))
    return _Run(config, run_dir, state, procs, accelerator, trained, peft_model, tokenizer, optimizer, scheduler,
                params, prepared, batches, fused, compile_policy, training_attention, pad_id, is_lm)


def _loop(run: _Run, emit: ev.Recorder, control: TrainControl) -> ev.Finished | ev.Failed:
    """The optimizer steps, top to bottom: control, batch, forward/backward, clip, step, then the host reads the
    previous step's numbers (`_Reports`) while the device runs this one."""
    t, state, procs = run.config.training, run.state, run.procs
    prefetched: dict[int, StepBatch] = {}
    spectrum_next = state.step
    reports = _Reports(run, emit)
    run.model.train()  # once: it walks every module (3 ms a call for the 1B shape here); evaluation restores it
    try:
        while state.step < t.max_steps:
            stop, pause = reports.agreed if procs.world > 1 else (control.stop_requested, control.pause_requested)
            if stop:
                reports.settle()
                return _finish(run, emit, stopped=True)
            if pause and procs.world > 1:  # processes cannot wait in place: a pause ends them with a checkpoint
                reports.settle()
                emit(ev.LogMessage("paused: the run's processes end with a checkpoint; Resume continues it"))
                return _finish(run, emit, stopped=True)
            if pause:
                reports.settle()
                path = _save_checkpoint(run)
                emit(ev.CheckpointSaved(state.step, str(path)))
                emit(ev.Paused(state.step, str(path)))
                control.wait_while_paused()
                if not control.stop_requested:
                    emit(ev.Resumed(state.step))
                reports.restart_clock()
                continue
            prefetched = _step(run, reports, control, prefetched)
            spectra = t.spectrum_every and state.step >= spectrum_next
            evaluate = t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps
            save = t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps
            if not (spectra or evaluate or save):
                reports.read()
                continue
            reports.settle()  # each of these follows its step's report, and no checkpoint holds a diverged step
            if spectra:
                _emit_spectra(run, emit)
                spectrum_next = state.step + t.spectrum_every
            if evaluate:
                with run.compile.eager(), run.attention.plain():
                    _evaluate(run, emit)
            if save:
                emit(ev.CheckpointSaved(state.step, str(_save_checkpoint(run))))
            reports.restart_clock()
    except Exception as exc:
        if not isinstance(exc, DivergedError):  # the steps the device finished before the failure are reported
            with contextlib.suppress(Exception):
                reports.settle()
        raise

    reports.settle()
    if run.prepared.val:
        with run.compile.eager(), run.attention.plain():
            _evaluate(run, emit)
    if t.spectrum_every:
        _emit_spectra(run, emit)
    return _finish(run, emit, stopped=False)


def _step(run: _Run, reports: _Reports, control: TrainControl, prefetched: dict[int, StepBatch]
          ) -> dict[int, StepBatch]:
    """One optimizer step queued on the device (its report too); returns the next step's batch, already on its way."""
    t, state = run.config.training, run.state
    run.compile.before_step(t.max_steps - state.step)
    if run.is_cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(run.accelerator.device)
    batch = prefetched.pop(state.step, None) or _on_device(run, run.batches.for_step(state.step))
    try:
        micro_losses = _forward_backward(run, batch)
    except Exception as exc:
        if not run.compile.fall_back(exc):
            raise
        run.optimizer.zero_grad(set_to_none=True)  # the step again, eager
        micro_losses = _forward_backward(run, batch)
    grad_norm = optimization.clip_gradients(run.accelerator, run.params, t.max_grad_norm)
    if state.step + 1 < t.max_steps:  # the host prepares the next step while the GPU finishes this one
        prefetched = {state.step + 1: _on_device(run, run.batches.for_step(state.step + 1))}
    rows = reports.gather(batch, micro_losses, grad_norm, control)  # before the step, which it may skip
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    reports.queue(rows)
    return prefetched


@dataclass
class _Queued:
    """A step on its way through the device: what the host reads once the device is done with it."""

    step: int
    rows: Any  # every process's [loss, gradient norm, tokens, positions, peak memory, stop, pause], in host memory
    copied: Any  # the CUDA event after which `rows` holds them (None off CUDA)
    lr: float
    epoch: int
    queued_at: float  # when the host had queued the step's work (off CUDA: done it)


def _reads_late(run: _Run) -> bool:
    """Whether the host reads a step's numbers only after queueing the next: on CUDA, where the device runs behind
    the host. Off CUDA a step's work is done when it is queued, and reading late would only show each step later."""
    return run.is_cuda


class _Reports:
    """Each step's numbers (loss, gradient norm, tokens, peak memory, stop and pause requests) as the host reads them:
    one host sync (and, on several processes, one collective) a step. Where the optimizer can skip a step on the
    device (torch's fused AdamW with `found_inf`), a diverged step is skipped there, and so are the steps queued
    after it, which keeps the last good weights until the host reads it and ends the run. On a GPU the host then
    reads a step's numbers only after queueing the next step (`_reads_late`): reading waits for the device, which
    then runs queued work instead of idling while the host queues it (on an H200 that idling took 31 ms of a
    compiled Llama-3-8B-shape step of 509 ms, bench/bench_engine.py). Every checkpoint, evaluation and spectrum
    follows `settle`.
    A step's time runs from the end of the step before to the end of its own: when the host's wait for the device
    returns, or, where the device was done when the host came to read (on a GPU that keeps up with the host), when
    the host had queued it. A clock read as a late report arrives would give a step the next one's time there, and
    the last step next to none."""

    def __init__(self, run: _Run, emit: ev.Recorder) -> None:
        self.run, self.emit = run, emit
        # fp16's GradScaler decides the optimizer's skipping itself
        self.skips = optimization.skips_on_device(run.optimizer) and run.accelerator.scaler is None
        self.lag = int(self.skips and _reads_late(run))
        self.queued: list[_Queued] = []
        self.agreed: tuple[bool, bool] = (False, False)  # (stop, pause), as all processes heard it with the last step
        self.restart_clock()

    def restart_clock(self) -> None:
        """Step times count from here: a checkpoint, evaluation or pause is no part of the next step's time."""
        self.clock = time.perf_counter()

    def gather(self, batch: StepBatch, micro_losses: list[Any], grad_norm: Any, control: TrainControl
               ) -> tuple[Any, Any]:
        """The step's rows from all processes, on their way to the host (and the CUDA event that says they are
        there); where the optimizer can, the step that follows is skipped on the device when the loss or the norm is
        not finite."""
        import torch

        run = self.run
        request = read_request(run.run_dir) if run.procs.world > 1 and run.procs.is_main else None
        peak = torch.cuda.max_memory_allocated(run.accelerator.device) if run.is_cuda else 0
        numbers = torch.tensor([batch.tokens, batch.positions, peak, control.stop_requested or request == "stop",
                                control.pause_requested or request == "pause"], dtype=torch.float64)
        row = torch.stack([torch.stack(micro_losses).double().sum(), grad_norm.double()])
        row = torch.cat([row, (numbers.pin_memory() if run.is_cuda else numbers).to(row.device, non_blocking=True)])
        rows = run.procs.gather(row)
        if self.skips:  # the processes' summed losses and the norm (the same on all): when not finite, this step and
            # every later one (the run ends when the host reads it) are skipped
            optimization.skip_from_now_if(run.optimizer, ~torch.isfinite(rows[:, 0].sum() + rows[0, 1]))
        if not run.is_cuda:
            return rows, None
        # copied to (pinned) host memory right behind this step's work: a copy queued when the host reads would wait
        # for the next step's work too
        on_host, copied = rows.to("cpu", non_blocking=True), torch.cuda.Event()
        copied.record()
        return on_host, copied

    def queue(self, rows: tuple[Any, Any]) -> None:
        """The step just taken (after the scheduler's step: its report shows the learning rate the next step uses)."""
        state = self.run.state
        self.queued.append(_Queued(state.step, *rows, float(self.run.scheduler.get_last_lr()[0]),
                                   self.run.batches.epoch_at(state.step), time.perf_counter()))

    def read(self) -> None:
        """Report the queued steps but the last `lag`."""
        while len(self.queued) > self.lag:
            self._report(self.queued.pop(0))

    def settle(self) -> None:
        """Report every queued step."""
        while self.queued:
            self._report(self.queued.pop(0))

    def _report(self, queued: _Queued) -> None:
        run, state, t = self.run, self.run.state, self.run.config.training
        ended = queued.queued_at
        if queued.copied is not None and not queued.copied.query():
            queued.copied.synchronize()  # the sync: waits for the device to finish this step
            ended = time.perf_counter()
        rows = queued.rows.tolist()
        loss_sum = sum(r[0] for r in rows) / len(rows)  # each process's loss is scaled to the global token count
        grad_norm = rows[0][1]
        if not math.isfinite(loss_sum) or not math.isfinite(grad_norm):
            state.step = queued.step - 1  # the last good step, whose weights the skipped update left in place
            raise DivergedError(
                f"the loss became {'NaN' if loss_sum != loss_sum else 'infinite'} at step {queued.step}: "
                f"lower the learning rate (now {t.learning_rate:g}) or use precision bf16 instead of fp16"
            )
        tokens, positions = int(sum(r[2] for r in rows)), int(sum(r[3] for r in rows))
        self.agreed = (any(r[5] for r in rows), any(r[6] for r in rows))
        step_time, self.clock = ended - self.clock, ended
        run.compile.after_step(step_time)
        state.tokens_seen += tokens
        state.elapsed_s += step_time
        state.last_loss = loss_sum
        self.emit(ev.StepMetrics(
            step=queued.step, total_steps=t.max_steps, epoch=queued.epoch, loss=loss_sum, lr=queued.lr,
            grad_norm=grad_norm, tokens_per_s=tokens / step_time if step_time > 0 else 0.0,
            tokens_seen=state.tokens_seen, elapsed_s=state.elapsed_s,
            eta_s=state.elapsed_s / queued.step * (t.max_steps - queued.step),
            gpu_mem_bytes=int(max(r[4] for r in rows)) if run.is_cuda else None,
            gpu_mem_per_device=tuple(int(r[4]) for r in rows) if run.is_cuda and run.procs.world > 1 else None,
            token_efficiency=tokens / positions if positions else None,
        ))


def _emit_spectra(run: _Run, emit: ev.Recorder) -> None:
    """The adapter's spectra, computed by the main process (every process holds the same adapter weights, or under
    FSDP a slice of each, gathered here by all)."""
    from studio.core.adapters import spectrum

    whole = sharding.full_trainable_state(run.model) if run.procs.sharded else None
    if run.procs.is_main:
        emit(ev.SpectrumSnapshot(run.state.step, spectrum.compute_spectra(run.trainable, whole=whole)))


def _on_device(run: _Run, batch: StepBatch) -> StepBatch:
    """The step's micro-batches copied to the device without blocking the host (losses.to_device)."""
    from studio.core.train import losses

    return replace(batch, micro=[losses.to_device(b, run.accelerator.device, run.fused, run.attention.name)
                                 for b in batch.micro])


def _forward_backward(run: _Run, batch: StepBatch) -> list[Any]:
    """Every micro-batch's forward and backward (gradients accumulate); their losses, still on the device."""
    from studio.core.train import losses

    micro_losses = []
    for i, micro in enumerate(batch.micro):
        last = i == len(batch.micro) - 1
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.model):
            with run.accelerator.autocast():
                loss = losses.step_loss(run.model, micro, batch.label_tokens, len(batch.micro), run.is_lm,
                                        compiled=run.compile.active)
            run.accelerator.backward(loss)
        micro_losses.append(loss.detach())
    return micro_losses


def _save_checkpoint(run: _Run) -> Path:
    """The main process writes the checkpoint (every process holds the same adapter and optimizer state, or under
    FSDP a slice of each, gathered here by all); the others wait until it is complete."""
    path = run.run_dir / run_layout.CHECKPOINTS / run_layout.checkpoint_name(run.state.step)
    weights = sharding.full_trainable_state(run.model) if run.procs.sharded else None
    optimizer_state = sharding.full_optimizer_state(run.model, run.optimizer) if run.procs.sharded else None
    if run.procs.is_main:
        path = save_checkpoint(run.run_dir, run.trainable, run.optimizer, run.scheduler, run.state,
                               run.config.training.keep_checkpoints, run.config, adapter_weights=weights,
                               optimizer_state=optimizer_state)
    run.procs.barrier()
    return path


def _fused_loss_on(setting: bool | str, model: Any, precision: str, emit: ev.Recorder) -> bool:
    """auto: for models whose head the chunked loss reproduces (losses.blocker), on a GPU and on the CPU alike (the
    head runs only where a token carries loss: on the built-in demo's prompts and answers the CPU steps 25% faster)."""
    from studio.core.train import losses

    if setting is False:
        return False
    # fp16 scales the loss; the gradient the chunked loss computes ahead of backward would underflow unscaled
    reason = "fp16 needs the loss scale before the gradient" if precision == "fp16" else losses.blocker(model)
    if reason and setting is True:
        emit(ev.LogMessage(f"fused_loss is off for this run: {reason}", "warning"))
    return reason is None


def _training_attention(setting: str, model: Any, first: StepBatch, accelerator: Any, is_cuda: bool, *, packed: bool,
                        emit: ev.Recorder) -> Any:
    """The attention the training steps run with (attention.py): the first candidate that passes its check on a
    packed row of the first batch; SDPA when none does."""
    from studio.core.train import attention

    names = attention.candidates(setting, is_cuda=is_cuda, packed=packed)
    if setting not in ("auto", names[0]):
        emit(ev.LogMessage(f"attention {setting} is off for this run: {attention.available(setting, is_cuda=is_cuda)}",
                           "warning"))
    chosen = attention.SDPA
    if len(names) > 1:
        import torch

        micro = first.micro[0]
        ids = micro["input_ids"][:1]
        positions = micro["position_ids"][:1] if "position_ids" in micro else torch.arange(ids.shape[1])[None]
        row = {"input_ids": ids.to(accelerator.device), "position_ids": positions.to(accelerator.device)}
        labels = micro["labels"][:1].to(accelerator.device)
        for name in names[:-1]:
            why_not = attention.check(model, name, row, labels, accelerator.autocast)
            if why_not is None:
                chosen = name
                break
            emit(ev.LogMessage(f"attention {name} is off for this run: {why_not}",
                               "warning" if setting == name else "info"))
    if chosen == attention.CAUSAL:
        emit(ev.LogMessage("attention: SDPA, causal, no mask built (unpacked rows, padding on the right)"))
    elif chosen != attention.SDPA:
        emit(ev.LogMessage(f"attention: {chosen} (packed rows without a dense mask)"))
    return attention.TrainingAttention(model, chosen)


def _adapter_inputs_uncast(model: Any) -> contextlib.AbstractContextManager:
    """PEFT's switch for its adapters' input casting (peft.helpers; a no-op where this PEFT lacks it)."""
    from peft import helpers

    switch = getattr(helpers, "disable_input_dtype_casting", None)
    return switch(model) if switch is not None else contextlib.nullcontext()


def _share_adapter_inputs(model: Any, micro: dict[str, Any], accelerator: Any, is_lm: bool,
                          undo: contextlib.ExitStack, emit: ev.Recorder) -> None:
    """Adapters that read the same tensor compute their first product together (shared_input.py), found on one row
    of the first batch."""
    from studio.core.train import shared_input

    row: dict[str, Any] = {k: v[:1].to(accelerator.device) for k, v in micro.items()
                           if k in ("input_ids", "attention_mask", "position_ids")}
    if is_lm:  # with a cache, transformers would let packed examples attend to each other
        row["use_cache"] = False
    groups = shared_input.find_groups(model, row, accelerator.autocast)
    if groups:
        undo.callback(shared_input.Shared(groups).undo)
        smallest, largest = min(map(len, groups)), max(map(len, groups))
        sizes = str(smallest) if smallest == largest else f"{smallest}-{largest}"
        emit(ev.LogMessage(f"adapters sharing an input: {len(groups)} groups of {sizes}, one product each "
                           "(shared_adapter_input)"))


def _fuse_gated_mlps(model: Any, accelerator: Any, undo: contextlib.ExitStack, emit: ev.Recorder) -> None:
    """Gated MLPs whose gate and up adapters share an input run their LoRA outputs and SiLU·up as one kernel
    (fused_mlp.py), once the first of them gives its own forward's output through it."""
    from studio.core.train import fused_mlp

    mlps = fused_mlp.find_gated_mlps(model)
    if not mlps:
        return
    fused = fused_mlp.FusedMLPs(mlps)
    try:
        why_not = fused.check(accelerator.autocast)
    except Exception as exc:  # Triton missing or failing on this GPU: the MLPs keep their own forward
        why_not = first_line(exc)
    if why_not:
        fused.undo()
        emit(ev.LogMessage(f"gated MLPs: each runs its own forward ({why_not})"))
        return
    undo.callback(fused.undo)
    emit(ev.LogMessage(f"gated MLPs: {len(mlps)} compute their LoRA outputs and SiLU·up in one kernel "
                       "(fused_mlp_kernel)"))


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _evaluate(run: _Run, emit: ev.Recorder) -> None:
    """Validation loss (token-weighted over the whole split) and the task score on a bounded sample; several
    processes each take a share and the results are gathered."""
    from studio.core.data import dataset as datamod
    from studio.core.train import evaluation

    prepared, model, t, state, procs = run.prepared, run.trainable, run.config.training, run.state, run.procs
    if not prepared.val:
        return
    model.eval()
    total, weight = evaluation.validation_loss_sums(
        model, procs.shard(prepared.val), lambda examples: datamod.collate(examples, run.pad_id),
        batch_size=t.batch_size, device=run.accelerator.device, autocast=run.accelerator.autocast, is_lm=run.is_lm,
        rounds=procs.rounds(len(prepared.val), t.batch_size), filler=prepared.val[:1])
    totals = procs.gather_objects([(total, weight)])
    state.last_val_loss = sum(t_ for t_, _ in totals) / max(1, sum(w for _, w in totals))
    score = None
    if t.eval_examples:
        rounds = procs.rounds(min(t.eval_examples, len(prepared.val)), SCORE_BATCH)
        samples = evaluation.score_samples(model, run.tokenizer, prepared, limit=t.eval_examples, shard=procs.shard,
                                           batch_size=SCORE_BATCH, rounds=rounds)
        score = evaluation.summarise(prepared.format, procs.gather_objects(samples or [])) if samples is not None \
            else None
    if score is not None:
        state.last_score = score.score
    emit(ev.EvalMetrics(state.step, state.last_val_loss, score.score if score else None,
                        score.name if score else None))
    model.train()


def _finish(run: _Run, emit: ev.Recorder, *, stopped: bool) -> ev.Finished:
    from studio.core.adapters.saving import save_adapter

    state = run.state
    if stopped and state.step > 0:
        emit(ev.CheckpointSaved(state.step, str(_save_checkpoint(run))))
    adapter_dir = run.run_dir / run_layout.ADAPTER
    weights = sharding.full_trainable_state(run.model) if run.procs.sharded else None
    if run.procs.is_main:
        save_adapter(run.trainable, adapter_dir, base_model_spec=run.config.model.source, owned=True,
                     state_dict=weights)
        if run.tokenizer is not None:
            _save_tokenizer(run.tokenizer, run.run_dir / run_layout.TOKENIZER)
    run.procs.barrier()
    finished = ev.Finished(
        step=state.step, run_dir=str(run.run_dir), adapter_dir=str(adapter_dir), stopped_early=stopped,
        final_loss=state.last_loss, final_val_loss=state.last_val_loss, final_score=state.last_score,
    )
    emit(finished)
    return finished


TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                   "chat_template.*")


def _save_tokenizer(tokenizer: Any, target: Path) -> None:
    """Copy the tokenizer's own files when it was read from a folder: save_pretrained re-serialises the whole
    vocabulary while holding the interpreter (50-170 ms in which the window cannot repaint)."""
    source = Path(str(getattr(tokenizer, "name_or_path", "")))
    with atomic_folder(target, "tokenizer", owned=True) as staging:
        if not (source / "tokenizer_config.json").is_file():
            tokenizer.save_pretrained(str(staging))
        else:
            for path in (p for pattern in TOKENIZER_FILES for p in source.glob(pattern) if p.is_file()):
                shutil.copy2(path, staging / path.name)


def resume(run_dir: str | Path, on_event: EventCallback | None = None, control: TrainControl | None = None,
           *, max_steps: int | None = None) -> ev.Finished | ev.Failed:
    """Continue a run from its latest checkpoint (optionally with a new step budget)."""
    try:
        config = load(Path(run_dir) / run_layout.RUN_FILE)
    except StudioError as exc:
        failed = ev.Failed(first_line(exc), 0)
        (on_event or (lambda _e: None))(failed)
        return failed
    if max_steps is not None:  # a step budget replaces a length given in epochs
        config = replace(config, training=replace(config.training, max_steps=max_steps, epochs=None))
    return train(config, on_event, control, resume_from=run_dir)
