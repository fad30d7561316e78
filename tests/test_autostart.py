"""Auto-start: a client (the Python proxy, in this process or another) that finds no daemon starts
one.  That daemon is detached and keeps none of its caller's files, locks, working folder or signal
mask; its state folder is made when missing, and what keeps it from starting is one sentence; a
client that meets a daemon on its way out is served by the next one, one started again if the
first cannot; clients take turns to start one, and none waits beyond its timeout for another's turn.

Real daemons in real processes, real sockets; every daemon a test causes is stopped by its pid.
"""
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import xmlrpc.client

import pytest

from support import (ROOT, RawConnection, assert_one_sentence, clean_env, daemon_settings, free_port, free_range,
                     http_request, pid_alive, popen_python, run_python, stop_pid, wait_until)

import nodemngr
import nodemngr_proxy
from nodemngr import NodeMngrException


def daemon_pid_at(port):
    """The pid of the node manager answering at 127.0.0.1:port, or None."""
    try:
        proxy = nodemngr.server_proxy("127.0.0.1", port, timeout=2.0)
        return proxy.status()["pid"]
    except (OSError, xmlrpc.client.Error, ValueError, KeyError):
        return None


@pytest.fixture
def stop_at_ports():
    """A list of ports: at teardown, the daemon serving each (if any) is stopped by its pid."""
    ports = []
    yield ports
    for port in ports:
        pid = daemon_pid_at(port)
        if pid:
            stop_pid(pid)


# ---------------------------------------------------------------------------------------------
# Detached: the auto-started daemon inherits nothing but 0, 1, 2 and runs in "/"
# ---------------------------------------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, %(root)r)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])   # the daemon must not keep this mask
    from nodemngr_proxy import NodeMngrProxy
    status = NodeMngrProxy().status()
    out = json.dumps({"pid": status["pid"], "state": status["state"]})
    with open(os.environ["CLIENT_OUT"], "w") as f:
        f.write(out)
