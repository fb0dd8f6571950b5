"""A config's local paths made absolute against the folder the command runs in.

Ray runs tasks, actors and Tune trials in folders of their own (the folder the cluster
was started in, a trial's own folder), where a relative path means nothing or another
file. Every command therefore resolves its config's paths before anything reaches Ray:
``data.root``, ``data.cache_path``, ``model.weights`` when it names a file,
``train.storage_path``, ``train.resume_from``, and predict's ``model``, ``input`` and
``output``. URIs with a scheme (``s3://``, ``gs://``, ``file://``, fsspec's chained
``simplecache::s3://...``) are left as they are, and so are empty values and the
weight names that are not files (None, 'packaged', torchvision's enum names).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, TypeVar

from imgcls.config import JobConfig, PredictConfig, ServeConfig

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
MODELS_SCHEME = "models:/"  # a registered model, models:/NAME@ALIAS or models:/NAME/VERSION (imgcls.registry)

Config = TypeVar("Config", JobConfig, PredictConfig, ServeConfig)


def is_uri(path: str) -> bool:
    """Whether ``path`` names its filesystem (``s3://...``, ``file://...``, ``a::b://...``)
    or a registered model (``models:/NAME@ALIAS``, ``imgcls.registry``)."""
    return bool(_SCHEME.match(path)) or "::" in path or is_registry_uri(path)


def is_registry_uri(uri: Optional[str]) -> bool:
    """Whether ``uri`` names a registered model: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    return bool(uri) and uri.startswith(MODELS_SCHEME)


def local_path(path: Optional[str], base: Optional[str] = None) -> Optional[str]:
    """``path`` made absolute against ``base`` (default: the current folder) when it is
    a relative local path; URIs, absolute paths, None and '' come back unchanged but
    for ``~`` (expanded) and ``..``/``.`` parts (normalised). A trailing '/' is kept."""
    if not path or is_uri(path):
        return path
    resolved = os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(path)))
    return resolved + "/" if path.endswith("/") and not resolved.endswith("/") else resolved


def weights_path(weights: Optional[str], base: Optional[str] = None) -> Optional[str]:
    """``--weights`` resolved like a path when it names a file: it has a '/' or '.' (as
    ``models.create_model`` decides) or a file of that name is there. None, 'packaged'
    and torchvision enum names ('DEFAULT', 'IMAGENET1K_V1') are not files."""
    if not weights or weights == "packaged" or is_uri(weights):
        return weights
    base = base or os.getcwd()
    if "/" in weights or "." in weights or os.path.exists(os.path.join(base, weights)):
        return local_path(weights, base)
    return weights


def tracking_path(uri: Optional[str], base: Optional[str] = None) -> Optional[str]:
    """An MLflow tracking URI with a relative SQLite path (``sqlite:///out/mlflow.db``, three
    slashes) made absolute against ``base`` (``sqlite:////abs/out/mlflow.db``): the training
    workers log from folders of their own. Any other URI comes back unchanged."""
    prefix = "sqlite:///"
    if not uri or not uri.startswith(prefix) or uri.startswith(prefix + "/"):
        return uri
    return prefix + local_path(uri[len(prefix):], base)


def resolve_paths(cfg: Config, base: Optional[str] = None) -> Config:
    """``cfg`` (a JobConfig, PredictConfig or ServeConfig) with its local paths made absolute
    against ``base``, by default the current folder: call it where the command starts,
    before anything is sent to Ray."""
    base = base or os.getcwd()
    if isinstance(cfg, PredictConfig):
        model = ",".join(local_path(m, base) for m in members(cfg.model)) if cfg.model else cfg.model
        return dataclasses.replace(cfg, model=model, input=local_path(cfg.input, base),
                                   output=local_path(cfg.output, base))
    if isinstance(cfg, ServeConfig):
        model = ",".join(local_path(m, base) for m in members(cfg.model)) if cfg.model else cfg.model
        return dataclasses.replace(cfg, model=model, log_dir=local_path(cfg.log_dir, base))
    if isinstance(cfg, JobConfig):
        d, m, t = cfg.data, cfg.model, cfg.train
        return dataclasses.replace(
            cfg,
            data=dataclasses.replace(d, root=",".join(local_path(r, base) for r in members(d.root)) if d.root else d.root,
                                     cache_path=local_path(d.cache_path, base)),
            model=dataclasses.replace(m, weights=weights_path(m.weights, base)),
            train=dataclasses.replace(t, storage_path=local_path(t.storage_path, base),
                                      resume_from=local_path(t.resume_from, base),
                                      init_from=local_path(t.init_from, base),
                                      tracking_uri=tracking_path(t.tracking_uri, base)),
        )
    raise TypeError(f"resolve_paths takes a JobConfig or a PredictConfig, not {type(cfg).__name__}")


def members(value: str) -> list[str]:
    """The parts of a comma-separated value: an ensemble's checkpoints (``--model``), or
    the data roots listed together (``--root``)."""
    return [m.strip() for m in value.split(",") if m.strip()]
