"""Numbers you can trust: any record file is read safely, names show literally in every
format, the newest record wins by its real instant, non-finite metrics never reach a file."""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from ibot_bench import records as records_module
from ibot_bench.cli import main
from ibot_bench.errors import UserError
from ibot_bench.leaderboard import board, headline_boards, long_frame
from ibot_bench.records import ResultRecord, parse_timestamp, read_records


def _record(encoder="enc", group="grp", protocol="knn", metric="top1", value=70.0, **kw):
    return ResultRecord(
        task="knn",
        protocol=protocol,
        encoder={"spec": encoder, "fingerprint": f"fp-{encoder}"},
        dataset={"spec": f"imagefolder:/{group}", "group": group, "fingerprint": "data"},
        metrics={metric: value},
        config={"seeds": [0]},
        **kw,
    )


def _valid() -> dict:
    return json.loads(_record().to_json())


def _with(**changes) -> str:
    return json.dumps({**_valid(), **changes})


def _without(key: str) -> str:
    data = _valid()
    del data[key]
    return json.dumps(data)


# (file content, fragment of the reason reported)
CORRUPT = {
    "metric_text": (_with(metrics={"top1": "abc"}), "metrics['top1'] must be a finite number"),
    "metric_bool": (_with(metrics={"top1": True}), "metrics['top1'] must be a finite number"),
    "metric_nan": (_with(metrics={"top1": math.nan}), "got a number nan"),
    "metric_inf": (_with(metrics={"top1": -math.inf}), "got a number -inf"),
    "metric_huge_int": (_with(metrics={"top1": 10**400}), "metrics['top1']"),
    "metrics_list": (_with(metrics=[1, 2]), "metrics must be an object, got a list"),
    "metric_over_100": (
        _with(metrics={"top1": 1875.0}),
        "metrics['top1'] is 1875.0, outside [0, 100]",
    ),
    "metric_negative": (_with(metrics={"knn_top1_k20": -0.5}), "outside [0, 100]"),
    "metric_seed_over_100": (_with(metrics={"nmi_seed1": 100.5}), "outside [0, 100]"),
    "ari_over_100": (_with(metrics={"ari": 101.0}), "outside [-inf, 100]"),
    "std_negative": (_with(metrics={"best_k_std": -1.0}), "outside [0, inf]"),
    "encoder_text": (_with(encoder="x"), "encoder must be an object, got a string 'x'"),
    "encoder_no_spec": (_with(encoder={"fingerprint": "f"}), "encoder lacks 'spec'"),
    "encoder_spec_number": (_with(encoder={"spec": 3}), "encoder['spec'] must be a non-empty"),
    "encoder_spec_empty": (_with(encoder={"spec": ""}), "encoder['spec'] must be a non-empty"),
    "dataset_spec_empty": (_with(dataset={"spec": ""}), "dataset['spec'] must be a non-empty"),
    "encoder_name_number": (
        _with(encoder={"spec": "s", "name": 5}),
        "encoder['name'] must be a non-empty string",
    ),
    "encoder_name_empty": (_with(encoder={"spec": "s", "name": ""}), "encoder['name'] must be"),
    "group_number": (
        _with(dataset={"spec": "s", "group": 5, "fingerprint": "d"}),
        "dataset['group'] must be a string",
    ),
    "task_empty": (_with(task=""), "task must be a non-empty string"),
    "protocol_null": (_with(protocol=None), "protocol must be a non-empty string, got null"),
    "timestamp_number": (_with(timestamp=5), "timestamp must be a non-empty string"),
    "timestamp_text": (_with(timestamp="yesterday"), "not an ISO-8601 date and time"),
    "timestamp_missing": (_without("timestamp"), "missing fields ['timestamp']"),
    "timestamp_overflow": (_with(timestamp="0001-01-01T00:00:00+09:00"), "ISO-8601"),
    "seed_text": (_with(seed="0"), "seed must be an integer"),
    "seed_bool": (_with(seed=False), "seed must be an integer, got false"),
    "wall_time_text": (_with(wall_time_s="1s"), "wall_time_s must be a finite number"),
    "config_list": (_with(config=[1]), "config must be an object"),
    "features_text": (_with(config={"features": "fp32"}), "config['features'] must be an object"),
    "details_text": (_with(details="x"), "details must be an object"),
    "versions_number": (_with(versions={"torch": 2}), "versions['torch'] must be a string"),
    "profile_list": (_with(profile=["tiny"]), "profile must be a string"),
    "schema_future": (_with(schema_version=99), "schema_version is 99"),
    "json_list": (json.dumps([_valid()]), "a record must be a JSON object, got a list"),
    "json_number": ("5", "a record must be a JSON object, got an integer"),
    "json_null": ("null", "a record must be a JSON object, got null"),
    "json_broken": ('{"task": ', "not valid JSON"),
    "json_deep_array": ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    "deep_details": (_with(details=json.loads("[" * 200 + "]" * 200)), "nested more than"),
    "not_utf8": (b'{"task": "\xff"}', "not UTF-8"),
}