""")


def fd_targets(pid):
    """{fd number: what it points at} for process *pid*."""
    found = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            found[int(fd)] = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def detached(tmp_path_factory):
    """A client run like ``(flock 9; python3 client.py) 9>job.lock`` with a pipe's write end too,
    from a working folder, with a relative NODEMNGR_STATE; it auto-starts a daemon and exits."""
    work = tmp_path_factory.mktemp("detached")
    (work / "state").mkdir()
    port = free_port()
    first, last = free_range(10)
    lock_path = str(work / "job.lock")
    lock_fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    read_end, write_end = os.pipe()
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=os.path.join("state", "here.sqlite3"), NODEMNGR_AUTOSTART=1,
                    CLIENT_OUT=work / "out.json")
    daemon_pid = None
    try:
        proc = subprocess.run([sys.executable, "-c", CLIENT % {"root": ROOT}], env=env, cwd=str(work),
                              pass_fds=(lock_fd, write_end), capture_output=True, text=True, timeout=30)
        os.close(write_end)     # ours; the client's copy went with it; the daemon must hold none
        os.close(lock_fd)       # the same: only a copy inherited by the daemon could keep the lock
        daemon_pid = daemon_pid_at(port)
        assert proc.returncode == 0, proc.stderr
        out = json.loads((work / "out.json").read_text())
        assert out["pid"] == daemon_pid
        yield dict(out, port=port, work=work, lock=lock_path, read_end=read_end,
                   pipe_inode=os.fstat(read_end).st_ino)
    finally:
        if daemon_pid:
            stop_pid(daemon_pid)
        os.close(read_end)


def test_lock_held_by_client_is_free_once_it_exits(detached):
    assert pid_alive(detached["pid"]), "the auto-started daemon outlives its client"
    fd = os.open(detached["lock"], os.O_WRONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # BlockingIOError if the daemon kept it
    finally:
        os.close(fd)


def test_pipe_given_to_client_reaches_eof_once_it_exits(detached):
    assert pid_alive(detached["pid"])
    ready, _, _ = select.select([detached["read_end"]], [], [], 5.0)
    assert ready, "the pipe's write end is still open somewhere (the daemon?)"
    assert os.read(detached["read_end"], 1) == b""


def test_daemon_holds_only_its_own_files_and_runs_in_root(detached):
    pid = detached["pid"]
    targets = fd_targets(pid)
    log = str(detached["work"] / "state" / ("%d.log" % detached["port"]))
    assert targets[0] == os.devnull
    assert targets[1] == targets[2] == log
    assert detached["lock"] not in targets.values(), targets
    assert "pipe:[%d]" % detached["pipe_inode"] not in targets.values(), targets
    assert os.readlink("/proc/%d/cwd" % pid) == "/"
    with open("/proc/%d/status" % pid) as f:
        blocked = [line.split()[1] for line in f if line.startswith("SigBlk:")]
    assert int(blocked[0], 16) == 0, "the daemon must start with no signal blocked"


def test_relative_state_path_reaches_daemon_absolute(detached):
    state = str(detached["work"] / "state" / "here.sqlite3")
    assert detached["state"] == state
    assert os.path.isfile(state)


def test_daemon_gets_its_log_when_client_has_stdio_closed(tmp_path, stop_at_ports):
    """With 0, 1 and 2 closed, the log and /dev/null would be opened as 0 and 1: the dup2 onto
    0, 1, 2 must not overwrite them before copying."""
    port = free_port()
    first, last = free_range(10)
    stop_at_ports.append(port)
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=tmp_path / "state.sqlite3", CLIENT_OUT=tmp_path / "out.json")
    script = CLIENT % {"root": ROOT}
    proc = subprocess.run(["/bin/sh", "-c", 'exec "$0" -c "$1" <&- >&- 2>&-', sys.executable, script],
                          env=env, cwd=str(tmp_path), timeout=30)
    assert proc.returncode == 0
    pid = json.loads((tmp_path / "out.json").read_text())["pid"]
    targets = fd_targets(pid)
    log = str(tmp_path / ("%d.log" % port))
    assert (targets[0], targets[1], targets[2]) == (os.devnull, log, log)


# ---------------------------------------------------------------------------------------------
# A client that meets a daemon on its way out, or one that cannot start, is served by the next one
# ---------------------------------------------------------------------------------------------

NEWPORT_CLIENT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, %(root)r)
    from nodemngr_proxy import NodeMngrProxy
    began = time.monotonic()
    nm = NodeMngrProxy()
    port = nm.newPort("after restart", 0)
    took = time.monotonic() - began
    print(json.dumps({"port": port, "took": took, "pid": nm.status()["pid"],
                      "ports": {str(e["port"]): e["info"] for e in nm.listPorts()}}))
""")


def test_client_meeting_a_stopping_daemon_is_served_by_the_next(daemon_factory, stop_at_ports):
    # (the old daemon holds its state file for stop_grace, 1 s by default, while the stalled request
    # may still complete; the next one waits for it: 0.3 s here, the same path)
    old = daemon_factory(size=10, settings=daemon_settings(stop_grace=0.3))
    kept = old.rpc().newPort("kept", 0)
    stop_at_ports.append(old.port)      # the daemon the client starts, should the test fail midway
    stalled = RawConnection(old)
    try:        # a client stalled mid-request: the old daemon must not wait for it to let go
        stalled.send(http_request(b"<?xml version='1.0'?><methodCall>", length=200))
        env = clean_env(NODEMNGR_PORT=old.port, NODEMNGR_FIRST_PORT=old.first, NODEMNGR_LAST_PORT=old.last,
                        NODEMNGR_STATE=old.state, NODEMNGR_AUTOSTART=1)
        assert old.rpc().terminate() is True
        began = time.monotonic()
        proc = run_python(["-c", NEWPORT_CLIENT % {"root": ROOT}], env=env, capture_output=True, text=True,
                          timeout=60)
        elapsed = time.monotonic() - began
    finally:
        stalled.close()
    assert proc.returncode == 0, "%s\n--- old daemon's log:\n%s" % (proc.stderr, old.read_log())
    out = json.loads(proc.stdout)
    assert out["pid"] != old.proc.pid
    assert elapsed < 6, "served only after %.1f s" % elapsed
    assert out["ports"].get(str(kept)) == "kept", "the new daemon must hold what the old one had"
    assert out["port"] != kept
    assert old.proc.wait(10) == 0


class ResetServer:
    """Accepts connections at a port and resets each one mid-call; closes its listening socket
    before resetting the *count*-th, as a daemon on its way out would."""

    def __init__(self, count=2):
        self.port = free_port()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(8)
        self.count, self.served = count, 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.served < self.count:
            conn, _ = self.listener.accept()
            self.served += 1
            if self.served == self.count:
                self.listener.close()
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()        # linger 0: RST

    def stop(self):
        self.listener.close()
        self.thread.join(5)


