"""attnforge in one screen: write variants three ways, look at what the compiler made, run them.

    python examples/quickstart.py      # CPU: the generated Triton kernels run in the interpreter

For each variant it prints the IR, the analytic block map, the start of the generated Triton
forward kernel, and the max error of the kernel's output against the float64 dense reference.
"""

import _common as ex
import torch

import attnforge as af
from attnforge.library import generate_alibi_bias, generate_sliding_window


# 1. plain FlexAttention-style functions (the decorators are optional: af.variant traces too)
@af.score_mod
def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


@af.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


softcap_causal = af.variant(score_mod=softcap, mask_mod=causal)

# 2. factories from the variant library
alibi_window = af.variant(
    score_mod=generate_alibi_bias(ex.SHAPE.H, device=ex.DEVICE),
    mask_mod=generate_sliding_window(64),
)

# 3. the text DSL (parsed to the same IR a Python function traces to)
SPEC = """
variant prefix_lm(prefix = 40):
    mask = (kv_idx < prefix) | (q_idx >= kv_idx)
"""
prefix_lm = af.parse_spec(SPEC)["prefix_lm"]

VARIANTS = {"softcap_causal": softcap_causal, "alibi_window": alibi_window, "prefix_lm": prefix_lm}
SOURCE_LINES = 40  # how much of the generated kernel to show


def show(name: str, attn) -> None:
    L, S = ex.SHAPE.L, ex.SHAPE.S
    print(f"\n######## {name} ########")
    print("-- IR --")
    print(attn.ir)
    print(f"-- block map for L={L}, S={S} --")
    print(attn.block_mask(L, S))
    source = attn.source("fwd").splitlines()
    print(f"-- generated forward kernel: first {SOURCE_LINES} of {len(source)} lines --")
    print("\n".join(source[:SOURCE_LINES]))
    print("...")
    ex.run(name, attn)


if __name__ == "__main__":
    for name, attn in VARIANTS.items():
        show(name, attn)
    print("\nkernel cache:", af.cache_info())
