"""Export a checkpoint to ONNX, TorchScript and safetensors.

An export folder holds ``model.onnx`` (inputs ``image`` (B, 3, S, S) float32; outputs
``logits`` (B, C) and ``features`` (B, F); dynamic batch), ``model.ts`` (TorchScript,
same outputs: the very program ``imgcls predict`` ships to its workers, from
``program.save_program``), ``model.safetensors`` (the state dict), plus the checkpoint's
``classes.json`` and ``meta.json`` so that ``imgcls predict --runtime onnxruntime`` can
use the folder directly.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import torch

from imgcls import storage
from imgcls.checkpoint import CLASSES_FILE, META_FILE, load_checkpoint
from imgcls.inference.program import inference_network, save_program

FORMATS = ("onnx", "torchscript", "safetensors")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
SAFETENSORS_FILE = "model.safetensors"


def export_onnx(net: torch.nn.Module, image_size: int, opset: int = 17) -> bytes:
    """ONNX bytes of ``net`` (outputs logits and features, as ``program.inference_network``
    makes it) with a dynamic batch dimension."""
    example = torch.randn(2, 3, image_size, image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, ONNX_FILE)
        torch.onnx.export(
            net, (example,), path, input_names=["image"], output_names=["logits", "features"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=opset, dynamo=False,
        )
        with open(path, "rb") as f:
            return f.read()


def export_checkpoint(checkpoint: str, output: str, formats: Sequence[str] = FORMATS, opset: int = 17) -> dict:
    """Writes the requested formats for ``checkpoint`` into ``output``; returns their URIs.

    Args:
        checkpoint: Checkpoint folder (local or fsspec URI).
        output: Export folder (local or fsspec URI), created if needed.
        formats: Any of FORMATS.
        opset: ONNX opset, 17 or newer.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown export formats {sorted(unknown)}; choose from {FORMATS}")
    if opset < 17:
        raise ValueError("ONNX opset must be 17 or newer")
    loaded = load_checkpoint(checkpoint)
    model = loaded.model.eval()
    storage.makedirs(output)
    written = {}
    for name in (CLASSES_FILE, META_FILE):
        with storage.open_uri(storage.join(output, name), "wb") as f:
            f.write(storage.read_bytes(storage.join(checkpoint, name)))
    # The program imgcls predict runs (BatchNorm folded, channels_last weights), the same for both formats.
    net = inference_network([model], loaded.image_size) if {"onnx", "torchscript"} & set(formats) else None
    if "onnx" in formats:
        written["onnx"] = _put(output, ONNX_FILE, export_onnx(net, loaded.image_size, opset))
    if "torchscript" in formats:
        written["torchscript"] = _put(output, TORCHSCRIPT_FILE,
                                      save_program(net, loaded.image_size, "torchscript", checkpoint))
    if "safetensors" in formats:
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        written["safetensors"] = _put(output, SAFETENSORS_FILE, save(state))
    return written


def _put(folder: str, name: str, data: bytes) -> str:
    uri = storage.join(folder, name)
    with storage.open_uri(uri, "wb") as f:
        f.write(data)
    return uri