def test_call_reset_mid_way_retries_through_autostart(tmp_path, env, stop_at_ports):
    server = ResetServer()
    stop_at_ports.append(server.port)
    first, last = free_range(10)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    try:
        with nodemngr_proxy.NodeMngrProxy(port=server.port, autostart=True) as nm:
            assert nm.ping().startswith("NodeMngr at ")
            assert nm.status()["firstPort"] == first
    finally:
        server.stop()
    assert server.served == 2


def test_a_client_stuck_holding_its_spawn_turn_delays_the_others_but_does_not_fail_them(tmp_path, env, stop_at_ports):
    """Clients finding no daemon take turns at an flock beside the state file, so that one Python
    starts, not one per client; one stopped (SIGSTOP) while it held its turn holds the lock as
    long as it likes: the others wait half their time for it, then start a daemon anyway."""
    port = free_port()
    stop_at_ports.append(port)
    first, last = free_range(10)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    stuck = _hold_turn(str(tmp_path / ("%d.spawn.lock" % port)))
    try:
        began = time.monotonic()
        nodemngr_proxy.start_daemon(port=port, timeout=4.0)
        waited = time.monotonic() - began
    finally:
        stuck.stdin.close()
        stuck.wait(10)
    assert waited >= 2.0, "it did not wait its turn (half of its 4 s) before going ahead: %.2f s" % waited
    assert daemon_pid_at(port)
    assert (tmp_path / ("%d.log" % port)).read_text().count("serving on") == 1


def test_spawns_again_when_the_daemon_it_started_has_exited(tmp_path, env, stop_at_ports):
    """The first daemon spawned cannot start (here: the port is bound, not listening, by another
    socket until that daemon has given up; in life: a state file not yet released) and exits at
    once: start_daemon spawns again rather than waiting out its 10 s for a daemon that is gone."""
    port = free_port()
    stop_at_ports.append(port)
    log = tmp_path / ("%d.log" % port)
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))    # connect is refused; a daemon's bind fails
    first, last = free_range(10)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))

    def release_once_refused():     # the daemon's one-line error is in its log: it has exited
        wait_until(lambda: log.exists() and "nodemngr:" in log.read_text(), 5)
        holder.close()
    releaser = threading.Thread(target=release_once_refused)
    releaser.start()
    began = time.monotonic()
    try:
        nodemngr_proxy.start_daemon(port=port)
    finally:
        releaser.join()
        holder.close()
    elapsed = time.monotonic() - began
    assert daemon_pid_at(port)
    assert "nodemngr:" in log.read_text(), "the first daemon must have exited"
    assert elapsed < 3, "served only after %.1f s" % elapsed


# ---------------------------------------------------------------------------------------------
# What the started daemon is given: state and log folders (made when missing, one sentence when
# they cannot be) and the token file
# ---------------------------------------------------------------------------------------------


