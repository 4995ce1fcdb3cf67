import pytest

from smoothrot.schema.config import (
    FitConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)
from smoothrot.schema.errors import ConfigError
from smoothrot.schema.quant import QuantScheme, get_scheme


def test_round_trip_default():
    cfg = FitConfig()
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_every_shipped_config_loads(tmp_path):
    from pathlib import Path

    configs = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(path)
        assert config_from_dict(config_to_dict(cfg)) == cfg
        again = tmp_path / path.name
        again.write_text(dump_config(cfg))
        assert load_config(again) == cfg


def test_unknown_key_is_rejected(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\] in train"):
        load_config(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"search": {"alphas": [1.5]}}, "α must be in"),
        ({"search": {"quantiles": [0.0]}}, "q must be in"),
        ({"schemes": ["w3a3"]}, "unknown scheme"),
        ({"methods": []}, "methods must not be empty"),
        ({"layers": []}, "layers must name"),
        ({"data": {"seq_len": 1}}, "seq_len"),
        ({"train": {"lr": -1.0}}, "lr"),
        ({"gptq": {"sequential": "yes"}}, "gptq.sequential='yes' must be true or false"),
        ({"gptq": {"target": "float"}}, r"gptq.target='float' is not one of \['layer', 'model'\]"),
        ({"gptq": {"target": "model", "sequential": False}},
         "gptq.target='model' needs gptq.sequential: true"),
        ({"distributed": {"devices": 2}, "data": {"heldout_samples": 1}},
         r"heldout_samples=1 is fewer than the 2 processes"),
    ],
)
def test_bad_values(data, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_bits_outside_supported_set():
    with pytest.raises(ConfigError, match="w_bits=3"):
        QuantScheme("x", w_bits=3, a_bits=4)
    assert get_scheme("W4A4").w_bits == 4


def test_max_quantile_always_present():
    cfg = config_from_dict({"search": {"quantiles": [0.99]}, "methods": ["trained"]})
    assert cfg.search.quantiles == [0.99, 1.0]
    assert cfg.methods == ["trained"]


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such.yaml")
