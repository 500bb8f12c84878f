"""`LLM`: the NPR-Engine's public API: generate trajectories with fork/join parallel decoding.

    llm = LLM("path/to/hf_model_dir")                     # or a CausalLM + tokenizer
    trajs = llm.generate(["<prompt>"], SamplingParams(temperature=0, seed=0))
    llm.update_weights(named_tensors, version=3)         # between generate calls only

One loop: the scheduler picks the tokens of the next forward (decodes of every live branch, forced
headers, prompt chunks), the model runs them over the KV slots, the sampler draws one token per branch
that reached its segment's end (engine/sampler.py `BatchSampler`: counter-based randomness, no host sync but
the one read of the tokens), and each request's state machine takes the transition that token causes.
Decode-only steps replay CUDA graphs (engine/cuda_graphs.py) when enabled.
"""
from __future__ import annotations

import functools
import gc
import random
import warnings
from collections.abc import Callable
from operator import attrgetter
from pathlib import Path
from time import perf_counter as clock

import numpy as np
import torch

from engine import step_ahead
from engine.gc_pauses import GcPauses
from engine.host_copies import upload
from engine.jit_compiles import TritonCompiles
from engine.kv_store import KVStore
from engine.npr_state import Limits, Request
from engine.paged_attention import PagedAttention
from engine.sampler import BatchSampler, SamplingParams
from engine.scheduler import Scheduler, independent
from engine.trajectory_out import no_fork_at, to_trajectory
from npr_async.config import EngineConfig
from npr_async.messages import Trajectory
from npr_async.tags import JOIN_HEADER, TagIds, step_header

# Forced headers (`\n<step>\nK:`, the takeaway's) are a few tokens; extends up to this long that are not prompt
# chunks are fed one token per forward when CUDA graphs are on (Scheduler.split_headers).
SPLIT_HEADERS = 16

# With CUDA graphs, a step in which every row decodes launches the next step of the same rows before its tokens
# reach the host, and so on while every row decodes on (engine/step_ahead.py): 5-7% less per step of the
# engine loop on an H200 with a Qwen3-4B shape (BENCHMARKS.md).
STEP_AHEAD = True

# The host's own work per call, by phase (`last_stats[f"{phase}_ms"]`): scheduling; launch (a forward's inputs,
# its launch and the sampler's, steps ahead included; on the CPU the forward itself); take (the NPR state
# machine); report (trajectories out, `on_finished` included). With wait_ms (blocked on the device) they say
# where a slow call's time went.
HOST_PHASES = ("schedule", "launch", "take", "report")

_tokens, _context_len = attrgetter("n"), attrgetter("length")  # of a scheduler Item, read per row in C


