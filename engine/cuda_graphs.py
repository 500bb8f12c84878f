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
engine syncs once per step when it reads the tokens for the NPR state machine. With `sample=False` the
graphs stop at the logits (`run()` returns them) for a sampler that lives outside (per-request seeds).
"""
from __future__ import annotations

import torch

from engine.triton_attention import decode_attention, store_kv

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def sample(logits: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample on the GPU without a host sync: exponential-race (Gumbel-max) over softmax(logits / T);
    T == 0 rows take the argmax. Returns (tokens int64 [B], logprob of each under the sampling law)."""
    hot = temperature > 0
    logp = torch.log_softmax(logits / torch.where(hot, temperature, 1.0)[:, None], dim=-1)  # greedy: T=1 law
    race = logp - torch.empty_like(logp).exponential_().log()  # argmax of p / Exp(1)
    tok = torch.where(hot, race.argmax(-1), logp.argmax(-1))
    return tok, logp.gather(1, tok[:, None])[:, 0]


# Opaque to torch.compile, which fuses the model's norms, RoPE and SwiGLU around it. Declared as mutating
# nothing: the KV write is a side effect on the caches, which nothing else in the compiled graph reads, and
# declaring the 30-GB cache as mutated would let functionalization copy it. The split count is derived
# from the concrete batch inside, so one dynamic-shape compile serves every bucket.
@torch.library.custom_op("npr::slot_decode", mutates_args=())
def slot_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layer: int, slots: torch.Tensor, table: torch.Tensor,
                lens: torch.Tensor) -> torch.Tensor:
    kc, vc = k_cache[layer], v_cache[layer]
    store_kv(k, v, kc, vc, slots)
    return decode_attention(q, kc, vc, table=table, lens=lens)


@slot_decode.register_fake
def _(q, k, v, k_cache, v_cache, layer, slots, table, lens):
    return torch.empty_like(q)


def decode_step(model, ids, pos, k_cache, v_cache, slots, table, lens):
    """hidden -> logits of one decode step over the slot table (the function that is compiled)."""
    def attn(layer, q, k, v):
        return torch.ops.npr.slot_decode(q, k, v, k_cache, v_cache, layer, slots, table, lens)

    return model.compute_logits(model(ids, pos, attn))


_compiled_step = None


def compiled_decode_step():
    """One torch.compile wrapper per process: every DecodeGraphs of the same model (the bench's and an
    engine's) then hits the same dynamo cache instead of compiling the 36-layer step again (minutes)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, dynamic=True)
    return _compiled_step


class DecodeGraphs:
    def __init__(self, model, k_cache: torch.Tensor, v_cache: torch.Tensor, max_context: int,
                 buckets=DEFAULT_BUCKETS, max_batch: int | None = None, compile: bool = False,
                 sample: bool = True):
        dev = k_cache.device
        self.model, self.k, self.v = model, k_cache, v_cache
        # compile: inductor fuses the ~50 small elementwise kernels per layer that dominate small batches
        self.forward = compiled_decode_step() if compile else decode_step
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
        self.sample, self.logits = sample, {}  # bucket -> the graph's own logits output

    def _step(self, b: int) -> None:
        logits = self.forward(self.model, self.ids[:b], self.pos[:b], self.k, self.v, self.slots[:b],
                              self.table[:b], self.lens[:b])
        self.logits[b] = logits
        if self.sample:
            tok, lp = sample(logits, self.temperature[:b])
            self.tokens[:b].copy_(tok)
            self.logprobs[:b].copy_(lp)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (call once the caches exist)."""
        pool = None
        # a RoPE table covering every position: the forward then never syncs on positions.max()
        rot = self.model.model.rotary_emb
        self.rope_table = rot.ensure(self.model.args.max_position_embeddings, self.k.device)  # keep it alive
        self.slots.fill_(-1)  # capture runs write nothing into the cache
        self.lens.fill_(1)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up off the capture stream: Triton compiles, cuBLAS picks
            for b in reversed(self.buckets):
                self._step(b)
        torch.cuda.current_stream().wait_stream(s)
        for b in reversed(self.buckets):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._step(b)
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

    def run(self, ids: list[int], pos: list[int], contexts: list[list[int]]) -> torch.Tensor:
        """One decode step from host lists (the engine's path): row i decodes ids[i] at pos[i] over
        `contexts[i]` (its new token's slot last). Returns logits [n, V] (a view of the graph's output,
        valid until the next replay). Copies go host -> device once per buffer; nothing syncs."""
        n = len(ids)
        width = max(map(len, contexts))
        if width > self.max_context:
            raise ValueError(f"context of {width} slots exceeds the graphs' max_context {self.max_context}")
        table = torch.zeros(n, width, dtype=torch.int32)
        for i, c in enumerate(contexts):
            table[i, :len(c)] = torch.as_tensor(c, dtype=torch.int32)
        rows = torch.tensor([ids, pos, [c[-1] for c in contexts], [len(c) for c in contexts]])
        self.table[:n, :width].copy_(table, non_blocking=True)
        self.ids[:n].copy_(rows[0], non_blocking=True)
        self.pos[:n].copy_(rows[1], non_blocking=True)
        self.slots[:n].copy_(rows[2], non_blocking=True)
        self.lens[:n].copy_(rows[3], non_blocking=True)
        return self.logits[self.replay(n)][:n]
