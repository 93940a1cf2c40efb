"""SIGTERM and SIGINT as a request to stop: the training loop finishes the step it is in, saves a checkpoint
that --resume continues from, and exits."""
from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step, saves and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def name(self) -> str:
        """The signal's name; SIGTERM when another rank was signalled and this one was not."""
        return signal.Signals(self.signal).name if self.signal else "SIGTERM"

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
