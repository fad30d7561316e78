"""Owners and crashes: a dead process never keeps a port (a reused pid included), a live one never
loses it (a process whose main thread ended, an owner the daemon cannot see under hidepid, checks
that fail for want of descriptors), a thread's id is not an owner, the owner check runs in slices,
and nothing acknowledged is lost to a kill -9."""
import os
import pathlib
import random
import resource
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
import textwrap
import time
import xmlrpc.client

import pytest

from support import (FAST_REAP, NODEMNGR, REAP_INTERVAL, ROOT, RawConnection, clean_env, free_port, free_range,
                     http_request, launcher, popen_python, registered, rpc_body, wait_until)

import nodemngr

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, %r)
    from nodemngr_proxy import NodeMngrProxy
    nm = NodeMngrProxy(autostart=False)
    print(nm.newPort("held by %%d" %% __import__("os").getpid()), flush=True)
    time.sleep(600)
""" % ROOT)


def start_holder(daemon):
    """A child process that takes a port with its own pid and then sleeps; (Popen, port)."""
    proc = popen_python(["-c", HOLDER], env=daemon.env, stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_a_killed_owner_frees_its_port_within_5s(daemon_factory):
    daemon = daemon_factory(settings=FAST_REAP)
    proc, port = start_holder(daemon)
    try:
        assert registered(daemon)[port]["pid"] == proc.pid
        proc.kill()     # not waited for yet: a zombie is dead too
        t0 = time.monotonic()
        assert wait_until(lambda: port not in registered(daemon), 5.0), "port still held 5 s after kill"
        print("freed after %.2f s" % (time.monotonic() - t0))
    finally:
        proc.kill()
        proc.wait(10)
    assert daemon.rpc().status()["reaped"] == 1
    log = daemon.read_log()
    assert "reaped port %d: owner pid %d" % (port, proc.pid) in log and "held by %d" % proc.pid in log


def test_owner_that_died_while_the_daemon_was_down_is_reaped_at_start(daemon):
    proc, dead_port = start_holder(daemon)
    rpc = daemon.rpc()
    no_owner = rpc.newPort("no owner", 0)
    live_owner = rpc.newPort("the test itself", os.getpid())
    assert daemon.terminate() == 0
    proc.kill()
    proc.wait(10)
    daemon.start()
    held = registered(daemon)
    assert dead_port not in held
    assert held[no_owner]["pid"] == 0 and held[live_owner]["pid"] == os.getpid()
    assert daemon.rpc().status()["reaped"] == 1


def test_a_reused_pid_does_not_keep_a_port(daemon):
    """The start time is part of the owner: the same pid with another start time is another owner.
    A state file whose entry names this process's pid with another start time (what it holds for
    an owner that died while the daemon was down, once its pid is reused) loses that entry."""
    import nodemngr
    start = nodemngr.process_start_time(os.getpid())
    assert start is not None and nodemngr.owner_alive(os.getpid(), start)
    assert not nodemngr.owner_alive(os.getpid(), start + 1)
    rpc = daemon.rpc()
    mine = rpc.newPort("this process", os.getpid())
    earlier = rpc.newPort("an earlier process with this pid", os.getpid())
    assert daemon.terminate() == 0
    db = sqlite3.connect(daemon.state)
    with db:
        assert db.execute("UPDATE ports SET start = start + 1 WHERE port = ?", (earlier,)).rowcount == 1
    db.close()
    daemon.start()
    held = registered(daemon)
    assert earlier not in held, "a port stayed with a pid that now belongs to another process"
    assert held[mine]["pid"] == os.getpid() and daemon.rpc().status()["reaped"] == 1


def test_new_port_with_a_dead_pid_is_fault_3(any_daemon):
    daemon = any_daemon
    proc = popen_python(["-c", "pass"])
    proc.wait(10)
    with pytest.raises(xmlrpc.client.Fault) as info:
        daemon.rpc().newPort("x", proc.pid)
    assert info.value.faultCode == 3 and str(proc.pid) in info.value.faultString
    assert registered(daemon) == {}


LOADER = textwrap.dedent("""
    import sys, xmlrpc.client
    rpc = xmlrpc.client.ServerProxy(sys.argv[1])
    n = 0
    while True:
        try:
            port = rpc.newPort("load %d" % n)
        except Exception:
            break
        print(port, flush=True)     # acknowledged: the daemon answered
        n += 1
