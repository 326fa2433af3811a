"""Prototype: warp-specialised Hopper forward in Gluon (FA3's structure), noop / causal.

Session 5's Gluon forward (`gluon_fwd.py`) overlapped the softmax with the tensor cores inside
one warpgroup, but both warpgroups of the CTA ran in lock step: every TMA issue into a ring
slot that both read needs a CTA barrier, so their softmaxes met on the MUFU while the tensor
queue drained (ncu: tensor pipe 54% busy).  Here the CTA is split by role:

- a 1-warp producer partition issues every TMA (Q halves, then K and V rings) and waits on
  "slot empty" mbarriers; nothing else in the CTA issues copies, so no CTA barrier is needed;
- two consumer warpgroups (default partition + one worker), each owning 64 query rows of the
  128-row tile, signal "slot empty" with their own mbarrier arrive (count 2 per slot);
- `setmaxnreg`: consumers 240 registers, producer 24 (Triton's AllocateWarpGroups);
- ping-pong (optional): a pair of mbarriers passes a "turn" so one warpgroup issues its two
  GEMMs while the other runs its softmax.

    python bench/exp/gluon_ws_fwd.py --aot [--causal 1] [--BN 128]   # CPU: sm_90 PTX, ptxas
    python bench/exp/gluon_ws_fwd.py --bench                        # GPU: check + time
"""

