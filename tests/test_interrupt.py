"""Stop signals during training: taken over only where nobody else handles them."""

from __future__ import annotations

import os
import signal

from ibot_bench.interrupt import StopRequests


def test_stop_requests_leave_a_launchers_own_handler_alone():
    """submitit (``--launcher``) installs its own SIGTERM handler to requeue the job: it stays."""

    def launchers(_signum, _frame) -> None:
        return None

    old = signal.signal(signal.SIGTERM, launchers)
    try:
        with StopRequests("test") as stop:
            assert signal.getsignal(signal.SIGTERM) is launchers
            assert signal.getsignal(signal.SIGINT) == stop._handle
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested() and stop.signal_name == "SIGINT"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old)
