"""Many gateways, one fleet, end to end: real ``gateway serve`` processes sharing each worker's
budget through a real ``redis-server`` (and through the parent under ``--processes N``) in
front of the simulator (``python -m gateway sim``: 3 workers × 4 instances × 50 ms).

What is checked: the replicas' units of each worker add up to no more than the fleet's limit,
and under load the simulated workers never hold more than that (the queue stays in the
gateways); a replica killed drops out within its lease; Redis lost and back; the processes
of ``--processes 3`` as one gateway; and every replica reads the same capacity signals.

Everything is on loopback and bounded: each wait has a deadline, the load clients stop by
themselves, and the ExitStack stops every process a test started, last started first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.tools import procs
from gateway.tools.gatewayproc import GatewayProcess
from gateway.tools.procs import free_port, http_get
from loadtest.herd import INFER_BODY, INFER_PATH, SimProcess
from tests.redis_server import RedisServer, command
from tests.test_admission_e2e import Load, by_status
from tests.tools import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(120)]

WORKERS = 3
INSTANCES = 4            # the simulator runs 4 at once per worker…
SERVICE_MS = 50.0        # …50 ms each; the gateway learns a limit of 2 × 4 per worker
REPLICAS = 3
MODEL = "simple"
LEASE_S = 1.5            # cluster.lease_s's default


# ------------------------------------------------------------------------------ helpers

@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Everything a test starts is stopped here, last started first."""
    with contextlib.ExitStack() as st:
        yield st


def start_sim(stack: contextlib.ExitStack) -> SimProcess:
    sim = SimProcess(WORKERS, slots=INSTANCES, base_ms=SERVICE_MS)
    stack.callback(sim.stop)
    return sim.start()


def start_redis(stack: contextlib.ExitStack) -> RedisServer:
    redis = RedisServer()
    stack.callback(redis.stop)
    return redis.start()


def minimal_config(sim: SimProcess, **extra: Any) -> dict[str, Any]:
    """The README's minimal configuration (slots, models and limits are learned)."""
    cfg: dict[str, Any] = {"workers": [{"url": u, "metrics_url": u + "/metrics"}
                                       for u in sim.urls]}
    cfg.update(extra)
    return cfg


def redis_config(sim: SimProcess, redis_url: str, **extra: Any) -> dict[str, Any]:
    """Minimal, plus Redis: the replicas coordinate through it (under a prefix of their own)."""
    return minimal_config(sim, admission={"redis": {
        "url": redis_url, "key_prefix": f"replicas-{uuid.uuid4().hex[:8]}:"}}, **extra)


def start_replicas(stack: contextlib.ExitStack, cfg: dict[str, Any], workdir: Path,
                   count: int = REPLICAS) -> list[GatewayProcess]:
    gateways = [GatewayProcess(dict(cfg), workdir) for _ in range(count)]
    for gw in gateways:
        stack.callback(gw.stop)
    with ThreadPoolExecutor(count) as pool:          # start together: ~2 s, not ~6 s
        list(pool.map(lambda gw: gw.start(), gateways))
    for gw in gateways:
        gw.wait_workers_ready(WORKERS)
    return gateways


