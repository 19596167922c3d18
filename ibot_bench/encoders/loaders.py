"""Encoder-spec schemes, registered as objects in :data:`ENCODERS`.

Each :class:`EncoderScheme` owns its part of the spec grammar: it parses the body (what
follows ``SCHEME:``), names the weights file a fingerprint hashes (without building
anything) and builds the :class:`Encoder` with its :class:`EncoderInfo`. Nothing outside a
scheme looks at a spec's body.
"""

from __future__ import annotations

import math
import os
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ibot_bench.encoders.base import Encoder, EncoderInfo
from ibot_bench.encoders.checkpoint import (
    checkpoint_args,
    drop_classifier,
    fingerprint,
    load_checked,
    not_a_file,
    read_checkpoint,
    select_network,
    select_state_dict,
    split_head,
)
from ibot_bench.encoders.timm_encoder import (
    check_model_name,
    create_timm_model,
    find_cached_weights,
    pretrained_tags,
    wrap_timm_model,
)
from ibot_bench.encoders.vit import ViTEncoder, build_vit, infer_vit_config, parse_vit_arch
from ibot_bench.errors import CheckpointError, UserError
from ibot_bench.registry import Registry


class EncoderScheme(ABC):
    """One spec scheme: parse its body, locate its weights, build its encoder."""

    name: str
    usage: str  # the grammar and a one-line description, for `ibot-bench list`

    def weights_path(self, body: str) -> Path | None:
        """The file whose hash fingerprints the encoder (None: the spec alone identifies it)."""
        return None

    def fingerprint(self, body: str, spec: str) -> str:
        """The encoder's fingerprint without building it: hashing the weights is all it costs."""
        path = self.weights_path(body)
        if path is not None and not Path(path).is_file():
            raise not_a_file(Path(path), spec)
        return fingerprint(spec, path)

    @abstractmethod
    def load(self, body: str, *, spec: str, allow_partial: bool = False) -> Encoder:
        """Build the encoder (``allow_partial``: load checkpoints whose keys don't all match)."""


ENCODERS: Registry[EncoderScheme] = Registry("encoder scheme")


def register_scheme(cls: type[EncoderScheme]) -> type[EncoderScheme]:
    """Class decorator: register one instance of a scheme under its ``name``."""
    ENCODERS.add(cls.name, cls(), cls.usage)
    return cls


RANDOM_INIT = "init-2"  # 2: cls_token drawn with std 0.02 as in the reference (was 1e-6)


@register_scheme
class RandomScheme(EncoderScheme):
    """``random:vit_small[_patchP]``: an iBOT ViT with deterministic (seed 0) random weights."""

    name, usage = "random", "random:ARCH  randomly initialised iBOT ViT (seed 0)"

    def load(self, body: str, *, spec: str, allow_partial: bool = False) -> Encoder:
        cfg = parse_vit_arch(body)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build_vit(cfg)
        return ViTEncoder(model, EncoderInfo(spec, cfg.name, self.fingerprint(body, spec), ""))

    def fingerprint(self, body: str, spec: str) -> str:
        # RANDOM_INIT names the initialisation: features cached under an older one differ
        return fingerprint(f"{spec}#{RANDOM_INIT}")


def split_network(body: str) -> tuple[str, str | None]:
    """``PATH[:NET]`` -> (path, network or None). ``NET`` is ``teacher``/``student``, or any
    other name when ``PATH`` exists and the whole of ``body`` does not (paths may hold ``:``)."""
    path, sep, last = body.rpartition(":")
    if sep and path and last and "/" not in last:
        if last in ("teacher", "student"):
            return path, last
        if not Path(body).expanduser().exists() and Path(path).expanduser().exists():
            return path, last
    return body, None


