"""Helpers shared by the tests (through conftest.py) and the benchmark (bench/bench.py): ports, the
product's environment, processes stopped by pid, and a real daemon in a subprocess.

Standard library only, and no pytest: bench/bench.py imports this module with the tests folder put
on sys.path.
"""
import os
import random
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODEMNGR = os.path.join(ROOT, "nodemngr.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import nodemngr     # noqa: E402  (the repository's, whatever copy a test or bench runs)
RESERVED_PORT = 11800           # nmPort, the default port: never used by a test or the benchmark

#: Environment variables of the product that a test or the benchmark must never inherit from the machine.
PRODUCT_VARS = ("NODEMNGR_HOST", "NODEMNGR_PORT", "NODEMNGR_FIRST_PORT", "NODEMNGR_LAST_PORT",
                "NODEMNGR_STATE", "NODEMNGR_TOKEN_FILE", "NODEMNGR_LOG_LEVEL", "NODEMNGR_LOG_FILE",
                "NODEMNGR_AUTOSTART")


class ServerError(RuntimeError):
    """A server subprocess exited, or did not answer in time; the message has its log's end."""


def clean_env(**extra):
    """os.environ without the product's variables, plus *extra* (values made str)."""
    env = {k: v for k, v in os.environ.items() if k not in PRODUCT_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ----------------------------------------------------------------------------- ports

def free_port():
    """A TCP port on 127.0.0.1 that nothing holds now (never 11800)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RESERVED_PORT:
            return port


def port_is_free(port):
    """Nothing holds *port*, TCP or UDP, on any address."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def worker_ports():
    """The share of 14000-29999 this test process draws ranges from: under pytest-xdist each worker
    has its own, so that two daemons of tests running at once never share a port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    share = 16000 // max(1, count)
    return 14000 + index * share, 14000 + (index + 1) * share


_reserved = []      # ranges of daemons that outlive a test (shared ones): free_range() avoids them


def reserve_range(first, last):
    """Keep free_range() from handing out ports of [first, last] in this process from now on."""
    _reserved.append((first, last))


def free_range(size):
    """A range of *size* ports in this worker's share, picked at random, whose first 8 are free now
    (checking all of a 1,000-port range on every test would cost more than the collisions it avoids),
    and which overlaps no reserved range."""
    low, high = worker_ports()
    reserved = _reserved
    if high - low < 2 * size:   # a few tests need most of the span: they take their chances
        low, high, reserved = 14000, 30000, []
    for _ in range(200):
        first = random.randrange(low, high - size)
        last = first + size - 1
        if first <= RESERVED_PORT <= last or any(a <= last and first <= b for a, b in reserved):
            continue
        if all(port_is_free(p) for p in range(first, first + min(size, 8))):
            return first, last
    raise ServerError("no free port range found")


def scan_free_range(size, low, high, step=None):
    """The first range of *size* ports in [low, high), every one of them free now (the benchmark's
    ranges: outside the tests' 14000-29999 when it runs beside them, and reproducible)."""
    for first in range(low, high - size + 1, step or size):
        if first <= RESERVED_PORT <= first + size - 1:
            continue
        if all(port_is_free(p) for p in range(first, first + size)):
            return first, first + size - 1
    raise ServerError("no fully free range of %d ports in %d-%d" % (size, low, high - 1))


# ----------------------------------------------------------------------------- processes

def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll *predicate* until it returns a true value or *timeout* seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


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


def stop_pid(pid, timeout=10.0):
    """SIGTERM then SIGKILL one process by pid; ignore one that is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), timeout=timeout):
            return


# Runs a copy of nodemngr.py the way `python3 nodemngr.py ARGS` does (its folder first on sys.path,
# main() as the program), with some class attributes changed first: limits are settings, as in
# socketserver, so a test of a 10 s limit can wait 1 s on the same code path.  Importing rather than
# running the file as a script also lets the ~300 daemons of a test run share one bytecode file
# instead of each compiling 100 KB of source.
LAUNCHER = """import importlib.util, os, sys
script = %(script)r
sys.path.insert(0, os.path.dirname(script))
spec = importlib.util.spec_from_file_location("nodemngr", script)
nodemngr = importlib.util.module_from_spec(spec)
sys.modules["nodemngr"] = nodemngr
spec.loader.exec_module(nodemngr)
for name, value in %(settings)r.items():
    cls, attr = name.split(".")
    if not hasattr(getattr(nodemngr, cls), attr):
        sys.exit("no setting %%s in %%s" %% (name, script))
    setattr(getattr(nodemngr, cls), attr, value)
sys.argv[0] = script
sys.exit(nodemngr.main())
"""


def launcher(script=NODEMNGR, settings=None):
    """The ``python -c`` program that runs *script* (a nodemngr.py) with *settings* applied."""
    return LAUNCHER % {"script": os.path.abspath(script), "settings": dict(settings or {})}


class ServerProcess:
    """A server in a subprocess, its output in a log file; stop() ends it by pid."""

    def __init__(self, name, argv, port, log, host="127.0.0.1", env=None, cwd=None, preexec_fn=None):
        self.name, self.host, self.port, self.log = name, host, port, log
        self._argv, self.env, self.cwd, self.preexec_fn = argv, env, cwd, preexec_fn
        self.proc = self._logf = None

    @property
    def url(self):
        return "http://%s:%d/RPC2" % (self.host, self.port)

    def argv(self):
        return list(self._argv)

    def start(self, wait=True):
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(), env=self.env if self.env is not None else clean_env(),
                                     cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, preexec_fn=self.preexec_fn)
        if wait:
            self.wait_ready()
        return self

    def answers(self):
        """Whether the server answers a ping now (one that wants a token counts): the product's
        own check, which its client and serve use too."""
        return nodemngr.who_answers(self.host, self.port, timeout=0.5) in ("nodemngr", "other")

    def wait_ready(self, timeout=10.0):
        """Poll until it answers (no fixed sleep); ServerError if it exits or does not answer in time."""
        def up():
            self.check_alive()
            return self.answers()
        if not wait_until(up, timeout, interval=0.01):
            raise ServerError("%s did not answer within %ss; log:\n%s" % (self.name, timeout, self.log_tail()))

    def check_alive(self):
        if self.proc.poll() is not None:
            raise ServerError("%s exited with %s; log:\n%s" % (self.name, self.proc.returncode, self.log_tail()))

    def rpc(self, **kw):
        """A fresh plain ServerProxy to this server (no pid sent, unlike NodeMngrProxy)."""
        return xmlrpc.client.ServerProxy(self.url, use_builtin_types=True, **kw)

    def read_log(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=3000):
        return self.read_log()[-n:]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid)
            self.proc.wait(10)
        if self._logf:
            self._logf.close()
            self._logf = None


class Daemon(ServerProcess):
    """One real nodemngr daemon in a subprocess, with a range and state of its own.

    Attributes: host, port, first, last, state (path or "none"), log (path), proc, url, env (the
    environment a client of this daemon needs: NODEMNGR_HOST/PORT set, autostart off).
    settings: {"Class.attribute": value} set in the daemon before it serves, e.g.
    {"NodeMngrServer.stall_timeout": 1.0}.  script: the nodemngr.py to run (the benchmark's
    --baseline runs an older copy).  preexec_fn: run in the child before it starts (rlimits).
    cwd: its working folder (default: this process's).
    """

    def __init__(self, folder, first=None, last=None, size=50, state=None, host="127.0.0.1",
                 port=None, extra_args=(), env=None, python=None, settings=None, script=NODEMNGR,
                 log_level="DEBUG", name="daemon", preexec_fn=None, cwd=None):
        if first is None:
            first, last = free_range(size)
        port_given = port
        port = port or free_port()
        super().__init__(name, None, port, os.path.join(str(folder), "%s-%d.log" % (name, port)), host=host,
                         cwd=cwd, preexec_fn=preexec_fn)
        self._own_port = port_given is None     # a port we picked may be taken before the daemon binds it
        self.first, self.last = first, last
        self.state = os.path.join(str(folder), "state.sqlite3") if state is None else str(state)
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.settings = dict(settings or {})
        self.script, self.log_level = script, log_level
        self.env = clean_env(NODEMNGR_HOST=self.host, NODEMNGR_PORT=self.port, NODEMNGR_AUTOSTART=0,
                             **(env or {}))

    def argv(self):
        return [self.python, "-c", launcher(self.script, self.settings), "serve", "--host", self.host,
                "--port", str(self.port), "--first-port", str(self.first), "--last-port", str(self.last),
                "--state", self.state, "--log-level", self.log_level] + self.extra_args

    def start(self, wait=True):
        for attempt in range(3):
            super().start(wait=False)
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except ServerError:
                lost = "is held by another program" in self.read_log() and self.proc.poll() is not None
                if not (lost and self._own_port) or attempt == 2:
                    raise
            # another process took the free port between free_port() and the bind: pick again
            self._logf.close()
            self.port = free_port()
            self.env["NODEMNGR_PORT"] = str(self.port)
        return self

    def proxy(self, **kw):
        """A NodeMngrProxy aimed at this daemon, autostart off."""
        import nodemngr_proxy
        kw.setdefault("autostart", False)
        return nodemngr_proxy.NodeMngrProxy(host=self.host, port=self.port, **kw)

    def kill(self):
        """kill -9, and reap it."""
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout=15.0):
        """SIGTERM; return the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)
