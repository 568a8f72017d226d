"""`lora-studio`: no arguments opens the studio window; subcommands run the same core headless.

Every user error (a StudioError or a bad argument) prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from studio.core.errors import StudioError
from studio.core.runconfig import ModelConfig, TrainingConfig, field_help
from studio.core.units import human_bytes

EXIT_USAGE = 2
FORCE_HELP = "write into a folder that holds other files: they are kept; only files the studio wrote are replaced"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        sys.stderr.write(f"{self.prog}: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-studio",
        description="Fine-tune language models with LoRA. Without a command, opens the studio window.",
    )
    from studio import __version__

    parser.add_argument("--version", action="version", version=f"lora-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    model_help = _field_help(ModelConfig, "source")
    gui = sub.add_parser("gui", help="open the studio window (the default without a command)")
    gui.add_argument("model", nargs="?", default="default", help=model_help)

    inspect = sub.add_parser("inspect", help="show a model's module tree, grouped, with parameter counts")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--task", choices=["causal-lm", "seq-cls"], default="causal-lm",
                         help=_field_help(ModelConfig, "task"))
    inspect.add_argument("--num-labels", type=int, default=2, help=_field_help(ModelConfig, "num_labels"))
    inspect.add_argument("--all", action="store_true", help="list every module instead of grouping blocks")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    cnt = sub.add_parser("count", help="count LoRA parameters exactly as PEFT will, and estimate GPU memory")
    cnt.add_argument("model", help=model_help)
    _add_plan_arguments(cnt)
    cnt.add_argument("--batch-size", type=int, default=1, help="micro-batch size for the memory estimate")
    cnt.add_argument("--seq-len", type=int, default=512, help="sequence length for the memory estimate")
    cnt.add_argument("--quantization", choices=["4bit", "8bit"], help="base weights quantized (memory estimate)")
    cnt.add_argument("--gradient-checkpointing", action="store_true", help="memory estimate with checkpointing")
    cnt.add_argument("--gpus", type=int, default=1, help="GPUs sharing the run (DDP, or FSDP with --fsdp): the "
                     "estimate is per GPU, --batch-size per GPU")
    cnt.add_argument("--fsdp", action="store_true", help="the base sharded across the --gpus GPUs (FSDP, "
                     "resources/accelerate/fsdp.yaml): each holds a slice of the weights and adapter state")
    cnt.add_argument("--json", action="store_true", help="print one JSON object")

    train = sub.add_parser("train", help="run a training run file (progress bar, metrics.jsonl as it goes)")
    train.add_argument("run_file", help="a run.yaml (write an example with `lora-studio init-run`)")
    train.add_argument("--run-dir", help="the run folder (default: OUTPUT_DIR/<time>-<model>)")
    train.add_argument("--max-steps", type=int, help=f"override training.max_steps: "
                       f"{_field_help(TrainingConfig, 'max_steps')} (it replaces training.epochs too)")
    _add_launch_arguments(train)

    res = sub.add_parser("resume", help="continue a run from its latest checkpoint (on as many processes as it was "
                         "trained on, with FSDP if it was)")
    res.add_argument("run_dir", help="a run folder holding run.yaml and checkpoints/")
    res.add_argument("--max-steps", type=int, help="a new training.max_steps (default: the run's own): "
                     f"{_field_help(TrainingConfig, 'max_steps')}")
    _add_launch_arguments(res)

    export = sub.add_parser("export", help="copy a run's adapter (PEFT format) to a folder")
    export.add_argument("run_dir", help="a run folder")
    export.add_argument("--out", help="where to write it (default: RUN_DIR/export)")
    export.add_argument("--force", action="store_true", help=FORCE_HELP)

    merge = sub.add_parser("merge", help="merge an adapter into its base and save a full model folder")
    merge.add_argument("source", help="a run folder or a PEFT adapter folder")
    merge.add_argument("--out", required=True, help="the folder to write the merged model to")
    merge.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    merge.add_argument("--base", help="the base model (default: the run's, or the adapter's base_model_name_or_path)")
    merge.add_argument("--force", action="store_true", help=FORCE_HELP)

    from studio.core.gguf.export import GGUF_TYPES

    gg = sub.add_parser("export-gguf", help="merge an adapter into its base and write one .gguf file for llama.cpp "
                        "and Ollama (with an Ollama Modelfile beside it)")
    gg.add_argument("source", help="a run folder or a PEFT adapter folder")
    gg.add_argument("--out", required=True, help="the .gguf file to write")
    gg.add_argument("--type", dest="out_type", choices=GGUF_TYPES, default="f16",
                    help="weight type: f16 keeps the merge nearly exact; q8_0 halves the file")
    gg.add_argument("--base", help="the base model (default: the run's, or the adapter's base_model_name_or_path)")
    gg.add_argument("--force", action="store_true", help="replace an existing file the studio did not write")

    spec = sub.add_parser("spectrum", help="singular values and effective ranks of every update in an adapter")
    spec.add_argument("adapter", help="a PEFT adapter folder or a run folder")
    spec.add_argument("--json", action="store_true", help="print one JSON object")

    gen = sub.add_parser("generate", help="generate from a model, optionally with an adapter")
    gen.add_argument("model", help=model_help)
    gen.add_argument("--adapter", help="a PEFT adapter folder or a run folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")

    init = sub.add_parser("init-run", help="write a commented example run.yaml for the built-in demo")
    init.add_argument("path", nargs="?", default="run.yaml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    return parser


def _field_help(cls: type, name: str) -> str:
    """A run-file field's own help, made safe for argparse's %-formatting."""
    return field_help(cls, name).replace("%", "%%")


class _PeftHelp:
    """The first sentence of a LoraConfig field's own help, read from PEFT only when argparse prints it: importing
    PEFT takes seconds, which every command (the window's launch included) would otherwise pay."""

    def __init__(self, field: str) -> None:
        self.field = field

    def text(self) -> str:
        from peft import LoraConfig

        return str(LoraConfig.__dataclass_fields__[self.field].metadata.get("help", "")).split(". ")[0]

    def strip(self) -> str:  # argparse asks whether the help is blank
        return self.text().strip()

    def __mod__(self, params: dict[str, Any]) -> str:  # argparse expands %(default)s and the like
        return self.text().replace("%", "%%") % params


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    def peft_help(field: str) -> Any:
        return _PeftHelp(field)

    from studio.core.model.plan import LoraPlan

    parser.add_argument("--targets", required=True, help=_field_help(LoraPlan, "targets"))
    parser.add_argument("--rank", "-r", type=int, default=8, help=peft_help("r"))
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 × rank)")
    parser.add_argument("--dropout", type=float, default=0.05, help=peft_help("lora_dropout"))
    parser.add_argument("--variant", choices=["lora", "rslora", "dora"], default="lora",
                        help=_field_help(LoraPlan, "variant"))
    parser.add_argument("--bias", choices=["none", "all", "lora_only"], default="none", help=peft_help("bias"))
    parser.add_argument(
        "--rank-override", action="append", default=[], metavar="MODULE=R",
        help="per-module rank, e.g. model.layers.0.self_attn.q_proj=32 (repeatable)",
    )
    parser.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full")
    parser.add_argument("--task", choices=["causal-lm", "seq-cls"], default="causal-lm",
                        help=_field_help(ModelConfig, "task"))
    parser.add_argument("--num-labels", type=int, default=2, help=_field_help(ModelConfig, "num_labels"))


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("several GPUs (accelerate launch, one process per GPU)")
    group.add_argument("--gpus", type=int, help="train on N GPUs of this machine (N processes; with model.device: cpu, "
                       "N CPU processes)")
    group.add_argument("--accelerate-config", metavar="FILE",
                       help="an accelerate config file (DDP or FSDP), or `ddp` / `fsdp` for a shipped one (default: "
                       "`ddp`)")
    group.add_argument("--nodes", type=int, default=1, help="machines taking part (run the same command on each)")
    group.add_argument("--node-rank", type=int, default=0, help="this machine's rank among --nodes (0: the main one)")
    group.add_argument("--main-address", default="127.0.0.1", help="node 0's address, reachable from every node")
    group.add_argument("--main-port", type=int, default=0, help="node 0's port (default: a free one, one node only)")


