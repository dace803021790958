"""The one reader of pod-written text: properties over any text, and the cases that broke the old readers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extender.core import untrusted
from extender.core.cluster import KEPT_ANNOTATIONS, ObjectError, pod_request
from extender.core.loan import LOAN_ANNOTATIONS, RESTARTS_ANNOTATION, UnreadableLoan, read_loan
from extender.core.returns import MAX_RESTARTS_ANNOTATION, RETURN_ANNOTATION

LOAN = {
    "migchain.io/original-requests": "nvidia.com/mig-1g.5gb=1",
    "migchain.io/borrowed-requests": "nvidia.com/mig-2g.10gb=1",
    "migchain.io/chain": "a100-40gb",
    "migchain.io/steps": "1",
    "migchain.io/replaced-uid": "6b1f8f5e-0000-4000-8000-000000000000",
    "migchain.io/original-resources": '{"containers/main":{"limits":{"nvidia.com/mig-1g.5gb":"1"}}}',
}


@given(text=st.text())
def test_a_count_is_ascii_digits_under_its_limit_or_nothing(text):
    number = untrusted.count(text, 1024)
    assert number is None or 0 <= number <= 1024
    if number is not None:
        assert text.strip(" ").isascii() and int(text) == number


@pytest.mark.parametrize(
    ("text", "number"),
    [
        *[("3", 3), (" 3 ", 3), ("0", 0), ("1024", 1024), ("1025", None), ("²", None), ("٣", None), ("-1", None)],
        *[("1e3", None), ("", None), ("9" * 5000, None), ("3\n", None), ("0x10", None)],
    ],
)
def test_counts_that_broke_isdigit_and_int(text, number):
    assert untrusted.count(text, 1024) == number


@given(text=st.text(), limit=st.integers(1, 80))
def test_an_excerpt_is_printable_short_and_says_how_much_was_left_out(text, limit):
    shown = untrusted.excerpt(text, limit)
    assert shown.isprintable()
    assert len(shown) <= 10 * limit + 30  # each character at most \UXXXXXXXX, then the count of the rest
    if len(text) > limit:
        assert shown.endswith(f"...(+{len(text) - limit} chars)")


def test_an_excerpt_leaves_ordinary_text_alone_and_escapes_the_rest():
    assert untrusted.excerpt("false") == "false"
    assert untrusted.excerpt("a\x1b[2J\nb\\c\u202e") == "a\\x1b[2J\\x0ab\\\\c\\u202e"


@given(text=st.text(max_size=300) | st.sampled_from(["[" * 5000, "{" * 5000, '{"a": ' * 2000]))
def test_json_is_a_value_or_a_value_error_never_anything_else(text):
    with contextlib.suppress(ValueError):
        untrusted.json_document(text, 10_000)


def test_json_longer_than_its_cap_is_not_parsed():
    with pytest.raises(ValueError, match="longer than 16"):
        untrusted.json_document('"' + "x" * 20 + '"', 16)


@given(annotations=st.dictionaries(st.sampled_from([*KEPT_ANNOTATIONS, "migchain.io/x", "team"]), st.text()))
def test_only_known_keys_are_kept_each_under_its_cap(annotations):
    kept = untrusted.kept(annotations, KEPT_ANNOTATIONS)
    assert set(kept) <= set(KEPT_ANNOTATIONS)
    for key, value in kept.items():
        assert value == annotations[key] or (len(annotations[key]) > KEPT_ANNOTATIONS[key] and len(value) < 64)


def test_every_annotation_a_reader_needs_is_kept():
    needed = {*LOAN_ANNOTATIONS, RESTARTS_ANNOTATION, MAX_RESTARTS_ANNOTATION, RETURN_ANNOTATION}
    assert needed <= set(KEPT_ANNOTATIONS)


def test_a_real_loan_record_reads_back():
    loan = read_loan(LOAN)
    assert not isinstance(loan, UnreadableLoan) and loan is not None
    assert (loan.original, loan.borrowed, loan.chains, loan.steps, loan.restarts) == (
        (("nvidia.com/mig-1g.5gb", 1),),
        (("nvidia.com/mig-2g.10gb", 1),),
        ("a100-40gb",),
        1,
        0,
    )


@given(key=st.sampled_from([*sorted(LOAN), RESTARTS_ANNOTATION]), value=st.text(max_size=300))
def test_any_edit_of_a_loan_record_reads_as_a_loan_or_as_unreadable_naming_the_annotation(key, value):
    loan = read_loan({**LOAN, key: value})
    if isinstance(loan, UnreadableLoan):
        assert loan.why.startswith(f"annotation {key}") and loan.why.isprintable() and len(loan.why) < 300


@pytest.mark.parametrize("quantity", ["²", "٣", " ²", "9" * 5000])
def test_a_resource_quantity_of_odd_digits_is_a_clear_object_error_not_a_crash(quantity):
    """str.isdigit() accepts "²" and "٣", and int() of 5,000 digits raises: the pod is refused, named, alone."""
    pod = {
        "metadata": {"name": "odd", "namespace": "ml", "uid": "u"},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/mig-1g.5gb": quantity}}}]},
    }
    with pytest.raises(ObjectError, match="expected a whole number"):
        pod_request(pod)
