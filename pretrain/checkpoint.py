"""Training checkpoints in the official iBOT layout (docs/protocols.md#checkpoint-format), written atomically.

``checkpoint.pth`` holds ``student`` (``module.``-prefixed, as the reference's DDP-wrapped
student), ``teacher``, ``optimizer``, ``epoch`` (completed epochs), ``args`` (flat,
reference-named fields plus the full ``config``), ``ibot_loss`` (centers) and
``fp16_scaler`` when fp16 is on; plus what exact resumption needs: ``epoch_iter`` (batches
done in the current epoch), ``rng`` and the architecture ``signature``. Reading goes through
``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ibot_bench.errors import CheckpointError
from ibot_bench.io import atomic_write

CHECKPOINT = "checkpoint.pth"
BACKBONE_EXPORT = "teacher_backbone.safetensors"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """``torch.save`` via a temp file + rename: a crash never leaves a half-written file."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def export_backbone(path: Path, backbone: torch.nn.Module) -> Path:
    """The teacher backbone alone as safetensors (flat timm/iBOT keys), e.g. for ``ibot:``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`, read without running pickled code."""
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint {path} not found; check --resume")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(exc).__name__}: {str(exc)[:200]}); it is "
            "truncated, corrupt or was not written by ibot-bench pretrain. Resume from a "
            "snapshot (checkpointNNNN.pth) or start in a new output folder."
        ) from exc
    missing = [k for k in ("student", "teacher", "optimizer", "epoch") if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} is not a full training checkpoint (missing {missing}); resume needs the "
            "checkpoint.pth that ibot-bench pretrain writes."
        )
    return obj


def check_signature(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume a run of another architecture (or head, or crops) into this one."""
    if saved is None:
        raise CheckpointError(
            f"{path} has no architecture signature (not written by ibot-bench pretrain?); "
            "refusing to resume into it. Use a new output folder."
        )
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} belongs to a different model ({detail}); refusing to resume into it. "
            "Choose another output_dir, or make the config match the checkpoint."
        )


def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
