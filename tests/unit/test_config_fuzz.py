"""Fuzzing the chain rule loader: whatever an admin writes, the answer is rules or a ConfigError naming the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import given
from hypothesis import strategies as st

from extender.config import ConfigError, load_rules
from extender.core.rules import ChainRules
from tests.strategies import one_value_replaced

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = yaml.safe_load((ROOT / "chains" / "a100-40gb.yaml").read_text())


def outcome(text: str | bytes) -> ChainRules | ConfigError:
    """Load one file with this content: the rules, or the ConfigError. Any other exception fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rules.yaml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        try:
            return load_rules([path])
        except ConfigError as error:
            assert error.problems
            for problem in error.problems:
                assert problem.file == str(path)
                assert problem.line >= 1
                assert problem.message
                assert "Traceback" not in problem.message
            return error


scalars = st.none() | st.booleans() | st.integers(-3, 10) | st.floats(allow_nan=False) | st.text(max_size=12)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=25,
)


@given(text=st.text(max_size=300))
def test_any_text_is_rules_or_a_config_error(text):
    outcome(text)


@given(data=st.binary(max_size=300))
def test_any_bytes_are_rules_or_a_config_error(data):
    outcome(data)


@given(document=documents)
def test_any_yaml_document_is_rules_or_a_config_error(document):
    outcome(yaml.safe_dump(document))


@given(edit=one_value_replaced(SHIPPED, documents))
def test_a_shipped_file_with_any_one_value_replaced_is_rules_or_a_config_error_naming_a_field(edit):
    """The edits admins make: one value changed to anything. A bad one is reported with the field that is wrong."""
    where, document = edit
    result = outcome(yaml.safe_dump(document, sort_keys=False))
    if isinstance(result, ConfigError) and where[0] in ("chains", "policy") and len(where) > 1:
        assert any(problem.field for problem in result.problems), str(result)


@given(data=st.data())
def test_a_shipped_file_cut_anywhere_is_rules_or_a_config_error(data):
    text = (ROOT / "chains" / "a100-40gb.yaml").read_text()
    outcome(text[: data.draw(st.integers(0, len(text)))])


def test_yaml_bombs_and_deep_nesting_are_config_errors_not_crashes():
    billion_laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{name}: &{name} [*{previous}, *{previous}, *{previous}, *{previous}, *{previous}, *{previous}]\n"
        for previous, name in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert isinstance(outcome(billion_laughs), ConfigError)
    assert isinstance(outcome("[" * 10_000 + "]" * 10_000), ConfigError)
    assert isinstance(outcome("!!python/object/apply:os.system ['true']"), ConfigError)
