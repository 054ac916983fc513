"""The HTTP side (/healthz, /readyz, /metrics) under slow and abusive clients.

A probe or a scrape that times out restarts or blinds a healthy pod, so these endpoints must
answer promptly whatever other connections to the port do. Each test holds many real sockets
against a real server for a bounded time while probing the endpoints, then checks that the
server cut the slow sockets at its request deadline and that its thread count did not grow.
"""

import re
import socket
import threading
import time

import pytest

import arcface_testlib as lib

SLOW_SOCKETS = 50
ATTACK_SECONDS = 12.0
PROBE_TIMEOUT = 1.0
ENDPOINTS = ("/healthz", "/readyz", "/metrics")
# http_server.h: the whole request head must arrive within this many seconds.
REQUEST_DEADLINE = 5.0
# The margin allows for a loaded 2-core machine; a server without a deadline holds the sockets
# for the whole attack (12 s), well past it.
DEADLINE_MARGIN = 3.0
MAX_CONNECTIONS = 256


@pytest.fixture(scope="module")
def server(session_servers):
    """One small server for the module: each test leaves it as it found it (checked)."""
    return session_servers(lib.demo_args(), name="http_abuse")


def server_threads(server):
    with open(f"/proc/{server.proc.pid}/status") as f:
        return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M).group(1))


def probe_all(server):
    """Each endpoint once, each within PROBE_TIMEOUT; returns the slowest answer in seconds."""
    slowest = 0.0
    for path in ENDPOINTS:
        start = time.monotonic()
        status, body = lib.http_get(server.http_base + path, timeout=PROBE_TIMEOUT)
        elapsed = time.monotonic() - start
        assert status == 200, f"{path} answered {status}: {body[:200]!r}"
        assert body, f"{path} answered an empty body"
        slowest = max(slowest, elapsed)
    return slowest


