"""Search spaces of rsilora.tune (no Ray): the plan's grids, their validation and the trial order."""

from __future__ import annotations

import itertools

import pytest

from rsilora.config import Config, ConfigError, config_from_dict
from rsilora.tune import check_space, load_space


def test_the_plans_grids_and_listed_configurations():
    assert load_space("stage1", "full").size() == 4 * 4 * 3
    assert load_space("stage2", "full").size() == 4 * 3 * 4 * 3 * 3
    assert load_space("stage3", "full").size() == 3 * 3 * 3
    plan = load_space("stage1", "plan")
    assert len(plan.configs) == 5 and {c["lora.r"] for c in plan.configs} == {8, 16, 32}
    assert load_space("stage2", "full").previous == "stage1" and load_space("stage3", "full").previous == "stage2"
    with pytest.raises(ValueError, match="stage1 has no space 'nope'"):
        load_space("stage1", "nope")


@pytest.mark.parametrize("stage,space", [(s, n) for s in ("stage1", "stage2", "stage3")
                                         for n in ("full", "tiny")] + [("stage1", "plan"), ("stage1", "bench")])
def test_every_value_of_every_space_is_a_valid_config(stage, space):
    check_space(Config().to_dict(), load_space(stage, space))


def test_an_invalid_grid_value_is_refused_before_any_trial():
    space = load_space("stage1", "tiny")
    bad = type(space)(space.stage, space.name, space.title, None, {}, {"lora.dropout": [0.1, 1.5]}, [])
    with pytest.raises(ConfigError, match="dropout"):
        check_space(Config().to_dict(), bad)


def test_grid_points_are_every_combination_in_a_seeded_order():
    space = load_space("stage1", "full")
    listed = space.grid_points()
    assert listed == [dict(zip(space.grid, v)) for v in itertools.product(*space.grid.values())]
    shuffled = space.grid_points(seed=42)
    assert shuffled != listed and sorted(map(str, shuffled)) == sorted(map(str, listed))
    assert space.grid_points(seed=42) == shuffled and space.grid_points(seed=7) != shuffled
    assert len(space.grid_points(repeats=2, seed=42)) == 96
    # the order is not sorted by rank: the first quarter mixes ranks (the listed one is all r=4)
    assert {p["lora.r"] for p in listed[:12]} == {4}
    assert len({p["lora.r"] for p in shuffled[:12]}) > 1


def test_grid_order_is_validated():
    with pytest.raises(ConfigError, match="tune.grid_order must be shuffled or listed"):
        config_from_dict({"tune": {"grid_order": "sorted"}})
