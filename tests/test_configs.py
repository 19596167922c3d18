"""Every shipped config loads for what it configures; `config show` works for every task."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ibot_bench.cli import main
from ibot_bench.config import load_config
from ibot_bench.errors import ConfigError
from ibot_bench.evaluate import config_task, eval_schema
from ibot_bench.pretrain.config import PretrainConfig
from ibot_bench.resources import resolve_config, shipped_configs
from ibot_bench.suites import load_suite
from ibot_bench.tasks import discover_tasks

TASK_CONFIGS = list(shipped_configs("tasks").values())


def task_for(path: Path) -> str:
    """The task a config file belongs to: the longest task name its stem starts with."""
    name = config_task(path.stem)
    assert name, f"{path.name} matches no registered task"
    return name


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_task_config_validates(path):
    task = discover_tasks().get(task_for(path))
    load_config(eval_schema(task), path)  # raises on unknown keys or bad types


@pytest.mark.parametrize("path", shipped_configs("pretrain").values(), ids=lambda p: p.name)
def test_pretrain_config_validates(path):
    load_config(PretrainConfig, path)


@pytest.mark.parametrize("name", shipped_configs("suites"))
def test_suite_validates_with_its_entry_configs(name):
    suite = load_suite(name)
    for entry in suite.entries:
        if entry.config:
            task = discover_tasks().get(entry.task)
            load_config(eval_schema(task), resolve_config(entry.config, "tasks"), entry.overrides)


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_shipped_task_config_changes_something(path):
    """YAML files are recipes: a key equal to the dataclass default belongs to the dataclass."""
    task = discover_tasks().get(task_for(path))
    defaults = OmegaConf.structured(task.config_cls)
    same = [k for k, v in OmegaConf.load(path).items() if k in defaults and defaults[k] == v]
    assert len(same) < len(OmegaConf.load(path)), f"{path.name} only repeats defaults: {same}"


@pytest.mark.parametrize("name", discover_tasks().names())
def test_config_show_prints_every_task_config(name, capsys):
    assert main(["config", "show", name]) == 0
    shown = OmegaConf.create(capsys.readouterr().out)
    expected = OmegaConf.structured(eval_schema(discover_tasks().get(name)))
    assert shown == expected


def test_config_show_layers_file_and_overrides(capsys):
    assert main(["config", "show", "finetune", "--config", "finetune_quick", "lr=0.5"]) == 0
    shown = OmegaConf.create(capsys.readouterr().out)
    quick = OmegaConf.load(shipped_configs("tasks")["finetune_quick"])
    assert shown.lr == 0.5 and shown.epochs == quick.epochs and shown.seeds == [0]


def test_config_show_bad_inputs(capsys, tmp_path):
    assert main(["config", "show", "knnn"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'knnn'" in err and "Did you mean 'knn'" in err and "linear" in err
    missing = tmp_path / "nope.yaml"
    assert main(["config", "show", "knn", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "finetune_quick" in err  # names the path and shipped ones
    assert main(["config", "show", "knn", "k=3"]) == 2
    assert "unknown config key 'k'" in capsys.readouterr().err


def test_shipped_names_resolve_with_or_without_folder_and_suffix():
    expected = shipped_configs("tasks")["finetune_quick"]
    for name in ("finetune_quick", "tasks/finetune_quick", "configs/tasks/finetune_quick.yaml"):
        assert resolve_config(name, "tasks").resolve() == expected.resolve()
    assert resolve_config("quick", "pretrain") == shipped_configs("pretrain")["quick"]
    with pytest.raises(ConfigError, match="not found.*pretrain: .*quick"):
        resolve_config("no_such", "pretrain")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("ks=ten", "ks expects a list of integers, got 'ten'"),
        ("ks=[10.5]", "ks expects a list of integers, got [10.5]"),
        ("ks={a: 1}", "ks expects a list of integers"),
        ("temperature=abc", "temperature expects a number, got 'abc'"),
        ("features.img_size=x", "features.img_size expects an integer or null, got 'x'"),
        ("features=3", "features expects a group of settings"),
        ("features={batch_size: [1]}", "features.batch_size expects an integer, got [1]"),
    ],
)
def test_wrong_value_type_names_key_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match="^" + re.escape(expected)) as info:
        load_config(eval_schema(discover_tasks().get("knn")), overrides=[override])
    assert "command-line overrides" in str(info.value) and "Node" not in str(info.value)


def test_unknown_nested_key_suggests_the_nested_one():
    """PretrainConfig's annotations are strings (postponed): its groups' keys still count."""
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr'"):
        load_config(PretrainConfig, "smoke", ["optim.lrr=1"], kind="pretrain")


@pytest.mark.parametrize(
    "args, config, owner",
    [
        (["eval", "knn", "--encoder", "random:vit_tiny_patch8", "--data", "digits"],
         "finetune_quick", "finetune"),
        (["config", "show", "semi"], "tasks/semi_finetune_quick.yaml", "semi-finetune"),
    ],
)  # fmt: skip
def test_shipped_config_of_another_task_names_its_task(capsys, args, config, owner):
    assert main([*args, "--config", config]) == 2
    err = capsys.readouterr().err
    task = "knn" if args[0] == "eval" else "semi"
    assert f"is for task {owner}, not {task}" in err and "unknown config key" not in err
    assert f"ibot-bench eval {owner} --config" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["ks=[1,"], "override 'ks=[1,': its value is not valid YAML (did not find expected"),
        (["ks=[10,", "20]"], "override '20]' is not of the form key=value"),  # shell-split list
        (["ks"], "override 'ks' is not of the form key=value"),
    ],
)
def test_malformed_override_is_one_line_naming_it(capsys, argv, expected):
    """Broken YAML in an override was a yaml traceback; a bare word was 'unrecognized'."""
    for command in (
        ["config", "show", "knn"],
        ["eval", "knn", "--encoder", "random:x", "--data", "y"],
    ):
        assert main([*command, *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and "quoted as one word" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ks: [1, 5\n", "did not find expected ',' or ']' (line 2, column 1)"),
        ("ks: [1]\nks: [2]\n", "found duplicate key ks (line 2, column 1)"),
    ],
)
def test_yaml_error_in_a_config_file_is_one_line_with_its_place(capsys, tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["config", "show", "knn", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not valid YAML: {expected}" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "override, hint, listed",
    [
        ("features.foo=1", "' in command-line overrides. Valid keys: features.img_size, ", None),
        (
            "features.foo.bar=1",
            "'features.foo' in command-line overrides. Valid keys: features.",
            None,
        ),
        ("knn.k=3", "Did you mean 'knn.ks'?", "knn.ks, knn.temperature"),
        ("ks=[1]", "Did you mean 'knn.ks'?", "fraction, split_file"),
    ],
)
def test_unknown_key_in_a_group_suggests_only_that_groups_keys(override, hint, listed):
    """'features.foo' was answered with "Did you mean 'features'?", the group it is in."""
    with pytest.raises(ConfigError) as info:
        load_config(eval_schema(discover_tasks().get("semi")), overrides=[override])
    message = str(info.value)
    assert hint in message and "Did you mean 'features'" not in message
    if listed:
        assert f"Valid keys: {listed}" in message
