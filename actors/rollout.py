"""RolloutGenerator actor: one NPR-Engine; weights in over the weight-sync plane, trajectories out over ZMQ.

The generator refuses to start on any weight version other than the one the controller asks for, and
pushes each trajectory the moment the engine finishes it (`LLM.generate(on_finished=...)`), so the verifier
pool and the learner work while the rest still decode. One engine call takes the whole shard with at most
`rollout.chunk_samples` samples decoding at once (`max_running`: more rows per forward, fewer and longer
forwards), the next entering as earlier ones finish. The seed of sample (step, prompt, index) is a pure
function of them, so a sample re-dispatched after a crash is the same sample.
"""
from __future__ import annotations

import hashlib
import time

import msgspec
import torch

from npr_async.config import Config
from npr_async.messages import Prompt, RolloutRequest, SamplingSpec, StepReport


def sample_seed(base: int, step: int, prompt_id: str, index: int) -> int:
    digest = hashlib.blake2b(f"{base}/{step}/{prompt_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class RolloutGenerator:
    def __init__(self, name: str, model_dir: str, config: Config | dict, device: str = "cpu"):
        from engine.llm import LLM

        self.cfg = config if isinstance(config, Config) else msgspec.convert(config, Config)
        self.name, self.device = name, device
        torch.set_num_threads(max(1, int(self.cfg.rollout.num_cpus_per_worker)) if device == "cpu" else 1)
        # what exists at the engine's first call (libraries, model, graphs, compiler state) lives as long as the
        # actor: the engine then freezes it out of the cyclic GC's full collections, on the CPU too, which
        # otherwise walk it in the middle of a decode loop (0.2-0.8 s on an H200 host)
        self.llm = LLM(model_dir, config=self.cfg.engine, device=device, dtype=getattr(torch, self.cfg.model.dtype),
                       freeze_heap=True)
        self.sender = None
        self.weights = None

    def ready(self) -> str:
        return self.name

    def connect_output(self, address: str) -> None:
        """Where trajectories go: one verifier actor's PULL address."""
        from npr_async.transport.zmq import TrajectorySender

        if self.sender is not None:
            self.sender.close()
        t = self.cfg.transport
        self.sender = TrajectorySender(address, name=self.name, hwm=t.zmq_hwm, send_timeout_s=t.recv_timeout_s,
                                       peer="verifier pool")

    def join_weights(self, rank: int, world_size: int, store_addr: str) -> None:
        """Collective with the learner and every other generator: build the weight-sync plane."""
        from npr_async.transport.weights import WeightReceiver

        t = self.cfg.transport
        if self.weights is not None:
            self.weights.close()
        self.weights = WeightReceiver(t.weights, rank=rank, world_size=world_size, store_addr=store_addr,
                                      timeout_s=t.recv_timeout_s, device=self.device)
        self.weights.connect()

    def receive_weights(self, version: int) -> dict:
        t0 = time.perf_counter()
        got = self.weights.recv(self.llm.weight_targets(), expect_version=version)  # HF names, fused views
        self.llm.version = got
        return {"version": got, "seconds": time.perf_counter() - t0}

    def generate(self, request: RolloutRequest, only: dict[str, list[int]] | None = None) -> StepReport:
        """Sample `request.samples_per_prompt` trajectories of each prompt (or only the listed indices of
        `only`, a re-dispatch) and push each one to the verifier pool."""
        from engine.llm import HOST_PHASES
        from engine.sampler import SamplingParams
        from npr_async.tokenizer import format_prompt

        if request.version != self.llm.version:
            raise RuntimeError(f"{self.name}: asked for weights v{request.version}, holds v{self.llm.version}")
        if self.sender is None:
            raise RuntimeError(f"{self.name}: connect_output() first")
        t0 = time.perf_counter()
        spec = request.sampling
        base = SamplingParams.from_config(self.cfg.engine, self.cfg.rollout.sampling, **_overrides(spec))
        work = [(p, i) for p in request.prompts
                for i in (only.get(p.prompt_id, []) if only is not None else range(request.samples_per_prompt))]
        prefix = self.cfg.rollout.response_prefix
        prompts = [p.ids().tolist() if p.token_ids else format_prompt(self.llm.tokenizer, p.text) + prefix
                   for p, _ in work]
        params = [msgspec.structs.replace(base, seed=sample_seed(self.cfg.controller.seed, request.step,
                                                                 p.prompt_id, i)) for p, i in work]
        sent = tokens = 0
        send_s = 0.0

        def push(j: int, traj) -> None:  # each trajectory leaves as it finishes
            nonlocal sent, tokens, send_s
            t_send = time.perf_counter()
            traj.sample_idx, traj.version = work[j][1], request.version
            self.sender.send(traj)
            send_s += time.perf_counter() - t_send
            sent += 1
            tokens += traj.num_tokens

        t_gen = time.perf_counter()
        # one call: `chunk_samples` samples decode at once, the next entering as earlier ones finish
        self.llm.generate(prompts, params, prompt_ids=[p.prompt_id for p, _ in work], version=request.version,
                          on_finished=push, max_running=self.cfg.rollout.chunk_samples)
        # gc_ms / gc_full: the garbage collector's pauses in the call (full collections should not happen)
        # jit_compiles / jit_ms: Triton kernels compiled for shapes new to the process, on the host, mid-call
        # schedule_ms ... report_ms: the host's own work by phase (engine.llm.HOST_PHASES)
        counters = ("forwards", "graph_steps", "steps_ahead", "preemptions", "gc_ms", "gc_full", "wait_ms",
                    "jit_compiles", "jit_ms", *(f"{k}_ms" for k in HOST_PHASES))
        engine = {"engine_calls": 1.0, **{k: float(self.llm.last_stats.get(k, 0)) for k in counters},
                  # the rest of the step: prompts; sending (a full queue blocks it) is counted apart
                  "engine_s": time.perf_counter() - t_gen - send_s}
        seconds = time.perf_counter() - t0
        return StepReport(step=request.step, version=request.version, role="rollout", actor=self.name,
                          sent=sent, num_trajectories=sent, num_tokens=tokens, seconds=seconds,
                          metrics={"tokens_per_s": tokens / max(seconds, 1e-9), "send_s": send_s, **engine})

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.weights is not None:
            self.weights.close()


def _overrides(spec: SamplingSpec) -> dict:
    """The request's sampling fields that are set (None: keep the config's value)."""
    return {k: v for k, v in msgspec.structs.asdict(spec).items() if v is not None and k != "seed"}


def make_request(step: int, version: int, rows: list[dict], samples_per_prompt: int,
                 sampling: SamplingSpec | None = None) -> RolloutRequest:
    prompts = [Prompt(prompt_id=str(r["id"]), text=str(r["prompt"]), task=r) for r in rows]
    return RolloutRequest(step=step, version=version, prompts=prompts, sampling=sampling or SamplingSpec(),
                          samples_per_prompt=samples_per_prompt)
