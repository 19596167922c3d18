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


def test_an_error_past_a_loader_with_workers_exits_at_once(tmp_path):
    """Loader workers ignore SIGTERM (a stop is the trainer's): a run that fails while they are
    alive must still exit, not wait forever in multiprocessing's join at exit."""
    import subprocess
    import sys

    from conftest import make_imagefolder

    root = make_imagefolder(tmp_path / "data", classes=2, per_class=8)
    bad = sorted((root / "train" / "class_0").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:300])
    cmd = [sys.executable, "-m", "ibot_bench.cli", "eval", "finetune", "--config", "finetune_quick"]
    cmd += ["--encoder", "random:vit_tiny_patch8", "--data", f"imagefolder:{root}"]
    cmd += ["--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    cmd += ["epochs=1", "warmup_epochs=0", "batch_size=4", "num_workers=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ibot-bench: error: cannot read image {bad}")
    assert "fine-tuning does not skip images" in last and "Traceback" not in done.stderr
