"""`lora-studio`: no arguments opens the studio window; subcommands run the same core headless.

Every user error (a StudioError or a bad argument) prints one line on stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from studio.core.errors import StudioError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        sys.stderr.write(f"{self.prog}: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-studio",
        description="Fine-tune language models with LoRA. Without a command, opens the studio window.",
    )
    from studio import __version__

    parser.add_argument("--version", action="version", version=f"lora-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    model_help = "`default` (built-in SmolLM2-135M-Instruct), a model folder, a .gguf file, a config.json or a hub id"
    gui = sub.add_parser("gui", help="open the studio window (the default without a command)")
    gui.add_argument("model", nargs="?", default="default", help=model_help)

    inspect = sub.add_parser("inspect", help="show a model's module tree, grouped, with parameter counts")
    inspect.add_argument("model", help=model_help)
    inspect.add_argument("--task", choices=["causal-lm", "seq-cls"], default="causal-lm")
    inspect.add_argument("--num-labels", type=int, default=2)
    inspect.add_argument("--all", action="store_true", help="list every module instead of grouping blocks")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    cnt = sub.add_parser("count", help="count LoRA parameters exactly as PEFT will, and estimate GPU memory")
    cnt.add_argument("model", help=model_help)
    _add_plan_arguments(cnt)
    cnt.add_argument("--batch-size", type=int, default=1, help="micro-batch size for the memory estimate")
    cnt.add_argument("--seq-len", type=int, default=512, help="sequence length for the memory estimate")
    cnt.add_argument("--quantization", choices=["4bit", "8bit"], help="base weights quantized (memory estimate)")
    cnt.add_argument("--gradient-checkpointing", action="store_true", help="memory estimate with checkpointing")
    cnt.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from peft import LoraConfig

    def peft_help(field: str) -> str:
        return str(LoraConfig.__dataclass_fields__[field].metadata.get("help", "")).split(". ")[0]

    parser.add_argument(
        "--targets", required=True,
        help="a preset (attention, mlp, all-linear, peft-default) or comma-separated module names, leaf names "
        "(q_proj), globs (model.layers.1*.mlp.*) or re:REGEX",
    )
    parser.add_argument("--rank", "-r", type=int, default=8, help=peft_help("r"))
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 × rank)")
    parser.add_argument("--dropout", type=float, default=0.05, help=peft_help("lora_dropout"))
    parser.add_argument("--variant", choices=["lora", "rslora", "dora"], default="lora")
    parser.add_argument("--bias", choices=["none", "all", "lora_only"], default="none", help=peft_help("bias"))
    parser.add_argument(
        "--rank-override", action="append", default=[], metavar="MODULE=R",
        help="per-module rank, e.g. model.layers.0.self_attn.q_proj=32 (repeatable)",
    )
    parser.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full")
    parser.add_argument("--task", choices=["causal-lm", "seq-cls"], default="causal-lm")
    parser.add_argument("--num-labels", type=int, default=2, help="classes for --task seq-cls")


def _open_for_planning(spec: str, task: str, num_labels: int) -> Any:
    from studio.core.models import open_model

    return open_model(spec, task=task, num_labels=num_labels, plan_only=True)  # type: ignore[arg-type]


def _plan_from_args(tree: Any, args: argparse.Namespace) -> Any:
    from studio.core import inventory
    from studio.core.plan import LoraPlan, validate

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
    from studio.core import inventory

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
    from studio.core import inventory, memory
    from studio.core.plan import compact_targets, count

    loaded = _open_for_planning(args.model, args.task, args.num_labels)
    tree = inventory.build(loaded.model, args.task)
    plan = _plan_from_args(tree, args)
    counts = count(tree, plan)
    est = memory.estimate(
        tree, plan, batch_size=args.batch_size, seq_len=args.seq_len,
        quantization=args.quantization, gradient_checkpointing=args.gradient_checkpointing,
    )
    if args.json:
        record = counts.to_dict()
        record["target_modules"] = compact_targets(tree, plan.targets)
        record["memory"] = {label: value for label, value in est.parts()} | {"total": est.total}
        print(json.dumps(record))
        return 0
    print(f"{loaded.display_name}: LoRA r={plan.rank} α={plan.alpha:g} ({plan.variant}) on {counts.modules} modules")
    print(f"  trainable  {counts.trainable:>15,}  ({100 * counts.share:.4f}% of {counts.total:,})")
    print(f"  adapter    {_human_bytes(counts.adapter_bytes):>15}  on disk")
    print(f"  GPU memory ~{_human_bytes(est.total)} for batch {args.batch_size} × {args.seq_len} tokens:")
    for label, value in est.parts():
        print(f"    {label:<32}{_human_bytes(value):>12}")
    return 0


def cmd_gui(args: argparse.Namespace) -> int:
    from studio.ui.app import run_gui

    return run_gui(args.model)


COMMANDS = {"gui": cmd_gui, "inspect": cmd_inspect, "count": cmd_count}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
