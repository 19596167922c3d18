"""Training checkpoints in the official iBOT layout (docs/protocols.md#checkpoint-format), written atomically.

``checkpoint.pth`` holds ``student`` (``module.``-prefixed, as the reference's DDP-wrapped
student), ``teacher``, ``optimizer``, ``epoch`` (completed epochs), ``args`` (flat,
reference-named fields plus the full ``config`` and its ``config_history``), ``ibot_loss``
(centers) and ``fp16_scaler`` when fp16 is on; plus what exact resumption needs:
``epoch_iter`` (batches done in the current epoch), ``iteration``, ``rng``, the
``resume_signature`` (every setting that changes the run, :func:`resume_signature`) and
``optimizer_param_names`` (which parameter each optimizer slot belongs to).

Reading goes through ``torch.load(weights_only=True, mmap=True)``: no pickled code runs, and
the tensors are only mapped, so :func:`check_shapes` can compare every shape with the
configured model before anything is allocated (a file claiming huge tensors costs nothing).
A reference checkpoint (no signature, no names, maybe no ``args``) is read too: its
optimizer slots are paired in the reference's parameter order (:func:`pair_optimizer_state`).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ibot_bench.encoders.checkpoint import _safe_globals
from ibot_bench.errors import CheckpointError, first_line
from ibot_bench.io import atomic_write, remove_stale_temps

CHECKPOINT = "checkpoint.pth"
PREVIOUS = "checkpoint_prev.pth"  # the checkpoint.pth before the last write (hard link)
INIT = "checkpoint_init.pth"
BACKBONE_EXPORT = "teacher_backbone.safetensors"
CONFIG = "config.yaml"
HISTORY = "config_history.yaml"
LOG = "log.jsonl"
PLOT = "training.png"
OUTPUT_FILES = (CHECKPOINT, PREVIOUS, INIT, BACKBONE_EXPORT, CONFIG, HISTORY, LOG, PLOT)
REQUIRED_KEYS = ("student", "teacher", "optimizer", "epoch", "ibot_loss")

# Config keys that never change the trained numbers: where and how fast the run goes, what
# it logs, when it writes checkpoints and where it stops. Everything else of the resolved
# config (data, seed, precision, model, head, crops, mask, loss, optim) plus the dataset
# fingerprint is the resume signature (README "Pretraining", /tmp/readme_pretrain_trust.md).
RUNTIME_KEYS = (
    "output_dir",
    "device",
    "num_workers",
    "threads",
    "compile",
    "progress",
    "log_every",
    "tensorboard",
    "eval_clusters",
    "monitor_knn",
    "plot",
    "save_every_iters",
    "saveckp_freq",
    "save_init",
    "max_iters",
    "time_limit_min",
)
# Settings that change tensor shapes or the set of trained tensors: even --force-resume
# cannot continue across them (the weights do not fit).
ARCH_KEYS = (
    "model.arch",
    "model.patch_size",
    "model.embed_dim",
    "model.depth",
    "model.num_heads",
    "head.out_dim",
    "head.patch_out_dim",
    "head.hidden_dim",
    "head.bottleneck_dim",
    "head.shared_head",
    "head.shared_head_teacher",
    "head.norm_last_layer",
)
_SMALL = 1 << 24  # elements: the cap for any tensor the model does not give a shape for


# ---------------------------------------------------------------- writing
def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """``torch.save`` via a temp file + rename: a crash never leaves a half-written file."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def keep_previous(out: Path) -> bool:
    """Hard-link ``checkpoint.pth`` as ``checkpoint_prev.pth`` before it is replaced (no copy;
    the old file survives the rename). False, and no stale ``checkpoint_prev.pth``, where
    there is nothing to keep or links are not supported."""
    current, previous = out / CHECKPOINT, out / PREVIOUS
    if not current.is_file():
        return False
    tmp = out / f".{PREVIOUS}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(current, tmp)
        os.replace(tmp, previous)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        previous.unlink(missing_ok=True)
        return False


