"""Shared fixtures: real daemons in real subprocesses, on free ports, with state under tmp_path.

Every process started here is stopped in teardown by its pid; nothing is ever killed by name.
"""
import os
import random
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests start a few hundred Pythons that import nodemngr.py; where the machine forbids
# bytecode files, each of them compiles it anew (about 40 ms of CPU). Let them keep it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
NODEMNGR = os.path.join(ROOT, "nodemngr.py")
sys.path.insert(0, ROOT)

#: Short limits for tests that wait for the owner check.
FAST_REAP = {"NodeMngr.reap_interval": 0.5}

#: Environment variables of the product that a test must never inherit from the machine.
PRODUCT_VARS = ("NODEMNGR_HOST", "NODEMNGR_PORT", "NODEMNGR_FIRST_PORT", "NODEMNGR_LAST_PORT",
                "NODEMNGR_STATE", "NODEMNGR_TOKEN_FILE", "NODEMNGR_LOG_LEVEL", "NODEMNGR_LOG_FILE",
                "NODEMNGR_AUTOSTART")


def clean_env(**extra):
    """os.environ without the product's variables, plus *extra* (values made str)."""
    env = {k: v for k, v in os.environ.items() if k not in PRODUCT_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    """A TCP port on 127.0.0.1 that nothing holds now (never 11800)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 11800:
            return port


def port_is_free(port):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def _worker_ports():
    """The share of 14000-29999 this test process draws ranges from: under pytest-xdist each worker
    has its own, so that two daemons of tests running at once never share a port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    share = 16000 // max(1, count)
    return 14000 + index * share, 14000 + (index + 1) * share


def free_range(size):
    """A range of *size* ports below the ephemeral range, all free now."""
    low, high = _worker_ports()
    if high - low < 2 * size:   # a few tests need most of the span: they take their chances
        low, high = 14000, 30000
    for _ in range(200):
        first = random.randrange(low, high - size)
        if first <= 11800 <= first + size:
            continue
        if all(port_is_free(p) for p in range(first, first + min(size, 8))):
            return first, first + size - 1
    raise RuntimeError("no free port range found")


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll *predicate* until it returns a true value or *timeout* seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def stop_pid(pid, timeout=10.0):
    """SIGTERM then SIGKILL one process by pid; ignore one that is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), timeout=timeout):
            return


def pid_alive(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# Runs the daemon with some class attributes changed (limits are settings, as in socketserver),
# so that a test of a 10 s limit can wait 2 s instead.
WITH_SETTINGS = """import sys
sys.path.insert(0, %r)
import nodemngr
for name, value in %r.items():
    cls, attr = name.split(".")
    setattr(getattr(nodemngr, cls), attr, value)
sys.exit(nodemngr.main())
"""


class Daemon:
    """One real nodemngr daemon in a subprocess.

    Attributes: host, port, first, last, state (path or "none"), log (path), proc, url, env (the
    environment a client of this daemon needs: NODEMNGR_HOST/PORT set, autostart off).
    settings: {"Class.attribute": value} set in the daemon before it serves, e.g.
    {"NodeMngrServer.stall_timeout": 2.0, "NodeMngr.reap_interval": 0.5}.
    """

    def __init__(self, tmp_path, first=None, last=None, size=50, state=None, host="127.0.0.1",
                 port=None, extra_args=(), env=None, python=None, settings=None):
        if first is None:
            first, last = free_range(size)
        self.host, self.port = host, port or free_port()
        self._own_port = port is None     # a port we picked may be taken before the daemon binds it
        self.first, self.last = first, last
        self.state = str(tmp_path / "state.sqlite3") if state is None else str(state)
        self.log = str(tmp_path / ("daemon-%d.log" % self.port))
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.settings = dict(settings or {})
        self.env = clean_env(NODEMNGR_HOST=self.host, NODEMNGR_PORT=self.port, NODEMNGR_AUTOSTART=0,
                             **(env or {}))
        self.proc = None

    @property
    def url(self):
        return "http://%s:%d/RPC2" % (self.host, self.port)

    def argv(self):
        program = ["-c", WITH_SETTINGS % (ROOT, self.settings)] if self.settings else [NODEMNGR]
        return [self.python] + program + ["serve", "--host", self.host, "--port", str(self.port),
                "--first-port", str(self.first), "--last-port", str(self.last),
                "--state", self.state, "--log-level", "DEBUG"] + self.extra_args

    def start(self, wait=True):
        for attempt in range(3):
            self._logf = open(self.log, "ab")
            self.proc = subprocess.Popen(self.argv(), env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=self._logf, stderr=subprocess.STDOUT)
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except RuntimeError:
                lost = "is held by another program" in self.read_log() and self.proc.poll() is not None
                if not (lost and self._own_port) or attempt == 2:
                    raise
            # another process took the free port between free_port() and the bind: pick again
            self._logf.close()
            self.port = free_port()
            self.env["NODEMNGR_PORT"] = str(self.port)
        return self

    def wait_ready(self, timeout=10.0):
        def up():
            if self.proc.poll() is not None:
                raise RuntimeError("daemon exited with %s; log:\n%s" % (self.proc.returncode, self.read_log()))
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                return self.rpc().ping()
            except xmlrpc.client.ProtocolError as exc:
                return exc.errcode == 401     # up, and wants a token
            except OSError:
                return None
        if not wait_until(up, timeout):
            raise RuntimeError("daemon did not answer within %ss; log:\n%s" % (timeout, self.read_log()))

    def rpc(self, **kw):
        """A fresh plain ServerProxy to this daemon (no pid sent, unlike NodeMngrProxy)."""
        return xmlrpc.client.ServerProxy(self.url, use_builtin_types=True, **kw)

    def proxy(self, **kw):
        """A NodeMngrProxy aimed at this daemon, autostart off."""
        import nodemngr_proxy
        kw.setdefault("autostart", False)
        return nodemngr_proxy.NodeMngrProxy(host=self.host, port=self.port, **kw)

    def read_log(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def kill(self):
        """kill -9, and reap it."""
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout=15.0):
        """SIGTERM; return the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid)
            self.proc.wait(10)
        if getattr(self, "_logf", None):
            self._logf.close()
            self._logf = None


@pytest.fixture
def daemon_factory(tmp_path):
    """Make (and later stop) daemons: ``d = daemon_factory(size=20)``; started unless start=False."""
    made = []

    def make(start=True, **kw):
        d = Daemon(tmp_path, **kw)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def daemon(daemon_factory):
    """One started daemon with 50 ports of its own and state under tmp_path."""
    return daemon_factory()


@pytest.fixture
def reap_pids():
    """A list to append pids to; each is stopped by pid at teardown."""
    pids = []
    yield pids
    for pid in pids:
        stop_pid(pid)
