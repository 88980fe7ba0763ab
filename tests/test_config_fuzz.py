"""Property-based tests of settings: unknown keys, wrong types, out-of-range values and contradictions.

Each one ends in a Config or in a UserError of one line that names the setting; an unknown key suggests the
closest known one. The expectations are the documented rules (help texts of `qdpo settings`), written out here.
"""

from __future__ import annotations

import math
import re
import typing

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from qdpo.config import Config, build_config, coerce, field_names, parse_override
from qdpo.errors import UserError

FUZZ = dict(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
FIELDS = field_names()
HINTS = typing.get_type_hints(Config)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["nan", "inf", "-inf", "1e-4", "true", "off", "auto", "", " 7 ", "1" * 5000, 10**400]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
    max_leaves=5,
)


def one_line(error: UserError) -> str:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, message
    assert message.endswith((".", "?")) and len(message) < 400, message
    return message


def outcome(fn, *args):
    """The Config (or value) fn returns, or the message of its UserError; any other exception fails the test."""
    try:
        return fn(*args)
    except UserError as e:
        return one_line(e)


def edit_distance(a: str, b: str) -> int:
    """Damerau-Levenshtein (optimal string alignment) distance."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


# ------------------------------------------------------------------------------------------- unknown keys


@st.composite
def typos(draw) -> tuple[str, str]:
    """A known setting with one character deleted, replaced, inserted or two swapped."""
    name = draw(st.sampled_from(FIELDS))
    i = draw(st.integers(0, len(name) - 1))
    c = draw(st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
    edit = draw(st.sampled_from(["delete", "replace", "insert", "swap"]))
    typo = {
        "delete": name[:i] + name[i + 1 :],
        "replace": name[:i] + c + name[i + 1 :],
        "insert": name[:i] + c + name[i:],
        "swap": name[:i] + name[i + 1 : i + 2] + name[i] + name[i + 2 :],
    }[edit]
    return name, typo


@settings(max_examples=80, **FUZZ)
@given(typo=typos())
@example(typo=("max_steps", "max_step"))
def test_a_typo_suggests_a_setting_one_edit_away(typo):
    name, wrong = typo
    if wrong in FIELDS:
        return
    message = outcome(coerce, wrong, 1)
    assert message.startswith(f"unknown setting {wrong!r}; did you mean "), message
    suggested = message.removeprefix(f"unknown setting {wrong!r}; did you mean ").removesuffix("?")
    assert suggested in FIELDS and edit_distance(suggested, wrong) == 1, (name, wrong, message)


@settings(max_examples=60, **FUZZ)
@given(key=st.text(max_size=30).filter(lambda k: k.strip().lower().replace("-", "_") not in FIELDS), value=VALUES)
@example(key="bogus", value=1)
@example(key="x" * 500, value=1)
def test_unknown_keys_are_one_line_with_a_hint(key, value):
    for message in (
        outcome(coerce, key, value),
        outcome(build_config, {key: value}),
        outcome(build_config, None, {key: value}),
    ):
        assert isinstance(message, str) and message.startswith("unknown setting "), message
        hint = message.split("; ", 1)[-1]
        suggested = hint.removeprefix("did you mean ").removesuffix("?")
        assert hint == "see `qdpo settings` for the list." or (
            hint.startswith("did you mean ") and suggested in FIELDS
        ), message


def test_unknown_key_messages():
    assert outcome(coerce, "max_step", 1) == "unknown setting 'max_step'; did you mean max_steps?"
    assert outcome(coerce, "Learning-Rate", 1) == "unknown setting 'Learning-Rate'; did you mean learning_rate?"
    assert outcome(coerce, "lr", 1) == "unknown setting 'lr'; did you mean learning_rate?"
    assert outcome(coerce, "per_device_train_batch_size", 1) == (
        "unknown setting 'per_device_train_batch_size'; did you mean micro_batch_size?"
    )
    assert outcome(coerce, "warmup", 1) == "unknown setting 'warmup'; did you mean warmup_ratio?"
    assert outcome(coerce, "bogus", 1) == "unknown setting 'bogus'; see `qdpo settings` for the list."
    assert outcome(parse_override, "colour=blue") == "unknown setting 'colour'; see `qdpo settings` for the list."


# ------------------------------------------------------------------------------------------------ wrong types


def accepts(name: str, value) -> bool:
    """The documented conversions: numbers from numbers or numeric text, true/false/yes/no/1/0 for switches,
    comma-separated text or a list of strings for name lists, 'none'/'null'/'auto'/'' for settings that may be
    unset."""
    typ = HINTS[name]
    optional = type(None) in typing.get_args(typ)
    if optional and (value is None or isinstance(value, str) and value.lower() in ("none", "null", "", "auto")):
        return True
    base = [a for a in typing.get_args(typ) if a is not type(None)][0] if optional else typ
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is bool:
        return (
            isinstance(value, bool)
            or isinstance(value, str)
            and value.lower() in ("true", "false", "yes", "no", "1", "0")
        )
    if base is int:
        if isinstance(value, str):
            try:
                int(value)
                return True
            except ValueError:
                return False
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        try:
            return (number or isinstance(value, str)) and math.isfinite(float(value))
        except (ValueError, OverflowError):
            return False
    if base is str:
        return number or isinstance(value, str)
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


@settings(max_examples=150, **FUZZ)
@given(name=st.sampled_from(FIELDS), value=VALUES)
@example(name="beta", value=float("nan"))  # was accepted: a NaN beta trains on NaN losses
@example(name="learning_rate", value="inf")
@example(name="beta", value=10**400)  # was OverflowError from float()
@example(name="lora_r", value="1" * 5000)
def test_each_value_is_taken_or_refused_naming_the_setting(name, value):
    got = outcome(build_config, None, {name: value})
    if not accepts(name, value):
        assert isinstance(got, str) and got.startswith(f"{name} "), (value, got)
    elif isinstance(got, str):  # the right type, but out of range or contradicting a default: still names it
        assert name in got, (value, got)
    else:
        assert getattr(got, name) == coerce(name, value)


@settings(max_examples=100, **FUZZ)
@given(
    name=st.sampled_from(FIELDS),
    raw=st.one_of(
        st.text(max_size=16),
        st.sampled_from(
            [
                "[" * 300,
                "1" * 5000,
                ".nan",
                "-.inf",
                "&a [*a]",
                "{a: 1}",
                "[a, 1]",
                "!!python/object:os.system",
                "2024-01-01",
                "0x10",
                "1_000",
                "~",
            ]
        ),
    ),
)
@example(name="lora_r", raw="1" * 5000)  # was ValueError from yaml's int()
@example(name="beta", raw="[" * 1200)  # was RecursionError from yaml
@example(name="learning_rate", raw=".nan")
def test_command_line_overrides_parse_or_fail_naming_the_setting(name, raw):
    got = outcome(parse_override, f"{name}={raw}")
    if isinstance(got, str):
        assert got.startswith(f"{name} "), got
        return
    key, value = got
    assert key == name
    typ = HINTS[name]
    allowed = tuple(a for a in (typing.get_args(typ) or (typ,)) if typing.get_origin(a) is None) or (list,)
    assert isinstance(value, allowed + ((list,) if typing.get_origin(typ) is list else ())), (raw, value)
    if isinstance(value, float):
        assert math.isfinite(value), raw


# --------------------------------------------------------------------------------------- ranges and conflicts

# (setting, values that must be refused, values that must be taken) with every other setting at its default
RANGES = (
    [
        (name, [0, -1], [1, 3])
        for name in (
            "lora_r",
            "lora_alpha",
            "micro_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_total_limit",
            "max_nonfinite_steps",
        )
    ]
    + [(name, [-1, -7], [0, 5]) for name in ("max_steps", "eval_steps", "save_steps", "logits_chunk_size")]
    + [(name, [-0.5, -1e-9], [0.0, 2.5]) for name in ("weight_decay", "max_grad_norm", "sft_weight")]
    + [
        ("beta", [0.0, -0.1], [1e-6, 5.0]),
        ("learning_rate", [0.0, -1e-5], [1e-7, 1.0]),
        ("label_smoothing", [-0.1, 0.5, 0.9], [0.0, 0.49]),
        ("lora_dropout", [-0.1, 1.0], [0.0, 0.99]),
        ("warmup_ratio", [-0.1, 1.0], [0.0, 0.5]),
        ("eval_fraction", [-0.01, 1.0], [0.0, 0.99]),
        ("num_train_epochs", [0.0, -1.0], [0.5, 3.0]),
        ("max_length", [-1, 0, 1], [2, 100, 4096]),
        ("max_prompt_length", [0, -3, 1024, 5000], [1, 1023]),
        ("loss_type", ["dpo", "SIGMOID", ""], ["ipo", "robust"]),
        ("optim", ["sgd"], ["adamw"]),
        ("lr_scheduler_type", ["step"], ["cosine"]),
        ("compute_dtype", ["fp16", "half"], ["float16", "auto"]),
        ("lora_target_modules", [[], ""], [["q_proj"], "q_proj,v_proj"]),
    ]
)


@pytest.mark.parametrize("name, refused, taken", RANGES, ids=[r[0] for r in RANGES])
def test_out_of_range_values_are_refused_naming_the_setting(name, refused, taken):
    for value in refused:
        message = outcome(build_config, None, {name: value})
        assert isinstance(message, str) and re.search(rf"\b{name}\b", message), (value, message)
    for value in taken:
        assert getattr(outcome(build_config, None, {name: value}), name) == coerce(name, value), value


CONFLICTS = st.fixed_dictionaries(
    {},
    optional={
        "share_prompt": st.sampled_from([None, True, False]),
        "pack_pairs": st.booleans(),
        "loss_type": st.sampled_from(["sigmoid", "ipo", "hinge", "robust"]),
        "label_smoothing": st.sampled_from([0.0, 0.2]),
        "max_steps": st.sampled_from([0, 10]),
        "num_train_epochs": st.sampled_from([0.0, 1.0]),
        "max_length": st.sampled_from([64, 512, 2048]),
        "max_prompt_length": st.sampled_from([32, 512, 1024, 4096]),
    },
)


def conflicts(values: dict) -> list[set[str]]:
    """The documented cross-setting rules this combination breaks, each as the settings it involves."""
    v = {
        f: getattr(Config, f)
        for f in (
            "share_prompt",
            "pack_pairs",
            "loss_type",
            "label_smoothing",
            "max_steps",
            "num_train_epochs",
            "max_length",
            "max_prompt_length",
        )
    } | values
    broken = []
    if v["pack_pairs"] and v["share_prompt"] is False:
        broken.append({"pack_pairs", "share_prompt"})
    if v["label_smoothing"] and v["loss_type"] not in ("sigmoid", "robust"):
        broken.append({"label_smoothing", "loss_type"})
    if v["max_steps"] == 0 and v["num_train_epochs"] <= 0:
        broken.append({"max_steps", "num_train_epochs"})
    if "max_prompt_length" in values and v["max_prompt_length"] >= v["max_length"]:
        broken.append({"max_prompt_length", "max_length"})  # unset, it is derived as max_length // 2 instead
    return broken


@settings(max_examples=120, **FUZZ)
@given(values=CONFLICTS)
def test_contradictory_settings_are_refused_naming_both(values):
    got = outcome(build_config, None, values)
    broken = conflicts(values)
    if not broken:
        assert isinstance(got, Config), got
        assert got.max_prompt_length < got.max_length
        return
    assert isinstance(got, str), (values, got)
    assert any(all(name in got for name in names) for names in broken), (values, got)


@settings(max_examples=60, **FUZZ)
@given(
    preset=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), VALUES, max_size=4),
    overrides=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=3),
)
def test_any_preset_and_overrides_give_a_config_or_one_line(preset, overrides):
    got = outcome(build_config, preset, overrides)
    assert isinstance(got, (Config, str))