def export_backbone(path: Path, backbone: torch.nn.Module) -> Path:
    """The teacher backbone alone as safetensors (flat timm/iBOT keys), e.g. for ``ibot:``;
    its metadata names ``num_heads``, which ``ibot:`` cannot read off a custom width's weights."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    meta = {"format": "pt", "num_heads": str(backbone.blocks[0].attn.num_heads)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def check_output_dir(out: Path) -> None:
    """Refuse, before anything is built, an output folder whose files pretrain will write
    are not plain files (a folder named ``checkpoint.pth`` would crash the first save); drop
    the temp files that killed runs left there."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(
            f"output_dir {out} is a file, not a folder; choose another output_dir (--output)."
        )
    try:  # a parent that is a file, a read-only or full disk: said now, not at the first save
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)  # what a killed run left half-written (a checkpoint: GBs)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write to output_dir {out} ({exc.strerror or exc}); choose a writable "
            "output_dir (--output)."
        ) from None
    names = set(OUTPUT_FILES) | {p.name for p in out.glob("checkpoint*.pth")}
    for name in sorted(names):
        path = out / name
        if (path.exists() or path.is_symlink()) and not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file (a broken link?)"
            raise CheckpointError(
                f"{path} is {kind}, but pretrain writes a file there; move or delete it, or "
                "choose another output_dir (--output)."
            )


# ---------------------------------------------------------------- reading
def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint (ours or the reference's), read without running pickled code and
    with its tensors memory-mapped (nothing is allocated until :func:`check_shapes` passed)."""
    if not path.exists():
        raise CheckpointError(f"resume checkpoint {path} not found; check --resume")
    if not path.is_file():
        inside = path / CHECKPOINT
        hint = f"pass --resume {inside}" if inside.is_file() else "pass a checkpoint file"
        raise CheckpointError(
            f"resume checkpoint {path} is a directory, not a checkpoint file; {hint} (or, if "
            "it is this run's checkpoint.pth, move the directory away)."
        )
    fix = (
        "Resume from a snapshot (checkpointNNNN.pth or checkpoint_prev.pth, with --resume), or "
        "move the file away to start from scratch."
    )
    try:
        with path.open("rb") as f:
            is_zip = f.read(2) == b"PK"
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({_one_line(exc)}); it is truncated, corrupt or not a "
            f"PyTorch checkpoint. {fix}"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a training checkpoint dict. {fix}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} is not a full training checkpoint (missing {', '.join(missing)}; has "
            f"{', '.join(sorted(map(str, obj))[:8]) or 'nothing'}); resume needs the "
            f"checkpoint.pth that iBOT pretraining writes. {fix}"
        )
    if not isinstance(obj["epoch"], int) or obj["epoch"] < 0:
        raise CheckpointError(f"{path}: 'epoch' is {obj['epoch']!r}, not a count. {fix}")
    return obj


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_shapes(
    path: Path, part: str, state: Any, expected: Mapping[str, torch.Size]
) -> dict[str, torch.Tensor]:
    """``state`` if it has exactly the keys and shapes of ``expected`` (read from the mapped
    file: no tensor data is touched); else a one-line error naming the differences."""
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{path}: '{part}' is a {type(state).__name__}, not a state dict; the file is corrupt "
            "or not a training checkpoint."
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad = [
        f"{k}: checkpoint {_shape(state[k])} vs model {list(shape)}"
        for k, shape in expected.items()
        if k in state
        and not (isinstance(state[k], torch.Tensor) and tuple(state[k].shape) == tuple(shape))
    ]
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(map(str, unexpected[:4]))})")
        if bad:
            parts.append(f"{len(bad)} shape(s) differ ({'; '.join(bad[:4])})")
        raise CheckpointError(
            f"{path}: its {part} does not fit the configured model: {', '.join(parts)}. It was "
            "written for another architecture (or is corrupt): set the config it was trained "
            "with, or choose another output_dir."
        )
    return dict(state)


def check_small_tensors(path: Path, obj: Any, where: str = "") -> None:
    """Every tensor in ``obj`` (the parts the model gives no shape for: rng, scaler, ...)
    stays small, so nothing reads or allocates a huge claimed tensor."""
    if isinstance(obj, torch.Tensor):
        if obj.numel() > _SMALL:
            raise CheckpointError(
                f"{path}: {where or 'a tensor'} claims shape {list(obj.shape)}, far larger than "
                "anything a training checkpoint holds there; the file is corrupt. Resume from a "
                "snapshot or start in a new output_dir."
            )
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            check_small_tensors(path, v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_small_tensors(path, v, f"{where}[{i}]")


def legacy_order(names: list[list[str]]) -> list[list[str]]:
    """Parameter order of ibot-bench before weight_g was registered first (weight_v, weight_g)."""
    out = []
    for group in names:
        g = list(group)
        for i in range(len(g) - 1):
            if g[i].endswith(".weight_g") and g[i + 1] == g[i][: -len("g")] + "v":
                g[i], g[i + 1] = g[i + 1], g[i]
        out.append(g)
    return out


def pair_optimizer_state(
    path: Path,
    saved: Any,
    current: list[list[str]],
    shapes: Mapping[str, torch.Size],
    saved_names: list[list[str]] | None = None,
) -> dict[str, Any]:
    """The optimizer state dict of ``saved`` re-indexed for the current parameter order.

    ``current``: per group, the names of the optimizer's parameters in order; ``shapes``:
    their shapes. A checkpoint of ours names its slots (``saved_names``); a reference
    checkpoint does not, and its slots follow the reference order (groups regularised then
    not, each in ``named_parameters`` order with ``weight_g`` before ``weight_v``) = ours.
    Older ibot-bench files had ``weight_v`` first: that order is tried when the reference
    order does not fit the shapes. Every moment tensor must have its parameter's shape."""
    if not (
        isinstance(saved, Mapping)
        and isinstance(saved.get("state"), Mapping)
        and isinstance(saved.get("param_groups"), list)
        and all(
            isinstance(g, Mapping) and isinstance(g.get("params"), list)
            for g in saved["param_groups"]
        )
    ):
        raise CheckpointError(
            f"{path}: 'optimizer' is not an optimizer state dict (state + param_groups); the "
            "file is corrupt or not a training checkpoint."
        )
    groups, state = saved["param_groups"], saved["state"]
    sizes = [len(g["params"]) for g in groups]
    if saved_names is not None:
        if [sorted(g) for g in saved_names] != [sorted(g) for g in current]:
            raise CheckpointError(
                f"{path}: the optimizer's parameter groups ({[len(g) for g in saved_names]} "
                f"tensors) do not match the model's ({[len(g) for g in current]}); it was "
                "written for another model or head.norm_last_layer setting."
            )
        candidates = [saved_names]
    else:
        candidates = [current, legacy_order(current)]
    slot: dict[Any, str] = {}
    problems = []
    for names in candidates:
        problem = _slot_problem(groups, state, names, shapes, sizes)
        if not problem:
            slot = {idx: n for g, ns in zip(groups, names) for idx, n in zip(g["params"], ns)}
            break
        problems.append(problem)
    else:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit the model's parameters ({problems[0]}); it "
            "was written for another model, or is corrupt. Set the config it was trained with, "
            "or choose another output_dir."
        )
    index = {n: i for i, n in enumerate(n for g in current for n in g)}
    new_state = {
        index[slot[idx]]: {
            k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()
        }
        for idx, st in state.items()
    }
    new_groups = []
    for g, ns in zip(groups, current):
        group = {k: v for k, v in g.items() if k != "params"}
        group["params"] = [index[n] for n in ns]
        new_groups.append(group)
    return {"state": new_state, "param_groups": new_groups}