def cluster(gw: GatewayProcess) -> dict[str, Any]:
    doc = gw.status()["cluster"]
    assert isinstance(doc, dict), doc
    return doc


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
               gateways: Sequence[GatewayProcess] = ()) -> float:
    """Poll until ``predicate`` holds; the seconds it took. On timeout, the logs."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(OSError):
            if predicate():
                return time.monotonic() - started
        time.sleep(0.05)
    logs = "\n".join(f"--- {gw.hostport}\n{gw.log()}" for gw in gateways)
    raise AssertionError(f"no {what} within {timeout_s:g} s\n{logs}")


def wait_members(gateways: list[GatewayProcess], n: int, timeout_s: float = 10.0) -> float:
    """Until every replica counts ``n`` members and all know the same limit of every worker
    (a replica reports its limits from the first routing-table refresh after it started, so
    for a heartbeat or so the members are known before the fleet is)."""
    workers = len(gateways[0].config["workers"])

    def settled() -> bool:
        docs = [cluster(gw) for gw in gateways]
        fleets = [fleet_by_worker(d) for d in docs]
        return (all(d["members"] == n for d in docs) and len(fleets[0]) == workers
                and all(f == fleets[0] for f in fleets))

    return wait_until(settled, timeout_s, f"{n} members seen by every replica", gateways)


def units_by_worker(doc: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(w, m): int(n) for w, models in doc["units"].items() for m, n in models.items()}


def fleet_by_worker(doc: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(w, m): int(n) for w, models in doc["fleet_limits"].items()
            for m, n in models.items()}


# ------------------------------------------------------------------------------ 1. shares

def test_replicas_units_add_up_to_the_fleet_limit_and_the_queue_stays_in_the_gateways(
        stack: contextlib.ExitStack, tmp_path: Path) -> None:
    """The limits are kept static here (``upstream.model_limits: static``, 2 × 4 per worker):
    learned ones follow latency, 6 to 16 per worker under this load even behind one gateway,
    and against a moving figure "never above the fleet's limit" means nothing."""
    redis = start_redis(stack)
    sim = start_sim(stack)
    gateways = start_replicas(stack, redis_config(sim, redis.url,
                                                  upstream={"model_limits": "static"}), tmp_path)
    wait_members(gateways, REPLICAS)

    def settled() -> bool:   # the shares take a heartbeat or two to move to their targets
        docs = [cluster(gw) for gw in gateways]
        return sum(d["share"] for d in docs) == pytest.approx(1.0, abs=0.01) and all(
            n >= 1 for d in docs for n in units_by_worker(d).values())

    deadline = time.monotonic() + 10.0
    while not settled() and time.monotonic() < deadline:
        time.sleep(0.1)
    docs = [cluster(gw) for gw in gateways]
    assert {d["via"] for d in docs} == {"redis"} and all(d["healthy"] for d in docs), docs
    assert len({d["member"] for d in docs}) == REPLICAS
    fleet = fleet_by_worker(docs[0])
    worker_ids = {f"127.0.0.1:{p}" for p in sim.ports}
    assert fleet == {(w, MODEL): 2 * INSTANCES for w in worker_ids}, fleet
    for key, limit in fleet.items():
        held = [units_by_worker(d).get(key, 0) for d in docs]
        assert sum(held) <= limit, (key, held, limit)
        assert all(n >= 1 for n in held), (key, held)    # every replica can use every worker
    assert sum(d["share"] for d in docs) == pytest.approx(1.0, abs=0.01), docs

    # 12 clients on each replica, 36 in all, against 3 workers whose fleet limit is 8 each
    load = Load([gw.port for gw in gateways], 12, answer_timeout_s=20.0,
                max_duration_s=30.0).start()
    over: list[tuple[float, list[int]]] = []    # (when, in flight per worker) beyond the limit
    unit_sums: list[tuple[float, dict[str, int]]] = []   # (when, units per worker over all)
    queued = 0                                  # the most waiting in the gateways at once
    try:
        while load.elapsed() < 5.0:
            in_flight = [int(w["in_flight"]) for w in sim.stats()]
            if max(in_flight) > 2 * INSTANCES:
                over.append((round(load.elapsed(), 2), in_flight))
            docs = [gw.status() for gw in gateways]
            queued = max(queued, sum(d["fleet"]["queue_length"] for d in docs))
            sums: dict[str, int] = {}
            for d in docs:
                for (wid, _), n in units_by_worker(d["cluster"]).items():
                    sums[wid] = sums.get(wid, 0) + n
            unit_sums.append((round(load.elapsed(), 2), sums))
            time.sleep(0.02)
        under_load = [cluster(gw) for gw in gateways]
    finally:
        samples = load.stop()

    answered = by_status(samples)
    most = {f"127.0.0.1:{w['port']}": int(w["max_in_flight"]) for w in sim.stats()}
    per_replica = [sum(1 for s in samples if s.target == i and s.status == 200)
                   for i in range(REPLICAS)]
    over_units = [(t, sums) for t, sums in unit_sums if max(sums.values()) > 2 * INSTANCES]
    print(f"answers {answered} (200s per replica {per_replica}); fleet limits {fleet}; "
          f"most in flight per worker {most}; most queued in the gateways {queued}; "
          f"in flight beyond the limit {over[:8]} ({len(over)} samples); units summed "
          f"beyond it {over_units[:8]} ({len(over_units)} of {len(unit_sums)} samples)")
    assert set(answered) == {200}, answered
    assert all(n > 0 for n in per_replica), per_replica
    assert queued > 0                                    # the queue is in the gateways…
    assert fleet_by_worker(under_load[0]) == fleet
    assert all(d["members"] == REPLICAS and d["healthy"] for d in under_load), under_load
    beyond = {wid: n for wid, n in most.items() if n > fleet[wid, MODEL]}
    assert not beyond, (f"the workers held more than the fleet limit: most in flight "  # …not
                        f"{beyond} > {2 * INSTANCES}; units summed over the replicas "  # there
                        f"{over_units[:4]}")


# ------------------------------------------------------------------------------ 2. SIGKILL

def test_a_killed_replica_drops_out_within_its_lease(stack: contextlib.ExitStack,
                                                     tmp_path: Path) -> None:
    redis = start_redis(stack)
    sim = start_sim(stack)
    gateways = start_replicas(stack, redis_config(sim, redis.url), tmp_path)
    wait_members(gateways, REPLICAS)
    victim, survivors = gateways[0], gateways[1:]

    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()

    def two_share_everything() -> bool:
        docs = [cluster(gw) for gw in survivors]
        return (all(d["members"] == 2 for d in docs)
                and sum(d["share"] for d in docs) == pytest.approx(1.0, abs=0.01))

    took = wait_until(two_share_everything, 3.0, "2 members sharing the whole fleet",
                      survivors)
    docs = [cluster(gw) for gw in survivors]
    print(f"members == 2 and shares {[d['share'] for d in docs]} "
          f"{time.monotonic() - killed_at:.2f} s after SIGKILL (lease {LEASE_S} s)")
    assert took < 3.0
    fleet = fleet_by_worker(docs[0])
    for key, limit in fleet.items():
        assert sum(units_by_worker(d).get(key, 0) for d in docs) == limit, (key, docs)
    assert victim.proc is not None and victim.proc.wait(5) == -signal.SIGKILL


# ------------------------------------------------------------------------------ 3. Redis lost

def restart_redis(stack: contextlib.ExitStack, port: int, workdir: Path) -> subprocess.Popen[
        bytes]:
    """A fresh redis-server on the port the replicas know (the first one is gone)."""
    workdir.mkdir(exist_ok=True)
    proc = procs.start([require_tool("redis-server"), "--port", str(port),
                        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--dir", str(workdir), "--loglevel", "warning"])
    stack.callback(procs.stop, proc, 5)

    def pong() -> bool:
        try:
            return command(port, "PING").startswith(b"+PONG")
        except OSError:
            return False

    procs.wait_until(pong, 10.0, proc=proc, what="redis-server on its old port")
    return proc


def test_redis_lost_keeps_serving_says_so_once_and_recovers(stack: contextlib.ExitStack,
                                                             tmp_path: Path) -> None:
    redis = start_redis(stack)
    sim = start_sim(stack)
    gateways = start_replicas(stack, redis_config(sim, redis.url), tmp_path)
    wait_members(gateways, REPLICAS)
    port = redis.port

    # 4 clients per replica: 12 in all, below the fleet's 24
    load = Load([gw.port for gw in gateways], 4, answer_timeout_s=10.0,
                max_duration_s=40.0).start()
    try:
        time.sleep(1.0)
        redis.stop()                                      # SIGTERM: gone, port closed
        lost_in = wait_until(lambda: not any(cluster(gw)["healthy"] for gw in gateways), 3.0,
                             "every replica unhealthy", gateways)
        lost_docs = [cluster(gw) for gw in gateways]
        time.sleep(2.0)                                   # serving on without Redis
        down_docs = [cluster(gw) for gw in gateways]
        lost_at = load.elapsed()
        restart_redis(stack, port, tmp_path / "redis-again")
        back_in = wait_until(lambda: all(cluster(gw)["healthy"] for gw in gateways), 5.0,
                             "every replica healthy again", gateways)
        wait_members(gateways, REPLICAS, 5.0)
        time.sleep(1.0)
    finally:
        samples = load.stop()

    answered = by_status(samples)
    during = by_status([s for s in samples if s.sent_at > lost_at - 2.5])
    print(f"answers {answered}, {during} around the outage; unhealthy {lost_in:.2f} s after "
          f"Redis stopped, healthy {back_in:.2f} s after it came back; while down "
          f"{[(d['failures_total'], d['members'], d['share']) for d in down_docs]}")
    assert set(answered) == {200}, answered
    assert sum(during.values()) > 50, during
    for before, d in zip(lost_docs, down_docs, strict=True):
        assert not d["healthy"] and d["failures_total"] > before["failures_total"] >= 1, d
        assert d["units"], d                  # the last known share kept
    for gw in gateways:
        log = gw.log_path.read_text()
        assert log.count("coordination via redis lost") == 1, log[-3000:]
        assert "Traceback" not in log, log[-3000:]
    docs = [cluster(gw) for gw in gateways]
    assert all(d["healthy"] and d["members"] == REPLICAS for d in docs), docs


# ------------------------------------------------------------------------------ 4. processes

def children_of(pid: int) -> set[int]:
    """The live child processes of ``pid`` (a /proc scan)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def pid_of(member: str) -> int:
    """A member id is ``host:pid:random``."""
    return int(member.rsplit(":", 2)[1])