""")


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45, 0.8])
def test_kill_9_under_load_loses_nothing_acknowledged(daemon_factory, delay):
    d = daemon_factory(size=12000)
    loader = popen_python(["-c", LOADER, d.url], stdout=subprocess.PIPE, text=True)
    try:
        # the load is running: two answers (one call with its fsync can outlast the shortest delay on
        # a loaded machine, and a crash after a single answer would not be one under load)
        acknowledged = [int(loader.stdout.readline()), int(loader.stdout.readline())]
        time.sleep(delay * random.uniform(0.8, 1.2))     # a different instant each time
        assert loader.poll() is None, "the load ended before the crash (range exhausted?)"
        d.kill()
        # read through the same buffered file as readline() did: communicate() would skip its buffer
        acknowledged += [int(line) for line in loader.stdout.read().split()]
        loader.wait(30)
    finally:
        if loader.poll() is None:
            loader.kill()
            loader.wait(10)
    d.start()
    held = registered(d)
    assert set(acknowledged) <= set(held), "a port the client was given is missing after the crash"
    assert len(held) - len(acknowledged) <= 1, "at most the one call cut off in flight may be extra"
    fresh = [d.rpc().newPort("after restart") for _ in range(20)]
    assert not set(fresh) & set(held)


# --- owners the daemon must not take for dead -----------------------------------------------------

def test_a_thread_id_is_not_an_owner(any_daemon):
    daemon = any_daemon
    script = textwrap.dedent("""
        import sys, threading
        ready, done = threading.Event(), threading.Event()
        def run():
            print(threading.get_native_id(), flush=True)
            done.wait()
        threading.Thread(target=run).start()
        sys.stdin.read()
        done.set()
    """)
    proc = popen_python(["-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        tid = int(proc.stdout.readline())
        assert tid != proc.pid
        with pytest.raises(xmlrpc.client.Fault) as info:
            daemon.rpc().newPort("thread", tid)
        assert info.value.faultCode == 3 and "thread" in info.value.faultString
        assert daemon.rpc().newPort("process", proc.pid) == daemon.first
    finally:
        for entry in daemon.rpc().listPorts():  # given back before its owner ends: the shared
            daemon.rpc().delPort(entry["port"])  # daemon reaps nothing (its reaped count stays 0)
        proc.stdin.close()
        proc.wait(10)


ZOMBIE_LEADER = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    threading.Thread(target=lambda: (time.sleep(60), os._exit(0))).start()
    print("ready", flush=True)
    time.sleep(0.2)
    ctypes.CDLL(None).pthread_exit(None)     # the main thread ends; the process runs on
""")


def test_a_process_whose_main_thread_ended_still_owns_its_port(daemon_factory, reap_pids):
    d = daemon_factory(settings=FAST_REAP)
    proc = popen_python(["-c", ZOMBIE_LEADER], stdout=subprocess.PIPE, text=True)
    reap_pids.append(proc.pid)
    assert proc.stdout.readline() == "ready\n"
    assert wait_until(lambda: open("/proc/%d/stat" % proc.pid).read().rpartition(")")[2].split()[0] == "Z")
    port = d.rpc().newPort("threads live on", proc.pid)
    changed = wait_until(lambda: d.rpc().listPorts() == [], timeout=3 * REAP_INTERVAL)
    assert not changed, "the port was freed while the process ran"
    assert [(e["port"], e["pid"]) for e in d.rpc().listPorts()] == [(port, proc.pid)]
    proc.kill()
    proc.wait()
    assert wait_until(lambda: d.rpc().listPorts() == [], timeout=5)


@pytest.fixture
def public_copy():
    """A folder an unprivileged user can read (pytest's are root's alone), holding nodemngr.py."""
    folder = tempfile.mkdtemp(prefix="nodemngr-public-")
    os.chmod(folder, 0o755)
    shutil.copy(NODEMNGR, folder)
    yield pathlib.Path(folder)
    shutil.rmtree(folder)


