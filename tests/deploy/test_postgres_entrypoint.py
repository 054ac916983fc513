"""deploy/postgres-entrypoint.sh (the entry point of the Dockerfile's `postgres` image, the
gallery's shared store in docker-compose.postgres.yml) run here, without Docker, on Debian's
PostgreSQL 15 as the image runs it: an unprivileged user (postgres when the test runs as root),
PATH with /usr/lib/postgresql/15/bin, an empty PGDATA; listening on loopback only (the extra
arguments the entry point passes on). Checks: the first start makes user and database `arcface`
with PGPASSWORD, password logins over TCP work and a wrong password is refused; SIGTERM stops
it with 0; a restart keeps the cluster (a new PGPASSWORD changes nothing); no PGPASSWORD, no
start."""

import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRYPOINT = os.path.join(ROOT, "deploy", "postgres-entrypoint.sh")
PG_BIN = "/usr/lib/postgresql/15/bin"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pgdir():
    if not os.path.isfile(os.path.join(PG_BIN, "initdb")):
        pytest.fail("PostgreSQL 15 missing: run deploy/install-deps.sh")
    # Not under pytest's tmp_path, which only root may enter.
    path = pathlib.Path(tempfile.mkdtemp(prefix="arcface-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: the image's user, postgres
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(pgdir, port, password):
    env = {"PATH": f"{PG_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "PGDATA": str(pgdir / "data")}
    if password is not None:
        env["PGPASSWORD"] = password
    cmd = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), ENTRYPOINT,
           "-c", "listen_addresses=127.0.0.1", "-p", str(port)]
    # As root: exec'd as postgres directly (no runuser session between), so that SIGTERM and
    # the exit status are the entry point's own, as PID 1's in the container.
    root = os.geteuid() == 0
    user = {"user": "postgres", "group": "postgres", "extra_groups": []} if root else {}
    with open(pgdir / "log", "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, **user)


def psql(port, password, sql="select current_user || '/' || current_database()"):
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="5")
    return subprocess.run([os.path.join(PG_BIN, "psql"), "-XAtq",
                           f"postgres://arcface@127.0.0.1:{port}/arcface", "-c", sql],
                          env=env, capture_output=True, text=True, timeout=30)


def wait_accepting(proc, port, pgdir):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (pgdir / "log").read_text()
        r = subprocess.run([os.path.join(PG_BIN, "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                           capture_output=True, timeout=10)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("not accepting connections after 60 s:\n" + (pgdir / "log").read_text())


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_first_start_makes_the_cluster_and_a_restart_keeps_it(pgdir):
    port = free_port()
    proc = start(pgdir, port, "first-secret")
    try:
        wait_accepting(proc, port, pgdir)
        r = psql(port, "first-secret")
        assert r.returncode == 0 and r.stdout.strip() == "arcface/arcface", r.stderr
        r = psql(port, "wrong")
        assert r.returncode != 0 and "password authentication failed" in r.stderr, r.stderr
        # the gallery's store creates tables: the user owns its database
        assert psql(port, "first-secret", "create table t (x int); drop table t").returncode == 0
    finally:
        rc = stop(proc)
    assert rc == 0, (pgdir / "log").read_text()
    log = (pgdir / "log").read_text()
    assert log.count("made the cluster") == 1, log

    proc = start(pgdir, port, "second-secret")
    try:
        wait_accepting(proc, port, pgdir)
        assert psql(port, "first-secret").returncode == 0
        assert psql(port, "second-secret").returncode != 0
    finally:
        assert stop(proc) == 0
    assert (pgdir / "log").read_text().count("made the cluster") == 1


def test_no_password_no_cluster(pgdir):
    proc = start(pgdir, free_port(), None)
    assert proc.wait(timeout=30) != 0
    assert "PGPASSWORD" in (pgdir / "log").read_text()
    assert not (pgdir / "data").exists()


def test_the_image_runs_the_entrypoint_as_postgres():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        stage = f.read().split("AS postgres", 1)[1].split("\nFROM ", 1)[0]
    assert "USER postgres" in stage and 'ENTRYPOINT ["postgres-entrypoint.sh"]' in stage
    assert "VOLUME /var/lib/postgresql/data" in stage
    # The entry point is found on the image's PATH, and so are initdb and postgres.
    path = re.search(r"PATH=(\S+)", stage).group(1).split(":")
    copied_to = re.search(r"COPY deploy/postgres-entrypoint.sh (\S+)/postgres-entrypoint.sh",
                          stage).group(1)
    assert copied_to in path and PG_BIN in path, (copied_to, path)
