"""The method registry: names, run order, labels, and one registration adds a method."""

import pytest

from smoothrot.methods.registry import (
    BASELINE,
    Method,
    MethodResult,
    get_method,
    method_names,
    register,
    run_order,
)
from smoothrot.schema.config import DEFAULT_METHODS
from smoothrot.schema.errors import ConfigError


def test_unknown_method_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"unknown method 'magic'; choose from \['rtn'"):
        run_order(["magic"])


def test_run_order_adds_baseline_and_requirements_first():
    # A GPTQ row brings its baseline, SmoothRot-max + GPTQ (reports compare it with that).
    assert [m.name for m in run_order(["trained+gptq"])] == [
        "smoothrot_max", "joint", "trained", "smoothrot_max+gptq", "trained+gptq"]
    assert [m.name for m in run_order(["rtn"])] == ["rtn", BASELINE]
    assert [m.name for m in run_order([])] == [BASELINE]


def test_every_method_is_registered_once_with_a_label_and_rounding():
    names = method_names()
    assert len(names) == len(set(names))
    assert set(DEFAULT_METHODS) <= set(names)
    labels = [get_method(n).label for n in names]
    assert len(labels) == len(set(labels))
    # Every base that can carry scales has a GPTQ variant, the fair baseline included.
    for base in ("hadamard", "smoothrot_max", "quantile", "joint", "trained"):
        gptq = get_method(f"{base}+gptq")
        assert gptq.requires == (base,) and gptq.rounding == "gptq"
    assert {get_method(n).rounding for n in names} == {"rtn", "gptq"}


def test_register_refuses_duplicates_and_unknown_requirements():
    class Toy(Method):
        name, label, requires = "toy", "toy", ("no_such_method",)

        def fit(self, ctx):
            return MethodResult({})

    with pytest.raises(ValueError, match="requires unregistered"):
        register(Toy())
    with pytest.raises(ValueError, match="registered twice"):
        register(get_method("rtn"))


def test_chosen_by_walks_requirements_to_the_method_that_chose_alpha_q():
    from smoothrot.methods.registry import chosen_by

    choices = {"joint", "smoothrot_max"}
    assert chosen_by("joint", choices) == "joint"
    assert chosen_by("trained", choices) == "joint"
    assert chosen_by("trained+gptq", choices) == "joint"
    assert chosen_by("hadamard", choices) is None
    assert chosen_by("trained", set()) is None