def _write_corrupt(folder: Path) -> None:
    (folder / "records").mkdir(parents=True, exist_ok=True)
    for name, (content, _) in CORRUPT.items():
        path = folder / "records" / f"{name}.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def test_read_records_skips_every_corrupt_record_with_its_reason(tmp_path):
    _record("good").write(tmp_path)
    _write_corrupt(tmp_path)
    records, errors = read_records(tmp_path)
    assert [r.encoder["spec"] for r in records] == ["good"]
    reasons = {path.stem: reason for path, reason in errors}
    assert set(reasons) == set(CORRUPT)
    for name, (_, fragment) in CORRUPT.items():
        assert fragment in reasons[name], (name, reasons[name])


def test_metrics_that_may_be_negative_or_above_100_are_read(tmp_path):
    """Chance-adjusted scores and COCO's "no ground truth" AP go below 0; counts above 100."""
    metrics = {
        "ari": -12.5,
        "ami": -0.3,
        "bbox_ap": -100.0,
        "segm_ap50": 0.0,
        "best_k": 200.0,
        "best_epoch": 300.0,
        "top1": 100.0,
        "top1_std": 0.0,
        "best_k_std": 150.0,
        "nmi": 100.00000000000001,
    }  # fmt: skip  (a perfect NMI, rounded above 100)
    _record("good").write(tmp_path)
    path = next((tmp_path / "records").glob("*.json"))
    path.write_text(json.dumps({**_valid(), "metrics": metrics}))
    records, errors = read_records(tmp_path)
    assert not errors and records[0].metrics == metrics


def test_oversized_record_is_skipped(tmp_path, monkeypatch):
    _record("good").write(tmp_path)
    (tmp_path / "records" / "huge.json").write_text(_with(details={"blob": "x" * 5000}))
    monkeypatch.setattr(records_module, "MAX_RECORD_BYTES", 4096)
    records, errors = read_records(tmp_path)
    assert len(records) == 1
    ((path, reason),) = errors
    assert path.name == "huge.json" and "more than a record may have" in reason


