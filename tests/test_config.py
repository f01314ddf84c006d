from pathlib import Path

import pytest
import yaml

from ichseg.config import (
    PACKAGE_CONFIGS,
    RunConfig,
    load_config,
    packaged_config,
    save_config,
)
from ichseg.errors import ConfigError


def test_defaults_validate():
    config = RunConfig()
    assert config.data.in_channels == 3
    assert config.task.class_names[0] == "any"


def test_misspelt_key_fails_naming_it(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {nmae: vgg16}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model\.nmae'"):
        load_config(path)


def test_wrong_type_names_key(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: many}\n")
    with pytest.raises(ConfigError, match=r"'train\.epochs'"):
        load_config(path)


def test_invalid_yaml_is_one_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value) and "invalid YAML" in str(info.value)


def test_base_delta_merge(tmp_path: Path):
    (tmp_path / "base.yaml").write_text(
        yaml.safe_dump({"model": {"name": "resnet50", "dropout": 0.3}, "train": {"epochs": 7}})
    )
    (tmp_path / "delta.yaml").write_text("base: base.yaml\nmodel: {name: seresnet50}\n")
    config = load_config(tmp_path / "delta.yaml", overrides=["train.lr=0.01"])
    assert config.model.name == "seresnet50"
    assert config.model.dropout == 0.3  # kept from the base
    assert config.train.epochs == 7
    assert config.train.lr == 0.01


def test_ladder_rungs_differ_only_where_intended():
    rungs = [
        load_config(packaged_config(f"ablation/{name}.yaml"))
        for name in ("01_vgg16", "02_resnet50", "03_seresnet50", "04_seresnet50_unet")
    ]
    assert [r.model.name for r in rungs] == ["vgg16_bn_gap", "resnet50", "seresnet50", "seresnet50"]
    assert [r.masking.enabled for r in rungs] == [False, False, False, True]
    dump = [r.model_dump(exclude={"name"}) for r in rungs]
    # +SE changes the model name only; +U-Net changes masking only.
    assert {k for k in dump[1] if dump[1][k] != dump[2][k]} == {"model"}
    assert dump[1]["model"] | {"name": "seresnet50"} == dump[2]["model"]
    assert {k for k in dump[2] if dump[2][k] != dump[3][k]} == {"masking"}


def test_save_config_round_trip(tmp_path: Path):
    config = load_config(packaged_config("base.yaml"), overrides=["seed=5"])
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config


def test_unknown_packaged_config_lists_available():
    with pytest.raises(ConfigError, match="available: .*base.yaml"):
        packaged_config("nope.yaml")
    assert (PACKAGE_CONFIGS / "profiles" / "quick.yaml").exists()
