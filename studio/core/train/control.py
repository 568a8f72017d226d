"""How a caller steers a run from another thread: `TrainControl`'s stop and pause flags, which the training loop
reads between steps (a pause leaves a checkpoint and waits; a stop saves and finishes)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class TrainControl:
    """Flags a caller on another thread sets; the loop reads them between steps."""

    _stop: threading.Event = field(default_factory=threading.Event)
    _pause: threading.Event = field(default_factory=threading.Event)
    _wake: threading.Event = field(default_factory=threading.Event)

    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()
        self._wake.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def pause_requested(self) -> bool:
        return self._pause.is_set()

    def wait_while_paused(self) -> None:
        while self._pause.is_set() and not self._stop.is_set():
            self._wake.wait(0.1)
            self._wake.clear()
