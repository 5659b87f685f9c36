"""The target's KV in (pinned) host memory, streamed back to the GPU layer by layer (GitHub issue 5).

At 128K tokens a 7B target's KV (64 GiB) does not fit next to its weights on one GPU. TriForce's
answer is to keep it in host memory and pay one host-to-device read of it per *target* forward,
which speculation amortises over the tokens each verification accepts; the drafts never read it.

`OffloadedFullCache` is a drop-in `FullCache`: the first `resident_layers` layers live on the
device as usual, the others in host memory (token-major [S, KVH, D], so any position range is one
contiguous copy). While layer i attends, the next piece of the prefix [0, length) is already being
copied into the other of two device staging slots on a side CUDA stream (events order the reuse
of a slot); with `transfer_chunk` a layer arrives in pieces of that many tokens and attention
merges them by log-sum-exp, so a layer's KV never has to fit on the device twice. New tokens'
K/V go back to host memory (and to the staging slot / the tail mirror). On CPU (the tests) the
same code runs with synchronous copies.

Readers other than the target (a retrieval draft) use the store API shared with `FullCache`:
`read`/`read_k` (a position range on the device), `write` (a draft's speculative tokens),
`gather` (selection time only) and `keep_tail(start, front)`, which mirrors positions >= start
of each offloaded layer on the device behind `front` rows for the draft's selected KV
(`put_front`), so a draft's steps, CUDA graphs included, never touch host memory. `k`/`v` stay
indexable as `k[layer, :, a:b]` (head-major views of each layer's home) for code that still
reads the store directly; on a GPU those views of offloaded layers are host tensors.
"""
from __future__ import annotations

import math

import torch

from triforce.cache import PREFILL_MIN_TOKENS, FullCache, KVCache, attention
from triforce.kernels.prefill_attention import attention_lse, can_use_cudnn, merge_lse
from triforce.models.llama import Transformer, rope_qk

SCORE_BLOCK = 1 << 24  # float32 attention scores a merged (chunked) attention step materialises at once


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [H, T, D] over one block of keys k/v [KVH, n, D]: (out [H, T, D], lse [H, T]), float32.

    `causal`: the block is the T new tokens themselves (query i sees keys 0..i); otherwise every
    key precedes every query. The log-sum-exp lets blocks be merged exactly (`merge_blocks`).
    """
    h, t, d = q.shape
    kvh, n = k.shape[0], k.shape[1]
    qg = q.float().view(kvh, h // kvh, t, d)
    s = torch.einsum("hgtd,hnd->hgtn", qg, k.float()) / math.sqrt(d)
    if causal:
        s.masked_fill_(torch.ones(t, n, dtype=torch.bool, device=q.device).triu(n - t + 1), float("-inf"))
    lse = s.logsumexp(-1)
    out = torch.einsum("hgtn,hnd->hgtd", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(h, t, d), lse.reshape(h, t)


def merge_blocks(acc: tuple[torch.Tensor, torch.Tensor] | None,
                 new: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two key blocks from their normalised outputs and log-sum-exps."""
    if acc is None:
        return new
    (o1, l1), (o2, l2) = acc, new
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None], lse


class LayerView:
    """`store.k[layer, ...]` over per-layer tensors that may live on different devices.

    Each layer's entry is a head-major [KVH, S, D] view of its home, so the indexing code written
    for `FullCache.k` keeps working; `before()` runs first (waits for pending host writes).
    """

    def __init__(self, layers: list[torch.Tensor], before=None):
        self.layers, self.before = layers, before

    def _split(self, idx):
        if self.before is not None:
            self.before()
        if isinstance(idx, tuple):
            return self.layers[idx[0]], idx[1:]
        return self.layers[idx], ()

    def __getitem__(self, idx) -> torch.Tensor:
        layer, rest = self._split(idx)
        return layer[rest] if rest else layer

    def __setitem__(self, idx, value) -> None:
        layer, rest = self._split(idx)
        layer[rest if rest else ...] = value

    def __len__(self) -> int:
        return len(self.layers)