def _slot_problem(
    groups: list[Mapping],
    state: Mapping,
    names: list[list[str]],
    shapes: Mapping[str, torch.Size],
    sizes: list[int],
) -> str:
    """Why ``state`` does not fit when its slots are ``names`` ("" when it fits)."""
    if [len(g) for g in names] != sizes:
        return f"groups of {sizes} tensors vs the model's {[len(g) for g in names]}"
    slot = {idx: n for g, ns in zip(groups, names) for idx, n in zip(g["params"], ns)}
    for idx, st in state.items():
        if idx not in slot:
            return f"state for slot {idx!r}, which no group lists"
        if not isinstance(st, Mapping):
            return f"slot {idx!r} holds a {type(st).__name__}"
        for k, v in st.items():
            if k == "step" and not isinstance(v, torch.Tensor):
                continue
            if not isinstance(v, torch.Tensor):
                return f"{k} of {slot[idx]} is a {type(v).__name__}"
            want = (1,) if k == "step" else tuple(shapes[slot[idx]])
            ok = v.numel() <= 1 if k == "step" else tuple(v.shape) == want
            if not ok:
                return f"{k} of {slot[idx]}: checkpoint {list(v.shape)} vs parameter {list(want)}"
    return ""


# ---------------------------------------------------------------- resume signature
def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_signature(config: Mapping[str, Any], data_fingerprint: str | None) -> dict[str, Any]:
    """What must match to resume: the flattened resolved config without :data:`RUNTIME_KEYS`,
    plus the training split's fingerprint (its files, sizes, labels: :meth:`fingerprint`)."""
    flat = {k: v for k, v in flatten(config).items() if k not in RUNTIME_KEYS}
    flat["data_fingerprint"] = data_fingerprint
    return flat


