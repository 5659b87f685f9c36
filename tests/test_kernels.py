"""Triton kernels vs their PyTorch references (kernels/). CPU: the Triton interpreter, small fp32 shapes.

Tolerances: fp32 atol/rtol 2e-5 (interpreter) / 1e-4 (GPU, exp2 and reduction order); bf16/fp16 on
the GPU are compared with the fp32 reference of the same (rounded) inputs at 2e-2 / 1e-2.
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated

from triforce.kernels import _common  # noqa: E402
from triforce.kernels.chunk_topk import (chunk_scores, chunk_scores_reference, chunk_summaries,  # noqa: E402
                                         chunk_summaries_reference, select_chunks, select_chunks_reference)
from triforce.kernels.fused_gemv import (add_norm_gemv_reference, add_norm_gemv_rope_reference,  # noqa: E402
                                         add_norm_gemv_rope_triton, add_norm_gemv_triton,
                                         swiglu_gemv_reference, swiglu_gemv_triton)
from triforce.kernels.fused_gemv import supported as fused_supported  # noqa: E402
from triforce.kernels.gemv import gemv, gemv_reference, gemv_triton  # noqa: E402
from triforce.kernels.quant_gemv import (dequantize_int4, dequantize_int8, int4_gemv, int4_gemv_reference,  # noqa: E402
                                         int4_gemv_triton, int8_gemv, int8_gemv_reference, int8_gemv_triton,
                                         quantize_int4, quantize_int8, tinygemm_pack, int4_tinygemm, tinygemm_scales)
from triforce.kernels._split_k import split_k_attention  # noqa: E402
from triforce.kernels.rope_write import rope_write, rope_write_reference  # noqa: E402
from triforce.kernels.row_uniform import row_uniform_reference, row_uniform_triton, seed_key  # noqa: E402
from triforce.kernels.decode_attention import (decode_attention, decode_attention_reference,  # noqa: E402
                                               decode_attention_triton)
from triforce.kernels.sparse_attention import (bottom_right_sdpa, chunk_positions, sparse_attention,  # noqa: E402
                                               sparse_attention_reference, sparse_attention_triton)

DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not _common.HAS_TRITON or not (CUDA or _common.INTERPRET),
    reason="triton is not importable" if not _common.HAS_TRITON
    else "no CUDA and the kernels were imported without TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (bigger shapes, bf16/fp16)")
TOL = dict(atol=1e-4, rtol=1e-4) if CUDA else dict(atol=2e-5, rtol=2e-5)
LOW = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def rand(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEV, dtype)


def sparse_case(h, kvh, d, t, s_max, n_sel, chunk, tail_start, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = rand(h, t, d, dtype=dtype, gen=gen), rand(kvh, s_max, d, dtype=dtype, gen=gen), rand(kvh, s_max, d, dtype=dtype, gen=gen)
    n_chunks = tail_start // chunk
    rest = torch.stack([torch.randperm(n_chunks - 1, generator=gen)[:n_sel - 1] + 1 for _ in range(kvh)])
    idx = torch.cat((torch.zeros(kvh, 1, dtype=torch.long), rest), 1).sort(1).values.to(DEV)
    return q, k, v, idx


# ---------------------------------------------------------------- references vs the core's semantics

def test_bottom_right_sdpa_matches_core_attention():
    from triforce.cache import attention
    gen = torch.Generator().manual_seed(1)
    q, k, v = rand(6, 4, 32, gen=gen), rand(2, 20, 32, gen=gen), rand(2, 20, 32, gen=gen)
    torch.testing.assert_close(bottom_right_sdpa(q, k, v), attention(q[None], k, v)[0])
    torch.testing.assert_close(decode_attention_reference(q, k, v), attention(q[None], k, v)[0], **TOL)


def test_sparse_reference_is_attention_over_gathered_keys():
    q, k, v, idx = sparse_case(4, 2, 32, 3, 120, n_sel=3, chunk=8, tail_start=80)
    pos = torch.cat((chunk_positions(idx, 8), torch.arange(80, 100, device=DEV).expand(2, -1)), 1)
    want = bottom_right_sdpa(q, torch.stack([k[h, pos[h]] for h in range(2)]), torch.stack([v[h, pos[h]] for h in range(2)]))
    torch.testing.assert_close(sparse_attention_reference(q, k, v, idx, 8, 80, 100), want)


def test_dispatchers_agree_with_references():
    q, k, v, idx = sparse_case(4, 2, 32, 2, 96, n_sel=2, chunk=8, tail_start=64)
    torch.testing.assert_close(sparse_attention(q, k, v, idx, 8, 64, 70), sparse_attention_reference(q, k, v, idx, 8, 64, 70), **TOL)
    torch.testing.assert_close(decode_attention(q, k[:, :70], v[:, :70]), decode_attention_reference(q, k[:, :70], v[:, :70]), **TOL)
    s = chunk_summaries(k[:, :64], 8)
    assert torch.equal(select_chunks(q[:, -1], s, 3), select_chunks_reference(q[:, -1], s, 3))


# ---------------------------------------------------------------- (a) chunk summaries, scores, top-k

@needs_triton
@pytest.mark.parametrize("kvh,d,chunk,n_chunks", [(1, 32, 8, 1), (2, 64, 8, 45), (2, 128, 16, 33), (3, 32, 4, 70)])
def test_chunk_summaries(kvh, d, chunk, n_chunks):
    keys = rand(kvh, n_chunks * chunk + 5, d)[:, :n_chunks * chunk]  # a strided view, like full.k[layer, :, a:b]
    store = torch.zeros(kvh, n_chunks + 3, d, device=DEV)
    chunk_summaries(keys, chunk, out=store[:, 2:2 + n_chunks])  # writes into a view of the summary store
    torch.testing.assert_close(store[:, 2:2 + n_chunks], chunk_summaries_reference(keys, chunk), **TOL)
    assert not store[:, :2].any() and not store[:, 2 + n_chunks:].any()


@needs_triton
@pytest.mark.parametrize("g,kvh,d,n_chunks", [(1, 2, 32, 1), (3, 2, 64, 100), (4, 2, 128, 65), (4, 1, 32, 7)])
def test_chunk_scores_and_selection(g, kvh, d, n_chunks):
    gen = torch.Generator().manual_seed(n_chunks)
    q, summ = rand(kvh * g, d, gen=gen), rand(kvh, n_chunks, d, gen=gen)
    torch.testing.assert_close(chunk_scores(q, summ), chunk_scores_reference(q, summ), **TOL)
    sunk = chunk_scores(q, summ, sink=True)
    assert torch.isinf(sunk[:, 0]).all()
    for n_sel in sorted({1, min(3, n_chunks), n_chunks}):
        got = select_chunks(q, summ, n_sel)
        assert got.shape == (kvh, n_sel) and (got[:, 0] == 0).all()
        assert torch.equal(got, select_chunks_reference(q, summ, n_sel))


def test_select_chunks_rejects_bad_counts():
    with pytest.raises(ValueError):
        select_chunks(rand(4, 32), rand(2, 5, 32), 6)


# ---------------------------------------------------------------- (b) sparse attention in place

SPARSE_CASES = [  # h, kvh, d, t, s_max, n_sel, chunk, tail_start, tail_len, num_splits
    (2, 2, 32, 1, 200, 1, 8, 96, 1, None),     # T=1, n_sel=1, tail = the new token only
    (4, 1, 32, 5, 200, 4, 8, 128, 5, 2),       # tail of length T only, G=4, two splits
    (6, 2, 64, 3, 300, 6, 8, 160, 37, 3),      # G=3, tail not a multiple of the block
    (4, 4, 128, 16, 260, 5, 16, 192, 20, 1),   # T=16, head_dim 128, one split (direct write)
    (4, 2, 32, 8, 400, 20, 8, 320, 13, 50),    # more splits asked than blocks (clamped)
]


@needs_triton
def test_sparse_attention_masked_splits():
    """Small blocks, many splits: the last splits hold only new tokens that early queries must not see."""
    q, k, v, idx = sparse_case(4, 2, 32, 16, 200, 3, 8, 96, seed=5)
    got = sparse_attention_triton(q, k, v, idx, 8, 96, 116, num_splits=3, block_n=16)
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, idx, 8, 96, 116), **TOL)


@needs_triton
@pytest.mark.parametrize("h,kvh,d,t,s_max,n_sel,chunk,tail_start,tail_len,splits", SPARSE_CASES)
def test_sparse_attention(h, kvh, d, t, s_max, n_sel, chunk, tail_start, tail_len, splits):
    q, k, v, idx = sparse_case(h, kvh, d, t, s_max, n_sel, chunk, tail_start)
    e = tail_start + tail_len
    got = sparse_attention_triton(q, k, v, idx, chunk, tail_start, e, num_splits=splits)
    torch.testing.assert_close(got, sparse_attention_reference(q, k, v, idx, chunk, tail_start, e), **TOL)


@needs_triton
def test_sparse_attention_strided_inputs():
    """q as the model hands it (a transposed view), k/v one layer of a [L, KVH, S, D] store, out into [T, H, D]."""
    gen = torch.Generator().manual_seed(3)
    h, kvh, d, t = 4, 2, 32, 3
    q = rand(t, h, d, gen=gen).transpose(0, 1)
    store_k, store_v = rand(2, kvh, 150, d, gen=gen), rand(2, kvh, 150, d, gen=gen)
    idx = torch.tensor([[0, 3, 7], [0, 1, 9]], device=DEV)
    out = torch.empty(t, h, d, device=DEV)
    sparse_attention_triton(q, store_k[1], store_v[1], idx, 8, 88, 101, num_splits=2, out=out.transpose(0, 1))
    torch.testing.assert_close(out.transpose(0, 1), sparse_attention_reference(q, store_k[1], store_v[1], idx, 8, 88, 101), **TOL)


def test_sparse_attention_rejects_bad_tail():
    q, k, v, idx = sparse_case(2, 2, 32, 1, 64, 1, 8, 32)
    with pytest.raises(ValueError):
        sparse_attention_triton(q, k, v, idx, 8, 40, 65)


# ---------------------------------------------------------------- (c) decode attention over contiguous KV

DECODE_CASES = [  # h, kvh, d, t, s, num_splits
    (2, 2, 32, 1, 1, None),      # a single key
    (3, 1, 32, 1, 150, 3),       # G=3, T=1, S not a multiple of the block
    (8, 2, 64, 4, 64, None),     # G=4, S == one block
    (4, 4, 128, 16, 16, 1),      # S == T: pure causal square
    (4, 2, 32, 32, 200, 2),      # T=32 with G=2 -> 64 query rows
    (8, 2, 32, 32, 100, 2),      # G=4 x T=32 = 128 rows -> two row blocks
]


@needs_triton
@pytest.mark.parametrize("h,kvh,d,t,s,splits", DECODE_CASES)
def test_decode_attention(h, kvh, d, t, s, splits):
    gen = torch.Generator().manual_seed(s)
    q, k, v = rand(h, t, d, gen=gen), rand(kvh, s + 7, d, gen=gen), rand(kvh, s + 7, d, gen=gen)
    k, v = k[:, :s], v[:, :s]  # a prefix view of a longer store
    got = decode_attention_triton(q, k, v, num_splits=splits)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v), **TOL)


def test_kernels_reject_odd_head_dim():
    if not _common.HAS_TRITON:
        pytest.skip("triton is not importable")
    with pytest.raises(ValueError):
        decode_attention_triton(rand(2, 1, 48), rand(2, 8, 48), rand(2, 8, 48))


# ---------------------------------------------------------------- batched split-K: one launch, per-row lengths

def batched_case(h, kvh, d, t, s, n_keys, sparse, dtype=torch.float32, seed=0, chunk=8, n_sel=3):
    """B rows of different lengths; k/v one layer of a [B, L, KVH, S, D] store, lengths as device int32 [B].

    Dense: row b's keys are [tail_start, tail_start + n_keys). Sparse: n_sel chunks below tail_start,
    then a tail of n_keys[b] - n_sel * chunk tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    b = len(n_keys)
    q = rand(b, t, h, d, dtype=dtype, gen=gen).transpose(1, 2)  # token-major, as the model hands it over
    store_k, store_v = rand(b, 2, kvh, s, d, dtype=dtype, gen=gen), rand(b, 2, kvh, s, d, dtype=dtype, gen=gen)
    tail = [n - n_sel * chunk if sparse else n for n in n_keys]
    ts = [(s - n) * (i + 1) // (b + 1) for i, n in enumerate(tail)]  # each row somewhere else in its store
    ts = [max(x, n_sel * chunk) if sparse else x for x in ts]
    idx = None
    if sparse:
        idx = torch.stack([torch.stack([torch.randperm(x // chunk, generator=gen)[:n_sel].sort().values
                                        for _ in range(kvh)]) for x in ts]).to(DEV)
    lens = [torch.tensor(x, dtype=torch.int32, device=DEV) for x in (n_keys, ts)]
    return q, store_k[:, 1], store_v[:, 1], idx, ts, tail, lens


def batched_want(q, k, v, idx, ts, tail, chunk=8):
    """Row by row through the 3-D references."""
    if idx is None:
        return torch.stack([decode_attention_reference(q[i], k[i, :, x:x + n], v[i, :, x:x + n])
                            for i, (x, n) in enumerate(zip(ts, tail))])
    return torch.stack([sparse_attention_reference(q[i], k[i], v[i], idx[i], chunk, x, x + n)
                        for i, (x, n) in enumerate(zip(ts, tail))])


BATCHED_CASES = [  # t, sparse, num_splits, n_keys per row (S = 320)
    (1, False, None, [1, 5, 97, 300]),  # a row of only its new token
    (3, False, 3, [3, 5, 97, 300]),
    (1, True, 2, [25, 29, 121, 300]),   # sparse: 3 chunks of 8, then tails of 1, 5, 97, 276
    (3, True, 4, [27, 29, 121, 300]),
]


@needs_triton
@pytest.mark.parametrize("t,sparse,splits,n_keys", BATCHED_CASES)
def test_split_k_batched_per_row_lengths(t, sparse, splits, n_keys):
    """GQA, rows of very different lengths from device int32 [B], splits planned for the longest row."""
    q, k, v, idx, ts, tail, (nk_t, ts_t) = batched_case(4, 2, 32, t, 320, n_keys, sparse, seed=t)
    out = torch.empty(len(n_keys), t, 4, 32, device=DEV).transpose(1, 2)  # token-major output
    got = split_k_attention(q, k, v, max(n_keys), 0, idx, 8, num_splits=splits, out=out, n_keys_t=nk_t, tail_start_t=ts_t)
    assert got is out
    torch.testing.assert_close(got, batched_want(q, k, v, idx, ts, tail), **TOL)


@needs_triton
def test_split_k_batched_host_lengths_and_3d_agree():
    """Host ints: every row shares n_keys / tail_start; each row equals the 3-D launch on it."""
    q, k, v, idx, _, _, _ = batched_case(4, 2, 32, 2, 200, [90] * 3, True, seed=7)
    got = split_k_attention(q, k, v, 90, 100, idx, 8, num_splits=2)
    for i in range(3):
        torch.testing.assert_close(got[i], split_k_attention(q[i], k[i], v[i], 90, 100, idx[i], 8, num_splits=2), **TOL)


@needs_triton
def test_split_k_batched_rejects_bad_shapes():
    q, k, v, idx, _, _, (nk_t, ts_t) = batched_case(4, 2, 32, 1, 64, [30, 40], True)
    run = functools.partial(split_k_attention, n_keys=40, tail_start=0, chunk=8)
    with pytest.raises(ValueError, match="batch size"):
        run(q, k[:1], v[:1], chunk_idx=idx)
    with pytest.raises(ValueError, match="chunk_idx"):
        run(q, k, v, chunk_idx=idx[0])
    with pytest.raises(ValueError, match="chunk_idx"):
        run(q, k, v, chunk_idx=idx[:1])
    with pytest.raises(ValueError, match="n_keys_t"):
        run(q, k, v, chunk_idx=idx, n_keys_t=nk_t[:1], tail_start_t=ts_t)
    with pytest.raises(ValueError, match="tail_start_t"):
        run(q, k, v, chunk_idx=idx, n_keys_t=nk_t, tail_start_t=ts_t[0])
    with pytest.raises(ValueError, match="out"):
        run(q, k, v, chunk_idx=idx, out=torch.empty_like(q[:1]))
    with pytest.raises(ValueError, match="expected q"):
        run(q, k[0], v[0], chunk_idx=idx)


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_split_k_batched(dtype, sparse):
    """7B-like GQA (32 / 8 heads of 128) over rows from a few keys to 16K, T=5."""
    n_keys = [5, 4100, 333, 16_000] if not sparse else [5 + 24, 4100, 333, 16_000]
    q, k, v, idx, ts, tail, (nk_t, ts_t) = batched_case(32, 8, 128, 5, 16_384, n_keys, sparse, dtype=dtype)
    got = split_k_attention(q, k, v, max(n_keys), 0, idx, 8, n_keys_t=nk_t, tail_start_t=ts_t)
    want = batched_want(q.float(), k.float(), v.float(), idx, ts, tail)
    torch.testing.assert_close(got.float(), want, **LOW.get(dtype, TOL))


# ---------------------------------------------------------------- GPU: bigger shapes, bf16/fp16

@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("h,kvh,d,t", [(32, 32, 128, 1), (32, 8, 128, 5), (28, 4, 128, 16), (16, 16, 64, 8)])
def test_gpu_sparse_and_decode(dtype, h, kvh, d, t):
    chunk, s_max, tail_start = 8, 20_000, 16_384
    q, k, v, idx = sparse_case(h, kvh, d, t, s_max, 512, chunk, tail_start, dtype=dtype)
    e = tail_start + 300
    tol = LOW.get(dtype, TOL)
    qf, kf, vf = q.float(), k.float(), v.float()  # fp32 reference of the same rounded inputs
    torch.testing.assert_close(sparse_attention(q, k, v, idx, chunk, tail_start, e).float(),
                               sparse_attention_reference(qf, kf, vf, idx, chunk, tail_start, e), **tol)
    torch.testing.assert_close(decode_attention(q, k[:, :e], v[:, :e]).float(),
                               decode_attention_reference(qf, kf[:, :e], vf[:, :e]), **tol)


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_chunk_selection(dtype):
    gen = torch.Generator().manual_seed(0)
    q, keys = rand(32, 128, dtype=dtype, gen=gen), rand(8, 64_000, 128, dtype=dtype, gen=gen)
    summ = chunk_summaries(keys, 8)
    torch.testing.assert_close(summ.float(), chunk_summaries_reference(keys, 8).float(), **LOW.get(dtype, TOL))
    summ = chunk_summaries_reference(keys, 8)
    torch.testing.assert_close(chunk_scores(q, summ), chunk_scores_reference(q, summ), atol=1e-3, rtol=1e-4)
    got, want = select_chunks(q, summ, 512), select_chunks_reference(q, summ, 512)
    overlap = torch.stack([torch.isin(got[h], want[h]) for h in range(8)]).float().mean()
    assert overlap > 0.99 and (got[:, 0] == 0).all()  # fp32 sum order may swap near-ties at the cut


# ---------------------------------------------------------------- GEMV (decode-step weight reads)

@needs_triton
@pytest.mark.parametrize("m,n,k", [(1, 40, 300), (5, 33, 520), (16, 64, 512), (3, 1, 17), (17, 40, 300), (32, 70, 2100)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(m, n, k, bias):
    """Edge shapes: rows 1 (FMA path), 3-16 and 17-32 (tl.dot in programs of 16 / 32 rows), N and K
    not multiples of the blocks, K past one slice (2100 > the 2048 of a short K); with a bias."""
    gen = torch.Generator().manual_seed(m * 1000 + n)
    x, w = rand(m, k, gen=gen), rand(n, k, gen=gen)
    b = rand(n, gen=gen) if bias else None
    torch.testing.assert_close(gemv_triton(x, w, b), gemv_reference(x, w, b),
                               **(dict(atol=TOL["atol"] * max(1.0, k / 256), rtol=TOL["rtol"]) if m == 1
                                  else dict(atol=2e-2 * max(1.0, k / 512), rtol=2e-2)))  # tl.dot: TF32 on a GPU
    with pytest.raises(ValueError, match="gemv_triton takes"):
        gemv_triton(rand(33, k, gen=gen), w)
    with pytest.raises(ValueError, match="bias"):
        gemv_triton(x, w, rand(n + 1, gen=gen))


@gpu
@needs_triton
@pytest.mark.parametrize("m", [1, 5, 16, 32])
@pytest.mark.parametrize("n,k", [(22016, 4096), (1152, 896), (896, 4864), (9728, 896)])
def test_gpu_gemv_bf16(m, n, k):
    """A 7B gate/up and a 0.5B's q/k/v, down (cuBLAS for several rows: dot_config) and gate/up, bf16."""
    gen = torch.Generator().manual_seed(m)
    x, w = rand(2, m, k, dtype=torch.bfloat16, gen=gen)[0], rand(n, k, dtype=torch.bfloat16, gen=gen)
    want = gemv_reference(x.float(), w.float())
    torch.testing.assert_close(gemv(x[None], w)[0].float(), want, atol=0.5, rtol=2e-2)  # bf16 output of K-term sums
    torch.testing.assert_close(gemv_triton(x, w).float(), want, atol=0.5, rtol=2e-2)  # also where gemv picks cuBLAS
    assert gemv(x.float(), w.float()).dtype == torch.float32  # float32 stays on cuBLAS


# ---------------------------------------------------------------- weight-quantized GEMV (draft tiers)

def test_quantize_int8_round_trip():
    """Round to nearest: every weight within half a step of its row's scale; zero rows stay zero."""
    w = torch.randn(9, 70, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (9,) and scale.dtype == w.dtype and q.abs().max() <= 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all() and (dequantize_int8(q, scale)[3] == 0).all()


@pytest.mark.parametrize("group,k", [(32, 32), (64, 100), (128, 257)])
def test_quantize_int4_round_trip(group, k):
    """Within half a step of the group's scale, each group's min and max exact, a constant group
    exact, two nibbles per byte, K padded (the padding in no group's range)."""
    w = torch.randn(5, k, generator=torch.Generator().manual_seed(k))
    w[1] = 0.25  # constant rows: every group flat
    w[2, -(k % group or group):] += 10.0  # the last group one-signed, far from 0, K not a whole group
    packed, scale, zero = quantize_int4(w, group)
    groups = -(-k // group)
    assert packed.dtype == torch.uint8 and packed.shape == (5, groups * group // 2)
    assert scale.shape == zero.shape == (5, groups)
    back = dequantize_int4(packed, scale, zero, k, group)
    step = scale.repeat_interleave(group, 1)[:, :k]
    assert ((back - w).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(back[1], w[1])
    for g in range(groups):  # a group's grid ends on its own extremes (over its real weights only)
        part = slice(g * group, min(k, (g + 1) * group))
        for pick in (torch.amin, torch.amax):
            torch.testing.assert_close(pick(back[:, part], 1), pick(w[:, part], 1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="group size must be one of"):
        quantize_int4(w, 48)


@pytest.mark.parametrize("group", [32, 64])
def test_quantize_int4_keeps_a_16_level_grid_exactly(group):
    """Weights that already are a grid of 16 levels per group (a GGUF Q4_1 block: min + d * q, q in
    0..15, both ends used) come back exactly: an int4 draft of a Q4 model is that model's weights.
    An integer zero point over a range widened to include 0 (the format before) fails this."""
    gen = torch.Generator().manual_seed(group)
    n, groups = 6, 3
    q = torch.randint(0, 16, (n, groups, group), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = torch.rand(n, groups, 1, generator=gen) * 0.1 + 0.01
    m = -torch.rand(n, groups, 1, generator=gen) * 15 * d  # the block's minimum, not a multiple of d
    w = (m + d * q).view(n, groups * group)
    packed, scale, zero = quantize_int4(w, group)
    torch.testing.assert_close(dequantize_int4(packed, scale, zero, groups * group, group), w, rtol=0, atol=1e-6)


QUANT_CASES = [  # rows 1 (FMA path) / 7, 16 (tl.dot path); N odd; K not a multiple of the group or block
    (1, 33, 300, 128, 1), (1, 5, 257, 32, 2), (7, 9, 300, 32, 3), (16, 17, 129, 64, 1), (3, 1, 17, 32, 1),
    (16, 40, 1000, 128, 2),
]


@needs_triton
@pytest.mark.parametrize("m,n,k,group,per_step", QUANT_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_gemv_matches_reference(m, n, k, group, per_step, bias):
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    x, w = rand(m, k, gen=gen), rand(n, k, gen=gen)
    b = rand(n, gen=gen) if bias else None
    packed, scale, zero = quantize_int4(w, group)
    want = int4_gemv_reference(x, packed, scale, zero, group, b)
    got = int4_gemv_triton(x, packed, scale, zero, group, b, groups_per_step=per_step)
    # float32 sums of K terms in another order: the rounding error grows with K
    tol = dict(atol=TOL["atol"] * max(1.0, k / 256), rtol=TOL["rtol"]) if m == 1 or not CUDA else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    with pytest.raises(ValueError, match="int4_gemv_triton takes"):
        int4_gemv_triton(rand(17, k, gen=gen), packed, scale, zero, group)
    with pytest.raises(ValueError, match="do not describe"):
        int4_gemv_triton(x, packed, scale, zero, group * 2 if group < 128 else 32)


@needs_triton
@pytest.mark.parametrize("m,n,k", [(1, 33, 300), (1, 8, 2100), (7, 9, 300), (16, 17, 129), (3, 1, 17)])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemv_matches_reference(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    x, w = rand(m, k, gen=gen), rand(n, k, gen=gen)
    b = rand(n, gen=gen) if bias else None
    q, scale = quantize_int8(w)
    want = int8_gemv_reference(x, q, scale, b)
    got = int8_gemv_triton(x, q, scale, b, block_k=256)  # several K steps and a partial last one
    torch.testing.assert_close(got, want, **(TOL if m == 1 or not CUDA else dict(atol=2e-2, rtol=2e-2)))
    torch.testing.assert_close(int8_gemv_triton(x, q, scale, b), want, **(TOL if m == 1 or not CUDA else dict(atol=2e-2, rtol=2e-2)))
    with pytest.raises(ValueError, match="int8_gemv_triton takes"):
        int8_gemv_triton(rand(17, k, gen=gen), q, scale)


def test_quant_dispatch_keeps_batch_shape_and_references_off_the_fast_path():
    """[B, T, K] inputs; float32 and > 16 rows take the reference (dequantize, then F.linear)."""
    gen = torch.Generator().manual_seed(5)
    x, w, b = rand(1, 20, 64, gen=gen), rand(24, 64, gen=gen), rand(24, gen=gen)
    q, scale = quantize_int8(w)
    torch.testing.assert_close(int8_gemv(x, q, scale, b), int8_gemv_reference(x, q, scale, b))
    packed, s4, z4 = quantize_int4(w, 32)
    assert int4_gemv(x, packed, s4, z4, 32, b).shape == (1, 20, 24)
    torch.testing.assert_close(int4_gemv(x, packed, s4, z4, 32, b), int4_gemv_reference(x, packed, s4, z4, 32, b))


@gpu
@needs_triton
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_quant_gemv_bf16(m, bits):
    """7B gate/up shape in bf16 through the dispatcher (the Triton path) vs the fp32 reference."""
    gen = torch.Generator().manual_seed(m + bits)
    x, w, b = rand(m, 4096, dtype=torch.bfloat16, gen=gen), rand(22016, 4096, dtype=torch.bfloat16, gen=gen), \
        rand(22016, dtype=torch.bfloat16, gen=gen)
    if bits == 8:
        q, scale = quantize_int8(w)
        got, want = int8_gemv(x[None], q, scale, b)[0], F.linear(x.float(), dequantize_int8(q, scale).float(), b.float())
    else:
        packed, scale, zero = quantize_int4(w, 128)
        got = int4_gemv(x[None], packed, scale, zero, 128, b)[0]
        want = F.linear(x.float(), dequantize_int4(packed, scale, zero, 4096, 128).float(), b.float())
    torch.testing.assert_close(got.float(), want, atol=0.5, rtol=2e-2)



@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU tinygemm in this torch")
@pytest.mark.parametrize("n,k,group", [(32, 256, 32), (48, 384, 128), (16, 64, 64)])
def test_tinygemm_scales_carry_our_scale_and_fractional_zero(n, k, group):
    """tinygemm dequantizes (q - 8) * scale + offset; our (q - zero) * scale maps onto it. Checked
    through PyTorch's CPU build of the same op (same [G, N, 2] table); passing (scale, zero) as
    they are, the mistake this guards against, is off by several times the output."""
    gen = torch.Generator().manual_seed(n + k)
    w, x = rand(n, k, gen=gen).bfloat16(), rand(3, k, gen=gen).bfloat16()
    packed, scale, zero = quantize_int4(w, group)
    codes = torch.stack((packed & 15, packed >> 4), -1).view(n, -1)[:, :k].to(torch.int32)
    try:
        weight = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    except NotImplementedError:  # declared but not built (seen in a CUDA build of torch)
        pytest.skip("this torch build has no CPU tinygemm kernel")
    want = int4_gemv_reference(x.float(), packed, scale.float(), zero.float(), group)
    got = torch._weight_int4pack_mm_for_cpu(x, weight, group, tinygemm_scales(scale, zero)).float()
    assert (got - want).norm() / want.norm() < 0.01
    naive = torch._weight_int4pack_mm_for_cpu(x, weight, group, torch.stack((scale, zero), -1).transpose(0, 1).contiguous())
    assert (naive.float() - want).norm() / want.norm() > 0.5


@gpu
@pytest.mark.parametrize("n,k,group", [(8, 32, 32), (40, 576, 32), (24, 4096, 128), (4096, 11008, 128), (1536, 8960, 32),
                                       (152, 896, 64)])
@pytest.mark.parametrize("m", [1, 7, 16, 40])
def test_gpu_int4_tinygemm_matches_reference(n, k, group, m):
    """The tinygemm path (our format packed into its layout) against dequantize-then-matmul, with
    bias, from one row to prefill-sized row counts; and QuantLinear picks it on the GPU."""
    from triforce.models.quant import QuantLinear

    gen = torch.Generator().manual_seed(n + k + m)
    w, x, b = (rand(*s, dtype=torch.bfloat16, gen=gen) for s in ((n, k), (m, k), (n,)))
    packed, scale, zero = quantize_int4(w, group)
    want = F.linear(x.float(), dequantize_int4(packed, scale, zero, k, group).float(), b.float())
    got = int4_tinygemm(x[None], *tinygemm_pack(packed, scale, zero, k, group), group, b)[0].float()
    assert got.shape == want.shape and (got - want).norm() / want.norm() < 0.01
    layer = QuantLinear(w, b, 4, group)
    assert layer.tinygemm and layer.zero is None and layer.nbytes == n * k // 2 + 4 * n * (k // group)
    assert (layer(x).float() - want).norm() / want.norm() < 0.01
    back = layer.dequantize().float()
    assert (back - dequantize_int4(packed, scale, zero, k, group).float()).abs().max() <= scale.float().abs().max() / 8

# ---------------------------------------------------------------- RoPE + KV-store write (graph-mode steps)

def rope_write_case(h, kvh, d, t, s, dtype=torch.float32, seed=0):
    """q/k/v as the model hands them over: strided [1, heads, T, D] views of one fused qkv row."""
    gen = torch.Generator().manual_seed(seed)
    qkv = rand(1, t, (h + 2 * kvh) * d, dtype=dtype, gen=gen)
    q, k, v = qkv.split((h * d, kvh * d, kvh * d), -1)
    q, k, v = (x.view(1, t, -1, d).transpose(1, 2) for x in (q, k, v))
    ang = rand(t, d // 2, gen=gen) * 3
    cos, sin = (torch.cat((f(ang), f(ang)), -1).to(dtype) for f in (torch.cos, torch.sin))
    store = rand(2, kvh, s, d, dtype=dtype, gen=gen)
    idx = torch.randperm(s, generator=gen)[:t].to(DEV)  # scattered rows, as a rolled-back step writes
    return q, k, v, cos, sin, store, idx


@needs_triton
@pytest.mark.parametrize("h,kvh,d,t,s", [(4, 4, 16, 1, 9), (4, 2, 32, 3, 20), (9, 3, 64, 5, 12), (2, 1, 128, 17, 40)])
def test_rope_write_matches_reference(h, kvh, d, t, s):
    """MHA and GQA, 1 to 17 tokens, head_dim 16-128; rows outside idx must stay untouched."""
    q, k, v, cos, sin, store, idx = rope_write_case(h, kvh, d, t, s, seed=h * t)
    want_store = store.clone()
    want_q = rope_write_reference(q, k, v, cos, sin, want_store[0], want_store[1], idx)
    got_q = rope_write(q, k, v, cos, sin, store[0], store[1], idx)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(store, want_store, **TOL)
    with pytest.raises(ValueError, match="do not match"):
        rope_write(q, k, v, cos, sin, store[0], store[1], idx[:-1] if t > 1 else idx.repeat(2))


def rope_write_batch_case(b, h, kvh, d, t, s, dtype=torch.float32, seed=0):
    """B sequences at their own positions; the stores one layer of [B, L, KVH, S, D]."""
    gen = torch.Generator().manual_seed(seed)
    qkv = rand(b, t, (h + 2 * kvh) * d, dtype=dtype, gen=gen)
    q, k, v = (x.view(b, t, -1, d).transpose(1, 2) for x in qkv.split((h * d, kvh * d, kvh * d), -1))
    ang = rand(b, t, d // 2, gen=gen) * 3
    cos, sin = (torch.cat((f(ang), f(ang)), -1).to(dtype) for f in (torch.cos, torch.sin))
    store = rand(2, b, 2, kvh, s, d, dtype=dtype, gen=gen)
    idx = torch.stack([torch.randperm(s, generator=gen)[:t] for _ in range(b)]).to(DEV)
    return q, k, v, cos, sin, store, idx


@needs_triton
@pytest.mark.parametrize("b,t", [(1, 1), (1, 4), (3, 1), (3, 4)])
def test_rope_write_batched(b, t):
    """GQA; each row rotated at its own positions and written to its own store rows; the batched
    reference equals the one-sequence reference row by row; rows outside idx stay untouched."""
    q, k, v, cos, sin, store, idx = rope_write_batch_case(b, 4, 2, 32, t, 12, seed=b * t)
    want_store = store.clone()
    want_q = torch.cat([rope_write_reference(q[i:i + 1], k[i:i + 1], v[i:i + 1], cos[i], sin[i],
                                             want_store[0, i, 1], want_store[1, i, 1], idx[i]) for i in range(b)])
    ref_store = store.clone()
    torch.testing.assert_close(rope_write_reference(q, k, v, cos, sin, ref_store[0, :, 1], ref_store[1, :, 1], idx), want_q)
    torch.testing.assert_close(ref_store, want_store)
    got_q = rope_write(q, k, v, cos, sin, store[0, :, 1], store[1, :, 1], idx)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(store, want_store, **TOL)
    with pytest.raises(ValueError, match="do not match"):
        rope_write(q, k, v, cos, sin, store[0, :, 1], store[1, :, 1], idx[:, :-1] if t > 1 else idx.repeat(1, 2))
    with pytest.raises(ValueError, match="do not match"):
        rope_write(q, k, v, torch.cat((cos, cos)), torch.cat((sin, sin)), store[0, :, 1], store[1, :, 1], idx)


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rope_write_low_precision(dtype):
    """7B shapes in bf16/fp16: the kernel rounds once, the reference (fp32 inputs) never."""
    q, k, v, cos, sin, store, idx = rope_write_case(32, 32, 128, 13, 4096, dtype=dtype, seed=3)
    ref = [x.float() for x in (q, k, v, cos, sin, store)]
    want_q = rope_write_reference(*ref[:5], ref[5][0], ref[5][1], idx)
    got_q = rope_write(q, k, v, cos, sin, store[0], store[1], idx)
    torch.testing.assert_close(got_q.float(), want_q, **LOW[dtype])
    torch.testing.assert_close(store.float(), ref[5], **LOW[dtype])


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_rope_write_batched_low_precision(dtype):
    q, k, v, cos, sin, store, idx = rope_write_batch_case(4, 32, 8, 128, 5, 4096, dtype=dtype, seed=4)
    ref = [x.float() for x in (q, k, v, cos, sin, store)]
    want_q = rope_write_reference(*ref[:5], ref[5][0, :, 1], ref[5][1, :, 1], idx)
    got_q = rope_write(q, k, v, cos, sin, store[0, :, 1], store[1, :, 1], idx)
    torch.testing.assert_close(got_q.float(), want_q, **LOW[dtype])
    torch.testing.assert_close(store.float(), ref[5], **LOW[dtype])


# ---------------------------------------------------------------- fused projections (norm / SwiGLU in the GEMV prologue)

NORM_GEMV_CASES = [  # rows, K, N, delta, bias, eps
    (1, 300, 40, True, True, 1e-6),      # one row (FMA path); K, N not multiples of the blocks
    (1, 64, 3, False, False, 1e-5),      # no residual add, no bias, N below one block
    (1, 112, 144, True, True, 1e-6),     # GQA q/k/v rows: 7 query heads + 2 x 1 KV head of 16
    (5, 520, 33, True, False, 1e-5),     # several rows (tl.dot path), K over one block
    (4, 112, 144, False, True, 1e-6),    # GQA q/k/v, first layer (no delta)
    (16, 96, 64, True, True, 1e-1),      # 16 rows; an eps large enough that ignoring it would show
    (3, 17, 1, True, True, 1e-6),
]


def norm_gemv_case(m, k, n, delta, bias, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = rand(1, m, k, dtype=dtype, gen=gen)
    d = rand(1, m, k, dtype=dtype, gen=gen) if delta else None
    g = (1 + 0.5 * rand(k, gen=gen)).to(dtype)
    w, b = rand(n, k, dtype=dtype, gen=gen), (rand(n, dtype=dtype, gen=gen) if bias else None)
    return x, d, g, w, b


@needs_triton
@pytest.mark.parametrize("m,k,n,delta,bias,eps", NORM_GEMV_CASES)
def test_add_norm_gemv_matches_reference(m, k, n, delta, bias, eps):
    x, d, g, w, b = norm_gemv_case(m, k, n, delta, bias, seed=m * 100 + k)
    want_res, want = add_norm_gemv_reference(x, d, g, eps, w, b)
    got_res, got = add_norm_gemv_triton(x, d, g, eps, w, b)
    assert got.shape == (1, m, n) and got_res.shape == x.shape
    assert torch.equal(got_res, want_res)  # the new residual is the plain (rounded) sum
    torch.testing.assert_close(got, want, **(TOL if m == 1 else dict(atol=1e-4, rtol=1e-4) if not CUDA else LOW[torch.bfloat16]))
    if eps >= 1e-2:  # the check above can tell eps apart
        assert not torch.allclose(add_norm_gemv_reference(x, d, g, 1e-6, w, b)[1], want, **TOL)


def test_add_norm_gemv_reference_is_the_models_unfused_math():
    from triforce.models.llama import add_rms_norm, rms_norm
    x, d, g, w, b = norm_gemv_case(3, 64, 40, True, True)
    res, h = add_rms_norm.__wrapped__(x, d, g, 1e-5)
    got_res, got = add_norm_gemv_reference(x, d, g, 1e-5, w, b)
    assert torch.equal(got_res, res) and torch.equal(got, torch.nn.functional.linear(h, w, b))
    assert torch.equal(add_norm_gemv_reference(x, None, g, 1e-5, w)[1],
                       torch.nn.functional.linear(rms_norm.__wrapped__(x, g, 1e-5), w))


@needs_triton
@pytest.mark.parametrize("m,k,n", [(1, 300, 40), (1, 17, 5), (5, 520, 33), (16, 96, 64), (2, 1000, 1)])
def test_swiglu_gemv_matches_reference(m, k, n):
    gen = torch.Generator().manual_seed(m * 7 + k)
    gate_up, w = rand(1, m, 2 * k, gen=gen), rand(n, k, gen=gen)
    got = swiglu_gemv_triton(gate_up, w)
    assert got.shape == (1, m, n)
    torch.testing.assert_close(got, swiglu_gemv_reference(gate_up, w), **(TOL if m == 1 or not CUDA else LOW[torch.bfloat16]))
    swapped = torch.cat(gate_up.chunk(2, -1)[::-1], -1)  # gate and up swapped: the test must see it
    assert not torch.allclose(swiglu_gemv_reference(swapped, w), got, **TOL)


ROPE_GEMV_CASES = [  # H, KVH, D, K, delta, bias, write row
    (4, 2, 16, 300, True, True, 5),    # GQA; K not a multiple of the block
    (2, 2, 32, 64, False, False, 0),   # MHA, first layer (no residual add), row 0
    (7, 1, 16, 112, True, True, 39),   # 7 query heads per KV head, the store's last row
    (1, 1, 2, 17, True, False, 3),     # head_dim 2: one rotated pair per head
]


@needs_triton
@pytest.mark.parametrize("h,kvh,d,k,delta,bias,row", ROPE_GEMV_CASES)
def test_add_norm_gemv_rope_matches_reference(h, kvh, d, k, delta, bias, row):
    """The q/k/v projection with RoPE and the KV write in its epilogue equals the projection followed
    by `rope_write`; only the token's row of the store changes."""
    x, dl, g, w, b = norm_gemv_case(1, k, (h + 2 * kvh) * d, delta, bias, seed=h * 10 + d)
    gen = torch.Generator().manual_seed(d)
    angle = rand(1, d // 2, gen=gen) * 3
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(DEV), torch.cat([angle.sin()] * 2, -1).to(DEV)
    before = (rand(kvh, 40, d, gen=gen), rand(kvh, 40, d, gen=gen))
    stores = [tuple(t.clone() for t in before) for _ in range(2)]
    idx = torch.tensor([row], device=DEV)
    want_res, want_q = add_norm_gemv_rope_reference(x, dl, g, 1e-6, w, b, h, cos, sin, *stores[0], idx)
    got_res, got_q = add_norm_gemv_rope_triton(x, dl, g, 1e-6, w, b, h, cos, sin, *stores[1], idx)
    assert got_q.shape == (1, h, 1, d) and torch.equal(got_res, want_res)
    torch.testing.assert_close(got_q, want_q, **TOL)
    for got, want, old in zip(stores[1], stores[0], before):
        torch.testing.assert_close(got, want, **TOL)
        assert not torch.equal(want[:, row], old[:, row])
        assert torch.equal(got[:, :row], old[:, :row]) and torch.equal(got[:, row + 1:], old[:, row + 1:])
    if d > 2:  # a swapped pairing (first and second half exchanged) would show
        assert not torch.allclose(got_q, torch.cat(want_q.chunk(2, -1)[::-1], -1), **TOL)


def test_fused_gemvs_reject_bad_shapes():
    if not _common.HAS_TRITON:
        pytest.skip("triton is not importable")
    x, d, g, w, b = norm_gemv_case(2, 32, 8, True, True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        add_norm_gemv_triton(rand(17, 32), None, g, 1e-5, w)
    with pytest.raises(ValueError, match="must match"):
        add_norm_gemv_triton(x, d, g, 1e-5, rand(8, 31))
    with pytest.raises(ValueError, match="bias"):
        add_norm_gemv_triton(x, d, g, 1e-5, w, b[:-1])
    with pytest.raises(ValueError, match="delta"):
        add_norm_gemv_triton(x, d[:, :1], g, 1e-5, w)
    with pytest.raises(ValueError, match="2 x 32"):
        swiglu_gemv_triton(rand(1, 2, 60), rand(8, 32))
    assert not fused_supported(x)  # float32 (and CPU) keep the unfused path
    x1, d1, g1, w1, b1 = norm_gemv_case(1, 32, 6 * 16, True, True)
    cos = sin = torch.ones(1, 16, device=DEV)
    store = rand(1, 8, 16), rand(1, 8, 16)
    one = torch.zeros(1, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="one token"):
        add_norm_gemv_rope_triton(x, d, g, 1e-5, w, b, 4, cos, sin, *store, one)
    with pytest.raises(ValueError, match="heads"):
        add_norm_gemv_rope_triton(x1, d1, g1, 1e-5, w1, b1, 3, cos, sin, *store, one)  # 3 + 2 x 1 heads, not 6


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_add_norm_gemv_rope_low_precision(dtype):
    """Qwen2.5-0.5B q/k/v with bias (14 + 2 x 2 heads of 64, K = 896), RoPE and the write, against float32."""
    h, kvh, d, k = 14, 2, 64, 896
    x, dl, g, w, b = norm_gemv_case(1, k, (h + 2 * kvh) * d, True, True, dtype=dtype, seed=3)
    angle = torch.rand(1, d // 2, device=DEV) * 3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    store = [torch.zeros(kvh, 50, d, device=DEV) for _ in range(2)]
    idx = torch.tensor([17], device=DEV)
    ref = [t.float() for t in (x, dl, g, w, b)]
    _, want = add_norm_gemv_rope_reference(*ref[:3], 1e-6, *ref[3:], h, cos, sin, *store, idx)
    low = [t.to(dtype) for t in store]
    _, got = add_norm_gemv_rope_triton(x, dl, g, 1e-6, w, b, h, cos.to(dtype), sin.to(dtype), *low, idx)
    torch.testing.assert_close(got.float(), want, atol=0.5, rtol=2e-2)
    for lo, hi in zip(low, store):
        torch.testing.assert_close(lo.float(), hi, atol=0.5, rtol=2e-2)


@gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gpu_fused_gemvs_low_precision(dtype, m):
    """Qwen2.5-1.5B shapes: q/k/v with bias (2048 x 1536), gate/up, down with SwiGLU (1536 x 8960)."""
    x, d, g, w, b = norm_gemv_case(m, 1536, 2048, True, True, dtype=dtype, seed=m)
    assert fused_supported(x) == (m == 1)  # the model takes them for decode steps only
    ref = [t.float() for t in (x, d, g, w, b)]
    want_res, want = add_norm_gemv_reference(*ref[:3], 1e-6, *ref[3:])
    got_res, got = add_norm_gemv_triton(x, d, g, 1e-6, w, b)
    torch.testing.assert_close(got_res.float(), want_res, **LOW[dtype])
    torch.testing.assert_close(got.float(), want, atol=0.5, rtol=2e-2)  # low-precision output of K=1536 sums
    gen = torch.Generator().manual_seed(m)
    gate_up, wd = rand(1, m, 2 * 8960, dtype=dtype, gen=gen), rand(1536, 8960, dtype=dtype, gen=gen) * 0.1
    torch.testing.assert_close(swiglu_gemv_triton(gate_up, wd).float(),
                               swiglu_gemv_reference(gate_up.float(), wd.float()), atol=0.5, rtol=2e-2)


# ------------------------------------------------------------------ counter-based row streams
@needs_triton
@pytest.mark.parametrize("b,n,start", [(1, 1, 0), (3, 1500, 0), (2, 1024, 2 ** 32 - 700), (5, 17, 2 ** 40 + 9)])
def test_row_uniform_kernel_is_bitwise_the_reference(b, n, start):
    keys = torch.tensor([seed_key(s) for s in range(b)], dtype=torch.int64, device=DEV)
    counters = start + torch.arange(b, dtype=torch.int64, device=DEV) * 1000
    out = torch.full((b, n + 3), -1.0, device=DEV)[:, :n]  # strided rows: the row stride is honoured
    got = row_uniform_triton(keys, counters, n, out)
    assert torch.equal(got, row_uniform_reference(keys, counters, n))
    assert float(got.min()) >= 0 and float(got.max()) < 1


def test_row_uniform_is_uniform_and_rows_are_independent():
    n = 1 << 18
    keys = torch.tensor([seed_key(s) for s in (0, 1, 2)], dtype=torch.int64)
    u = row_uniform_reference(keys, torch.zeros(3, dtype=torch.int64), n)
    # 64 bins: each count is binomial(n, 1/64); the chi-square of 63 dof has mean 63 and sd ~11.2
    counts = torch.stack([torch.histc(r, 64, 0, 1) for r in u])
    chi2 = ((counts - n / 64) ** 2 / (n / 64)).sum(1)
    assert bool((chi2 < 63 + 6 * 11.2).all()), chi2
    # neighbouring seeds and neighbouring draws are uncorrelated (sd of a correlation ~ n ** -0.5)
    c = torch.corrcoef(torch.cat((u, u.roll(1, 1))))
    assert float((c - torch.eye(6)).abs().max()) < 6 * n ** -0.5
    assert torch.equal(u[1:2], row_uniform_reference(keys[1:2], torch.zeros(1, dtype=torch.int64), n))


def test_row_streams_move_only_live_rows():
    from triforce.sampling import RowStreams

    s = RowStreams([4, 5], "cpu")
    first = s.uniform(10)
    s.uniform(7, live=[True, False])
    assert s.counters.tolist() == [17, 10]
    again = RowStreams([5], "cpu")
    again.uniform(10)
    assert torch.equal(s.uniform(3)[1], again.uniform(3)[0])  # row 1 alone draws the same numbers
    assert not torch.equal(first[0], first[1])
    with pytest.raises(ValueError, match="row_uniform"):
        row_uniform_triton(s.keys, s.counters, 3, torch.empty(2, 4))
