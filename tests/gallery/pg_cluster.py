#!/usr/bin/env python3
"""A throwaway PostgreSQL cluster for the gallery's tests: initdb in a fresh temporary folder,
`postgres` on a free loopback port with trust authentication on 127.0.0.1, fsync on.

The server runs as an unprivileged user when this process is root (initdb and postgres refuse
root; CI and the dev containers run as root), through `setpriv`. It dies with its parent
(PR_SET_PDEATHSIG), and the folder is removed by close(), by the context manager and by a
finalizer, so a test that dies leaves no server behind.

Python: `with PgCluster() as pg: pg.uri ... pg.sql("CREATE ROLE ..."); pg.stop(); pg.start();
pg.kill()`.

Other languages (the C++ tests, tests/gallery/pg_cluster.h): `pg_cluster.py serve` starts a
cluster, prints `uri <URI>` on stdout, then reads one command a line on stdin (`stop`, `start`,
`kill`), answering `ok` or `error <reason>` to each; end of stdin (the test exited, however)
stops the cluster and removes its folder.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref

INSTALL_HINT = ("PostgreSQL's binaries (initdb, postgres, pg_isready, psql) were not found: "
                "deploy/install-deps.sh installs them (Debian postgresql-15); or set PG_BIN to "
                "the folder that holds them")


def find_bin_dir():
    """The folder of initdb/postgres: $PG_BIN when set, else Debian's /usr/lib/postgresql/N/bin
    (newest) or PATH. Raises RuntimeError naming the installer when there is none."""
    if os.environ.get("PG_BIN"):
        candidates = [os.environ["PG_BIN"]]
    else:
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                            key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit()
                            else 0,
                            reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(os.path.dirname(on_path))
    for folder in candidates:
        if all(os.access(os.path.join(folder, b), os.X_OK)
               for b in ("initdb", "postgres", "pg_isready", "psql")):
            return folder
    raise RuntimeError(INSTALL_HINT)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unprivileged_prefix():
    """The command prefix that drops root to nobody:nogroup; nothing when not root."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _server_prefix():
    """The server's prefix: unprivileged, and killed when this process dies. setpriv sets the
    parent-death signal after changing the ids (a credential change clears it); it is not a
    Popen preexec_fn, which makes Python fork(), where grpcio's fork handlers can hang (see
    tests/integration/arcface_testlib.py's orphan_guarded)."""
    prefix = _unprivileged_prefix() or ["setpriv"]
    return prefix + ["--pdeathsig", "KILL", "--"]


def _owner_ids():
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    import pwd
    import grp
    return pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid


class PgCluster:
    """One cluster: created and started by the constructor, removed by close()."""

    def __init__(self, start_timeout=30.0):
        self.bin = find_bin_dir()
        self.root = tempfile.mkdtemp(prefix="arcface-pg-")
        # The unprivileged server must traverse the folder (mkdtemp makes it 0700 for root).
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "postgres.log")
        self.port = None
        self.proc = None
        self._started = False
        self.start_timeout = start_timeout
        # What the finalizer needs, without a reference to self: the running server, if any.
        self._proc_box = [None]
        self._finalizer = weakref.finalize(self, PgCluster._cleanup, self.root, self._proc_box)
        uid, gid = _owner_ids()
        os.chown(self.root, uid, gid)
        # --no-sync: initdb's own final flush of a folder that dies with the test (the server
        # itself runs with fsync on).
        self._run([os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres",
                   "--auth-local=trust", "--auth-host=trust", "-E", "UTF8", "--locale=C",
                   "--no-sync"])
        self.start()

    @property
    def uri(self):
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd):
        done = subprocess.run(_unprivileged_prefix() + cmd, cwd=self.root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}")

    def start(self):
        """Starts the server (again, on the same port after stop() or kill()); returns when it
        accepts connections."""
        if self.proc is not None:
            raise RuntimeError("the cluster is already running")
        if self.port is None:
            self.port = free_port()
        deadline = time.monotonic() + self.start_timeout
        while True:
            log = open(self.log_path, "ab")
            cmd = _server_prefix() + [
                os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                "-c", "fsync=on", "-c", "max_connections=200"]
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.root)
            log.close()
            self._proc_box[0] = self.proc
            if self._wait_ready(deadline):
                self._started = True
                return
            # After kill(), the old server's leftovers (shared memory still attached by dying
            # backends, the port) can refuse the new one for a moment: try again. The first
            # start may take another port (someone took the free one meanwhile); a restart keeps
            # its port, which the clients' URIs name.
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start on port {self.port}: "
                                   f"{self._log_tail()}")
            if not self._started:
                self.port = free_port()
            time.sleep(0.2)

    def sql(self, statement):
        """Runs one statement as the superuser (psql); returns its output, unaligned."""
        done = subprocess.run([os.path.join(self.bin, "psql"), "-X", "-q", "-A", "-t",
                               "-v", "ON_ERROR_STOP=1", "-c", statement, self.uri],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql -c {statement!r} failed: {done.stdout}")
        return done.stdout

    def uri_as(self, user, password=None):
        """The URI for another role (created by the caller, e.g. with sql())."""
        secret = f":{password}" if password else ""
        return f"postgresql://{user}{secret}@127.0.0.1:{self.port}/postgres"

    def _wait_ready(self, deadline):
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                self._proc_box[0] = None
                return False
            ready = subprocess.run([os.path.join(self.bin, "pg_isready"), "-q", "-h", "127.0.0.1",
                                    "-p", str(self.port), "-U", "postgres", "-t", "1"],
                                   check=False)
            if ready.returncode == 0:
                return True
            time.sleep(0.05)
        return False

    def _log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError as e:
            return str(e)

    def stop(self):
        """Fast shutdown (SIGINT): clients are disconnected, the data is kept."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._proc_box[0] = None

    def kill(self):
        """SIGKILL to the postmaster (a crash); start() recovers from the WAL."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        self._proc_box[0] = None

    def close(self):
        self._finalizer()

    @staticmethod
    def _cleanup(root, proc_box):
        proc = proc_box[0]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown: the folder goes anyway
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve():
    """The line protocol of the module docstring."""
    try:
        cluster = PgCluster()
    except RuntimeError as e:
        print(f"error {e}".replace("\n", " "), flush=True)
        return 1
    try:
        print(f"uri {cluster.uri}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            try:
                if command == "stop":
                    cluster.stop()
                elif command == "start":
                    cluster.start()
                elif command == "kill":
                    cluster.kill()
                else:
                    raise RuntimeError(f"unknown command '{command}' (stop, start, kill)")
                print("ok", flush=True)
            except RuntimeError as e:
                print(f"error {e}".replace("\n", " "), flush=True)
    finally:
        # The parent's death brings both SIGTERM and the end of stdin: the second must not cut
        # the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] != "serve":
        print("usage: pg_cluster.py serve   (see the module's docstring)", file=sys.stderr)
        sys.exit(2)
    # The C++ fixture starts this with PR_SET_PDEATHSIG; a SIGTERM still cleans up.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(serve())
