"""A small CNN trained in plain torch on real files: the models that tests, and
bench/review.py, label with. Free of side effects, so that a script outside the suite
can import it (tests/conftest.py sets environment variables for the suite's Ray)."""

import os

import torch


def train_small_cnn(fmnist_root: str, picks: dict, folder: str, epochs: int, seed: int = 0, width: int = 32) -> str:
    """A small CNN trained here in plain torch (AdamW 3e-3, batches of 64) on the real
    Fashion-MNIST files ``picks`` ({class: file names}, classes in label order), saved
    as an imgcls checkpoint at ``folder``; returns ``folder``."""
    import numpy as np
    from PIL import Image

    from imgcls.checkpoint import save_checkpoint
    from imgcls.config import JobConfig, ModelConfig
    from imgcls.models import SmallCNN, get_spec

    spec = get_spec("small_cnn")
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(fmnist_root, c, n)).convert("RGB")))
                     for c, names in picks.items() for n in names]).permute(0, 3, 1, 2).float().div(255)
    x = x.sub(mean).div(std)
    y = torch.cat([torch.full((len(names),), i) for i, names in enumerate(picks.values())])
    torch.manual_seed(seed)
    model = SmallCNN(len(picks), width=width)
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    save_checkpoint(folder, model.eval(), JobConfig(model=ModelConfig(arch="small_cnn", image_size=28, width=width)),
                    list(picks), history=[])
    return folder
