"""Short display names for encoders: what leaderboards show instead of full specs.

``--encoder NAME=SPEC`` names an encoder; the rule (:func:`split_named`) is that the text
before the first ``=`` is a name only when it is *plain*: no ``:``, ``/``, ``\\`` or ``?``.
So ``ours=ibot:ckpt.pth`` is named ``ours``, while ``ibot:ckpt.pth?key=val`` (the ``=``
sits after the scheme's ``:``) is a spec. Without a name one is derived from the spec
(:func:`derive_name`): ``ibot:.../quick/checkpoint.pth`` -> ``quick``,
``ibot:.../quick/checkpoint_init.pth`` -> ``quick-init``, ``random:vit_small`` ->
``random-vit_small``, ``timm:vit_small_patch16_224`` -> ``vit_small_patch16_224``.
The same spec always gets the same name; specs whose names would collide get a short hash
of the spec appended (:func:`disambiguate`), while two encoders *given* one name is an error.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import PurePath

from ibot_bench.errors import UserError

_PLAIN = re.compile(r"[^:/\\?]+")
_VIEWS = ("teacher", "student")
# characters that reorder the text around them (Unicode bidi controls): a name holding one
# could show as another, so they are refused in names and shown escaped (leaderboard.printable)
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def split_named(arg: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` -> ``(NAME, SPEC)`` when the part before the first ``=`` is a plain name
    (no ``:``, ``/``, ``\\``, ``?``); anything else is a bare spec: ``(None, arg)``."""
    head, sep, spec = arg.partition("=")
    if not sep:
        return None, arg
    if head and not _PLAIN.fullmatch(head):
        if _scheme(spec) and not _scheme(arg):  # NAME=SPEC whose NAME holds a ':', '/', ...
            held = " ".join(dict.fromkeys(c for c in head if c in ":/\\?"))
            raise UserError(
                f"--encoder {arg!r}: the name {head!r} holds {held}, which a name may not "
                "(the text before '=' would be read as part of a spec); use a name without "
                "':', '/', '\\' and '?'"
            )
        return None, arg
    name = head.strip()
    if not name or not spec:
        raise UserError(f"--encoder {arg!r}: write NAME=SPEC with a non-empty name and spec")
    if not _scheme(spec) and _scheme(spec.partition("=")[2]):  # a=b=ibot:x.pth
        raise UserError(f"--encoder {arg!r}: a name may not hold '='; use another name")
    if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in name):
        raise UserError(
            f"--encoder {arg!r}: the name holds control or text-direction characters; "
            "use plain text"
        )
    return name, spec


def _scheme(text: str) -> str | None:
    """The registered encoder scheme ``text`` starts with (``ibot`` of ``ibot:x.pth``)."""
    from ibot_bench.encoders import ENCODERS  # imports torch: only when a name is checked

    scheme, sep, _ = text.partition(":")
    return scheme if sep and scheme in ENCODERS else None


def derive_name(spec: str) -> str:
    """A short, stable name for ``spec`` (see the module docstring for examples)."""
    scheme, _, body = spec.partition(":")
    body = body.partition("?")[0]
    if scheme == "random" and body:
        return f"random-{body}"
    if scheme == "timm" and body:
        model, _, path = body.partition(":")
        return f"{model}-{PurePath(path).stem}" if path else model
    path, sep, view = body.rpartition(":")
    if not (sep and view in _VIEWS):
        path, view = body, ""
    name = _file_name(path) if path else spec
    return f"{name}-{view}" if view == "student" else name


def _file_name(path: str) -> str:
    """``run/quick/checkpoint_init.pth`` -> ``quick-init``; ``dino_s16.pth`` -> ``dino_s16``."""
    p = PurePath(path)
    if not p.stem.startswith("checkpoint") or not p.parent.name:
        return p.stem or path
    rest = p.stem.removeprefix("checkpoint").strip("_-.")
    return f"{p.parent.name}-{rest}" if rest else p.parent.name


def spec_hash(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:6]


def disambiguate(names: Mapping[str, str]) -> dict[str, str]:
    """spec -> name, where a name shared by several specs gets ``-<hash of spec>`` appended."""
    specs_of: dict[str, list[str]] = {}
    for spec, name in names.items():
        specs_of.setdefault(name, []).append(spec)
    return {
        spec: name if len(specs_of[name]) == 1 else f"{name}-{spec_hash(spec)}"
        for spec, name in names.items()
    }


def name_encoders(args: Sequence[str]) -> dict[str, str]:
    """``--encoder`` values (``[NAME=]SPEC``) -> {spec: display name}, in order.

    Two encoders given the same name, or one spec given two names, is a :class:`UserError`;
    derived names that collide are made unique with :func:`disambiguate`.
    """
    given: dict[str, str] = {}
    derived: dict[str, str] = {}
    for arg in args:
        name, spec = split_named(arg)
        if name is None:
            derived.setdefault(spec, derive_name(spec))
            continue
        if given.get(spec, name) != name:
            raise UserError(f"encoder {spec!r} is given two names: {given[spec]!r} and {name!r}")
        clash = [s for s, n in given.items() if n == name and s != spec]
        if clash:
            raise UserError(
                f"two encoders are named {name!r} ({clash[0]!r} and {spec!r}); "
                "give each --encoder NAME=SPEC a different NAME"
            )
        given[spec] = name
    derived = {s: n for s, n in derived.items() if s not in given}
    taken = set(given.values())
    unique = disambiguate(derived)
    unique = {s: f"{derive_name(s)}-{spec_hash(s)}" if n in taken else n for s, n in unique.items()}
    order = list(dict.fromkeys(split_named(a)[1] for a in args))
    return {spec: given.get(spec) or unique[spec] for spec in order}
