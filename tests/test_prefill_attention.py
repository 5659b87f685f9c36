"""Prefill attention (a chunk over the cached prefix and itself): every backend equals the reference."""
import math
import sys
import types

import pytest
import torch

import triforce.kernels.prefill_attention as pa
from triforce.cache import FullCache
from triforce.models.llama import ModelArgs, build_model


def qkv(h, kvh, t, s, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, h, t, 32, generator=g, device=device).to(dtype)
    k = torch.randn(kvh, s, 32, generator=g, device=device).to(dtype)
    v = torch.randn(kvh, s, 32, generator=g, device=device).to(dtype)
    return q, k, v


def math_lse(q, k, v, causal):
    """What cuDNN's attention_lse returns, in plain float32 math (top-left causal)."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    lse = s.logsumexp(-1)
    return (s - lse[..., None]).exp() @ v.float(), lse


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A stand-in flash-attn module (the package cannot be installed here): records its calls and
    answers as flash_attn_func does, [B, T, H, D] layout, bottom-right causal."""
    calls = []

    def flash_attn_func(q, k, v, causal=False):
        calls.append((tuple(q.shape), tuple(k.shape), causal))
        ref = pa.prefill_attention_reference(q.transpose(1, 2), k[0].transpose(0, 1), v[0].transpose(0, 1))
        return ref.transpose(1, 2)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    pa.flash_attn_func.cache_clear()
    yield calls
    pa.flash_attn_func.cache_clear()


@pytest.mark.parametrize("t,s", [(80, 80), (80, 300)])
def test_flash_attn_backend_is_used_when_installed(fake_flash_attn, t, s):
    q, k, v = qkv(4, 2, t, s, torch.bfloat16)
    out = pa.prefill_attention(q, k, v)
    assert fake_flash_attn == [((1, t, 4, 32), (1, s, 2, 32), True)]
    assert torch.equal(out, pa.prefill_attention_reference(q, k, v))


def test_prefill_chunks_reach_flash_attn(fake_flash_attn):
    """A bf16 prefill through FullCache sends every layer of every chunk to flash-attn."""
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128)
    model = build_model(args, None, "cpu", torch.bfloat16)
    cache = FullCache(model, 256)
    ids = torch.randint(0, 64, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :64], cache, last=0)
        model(ids[:, 64:], cache, last=0)
    assert [c[:2] for c in fake_flash_attn] == [((1, 64, 4, 16), (1, 64, 2, 16))] * 2 + [((1, 64, 4, 16), (1, 128, 2, 16))] * 2


def test_without_flash_attn_the_reference_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    pa.flash_attn_func.cache_clear()
    try:
        assert pa.flash_attn_func() is None
        q, k, v = qkv(4, 2, 80, 300, torch.bfloat16)
        assert torch.equal(pa.prefill_attention(q, k, v), pa.prefill_attention_reference(q, k, v))
    finally:
        pa.flash_attn_func.cache_clear()


@pytest.mark.parametrize("t,s", [(64, 64), (64, 65), (100, 1000)])
def test_cudnn_split_merges_to_the_reference(monkeypatch, t, s):
    """The prefix (no mask) + the chunk itself (square causal), merged by log-sum-exp, is the
    bottom-right causal attention; checked with cuDNN's call replaced by float32 math."""
    monkeypatch.setattr(pa, "attention_lse", math_lse)
    q, k, v = qkv(4, 4, t, s)
    assert torch.allclose(pa.cudnn_chunk_attention(q, k, v), pa.prefill_attention_reference(q, k, v), atol=1e-5)
    monkeypatch.setattr(pa, "attention_lse", lambda q, k, v, causal: math_lse(q, k, v, False))  # broken: no mask
    assert not torch.allclose(pa.cudnn_chunk_attention(q, k, v), pa.prefill_attention_reference(q, k, v), atol=1e-3)


def test_offloaded_prefill_pieces_merge_to_the_resident_result(monkeypatch):
    """An offloaded layer's prefill chunk, one fused call per streamed piece + the chunk itself
    (cuDNN's calls replaced by float32 math), gives the logits of a resident FullCache prefill."""
    import triforce.offload as off

    monkeypatch.setattr(off, "attention_lse", math_lse)
    monkeypatch.setattr(off, "can_use_cudnn", lambda q, k: True)
    args = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128)
    model = build_model(args, None, "cpu", torch.float32)
    ids = torch.randint(0, 64, (1, 200), generator=torch.Generator().manual_seed(0))
    logits = []
    for cache in (FullCache(model, 256), off.OffloadedFullCache(model, 256, resident_layers=1, transfer_chunk=48)):
        with torch.inference_mode():
            logits.append(torch.cat([model(ids[:, a:a + 64], cache) for a in range(0, 192, 64)], 1))
    assert torch.allclose(logits[0], logits[1], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN / flash kernels need a CUDA GPU")
@pytest.mark.parametrize("h,kvh", [(8, 8), (8, 2)])
@pytest.mark.parametrize("t,s", [(64, 64), (128, 1152), (300, 4396)])
def test_prefill_attention_on_gpu(h, kvh, t, s):
    q, k, v = qkv(h, kvh, t, s, device="cuda")
    want = pa.prefill_attention_reference(q.double(), k.double(), v.double()).float()
    got = pa.prefill_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    assert pa.can_use_cudnn(q.bfloat16(), k.bfloat16()) == (h == kvh)
    assert (got - want).abs().max() < 3e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuDNN kernels need a CUDA GPU")
def test_offloaded_prefill_on_gpu():
    """bf16 prefill chunks over an offloaded layer (cuDNN per streamed piece, pinned host memory)
    give the logits of the resident prefill."""
    from triforce.offload import OffloadedFullCache

    args = ModelArgs(vocab_size=64, dim=256, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=512)
    model = build_model(args, None, "cuda", torch.bfloat16)
    ids = torch.randint(0, 64, (1, 192), generator=torch.Generator().manual_seed(0)).cuda()
    logits = []
    for cache in (FullCache(model, 256), OffloadedFullCache(model, 256, resident_layers=1, transfer_chunk=48)):
        with torch.inference_mode():
            logits.append(torch.cat([model(ids[:, a:a + 64], cache) for a in range(0, 192, 64)], 1))
    assert (logits[0] - logits[1]).abs().max() < 0.05 * logits[0].abs().max()
