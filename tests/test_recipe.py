"""The consolidation recipe as a config: help per field, validation naming field and value, TOML, round trip."""

from dataclasses import fields

import pytest

from memory_llm.consolidate.recipe import Recipe
from memory_llm.errors import InputError


def test_every_field_has_help_and_the_defaults_validate():
    assert all(f.metadata.get("help") for f in fields(Recipe))
    assert Recipe().route_pool == "mean"


def test_round_trip_through_a_dict_and_toml(tmp_path):
    changed = Recipe(rank=4, lr=3e-3, cloze_cuts=(0.3, 0.6), route_band=(0.2, 0.8), mixed_precision=False)
    assert Recipe.from_dict(changed.as_dict()) == changed
    path = tmp_path / "recipe.toml"
    path.write_text('rank = 4\nlr = 3e-3\ncloze_cuts = [0.3, 0.6]\nroute_band = [0.2, 0.8]\nmixed_precision = false\n')
    assert Recipe.from_toml(path) == changed


@pytest.mark.parametrize("field, value, rule", [
    ("rank", 0, "must be > 0"), ("lr", -1.0, "must be > 0"), ("epochs", -1, "must be >= 0"),
    ("replay_fraction", 1.5, "must be in [0, 1]"), ("route_pool", "median", "must be one of mean, max"),
    ("route_band", (0.6, 0.4), "lo < hi"), ("cloze_cuts", (1.2,), "strictly between 0 and 1"),
    ("locality_prompts", 80, "at most 60"), ("rank", "16", "must be of type int"), ("mixed_precision", 1, "must be of type bool"),
])
def test_validation_names_the_field_and_the_value(field, value, rule):
    with pytest.raises(InputError) as err:
        Recipe(**{field: value})
    assert f"{field}={value!r}" in str(err.value) and rule in str(err.value)


def test_unknown_fields_and_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="unknown recipe field 'ranks' \\(did you mean 'rank'\\?\\)"):
        Recipe.from_dict({"ranks": 4})
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = = 4\n")
    with pytest.raises(InputError, match="not valid TOML"):
        Recipe.from_toml(bad)
    with pytest.raises(InputError, match="cannot read"):
        Recipe.from_toml(tmp_path / "missing.toml")
