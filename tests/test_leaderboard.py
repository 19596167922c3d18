"""Leaderboards at a glance: one headline metric per protocol, short display names with a
legend, best per column marked, a heatmap <= 1600 px coloured against a baseline."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from ibot_bench.cli import main
from ibot_bench.display_names import derive_name, name_encoders, split_named
from ibot_bench.errors import UserError
from ibot_bench.leaderboard import headline_boards, long_frame
from ibot_bench.leaderboard_png import MAX_WIDTH_PX, cell_colours
from ibot_bench.records import ResultRecord, read_records

QUICK = "ibot:results/quick/pretrain/quick/checkpoint.pth"
INIT = "ibot:results/quick/pretrain/quick/checkpoint_init.pth"
DINO = "dino:/ckpt/dino_deitsmall16_pretrain.pth"
# (task, protocol, metrics) per group; the gain is added to every metric of an encoder
RUNS = {
    "shapes-32px": [
        ("knn", "knn", {"top1": 30.0, "top5": 60.0, "top1_k10": 29.0, "best_k": 10.0}),
        ("linear", "linear", {"top1": 20.0, "top5": 50.0}),
        ("cluster", "cluster-kmeans", {"nmi": 10.0, "ari": 5.0, "acc": 25.0}),
        ("cluster-head", "cluster-head", {"nmi": 8.0, "acc": 22.0}),
        ("semi", "semi-10pct", {"logreg_top1": 15.0, "knn_top1": 14.0, "linear_top1": 13.0}),
        ("semi-finetune", "semi-ft-head-10pct", {"top1": 12.0, "top5": 40.0}),
        ("finetune", "finetune", {"top1": 40.0, "top5": 80.0, "best_epoch": 3.0}),
    ],
    "digits-32px": [
        ("knn", "knn", {"top1": 50.0, "top5": 90.0}),
        ("logreg", "logreg", {"top1": 60.0, "top5": 85.0}),
    ],
}
GAIN = {QUICK: 10.0, INIT: 0.0, DINO: 5.0}
HEADLINE = {
    "shapes-32px": ["kNN top-1", "linear top-1", "k-means NMI", "head NMI", "semi 10% top-1",
                    "semi-ft 10% top-1", "fine-tune top-1"],
    "digits-32px": ["kNN top-1", "logreg top-1"],
}  # fmt: skip


def _record(spec: str, group: str, task: str, protocol: str, metrics: dict, name: str = ""):
    encoder = {"spec": spec, "fingerprint": hashlib.sha256(spec.encode()).hexdigest()}
    if name:
        encoder["name"] = name
    return ResultRecord(
        task=task,
        protocol=protocol,
        encoder=encoder,
        dataset={"spec": f"synthetic:{group}", "group": group, "fingerprint": group},
        metrics=metrics,
        config={"seeds": [0]},
    )


def _write_suite(folder, names: dict[str, str] | None = None) -> list[ResultRecord]:
    """3 encoders x 2 groups of records; the DINO one loses fine-tuning (best stays init)."""
    written = []
    for spec, gain in GAIN.items():
        for group, runs in RUNS.items():
            for task, protocol, metrics in runs:
                bump = -gain if task == "finetune" else gain
                values = {m: v + bump for m, v in metrics.items()}
                record = _record(spec, group, task, protocol, values, (names or {}).get(spec, ""))
                record.write(folder)
                written.append(record)
    return written


def _md_table(text: str, group: str) -> list[list[str]]:
    part = text.split(f"## {group}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]


def test_display_names_rule():
    assert split_named("ours=ibot:out/checkpoint.pth") == ("ours", "ibot:out/checkpoint.pth")
    assert split_named("my run 2=random:vit_small") == ("my run 2", "random:vit_small")
    for spec in ("ibot:ckpt.pth?key=val", "synthetic:shapes?x=1", "a/b=c", "ibot:x", "x?y=z"):
        assert split_named(spec) == (None, spec)  # '=' after ':', '/' or '?': a spec
    for arg in (" =ibot:x", "=ibot:x", "a="):
        with pytest.raises(UserError, match="non-empty name and spec"):
            split_named(arg)
    # a name holding ':', '/', '\\' or '?' before a real spec was silently taken as a spec
    # (every entry then failed with "unknown encoder scheme"): it is named instead
    for arg, held in (("<b>x</b>=random:vit_tiny", "/"), ("v1: ours=ibot:x.pth", ":"),
                      ("$\\alpha$=timm:vit_small_patch16_224", "\\")):  # fmt: skip
        with pytest.raises(UserError, match=f"the name .* holds {re.escape(held)}, which"):
            split_named(arg)
    with pytest.raises(UserError, match="a name may not hold '='"):
        split_named("a=b=random:vit_tiny")
    assert split_named("a=ibot:x.pth?key=val") == ("a", "ibot:x.pth?key=val")
    with pytest.raises(UserError, match="text-direction"):
        split_named("a\u202eb=random:vit_tiny")
    assert derive_name(QUICK) == "quick" and derive_name(INIT) == "quick-init"
    assert derive_name("timm:vit_small_patch16_224") == "vit_small_patch16_224"
    assert derive_name("random:vit_tiny_patch8") == "random-vit_tiny_patch8"
    assert derive_name(DINO + ":student") == "dino_deitsmall16_pretrain-student"
    named = name_encoders(
        ["ibot:a/quick/checkpoint.pth", "ibot:b/quick/checkpoint.pth", "x=" + INIT]
    )
    assert list(named.values())[2] == "x" and len(set(named.values())) == 3
    assert named == name_encoders(["ibot:a/quick/checkpoint.pth", "ibot:b/quick/checkpoint.pth",
                                   "x=" + INIT])  # fmt: skip  # stable
    assert all(n.startswith("quick-") for n in list(named.values())[:2])
    with pytest.raises(UserError, match="two encoders are named 'a'"):
        name_encoders(["a=random:vit_tiny_patch8", "a=random:vit_tiny_patch16"])


def test_old_records_get_a_derived_name_and_names_are_validated(tmp_path):
    data = json.loads(_record(QUICK, "g", "knn", "knn", {"top1": 1.0}).to_json())
    assert "name" not in data["encoder"]  # written before names existed
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "old.json").write_text(json.dumps(data))
    data["encoder"]["name"] = ["x"]
    (tmp_path / "records" / "bad.json").write_text(json.dumps(data))
    records, errors = read_records(tmp_path)
    assert [r.display_name for r in records] == ["quick"]
    assert len(errors) == 1 and "encoder['name'] must be a non-empty string" in errors[0][1]


def test_leaderboard_three_encoders_two_groups(tmp_path, capsys):
    res = tmp_path / "res"
    records = _write_suite(res, {DINO: "dino <b>S</b>|16"})
    assert main(["report", str(res)]) == 0
    text = capsys.readouterr().out
    assert text == (res / "leaderboard.md").read_text() + "\n"
    for group, columns in HEADLINE.items():
        table = _md_table(text, group)
        assert table[0] == ["encoder", *columns]  # one headline per protocol run, in order
        rows = {r[0]: r[1:] for r in table[2:]}
        assert set(rows) == {"quick", "quick-init (baseline)", r"dino \<b\>S\</b\>\|16"}
        best = {c: [n for n, cells in rows.items() if cells[i].startswith("**")]
                for i, c in enumerate(columns)}  # fmt: skip
        for column, winners in best.items():
            assert winners == ["quick-init (baseline)" if column == "fine-tune top-1" else "quick"]
        assert rows["quick"][0] == f"**{RUNS[group][0][2]['top1'] + 10:.2f}**"
    for hidden in ("top5", "ari", "best_k", "top1_k10", "knn_top1"):  # detail stays out
        assert hidden not in text.split("columns (protocol metric)")[0], hidden
    # legend: the full spec and fingerprint of each name, what each column is
    fingerprint = {r.encoder["spec"]: r.encoder["fingerprint"][:12] for r in records}
    for spec in (QUICK, INIT):
        name = derive_name(spec)
        assert re.search(
            rf"^- {re.escape(name)}( \(baseline\))?: {re.escape(spec.replace('_', chr(92) + '_'))}, "
            rf"fingerprint {fingerprint[spec]}$",
            text,
            re.M,
        ), name
    assert r"- dino \<b\>S\</b\>\|16: dino:/ckpt/dino\_deitsmall16\_pretrain.pth" in text
    assert "semi 10% top-1 = semi-10pct logreg\\_top1" in text
    assert "leaderboard.png colours the difference from quick-init" in text
    assert "<b>" not in text
    # every metric remains in records.csv and --detail
    assert "ari" in (res / "records.csv").read_text()
    assert main(["report", str(res), "--detail"]) == 0
    detail = capsys.readouterr().out
    assert "cluster-kmeans ari" in detail
    # its rows by the same short names, their specs below each table
    assert {r[0] for r in _md_table(detail, "digits-32px")[2:]} == set(rows) - {
        "quick-init (baseline)"
    } | {"quick-init"}
    assert (
        rf"- quick: {QUICK.replace('_', chr(92) + '_')}, fingerprint {fingerprint[QUICK]}" in detail
    )
    assert r"- dino \<b\>S\</b\>\|16: dino:/ckpt/dino\_deitsmall16\_pretrain.pth" in detail
    assert "<b>" not in detail
    assert main(["report", str(res), "--detail", "--format", "html"]) == 0
    html = capsys.readouterr().out
    assert "<li>quick: " in html and "dino &lt;b&gt;S&lt;/b&gt;|16" in html and "<b>S" not in html
    with Image.open(res / "leaderboard.png") as image:
        assert image.width <= MAX_WIDTH_PX and image.height < 2000


def test_baseline_colouring(tmp_path):
    _write_suite(tmp_path)
    long = long_frame(read_records(tmp_path)[0])
    boards = headline_boards(long)
    assert [b.baseline for b in boards] == ["quick-init", "quick-init"]  # the default
    colour, diff, cmap, note = cell_colours(boards[0])
    rows = list(boards[0].table.index)
    assert cmap == "RdBu" and "difference from quick-init" in note
    assert np.all(diff[rows.index("quick-init")] == 0)  # the centre of the diverging map
    quick = diff[rows.index("quick")]
    assert np.allclose(quick[:-1], 10.0) and quick[-1] == -10.0  # fine-tune: 40-10 vs 40
    assert colour.min() == -1.0 and np.all(np.abs(colour) <= 1)
    chosen = headline_boards(long, baseline="quick")
    assert cell_colours(chosen[0])[1][rows.index("quick")].tolist() == [0.0] * len(quick)
    # no random/init encoder: no baseline, plain per-column colouring, and it says so
    plain = [r for r in read_records(tmp_path)[0] if r.encoder["spec"] != INIT]
    boards = headline_boards(long_frame(plain))
    assert boards[0].baseline is None
    colour, diff, cmap, note = cell_colours(boards[0])
    assert diff is None and "scaled per column" in note
    assert np.nanmax(colour) == 1.0 and np.nanmin(colour) == -1.0


def test_bad_leaderboard_input(tmp_path, capsys):
    _write_suite(tmp_path / "res")
    assert main(["report", str(tmp_path / "res"), "--baseline", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'nope' is not an encoder" in err
    assert "'quick'" in err and "'quick-init'" in err and "'dino_deitsmall16_pretrain'" in err
    # two encoders given one display name: refused before any work
    out = tmp_path / "dup"
    code = main(["run", "--suite", "smoke", "--output", str(out),
                 "--encoder", "a=random:vit_tiny_patch8", "--encoder", "a=random:vit_tiny_patch16"])  # fmt: skip
    assert code == 2 and "two encoders are named 'a'" in capsys.readouterr().err
    assert not out.exists()
    code = main(["run", "--suite", "smoke", "--output", str(out),
                 "--encoder", "a=random:vit_tiny_patch8", "--baseline", "b"])  # fmt: skip
    assert code == 2 and "--baseline 'b' is not one of" in capsys.readouterr().err
    assert not out.exists()


def test_run_records_the_display_name(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--suite", "smoke", "--tasks", "knn", "--output", str(out),
                 "--encoder", "tiny <i>8 *x*|y=random:vit_tiny_patch8"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    (record,) = read_records(out)[0]
    assert record.encoder["name"] == "tiny <i>8 *x*|y" == record.display_name
    assert "tiny <i>8 *x*|y" in printed and "random:vit_tiny_patch8" in printed  # name, legend
    text = (out / "leaderboard.md").read_text()
    assert r"tiny \<i\>8 \*x\*\|y" in text and "<i>" not in text


def test_new_weights_behind_one_spec_never_mix_with_old_records(tmp_path, capsys):
    """The same path with new weights (a new fingerprint), rerun for kNN only: the row
    holds only the new weights' results, the legend and a warning name the left-out ones."""
    res = tmp_path / "res"

    def write(fingerprint: str, task: str, protocol: str, metrics: dict, when: str) -> None:
        record = _record(QUICK, "digits", task, protocol, metrics, "ours")
        record.encoder["fingerprint"], record.timestamp = fingerprint * 16, when
        record.write(res)

    write("a", "knn", "knn", {"top1": 50.0}, "2026-01-01T00:00:00+00:00")
    write("a", "cluster-head", "cluster-head", {"nmi": 7.0}, "2026-01-01T00:01:00+00:00")
    write("b", "knn", "knn", {"top1": 60.0}, "2026-01-02T00:00:00+00:00")
    assert main(["report", str(res), "--format", "md"]) == 0
    out, err = capsys.readouterr()
    assert _md_table(out, "digits")[2] == ["ours", "**60.00**"]  # no head NMI of old weights
    assert f"fingerprint {'b' * 12} (records of earlier weights, fingerprint {'a' * 12}" in out
    assert "7.00" not in out and "50.00" not in out
    assert f"ours ({QUICK}) now has fingerprint {'b' * 12}; 1 record(s)" in err
    assert "cluster-head [cluster-head] on digits" in err and "--tasks cluster-head)" in err
    assert main(["report", str(res), "--format", "md", "--detail"]) == 0
    detail = capsys.readouterr().out
    assert "60.00" in detail and "7.00" not in detail and "50.00" not in detail


