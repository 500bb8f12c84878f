"""Trajectory channels between real processes and sockets (fork: no torch in these children)."""
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest
import zmq

from npr_async.messages import Ack, Envelope, StepReport, Trajectory
from npr_async.transport import (MalformedMessage, Replier, Requester, TrajectoryReceiver, TrajectorySender,
                                 TransportTimeout, make_endpoint)
from npr_async.transport.zmq import encode

ctx = mp.get_context("fork")


def traj(i, n=64, name="s"):
    return Trajectory.build(token_ids=np.full(n, i), positions=np.arange(n), segment_ids=np.zeros(n),
                            parents=[[]], logprobs=np.zeros(n), sampled=np.ones(n, bool), prompt_id=f"{name}/{i}",
                            sample_idx=i, prompt_len=1, finish_reason="stop")


def _sender(address, name, count, delay=0.0, hwm=1024, step_report=False):
    tx = TrajectorySender(address, name=name, hwm=hwm, send_timeout_s=20, linger_s=5)
    for i in range(count):
        tx.send(traj(i, name=name))
        if delay:
            time.sleep(delay)
    if step_report:
        tx.send(StepReport(step=0, version=0, role="rollout", actor=name, sent=tx.seq))
    tx.close()


@pytest.fixture
def rx():
    r = TrajectoryReceiver(make_endpoint("ipc", "test"), timeout_s=20, peer="rollout generators")
    yield r
    r.close()