def test_state_in_a_missing_folder_is_created_by_autostart(tmp_path, env, stop_at_ports):
    """As `nodemngr serve --state` does, auto-start creates the state file's folder (0700)."""
    port = free_port()
    first, last = free_range(10)
    stop_at_ports.append(port)
    folder = tmp_path / "not" / "yet"
    env.setenv("NODEMNGR_STATE", str(folder / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    with nodemngr_proxy.NodeMngrProxy(port=port) as nm:
        assert nm.status()["state"] == str(folder / "state.sqlite3")
    assert os.stat(str(folder)).st_mode & 0o777 == 0o700
    assert (folder / ("%d.log" % port)).is_file()


def test_state_folder_that_cannot_be_made_gives_one_sentence(tmp_path, env, stop_at_ports):
    port = free_port()
    stop_at_ports.append(port)
    (tmp_path / "plain").write_text("a file, not a folder")
    folder = tmp_path / "plain" / "sub"
    env.setenv("NODEMNGR_STATE", str(folder / "state.sqlite3"))
    with pytest.raises(NodeMngrException) as caught:
        nodemngr_proxy.NodeMngrProxy(port=port).ping()
    assert_one_sentence(caught.value)
    assert str(folder) in str(caught.value)
    assert daemon_pid_at(port) is None


def test_log_file_in_a_missing_folder_gives_one_sentence(tmp_path, env, stop_at_ports):
    port = free_port()
    stop_at_ports.append(port)
    log = tmp_path / "missing" / "x.log"
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_LOG_FILE", str(log))
    with pytest.raises(NodeMngrException) as caught:
        nodemngr_proxy.NodeMngrProxy(port=port).ping()
    assert_one_sentence(caught.value)
    assert str(log) in str(caught.value)
    assert daemon_pid_at(port) is None


def test_proxy_passes_its_token_file_to_the_daemon_it_starts(tmp_path, reap_pids):
    token = tmp_path / "token"
    token.write_text("t0ken")
    token.chmod(0o600)
    port = free_port()
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_STATE=tmp_path / "s.sqlite3")
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, %r)
        from nodemngr_proxy import NodeMngrProxy
        nm = NodeMngrProxy(token_file=%r)
        print(nm.status()["pid"])
    """ % (ROOT, str(token)))
    r = run_python(["-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    reap_pids.append(int(r.stdout))
    with pytest.raises(xmlrpc.client.ProtocolError) as info:
        xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % port).ping()
    assert info.value.errcode == 401, "the daemon it started must want the token"


# ---------------------------------------------------------------------------------------------
# The spawn turn: no client waits beyond its timeout for another's turn
# ---------------------------------------------------------------------------------------------

HOLD_TURN = ("import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
             "fcntl.flock(fd, fcntl.LOCK_EX)\n"
             "print('held', flush=True)\n"
             "sys.stdin.read()\n")


def _hold_turn(path):
    """A process holding an flock on *path* (a client stuck in its turn), until its stdin closes."""
    proc = popen_python(["-c", HOLD_TURN, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_threads_waiting_for_a_stuck_turn_still_give_up_within_their_timeout(tmp_path, env):
    # start_daemon(timeout=T) computes its deadline before the in-process lock, but the wait for
    # the spawn turn is "now + T/2" from whenever the in-process lock came: a thread queued
    # behind another gets T/2 more for each thread before it (seen: 4.0, 6.0, 8.1 s for T = 4;
    # here T = 1: 1.0, 1.5, 2.0 s before the fix).
    timeout = 1.0
    port = free_port()
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", "61100")     # a daemon that cannot start: first > last
    env.setenv("NODEMNGR_LAST_PORT", "61000")
    holder = _hold_turn(str(tmp_path / ("%d.spawn.lock" % port)))
    took = []
    try:
        began = time.monotonic()

        def client():
            try:
                nodemngr_proxy.start_daemon(port=port, timeout=timeout)
            except NodeMngrException:
                pass
            took.append(time.monotonic() - began)
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert max(took) < timeout + 0.5, "start_daemon(timeout=%g) took %s s" % (timeout, ["%.1f" % t for t in sorted(took)])


FORKS_WHILE_ITS_TURN = textwrap.dedent("""
    import os, sys, threading, time
    sys.path.insert(0, %(root)r)
    import nodemngr, nodemngr_proxy
    inside, forked = threading.Event(), threading.Event()
    spawn = nodemngr._spawn_until_answered
    def unlucky(*args):             # (only makes the timing certain: another thread forks now)
        inside.set()
        forked.wait()
        return spawn(*args)
    nodemngr._spawn_until_answered = unlucky
    t = threading.Thread(target=nodemngr_proxy.start_daemon, kwargs={"port": %(port)d})
    t.start()
    inside.wait()
    import warnings; warnings.simplefilter("ignore")
    pid = os.fork()                 # a worker (multiprocessing's fork) that never heard of nodemngr
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):        # (not the test's pipe: only what it inherited of the client)
            os.dup2(null, fd)
        time.sleep(30)
        os._exit(0)
    forked.set()
    t.join()
    print(pid, flush=True)
