"""Every misuse of the Python frontend gives a DSLError at the user's line, with the fix.

Each mod below marks its offending line with a ``# <- name`` comment; the tests look the line up
so that they assert the exact reported line (and column where it is meaningful).
"""

from __future__ import annotations

import pytest
import torch

import attnforge as af
from attnforge.dsl.api import as_mod
from attnforge.dsl.errors import DSLError

TABLE = torch.randn(16)
FLOAT_TABLE = torch.randn(4, 16)


def line_of(marker: str) -> int:
    with open(__file__) as f:
        for i, text in enumerate(f, start=1):
            if text.rstrip().endswith(f"# <- {marker}"):
                return i
    raise AssertionError(f"marker {marker!r} not found")


def col_of(marker: str, snippet: str) -> int:
    with open(__file__) as f:
        text = f.readlines()[line_of(marker) - 1]
    return text.index(snippet) + 1


def raises_at(fn, kind: str, marker: str, *fragments: str) -> DSLError:
    with pytest.raises(DSLError) as info:
        as_mod(fn, kind)
    err = info.value
    assert err.file == __file__
    assert err.line == line_of(marker), str(err)
    text = str(err)
    for fragment in fragments:
        assert fragment in text, text
    assert text.startswith(f"{__file__}:{err.line}:")
    assert "fix: " in text
    return err


# -- Python control flow on traced values ---------------------------------------------------------


