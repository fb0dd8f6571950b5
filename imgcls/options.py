"""Command-line options generated from the config dataclasses, so flags never drift.

Every field of a config dataclass becomes ``--field-name`` with the field's docstring
as help. Flags default to None, meaning "not given": the resolved value comes from
the dataclass default, then the YAML file, then the flag, in that order. A field with
``choices`` metadata takes one of them (``click.Choice``, listed in ``--help``); an
Optional field's flag also takes ``none`` (any case), which clears a value the YAML
file set (the flag's value is then ``NONE``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import typing
from dataclasses import MISSING, fields
from typing import Any, Optional

import click
import yaml

from imgcls.config import ConfigError, build

SECTIONS = ("data", "model", "train", "predict")  # of a YAML config file


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


class _None:
    """The value of an Optional field's flag given as ``none``: "set it to None", where
    the flag's None means "not given"."""

    def __repr__(self) -> str:
        return "none"


NONE = _None()


class OrNone(click.ParamType):
    """``base``, or ``none`` (any case) for NONE."""

    def __init__(self, base: click.ParamType):
        self.base = base
        self.name = f"{base.name} or none"

    def get_metavar(self, param, ctx) -> Optional[str]:
        metavar = self.base.get_metavar(param, ctx)
        if metavar and metavar.startswith("[") and metavar.endswith("]"):  # click.Choice's [a|b]
            return metavar[:-1] + "|none]"
        return f"{metavar or self.base.name.upper()}|none"

    def convert(self, value, param, ctx):
        if value is NONE or (isinstance(value, str) and value.strip().lower() == "none"):
            return NONE
        return self.base.convert(value, param, ctx)


def _click_type(annotation, choices=None) -> tuple[Any, bool]:
    """(click type, is_flag) for a field annotation such as 'Optional[int]'; ``choices``
    (a field's metadata) makes it a ``click.Choice``; an Optional one also takes ``none``."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return None, True
    click_type = click.Choice(choices) if choices else {int: click.INT, float: click.FLOAT, str: click.STRING}[base]
    optional = type(None) in typing.get_args(hint)
    return (OrNone(click_type) if optional else click_type), False


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def config_options(*classes):
    """Adds one option per field of each dataclass in ``classes``."""
    def decorate(fn):
        for cls in reversed(classes):
            docs = field_docs(cls)
            for f in reversed(fields(cls)):
                click_type, is_flag = _click_type(f.type, f.metadata.get("choices"))
                default = f.default if f.default is not MISSING else None
                shown = "none" if default is None and isinstance(click_type, OrNone) else default
                help_text = f"{docs.get(f.name, '')} [default: {shown}]"
                name = flag_name(f.name)
                if is_flag:
                    opt = click.option(f"{name}/--no-{name[2:]}", f.name, default=None, help=help_text)
                elif f.metadata.get("multiple"):  # repeatable; the values joined by commas
                    opt = click.option(name, f.name, multiple=True, help=help_text,
                                       callback=lambda ctx, param, values: ",".join(values) if values else None)
                else:
                    opt = click.option(name, f.name, type=click_type, default=None, help=help_text)
                fn = opt(fn)
        return fn
    return decorate


def load_yaml(path: Optional[str]) -> dict:
    """A YAML config file's sections; an unknown section (a misspelt ``trian:``) is refused."""
    if not path:
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of sections {list(SECTIONS)}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise click.BadParameter(f"{path}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    for name, section in data.items():
        if section is not None and not isinstance(section, dict):
            raise click.BadParameter(f"{path}: section '{name}' must be a mapping of settings")
    return {k: v or {} for k, v in data.items()}


def flag_message(message: str, names) -> str:
    """``message`` with the field names it mentions written as their flags."""
    import re

    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag_name(name), message)
    return message


def resolve(cls, section: dict, flags: dict):
    """Builds ``cls`` from YAML ``section`` values overridden by the given (non-None) flags;
    a flag given as ``none`` (NONE) sets its field to None.

    Errors name the flag (``--lr``), whether the value came from the flag or the YAML file.
    """
    names = {f.name for f in fields(cls)}
    values = dict(section)
    values.update({k: (None if v is NONE else v) for k, v in flags.items() if k in names and v is not None})
    try:
        return build(cls, values)
    except ConfigError as e:
        if e.key not in names:
            raise click.UsageError(f"{flag_message(e.message, names)} (a key of the YAML file's "
                                   f"'{cls.__name__.removesuffix('Config').lower()}' section)") from None
        raise click.UsageError(f"{flag_name(e.key)}: {flag_message(e.message, names)}") from None
    except (TypeError, ValueError) as e:
        raise click.UsageError(flag_message(str(e), names)) from None