""")


def test_a_child_forked_while_a_client_held_its_turn_does_not_keep_the_turn(tmp_path, env, stop_at_ports):
    # The turn is an flock, which belongs to the open file: a child forked (by another thread of
    # the client) while it is held keeps it held for as long as that child lives, though it never
    # spawns anything; every later auto-start on the port then waits half its timeout (5.4 s).
    port = free_port()
    stop_at_ports.append(port)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    first, last = free_range(10)
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    out = subprocess.run([sys.executable, "-c", FORKS_WHILE_ITS_TURN % {"root": ROOT, "port": port}],
                         stdout=subprocess.PIPE, text=True, timeout=30, check=True).stdout
    worker = int(out.split()[0])
    try:
        stop_pid(daemon_pid_at(port))       # the daemon goes away (a reboot of it, a stop)
        began = time.monotonic()
        nodemngr_proxy.start_daemon(port=port)
        took = time.monotonic() - began
    finally:
        os.kill(worker, signal.SIGKILL)     # (not our child: init reaps it)
    assert took < 2.0, "the next auto-start waited %.1f s for a turn nobody was taking" % took


LEASED = textwrap.dedent("""
    import fcntl, os, signal, sys, time
    signal.signal(signal.SIGIO, signal.SIG_IGN)     # told to let go: does not
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o666)
    fcntl.fcntl(fd, getattr(fcntl, "F_SETLEASE", 1024), fcntl.F_RDLCK)
    print("leased", flush=True)
    time.sleep(120)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="file leases are Linux's")
