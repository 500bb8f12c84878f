"""NPR-Engine end to end on a tiny random Qwen3: parity with HF transformers over forked trajectories,
structure equal to parse_structure, budgets, format errors, preemption, determinism (issue 3)."""
import math
import time

import numpy as np
import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from npr_async.config import EngineConfig
from npr_async.models import init_model
from npr_async.structure import parse_structure, visibility_mask

Q = "Question: add 17 and 25.\n"


def guideline(n: int) -> str:
    return "<guideline>" + "".join(f"<plan>{k}: try way {k}</plan>" for k in range(1, n + 1)) + "</guideline>"


# forks at once (1–5 plans), a nested fork (prefix ends inside step 2 right after a nested guideline),
# a prefix ending inside a step, and a plain prompt
PROMPTS = [Q + guideline(n) for n in (1, 2, 3, 5)] + [
    Q + guideline(2) + "\n<step>\n1: x</step>\n<step>\n2: y " + guideline(2),
    Q + guideline(3) + "\n<step>\n1: partial",
    Q,
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = init_model("tiny", str(tmp_path_factory.mktemp("tiny") / "m"), seed=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than HF's init so distributions are peaked (argmax is meaningful)
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)
    llm = LLM(d, config=EngineConfig(kv_slots=4096, max_batch_tokens=512))
    assert llm.update_weights(hf.state_dict().items(), version=1) > 0
    return d, hf, llm


def params(**kw):
    base = dict(temperature=1.0, seed=7, repetition_penalty=1.0, branch_repetition_penalty=1.0,
                max_total_tokens=160, max_path_tokens=110, max_step_tokens=10, max_plans=5)
    return SamplingParams(**{**base, **kw})


def hf_logprobs(hf, t):
    ids = torch.tensor(t.ids(), dtype=torch.long)
    pos = torch.tensor(t.pos(), dtype=torch.long)
    mask = torch.from_numpy(visibility_mask(t.segs(), t.parents()))
    with torch.no_grad():
        logits = hf(input_ids=ids[None], position_ids=pos[None], attention_mask=mask[None, None]).logits[0]
    return logits.float().log_softmax(-1)


def check_structure(llm, t, req):
    s = parse_structure(t.ids(), llm.tags, max_depth=req.max_depth, no_fork_at=llm.no_fork_at(req))
    assert np.array_equal(s.positions, t.pos()) and np.array_equal(s.segment_ids, t.segs())
    assert s.parents == t.parents()


def test_parity_with_hf_over_forks(tiny):
    _, hf, llm = tiny
    trajs = llm.generate(PROMPTS, params(), version=1)
    assert sum(t.num_forks for t in trajs) >= 7 and max(t.num_forks for t in trajs[:5]) >= 1
    assert trajs[4].num_forks >= 2 and len(trajs[4].segments) >= 6  # nested fork ran and joined
    checked = 0
    for t, req in zip(trajs, llm.last_requests):
        check_structure(llm, t, req)
        lp = hf_logprobs(hf, t)
        segs, ids, mine = t.segs(), t.ids(), t.lps()
        for i in np.nonzero(t.sampled_mask())[0]:
            assert segs[i - 1] == segs[i]  # every sampled token follows a token of its own segment
            assert abs(float(lp[i - 1, ids[i]]) - float(mine[i])) < 1e-4, (i, t.finish_reason)
            checked += 1
        assert not t.sampled_mask()[:t.prompt_len].any()
        assert all(math.isnan(x) for x, s in zip(mine, t.sampled_mask()) if not s)
    assert checked > 300


def test_greedy_tokens_are_hf_argmax(tiny):
    _, hf, llm = tiny
    trajs = llm.generate(PROMPTS[:5], params(temperature=0.0))
    for t in trajs:
        lp = hf_logprobs(hf, t)
        for i in np.nonzero(t.sampled_mask())[0]:
            assert int(lp[i - 1].argmax()) == int(t.ids()[i])
            assert abs(float(lp[i - 1, t.ids()[i]]) - float(t.lps()[i])) < 1e-4


def test_forks_cap_steps_join_and_respect_budgets(tiny):
    _, _, llm = tiny
    tags = llm.tags
    p = params(max_total_tokens=220, max_path_tokens=90, max_step_tokens=9)
    trajs = llm.generate([Q + guideline(n) for n in range(1, 6)], p)
    joined = 0
    for n, t, req in zip(range(1, 6), trajs, llm.last_requests):
        check_structure(llm, t, req)
        ids, segs, parents = t.ids(), t.segs(), t.parents()
        steps = [s for s in range(len(parents)) if parents[s] == [0]]
        assert t.num_forks >= 1 and t.num_branches >= n and len(steps) >= n
        for s in steps[:n]:  # each step: forced header, at most max_step_tokens, closed by </step>
            toks = ids[segs == s]
            assert len(toks) <= 9 and toks[-1] == tags.step_end and tags.step in toks[:2]
        assert t.num_tokens == len(t) - t.prompt_len <= 220
        assert t.critical_path == int(t.pos().max()) + 1 - t.prompt_len <= 90
        join = [s for s in range(len(parents)) if parents[s] == [0] + steps[:n]]
        if t.finish_reason == "format_error" and not join:
            continue  # a random model may write a stray tag inside a step
        joined += 1
        jt = ids[segs == join[0]]
        assert tags.takeaway in jt[:2] and len(jt) > 3  # the forced takeaway header, then decoding goes on
        assert t.finish_reason in ("length", "stop", "format_error")
    assert joined >= 3
    llm.kv.check([])
    assert llm.kv.num_free == llm.kv.num_slots


def test_sequential_switch_and_fork_margin(tiny):
    _, _, llm = tiny
    t, = llm.generate([Q + guideline(3)], params(parallel=False, max_total_tokens=60))
    assert t.num_forks == 0 and len(t.segments) == 1
    assert np.array_equal(t.pos(), np.arange(len(t)))
    # less than fork_margin_tokens of budget left: the `</guideline>` does not fork, decoding goes on
    forcer = TagForcer(llm.model, llm.tags.guideline_end, at_calls=[0])
    for margin, forks in ((1000, 0), (0, 1)):
        eng = LLM(forcer, llm.tokenizer, EngineConfig(kv_slots=1024, fork_margin_tokens=margin))
        forcer.calls = 0
        t, = eng.generate([Q + guideline(3)[:-len("</guideline>")]], params(max_total_tokens=60))
        assert t.num_forks == forks and (len(t.segments) == 1) == (forks == 0)
        check_structure(eng, t, eng.last_requests[0])


def test_same_seed_same_trajectory_whatever_the_batch(tiny):
    _, _, llm = tiny
    p = params(seed=123, max_total_tokens=70)
    alone, = llm.generate([PROMPTS[2]], p)
    q = params(seed=9, max_total_tokens=50)
    crowd = llm.generate(PROMPTS[:2] + PROMPTS[2:3] + PROMPTS[4:6], [q, q, p, q, q])
    assert np.array_equal(alone.ids(), crowd[2].ids()) and alone.text == crowd[2].text
    np.testing.assert_allclose(alone.lps(), crowd[2].lps(), atol=1e-5, equal_nan=True)
    other, = llm.generate([PROMPTS[2]], params(seed=124))
    assert not np.array_equal(other.ids(), alone.ids())
    # with every sampler feature on: penalties (own tokens on the device), top-k / top-p, greedy neighbours
    p = params(seed=77, max_total_tokens=70, repetition_penalty=1.2, branch_repetition_penalty=1.5, top_p=0.9)
    q = params(seed=9, max_total_tokens=50, top_k=5, temperature=0.7)
    alone, = llm.generate([PROMPTS[4]], p)
    crowd = llm.generate(PROMPTS[:2] + PROMPTS[4:5] + PROMPTS[3:6], [q, params(temperature=0.0), p, q, q, q])
    assert alone.num_forks >= 1 and np.array_equal(alone.ids(), crowd[2].ids())
    np.testing.assert_allclose(alone.lps(), crowd[2].lps(), atol=1e-5, equal_nan=True)
    s = llm.sampler  # every penalty-table row came back (all requests finished)
    assert len(s.free) == s.seen.shape[0] - 1, (len(s.free), s.seen.shape)


def test_version_guard(tiny):
    _, _, llm = tiny
    with pytest.raises(RuntimeError, match="v5"):
        llm.generate([Q], params(), version=5)
    with pytest.raises(ValueError):
        llm.generate([[]], params())


class TagForcer(torch.nn.Module):
    """Test-only: adds +1e4 to one token's logit at the given generation steps (to make tags appear)."""

    def __init__(self, model, token, at_calls):
        super().__init__()
        self.inner, self.token, self.at, self.calls = model, token, set(at_calls), 0
        self.args = model.args

    def forward(self, *a):
        return self.inner(*a)

    def compute_logits(self, h):
        out = self.inner.compute_logits(h)
        if self.calls in self.at:
            out[:, self.token] += 1e4
        self.calls += 1
        return out

    def load_weights(self, named):
        return self.inner.load_weights(named)


@pytest.mark.parametrize("case", ["zero_plans", "too_many_plans", "out_of_order", "stray_step_end",
                                  "stray_takeaway", "step_in_step"])
def test_malformed_structure_is_format_error(tiny, case):
    d, _, llm = tiny
    prompt, forced = Q + guideline(2), None
    if case == "zero_plans":
        prompt = Q + "<guideline></guideline>"
    elif case == "too_many_plans":
        prompt = Q + guideline(6)
    elif case == "out_of_order":
        prompt = Q + "<guideline><plan>1: a</guideline>"
    elif case == "stray_step_end":
        prompt, forced = Q, llm.tags.step_end
    elif case == "stray_takeaway":
        prompt, forced = Q, llm.tags.takeaway
    else:  # a sampled <step> inside a step (the engine writes step headers itself)
        forced = llm.tags.step
    model = llm.model if forced is None else TagForcer(llm.model, forced, at_calls=[2])
    eng = LLM(model, llm.tokenizer, EngineConfig(kv_slots=2048))
    t, = eng.generate([prompt], params(max_total_tokens=60))
    assert t.finish_reason == "format_error"
    eng.kv.check([])


def test_200_requests_on_a_small_pool_complete_through_preemption(tiny):
    _, _, llm = tiny
    eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=700, max_batch_tokens=256))
    prompts = [PROMPTS[i % 5] for i in range(200)]
    p = params(max_total_tokens=40, max_path_tokens=30, max_step_tokens=6)
    trajs = eng.generate(prompts, p)
    assert eng.last_stats["preemptions"] > 0
    assert all(t.finish_reason in ("stop", "length", "format_error") for t in trajs)
    assert all(t.num_tokens <= 40 and t.critical_path <= 30 for t in trajs)
    for t, req in zip(trajs, eng.last_requests):  # also for requests that ended inside a fork
        check_structure(eng, t, req)
    eng.kv.check([])
    assert eng.kv.num_free == 700
    windowed = eng.generate(prompts, p, max_running=60)  # a window wider than the pool holds: still preempts
    assert eng.last_stats["preemptions"] > 0 and eng.kv.num_free == 700
    assert all(np.array_equal(a.ids(), b.ids()) for a, b in zip(trajs, windowed))
    # preempted-and-recomputed requests sample exactly what they sample alone (same seed)
    alone = eng.generate(prompts[:3] + prompts[-2:], p)
    for a, b in zip(alone, trajs[:3] + trajs[-2:]):
        assert np.array_equal(a.ids(), b.ids())


