"""Owners and crashes: a dead process never keeps a port, and nothing acknowledged is ever lost."""
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import textwrap
import time
import xmlrpc.client

import pytest

from support import (FAST_REAP, ROOT, SHORT_LOCK_WAIT, RawConnection, http_request, popen_python, rpc_body,
                     wait_until)

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


def registered(daemon):
    return {e["port"]: e for e in daemon.rpc().listPorts()}


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


def test_garbage_state_file_is_moved_aside(daemon_factory, tmp_path):
    state = tmp_path / "garbage.sqlite3"
    state.write_bytes(b"this is not a database\n" * 100)
    d = daemon_factory(state=state)
    log = d.read_log()
    asides = [p for p in os.listdir(str(tmp_path)) if p.startswith("garbage.sqlite3.bad-")]
    assert len(asides) == 1
    assert (tmp_path / asides[0]).read_bytes() == b"this is not a database\n" * 100
    assert "WARNING" in log and str(state) in log and str(tmp_path / asides[0]) in log
    assert d.rpc().newPort("fresh start") == d.first


def test_truncated_state_file_is_moved_aside(daemon_factory, tmp_path):
    state = tmp_path / "trunc.sqlite3"
    d = daemon_factory(state=state, size=400)
    for batch in range(3):      # a request body stays under 64 KiB
        multi = xmlrpc.client.MultiCall(d.rpc())
        for i in range(100):
            multi.newPort("padding %d %s" % (i, "x" * 200))
        multi()
    assert d.terminate() == 0
    size = state.stat().st_size
    with open(str(state), "r+b") as f:
        f.truncate(size // 2)
    d.start()
    asides = [p for p in os.listdir(str(tmp_path)) if p.startswith("trunc.sqlite3.bad-")]
    assert len(asides) == 1 and str(tmp_path / asides[0]) in d.read_log()
    assert registered(d) == {}


def test_a_state_file_of_another_schema_is_moved_aside(daemon_factory, tmp_path):
    import sqlite3
    state = tmp_path / "other.sqlite3"
    db = sqlite3.connect(str(state))
    db.execute("CREATE TABLE accounts(id INTEGER, owner TEXT)")
    db.execute("INSERT INTO accounts VALUES (1, 'somebody else')")
    db.commit()
    db.close()
    d = daemon_factory(state=state)
    assert any(p.startswith("other.sqlite3.bad-") for p in os.listdir(str(tmp_path)))
    assert d.rpc().ping()


def test_a_second_daemon_cannot_share_a_state_file(daemon, daemon_factory):
    other = daemon_factory(state=daemon.state, start=False, settings=SHORT_LOCK_WAIT)
    other.start(wait=False)
    assert other.proc.wait(15) == 1
    assert "in use by another process" in other.read_log()
    assert not [p for p in os.listdir(os.path.dirname(daemon.state)) if ".bad-" in p]


def chattr(flag, *paths):
    return subprocess.run(["chattr", flag] + [str(p) for p in paths], capture_output=True, text=True)


def test_state_folder_made_read_only_mid_run(daemon_factory, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    d = daemon_factory(state=folder / "state.sqlite3")
    rpc = d.rpc()
    kept = [rpc.newPort("before") for _ in range(3)]
    files = [folder] + sorted(folder.iterdir())
    if shutil.which("chattr") is None or chattr("+i", *files).returncode != 0:
        pytest.skip("the immutable attribute is not available here (needs root and ext4/xfs/btrfs)")
    try:
        for call, args in ((rpc.newPort, ("during",)), (rpc.delPort, (kept[0],))):
            with pytest.raises(xmlrpc.client.Fault) as info:
                call(*args)
            assert info.value.faultCode == -32603
            assert "could not save the state to %s" % (folder / "state.sqlite3") in info.value.faultString
            assert "Operation not permitted" in info.value.faultString
        assert rpc.ping() and sorted(registered(d)) == kept, "the daemon serves on, unchanged"
    finally:
        chattr("-i", *files)
    assert rpc.newPort("after") == kept[-1] + 1
    assert d.terminate() == 0
    d.start()
    assert sorted(registered(d)) == kept + [kept[-1] + 1], "nothing half-written"


def test_full_disk_mid_run(daemon_factory, tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        d = daemon_factory(state=folder / "state.sqlite3", size=2000)
        rpc = d.rpc()
        kept = [rpc.newPort("before") for _ in range(3)]
        filler = folder / "filler"
        fd = os.open(str(filler), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:     # the disk is full now
            pass
        finally:
            os.close(fd)
        faults = []
        for i in range(200):    # the WAL has some slack; fill it
            try:
                kept.append(rpc.newPort("x" * 3000))
            except xmlrpc.client.Fault as fault:
                faults.append(fault)
                break
        assert faults and faults[0].faultCode == -32603 and "full" in faults[0].faultString
        assert rpc.ping() and sorted(registered(d)) == kept
        filler.unlink()
        kept.append(rpc.newPort("room again"))
        assert d.terminate() == 0
        d.start()
        assert sorted(registered(d)) == sorted(kept)
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_sigterm_answers_every_call_in_flight(daemon):
    # ten idle keep-alive connections that served a call already, ten brand new ones
    conns = [RawConnection(daemon, timeout=20) for _ in range(20)]
    for c in conns[:10]:
        c.send(http_request(rpc_body("newPort", "warm-up")))
        assert c.reply().status == 200
    for i, c in enumerate(conns):
        c.send(http_request(rpc_body("newPort", "in flight %d" % i)))
    daemon.proc.send_signal(signal.SIGTERM)
    replies = [c.reply() for c in conns]
    for c in conns:
        c.close()
    ports = [reply.result() for reply in replies]
    assert all(isinstance(port, int) for port in ports), replies
    assert daemon.proc.wait(15) == 0
    daemon.start()
    held = registered(daemon)
    assert set(ports) <= set(held) and len(held) == 30
