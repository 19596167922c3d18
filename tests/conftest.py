"""Shared fixtures: a private cache per test session and tiny on-the-fly datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test run gets its own feature/synthetic cache (never the user's ~/.cache)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("IBOT_BENCH_CACHE", str(tmp_path_factory.mktemp("ibot-bench-cache")))
    yield
    mp.undo()


def make_imagefolder(root: Path, classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    """ROOT/{train,val}/<class>/<i>.jpg with class-dependent colours (learnable, tiny)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.full((size, size, 3), 40 + 80 * c, dtype=np.uint8)
                noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{split}_{c}_{i}.jpg", quality=90)
    return root


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "tiny")


def feature_context(train, test, encoder_spec: str = "", data_spec: str = "", **kwargs):
    """A task context serving the feature sets ``train`` and ``test`` (as from the cache)."""
    from ibot_bench.tasks import TaskContext

    sets = {"train": train, "val": test}
    return TaskContext(encoder_spec, data_spec, feature_sets=sets, **kwargs)


def write_ibot_checkpoint(
    path: Path, arch: str = "vit_tiny_patch8", out_dim: int = 3, drop: str | None = None
) -> Path:
    """An iBOT-layout training checkpoint (teacher and student): a seeded random ``arch``
    backbone and a projection head with ``out_dim`` outputs; ``drop``: a backbone key left out.
    """
    import torch

    from ibot_bench.encoders import load_encoder
    from ibot_bench.encoders.head import ProjectionHead

    backbone = load_encoder(f"random:{arch}").model.state_dict()
    torch.manual_seed(0)
    head = ProjectionHead([backbone["cls_token"].shape[-1], 64, 32], out_dim=out_dim)
    state = {f"backbone.{k}": v for k, v in backbone.items() if k != drop}
    state.update({f"head.{k}": v for k, v in head.state_dict().items()})
    torch.save({"teacher": state, "student": state}, path)
    return path


def on_call(n: int, action, fn):
    """``fn``, wrapped to run ``action()`` first on its ``n``-th call (a stop or a crash at a
    chosen point of a loop)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return fn(*args, **kwargs)

    return wrapped
