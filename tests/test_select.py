"""select_batchnorms: globs on names, a pattern selects what is under the module it names,
types, and a pattern that matches nothing is an error with the nearest names."""

from __future__ import annotations

import pytest
from torch import nn

from bnsurgery.errors import UsageError
from bnsurgery.select import select_batchnorms


def net() -> nn.Module:
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    return nn.Sequential(
        block, nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), nn.Flatten(), nn.BatchNorm1d(4)
    )


def names(**kwargs) -> list[str]:
    return [n for n, _ in select_batchnorms(net(), **kwargs)]


def test_everything_by_default_in_registration_order():
    assert names() == ["0.1", "1.1", "3"]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        ("0", None, ["0.1"]),  # a module name selects everything under it
        ("0.*", None, ["0.1"]),
        (["0", "3"], None, ["0.1", "3"]),
        (None, "1", ["0.1", "3"]),
        ("*", ["0.1", "3"], ["1.1"]),
    ],
)
def test_include_and_exclude(include, exclude, expected):
    assert names(include=include, exclude=exclude) == expected


def test_types_keep_only_those_classes():
    assert names(types=[nn.BatchNorm1d]) == ["3"]


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_pattern_matching_nothing_is_an_error_with_the_nearest_names(option):
    with pytest.raises(UsageError, match=rf"--{option} '1\.2' matches no BN layer.*1\.1"):
        names(**{option: "1.2"})


def test_a_selection_that_leaves_nothing_is_an_error():
    with pytest.raises(UsageError, match="leave no BN layer selected"):
        names(include="0", types=[nn.BatchNorm1d])
