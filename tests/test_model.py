"""Logit parity with transformers' LlamaForCausalLM on the same weights.

Tolerance: float32 on CPU, max |diff| <= 1e-4 on random weights (HF and ours run the same ops
in a different order); SmolLM2 real weights agree to 1e-3 relative to the largest logit.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from triforce.cache import FullCache
from triforce.models.llama import GGUF_LINK, ModelArgs, build_model, embedded_gguf, load_hf_dir, read_gguf, read_gguf_header

ROPES = [None, {"rope_type": "linear", "factor": 4.0}, {"rope_type": "dynamic", "factor": 2.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}]


@pytest.mark.parametrize("rope", ROPES, ids=lambda r: (r or {}).get("rope_type", "default"))
@pytest.mark.parametrize("tied,bias", [(False, False), (True, True)])
def test_tiny_random_matches_transformers(tmp_path, rope, tied, bias):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, tie_word_embeddings=tied, attention_bias=bias,
                      rope_scaling=dict(rope) if rope else None)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours, _ = load_hf_dir(tmp_path, context_length=256)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        want = hf(ids).logits[0]
        cache = FullCache(ours, 64)
        got = torch.cat([ours(ids[:, :25], cache)[0], ours(ids[:, 25:], cache)[0]])  # cached continuation
    assert (want - got).abs().max() <= 1e-4


def test_smollm2_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    # the cached directory links the GGUF (no float32 copy): transformers loads it from there
    hf = LlamaForCausalLM.from_pretrained(str(smollm2_dir), gguf_file=GGUF_LINK, dtype=torch.float32).eval()
    ours, args = load_hf_dir(smollm2_dir)
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    with torch.no_grad():
        want = hf(ids).logits[0]
        got = ours(ids, FullCache(ours, 32))[0]
    assert (want - got).abs().max() <= 1e-3 * want.abs().max()
    assert tok.decode(got[-1].argmax()).strip() == "Berlin"


def test_gguf_qk_unpermuted_like_transformers():
    """Our GGUF reader must agree with transformers' own GGUF loader on every tensor."""
    import os

    path = embedded_gguf()
    _, sd = read_gguf(path)
    hf = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    ref = hf.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(sd[name], ref[name]), name


def test_layer_subset_shares_weights():
    args = ModelArgs(vocab_size=32, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=64)
    model = build_model(args, None, "cpu", torch.float32)
    draft = model.layer_subset([0, 3])
    assert draft.args.n_layers == 2 and draft.layers[1] is model.layers[3]
    assert draft.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    with pytest.raises(ValueError, match="increasing indices"):
        model.layer_subset([3, 0])


