"""An interpreted (CPU) launch must leave ``triton.language`` as it found it, so kernels compiled
for a GPU later in the same process still build (triton 3.6's interpreter leaks its patches)."""

import torch

import attnforge as af


def _snapshot():
    from attnforge.runtime.loader import _language_namespaces

    return [(ns, dict(vars(ns))) for ns in _language_namespaces()]


def test_interpreted_launch_restores_triton_language():
    before = _snapshot()
    q, k, v = (torch.randn(1, 1, 33, 16) for _ in range(3))
    slopes = torch.rand(1)

    def alibi(score, b, h, q_idx, kv_idx):  # a captured tensor and helper-function calls
        return score + slopes[h] * (kv_idx - q_idx)

    out = af.flex_attention(q, k, v, score_mod=alibi)
    want = af.reference_attention(q.double(), k.double(), v.double(), score_mod=alibi)
    assert (out.double() - want).abs().max().item() < 1e-4
    for ns, attrs in before:
        now = vars(ns)
        changed = [n for n, val in attrs.items() if now.get(n) is not val]
        added = [n for n in now if n not in attrs]
        assert not changed and not added, (ns, changed[:5], added[:5])
