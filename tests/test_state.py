"""The state file: one that is not a regular file, or not a state file of this schema, is refused or
moved aside, never written through (a link swapped in while it opens included); one daemon per
state file, a second waiting briefly for it to be released; a folder made read-only or a full
disk mid-run loses nothing acknowledged; the calls of a system.multicall, and those of one turn of
the daemon's loop, are saved in one transaction, all or none, and answered after it."""
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import time
import xmlrpc.client

import pytest

from support import (SHORT_LOCK_WAIT, RawConnection, clean_env, free_port, http_request, nodemngr_argv, popen_python,
                     registered, rpc_body, stop_pid, wait_until)

import nodemngr


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


def _special_paths(tmp_path):
    target = tmp_path / "real.sqlite3"
    target.write_bytes(b"")
    paths = {"folder": tmp_path / "dir", "FIFO": tmp_path / "fifo", "link": tmp_path / "link",
             "dangling link": tmp_path / "dangling", "socket": tmp_path / "sock"}
    paths["folder"].mkdir()
    os.mkfifo(str(paths["FIFO"]))
    os.symlink(str(target), str(paths["link"]))
    os.symlink(str(tmp_path / "nowhere"), str(paths["dangling link"]))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(paths["socket"]))
    unix.close()
    try:
        os.mknod(str(tmp_path / "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
        paths["device"] = tmp_path / "null"
    except PermissionError:
        pass    # not root: the other kinds still show the rule
    return paths


def test_a_state_path_that_is_not_a_regular_file_is_refused_and_left_alone(tmp_path):
    paths = _special_paths(tmp_path)
    before = {kind: os.lstat(str(path)) for kind, path in paths.items()}
    # one daemon per kind of path, all at once (each is a Python starting and exiting)
    procs = {kind: popen_python(nodemngr_argv("serve", "--port", free_port(), "--state", path), finalize=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
             for kind, path in paths.items()}
    try:
        for kind, proc in procs.items():
            _, stderr = proc.communicate(timeout=30)
            assert proc.returncode == 1, (kind, stderr)
            assert stderr.count("\n") == 1 and "not a regular file" in stderr and "Traceback" not in stderr, kind
    finally:
        for proc in procs.values():     # one that served instead of refusing
            if proc.poll() is None:
                stop_pid(proc.pid)
                proc.communicate()
    for kind, path in paths.items():
        after = os.lstat(str(path))
        assert (after.st_mode, after.st_ino, after.st_rdev) == (before[kind].st_mode, before[kind].st_ino,
                                                                before[kind].st_rdev), kind
    assert not [p for p in os.listdir(str(tmp_path)) if ".bad-" in p], "something was moved aside"
    assert os.path.getsize(str(tmp_path / "real.sqlite3")) == 0, "the link's target was written"


def test_a_state_file_swapped_for_a_link_while_opening_is_refused(tmp_path):
    path, victim = tmp_path / "state.sqlite3", tmp_path / "victim"
    victim.write_bytes(b"")
    check = nodemngr._create_regular_file

    def check_then_swap(p):     # what another user could do between the check and sqlite's open
        check(p)
        os.unlink(p)
        os.symlink(str(victim), p)
    nodemngr._create_regular_file = check_then_swap
    try:
        with pytest.raises(nodemngr.NodeMngrException) as info:
            nodemngr.StateStore(str(path))
    finally:
        nodemngr._create_regular_file = check
    assert "replaced" in str(info.value)
    assert victim.read_bytes() == b""


# --- one daemon per state file --------------------------------------------------------------------

def test_a_second_daemon_cannot_share_a_state_file(daemon, daemon_factory):
    other = daemon_factory(state=daemon.state, start=False, settings=SHORT_LOCK_WAIT)
    other.start(wait=False)
    assert other.proc.wait(15) == 1
    assert "in use by another process" in other.read_log()
    assert not [p for p in os.listdir(os.path.dirname(daemon.state)) if ".bad-" in p]


def test_a_daemon_waits_briefly_for_a_state_file_being_released(daemon_factory):
    d = daemon_factory()
    second = daemon_factory(start=False, first=d.first, last=d.last, state=d.state)
    second.start(wait=False)
    exited = wait_until(lambda: second.proc.poll() is not None, timeout=0.5)
    assert not exited, "the second daemon gave up at once on a state file held:\n" + second.read_log()
    d.terminate()
    second.wait_ready()
    assert second.proc.poll() is None


# --- a state folder that fails mid-run ------------------------------------------------------------

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


# --- a system.multicall is saved in one transaction ----------------------------------------------

def test_a_multicall_is_saved_whole_or_not_at_all(daemon_factory, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    d = daemon_factory(size=400, state=folder / "state.sqlite3")
    rpc = d.rpc()
    kept = [rpc.newPort("before %d" % i) for i in range(3)]
    # A disk nearly full: no file of the state may grow by more than 24 KiB from now on.
    limit = max(os.path.getsize(str(p)) for p in folder.iterdir()) + 24 * 1024
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    calls = [{"methodName": "newPort", "params": ["x" * 300]} for _ in range(100)]  # 30 KB of rows
    calls.append({"methodName": "delPort", "params": [kept[0]]})
    with pytest.raises(xmlrpc.client.Fault) as info:
        rpc.system.multicall(calls)
    assert info.value.faultCode == -32603
    assert "could not save the state" in info.value.faultString
    assert "none of the 101 changes of these calls was made" in info.value.faultString
    assert sorted(registered(d)) == kept, "not one call of the group took effect, the delPort neither"
    small = rpc.system.multicall([{"methodName": "newPort", "params": ["after %d" % i]} for i in range(5)])
    assert [r[0] for r in small] == [kept[-1] + 1 + i for i in range(5)], "the failed group's ports are free again"
    assert rpc.newPort("alone") == kept[-1] + 6
    d.kill()    # acknowledged only once saved: a kill -9 right after the reply loses nothing
    d.start()
    assert sorted(registered(d)) == kept + [kept[-1] + 1 + i for i in range(6)]


def _requests_in_one_turn(d, bodies):
    """Send each XML-RPC body on a connection of its own while the daemon is stopped (SIGSTOP), so
    that they are all there when it goes on: one turn of its loop.  Returns the replies."""
    conns = [RawConnection(d) for _ in bodies]
    try:
        for conn in conns:      # (each accepted, and watched by the loop, before the daemon stops)
            conn.send(http_request(rpc_body("ping")))
            assert conn.reply().result().startswith("NodeMngr at ")
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            for conn, body in zip(conns, bodies):
                conn.send(http_request(body))
            deadline = time.monotonic() + 5      # (until the kernel holds every request for it)
            while any(not _unread_by(d, conn) for conn in conns) and time.monotonic() < deadline:
                time.sleep(0.001)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        return [conn.reply() for conn in conns]
    finally:
        for conn in conns:
            conn.close()


def _unread_by(d, conn):
    """Whether the daemon's end of *conn* holds bytes it has not read (the request has arrived)."""
    local = conn.sock.getsockname()[1]
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == local and int(fields[1].split(":")[1], 16) == d.port:
                return int(fields[4].split(":")[1], 16) > 0
    return False


def test_the_calls_of_one_turn_are_saved_in_one_transaction_and_answered_after_it(daemon_factory, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    d = daemon_factory(size=40, state=folder / "state.sqlite3")
    rpc = d.rpc()
    kept = [rpc.newPort("before %d" % i) for i in range(3)]
    replies = _requests_in_one_turn(d, [rpc_body("newPort", "turn %d" % i) for i in range(8)])
    ports = sorted(reply.result() for reply in replies)
    assert ports == list(range(kept[-1] + 1, kept[-1] + 9)), "eight calls of one turn, each its port"
    d.kill()    # answered only once saved: a kill -9 right after the replies loses nothing
    d.start()
    assert sorted(registered(d)) == kept + ports
    # A disk nearly full: each call of the turn alone would still fit, the eight together do not.
    limit = max(os.path.getsize(str(p)) for p in folder.iterdir()) + 16 * 1024
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    replies = _requests_in_one_turn(d, [rpc_body("newPort", "x" * 3000) for _ in range(8)] + [rpc_body("ping")])
    faults, ping = [reply.result() for reply in replies[:8]], replies[8].result()
    assert all(isinstance(f, xmlrpc.client.Fault) and f.faultCode == -32603 for f in faults), faults
    assert all("none of the 8 changes of these calls was made" in f.faultString for f in faults), faults[0]
    assert (ping.startswith("NodeMngr at ") if isinstance(ping, str) else ping.faultString == faults[0].faultString), \
        "a call made in the group fails with it"
    assert sorted(registered(d)) == kept + ports, "not one call of the turn took effect"
    assert rpc.newPort("small") == ports[-1] + 1, "the failed turn's ports are free again"
