"""Model registry, heads, Grad-CAM layers and pretrained-weight loading (CPU, 64x64 inputs)."""

from __future__ import annotations

import pytest
import timm
import torch
from monai.visualize import GradCAM
from safetensors.torch import save_file
from torch import nn

from ichseg.errors import ConfigError
from ichseg.models import create_model, list_models, pretrained

torch.set_num_threads(2)

EXPECTED = {
    "alexnet",
    "densenet121",
    "efficientnet_b4",
    "resnet101",
    "resnet18",
    "resnet50",
    "seresnet50",
    "vgg16",
    "vgg16_bn_gap",
}


def test_registry_lists_all_models() -> None:
    assert set(list_models()) == EXPECTED
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("in_channels", [3, 9])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_trains_and_explains(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=6)
    assert (model.name, model.in_channels, model.num_classes) == (name, in_channels, 6)
    modules = dict(model.named_modules())
    first_conv = modules[model.first_conv]
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == in_channels

    x = torch.randn(2, in_channels, 64, 64)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 6)
    logits.sum().backward()
    grad = first_conv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    layer = model.gradcam_target_layer()
    assert layer in modules
    cam = GradCAM(nn_module=model, target_layers=layer)(x)
    assert cam.shape == (2, 1, 64, 64)
    assert torch.isfinite(torch.as_tensor(cam)).all()


def test_fc_bn_head() -> None:
    model = create_model("resnet18", num_classes=4, head="fc_bn", hidden=32, dropout=0.3)
    types = [type(m) for m in model.head]
    assert types == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]
    assert model.head[0].in_features == model.num_features and model.head[0].out_features == 32
    assert model.head[3].p == pytest.approx(0.3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_linear_head_and_input_check() -> None:
    model = create_model("resnet18", dropout=0.2)
    assert [type(m) for m in model.head] == [nn.Dropout, nn.Linear]
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(1, 9, 64, 64))


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as info:
        create_model("resnt50")
    message = str(info.value)
    assert "\n" not in message and "'resnt50'" in message
    assert all(name in message for name in EXPECTED)


