"""SIGTERM before the training loop runs (start-up: imports, data scan, model build, the first step's
compilation): the run stops at once with exit 4 and a line saying nothing was lost, never by the signal's
default action. Light on purpose (no torch): the command line installs it before it imports the trainer."""

from __future__ import annotations

import signal


class StoppedAtStartup(BaseException):
    """A SIGTERM came before the first training step was done: no step was trained, so nothing was lost. A
    BaseException, as KeyboardInterrupt is: no `except Exception` on the way (a scan, a load, the epoch-0
    evaluation) may take it for a failure of its own."""

    def __init__(self, signum: int):
        super().__init__(
            f"received {signal.Signals(signum).name} during start-up, before the first step was done: stopped; "
            f"nothing was lost (no step was trained, no checkpoint touched): run the same command again to start"
        )


def stop_at_startup(signum: int, frame) -> None:
    raise StoppedAtStartup(signum)


def guard_startup() -> None:
    """From now until the run's own handler (train.StopFlag) takes over, SIGTERM raises StoppedAtStartup."""
    try:
        signal.signal(signal.SIGTERM, stop_at_startup)
    except ValueError:  # not the main thread: leave signals alone
        pass


def release_startup() -> None:
    """The run is over (its own handler gone): SIGTERM is the default again, nothing is left to lose."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:
        pass