# ruff: noqa: B023  (the bench lambdas run inside the loop iteration that makes them)
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gluon_fwd import _desc, _tile_start  # noqa: E402

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _load_kv(
    desc, ring, ready, t, lists, coords, SPARSE_KV_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr
):
    # TMA of kv tile t into its ring slot (the caller knows the slot is free); none past the end
    NUM_STAGES: gl.constexpr = ring.type.shape[0]
    off_zk, off_hkv = coords
    slot = t % NUM_STAGES
    start = _tile_start(t, lists, SPARSE_KV_BLOCK // BLOCK_N, SPARSE_KV_BLOCK, BLOCK_N)
    ok = t < lists[1]
    mbarrier.expect(ready.index(slot), desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(
        desc, [off_zk, off_hkv, start, 0], ready.index(slot), ring.index(slot), pred=ok
    )


@gluon.jit
def _consumer(
    WG: gl.constexpr,
    descs,
    rings,
    lists,
    coords,
    out_args,
    KV_LEN,
    sm_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    SPARSE_KV_BLOCK: gl.constexpr,
    EVEN_KV: gl.constexpr,
    IS_CAUSAL: gl.constexpr,
    PINGPONG: gl.constexpr,
):
    # Warpgroup WG's 64 query rows.  Warpgroup 0 also refills the K/V rings: it knows when it
    # is done with a slot itself, and waits on the k_free / v_free arrive of warpgroup 1.
    K_DESC, V_DESC = descs
    q_smem, k_smem, v_smem, q_bars, k_ready, k_free, v_ready, v_free, turn = rings
    OUT, LSE, off_zh, o_base, q_row, Q_LEN, stride_om = out_args
    NUM_STAGES: gl.constexpr = k_smem.type.shape[0]
    n_pt = lists[0]
    n_tiles = lists[1]
    TPB: gl.constexpr = SPARSE_KV_BLOCK // BLOCK_N
    ROWS: gl.constexpr = q_smem.type.shape[3]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)

    c = sm_scale * LOG2E
    offs_m = q_row + WG * ROWS + gl.arange(0, ROWS, layout=row_s)
    q_idx = offs_m[:, None]
    offs_t = gl.arange(0, BLOCK_N, layout=col_s)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([ROWS], gl.float32, layout=row_s)
    acc = warpgroup_mma_init(gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout))
    zero_s = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(q_bars.index(WG), 0)
    q2 = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
    mbarrier.wait(k_ready.index(0), 0, pred=n_tiles > 0)
    k0 = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
    s_tok = warpgroup_mma(q2, k0, zero_s, use_acc=False, is_async=True)
    qk = warpgroup_mma_wait(0, deps=[s_tok])
    if WG == 1:
        mbarrier.arrive(k_free.index(0), pred=n_tiles > 0)

    start_n = _tile_start(0, lists, TPB, SPARSE_KV_BLOCK, BLOCK_N)
    for j in range(0, n_tiles):
        t1 = j + 1
        start_n1 = _tile_start(t1, lists, TPB, SPARSE_KV_BLOCK, BLOCK_N)
        # 1. softmax of S_j (our PV_{j-1} and the other warpgroup's GEMMs run meanwhile)
        kv_idx = (start_n + offs_t)[None, :]
        s = qk
        if IS_CAUSAL:
            if j < n_pt:
                s = gl.where(q_idx >= kv_idx, s, float("-inf"))
        if not EVEN_KV:
            s = gl.where(kv_idx < KV_LEN, s, float("-inf"))
        m_ij = gl.maximum(m_i, gl.max(s, 1))
        m_ij_safe = gl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = gl.exp2(s * c - (m_ij_safe * c)[:, None])
        alpha = gl.exp2((m_i - m_ij_safe) * c)
        l_i = l_i * alpha + gl.sum(p, 1)
        # 2. PV_{j-1} done; rescale.  P_j's 16-bit registers are written only now (PV_{j-1}
        #    read P_{j-1} from them: writing earlier makes ptxas serialise the wgmmas)
        acc, p = warpgroup_mma_wait(0, deps=[acc, p])
        if WG == 1:
            mbarrier.arrive(v_free.index((j - 1 + NUM_STAGES) % NUM_STAGES), pred=j > 0)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # 3. our turn on the tensor cores: S_{j+1} (past the last tile a discarded product of
        #    whatever the slot holds) and PV_j, then hand the turn over
        if PINGPONG:
            mbarrier.wait(turn.index(WG), j & 1)
        slot1 = t1 % NUM_STAGES
        mbarrier.wait(k_ready.index(slot1), (t1 // NUM_STAGES) & 1, pred=t1 < n_tiles)
        k1 = k_smem.index(slot1).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_next = warpgroup_mma(q2, k1, zero_s, use_acc=False, is_async=True)
        slot = j % NUM_STAGES
        mbarrier.wait(v_ready.index(slot), (j // NUM_STAGES) & 1)
        v = v_smem.index(slot).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_op, v, acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG))
        if WG == 0:
            # 4. refill while our GEMMs run: K_j's slot (both S_j long done) with K_{j+S},
            #    V_{j-1}'s (both PV_{j-1} issued before this turn) with V_{j-1+S}
            mbarrier.wait(k_free.index(slot), (j // NUM_STAGES) & 1, pred=j + NUM_STAGES < n_tiles)
            _load_kv(
                K_DESC, k_smem, k_ready, j + NUM_STAGES, lists, coords, SPARSE_KV_BLOCK, BLOCK_N
            )
            tv = j - 1 + NUM_STAGES
            mbarrier.wait(
                v_free.index(tv % NUM_STAGES),
                ((j - 1) // NUM_STAGES) & 1,
                pred=(j > 0) & (tv < n_tiles),
            )
            _load_kv(
                V_DESC,
                v_smem,
                v_ready,
                gl.where(j > 0, tv, n_tiles),
                lists,
                coords,
                SPARSE_KV_BLOCK,
                BLOCK_N,
            )
        # 5. S_{j+1} done (PV_j still running)
        qk = warpgroup_mma_wait(1, deps=[s_next])
        if WG == 1:
            mbarrier.arrive(k_free.index(slot1), pred=t1 < n_tiles)
        m_i = m_ij
        start_n = start_n1
    acc = warpgroup_mma_wait(0, deps=[acc])

    # -- epilogue: this warpgroup's rows --
    row_empty = l_i == 0.0
    l_safe = gl.where(row_empty, 1.0, l_i)
    lse = gl.where(row_empty, float("-inf"), (m_i * c + gl.log2(l_safe)) * LN2)
    out = acc * gl.convert_layout(1.0 / l_safe, row_o)[:, None]
    offs_mo = q_row + WG * ROWS + gl.arange(0, ROWS, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=col_o)
    o_ptrs = OUT + o_base + (offs_mo * stride_om)[:, None] + offs_d[None, :]
    gl.store(o_ptrs, out.to(dtype), mask=(offs_mo < Q_LEN)[:, None])
    gl.store(LSE + off_zh.to(gl.int64) * Q_LEN + offs_m, lse, mask=offs_m < Q_LEN)


@gluon.jit
def _attn_fwd_ws(
    Q_DESC,
    K_DESC,
    V_DESC,
    OUT,
    LSE,
    KV_NUM_BLKS,
    KV_IDX,
    FULL_KV_NUM_BLKS,
    FULL_KV_IDX,
    stride_kz,
    stride_oz,
    stride_oh,
    stride_om,
    stride_bnz,
    stride_bnh,
    stride_bnm,
    stride_biz,
    stride_bih,
    stride_bim,
    stride_bin,
    stride_fnz,
    stride_fnh,
    stride_fnm,
    stride_fiz,
    stride_fih,
    stride_fim,
    stride_fin,
    H,
    GQA_GROUP,
    Q_LEN,
    KV_LEN,
    sm_scale,
    HEAD_GROUP,
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    SPARSE_Q_BLOCK: gl.constexpr,
    SPARSE_KV_BLOCK: gl.constexpr,
    EVEN_KV: gl.constexpr,
    HAS_FULL_BLOCKS: gl.constexpr,
    IS_CAUSAL: gl.constexpr,
    NUM_STAGES: gl.constexpr,
    PINGPONG: gl.constexpr,
    WORKER_REGS: gl.constexpr,
):
    dtype: gl.constexpr = Q_DESC.dtype
    TPB: gl.constexpr = SPARSE_KV_BLOCK // BLOCK_N

    # -- program -> (query tile, head): the Triton template's _program_tile order --
    n_m = gl.cdiv(Q_LEN, BLOCK_M)
    pid = gl.program_id(0)
    n_heads = gl.num_programs(0) // n_m
    per_group = HEAD_GROUP * n_m
    first = (pid // per_group) * HEAD_GROUP
    size = gl.minimum(HEAD_GROUP, n_heads - first)
    r = pid - first * n_m
    rank = r // size
    off_zh = first + r % size
    start_m = n_m - 1 - rank
    off_z = off_zh // H
    off_h = off_zh % H
    off_hkv = off_h // GQA_GROUP
    off_zk = gl.where(stride_kz == 0, 0, off_z)

    # -- this tile's kv blocks: PARTIAL (mask applied) then FULL --
    sparse_m = (start_m * BLOCK_M) // SPARSE_Q_BLOCK
    n_part = gl.load(KV_NUM_BLKS + off_z * stride_bnz + off_h * stride_bnh + sparse_m * stride_bnm)
    part_idx = KV_IDX + off_z * stride_biz + off_h * stride_bih + sparse_m * stride_bim
    if HAS_FULL_BLOCKS:
        n_full = gl.load(
            FULL_KV_NUM_BLKS + off_z * stride_fnz + off_h * stride_fnh + sparse_m * stride_fnm
        )
        full_idx = FULL_KV_IDX + off_z * stride_fiz + off_h * stride_fih + sparse_m * stride_fim
    else:
        n_full = n_part * 0
        full_idx = part_idx
    n_pt = n_part * TPB
    lists = (n_pt, n_pt + n_full * TPB, part_idx, stride_bin, full_idx, stride_fin)

    # -- shared memory and barriers --
    q_smem = gl.allocate_shared_memory(dtype, [2] + Q_DESC.block_type.shape, Q_DESC.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + K_DESC.block_type.shape, K_DESC.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + V_DESC.block_type.shape, V_DESC.layout)
    bar_layout: gl.constexpr = mbarrier.MBarrierLayout()
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], bar_layout)
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
    k_free = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
    v_free = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], bar_layout)
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=1)
        mbarrier.init(v_free.index(i), count=1)
    if PINGPONG:
        mbarrier.arrive(turn.index(0))  # warpgroup 0 issues first
    fence_async_shared()

    # -- first loads, before the split (every slot is free) --
    q_row = start_m * BLOCK_M
    HALF: gl.constexpr = Q_DESC.block_type.shape[2]
    for w in gl.static_range(2):
        mbarrier.expect(q_bars.index(w), Q_DESC.block_type.nbytes)
        tma.async_copy_global_to_shared(
            Q_DESC, [off_z, off_h, q_row + w * HALF, 0], q_bars.index(w), q_smem.index(w)
        )
    coords = (off_zk, off_hkv)
    for i in gl.static_range(NUM_STAGES):
        _load_kv(K_DESC, k_smem, k_ready, i, lists, coords, SPARSE_KV_BLOCK, BLOCK_N)
        _load_kv(V_DESC, v_smem, v_ready, i, lists, coords, SPARSE_KV_BLOCK, BLOCK_N)

    o_base = off_z.to(gl.int64) * stride_oz + off_h.to(gl.int64) * stride_oh
    out_args = (OUT, LSE, off_zh, o_base, q_row, Q_LEN, stride_om)
    rings = (q_smem, k_smem, v_smem, q_bars, k_ready, k_free, v_ready, v_free, turn)
    descs = (K_DESC, V_DESC)
    # Two partitions of one warpgroup each (the default one and a worker): each waits and
    # arrives on mbarriers alone, so no barrier spans the CTA.  No producer partition: with
    # more than one worker partition Triton 3.6 dispatches workers through an indirect
    # branch, and ptxas then serialises every register-A wgmma (P V) of a worker (C7512).
    # (tuples are built whole: Gluon's tuple `+` turns constexpr members into tensors)
    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    0,
                    descs,
                    rings,
                    lists,
                    coords,
                    out_args,
                    KV_LEN,
                    sm_scale,
                    HEAD_DIM,
                    BLOCK_N,
                    SPARSE_KV_BLOCK,
                    EVEN_KV,
                    IS_CAUSAL,
                    PINGPONG,
                ),
            ),
            (
                _consumer,
                (
                    1,
                    descs,
                    rings,
                    lists,
                    coords,
                    out_args,
                    KV_LEN,
                    sm_scale,
                    HEAD_DIM,
                    BLOCK_N,
                    SPARSE_KV_BLOCK,
                    EVEN_KV,
                    IS_CAUSAL,
                    PINGPONG,
                ),
            ),
        ],
        [4],
        [WORKER_REGS],
    )


