import dataclasses
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgcls.cli import cli

README = Path(__file__).resolve().parents[2] / "README.md"


def commands():
    return sorted(cli.commands)


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert cli.commands[name].help and cli.commands[name].help.strip()


@pytest.mark.parametrize("name", commands())
def test_every_command_is_documented_in_readme(name):
    assert re.search(rf"imgcls {re.escape(name)}\b", README.read_text()), f"README does not show `imgcls {name}`"


def test_every_train_flag_has_a_docstring():
    for param in cli.commands["train"].params:
        if param.name in ("config_path", "num_cpus"):
            continue
        assert "[default:" in param.help and len(param.help.split("[default:")[0].strip()) > 10, param.name


def test_invalid_flag_value_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--root", str(tmp_path), "--optimizer", "adam"])
    assert result.exit_code == 2 and "optimizer must be one of" in result.output


def test_predict_requires_paths():
    result = CliRunner().invoke(cli, ["predict", "--model", "x"])
    assert result.exit_code == 2 and "required" in result.output


def test_main_job_yaml_is_the_demos_recipe():
    """jobs/configs/fashion_mnist.yaml and `imgcls demo` train the same recipe."""
    from imgcls.cli import resolve_job
    from imgcls.jobs import demo_job

    yaml_job = resolve_job(str(README.parent / "jobs" / "configs" / "fashion_mnist.yaml"), {})
    demo = demo_job(yaml_job.data.root, yaml_job.train.storage_path)
    assert yaml_job.model == demo.model
    assert yaml_job.train == demo.train
    assert dataclasses.replace(yaml_job.data, val_fraction=0.1, test_fraction=0.1) == demo.data