def _open_for_planning(spec: str, task: str, num_labels: int) -> Any:
    from studio.core.model.loading import open_model

    return open_model(spec, task=task, num_labels=num_labels, plan_only=True)  # type: ignore[arg-type]


def _plan_from_args(tree: Any, args: argparse.Namespace) -> Any:
    from studio.core.model import inventory
    from studio.core.model.plan import LoraPlan, validate

    targets = tuple(inventory.select(tree, args.targets))
    overrides: dict[str, int] = {}
    for item in args.rank_override:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise StudioError(f"--rank-override wants MODULE=RANK, got {item!r}")
        overrides[name.strip()] = int(value)
    plan = LoraPlan(
        targets=targets,
        rank=args.rank,
        alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
        rank_overrides=overrides,
        dropout=args.dropout,
        bias=args.bias,
        variant=args.variant,
        modules_to_save=tuple(s.strip() for s in args.modules_to_save.split(",") if s.strip()),
    )
    validate(tree, plan)
    return plan


def cmd_inspect(args: argparse.Namespace) -> int:
    from studio.core.model import inventory

    loaded = _open_for_planning(args.model, args.task, args.num_labels)
    tree = inventory.build(loaded.model, args.task)
    groups = _groups(tree)
    found = inventory.presets(tree)
    if args.json:
        print(json.dumps({
            "model": loaded.display_name,
            "architecture": tree.architecture,
            "model_type": tree.model_type,
            "total_params": tree.total_params,
            "groups": groups,
            "modules": [_module_record(tree[n]) for n in tree.modules if n],
            "presets": {name: len(names) for name, names in found.items()},
        }))
        return 0
    print(f"{loaded.display_name}  ({tree.architecture}, {tree.model_type or 'unknown type'})  "
          f"{tree.total_params:,} parameters")
    rows = [_module_record(tree[n]) for n in tree.modules if n and not tree.children[n]] if args.all else groups
    width = max((len(r["name"]) for r in rows), default=10) + 2
    for row in rows:
        times = f"×{row['count']}" if row.get("count", 1) > 1 else ""
        note = "target" if row["targetable"] else ""
        if row.get("output_head"):
            note = "output head"
        print(f"  {row['name']:<{width}}{times:>5}  {row['class']:<18} {row['shape']:<14} "
              f"{row['params']:>14,}  {note}")
    print("presets: " + ", ".join(f"{name} ({len(names)} modules)" for name, names in found.items()))
    return 0


