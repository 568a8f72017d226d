"""The training loop: a LoRA run on accelerate, reading top to bottom.

`train(config, on_event, control)` opens the model, wraps it with PEFT from the plan, prepares the data and
runs AdamW with warmup and a cosine/linear schedule (optimization.py). It reports everything as typed events
(events.py) and writes them to the run directory's metrics.jsonl as it goes. Between steps it honours stop and
pause requests from `control` (control.py); both leave a checkpoint (checkpoints.py) that `resume` continues
exactly (adapter weights, optimizer, scheduler, RNG states and the data position, which is a function of the step).

On a CUDA GPU the defaults take a faster path to the same numbers: the causal-LM loss in chunks without the full
logits (losses.py, `fused_loss`) and, once a run is long enough to repay compiling, torch.compile on each decoder
layer (compilation.py, `compile_layers`). A step syncs the host once, after backward, to read its loss and norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import random
import shutil
import time
import traceback
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from studio.core import events as ev
from studio.core.errors import StudioError, TrainingError, first_line
from studio.core.files import write_atomic
from studio.core.runconfig import RunConfig, dump, load
from studio.core.train.checkpoints import (
    RunState,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    truncate_metrics,
)
from studio.core.train.control import TrainControl

EventCallback = Callable[[ev.Event], None]


@dataclass
class _StepBatches:
    micro: list[dict[str, Any]]  # on the device
    label_tokens: int  # counted tokens over all micro-batches: the loss's divisor
    tokens: int


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
    if resume_from is not None:
        checkpoint = Path(resume_from)
        if (checkpoint / "run.yaml").is_file():
            run_dir = checkpoint
            checkpoint = latest_checkpoint(checkpoint)  # type: ignore[assignment]
            if checkpoint is None:
                failed = ev.Failed(f"{run_dir} has no checkpoint to resume from", 0)
                emit_to_caller(failed)
                return failed
        run_dir = Path(run_dir or checkpoint.parent.parent)
    else:
        config = _with_absolute_paths(config)
        run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
        checkpoint = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            write_atomic(run_dir / "run.yaml", dump(config))
        else:
            truncate_metrics(run_dir, read_state(checkpoint).step)
    except (OSError, StudioError) as exc:
        failed = ev.Failed(f"cannot write the run folder {run_dir}: {getattr(exc, 'strerror', None) or exc}", 0)
        emit_to_caller(failed)
        return failed

    emit = ev.Recorder(run_dir, emit_to_caller)
    state = RunState()
    try:
        with contextlib.ExitStack() as undo:  # what the run changed in the caller's model, undone on every exit
            return _run(config, emit, control, run_dir, checkpoint, loaded, state, undo)
    except TrainingError as exc:
        return _fail(emit, str(exc), state, run_dir)
    except StudioError as exc:
        return _fail(emit, str(exc), state, run_dir)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return _fail(emit, f"the disk is full ({exc.filename or run_dir}): free space, then resume", state, run_dir)
        return _fail(emit, f"cannot read or write {exc.filename or run_dir}: {exc.strerror or exc}", state, run_dir)
    except Exception as exc:  # noqa: BLE001 - a bug: keep the traceback in the run folder, tell the user where
        if _is_out_of_memory(exc):
            message = (f"out of GPU memory at step {state.step}: lower the batch size or the maximum length, turn "
                       "on gradient checkpointing, or load the base in 4-bit")
            return _fail(emit, message, state, run_dir)
        (run_dir / "error.log").write_text(traceback.format_exc())
        return _fail(emit, f"internal error ({type(exc).__name__}: {exc}); details in {run_dir / 'error.log'}",
                     state, run_dir)
    finally:
        emit.close()


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    """run.yaml must work from anywhere: store the data files' absolute paths."""
    data = dict(config.data)
    for key in ("train_path", "val_path"):
        if data.get(key):
            data[key] = str(Path(data[key]).expanduser().resolve())
    return dataclasses.replace(config, data=data, output_dir=str(Path(config.output_dir).resolve()))


