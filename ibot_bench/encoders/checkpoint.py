"""Safe checkpoint reading, layout normalisation and checked loading.

Reading never runs pickled code: ``torch.load(weights_only=True)`` with a small
allow-list (what official iBOT/DINO files need), or safetensors. Loading never
silently skips weights: a key mismatch is a :class:`CheckpointError` listing what
differs (docs/protocols.md#checkpoint-format: the reference loads with ``strict=False`` and a wrong
key gives random features, a top complaint).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
import sys
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ibot_bench.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

_NP_CORE = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray


def _safe_globals() -> list:
    """Globals official checkpoints pickle besides tensors: ``args`` and numpy values in it."""
    dtype_classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGUSO"}
    allowed: list = [argparse.Namespace, np.dtype, np.ndarray, *sorted(dtype_classes, key=str)]
    for name in ("scalar", "_reconstruct"):
        fn = getattr(_NP_CORE, name)
        allowed += [fn, (fn, f"numpy.core.multiarray.{name}")]  # numpy 1.x pickles
    return allowed


# ---------------------------------------------------------------- file hashing
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed; cached per (path, size, mtime) for the process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def fingerprint(spec: str, path: str | Path | None = None) -> str:
    """Encoder fingerprint: sha256 of the weights file's hash and the spec (spec alone if none)."""
    file_hash = file_sha256(path) if path is not None else ""
    return hashlib.sha256(f"{file_hash}\n{spec}".encode()).hexdigest()


# ---------------------------------------------------------------- reading
def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # u64 header length, then JSON


def _unsafe_globals(path: Path, exc: Exception) -> list[str]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) format: parse torch's message instead
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    allowed = {
        g
        if isinstance(g, str)
        else (g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__name__}")
        for g in _safe_globals()
    }
    return [n for n in names if n not in allowed] or names


WEIGHT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt", ".safetensors", ".bin")


def not_a_file(path: Path, spec: str = "") -> CheckpointError:
    """The error for a weights path that is no file: missing, or a folder (then naming the
    weights files inside it, e.g. a pretraining run's ``checkpoint.pth``)."""
    if not path.is_dir():
        named = f" {spec!r}" if spec else ""
        return CheckpointError(
            f"checkpoint not found: {path}. Check the path in the encoder spec{named}."
        )
    inside = sorted(p.name for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not inside:
        return CheckpointError(
            f"{path} is a folder with no weights file (.pth, .pt, .safetensors, ...) in it; "
            "pass the weights file itself."
        )
    file = path / ("checkpoint.pth" if "checkpoint.pth" in inside else inside[0])
    fixed = spec.replace(str(path), str(file), 1) if str(path) in spec else str(file)
    return CheckpointError(
        f"{path} is a folder, not a weights file; it holds {', '.join(inside)}. "
        f"Did you mean {fixed}?"
    )


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in a weights file (safetensors or torch), without running pickled code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise not_a_file(path)
    if _is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read safetensors file {path} ({exc}); it is truncated or corrupt. "
                "Re-download or re-save it."
            ) from exc
    with path.open("rb") as f:
        head = f.read(2)
    is_zip = head == b"PK"
    if head and not is_zip and head[:1] != b"\x80":  # a torch file is a zip or a pickle
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (a zip archive or a pickle) nor a safetensors "
            f"file: it starts with {head!r}. Pass the weights file itself (.pth / .safetensors)."
        )
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        check_tensor_sizes(obj, path)
        return obj
    except pickle.UnpicklingError as exc:
        if "Unsupported operand" in str(exc):
            raise _new_pickle_protocol(path) from exc
        if "Unsupported global" not in str(exc) and "GLOBAL" not in str(exc):
            raise _corrupt(path, exc) from exc
        unsafe = _unsafe_globals(path, exc)
        load = "sd = torch.load(path, weights_only=False)"
        if any(n.startswith("torch.nn.modules.") for n in unsafe):  # torch.save(model)
            load = f"`{load}.state_dict()`"
        else:
            load = f"`{load}['state_dict']` (or the 'teacher'/'model' entry)"
        raise CheckpointError(
            f"{path} contains pickled Python objects that are not plain weights "
            f"({', '.join(unsafe) or 'unknown'}); ibot-bench never runs pickled code. Re-save "
            f"only the state dict, in an environment you trust: {load}, then "
            "`torch.save(sd, 'weights.pth')` or save it as safetensors."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        raise _corrupt(path, exc) from exc


def _tensors(obj: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 8 and isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, depth + 1)
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value, depth + 1)


