"""The text DSL: parsing to IR, errors with positions, binding, eager evaluation."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from attnforge.dsl import ir
from attnforge.dsl.errors import DSLError
from attnforge.dsl.ir import DType, Op
from attnforge.dsl.parse import SpecVariant, parse_spec

N = ir.node

SPEC = """
# the examples of issue 3
variant softcap_causal(cap = 30.0):
    score = cap * tanh(score / cap)
    mask  = q_idx >= kv_idx

variant doc_mask(doc: tensor[int32, 1]):
    mask = doc[q_idx] == doc[kv_idx]

variant rel_bias(bias: tensor[float32, 2], S: int = 4096):
    score = score + bias[h, q_idx - kv_idx + S]
"""


def _one(text: str) -> SpecVariant:
    (variant,) = parse_spec(textwrap.dedent(text)).values()
    return variant


# -- parsing to IR ---------------------------------------------------------------------------------


def test_issue_examples_parse_to_expected_ir():
    v = parse_spec(SPEC)
    assert list(v) == ["softcap_causal", "doc_mask", "rel_bias"]

    sc = v["softcap_causal"]
    cap = ir.scalar(0, DType.FLOAT)
    assert sc.score_mod.ir is N(Op.MUL, cap, N(Op.TANH, N(Op.DIV, ir.SCORE, cap)))
    assert sc.mask_mod.ir is N(Op.GE, ir.Q_IDX, ir.KV_IDX)
    assert sc.params == {"cap": 30.0} and sc.param_types == {"cap": "float"}
    assert sc.score_mod.kind == "score" and sc.mask_mod.kind == "mask"
    assert sc.score_mod.param_values() == (30.0,) and sc.mask_mod.params == ()

    doc = ir.tensor(0, 1, "int32")
    dm = v["doc_mask"]
    assert dm.score_mod is None
    assert dm.mask_mod.ir is N(Op.EQ, N(Op.LOAD, doc, ir.Q_IDX), N(Op.LOAD, doc, ir.KV_IDX))
    assert dm.params == {"doc": None} and dm.missing() == ["doc"]

    rb = v["rel_bias"]
    # The index is built before the subscript call, so S is used (numbered) before bias.
    S, bias = ir.scalar(0, DType.INT), ir.tensor(1, 2, "float32")
    rel = N(Op.ADD, N(Op.SUB, ir.Q_IDX, ir.KV_IDX), S)
    assert rb.score_mod.ir is N(Op.ADD, ir.SCORE, N(Op.LOAD, bias, ir.H, rel))
    assert [(p.index, p.name, p.kind) for p in rb.score_mod.params] == [
        (0, "S", "scalar"),
        (1, "bias", "tensor"),
    ]


def test_literals_fold_like_python():
    v = _one(
        """
        variant v():
            score = where(q_idx - kv_idx > 2 ** 3, -inf, score * (1 / 4)) + 2 * 3 - -1
        """
    )
    picked = N(
        Op.WHERE,
        N(Op.GT, N(Op.SUB, ir.Q_IDX, ir.KV_IDX), ir.const(8)),
        ir.const(-math.inf),
        N(Op.MUL, ir.SCORE, ir.const(0.25)),
    )
    assert v.score_mod.ir is N(Op.SUB, N(Op.ADD, picked, ir.const(6)), ir.const(-1))


def test_python_precedence_and_operators():
    v = _one(
        """
        variant v():
            score = -score ** 2 // 3 % 5 + float(q_idx) / 2
            mask = (q_idx & 1 | kv_idx ^ 2 == 0) & ~(b != h)
        """
    )
    neg_pow = N(Op.NEG, N(Op.POW, ir.SCORE, ir.const(2)))
    lhs = N(Op.MOD, N(Op.FLOORDIV, neg_pow, ir.const(3)), ir.const(5))
    cast = N(Op.CAST, ir.Q_IDX, arg=DType.FLOAT)
    assert v.score_mod.ir is N(Op.ADD, lhs, N(Op.DIV, cast, ir.const(2)))
    bits = N(Op.OR, N(Op.AND, ir.Q_IDX, ir.const(1)), N(Op.XOR, ir.KV_IDX, ir.const(2)))
    assert v.mask_mod.ir is N(Op.AND, N(Op.EQ, bits, ir.const(0)), N(Op.NOT, N(Op.NE, ir.B, ir.H)))


def test_logical_keywords_and_chained_comparisons():
    v = _one(
        """
        variant v(w: int = 8):
            let d = q_idx - kv_idx
            mask = 0 <= d < w and not h == 1 or b > 0
        """
    )
    d = N(Op.SUB, ir.Q_IDX, ir.KV_IDX)
    w = ir.scalar(0, DType.INT)
    window = N(Op.AND, N(Op.GE, d, ir.const(0)), N(Op.LT, d, w))  # `0 <= d` is d.__ge__(0)
    both = N(Op.AND, window, N(Op.NOT, N(Op.EQ, ir.H, ir.const(1))))
    assert v.mask_mod.ir is N(Op.OR, both, N(Op.GT, ir.B, ir.const(0)))


def test_functions():
    v = _one(
        """
        variant v(t: tensor[float16, 3]):
            score = clamp(exp2(score), 0.0, 1.0) + min(sqrt(abs(score)), rsqrt(2.0), sigmoid(score))
            mask = max(q_idx, kv_idx) - int(floor(t[b, h, q_idx])) >= 0
        """
    )
    clamped = N(Op.MIN, N(Op.MAX, N(Op.EXP2, ir.SCORE), ir.const(0.0)), ir.const(1.0))
    inner = N(Op.MIN, N(Op.SQRT, N(Op.ABS, ir.SCORE)), ir.const(1 / math.sqrt(2.0)))
    smallest = N(Op.MIN, inner, N(Op.SIGMOID, ir.SCORE))
    assert v.score_mod.ir is N(Op.ADD, clamped, smallest)
    load = N(Op.LOAD, ir.tensor(0, 3, "float16"), ir.B, ir.H, ir.Q_IDX)
    lhs = N(Op.SUB, N(Op.MAX, ir.Q_IDX, ir.KV_IDX), N(Op.CAST, N(Op.FLOOR, load), arg=DType.INT))
    assert v.mask_mod.ir is N(Op.GE, lhs, ir.const(0))


def test_parameters_are_numbered_per_mod_in_order_of_use():
    v = _one(
        """
        variant v(w: int = 4, cap = 2.0, bias: tensor[float32, 1], unused: int = 7):
            d = q_idx - kv_idx           # a plain local
            score = cap * tanh(score / bias[d + w]) + d
            mask = d < w
        """
    )
    assert [p.name for p in v.score_mod.params] == ["w", "bias", "cap"]
    assert [p.name for p in v.mask_mod.params] == ["w"]
    assert v.mask_mod.ir is N(Op.LT, N(Op.SUB, ir.Q_IDX, ir.KV_IDX), ir.scalar(0, DType.INT))
    assert v.params == {"w": 4, "cap": 2.0, "bias": None, "unused": 7}
    assert v.param_types["bias"] == "tensor[float32, 1]" and v.param_types["unused"] == "int"


def test_statements_rebind_and_only_needed_lines_count():
    v = _one(
        """
        variant v(a = 1.0, c = 3.0):
            let unused = c * q_idx
            score = score * 2; score = score + a
            mask = true
        """
    )
    assert v.score_mod.ir is N(Op.ADD, N(Op.MUL, ir.SCORE, ir.const(2)), ir.scalar(0, DType.FLOAT))
    assert [p.name for p in v.score_mod.params] == ["a"]
    assert v.mask_mod.ir is ir.TRUE


def test_same_structure_same_key_different_values():
    a = _one("variant a(w: int = 16):\n    mask = q_idx - kv_idx < w\n")
    b = _one("variant b(window: int = 1024):\n    mask = (q_idx - kv_idx) < window  # other\n")
    c = _one("variant c(w: int = 16):\n    mask = q_idx - kv_idx <= w\n")
    assert a.mask_mod.key == b.mask_mod.key != c.mask_mod.key
    assert a.mask_mod.param_values() == (16,) and b.mask_mod.param_values() == (1024,)


def test_layout_variants():
    spec = (
        "variant one(): mask = q_idx >= kv_idx\n"
        "variant two():\n"
        "\tscore = tanh(score /\n"
        "        2.0)  # a continued line\n"
        "\n"
        "\t# comment\n"
        "\tmask = q_idx \\\n"
        "\t    >= kv_idx"  # no final newline
    )
    v = parse_spec(spec)
    assert v["one"].mask_mod.ir is v["two"].mask_mod.ir
    assert v["two"].score_mod.ir is N(Op.TANH, N(Op.DIV, ir.SCORE, ir.const(2.0)))
    assert parse_spec("") == {} and parse_spec("# nothing\n\n") == {}


def test_locations_beside_the_ir():
    v = parse_spec(SPEC, filename="mods.af")["softcap_causal"]
    loc = v.score_mod.locs[v.score_mod.ir.src[1]]  # the tanh call
    assert (loc.file, loc.line, loc.col) == ("mods.af", 4, 19)
    assert "tanh(score / cap)" in loc.text


# -- binding values --------------------------------------------------------------------------------


def test_bind_keeps_ir_and_checks_values():
    v = parse_spec(SPEC)
    sc = v["softcap_causal"]
    sc2 = sc.bind(cap=5)
    assert sc2.params == {"cap": 5.0} and sc.params == {"cap": 30.0}
    assert sc2.score_mod.ir is sc.score_mod.ir and sc2.score_mod.param_values() == (5.0,)
    assert sc2.mask_mod.ir is sc.mask_mod.ir

    doc = torch.tensor([0, 0, 1], dtype=torch.int32)
    dm = v["doc_mask"].bind(doc=doc)
    assert dm.mask_mod.param_values()[0] is doc and dm.missing() == []
    with pytest.raises(ValueError, match=r"declared tensor\[int32, 1\] but got a int64"):
        v["doc_mask"].bind(doc=doc.long())
    with pytest.raises(ValueError, match="is int; got 2.5"):
        v["rel_bias"].bind(S=2.5)
    with pytest.raises(TypeError, match="no parameter 'cpa' .*did you mean 'cap'"):
        sc.bind(cpa=1.0)


# -- eager evaluation equals the Python function ------------------------------------------------


def _grid(L=12, S=10, H=3, B=2):
    score = torch.randn(B, H, L, S)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    return score, b, h, torch.arange(L).view(1, 1, L, 1), torch.arange(S).view(1, 1, 1, S)


def test_eager_evaluation_matches_python():
    spec = parse_spec(
        SPEC
        + """
