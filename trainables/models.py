"""Models by name. timm builds every standard architecture; two small CNNs from the studies are ours.

`create_model(name, num_classes=k, in_chans=c, img_size=s, stem=...)` is the one entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch
from timm.utils import freeze, unfreeze
from torch import nn

from trainables.errors import UserError, unknown_name

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Add `fn(num_classes, in_chans, img_size, **timm_kwargs) -> nn.Module` under `name`."""

    def add(fn):
        _BUILDERS[name] = fn
        return fn

    return add


def model_names() -> list[str]:
    return sorted(_BUILDERS)


# DenseNet halves the input 5 times with the ImageNet stem (conv0, pool0, three transitions): below 32 px nothing
# is left to pool. The small stem keeps the three transitions only: 8 px.
MIN_IMAGE_SIZE = {"densenet121": {"imagenet": 32, "small": 8}, "densenet161": {"imagenet": 32, "small": 8}}
SMALL_STEM_BELOW = 64  # stem `auto`: the small stem below this image size (px), timm's ImageNet stem from it on
NO_STEM_CHOICE = "fixed"  # the resolved stem of a model that has only its own (simple_cnn, vgg_like, the ViT)


def check_model_name(name: str, img_size: int | None = None, stem: str = "imagenet") -> None:
    """A registered name, and an image size its (resolved) stem leaves something to pool for."""
    if name not in _BUILDERS:
        raise unknown_name("model", name, model_names())
    if img_size is None:
        return
    resolved = resolve_stem(name, stem, img_size)
    smallest = MIN_IMAGE_SIZE.get(name, {}).get(resolved, 1)
    if img_size < smallest:
        fix = " or use stem: small (or auto)" if resolved == "imagenet" else ""
        raise UserError(f"Model {name} with the {resolved} stem needs images of at least {smallest} px, got {img_size}; "
                        f"raise image_size{fix}")


def resolve_stem(name: str, stem: str, img_size: int) -> str:
    """`auto` -> `small` below SMALL_STEM_BELOW px, else `imagenet`; NO_STEM_CHOICE for a model without a choice
    (which refuses `small`)."""
    if name not in SMALL_STEMS:
        if stem == "small":
            raise UserError(f"Model {name} has no stem choice; stem: small applies to {', '.join(sorted(SMALL_STEMS))}. "
                            f"Use stem: auto or imagenet for {name}, e.g. fix stem per variant in the space")
        return NO_STEM_CHOICE
    if stem == "auto":
        return "small" if img_size < SMALL_STEM_BELOW else "imagenet"
    if stem not in ("imagenet", "small"):
        raise UserError(f"Unknown stem {stem!r} for {name}; use auto, imagenet or small")
    return stem


def check_model_options(name: str, **options) -> None:
    """A regularisation key the architecture lacks is one UserError (never silently ignored)."""
    for key, value in options.items():
        if value is not None and name in _BUILDERS and name not in SUPPORTS[key]:
            raise UserError(f"Model {name} has no {key}; it applies to {', '.join(sorted(SUPPORTS[key]))}. "
                            f"Leave {key} unset (null) for {name}, e.g. fix it per variant in the space")


def _timm(arch: str, **fixed):
    def build(num_classes, in_chans, img_size, **kwargs):
        return timm.create_model(arch, num_classes=num_classes, in_chans=in_chans, **fixed, **kwargs)

    return build


TIMM_MODELS = [f"resnet{d}d" for d in (18, 34, 50, 101, 152, 200)] + [
    f"resnet{d}" for d in (18, 34, 50, 101, 152)
] + ["densenet121", "densenet161", "efficientnet_b0"] + [
    "mobilenetv3_small_050", "mobilenetv3_small_100"  # fast baselines at 224 px on a CPU (75 / 33 training img/s a core)
]
for _arch in TIMM_MODELS:
    register_model(_arch)(_timm(_arch))