class SSLCheckpointScheme(EncoderScheme):
    """``SCHEME:PATH[:NET]``: an iBOT/DINO ViT whose shape is read off the weights; ``NET`` is
    ``teacher`` (default), ``student``, a sub-dict (``model_ema``) or a key prefix."""

    def parse(self, body: str) -> tuple[Path, str | None]:
        """(checkpoint path, the network asked for or None for the default one)."""
        path, which = split_network(body)
        if not path:
            raise UserError(f"the spec needs a path: {self.name}:PATH[:NET]")
        return Path(path).expanduser(), which

    def weights_path(self, body: str) -> Path:
        return self.parse(body)[0]

    def load(self, body: str, *, spec: str, allow_partial: bool = False) -> Encoder:
        path, which = self.parse(body)
        obj = read_checkpoint(path)
        state, where, outside = select_network(
            obj, which, "patch_embed.proj.weight", path=path, spec=f"{self.name}:{path}"
        )
        backbone, head_state, ignored = split_head(state)
        backbone, dropped = drop_classifier(backbone, ("head",))
        cfg = infer_vit_config(backbone, checkpoint_args(obj, path), source=str(path))
        model = build_vit(cfg)
        report = load_checked(
            model,
            backbone,
            allow_partial=allow_partial,
            source=f"{path} [{where}]",
            fix=f"Is it an iBOT/DINO ViT checkpoint? For other models use timm:NAME:{path}.",
        )
        extra = {
            "network": where,
            "img_size": cfg.img_size,
            "ignored_keys": outside + ignored + dropped,
            "has_head": head_state is not None,
            **report.partial_info(),
        }
        info = EncoderInfo(spec, cfg.name, fingerprint(spec, path), str(path), extra)
        return ViTEncoder(model, info, head_state)


@register_scheme
class IbotScheme(SSLCheckpointScheme):
    """``ibot:PATH[:NET]`` (the teacher by default)."""

    name, usage = (
        "ibot",
        "ibot:PATH[:NET]  iBOT checkpoint (any layout; NET: teacher, student, ...)",
    )


@register_scheme
class DinoScheme(SSLCheckpointScheme):
    """``dino:PATH[:NET]`` (the teacher by default)."""

    name, usage = (
        "dino",
        "dino:PATH[:NET]  DINO checkpoint (any layout; NET: teacher, student, ...)",
    )


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def _swin_window(name: str, state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{"window_size": W}`` for Swin (v1) weights trained with another window than the
    name's (iBOT's Swin-T/14 release: window 14), read off the first block's relative
    position table ((2W - 1)^2 rows); else ``{}``. Resizing that table instead would give
    a different model."""
    table = state.get("layers.0.blocks.0.attn.relative_position_bias_table")
    if table is None or not name.startswith("swin_"):
        return {}
    window = (round(math.sqrt(table.shape[0])) + 1) // 2
    match = re.search(r"window(\d+)", name)
    return {} if match and int(match.group(1)) == window else {"window_size": window}


def _timm_layout(
    model: nn.Module, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` in ``model``'s key layout, and the converter used (None: already in it).

    Weights saved by a model family's original code (the official Swin layout of iBOT's
    Swin-T releases: downsampling at the end of a stage) go through timm's own
    ``checkpoint_filter_fn`` for that family, kept only if it matches the model better.
    """

    own = set(model.state_dict())
    before = len(own ^ set(state))
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if before == 0 or convert is None:
        return state, None
    try:
        converted = convert(dict(state), model)
    except Exception:  # a converter for other layouts: keep the keys as they are
        return state, None
    if len(own ^ set(converted)) >= before:
        return state, None
    return dict(converted), f"{module.__name__}.checkpoint_filter_fn"