def test_many_senders_one_receiver(rx):
    procs = [ctx.Process(target=_sender, args=(rx.address, f"rollout-{k}", 50)) for k in range(4)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(200):
        env = rx.recv()
        got.setdefault(env.sender, []).append((env.seq, env.body.sample_idx, int(env.body.ids()[0])))
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    assert sorted(got) == [f"rollout-{k}" for k in range(4)]
    for seqs in got.values():
        assert seqs == [(i, i, i) for i in range(50)]  # per-sender order kept, nothing lost or repeated
    with pytest.raises(TransportTimeout):
        rx.recv(timeout_s=0.3)  # the four end-of-stream markers are consumed, not delivered
    assert rx.lost == rx.duplicates == rx.malformed == 0 and rx.gaps == []
    assert all(s.ended for s in rx.tracker.streams.values())


def test_sender_killed_mid_stream_is_reported_and_receiver_carries_on(rx):
    victim = ctx.Process(target=_sender, args=(rx.address, "rollout-0", 10_000, 0.002))
    other = ctx.Process(target=_sender, args=(rx.address, "rollout-1", 30, 0.01))
    victim.start()
    other.start()
    by_epoch, others = {}, 0
    while sum(len(v) for v in by_epoch.values()) < 20:
        env = rx.recv()
        if env.sender == "rollout-0":
            by_epoch.setdefault(env.epoch, []).append(env.seq)
        else:
            others += 1
    os.kill(victim.pid, signal.SIGKILL)  # its queued messages die with it
    victim.join(5)
    # the generator is restarted under the same name: a new epoch, reported as truncating the old stream
    restarted = ctx.Process(target=_sender, args=(rx.address, "rollout-0", 5, 0.0, 1024, True))
    restarted.start()
    report = None
    while others < 30 or report is None:
        env = rx.recv(timeout_s=10)
        if isinstance(env.body, StepReport):
            report = env
        elif env.sender == "rollout-0":
            by_epoch.setdefault(env.epoch, []).append(env.seq)
        else:
            others += 1
    (old, old_seqs), (new, new_seqs) = by_epoch.items()
    assert old_seqs == list(range(len(old_seqs))) and len(old_seqs) >= 20  # a clean prefix, then silence
    assert new_seqs == [0, 1, 2, 3, 4] and report.epoch == new
    restarted.join(10)
    other.join(10)
    truncated = [e for e in rx.gaps if e.kind == "truncated"]
    assert len(truncated) == 1 and truncated[0].sender == "rollout-0"
    assert "restarted" in truncated[0].detail and "truncated from rollout-0" in str(truncated[0])
    # the controller cross-checks the restarted generator's own count: nothing missing in the new stream
    assert rx.tracker.expect("rollout-0", report.body.sent - 1, epoch=report.epoch) == 0
    assert rx.lost == 0 and rx.duplicates == 0


def test_gaps_and_duplicates_from_a_raw_socket(rx):
    c = zmq.Context()
    s = c.socket(zmq.PUSH)
    s.connect(rx.address)
    for seq in (0, 1, 4, 4, 2, 5):
        s.send(encode(Envelope("raw", 1, seq, 0, traj(seq))))
    got = [rx.recv().seq for _ in range(4)]
    assert got == [0, 1, 4, 5]
    assert [(e.kind, e.first, e.last) for e in rx.tracker.events] == [("gap", 2, 3), ("duplicate", 4, 4),
                                                                      ("duplicate", 2, 2)]
    assert rx.lost == 2 and rx.duplicates == 2
    # a sender's report of what it sent exposes a lost tail too
    assert rx.tracker.expect("raw", 7) == 2 and rx.tracker.events[-1].last == 7
    s.close(0)
    c.term()


def test_full_queue_times_out_memory_bounded_then_drains(rx):
    hwm = 4
    r2 = TrajectoryReceiver(make_endpoint("ipc", "slow"), hwm=hwm, timeout_s=5)
    tx = TrajectorySender(r2.address, name="fast", hwm=hwm, send_timeout_s=0.3)
    big = traj(0, n=25_000)  # ~425 KB per message
    sent = 0
    with pytest.raises(TransportTimeout) as err:
        for _ in range(1000):
            tx.send(big)
            sent += 1
    assert "queue full" in str(err.value) and r2.address in str(err.value) and "hwm=4" in str(err.value)
    assert 2 * hwm <= sent <= 2 * hwm + 6  # sender queue + receiver queue + a socket buffer or so, never more
    got = [r2.recv().seq for _ in range(sent)]
    assert got == list(range(sent))  # the timed-out message never took a sequence number
    tx.send(big)
    assert r2.recv().seq == sent and r2.lost == 0
    tx.close()
    r2.close()


def _blocking_sender(address, progress):
    tx = TrajectorySender(address, name="blocker", hwm=2, send_timeout_s=0)  # 0: block until drained
    for i in range(40):
        tx.send(traj(i, n=25_000))
        progress.value = i + 1
    tx.close()


def test_full_queue_blocks_the_sender_when_configured():
    r2 = TrajectoryReceiver(make_endpoint("ipc", "block"), hwm=2, timeout_s=10)
    progress = ctx.Value("i", 0)
    p = ctx.Process(target=_blocking_sender, args=(r2.address, progress))
    p.start()
    time.sleep(1.0)
    stuck_at = progress.value
    assert p.is_alive() and 0 < stuck_at < 40  # blocked on the full queue, not failing
    seqs = [r2.recv().seq for _ in range(40)]
    p.join(10)
    assert p.exitcode == 0 and seqs == list(range(40))
    r2.close()


def test_malformed_bytes_raise_or_count_and_channel_survives():
    for mode in ("raise", "count"):
        r = TrajectoryReceiver(make_endpoint("ipc", "bad"), timeout_s=5, on_malformed=mode)
        c = zmq.Context()
        s = c.socket(zmq.PUSH)
        s.connect(r.address)
        s.send(b"\x93garbage")
        s.send_multipart([b"two", b"frames"])
        s.send(encode(Envelope("ok", 1, 0, 0, traj(0))))
        if mode == "raise":
            with pytest.raises(MalformedMessage, match=r"malformed message on ipc://.*starts b'\\x93garbage'"):
                r.recv()
            with pytest.raises(MalformedMessage, match="expected 1 frame, got 2"):
                r.recv()
        assert r.recv().sender == "ok" and r.malformed == 2
        s.close(0)
        c.term()
        r.close()


def test_recv_timeout_names_peer_endpoint_and_known_senders(rx):
    tx = TrajectorySender(rx.address, name="rollout-7")
    tx.send(traj(0))
    rx.recv()
    with pytest.raises(TransportTimeout) as err:
        rx.recv(timeout_s=0.2)
    msg = str(err.value)
    assert "rollout generators" in msg and rx.address in msg and "rollout-7 up to seq 0 (open" in msg
    tx.close()


def test_tcp_across_hosts_style_endpoint():
    r = TrajectoryReceiver(make_endpoint("tcp", "tcp", host="127.0.0.1"), timeout_s=10)
    assert r.address.startswith("tcp://127.0.0.1:") and not r.address.endswith(":0")
    p = ctx.Process(target=_sender, args=(r.address, "remote", 20))
    p.start()
    assert [r.recv().seq for _ in range(20)] == list(range(20))
    p.join(10)
    r.close()


def test_request_reply_and_timeout():
    srv = Replier(make_endpoint("ipc", "ctl"), name="rollout-0", timeout_s=5)

    def serve():
        peer, req = srv.recv()
        srv.reply(peer, req, Ack(ref_sender=req.sender, ref_seq=req.seq, info={"n": len(req.body.token_ids)}))

    t = threading.Thread(target=serve)
    t.start()
    cli = Requester(srv.address, name="controller", peer="rollout-0", timeout_s=5)
    rep = cli.request(traj(0, n=10))
    t.join()
    assert rep.body.ref_sender == "controller" and rep.body.ref_seq == 0 and rep.body.info == {"n": 40}
    with pytest.raises(TransportTimeout, match="no reply from rollout-0 .* to request 1"):
        cli.request(traj(1), timeout_s=0.2)
    cli.close()
    srv.close()
