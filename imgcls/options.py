"""Command-line options generated from the config dataclasses, so flags never drift.

Every field of a config dataclass becomes ``--field-name`` with the field's docstring
as help. Flags default to None, meaning "not given": the resolved value comes from
the dataclass default, then the YAML file, then the flag, in that order.
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

from imgcls.config import build


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


def _click_type(annotation) -> tuple[Any, bool]:
    """(click type, is_flag) for a field annotation such as 'Optional[int]'."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return None, True
    return {int: int, float: float, str: str}[base], False


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def config_options(*classes):
    """Adds one option per field of each dataclass in ``classes``."""
    def decorate(fn):
        for cls in reversed(classes):
            docs = field_docs(cls)
            for f in reversed(fields(cls)):
                click_type, is_flag = _click_type(f.type)
                default = f.default if f.default is not MISSING else None
                help_text = f"{docs.get(f.name, '')} [default: {default}]"
                name = flag_name(f.name)
                if is_flag:
                    opt = click.option(f"{name}/--no-{name[2:]}", f.name, default=None, help=help_text)
                else:
                    opt = click.option(name, f.name, type=click_type, default=None, help=help_text)
                fn = opt(fn)
        return fn
    return decorate


def load_yaml(path: Optional[str]) -> dict:
    if not path:
        return {}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} must hold a mapping of sections")
    return data


def resolve(cls, section: dict, flags: dict):
    """Builds ``cls`` from YAML ``section`` values overridden by the given (non-None) flags."""
    names = {f.name for f in fields(cls)}
    values = dict(section)
    values.update({k: v for k, v in flags.items() if k in names and v is not None})
    try:
        return build(cls, values)
    except (TypeError, ValueError) as e:
        raise click.UsageError(f"{cls.__name__}: {e}") from None
