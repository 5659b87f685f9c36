"""Weight-quantized draft tiers (models/quant.py): the view, its bytes, the config and its refusals.

Losslessness with quantized tiers is tested in test_lossless.py (sampling) and test_greedy.py
(SmolLM2 ids); the kernels against their references in test_kernels.py.
"""
import pytest
import torch

import triforce
from triforce.cache import FullCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.models.llama import ModelArgs, build_model
from triforce.models.quant import QuantLinear, QuantTransformer, quant_weight_bytes, quantized_view
from triforce.planner import GiB, plan_memory

ARGS = ModelArgs(vocab_size=96, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, intermediate_size=160,
                 max_position_embeddings=256, attention_bias=True, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
    m = build_model(ARGS, None, "cpu", torch.float32, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # biases are zero at init: make them count
    return m.eval()


@pytest.mark.parametrize("weights,group,tol", [("int8", 128, 0.02), ("int4", 32, 0.25), ("int4", 64, 0.3)])
def test_view_shares_what_it_does_not_quantize_and_stays_close(model, weights, group, tol):
    view = quantized_view(model, weights, group, quantize_head=True)
    assert isinstance(view, QuantTransformer) and view.weights == weights
    assert view.embed_tokens is model.embed_tokens and view.norm is model.norm and view.rotary is model.rotary
    for vb, tb in zip(view.layers, model.layers):
        assert vb.input_layernorm is tb.input_layernorm and vb.post_attention_layernorm is tb.post_attention_layernorm
        assert vb.self_attn.wqkv.bias.data_ptr() == tb.self_attn.wqkv_bias.data_ptr()  # the q/k/v bias: shared memory
        assert vb.self_attn.wqkv.qweight.dtype == (torch.int8 if weights == "int8" else torch.uint8)
    # tied embeddings: the head is a quantized copy, the lookup keeps the exact table
    assert isinstance(view.lm_head, QuantLinear) and model.lm_head.weight is model.embed_tokens.weight
    assert quantized_view(model, "bf16") is model
    tokens = torch.randint(0, ARGS.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(tokens, FullCache(model, 32))
        got = view(tokens, FullCache(view, 32))
    err = float((got - want).abs().max() / want.abs().max())
    assert 1e-6 < err < tol, f"{weights}: relative logit error {err}"  # quantized (not a copy), yet close


def test_head_stays_shared_without_quant_head(model):
    view = quantized_view(model, "int4", 32, quantize_head=False)
    assert view.lm_head is model.lm_head
    assert view.quantized_bytes == quant_weight_bytes(ARGS, "int4", 32, quantize_head=False, dtype_bytes=4)
    # auto: int8 quantizes the head, int4 keeps it exact
    assert quantized_view(model, "int4", 32).lm_head is model.lm_head
    assert isinstance(quantized_view(model, "int8").lm_head, QuantLinear)
    with pytest.raises(ValueError, match="quant_head must be true, false or auto"):
        quantized_view(model, "int8", quantize_head="yes")


@pytest.mark.parametrize("weights,group", [("int8", 128), ("int4", 32), ("int4", 128)])
def test_planner_bytes_are_the_views_bytes(model, weights, group):
    view = quantized_view(model, weights, group)
    assert view.quantized_bytes == quant_weight_bytes(ARGS, weights, group, dtype_bytes=4)
    assert view.layer_subset([0, 2]).quantized_bytes < view.quantized_bytes  # a subset shares the copies


def test_7b_copy_sizes():
    a7 = ModelArgs()  # Llama-2-7B shape
    assert 3.2 < quant_weight_bytes(a7, "int4", quantize_head=True) / GiB < 3.4  # ~1/4 of 12.6 GiB, scales included
    assert 3.1 < quant_weight_bytes(a7, "int4") / GiB < quant_weight_bytes(a7, "int4", quantize_head=True) / GiB
    assert 6.1 < quant_weight_bytes(a7, "int8") / GiB < 6.3
    assert quant_weight_bytes(a7, "bf16") == 0


def test_bad_weight_formats_and_group_sizes(model):
    with pytest.raises(ValueError, match="choose one of bf16, int8, int4"):
        quantized_view(model, "int3")
    with pytest.raises(ValueError, match="group size must be one of"):
        quantized_view(model, "int4", 100)
    with pytest.raises(ValueError, match="already quantized"):
        quantized_view(quantized_view(model, "int8"), "int4")


def test_engine_refuses_a_quantized_target(model):
    view = quantized_view(model, "int4", 32)
    with pytest.raises(ValueError, match="only draft tiers may be quantized"):
        SpeculativeEngine([Tier("target", view, FullCache(view, 64))], 0.6, 0.9)


@pytest.mark.parametrize("overrides, match", [
    (["cache.weights=int3"], "cache.weights='int3' is not a weight format"),
    (["draft.weights=fp8"], "draft.weights='fp8' is not a weight format"),
    (["+weights=int4"], "the target cannot be quantized"),
    (["+model.weights=int8"], "the target cannot be quantized"),
    (["cache.weights=int4", "quant_group_size=100"], "group size must be one of"),
    (["quant_group_size=big"], "quant_group_size must be auto, 32, 64 or 128"),
    (["cache.weights=int8", "quant_head=maybe"], "quant_head must be true, false or auto"),
    (["+model=smollm2-135m", "model.draft_path=lookup", "draft.weights=int4"], "has no weights"),
])
def test_generator_rejects_bad_weight_settings_before_loading(overrides, match, monkeypatch):
    import triforce.generator as gen_mod

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the settings were checked")
    monkeypatch.setattr(gen_mod, "build_model", no_loading)
    monkeypatch.setattr(gen_mod, "load_hf_dir", no_loading)
    model = [] if any(o.startswith("+model=") for o in overrides) else ["+model=tiny-random"]
    with pytest.raises(ValueError, match=match):
        triforce.load(*model, *overrides)


def test_generator_tiers_run_views_and_planner_counts_them():
    """Self-draft with the middle tier's format shares its copies; another format quantizes its own."""
    common = ("+model=tiny-random", "pipeline=triforce", "quant_group_size=32", "gpu_memory_gb=1", "host_memory_gb=1")
    shared = triforce.load(*common, "cache.weights=int4", "draft.weights=int4")
    assert isinstance(shared.middle, QuantTransformer) and shared.draft.layers[0] is shared.middle.layers[0]
    assert shared.quantized_bytes() == shared.middle.quantized_bytes
    tiers = shared.tiers(200, 100)
    assert tiers[0].model is shared.model and tiers[1].model is shared.middle and tiers[2].model is shared.draft
    own = triforce.load(*common, "cache.weights=int8", "draft.weights=int4")
    assert own.draft.weights == "int4" and own.quantized_bytes() == own.middle.quantized_bytes + own.draft.quantized_bytes
    plan = own.plan_memory(200, 16)
    assert plan.gpu_parts["quantized drafts"] == own.quantized_bytes() > 0 and "quantized drafts" in plan.describe()
    plain = triforce.load("+model=tiny-random", "pipeline=triforce")
    assert plain.middle is plain.model and plain.quantized_bytes() == 0


def test_planner_trades_the_copy_against_resident_kv_layers():
    """Offloaded 7B at 120K on 24 GiB: an int4 middle-tier copy costs resident target KV layers
    (or the retrieval budget); a copy that cannot fit at all names the setting that drops it."""
    a7 = ModelArgs(max_position_embeddings=131072)
    kw = dict(args=a7, context=40000, budget=4096, gamma=12, draft_args=None, dtype_bytes=2, gpu_bytes=24 * GiB,
              host_bytes=200 * GiB, offload="auto", selection_copies=False, chunk_summaries=False)
    plain = plan_memory(**kw)
    quant = plan_memory(**kw, quantized_bytes=quant_weight_bytes(a7, "int4"))
    assert plain.offload and quant.offload and quant.resident_layers < plain.resident_layers
    assert plain.resident_layers - quant.resident_layers >= 1  # 3.3 GiB ~ 1.7 layers of 40K-token KV
    assert "quantized drafts 3.2" in quant.describe()  # int4 with the head kept exact (quant_head auto)
    with pytest.raises(ValueError, match="quantized draft weights"):
        plan_memory(**{**kw, "gpu_bytes": 15 * GiB}, quantized_bytes=quant_weight_bytes(a7, "int8"))


@pytest.mark.parametrize("middle,tiny", [("int8", "int4"), ("int4", "int4"), ("bf16", "int8")])
def test_tiny_random_greedy_equals_autoregressive(middle, tiny):
    ids = [i % 64 for i in range(1, 90)]
    ar = triforce.load("+model=tiny-random", "pipeline=autoregressive", "temperature=0")
    spec = triforce.load("+model=tiny-random", "pipeline=triforce", "temperature=0", f"cache.weights={middle}",
                         f"draft.weights={tiny}", "quant_group_size=32")
    got = spec.generate(ids, max_new_tokens=20)
    assert got.token_ids == ar.generate(ids, max_new_tokens=20).token_ids
    assert got.stats["middle_weights"] == middle and got.stats["tiny_weights"] == tiny


def test_int4_at_group_32_keeps_the_embedded_q4_1_model_exactly(smollm2_dir):
    """The embedded SmolLM2 is a Q4_1 GGUF: every 32-weight block is min + d * q. int4 at group 32
    keeps each group's own [min, max] grid, so in float32 its projections come back exactly: the
    int4 draft of a GGUF Q4 model is that model, in a quarter of the bytes."""
    from triforce.kernels.quant_gemv import dequantize_int4, quantize_int4
    from triforce.models.llama import load_hf_dir

    model, _ = load_hf_dir(smollm2_dir, "cpu", torch.float32)
    err = total = 0.0
    for name, w in model.layers.named_parameters():
        if w.dim() == 2:
            back = dequantize_int4(*quantize_int4(w.detach(), 32), w.shape[1], 32)
            err += (back - w).pow(2).sum().item()
            total += w.pow(2).sum().item()
    assert total > 0 and (err / total) ** 0.5 < 1e-6  # an integer zero point over a 0-widened range: 0.082


def test_quant_group_size_auto_is_32_for_a_gguf_model():
    """auto: 32 where the weights came from a GGUF (its Q4 blocks kept exactly), 128 elsewhere."""
    from triforce.generator import resolve_quant_group

    assert resolve_quant_group("auto", True) == 32 and resolve_quant_group("auto", False) == 128
    assert resolve_quant_group(64, True) == 64
    gen = triforce.load("+model=tiny-random", "cache.weights=int4", "device=cpu")  # random weights: no GGUF
    assert gen.cfg.quant_group_size == 128