def test_on_finished_hands_out_each_trajectory_as_it_finishes(tiny):
    """on_finished(index, trajectory): once per request, the returned trajectory itself, the short requests'
    while the long ones still decode; the same trajectories as without it."""
    _, _, llm = tiny
    prompts = [PROMPTS[0], PROMPTS[6], PROMPTS[2], PROMPTS[3]]
    plist = [params(seed=5, max_total_tokens=n) for n in (120, 12, 90, 20)]
    seen, still_running = [], []

    def on_finished(i, traj):
        seen.append((i, traj))
        still_running.append(sum(r.finish_reason is None for r in llm._sched.running))

    trajs = llm.generate(prompts, plist, on_finished=on_finished)
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
    assert all(trajs[i] is t for i, t in seen)
    assert seen[0][0] in (1, 3) and still_running[0] >= 2  # a 12- or 20-token budget ends first
    assert still_running[-1] == 0
    plain = llm.generate(prompts, plist)
    for a, b in zip(plain, trajs):
        assert np.array_equal(a.ids(), b.ids()) and a.finish_reason == b.finish_reason


def test_on_finished_raising_stops_the_call_and_frees_its_kv(tiny):
    """An exception from on_finished (e.g. a send that timed out) propagates; the KV of the requests still
    decoding goes back to the pool, and the engine then generates as before."""
    _, _, llm = tiny
    eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=2048, max_batch_tokens=256))
    prompts = [PROMPTS[6], PROMPTS[0], PROMPTS[3]]
    plist = [params(seed=3, max_total_tokens=n) for n in (8, 120, 120)]

    resident = []

    def fail(i, traj):
        resident.append(len(eng._sched.running))
        raise ConnectionError(f"verifier pool gone (sample {i})")

    with pytest.raises(TypeError, match="on_finished must be callable"):
        eng.generate(prompts, plist, on_finished=[])
    with pytest.raises(ConnectionError, match="verifier pool gone"):
        eng.generate(prompts, plist, on_finished=fail)
    assert resident[0] >= 1  # requests were still decoding (holding KV) when it raised
    eng.kv.check([])
    assert eng.kv.num_free == 2048
    again = eng.generate(prompts, plist)
    fresh = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=2048, max_batch_tokens=256)).generate(prompts, plist)
    for a, b in zip(again, fresh):
        assert np.array_equal(a.ids(), b.ids())


