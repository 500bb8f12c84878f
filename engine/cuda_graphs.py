"""CUDA graphs of the decode step (model forward + Triton attention + KV write + logits + sampling).

One graph per bucketed batch size, all sharing one memory pool (captured largest first, as vLLM does).
Inputs live in static device buffers that the caller fills in place:
    inputs     [7, max_batch + 1] int64  per row: ids, pos, slots, lens, rows, starts, trunks (the views below)
      ids / pos                       the token each row decodes and its RoPE position
      slots                           where its k/v go (-1: padding row, nothing is written)
      lens                            how many context slots it sees (its own new slot included)
      rows                            its row of the slot table (at first row r for batch row r)
      starts / trunks                 fork groups (engine/triton_fork_attention.py): group g's first row, then
                                      any values >= the batch; the table entries its rows share (at first
                                      every row its own group, trunk 0). Buckets of FORK_GROUPS_FROM rows or
                                      more have a second graph whose attention reads a group's trunk once;
                                      a step replays it when most of its rows are in groups of two or more
    table      [table_rows, W] int32  context slots per table row, in order (shared trunk slots repeat per
                                      row); a replay first appends each row's new slot at table[rows, lens - 1]
    temperature [max_batch] f32       0 = greedy
A replay leaves the sampled tokens in `tokens[:b]` and their logprobs in `logprobs[:b]`, on the device (the
logits in `logits[b]`: the model's dtype when a plain CausalLM samples in the graph, else float32): the
decode loop feeds them back with device copies, so one step needs no host synchronisation at all; the
engine syncs once per step when it reads the tokens for the NPR state machine. With `sample=False` the
graphs stop at the logits for a sampler that lives outside (per-request seeds): `run_items` is the engine's
step, which keeps each branch on one table row across steps so that a step sends only its O(rows) inputs.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.host_copies import pinned, upload
from engine.model import CausalLM
from engine.scheduler import independent
from engine.slot_decode import decode_step, fork_groups, rows_per_group

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Buckets from this many rows also get a graph with the fork-group attention kernel (engine/triton_fork_attention.py);
# below it the per-row launch, which rotates q / k itself, is faster even for groups (fewer programs than SMs).
FORK_GROUPS_FROM = 128


def sample(logits: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference of the graphs' sampler (engine/triton_sampling.py runs on the GPU): exponential race
    (Gumbel-max) over softmax(logits / T), no host sync; T == 0 rows take the argmax. noise: Exp(1) draws shaped
    like logits (default: drawn here). Returns (tokens int64 [B], logprob of each under the sampling law)."""
    hot = temperature > 0
    logp = torch.log_softmax(logits / torch.where(hot, temperature, 1.0)[:, None], dim=-1)  # greedy: T=1 law
    noise = torch.empty_like(logp).exponential_() if noise is None else noise
    race = logp - noise.log()  # argmax of p / Exp(1)
    tok = torch.where(hot, race.argmax(-1), logp.argmax(-1))
    return tok, logp.gather(1, tok[:, None])[:, 0]


_compiled: dict = {}


