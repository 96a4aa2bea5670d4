"""The `stem` trial key: what each stem does to the first stage, auto's choice, refusals, and that a trial's stem
is logged, kept in its checkpoint and rebuilt by replay and export (older configs: timm's ImageNet stem)."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import toy_images

import analysis.replay
from analysis.model_files import architecture, save_model
from analysis.predict import load_model
from analysis.replay import replay
from search_spaces import parse_space
from trainables.config import resolve_config
from trainables.data.datasets import Dataset, ImageSet
from trainables.errors import UserError
from trainables.models import create_model, resolve_stem
from trainables.training.epochs import iterate_epochs
from trainables.training.metrics import probabilities

FIRST_STAGE = {"resnet18": "layer1", "resnet18d": "layer1", "densenet121": "features.denseblock1",
               "efficientnet_b0": "blocks"}


def first_stage_side(model: torch.nn.Module, name: str, size: int) -> int:
    """The side (px) of the feature map entering the model's first stage, for a size x size grey image."""
    sides = []
    model.get_submodule(FIRST_STAGE[name]).register_forward_pre_hook(lambda module, args: sides.append(args[0].shape[-1]))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, size, size))
    return sides[0]


@pytest.mark.parametrize("name, size, imagenet_side", [("resnet18", 28, 7), ("resnet18d", 28, 7),
                                                       ("densenet121", 32, 8), ("efficientnet_b0", 28, 14)])
def test_small_stem_keeps_the_whole_image_into_the_first_stage(name, size, imagenet_side):
    build = lambda stem: create_model(name, num_classes=2, in_chans=1, img_size=size, stem=stem)  # noqa: E731
    assert first_stage_side(build("imagenet"), name, size) == imagenet_side
    assert first_stage_side(build("small"), name, size) == size


def test_pretrained_weights_load_into_the_small_stem_unchanged(tmp_path):
    source = timm.create_model("resnet18d", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet18d.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18d", num_classes=2, in_chans=1, img_size=28, pretrained=True,
                         pretrained_path=str(path), stem="small")
    assert model.conv1[0].stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    # the first stem conv keeps its shape, so its weights are timm's grey adaptation (RGB summed), not re-initialised
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    assert torch.equal(model.conv1[3].weight, source.conv1[3].weight)
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_auto_is_small_below_64_px_and_the_minimum_size_follows_the_stem():
    assert [resolve_stem("resnet18", "auto", size) for size in (28, 63, 64, 224)] == ["small", "small", "imagenet",
                                                                                    "imagenet"]
    assert resolve_stem("vit_small_patch8", "auto", 28) == "fixed"  # no choice to make
    assert resolve_config({"model": "densenet121", "image_size": 28})["stem"] == "auto"  # small at 28 px: fits
    with pytest.raises(UserError, match="densenet121 with the imagenet stem needs images of at least 32 px, got 28; "
                                        "raise image_size or use stem: small"):
        resolve_config({"model": "densenet121", "image_size": 28, "stem": "imagenet"})


@pytest.mark.parametrize("model", ["simple_cnn", "vgg_like", "vit_small_patch8"])
def test_a_model_without_a_stem_choice_refuses_small_in_one_line(model):
    with pytest.raises(UserError, match=f"Model {model} has no stem choice; stem: small applies to .*resnet18d") as error:
        resolve_config({"model": model, "image_size": 32, "stem": "small"})
    assert "\n" not in str(error.value)
    assert resolve_config({"model": model, "image_size": 32, "stem": "imagenet"})["stem"] == "imagenet"


def test_a_space_searching_the_stem_is_checked_against_every_model():
    raw = {"description": "x", "dataset": "pneumoniamnist", "fixed": {"image_size": 32},
           "params": {"stem": {"choice": ["imagenet", "small"]}},
           "variants": {"cnn": {"model": "resnet18"}, "vit": {"model": "vit_small_patch8"}}}
    with pytest.raises(UserError, match="Model vit_small_patch8 has no stem choice"):
        parse_space(raw, Path("mine.yaml"))
    raw["variants"] = {"cnn": {"model": "resnet18"}, "cnn_d": {"model": "resnet18d"}}
    assert parse_space(raw, Path("mine.yaml")).values_of("stem") == ["imagenet", "small"]


def tiny_dataset() -> Dataset:
    """8 px grey images: ResNet-18 with the small stem trains an epoch on them in about a second."""
    labels = np.tile([0, 1], 24)
    official_val = np.zeros(len(labels), bool)
    official_val[-8:] = True
    return Dataset("tiny", "binary", ("normal", "abnormal"), ImageSet(toy_images(labels, size=8), labels),
                   ImageSet(toy_images(labels[:8], size=8, seed=1), labels[:8]), official_val)


def test_a_trial_logs_its_resolved_stem_and_replay_and_export_rebuild_it(tmp_path, monkeypatch):
    data = tiny_dataset()
    config = resolve_config({"model": "resnet18", "image_size": 8, "epochs": 1, "batch_size": 20, "device": "cpu"})
    (epoch,) = iterate_epochs(config, data)
    assert epoch.metrics["stem_resolved"] == "small" and epoch.state["stem"] == "small"  # auto at 8 px
    assert {"params_total", "params_trainable", "flops_per_image"} <= set(epoch.metrics)
    monkeypatch.setattr(analysis.replay, "load_dataset", lambda spec, **kwargs: data)
    rep = replay(epoch.state)
    assert rep.stem == "small" and isinstance(rep.model.maxpool, torch.nn.Identity)
    logits, _ = rep.trial_logits(data.test)
    assert np.allclose(probabilities("binary", logits), epoch.test_probs, atol=1e-6)  # the trial's own network
    save_model(rep.model, architecture(rep), tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["stem"] == "small"
    assert isinstance(load_model(tmp_path).maxpool, torch.nn.Identity)

    # saved before `stem` existed: no stem in the config, the checkpoint or model.json -> timm's ImageNet stem
    older = {**epoch.state, "config": {k: v for k, v in config.items() if k != "stem"}}
    del older["stem"]
    rep = replay(older)
    assert rep.stem == "imagenet" and isinstance(rep.model.maxpool, torch.nn.MaxPool2d)
    spec = json.loads((tmp_path / "model.json").read_text())
    del spec["stem"]
    (tmp_path / "model.json").write_text(json.dumps(spec))
    assert isinstance(load_model(tmp_path).maxpool, torch.nn.MaxPool2d)


def test_resuming_with_another_stem_is_refused():
    data = tiny_dataset()
    config = {"model": "resnet18", "image_size": 8, "epochs": 2, "batch_size": 20, "device": "cpu"}
    first = next(iterate_epochs(config, data))
    with pytest.raises(UserError, match="trained with the small stem, this config builds the imagenet stem"):
        next(iterate_epochs({**config, "stem": "imagenet"}, data, resume=first.state))