def _small_resnet_stem(model: nn.Module) -> None:
    """ResNet: conv1 stride 1; ResNet-D: the first of its three stem convs stride 1; both without the max-pool."""
    first = model.conv1[0] if isinstance(model.conv1, nn.Sequential) else model.conv1
    first.stride = (1, 1)
    model.maxpool = nn.Identity()


def _small_densenet_stem(model: nn.Module) -> None:
    model.features.conv0.stride = (1, 1)
    model.features.pool0 = nn.Identity()


def _small_efficientnet_stem(model: nn.Module) -> None:
    model.conv_stem.stride = (1, 1)  # no max-pool to remove; padding 1 keeps a 3x3 stride-1 conv's size


# The CNNs with a stem choice: how each becomes `small` (CIFAR-style, as MedMNIST's own ResNet (28)). Only strides
# change and parameter-free pools go, so every weight (pretrained ones too) keeps its shape and its state-dict key.
SMALL_STEMS: dict[str, Callable[[nn.Module], None]] = {
    **{name: _small_resnet_stem for name in TIMM_MODELS if name.startswith("resnet")},
    **{name: _small_densenet_stem for name in TIMM_MODELS if name.startswith("densenet")},
    "efficientnet_b0": _small_efficientnet_stem,
}

# Which models take the optional regularisation keys (timm's DenseNet has no stochastic depth).
SUPPORTS = {
    "drop_path_rate": {name for name in TIMM_MODELS if not name.startswith("densenet")} | {"vit_small_patch8"},
    "attn_drop_rate": {"vit_small_patch8"},
}


@register_model("vit_small_patch8")
def vit_small_patch8(num_classes, in_chans, img_size, **kwargs):
    """The small ViT of the model-zoo study: patch 8, dim 128, depth 6, 16 heads, MLP ratio 4, dropout 0.3."""
    kwargs.setdefault("drop_rate", 0.3)
    return timm.create_model(
        "vit_small_patch8_224", num_classes=num_classes, in_chans=in_chans, img_size=img_size,
        embed_dim=128, depth=6, num_heads=16, mlp_ratio=4.0, **kwargs,
    )


def _dropout(rate: float) -> nn.Module:
    """Dropout, or no module at all for rate 0 (an Identity keeps the state-dict keys of both the same)."""
    return nn.Dropout(rate) if rate > 0 else nn.Identity()


class VGGLike(nn.Module):
    """VGG-style CNN from scratch: 3x3 conv blocks, 2x2 max-pools, FC 2048, Xavier init; drop_rate 0: no dropout."""

    def __init__(self, num_classes: int, in_chans: int, widths=(64, 128, 256, 512), drop_rate: float = 0.5):
        super().__init__()
        layers, channels = [], in_chans
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(channels, 2048), nn.ReLU(inplace=True), _dropout(drop_rate),
                                  nn.Linear(2048, num_classes))
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        return self.head(self.features(x))


class SimpleCNN(nn.Module):
    """Two conv layers and a linear head: the baseline every study starts from."""

    def __init__(self, num_classes: int, in_chans: int, drop_rate: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        )
        self.head = nn.Sequential(_dropout(drop_rate), nn.Linear(64 * 16, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


@register_model("vgg_like")
def vgg_like(num_classes, in_chans, img_size, **kwargs):
    return VGGLike(num_classes, in_chans, **kwargs)


@register_model("simple_cnn")
def simple_cnn(num_classes, in_chans, img_size, **kwargs):
    return SimpleCNN(num_classes, in_chans, **kwargs)


def create_model(name: str, *, num_classes: int, in_chans: int, img_size: int, pretrained: bool = False,
                 pretrained_path: str | None = None, freeze_backbone: bool = False, drop_rate: float | None = None,
                 drop_path_rate: float | None = None, attn_drop_rate: float | None = None,
                 stem: str = "imagenet") -> nn.Module:
    """Build `name`; `pretrained` loads ImageNet weights (from `pretrained_path` when offline).

    `drop_rate` (classifier dropout), `drop_path_rate` (stochastic depth) and `attn_drop_rate` (ViT attention
    dropout): None keeps the model's default. `stem`: auto | imagenet (timm's, the default here: what models saved
    before the key existed were built with) | small (see SMALL_STEMS), applied after the weights are loaded."""
    check_model_name(name, img_size, stem)
    check_model_options(name, drop_path_rate=drop_path_rate, attn_drop_rate=attn_drop_rate)
    kwargs = {key: value for key, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate),
                                            ("attn_drop_rate", attn_drop_rate)) if value is not None}
    if pretrained:
        kwargs.update(_pretrained_kwargs(name, pretrained_path))
    try:
        model = _BUILDERS[name](num_classes, in_chans, img_size, **kwargs)
    except (OSError, RuntimeError) as error:
        if not pretrained:
            raise
        raise UserError(
            f"Pretrained weights for {name} could not be loaded ({type(error).__name__}: {str(error)[:120]}); "
            "download them where there is network and pass pretrained_path=<file>, or set pretrained: false"
        ) from error
    if resolve_stem(name, stem, img_size) == "small":
        SMALL_STEMS[name](model)
    if freeze_backbone:
        freeze_all_but_head(model)
    return model