def test_max_running_windows_requests_in_groups_and_changes_no_sample(tiny, monkeypatch):
    """generate(max_running=N): never more than N requests resident; once the window is full, prompts enter
    only in groups of N/4 (or all that still wait); the same trajectories as without a window (each request's
    draws are its own); on the graph host path, steps run ahead while requests wait behind the full window."""
    import engine.llm as llm_mod
    from engine import step_ahead
    from engine.cuda_graphs import DecodeGraphs
    from engine.scheduler import Scheduler

    monkeypatch.setattr(llm_mod, "STEP_AHEAD", True)
    resident, admitted = [], []
    schedule = Scheduler.schedule

    def watched(sched):
        sched.retire()  # (schedule retires first too)
        live, waiting = len(sched.running), len(sched.waiting)
        items = schedule(sched)
        resident.append(len(sched.running))
        if len(sched.running) > live:  # an admission: how many entered, how many waited
            admitted.append((len(sched.running) - live, waiting))
        return items

    monkeypatch.setattr(Scheduler, "schedule", watched)
    ahead_while_waiting = []
    launch = step_ahead.launch
    monkeypatch.setattr(step_ahead, "launch",
                        lambda llm, *a: (ahead_while_waiting.append(len(llm._sched.waiting)), launch(llm, *a))[1])
    _, _, llm = tiny
    prompts = PROMPTS * 3
    plist = [params(seed=11 + i, max_total_tokens=30 + 7 * (i % 5), max_path_tokens=60) for i in range(len(prompts))]
    eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=4096, max_batch_tokens=512))
    free = eng.kv.num_free
    with pytest.raises(ValueError, match="max_running"):
        eng.generate(prompts, plist, max_running=-1)
    plain = eng.generate(prompts, plist)
    resident.clear()
    admitted.clear()
    eng.use_graphs = True
    eng.graphs = DecodeGraphs(eng.model, eng.kv.k, eng.kv.v, 4096, buckets=(1, 2, 4, 8, 16, 32), sample=False)
    eng.graphs.capture()
    windowed = eng.generate(prompts, plist, max_running=8)
    assert max(resident) == 8 and len(admitted) >= 4
    for n, waiting in admitted[1:]:  # after the first fill: groups of 8 // 4, or the last ones
        assert n >= min(2, waiting), admitted
    assert any(ahead_while_waiting) and eng.last_stats["steps_ahead"] > 0
    for a, b in zip(plain, windowed):
        assert np.array_equal(a.ids(), b.ids()) and a.finish_reason == b.finish_reason
    eng.kv.check([])
    assert eng.kv.num_free == free


