"""Architecture specs: parse_spec, is_spec and build, above all their error paths."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

from bnsurgery.errors import SourceError, UsageError
from bnsurgery.specs import (
    Spec,
    build,
    default_input_size,
    importable_from_cwd,
    is_spec,
    parse_spec,
)


# factories that build() is pointed at through "tests.test_specs:NAME"
def not_a_module(**kwargs):
    return {"kwargs": kwargs}


def failing_factory():
    raise ValueError("the factory broke")


NOT_CALLABLE = 3


# ------------------------------------------------------------------------------ parse_spec


def test_parse_a_bare_name():
    assert parse_spec("timm:resnet18") == Spec("timm", "resnet18", {})


def test_parse_keyword_literals_of_every_kind():
    spec = parse_spec(
        "pkg.sub:make_net(n=3, x=-1.5, s='a', flag=True, none=None, t=(1, 2), d={'k': [1]})"
    )
    assert spec.namespace == "pkg.sub"
    assert spec.name == "make_net"
    assert spec.kwargs == {
        "n": 3,
        "x": -1.5,
        "s": "a",
        "flag": True,
        "none": None,
        "t": (1, 2),
        "d": {"k": [1]},
    }


def test_parse_strips_surrounding_whitespace_and_allows_dots_and_dashes_in_the_name():
    spec = parse_spec("  timm:vit_base_patch16_224.augreg-in21k  \n")
    assert (spec.namespace, spec.name) == ("timm", "vit_base_patch16_224.augreg-in21k")


def test_str_round_trips_through_parse():
    text = "timm:resnet18(num_classes=10, in_chans=1)"
    spec = parse_spec(text)
    assert str(spec) == text
    assert parse_spec(str(spec)) == spec
    assert str(parse_spec("torchvision:resnet18")) == "torchvision:resnet18"


@pytest.mark.parametrize(
    "text",
    [
        "resnet18",  # no namespace
        "timm:",  # no name
        ":resnet18",  # no namespace before the colon
        "timm:resnet18)",  # stray parenthesis
        "1timm:resnet18",  # namespace starts with a digit
        "/tmp/model.pt",  # a path
        "",
    ],
)
def test_text_that_is_not_a_spec_is_a_usage_error_naming_it(text):
    with pytest.raises(UsageError, match="is not an architecture spec") as info:
        parse_spec(text)
    assert repr(text.strip()) in str(info.value)
    assert "timm:NAME" in str(info.value)  # what was expected


@pytest.mark.parametrize(
    "text, phrase, offending",
    [
        ("timm:resnet18(10)", "positional argument", "'10'"),
        ("timm:resnet18(num_classes=int('3'))", "is not a literal", "num_classes=\"int('3')\""),
        ("timm:resnet18(num_classes=n)", "is not a literal", "num_classes='n'"),
        ("timm:resnet18(a=(1,2)*3)", "is not a literal", "a='(1,2)*3'"),
        ("timm:resnet18(a=1, a=2)", "a is given twice", "a is given twice"),
        ("timm:resnet18(**{'a': 1})", "is not a keyword argument", "\"**{'a': 1}\""),
        ("timm:resnet18(a=1)(b=2)", "is not one call", "'(a=1)(b=2)'"),
        ("timm:resnet18(a=)", "is not valid call syntax", "'(a=)'"),
        ("timm:resnet18(a=1\x00)", "is not valid call syntax", "'(a=1\\x00)'"),
    ],
)
def test_call_syntax_errors_name_the_offending_part(text, phrase, offending):
    with pytest.raises(UsageError) as info:
        parse_spec(text)
    message = str(info.value)
    assert phrase in message
    assert offending in message
    assert "key=literal" in message  # what was expected


@pytest.mark.parametrize(
    "value",
    [
        "-" * 3000 + "1",  # the parser's recursion limit
        "+".join(["1"] * 1500),  # a deep expression tree: ast.unparse would recurse
        "[" * 300 + "]" * 300,  # the parser's nesting limit
    ],
    ids=["unary_chain", "binop_chain", "nested_lists"],
)
def test_deeply_nested_arguments_are_usage_errors_not_crashes(value):
    with pytest.raises(UsageError, match="key=literal"):
        parse_spec(f"timm:resnet18(a={value})")


def test_an_integer_too_large_to_write_back_is_a_usage_error():
    # ~4,800 decimal digits: Python refuses to turn it into text, which str(spec) needs
    with pytest.raises(UsageError, match="too large to write back as text"):
        parse_spec("timm:resnet18(a=0x" + "f" * 4000 + ")")


def test_an_over_long_spec_is_a_usage_error_saying_how_long():
    text = "timm:resnet18(a='" + "x" * 5000 + "')"
    assert is_spec(text)  # the right shape...
    with pytest.raises(UsageError) as info:
        parse_spec(text)  # ...but far more than a name and a few options
    message = str(info.value)
    assert f"{len(text)} characters" in message
    assert "at most 4096" in message
    assert len(message) < 300  # the text itself is cut when shown


def test_a_spec_of_exactly_the_maximum_length_parses():
    head = "timm:resnet18(a='"
    text = head + "x" * (4096 - len(head) - 2) + "')"
    assert len(text) == 4096
    assert parse_spec(text).kwargs["a"] == "x" * (4096 - len(head) - 2)


@pytest.mark.parametrize("value", [None, 5, b"timm:resnet18", ["timm:resnet18"]])
def test_a_non_string_is_a_usage_error_naming_its_type(value):
    with pytest.raises(UsageError) as info:
        parse_spec(value)
    assert "expected an architecture spec string" in str(info.value)
    assert type(value).__name__ in str(info.value)


# -------------------------------------------------------------------------------- is_spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("timm:resnet18", True),
        ("torchvision:resnet18(num_classes=3)", True),
        ("tests.models:simple_cnn", True),
        ("  timm:resnet18  ", True),
        ("timm:resnet18(not valid python", False),
        ("timm:resnet18)", False),
        ("model.safetensors", False),
        ("/abs/path/model.pt", False),
        ("C:\\models\\x.pt", False),
        ("", False),
    ],
)
def test_is_spec_tells_the_shape(text, expected):
    assert is_spec(text) is expected


def test_is_spec_says_no_to_anything_but_a_string():
    assert is_spec(None) is False
    assert is_spec(3) is False
    assert is_spec(b"timm:resnet18") is False


def test_is_spec_is_only_the_shape_the_arguments_are_checked_by_parse():
    assert is_spec("timm:resnet18(10)")
    with pytest.raises(UsageError):
        parse_spec("timm:resnet18(10)")


# ---------------------------------------------------------------------------------- build


def test_build_a_factory_with_keyword_arguments():
    model = build("tests.models:simple_cnn(width=4)")
    assert isinstance(model, nn.Module)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= 1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 4


def test_build_is_seeded_and_leaves_the_global_generator_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build("tests.models:simple_cnn(width=4)")
    assert torch.equal(torch.rand(3), expected_next)  # build forked the generator
    b = build(parse_spec("tests.models:simple_cnn(width=4)"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_unknown_namespace_cannot_be_imported():
    with pytest.raises(SourceError) as info:
        build("no_such_package_xyz.mod:factory")
    assert "cannot import 'no_such_package_xyz.mod'" in str(info.value)


def test_a_name_the_module_does_not_have_is_a_source_error():
    with pytest.raises(
        SourceError, match=re.escape("'tests.models' has no callable 'no_such_factory'")
    ):
        build("tests.models:no_such_factory")
    with pytest.raises(SourceError, match="has no callable 'NOT_CALLABLE'"):
        build("tests.test_specs:NOT_CALLABLE")


def test_a_factory_that_returns_no_module_is_a_source_error():
    with pytest.raises(SourceError) as info:
        build("tests.test_specs:not_a_module(a=1)")
    assert "returned a dict, not a torch.nn.Module" in str(info.value)
    assert "tests.test_specs:not_a_module(a=1)" in str(info.value)


def test_a_factory_that_fails_is_a_source_error_with_its_reason():
    with pytest.raises(SourceError) as info:
        build("tests.test_specs:failing_factory")
    assert "building tests.test_specs:failing_factory failed" in str(info.value)
    assert "ValueError: the factory broke" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def test_a_keyword_the_factory_does_not_take_is_a_source_error():
    with pytest.raises(SourceError, match=r"TypeError.*no_such_option"):
        build("tests.models:simple_cnn(no_such_option=1)")


def test_a_bad_spec_string_given_to_build_is_a_usage_error():
    with pytest.raises(UsageError, match="positional argument"):
        build("tests.models:simple_cnn(4)")


def test_unknown_torchvision_model_suggests_the_nearest_names():
    with pytest.raises(SourceError) as info:
        build("torchvision:resnet19")
    message = str(info.value)
    assert "torchvision has no model 'resnet19'" in message
    assert "did you mean" in message
    assert "resnet18" in message.split("did you mean")[1]


def test_unknown_model_far_from_every_name_gets_no_suggestion():
    with pytest.raises(SourceError) as info:
        build("torchvision:zzzzqqqq")
    assert "torchvision has no model 'zzzzqqqq'" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_unknown_timm_model_suggests_the_nearest_names():
    pytest.importorskip("timm")
    with pytest.raises(SourceError) as info:
        build("timm:resnt18")
    message = str(info.value)
    assert "timm has no model 'resnt18'" in message
    assert "resnet18" in message.split("did you mean")[1]


def test_search_cwd_imports_a_factory_from_the_current_folder(tmp_path, monkeypatch):
    name = "bnsurgery_specs_test_factory_mod"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\n"
        "def make(width=2):\n"
        "    return nn.Sequential(nn.Conv2d(1, width, 1), nn.BatchNorm2d(width))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, name, raising=False)
    path_before = list(sys.path)
    try:
        with pytest.raises(SourceError, match=f"cannot import '{name}'"):
            build(f"{name}:make")
        model = build(f"{name}:make(width=3)", search_cwd=True)
        assert model[1].num_features == 3
        assert sys.path == path_before
    finally:
        sys.modules.pop(name, None)


def test_importable_from_cwd_restores_sys_path_even_when_the_body_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    with pytest.raises(RuntimeError), importable_from_cwd():
        assert sys.path[0] == str(tmp_path)
        raise RuntimeError
    assert sys.path == before
    with importable_from_cwd(enabled=False):
        assert sys.path == before


# ----------------------------------------------------------------------- default_input_size


def test_default_input_size_of_a_torchvision_classifier():
    assert default_input_size("torchvision:resnet18") == (3, 224, 224)


def test_default_input_size_from_a_models_pretrained_cfg():
    model = nn.Linear(1, 1)
    model.pretrained_cfg = {"input_size": (3, 160, 128)}
    assert default_input_size(None, model) == (3, 160, 128)


def test_default_input_size_is_unknown_for_a_factory():
    assert default_input_size("tests.models:simple_cnn") is None
    assert default_input_size(None) is None
