"""Stopping a run cleanly on SIGINT / SIGTERM: nothing partial is written; the last checkpoint stays.

The handler only records the request; the training loop checks it between steps and after each checkpoint.
A second SIGINT raises :class:`KeyboardInterrupt` at once (the atomic checkpoint writes still protect the
last complete checkpoint).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a flag (installed only in the main thread)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class TrainingInterruptedError(Exception):
    """A run stopped on a signal; ``epoch`` epochs are complete and saved in ``run_dir``."""

    def __init__(self, run_dir: str, epoch: int, signum: int) -> None:
        self.run_dir, self.epoch, self.signum = run_dir, epoch, signum
        name = signal.Signals(signum).name
        saved = f"the last complete checkpoint (epoch {epoch})" if epoch else "no epoch was complete yet"
        super().__init__(
            f"stopped by {name}; {saved} in {run_dir}. Continue with: symkernels train --resume {run_dir}"
        )

    @property
    def exit_code(self) -> int:
        """The shell convention for death by a signal: 128 + its number."""
        return 128 + self.signum
