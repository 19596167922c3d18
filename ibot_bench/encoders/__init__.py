"""Encoders: turn an encoder spec string into an :class:`Encoder` (docs/design.md#data-path).

Spec grammar (one registered :class:`EncoderScheme` per scheme, see :data:`ENCODERS`)::

    random:ARCH                    ARCH = vit_tiny|vit_small|vit_base|vit_large[_patchP]
    ibot:PATH[:NET]                iBOT checkpoint, any official layout (teacher default;
                                   NET: student, a sub-dict or a key prefix)
    dino:PATH[:NET]                DINO checkpoint, same layouts
    timm:NAME[:PATH[:NET]]         any timm model; weights from PATH or the local cache
"""

from __future__ import annotations

from ibot_bench.encoders.base import Encoder, EncoderInfo
from ibot_bench.encoders.head import ProjectionHead, build_head
from ibot_bench.encoders.loaders import ENCODERS, EncoderScheme
from ibot_bench.errors import UserError
from ibot_bench.registry import RegistryError

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderInfo",
    "EncoderScheme",
    "ProjectionHead",
    "build_head",
    "check_spec",
    "encoder_fingerprint",
    "load_encoder",
]


def _scheme(spec: str) -> tuple[EncoderScheme, str]:
    """The registered scheme of ``spec`` and the spec's body (what follows ``SCHEME:``)."""
    scheme, sep, body = spec.partition(":")
    if not sep or not body:
        known = ", ".join(f"{s}:..." for s in ENCODERS)
        hint = f" (a file? try ibot:{spec})" if not sep and ("/" in spec or "." in spec) else ""
        raise UserError(f"encoder spec {spec!r} must look like SCHEME:...; schemes: {known}{hint}")
    try:
        return ENCODERS.get(scheme), body
    except RegistryError as exc:
        raise UserError(f"{exc} (in encoder spec {spec!r})") from None


def check_spec(spec: str) -> None:
    """A :class:`UserError` when ``spec`` is not ``SCHEME:...`` with a registered scheme."""
    _scheme(spec)


def encoder_fingerprint(spec: str) -> str:
    """The fingerprint :func:`load_encoder` would record, without building the model.

    Hashing the weights file is all it costs, so caches and the suite runner can skip
    finished work before any model is loaded.
    """
    scheme, body = _scheme(spec)
    return scheme.fingerprint(body, spec)


def load_encoder(spec: str, *, allow_partial: bool = False) -> Encoder:
    """Build the encoder named by ``spec``, in eval mode.

    ``allow_partial=True`` loads checkpoints whose keys do not all match (printing
    the differences) instead of raising :class:`~ibot_bench.errors.CheckpointError`.
    """
    scheme, body = _scheme(spec)
    return scheme.load(body, spec=spec, allow_partial=allow_partial).eval()
