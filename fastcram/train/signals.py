"""SIGTERM and SIGINT as a request to stop: the training loop finishes the step it is in, saves a checkpoint
that --resume continues from, and exits."""
from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes the current step, saves and exits.

    Entered before the run is set up: until the loop starts, Ctrl-C also quits at once (KeyboardInterrupt, as
    before any handler), and the flag stays set, so an interrupt whose exception never arrives (seen while
    torch imported its compiler modules with the garbage collector running: the run then trained its whole
    budget) still stops the run at its first step."""

    def __init__(self):
        self.signal: int | None = None
        self.loop_started = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        if signum == signal.SIGINT and not self.loop_started:
            raise KeyboardInterrupt

    def name(self) -> str:
        """The signal's name; SIGTERM when another rank was signalled and this one was not."""
        return signal.Signals(self.signal).name if self.signal else "SIGTERM"

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
