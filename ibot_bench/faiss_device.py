"""Where faiss runs: GPU when faiss has GPU support and sees a GPU, else CPU — never silently.

Shared by the kNN and k-means tasks; the choice is logged and recorded by each task.
"""

from __future__ import annotations

import faiss

from ibot_bench.errors import ConfigError, UserError


def faiss_device(requested: str = "auto") -> str:
    """``"gpu"`` or ``"cpu"``: where faiss runs for ``requested`` in {auto, cpu, gpu}."""
    if requested not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"device must be auto, cpu or gpu, got {requested!r}")
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if requested == "gpu" and not has_gpu:
        raise UserError(
            "device: gpu asked for, but faiss has no GPU support or sees no GPU "
            "(install faiss-gpu, e.g. the 'gpu' extra, or use device: cpu)"
        )
    return "gpu" if requested != "cpu" and has_gpu else "cpu"