HIDEPID_DAEMON = ("mount -t proc -o hidepid=2 proc /proc && exec setpriv --reuid=65534 --regid=65534 "
                  "--clear-groups --inh-caps=-all %s -c %s serve --port %d --first-port %d --last-port %d "
                  "--state none --log-level DEBUG")


def test_hidden_owners_are_accepted_and_kept_while_they_exist(tmp_path, sleeper, reap_pids, public_copy):
    """/proc mounted hidepid=2 and an unprivileged daemon: it cannot read root's processes, yet
    kill(pid, 0) says they exist (EPERM), so they are owners until they are gone."""
    if os.geteuid() != 0 or not all(os.path.exists(t) for t in ("/usr/bin/unshare", "/usr/bin/setpriv")):
        pytest.skip("needs root and util-linux's unshare and setpriv")
    python = "/usr/bin/python3"         # readable by an unprivileged user, unlike a root-only install
    copy = public_copy
    port, (first, last) = free_port(), free_range(3)
    program = shlex.quote(launcher(str(copy / "nodemngr.py"), FAST_REAP))
    cmd = HIDEPID_DAEMON % (python, program, port, first, last)
    log = open(str(tmp_path / "hidepid.log"), "wb")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
                            stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    reap_pids.append(proc.pid)
    rpc = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % port)

    def up():
        if proc.poll() is not None:
            pytest.skip("could not mount /proc hidepid=2 here: %s" % open(str(tmp_path / "hidepid.log")).read())
        try:
            return rpc.ping()
        except OSError:
            return False
    assert wait_until(up, timeout=10)
    assert rpc.newPort("root's", sleeper.pid) == first
    sleeper.kill()
    sleeper.wait()
    assert wait_until(lambda: rpc.listPorts() == [], timeout=5)
    rpc.terminate()
    proc.wait(10)
    log.close()


def call_on(conn, method, *params):
    """One XML-RPC call on an open RawConnection: the result, or the Fault."""
    conn.send(http_request(rpc_body(method, *params)))
    return conn.reply().result()


def test_out_of_descriptors_frees_nothing_and_loses_nothing(daemon_factory, sleeper):
    d = daemon_factory(size=3, settings=FAST_REAP,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
    rpc = d.rpc()
    ports = [rpc.newPort("held by sleep", sleeper.pid) for _ in range(3)]
    held = []
    try:
        for _ in range(45):
            held.append(RawConnection(d))
        # the newest are held (the oldest idle ones make room for them), never a call in progress
        newest = held[-5:]
        assert call_on(newest[0], "newPort", "more", sleeper.pid).faultCode == 2
        assert call_on(newest[1], "newPort", "more", 0).faultCode == 2
        # two owner checks pass while the connections are held, and take nothing from the owner
        changed = wait_until(lambda: len(call_on(newest[2], "listPorts")) != 3, timeout=2.5 * REAP_INTERVAL,
                             interval=0.2)
        assert not changed
        freed = call_on(newest[2], "delPort", ports[2])
        if freed == 0:
            assert call_on(newest[3], "newPort", "again", 0) == ports[2]
            last = (ports[2], 0)
        else:   # (a connection accepted with no descriptor to spare for its sock_diag lookup does not
            # learn its user: it gets no rights, fail closed; seen once in CI, under load)
            assert freed.faultCode == 4 and "registered by uid" in freed.faultString, freed
            last = (ports[2], sleeper.pid)
        listing = call_on(newest[4], "listPorts")
    finally:
        for s in held:
            s.close()
    assert [(e["port"], e["pid"]) for e in listing] == [(p, sleeper.pid) for p in ports[:2]] + [last]
    assert "has ended" not in d.read_log()


def test_the_owner_check_is_done_in_slices(reap_pids):
    first, last = free_range(60)
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(48)]
    reap_pids.extend(p.pid for p in procs)
    node = nodemngr.NodeMngr(first, last)
    for p in procs:
        node.newPort("owned", p.pid)
    procs[0].kill()
    procs[0].wait()
    slices = 0
    while True:
        slices += 1
        done, freed = node.reap_step(budget=0)
        if done:
            break
    assert slices >= 3, "a zero budget still looked at every owner in one slice"
    assert node.reaped == 1 and len(node.allocator) == 47
    for p in procs:
        p.kill()
        p.wait()
