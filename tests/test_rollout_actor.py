"""The rollout generator (the Ray actor's class, run in-process): each trajectory leaves over ZMQ while the
engine call that made it is still running, with its sample index and version; the step report counts them."""
import numpy as np
import pytest

pytest.importorskip("zmq")

from actors.rollout import RolloutGenerator, make_request  # noqa: E402
from npr_async.config import load_config  # noqa: E402
from npr_async.models import init_model  # noqa: E402
from npr_async.transport import TrajectoryReceiver, make_endpoint  # noqa: E402


def test_trajectories_stream_out_during_the_engine_call(tmp_path):
    model = init_model("tiny", str(tmp_path / "m"), seed=0)
    cfg = load_config(None, ["rollout.chunk_samples=4", "engine.max_total_tokens=40", "engine.max_path_tokens=30",
                             "engine.kv_slots=2048"])
    gen = RolloutGenerator("rollout-0", str(model), cfg)
    rx = TrajectoryReceiver(make_endpoint("ipc", "rollout-test"), timeout_s=30, peer="rollout-0")
    gen.connect_output(rx.address)
    busy_at_send, resident = [], []
    send = gen.sender.send

    def watched_send(msg, **kw):
        busy_at_send.append(gen.llm._busy)
        resident.append(len(gen.llm._sched.running))
        return send(msg, **kw)

    gen.sender.send = watched_send
    rows = [{"id": f"p{k}", "prompt": f"What is {k} + {k}?"} for k in range(3)]
    req = make_request(step=0, version=0, rows=rows, samples_per_prompt=2)
    report = gen.generate(req)
    assert busy_at_send == [True] * 6  # sent from inside LLM.generate, as each one finished
    busy_at_send.clear()
    got = [rx.recv().body for _ in range(6)]
    assert report.sent == report.num_trajectories == 6 and report.metrics["engine_calls"] == 1
    assert max(resident) == 4  # rollout.chunk_samples: samples decoding at once
    assert sorted((t.prompt_id, t.sample_idx) for t in got) == [(f"p{k}", i) for k in range(3) for i in range(2)]
    assert all(t.version == 0 for t in got) and report.num_tokens == sum(t.num_tokens for t in got)
    assert report.metrics["send_s"] >= 0 and report.metrics["engine_s"] > 0
    # the engine froze the actor's heap at this first call: no full collection in it
    assert gen.llm._heap_frozen and report.metrics["gc_full"] == 0 and report.metrics["gc_ms"] >= 0
    # a re-dispatch of one sample is the same sample (its seed is a function of step, prompt and index)
    gen.generate(req, only={"p1": [1]})
    again = rx.recv().body
    empty = gen.generate(req, only={})  # an empty shard: nothing sent, nothing decoded
    assert empty.sent == 0 and empty.metrics["forwards"] == 0
    first = next(t for t in got if (t.prompt_id, t.sample_idx) == ("p1", 1))
    assert np.array_equal(again.ids(), first.ids())
    gen.close()
    rx.close()
