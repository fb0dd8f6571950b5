"""The linear probe's fit and the fine-tuning optimiser's layer-wise learning rates."""

import pytest
import torch
from torch.nn import functional as F

from imgcls.models import WithFeatures, create_model, head_name
from imgcls.training.probe import L2_GRID, _folds, choose_l2, fit_logistic, fit_probe, set_head
from imgcls.config import JobConfig, ModelConfig, TrainConfig
from imgcls.training.loop import build_optimizer, layer_stages
from imgcls.training.trainer import wants_probe_head


def _blobs(n_per_class=40, num_classes=3, dim=16, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3 + 5  # far from 0: tests the folded centring
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g) * torch.linspace(0.1, 10, dim)
    return x, y


def test_fit_logistic_is_the_penalised_optimum_on_raw_features():
    x, y = _blobs(spread=2.0)
    l2 = 1e-2
    w, b = fit_logistic(x, y, 3, l2)
    # The returned head acts on raw features; the fit ran on standardised ones. Map back
    # and check the gradient of the standardised objective vanishes (the optimum).
    mu, sigma = x.double().mean(0), x.double().std(0, unbiased=False)
    ws = (w.double() * sigma).requires_grad_(True)
    bs = (b.double() + w.double() @ mu).requires_grad_(True)
    z = (x.double() - mu) / sigma
    loss = F.cross_entropy(z @ ws.T + bs, y) + 0.5 * l2 * (ws * ws).sum()
    gw, gb = torch.autograd.grad(loss, (ws, bs))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
    # Same logits either way round.
    torch.testing.assert_close((x @ w.T + b).double(), (z @ ws.T + bs).detach(), atol=1e-3, rtol=1e-4)
    assert ((x @ w.T + b).argmax(1) == y).float().mean() > 0.9


def test_folds_are_stratified():
    y = torch.tensor([0] * 7 + [1] * 3 + [2] * 10)
    fold = _folds(y, 3)
    for c, n in ((0, 7), (1, 3), (2, 10)):
        counts = torch.bincount(fold[y == c], minlength=3)
        assert counts.sum() == n and counts.max() - counts.min() <= 1


def test_cross_validation_regularises_noise_and_not_signal():
    g = torch.Generator().manual_seed(1)
    noise_x, noise_y = torch.randn(60, 200, generator=g), torch.randint(0, 2, (60,), generator=g)
    l2_noise, grid = choose_l2(noise_x, noise_y, 2)
    assert l2_noise >= 0.3 and [r["l2"] for r in grid] == list(L2_GRID)
    x, y = _blobs(spread=0.05)
    l2_clean, _ = choose_l2(x, y, 3)
    assert l2_clean < l2_noise


def test_fit_probe_scores_val_but_fits_on_train_only():
    x, y = _blobs(seed=2)
    xv, yv = _blobs(n_per_class=10, seed=2)
    p = fit_probe((x, y), (xv, yv), 3)
    assert p.l2 in L2_GRID and p.train_accuracy > 0.9
    assert p.val_accuracy == pytest.approx(((xv @ p.weight.T + p.bias).argmax(1) == yv).float().mean().item())
    empty = fit_probe((x, y), (xv[:0], yv[:0]), 3)
    assert empty.val_accuracy is None and torch.equal(empty.weight, p.weight)  # val does not change the fit


def test_set_head_makes_the_model_the_probe_on_its_features():
    model = create_model("small_cnn", 3, image_size=32).eval()
    body = WithFeatures(model).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        _, feats = body(x)
    w, b = torch.randn(3, feats.shape[1]), torch.randn(3)
    set_head(model, w, b)
    with torch.no_grad():
        torch.testing.assert_close(model(x), feats @ w.T + b, atol=1e-5, rtol=1e-5)


def test_layer_decay_scales_each_stage_and_covers_every_parameter_once():
    model = create_model("resnet18", 4)
    stages = layer_stages(model)
    assert [n for n, _ in stages[-1]] == [f"{head_name(model)}.weight", f"{head_name(model)}.bias"]
    assert [n for n, _ in stages[0]] == ["conv1.weight"] and len(stages) == 11  # stem, bn1, 8 blocks, head
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, momentum=0.9, layer_decay=0.5)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(by_param) == sum(1 for _ in model.parameters()) == sum(len(g["params"]) for g in opt.param_groups)
    named = dict(model.named_parameters())
    assert by_param[id(named["fc.weight"])]["lr"] == pytest.approx(1e-3)
    assert by_param[id(named["layer4.1.conv2.weight"])]["lr"] == pytest.approx(5e-4)
    assert by_param[id(named["conv1.weight"])]["lr"] == pytest.approx(1e-3 * 0.5 ** 10)
    assert by_param[id(named["fc.bias"])]["weight_decay"] == 0 and by_param[id(named["fc.weight"])]["weight_decay"] == 0.05
    # Off by default: one lr for all.
    flat = build_optimizer(model, "sgd", lr=1e-3, weight_decay=0.05, momentum=0.9)
    assert {g["lr"] for g in flat.param_groups} == {1e-3}


def test_lp_ft_probes_by_default_only_from_pretrained_weights_and_not_on_resume():
    pretrained = JobConfig(model=ModelConfig(arch="efficientnet_lite0", weights="packaged"))
    assert wants_probe_head(pretrained, resuming=False)
    assert not wants_probe_head(pretrained, resuming=True)  # the checkpoint holds the head
    assert not wants_probe_head(JobConfig(), resuming=False)  # random init: nothing to probe
    off = JobConfig(model=pretrained.model, train=TrainConfig(probe_head=False))
    assert not wants_probe_head(off, resuming=False)
    only = JobConfig(model=pretrained.model, train=TrainConfig(linear_probe=True))
    assert not wants_probe_head(only, resuming=False)  # the probe is the whole training there


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_batchnorm_keeps_the_pretrained_statistics(freeze):
    from imgcls.training.augment import BatchAugment
    from imgcls.training.loop import StepOptions, lr_lambda, train_one_epoch

    torch.manual_seed(0)
    model = create_model("small_cnn", 3, image_size=16)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone(), m.weight.detach().clone()) for m in bn]
    opt = build_optimizer(model, "adamw", lr=1e-2, weight_decay=0.0, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(0, 4))
    images = torch.randint(0, 256, (32, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 3, (32,))
    batches = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 32, 8)]
    opts = StepOptions(augment=BatchAugment(16, (0.5,) * 3, (0.5,) * 3, "none"), num_classes=3,
                       freeze_batchnorm=freeze)
    train_one_epoch(model, opt, sched, batches, torch.device("cpu"), opts)
    same_stats = all(torch.equal(m.running_mean, b[0]) and torch.equal(m.running_var, b[1]) for m, b in zip(bn, before))
    assert same_stats == freeze
    assert all(m.num_batches_tracked == (0 if freeze else 4) for m in bn)
    assert not torch.equal(bn[0].weight.detach(), before[0][2])  # the affine parameters train either way