def test_byte_order_mark_and_unknown_keys_are_tolerated(tmp_path):
    (tmp_path / "records").mkdir()
    text = _with(future_field={"a": 1})
    (tmp_path / "records" / "bom.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, errors = read_records(tmp_path)
    assert len(records) == 1 and not errors


def test_report_warns_and_shows_the_valid_records(tmp_path, capsys):
    _record("good-enc").write(tmp_path / "a")
    _write_corrupt(tmp_path / "a")
    for fmt in ("md", "csv", "html"):
        assert main(["report", str(tmp_path / "a"), "--format", fmt]) == 0
        out, err = capsys.readouterr()
        assert "good-enc" in out and "Traceback" not in err
        warned = re.findall(r"^warning: ignored corrupt record (\S+): ", err, re.M)
        assert sorted(Path(p).stem for p in warned) == sorted(CORRUPT)


def test_run_warns_and_shows_the_valid_records(tmp_path, capsys):
    out = tmp_path / "smoke"
    _record("earlier-enc", group="synthetic-shapes-32px-4cls").write(out)
    _write_corrupt(out)
    code = main(["run", "--suite", "smoke", "--tasks", "knn", "--output", str(out),
                 "--encoder", "random:vit_tiny_patch8"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "1 done" in printed.out
    assert "earlier-enc" in printed.out and "random:vit_tiny_patch8" in printed.out
    warned = re.findall(r"^warning: ignored corrupt record (\S+): ", printed.err, re.M)
    assert sorted(Path(p).stem for p in warned) == sorted(CORRUPT)


# --- names render literally --------------------------------------------------------------

NASTY = {
    "encoder": "enc|pipe <b>bold</b> [red]red[/red] $x$ `tick`\nsecond line",
    "name": "*name*|<b>x</b> [red]r[/red] $z$",  # a display name given with --encoder NAME=SPEC
    "group": "grp|<script>alert(1)</script> [bold]g $y$",
    "protocol": "knn|`p` <i>",
    "metric": r"top1 $\frac$ [u]",
}


def _nasty_report(tmp_path: Path) -> Path:
    """Two encoders, one named; a headline metric (top1) and a nasty one (detail only)."""
    for spec, name, value in ((NASTY["encoder"], NASTY["name"], 71.25), ("plain", "", 60.5)):
        record = _record(spec, NASTY["group"], NASTY["protocol"], "top1", value)
        record.metrics[NASTY["metric"]] = value + 1
        if name:
            record.encoder["name"] = name
        record.write(tmp_path / "res")
    return tmp_path / "res"


def _md_cells(line: str) -> list[str]:
    """A Markdown table row as rendered text: split on unescaped pipes, then undo escapes."""
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # GFM: a backslash-pipe is no separator

    def render(match: re.Match) -> str:
        return "\n" if match.group(0) == "<br>" else match.group(1)

    return [re.sub(r"\\(.)|<br>", render, cell.strip()) for cell in cells]


def test_markdown_shows_names_literally_and_keeps_the_table(tmp_path, capsys):
    res = _nasty_report(tmp_path)
    assert main(["report", str(res), "--format", "md"]) == 0
    text = capsys.readouterr().out
    assert text == (res / "leaderboard.md").read_text() + "\n"
    heading = next(line for line in text.splitlines() if line.startswith("## "))
    assert _md_cells(f"|{heading[3:]}|") == [NASTY["group"]]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 4  # header, rule, two encoders
    widths = {len(re.split(r"(?<!\\)\|", row)) for row in rows}
    assert widths == {4}  # every row: encoder + one headline column
    assert _md_cells(rows[0]) == ["encoder", "kNN top-1"]
    assert _md_cells(rows[2]) == [NASTY["name"], "**71.25**"]  # best in bold
    assert _md_cells(rows[3]) == ["plain", "60.50"]
    legend = [_md_cells(f"|{line[2:]}|")[0] for line in text.splitlines() if line[:2] == "- "]
    assert f"{NASTY['name']}: {NASTY['encoder']}, fingerprint fp-enc|pipe" in legend
    assert f"kNN top-1 = {NASTY['protocol']} top1" in legend[-2]
    for raw in ("<b>", "<script>", "<i>"):  # no live HTML in the Markdown
        assert raw not in text
    # every metric with --detail, rows by the same names, their specs below
    assert main(["report", str(res), "--format", "md", "--detail"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len(rows) == 4
    assert _md_cells(rows[0])[1:] == [
        f"{NASTY['protocol']} top1",
        f"{NASTY['protocol']} {NASTY['metric']}",
    ]
    assert _md_cells(rows[2]) == [NASTY["name"], "71.25", "72.25"]
    legend = [_md_cells(f"|{line[2:]}|")[0] for line in text.splitlines() if line[:2] == "- "]
    assert legend == [f"{NASTY['name']}: {NASTY['encoder']}, fingerprint fp-enc|pipe"]
    for raw in ("<b>", "<script>", "<i>"):
        assert raw not in text


class _Cells(HTMLParser):
    """The text of every <th>/<td> of an HTML table, <br> as a newline."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.cells: list[str] = []
        self.tags: list[str] = []
        self._open = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag in ("th", "td"):
            self.cells.append("")
            self._open = True
        elif tag == "br" and self._open:
            self.cells[-1] += "\n"

    def handle_endtag(self, tag):
        if tag in ("th", "td"):
            self._open = False

    def handle_data(self, data):
        if self._open:
            self.cells[-1] += data


def test_html_shows_names_literally(tmp_path, capsys):
    res = _nasty_report(tmp_path)
    assert main(["report", str(res), "--format", "html"]) == 0
    text = capsys.readouterr().out
    assert text == (res / "leaderboard.html").read_text() + "\n"
    parser = _Cells()
    parser.feed(text)
    tags = {"table", "thead", "tbody", "tr", "th", "td", "br", "b", "p", "h2", "ul", "li"}
    assert set(parser.tags) <= tags
    assert NASTY["name"] in parser.cells and "plain" in parser.cells
    assert "71.25" in parser.cells and "60.50" in parser.cells
    assert html.escape(NASTY["group"]) in text and "<script>" not in text
    assert main(["report", str(res), "--format", "html", "--detail"]) == 0
    text = capsys.readouterr().out
    parser = _Cells()
    parser.feed(text)
    assert set(parser.tags) <= {"table", "thead", "tbody", "tr", "th", "td", "br", "ul", "li"}
    for name in (NASTY["name"], NASTY["group"], f"{NASTY['protocol']} {NASTY['metric']}"):
        assert name in parser.cells, name
    assert html.escape(NASTY["encoder"].split("\n")[0]) in text  # the spec, in the legend
    assert "<b>" not in text and "<script>" not in text
    assert (res / "leaderboard_detail.html").is_file()


def test_csv_round_trips_names(tmp_path, capsys):
    res = _nasty_report(tmp_path)
    assert main(["report", str(res), "--format", "csv"]) == 0
    printed = capsys.readouterr().out
    lines = (res / "leaderboard.csv").read_text().split("\n", 1)
    assert lines[0].startswith("# Generated") and printed == lines[1] + "\n"
    rows = list(csv.reader(io.StringIO(lines[1])))
    assert rows[0] == ["group", NASTY["group"]]
    assert rows[1] == ["column", "kNN top-1"]
    assert [r[0] for r in rows[3:]] == [NASTY["name"], "plain"]
    assert all(len(r) == len(rows[0]) for r in rows)
    long_rows = list(csv.DictReader(io.StringIO((res / "records.csv").read_text())))
    assert {r["encoder"] for r in long_rows} == {NASTY["encoder"], "plain"}
    assert {r["name"] for r in long_rows} == {NASTY["name"], "plain"}
    assert {r["metric"] for r in long_rows} == {"top1", NASTY["metric"]}
    assert main(["report", str(res), "--format", "csv", "--detail"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[1] == [
        "column",
        f"{NASTY['protocol']} top1",
        f"{NASTY['protocol']} {NASTY['metric']}",
    ]
    assert [r[0] for r in rows[3:] if r] == [NASTY["encoder"], "plain"]


def test_heatmap_is_written_with_literal_labels(tmp_path, capsys):
    res = _nasty_report(tmp_path)
    _record("x" * 5000, NASTY["group"], NASTY["protocol"], "top1", 1.0).write(res)
    assert main(["report", str(res)]) == 0
    capsys.readouterr()
    with Image.open(res / "leaderboard.png") as image:
        assert image.width <= 1600 and image.height < 4000  # a 5000-char name is cut


def test_terminal_board_shows_names_literally(tmp_path, capsys):
    from ibot_bench.cli import _print_board

    name = NASTY["encoder"].replace("\n", " ") + " :cat: \x1b[31m"
    records = [_record(name, NASTY["group"], NASTY["protocol"], "top1", 71.25)]
    records[0].encoder["name"] = NASTY["name"] + " :dog:"
    _print_board(headline_boards(long_frame(records)), "title [bold]t[/bold]")
    out = capsys.readouterr().out
    flat = re.sub(r"[\s│┃]+", " ", out)
    assert "title [bold]t[/bold]: " in flat and "[script]" not in flat
    fragments = ("<b>bold</b>", "[red]red[/red]", "$x$", ":cat:", "\\x1b[31m", "knn|`p` <i>",
                 "*name*|<b>x</b>", "[red]r[/red] $z$", ":dog:", "71.25*")  # fmt: skip
    for fragment in fragments:
        assert fragment in flat, fragment
    assert "\x1b" not in out and "🐱" not in out


# --- newest record wins by its real instant ----------------------------------------------


def test_newest_record_wins_across_time_zones(tmp_path, capsys):
    # Tokyo wrote 18:00+0900 (09:00 UTC); London wrote 10:00+0000 an hour later. The Tokyo
    # string sorts later, the London record is newer.
    _record("enc", value=1.0, timestamp="2024-03-01T18:00:00+0900").write(tmp_path / "tokyo")
    _record("enc", value=2.0, timestamp="2024-03-01T10:00:00+0000").write(tmp_path / "london")
    _record("enc", value=3.0, timestamp="2024-03-01T09:30:00").write(tmp_path / "naive")  # UTC
    dirs = [str(tmp_path / d) for d in ("london", "tokyo", "naive")]
    assert main(["report", *dirs, "--format", "csv", "--output", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    records = [r for d in dirs for r in read_records(d)[0]]
    table = board(long_frame(records))
    assert table.loc["enc", ("grp", "knn top1")] == 2.0
    assert (
        table.loc["enc", ("grp", "knn top1")]
        == board(long_frame(records[::-1])).loc["enc", ("grp", "knn top1")]
    )
    long = list(csv.DictReader(io.StringIO((tmp_path / "r" / "records.csv").read_text())))
    assert sorted(r["timestamp"] for r in long) == [
        "2024-03-01T09:00:00+00:00",
        "2024-03-01T09:30:00+00:00",
        "2024-03-01T10:00:00+00:00",
    ]


def test_timestamps_parse_to_utc_and_new_records_are_utc():
    utc = timezone.utc
    assert parse_timestamp("2024-03-01T18:00:00+0900") == datetime(2024, 3, 1, 9, tzinfo=utc)
    assert parse_timestamp("2024-03-01T09:00:00Z") == datetime(2024, 3, 1, 9, tzinfo=utc)
    assert parse_timestamp("2024-03-01T09:00:00") == datetime(2024, 3, 1, 9, tzinfo=utc)
    for bad in ("", "5", "2024-13-01T00:00:00", "noon"):
        with pytest.raises(ValueError):
            parse_timestamp(bad)
    stamp = _record().timestamp
    written = datetime.fromisoformat(stamp)
    assert stamp.endswith("+00:00") and written.utcoffset() == timedelta(0)
    assert abs(datetime.now(utc) - written) < timedelta(minutes=5)


# --- non-finite metrics never reach a file -----------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_is_refused(value):
    with pytest.raises(UserError, match="'top1_k20'"):
        _record(metric="top1_k20", value=value)


def test_nan_metric_fails_the_evaluation_and_writes_no_record(tmp_path, capsys, monkeypatch,
                                                              tiny_imagefolder):  # fmt: skip
    import ibot_bench.evaluate as evaluate

    combine = evaluate.combine_seeds

    def with_nan(outputs, seeds):
        metrics, details = combine(outputs, seeds)
        return {**metrics, "top1": math.nan}, details

    monkeypatch.setattr(evaluate, "combine_seeds", with_nan)
    results = tmp_path / "r"
    code = main(["eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data",
                 f"imagefolder:{tiny_imagefolder}?size=32", "--output", str(results),
                 "ks=[1]", "features.precision=fp32"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "'top1'" in err and "Traceback" not in err
    assert not list(results.rglob("*.json"))  # no record file, not even a temp one


def test_a_tasks_own_batch_size_is_part_of_its_protocol_hash():
    """A fine-tuning or linear-probe batch size changes the numbers (two sizes must not share
    one run and one record); the feature engine's and the evaluation batch sizes do not."""
    from ibot_bench.records import config_hash

    base = {"batch_size": 16, "lr": 1e-3, "eval_batch_size": 8, "features": {"batch_size": 64}}
    assert config_hash({**base, "batch_size": 20}) != config_hash(base)
    assert config_hash({**base, "eval_batch_size": 99}) == config_hash(base)
    assert config_hash({**base, "features": {"batch_size": 128}}) == config_hash(base)


def test_blank_name_gets_the_derived_one_and_bidi_controls_show_escaped(tmp_path, capsys):
    """A record named "  " was a blank row; a right-to-left override in a name reversed
    the text shown after it in every format."""
    data = _valid()
    data["encoder"] = {"spec": "random:vit_small", "name": "  ", "fingerprint": "a"}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "blank.json").write_text(json.dumps(data))
    data["encoder"] = {"spec": "random:vit_base", "name": "x\u202eevil", "fingerprint": "b"}
    (tmp_path / "records" / "bidi.json").write_text(json.dumps(data))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| random-vit\\_small " in out and "\u202e" not in out
    assert "x\\\\u202eevil" in out  # escaped, then the backslash escaped for Markdown