def test_report_on_a_folder_without_records_names_the_right_one(tmp_path, capsys):
    """The records/ folder itself, or a parent of results folders: an error saying which
    folder to pass, and nothing written (it used to write empty leaderboards)."""
    _write_suite(tmp_path / "runs" / "a")
    (tmp_path / "runs" / "b" / "records").mkdir(parents=True)
    cases = {
        tmp_path / "runs" / "a" / "records": f"pass its parent, {tmp_path / 'runs' / 'a'}",
        tmp_path / "runs": f"inside it are: {tmp_path / 'runs' / 'a'} {tmp_path / 'runs' / 'b'}",
        tmp_path / "runs" / "a" / "configs": "pass the --output folder",
    }
    (tmp_path / "runs" / "a" / "configs").mkdir()
    for folder, hint in cases.items():
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder} is not a results folder (it has no records/" in err and hint in err
        assert not list(folder.glob("leaderboard*")) and not (folder / "records.csv").exists()


def test_heatmap_of_many_encoders_draws_the_baseline_and_the_best(tmp_path, monkeypatch):
    """3,000 encoders made a 126,000 px tall PNG (2 minutes, a 'decompression bomb' to
    PIL); a panel now draws at most MAX_ROWS rows: the baseline, then the best."""
    from ibot_bench import leaderboard_png

    monkeypatch.setattr(leaderboard_png, "MAX_ROWS", 4)
    records = [
        _record(f"random:vit_tiny?{i}", "g", task, task, {metric: float(i + bump)}, f"e{i}")
        for i in range(10)
        for task, metric, bump in (("knn", "top1", 0), ("cluster", "nmi", 10 * (i == 2)))
    ]
    boards = headline_boards(long_frame(records), baseline="e3")
    assert leaderboard_png.shown_rows(boards[0]) == ["e3", "e9", "e8", "e7"]
    leaderboard_png.write_heatmap(boards, tmp_path / "board.png")
    with Image.open(tmp_path / "board.png") as image:
        assert image.height < 1.4 * 100 + 0.42 * 100 * 5


def test_heatmap_names_without_a_glyph_give_one_line(tmp_path, caplog, recwarn):
    """A name the font cannot draw gave matplotlib's UserWarning per character, with the
    source line; now one note that says where the names are complete."""
    from ibot_bench.leaderboard_png import write_heatmap

    record = _record(INIT, "g", "knn", "knn", {"top1": 1.0}, "init \U000f0000\U000f0001")
    write_heatmap(headline_boards(long_frame([record])), tmp_path / "board.png")
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    assert "no glyph in matplotlib's font" in caplog.text and "leaderboard.md" in caplog.text


def test_report_with_no_valid_records_leaves_no_stale_board(tmp_path, capsys):
    """Records gone (or all corrupt): leaderboard.png kept the last run's numbers while the
    tables said "No records yet", and the CSV formats printed a bare ``""``."""
    records = _write_suite(tmp_path)
    assert main(["report", str(tmp_path)]) == 0 and (tmp_path / "leaderboard.png").is_file()
    for record in records:
        (tmp_path / "records" / f"{record.key()}.json").write_text("{")  # all corrupt now
    capsys.readouterr()
    for args in ([], ["--detail"]):
        assert main(["report", str(tmp_path), "--format", "csv", *args]) == 0
        assert capsys.readouterr().out.strip() == "encoder"
        assert main(["report", str(tmp_path), "--format", "html", *args]) == 0
        assert "No records yet." in capsys.readouterr().out
    assert not (tmp_path / "leaderboard.png").exists()
    assert (tmp_path / "leaderboard.csv").read_text().splitlines()[1] == "encoder"


def test_report_reads_a_folder_given_twice_once(tmp_path, capsys, monkeypatch):
    """``report res res/`` (or a shell glob overlapping a name) doubled records.csv."""
    records = _write_suite(tmp_path / "res")
    monkeypatch.chdir(tmp_path)
    assert main(["report", "res", "res/", "./res", "--output", "out"]) == 0
    rows = (tmp_path / "out" / "records.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(len(r.metrics) for r in records)


def test_csv_cells_never_run_as_spreadsheet_formulas(tmp_path, capsys):
    """A name or spec starting with ``= + - @`` is written with a leading ``'`` in every
    CSV (records, leaderboard, ``report --format csv``), so Excel shows it as text."""
    import pandas as pd

    evil = '=HYPERLINK("http://x")'
    names = {QUICK: "+ours", INIT: "@init", DINO: "-dino"}
    records = _write_suite(tmp_path, names)
    extra = _record(evil, "digits-32px", "knn", "knn", {"top1": 1.0}, "plain")
    extra.dataset["spec"] = "-data"
    extra.write(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    long = pd.read_csv(tmp_path / "records.csv")
    text = {v for v in long.to_numpy().ravel() if isinstance(v, str)}
    assert not any(v.startswith(("=", "+", "-", "@")) for v in text)
    assert {"'+ours", "'@init", "'-dino", f"'{evil}", "'-data"} <= text
    assert len(long) == sum(len(r.metrics) for r in [*records, extra])
    board = pd.read_csv(tmp_path / "leaderboard.csv", comment="#", header=[0, 1], index_col=0)
    assert {"'+ours", "'@init", "'-dino", "plain"} <= set(board.index)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--format", "csv", "--detail"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith(("=", "+", "-", "@")) for line in lines)
    assert any(line.startswith("\"'=HYPERLINK") for line in lines)  # rows by spec, quoted
    # the Markdown board keeps the names as given
    assert "+ours" in (tmp_path / "leaderboard.md").read_text()