@pytest.mark.parametrize("ahead", [False, True])
def test_graph_host_path_on_cpu_matches_eager(tiny, monkeypatch, ahead):
    """The CUDA-graph decode path's host side (one copy of static inputs, each branch kept on a table row
    across steps, rows rewritten at forks / joins / preemption, patches after eager steps, eviction) runs
    on the CPU too, each "replay" running the step: the same trajectories as the eager loop. With the step
    ahead (`llm.STEP_AHEAD`) too: tokens kept or given back at forks, joins, budgets and finishes, no slot lost."""
    import engine.llm as llm_mod
    from engine import step_ahead
    from engine.cuda_graphs import DecodeGraphs

    monkeypatch.setattr(llm_mod, "STEP_AHEAD", ahead)
    waiting = []  # requests waiting for admission whenever a step ahead launched: none (they would starve)
    launch = step_ahead.launch
    monkeypatch.setattr(step_ahead, "launch",
                        lambda llm, *a: (waiting.append(len(llm._sched.waiting)), launch(llm, *a))[1])
    _, _, llm = tiny
    p = params(seed=5, top_p=0.9, branch_repetition_penalty=1.2, max_total_tokens=100, max_path_tokens=80)
    runs = []
    for graphs in (False, True):
        eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=1200, max_batch_tokens=256))
        if graphs:  # small buckets: steps of more rows run eagerly, and 33 table rows must be recycled
            eng.use_graphs = True
            eng.graphs = DecodeGraphs(eng.model, eng.kv.k, eng.kv.v, 1200, buckets=(1, 2, 4, 8, 16), sample=False)
            eng.graphs.capture()
        runs.append(eng.generate(PROMPTS * 3, p))
    st = eng.last_stats
    assert st["preemptions"] > 0 and 0.3 * st["forwards"] < st["graph_steps"] < st["forwards"], st
    assert (st["steps_ahead"] > 0.2 * st["graph_steps"]) if ahead else st["steps_ahead"] == 0, st
    assert not any(waiting) and len(waiting) >= st["steps_ahead"]
    for a, b in zip(*runs):
        assert np.array_equal(a.ids(), b.ids()) and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.lps(), b.lps(), atol=1e-4, equal_nan=True)
    eng.kv.check([])


