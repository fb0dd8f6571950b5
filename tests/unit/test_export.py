import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from imgcls.checkpoint import load_checkpoint, save_checkpoint
from imgcls.config import JobConfig, ModelConfig
from imgcls.inference.export import export_checkpoint
from imgcls.models import create_model


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_lite0"])
def test_onnx_torchscript_and_safetensors_match_torch(tmp_path, arch):
    torch.manual_seed(0)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    save_checkpoint(ckpt, create_model(arch, 4, image_size=64), JobConfig(model=ModelConfig(arch=arch, image_size=64)),
                    ["a", "b", "c", "d"], history=[])
    files = export_checkpoint(ckpt, out, opset=17)
    model = load_checkpoint(ckpt).model
    for batch in (1, 3):  # dynamic batch
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            expected = model(x).numpy()
        logits, feats = ort.InferenceSession(files["onnx"]).run(["logits", "features"], {"image": x.numpy()})
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
        assert feats.shape[0] == batch
        ts_logits, _ = torch.jit.load(files["torchscript"])(x)
        np.testing.assert_allclose(ts_logits.detach().numpy(), expected, atol=1e-4, rtol=0)
    assert onnx.load(files["onnx"]).opset_import[0].version >= 17
    state = load_file(files["safetensors"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_checkpoint(str(tmp_path), str(tmp_path / "o"), opset=11)


def test_exported_torchscript_is_the_program_predict_runs(tmp_path):
    """One model-to-program path: ``model.ts`` is what ``imgcls predict`` ships to its
    workers (BatchNorm folded), so both give the same numbers bit for bit."""
    import io

    from imgcls.inference.program import build_program

    torch.manual_seed(0)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    save_checkpoint(ckpt, create_model("mobilenet_v3_small", 3, image_size=64),
                    JobConfig(model=ModelConfig(arch="mobilenet_v3_small", image_size=64)), ["a", "b", "c"], history=[])
    exported = torch.jit.load(export_checkpoint(ckpt, out, formats=["torchscript"])["torchscript"])
    shipped = torch.jit.load(io.BytesIO(build_program(ckpt).program))
    assert not [m.original_name for m in exported.modules() if "BatchNorm" in m.original_name]
    x = torch.randn(5, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for ours, theirs in zip(exported(x), shipped(x)):
            assert torch.equal(ours, theirs)