def _pretrained_kwargs(name: str, pretrained_path: str | None) -> dict:
    if name not in TIMM_MODELS:
        raise UserError(f"Model {name} has no pretrained weights; set pretrained: false or use one of {', '.join(TIMM_MODELS)}")
    if pretrained_path is None:
        if not _hub_weights_reachable(name):
            raise UserError(f"Pretrained weights for {name} are not cached and the Hugging Face hub is unreachable; "
                            "download them where there is network and pass pretrained_path=<file>, or set pretrained: false")
        return {"pretrained": True}  # timm fetches from the Hugging Face hub (or its local cache)
    path = Path(pretrained_path).expanduser()
    if not path.is_file():
        raise UserError(f"pretrained_path {path} does not exist; give the path of a downloaded timm weights file")
    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}


def _hub_weights_reachable(name: str) -> bool:
    """True when timm can get `name`'s weights: already in the local HF cache, or the hub answers within 3 s
    (instead of a minute of retries before the same failure)."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    hub_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
    if hub_id and any(isinstance(try_to_load_from_cache(hub_id, f), str)
                      for f in ("model.safetensors", "pytorch_model.bin")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def freeze_all_but_head(model: nn.Module) -> None:
    """Train the classifier only (timm models name it via get_classifier(); ours call it `head`). timm's freeze
    also swaps every BatchNorm outside it for a FrozenBatchNorm2d, so `model.train()` moves no running statistic
    either. Its state-dict keys are BatchNorm's less `num_batches_tracked`, which it drops on load: checkpoints
    written before still load strictly, and its weights load into the plain network that analysis.predict builds."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
    freeze(model)
    unfreeze(model, [next(name for name, module in model.named_modules() if module is head)])


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_costs(model: nn.Module, in_chans: int, img_size: int) -> dict[str, int]:
    """`params_total`, `params_trainable` and `flops_per_image` (FlopCounterMode, one image, eval mode, no autograd;
    a multiply-add counts 2). Leaves the model in eval mode and draws no random numbers."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters())
    image = torch.zeros(1, in_chans, img_size, img_size, device=parameter.device)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return {"params_total": sum(p.numel() for p in model.parameters()), "params_trainable": count_trainable(model),
            "flops_per_image": int(counter.get_total_flops())}


def weights_statistics(name: str, in_chans: int) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std) the pretrained weights of `name` were trained with (timm's pretrained_cfg),
    averaged over RGB for 1-channel input."""
    if name not in TIMM_MODELS:
        raise UserError(f"Model {name} has no pretrained weights; set pretrained: false or use one of {', '.join(TIMM_MODELS)}")
    cfg = timm.models.get_pretrained_cfg(name)
    mean, std = [float(v) for v in cfg.mean], [float(v) for v in cfg.std]
    if in_chans == len(mean):
        return mean, std
    return [sum(mean) / len(mean)] * in_chans, [sum(std) / len(std)] * in_chans

