"""The iBOT/DINO projection head rebuilt from a checkpoint's weights (docs/protocols.md#projection-head).

MLP (Linear, GELU, ..., Linear) -> L2 normalisation -> ``last_layer`` (Linear without
bias; weight-norm already folded by the loader). iBOT's ``last_layer2`` projects the
patch tokens when the head is not shared. Used for clustering from the head's argmax
and for fine-tuning from the head's first layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ibot_bench.errors import CheckpointError


class ProjectionHead(nn.Module):
    """MLP -> L2-norm -> last_layer; ``patch_logits`` uses ``last_layer2`` when present."""

    def __init__(self, dims: list[int], out_dim: int, patch_out_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(dims[-1], out_dim, bias=False)
        self.last_layer2 = (
            nn.Linear(dims[-1], patch_out_dim, bias=False) if patch_out_dim is not None else None
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (..., bottleneck_dim)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of CLS features (..., D) -> (..., out_dim)."""
        return self.last_layer(self.embed(x))

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of patch tokens (..., D) -> (..., patch_out_dim); ``last_layer`` if shared."""
        layer = self.last_layer2 if self.last_layer2 is not None else self.last_layer
        return layer(self.embed(x))


def build_head(head_state: Mapping[str, torch.Tensor]) -> ProjectionHead:
    """A :class:`ProjectionHead` holding ``head_state`` (keys as in ``encoder.head_state``)."""
    linear = sorted(
        int(m.group(1)) for k in head_state if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k))
    )
    if "mlp.weight" in head_state:  # nlayers=1: the MLP is a single Linear
        weights = [head_state["mlp.weight"]]
        state = {
            ("mlp.0." + k[4:] if k.startswith("mlp.") else k): v for k, v in head_state.items()
        }
    else:
        weights = [head_state[f"mlp.{i}.weight"] for i in linear]
        remap = {old: 2 * new for new, old in enumerate(linear)}
        state = {}
        for k, v in head_state.items():
            m = re.fullmatch(r"mlp\.(\d+)\.(.+)", k)
            state[f"mlp.{remap.get(int(m.group(1)), -1)}.{m.group(2)}" if m else k] = v
    if not weights or "last_layer.weight" not in head_state:
        raise CheckpointError(
            f"unsupported projection-head layout (keys: {sorted(head_state)[:10]}); "
            "expected mlp.N.weight/bias and last_layer.weight."
        )
    dims = [weights[0].shape[1]] + [w.shape[0] for w in weights]
    l2 = head_state.get("last_layer2.weight")
    head = ProjectionHead(
        dims, head_state["last_layer.weight"].shape[0], None if l2 is None else l2.shape[0]
    )
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"unsupported projection-head layout: {str(exc).splitlines()[0]} "
            "(only Linear/GELU MLP heads are supported)."
        ) from exc
    return head