def saved_signature(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """A checkpoint's resume signature: stored, or (older ibot-bench files) rebuilt from
    ``args.config`` without a data fingerprint; None for reference files (no config)."""
    sig = obj.get("resume_signature")
    if isinstance(sig, Mapping):
        return dict(sig)
    args = obj.get("args")
    config = args.get("config") if isinstance(args, Mapping) else None
    if isinstance(config, Mapping):
        sig = resume_signature(config, None)
        del sig["data_fingerprint"]  # not recorded: not compared
        return sig
    return None


def _show(key: str, value: Any) -> str:
    if key == "data_fingerprint" and isinstance(value, str):
        return value[:12]
    return repr(value)


def signature_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """{key: (checkpoint value, config value)} over the keys both record."""
    return {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}


def check_resume(
    path: Path, diff: Mapping[str, tuple], force: bool, history: str = HISTORY
) -> None:
    """Refuse a resume whose settings differ from the checkpoint's (``--force-resume``
    continues deliberately, except across the architecture: the weights would not fit)."""
    if not diff:
        return
    detail = ", ".join(
        f"{k}: checkpoint {_show(k, a)} vs config {_show(k, b)}" for k, (a, b) in diff.items()
    )
    arch = [k for k in diff if k in ARCH_KEYS]
    if arch:
        raise CheckpointError(
            f"{path} belongs to a different model ({detail}); refusing to resume into it (the "
            "weights do not fit, not even with --force-resume). Choose another output_dir, or "
            "make the config match the checkpoint."
        )
    if not force:
        raise CheckpointError(
            f"{path} was written by a run with other settings ({detail}); resuming would "
            "silently mix two runs. Set the checkpoint's values to resume it, pass "
            f"--force-resume to continue with the new settings (recorded in {history}), or "
            "choose another output_dir."
        )


def set_aside_output_checkpoint(
    out: Path, source: Path, signature: Mapping[str, Any], force: bool, write: bool
) -> Path | None:
    """Before resuming from ``source`` into ``out`` when ``out`` has a checkpoint.pth of its
    own: refuse if that one belongs to a run with other settings (resuming would overwrite
    it), else rename it ``checkpoint.pth.replaced-STAMP`` (``.unreadable-STAMP`` for a
    corrupt one), so this run's first save overwrites nothing and a corrupt file is never
    rotated into checkpoint_prev.pth. ``write``: rank 0 renames. Returns the new name."""
    current = out / CHECKPOINT
    if not current.is_file() or current.resolve() == source.resolve():
        return None
    kind = "replaced"
    try:
        saved = saved_signature(load_training_checkpoint(current))
    except CheckpointError:
        kind = "unreadable"
    else:
        diff = {} if saved is None else signature_diff(saved, signature)
        if diff and not force:
            detail = ", ".join(
                f"{k}: {current.name} {_show(k, a)} vs config {_show(k, b)}"
                for k, (a, b) in diff.items()
            )
            raise CheckpointError(
                f"{out} holds another run ({detail}); resuming from {source} into it would "
                "overwrite that run's checkpoint.pth. Choose another output_dir (--output), "
                "move its checkpoint.pth away, or pass --force-resume to replace it (it is "
                "kept as checkpoint.pth.replaced-*)."
            )
    aside = current.with_name(f"{CHECKPOINT}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if write:
        os.replace(current, aside)
    return aside


# ---------------------------------------------------------------- finiteness
def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or inf (one device sync per device)."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            by_device.setdefault(t.device, []).append((name, t))
    bad: list[str] = []
    for items in by_device.values():
        flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in items]).cpu().tolist()
        bad += [name for (name, _), ok in zip(items, flags) if not ok]
    return bad


def peek(path: Path) -> dict[str, int] | None:
    """``epoch`` / ``epoch_iter`` / ``iteration`` of a checkpoint (mapped, not read), or None."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {k: int(obj[k]) for k in ("epoch", "epoch_iter", "iteration") if k in obj}
    except Exception:
        return None


# ---------------------------------------------------------------- RNG
def rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].clone())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].clone())