variant mix(w: int = 3, slope = 0.5):
    let d = q_idx - kv_idx
    score = where(d % 2 == 0, score - slope * abs(d), exp2(score) // 1.5)
    mask = (0 <= d < w) or (kv_idx == 0)
"""
    )
    score, b, h, q, kv = _grid()
    doc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3], dtype=torch.int32)
    bias = torch.randn(3, 40)

    def mix_score(s, b, h, q, kv):
        d = q - kv
        return torch.where(d % 2 == 0, s - 0.5 * torch.abs(d), torch.exp2(s) // 1.5)

    def mix_mask(b, h, q, kv):
        d = q - kv
        return ((0 <= d) & (d < 3)) | (kv == 0)

    cases = [
        (spec["softcap_causal"].score_mod, lambda s, *_: 30.0 * torch.tanh(s / 30.0), True),
        (spec["softcap_causal"].mask_mod, lambda b, h, q, kv: q >= kv, False),
        (spec["doc_mask"].bind(doc=doc).mask_mod, lambda b, h, q, kv: doc[q] == doc[kv], False),
        (
            spec["rel_bias"].bind(bias=bias, S=20).score_mod,
            lambda s, b, h, q, kv: s + bias[h, q - kv + 20],
            True,
        ),
        (spec["mix"].score_mod, mix_score, True),
        (spec["mix"].mask_mod, mix_mask, False),
    ]
    for mod, fn, is_score in cases:
        args = (score, b, h, q, kv) if is_score else (b, h, q, kv)
        got, want = mod(*args), fn(*args)
        assert got.dtype == want.dtype, mod
        torch.testing.assert_close(got.expand_as(want), want)


# -- text spec == traced Python twin --------------------------------------------------------------

TWIN_SPEC = """
variant softcap_causal(cap = 30.0):
    score = cap * tanh(score / cap)
    mask  = q_idx >= kv_idx

variant doc_mask(doc: tensor[int32, 1]):
    mask = doc[q_idx] == doc[kv_idx]

variant rel_bias(bias: tensor[float32, 2], S: int = 20):
    score = score + bias[h, q_idx - kv_idx + S]

variant operand_order(a = 0.5, c = 2.0, w: int = 3):
    score = a * c * score - 1 / (2 + c)
    d = q_idx - kv_idx
    mask = (0 <= d) & (d < w) | (3 > kv_idx)

variant alibi_prefix(H: int = 4, prefix: int = 5):
    score = score - exp2(-(float(h) + 1) * 8.0 / H) * abs(q_idx - kv_idx)
    mask = (kv_idx < prefix) or not (q_idx < kv_idx)

variant blocks(block: int = 4):
    score = where(q_idx % 2 == 0, -score ** 2, log(sigmoid(score))) + clamp(score, -1.0, block)
    mask = (q_idx // block == kv_idx // block) & (min(q_idx, kv_idx) >= max(b, h) - 1)

variant index_math(table: tensor[float64, 2], n: int = 6):
    score = 2 * score + table[h, int(floor(float(q_idx) / 2)) % n] * rsqrt(1.0 + abs(score))
"""


def _twins(doc, bias, table):
    cap, S, a, c, w, H, prefix, block, n = 30.0, 20, 0.5, 2.0, 3, 4, 5, 4, 6

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def doc_mask(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + S]

    def order_score(score, b, h, q_idx, kv_idx):
        return a * c * score - 1 / (2 + c)

    def order_mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (0 <= d) & (d < w) | (3 > kv_idx)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - torch.exp2(-(h.float() + 1) * 8.0 / H) * torch.abs(q_idx - kv_idx)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | ~(q_idx < kv_idx)

    def blocks_score(score, b, h, q_idx, kv_idx):
        picked = torch.where(q_idx % 2 == 0, -(score**2), torch.log(torch.sigmoid(score)))
        return picked + torch.clamp(score, -1.0, block)

    def blocks_mask(b, h, q_idx, kv_idx):
        same = q_idx // block == kv_idx // block
        return same & (torch.minimum(q_idx, kv_idx) >= torch.maximum(b, h) - 1)

    def index_math(score, b, h, q_idx, kv_idx):
        row = torch.floor(q_idx.float() / 2).long() % n
        return 2 * score + table[h, row] * torch.rsqrt(1.0 + torch.abs(score))

    return {
        ("softcap_causal", "score"): softcap,
        ("softcap_causal", "mask"): causal,
        ("doc_mask", "mask"): doc_mask,
        ("rel_bias", "score"): rel_bias,
        ("operand_order", "score"): order_score,
        ("operand_order", "mask"): order_mask,
        ("alibi_prefix", "score"): alibi,
        ("alibi_prefix", "mask"): prefix_lm,
        ("blocks", "score"): blocks_score,
        ("blocks", "mask"): blocks_mask,
        ("index_math", "score"): index_math,
    }


def test_spec_and_python_twins_have_equal_keys_and_values():
    from attnforge.dsl.api import trace

    doc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3], dtype=torch.int32)
    bias, table = torch.randn(3, 40), torch.randn(3, 6, dtype=torch.float64)
    spec = parse_spec(TWIN_SPEC)
    spec["doc_mask"] = spec["doc_mask"].bind(doc=doc)
    spec["rel_bias"] = spec["rel_bias"].bind(bias=bias)
    spec["index_math"] = spec["index_math"].bind(table=table)
    twins = _twins(doc, bias, table)
    assert {name for name, _ in twins} == set(spec)
    score, b, h, q, kv = _grid()
    for (name, kind), fn in twins.items():
        parsed = getattr(spec[name], f"{kind}_mod")
        traced = trace(fn, kind)
        assert parsed.ir.key == traced.ir.key, (
            f"{name}.{kind}:\n{parsed.pretty()}\n{traced.pretty()}"
        )
        assert [p.name for p in parsed.params] == [p.name for p in traced.params], name
        args = (score, b, h, q, kv) if kind == "score" else (b, h, q, kv)
        want = fn(*args)
        torch.testing.assert_close(parsed(*args).expand_as(want).to(want.dtype), want)


def test_twins_differ_when_the_variants_differ():
    from attnforge.dsl.api import trace

    keys = {
        m.ir.key for v in parse_spec(TWIN_SPEC).values() for m in (v.score_mod, v.mask_mod) if m
    }
    assert len(keys) == 11
    w = 3
    assert trace(lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= w, "mask").ir.key not in keys


# -- errors ----------------------------------------------------------------------------------------

ERRORS = [
    # (spec, line, col, message)
    ("variant a():\n    score = \n", 2, 12, "expected an expression after '='"),
    ("variant a():\n    score =", 2, 12, "expected an expression after '='"),
    ("variant a():\n    score = score *\n", 2, 20, "expected an expression after '*'"),
    (
        "variant a():\n    score = tanhh(score)\n",
        2,
        13,
        "unknown function 'tanhh' (did you mean 'tanh'?)",
    ),
    (
        "variant a():\n    mask = qidx >= kv_idx\n",
        2,
        12,
        "unknown name 'qidx' (did you mean 'q_idx'?)",
    ),
    (
        "variant x():\n  mask = b == 0\nvariant x():\n  mask = h == 0\n",
        3,
        9,
        "duplicate variant 'x'",
    ),
    ("variant a():\n    mask = q_idx - kv_idx\n", 2, 12, "mask must be boolean, got int"),
    ("variant a():\n    score = q_idx > kv_idx\n", 2, 13, "score must be a number, got bool"),
    ("variant a():\nmask = b == 0\n", 2, 1, "expected an indented block after the variant header"),
    ("variant a():\n    let d = 1\n  mask = b == 0\n", 3, 3, "unindent does not match"),
    ("variant a():\n    let d = 1\n        mask = b == 0\n", 3, 9, "unexpected indent"),
    ("variant a():\n    score = tanh(score\n    mask = b == 0\n", 2, 17, "'(' was never closed"),
    ("variant a():\n    score = score)\n", 2, 18, "unmatched ')'"),
    ("variant a()\n    score = score\n", 1, 12, "expected ':' after the variant header"),
    ("variant a():\n    score score\n", 2, 11, "expected '=' after 'score'"),
    ("variant (x = 1):\n    score = score\n", 1, 9, "expected a variant name after 'variant'"),
    ("variant a(x = 1 y = 2):\n    score = score\n", 1, 17, "expected ',' or ')' before 'y'"),
    ("variant a():\n    score = score $ 2\n", 2, 19, "unexpected character '$'"),
    ("variant a():\n    mask = !(b == 0)\n", 2, 12, "unexpected character '!' (use `not`"),
    ("score = 1\n", 1, 1, "expected `variant name(...):` at the top level"),
    ("variant a():\n    score = tanh(score, 2)\n", 2, 13, "tanh() takes 1 argument(s), got 2"),
    ("variant a():\n    mask = score > 0\n", 2, 12, "a mask cannot use 'score'"),
    (
        "variant a(t: tensor[float32, 1]):\n    score = score + t\n",
        2,
        21,
        "tensor 't' must be indexed",
    ),
    (
        "variant a(t: tensor[float32, 2]):\n    score = t[q_idx]\n",
        2,
        13,
        "has 2 dim(s) but is indexed with 1",
    ),
    (
        "variant a(t: tensor[float32, 1]):\n    score = t[q_idx / 2]\n",
        2,
        15,
        "a tensor index must be an integer, got float",
    ),
    ("variant a(w = 2):\n    score = w[q_idx]\n", 2, 13, "only tensor parameters can be indexed"),
    ("variant a():\n    mask = q_idx and kv_idx\n", 2, 12, "'and' needs boolean operands, got int"),
    (
        "variant a():\n    mask = (b > 0) & (q_idx * 1.5)\n",
        2,
        12,
        "'&' needs boolean or integer operands, got float",
    ),
    (
        "variant a():\n    score = where(q_idx, score, 0.0)\n",
        2,
        19,
        "where() needs a boolean condition, got int",
    ),
    ("variant a(c = 1.0):\n    let x = 1\n", 1, 9, "variant 'a' sets neither score nor mask"),
    (
        "variant a(c: flaot = 1.0):\n    score = score\n",
        1,
        14,
        "unknown type 'flaot' (did you mean 'float'?)",
    ),
    (
        "variant a(t: tensor[int23, 1]):\n    score = score\n",
        1,
        21,
        "unknown tensor dtype 'int23' (did you mean 'int32'?)",
    ),
    (
        "variant a(t: tensor[int32, 1] = 1):\n    score = score\n",
        1,
        33,
        "tensor parameter 't' cannot have a default",
    ),
    (
        "variant a(w: int = 2.5):\n    score = score\n",
        1,
        20,
        "parameter 'w' of variant 'a' is int; got 2.5",
    ),
    ("variant a(w):\n    score = score\n", 1, 11, "parameter 'w' needs a type or a default"),
    ("variant a(f = true):\n    score = score\n", 1, 15, "bool parameters are not supported"),
    ("variant a(w = q_idx):\n    score = score\n", 1, 15, "the default of 'w' must be a constant"),
    (
        "variant a(w = 1, w = 2):\n    score = score\n",
        1,
        18,
        "duplicate parameter 'w' in variant 'a'",
    ),
    ("variant a(h = 1):\n    score = score\n", 1, 11, "parameter name 'h' is reserved"),
    ("variant a(w = 1):\n    w = 2\n", 2, 5, "cannot assign to the parameter 'w'"),
    ("variant a():\n    q_idx = 2\n", 2, 5, "cannot assign to the index leaf 'q_idx'"),
    (
        "variant a():\n    score = score * (1 / 0)\n",
        2,
        22,
        "cannot compute this constant: division by zero",
    ),
    ("variant a():\n    score = tanh\n", 2, 13, "'tanh' is a function; call it as tanh(...)"),
]


@pytest.mark.parametrize("text,line,col,message", ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_errors_point_at_the_mistake(text, line, col, message):
    with pytest.raises(DSLError) as info:
        parse_spec(text, filename="my.af")
    err = info.value
    assert message in err.message
    assert (err.file, err.line, err.col) == ("my.af", line, col)
    rendered = str(err).splitlines()
    assert rendered[0].startswith(f"my.af:{line}:{col}: ")
    source = text.splitlines()[line - 1].strip()
    assert rendered[1].strip() == source
    indent = len(text.splitlines()[line - 1]) - len(text.splitlines()[line - 1].lstrip())
    assert rendered[2].index("^") - 4 == col - 1 - indent  # the caret sits under the column


# -- packaging -------------------------------------------------------------------------------------


def test_lark_is_imported_lazily():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["lark"] = None  # any `import lark` now fails
        import attnforge, attnforge.dsl.parse as p
        from attnforge.runtime.reference import reference_attention
        try:
            p.parse_spec("variant a():\\n    mask = b == 0\\n")
        except ImportError as e:
            print("needs lark:", "pip install" in str(e))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=_repo_root()
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "needs lark: True"


def test_no_eval_of_user_text():
    # A Python expression that would have side effects is just an unknown name / syntax error.
    with pytest.raises(DSLError, match="unknown function '__import__'"):
        parse_spec("variant a():\n    score = __import__(os)\n")


def _repo_root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[1])