class LLM:
    def __init__(self, model, tokenizer=None, config: EngineConfig = EngineConfig(), device="cpu",
                 dtype: torch.dtype | None = None, fuse: bool | None = None, compile_graphs: bool | None = None,
                 freeze_heap: bool | None = None):
        """`fuse`: fuse q/k/v and gate/up into single GEMMs (`CausalLM.fuse_projections`); None = only a model
        the engine loads itself from a path (a model passed in may be shared, e.g. with a learner).
        `compile_graphs`: with `config.cuda_graphs`, torch.compile the captured decode step (fuses the small
        elementwise kernels; a one-time compile of minutes on a 4B model); None: `config.compile_graphs`.
        `freeze_heap`: the first generate call collects once and moves every object then alive out of the garbage
        collector's reach (`_settle_heap`); None: on a GPU (a process that lives for the engine), off elsewhere."""
        from npr_async.tokenizer import load_tokenizer

        owned = isinstance(model, (str, Path))
        if owned:
            from engine.loader import load_model

            path = Path(model)
            model = load_model(path, dtype or torch.float32, device)
            if tokenizer is None and (path / "tokenizer.json").is_file():
                tokenizer = load_tokenizer(str(path))
        self.model = model.to(device).eval()
        if (owned if fuse is None else fuse) and hasattr(self.model, "fuse_projections"):
            self.model.fuse_projections()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()
        self.config, self.device, self.version = config, torch.device(device), 0
        self.tags = self._tags(self.tokenizer, config)
        self.eos = {i for i in (self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>"))
                    if isinstance(i, int) and i >= 0 and i != self.tokenizer.unk_token_id}
        enc = lambda s: self.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        # tokenised once per step index (a fork asks for each of its K headers)
        self.headers = {"step": functools.cache(lambda k: enc(step_header(k))), "join": enc(JOIN_HEADER)}
        a = model.args
        dtype = next(model.parameters()).dtype
        self.kv = KVStore(a.num_layers, config.kv_slots, a.num_kv_heads, a.head_dim, dtype, self.device)
        self.attn = PagedAttention(self.kv)
        if config.attention_backend == "triton" and self.device.type == "cuda":
            from engine.triton_attention import TritonPagedAttention

            self.attn = TritonPagedAttention(self.kv)
        if config.decode_gemm == "triton" and self.device.type == "cuda" and hasattr(self.model, "set_gemm"):
            from engine.decode_linear import decode_linear

            self.model.set_gemm(decode_linear)
        if self.device.type == "cuda" and getattr(self.model, "fused", False):
            # one launch per norm, in the engine's own (fused) model: a model shared with a learner keeps the
            # reference norm, whose rounding the learner's forwards reproduce bit for bit
            from engine.triton_norm import decode_rms_norm

            self.model.set_norm(decode_rms_norm)
        # CUDA graphs for decode-only steps, captured at the first generate call (GPU only; else eager every step)
        self.use_graphs = bool(config.cuda_graphs) and self.device.type == "cuda"
        self.graphs = None
        self.freeze_heap = self.device.type == "cuda" if freeze_heap is None else freeze_heap
        self._heap_frozen = False
        self._eager_compiled = False
        # the first call's set-up (`_settle_heap`): the eager kernels' compilation, the GEMM tuning
        self.setup_stats: dict = {}
        self.compile_graphs = config.compile_graphs if compile_graphs is None else compile_graphs
        self._busy = False
        self.sampler = BatchSampler(self.device)
        self._seeds = random.Random()
        self.last_stats: dict = {}
        self.last_jit = TritonCompiles()  # the last call's Triton compilations (`last_stats` has their count)

    @staticmethod
    def _tags(tokenizer, config: EngineConfig) -> TagIds:
        """The tags' token ids. Stage 1 decodes sequentially with a stock tokenizer, where the tags are plain
        text of several tokens: then ids no token has stand in, so the state machine never sees a tag."""
        try:
            return TagIds.from_tokenizer(tokenizer)
        except ValueError:
            if config.parallel:
                raise ValueError("this tokenizer lacks the NPR tags as single tokens, which parallel decoding "
                                 "needs: run add_npr_tokens (npr_async.tokenizer), or set engine.parallel: false "
                                 "for sequential (Stage 1) decoding") from None
            from npr_async.tags import NPR_TAGS

            return TagIds({tag: -1 - i for i, tag in enumerate(NPR_TAGS)})

    # weights ----------------------------------------------------------------------------------
    def update_weights(self, named_tensors, version: int) -> int:
        """Copy new weights in place; only between generate calls. Returns how many tensors were copied."""
        if self._busy:
            raise RuntimeError("update_weights during generate: weights change only between steps")
        n = self.model.load_weights((k, t.to(self.device)) for k, t in named_tensors)
        self.version = int(version)
        return n

    def weight_targets(self) -> dict[str, torch.Tensor]:
        """HF name -> the tensor a weight update copies into (views of fused weights): what a weight-sync
        receiver fills in place (`WeightReceiver.recv(llm.weight_targets())`). The CUDA graphs read the same
        storage, so in-place updates reach them."""
        m = self.model
        return m.named_weight_targets() if hasattr(m, "named_weight_targets") else dict(m.named_parameters())

    # generation -------------------------------------------------------------------------------
    def limits(self, p: SamplingParams) -> Limits:
        c = self.config
        return Limits(p.max_total_tokens, p.max_path_tokens, p.max_step_tokens, p.max_plans, c.max_depth,
                      c.fork_margin_tokens, p.parallel and c.parallel)

    @torch.inference_mode()
    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_ids: list[str] | None = None, version: int | None = None, n: int = 1,
                 on_finished: Callable[[int, Trajectory], None] | None = None, max_running: int = 0
                 ) -> list[Trajectory]:
        """One trajectory per (prompt, sample index < n), prompt-major. A prompt is text (tokenised as is,
        no chat template) or token ids, and may end anywhere in an NPR trajectory (e.g. right after
        `</guideline>`: the fork happens at once). `version`: refuse to start on other weights.
        `on_finished(index, trajectory)`: called as each trajectory finishes (index into the returned list),
        while the others still decode; an exception from it stops the call, the KV it held freed.
        `max_running`: at most that many requests decode at once (0: as many as the KV pool holds); the others
        enter, in order and in groups, as earlier ones finish."""
        if version is not None and version != self.version:
            raise RuntimeError(f"asked to generate with weights v{version}, loaded v{self.version}")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts) or (prompt_ids is not None and len(prompt_ids) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts, {len(plist)} params, "
                             f"{len(prompt_ids) if prompt_ids is not None else '-'} prompt ids")
        if on_finished is not None and not callable(on_finished):
            raise TypeError(f"on_finished must be callable(index, trajectory), got {type(on_finished).__name__}")
        self._settle_heap()
        # with graphs, forced headers go one token per forward unless a prompt makes the forward eager anyway:
        # an eager forward of a real model costs several graph steps (BENCHMARKS.md), and unsynchronised
        # requests would otherwise make every fork and join an eager forward for the whole batch
        sched = Scheduler(self.kv, self.config.max_batch_tokens, SPLIT_HEADERS if self.use_graphs else 0,
                          max_running)
        self._sched = sched  # steps ahead stop while a request may be admitted
        reqs = []
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            ids = self._ids(prompt, i)
            for s in range(n):
                req = Request(len(reqs), ids, self.limits(p), self.tags, self.eos, self.headers, p)
                req.prompt_id = prompt_ids[i] if prompt_ids is not None else str(i)
                req.sample_idx = s
                req.seed = (p.seed if p.seed is not None else self._seeds.getrandbits(62)) + s
                reqs.append(req)
                sched.add(req)
        self._busy, self._graph_steps, self._steps_ahead = True, 0, 0
        self.sampler.reset()
        if self.graphs is not None:
            self.graphs.reset_rows()
        done: dict[int, Trajectory] = {}
        self._host = host = dict.fromkeys(HOST_PHASES, 0.0)  # seconds, by phase (HOST_PHASES)
        try:
            forwards = 0
            # the collector's stalls (`_settle_heap` should have ended them) and Triton's compilations, reported
            with GcPauses() as pauses, TritonCompiles() as jit:
                while not sched.done():
                    t0 = clock()
                    items = sched.schedule()  # empty once the last requests finished
                    t1 = clock()
                    self._report(sched.finished, done, on_finished)
                    host["schedule"] += t1 - t0
                    host["report"] += clock() - t1
                    forwards += self._step(items)
                sched.retire()
                t1 = clock()
                self._report(sched.finished, done, on_finished)
                host["report"] += clock() - t1
        finally:
            self._busy = False
            for req in sched.running:  # an exception left them resident: their KV goes back to the pool
                req.detach()
        # wait_ms: the host blocked on each step's tokens (on a GPU: the device still busy); the rest of the
        # call's wall time is host work, so a slow call reads as GPU-bound or host-bound
        self.last_stats = {"forwards": forwards, "graph_steps": self._graph_steps, "steps_ahead": self._steps_ahead,
                           "preemptions": sched.num_preemptions, "gc_ms": pauses.ms, "gc_full": pauses.full,
                           "wait_ms": 1e3 * self.sampler.wait_s, "jit_compiles": jit.count, "jit_ms": jit.ms,
                           **{f"{k}_ms": 1e3 * v for k, v in host.items()}}
        self.last_jit = jit  # which kernels compiled and their new signatures (bench/rollout.py prints them)
        self.last_requests = reqs  # tests: per-request engine state (e.g. suppressed forks)
        return [done[r.rid] if r.rid in done else self._trajectory(r) for r in reqs]

    def _settle_heap(self) -> None:
        """Before a call's requests exist: capture (and compile) the decode graphs if not yet done; then, with
        `freeze_heap`, on the first call or after a capture, collect once and move every object alive (model,
        tokenizer, compiler state: millions after a compile) into the garbage collector's permanent generation, as
        vLLM's and LightLLM's workers do. Its full collections otherwise walk them all: one stalled a 1.2-s rollout
        call for 0.8 s on an H200 host (BENCHMARKS.md). Frozen objects are still freed when their last reference
        goes; the last call's requests are let go first, so no cycle among them is frozen."""
        captured = self.use_graphs and self.graphs is None
        if captured:
            from engine.cuda_graphs import DecodeGraphs

            a = self.model.args
            # no row sees more slots than the pool holds or positions than RoPE covers
            width = min(self.kv.num_slots, a.max_position_embeddings)
            graphs = DecodeGraphs(self.model, self.kv.k, self.kv.v, width, sample=False, compile=self.compile_graphs)
            if self.config.tune_gemms and self.config.decode_gemm == "triton":
                self._tune_gemms(graphs.buckets)
            graphs.capture()  # kept only once whole: a failed capture is tried again at the next call
            self.graphs = graphs
        if self.device.type == "cuda" and not self._eager_compiled:
            # the Triton specialisations eager steps and the sampler can launch, compiled now, not mid-call
            from engine import sampler as sampling
            from engine.jit_warmup import compile_eager_kernels
            from engine.triton_attention import TritonPagedAttention

            try:
                with TritonCompiles() as jit:
                    n = compile_eager_kernels(self.model, self.kv.k[0], self.kv.v[0], self.config.max_batch_tokens,
                                              attention=isinstance(self.attn, TritonPagedAttention),
                                              sample=sampling.FUSED)
                self.setup_stats.update(eager_launches=n, jit_compiles=jit.count, jit_ms=jit.ms)
            except Exception as e:  # an optimisation only: the kernels then compile at their first use
                warnings.warn(f"compiling the eager steps' Triton kernels ahead failed ({e!r}); they compile "
                              "at first use, mid-call", RuntimeWarning, stacklevel=2)
            self._eager_compiled = True
        if self.freeze_heap and (captured or not self._heap_frozen):
            self.last_requests = []
            gc.collect()
            gc.freeze()
            self._heap_frozen = True

    def _tune_gemms(self, rows: list[int]) -> None:
        """The cuBLASLt algorithm of each product the buckets leave to cuBLAS (`tune_decode_gemms`), before the
        capture bakes them into the graphs; `setup_stats` gets its time and how many products changed."""
        from engine.decode_linear import tune_decode_gemms

        t0 = clock()
        try:
            reports = tune_decode_gemms(self.model, rows)
        except Exception as e:  # an optimisation only: F.linear stays where tuning fails
            warnings.warn(f"timing cuBLASLt's GEMM algorithms failed ({e!r}); F.linear runs every product cuBLAS "
                          "takes", RuntimeWarning, stacklevel=2)
            return
        self.setup_stats.update(gemm_tuning_ms=(clock() - t0) * 1e3, gemm_tuned=len(reports),
                                gemm_retuned=sum(r["choice"] is not None for r in reports), gemm_tuning=reports)

    def _report(self, finished: list[Request], done: dict[int, Trajectory], on_finished) -> None:
        """Build and hand out the trajectories of requests finished since the last call (`finished` only grows)."""
        if on_finished is None:
            return
        for req in finished[len(done):]:
            done[req.rid] = traj = self._trajectory(req)
            on_finished(req.rid, traj)

    def _ids(self, prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"prompt {i}: expected text or a list of token ids, got {type(prompt).__name__}")
        vocab = self.model.args.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {i}: must be non-empty token ids in 0..{vocab - 1}")
        return ids

    def _step(self, items) -> int:
        """Run the items' forward, sample, take the transitions; returns the forwards run (more than one when
        steps ran ahead: `STEP_AHEAD`)."""
        if not items:
            return 0
        t = clock()
        graphs = self._graphs_for(items)
        sampling = [i for i, it in enumerate(items) if it.sample is not None]
        todo = [items[i] for i in sampling]
        if graphs is not None:  # decode-only step: one token per row (header tokens among them sample nothing)
            logits = graphs.run_items(items, self.kv.slots)
            self._graph_steps += 1
            if todo and len(todo) < len(items):
                # rows by a device index: a Python list would go up in a blocking copy (a sync)
                logits = logits.index_select(0, upload(np.array(sampling, dtype=np.int64), self.device))
        else:
            logits = self._forward(items)
        if todo:
            fed, out = self.sampler.launch(logits, todo)
        self._host["launch"] += clock() - t
        if not todo:
            return 1
        forwards = 1
        # every row of a graph step decodes: the step after runs ahead of the host, and so on while every row
        # decodes on and no request waits for admission (the scheduler then takes over again)
        ahead = STEP_AHEAD and graphs is not None and len(todo) == len(items)
        while True:
            t = clock()
            nxt = step_ahead.launch(self, todo, graphs, fed) if ahead and not self._sched.window_open() else None
            self._host["launch"] += clock() - t
            tokens, logprobs = self.sampler.collect(out)
            self._take(todo, tokens, logprobs)
            if nxt is None:
                return forwards
            forwards += 1
            self._graph_steps += 1
            self._steps_ahead += 1
            nxt, fed, out = nxt
            on = step_ahead.settle(self, nxt, tokens)
            if not all(on):  # some rows took a transition: the rest keep their drawn token, the scheduler goes on
                tokens, logprobs = self.sampler.collect(out)
                kept = [(it, t, lp) for it, t, lp, k in zip(nxt, tokens, logprobs, on) if k]
                if kept:
                    self._take(*map(list, zip(*kept)))
                return forwards
            todo = nxt

    def _take(self, todo, tokens: list[int], logprobs: list[float]) -> None:
        """Each sampled token's transition, in the items' order; sampler rows of branches done go back."""
        t0 = clock()
        for it, t, lp in zip(todo, tokens, logprobs):
            it.req.on_sampled(it.sample, t, lp)
        for it in todo:  # table rows of branches that will not sample again go back
            if it.req.finish_reason is not None:  # (its own branch too: a step closed by a join is no longer listed)
                self.sampler.release((it.sample, *it.req.branches))
            elif it.sample.state == "done":
                self.sampler.release((it.sample,))
        self._host["take"] += clock() - t0

    def _forward(self, items) -> torch.Tensor | None:
        """An eager forward (prompt chunks, forced headers, or graphs off): logits of the rows that sample."""
        ids, pos, seqs, rows = [], [], [], []
        for it in items:
            seg = it.req.segs[it.seg]
            ids += seg.tokens[it.start:it.start + it.n]
            pos += seg.positions[it.start:it.start + it.n]
            seqs.append((it.context(self.kv), it.n))
            if it.sample is not None:
                rows.append(len(ids) - 1)
        self.attn.prepare(seqs, independent=independent(items))
        x = upload(np.array([ids, pos], dtype=np.int64), self.device)
        hidden = self.model(x[0], x[1], self.attn)
        if not rows:
            return None
        sel = upload(np.array(rows, dtype=np.int64), self.device)
        return self.model.compute_logits(hidden[sel])

    def _graphs_for(self, items):
        """The DecodeGraphs for this step, or None to run it eagerly: graphs off, a prefill / header / prompt
        chunk in the step (more than one token in an item), more rows than the largest bucket, or a context
        wider than the graphs' slot table."""
        if not self.use_graphs or self.graphs is None or max(map(_tokens, items)) > 1:  # (items have >= 1 token)
            return None
        if len(items) > self.graphs.max_batch or max(map(_context_len, items)) > self.graphs.max_context:
            return None
        return self.graphs

    # output -----------------------------------------------------------------------------------
    def _trajectory(self, req: Request) -> Trajectory:
        return to_trajectory(req, self.version, self.tokenizer)

    no_fork_at = staticmethod(no_fork_at)