def ws_attention(q, k, v, bm, causal, BN=128, stages=2, pingpong=True, regs=256, hg=1):
    B, H, L, D = q.shape
    S = k.shape[2]
    BM = 128
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    kn, ki = bm.kv_num_blocks, bm.kv_indices
    fn, fi = bm.full_kv_num_blocks, bm.full_kv_indices
    has_full = fn is not None
    if not has_full:
        fn, fi = kn, ki
    st = lambda t, d: t.stride(d) if t.size(d) > 1 else 0  # noqa: E731
    grid = (triton.cdiv(L, BM) * B * H,)
    _attn_fwd_ws[grid](
        _desc(q, BM // 2, D),
        _desc(k, BN, D),
        _desc(v, BN, D),
        out,
        lse,
        kn,
        ki,
        fn,
        fi,
        k.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        st(kn, 0),
        st(kn, 1),
        kn.stride(2),
        st(ki, 0),
        st(ki, 1),
        ki.stride(2),
        ki.stride(3),
        st(fn, 0),
        st(fn, 1),
        fn.stride(2),
        st(fi, 0),
        st(fi, 1),
        fi.stride(2),
        fi.stride(3),
        H,
        H // k.shape[1],
        L,
        S,
        D**-0.5,
        hg,
        HEAD_DIM=D,
        BLOCK_M=BM,
        BLOCK_N=BN,
        SPARSE_Q_BLOCK=bm.BLOCK_SIZE[0],
        SPARSE_KV_BLOCK=bm.BLOCK_SIZE[1],
        EVEN_KV=S % bm.BLOCK_SIZE[1] == 0,
        HAS_FULL_BLOCKS=has_full,
        IS_CAUSAL=causal,
        NUM_STAGES=stages,
        PINGPONG=pingpong,
        WORKER_REGS=regs,
        num_warps=4,
    )
    return out, lse


def aot(D, BN, stages, causal, pingpong, regs):
    from aot_sm90 import ptxas_lines
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    lay = lambda rows: gl.NVMMASharedLayout.get_default_for([1, 1, rows, D], gl.bfloat16)  # noqa
    fn = _attn_fwd_ws
    sig, consts = {}, {}
    cx = dict(
        HEAD_DIM=D,
        BLOCK_M=128,
        BLOCK_N=BN,
        SPARSE_Q_BLOCK=128,
        SPARSE_KV_BLOCK=128,
        EVEN_KV=True,
        HAS_FULL_BLOCKS=causal,
        IS_CAUSAL=causal,
        NUM_STAGES=stages,
        PINGPONG=pingpong,
        WORKER_REGS=regs,
    )
    for name in fn.arg_names:
        if name in cx:
            sig[name], consts[name] = "constexpr", cx[name]
        elif name.endswith("_DESC"):
            rows = 64 if name == "Q_DESC" else BN
            sig[name] = f"tensordesc<bf16[1, 1, {rows}, {D}],{lay(rows)!r}>"
        elif name == "OUT":
            sig[name] = "*bf16"
        elif name == "LSE":
            sig[name] = "*fp32"
        elif "NUM" in name or "IDX" in name:
            sig[name] = "*i32"
        elif name == "sm_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    c = triton.compile(
        GluonASTSource(fn, sig, consts, {}),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 4, "num_stages": 1},
    )
    ptx = c.asm["ptx"]
    Path("/tmp/gluon_ws_fwd.ptx").write_text(ptx)
    Path("/tmp/gluon_ws_fwd.ttgir").write_text(c.asm["ttgir"])
    print(
        f"D={D} BN={BN} s{stages} causal={causal} pingpong={pingpong} regs={regs}: "
        f"shared={c.metadata.shared} warps={c.metadata.num_warps} "
        f"setmaxnreg={ptx.count('setmaxnreg')} wgmma={ptx.count('wgmma.mma_async')} "
        f"bar.sync={ptx.count('bar.sync')} barrier.sync={ptx.count('barrier.sync')} "
        f"arrive={ptx.count('mbarrier.arrive')}"
    )
    for ln in ptxas_lines(ptx):
        print("  ", ln)


