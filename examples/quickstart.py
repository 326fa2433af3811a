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

MAP_LEN = 2048  # the block analysis is O(blocks): maps of long sequences are cheap
VARIANTS = {"softcap_causal": softcap_causal, "alibi_window": alibi_window, "prefix_lm": prefix_lm}


def generated_section(source: str) -> str:
    """The variant-specific part of a kernel: from the "# -- generated" banner to the next one
    (the rest is the hand-written template)."""
    lines = source.splitlines()
    start = next((i for i, s in enumerate(lines) if s.startswith("# -- generated")), 0)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("# -- ")), None)
    return "\n".join(lines[start:end]).strip()


def show(name: str, attn) -> None:
    print(f"\n######## {name} ########")
    print("-- IR --")
    print(attn.ir)
    print(f"-- block map for L = S = {MAP_LEN} --")
    print(attn.block_mask(MAP_LEN, MAP_LEN))
    source = attn.source("fwd")
    print(
        f"-- generated forward kernel (the variant's part of {len(source.splitlines())} lines;"
        " attn.source('fwd') has all) --"
    )
    print(generated_section(source))
    ex.run(name, attn)


if __name__ == "__main__":
    for name, attn in VARIANTS.items():
        show(name, attn)
    print("\nkernel cache:", af.cache_info())
