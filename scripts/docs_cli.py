"""The configuration reference's option tables, rendered from the click commands in imgcls/cli.py.

Every option a command declares is a row: its flags, the values it takes, its default,
the YAML key that sets it too (commands with ``--config``) and its help text, which for
the config fields is the docstring under the dataclass field (imgcls/options.py), so the
page says what ``imgcls COMMAND --help`` says. tests/unit/test_docs.py checks that the
committed page lists exactly the options the CLI declares, and runs ``--check``, which
fails when the page differs from what this script renders now.

Rerun after changing a command or a config field (or with --check, as the test does):
    .venv/bin/python scripts/docs_cli.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from docs_tables import splice, write_or_check  # noqa: E402  (bench/docs_tables.py: the marker handling)

PAGE = ROOT / "docs" / "configuration.md"
NAME = "scripts/docs_cli.py"

# The YAML sections a command's --config file sets, in imgcls/cli.py's order of
# config_options(...) classes: a flag made from a field of one of them is also the key
# SECTION.FIELD there.
YAML_SECTIONS = {"train": ("data", "model", "train"), "tune": ("data", "model", "train"),
                 "predict": ("predict",), "serve": ("serve",)}


def yaml_keys(command: str) -> dict[str, str]:
    """Option dest -> ``section.field`` for the config fields ``command`` takes from YAML."""
    from dataclasses import fields

    from imgcls.config import DataConfig, ModelConfig, PredictConfig, ServeConfig, TrainConfig

    classes = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "predict": PredictConfig,
               "serve": ServeConfig}
    return {f.name: f"{section}.{f.name}" for section in YAML_SECTIONS.get(command, ()) for f in
            fields(classes[section])}


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def flags(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return f"`{param.human_readable_name}` (argument)"
    return " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])


def values(param: click.Parameter) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    or_none = hasattr(param.type, "base")  # options.OrNone: an Optional field's flag
    base = param.type.base if or_none else param.type
    choices = getattr(base, "choices", None)
    text = "one of " + ", ".join(f"`{c}`" for c in choices) if choices else base.name
    if getattr(param, "multiple", False):
        text += ", repeatable"
    return text + (", or `none`" if or_none else "")


def default_and_help(param: click.Parameter) -> tuple[str, str]:
    """(default, help) as ``--help`` gives them: a config field's help ends with
    ``[default: X]``; other options show theirs with show_default."""
    help_text = getattr(param, "help", None) or ""
    m = re.search(r"\s*\[default: (.*)\]\s*$", help_text)
    if m:
        help_text = help_text[:m.start()]
    if getattr(param, "required", False):
        default = "required"
    elif m:
        default = f"`{m.group(1)}`" if m.group(1) else "empty"
    elif getattr(param, "show_default", False) and param.default is not None and param.default is not False \
            and param.default != ():
        default = f"`{param.default}`"
    elif getattr(param, "is_flag", False):
        default = "off"
    else:
        default = ""
    if getattr(param, "envvar", None):
        default = "; ".join(filter(None, [default, f"env `{param.envvar}`"]))
    return default, help_text


def render_command(name: str, command: click.Command, prefix: str = "imgcls") -> str:
    keys = yaml_keys(name)
    anchor = name or "imgcls"
    title = f"{prefix} {name}".strip()
    out = [f"## `{title}` {{#{anchor}}}", "", cell(command.help or ""), ""]
    rows = ["| option | takes | default | YAML key | what |", "|---|---|---|---|---|"]
    for param in command.params:
        default, help_text = default_and_help(param)
        key = f"`{keys[param.name]}`" if param.name in keys else ""
        rows.append(f"| {flags(param)} | {cell(values(param))} | {cell(default)} | {key} | {cell(help_text)} |")
    return "\n".join(out + rows) + "\n"


def render() -> str:
    from imgcls.cli import cli

    parts = [render_command("", cli)]
    ctx = click.Context(cli)
    for name in cli.list_commands(ctx):
        parts.append(render_command(name, cli.commands[name]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the committed page differs from the rendering")
    check = p.parse_args(argv).check
    return write_or_check({PAGE: splice(PAGE.read_text(), render(), NAME)}, check, NAME)


if __name__ == "__main__":
    sys.exit(main())
