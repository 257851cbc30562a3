"""The Performer's configuration (slimtune/config.py): the feature-map names and their feature counts M, each
validation of PerformerConfig (sizes, the d % 4 and d % H rules, the layer-norm flag, the feature type), and the
dict form a checkpoint stores, which ignores keys that are not model settings and names those it lacks."""

import pytest
from helpers import tiny_model

from slimtune.config import ELEMENTWISE_NAMES, PerformerConfig, favor_multiplier, feature_dim
from slimtune.errors import ConfigError


def test_feature_counts():
    for name in ELEMENTWISE_NAMES:
        assert favor_multiplier(name) is None and feature_dim(name, 24) == 24  # elementwise: M = d_h
    assert favor_multiplier("favor+") == 1 and feature_dim("favor+", 24) == 24
    assert favor_multiplier("favor+_3") == 3 and feature_dim("favor+_3", 24) == 72
    assert feature_dim("favor+_12", 8) == 96


@pytest.mark.parametrize("bad", ["gauss", "favor+_0", "favor+_", "favor+_-1", "favor", "FAVOR+", "sqr ", "favor+_2x"])
def test_unknown_feature_types_are_refused(bad):
    with pytest.raises(ConfigError, match="unknown feature type"):
        favor_multiplier(bad)
    with pytest.raises(ConfigError, match="unknown feature type"):
        PerformerConfig(feature_type=bad)


def test_unknown_feature_type():  # moved from test_slim.py
    with pytest.raises(ConfigError, match="unknown feature type 'gauss'"):
        tiny_model("gauss")


def test_sizes_and_derived_sizes():
    c = PerformerConfig(vocab_size=256, hidden_dim=48, n_layers=2, ffn_dim=96, n_heads=3, feature_type="favor+_2")
    assert c.head_dim == 16 and c.n_features == 32
    assert PerformerConfig(hidden_dim=48, n_heads=3, feature_type="relu").n_features == 16
    defaults = PerformerConfig()
    assert (defaults.vocab_size, defaults.hidden_dim, defaults.n_layers, defaults.ffn_dim, defaults.n_heads) == (
        256,
        256,
        3,
        1024,
        4,
    )
    assert defaults.feature_type == "sqr" and defaults.on_gptln is True


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(n_layers=-1), "n_layers must be a positive integer"),
        (dict(ffn_dim=2.0), "ffn_dim must be a positive integer"),
        (dict(n_heads=True), "n_heads must be a positive integer"),
        (dict(hidden_dim="16"), "hidden_dim must be a positive integer"),
        (dict(hidden_dim=18, n_heads=2), "multiple of 4"),
        (dict(hidden_dim=20, n_heads=3), "not divisible by n_heads 3"),
        (dict(on_gptln=1), "on_gptln must be true or false"),
        (dict(on_gptln="post"), "on_gptln must be true or false"),
    ],
)
def test_invalid_configs_say_what_is_wrong(bad, message):
    with pytest.raises(ConfigError, match=message):
        PerformerConfig(**bad)


def test_the_dict_form_round_trips_and_ignores_other_keys():
    c = PerformerConfig(vocab_size=128, hidden_dim=32, n_layers=1, ffn_dim=64, n_heads=4, on_gptln=False)
    values = c.to_dict()
    assert values == {
        "vocab_size": 128,
        "hidden_dim": 32,
        "n_layers": 1,
        "ffn_dim": 64,
        "n_heads": 4,
        "feature_type": "sqr",
        "on_gptln": False,
    }
    assert PerformerConfig.from_dict(values | {"seq_len": 512, "note": "x"}) == c


def test_a_dict_without_every_setting_names_the_missing_ones():
    values = PerformerConfig().to_dict()
    del values["n_heads"], values["ffn_dim"]
    with pytest.raises(ConfigError, match="lacks ffn_dim, n_heads"):
        PerformerConfig.from_dict(values)


def test_a_config_is_frozen():
    c = PerformerConfig()
    with pytest.raises(AttributeError):
        c.hidden_dim = 64
