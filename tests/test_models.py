import pytest
import timm
import torch

from trainables.errors import UserError
from trainables.models import count_trainable, create_model, model_names

SMALL = ["resnet18d", "resnet18", "simple_cnn", "vgg_like", "vit_small_patch8", "efficientnet_b0", "densenet121"]


def test_every_issue_model_is_registered():
    expected = {f"resnet{d}d" for d in (18, 34, 50, 101, 152, 200)} | {f"resnet{d}" for d in (18, 34, 50, 101, 152)}
    expected |= {"densenet121", "densenet161", "efficientnet_b0", "vit_small_patch8", "vgg_like", "simple_cnn"}
    assert expected <= set(model_names())


@pytest.mark.parametrize("name", SMALL)
def test_model_follows_dataset_channels_and_classes(name):
    model = create_model(name, num_classes=3, in_chans=1, img_size=32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_small_vit_has_the_study_shape():
    vit = create_model("vit_small_patch8", num_classes=2, in_chans=1, img_size=32)
    assert vit.patch_embed.proj.kernel_size == (8, 8) and vit.embed_dim == 128 and len(vit.blocks) == 6
    assert vit.blocks[0].attn.num_heads == 16 and vit.blocks[0].mlp.fc1.out_features == 512


def test_unknown_model_lists_valid_names():
    with pytest.raises(UserError, match=r"Unknown model 'resnet19'; valid names: .*resnet18d"):
        create_model("resnet19", num_classes=2, in_chans=1, img_size=28)


def test_densenet_below_32_px_is_refused_clearly():
    with pytest.raises(UserError, match="at least 32 px"):
        create_model("densenet121", num_classes=2, in_chans=1, img_size=28)


def test_freeze_backbone_trains_the_head_only():
    model = create_model("resnet18", num_classes=2, in_chans=1, img_size=28, freeze_backbone=True)
    assert count_trainable(model) == 512 * 2 + 2


def test_pretrained_from_a_local_file(tmp_path):
    source = timm.create_model("resnet18", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet18", num_classes=2, in_chans=1, img_size=28, pretrained=True, pretrained_path=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert model.conv1.weight.shape[1] == 1  # first conv adapted to grey images


def test_missing_pretrained_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="pretrained_path .* does not exist"):
        create_model("resnet18", num_classes=2, in_chans=1, img_size=28, pretrained=True,
                     pretrained_path=str(tmp_path / "nope.pth"))


def test_pretrained_without_file_or_hub_fails_fast_with_the_fix(monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(UserError, match="hub is unreachable.*pretrained_path=<file>"):
        create_model("resnet18", num_classes=2, in_chans=1, img_size=28, pretrained=True)
