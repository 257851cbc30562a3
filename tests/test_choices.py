"""The named choices (slimtune/choices.py): members compare, hash, print and format as their string values, so a
recipe's or a saved run's strings work unchanged; `Choice.parse` turns a string into a member or raises a
ConfigError that names the parameter and lists the allowed values; the dtypes and layer-norm placement the choices
stand for."""

import pytest
import torch

from slimtune.choices import (
    BenchOptimizer,
    Choice,
    ExportDtype,
    ExportFormat,
    Heap,
    LayerNorm,
    Optimizer,
    Precision,
    Recovery,
    Schedule,
    Task,
)
from slimtune.errors import ConfigError

ALL = [Optimizer, BenchOptimizer, Precision, Recovery, Schedule, LayerNorm, ExportFormat, ExportDtype, Heap, Task]


def test_members_are_their_values():
    assert Optimizer.ADAM == "adam" and "adamw" == Optimizer.ADAMW
    assert str(Recovery.SUBTRACT64) == "subtract64" and f"{Schedule.COSINE}" == "cosine"
    assert f"[{Heap.SYSTEM:>8}]" == "[  system]"  # format specs apply to the value
    table = {"adam": 1, "sgd": 2}
    assert table[Optimizer.ADAM] == 1 and Optimizer.SGD in table  # a member finds its value's entries
    assert {Optimizer.ADAM, "adam"} == {"adam"}
    assert Optimizer.SGD.value == "sgd" and "magic" != Optimizer.SGD


@pytest.mark.parametrize("choice", ALL, ids=lambda c: c.__name__)
def test_parse_reads_every_value_and_returns_the_member(choice):
    for member in choice:
        parsed = choice.parse(member.value, "what")
        assert parsed is member and isinstance(parsed, choice)
        assert choice.parse(member, "what") is member  # a member passes through


@pytest.mark.parametrize("choice", ALL, ids=lambda c: c.__name__)
def test_parse_of_a_bad_value_names_the_parameter_and_the_allowed_values(choice):
    for bad in ("magic", "", "ADAM ", None, 3):
        with pytest.raises(ConfigError) as info:
            choice.parse(bad, "my_param")
        assert info.value.params == ("my_param",)
        message = str(info.value)
        assert message.startswith("`my_param` must be one of ") and repr(bad) in message
        for member in choice:
            assert member.value in message


def test_parse_is_case_sensitive_like_the_command_line():
    with pytest.raises(ConfigError, match="`optimizer` must be one of sgd, adam, adamw, adafactor, got 'Adam'"):
        Optimizer.parse("Adam", "optimizer")


def test_what_the_choices_stand_for():
    assert Precision.BF16.dtype is torch.bfloat16 and Precision.FP32.dtype is None
    expected = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert {d.value: d.dtype for d in ExportDtype} == expected
    assert LayerNorm.POST.on_gptln is True and LayerNorm.PRE.on_gptln is False
    assert issubclass(Optimizer, Choice) and issubclass(Optimizer, str)