@pytest.mark.parametrize("split,ahead", [(0, False), (16, False), (16, True)])
def test_graphs_take_forced_headers_one_token_per_forward(tiny, monkeypatch, split, ahead):
    """Requests whose steps end on different forwards (joins, takeaway headers) with graphs on: forced headers
    go one token per forward, so only the prefill runs eagerly (split 16, the engine's), where whole headers
    make a forward eager per fork and join (split 0); the trajectories are the eager loop's either way."""
    import engine.llm as llm_mod
    from engine.cuda_graphs import DecodeGraphs

    _, _, llm = tiny
    prompts = [Q + guideline(n) for n in (1, 2, 3, 5)]  # each forks as soon as its prompt is in
    plist = [params(seed=3, max_step_tokens=n, max_total_tokens=100, max_path_tokens=60) for n in (4, 7, 9, 13)]
    monkeypatch.setattr(llm_mod, "SPLIT_HEADERS", split)
    monkeypatch.setattr(llm_mod, "STEP_AHEAD", ahead)
    runs, stats, group_sizes = [], [], []
    run_items = DecodeGraphs.run_items

    def checked(self, items, slots, fed=None):
        """The GPU graph step writes each row's new K/V in the launch that reads the cache: no item may see
        another item's new token (the CPU stand-in writes first, so only this check would notice)."""
        new = {slots[it.kvs[-1]][it.start] for it in items}
        for it in items:
            assert not new & set(it.context(eng.kv)[:-1]), (it.req.rid, it.seg)
        out = run_items(self, items, slots, fed)
        # fork groups (engine/triton_fork_attention.py reads a group's trunk once, from its first row): every row
        # in exactly one group of consecutive rows, each row's context starting with the group's trunk
        starts, trunks, r, grouped = self.starts.tolist(), self.trunks.tolist(), 0, 0
        for g, r0 in enumerate(starts):
            if r0 >= len(items):
                break
            r1 = min(starts[g + 1], len(items))
            assert r0 == r and 1 <= r1 - r0 <= self.group_rows
            trunk = items[r0].context(eng.kv)[:trunks[g]]
            for it in items[r0:r1]:
                ctx = it.context(eng.kv)
                assert ctx[:trunks[g]] == trunk and trunks[g] < len(ctx)
            group_sizes.append(r1 - r0)
            grouped += r1 - r0 if r1 - r0 > 1 else 0
            r = r1
        assert r == len(items)
        # the step took the fork-group graph (every bucket has one here) iff most of its rows are in groups
        assert kernels[-1] == (2 * grouped >= len(items))
        return out

    monkeypatch.setattr(DecodeGraphs, "run_items", checked)
    import engine.cuda_graphs as cg

    monkeypatch.setattr(cg, "FORK_GROUPS_FROM", 1)  # every bucket has a fork-group graph
    step, kernels = DecodeGraphs._step, []

    def which(self, b, fork=False):  # off the GPU each replay runs the step: record the kernel it takes
        kernels.append(fork)
        return step(self, b, fork)

    monkeypatch.setattr(DecodeGraphs, "_step", which)
    for graphs in (False, True):
        eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=2000, max_batch_tokens=512))
        if graphs:
            eng.use_graphs = True
            eng.graphs = DecodeGraphs(eng.model, eng.kv.k, eng.kv.v, 2000, buckets=(1, 2, 4, 8, 16, 32), sample=False)
            eng.graphs.capture()
        runs.append(eng.generate(prompts, plist))
        stats.append(eng.last_stats)
    eager = stats[1]["forwards"] - stats[1]["graph_steps"]
    assert eager == 1 if split else eager >= 3, stats  # split: the prefill only; else + the fork and joins
    assert max(group_sizes) >= 3  # the branches of a fork (up to 5 here) decode as a group
    assert any(kernels) and not all(kernels)
    for a, b in zip(*runs):
        assert np.array_equal(a.ids(), b.ids()) and a.finish_reason == b.finish_reason
        assert a.num_forks >= 1
        np.testing.assert_allclose(a.lps(), b.lps(), atol=1e-4, equal_nan=True)


