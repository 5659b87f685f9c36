"""Acceptance-rate study: `python -m triforce.study [--config-name study_qwen] [+model=NAME] [key=value ...]`.

Sweeps middle-tier policy x budget x gamma x prompt length x temperature in one process and appends
one JSON line per run to `study.out`. `study.method` says how a run measures acceptance:
- `engine`: runs the pipelines. Middle vs target from the 2-tier pipeline [target, policy], the
  target verifying `gamma` tokens; tiny vs middle from the 3-tier [target, policy, tiny]
  (StreamingLLM draft, `draft.*`). Acceptance is accepted / proposed drafts.
- `forced`: the target samples `max_new_tokens` tokens once per prompt and temperature; every tier
  then reads that same continuation in one forward, and a pair's acceptance is the mean over its
  positions of sum_x min(p(x), q(x)), the probability that exact speculative sampling accepts the
  drafter's token (Leviathan et al.'s alpha; greedy: whether the argmaxes agree). One forward per
  policy and budget instead of a whole speculative run: what makes a sweep over 32K prompts fit
  a few minutes. Pairs: middle vs target, tiny vs middle, and tiny vs target (the tiny draft
  drafting straight for the target, the classic 2-tier draft-model pipeline).
Prompts are the first `prompt_tokens` tokens of prose documents (`study.corpus=prose`) or
repository-level code completion tasks (`study.corpus=code`, `triforce.corpus.code_tasks`).
`study.weights` runs the middle tier on the target's own weights (bf16) or on int8/int4 views of
them (models/quant.py); `study.tiny_weights` does the same for the tiny tier of the 3-tier runs
(varied with the middle tier at the first `study.weights` entry, one factor at a time; engine
method only).
Weights load once (`Generator`). At ~32 new tokens per run the prompt's prefill would dominate, so
it runs once per prompt and every run on that prompt restores it (`SharedPrefill`).
`scripts/plot_acceptance.py` turns the JSON lines into a CSV, a figure and a markdown table.
"""
from __future__ import annotations

import itertools
import json
import logging
import sys
import time
import zlib
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from triforce.cache import FullCache, StreamingCache
from triforce.corpus import code_task_ids, code_tasks
from triforce.engine import SpeculativeEngine, Tier
from triforce.generator import Generator, default_model_config
from triforce.models.llama import Transformer
from triforce.models.quant import check_weights, quantized_view
from triforce.policies import POLICIES, make_policy
from triforce.sampling import check_sampling, process_logits, sample

log = logging.getLogger("triforce.study")
# the settings that identify a run (resume skips runs whose key already has a row)
KEY = ("model", "document", "prompt_tokens", "temperature", "policy", "budget", "chunk_size", "reselect",
       "gamma", "draft_gamma", "seed", "max_new_tokens", "tiny", "method", "corpus",
       "weights", "tiny_weights")
KEY_DEFAULTS = {"method": "engine", "corpus": "prose", "weights": "bf16", "tiny_weights": "bf16"}  # rows written before these keys existed
METHODS = ("engine", "forced")
CORPORA = ("prose", "code")


def run_specs(cfg: DictConfig) -> list[dict]:
    """Every run of the sweep, without duplicates, prompts outermost so runs sharing a prefill are adjacent."""
    s = cfg.study
    model = (cfg.get("model") or default_model_config()).name
    grid = [(p, int(b), int(cfg.gamma)) for p in s.policies for b in s.budgets]
    grid += [(p, int(s.gamma_budget), int(g)) for p in s.gamma_policies for g in s.gammas]
    docs = code_task_ids(int(s.code_documents), s.corpus_dir) if s.corpus == "code" else list(s.documents)
    middle, tiny = weight_axes(cfg)
    formats = dict.fromkeys([(w, tiny[0]) for w in middle] + [(middle[0], w) for w in tiny])  # one factor at a time
    return [dict(model=model, document=doc, prompt_tokens=int(n), temperature=float(t), policy=p, budget=b,
                 chunk_size=int(cfg.cache.chunk_size), reselect=cfg.cache.reselect, gamma=g,
                 draft_gamma=int(cfg.draft.gamma), seed=int(cfg.seed), max_new_tokens=int(s.max_new_tokens),
                 tiny=bool(s.tiny), method=s.method, corpus=s.corpus, weights=w, tiny_weights=tw)
            for doc in docs for n in s.prompt_tokens for t in s.temperatures
            for w, tw in formats for p, b, g in dict.fromkeys(grid)]