@pytest.mark.parametrize("leased", ["spawn.lock", "log"])
def test_a_lease_on_the_lock_file_does_not_hold_the_client_beyond_its_timeout(tmp_path, env, stop_at_ports, leased):
    # Whoever may create PORT.spawn.lock (another user, when NODEMNGR_STATE is in a shared folder
    # and fs.protected_regular is 0, or a shared group folder) can take a read lease on it: the
    # client's open(O_RDWR) -- no O_NONBLOCK -- then blocks for /proc/sys/fs/lease-break-time
    # (45 s by default), then fails with "did not answer within 10 s" 45 s later.  Here the lease
    # holder is the same user (that needs no second account); the kernel's rule is the same.
    # The same goes for PORT.log, which the client opens for the daemon: that one it needs, so a
    # lease on it is an error at once, in one sentence.
    port = free_port()
    stop_at_ports.append(port)
    first, last = free_range(10)
    state = tmp_path / "state.sqlite3"
    environ = clean_env(NODEMNGR_STATE=state, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last)
    leaser = subprocess.Popen([sys.executable, "-c", LEASED, str(tmp_path / ("%d.%s" % (port, leased)))],
                              stdout=subprocess.PIPE, text=True)
    client = None
    try:
        assert leaser.stdout.readline().strip() == "leased"
        program = ("import sys; sys.path.insert(0, %r); import nodemngr_proxy; "
                   "nodemngr_proxy.start_daemon(port=%d, timeout=4.0)" % (ROOT, port))
        client = subprocess.Popen([sys.executable, "-c", program], env=environ, stderr=subprocess.PIPE, text=True)
        try:
            status = client.wait(8.0)
        except subprocess.TimeoutExpired:
            status = None
        assert status is not None, "start_daemon(timeout=4) still in open() after 8 s"
        error = client.stderr.read().strip().splitlines()
        if leased == "log":
            assert status == 1 and "cannot open the node manager's log file" in error[-1], error
        else:
            assert status == 0, error
    finally:
        for proc in (client, leaser):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_nodemngr_run_starts_a_daemon_when_none_answers(tmp_path, stop_at_ports):
    port = free_port()
    first, last = free_range(5)
    stop_at_ports.append(port)
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=tmp_path / "state.sqlite3")
    run = [os.path.join(ROOT, "nodemngr.py"), "run", "--", sys.executable, "-c", "import os; print(os.environ['PORT'])"]
    out = run_python(run, env=dict(env, NODEMNGR_AUTOSTART="0"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "auto-start is off" in out.stderr, out.stderr
    out = run_python(run, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert first <= int(out.stdout) <= last
    assert daemon_pid_at(port), "a daemon was started, and serves on"


# ---------------------------------------------------------------------------------------------
# Cold start: the daemon imports its file (bytecode cache), and says when it is ready
# ---------------------------------------------------------------------------------------------

COLD_CLIENT = textwrap.dedent("""
    import sys
    sys.dont_write_bytecode = True          # (only the daemon may write the file's bytecode)
    sys.path.insert(0, sys.argv[1])
    before = set(sys.modules)
    import nodemngr
    print(sorted(set(sys.modules) - before))
    print(nodemngr.NodeMngrProxy().status()["pid"])
""")
SERVER_ONLY = {"asyncio", "concurrent.futures", "json", "hmac", "inspect", "argparse", "subprocess", "tempfile"}


def test_the_daemon_started_imports_its_file_so_that_its_bytecode_cache_serves(tmp_path, stop_at_ports):
    app = tmp_path / "app"
    app.mkdir()
    (app / "nodemngr.py").write_bytes(open(os.path.join(ROOT, "nodemngr.py"), "rb").read())
    port = free_port()
    first, last = free_range(5)
    stop_at_ports.append(port)
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=tmp_path / "state.sqlite3", NOTIFY_SOCKET="@the-callers-own-service-manager")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, "-c", COLD_CLIENT, str(app)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    imported, pid = out.stdout.splitlines()
    assert not set(eval(imported)) & SERVER_ONLY, "a client imports only what a client needs: " + imported
    argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
    assert argv[1] == b"-c" and argv[3] == str(app / "nodemngr.py").encode() and argv[4] == b"serve", argv
    cached = os.listdir(str(app / "__pycache__"))
    assert [name for name in cached if name.startswith("nodemngr.")], "the daemon imported its file: %s" % cached
    environ = dict(line.split(b"=", 1) for line in open("/proc/%s/environ" % pid, "rb").read().split(b"\0") if line)
    assert b"NOTIFY_SOCKET" not in environ, "never the caller's own service manager"
    assert environ[b"NODEMNGR_SPAWNER_SOCKET"].startswith(b"@nodemngr-spawn-"), "where it says it is ready"


def test_a_spawner_wakes_when_its_user_says_ready_and_not_for_another_user(nobody):
    with nodemngr._ReadySignal() as ready:
        assert ready.address.startswith("@nodemngr-spawn-%d-" % os.getpid())
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = "\0" + ready.address[1:]
        try:
            nobody.run("import socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', %r)"
                       % address).check_returncode()
            started = time.monotonic()
            ready.wait(1.0)
            assert time.monotonic() - started >= 0.9, "another user's datagram woke the spawner"
            sender.sendto(b"READY=1", address)
            started = time.monotonic()
            ready.wait(30.0)
            assert time.monotonic() - started < 10, "READY=1 from this user did not wake the spawner"
        finally:
            sender.close()


# ---------------------------------------------------------------------------------------------
# What an adversarial run of the cold start found (each failed before its fix)
# ---------------------------------------------------------------------------------------------

# Another user's program: it watches /proc/net/unix (world-readable) for the abstract address of
# the spawner whose name begins with argv[1] (this test process's), binds it as soon as the spawner lets it go, and then never reads.
SQUATTER = r"""
import socket, sys, time
print("watching", flush=True)
deadline, seen = time.time() + 20, set()
while time.time() < deadline:
    with open("/proc/net/unix") as f:
        seen.update(line.split()[-1] for line in f if sys.argv[1] in line)
    for name in seen:       # (once the spawner lets it go, it is no longer listed)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind("\0" + name[1:])
        except OSError:
            s.close()
            continue
        print(name, flush=True)
        time.sleep(60)      # holds it, reads nothing
        sys.exit(0)
    time.sleep(0.0005)
"""


def _daemon_pid(port):
    try:
        return nodemngr.server_proxy("127.0.0.1", port, timeout=2.0).status()["pid"]
    except Exception:
        return None


def test_another_user_cannot_stall_an_auto_started_daemon_through_its_notify_socket(tmp_path, env, nobody):
    """Promise: one caller (let alone another user) never stalls the others; a spawned daemon
    stops notifying once its spawner is gone.  Broken: the spawner's abstract address
    @nodemngr-spawn-PID-RANDOM is listed in /proc/net/unix for every user; once the spawner closes
    it, another user binds the same name before the daemon's next notify, so the daemon never
    sees ECONNREFUSED and keeps sending STATUS= lines there on a *blocking* socket.  The squatter
    reads nothing: after net.unix.max_dgram_qlen (10) datagrams, sendto blocks the daemon's
    loop for good.  The squatter drives the STATUS changes itself (newPort over TCP, any user may),
    one per tick (0.25 s): about 3 s later every client times out."""
    from support import free_port, free_range, stop_pid
    import nodemngr_proxy
    port = free_port()
    first, last = free_range(40)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    squatter = nobody.popen(SQUATTER, "@nodemngr-spawn-%d-" % os.getpid(), stdout=subprocess.PIPE)
    pid = None
    try:
        assert squatter.stdout.readline().strip() == "watching"
        with nodemngr_proxy.NodeMngrProxy(port=port, autostart=True) as nm:
            assert nm.ping().startswith("NodeMngr at ")
            pid = nm.status()["pid"]
        grabbed = squatter.stdout.readline().strip()
        assert grabbed.startswith("@nodemngr-spawn-%d-" % os.getpid()), grabbed
        environ = open("/proc/%d/environ" % pid, "rb").read()
        assert b"NODEMNGR_SPAWNER_SOCKET=" + grabbed.encode() in environ and b"NOTIFY_SOCKET=" not in environ
        # what anyone may do over TCP: change the registered count once a tick
        rpc = nodemngr.server_proxy("127.0.0.1", port, timeout=1.0)
        answered, started = 0, time.monotonic()
        try:
            for i in range(6):
                rpc.newPort("tick %d" % i)
                answered += 1
                time.sleep(nodemngr.NodeMngrServer.tick + 0.05)
            rpc.ping()
            answered += 1
        except (socket.timeout, OSError) as exc:
            stalled = exc
        else:
            stalled = None
        wchan = open("/proc/%d/wchan" % pid).read()
        assert stalled is None, ("the daemon stopped answering after %d calls (%.1f s): %r; its loop waits in %s "
                                 "(sendto to %s, bound by uid %d)" % (answered, time.monotonic() - started,
                                                                       stalled, wchan, grabbed, nobody.uid))
    finally:
        squatter.kill()
        squatter.wait(10)
        if pid is None:
            pid = _daemon_pid(port)
        if pid:
            stop_pid(pid)


def test_a_child_forked_during_a_cold_start_does_not_stall_the_daemon(tmp_path, env):
    """Promise: a slow or idle process never stalls the daemon; the spawned daemon stops
    notifying once its spawner has its answer.  Broken without any attacker: while one thread
    auto-starts the daemon, another thread of the same program forks a long-lived worker (a
    process pool, say); the child inherits the spawner's _ReadySignal socket (SOCK_CLOEXEC only
    acts at exec), so the abstract name stays bound after the spawner closes its copy.  The
    daemon's STATUS= datagrams queue up unread there, and the 11th blocks its loop in sendto
    (unix_wait_for_peer) until the child exits.  Measured: stalled after 11 newPorts (~3.5 s)."""
    from support import free_port, free_range, stop_pid
    import threading
    port = free_port()
    first, last = free_range(40)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    children = []

    def fork_a_worker():    # as soon as the spawner listens
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open("/proc/net/unix") as f:
                if any("@nodemngr-spawn-%d-" % os.getpid() in line for line in f):
                    break
            time.sleep(0.0005)
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    forker = threading.Thread(target=fork_a_worker)
    forker.start()
    pid = None
    try:
        nm = nodemngr.NodeMngrProxy(port=port, autostart=True)
        assert nm.ping().startswith("NodeMngr at ")
        pid = nm.status()["pid"]
        nm.close()
        forker.join(10)
        assert children, "no worker was forked during the spawn"
        rpc = nodemngr.server_proxy("127.0.0.1", port, timeout=1.0)
        answered = 0
        try:
            for i in range(6):
                rpc.newPort("tick %d" % i)
                answered += 1
                time.sleep(nodemngr.NodeMngrServer.tick + 0.05)
            stalled = None
        except (socket.timeout, OSError) as exc:
            stalled = exc
        wchan = open("/proc/%d/wchan" % pid).read()
        assert stalled is None, "the daemon stopped answering after %d calls: %r; its loop waits in %s" % (
            answered, stalled, wchan)
    finally:
        forker.join(10)
        for child in children:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        if pid is None:
            pid = _daemon_pid(port)
        if pid:
            stop_pid(pid)


# Another user's program: it floods the abstract address of the spawner named by argv[1], from the moment it is listed in
# /proc/net/unix, with datagrams (blocking sendto: the queue stays full).
FLOODER = r"""
import socket, sys, time
deadline, seen = time.time() + 15, None
print("watching", flush=True)
while time.time() < deadline and seen is None:
    with open("/proc/net/unix") as f:
        for line in f:
            if sys.argv[1] in line:
                seen = line.split()[-1]
    time.sleep(0.0002)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
while time.time() < deadline:
    try:
        s.sendto(b"READY=1", "\0" + seen[1:])
    except OSError:
        break
"""


def _cold_start(port):
    """Start a daemon for *port* through a proxy's first call: (seconds it took, the daemon's pid)."""
    started = time.monotonic()
    nm = nodemngr.NodeMngrProxy(port=port, autostart=True)
    try:
        assert nm.ping().startswith("NodeMngr at ")
        return time.monotonic() - started, nm.status()["pid"]
    finally:
        nm.close()


def test_another_users_datagrams_do_not_slow_a_cold_start(tmp_path, env, nobody):
    """Promise (_ReadySignal): another user's datagrams cannot make a spawner spin or wait; a cold
    start takes a fraction of a second.  Broken: the spawner only discards other users' datagrams
    while it is in wait(); a flooder keeps its queue (10 datagrams) full, so the daemon's READY=1,
    sent on a blocking socket from the daemon's loop, blocks the new daemon until the spawner
    reads again, and the spawner's who_answers() ping meanwhile waits out its 2 s timeout against
    the blocked loop.  Measured: 0.16-0.28 s alone, 2.1-2.6 s with one flooder of uid 65534 (the
    first call of every client that cold-starts)."""
    from support import free_port, free_range, stop_pid
    first, last = free_range(10)
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    pids = []
    flooder = None
    try:
        env.setenv("NODEMNGR_STATE", str(tmp_path / "alone.sqlite3"))
        alone, pid = _cold_start(free_port())     # (this machine's pace, now)
        pids.append(pid)
        flooder = nobody.popen(FLOODER, "@nodemngr-spawn-%d-" % os.getpid(), stdout=subprocess.PIPE)
        assert flooder.stdout.readline().strip() == "watching"
        env.setenv("NODEMNGR_STATE", str(tmp_path / "flooded.sqlite3"))
        flooded, pid = _cold_start(free_port())
        pids.append(pid)
        assert flooded < alone + 1.0, "a cold start took %.2f s while uid %d flooded the spawner's address, " \
            "%.2f s alone" % (flooded, nobody.uid, alone)
    finally:
        if flooder is not None:
            flooder.kill()
            flooder.wait(10)
        for pid in pids:
            stop_pid(pid)


def test_a_copy_of_the_file_without_the_py_suffix_still_auto_starts(tmp_path, env):
    """Promise: this one file is a whole deployment, and a client whose daemon is not running
    starts one (1.3: by importing the file, so that its bytecode cache serves).  Broken: a copy
    installed as an executable without ".py" (it has a shebang: install -m 0755 nodemngr.py
    /usr/local/bin/nodemngr; then `nodemngr run -- CMD`) spawns `python -c <import by path> FILE`,
    and importlib.util.spec_from_file_location() returns None for a file with no known suffix:
    every spawned daemon dies with "AttributeError: 'NoneType' object has no attribute 'loader'"
    and the client fails after SPAWN_TIMEOUT (10 s; 2 s here).  Release 1.2 (85f53ec), which ran
    the file as a script, starts it in 0.5 s."""
    import importlib.machinery
    import importlib.util
    import shutil
    from support import NODEMNGR, free_port, free_range, stop_pid
    script = tmp_path / "bin" / "nodemngr"
    script.parent.mkdir()
    shutil.copy(NODEMNGR, str(script))
    os.chmod(str(script), 0o755)
    # what Python makes of `/usr/local/bin/nodemngr ARGS`: the module __main__, whose __file__ is that path
    loader = importlib.machinery.SourceFileLoader("nodemngr_as_script", str(script))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    assert module.__file__ == str(script)
    port = free_port()
    first, last = free_range(5)
    env.setenv("NODEMNGR_STATE", str(tmp_path / "state.sqlite3"))
    env.setenv("NODEMNGR_FIRST_PORT", str(first))
    env.setenv("NODEMNGR_LAST_PORT", str(last))
    try:
        try:
            module.start_daemon(port=port, timeout=2.0)
        except module.NodeMngrException as exc:
            pytest.fail("no daemon starts from %s: %s" % (script, exc))
        assert _daemon_pid(port)
    finally:
        pid = _daemon_pid(port)
        if pid:
            stop_pid(pid)