class OffloadedFullCache(FullCache):
    """`FullCache` whose layers >= `resident_layers` live in host memory and stream in per forward.

    `transfer_chunk`: tokens per host-to-device copy (None: a whole layer per copy, then each
    staging slot holds a full layer). `stage_device`: where staging and attention run, i.e. the
    model's device ("cpu" in tests). `pin`: page-locked host memory (default: when on CUDA), which
    async copies need. No CUDA-graph support: a step's copies depend on host-side lengths.
    """

    graph_ready = False
    device_resident = False
    batch_shared = ()  # a batch's rows keep their own host stores, staging slots and mirrors

    def __init__(self, model: Transformer, max_length: int, resident_layers: int = 0,
                 transfer_chunk: int | None = None, stage_device: str | torch.device | None = None,
                 pin: bool | None = None):
        KVCache.__init__(self, model)
        if stage_device is not None and torch.device(stage_device) != torch.device(self.device):
            raise ValueError(f"stage_device {stage_device} must be the model's device ({self.device}): "
                             f"attention runs where the queries are")
        if not 0 <= resident_layers <= self.n_layers:
            raise ValueError(f"resident_layers must be in 0..{self.n_layers}, got {resident_layers}")
        if transfer_chunk is not None and transfer_chunk < 1:
            raise ValueError(f"transfer_chunk must be >= 1 token (or None for whole layers), got {transfer_chunk}")
        self.max_length, self.resident_layers = max_length, resident_layers
        self.cuda = torch.device(self.device).type == "cuda"
        pin = self.cuda if pin is None else pin
        kvh, d, s = self.n_kv_heads, self.head_dim, max_length + 1
        n_off = self.n_layers - resident_layers
        self.dev_k = torch.zeros(resident_layers, kvh, s, d, dtype=self.dtype, device=self.device)
        self.dev_v = torch.zeros_like(self.dev_k)
        # host memory is only ever read below `length`, where it was written: no zero fill of 100 GiB
        self.host_k = torch.empty(n_off, s, kvh, d, dtype=self.dtype, pin_memory=pin)
        self.host_v = torch.empty(n_off, s, kvh, d, dtype=self.dtype, pin_memory=pin)
        self.piece = min(transfer_chunk or s, s)
        slots = 2 if n_off else 0
        self.slot_k = torch.empty(slots, self.piece, kvh, d, dtype=self.dtype, device=self.device)
        self.slot_v = torch.empty_like(self.slot_k)
        self.tail_k = self.tail_v = None  # views into mirror_k/mirror_v (see keep_tail)
        self.mirror_k = self.mirror_v = None
        self.tail_start: int | None = None
        self.front = 0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]
            self.free = [torch.cuda.Event(), torch.cuda.Event()]
        self.k = LayerView([self.dev_k[i] for i in range(resident_layers)]
                           + [self.host_k[j].transpose(0, 1) for j in range(n_off)], self.host_sync)
        self.v = LayerView([self.dev_v[i] for i in range(resident_layers)]
                           + [self.host_v[j].transpose(0, 1) for j in range(n_off)], self.host_sync)
        self.pieces: list[tuple[int, int, int]] = []
        self.issued = self.used = 0
        self.reset()

    # ------------------------------------------------------------------------------ bookkeeping
    def host_bytes(self) -> int:
        return 2 * self.host_k.numel() * self.host_k.element_size()

    def reset(self) -> None:
        super().reset()
        self.tail_start = None
        self.high = 0  # end of the highest position ever written since the reset

    def host_sync(self) -> None:
        """Wait until queued device-to-host writes landed (before host code reads the store)."""
        if self.cuda:
            self.copy_stream.synchronize()

    def offloaded_index(self, layer: int) -> int | None:
        """Index of `layer` among the offloaded layers (None: its KV is on the device)."""
        return None if layer < self.resident_layers else layer - self.resident_layers

    def layout_key(self) -> tuple:
        """What a draft's captured graph bakes in about this store: the mirror buffer and its layout
        (where the tail starts is not: graphs read it from the reader's device scalars)."""
        m = self.mirror_k
        return () if m is None else (m.data_ptr(), m.shape[1], self.front)

    # ------------------------------------------------------------------------------ copies
    def _issue(self) -> None:
        """Start copying the next prefix piece into its slot once that slot's last reader is done."""
        j = self.issued
        layer, a, b = self.pieces[j]
        i, n = j % 2, b - a
        src_k, src_v = self.host_k[self.offloaded_index(layer), a:b], self.host_v[self.offloaded_index(layer), a:b]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.free[i])
                self.slot_k[i, :n].copy_(src_k, non_blocking=True)
                self.slot_v[i, :n].copy_(src_v, non_blocking=True)
                self.ready[i].record(self.copy_stream)
        else:
            self.slot_k[i, :n].copy_(src_k)
            self.slot_v[i, :n].copy_(src_v)
        self.issued += 1

    def _take(self) -> tuple[int, int, int]:
        """The next prefix piece (slot, a, b), waited for on the compute stream."""
        j = self.used
        _, a, b = self.pieces[j]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[j % 2])
        self.used += 1
        return j % 2, a, b

    def _release(self, slot: int) -> None:
        """The compute stream is done with `slot` (once queued work ran): refill it with the next piece."""
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        if self.issued < len(self.pieces):
            self._issue()

    def _to_host(self, j: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [KVH, T, D] (rotated) -> host positions pos.. of offloaded layer j, async on CUDA."""
        e = pos + k.shape[1]
        self.high = max(self.high, e)
        src_k, src_v = k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous()
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.host_k[j, pos:e].copy_(src_k, non_blocking=True)
                self.host_v[j, pos:e].copy_(src_v, non_blocking=True)
            src_k.record_stream(self.copy_stream)
            src_v.record_stream(self.copy_stream)
        else:
            self.host_k[j, pos:e].copy_(src_k)
            self.host_v[j, pos:e].copy_(src_v)
        ts = self.tail_start
        if ts is not None and e > ts:
            lo = max(pos, ts)
            self.tail_k[j, lo - ts:e - ts] = src_k[lo - pos:]
            self.tail_v[j, lo - ts:e - ts] = src_v[lo - pos:]

    def _from_host(self, j: int, a: int, b: int, values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions [a, b) of offloaded layer j on the device, token-major; after pending host writes."""
        if not self.cuda:
            return self.host_k[j, a:b], self.host_v[j, a:b] if values else None
        with torch.cuda.stream(self.copy_stream):
            k = self.host_k[j, a:b].to(self.device, non_blocking=True)
            v = self.host_v[j, a:b].to(self.device, non_blocking=True) if values else None
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.copy_stream)
        for x in (k, v):
            if x is not None:
                x.record_stream(current)
        return k, v

    # ------------------------------------------------------------------------------ forward
    def begin(self, n_new: int) -> None:
        super().begin(n_new)
        s = self.length
        self.pieces = [(layer, a, min(a + self.piece, s)) for layer in range(self.resident_layers, self.n_layers)
                       for a in range(0, s, self.piece)]
        self.issued = self.used = 0
        for _ in range(min(2, len(self.pieces))):
            self._issue()

    def attend(self, layer, q, k, v):
        q, k = rope_qk(q, k, self.cos, self.sin)
        s, e = self.length, self.length + q.shape[2]
        j = self.offloaded_index(layer)
        if j is None:  # resident: exactly FullCache
            self.dev_k[layer, :, s:e] = k[0]
            self.dev_v[layer, :, s:e] = v[0]
            return attention(q, self.dev_k[layer, :, :e], self.dev_v[layer, :, :e])
        self._to_host(j, s, k[0], v[0])
        n_pieces = -(-s // self.piece)
        if n_pieces == 0:
            return attention(q, k[0], v[0])
        if n_pieces == 1 and e <= self.piece:  # the whole layer fits one slot: one SDPA call, as FullCache
            slot, _, _ = self._take()
            self.slot_k[slot, s:e] = k[0].transpose(0, 1)
            self.slot_v[slot, s:e] = v[0].transpose(0, 1)
            out = attention(q, self.slot_k[slot, :e].transpose(0, 1), self.slot_v[slot, :e].transpose(0, 1))
            self._release(slot)
            return out
        return self._merged(q[0], k[0], v[0], n_pieces)[None]

    def _merged(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_pieces: int) -> torch.Tensor:
        """Attention over the streamed prefix pieces and the new tokens, merged by log-sum-exp.

        Queries go in blocks so the float32 scores of one (block, piece) stay under SCORE_BLOCK.
        """
        h, t, d = q.shape
        if t >= PREFILL_MIN_TOKENS and can_use_cudnn(q[None], k):  # a prefill chunk: fused kernels, no score blocks
            return self._merged_cudnn(q, k, v, n_pieces)
        out = torch.empty(h, t, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(h, t, dtype=torch.float32, device=q.device)
        qb = max(1, SCORE_BLOCK // (h * max(self.piece, t)))
        for p in range(n_pieces + 1):
            if p < n_pieces:
                slot, a, b = self._take()
                keys, vals = self.slot_k[slot, :b - a].transpose(0, 1), self.slot_v[slot, :b - a].transpose(0, 1)
                causal = False
            else:
                keys, vals, causal = k, v, True
            for t0 in range(0, t, qb):
                t1 = min(t, t0 + qb)
                # causal block: queries t0..t1 see new keys 0..t1 (bottom-right aligned)
                kk, vv = (keys[:, :t1], vals[:, :t1]) if causal else (keys, vals)
                block = partial_attention(q[:, t0:t1], kk, vv, causal)
                acc = None if p == 0 else (out[:, t0:t1], lse[:, t0:t1])
                o, l = merge_blocks(acc, block)
                out[:, t0:t1], lse[:, t0:t1] = o, l
            if p < n_pieces:
                self._release(slot)
        return out.to(q.dtype)

    def _merged_cudnn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_pieces: int) -> torch.Tensor:
        """`_merged` for a prefill chunk: one cuDNN call per streamed piece (no mask) and one for the
        chunk over itself (square causal), merged by log-sum-exp; the float32 scores of the
        einsum path, in query blocks, cost a 120K offloaded prefill far more than its PCIe copies."""
        acc = None
        for p in range(n_pieces + 1):
            if p < n_pieces:
                slot, a, b = self._take()
                keys, vals = self.slot_k[slot, :b - a].transpose(0, 1), self.slot_v[slot, :b - a].transpose(0, 1)
            else:
                keys, vals = k, v
            o, lse = attention_lse(q[None], keys[None], vals[None], causal=p == n_pieces)
            acc = (o[0].float(), lse[0]) if acc is None else (merge_lse(acc, (o[0], lse[0])), torch.logaddexp(acc[1], lse[0]))
            if p < n_pieces:
                self._release(slot)
        return acc[0].to(q.dtype)

    # ------------------------------------------------------------------------------ store API
    def read(self, layer: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated K/V of positions [a, b) on the device, head-major [KVH, b - a, D] (may be views).

        Served from the tail mirror when it covers the range, else copied from host memory.
        """
        return self._read(layer, a, b, True)

    def read_k(self, layer: int, a: int, b: int) -> torch.Tensor:
        return self._read(layer, a, b, False)[0]

    def _read(self, layer: int, a: int, b: int, values: bool):
        j = self.offloaded_index(layer)
        if j is None:
            return self.dev_k[layer, :, a:b], self.dev_v[layer, :, a:b] if values else None
        ts = self.tail_start
        parts = []
        if ts is None or a < ts:
            parts.append(self._from_host(j, a, b if ts is None else min(b, ts), values))
        if ts is not None and b > ts:
            lo = max(a, ts) - ts
            parts.append((self.tail_k[j, lo:b - ts], self.tail_v[j, lo:b - ts] if values else None))
        if len(parts) == 1:
            k, v = parts[0]
        else:
            k = torch.cat([p[0] for p in parts])
            v = torch.cat([p[1] for p in parts]) if values else None
        return k.transpose(0, 1), v.transpose(0, 1) if values else None

    def write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store rotated k/v [KVH, T, D] at positions pos.. (a draft's speculative tokens).

        Host memory stays the complete copy; the tail mirror gets the part it covers.
        """
        j = self.offloaded_index(layer)
        if j is None:
            self.dev_k[layer, :, pos:pos + k.shape[1]] = k
            self.dev_v[layer, :, pos:pos + k.shape[1]] = v
        else:
            self._to_host(j, pos, k, v)

    def gather(self, layer: int, idx: torch.Tensor, out_k: torch.Tensor, out_v: torch.Tensor) -> None:
        """out_k/out_v [KVH, n, D] <- positions idx [KVH, n] of `layer` (selection time: may read host memory)."""
        j = self.offloaded_index(layer)
        if j is None:
            i = idx[..., None].expand(-1, -1, self.head_dim)
            torch.gather(self.dev_k[layer], 1, i, out=out_k)
            torch.gather(self.dev_v[layer], 1, i, out=out_v)
            return
        # host side: whole head_dim rows by advanced indexing of the token-major layer (an
        # element-wise torch.gather over a transposed host view took ~100 ms per 7B layer)
        self.host_sync()
        idx = idx.cpu()
        heads = torch.arange(self.n_kv_heads)[:, None]
        out_k.copy_(self.host_k[j][idx, heads])
        out_v.copy_(self.host_v[j][idx, heads])

    def keep_tail(self, start: int, front: int = 0) -> None:
        """Mirror positions >= start of the offloaded layers on the device (a draft reads them every step).

        The mirror of offloaded layer j is one buffer [front + cap + 1, KVH, D]: `front` rows a
        draft fills with its selected KV (`put_front`), the tail (positions start.., cap =
        max_length + 1 - start tokens, filled from host once) and a last scratch row for
        graph-mode writes that must not land. So one kernel reads selection + tail in a CUDA graph.
        """
        n_off = self.n_layers - self.resident_layers
        if not n_off or (start, front) == (self.tail_start, self.front):
            return
        cap = self.max_length + 1 - start
        rows = front + cap + 1
        if self.mirror_k is None or self.mirror_k.shape[1] < rows:
            self.mirror_k = self.mirror_v = None  # free the old buffer before allocating
            shape = (n_off, rows, self.n_kv_heads, self.head_dim)
            self.mirror_k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.mirror_v = torch.empty_like(self.mirror_k)
        self.front, self.tail_start = front, start
        self.tail_k, self.tail_v = self.mirror_k[:, front:front + cap], self.mirror_v[:, front:front + cap]
        end = self.high  # host holds every position written (speculative ones too); later writes go to both
        for j in range(n_off if end > start else 0):
            k, v = self._from_host(j, start, end)
            self.tail_k[j, :end - start] = k
            self.tail_v[j, :end - start] = v

    def put_front(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """A draft's selected KV [KVH, n, D] of `layer` into the mirror's front rows (offloaded layers only)."""
        j = self.offloaded_index(layer)
        if j is not None:
            self.mirror_k[j, :k.shape[1]] = k.transpose(0, 1)
            self.mirror_v[j, :v.shape[1]] = v.transpose(0, 1)

    def mirror(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Offloaded layer j's mirror, head-major [KVH, rows, D] (views), for graph-mode readers."""
        return self.mirror_k[j].transpose(0, 1), self.mirror_v[j].transpose(0, 1)
