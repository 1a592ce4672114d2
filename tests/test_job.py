"""RenderSettings checks itself: each bad field raises a JobError (SettingError) that names the field,
checked in the company of the fields before it, and the error survives pickling (Ray sends it)."""

import pickle
from dataclasses import fields, replace

import pytest

from pipeline.job import JobError, RenderSettings, SettingError

# (field, a bad value, part of the problem): every field of RenderSettings has one.
BAD = [
    ("window", 116, "4n+1"),
    ("window", "117", "whole number"),
    ("motion", 24, "4k+1"),
    ("motion", 117, "smaller than window"),
    ("scheduler", "nope", "unknown scheduler 'nope' (known: euler, flowmatch_distill, unipc, dpm++_sde)"),
    ("steps", 0, "positive integer"),
    ("steps", 2.5, "positive integer"),
    ("shift", 0.0, "positive number"),
    ("shift", float("nan"), "finite number"),
    ("text_scale", "loud", "finite number"),
    ("audio_scale", float("inf"), "finite number"),
    ("apg", "false", "true or false"),
    ("batched_guidance", 1, "true or false"),
    ("color_match", "sepia", "'sepia' is not one of mkl, hm, reinhard, lab, none"),
    ("color_strength", None, "finite number"),
    ("size", "nope", "480p"),
    ("size", "100x100", "multiples of 16"),
    ("crf", 52, "52 is not in [0, 51]"),
    ("crf", 18.0, "whole number"),
]


def test_every_field_has_a_bad_value_here():
    assert {name for name, _, _ in BAD} == {f.name for f in fields(RenderSettings)}


@pytest.mark.parametrize("name, value, says", BAD)
def test_a_bad_field_raises_naming_it(name, value, says):
    with pytest.raises(JobError) as caught:
        RenderSettings(**{name: value})
    error = caught.value
    assert isinstance(error, SettingError) and error.field == name
    assert str(error).startswith(f"{name}: ") and says in error.problem and "\n" not in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.field, again.problem, str(again)) == (SettingError, name, error.problem, str(error))


def test_a_field_is_checked_with_the_ones_before_it():
    with pytest.raises(SettingError, match=r"^steps: scheduler 'flowmatch_distill' runs exactly 4 steps"):
        RenderSettings(scheduler="flowmatch_distill")  # the default 40 steps
    assert RenderSettings(scheduler="flowmatch_distill", steps=4).steps == 4
    assert RenderSettings(window=33, motion=9).motion == 9
    with pytest.raises(SettingError, match=r"^motion: motion must be smaller than window=21"):
        RenderSettings(window=21)  # the default motion, 25
    # replace() checks again, as the manifest's per-row overrides rely on
    with pytest.raises(SettingError, match=r"^color_match: "):
        replace(RenderSettings(), color_match="sepia")


def test_the_defaults_and_every_valid_value_pass():
    RenderSettings()
    RenderSettings(window=5, motion=1, scheduler="dpm++_sde", steps=1, shift=0.5, text_scale=1, audio_scale=0,
                   apg=True, batched_guidance=True, color_match="none", color_strength=0, size="832x480", crf=0)
