"""Encoders: turn an encoder spec string into an :class:`Encoder` (DESIGN.md, "Encoder spec").

Spec grammar (one loader per scheme, see :data:`ENCODERS`)::

    random:ARCH                    ARCH = vit_tiny|vit_small|vit_base|vit_large[_patchP]
    ibot:PATH[:teacher|student]    iBOT checkpoint, any official layout (teacher default)
    dino:PATH[:teacher|student]    DINO checkpoint, same layouts
    timm:NAME[:PATH]               any timm model; weights from PATH or the local cache
"""

from __future__ import annotations

from pathlib import Path

from ibot_bench.encoders.base import Encoder, EncoderInfo
from ibot_bench.encoders.checkpoint import fingerprint
from ibot_bench.encoders.head import ProjectionHead, build_head
from ibot_bench.encoders.loaders import ENCODERS, EncoderLoader, _split_which
from ibot_bench.encoders.timm_encoder import find_cached_weights
from ibot_bench.errors import CheckpointError, UserError
from ibot_bench.registry import RegistryError

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderInfo",
    "EncoderLoader",
    "ProjectionHead",
    "build_head",
    "encoder_fingerprint",
    "load_encoder",
]


def _parse(spec: str) -> tuple[str, str]:
    scheme, sep, body = spec.partition(":")
    if not sep or not body:
        known = ", ".join(f"{s}:..." for s in ENCODERS)
        hint = f" (a file? try ibot:{spec})" if not sep and ("/" in spec or "." in spec) else ""
        raise UserError(f"encoder spec {spec!r} must look like SCHEME:...; schemes: {known}{hint}")
    if scheme not in ENCODERS:
        try:
            ENCODERS.get(scheme)
        except RegistryError as exc:
            raise UserError(f"{exc} (in encoder spec {spec!r})") from None
    return scheme, body


def encoder_fingerprint(spec: str) -> str:
    """The fingerprint :func:`load_encoder` would record, without building the model.

    Hashing the weights file is all it costs, so caches and the suite runner can skip
    finished work before any model is loaded.
    """
    scheme, body = _parse(spec)
    if scheme in ("ibot", "dino"):
        path, _ = _split_which(scheme, body)
    elif scheme == "timm":
        name, _, path_str = body.partition(":")
        path = Path(path_str).expanduser() if path_str else find_cached_weights(name)
    else:
        path = None
    if path is not None and not Path(path).is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}. Check the path in the encoder spec {spec!r}."
        )
    return fingerprint(spec, path)


def load_encoder(spec: str, *, allow_partial: bool = False) -> Encoder:
    """Build the encoder named by ``spec``, in eval mode.

    ``allow_partial=True`` loads checkpoints whose keys do not all match (printing
    the differences) instead of raising :class:`~ibot_bench.errors.CheckpointError`.
    """
    scheme, body = _parse(spec)
    loader = ENCODERS.get(scheme)
    return loader(body, spec=spec, allow_partial=allow_partial).eval()
