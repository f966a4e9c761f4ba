"""Experts on ExpertShard Ray actors: exact outputs, overflow policies, live rebalance, failures."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from experts.pool import ExpertUnavailableError
from router.balancer import ExpertLoadBalancer
from router.placement import initial_placement
from serving import load_model
from tests.support import wait_until

pytestmark = pytest.mark.ray

IDS = torch.randint(3, 500, (3, 21), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(demo_path):
    return load_model(demo_path)(IDS)


@pytest.mark.parametrize(("shards", "redundant"), [(2, 0), (3, 0), (2, 4), (3, 5)])
def test_sharded_logits_equal_local(ray_session, demo_path, reference, shards, redundant):
    model = load_model(demo_path, expert_shards=shards, redundant_experts=redundant)
    try:
        assert model.pool.num_slots(0) == 8 + redundant
        assert model.pool.transport_in_use == "compiled"
        assert (model(IDS) - reference).abs().max().item() < 1e-5
        assert model.pool.transport_in_use == "compiled"  # it served through the graph
        # copies of one expert never share a shard
        for p in model.pool.placements():
            for e in range(8):
                homes = [int(p.slot_shard[s]) for s in p.slots_of(e)]
                assert len(homes) == len(set(homes))
    finally:
        model.close()


def test_plain_transport_equals_local(ray_session, demo_path, reference):
    model = load_model(demo_path, expert_shards=2, transport="plain")
    try:
        assert model.pool.transport_in_use == "plain"
        assert (model(IDS) - reference).abs().max().item() < 1e-5
    finally:
        model.close()


def test_linked_transport_equals_local(ray_session, demo_path, reference):
    # Rows over a gloo process group, the compiled graph carrying only counts; no size limit, so a
    # prefill far above compiled_max_bytes goes the same way.
    model = load_model(demo_path, expert_shards=2, transport="linked", compiled_max_bytes=1)
    try:
        assert model.pool.transport_in_use == "linked (gloo)"
        for _ in range(2):  # the second pass reuses the group: sends and receives stay matched
            assert (model(IDS) - reference).abs().max().item() < 1e-5
        assert model.pool.transport_in_use == "linked (gloo)"  # nothing failed over to plain
        assert not any("torn down" in e for e in model.pool.events)
    finally:
        model.close()


def test_sharded_equals_transformers(ray_session, demo_path):
    from transformers import MixtralForCausalLM

    ref = MixtralForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    model = load_model(demo_path, expert_shards=3, redundant_experts=2)
    try:
        with torch.no_grad():
            expected = ref(IDS).logits
        assert (model(IDS) - expected).abs().max().item() < 1e-4
    finally:
        model.close()


def _balancer(policy: str, factor: float, shards: int = 2, redundant: int = 0):
    return ExpertLoadBalancer(
        [initial_placement(8, shards, redundant)] * 4, capacity_factor=factor, overflow=policy
    )


@pytest.mark.parametrize("policy", ["split", "reroute", "drop"])
def test_overflow_policies(ray_session, demo_path, reference, policy):
    balancer = _balancer(policy, factor=0.5, redundant=2)  # capacity below mean: overflow certain
    model = load_model(demo_path, expert_shards=2, redundant_experts=2, balancer=balancer)
    try:
        diff = (model(IDS) - reference).abs().max().item()
        counts = balancer.counters()
        if policy == "split":
            assert diff < 1e-5 and sum(c.split for c in counts) > 0
            assert sum(c.rerouted + c.dropped for c in counts) == 0
        else:
            assert diff > 1e-3  # reroute and drop change outputs, and say so in the counters
            moved = sum((c.rerouted if policy == "reroute" else c.dropped) for c in counts)
            assert moved > 0
    finally:
        model.close()


def test_live_rebalance_during_forward_loop(ray_session, demo_path, reference):
    model = load_model(demo_path, expert_shards=2, redundant_experts=4)
    pool = model.pool
    try:
        for _ in range(3):  # fill the load window
            model(IDS)
        before = [p.phy2log.tolist() for p in pool.placements()]
        thread = pool.rebalance()
        outputs, deadline = [], time.monotonic() + 60
        while pool.version == 0 and time.monotonic() < deadline:
            outputs.append(model(IDS))
        thread.join(timeout=30)
        outputs.append(model(IDS))
        assert pool.version == 1, pool.events
        assert all((o - reference).abs().max().item() < 1e-5 for o in outputs)
        after = [p.phy2log.tolist() for p in pool.placements()]
        assert after != before  # redundant copies followed the measured load
    finally:
        model.close()


def _shard_pid(pool, shard: int) -> int:
    import ray

    return ray.get(pool.shards[shard].pid.remote())


@pytest.mark.parametrize(("transport", "shown"), [("compiled", "compiled"),
                                                   ("linked", "linked (gloo)")])  # fmt: skip
def test_killed_shard_with_two_copies_loses_nothing(ray_session, demo_path, reference, transport,
                                                    shown):  # fmt: skip
    model = load_model(demo_path, expert_shards=2, redundant_experts=8, call_timeout_s=10,
                       transport=transport)  # fmt: skip
    pool = model.pool
    try:
        os.kill(_shard_pid(pool, 0), signal.SIGKILL)
        outputs = [model(IDS) for _ in range(3)]  # every pass completes, correct
        assert all((o - reference).abs().max().item() < 1e-5 for o in outputs)
        wait_until(
            lambda: "shard 0 replaced" in pool.events,
            60,
            lambda: f"shard 0 replaced: {pool.events}",
        )
        assert (model(IDS) - reference).abs().max().item() < 1e-5
        # the graph was torn down with the dead shard and recompiled over its replacement
        assert any(
            e.startswith("compiled graph torn down") or e.startswith("shard 0 failed")
            for e in pool.events
        )
        wait_until(lambda: pool.transport_in_use == shown, 30, lambda: f"{shown}: {pool.events}")
        assert (model(IDS) - reference).abs().max().item() < 1e-5
    finally:
        model.close()


def test_only_copy_lost_fails_fast_then_recovers(ray_session, demo_path, reference):
    model = load_model(demo_path, expert_shards=2, call_timeout_s=10)
    pool = model.pool
    try:
        os.kill(_shard_pid(pool, 1), signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ExpertUnavailableError, match="no live copy"):
            for _ in range(3):
                model(IDS)
        assert time.monotonic() - start < 10  # fast, not a timeout
        wait_until(
            lambda: "shard 1 replaced" in pool.events,
            60,
            lambda: f"shard 1 replaced: {pool.events}",
        )
        assert (model(IDS) - reference).abs().max().item() < 1e-5
    finally:
        model.close()


HANG_TIMEOUT_S = 2.0


def test_hung_shard_is_detected_by_timeout(ray_session, demo_path, reference):
    """A stopped shard costs one call timeout, then its rows go to the other copies. The bound
    leaves room for the rest of the forward pass on a busy machine; without the timeout the call
    would never return (and the pool's default timeout is 30 s)."""
    model = load_model(demo_path, expert_shards=2, redundant_experts=8,
                       call_timeout_s=HANG_TIMEOUT_S)  # fmt: skip
    pool = model.pool
    pid = _shard_pid(pool, 1)
    try:
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        out = model(IDS)
        assert time.monotonic() - start < 4 * HANG_TIMEOUT_S
        assert (out - reference).abs().max().item() < 1e-5
        assert any(e.startswith("shard 1 failed: GetTimeoutError") for e in pool.events)
        # replaced, and the graph rebuilt over the new shard (closing the model while that graph
        # compiles would leave Ray's compile to fail under it)
        wait_until(lambda: pool.transport_in_use == "compiled" and "shard 1 replaced" in
                   pool.events, 60, lambda: f"replaced and compiled: {pool.events}")  # fmt: skip
    finally:
        os.kill(pid, signal.SIGCONT)  # the pool killed it; let the kill land
        model.close()


def test_a_call_stuck_on_a_stopped_shard_ends_when_the_watch_closes_the_graph(
    ray_session, demo_path, reference
):
    """Ray's channels take a header semaphore that a stopped shard may hold with an untimed wait
    (experts/graph_watch.py): the watch closes the graph, the waiting call raises, and the shard
    that does not answer is reported failed (killed and replaced). Here the call's own timeout is
    60 s, so that only the watch ends the wait early; without the report, Ray would wait 10 s
    more for the stopped shard's loop."""
    from ray.exceptions import RayError

    from experts.graph_watch import GraphWatch, close_stuck

    model = load_model(demo_path, expert_shards=2, redundant_experts=8)
    pool = model.pool
    watch = GraphWatch(1.0, lambda g: close_stuck(g, 1.0, pool.fanout.on_failure, pool.events))
    pid = _shard_pid(pool, 1)
    try:
        wait_until(lambda: pool.fanout.graph, 30, lambda: f"a compiled graph: {pool.events}")
        graph = pool.fanout.graph
        xs, counts = [], []
        for lo, hi in pool.balancer.placement(0).shard_ranges():  # 2 rows for each shard
            xs.append(torch.randn(2, model.config.hidden_size))
            counts.append(torch.nn.functional.one_hot(torch.tensor(0), hi - lo).mul(2).numpy())
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(RayError), watch.waiting(graph):
            graph.results(graph.execute(pool.version, 0, xs, counts), 60.0, torch.float32,
                          torch.device("cpu"))  # fmt: skip
        elapsed = time.monotonic() - start
        print(f"the stuck call ended after {elapsed:.2f} s")
        assert elapsed < 8.0, elapsed  # the watch's 1 s and the ping's 1 s, not 11 s or 60 s
        assert "compiled graph closed: a call outlived the timeout" in pool.events
        assert any(e.startswith("shard 1 failed: GetTimeoutError") for e in pool.events)
        assert not any(e.startswith("shard 0 failed") for e in pool.events)
        assert (model(IDS) - reference).abs().max().item() < 1e-5  # served by the other copies
        wait_until(lambda: pool.transport_in_use == "compiled" and "shard 1 replaced" in
                   pool.events, 60, lambda: f"replaced and compiled: {pool.events}")  # fmt: skip
    finally:
        watch.stop()
        os.kill(pid, signal.SIGCONT)
        model.close()


def test_forward_threads_do_not_fail_during_rebalance(ray_session, demo_path, reference):
    """A forward loop in another thread (as the server runs it) sees no error across a switch."""
    model = load_model(demo_path, expert_shards=3, redundant_experts=3)
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            try:
                assert (model(IDS) - reference).abs().max().item() < 1e-5
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        time.sleep(1.0)
        model.pool.rebalance(wait=True)
        wait_until(
            lambda: model.pool.version != 0, 30, lambda: f"a new version: {model.pool.events}"
        )
    finally:
        stop.set()
        worker.join(timeout=30)
        model.close()
    assert model.pool.version == 1 and not errors


@pytest.mark.parametrize(("transport", "shown"), [("compiled", "compiled"),
                                                   ("linked", "linked (gloo)")])  # fmt: skip
def test_add_and_remove_shards_while_serving(ray_session, demo_path, reference, transport, shown):
    # linked: each new set of shards gets a new process group (3 + 1 ranks, then 2 + 1)
    model = load_model(demo_path, expert_shards=2, redundant_experts=2, transport=transport)
    pool = model.pool
    try:
        for target, change in ((3, pool.add_shard), (2, pool.remove_shard)):
            thread = change()
            outputs, deadline = [], time.monotonic() + 60
            while pool.num_shards != target and time.monotonic() < deadline:
                outputs.append(model(IDS))
            thread.join(timeout=30)
            outputs.append(model(IDS))
            assert pool.num_shards == target == len(pool.shards), pool.events
            assert all((o - reference).abs().max().item() < 1e-5 for o in outputs)
            assert {int(s) for s in pool.placements()[0].slot_shard} == set(range(target))
        # rebuilt over the new set
        wait_until(lambda: pool.transport_in_use == shown, 30, lambda: f"{shown}: {pool.events}")
        assert (model(IDS) - reference).abs().max().item() < 1e-5
    finally:
        model.close()


def cpu_seconds(pids: list[int], over_s: float) -> float:
    """CPU seconds the processes used together over the next `over_s` (Linux /proc)."""

    def used() -> float:
        ticks = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    start = used()
    time.sleep(over_s)
    return used() - start


def test_an_idle_graph_is_released_and_compiled_again(ray_session, demo_path, reference):
    """A compiled graph's idle shards poll their channels, a core each: unused for
    idle_release_s, the graph is released and they stop; the next batch is served exactly
    through plain calls while the graph compiles again."""
    import ray

    model = load_model(demo_path, expert_shards=2, idle_release_s=4.0)
    pool = model.pool
    try:
        pids = ray.get([a.pid.remote() for a in pool.shards], timeout=30)
        assert (model(IDS) - reference).abs().max().item() < 1e-5
        polling = cpu_seconds(pids, 1.5)  # idle, the graph still live
        wait_until(lambda: pool.transport_in_use == "plain", 30, lambda: f"release: {pool.events}")
        released = cpu_seconds(pids, 1.5)
        print(f"shards' CPU seconds in 1.5 s: polling {polling:.2f}, released {released:.2f}")
        assert released < 0.5 * polling, (polling, released)
        assert "compiled graph released: idle" in pool.events
        assert (model(IDS) - reference).abs().max().item() < 1e-5  # served, and compiling
        wait_until(
            lambda: pool.transport_in_use == "compiled", 30, lambda: f"compiled: {pool.events}"
        )
        assert (model(IDS) - reference).abs().max().item() < 1e-5
    finally:
        model.close()