def test_processes_share_one_port_as_one_gateway(stack: contextlib.ExitStack,
                                                 tmp_path: Path) -> None:
    sim = start_sim(stack)
    port = free_port()
    cfg = minimal_config(sim, listen={"host": "127.0.0.1", "port": port},
                         upstream={"drain_timeout_s": 5.0})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log_path = tmp_path / "gateway.log"
    parent = procs.start([sys.executable, "-m", "gateway", "serve", "--config", str(path),
                          "--processes", "3"], log_path=log_path, new_session=True)
    stack.callback(procs.stop, parent, 10, group=True)
    url = f"http://127.0.0.1:{port}"

    seen: list[tuple[float, str, int]] = []     # (when, member, members) per fresh connection

    def look() -> dict[str, Any] | None:
        try:
            status, body = http_get(url + "/status.json", timeout_s=2.0)
        except OSError:
            return None
        if status != 200:
            return None
        doc: dict[str, Any] = yaml.safe_load(body)    # JSON is YAML
        c = doc["cluster"]
        seen.append((time.monotonic(), c["member"], c["members"]))
        return doc

    def three_members_each() -> bool:
        docs = [look() for _ in range(12)]
        latest = {member: n for _, member, n in seen[-30:]}
        return (all(d is not None for d in docs) and len(latest) == 3
                and set(latest.values()) == {3})

    procs.wait_until(lambda: procs.is_http_ok(url + "/v2/health/ready"), 30.0, proc=parent,
                     what="the gateway ready")
    wait_until(three_members_each, 20.0, "3 processes each seeing 3 members")
    docs = [d for d in (look() for _ in range(12)) if d is not None]
    assert {d["cluster"]["via"] for d in docs} == {"processes"}, docs
    answers = [httpx.post(url + INFER_PATH, content=INFER_BODY, timeout=10.0).status_code
               for _ in range(20)]                      # one port, served by all of them
    assert set(answers) == {200}, answers
    members = {member for _, member, _ in seen[-30:]}
    children = children_of(parent.pid)
    assert {pid_of(m) for m in members} == children, (members, children)

    victim = sorted(members)[0]
    survivors = members - {victim}
    os.kill(pid_of(victim), signal.SIGKILL)
    killed_at = time.monotonic()

    def victim_gone() -> bool:
        look()
        after = [(t, m, n) for t, m, n in seen if t > killed_at]
        dropped = all(any(m == s and n == 2 for _, m, n in after) for s in survivors)
        newcomers = [t for t, m, _ in after if m not in members]
        replaced = bool(newcomers) and all(
            any(m == s and n == 3 and t > newcomers[0] for t, m, n in after)
            for s in survivors)
        return dropped or replaced

    took = wait_until(victim_gone, 3.0, "the killed process out of the survivors' count")
    after = [(round(t - killed_at, 2), m, n) for t, m, n in seen if t > killed_at]
    print(f"killed {victim}; {took:.2f} s to see it gone; after: {after[::5]}")
    assert not any(m == victim for _, m, _ in after)
    assert all(n in (2, 3, 4) for _, _, n in after), after

    wait_until(lambda: len(children_of(parent.pid)) == 3, 10.0, "the killed process replaced")
    children = children_of(parent.pid)
    parent.send_signal(signal.SIGTERM)
    try:
        code = parent.wait(5.0 + 5.0)                     # the drain timeout, and some
    except subprocess.TimeoutExpired:
        raise AssertionError(f"parent still running\n{log_path.read_text()[-3000:]}") from None
    log = log_path.read_text()
    assert code == 0, log[-3000:]
    procs.wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), 5.0,
                     what="every child gone")
    assert "restarting it" in log, log[-3000:]