def test_step_ahead_gives_back_the_slots_of_requests_that_end_inside_a_fork(tiny, monkeypatch):
    """Budgets that end requests while their steps decode: the branch that crosses the budget finishes the
    request, so the siblings after it in the step never append their drawn tokens and the step ahead gives
    their slots back. Trajectories equal the serial graph loop's; the pool ends whole."""
    import engine.llm as llm_mod
    from engine.cuda_graphs import DecodeGraphs
    from engine.kv_store import KVStore

    _, _, llm = tiny
    prompts = [Q + guideline(n) for n in (2, 3, 4, 5)] * 2
    # strong penalties: the step ahead's draw must see the token it is fed among the branch's own
    plist = [params(seed=1, max_step_tokens=m, max_total_tokens=70, max_path_tokens=80, repetition_penalty=3.0,
                    branch_repetition_penalty=3.0) for m in (50, 50, 9, 50)] * 2
    given_back = []
    shrink = KVStore.shrink
    monkeypatch.setattr(KVStore, "shrink", lambda self, sid, n: (given_back.append(sid), shrink(self, sid, n)))
    runs, stats = [], []
    for ahead in (False, True):
        monkeypatch.setattr(llm_mod, "STEP_AHEAD", ahead)
        eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=3000, max_batch_tokens=512))
        eng.use_graphs = True
        eng.graphs = DecodeGraphs(eng.model, eng.kv.k, eng.kv.v, 3000, buckets=(1, 2, 4, 8, 16, 32), sample=False)
        eng.graphs.capture()
        runs.append(eng.generate(prompts, plist))
        stats.append(eng.last_stats)
        eng.kv.check([])
        assert eng.kv.num_free == 3000
    assert stats[1]["steps_ahead"] > 0 and given_back, (stats, given_back)
    assert {t.finish_reason for t in runs[1]} >= {"length"}
    for a, b in zip(*runs):
        assert np.array_equal(a.ids(), b.ids()) and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.lps(), b.lps(), atol=1e-4, equal_nan=True)


def test_graph_step_refuses_items_that_see_a_segment_it_extends(tiny, monkeypatch):
    """If a scheduler let a fork's first header token share a graph step with its trunk's last token, the GPU
    launch would read K/V while writing them: the graph step raises instead of decoding garbage."""
    from engine.cuda_graphs import DecodeGraphs
    from engine.scheduler import Scheduler

    _, _, llm = tiny
    ready = Scheduler._ready
    monkeypatch.setattr(Scheduler, "_ready", staticmethod(lambda req, s, planned, cached_only=False:
                                                          ready(req, s, planned)))  # the old, eager-only rule
    eng = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=2000, max_batch_tokens=512))
    eng.use_graphs = True
    eng.graphs = DecodeGraphs(eng.model, eng.kv.k, eng.kv.v, 2000, buckets=(1, 2, 4, 8, 16, 32), sample=False)
    eng.graphs.capture()
    plist = [params(seed=3, max_step_tokens=n, max_total_tokens=100, max_path_tokens=60) for n in (4, 7, 9, 13)]
    with pytest.raises(RuntimeError, match="sees a segment this step extends"):
        eng.generate([Q + guideline(n) for n in (1, 2, 3, 5)], plist)