def mask_if(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:  # <- if
        return True
    return False


def mask_and(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx and kv_idx > 2  # <- and


def mask_or(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) or (kv_idx < 4)  # <- or


def mask_not(b, h, q_idx, kv_idx):
    return not (q_idx < kv_idx)  # <- not


def mask_bool(b, h, q_idx, kv_idx):
    return bool(q_idx >= kv_idx)  # <- bool


def mask_chain(b, h, q_idx, kv_idx):
    return 0 <= q_idx - kv_idx < 8  # <- chain


def score_ifexp(score, b, h, q_idx, kv_idx):
    return score if q_idx >= kv_idx else -float("inf")  # <- ifexp


def mask_max(b, h, q_idx, kv_idx):
    return max(q_idx, kv_idx) < 10  # <- max


@pytest.mark.parametrize(
    "fn, kind, marker, construct, fix",
    [
        (mask_if, "mask", "if", "Python `if`", "torch.where"),
        (mask_and, "mask", "and", "Python `and`", "use `&`"),
        (mask_or, "mask", "or", "Python `or`", "use `|`"),
        (mask_not, "mask", "not", "Python `not`", "`~cond`"),
        (mask_bool, "mask", "bool", "Python `bool()`", "torch.where"),
        (mask_chain, "mask", "chain", "chained comparison", "(a <= b) & (b < c)"),
        (score_ifexp, "score", "ifexp", "conditional expression", "torch.where(cond, a, b)"),
        (mask_max, "mask", "max", "Python `max()`", "torch.maximum"),
    ],
)
def test_python_truth_value_of_a_traced_value(fn, kind, marker, construct, fix):
    raises_at(fn, kind, marker, construct, fix)


def test_if_error_points_at_the_condition_with_a_caret():
    err = raises_at(mask_if, "mask", "if", "traced value")
    assert err.col == col_of("if", "q_idx >= kv_idx")
    lines = str(err).splitlines()
    assert lines[1].strip() == "if q_idx >= kv_idx:  # <- if"
    assert lines[2].strip() == "^" * len("q_idx >= kv_idx")


# -- arity ---------------------------------------------------------------------------------------


def mask_three(b, h, q_idx):  # <- arity3
    return q_idx > 0


def score_as_mask(score, b, h, q_idx, kv_idx):  # <- arity5
    return score


mask_lambda_three = lambda b, h, q: q > 0  # noqa: E731  # <- arity_lambda


def test_wrong_arity():
    err = raises_at(
        mask_three,
        "mask",
        "arity3",
        "takes 3 positional argument(s)",
        "called with 4: (b, h, q_idx, kv_idx)",
        "def mask_three(b, h, q_idx, kv_idx)",
    )
    assert err.col == col_of("arity3", "def mask_three")
    raises_at(score_as_mask, "mask", "arity5", "takes 5", "looks like a score_mod")
    raises_at(
        mask_lambda_three, "mask", "arity_lambda", "takes 3", "lambda b, h, q_idx, kv_idx: ..."
    )


def test_wrong_arity_at_decoration():
    with pytest.raises(DSLError) as info:
        af.score_mod(mask_three)
    assert info.value.line == line_of("arity3") and "score_mod `mask_three`" in str(info.value)


def test_mod_of_the_wrong_kind():
    causal = af.mask_mod(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)  # <- kind
    with pytest.raises(DSLError) as info:
        as_mod(causal, "score")
    assert info.value.line == line_of("kind")
    assert "is a mask_mod but is used as a score_mod" in str(info.value)


# -- unsupported operations ----------------------------------------------------------------------


def score_softmax(score, b, h, q_idx, kv_idx):
    return torch.softmax(score, dim=-1)  # <- softmax


def score_method(score, b, h, q_idx, kv_idx):
    return score.cumsum(0)  # <- method


def score_functional(score, b, h, q_idx, kv_idx):
    return torch.nn.functional.softplus(score)  # <- functional


def mask_reduction(b, h, q_idx, kv_idx):
    return torch.max(q_idx, 0) > 1  # <- reduction


@pytest.mark.parametrize(
    "fn, kind, marker, fragment",
    [
        (score_softmax, "score", "softmax", "`torch.softmax` is not supported in a score_mod"),
        (score_method, "score", "method", "`Tensor.cumsum()` is not supported in a score_mod"),
        (score_functional, "score", "functional", "softplus` is not supported in a score_mod"),
        (mask_reduction, "mask", "reduction", "torch.max reduction"),
    ],
)
def test_unsupported_torch_op_is_named(fn, kind, marker, fragment):
    raises_at(fn, kind, marker, fragment)


# -- indexing captured tensors -------------------------------------------------------------------


def score_float_index(score, b, h, q_idx, kv_idx):
    return score + TABLE[q_idx / 2]  # <- float_index


def score_float_tensor_index(score, b, h, q_idx, kv_idx):
    return score + TABLE[FLOAT_TABLE[h, kv_idx % 16]]  # <- float_tensor_index


def score_python_float_index(score, b, h, q_idx, kv_idx):
    return score + FLOAT_TABLE[h, 1.0]  # <- python_float_index


def score_bool_index(score, b, h, q_idx, kv_idx):
    return score + TABLE[q_idx > kv_idx]  # <- bool_index


def score_too_many(score, b, h, q_idx, kv_idx):
    return score + TABLE[h, q_idx]  # <- too_many


def score_unindexed(score, b, h, q_idx, kv_idx):
    return score + FLOAT_TABLE[h]  # <- unindexed


def score_slice(score, b, h, q_idx, kv_idx):
    return score + FLOAT_TABLE[h, 1:3]  # <- slice


def mask_list_index(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < [8, 16, 32, 64][h]  # <- list_index


@pytest.mark.parametrize(
    "fn, marker, fragments",
    [
        (
            score_float_index,
            "float_index",
            ("float value is used as an index", "`TABLE`", "`//` instead of `/`"),
        ),
        (score_float_tensor_index, "float_tensor_index", ("float value is used as an index",)),
        (score_python_float_index, "python_float_index", ("float value is used as an index",)),
        (score_bool_index, "bool_index", ("bool value is used as an index",)),
        (score_too_many, "too_many", ("has 1 dim(s) but is indexed with 2",)),
        (score_unindexed, "unindexed", ("`FLOAT_TABLE`", "with 1 of its 2 dims indexed")),
        (score_slice, "slice", ("slicing captured tensor `FLOAT_TABLE`",)),
        (mask_list_index, "list_index", ("used as a Python int", "torch.tensor(sizes)[h]")),
    ],
)
def test_bad_indexing(fn, marker, fragments):
    kind = "mask" if fn.__name__.startswith("mask") else "score"
    raises_at(fn, kind, marker, *fragments)


def test_float_index_column():
    err = raises_at(score_float_index, "score", "float_index")
    assert err.col == col_of("float_index", "TABLE[q_idx / 2]")


# -- return types --------------------------------------------------------------------------------


def mask_returns_int(b, h, q_idx, kv_idx):
    return q_idx - kv_idx  # <- mask_int


def mask_returns_float(b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, 0.0, -float("inf"))  # <- mask_float


def score_returns_bool(score, b, h, q_idx, kv_idx):
    return score > 0  # <- score_bool


def mask_returns_none(b, h, q_idx, kv_idx):  # <- none
    q_idx >= kv_idx  # noqa: B015 - the missing return is the point


@pytest.mark.parametrize(
    "fn, kind, marker, fragments",
    [
        (mask_returns_int, "mask", "mask_int", ("must return a bool", "returns an int value")),
        (mask_returns_float, "mask", "mask_float", ("must return a bool", "a float value")),
        (
            score_returns_bool,
            "score",
            "score_bool",
            ("score_mod `score_returns_bool` returns a bool", "pass it as mask_mod"),
        ),
        (mask_returns_none, "mask", "none", ("returned None",)),
    ],
)
def test_wrong_return_type(fn, kind, marker, fragments):
    raises_at(fn, kind, marker, *fragments)


# -- other misuse --------------------------------------------------------------------------------


def score_float_invert(score, b, h, q_idx, kv_idx):
    return ~score  # <- invert


def mask_float_and(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx / 2.0)  # <- float_and


def score_where_int_cond(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx - kv_idx, score, 0.0)  # <- where_cond


def score_big_tensor(score, b, h, q_idx, kv_idx):
    return score + torch.zeros(3)  # <- big_tensor


@pytest.mark.parametrize(
    "fn, kind, marker, fragments",
    [
        (score_float_invert, "score", "invert", ("`~` on a float value",)),
        (mask_float_and, "mask", "float_and", ("`&` on a float value",)),
        (score_where_int_cond, "score", "where_cond", ("torch.where needs a bool condition",)),
        (score_big_tensor, "score", "big_tensor", ("tensor of shape [3]",)),
    ],
)
def test_other_misuse(fn, kind, marker, fragments):
    raises_at(fn, kind, marker, *fragments)


def test_errors_in_nested_mods_point_into_the_callee():
    def outer(b, h, q_idx, kv_idx):
        return mask_and(b, h, q_idx, kv_idx) & (kv_idx >= 0)

    raises_at(outer, "mask", "and", "Python `and`")
    with pytest.raises(DSLError) as info:  # combinators trace their parts right away
        af.and_masks(lambda b, h, q_idx, kv_idx: q_idx >= 0, mask_not)
    assert info.value.line == line_of("not") and "Python `not`" in str(info.value)


def test_decorated_mod_reports_at_decoration():
    with pytest.raises(DSLError) as info:
        af.mask_mod(mask_bool)
    assert info.value.line == line_of("bool")