def check_tensor_sizes(obj: Any, path: Path) -> None:
    """Refuse tensors that claim more elements than their stored bytes hold.

    A crafted file can save a huge shape over a tiny storage (stride tricks); an encoder
    inferred from such shapes would try to allocate tens of GB before any other check.
    Every real weight is backed by its own bytes in the file.
    """
    for t in _tensors(obj):
        needed = t.numel() * t.element_size()
        if t.numel() > 1 and needed > t.untyped_storage().nbytes():
            raise CheckpointError(
                f"{path}: a tensor of shape {tuple(t.shape)} ({needed / 2**30:.1f} GiB) is "
                f"backed by only {t.untyped_storage().nbytes()} bytes: the file is crafted or "
                "corrupt, not a weights file; nothing was built from it"
            )


def _new_pickle_protocol(path: Path) -> CheckpointError:
    """The error for a pickle torch's safe loader cannot parse: protocol 4 or later
    (``torch.save(..., pickle_protocol=4)``, or ``pickle.dump``), not a damaged file."""
    return CheckpointError(
        f"{path} was pickled with protocol 4 or later (torch.save(..., pickle_protocol=4) or "
        "pickle.dump), which torch's safe loader (weights_only=True) cannot read; ibot-bench "
        "never runs pickled code. Re-save it, in an environment you trust, with torch's default "
        "protocol or as safetensors: `torch.save(torch.load(path, weights_only=False), "
        "'weights.pth')`."
    )


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    msg = first_line(exc).rstrip(".")
    return CheckpointError(
        f"cannot read checkpoint {path}: {msg}. The file is probably truncated or corrupt "
        "(an interrupted copy or download?), or not a PyTorch/safetensors file. "
        "Re-download or re-save it."
    )


