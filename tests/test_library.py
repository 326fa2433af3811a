"""attnforge.library: every factory agrees with an independent dense construction.

Each case checks three things against a mask/score built here by plain numpy loops:
the eager call of the returned mod, the traced IR evaluated by ``dsl.evaluate`` (the semantics
every kernel reproduces), and (when the BlockMask has landed) the block map.
"""

from __future__ import annotations

import inspect
import math
import textwrap

import numpy as np
import pytest
import torch

from attnforge import library as lib
from attnforge.dsl.evaluate import evaluate

# -- helpers --------------------------------------------------------------------------------------


def grids(B, H, L, S):
    return {
        "b": torch.arange(B).view(B, 1, 1, 1),
        "h": torch.arange(H).view(1, H, 1, 1),
        "q_idx": torch.arange(L).view(1, 1, L, 1),
        "kv_idx": torch.arange(S).view(1, 1, 1, S),
    }


def mask_both_ways(mod, B, H, L, S):
    """(eager, IR) dense masks of shape (B, H, L, S)."""
    g = grids(B, H, L, S)
    eager = mod(g["b"], g["h"], g["q_idx"], g["kv_idx"])
    traced = evaluate(mod.ir, g, mod.param_values())
    shape = (B, H, L, S)
    return eager.expand(shape).numpy(), traced.expand(shape).numpy()


def assert_mask(mod, expected, B=1, H=1):
    expected = np.broadcast_to(np.asarray(expected, dtype=bool), (B, H) + expected.shape[-2:])
    L, S = expected.shape[-2:]
    eager, traced = mask_both_ways(mod, B, H, L, S)
    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(traced, expected)
    check_block_map(mod, expected)


def score_both_ways(mod, score, B, H, L, S):
    g = grids(B, H, L, S)
    eager = mod(score, g["b"], g["h"], g["q_idx"], g["kv_idx"])
    traced = evaluate(mod.ir, dict(g, score=score), mod.param_values())
    return eager.detach().double(), traced.detach()


def assert_score(mod, expected, score, atol=1e-5):
    B, H, L, S = score.shape
    eager, traced = score_both_ways(mod, score, B, H, L, S)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(eager, expected.expand_as(eager), atol=atol, rtol=1e-5)
    torch.testing.assert_close(traced, expected.expand_as(traced), atol=atol, rtol=1e-5)


