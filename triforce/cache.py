"""KV caches behind one small interface: the cache decides what each layer attends to.

A forward pass of `Transformer` calls `begin(T)`, then `attend(layer, q, k, v)` for every layer
with un-rotated q/k (the cache applies RoPE, so it owns positions), then `advance(T)`.
`length` is how many tokens of the sequence the cache has absorbed; speculative decoding rolls
back with `truncate(length)`. Middle-tier policies from the literature subclass `SelectionCache`.

CUDA graphs (triforce/graphs.py): a graph cannot see Python ints, so a cache that supports
capture (`graph_ready`) keeps its lengths in device scalars too. `prepare(T)` (host side, outside
the graph) refreshes them; with `graph_mode` set, `begin`/`attend` use only device-side state and
static shapes, and `advance` leaves the host bookkeeping to the runner.
"""
from __future__ import annotations

import torch

from triforce.kernels.prefill_attention import prefill_attention, prefill_attention_reference
from triforce.kernels.rope_write import rope_write
from triforce.models.llama import Transformer, apply_rope, rope_qk


PREFILL_MIN_TOKENS = 64  # a forward of this many tokens or more is a prefill chunk (decode/verify steps: 1-32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [1, H, T, D] over k/v [KVH, S, D]; the T queries are the last T of the S keys.

    The mask is bottom-right causal: query i sees keys 0 .. S-T+i. Prefill chunks go to the
    fastest kernel that applies (`kernels/prefill_attention.py`: flash-attn, cuDNN, SDPA);
    a few queries (eager decode/verify) to SDPA with `causal_lower_right` on GPU.
    """
    if q.shape[2] >= PREFILL_MIN_TOKENS:
        return prefill_attention(q, k, v)
    return prefill_attention_reference(q, k, v)


def device_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_keys: torch.Tensor, max_keys: int,
                     tail_start: torch.Tensor, chunk_idx: torch.Tensor | None = None) -> torch.Tensor:
    """`attention` with the key count in device scalars: capturable in a CUDA graph.

    Keys are the positions `chunk_idx` [KVH, n] of the store followed by the tail [tail_start, ...),
    n_keys (at most max_keys, the bound the split-K work is planned for) in all; dense when
    chunk_idx is None. Split-K Triton kernel (kernels/_split_k.py).
    """
    from triforce.kernels._split_k import split_k_attention

    # written token-major, [T, H, D]: the o projection then reads it as [T, H * D] without a copy
    _, h, t, d = q.shape
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device).transpose(0, 1)
    return split_k_attention(q[0], k, v, max_keys, 0, chunk_idx, 1, out=out, n_keys_t=n_keys,
                             tail_start_t=tail_start)[None]


def write_scalars(scalars: torch.Tensor, values: list[int]) -> None:
    """One host-to-device copy of `values` into the int32 device tensor `scalars` (any shape).

    From pageable host memory the copy is staged at once and queued behind the work already on the
    stream, like a fill, so it waits for nothing and the host list may go away right after."""
    host = torch.tensor(values, dtype=torch.int32).view(scalars.shape)
    scalars.copy_(host, non_blocking=scalars.is_cuda)


class KVCache:
    """Base: positions 0.. in sequence order, RoPE applied once when keys are written."""

    shares_target_kv = False  # True: adopts the target's prefill instead of running its own
    graph_ready = False  # supports CUDA-graph capture of decode/verify steps
    batch_shared: tuple[str, ...] = ()  # per-layer tensors `Rows.build` stores batch-major, [L, B, ...]
    batch: dict | None = None  # those tensors for the whole batch, once built by `Rows.build`
    scalar_names: tuple[str, ...] = ("len_t",)  # int32 device scalars a captured step reads (`prepare` writes them)
    selecting = False  # this step makes a selection (selection caches: see `begin_selection`)

    def __init__(self, model: Transformer):
        self.rotary = model.rotary
        self.n_layers = model.args.n_layers
        self.n_kv_heads = model.n_kv_heads
        self.head_dim = model.args.head_dim
        self.dtype, self.device = model.dtype, model.device
        self.length = 0
        self.graph_mode = False
        self.bind_scalars(torch.zeros(len(self.scalar_names), dtype=torch.int32, device=self.device))
        self.zero_t = torch.zeros((), dtype=torch.int32, device=self.device)
        self.steps = torch.arange(64, device=self.device)

    def bind_scalars(self, scalars: torch.Tensor) -> None:
        """Keep the device scalars as the elements of one int32 vector (a batch's rows: of one matrix),
        so refreshing them all is a single host-to-device copy."""
        self.scalars = scalars
        for i, name in enumerate(self.scalar_names):
            setattr(self, name, scalars[i])

    def scalar_values(self, n_new: int) -> list[int]:
        """Host side of a graph replay: what `scalar_names` hold for the next step of n_new tokens."""
        return [self.length]

    def prepare(self, n_new: int) -> None:
        """Host side of a graph replay: refresh the device scalars the graph reads."""
        write_scalars(self.scalars, self.scalar_values(n_new))

    def can_replay(self, n_new: int) -> bool:
        """False when this forward needs host logic (e.g. a re-selection): run it eagerly."""
        return self.graph_ready

    def graph_key(self) -> tuple:
        """Host-side choices a captured graph baked in (a change needs a new graph)."""
        return ()

    def can_select_in_graph_mode(self) -> bool:
        """Whether the host logic that stops a replay is a selection the graph-mode step can make on
        the device (`begin_selection`, then one uncaptured graph-mode step): a batch then selects
        for all its rows in a few launches per layer instead of row by row."""
        return False

    def begin_selection(self) -> None:
        """Host side of a selection made by a graph-mode step (see `can_select_in_graph_mode`)."""

    def begin(self, n_new: int) -> None:
        if self.graph_mode:
            self.pos_t = self.len_t + self.steps[:n_new]
            self.cos, self.sin = self.rotary.cos_sin(self.pos_t, self.dtype)
            return
        pos = torch.arange(self.length, self.length + n_new, device=self.device)
        self.cos, self.sin = self.rotary.cos_sin(pos, self.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rope_targets(self, layer: int) -> tuple | None:
        """Graph mode: where this step's keys and values go, (cos, sin, store_k, store_v, write rows)
        as `rope_write` takes them; `attend` is then `attend_rotated(layer, rope_write(q, k, v,
        *targets))`, so the q/k/v projection may rotate and write in its own kernel. None where only
        `attend` applies (eager steps, batches, caches without a device path)."""
        return None

    def attend_rotated(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Graph mode: attention of rotated queries once this step's keys and values are written."""
        raise NotImplementedError

    def advance(self, n_new: int) -> None:
        if not self.graph_mode:
            self.length += n_new

    def truncate(self, length: int) -> None:
        """Forget tokens at positions >= length (rejected drafts)."""
        self.length = min(self.length, length)

    def begin_round(self) -> None:
        """A new speculation round starts for this tier (hook for re-selecting policies)."""

    def adopt_prefix(self, length: int) -> bool:
        """Take over the target's prefill of `length` tokens; False: this cache needs its own prefill."""
        return False

    def catch_up(self, length: int) -> bool:
        """Advance over tokens up to `length` that the target verified while this tier sat out,
        without a forward; False: this cache needs them fed."""
        return False

    def reset(self) -> None:
        self.length = 0

    @property
    def rows(self) -> list["KVCache"]:
        """The per-sequence caches behind this one: itself for a single sequence (see `Rows`)."""
        return [self]

    def device_view(self) -> tuple | None:
        """Graph mode, after `begin`: this step's (cos, sin, write rows, key count, tail start, key
        bound), the per-row inputs a batched step stacks (the bound: the most keys the row's split-K
        work is planned for); None where the cache has no batched device path."""
        return None

    def batch_keys(self, layer: int) -> tuple:
        """Graph mode, batched: (store_k, store_v [B, KVH, S, D], chunk_idx [B, KVH, n] or None) of
        `layer` for every row, read from the batch-major tensors."""
        raise NotImplementedError

    def batch_begin(self, rows: "Rows", n_new: int) -> tuple | None:
        """Graph mode: `begin` of every row of `rows` (caches of this kind, built by `Rows.build`) at
        once, from their stacked device scalars; returns the stacked `device_view`s (cos, sin [B, T, D],
        write [B, T], key counts [B], tail starts [B], key bound), or None where only row-by-row
        begins apply. A step then costs the same few kernels at any batch size, not a few per row."""
        return None

    def _column(self, rows: "Rows", name: str) -> torch.Tensor:
        """Device scalar `name` of every row [B] (a column of the batch's scalar matrix)."""
        return rows.scalars[:, self.scalar_names.index(name)]

    def _batch_positions(self, rows: "Rows", n_new: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions len + 0 .. n_new-1 of every row [B, T] and their cos/sin [B, T, D]."""
        pos = self._column(rows, "len_t")[:, None] + self.steps[:n_new]
        cos, sin = self.rotary.cos_sin(pos.reshape(-1), self.dtype)
        return pos, cos.view(*pos.shape, -1), sin.view(*pos.shape, -1)


class Rows(KVCache):
    """B caches of one kind behind the interface of one, so one forward serves a batch of sequences.

    Row b of a batched forward attends through `rows[b]`: its own lengths, positions, window and
    selection, so rows of different lengths share every weight read while each attends exactly as
    it would alone. The engine reads and rolls back each row's length through `rows`; the model
    only calls begin / attend / advance, which go to every row. Graph mode and the host-side
    graph hooks (prepare, can_replay, graph_key) are the rows' own, so a batched step is captured
    like a single one (the per-row device scalars are read inside the graph).
    """

    def __init__(self, rows: list[KVCache]):
        if not rows or len({type(r) for r in rows}) != 1:
            raise ValueError("Rows needs one or more caches of one kind")
        self._rows = list(rows)
        self.shares_target_kv, self.graph_ready = rows[0].shares_target_kv, rows[0].graph_ready
        # every row's device scalars in one [B, k] matrix: a step's refresh is one copy, not k per row
        self.scalars = torch.stack([r.scalars for r in rows])
        for b, r in enumerate(rows):
            r.bind_scalars(self.scalars[b])
        self._step = None  # the stacked per-row device view of the current graph-mode step

    @classmethod
    def build(cls, make, batch: int) -> KVCache:
        """`make(b)` for each row, as one cache (the row itself when batch is 1). The rows'
        `batch_shared` tensors move into batch-major tensors [L, B, ...] as each row is made (so the
        peak is the batch plus one row), each row keeping a view: a graph-mode step then reads every
        row's layer through one kernel launch instead of one per row."""
        first = make(0)
        if batch == 1:
            return first
        big = {name: torch.empty((getattr(first, name).shape[0], batch) + tuple(getattr(first, name).shape[1:]),
                                 dtype=getattr(first, name).dtype, device=getattr(first, name).device)
               for name in first.batch_shared}
        rows = []
        for b in range(batch):
            row = first if b == 0 else make(b)
            for name, t in big.items():
                t[:, b].copy_(getattr(row, name))
                setattr(row, name, t[:, b])
            row.batch = big
            rows.append(row)
        return cls(rows)

    @property
    def rows(self) -> list[KVCache]:
        return self._rows

    @property
    def graph_mode(self) -> bool:
        return self._rows[0].graph_mode

    @graph_mode.setter
    def graph_mode(self, on: bool) -> None:
        for r in self._rows:
            r.graph_mode = on

    @property
    def length(self) -> int:
        raise AttributeError("a batch's rows have their own lengths: read cache.rows[b].length")

    def __getattr__(self, name: str):
        """Settings every row shares (budget, sinks, max_length, ...) read from the first row."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._rows[0], name)

    def prepare(self, n_new: int) -> None:
        write_scalars(self.scalars, [x for r in self._rows for x in r.scalar_values(n_new)])

    def can_replay(self, n_new: int) -> bool:
        return all(r.can_replay(n_new) for r in self._rows)

    def can_select_in_graph_mode(self) -> bool:
        return all(r.can_select_in_graph_mode() for r in self._rows)

    def begin_selection(self) -> None:
        for r in self._rows:
            r.begin_selection()

    def graph_key(self) -> tuple:
        return tuple(r.graph_key() for r in self._rows)

    def begin(self, n_new: int) -> None:
        self._step = None
        if self.graph_mode and self._rows[0].batch is not None:
            self._step = self._rows[0].batch_begin(self, n_new)
            if self._step is not None:
                return
        for r in self._rows:
            r.begin(n_new)
        if self.graph_mode and self._rows[0].batch is not None:
            views = [r.device_view() for r in self._rows]
            keys = {r.graph_key()[:1] for r in self._rows}  # a selection's view kind must agree
            if views[0] is not None and len(keys) == 1:
                cos, sin, write, n_keys, tail, bound = zip(*views)
                self._step = (torch.stack(cos), torch.stack(sin), torch.stack(write),
                              torch.cat([x.reshape(1) for x in n_keys]), torch.cat([x.reshape(1) for x in tail]),
                              max(bound))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._step is None:  # eager steps (and caches without a batched path): row by row
            return torch.cat([r.attend(layer, q[b:b + 1], k[b:b + 1], v[b:b + 1]) for b, r in enumerate(self._rows)])
        from triforce.kernels._split_k import split_k_attention

        cos, sin, write, n_keys, tail, bound = self._step
        store_k, store_v, idx = self._rows[0].batch_keys(layer)
        q = rope_write(q, k, v, cos, sin, store_k, store_v, write)
        if idx is not None and self._rows[0].selecting:  # every row's selection at once, from its rotated query
            idx.copy_(self._rows[0].device_choose(q, store_k, [r.boundary for r in self._rows]))
        b, h, t, d = q.shape
        out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # token-major, as device_attention
        return split_k_attention(q, store_k, store_v, bound, 0, idx, 1, out=out, n_keys_t=n_keys, tail_start_t=tail)

    def advance(self, n_new: int) -> None:
        for r in self._rows:
            r.advance(n_new)

    def truncate(self, length: int) -> None:
        for r in self._rows:
            r.truncate(length)

    def begin_round(self) -> None:
        for r in self._rows:
            r.begin_round()

    def reset(self) -> None:
        for r in self._rows:
            r.reset()


class FullCache(KVCache):
    """Static, preallocated KV of every token: the target's cache (and the store retrieval reads)."""

    graph_ready = True
    device_resident = True  # the store is on the compute device (triforce.offload: host memory)
    batch_shared = ("k", "v")

    def __init__(self, model: Transformer, max_length: int):
        super().__init__(model)
        self.max_length = max_length
        # one scratch slot past the end: graph-mode draft writes that must not land go there
        shape = (self.n_layers, self.n_kv_heads, max_length + 1, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _check(self, n_new: int) -> None:
        if self.length + n_new > self.max_length:
            raise ValueError(f"{self.length + n_new} tokens exceed the cache's {self.max_length}: "
                             f"shorten the prompt or max_new_tokens")

    def scalar_values(self, n_new: int) -> list[int]:
        self._check(n_new)
        return super().scalar_values(n_new)

    def begin(self, n_new: int) -> None:
        if not self.graph_mode:
            self._check(n_new)
        super().begin(n_new)
        if self.graph_mode:
            self.end_t = self.pos_t[-1:] + 1

    def attend(self, layer, q, k, v):
        if self.graph_mode:
            return self.attend_rotated(layer, rope_write(q, k, v, *self.rope_targets(layer)))
        q, k = rope_qk(q, k, self.cos, self.sin)
        s, e = self.length, self.length + q.shape[2]
        self.k[layer, :, s:e] = k[0]
        self.v[layer, :, s:e] = v[0]
        return attention(q, self.k[layer, :, :e], self.v[layer, :, :e])

    def rope_targets(self, layer: int) -> tuple | None:
        return (self.cos, self.sin, self.k[layer], self.v[layer], self.pos_t) if self.graph_mode else None

    def attend_rotated(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return device_attention(q, self.k[layer], self.v[layer], self.end_t, self.max_length, self.zero_t)

    def device_view(self) -> tuple:
        return self.cos, self.sin, self.pos_t, self.end_t, self.zero_t, self.max_length

    def batch_begin(self, rows: Rows, n_new: int) -> tuple:
        pos, cos, sin = self._batch_positions(rows, n_new)
        zeros = torch.zeros(pos.shape[0], dtype=torch.int32, device=self.device)
        return cos, sin, pos, pos[:, -1] + 1, zeros, self.max_length

    def batch_keys(self, layer: int) -> tuple:
        return self.batch["k"][layer], self.batch["v"][layer], None

    # the store API draft caches read through (OffloadedFullCache serves it from host memory + a tail mirror)
    def read(self, layer: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated K/V of positions [a, b) on the compute device, [KVH, b - a, D]."""
        return self.k[layer, :, a:b], self.v[layer, :, a:b]

    def read_k(self, layer: int, a: int, b: int) -> torch.Tensor:
        return self.k[layer, :, a:b]

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a draft's rotated k/v [KVH, T, D] at positions pos.. (past the verified length)."""
        self.k[layer, :, pos:pos + k.shape[1]] = k
        self.v[layer, :, pos:pos + k.shape[1]] = v

    def gather(self, layer: int, idx: torch.Tensor, out_k: torch.Tensor | None = None,
               out_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V [KVH, n, D] of positions idx [KVH, n] of `layer` (into out_k/out_v when given)."""
        i = idx[..., None].expand(-1, -1, self.head_dim)
        return torch.gather(self.k[layer], 1, i, out=out_k), torch.gather(self.v[layer], 1, i, out=out_v)

    def keep_tail(self, start: int, front: int = 0) -> None:
        """A reader will touch positions >= start every step (an offloaded store mirrors them on the device)."""

    def layout_key(self) -> tuple:
        """Store layout a reader's captured graph depends on (an offloaded store's mirror)."""
        return ()


class StreamingCache(KVCache):
    """StreamingLLM: `sinks` first tokens + the `window` most recent ones (Xiao et al., 2023).

    With `position_shift` (the paper's choice) RoPE uses positions inside the cache, so a small
    draft never sees positions beyond its training window. Only relative positions matter to
    RoPE, so keys are stored rotated by their *slot* and queries by theirs: a recent token's key
    is rotated once, when written, and never again. Only the sinks move relative to the window;
    they are kept un-rotated (`sink_k`) and re-rotated (sinks x layers rows) at each forward.
    `slack` extra recent tokens are kept so a rejected speculation can be rolled back; when the
    buffer is full the recent tokens are compacted to the front (and re-rotated by the shift).
    """

    graph_ready = True
    batch_shared = ("k", "v", "sink_k")
    # the host's view of the next step, read by its graph: length, write slot, view start, keys, sink shift
    scalar_names = ("len_t", "write_slot_t", "view_start_t", "n_keys_t", "shift_t")

    def __init__(self, model: Transformer, sinks: int, window: int, slack: int = 64,
                 max_forward: int = 512, position_shift: bool = True):
        super().__init__(model)
        if sinks < 0 or window < 1:
            raise ValueError(f"streaming cache needs sinks >= 0 and window >= 1 (got {sinks}, {window})")
        self.sinks, self.window, self.slack, self.max_forward = sinks, window, slack, max_forward
        self.position_shift = position_shift
        self.capacity = sinks + window + slack + max_forward
        shape = (self.n_layers, self.n_kv_heads, self.capacity, self.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.sink_k = torch.zeros(self.n_layers, self.n_kv_heads, sinks, self.head_dim, dtype=self.dtype,
                                  device=self.device)
        # cos/sin of every slot (and of the sinks' shifted positions): a step gathers rows, computes none
        self.rope_table = torch.stack(self.rotary.cos_sin(torch.arange(self.capacity + sinks, device=self.device),
                                                          self.dtype))
        self.sink_pos = torch.arange(sinks, device=self.device)
        self.sink_idx = self.sink_pos.int().expand(self.n_kv_heads, -1).contiguous()  # the attention's chunk list
        self.start = sinks  # sequence position held in slot `sinks` (first kept recent token)

    def reset(self) -> None:
        super().reset()
        self.start = self.sinks

    def _slot(self, pos: int) -> int:
        return pos if pos < self.sinks else self.sinks + pos - self.start

    def can_replay(self, n_new: int) -> bool:
        return self.length >= self.sinks  # the graph assumes every sink is in place

    def scalar_values(self, n_new: int) -> list[int]:
        self._place(n_new)
        n_sink, a, b = self.view
        return [self.length, self._slot(self.length), a, n_sink + b - a, a - n_sink]

    def _place(self, n_new: int) -> None:
        """Host side: compact when full, then place the view (sinks + recent window + new)."""
        if n_new > self.max_forward:
            raise ValueError(f"streaming cache takes at most {self.max_forward} tokens per forward, got {n_new}")
        if self._slot(self.length) + n_new > self.capacity:  # compact: drop the oldest recent tokens
            keep = max(self.start, self.length - self.window - self.slack)
            a, b = self._slot(keep), self._slot(self.length)
            moved = self.k[:, :, a:b]
            if self.position_shift:  # slot-rotated keys move by a - sinks slots
                cos, sin = self.rotary.cos_sin(torch.tensor([self.sinks - a], device=self.device), self.dtype)
                moved = apply_rope(moved, cos, sin)
            self.k[:, :, self.sinks:self.sinks + b - a] = moved.clone()
            self.v[:, :, self.sinks:self.sinks + b - a] = self.v[:, :, a:b].clone()
            self.start = keep
        end = self.length + n_new
        lo = min(max(self.start, end - n_new - self.window, self.sinks), end)
        self.view = (min(self.sinks, end), self._slot(lo), self._slot(end))

    def _rotate_sinks(self, shift) -> None:
        """Sinks at positions shift + i, i.e. just before the window in the cache's own positions."""
        if self.position_shift and self.sinks:
            cs = self.rope_table[:, shift + self.sink_pos]
            self.k[:, :, :self.sinks] = apply_rope(self.sink_k, cs[0], cs[1])

    def begin(self, n_new: int) -> None:
        if self.graph_mode:
            return self._begin_device(n_new)
        self._place(n_new)
        n_sink, a, b = self.view
        if self.length >= self.sinks:
            self._rotate_sinks(a - n_sink)
        if self.position_shift:
            cs = self.rope_table[:, b - n_new:b]
            self.cos, self.sin = cs[0], cs[1]
        else:
            super().begin(n_new)

    def _begin_device(self, n_new: int) -> None:
        """Graph mode: slots and the view's start from device scalars, cos/sin gathered from the table."""
        self.write_t = self.write_slot_t + self.steps[:n_new]
        self.max_keys = self.sinks + self.window + n_new
        self._rotate_sinks(self.shift_t)
        if self.position_shift:
            cs = self.rope_table[:, self.write_t]
            self.cos, self.sin = cs[0], cs[1]
        else:
            KVCache.begin(self, n_new)

    def attend(self, layer, q, k, v):
        s = self._slot(self.length)
        if not self.graph_mode and s < self.sinks:  # the sinks' un-rotated keys, re-rotated as the window moves
            n = min(self.sinks, s + k.shape[2]) - s
            self.sink_k[layer, :, s:s + n] = k[0, :, :n]
        if self.graph_mode:
            return self.attend_rotated(layer, rope_write(q, k, v, *self.rope_targets(layer)))
        q, k = rope_qk(q, k, self.cos, self.sin)
        self.k[layer, :, s:s + k.shape[2]] = k[0]
        self.v[layer, :, s:s + k.shape[2]] = v[0]
        n_sink, a, b = self.view
        if a == n_sink:
            keys, vals = self.k[layer, :, :b], self.v[layer, :, :b]
        else:
            keys = torch.cat((self.k[layer, :, :n_sink], self.k[layer, :, a:b]), dim=1)
            vals = torch.cat((self.v[layer, :, :n_sink], self.v[layer, :, a:b]), dim=1)
        return attention(q, keys, vals)

    def rope_targets(self, layer: int) -> tuple | None:
        return (self.cos, self.sin, self.k[layer], self.v[layer], self.write_t) if self.graph_mode else None

    def attend_rotated(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return device_attention(q, self.k[layer], self.v[layer], self.n_keys_t, self.max_keys,
                                self.view_start_t, self.sink_idx if self.sinks else None)

    def device_view(self) -> tuple | None:
        if not self.position_shift:
            return None
        return self.cos, self.sin, self.write_t, self.n_keys_t, self.view_start_t, self.max_keys

    def batch_begin(self, rows: Rows, n_new: int) -> tuple | None:
        if not self.position_shift:
            return None
        write = self._column(rows, "write_slot_t")[:, None] + self.steps[:n_new]
        if self.sinks:  # every row's sinks re-rotated in one go: [L, B, KVH, sinks, D] by cos/sin [B, sinks, D]
            cs = self.rope_table[:, self._column(rows, "shift_t")[:, None] + self.sink_pos]
            self.batch["k"][:, :, :, :self.sinks] = apply_rope(self.batch["sink_k"], cs[0][None, :, None], cs[1][None, :, None])
        cs = self.rope_table[:, write]
        return (cs[0], cs[1], write, self._column(rows, "n_keys_t").contiguous(),
                self._column(rows, "view_start_t").contiguous(),
                self.sinks + self.window + n_new)

    def batch_keys(self, layer: int) -> tuple:
        if self.sinks and "sink_idx" not in self.batch:
            self.batch["sink_idx"] = self.sink_idx.expand(self.batch["k"].shape[1], -1, -1).contiguous()
        return self.batch["k"][layer], self.batch["v"][layer], self.batch["sink_idx"] if self.sinks else None

    def truncate(self, length: int) -> None:
        if length < self.length and length < self.start and self.start > self.sinks:
            raise ValueError(f"streaming cache cannot roll back to {length}: tokens before {self.start} were "
                             f"evicted; raise its slack ({self.slack}) above the speculation depth")
        super().truncate(length)


class SelectionCache(KVCache):
    """A draft cache that reads the target's `FullCache` through a per-head selection of its prefix.

    The prefix up to a chunk-aligned boundary (at most the target's verified length) is read
    through `budget` selected token positions per layer and KV head (`choose`, the policy);
    everything after the boundary (partial last chunk, tokens generated since the selection,
    the tokens being drafted) is attended in full. Tokens the target verified are read from its
    store (TriForce's cache update); speculative tokens are written only past the target's
    verified length, never over it. If the budget covers the prefix this is exactly full attention.

    `reselect`: "once" (select at the first draft step, then only append; TriForce's choice),
    "round" (every verification round) or an int N (once N tokens were added since).
    """

    shares_target_kv = True
    graph_ready = True  # policies that attend to modified copies (quantized KV) set this False
    batch_shared = ("sel_idx",)
    scalar_names = ("len_t", "full_len_t", "boundary_t")

    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once"):
        super().__init__(model)
        if chunk_size < 1 or budget < chunk_size:
            raise ValueError(f"a draft cache needs chunk_size >= 1 and budget >= chunk_size (got {chunk_size}, {budget})")
        self.sel_idx = torch.zeros(self.n_layers, self.n_kv_heads, (budget // chunk_size) * chunk_size,
                                   dtype=torch.int32, device=self.device)
        if not (reselect in ("once", "round") or (isinstance(reselect, int) and reselect > 0)):
            raise ValueError(f"reselect must be 'once', 'round' or a positive token count, got {reselect!r}")
        self.full, self.chunk, self.reselect = full, chunk_size, reselect
        self.budget = (budget // chunk_size) * chunk_size
        self.sel_k = self.sel_v = None  # copies of the selected KV, allocated at the first selection if needed
        self.front_t = torch.full((), self.budget, dtype=torch.int32, device=self.device)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.boundary, self.full_view = 0, True
        self.select_next, self.selecting, self.selected_at = True, False, 0
        self.selections = 0

    def catch_up(self, length: int) -> bool:
        """Verified tokens are read from the target's store (the tail since the selection), so the
        selection stands and the length just moves on, as if this tier had run all along."""
        self.length = max(self.length, length)
        return True

    def adopt_prefix(self, length: int) -> bool:
        self.length = length
        self.select_next = True
        # bound on the keys a step reads (selection + tail after the lowest possible boundary)
        self.max_keys = self.budget + self.full.max_length - (length // self.chunk) * self.chunk
        return True

    def begin_round(self) -> None:
        if self.reselect == "round" or (isinstance(self.reselect, int)
                                        and self.length - self.selected_at >= self.reselect):
            self.select_next = True

    def can_replay(self, n_new: int) -> bool:
        return self.graph_ready and not self.select_next

    device_selection = False  # `device_choose` makes this policy's own selection

    def can_select_in_graph_mode(self) -> bool:
        return self.graph_ready and self.select_next and self.full.device_resident and self.device_selection

    def begin_selection(self) -> None:
        """What an eager selecting `begin` decides on the host (the boundary, whether the budget
        covers it), for a graph-mode step whose attention selects on the device; `advance` then
        records the selection as the eager step's does. Copies of an earlier selection are
        dropped: eager steps gather the new one through `sel_idx`."""
        self.selecting = True
        self._plan_selection()
        self.sel_k = self.sel_v = None

    def _plan_selection(self) -> None:
        """A selection's host side: the chunk-aligned boundary below which it selects, whether the
        budget covers it (full view), and the store's tail the draft's steps will read."""
        self.boundary = (min(self.length, self.full.length) // self.chunk) * self.chunk
        self.full_view = self.budget >= self.boundary
        self.full.keep_tail(0 if self.full_view else self.boundary, front=self.budget)

    def device_choose(self, q: torch.Tensor, store_k: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
        """Graph mode: positions [B, KVH, budget] below each row's boundary for rotated queries
        q [B, H, T, D] over the store's keys [B, KVH, S, D] (what `choose` picks, for every row at once)."""
        raise NotImplementedError

    def scalar_values(self, n_new: int) -> list[int]:
        return super().scalar_values(n_new) + [self.full.length, self.boundary]

    def begin(self, n_new: int) -> None:
        super().begin(n_new)
        if self.graph_mode:  # per-forward device scalars, shared by all layers
            self.end_t = self.pos_t[-1:] + 1
            self.n_keys_t = self.end_t if self.full_view else self.budget + self.end_t - self.boundary_t
            self.write_t = torch.where(self.pos_t < self.full_len_t, self.full.max_length, self.pos_t)
            if not self.full.device_resident:  # offloaded layers: rows of the store's device mirror
                view_start = self.zero_t if self.full_view else self.boundary_t
                scratch = self.full.mirror_k.shape[1] - 1
                self.mirror_w_t = torch.where(self.pos_t < self.full_len_t, scratch,
                                              self.budget + self.pos_t - view_start)
            return
        self.selecting = self.select_next
        if self.selecting:
            self._plan_selection()

    def advance(self, n_new: int) -> None:
        if self.graph_mode:
            return
        if self.selecting:
            self.select_next, self.selecting, self.selected_at = False, False, self.length
            self.selections += 1
        super().advance(n_new)

    @property
    def keeps_copies(self) -> bool:
        """Whether a selection is gathered into copies (sel_k/sel_v). Not for a graph-ready policy
        over a store resident on the GPU: its graphs read the store in place through `sel_idx`, and
        the rare eager step gathers on the fly, which saves budget x KV-per-token (2 GiB for a 7B
        model at 4K) for a longer context. On CPU every step is eager, so the copies stay."""
        return not (self.graph_ready and self.full.device_resident and self.device.type == "cuda")

    def post_gather(self, layer: int) -> None:
        """Hook after a selection is gathered into sel_k/sel_v (e.g. to quantize the copies)."""

    def selected_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The selected prefix KV this layer attends to (policies may slice per-layer budgets)."""
        if self.sel_k is None:
            return self.full.gather(layer, self.sel_idx[layer].long())
        return self.sel_k[layer], self.sel_v[layer]

    def rope_targets(self, layer: int) -> tuple | None:
        """Verified positions are diverted to the store's scratch slot; an offloaded store's host
        layers are written to its device mirror instead ([selected KV | tail since the boundary | scratch])."""
        if not self.graph_mode:
            return None
        full = self.full
        if full.device_resident:
            return self.cos, self.sin, full.k[layer], full.v[layer], self.write_t
        j = full.offloaded_index(layer)
        if j is not None:
            return (self.cos, self.sin, *full.mirror(j), self.mirror_w_t)
        return self.cos, self.sin, full.dev_k[layer], full.dev_v[layer], self.write_t  # not full.k: that syncs host writes

    def attend_rotated(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Split-K attention reading the store (or an offloaded layer's mirror) in place."""
        full = self.full
        if full.device_resident:
            store_k, store_v = full.k[layer], full.v[layer]
        else:
            j = full.offloaded_index(layer)
            if j is not None:
                mk, mv = full.mirror(j)
                return device_attention(q, mk, mv, self.n_keys_t, self.max_keys,
                                        self.front_t if self.full_view else self.zero_t)
            store_k, store_v = full.dev_k[layer], full.dev_v[layer]
        if self.selecting and not self.full_view:  # a selection on the device (`begin_selection`)
            self.sel_idx[layer] = self.device_choose(q, store_k[None], [self.boundary])[0]
        if self.full_view:
            return device_attention(q, store_k, store_v, self.n_keys_t, full.max_length, self.zero_t)
        return device_attention(q, store_k, store_v, self.n_keys_t, self.max_keys, self.boundary_t, self.sel_idx[layer])

    def device_view(self) -> tuple | None:
        if not self.full.device_resident or self.full.batch is None:
            return None
        if self.full_view:
            return self.cos, self.sin, self.write_t, self.n_keys_t, self.zero_t, self.full.max_length
        return self.cos, self.sin, self.write_t, self.n_keys_t, self.boundary_t, self.max_keys

    def batch_begin(self, rows: Rows, n_new: int) -> tuple | None:
        if not self.full.device_resident or self.full.batch is None or len({r.full_view for r in rows.rows}) != 1:
            return None
        pos, cos, sin = self._batch_positions(rows, n_new)
        end = pos[:, -1] + 1
        write = torch.where(pos < self._column(rows, "full_len_t")[:, None], self.full.max_length, pos)
        if self.full_view:
            zeros = torch.zeros(pos.shape[0], dtype=torch.int32, device=self.device)
            return cos, sin, write, end, zeros, self.full.max_length
        boundary = self._column(rows, "boundary_t")
        return cos, sin, write, self.budget + end - boundary, boundary.contiguous(), max(r.max_keys for r in rows.rows)

    def batch_keys(self, layer: int) -> tuple:
        store = self.full.batch
        return store["k"][layer], store["v"][layer], None if self.full_view else self.batch["sel_idx"][layer]

    def graph_key(self) -> tuple:
        """What a captured graph baked in: the view kind, the planned key bound, the store's layout."""
        return (self.full_view, self.max_keys) + self.full.layout_key()

    def choose(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Positions [KVH, budget] below `self.boundary` this layer reads; q [1, H, T, D] rotated."""
        raise NotImplementedError

    def attend(self, layer, q, k, v):
        if self.graph_mode:
            return self.attend_rotated(layer, rope_write(q, k, v, *self.rope_targets(layer)))
        q, k = rope_qk(q, k, self.cos, self.sin)
        s, e = self.length, self.length + q.shape[2]
        w = max(s, self.full.length)  # never overwrite KV the target has verified
        if w < e:
            self.full.write(layer, w, k[0, :, w - s:], v[0, :, w - s:])
        if self.full_view:
            return attention(q, *self.full.read(layer, 0, e))
        if self.selecting:
            pos = self.choose(layer, q)
            if self.graph_ready:  # what the graph path reads in place
                self.sel_idx[layer] = pos
            if self.keeps_copies:
                if self.sel_k is None or self.sel_k.shape[2] < self.budget:
                    self.sel_k = torch.zeros(self.n_layers, self.n_kv_heads, self.budget, self.head_dim,
                                             dtype=self.dtype, device=self.device)
                    self.sel_v = torch.zeros_like(self.sel_k)
                n = pos.shape[1]
                self.full.gather(layer, pos, self.sel_k[layer, :, :n], self.sel_v[layer, :, :n])
                self.post_gather(layer)
                if self.graph_ready and not self.full.device_resident:  # graphs read offloaded layers' copies
                    self.full.put_front(layer, *self.selected_kv(layer))
        sel_k, sel_v = self.selected_kv(layer)
        tail_k, tail_v = self.full.read(layer, self.boundary, e)
        return attention(q, torch.cat((sel_k, tail_k), dim=1), torch.cat((sel_v, tail_v), dim=1))


class RetrievalCache(SelectionCache):
    """TriForce's retrieval draft cache: top-k chunks of the target's own KV (Sun et al., 2024).

    The prefix is cut into `chunk_size`-token chunks, each summarised by its mean (rotated) key.
    Per layer and KV head, the chunks whose summary scores highest against the current query
    (summed over the query heads of the GQA group) fill the budget; chunk 0 (the attention sink)
    is always kept. Summaries of verified chunks never change: when the cache re-selects
    (`reselect` "round" or N) each is computed once and stored (1/(2 chunk_size) of the KV);
    with "once" every chunk is scored once per prompt, so nothing is stored.
    """

    def __init__(self, full: FullCache, model: Transformer, budget: int, chunk_size: int = 8,
                 reselect: str | int = "once"):
        super().__init__(full, model, budget, chunk_size, reselect)
        self.summaries = None if reselect == "once" else torch.zeros(
            self.n_layers, self.n_kv_heads, full.max_length // chunk_size, self.head_dim,
            dtype=self.dtype, device=self.device)

    def reset(self) -> None:
        super().reset()
        self.n_summarized = [0] * self.n_layers

    def _chunk_means(self, keys: torch.Tensor) -> torch.Tensor:
        """Summaries [..., n, D] of keys [..., n * chunk, D]: each chunk's mean key."""
        return keys.unflatten(-2, (keys.shape[-2] // self.chunk, self.chunk)).mean(-2, dtype=torch.float32).to(self.dtype)

    def _summaries(self, layer: int, lo: int, hi: int) -> torch.Tensor:
        return self._chunk_means(self.full.read_k(layer, lo * self.chunk, hi * self.chunk))

    def _top_positions(self, scores: torch.Tensor) -> torch.Tensor:
        """Token positions [..., budget] of the best-scoring chunks of scores [..., n_chunks], in
        order; chunk 0 (the attention sink) always among them."""
        scores[..., 0] = float("inf")
        top = scores.topk(self.budget // self.chunk, dim=-1).indices.sort(dim=-1).values
        return (top[..., None] * self.chunk + torch.arange(self.chunk, device=scores.device)).flatten(-2)

    def chunk_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Scores [KVH, n_chunks] of the chunks below the boundary against the last query."""
        n_chunks = self.boundary // self.chunk
        group = q.shape[1] // self.n_kv_heads
        query = q[0, :, -1].float().view(self.n_kv_heads, group, -1).sum(1)  # [KVH, D]
        blocks = [(lo, min(n_chunks, lo + 1024)) for lo in range(0, n_chunks, 1024)]  # bounded workspace
        if self.summaries is None:
            scores = torch.empty(self.n_kv_heads, n_chunks, device=self.device)
            for lo, hi in blocks:
                scores[:, lo:hi] = torch.einsum("hd,hcd->hc", query, self._summaries(layer, lo, hi).float())
            return scores
        for lo, hi in blocks:
            if hi > self.n_summarized[layer]:
                lo = max(lo, self.n_summarized[layer])
                self.summaries[layer, :, lo:hi] = self._summaries(layer, lo, hi)
        self.n_summarized[layer] = max(self.n_summarized[layer], n_chunks)
        return torch.einsum("hd,hcd->hc", query, self.summaries[layer, :, :n_chunks].float())

    @property
    def device_selection(self) -> bool:
        """`device_choose` scores as this class does: a subclass scoring otherwise (Quest) selects eagerly."""
        return type(self).chunk_scores is RetrievalCache.chunk_scores and type(self).choose is RetrievalCache.choose

    def device_choose(self, q: torch.Tensor, store_k: torch.Tensor, boundaries: list[int]) -> torch.Tensor:
        """`choose` for every row of a batch: the same summaries and scores (chunk means of the
        rotated keys against the last query summed over each GQA group), chunks at or past a row's
        boundary masked out, in blocks of 1024 chunks over all rows at once."""
        b = q.shape[0]
        n_chunks = max(boundaries) // self.chunk
        query = q[:, :, -1].float().view(b, self.n_kv_heads, -1, q.shape[-1]).sum(2)  # [B, KVH, D]
        scores = torch.empty(b, self.n_kv_heads, n_chunks, device=q.device)
        for lo in range(0, n_chunks, 1024):  # bounded workspace
            hi = min(n_chunks, lo + 1024)
            summ = self._chunk_means(store_k[:, :, lo * self.chunk:hi * self.chunk])
            scores[:, :, lo:hi] = torch.einsum("bhd,bhcd->bhc", query, summ.float())
        past = torch.tensor([n // self.chunk for n in boundaries], device=q.device)
        scores.masked_fill_(torch.arange(n_chunks, device=q.device) >= past[:, None, None], float("-inf"))
        return self._top_positions(scores).to(torch.int32)

    def choose(self, layer, q):
        return self._top_positions(self.chunk_scores(layer, q))