def test_gguf_reader_matches_gguf_package():
    """Our header reader and piecewise dequantization give gguf.GGUFReader's metadata and
    gguf.quants.dequantize's values, bit for bit, for every tensor (every quant type in the file)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = embedded_gguf()
    meta, tensors, _ = read_gguf_header(path)
    ref = GGUFReader(str(path))
    for key, field in ref.fields.items():
        if not key.startswith("GGUF."):
            want = field.contents()
            assert meta[key] == (list(want) if isinstance(want, list) else want), key
    _, weights = read_gguf(path)
    gguf_name = {v: k for k, v in weights.names.items()}
    kinds = set()
    for t in ref.tensors:
        if t.name.split(".")[-2] in ("attn_q", "attn_k"):  # llama: rows unpermuted (checked against transformers above)
            continue
        kinds.add(t.tensor_type.name)
        want = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(weights[gguf_name[t.name]], want), t.name
    assert len(kinds) >= 2, kinds
    assert set(tensors) == {t.name for t in ref.tensors}


def fused_test_model(seed: int, gen: torch.Generator):
    """(model, device): a small GQA model with q/k/v biases and random norm weights (the random init
    has 0 and 1), on the GPU if there is one; skips without Triton (CUDA or TRITON_INTERPRET=1)."""
    from triforce.kernels import _common

    if not _common.HAS_TRITON or not (torch.cuda.is_available() or _common.INTERPRET):
        pytest.skip("needs triton (CUDA or TRITON_INTERPRET=1)")
    args = ModelArgs(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                     max_position_embeddings=256, tie_word_embeddings=True, attention_bias=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args, None, dev, torch.float32, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen) if "norm" in name
                        else 0.1 * torch.randn(p.shape, generator=gen))
    return model, dev


@torch.inference_mode()
def test_graph_mode_decode_rotates_and_writes_in_the_projection(monkeypatch):
    """A graph-mode decode step with the fused projections runs q/k/v, RoPE and the KV write as one
    kernel per layer, for the full, streaming and retrieval caches; its logits and the cache's keys
    and values equal the unfused step's (projection, then the cache's rope_write)."""
    from triforce.cache import RetrievalCache, StreamingCache
    from triforce.graphs import GraphedModel
    from triforce.models import llama

    gen = torch.Generator().manual_seed(1)
    model, dev = fused_test_model(5, gen)
    ids = torch.randint(0, 97, (1, 44), generator=gen).to(dev)
    calls = []
    real = llama.fused_gemv.add_norm_gemv_rope_triton
    monkeypatch.setattr(llama.fused_gemv, "add_norm_gemv_rope_triton", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(llama, "fused_projections_supported", lambda x: x.shape[1] == 1)  # CPU fp32 here
    makers = {"full": lambda: FullCache(model, 64),
              "streaming": lambda: StreamingCache(model, 2, 16, slack=8, max_forward=40),
              "retrieval": lambda: RetrievalCache(FullCache(model, 64), model, 16, 4)}

    def run(kind: str, fused: bool):
        model.fused_projections = fused
        cache = makers[kind]()
        store = cache.full if kind == "retrieval" else cache
        model(ids[:, :32], store, last=0)  # eager prefill (the retrieval tier adopts the target's)
        if kind == "retrieval":
            cache.adopt_prefix(32)
            model(ids[:, 32:33], cache)  # the eager selection step
        graphed = GraphedModel(model, cache, {1}, capture=torch.cuda.is_available())
        logits = [graphed(ids[:, i:i + 1], 1) for i in range(33, 40)]
        return logits, store.k.clone(), store.v.clone()

    tol = dict(atol=1e-4, rtol=1e-4) if dev == "cpu" else dict(atol=2e-2, rtol=2e-2)
    for kind in makers:
        calls.clear()
        want = run(kind, False)
        assert not calls
        got = run(kind, True)
        # every layer of every graph-mode step runs the fused kernel: 7 eager steps on the CPU; under
        # CUDA graphs Python runs only at warm-up and capture, replays launch it without a call
        steps, layers = divmod(len(calls), model.args.n_layers)
        assert layers == 0 and (steps == 7 if dev == "cpu" else steps >= 1), (kind, len(calls))
        for g, w in zip(got[0] + list(got[1:]), want[0] + list(want[1:])):
            torch.testing.assert_close(g, w, **tol)
    model.fused_projections = True


@torch.inference_mode()
def test_fused_projections_match_unfused(monkeypatch):
    """The fused-projection path (add + RMSNorm and SwiGLU inside the GEMVs; Triton, on CPU interpreted,
    float32 either way) gives the unfused model's logits for decode and verify steps, prefill unfused."""
    from triforce.models import llama

    gen = torch.Generator().manual_seed(0)
    model, dev = fused_test_model(3, gen)
    tol = 1e-4 if dev == "cpu" else 2e-2  # on the GPU float32 tl.dot (several rows) rounds through TF32
    calls = []
    for fn in ("add_norm_gemv_triton", "swiglu_gemv_triton"):
        real = getattr(llama.fused_gemv, fn)
        monkeypatch.setattr(llama.fused_gemv, fn, lambda *a, real=real, fn=fn: calls.append(fn) or real(*a))
    ids = torch.randint(0, 97, (1, 40), generator=gen).to(dev)

    def run(fused: bool) -> list[torch.Tensor]:
        model.fused_projections = fused
        monkeypatch.setattr(llama, "fused_projections_supported", lambda x: x.shape[1] <= 16)  # CPU fp32 here
        cache = FullCache(model, 64)
        model(ids[:, :32], cache, last=0)  # prefill (32 rows): unfused either way
        return [model(ids[:, 32:33], cache), model(ids[:, 33:38], cache, last=5), model(ids[:, 38:40], cache, last=1)]

    want = run(False)
    assert not calls
    got = run(True)
    assert calls.count("swiglu_gemv_triton") == 3 * 2 and calls.count("add_norm_gemv_triton") == 3 * (2 * 2 + 1)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol)
    model.fused_projections = True
    monkeypatch.undo()
    assert not llama.fused_projections_supported(model.embed_tokens(ids[:, :1]))  # CPU fp32: never fused by default