def bench(quick: bool):
    import torch.nn.functional as F
    from triton.testing import do_bench

    import attnforge as af

    torch.manual_seed(0)
    B, H, L = 4, 16, 8192
    rows = []
    cfgs = [(128, 2, True, 256), (128, 3, True, 256), (128, 2, False, 256), (64, 3, True, 256)]
    for D in (128, 64):
        for causal in (False, True):
            q, k, v = (
                torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)
            )
            mm = (lambda b, h, qi, ki: qi >= ki) if causal else (lambda b, h, qi, ki: qi >= 0)
            bm = af.create_block_mask(mm, None, None, L, L, device="cuda")
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
            res = {"D": D, "causal": causal}
            for name, fn in {
                "attnforge": lambda: af.flex_attention(q, k, v, block_mask=bm if causal else None),
                "cudnn": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            }.items():
                res[name] = round(flops / do_bench(fn) * 1e-9, 1)
            for BN, s, pp, regs in cfgs[:2] if quick else cfgs:
                st = s + (D == 64)  # D=64 tiles are half the bytes: one more stage fits
                key = f"ws_{BN}s{st}{'pp' if pp else ''}"
                try:
                    run = lambda: ws_attention(q, k, v, bm, causal, BN, st, pp, regs)  # noqa: E731
                    o, lse = run()
                    torch.cuda.synchronize()
                    err = (o.float() - ref.float()).abs().max().item()
                    res[key] = (round(flops / do_bench(run) * 1e-9, 1), round(err, 4))
                except Exception as e:  # noqa: BLE001
                    res[key] = f"{type(e).__name__}: {str(e)[:300]}"
            print(res, flush=True)
            rows.append(res)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--aot", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--BN", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--causal", type=int, default=0)
    ap.add_argument("--pingpong", type=int, default=1)
    ap.add_argument("--regs", type=int, default=256)
    a = ap.parse_args()
    if a.aot:
        aot(a.D, a.BN, a.stages, bool(a.causal), bool(a.pingpong), a.regs)
    if a.bench:
        bench(a.quick)
