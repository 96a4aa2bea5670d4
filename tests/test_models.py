import pytest
import timm
import torch

from trainables.errors import UserError
from trainables.models import count_trainable, create_model, model_names

SMALL = ["resnet18d", "resnet18", "simple_cnn", "vgg_like", "vit_small_patch8", "efficientnet_b0", "densenet121",
         "mobilenetv3_small_050"]


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


def test_efficientnet_takes_the_study_stochastic_depth():
    from timm.layers import DropPath

    rates = lambda model: [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]  # noqa: E731
    model = create_model("efficientnet_b0", num_classes=2, in_chans=1, img_size=32, drop_path_rate=0.06)
    assert rates(model) and max(rates(model)) == pytest.approx(0.06, abs=0.01)  # timm ramps it up with depth
    assert not rates(create_model("efficientnet_b0", num_classes=2, in_chans=1, img_size=32))


def test_vit_takes_attention_dropout():
    vit = create_model("vit_small_patch8", num_classes=2, in_chans=1, img_size=32, attn_drop_rate=0.3)
    assert vit.blocks[0].attn.attn_drop.p == 0.3
    assert create_model("vit_small_patch8", num_classes=2, in_chans=1, img_size=32).blocks[0].attn.attn_drop.p == 0.0


@pytest.mark.parametrize("name, key", [("densenet121", "drop_path_rate"), ("resnet18", "attn_drop_rate"),
                                       ("vgg_like", "drop_path_rate")])
def test_a_regularisation_key_the_model_lacks_is_refused(name, key):
    with pytest.raises(UserError, match=f"Model {name} has no {key}"):
        create_model(name, num_classes=2, in_chans=1, img_size=32, **{key: 0.1})


def test_vgg_like_without_dropout_when_asked():
    dropouts = lambda model: [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]  # noqa: E731
    assert [d.p for d in dropouts(create_model("vgg_like", num_classes=2, in_chans=1, img_size=32))] == [0.5]
    plain = create_model("vgg_like", num_classes=2, in_chans=1, img_size=32, drop_rate=0.0)
    assert not dropouts(plain)
    # the same state-dict keys either way: an exported model loads whatever its drop_rate
    assert plain.state_dict().keys() == create_model("vgg_like", num_classes=2, in_chans=1, img_size=32).state_dict().keys()


def test_model_costs_count_parameters_and_flops():
    from trainables.models import model_costs

    model = create_model("simple_cnn", num_classes=2, in_chans=1, img_size=16, freeze_backbone=True)
    costs = model_costs(model, in_chans=1, img_size=16)
    assert costs["params_total"] == (1 * 9 + 1) * 32 + (32 * 9 + 1) * 64 + (1024 + 1) * 2
    assert costs["params_trainable"] == (1024 + 1) * 2
    # multiply-adds x 2: conv 1->32 at 16x16, conv 32->64 at 8x8, linear 1024->2
    assert costs["flops_per_image"] == 2 * (16 * 16 * 32 * 9 + 8 * 8 * 64 * 32 * 9 + 1024 * 2)


def test_weights_statistics_are_the_pretrained_cfg_averaged_for_grey():
    from trainables.models import weights_statistics

    assert weights_statistics("resnet18", 3) == ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    mean, std = weights_statistics("resnet18", 1)
    assert mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and std == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
