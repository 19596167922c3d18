"""The protocol spec lives in the repository and every pointer into it lands on a heading."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTER = re.compile(r"docs/(protocols|design)\.md#([\w-]+)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: str) -> set[str]:
    text = FENCED.sub("", (ROOT / "docs" / f"{doc}.md").read_text())
    return {anchor(h) for h in HEADING.findall(text)}


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".csv", ".sh", ".txt", ""}
    return [ROOT / p for p in out.stdout.split() if Path(p).suffix in suffixes]


def test_no_citation_of_files_outside_the_repository():
    stale = [
        str(p.relative_to(ROOT))
        for p in tracked_text_files()
        if p.is_file() and re.search(r"ibot-protocols\.md|DESIGN\.md", p.read_text(errors="ignore"))
    ]
    assert not stale, f"cite docs/protocols.md or docs/design.md instead: {stale}"


def test_every_cited_anchor_exists():
    known = {doc: anchors(doc) for doc in ("protocols", "design")}
    cited, missing = 0, []
    for path in tracked_text_files():
        if not path.is_file():
            continue
        for doc, name in POINTER.findall(path.read_text(errors="ignore")):
            cited += 1
            if name not in known[doc]:
                missing.append(f"{path.relative_to(ROOT)}: docs/{doc}.md#{name}")
    assert cited > 50, "the code should cite the protocol spec"
    assert not missing, missing


def test_protocol_spec_covers_every_protocol():
    expected = {
        "pretraining", "knn", "linear-probe", "logistic-regression", "full-fine-tuning",
        "semi-supervised", "clustering", "detection", "segmentation", "published-results",
    }  # fmt: skip
    assert expected <= anchors("protocols")
    assert {"data-path", "module-map"} <= anchors("design")
