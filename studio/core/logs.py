"""Where the studio's own log and the libraries' chatter go: one log file, never the user's terminal.

The CLI's stderr and the GUI's dialogs carry one line a person can act on. The libraries underneath write their
own notices there unless told otherwise: transformers logs deprecations and draws progress bars, bitsandbytes logs
that an optional CPU kernel is missing each time PEFT imports it (PEFT does so unconditionally), and several raise
FutureWarnings about each other. `send_library_output_to_log()` sends all of it to the log file instead; call it
before those libraries are imported (it sets the environment they read on import).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG_NAME = "studio.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# read by transformers and huggingface_hub when they are imported; a value the user set wins
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",  # its deprecation notices go through its own stderr handler
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars (loading weights, de-quantizing a GGUF) follow this
    "TOKENIZERS_PARALLELISM": "false",  # otherwise a warning appears once the tokenizer has run before a fork
}


def state_dir() -> Path:
    """Where the studio writes its log: $XDG_STATE_HOME/lora-studio, else ~/.local/state/lora-studio."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lora-studio"


def send_library_output_to_log(path: Path | None = None) -> Path | None:
    """Route Python warnings and every logger's records to the log file (the studio's own from INFO, the
    libraries' from WARNING), and quiet transformers' stderr handler and progress bars. Returns the log file,
    or None when it cannot be opened; the records are then dropped rather than printed."""
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger -> the file below
    path = path or state_dir() / LOG_NAME
    root = logging.getLogger()
    installed = next((h for h in root.handlers if getattr(h, "studio_log", False)), None)
    if installed is not None:  # a second call (main() run twice in one process) adds no second handler
        return Path(installed.baseFilename) if isinstance(installed, logging.FileHandler) else None
    handler: logging.Handler
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        handler, path = logging.NullHandler(), None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.studio_log = True  # type: ignore[attr-defined]
    # a handler on the root keeps logging's last-resort handler (plain stderr) from ever being used
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("studio").setLevel(logging.INFO)
    return path


def route_library_logger(name: str) -> None:
    """Send a library's records to the log file only: drop the stderr handler it gave its own logger on import
    (datasets does, whatever the environment says); the records reach the root's log file handler instead."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)
    logger.propagate = True