def weight_axes(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """study.weights and study.tiny_weights (the tiny one is ["bf16"] without 3-tier runs)."""
    s = cfg.study
    middle = [str(w) for w in s.get("weights") or ["bf16"]]
    tiny = [str(w) for w in s.get("tiny_weights") or ["bf16"]] if s.tiny else ["bf16"]
    return middle, tiny


def check_config(cfg: DictConfig) -> None:
    """Every check of the study's settings, before any weight is loaded."""
    s = cfg.study
    if s.method not in METHODS or s.corpus not in CORPORA:
        raise ValueError(f"study.method must be one of {METHODS} and study.corpus one of {CORPORA} "
                         f"(got {s.method!r}, {s.corpus!r})")
    for name in ("prompt_tokens", "temperatures", "policies", "budgets") + (("documents",) * (s.corpus == "prose")):
        if not s[name]:
            raise ValueError(f"study.{name} is empty: give at least one value")
    unknown = [p for p in [*s.policies, *s.gamma_policies] if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policy {', '.join(unknown)} in study.policies/gamma_policies; "
                         f"valid: {', '.join(POLICIES)}")
    chunk = cfg.cache.chunk_size
    small = [b for b in [*s.budgets, s.gamma_budget] if b < chunk]
    if chunk < 1 or small:
        raise ValueError(f"budgets {small} are below cache.chunk_size={chunk}: every budget must be >= chunk_size >= 1")
    if min([cfg.gamma, cfg.draft.gamma, *s.gammas]) < 1:
        raise ValueError(f"gamma, draft.gamma and study.gammas must be >= 1 "
                         f"(got {cfg.gamma}, {cfg.draft.gamma}, {list(s.gammas)})")
    for t in s.temperatures:
        check_sampling(t, cfg.top_p)
    if s.max_new_tokens < 1:
        raise ValueError(f"study.max_new_tokens must be >= 1, got {s.max_new_tokens}")
    m = cfg.get("model") or default_model_config()
    depth = max([cfg.gamma, *s.gammas]) + cfg.draft.gamma + 2
    for n in s.prompt_tokens:
        if n < 2 or n + s.max_new_tokens + depth > m.context_length:
            raise ValueError(f"prompt_tokens={n} must be >= 2 and, with max_new_tokens={s.max_new_tokens} and "
                             f"speculation depth {depth}, fit the context of {m.context_length} ({m.name})")
    middle, tiny = weight_axes(cfg)
    for w in middle:
        check_weights("study.weights", w)
    for w in tiny:
        check_weights("study.tiny_weights", w)
    if s.method == "forced" and set(middle + tiny) != {"bf16"}:
        raise ValueError("study.weights / study.tiny_weights other than [bf16] need study.method=engine "
                         "(the forced method scores the target's own weights only)")
    if "int4" in middle + tiny and int(cfg.get("quant_group_size", 128)) not in (32, 64, 128):
        raise ValueError(f"quant_group_size must be 32, 64 or 128 for int4 views, got {cfg.quant_group_size}")
    unknown = set(s.policy_kwargs) - set(POLICIES)
    if unknown:
        raise ValueError(f"study.policy_kwargs names unknown policies {sorted(unknown)}")
    corpus = Path(s.corpus_dir).expanduser()
    if s.corpus == "code":
        code_task_ids(int(s.code_documents), corpus)  # raises, naming the fetch script, without the corpus
        return
    missing = [d for d in s.documents if not (corpus / f"{d}.txt").is_file()]
    if missing and not m.random_weights:
        raise FileNotFoundError(f"documents {missing} are not in {corpus}: run `python scripts/fetch_corpus.py` "
                                f"(or set study.corpus_dir / study.documents)")


def prompt_ids(gen: Generator, corpus: Path, doc: str, n: int, seed: int) -> tuple[list[int], bool]:
    """The first n tokens of `doc`, and whether they are synthetic (random-weight model, no corpus)."""
    path = corpus / f"{doc}.txt"
    if not path.is_file():  # check_config allows this only for random-weight models
        g = torch.Generator().manual_seed(seed + zlib.crc32(doc.encode()))
        return torch.randint(gen.args.vocab_size, (n,), generator=g).tolist(), True
    text = path.read_text()
    ids = gen.encode(text[:8 * n], chat=False)  # ~4 characters per token: 8n characters is plenty
    if len(ids) < n:
        ids = gen.encode(text, chat=False)
    if len(ids) < n:
        raise ValueError(f"document {doc} has only {len(ids)} tokens, fewer than prompt_tokens={n}")
    return ids[:n], False


class SharedPrefill:
    """One prompt's prefill (all but its last token), computed once and restored before every run.

    Runs never write below the prompt's length: the target rolls back to it and drafts write only
    past the target's verified length. So restoring `full.length` restores the target's KV. The
    tiny draft's StreamingLLM cache compacts in place, so its buffers are snapshotted and copied back;
    each tiny model (`tiny_models`: weights format -> model, default the Generator's draft) has its
    own cache, prefilled with its own weights.
    """

    def __init__(self, gen: Generator, ids: list[int], capacity: int, slack: int,
                 tiny_models: dict[str, Transformer] | None = None):
        self.ids, self.n = torch.tensor(ids), len(ids) - 1
        chunk = gen.cfg.prefill_chunk
        self.full = FullCache(gen.model, capacity)
        self._absorb(gen.model, self.full, chunk)
        if tiny_models is None:
            tiny_models = {gen.tiny_weights: gen.draft} if gen.draft is not None else {}
        self.tiny, self.tiny_state, self.tiny_models = {}, {}, tiny_models
        d = gen.cfg.draft
        for weights, model in tiny_models.items():
            cache = StreamingCache(model, d.sinks, d.window, slack=slack, max_forward=max(chunk, d.gamma + 1),
                                   position_shift=d.position_shift)
            self._absorb(model, cache, chunk)
            self.tiny[weights], self.tiny_state[weights] = cache, (cache.k.clone(), cache.v.clone(), cache.start)

    @torch.inference_mode()
    def _absorb(self, model, cache, chunk: int) -> None:
        for start in range(0, self.n, chunk):
            model(self.ids[None, start:min(self.n, start + chunk)].to(model.device), cache, last=0)

    def restore(self) -> None:
        self.full.length = self.n
        for weights, cache in self.tiny.items():
            k, v, start = self.tiny_state[weights]
            cache.k.copy_(k)
            cache.v.copy_(v)
            cache.start, cache.length = start, self.n


class SharedPrefillEngine(SpeculativeEngine):
    """A SpeculativeEngine whose prefill restores a `SharedPrefill` instead of recomputing it."""

    def __init__(self, tiers: list[Tier], shared: SharedPrefill, **kwargs):
        super().__init__(tiers, **kwargs)
        self.shared = shared

    def _prefill(self, progress: bool = False) -> None:
        t0 = time.perf_counter()
        if self.seq_len - 1 != self.shared.n:
            raise ValueError(f"prompt of {self.seq_len} tokens, but the shared prefill holds {self.shared.n + 1}")
        self.shared.restore()
        for tier in self.tiers[1:]:
            if all(tier.cache is not c for c in self.shared.tiny.values()) and not tier.cache.adopt_prefix(self.shared.n):
                raise ValueError(f"tier {tier.name!r} does not read the target's KV: it cannot share the prefill")
        self.prefill_seconds = time.perf_counter() - t0


def run_pipeline(gen: Generator, shared: SharedPrefill, spec: dict, n_tiers: int,
                 views: dict[str, Transformer] | None = None) -> tuple[dict, int, float]:
    """One generation on [target, policy] (+ tiny): per-tier stats, tokens generated, decode tokens/s.

    `views` maps spec["weights"] to the middle tier's model (default: the Generator's middle tier).
    """
    kwargs = dict(gen.cfg.study.policy_kwargs.get(spec["policy"]) or {})
    mid = make_policy(spec["policy"], shared.full, gen.model, spec["budget"], spec["chunk_size"], spec["reselect"],
                      **kwargs)
    middle = (views or {}).get(spec.get("weights", "bf16"), gen.middle)
    tiers = [Tier("target", gen.model, shared.full, gamma=spec["gamma"]),
             Tier("middle", middle, mid, gamma=spec["draft_gamma"])]
    if n_tiers == 3:
        tiny_weights = spec.get("tiny_weights", gen.tiny_weights)
        tiers.append(Tier("tiny", shared.tiny_models[tiny_weights], shared.tiny[tiny_weights]))
    engine = SharedPrefillEngine(tiers, shared, temperature=spec["temperature"], top_p=gen.cfg.top_p,
                                 prefill_chunk=gen.cfg.prefill_chunk, gpu_timing=True)
    t0 = time.perf_counter()
    # no stop ids: every run measures max_new_tokens tokens, so runs compare like for like
    out = engine.generate(shared.ids, spec["max_new_tokens"], None, spec["seed"])
    decode = time.perf_counter() - t0 - engine.prefill_seconds
    return engine.stats(len(out)), len(out), len(out) / decode


def measure(gen: Generator, shared: SharedPrefill, spec: dict, device: str,
            views: dict[str, Transformer] | None = None) -> dict:
    """The row of one run: middle-vs-target from the 2-tier pipeline, tiny-vs-middle from the 3-tier one."""
    s2, n, tps = run_pipeline(gen, shared, spec, 2, views)
    row = {**spec, "top_p": gen.cfg.top_p, "generated_tokens": n,
           "accept_rate": s2["target"]["acceptance_rate"], "mean_accepted_length": s2["target"]["mean_accepted_length"],
           "tokens_per_second": tps, "tiny_accept_rate": None, "tiny_mean_accepted_length": None,
           "accept_rate_3tier": None, "tokens_per_second_3tier": None}
    if spec["tiny"]:
        s3, _, tps3 = run_pipeline(gen, shared, spec, 3, views)
        row.update(tiny_accept_rate=s3["middle"]["acceptance_rate"],
                   tiny_mean_accepted_length=s3["middle"]["mean_accepted_length"],
                   accept_rate_3tier=s3["target"]["acceptance_rate"], tokens_per_second_3tier=tps3)
    row.update(device=device, dtype=str(gen.dtype).removeprefix("torch."),
               time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row


def expected_length(alpha: float, gamma: int) -> float:
    """Tokens per verification round when each of `gamma` drafts is accepted independently with
    probability alpha: (1 - alpha^(gamma+1)) / (1 - alpha)."""
    return gamma + 1.0 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


@torch.inference_mode()
def target_continuation(gen: Generator, shared: SharedPrefill, n_new: int, temperature: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's own `n_new` tokens after the prompt: (tokens fed [n_new], distributions [n_new, V]).

    Row i is the target's processed distribution of token i + 1 given the prompt and the tokens
    fed up to i (the first fed token is the prompt's last). Leaves the shared prefill restored.
    """
    shared.restore()
    g = torch.Generator(device=gen.device).manual_seed(seed)
    tok = shared.ids[-1:].to(gen.device)
    fed, dists = [], []
    for _ in range(n_new):
        fed.append(tok)
        p = process_logits(gen.model(tok[None], shared.full, last=1)[0], temperature, gen.cfg.top_p)
        dists.append(p)
        tok = sample(p, g)
    shared.restore()
    return torch.cat(fed), torch.cat(dists)


@torch.inference_mode()
def forced_distributions(model, cache, fed: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """A tier's processed distributions along `fed`: its first token alone (the step at which a
    selection policy chooses, as when decoding), then the rest in one forward."""
    first = model(fed[None, :1], cache, last=1)[0]
    rest = model(fed[None, 1:], cache, last=fed.numel() - 1)[0] if fed.numel() > 1 else first[:0]
    return process_logits(torch.cat([first, rest]), temperature, top_p)


def alpha(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over positions of sum_x min(p, q): the chance exact speculative sampling accepts q's draft."""
    return float(torch.minimum(p, q).sum(-1).mean())


def measure_forced(gen: Generator, shared: SharedPrefill, spec: dict, device: str, along: dict) -> dict:
    """The row of one forced run: the middle tier (and the tiny one) read the target's continuation.

    `along` caches, per temperature, the target's continuation and the tiny draft's distributions
    along it (they do not depend on the policy or budget), so each run costs one middle forward.
    """
    t, m = spec["temperature"], spec["max_new_tokens"]
    if t not in along:
        fed, p = target_continuation(gen, shared, m, t, spec["seed"])
        q_tiny = None
        if spec["tiny"]:
            shared.restore()
            w = spec["tiny_weights"]  # bf16: the forced method scores the tiny tier's own weights
            q_tiny = forced_distributions(shared.tiny_models[w], shared.tiny[w], fed, t, gen.cfg.top_p)
        along[t] = fed, p, q_tiny
    fed, p, q_tiny = along[t]
    shared.restore()
    kwargs = dict(gen.cfg.study.policy_kwargs.get(spec["policy"]) or {})
    mid = make_policy(spec["policy"], shared.full, gen.model, spec["budget"], spec["chunk_size"], spec["reselect"],
                      **kwargs)
    mid.adopt_prefix(shared.n)
    t0 = time.perf_counter()
    if mid.length < shared.n:  # a policy that leaves the prompt's last tokens to be re-read (own's observation window)
        gen.model(shared.ids[None, mid.length:shared.n].to(gen.device), mid, last=0)
    p_mid = forced_distributions(gen.model, mid, fed, t, gen.cfg.top_p)
    a_mid = alpha(p, p_mid)
    row = {**spec, "top_p": gen.cfg.top_p, "generated_tokens": m, "accept_rate": a_mid,
           "mean_accepted_length": expected_length(a_mid, spec["gamma"]),
           "tokens_per_second": m / (time.perf_counter() - t0), "tiny_accept_rate": None,
           "tiny_mean_accepted_length": None, "accept_rate_3tier": None, "tokens_per_second_3tier": None,
           "tiny_target_accept_rate": None, "tiny_target_mean_accepted_length": None}
    if q_tiny is not None:
        a_tm, a_tt = alpha(p_mid, q_tiny), alpha(p, q_tiny)
        row.update(tiny_accept_rate=a_tm, tiny_mean_accepted_length=expected_length(a_tm, spec["draft_gamma"]),
                   tiny_target_accept_rate=a_tt, tiny_target_mean_accepted_length=expected_length(a_tt, spec["gamma"]))
    shared.restore()
    row.update(device=device, dtype=str(gen.dtype).removeprefix("torch."), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return row


def done_keys(path: Path) -> set[tuple]:
    """Keys of the runs already in the JSON lines at `path` (for resume)."""
    if not path.is_file():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            keys.add(tuple(row.get(k, KEY_DEFAULTS.get(k)) for k in KEY))
    return keys


def run_study(cfg: DictConfig) -> list[dict]:
    """Run every pending run of the sweep, appending each row to `study.out` as it completes."""
    check_config(cfg)
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.pipeline = "triforce" if cfg.study.tiny else "retrieval"
    specs = run_specs(cfg)
    out = Path(cfg.study.out).expanduser()
    done = done_keys(out) if cfg.study.resume else set()
    todo = [s for s in specs if tuple(s[k] for k in KEY) not in done and s["budget"] < s["prompt_tokens"]]
    n_done = sum(tuple(s[k] for k in KEY) in done for s in specs)
    gen = Generator(cfg)
    # quantized views of the target (middle tier) and of the tiny draft, built once for every run
    group, head = int(cfg.get("quant_group_size", 128)), cfg.get("quant_head", "auto")
    middle_formats, tiny_formats = weight_axes(cfg)
    views = {w: quantized_view(gen.model, w, group, head) for w in middle_formats}
    tiny_models = ({w: gen.draft if w == gen.tiny_weights else quantized_view(gen.draft, w, group, head)
                    for w in tiny_formats} if isinstance(gen.draft, Transformer) else None)
    device = str(gen.device) + (f" ({torch.cuda.get_device_name(gen.device)})" if gen.device.type == "cuda" else "")
    max_gamma = max([cfg.gamma, *cfg.study.gammas])
    corpus = Path(cfg.study.corpus_dir).expanduser()
    code = {}
    if cfg.study.corpus == "code":
        tasks = code_tasks(gen.tokenizer, list(cfg.study.prompt_tokens), int(cfg.study.code_documents), corpus)
        code = {(t.id, t.length): t.prompt_ids for t in tasks}
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="study", unit="run")
    for (doc, n), group in itertools.groupby(todo, key=lambda s: (s["document"], s["prompt_tokens"])):
        ids, synthetic = (code[doc, n], False) if code else prompt_ids(gen, corpus, doc, n, cfg.seed)
        shared = SharedPrefill(gen, ids, n + cfg.study.max_new_tokens + max_gamma + cfg.draft.gamma + 2,
                               slack=max_gamma + cfg.draft.gamma + 8, tiny_models=tiny_models)
        along: dict = {}
        for spec in group:
            row = (measure_forced(gen, shared, spec, device, along) if spec["method"] == "forced"
                   else measure(gen, shared, spec, device, views))
            row["synthetic_prompt"] = synthetic
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            bar.set_postfix_str(f"{doc[:12]} {n} {spec['policy']} {spec['weights']} B={spec['budget']} g={spec['gamma']} "
                                f"acc={row['accept_rate'] or 0:.2f}")
            bar.update()
        del shared
    bar.close()
    print(summary_line(rows, len(specs), n_done, time.perf_counter() - t0, out, cfg), file=sys.stderr)
    return rows


def summary_line(rows: list[dict], n_specs: int, n_done: int, seconds: float, out: Path, cfg: DictConfig) -> str:
    """Runs done, skipped, time, and the mean acceptance per policy at the main gamma and first temperature."""
    skipped = n_specs - n_done - len(rows)
    t = float(cfg.study.temperatures[0])
    acc: dict[str, list[float]] = {}
    for r in rows:
        if r["gamma"] == cfg.gamma and r["temperature"] == t and r["accept_rate"] is not None:
            name = r["policy"] if r.get("weights", "bf16") == "bf16" else f"{r['policy']}/{r['weights']}"
            acc.setdefault(name, []).append(r["accept_rate"])
    means = ", ".join(f"{p} {sum(v) / len(v):.3f}" for p, v in acc.items())
    return (f"study: {len(rows)} runs in {seconds / 60:.1f} min -> {out} ({n_done} already there, {skipped} skipped: "
            f"budget >= prompt); mean acceptance at gamma={cfg.gamma}, T={t}: {means or 'n/a'}")


@hydra.main(config_path="pkg://triforce.conf", config_name="study", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_study(cfg)


if __name__ == "__main__":
    main()