# ---------------------------------------------------------------- layouts
# in order of preference: an EMA copy (DeiT's model_ema, timm's state_dict_ema) only when
# the file holds no plain one, as DeiT's and timm's own evaluation scripts read the plain one
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:8]
        return f"a dict with keys {keys}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def select_state_dict(
    obj: Any, which: str | None = None, *, path: str | Path = ""
) -> tuple[dict[str, torch.Tensor], str]:
    """The tensor dict for one network of a checkpoint, and a label of where it was found.

    Accepts full iBOT/DINO checkpoints (``student``/``teacher``, also inside a wrapper;
    ``which`` picks one, default teacher), ``{'state_dict'|'model'|'module': ...}`` wrappers
    (an EMA copy only without a plain one, :data:`_WRAPPER_KEYS`), flat dicts, and any other
    sub-dict named by ``which`` (e.g. ``model_ema``). A ``which`` that names no sub-dict is
    left to :func:`select_network` as a key prefix.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds {_describe(obj)}, not a state dict. Save `model.state_dict()` "
            "(a dict of name -> tensor) instead."
        )
    where: list[str] = []
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        if which is not None and which not in where and isinstance(obj.get(which), Mapping):
            key = which
        elif "teacher" in obj or "student" in obj:
            key = which if which in ("teacher", "student") else "teacher"
            if key not in obj:
                other = "student" if key == "teacher" else "teacher"
                raise CheckpointError(
                    f"{path} has no '{key}' weights (keys: {list(obj)[:8]}); "
                    f"ask for ':{other}' at the end of the encoder spec."
                )
        else:
            key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if key is None:
                break
        obj, where = obj[key], [*where, key]
    if which == "student" and "student" not in where:
        raise CheckpointError(
            f"{path} holds a single network ({_describe(obj)}), not a full training checkpoint "
            "with student and teacher; drop ':student' from the spec."
        )
    tensors = (
        {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    if not tensors or len(tensors) < len(obj) / 2:
        raise CheckpointError(
            f"{path} holds {_describe(obj)}, not a state dict. Expected a full iBOT/DINO "
            "checkpoint (student/teacher), {'state_dict': ...}, {'model': ...} or a flat dict "
            "of tensors."
        )
    return {str(k): v for k, v in tensors.items()}, "/".join(where) or "flat"


def _key_roots(state: Mapping[str, torch.Tensor]) -> str:
    """The first key components and their counts, e.g. ``base_encoder (150), head (2)``."""
    roots = Counter(k.split(".")[0] for k in state)
    return ", ".join(f"{root} ({n})" for root, n in roots.most_common(8))


def select_network(
    obj: Any, which: str | None, marker: str, *, path: str | Path, spec: str
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """One network's prefix-free weights from checkpoint ``obj``: ``(state, where, ignored)``.

    :func:`select_state_dict`, then :func:`strip_prefixes`, then, when the weights of the
    network sit under a further key prefix (``encoder.``, ``model.encoder.``, MoCo's
    ``base_encoder.``), that prefix is removed and keys outside it are ``ignored``. The prefix
    is ``which`` when it names no sub-dict, else found from ``marker``, a key every such
    network has (e.g. ``patch_embed.proj.weight``); several candidates are an error that asks
    for one, as ``SPEC:NAME``.
    """
    state, where = select_state_dict(obj, which, path=path)
    state = strip_prefixes(state)
    if which not in (None, "teacher", "student") and which not in where.split("/"):
        prefix = which.rstrip(".") + "."
        if not any(k.startswith(prefix) for k in state):
            held = f"its keys start with {_key_roots(state)}."
            if where.split("/")[-1] in ("teacher", "student"):  # the default network was read
                parent = obj
                for key in where.split("/")[:-1]:
                    parent = parent[key]
                nets = [n for n in ("teacher", "student") if n in parent]
                held = (
                    f"it holds the network(s) {', '.join(f':{n}' for n in nets)}; the "
                    f"{where.split('/')[-1]}'s keys start with {_key_roots(state)}."
                )
            raise CheckpointError(
                f"{path} has no network {which!r}: no sub-dict and no keys {prefix}*; {held}"
            )
    else:
        found = sorted(
            {k[: -len(marker)] for k in state if k == marker or k.endswith("." + marker)}
        )
        if not found or "" in found:
            return state, where, []
        if len(found) > 1:
            names = ", ".join(repr(p.rstrip(".")) for p in found)
            raise CheckpointError(
                f"{path} holds {len(found)} networks, under {names}. Name the one to load at "
                f"the end of the spec, e.g. {spec}:{found[0].rstrip('.')}"
            )
        prefix = found[0]
        log.info("%s: reading the network under key prefix %r", path, prefix)
    inside = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if not k.startswith(prefix)]
    label = prefix.rstrip(".") if where == "flat" else f"{where}/{prefix.rstrip('.')}"
    return inside, label, ignored


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's ``module.``, the wrapper's ``backbone.`` and ``torch.compile``'s ``_orig_mod.``
    prefixes (in any combination): the weights of a compiled model are the model's own."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def split_head(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, list[str]]:
    """Split prefix-stripped keys into (backbone, projection head or None, ignored keys).

    When ``head.mlp.*`` or ``head.last_layer*`` keys exist, all ``head.*`` keys form
    the iBOT/DINO projection head; otherwise ``head.*`` stays (a timm classifier or
    head norm). The student's ``masked_embed`` is ignored: it is not part of the
    backbone's forward pass on unmasked images.
    """
    is_proj = any(k.startswith(("head.mlp.", "head.last_layer")) for k in state)
    backbone, head, ignored = {}, {}, []
    for key, value in state.items():
        if is_proj and key.startswith("head."):
            head[key[len("head.") :]] = value
        elif key == "masked_embed":
            ignored.append(key)
        else:
            backbone[key] = value
    return backbone, (normalise_head(head) if head else None), ignored


def drop_classifier(
    state: Mapping[str, torch.Tensor], names: tuple[str, ...]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove classifier weights (``names`` like ``head``, ``fc``): encoders have no classifier."""
    kept, dropped = {}, []
    for key, value in state.items():
        if any(key.startswith(f"{n}.") for n in names):
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The effective weight ``g * v / ||v||`` of ``nn.utils.weight_norm`` (dim 0)."""
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return g * v / norm


def normalise_head(head: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head keys with weight-norm folded into ``last_layer*.weight``; a shared ``last_layer2``
    (``shared_head=True`` saves the same module twice) is dropped."""
    out = dict(head)
    for layer in ("last_layer", "last_layer2"):
        for g_key, v_key in (
            (f"{layer}.weight_g", f"{layer}.weight_v"),
            (
                f"{layer}.parametrizations.weight.original0",
                f"{layer}.parametrizations.weight.original1",
            ),
        ):
            if g_key in out and v_key in out:
                out[f"{layer}.weight"] = fold_weight_norm(out.pop(g_key), out.pop(v_key))
    if "last_layer2.weight" in out and torch.equal(
        out["last_layer2.weight"], out.get("last_layer.weight", torch.empty(0))
    ):
        del out["last_layer2.weight"]  # shared_head: the same module saved twice
    return {k: v.detach().clone() for k, v in out.items()}


