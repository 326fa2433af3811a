"""attnforge: a compiler for attention variants, drop-in compatible with FlexAttention.

Quick tour::

    import torch, attnforge as af
    q = k = v = torch.randn(1, 2, 64, 32)                  # (B, H, L, E)

    @af.mask_mod
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    out = af.flex_attention(q, k, v, block_mask=af.create_block_mask(causal, 1, 1, 64, 64))

Public names are imported lazily so that ``import attnforge`` stays cheap and works without
optional dependencies (lark is only needed by ``parse_spec``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # dsl
    "score_mod": "attnforge.dsl.api",
    "mask_mod": "attnforge.dsl.api",
    "and_masks": "attnforge.dsl.api",
    "or_masks": "attnforge.dsl.api",
    "noop_mask": "attnforge.dsl.api",
    "trace": "attnforge.dsl.api",
    "DSLError": "attnforge.dsl.errors",
    # runtime
    "flex_attention": "attnforge.runtime.api",
    "variant": "attnforge.runtime.variant",
    "parse_spec": "attnforge.runtime.variant",
    "cache_info": "attnforge.runtime.cache",
    "create_block_mask": "attnforge.runtime.blockmask",
    "BlockMask": "attnforge.runtime.blockmask",
    "block_mask_from_scores": "attnforge.runtime.blockmask",
    "create_mask": "attnforge.runtime.reference",
    "reference_attention": "attnforge.runtime.reference",
}

__all__ = sorted(_EXPORTS) + ["library"]


def __getattr__(name: str):
    if name == "library":
        return importlib.import_module("attnforge.library")
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'attnforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