@pytest.mark.parametrize(
    "kwargs", [{"head": "mlp"}, {"in_channels": 0}, {"num_classes": 0}, {"dropout": 1.0}]
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("resnet18", **kwargs)


def test_seresnet50_is_resnet50_plus_se() -> None:
    plain = dict(create_model("resnet50").named_modules())
    se = dict(create_model("seresnet50").named_modules())
    assert type(plain["backbone"]) is type(se["backbone"])
    extra = set(se) - set(plain)
    assert extra and all(".se" in name for name in extra)
    assert set(plain) <= set(se)
    for name, module in plain.items():
        assert type(se[name]) is type(module), name
        shapes = [p.shape for p in module.parameters(recurse=False)]
        assert shapes == [p.shape for p in se[name].parameters(recurse=False)], name
    # 16 bottlenecks, one SE each.
    assert sum(1 for name in extra if name.endswith(".se")) == 16


def _save(state: dict, path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_pretrained_from_local_file(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet18")  # full model: the fc head must be ignored
    path = tmp_path / f"resnet18{suffix}"
    _save(source.state_dict(), path)

    model = create_model("resnet18", pretrained=path)
    expected = source.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    report = model.load_report
    assert report is not None and sorted(report.ignored_head) == ["fc.bias", "fc.weight"]
    assert not report.unexpected and not report.adapted_first_conv


def test_pretrained_checkpoint_dict_and_channel_adaptation(tmp_path) -> None:
    torch.manual_seed(2)
    source = timm.create_model("resnet18", num_classes=0).eval()
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)

    model = create_model("resnet18", in_channels=9, pretrained=str(path)).eval()
    weight = model.backbone.conv1.weight
    rgb = source.conv1.weight
    assert weight.shape == (64, 9, 7, 7) and model.load_report.adapted_first_conv
    assert torch.allclose(weight, (rgb.sum(1, keepdim=True) / 9).expand(-1, 9, -1, -1))
    # The stated rule keeps the response to a grey image: 9 equal channels == 3 equal channels.
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ours = model.forward_features(grey.expand(-1, 9, -1, -1))
        ref = source(grey.expand(-1, 3, -1, -1))
    assert torch.allclose(ours, ref, atol=1e-4)


def test_pretrained_torchvision_file_adapts_first_conv(tmp_path) -> None:
    import torchvision

    source = torchvision.models.alexnet()
    path = tmp_path / "alexnet.pth"
    torch.save(source.state_dict(), path)
    model = create_model("alexnet", in_channels=9, pretrained=path)
    assert model.backbone.features[0].weight.shape == (64, 9, 11, 11)
    assert torch.equal(model.backbone.classifier[1].weight, source.classifier[1].weight)
    assert sorted(model.load_report.ignored_head) == ["classifier.6.bias", "classifier.6.weight"]


def test_vgg16_bn_gap_is_torchvision_vgg16_bn_globally_pooled(tmp_path) -> None:
    import torchvision

    torch.manual_seed(3)
    source = torchvision.models.vgg16_bn().eval()
    # Batch-norm statistics and affine terms away from their initial values, so a mis-mapped
    # or skipped BN tensor changes the features; fc6-fc8 small, their shapes do not matter.
    for module in source.features:
        if isinstance(module, nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.uniform_(-0.5, 0.5)
            module.running_var.data.uniform_(0.5, 2.0)
    for index in (0, 3, 6):
        source.classifier[index] = nn.Linear(4, 4)
    path = tmp_path / "vgg16_bn.pth"
    torch.save(source.state_dict(), path)
    model = create_model("vgg16_bn_gap", pretrained=path).eval()
    # ImageNet's file fills every convolution and batch norm; fc6-fc8 are the ignored head.
    ignored = sorted({key.rsplit(".", 1)[0] for key in model.load_report.ignored_head})
    assert ignored == ["classifier.0", "classifier.3", "classifier.6"]
    assert not model.load_report.unexpected and model.num_features == 512
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        pooled = source.features(x).mean((2, 3))
        assert torch.allclose(model.forward_features(x), pooled, atol=1e-5)
    # 15M parameters, not 134M: fc6/fc7 are gone, not merely unused.
    assert sum(p.numel() for p in model.parameters()) < 16_000_000
    # Grad-CAM reads conv5_3 after its batch norm and ReLU, the last map before pool5.
    features = model.backbone.features
    index = int(model.gradcam_target_layer().rsplit(".", 1)[1])
    assert isinstance(features[index], nn.ReLU) and isinstance(features[index - 1], nn.BatchNorm2d)
    assert isinstance(features[index + 1], nn.MaxPool2d) and index + 2 == len(features)


def test_pretrained_wrong_keys(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ConfigError, match="other.pt.*missing.*conv1.weight"):
        create_model("resnet18", pretrained=path)


def test_pretrained_wrong_architecture(tmp_path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ConfigError, match="r18.pt.*do not fit densenet121"):
        create_model("densenet121", pretrained=path)


def test_pretrained_missing_or_corrupt_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        create_model("resnet18", pretrained=tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_model("resnet18", pretrained=bad)


def test_pretrained_true_offline_is_one_line_config_error(monkeypatch) -> None:
    def offline(source: str, arch: str) -> dict:
        raise OSError("[Errno -3] Temporary failure in name resolution\nmore detail")

    monkeypatch.setattr(pretrained, "_download_weights", offline)
    with pytest.raises(ConfigError) as info:
        create_model("resnet18", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "could not be downloaded" in message and "pretrained=PATH" in message


def test_pretrained_true_uses_download_and_adapts(monkeypatch) -> None:
    torch.manual_seed(3)
    source = timm.create_model("resnet18")
    calls = []

    def fake_download(src: str, arch: str) -> dict:
        calls.append((src, arch))
        return source.state_dict()

    monkeypatch.setattr(pretrained, "_download_weights", fake_download)
    model = create_model("resnet18", in_channels=9, pretrained=True)
    assert calls == [("timm", "resnet18")]
    assert model.backbone.conv1.weight.shape == (64, 9, 7, 7)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_logits_are_fp32_under_bf16_autocast() -> None:
    """bf16 logits have 8 significant bits: close scores would tie and bias AUROC."""
    model = create_model("resnet18", in_channels=3, num_classes=6).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.rand(4, 3, 64, 64))
    assert logits.dtype == torch.float32
    # Distinct inputs give distinct scores, not a handful of bf16 values.
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        many = model(torch.rand(64, 3, 32, 32))[:, 0]
    assert len(set(many.tolist())) == 64