class SlowClients:
    """`count` sockets that each send a request head in small pieces (`step` bytes every
    `interval(i)` seconds), never finishing it; a socket the server closes is reconnected
    until `seconds` have passed. Records how long each connection lived and what the server
    answered before closing it."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 1000

    def __init__(self, port, count, seconds, step, interval):
        self.port, self.count, self.seconds = port, count, seconds
        self.step, self.interval = step, interval
        self.lifetimes = []  # seconds from connect to the server closing the socket
        self.answers = []  # what the server sent before closing
        self.connects = 0
        self.error = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._thread.join(timeout=self.seconds + 30)
        assert not self._thread.is_alive(), "slow clients did not stop"
        if exc[0] is None and self.error is not None:
            raise self.error

    def _connect(self, now):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        self.connects += 1
        return {"sock": s, "opened": now, "sent": 0, "next": now}

    def _run(self):
        try:
            self._loop()
        except Exception as e:  # surfaced by __exit__
            self.error = e

    def _loop(self):
        start = time.monotonic()
        end = start + self.seconds
        conns = [self._connect(start) for _ in range(self.count)]
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                for i, c in enumerate(conns):
                    closed, answer = False, b""
                    try:
                        while True:
                            chunk = c["sock"].recv(4096)
                            if not chunk:
                                closed = True
                                break
                            answer += chunk
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed = True
                    if not closed and now >= c["next"]:
                        piece = self.HEAD[c["sent"]:c["sent"] + self.step]
                        try:
                            c["sock"].send(piece)
                            c["sent"] += len(piece)
                            c["next"] = now + self.interval(i)
                        except BlockingIOError:
                            pass
                        except OSError:
                            closed = True
                    if closed:
                        self.lifetimes.append(now - c["opened"])
                        if answer:
                            self.answers.append(answer)
                        c["sock"].close()
                        conns[i] = self._connect(now)
                time.sleep(0.05)
        finally:
            for c in conns:
                c["sock"].close()


def attack_and_probe(server, step, interval):
    """Runs SlowClients against the server while probing every endpoint; checks every probe
    answered in time and the thread count stayed flat; returns the SlowClients."""
    baseline = server_threads(server)
    assert probe_all(server) < PROBE_TIMEOUT
    latencies, peak_threads = [], baseline
    with SlowClients(server.http_port, SLOW_SOCKETS, ATTACK_SECONDS, step, interval) as slow:
        time.sleep(1.0)  # every slow socket connected and sending
        while slow._thread.is_alive():
            latencies.append(probe_all(server))
            peak_threads = max(peak_threads, server_threads(server))
            time.sleep(0.2)
    assert len(latencies) >= 10, f"only {len(latencies)} probe rounds during the attack"
    assert max(latencies) < PROBE_TIMEOUT, latencies

    # After the attack, all is normal and no thread was added for the connections.
    assert probe_all(server) < PROBE_TIMEOUT
    lib.wait_until(lambda: server_threads(server) <= baseline + 1, 10,
                   what=f"threads back near the baseline of {baseline}")
    assert peak_threads <= baseline + 2, (baseline, peak_threads)
    print(f"{len(latencies)} probe rounds, slowest answer {max(latencies) * 1000:.0f} ms; "
          f"{slow.connects} slow connections, {len(slow.lifetimes)} cut after "
          f"{min(slow.lifetimes, default=0):.2f}-{max(slow.lifetimes, default=0):.2f} s; "
          f"threads {baseline} before, {peak_threads} at most")
    return slow


def check_cut_at_deadline(slow):
    # The attack outlasts the deadline, so every first-generation socket was cut, each within
    # the deadline (plus margin), with a 408 answer.
    assert len(slow.lifetimes) >= SLOW_SOCKETS, (len(slow.lifetimes), slow.lifetimes)
    assert max(slow.lifetimes) < REQUEST_DEADLINE + DEADLINE_MARGIN, sorted(slow.lifetimes)[-5:]
    assert min(slow.lifetimes) > REQUEST_DEADLINE - 0.5, sorted(slow.lifetimes)[:5]
    assert slow.answers and all(a.startswith(b"HTTP/1.1 408 ") for a in slow.answers), \
        slow.answers[:3]


def test_health_answers_while_50_sockets_send_a_header_line_every_1_to_2_s(server):
    line = len(b"X-Slow: 1\r\n")
    slow = attack_and_probe(server, step=line, interval=lambda i: 1.0 + (i % 11) / 10)
    check_cut_at_deadline(slow)


def test_health_answers_while_50_sockets_send_one_byte_per_second(server):
    # Every read succeeds, so a per-read timeout alone would never fire: only a deadline for
    # the whole request head cuts these.
    slow = attack_and_probe(server, step=1, interval=lambda i: 1.0)
    check_cut_at_deadline(slow)


def exchange(server, request):
    """Sends `request` on a new connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    return answer


def test_oversized_request_head_is_refused(server):
    answer = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                      b"X-Big: 123456789\r\n" * 600)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert probe_all(server) < PROBE_TIMEOUT


def test_connections_over_the_cap_evict_the_oldest(server):
    baseline = server_threads(server)
    idle = [socket.create_connection(("127.0.0.1", server.http_port), timeout=5)
            for _ in range(MAX_CONNECTIONS + 20)]
    try:
        # The first 20 (and, to admit each probe, a few more) are closed by the server; the
        # probes are answered at once.
        assert probe_all(server) < PROBE_TIMEOUT
        for s in idle[:20]:
            s.settimeout(REQUEST_DEADLINE + DEADLINE_MARGIN)
            # Evicted: closed without a word (or, on a machine slow enough to reach the
            # deadline first, a 408); either way the server has let go of it.
            data = s.recv(4096)
            assert data == b"" or data.startswith(b"HTTP/1.1 408 "), data[:100]
        assert server_threads(server) <= baseline + 1
    finally:
        for s in idle:
            s.close()
    assert probe_all(server) < PROBE_TIMEOUT


def test_keep_alive_clients_are_answered_and_closed(server):
    # One request per connection: the answer says Connection: close and the server closes.
    answer = exchange(
        server, b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"Connection: close" in head, head
    assert body == b"ready\n"
