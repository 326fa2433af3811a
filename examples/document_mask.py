"""Document masking for packed sequences: tokens attend causally within their own document.

The document of each token is a captured int tensor (doc_id[q_idx] == doc_id[kv_idx]), so the
block map is computed exactly from it and blocks inside one document run without mask code.

    python examples/document_mask.py
"""

import torch
from _common import DEVICE, SHAPE, run

import attnforge as af
from attnforge.library import generate_doc_mask

NUM_DOCS = 5


def random_lengths(total: int, num_docs: int, seed: int = 0) -> list[int]:
    """num_docs positive document lengths that add up to total."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(total - 1, generator=gen)[: num_docs - 1] + 1
    bounds = [0, *sorted(cuts.tolist()), total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


LENGTHS = random_lengths(SHAPE.S, NUM_DOCS)
attn = af.variant(mask_mod=generate_doc_mask(lengths=LENGTHS, causal=True, device=DEVICE))

if __name__ == "__main__":
    print(f"document lengths: {LENGTHS}")
    run(f"document mask ({NUM_DOCS} docs, causal)", attn)
