"""The registry of student families: lookups by name and model_type, presets, and the one-line
errors a config naming an unknown family or preset gets."""

import pytest

from mcckd_jax import config
from mcckd_jax.models import decoder, pretrained, registry
from mcckd_jax.train.config import TrainConfig


def test_every_model_type_belongs_to_exactly_one_family():
    seen = [t for family in registry.FAMILIES.values() for t in family.model_types]
    assert len(seen) == len(set(seen))
    for family in registry.FAMILIES.values():
        for model_type in family.model_types:
            assert registry.family_of_model_type(model_type, "x") is family


def test_every_preset_builds_its_family_config_and_model_class():
    for family in registry.FAMILIES.values():
        assert "tiny" in family.presets
        for name in family.presets:
            model_cls, architecture = registry.preset_config(family.name, name, {})
            assert model_cls is family.model_cls and type(architecture) is family.config_cls
            assert model_cls.LAYOUT in ("decoder_only", "encoder_decoder")


def test_the_decoder_families_share_one_model():
    decoders = [f for f in registry.FAMILIES.values() if f.model_cls is decoder.DecoderModel]
    assert {f.name for f in decoders} >= {"llama", "qwen2", "qwen3", "gemma2", "gemma3"}


def test_architecture_fields_are_set_on_the_preset():
    _, architecture = registry.preset_config("qwen3", "tiny", {"num_hidden_layers": 3},
                                             remat_policy="full")
    assert architecture.num_hidden_layers == 3 and architecture.remat_policy == "full"
    assert architecture.qk_norm  # still Qwen3


def test_unknown_names_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown student family 'gpt2' \(gemma2, gemma3, llama"):
        registry.family("gpt2")
    with pytest.raises(ValueError, match=r"ckpt: model_type 'gpt2' is not supported \(gemma2, "):
        registry.family_of_model_type("gpt2", "ckpt")
    with pytest.raises(ValueError, match="student family qwen2 has no preset 'huge'"):
        pretrained.student_architecture(pretrained.StudentConfig(family="qwen2", preset="huge"))
    path = tmp_path / "run.yaml"
    path.write_text("student:\n  family: gpt2\n")
    with pytest.raises(config.ConfigError) as error:
        config.load(TrainConfig, path)
    assert "unknown student family 'gpt2'" in str(error.value)
    assert "\n" not in str(error.value)