def _fail(emit: ev.Recorder, message: str, state: RunState, run_dir: Path) -> ev.Failed:
    last = latest_checkpoint(run_dir)
    failed = ev.Failed(message.splitlines()[0], state.step, str(last) if last else None)
    emit(failed)
    return failed


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _run(
    config: RunConfig,
    emit: ev.Recorder,
    control: TrainControl,
    run_dir: Path,
    checkpoint: Path | None,
    loaded: Any | None,
    state: RunState,
    undo: contextlib.ExitStack,
) -> ev.Finished | ev.Failed:
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model, prepare_model_for_kbit_training

    from studio.core.adapters import spectrum
    from studio.core.adapters.folder import plan_of_adapter
    from studio.core.data import dataset as datamod
    from studio.core.model import inventory
    from studio.core.model.plan import LoraPlan, count, to_peft_config, validate
    from studio.core.train import compilation, losses, optimization

    t = config.training
    device = config.model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = t.precision
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=not device.startswith("cuda"))
    _seed_everything(t.seed)

    # -- model and plan
    from studio.core.model.loading import open_model, require_weights

    if loaded is None:
        emit(ev.LogMessage(f"Opening {config.model.source}"))
        loaded = open_model(
            config.model.source, task=config.model.task, num_labels=config.model.num_labels,  # type: ignore[arg-type]
            dtype=config.model.dtype, device=str(accelerator.device), quantization=config.model.quantization,  # type: ignore[arg-type]
            trust_remote_code=config.model.trust_remote_code,
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
    if loaded.quantization:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing)
    elif t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if config.model.adapter:
        from studio.core.adapters.loading import load_adapter

        peft_model = load_adapter(loaded, config.model.adapter, trainable=True)
    else:
        peft_model = get_peft_model(model, to_peft_config(plan, tree))
    loaded.model = peft_model  # the caller's LoadedModel now holds the trained adapter model

    # -- data
    tokenizer = loaded.tokenizer
    spec = datamod.DataSpec.from_dict(config.data)
    prepared = datamod.prepare(spec, tokenizer)
    for bad in prepared.bad_rows[:20]:
        emit(ev.LogMessage(f"skipped {bad.file} row {bad.row}: {bad.reason}", "warning"))
    if not prepared.train:
        raise TrainingError("the training set is empty after formatting: check the file and the column mapping")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- optimizer and schedule
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = optimization.build_optimizer(params, t, device)
    scheduler = optimization.build_scheduler(optimizer, t)
    peft_model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)

    if checkpoint is not None:
        load_checkpoint(checkpoint, accelerator.unwrap_model(peft_model), optimizer, scheduler, state)
    emit(ev.RunStarted(
        run_dir=str(run_dir), model=loaded.display_name, device=str(accelerator.device), plan=plan.to_dict(),
        counts=counts.to_dict(), train_examples=len(prepared.train), val_examples=len(prepared.val),
        total_steps=t.max_steps, start_step=state.step,
    ))
    if checkpoint is not None:
        emit(ev.Resumed(state.step))

    micro_per_step = t.gradient_accumulation
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = max(1, len(prepared.train) // (t.batch_size * world))
    trainable = accelerator.unwrap_model(peft_model)
    is_cuda = accelerator.device.type == "cuda"
    is_lm = prepared.format != "classification"

    def micro_batches(step: int) -> list[dict[str, Any]]:
        """The micro-batches of optimizer step `step`: a pure function of (seed, step), so resume is exact."""
        out = []
        for micro in range(micro_per_step):
            index = step * micro_per_step + micro
            epoch, position = divmod(index, batches_per_epoch)
            order = torch.randperm(len(prepared.train), generator=torch.Generator().manual_seed(t.seed + epoch))
            start = (position * world + rank) * t.batch_size
            picked = [prepared.train[int(i)] for i in order[start:start + t.batch_size]]
            out.append(datamod.collate(picked, pad_id))
        return out

    # -- the fast path: chunked loss (no full logits), compiled decoder layers; both leave the math as it was
    fused = is_lm and world == 1 and _fused_loss_on(t.fused_loss, trainable, is_cuda, precision, emit)
    if fused:  # one row, checked against the model's own loss before the first step
        row = {k: v[:1].to(accelerator.device) for k, v in micro_batches(state.step)[0].items()}
        labels = row.pop("labels")
        if not losses.matches_model(trainable, row, labels, accelerator.autocast):
            emit(ev.LogMessage("the chunked loss differs from this model's own: using the model's loss", "warning"))
            fused = False
    compile_when, why_not = compilation.when(t.compile_layers, is_cuda=is_cuda, quantized=bool(loaded.quantization),
                                             checkpointing=t.gradient_checkpointing)
    if why_not and t.compile_layers is True:
        emit(ev.LogMessage(f"compile_layers is off for this run: {why_not}", "warning"))
    compiled: list[Any] = []
    eager_times: list[float] = []  # `auto`'s probe

    def compile_layers() -> None:
        compiled.extend(compilation.compile_blocks(trainable))
        undo.callback(compilation.uncompile, compiled)
        emit(ev.LogMessage(f"compiling {len(compiled)} decoder layers: the next step takes longer, the rest less"))

    def step_batches(step: int) -> _StepBatches:
        """The step's micro-batches on the device (copied without blocking the host) and the counts they carry."""
        cpu = micro_batches(step)
        # the model shifts labels by one, so the first position of each row never counts
        label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in cpu) if is_lm else 0
        tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                     for b in cpu)  # packed batches carry position_ids instead of a mask
        moved = [losses.to_device(b, accelerator.device, fused) for b in cpu]
        return _StepBatches(moved, label_tokens, tokens)

    def forward_backward(batches: _StepBatches) -> list[Any]:
        """Every micro-batch's forward and backward (gradients accumulate); their losses, still on the device."""
        micro_losses = []
        for i, batch in enumerate(batches.micro):
            last = i == len(batches.micro) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(peft_model):
                with accelerator.autocast():
                    loss = losses.step_loss(peft_model, batch, batches.label_tokens, len(batches.micro), is_lm,
                                            compiled=bool(compiled))
                accelerator.backward(loss)
            micro_losses.append(loss.detach())
        return micro_losses

    if compile_when == "now":
        compile_layers()
    prefetched: dict[int, _StepBatches] = {}
    spectrum_next = state.step
    while state.step < t.max_steps:
        if control.stop_requested:
            return _finish(emit, trainable, tokenizer, run_dir, state, config, optimizer, scheduler, stopped=True)
        if control.pause_requested:
            path = save_checkpoint(run_dir, trainable, optimizer, scheduler, state, t.keep_checkpoints, config)
            emit(ev.CheckpointSaved(state.step, str(path)))
            emit(ev.Paused(state.step, str(path)))
            control.wait_while_paused()
            if not control.stop_requested:
                emit(ev.Resumed(state.step))
            continue
        if compile_when == "probe" and len(eager_times) == compilation.PROBE_STEPS + 1:
            compile_when = None
            if compilation.pays(sorted(eager_times[1:])[compilation.PROBE_STEPS // 2], t.max_steps - state.step):
                compile_layers()

        started = time.perf_counter()
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(accelerator.device)
        peft_model.train()
        batches = prefetched.pop(state.step, None) or step_batches(state.step)
        try:
            micro_losses = forward_backward(batches)
        except Exception as exc:
            if not compiled or not compilation.is_compile_failure(exc):
                raise
            # the compiler, not the run, failed (no C compiler, an unsupported op...): the step again, eager
            compilation.uncompile(compiled)
            compiled.clear()
            optimizer.zero_grad(set_to_none=True)
            emit(ev.LogMessage(f"compiling the decoder layers failed ({first_line(exc)}); training on without "
                               "compiling (set training.compile_layers: false to skip the attempt)", "warning"))
            micro_losses = forward_backward(batches)
        grad_norm = optimization.clip_gradients(accelerator, params, t.max_grad_norm)
        if state.step + 1 < t.max_steps:  # the host prepares the next step while the GPU finishes this one
            prefetched = {state.step + 1: step_batches(state.step + 1)}
        # the step's one host sync; float64 sums the micro-batch losses as Python floats did
        loss_sum, grad_norm = torch.stack([torch.stack(micro_losses).double().sum(), grad_norm.double()]).tolist()
        if not math.isfinite(loss_sum) or not math.isfinite(grad_norm):
            raise TrainingError(
                f"the loss became {'NaN' if loss_sum != loss_sum else 'infinite'} at step {state.step + 1}: "
                f"lower the learning rate (now {t.learning_rate:g}) or use precision bf16 instead of fp16"
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += batches.tokens * world
        step_time = time.perf_counter() - started
        if compile_when == "probe":
            eager_times.append(step_time)
        state.elapsed_s += step_time
        state.last_loss = loss_sum
        per_step = state.elapsed_s / state.step
        emit(ev.StepMetrics(
            step=state.step, total_steps=t.max_steps, epoch=state.step * micro_per_step / batches_per_epoch,
            loss=loss_sum, lr=float(scheduler.get_last_lr()[0]), grad_norm=grad_norm,
            tokens_per_s=batches.tokens * world / step_time if step_time > 0 else 0.0,
            tokens_seen=state.tokens_seen, elapsed_s=state.elapsed_s, eta_s=per_step * (t.max_steps - state.step),
            gpu_mem_bytes=int(torch.cuda.max_memory_allocated(accelerator.device)) if is_cuda else None,
        ))
        if t.spectrum_every and state.step >= spectrum_next:
            emit(ev.SpectrumSnapshot(state.step, spectrum.compute_spectra(trainable)))
            spectrum_next = state.step + t.spectrum_every
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.max_steps:
            with compilation.eager(compiled):
                _evaluate(emit, trainable, tokenizer, prepared, t, pad_id, state, accelerator)
        if t.save_every and state.step % t.save_every == 0 and state.step < t.max_steps:
            path = save_checkpoint(run_dir, trainable, optimizer, scheduler, state, t.keep_checkpoints, config)
            emit(ev.CheckpointSaved(state.step, str(path)))

    if prepared.val:
        with compilation.eager(compiled):
            _evaluate(emit, trainable, tokenizer, prepared, t, pad_id, state, accelerator)
    if t.spectrum_every:
        emit(ev.SpectrumSnapshot(state.step, spectrum.compute_spectra(trainable)))
    return _finish(emit, trainable, tokenizer, run_dir, state, config, optimizer, scheduler, stopped=False)


def _fused_loss_on(setting: bool | str, model: Any, is_cuda: bool, precision: str, emit: ev.Recorder) -> bool:
    """auto: on a CUDA GPU, for models whose head the chunked loss reproduces (losses.blocker)."""
    from studio.core.train import losses

    if setting is False or (setting == "auto" and not is_cuda):
        return False
    # fp16 scales the loss; the gradient the chunked loss computes ahead of backward would underflow unscaled
    reason = "fp16 needs the loss scale before the gradient" if precision == "fp16" else losses.blocker(model)
    if reason and setting is True:
        emit(ev.LogMessage(f"fused_loss is off for this run: {reason}", "warning"))
    return reason is None


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _evaluate(emit: ev.Recorder, model: Any, tokenizer: Any, prepared: Any, t: Any, pad_id: int,
              state: RunState, accelerator: Any) -> None:
    """Validation loss (token-weighted over the whole split) and the task score on a bounded sample."""
    import torch

    from studio.core.data import dataset as datamod
    from studio.core.train import evaluation

    if not prepared.val:
        return
    model.eval()
    total, weight = 0.0, 0
    with torch.no_grad(), accelerator.autocast():
        for start in range(0, len(prepared.val), t.batch_size):
            batch = datamod.collate(prepared.val[start:start + t.batch_size], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss = model(**batch, use_cache=False).loss if "position_ids" in batch else model(**batch).loss
            is_lm = prepared.format != "classification"
            n = int((batch["labels"][:, 1:] != -100).sum()) if is_lm else int(batch["labels"].numel())
            total += float(loss) * n
            weight += n
    state.last_val_loss = total / max(1, weight)
    score = evaluation.score(model, tokenizer, prepared, limit=t.eval_examples) if t.eval_examples else None
    if score is not None:
        state.last_score = score.score
    emit(ev.EvalMetrics(state.step, state.last_val_loss, score.score if score else None,
                        score.name if score else None))
    model.train()


def _finish(emit: ev.Recorder, model: Any, tokenizer: Any, run_dir: Path, state: RunState, config: RunConfig,
            optimizer: Any, scheduler: Any, *, stopped: bool) -> ev.Finished:
    from studio.core.adapters.saving import save_adapter

    if stopped and state.step > 0:
        path = save_checkpoint(run_dir, model, optimizer, scheduler, state, config.training.keep_checkpoints, config)
        emit(ev.CheckpointSaved(state.step, str(path)))
    adapter_dir = run_dir / "adapter"
    save_adapter(model, adapter_dir, base_model_spec=config.model.source)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, run_dir / "tokenizer")
    finished = ev.Finished(
        step=state.step, run_dir=str(run_dir), adapter_dir=str(adapter_dir), stopped_early=stopped,
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
    if not (source / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(target))
        return
    target.mkdir(parents=True, exist_ok=True)
    for pattern in TOKENIZER_FILES:
        for path in source.glob(pattern):
            if path.is_file():
                shutil.copy2(path, target / path.name)


def resume(run_dir: str | Path, on_event: EventCallback | None = None, control: TrainControl | None = None,
           *, max_steps: int | None = None) -> ev.Finished | ev.Failed:
    """Continue a run from its latest checkpoint (optionally with a new step budget)."""
    config = load(Path(run_dir) / "run.yaml")
    if max_steps is not None:
        config = replace(config, training=replace(config.training, max_steps=max_steps))
    return train(config, on_event, control, resume_from=run_dir)
