"""A run checked before its model loads: what would otherwise stop it seconds (or minutes) later, below the
libraries' loading notices, is refused at once in one line. `train()` calls `check_run` first, and so does the CLI
before it imports torch.

It reads the data files (tables.py) and resolves their columns (formats.py) without a tokenizer; what needs the
tokenizer (templates, token counts) and the model (target modules, ranks against their sizes) is checked where those
are loaded."""

from __future__ import annotations

from studio.core.adapters.folder import read_adapter_info
from studio.core.data.dataset import DataSpec, class_names
from studio.core.data.formats import REQUIRED_ROLES, Format, detect_format, resolve_columns
from studio.core.data.tables import Table, read_table
from studio.core.errors import DataError, ModelSourceError, PlanError
from studio.core.model.loading import resolve_source
from studio.core.model.plan import LoraPlan
from studio.core.runconfig import RunConfig


def check_run(config: RunConfig, *, model: bool = True) -> None:
    """Raise the StudioError this run would meet before its first step, without loading the model: the plan's
    values, the data settings, the data files and their columns, the model source (`model=False` when the caller
    opened the model already) and the adapter to continue."""
    if not config.model.adapter:
        targets = config.plan.get("targets")
        if not isinstance(targets, str) and not (
                isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
            raise PlanError(f"plan.targets must be a preset, a comma-separated spec or a list of modules, got "
                            f"{targets!r}")
        LoraPlan.from_dict({**config.plan, "targets": ()})  # the targets need the model: checked once it loads
    spec = DataSpec.from_dict(config.data)
    if model:
        source = resolve_source(config.model.source)
        if source.kind == "config":
            raise ModelSourceError(f"{source.location} is a bare config (plan mode, no weights): point "
                                   "model.source at a folder with weights, a .gguf file or a hub id to train")
    if config.model.adapter:
        read_adapter_info(config.model.adapter)
    tables = [_readable(read_table(spec.train_path, spec.txt_mode))]
    if spec.val_path:
        tables.append(_readable(read_table(spec.val_path, spec.txt_mode)))
    fmt: Format = detect_format(tables[0].columns, spec.columns) if spec.format == "auto" else spec.format
    columns = _columns(tables[0], fmt, spec.columns)
    for table in tables[1:]:  # the validation file needs the required columns; optional ones may be absent
        _columns(table, fmt, {role: columns[role] for role in REQUIRED_ROLES[fmt]})
    task = config.model.task
    if fmt == "classification" and task != "seq-cls":
        raise DataError(f"{tables[0].path} holds classification data (text and label): set model.task to seq-cls "
                        "to train a classifier, or choose another format")
    if fmt != "classification" and task == "seq-cls":
        raise DataError(f"model.task seq-cls trains a classifier on text and label columns; {tables[0].path} is "
                        f"read in the {fmt} format")
    if fmt == "classification":
        _check_classes(tables, columns["label"], spec.label_names, config.model.num_labels)


def _readable(table: Table) -> Table:
    """The table, unless not one of its rows can be read (not JSON, not UTF-8): then the first row's reason."""
    if any(record.values is not None for record in table.records):
        return table
    first = table.records[0]
    more = f" (and every other of its {len(table.records)} rows)" if len(table.records) > 1 else ""
    raise DataError(f"{table.path} has no readable row: row {first.row} {first.problem}{more}")


def _columns(table: Table, fmt: Format, mapping: dict[str, str]) -> dict[str, str]:
    try:
        return resolve_columns(fmt, table.columns, mapping)
    except DataError as exc:
        raise DataError(f"{table.path}: {exc}") from exc


def _check_classes(tables: list[Table], column: str, given: tuple[str, ...], num_labels: int) -> None:
    """The classes the data names must fit the classifier's head (model.num_labels)."""
    labels = []
    for table in tables:
        for record in table.records:
            value = (record.values or {}).get(column)
            if isinstance(value, str) and value.strip():
                labels.append(value.strip())
            elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                labels.append(value)
    names = class_names(given, labels)
    if len(names) > num_labels:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise DataError(f"the data has {len(names)} classes ({shown}) but model.num_labels is {num_labels}: set "
                        f"model.num_labels to {len(names)}")