@torch.inference_mode()
def test_graph_sampling_on_cpu_reads_compute_logits_of_wrapped_models():
    """DecodeGraphs(sample=True) off the GPU: greedy rows take the argmax of the step's logits with a float32
    logprob, also when the graph keeps the LM head's bf16 output (plain CausalLM); a model whose
    compute_logits differs (here: a wrapper banning that argmax token) is sampled from its own logits."""
    from engine.cuda_graphs import DecodeGraphs
    from engine.kv_store import KVStore
    from engine.model import CausalLM, ModelArgs

    cfg = dict(model_type="qwen3", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = CausalLM(ModelArgs.from_hf_config(cfg)).bfloat16().eval()

    class Banned(torch.nn.Module):
        def __init__(self, inner, token):
            super().__init__()
            self.inner, self.args, self.model, self.token = inner, inner.args, inner.model, token

        def forward(self, *a):
            return self.inner(*a)

        def compute_logits(self, h):
            x = self.inner.compute_logits(h)
            x[:, self.token] = -1e4
            return x

    def step(m):
        kv = KVStore(1, 64, 2, 8, dtype=torch.bfloat16, device="cpu")
        kv.k.normal_(generator=torch.Generator().manual_seed(1))
        kv.v.normal_(generator=torch.Generator().manual_seed(2))
        g = DecodeGraphs(m, kv.k, kv.v, max_context=16, buckets=(2,))
        g.capture()
        g.table[:2, :5] = torch.arange(10, dtype=torch.int32).view(2, 5)
        g.ids[:2], g.pos[:2], g.lens[:2] = torch.tensor([3, 4]), 4, 5
        g.slots[:2] = g.table[:2, 4].long()
        g.replay(2)
        return g, g.logits[2].float()

    g, logits = step(model)
    assert g.head_only and g.logits[2].dtype == torch.bfloat16
    assert torch.equal(g.tokens[:2], logits.argmax(-1))
    torch.testing.assert_close(g.logprobs[:2], logits.log_softmax(-1).max(-1).values, rtol=0, atol=1e-6)
    top = int(g.tokens[0])
    g2, logits2 = step(Banned(model, top))
    assert not g2.head_only and g2.logits[2].dtype == torch.float32
    assert int(g2.tokens[0]) != top and torch.equal(g2.tokens[:2], logits2.argmax(-1))


@torch.inference_mode()
@pytest.mark.parametrize("model_type,fuse", [("qwen3", True), ("qwen3", False), ("llama", True)])
def test_graph_step_rotating_in_attention_equals_the_torch_backend(model_type, fuse):
    """The decode graphs' attention backend takes q / k as projected and applies q/k-norm (Qwen3; none for
    Llama) and RoPE itself (`SlotDecode.rotates_qk`): the step's logits and the K/V it writes equal the model's
    eager forward through the torch backend, which gets q / k rotated by the model, fused projections or not."""
    from engine.cuda_graphs import DecodeGraphs
    from engine.slot_decode import SlotDecode
    from engine.kv_store import KVStore
    from engine.model import CausalLM, ModelArgs
    from engine.paged_attention import PagedAttention

    assert SlotDecode.rotates_qk
    cfg = dict(model_type=model_type, vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
               max_position_embeddings=512)
    torch.manual_seed(0)
    model = CausalLM(ModelArgs.from_hf_config(cfg)).eval()
    with torch.no_grad():  # non-trivial q/k norm weights, so a norm applied twice or not at all shows
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape))
    if fuse:
        model.fuse_projections()
    kvs = []
    for _ in range(2):
        kv = KVStore(2, 400, 2, 16, dtype=torch.float32, device="cpu")
        kv.k.normal_(generator=torch.Generator().manual_seed(1))
        kv.v.normal_(generator=torch.Generator().manual_seed(2))
        kvs.append(kv)
    trunk = list(range(10, 70))
    contexts = [trunk + [300], trunk + [301], list(range(100, 121)) + [302]]
    ids, pos = [5, 6, 7], [60, 60, 21]
    be = PagedAttention(kvs[0])
    be.prepare([(c, 1) for c in contexts])
    ref = model.compute_logits(model(torch.tensor(ids), torch.tensor(pos), be))
    g = DecodeGraphs(model, kvs[1].k, kvs[1].v, max_context=100, buckets=(4,), sample=False)
    g.capture()
    out = g.run(ids, pos, contexts)
    torch.testing.assert_close(out[:3].float(), ref, rtol=1e-4, atol=1e-4)
    for cache in ("k", "v"):
        torch.testing.assert_close(getattr(kvs[1], cache), getattr(kvs[0], cache), rtol=1e-5, atol=1e-5)


def test_compile_graphs_comes_from_the_config_unless_given(tiny):
    llm = tiny[2]
    for cfg, arg, want in [(False, None, False), (True, None, True), (True, False, False), (False, True, True)]:
        got = LLM(llm.model, llm.tokenizer, EngineConfig(kv_slots=64, compile_graphs=cfg), compile_graphs=arg)
        assert got.compile_graphs is want


def test_first_call_freezes_the_heap_once(tiny):
    """`freeze_heap` (on by default on a GPU): the first generate call collects and moves the objects then alive
    into the permanent generation; later calls freeze nothing more (their objects stay collectable), and the
    trajectories are those of an engine that never froze."""
    import gc

    d, hf, ref = tiny
    assert not ref.freeze_heap  # off on the CPU unless asked
    llm = LLM(d, config=EngineConfig(kv_slots=4096, max_batch_tokens=512), freeze_heap=True)
    llm.update_weights(hf.state_dict().items(), version=1)
    gc.unfreeze()
    try:
        first = llm.generate(PROMPTS[:3], params(), version=1)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # the model, tokenizer and imported modules
        garbage = [[] for _ in range(1000)]  # a second call must not freeze what exists by then
        second = llm.generate(PROMPTS[:3], params(), version=1)
        assert gc.get_freeze_count() <= frozen
        del garbage
    finally:
        gc.unfreeze()
    expect = ref.generate(PROMPTS[:3], params(), version=1)
    for a, b, c in zip(first, second, expect):
        assert np.array_equal(a.ids(), b.ids()) and np.array_equal(a.ids(), c.ids())


def test_collector_pauses_are_counted_per_call(tiny):
    """`last_stats` gc_ms / gc_full: the collector's pauses inside the call, here a full collection forced from the
    trajectory callback; GcPauses leaves gc.callbacks as it found them, also when the block raises."""
    import gc

    from engine.gc_pauses import GcPauses

    _, _, llm = tiny
    before = list(gc.callbacks)
    llm.generate(PROMPTS[:2], params(), version=1, on_finished=lambda i, t: gc.collect())
    assert llm.last_stats["gc_full"] == 2 and llm.last_stats["gc_ms"] > 0
    llm.generate(PROMPTS[:2], params(), version=1)
    assert llm.last_stats["gc_full"] == 0
    with pytest.raises(RuntimeError), GcPauses() as p:
        gc.collect(1)
        raise RuntimeError("inside")
    assert p.by_generation[1][0] == 1 and p.full == 0 and gc.callbacks == before