def _fit_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Resize a checkpoint's ViT ``pos_embed`` to the model's grid (bicubic); True if resized."""
    pos, target = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if not isinstance(target, torch.Tensor) or pos is None or pos.shape == target.shape:
        return False
    if pos.dim() != 3 or pos.shape[-1] != target.shape[-1]:
        return False  # reported as a shape mismatch
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    state["pos_embed"] = resample_abs_pos_embed(
        pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix
    )
    return True


def _load_timm_pretrained_offline(name: str) -> tuple[nn.Module, Path]:
    path = find_cached_weights(name)
    if path is None and os.environ.get("IBOT_BENCH_DOWNLOAD") == "1":
        timm.create_model(name, pretrained=True)  # the user opted in: fill timm's cache once
        path = find_cached_weights(name)
    if path is None:
        tags = pretrained_tags(name)
        tag_hint = f" Known pretrained tags: {', '.join(tags[:5])}." if tags and "." in name else ""
        raise CheckpointError(
            f"pretrained weights for timm model {name!r} could not be found offline (nothing in "
            "the Hugging Face or torch hub cache) and ibot-bench does not download by default. Pass "
            f"the weights file: timm:{name}:/path/to/weights, or set IBOT_BENCH_DOWNLOAD=1 to let "
            f"timm download them into its cache once.{tag_hint}"
        )
    state, _ = select_state_dict(read_checkpoint(path), path=path)
    kwargs = {"pretrained": True, "num_classes": 0}
    kwargs["pretrained_cfg_overlay"] = {"state_dict": state, "source": ""}
    try:
        try:
            model = timm.create_model(name, dynamic_img_size=True, **kwargs)
        except TypeError:
            model = timm.create_model(name, **kwargs)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"cached weights {path} do not fit {name!r}: {exc}") from exc
    return model, path


@register_scheme
class TimmScheme(EncoderScheme):
    """``timm:NAME[:PATH[:NET]]``: weights from PATH, else from the local cache (never the network)."""

    name, usage = "timm", "timm:NAME[:PATH[:NET]]  any timm model, weights from PATH or cache"

    def parse(self, body: str) -> tuple[str, Path | None, str | None]:
        """(timm model name, weights file or None for the locally cached pretrained weights,
        the network of the file asked for as ``PATH:NET`` or None)."""
        if body.startswith("hf-hub:"):
            raise UserError(_hf_hub_advice(body))
        name, _, path_str = body.partition(":")
        if not path_str:
            return name, None, None
        path_str, which = split_network(path_str)
        return name, Path(path_str).expanduser(), which

    def weights_path(self, body: str) -> Path | None:
        name, path, _ = self.parse(body)
        return path if path is not None else find_cached_weights(name)

    def load(self, body: str, *, spec: str, allow_partial: bool = False) -> Encoder:
        name, path, which = self.parse(body)
        check_model_name(name)
        if path is None:
            model, path = _load_timm_pretrained_offline(name)
            extra = {"pretrained": True}
            info = EncoderInfo(spec, name, fingerprint(spec, path), str(path), extra)
            return wrap_timm_model(model, info)
        return _load_timm_checkpoint(name, path, which, spec, allow_partial)


def _hf_hub_advice(body: str) -> str:
    """What to write instead of timm's ``hf-hub:ORG/NAME`` (a name timm would download)."""
    repo = body.removeprefix("hf-hub:").split(":")[0]
    org, _, tag = repo.rpartition("/")
    same = (
        f"timm:{tag}, which reads the same weights from the local Hugging Face cache "
        "(IBOT_BENCH_DOWNLOAD=1 lets timm fetch them once), or "
    )
    return (
        f"timm:hf-hub:... names are not read: use {same if org == 'timm' else ''}"
        "timm:ARCH:PATH with the weights file (e.g. timm:vit_small_patch16_224:model.safetensors)."
    )


def _first_key(name: str) -> str:
    """The first weight name of timm model ``name`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return next(iter(create_timm_model(name).state_dict()))


def _load_timm_checkpoint(
    name: str, path: Path, which: str | None, spec: str, allow_partial: bool
) -> Encoder:
    """timm model ``name`` with the backbone weights of checkpoint ``path`` (checked)."""
    obj = read_checkpoint(path)
    state, where, outside = select_network(
        obj, which, _first_key(name), path=path, spec=f"timm:{name}:{path}"
    )
    backbone, head_state, ignored = split_head(state)
    model_kwargs = _swin_window(name, backbone)
    model = create_timm_model(name, **model_kwargs)
    backbone, converter = _timm_layout(model, backbone)
    backbone, dropped = drop_classifier(backbone, _classifier_names(model))
    resized = _fit_pos_embed(model, backbone)
    report = load_checked(
        model,
        backbone,
        allow_partial=allow_partial,
        source=f"{path} [{where}]",
        fix=f"Are these weights of a {name!r}? Check the model name in the spec.",
    )
    extra = {
        "network": where,
        **({"converted_by": converter} if converter else {}),
        **model_kwargs,
        "ignored_keys": outside + ignored + dropped,
        "pos_embed_resized": resized,
        **report.partial_info(),
    }
    if converter or model_kwargs:
        how = [f"converted by {converter}"] if converter else []
        how += [f"{k} {v} (from the weights)" for k, v in model_kwargs.items()]
        print(f"[ibot-bench] {name} from {path}: {', '.join(how)}", file=sys.stderr)
    info = EncoderInfo(spec, name, fingerprint(spec, path), str(path), extra)
    return wrap_timm_model(model, info, head_state)
