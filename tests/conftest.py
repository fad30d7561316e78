"""Fixtures, pytest hooks and the session's set-up, nothing else: real daemons in real
subprocesses, on free ports, with state under tmp_path.

Every process started here is stopped in teardown by its pid; nothing is ever killed by name.
Plain helpers and constants live in support.py (no pytest there), which bench/bench.py shares:
test modules import them from there, never from this file.
"""
import gc
import os
import subprocess
import sys

import pytest

from support import (NOBODY, PRODUCT_VARS, ROOT, Daemon, OtherUser, clean_env, reserve_range, stop_fork_server,
                     stop_pid, use_fork_server, why_not_other_users)

# The tests start a few hundred Pythons that import nodemngr.py; where the machine forbids
# bytecode files, each of them compiles it anew (about 40 ms of CPU). Let them keep it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.path.insert(0, ROOT)

# About a hundred daemons per run: each forked from a process that has imported nodemngr.py
# already (support.ForkServer), not exec'd, where that is the same program; TESTS_EXEC_DAEMONS=1
# execs them all.
use_fork_server()


@pytest.fixture
def etcd(tmp_path):
    """A real etcd member of its own (free ports, data under tmp_path), stopped by its pid at the
    end; skipped, with the reason, where etcd is not installed."""
    from etcd_support import Etcd, etcd_binary
    if etcd_binary() is None:
        pytest.skip("etcd (Debian's etcd-server) is not installed; .ci/run installs it")
    server = Etcd(tmp_path).start()
    yield server
    server.stop()


def pytest_addoption(parser, pluginmanager):
    parser.addoption("--screenshot", metavar="PNG", help="write the status page's screenshot (docs/status-page.png) "
                     "there; an ordinary run writes none")
    # tox.ini's addopts asks for -n 6 (pytest-xdist); where xdist is missing, as in a plain
    # `python3 -m pytest` before `pip install -e .[test]`, -n is taken here and ignored: the suite
    # runs serially instead of failing on an option nobody knows.
    if not pluginmanager.has_plugin("xdist"):   # (_addoption: pytest keeps lowercase short options to plugins such as xdist)
        parser.getgroup("general")._addoption("-n", dest="numprocesses", metavar="N", default=None,
                                              help="ignored: pytest-xdist is not installed, so the tests run one at a time")


def pytest_collection_finish(session):
    # What the imports and the collection made (Hypothesis's strategies and pytest's tree among
    # them) lives until the end: out of the collector's sight, each full collection while the
    # tests run is a fraction of the cost (measured: 4-5 s less CPU over a run of the suite).
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session):
    stop_fork_server()      # (an xdist worker may end without running atexit)


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


@pytest.fixture(scope="session")
def _session_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("session-daemon"), size=50)
    reserve_range(d.first, d.last)      # no daemon of another test may hand out these ports
    d.start()
    yield d
    d.stop()


@pytest.fixture
def any_daemon(_session_daemon):
    """A started daemon that tests share (one per xdist worker), for those that need *a* daemon
    but not one of their own: they must not stop it, bind ports in its range, or register ports
    to processes that end (its reaped count stays 0).  Each finds it serving with nothing
    registered; whatever a test registered is deleted after it."""
    d = _session_daemon
    d.check_alive()
    assert d.rpc().listPorts() == [], "the shared daemon has registrations a test left"
    yield d
    d.check_alive()     # a test that stopped it must use daemon / daemon_factory instead
    rpc = d.rpc()
    for entry in rpc.listPorts():
        rpc.delPort(entry["port"])


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """The command line run in this process, as ``nodemngr.main(argv)``: ``run_cli(*args, env=...)``
    returns (exit status, stdout, stderr) as a ``python3 nodemngr.py ARGS`` would, without the
    quarter second of CPU an interpreter start costs.  *env* is the environment the process would
    have had (clean_env() by default): its product variables (NODEMNGR_*) are set here, the others
    unset, for the call.  For client commands and errors argparse raises before anything runs;
    ``serve`` installs signal handlers and runs a loop: it stays a real process, and here only its
    usage errors may be checked (reaching its logging setup or its loop fails the test)."""
    import nodemngr

    def no_serving(*args, **kw):
        raise AssertionError("run_cli does not serve: run serve as a process")
    monkeypatch.setattr(nodemngr, "_setup_logging", no_serving)
    monkeypatch.setattr(nodemngr, "run_daemon", no_serving)

    def run(*args, env=None):
        env = clean_env() if env is None else env
        for var in PRODUCT_VARS:
            if var in env:
                monkeypatch.setenv(var, str(env[var]))
            else:
                monkeypatch.delenv(var, raising=False)
        capsys.readouterr()         # whatever the test printed before is not the command's
        try:
            code = nodemngr.main([str(a) for a in args])
        except SystemExit as exc:   # argparse: usage errors (2), --help and --version (0)
            code = exc.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def reap_pids():
    """A list to append pids to; each is stopped by pid at teardown."""
    pids = []
    yield pids
    for pid in pids:
        stop_pid(pid)


@pytest.fixture
def sleeper(reap_pids):
    """A live process that holds nothing, to stand as a port's owner."""
    proc = subprocess.Popen(["sleep", "300"])
    reap_pids.append(proc.pid)
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def env(monkeypatch):
    """This process's environment without the product's variables (for the client in this process,
    which reads them); returns monkeypatch, to set some."""
    for var in PRODUCT_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture
def nobody(tmp_path_factory):
    """An OtherUser for the uid nobody (65534): processes of another user than the tests'
    (skipped, with the reason, where this machine cannot make them; CI runs as root)."""
    reason = why_not_other_users()
    if reason:
        pytest.skip(reason)
    import shutil
    user = OtherUser(NOBODY, "/tmp")
    yield user
    shutil.rmtree(user.folder, ignore_errors=True)