# ---------------------------------------------------------------- checked loading
@dataclass
class KeyReport:
    """How a state dict's keys compare with a model's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint (..) vs model (..)"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def partial_info(self) -> dict:
        """What an encoder's info records of this load: ``partial`` and, for a partial
        load (``--allow-partial``), the keys that did not match."""
        if self.ok:
            return {"partial": False}
        keys = {"missing": self.missing, "unexpected": self.unexpected}
        return {"partial": True, "partial_keys": {**keys, "mismatched": self.mismatched}}

    def summary(self, limit: int = 10) -> str:
        parts = []
        for name, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{len(keys)} {name}: {', '.join(keys[:limit])}{more}")
        return "; ".join(parts) or "all keys match"


def compare_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyReport:
    expected = model.state_dict()
    report = KeyReport(
        missing=[k for k in expected if k not in state],
        unexpected=[k for k in state if k not in expected],
    )
    for key, value in state.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            report.mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            )
    return report


def load_checked(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    allow_partial: bool,
    source: str,
    fix: str = "",
) -> KeyReport:
    """Load ``state`` into ``model``; any key difference is an error unless ``allow_partial``."""
    report = compare_keys(model, state)
    if not report.ok:
        if not allow_partial:
            raise CheckpointError(
                f"weights in {source} do not match the model: {report.summary()}. "
                f"{fix + ' ' if fix else ''}To load the matching weights anyway and leave the "
                "rest randomly initialised, pass allow_partial=True (--allow-partial)."
            )
        print(f"[ibot-bench] partial load of {source}: {report.summary()}", file=sys.stderr)
    bad = {m.split(":")[0] for m in report.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k not in bad}, strict=False)
    return report


def checkpoint_args(obj: Any, path: str | Path | None = None) -> dict[str, Any]:
    """The training ``args`` of a full checkpoint as a dict, else the string metadata of the
    safetensors file ``path`` (ibot-bench's backbone export names ``num_heads`` there, which
    the weights' shapes do not tell); {} if neither."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    if path is None or not _is_safetensors(Path(path)):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