def _module_record(info: Any) -> dict[str, Any]:
    return {
        "name": info.name,
        "class": info.class_name,
        "kind": info.kind,
        "shape": info.shape,
        "params": info.own_params,
        "targetable": info.targetable,
        "why_not": info.why_not,
        "pattern": info.pattern,
        "output_head": info.is_output_head,
    }


def _groups(tree: Any) -> list[dict[str, Any]]:
    """Leaf modules grouped by pattern: `model.layers.*.self_attn.q_proj` once, with its count."""
    groups: dict[str, dict[str, Any]] = {}
    for name, info in tree.modules.items():
        if not name or tree.children[name]:
            continue
        group = groups.get(info.pattern)
        if group is None:
            groups[info.pattern] = {**_module_record(info), "name": info.pattern, "count": 1}
        else:
            group["count"] += 1
            group["params"] += info.own_params
    return list(groups.values())


def cmd_count(args: argparse.Namespace) -> int:
    from studio.core.model import inventory, memory
    from studio.core.model.plan import compact_targets, count

    loaded = _open_for_planning(args.model, args.task, args.num_labels)
    tree = inventory.build(loaded.model, args.task)
    plan = _plan_from_args(tree, args)
    counts = count(tree, plan)
    if args.fsdp and args.quantization:
        raise StudioError("--fsdp with --quantization: FSDP does not shard a 4-bit or 8-bit base here")
    est = memory.estimate(
        tree, plan, counts, batch_size=args.batch_size, seq_len=args.seq_len,
        quantization=args.quantization, gradient_checkpointing=args.gradient_checkpointing, gpus=args.gpus,
        sharded=args.fsdp,
    )
    if args.json:
        record = counts.to_dict()
        record["target_modules"] = compact_targets(tree, plan.targets)
        record["memory"] = {label: value for label, value in est.parts()} | {"total": est.total}
        print(json.dumps(record))
        return 0
    print(f"{loaded.display_name}: LoRA r={plan.rank} α={plan.alpha:g} ({plan.variant}) on {counts.modules} modules")
    print(f"  trainable  {counts.trainable:>15,}  ({100 * counts.share:.4f}% of {counts.total:,})")
    print(f"  adapter    {human_bytes(counts.adapter_bytes):>15}  on disk")
    each = f" on each of {args.gpus} GPUs" if args.gpus > 1 else ""
    each += " (FSDP: the base sharded)" if args.fsdp else ""
    print(f"  GPU memory ~{human_bytes(est.total)}{each} for batch {args.batch_size} × {args.seq_len} tokens:")
    for label, value in est.parts():
        print(f"    {label:<32}{human_bytes(value):>12}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from studio.core import runconfig
    from studio.core.train.preflight import check_run

    config = runconfig.load(args.run_file)
    if args.max_steps is not None:
        training = dataclasses.replace(config.training, max_steps=args.max_steps, epochs=None)  # steps replace epochs
        config = dataclasses.replace(config, training=training)
        config.check()
    check_run(config)  # a run that cannot work is refused before torch is imported and the model loads
    _warn_about_remote_code(config)
    from studio.core.train.engine import train

    if _launches(args):
        from studio.core.train import launch

        plan = _launch_plan(args, config.model.device)
        if args.node_rank > 0:
            return _lend_gpus(args, plan, ["train", str(args.run_file), "--run-dir", str(args.run_dir)])
        return _drive(lambda on_event, control: launch.train_on_processes(config, plan, on_event, control,
                                                                          run_dir=args.run_dir))
    return _drive(lambda on_event, control: train(config, on_event, control, run_dir=args.run_dir))


def cmd_resume(args: argparse.Namespace) -> int:
    from pathlib import Path

    from studio.core import run_layout, runconfig

    _warn_about_remote_code(runconfig.load(Path(args.run_dir) / run_layout.RUN_FILE))
    from studio.core.train.engine import resume

    _follow_the_checkpoint(args)
    if _launches(args):
        from studio.core.train import launch

        plan = _launch_plan(args, runconfig.load(Path(args.run_dir) / run_layout.RUN_FILE).model.device)
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
        if args.node_rank > 0:
            return _lend_gpus(args, plan, ["resume", str(args.run_dir), *steps])
        return _drive(lambda on_event, control: launch.resume_on_processes(args.run_dir, plan, on_event, control,
                                                                           max_steps=args.max_steps))
    return _drive(lambda on_event, control: resume(args.run_dir, on_event, control, max_steps=args.max_steps))


def _follow_the_checkpoint(args: argparse.Namespace) -> None:
    """A resume launches as its run was trained (processes, FSDP) where --gpus / --accelerate-config leave it open;
    a flag given wins, and the engine refuses one that does not match the checkpoint."""
    from studio.core.train.launch import (
        as_trained,
        config_as_trained,
        how_trained,
        inside_a_launch,
    )

    if inside_a_launch():  # one of the run's processes: it resumes where it runs
        return
    processes, sharded = as_trained(args.run_dir)
    launches = args.gpus is None and (processes > 1 or sharded)
    config, gone = config_as_trained(args.run_dir, sharded) if args.accelerate_config is None else (None, "")
    if launches:
        args.gpus = max(1, processes // args.nodes)  # --gpus counts the processes of one machine
    if config:
        args.accelerate_config = config
    if gone:
        sys.stderr.write(f"{gone}\n")
    if launches or config:
        said = how_trained(processes if launches else None, sharded, config)
        sys.stderr.write(f"resuming {said}, as the run was trained\n")


def _launches(args: argparse.Namespace) -> bool:
    """Whether this command starts the run's processes through accelerate (--gpus, --nodes, a config file)."""
    return bool(args.gpus or args.nodes > 1 or args.accelerate_config)


def _launch_plan(args: argparse.Namespace, device: str) -> Any:
    from studio.core.train import launch

    processes = args.gpus or 1
    if processes < 1:
        raise StudioError(f"--gpus must be at least 1, got {processes}")
    if args.node_rank > 0 and not args.run_dir:
        raise StudioError("--node-rank > 0 needs --run-dir: the run folder path node 0 writes (a shared one)")
    launch.check_gpus(processes, device)
    config_file = str(launch.accelerate_config(args.accelerate_config)) if args.accelerate_config else None
    return launch.Launch(processes, args.nodes, args.node_rank, args.main_address, args.main_port, config_file)


def _lend_gpus(args: argparse.Namespace, plan: Any, cli_args: list[str]) -> int:
    """A node other than the main one: its processes train; node 0 follows the run and writes it."""
    import subprocess

    from studio.core.train import launch

    code = subprocess.run(launch.command(plan, cli_args)).returncode
    print(f"node {args.node_rank}: its processes ended with exit code {code}; the run is in {args.run_dir} on node 0")
    return 0 if code == 0 else EXIT_USAGE


def _warn_about_remote_code(config: Any) -> None:
    from studio.core.runconfig import remote_code_warning

    warning = remote_code_warning(config)
    if warning:
        sys.stderr.write(f"lora-studio: warning: {warning}\n")


def _drive(start: Any) -> int:
    """Run the engine with a progress bar (ETA, loss in the bar); Ctrl-C stops cleanly with a checkpoint."""
    import signal

    from tqdm import tqdm

    from studio.core import events as ev
    from studio.core.train.engine import TrainControl

    control = TrainControl()
    bar: list[Any] = []
    mirror = _event_mirror()

    def on_event(event: Any) -> None:
        mirror(event)
        if isinstance(event, ev.StepMetrics) and bar:
            bar[0].set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", tok_s=f"{event.tokens_per_s:.0f}")
            bar[0].update(event.step - bar[0].n)
        elif isinstance(event, ev.LogMessage):
            if event.level != "info":
                _bar_write(bar, f"{event.level}: {ev.describe(event)}")
        elif not isinstance(event, (ev.Finished, ev.Failed)) and (text := ev.describe(event)) is not None:
            _bar_write(bar, text)  # the run's end is the result, said below
        if isinstance(event, ev.RunStarted):
            bar.append(tqdm(total=event.total_steps, initial=event.start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True))

    previous = signal.signal(signal.SIGINT, lambda *_: control.request_stop())
    try:
        result = start(on_event, control)
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar:
            bar[0].close()
    if isinstance(result, ev.Failed):
        sys.stderr.write(f"lora-studio: {ev.describe(result)}\n")
        return EXIT_USAGE
    print(ev.describe(result))
    return 0


def _event_mirror() -> Any:
    """Under `--gpus`, the main process's events also go to the file the launching side follows."""
    import os

    from studio.core.train.launch import EVENTS_ENV, event_writer

    return event_writer(os.environ[EVENTS_ENV]) if os.environ.get(EVENTS_ENV) else (lambda _event: None)


def _bar_write(bar: list[Any], text: str) -> None:
    if bar:
        bar[0].write(text, file=sys.stderr)
    else:
        sys.stderr.write(text + "\n")


def _adapter_folder(path: str) -> str:
    from pathlib import Path

    from studio.core import run_layout

    folder = Path(path)
    return str(folder / run_layout.ADAPTER) if run_layout.is_run_folder(folder) else str(folder)


def _base_of(source: str, given: str | None) -> str:
    from pathlib import Path

    from studio.core import run_layout, runconfig
    from studio.core.adapters.folder import read_adapter_info

    if given:
        return given
    if run_layout.is_run_folder(source):
        return runconfig.load(Path(source) / run_layout.RUN_FILE).model.source
    base = read_adapter_info(source).base_model
    if not base:
        raise StudioError(f"{source} does not say which base model it was trained on: pass --base MODEL")
    return base


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from studio.core.adapters.saving import export_run_adapter

    out = args.out or str(Path(args.run_dir) / "export")
    print(f"adapter written to {export_run_adapter(args.run_dir, out, force=args.force)}")
    return 0


def _one_line_a_stage() -> Any:
    """A progress callback for stderr: each stage's first message, not a line for every module or tensor."""
    stages: set[str] = set()

    def on_progress(progress: Any) -> None:
        if progress.stage not in stages:
            stages.add(progress.stage)
            sys.stderr.write(f"{progress.message}\n")

    return on_progress


def cmd_merge(args: argparse.Namespace) -> int:

    from studio.core.adapters.loading import load_adapter
    from studio.core.adapters.merging import merge_and_save
    from studio.core.files import check_output_folder
    from studio.core.model.loading import open_model

    base = _base_of(args.source, args.base)
    check_output_folder(args.out, "merged model", force=args.force)  # before the base model loads
    loaded = open_model(base)
    peft_model = load_adapter(loaded, _adapter_folder(args.source))
    report = merge_and_save(peft_model, loaded.tokenizer, args.out, dtype=args.dtype, force=args.force,
                            on_progress=_one_line_a_stage())
    for note in report.notes:
        sys.stderr.write(f"note: {note}\n")
    print(f"merged model written to {report.path} ({report.dtype}); max logit difference adapter vs merged "
          f"{report.max_logit_diff:.2e}, as saved {report.saved_logit_diff:.2e}")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from studio.core.gguf.export import export_adapter_gguf

    report = export_adapter_gguf(_adapter_folder(args.source), _base_of(args.source, args.base), args.out,
                                 args.out_type, on_progress=_one_line_a_stage(), force=args.force)
    for note in report.notes:
        sys.stderr.write(f"note: {note}\n")
    modelfile = Path(report.modelfile).name
    print(f"GGUF file written to {report.path} ({report.out_type}, {human_bytes(report.bytes)}, {report.tensors} "
          f"tensors, {report.seconds:.1f} s); Ollama: cd to its folder and run `ollama create NAME -f {modelfile}`")
    if report.verified:
        agreed = round(report.top1_agreement * report.probe_tokens)
        print(f"llama.cpp check: next token agrees on {agreed}/{report.probe_tokens} probe positions, max logit "
              f"difference {report.max_logit_diff:.2e}, tokenization {'matches' if report.tokens_agree else 'DIFFERS'}")
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from studio.core.adapters.spectrum import advise_ranks, read_adapter_spectra

    spectra = read_adapter_spectra(_adapter_folder(args.adapter))
    report = advise_ranks(spectra)
    if args.json:
        print(json.dumps({
            "modules": [dict(name=s.name, rank=s.rank, values=list(s.values), effective_rank_90=s.effective_rank_90,
                             effective_rank_95=s.effective_rank_95, top1_energy=s.top1_energy) for s in spectra],
            "advice": [dict(name=a.name, rank=a.rank, effective_rank=a.effective_rank,
                            suggested_rank=a.suggested_rank, verdict=a.verdict) for a in report.kinds],
            "summary": report.summary,
        }))
        return 0
    width = max((len(s.name) for s in spectra), default=10) + 2
    for s in spectra:
        top = " ".join(f"{v:.3g}" for v in s.values[:4])
        print(f"  {s.name:<{width}} r={s.rank:<4} eff90={s.effective_rank_90:<4} eff95={s.effective_rank_95:<4} "
              f"top1={100 * s.top1_energy:5.1f}%  σ: {top}")
    print(report.summary)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from studio.core.adapters.loading import load_adapter
    from studio.core.data.formats import prompt_inputs
    from studio.core.model.loading import open_model, require_weights

    if args.max_new_tokens < 1:
        raise StudioError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    loaded = open_model(args.model)
    require_weights(loaded, "generate")
    model = load_adapter(loaded, _adapter_folder(args.adapter)) if args.adapter else loaded.model
    tokenizer = loaded.tokenizer
    inputs = prompt_inputs(tokenizer, args.prompt, raw=args.raw)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0


def cmd_init_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from studio.core import runconfig
    from studio.core.data.dataset import DataSpec, demo_spec
    from studio.core.files import write_atomic
    from studio.core.model.plan import LoraPlan

    path = Path(args.path)
    if path.exists() and not args.force:
        raise StudioError(f"{path} exists: pass --force to overwrite it")
    write_atomic(path, runconfig.example(demo_spec().to_dict(), data_fields=DataSpec, plan_fields=LoraPlan))
    print(f"wrote {path}: run it with `lora-studio train {path}`")
    return 0


def cmd_gui(args: argparse.Namespace) -> int:
    from studio.ui.app import run_gui

    return run_gui(args.model)


COMMANDS = {
    "gui": cmd_gui, "inspect": cmd_inspect, "count": cmd_count, "train": cmd_train, "resume": cmd_resume,
    "init-run": cmd_init_run, "export": cmd_export, "merge": cmd_merge, "spectrum": cmd_spectrum,
    "generate": cmd_generate, "export-gguf": cmd_export_gguf,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from studio.core.logs import send_library_output_to_log

    # before torch & co. are imported (--help imports PEFT, and with it bitsandbytes, which warns as it loads):
    # stderr carries the studio's own lines only
    send_library_output_to_log()
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS.get(args.command or "gui")
    if args.command is None:
        args.model = "default"
    try:
        return command(args)
    except StudioError as exc:
        sys.stderr.write(f"lora-studio: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("lora-studio: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
