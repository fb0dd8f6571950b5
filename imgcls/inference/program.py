"""The model as the inference workers run it: one program, built once in the driver.

``build_program`` loads checkpoints, folds BatchNorm (``models.inference_model``), joins
an ensemble or test-time flip, and traces (TorchScript) or exports (``torch.export``)
the result, checked against the network; ``imgcls predict`` ships it to the actors and
``imgcls export`` writes the same program as ``model.ts``.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import torch

from imgcls import storage
from imgcls.inference.model_stage import ModelPayload


class EnsembleError(ValueError):
    """Checkpoints that cannot label as one ensemble (other classes, image sizes or normalisation)."""


def inference_network(models: list, image_size: int, tta: str = "none") -> torch.nn.Module:
    """The network the workers run for these loaded models (one, or an ensemble's members):
    ``models.inference_model`` (BatchNorm folded, channels_last, outputs logits and
    features), or a ``models.Ensemble`` of them for several models or ``tta`` 'flip'."""
    from imgcls.models import Ensemble, inference_model

    if len(models) == 1 and tta == "none":
        return inference_model(models[0], image_size)
    return Ensemble([inference_model(m, image_size) for m in models], flip=tta == "flip").eval()


def save_program(net: torch.nn.Module, image_size: int, form: str = "torchscript", name: str = "the model") -> bytes:
    """``net`` as a program file's bytes: traced to TorchScript (``form`` 'torchscript') or
    exported with ``torch.export`` and a dynamic batch size ('export'), then checked to
    reproduce ``net`` on a batch of another size than the one it was made with."""
    from imgcls.models import check_same_outputs

    probe = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    probe = probe.contiguous(memory_format=torch.channels_last)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        if form == "torchscript":
            made = torch.jit.trace(net, probe[:2], check_trace=False)
        else:
            batch = torch.export.Dim("batch", min=1)
            exported = torch.export.export(net, (probe[:2],), dynamic_shapes=({0: batch},))
            made = exported.module()
        try:
            check_same_outputs(net(probe), made(probe), rtol=1e-4, atol=1e-5)
        except ValueError as e:
            raise RuntimeError(f"the {form} program of {name} does not reproduce the network: {e}") from None
        if form == "torchscript":
            torch.jit.save(made, buf)
        else:
            torch.export.save(exported, buf)
    return buf.getvalue()


def build_program(model: str, runtime: str = "torch", tta: str = "none", program: str = "auto") -> ModelPayload:
    """Loads ``model`` once, in the driver, into what every Classifier actor loads.

    For runtime 'torch', ``model`` is a checkpoint folder: its network goes through
    ``models.inference_model`` (BatchNorm folded, channels_last) and is traced to
    TorchScript (``program`` 'torchscript', and 'auto') or exported with ``torch.export``
    with a dynamic batch size ('export', and 'compile', which each actor then compiles);
    the actors load either without importing torchvision. The program is checked
    against the network on a batch of another size. Several
    checkpoints (comma-separated), or ``tta`` 'flip', make one ``models.Ensemble``
    program, so the pipeline runs it like a single model. For 'onnxruntime', ``model``
    is an export folder holding ``model.onnx``.
    """
    from imgcls.checkpoint import load_checkpoint, read_model_info
    from imgcls.inference.finished import combined_id, program_form
    from imgcls.paths import members

    from imgcls.tracking import local_model

    names = [local_model(name) for name in members(model)]  # a models:/ URI: its downloaded version
    if runtime == "onnxruntime":
        if len(names) > 1 or tta != "none":
            raise EnsembleError("ensembles and --tta run with --runtime torch (checkpoint folders)")
        info = read_model_info(names[0])
        raw = storage.read_bytes(storage.join(names[0], "model.onnx"))
        return ModelPayload("onnxruntime", raw, tuple(info.classes), info.image_size, tuple(info.mean),
                            tuple(info.std), hashlib.sha256(raw).hexdigest()[:16])
    loaded_all = [load_checkpoint(name) for name in names]
    loaded = loaded_all[0]
    for name, other in zip(names[1:], loaded_all[1:]):
        if (other.classes, other.image_size, tuple(other.mean), tuple(other.std)) != \
                (loaded.classes, loaded.image_size, tuple(loaded.mean), tuple(loaded.std)):
            raise EnsembleError(f"{name} cannot join {names[0]} in an ensemble: classes {other.classes} at "
                                f"{other.image_size} px (mean {other.mean}) against {loaded.classes} at "
                                f"{loaded.image_size} px (mean {loaded.mean})")
    size = loaded.image_size
    form = program_form(program)
    made = save_program(inference_network([m.model for m in loaded_all], size, tta), size, form, model)
    return ModelPayload("torch", made, tuple(loaded.classes), size, tuple(loaded.mean), tuple(loaded.std),
                        combined_id([m.model_id for m in loaded_all], tta), form=form)
