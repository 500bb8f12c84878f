"""CUDA graphs of the decode step (model forward + Triton attention + KV write + logits + sampling).

One graph per bucketed batch size, all sharing one memory pool (captured largest first, as vLLM does).
Inputs live in static buffers that the caller fills in place, on the device:
    ids / pos  [max_batch]           the token each row decodes and its RoPE position
    slots      [max_batch] int32     where its k/v go (-1: padding row, nothing is written)
    table      [max_batch, W] int32  each row's context slots, in order (shared trunk slots repeat per row)
    lens       [max_batch] int32     how many of them it sees (its own new slot included)
    temperature [max_batch] f32      0 = greedy
A replay leaves the sampled tokens in `tokens[:b]` and their logprobs in `logprobs[:b]`, on the device: the
decode loop feeds them back with device copies, so one step needs no host synchronisation at all; the
engine syncs once per step when it reads the tokens for the NPR state machine.
"""
from __future__ import annotations

import torch

from engine.triton_attention import decode_attention, default_splits, store_kv

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def sample(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample on the GPU without a host sync: exponential-race (Gumbel-max) over softmax(logits / T);
    T == 0 rows take the argmax. Returns (tokens int64 [B], logprob of each under the sampling law)."""
    t = temperature.clamp_min(1e-6)[:, None]
    logp = torch.log_softmax(logits / t, dim=-1)
    race = logp - torch.empty_like(logp).exponential_().log()  # argmax of p / Exp(1)
    tok = torch.where(temperature > 0, race.argmax(-1), logits.argmax(-1))
    lp = torch.where(temperature > 0, logp.gather(1, tok[:, None])[:, 0],
                     torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0])
    return tok, lp


class _TableAttention:
    """Graph-side backend: fused KV write then Triton decode over the static slot table."""

    def __init__(self, k, v, slots, table, lens, splits):
        self.k, self.v, self.slots, self.table, self.lens, self.splits = k, v, slots, table, lens, splits

    def __call__(self, layer, q, k, v):
        kc, vc = self.k[layer], self.v[layer]
        store_kv(k, v, kc, vc, self.slots)
        return decode_attention(q, kc, vc, table=self.table, lens=self.lens, num_splits=self.splits)


class DecodeGraphs:
    def __init__(self, model, k_cache: torch.Tensor, v_cache: torch.Tensor, max_context: int,
                 buckets=DEFAULT_BUCKETS, max_batch: int | None = None):
        dev = k_cache.device
        self.model, self.k, self.v = model, k_cache, v_cache
        self.buckets = sorted(b for b in buckets if max_batch is None or b <= max_batch)
        n = self.max_batch = self.buckets[-1]
        self.max_context = max_context
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.table = torch.zeros(n, max_context, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.temperature = torch.zeros(n, dtype=torch.float32, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _step(self, b: int, attn) -> None:
        hidden = self.model(self.ids[:b], self.pos[:b], attn)
        tok, lp = sample(self.model.compute_logits(hidden), self.temperature[:b])
        self.tokens[:b].copy_(tok)
        self.logprobs[:b].copy_(lp)

    def _attn(self, b: int) -> _TableAttention:
        return _TableAttention(self.k, self.v, self.slots[:b], self.table[:b], self.lens[:b],
                               default_splits(b, self.k.shape[2], self.k.device))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (call once the caches exist)."""
        pool = None
        rot = self.model.model.rotary_emb  # a table covering max_position_embeddings: no host sync in forward
        self.rope_table = rot.ensure(rot.max_positions, self.k.device)  # the graphs read it: keep it alive
        self.slots.fill_(-1)  # capture runs write nothing into the cache
        self.lens.fill_(1)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up off the capture stream: Triton compiles, cuBLAS picks
            for b in reversed(self.buckets):
                self._step(b, self._attn(b))
        torch.cuda.current_stream().wait_stream(s)
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._step(b, self._attn(b))
            pool = g.pool() if pool is None else pool
            self.graphs[b] = g
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch {n} exceeds the largest captured bucket {self.max_batch}")

    def replay(self, n: int) -> int:
        """Run the step for rows [0, n) of the static buffers (rows n..bucket must be padding: slots -1,
        lens >= 0). Returns the bucket used; results in tokens[:n], logprobs[:n]."""
        b = self.bucket(n)
        if b > n:
            self.slots[n:b].fill_(-1)
            self.lens[n:b].fill_(0)
        self.graphs[b].replay()
        return b
