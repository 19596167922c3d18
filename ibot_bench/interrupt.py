"""Stop a long run (pretraining, fine-tuning, feature extraction) cleanly on Ctrl-C or
SIGTERM: finish the step (or batch), save, then stop.

The first SIGINT or SIGTERM (a terminal's Ctrl-C; ``kill``, a scheduler or a container
stopping the job) only asks for a stop: the running step finishes, a checkpoint is written
and the run ends with a message saying where it will resume. A second Ctrl-C stops at once,
unsaved. Loader workers ignore both signals, so one sent to the whole process group (a
terminal's Ctrl-C, ``timeout``) leaves them to be shut down by the trainer instead of dying
mid-batch.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing
import signal
import sys
import threading
from types import FrameType, TracebackType

from ibot_bench.distributed import all_ranks, is_main, world


class TrainingInterrupted(KeyboardInterrupt):
    """A stop asked for by a signal, after the run saved a checkpoint (the message says where)."""


def ignore_interrupts(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: stop signals are the trainer's to handle. A worker still
    exits when the trainer shuts the loader down, or when the trainer's process is gone; one
    left running when the trainer exits (an error unwound past its loader) is killed by
    :func:`_kill_daemon_children`, since it ignores the SIGTERM multiprocessing sends."""
    for sig in StopRequests.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_daemon_children() -> None:
    """At exit, before multiprocessing terminates and joins its daemonic children (loader
    workers): SIGKILL them, as they ignore its SIGTERM and the join would wait forever."""
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call it a failure
    for child in children:
        child.kill()


@functools.cache
def _register_exit_hook() -> None:
    """Once; atexit runs hooks last-registered first, so after multiprocessing's own."""
    atexit.register(_kill_daemon_children)


class StopRequests:
    """Context manager that turns SIGINT / SIGTERM into a stop request (``requested()``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, what: str = "training") -> None:
        self.what = what  # names the run in the message
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        _register_exit_hook()
        if threading.current_thread() is threading.main_thread():  # signals reach it only
            for sig in self.SIGNALS:
                # a handler someone else installed stays theirs (submitit's, under --launcher)
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        self.signal_name = signal.Signals(signum).name
        if is_main():
            print(
                f"\n[{self.what}] {self.signal_name}: stopping after this step, saving what "
                "is done (Ctrl-C again to stop at once, unsaved)",
                file=sys.stderr,
            )

    def requested(self) -> bool:
        """True once any rank got a stop signal (every rank answers the same)."""
        asked = self.signal_name is not None
        return not all_ranks(not asked) if world()[1] > 1 else asked