def test_wait_for_the_devices_tokens_is_counted_per_call(tiny, monkeypatch):
    """`last_stats` wait_ms: the host's time blocked reading each step's tokens (on a GPU, the device still busy),
    summed over the call and reset at the next. A read that takes 3 ms is counted whole, every time."""
    from engine.sampler import BatchSampler

    class SlowRead:  # the step's [2, n] tokens / logprobs, its read-back taking 3 ms as a busy GPU's would
        def __init__(self, out):
            self.out = out

        def tolist(self):
            time.sleep(0.003)
            reads.append(1)
            return self.out.tolist()

    def slow_launch(self, *args, **kwargs):
        fed, out = launch(self, *args, **kwargs)
        return fed, SlowRead(out)

    _, _, llm = tiny
    launch, reads = BatchSampler.launch, []
    monkeypatch.setattr(BatchSampler, "launch", slow_launch)
    t = time.perf_counter()
    llm.generate(PROMPTS[:2], params(), version=1)
    wall_ms = 1e3 * (time.perf_counter() - t)
    assert reads and 3 * len(reads) <= llm.last_stats["wait_ms"] < wall_ms
    monkeypatch.setattr(BatchSampler, "launch", launch)
    llm.generate(PROMPTS[:2], params(), version=1)
    assert llm.last_stats["wait_ms"] < 3 * len(reads)  # the next call starts from zero


def test_the_hosts_work_is_counted_by_phase(tiny, monkeypatch):
    """`last_stats` schedule_ms / launch_ms / take_ms / report_ms: each phase made slower by a known sleep per
    call shows at least that much in its own counter, and the phases with wait_ms stay within the call's wall."""
    from engine.npr_state import Request
    from engine.sampler import BatchSampler
    from engine.scheduler import Scheduler

    calls = {"schedule": 0, "launch": 0, "take": 0, "report": 0}
    sleep_ms = {"schedule": 2, "launch": 3, "take": 1, "report": 4}

    def slowed(fn, phase):
        def f(*a, **kw):
            calls[phase] += 1
            time.sleep(sleep_ms[phase] / 1e3)
            return fn(*a, **kw)
        return f

    monkeypatch.setattr(Scheduler, "schedule", slowed(Scheduler.schedule, "schedule"))
    monkeypatch.setattr(BatchSampler, "launch", slowed(BatchSampler.launch, "launch"))
    monkeypatch.setattr(Request, "on_sampled", slowed(Request.on_sampled, "take"))
    _, _, llm = tiny
    t = time.perf_counter()
    llm.generate(PROMPTS[:2], params(), version=1, on_finished=slowed(lambda i, traj: None, "report"))
    wall_ms = 1e3 * (time.perf_counter() - t)
    st = llm.last_stats
    assert all(calls.values()) and calls["report"] == 2
    for phase, ms in sleep_ms.items():
        assert st[f"{phase}_ms"] >= ms * calls[phase], (phase, st)
    assert sum(st[f"{p}_ms"] for p in calls) + st["wait_ms"] < wall_ms


def test_a_failed_graph_capture_is_tried_again_at_the_next_call(tiny, monkeypatch):
    """The graphs are captured before a call's requests exist and kept only once whole: a capture that raises
    leaves none behind (the call fails, nothing was admitted), and the next call captures them."""
    from engine.cuda_graphs import DecodeGraphs

    d, hf, _ = tiny
    llm = LLM(d, config=EngineConfig(kv_slots=4096, max_batch_tokens=512))
    llm.update_weights(hf.state_dict().items(), version=1)
    llm.use_graphs = True  # the graph path's host side on the CPU (each replay runs the step)
    real, calls = DecodeGraphs.capture, []

    def capture_failing_once(self):
        calls.append(self)
        if len(calls) == 1:
            raise RuntimeError("capture failed")
        return real(self)

    monkeypatch.setattr(DecodeGraphs, "capture", capture_failing_once)
    with pytest.raises(RuntimeError, match="capture failed"):
        llm.generate(PROMPTS[:2], params(), version=1)
    assert llm.graphs is None and llm.kv.num_free == llm.kv.num_slots
    trajs = llm.generate(PROMPTS[:2], params(), version=1)
    assert llm.graphs is calls[1] and llm.last_stats["graph_steps"] > 0 and all(t.num_tokens > 0 for t in trajs)