def check_block_map(mod, dense, block=(16, 16)):
    """create_block_mask(...).to_dense() must equal the brute-force block classes of ``dense``."""
    pytest.importorskip("attnforge.codegen.blocks")  # the analysis behind create_block_mask
    from attnforge.runtime import blockmask

    B, H, L, S = dense.shape
    bm = blockmask.create_block_mask(mod, B, H, L, S, device="cpu", BLOCK_SIZE=block)
    got = bm.to_dense().cpu().numpy().astype(bool)
    nq, nk = math.ceil(L / block[0]), math.ceil(S / block[1])
    want = np.zeros((B, H, nq, nk), dtype=bool)
    for i in range(nq):
        for j in range(nk):
            tile = dense[:, :, i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            want[:, :, i, j] = tile.any(axis=(-1, -2))
    np.testing.assert_array_equal(got, want)


def dense(L, S, keep):
    """keep(i, j) -> bool over every (query, key) pair, by explicit loops."""
    return np.array([[bool(keep(i, j)) for j in range(S)] for i in range(L)])


# -- causal and windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(13, 13), (9, 20), (20, 9)])
def test_causal_top_left(L, S):
    assert_mask(lib.generate_causal_mask(), np.tril(np.ones((L, S), dtype=bool)))


@pytest.mark.parametrize("L,S", [(13, 13), (9, 20), (20, 9)])
def test_causal_bottom_right(L, S):
    mod = lib.generate_causal_mask("bottom_right", q_len=L, kv_len=S)
    assert_mask(mod, np.tril(np.ones((L, S), dtype=bool), k=S - L))


def test_causal_bottom_right_reuses_structure():
    a = lib.generate_causal_mask("bottom_right", q_len=4, kv_len=9)
    b = lib.generate_causal_mask("bottom_right", q_len=7, kv_len=7)
    assert a.ir.key == b.ir.key


def test_causal_bad_alignment():
    with pytest.raises(ValueError, match="alignment"):
        lib.generate_causal_mask("bottom")
    with pytest.raises(ValueError, match="q_len=L, kv_len=S"):
        lib.generate_causal_mask("bottom_right")


@pytest.mark.parametrize("window", [0, 3, 40])
def test_sliding_window(window):
    L = S = 37
    assert_mask(lib.generate_sliding_window(window), dense(L, S, lambda i, j: 0 <= i - j <= window))
    assert_mask(
        lib.generate_sliding_window(window, causal=False),
        dense(L, S, lambda i, j: abs(i - j) <= window),
    )


def test_sliding_window_key_independent_of_size():
    assert lib.generate_sliding_window(8).ir.key == lib.generate_sliding_window(1024).ir.key


def test_sinks_window():
    L = S = 40
    assert_mask(
        lib.generate_sinks_window(5, 3),
        dense(L, S, lambda i, j: j <= i and (i - j <= 5 or j < 3)),
    )
    assert_mask(
        lib.generate_sinks_window(5, 3, causal=False),
        dense(L, S, lambda i, j: abs(i - j) <= 5 or j < 3),
    )


@pytest.mark.parametrize("causal", [False, True])
def test_dilated_sliding_window(causal):
    L = S = 33

    def keep(i, j):
        d = abs(i - j)
        return d <= 9 and d % 3 == 0 and (j <= i or not causal)

    assert_mask(lib.generate_dilated_sliding_window(9, 3, causal=causal), dense(L, S, keep))


@pytest.mark.parametrize("causal", [False, True])
def test_chunked(causal):
    L, S = 45, 45
    blocks = np.zeros((L, S), dtype=bool)
    for start in range(0, L, 10):
        blocks[start : start + 10, start : start + 10] = True
    if causal:
        blocks &= np.tril(np.ones((L, S), dtype=bool))
    assert_mask(lib.generate_chunked_mask(10, causal=causal), blocks)


# -- documents and prefixes -----------------------------------------------------------------------


def doc_dense(lengths, causal):
    owner = [d for d, n in enumerate(lengths) for _ in range(n)]
    T = len(owner)
    return dense(T, T, lambda i, j: owner[i] == owner[j] and (j <= i or not causal))


@pytest.mark.parametrize("causal", [True, False])
def test_doc_mask_from_lengths(causal):
    lengths = [5, 1, 12, 7, 11]
    assert_mask(lib.generate_doc_mask(lengths=lengths, causal=causal), doc_dense(lengths, causal))


def test_doc_mask_from_offsets_tensor():
    offsets = torch.tensor([0, 4, 9, 30])
    mod = lib.generate_doc_mask(offsets=offsets)
    assert_mask(mod, doc_dense([4, 5, 21], causal=True))


def test_doc_mask_bad_input():
    with pytest.raises(ValueError, match="exactly one"):
        lib.generate_doc_mask()
    with pytest.raises(ValueError, match="start at 0"):
        lib.generate_doc_mask(offsets=[1, 4])
    with pytest.raises(ValueError, match="positive"):
        lib.generate_doc_mask(lengths=[3, 0, 2])


def test_prefix_lm():
    L = S = 30
    assert_mask(lib.generate_prefix_lm_mask(7), dense(L, S, lambda i, j: j < 7 or j <= i))


def test_prefix_lm_per_batch():
    prefix = torch.tensor([0, 5, 30])
    L = S = 24
    expected = np.stack([dense(L, S, lambda i, j, p=int(p): j < p or j <= i)[None] for p in prefix])
    assert_mask(lib.generate_prefix_lm_mask(prefix), expected, B=3)


# -- score mods -----------------------------------------------------------------------------------


def test_alibi():
    B, H, L, S = 2, 4, 9, 11
    score = torch.randn(B, H, L, S, dtype=torch.float64)
    slopes = [2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]
    bias = np.array([[[s * (j - i) for j in range(S)] for i in range(L)] for s in slopes])
    assert_score(lib.generate_alibi_bias(H), score + torch.from_numpy(bias)[None], score)


def test_alibi_learnable_slopes_reach_autograd():
    alibi = lib.generate_alibi_bias(3, learnable=True)
    assert alibi.slopes.requires_grad
    g = grids(1, 3, 4, 5)
    out = alibi(torch.zeros(1, 3, 4, 5), g["b"], g["h"], g["q_idx"], g["kv_idx"])
    out.sum().backward()
    # d/d slope[h] of sum_{i,j} slope[h] (j - i) = sum_{i<4, j<5} (j - i) = 4*10 - 5*6 = 10
    torch.testing.assert_close(alibi.slopes.grad, torch.full((3,), 10.0))


def test_alibi_bad_slopes():
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        lib.generate_alibi_bias(4, slopes=torch.ones(3))


@pytest.mark.parametrize("approx", [False, True])
def test_tanh_softcap(approx):
    score = torch.linspace(-400, 400, 101, dtype=torch.float64).view(1, 1, 1, 101)
    mod = lib.generate_tanh_softcap(20.0, approx=approx)
    assert_score(mod, 20.0 * torch.tanh(score / 20.0), score)


def test_softcap_key_independent_of_cap():
    assert lib.generate_tanh_softcap(30.0).ir.key == lib.generate_tanh_softcap(50.0).ir.key


@pytest.mark.parametrize("per_head", [True, False])
def test_relative_bias(per_head):
    H, L, S, max_len = 3, 12, 15, 5
    table = torch.randn(H, 2 * max_len - 1) if per_head else torch.randn(2 * max_len - 1)
    score = torch.randn(1, H, L, S, dtype=torch.float64)
    t = table.double().numpy()
    expected = np.zeros((H, L, S))
    for h in range(H):
        for i in range(L):
            for j in range(S):
                d = min(max(i - j, -(max_len - 1)), max_len - 1)
                expected[h, i, j] = (t[h] if per_head else t)[d + max_len - 1]
    assert_score(lib.generate_relative_bias(table), score + torch.from_numpy(expected), score)


def test_relative_bias_bad_table():
    with pytest.raises(ValueError, match="odd last dim"):
        lib.generate_relative_bias(torch.zeros(2, 8))


# -- neighbourhoods -------------------------------------------------------------------------------


def natten_axis(q, kv, n, k):
    """attention-gym's formulation: clamp the window centre, then |kv - centre| <= k // 2."""
    centre = min(max(q, k // 2), n - 1 - k // 2)
    return abs(kv - centre) <= k // 2


def natten_dense(canvas, kernel):
    coords = list(np.ndindex(*canvas))
    n = len(coords)
    return dense(
        n,
        n,
        lambda i, j: all(
            natten_axis(a, b, c, k) for a, b, c, k in zip(coords[i], coords[j], canvas, kernel)
        ),
    )


@pytest.mark.parametrize(
    "canvas,kernel",
    [((23,), (5,)), ((9, 7), (3, 5)), ((6, 6), (1, 3)), ((4, 5, 6), (3, 3, 5)), ((5, 5), (5, 5))],
)
def test_natten(canvas, kernel):
    expected = natten_dense(canvas, kernel)
    assert (expected.sum(axis=1) == math.prod(kernel)).all()
    assert_mask(lib.generate_natten(kernel, canvas), expected)


def test_natten_even_kernel_sees_k_keys():
    mod = lib.generate_natten(4, (10, 10))
    eager, _ = mask_both_ways(mod, 1, 1, 100, 100)
    assert (eager[0, 0].sum(axis=1) == 16).all()


def test_natten_bad_kernel():
    with pytest.raises(ValueError, match="larger than canvas"):
        lib.generate_natten(9, (4, 16))
    with pytest.raises(ValueError, match="2 entries"):
        lib.generate_natten((3, 3, 3), (4, 16))


def sta_dense(canvas, tile, window):
    """Enumerate tokens tile-major, then keep pairs whose tiles are in the clamped window."""
    grid = [n // t for n, t in zip(canvas, tile)]
    tile_of = [tc for tc in np.ndindex(*grid) for _ in np.ndindex(*tile)]
    n = len(tile_of)
    return dense(
        n,
        n,
        lambda i, j: all(
            natten_axis(a, b, g, w) for a, b, g, w in zip(tile_of[i], tile_of[j], grid, window)
        ),
    )


@pytest.mark.parametrize(
    "canvas,tile,window",
    [((8, 12), (2, 3), (3, 3)), ((8, 8), (4, 2), (1, 3)), ((4, 6, 6), (2, 3, 2), (1, 1, 3))],
)
def test_sta(canvas, tile, window):
    assert_mask(lib.generate_sta_mask(canvas, tile, window), sta_dense(canvas, tile, window))


def test_sta_tile_aligned_blocks_are_never_partial():
    pytest.importorskip("attnforge.codegen.blocks")
    from attnforge.runtime import blockmask

    mod = lib.generate_sta_mask((8, 16), (4, 4), (1, 3))  # 16-token tiles == 16-token blocks
    bm = blockmask.create_block_mask(mod, 1, 1, 128, 128, device="cpu", BLOCK_SIZE=16)
    assert int(bm.kv_num_blocks.sum()) == 0  # no partial blocks: no mask code runs


def test_sta_bad_tile():
    with pytest.raises(ValueError, match="not a multiple"):
        lib.generate_sta_mask((10, 8), (4, 4), (1, 1))


# -- docstrings -----------------------------------------------------------------------------------


def docstring_example(fn) -> str:
    """The indented block after ``Example::`` in ``fn``'s docstring."""
    doc = inspect.getdoc(fn) or ""
    assert "Example::" in doc, f"{fn.__name__} has no Example:: block"
    lines = doc.split("Example::", 1)[1].splitlines()[1:]
    block = []
    for line in lines:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block))


FACTORIES = [name for name in lib.__all__ if name.startswith("generate_")]


@pytest.mark.parametrize("name", FACTORIES)
def test_docstring_example_runs(name):
    code = docstring_example(getattr(lib, name))
    if "create_block_mask" in code or "af.variant" in code:
        pytest.importorskip("attnforge.codegen.blocks")
    namespace = {"torch": torch, "af": __import__("attnforge")}
    exec("from attnforge.library import *", namespace)
    try:
        exec(compile(code, f"<{name} docstring>", "exec"), namespace)
    except NotImplementedError as err:  # backward kernels not available in this build yet
        pytest.skip(str(err))