def compiled(fn):
    """One torch.compile wrapper per function and process: every DecodeGraphs of the same model (the bench's
    and an engine's) then hits the same dynamo cache instead of compiling the 36-layer step again (minutes)."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=True)
    return _compiled[fn]


class DecodeGraphs:
    def __init__(self, model, k_cache: torch.Tensor, v_cache: torch.Tensor, max_context: int,
                 buckets=DEFAULT_BUCKETS, max_batch: int | None = None, compile: bool = False,
                 sample: bool = True):
        dev = k_cache.device
        self.model, self.k, self.v = model, k_cache, v_cache
        # compile: inductor fuses the ~50 small elementwise kernels per layer that dominate small batches
        self.forward = compiled(decode_step) if compile else decode_step
        self.buckets = sorted(b for b in buckets if max_batch is None or b <= max_batch)
        n = self.max_batch = self.buckets[-1]
        self.max_context = max_context
        self.group_rows = rows_per_group(model.args.num_heads, model.args.num_kv_heads)  # rows a fork group holds
        self.inputs = torch.zeros(7, n + 1, dtype=torch.long, device=dev)
        views = self.inputs.unbind(0)  # views of the one buffer that a launch fills with one copy
        self.ids, self.pos, self.slots, self.lens, self.rows, _, self.trunks = (x[:n] for x in views)
        self.starts = views[5]
        self.rows.copy_(torch.arange(n))
        self.starts.copy_(torch.arange(n + 1))
        # a table row per branch of two full batches (rows of the last step stay while new ones come), and
        # a scratch row that padding rows append into
        self.table = torch.zeros(2 * n + 1, max_context, dtype=torch.int32, device=dev)
        self.scratch = 2 * n
        self.temperature = torch.zeros(n, dtype=torch.float32, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
        self.seed = torch.randint(1 << 62, (1,), device=dev)  # the fused sampler's Philox seed, bumped per replay
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (bucket, fork-group attention) -> graph
        self.sample, self.logits, self.outputs = sample, {}, {}  # bucket -> the last replay's logits; per graph
        # the in-graph sampler reads the LM head's bf16 output directly, unless the model's compute_logits is
        # not the plain one (a wrapper or subclass that changes the logits, e.g. masks tokens)
        self.head_only = sample and type(model).compute_logits is CausalLM.compute_logits
        self.reset_rows()

    @staticmethod
    def variants(b: int) -> tuple[bool, ...]:
        """Attention kernels a bucket is captured with: the per-row one, and from FORK_GROUPS_FROM rows the
        fork-group one too (a step takes it when most of its rows share a trunk with others)."""
        return (False, True) if b >= FORK_GROUPS_FROM else (False,)

    def _step(self, b: int, fork: bool = False) -> None:
        meta = self.inputs[2:, :b + 1].to(torch.int32)  # int32 for the Triton kernels
        slots, lens, rows, starts, trunks = meta.unbind(0)
        slots, lens, rows, trunks = slots[:b], lens[:b], rows[:b], trunks[:b]
        self.table[torch.where(slots >= 0, rows, self.scratch), (lens - 1).clamp_min(0)] = slots
        groups = (starts, trunks) if fork else None
        logits = self.forward(self.model, self.ids[:b], self.pos[:b], self.k, self.v, slots, self.table, lens, rows,
                              self.head_only, groups)
        self.logits[b] = self.outputs[b, fork] = logits
        if self.sample and logits.is_cuda:  # one fused read of the logits (engine/triton_sampling.py)
            from engine.triton_sampling import gumbel_sample

            gumbel_sample(logits, self.temperature[:b], self.seed, self.tokens[:b], self.logprobs[:b])
            self.seed.add_(1)
        elif self.sample:
            tok, lp = sample(logits.float(), self.temperature[:b])
            self.tokens[:b].copy_(tok)
            self.logprobs[:b].copy_(lp)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (call once the caches exist)."""
        pool = None
        # a RoPE table covering every position: the forward then never syncs on positions.max()
        rot = self.model.model.rotary_emb
        self.rope_table = rot.ensure(self.model.args.max_position_embeddings, self.k.device)  # keep it alive
        if self.k.device.type != "cuda":
            return  # no graphs: each replay runs the step (CPU tests of the host path)
        self.slots.fill_(-1)  # capture runs write nothing into the cache
        self.lens.fill_(1)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up off the capture stream: Triton compiles, cuBLAS picks
            for b in reversed(self.buckets):
                for fork in self.variants(b):
                    self._step(b, fork)
        torch.cuda.current_stream().wait_stream(s)
        for b in reversed(self.buckets):
            for fork in self.variants(b):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self._step(b, fork)
                pool = g.pool() if pool is None else pool
                self.graphs[b, fork] = g
        torch.cuda.synchronize()

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch {n} exceeds the largest captured bucket {self.max_batch}")

    def replay(self, n: int, fork: bool = False) -> int:
        """Run the step for rows [0, n) of the static buffers (rows n..bucket are made padding: slots -1,
        lens 0; `starts` must then leave them groups of their own). Returns the bucket used; results in
        tokens[:n], logprobs[:n]. fork: through the fork-group attention kernel, where the bucket has it."""
        b = self.bucket(n)
        if b > n:
            self.slots[n:b].fill_(-1)
            self.lens[n:b].fill_(0)
        self._replay(b, fork)
        return b

    def _replay(self, b: int, fork: bool = False) -> None:
        fork = fork and fork in self.variants(b)
        g = self.graphs.get((b, fork))
        if g is None:
            return self._step(b, fork)
        g.replay()
        self.logits[b] = self.outputs[b, fork]

    # host -> device: one copy of every row's inputs, one of the table patches ---------------------
    def _launch(self, n: int, rows: list[int], patches: tuple[list, list, list], fed=None,
                groups: tuple[list, list] = ((), ())) -> torch.Tensor:
        """rows: (id, pos, slot, len, table row) of the n real rows, flat; patches: table (rows, cols, slots);
        fed: the rows' ids as a device tensor instead (a step launched before the host knows them); groups:
        (first row, trunk) of each fork group, in row order (none: every row its own group)."""
        host = np.empty((7, self.max_batch + 1), dtype=np.int64)
        host[:5, :n] = np.array(rows, dtype=np.int64).reshape(n, 5).T
        host[:5, n:] = np.array([0, 0, -1, 0, self.scratch])[:, None]  # padding rows
        starts, trunks = groups if groups[0] else (range(n), [0] * n)
        g = len(starts)
        alone = sum(1 for i in range(g) if (starts[i + 1] if i + 1 < g else n) - starts[i] == 1)
        fork = 2 * (n - alone) >= n  # most rows share their trunk: the fork-group kernel reads it once a group
        host[5, :g], host[6, :g] = starts, trunks
        host[5, g:] = np.arange(n, n + self.max_batch + 1 - g)  # padding rows: groups of their own
        host[6, g:] = 0
        self.inputs.copy_(pinned(host, self.inputs.device), non_blocking=True)
        if fed is not None:
            self.ids[:n].copy_(fed)
        if patches[0]:
            p = upload(np.array(patches, dtype=np.int32), self.table.device)
            self.table[p[0], p[1]] = p[2]
        b = self.bucket(n)
        self._replay(b, fork)
        return self.logits[b][:n]

    def run(self, ids: list[int], pos: list[int], contexts: list[list[int]]) -> torch.Tensor:
        """One decode step from host lists: row i decodes ids[i] at pos[i] over `contexts[i]` (its new token's
        slot last), on table row i. Returns logits [n, V] (a view of the graph's output, valid until the next
        replay)."""
        width = max(map(len, contexts))
        if width > self.max_context:
            raise ValueError(f"context of {width} slots exceeds the graphs' max_context {self.max_context}")
        self.reset_rows()  # the engine's rows are overwritten
        patches = ([i for i, c in enumerate(contexts) for _ in c], [j for c in contexts for j in range(len(c))],
                   [s for c in contexts for s in c])
        return self._launch(len(ids), [x for i, (t, p, c) in enumerate(zip(ids, pos, contexts))
                                       for x in (t, p, c[-1], len(c), i)], patches)

    def reset_rows(self) -> None:
        """Forget which branch holds which table row (the engine calls it at the start of a generate)."""
        self.row_of: dict = {}  # (request id, segment) -> [table row, KV segments, ancestor slots, own slots, step]
        self.free = list(range(self.scratch - 1, -1, -1))
        self.step = 0

    def _row(self) -> int:
        if not self.free:  # evict every branch that was not in the last step (done, waiting or preempted)
            for key in [k for k, e in self.row_of.items() if e[4] < self.step]:
                self.free.append(self.row_of.pop(key)[0])
        return self.free.pop()

    def run_items(self, items, slots: dict[int, list[int]], fed: torch.Tensor | None = None) -> torch.Tensor:
        """The engine's decode step over scheduler items (one token each; `Item.kvs`, `Item.length`; `slots`:
        the KV store's segment -> slots). A branch keeps its table row across steps: the row is written whole
        only when the branch is new to the table or its KV segments changed (fork, join, preemption); tokens
        it added in eager steps since its last graph step are patched in; the new slot the replay appends
        itself. fed: item i's input token is fed[i] on the device, at the position after its segment's last
        known one (`LLM`'s step ahead: the token the previous step draws). Returns logits [n, V] (a view of the
        graph's output, valid until the next replay)."""
        self.step += 1
        step, row_of = self.step, self.row_of
        pr, pc, ps = [], [], []
        rows = []  # flat: (id, pos, slot, len, table row) per item
        if not independent(items):  # the launch would read K/V it is writing (a scheduler bug)
            raise RuntimeError("graph step: an item sees a segment this step extends; such items must wait for a "
                               "later step (Scheduler.split_headers)")
        keys, trunks = [], []  # fork groups: consecutive branches under the same ancestors share a trunk
        for it in items:
            seg = it.req.segs[it.seg]
            kvs, start, length = it.kvs, it.start, it.length
            own = slots[kvs[-1]]
            n_own = start + 1
            n_anc = length - n_own
            key = (it.req.rid, it.seg)
            e = row_of.get(key)
            if e is None or e[1] != kvs or e[2] != n_anc:  # (re)write the whole row, but the new slot
                row = e[0] if e is not None else self._row()
                e = row_of[key] = [row, kvs, n_anc, 0, 0]
                pr += [row] * (n_anc + n_own - 1)
                pc += range(n_anc + n_own - 1)
                for k in kvs[:-1]:
                    ps += slots[k]
                ps += own[:n_own - 1]
            elif n_own - e[3] > 1:  # tokens of eager steps since the last graph step
                pr += [e[0]] * (n_own - 1 - e[3])
                pc += range(n_anc + e[3], n_anc + n_own - 1)
                ps += own[e[3]:n_own - 1]
            e[3], e[4] = n_own, step
            keys.append(kvs[:-1] or None)
            trunks.append(n_anc)
            if fed is None:
                rows += (seg.tokens[start], seg.positions[start], own[start], length, e[0])
            else:
                rows += (0, seg.positions[start - 1] + 1, own[start], length, e[0])
        return self._launch(len(items), rows, (pr, pc, ps), fed, fork_groups(keys, trunks, self.group_rows))

    def forget_last(self, req, seg: int, n_own: int) -> None:
        """A step ahead's token was given back (`LLM`): the branch's table row holds n_own own slots again."""
        e = self.row_of.get((req.rid, seg))
        if e is not None:
            e[3] = min(e[3], n_own)