# ------------------------------------------------------------------------------ 5. signals

CLIENTS = (10, 6, 2)     # per replica: the load is spread over them, unevenly


def test_replicas_read_the_same_capacity_signals(stack: contextlib.ExitStack,
                                                 tmp_path: Path) -> None:
    """18 clients, 10, 6 and 2 on the three replicas, against 3 workers of 4 instances: every
    worker always has its 4 instances busy, so the fleet is about 100 % utilised, while each
    replica's own requests alone would fill 83 %, 50 % and 17 % of them. With a 1.0 target and
    N+1 the reactive desired count is ceil(3 × u) + 1 = 4 for any u in (0.67, 1], so rounding
    cannot split the replicas."""
    redis = start_redis(stack)
    sim = start_sim(stack)
    gateways = start_replicas(stack, redis_config(
        sim, redis.url, capacity={"target_utilisation": 1.0}), tmp_path)
    wait_members(gateways, REPLICAS)
    ports = [gw.port for gw, n in zip(gateways, CLIENTS, strict=True) for _ in range(n)]
    load = Load(ports, 1, answer_timeout_s=10.0, max_duration_s=40.0).start()
    history: list[list[tuple[float, int, int]]] = []

    def agree() -> bool:
        fleets = [gw.status()["fleet"] for gw in gateways]
        now = [(f["utilisation"], f["desired_replicas"]["reactive"],
                f["desired_replicas"]["predictive"]) for f in fleets]
        history.append(now)
        utils = [u for u, _, _ in now]
        return (load.elapsed() > 8.0 and max(utils) - min(utils) <= 0.1
                and min(utils) > 0.85 and len({r for _, r, _ in now}) == 1)

    try:
        wait_until(agree, 30.0, "the replicas' signals agreeing", gateways)
        steady = []
        for _ in range(6):                                # and they keep agreeing
            time.sleep(0.5)
            steady.append(agree())
    finally:
        samples = load.stop()
    print(f"(utilisation, reactive, predictive) per replica, last: {history[-7:]}")
    assert set(by_status(samples)) == {200}, by_status(samples)
    assert all(steady), history[-7:]
    assert {r for _, r, _ in history[-1]} == {4}, history[-1]
    # The predictive count rounds a forecast each replica samples at its own moments: on a
    # rounding edge (4.0 replicas' worth of traffic here) they may differ by one.
    predictive = [p for _, _, p in history[-1]]
    assert max(predictive) - min(predictive) <= 1, history[-1]
