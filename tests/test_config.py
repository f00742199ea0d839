import pytest
import yaml

from raydae.config import Config, load_config, preset_names
from raydae.errors import UserError


def test_presets_ship_with_the_package_and_load():
    names = preset_names()
    assert {"shapes", "tiny"} <= set(names)
    for name in names:
        assert isinstance(load_config(preset=name), Config)


def test_files_merge_left_to_right_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("ae: {latent_channels: 8, base_channels: 16}\ntrain: {lr: 0.001}\n")
    b.write_text("ae: {latent_channels: 12}\n")
    config = load_config("tiny", [str(a), str(b)], ["train.lr=3e-4", "ae.aux_decoder.dropout=0.3"])
    assert config.ae.latent_channels == 12  # b wins over a
    assert config.ae.base_channels == 16  # a's value kept where b is silent
    assert config.train.lr == pytest.approx(3e-4)  # --set wins over files
    assert config.ae.aux_decoder.dropout == pytest.approx(0.3)
    assert config.data.image_size == 16  # from the preset


def test_override_values_are_parsed_to_the_field_type():
    config = load_config(overrides=["train.lr=1", "scaling.use_gpu=true", "ae.channel_mults=[1,2]",
                                    "ae.downsample_factor=2", "data.source=123"])
    assert isinstance(config.train.lr, float) and config.train.lr == 1.0  # int widens to float
    assert config.scaling.use_gpu is True
    assert config.ae.channel_mults == [1, 2]
    assert config.data.source == "123"  # a string field keeps the raw text


@pytest.mark.parametrize("override, needle", [
    ("ae.latent_chanels=4", "did you mean 'ae.latent_channels'"),
    ("trian.lr=1", "did you mean 'train'"),
    ("ae.aux_decoder.widht=0.5", "did you mean 'ae.aux_decoder.width'"),
])
def test_unknown_key_names_the_key_and_the_closest_valid_one(override, needle):
    with pytest.raises(UserError) as err:
        load_config(overrides=[override])
    assert override.split("=")[0] in str(err.value)
    assert needle in str(err.value)


def test_unknown_key_in_a_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {stage1_step: 5}\n")
    with pytest.raises(UserError, match=r"unknown config key 'train.stage1_step'.*'train.stage1_steps'"):
        load_config(files=[str(path)])


@pytest.mark.parametrize("override, needle", [
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.stage1_steps=1.5", "train.stage1_steps: expected an integer"),
    ("scaling.use_gpu=maybe", "scaling.use_gpu: expected true or false"),
    ("ae.channel_mults=3", "ae.channel_mults: expected a list"),
])
def test_wrong_type_names_the_field_and_the_expected_type(override, needle):
    with pytest.raises(UserError, match=needle):
        load_config(overrides=[override])


def test_invalid_choices_and_shapes_are_rejected():
    with pytest.raises(UserError, match="ae.bottleneck"):
        load_config(overrides=["ae.bottleneck=gaussian"])
    with pytest.raises(UserError, match="downsample_factor"):
        load_config(overrides=["ae.downsample_factor=8"])  # 3 levels give 4
    with pytest.raises(UserError, match="missing.yaml does not exist"):
        load_config(files=["missing.yaml"])
    with pytest.raises(UserError, match="unknown preset 'shape'.*did you mean 'shapes'"):
        load_config(preset="shape")


def test_resolved_config_round_trips_through_yaml():
    config = load_config("shapes", overrides=["ae.latent_channels=8"])
    again = Config.from_dict(yaml.safe_load(config.to_yaml()))
    assert again == config


def test_joint_steps_default_to_equal_total_steps():
    config = load_config("tiny", overrides=["train.mode=joint"])
    assert config.stages() == ["joint"]
    assert config.stage_steps("joint") == config.train.stage1_steps + config.train.stage2_steps
    config = load_config("tiny", overrides=["train.mode=joint", "train.joint_steps=6"])
    assert config.stage_steps("joint") == 6


@pytest.mark.parametrize("overrides, needle", [
    (["ae.bottleneck=vq", "train.freeze_quantizer=false"], "train.freeze_quantizer=false"),
    (["train.warm_start_decoder=true"], "warm_start_decoder"),
    (["generator=dit", "generator_train.checkpoint_every=0"], "generator_train.checkpoint_every"),
    (["generator=dit", "scaling.num_workers=3", "train.batch_size=15"], "generator_train.batch_size=128"),
    (["dit.schedule=linear", "dit.num_timesteps=20"], "last beta would be 1 .*more than 20 timesteps"),
    (["dit.class_conditional=true", "dit.cfg_scale=2", "dit.class_dropout=0"], "guidance needs the unconditional"),
])
def test_settings_that_would_fail_late_are_refused_at_load(overrides, needle):
    with pytest.raises(UserError, match=needle):
        load_config("tiny", overrides=overrides)


def test_equivariance_is_off_by_default_and_loads_when_its_scales_fit():
    assert load_config("tiny").loss.equivariance.weight == 0.0
    config = load_config("tiny", overrides=["loss.equivariance.weight=0.5", "loss.equivariance.scales=[0.25,0.5]"])
    assert config.loss.equivariance.scales == [0.25, 0.5]
    # Off, scales need not fit the image size (image 16 / factor 2 = latent side 8).
    load_config("tiny", overrides=["loss.equivariance.scales=[0.6]"])


@pytest.mark.parametrize("overrides, needle", [
    (["loss.equivariance.weight=-1"], r"loss.equivariance.weight: must be >= 0"),
    (["loss.equivariance.probability=0"], r"loss.equivariance.probability: must be in \(0, 1\]"),
    (["loss.equivariance.probability=1.5"], r"loss.equivariance.probability"),
    (["loss.equivariance.scales=[0.5,1.5]"], r"loss.equivariance.scales: 1.5 is not in \(0, 1\]"),
    (["loss.equivariance.weight=1", "loss.equivariance.scales=[0.6]"],
     r"loss.equivariance.scales: 0.6 gives a latent side of 4.8 .*data.image_size 16 / ae.downsample_factor 2.*"
     r"multiples of 1/8, e.g. 0.625"),
    (["loss.equivariance.weight=1", "loss.equivariance.scales=[]", "loss.equivariance.rotations=false"],
     r"loss.equivariance: weight > 0 but no transform"),
])
def test_bad_equivariance_settings_name_the_key_and_the_fix(overrides, needle):
    with pytest.raises(UserError, match=needle):
        load_config("tiny", overrides=overrides)
