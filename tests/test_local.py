"""The local socket (README, "For test suites" and "Handing over a bound socket"): portpicker's
portserver protocol, newSocket's race-free handoff, nodemngr run, and the pytest plugin, on real
daemons, real portpicker clients and real pytest-xdist workers."""
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import xmlrpc.client

import pytest

from support import (FAST_REAP, NODEMNGR, ROOT, RawConnection, clean_env, daemon_settings, free_range,
                     http_request, pid_alive, popen_python, read_handovers, rpc_body, run_python, stop_pid,
                     wait_until)

import nodemngr

SHORT_STALL = dict(FAST_REAP, **daemon_settings(stall_timeout=0.5))


def local_address(d):
    return "@nodemngr-%d" % d.port


def portserver_ask(d, data, shut=False):
    """Send *data* on d's local socket; return all it answers before closing (b"" for nothing)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(nodemngr.local_sockaddr(local_address(d)))
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                return reply
            reply += chunk


def holders(d):
    return {e["port"]: e["pid"] for e in d.rpc().listPorts()}


# --- portpicker's portserver protocol ------------------------------------------------------------

PICKER = ("import portpicker, sys\n"
          "print(portpicker.pick_unused_port(), flush=True)\n"
          "sys.stdin.read()\n")


def test_portpicker_clients_get_our_ports_and_give_them_back_when_they_end(daemon_factory):
    portpicker = pytest.importorskip("portpicker", reason="portpicker is a test dependency (tox.ini installs it)")
    assert portpicker
    d = daemon_factory(size=80, state="none", settings=FAST_REAP)
    env = clean_env(PORTSERVER_ADDRESS=local_address(d))
    procs = [popen_python(["-c", PICKER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(50)]
    try:
        got = {p.pid: int(p.stdout.readline()) for p in procs}
        assert len(set(got.values())) == 50, "50 processes at once, 50 distinct ports"
        assert all(d.first <= port <= d.last for port in got.values()), "every port came from the node manager"
        assert holders(d) == {port: pid for pid, port in got.items()}, "each registered to the process that asked"
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(20)
    assert wait_until(lambda: not holders(d), timeout=10), "the ports of the ended processes were not freed"


@pytest.mark.parametrize("request_bytes", [b"1" * 21, b"12345678901234567890\n", b"0\n", b"1\n", b"-5\n",
                                           b"12a\n", b"7\n7\n", b"%d\n" % 2 ** 40, b"1\r\n", b"+5\n"],
                         ids=["21 bytes", "21 with newline", "pid 0", "pid 1", "negative", "not digits",
                              "two lines", "huge", "pid 1 CRLF", "plus"])
def test_a_bad_portserver_request_is_closed_without_a_reply(any_daemon, request_bytes):
    assert portserver_ask(any_daemon, request_bytes, shut=True) == b""
    assert portserver_ask(any_daemon, request_bytes) == b"", "without the end of input too"
    assert holders(any_daemon) == {}


def test_portserver_requests_good_dead_stalled_and_unread(daemon_factory, reap_pids):
    d = daemon_factory(size=20, state="none", settings=SHORT_STALL)
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert portserver_ask(d, b"%d\n" % dead.pid) == b"", "a pid that has ended gets nothing"
    port = int(portserver_ask(d, b"%d\n" % os.getpid()))
    assert holders(d) == {port: os.getpid()}
    port2 = int(portserver_ask(d, b"%d" % os.getpid(), shut=True))     # no newline: the end of input will do
    port3 = int(portserver_ask(d, b"%d\r\n" % os.getpid()))              # CRLF will do too
    assert holders(d) == {port: os.getpid(), port2: os.getpid(), port3: os.getpid()}
    d.rpc().delPort(port3)
    # "garbage" on the local socket is not the portserver's: it is HTTP's, and gets HTTP's 400
    assert portserver_ask(d, b"garbage\r\n\r\n", shut=True).startswith(b"HTTP/1.1 400 ")
    # a client that sends part of a pid and stalls is cut off at the stall limit, others are served
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stalled.connect(nodemngr.local_sockaddr(local_address(d)))
        stalled.sendall(b"123")
        unread.connect(nodemngr.local_sockaddr(local_address(d)))
        unread.sendall(b"%d\n" % os.getpid())     # and never reads its reply
        assert d.rpc().ping().startswith("NodeMngr at ")
        stalled.settimeout(5)
        t0 = time.monotonic()
        assert stalled.recv(10) == b"" and time.monotonic() - t0 < 4, "the stalled request was not cut off"
        assert len(holders(d)) == 3, "the client that does not read holds its port all the same"
    finally:
        stalled.close()
        unread.close()
    # on TCP a pid is just a bad HTTP request
    with RawConnection(d, timeout=5) as c:
        c.send(b"%d\n\n" % os.getpid())
        assert c.reply().status == 400
    assert len(holders(d)) == 3


def test_a_client_in_another_pid_namespace_may_name_itself(daemon):
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare (util-linux) and root to make a pid namespace; .ci/run runs as root")
    script = ("import os, socket, sys\n"
              "sys.argv[1] = '\\0' + sys.argv[1][1:]\n"
              "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'%d\\n' % os.getpid())\n"
              "print(os.getpid(), s.recv(100).decode().strip() or 'refused', flush=True)\n"
              "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'%d\\n' % (os.getpid() + 1))\n"
              "print(s.recv(100).decode().strip() or 'refused', flush=True)\n"
              "sys.stdin.read()\n")
    # (under a shell, so that the client is not the namespace's pid 1, which the protocol refuses)
    proc = subprocess.Popen([unshare, "--pid", "--fork", "--kill-child", "sh", "-c", '"$0" -c "$1" "$2"; true',
                             sys.executable, script, local_address(daemon)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            universal_newlines=True)
    try:
        inner_pid, port = proc.stdout.readline().split()
        assert proc.stdout.readline().strip() == "refused", "another pid of its namespace cannot be translated"
        assert int(inner_pid) < 10, "the client runs in a fresh pid namespace"
        owner = holders(daemon)[int(port)]
        assert owner != int(inner_pid) and pid_alive(owner), "registered to the client's pid as this host sees it"
        with open("/proc/%d/status" % owner) as f:
            assert [line.split()[-1] for line in f if line.startswith("NSpid:")] == [inner_pid]
    finally:
        proc.stdin.close()
        proc.wait(10)


# --- newSocket: a bound socket handed over ---------------------------------------------------------

def test_new_socket_hands_over_a_bound_socket(daemon):
    nm = daemon.proxy()
    sock = nm.newSocket("web")
    try:
        port = sock.getsockname()[1]
        assert sock.type == socket.SOCK_STREAM and daemon.first <= port <= daemon.last
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            conn, _ = sock.accept()
            conn.sendall(b"hello")
            assert client.recv(5) == b"hello"
            conn.close()
        assert holders(daemon) == {port: os.getpid()}
        assert daemon.rpc().lookup("web")[0]["port"] == port
        udp = nm.newSocket("dns", kind="udp", host="::1")
        try:
            assert (udp.family, udp.type) == (socket.AF_INET6, socket.SOCK_DGRAM)
            assert udp.getsockname()[0] == "::1"
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
                client.sendto(b"ping", ("::1", udp.getsockname()[1]))
                udp.settimeout(5)
                assert udp.recvfrom(10)[0] == b"ping"
        finally:
            udp.close()
        for kind, host in (("sctp", "127.0.0.1"), ("tcp", "localhost"), ("tcp", "192.0.2.1")):
            with pytest.raises(nodemngr.BadArgumentError) as exc:
                nm.newSocket("bad", kind=kind, host=host)
            assert "kind" in str(exc.value) or "host" in str(exc.value) or "192.0.2.1" in str(exc.value)
    finally:
        sock.close()
    with pytest.raises(xmlrpc.client.Fault) as fault:
        daemon.rpc().newSocket("over tcp")
    assert fault.value.faultCode == 3 and "local socket" in fault.value.faultString
    assert len(holders(daemon)) == 2, "refused calls registered nothing"


def test_a_flood_of_new_socket_and_new_port_never_gives_a_port_twice(daemon_factory):
    # All of them checked: the test binds ports without SO_REUSEADDR, and one left in TIME_WAIT by an
    # earlier test's daemon (which the node manager hands out, as servers reuse those) cannot be.
    first, last = free_range(400, check=400)
    d = daemon_factory(first=first, last=last, state="none")
    nm = d.proxy()
    held, errors, lock = [], [], threading.Lock()

    def client(n):
        try:
            for i in range(25):
                if (i + n) % 2:
                    s = nm.newSocket("flood")
                else:
                    s = socket.socket()
                    s.bind(("127.0.0.1", nm.newPort("flood")))      # bindable, or the test fails
                with lock:
                    held.append(s)
        except Exception as exc:    # reported below, with the others
            errors.append(exc)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        ports = [s.getsockname()[1] for s in held]
        assert len(ports) == 200 and len(set(ports)) == 200
        assert set(holders(d)) == set(ports)
    finally:
        for s in held:
            s.close()


# --- nodemngr run ---------------------------------------------------------------------------------

def run_cli_process(d, *args, **kw):
    """``python3 nodemngr.py run ARGS`` (forked where support's fork server can, with the
    interpreter's whole exit)."""
    return popen_python([NODEMNGR, "run"] + [str(a) for a in args], env=d.env, finalize=True, **kw)


def run_cli(d, *args):
    """run_cli_process() to its end: the CompletedProcess, its output as text."""
    return run_python([NODEMNGR, "run"] + [str(a) for a in args], env=d.env, capture_output=True, text=True,
                      timeout=30, finalize=True)


def test_run_gives_a_server_its_port_and_the_port_is_freed_when_it_ends(daemon_factory, reap_pids):
    d = daemon_factory(size=20, state="none", settings=FAST_REAP)
    proc = run_cli_process(d, "--", sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reap_pids.append(proc.pid)
    assert wait_until(lambda: proc.pid in holders(d).values(), timeout=10), "nothing registered to the command"
    port = next(p for p, pid in holders(d).items() if pid == proc.pid)
    entry = d.rpc().listPorts()[0]
    assert entry["info"].endswith("-m http.server '{port}' --bind 127.0.0.1"), "the command line, as written"

    def serves():
        try:
            return urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=2).status == 200
        except OSError:
            return False
    assert wait_until(serves, timeout=10), "http.server does not answer on its port"
    stop_pid(proc.pid)
    assert wait_until(lambda: not holders(d), timeout=10), "the port outlived its command"


FD3_SERVER = ("import os, socket\n"
              "s = socket.socket(fileno=3)\n"
              "assert os.environ['LISTEN_FDS'] == '1' and os.environ['LISTEN_PID'] == str(os.getpid())\n"
              "conn, _ = s.accept()\n"
              "conn.sendall(('%s %s %s' % (os.environ['PORT'], os.environ['LISTEN_FDNAMES'],\n"
              "              s.getsockname()[1])).encode())\n"
              "conn.close()\n")


def test_run_with_socket_passes_a_bound_socket_as_fd_3(daemon_factory, reap_pids):
    d = daemon_factory(size=20, settings=FAST_REAP)
    d.rpc().newPort("below")
    ports = []
    for _ in range(2):      # twice: with --name the port is sticky
        proc = run_cli_process(d, "--name", "echo", "--socket", "--", sys.executable, "-c", FD3_SERVER)
        reap_pids.append(proc.pid)
        assert wait_until(lambda: d.rpc().lookup("echo"), timeout=10)
        port = d.rpc().lookup("echo")[0]["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.recv(100).decode() == "%d echo %d" % (port, port)
        assert proc.wait(10) == 0, "run's exit status is the command's"
        assert wait_until(lambda: not d.rpc().lookup("echo"), timeout=10)
        ports.append(port)
        d.rpc().delPort(d.first)
        d.rpc().newPort("below again")
    assert ports[0] == ports[1] and ports[0] != d.first


BLOCK_SERVER = ("import json, os, socket, sys\n"
                "socks = [socket.socket(fileno=fd) for fd in (3, 4, 5)]\n"
                "assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in socks)\n"
                "env = os.environ\n"
                "assert env['LISTEN_FDS'] == '3' and env['LISTEN_PID'] == str(os.getpid())\n"
                "print(json.dumps([[s.getsockname()[1] for s in socks], env['LISTEN_FDNAMES'], env['PORT'], env['PORTS'],\n"
                "                  [env['PORT%d' % i] for i in range(3)], sys.argv[1:]]))\n")


def test_run_count_consecutive_socket_gives_three_listening_sockets_on_consecutive_ports(daemon_factory):
    d = daemon_factory(size=20, settings=FAST_REAP)
    d.rpc().newPort("below")
    runs = []
    for _ in range(2):      # twice: with --name the block is sticky
        out = run_cli(d, "--name", "trio", "--count", 3, "--consecutive", "--socket", "--", sys.executable, "-c",
                      BLOCK_SERVER, "{port0}", "{port1}", "{port2}", "{port}", "{port3}", "-p{port1}")
        assert out.returncode == 0, out.stderr
        ports, names, port, all_ports, numbered, argv = __import__("json").loads(out.stdout)
        assert ports == list(range(ports[0], ports[0] + 3)) and ports[0] == d.first + 1
        assert names == "trio:trio:trio" and port == str(ports[0]) and all_ports == " ".join(map(str, ports))
        assert numbered == [str(p) for p in ports]
        assert argv == [str(p) for p in ports] + [str(ports[0]), "{port3}", "-p%d" % ports[1]]
        assert wait_until(lambda: not d.rpc().lookup("trio"), timeout=10), "freed when the command ended"
        runs.append(ports)
        d.rpc().newPort("taking the next free one")
    assert runs[0] == runs[1]


def test_run_count_without_socket_owns_the_block(daemon_factory):
    d = daemon_factory(size=20, state="none", settings=FAST_REAP)
    script = ("import json, os, xmlrpc.client\n"
              "rpc = xmlrpc.client.ServerProxy('http://127.0.0.1:%s/RPC2' % os.environ['NODEMNGR_PORT'])\n"
              "print(json.dumps([os.getpid(), os.environ['PORTS'], os.environ.get('LISTEN_FDS'),\n"
              "                  {e['port']: e['pid'] for e in rpc.listPorts()}]))\n")
    out = run_cli(d, "--count", 2, "--", sys.executable, "-c", script)
    assert out.returncode == 0, out.stderr
    pid, ports, listen, held = __import__("json").loads(out.stdout)
    assert ports == "%d %d" % (d.first, d.first + 1) and listen is None
    assert held == {str(d.first): pid, str(d.first + 1): pid}, "owned by the command itself"
    assert wait_until(lambda: not holders(d), timeout=10)
    out = run_cli(d, "--consecutive", "--", "true")
    assert out.returncode == 2 and "give --count N too" in out.stderr


def test_run_exit_status_and_errors(daemon_factory, tmp_path):
    d = daemon_factory(size=1, state="none")
    out = run_cli(d, "--", "sh", "-c", "exit 7")
    assert out.returncode == 7, out
    out = run_cli(d, "--", tmp_path / "no-such-program")
    assert out.returncode == 127 and out.stderr.count("\n") == 1 and "cannot run" in out.stderr, out
    assert holders(d) == {}, "the port of a command that could not run is given back"
    d.rpc().newPort("the only port")
    out = run_cli(d, "--", "true")
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "no free port" in out.stderr, out


# --- the local socket's address -------------------------------------------------------------------

def test_a_path_local_socket_is_made_0666_replaced_when_stale_and_removed_at_stop(daemon_factory, tmp_path):
    path = str(tmp_path / "nm.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()       # a socket file nobody listens on, as a daemon killed with -9 leaves
    d = daemon_factory(size=10, state="none", extra_args=["--unix", path])
    assert os.stat(path).st_mode & 0o777 == 0o666
    port, sock = nodemngr.request_socket("over a path", address=path)
    sock.close()
    assert holders(d) == {port: os.getpid()}
    assert d.terminate() == 0
    assert not os.path.exists(path)
    with open(path, "w") as f:
        f.write("not a socket")
    e = daemon_factory(size=10, state="none", extra_args=["--unix", path])
    assert "is not a socket" in e.read_log() and "serving without a local socket" in e.read_log()
    assert open(path).read() == "not a socket", "what is there is left alone"
    assert e.rpc().ping().startswith("NodeMngr at "), "TCP is served all the same"
    off = daemon_factory(size=10, state="none", extra_args=["--unix", "none"])
    with pytest.raises(OSError) as exc:
        portserver_ask(off, b"%d\n" % os.getpid())
    assert exc.value.errno == errno.ECONNREFUSED


# --- the pytest plugin ----------------------------------------------------------------------------

PLUGIN_TESTS = '''
import json, os, socket, time
import pytest

@pytest.mark.parametrize("n", range(%(count)d))
def test_port(nodemngr_port, nodemngr_port_factory, nodemngr_socket, n):
    extra = nodemngr_port_factory("extra")
    block = nodemngr_port_factory(count=2, consecutive=True)
    assert block == [block[0], block[0] + 1]
    held = []
    for port in [nodemngr_port, extra] + block:
        s = socket.socket()
        s.bind(("127.0.0.1", port))             # nobody else has it, or this fails
        s.listen(1)
        held.append(s)
    ports = [nodemngr_port, extra, nodemngr_socket.getsockname()[1]] + block
    start = time.monotonic()
    time.sleep(0.002)
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps([os.environ.get("PYTEST_XDIST_WORKER"), ports, start, time.monotonic()]) + "\\n")
    for s in held:
        s.close()
'''


# Plugins installed beside ours that the --fixtures run does not use (Hypothesis's costs about 0.3 s
# of CPU to import); none of them is needed to find ours.
QUIET_PYTEST = ["-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:hypothesispytest", "-p", "no:benchmark"]


def test_the_pytest_plugin_gives_xdist_workers_ports_that_never_collide(daemon_factory, tmp_path):
    first, last = free_range(300, check=300)    # (the tests bind their ports: see the flood test)
    d = daemon_factory(first=first, last=last, state="none")
    (tmp_path / "test_many.py").write_text(PLUGIN_TESTS % {"count": 200})     # 4 workers x 50
    record = tmp_path / "record.jsonl"
    # Only xdist and ours, named (the next test checks that pytest finds ours by itself): whatever
    # else a machine's pytest loads (Hypothesis, pytest-benchmark) costs each of five processes.
    env = clean_env(NODEMNGR_HOST=d.host, NODEMNGR_PORT=d.port, NODEMNGR_AUTOSTART=0, RECORD=record,
                    PYTHONPATH=ROOT, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    argv = [sys.executable, "-m", "pytest", "-q", "-n", "4", "-p", "xdist.plugin", "-p", "pytest_nodemngr",
            "-p", "no:cacheprovider", str(tmp_path / "test_many.py")]
    out = subprocess.run(argv, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=120)
    assert out.returncode == 0 and "200 passed" in out.stdout, out.stdout[-3000:]
    import json
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 200 and len({w for w, _, _, _ in rows}) == 4, "200 tests on 4 workers"
    spans = sorted((port, start, end) for _, ports, start, end in rows for port in ports)
    for (p1, _, e1), (p2, s2, _) in zip(spans, spans[1:]):
        assert p1 != p2 or e1 <= s2, "port %d held by two tests at once" % p1
    assert holders(d) == {}, "every port was freed at its test's teardown"


def test_fixtures_say_at_once_when_what_holds_the_port_is_no_node_manager(tmp_path):
    """Something that accepts connections and never answers, or answers something else, holds the
    configured port: every fixture fails within about a second, in one sentence, not after the
    client's 10 s timeout each."""
    (tmp_path / "test_three.py").write_text(PLUGIN_TESTS % {"count": 3})
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)       # (the kernel takes the connections; nobody ever reads them)
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen(16)
    talker = threading.Thread(target=_answer_garbage, args=(other,), daemon=True)
    talker.start()
    try:
        for listener, says in ((silent, "accepts connections but does not answer like a node manager"),
                               (other, "answers, but not as a node manager")):
            env = clean_env(NODEMNGR_PORT=listener.getsockname()[1], RECORD=tmp_path / "record", PYTHONPATH=ROOT,
                            PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
            started = time.monotonic()
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_nodemngr", "-p", "no:cacheprovider",
                                  str(tmp_path / "test_three.py")], env=env, cwd=str(tmp_path), capture_output=True,
                                 text=True, timeout=60)
            took = time.monotonic() - started
            assert out.returncode == 1 and "3 errors" in out.stdout and says in out.stdout, out.stdout[-2000:]
            assert took < 8, "%.1f s: the client's timeout was waited for" % took
    finally:
        silent.close()
        other.close()


def _answer_garbage(listener):
    """As an SSH server does: its banner first, then it waits for the client (here, to hang up)."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_banner, args=(conn,), daemon=True).start()


def _banner(conn):
    with conn:
        conn.settimeout(10)
        try:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            while conn.recv(4096):
                pass
        except OSError:
            pass


def _plugin_installed():
    """Whether pytest finds pytest_nodemngr among its entry points here.  The --fixtures run gets
    the repository on PYTHONPATH, so that it sees what this Python sees: the module, and the
    nodemngr.egg-info that setuptools leaves there at an editable install (without it, a Python
    started elsewhere would find the entry point and not the module)."""
    try:
        from importlib.metadata import entry_points
    except ImportError:
        return False
    eps = entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
    return any(ep.name == "nodemngr" for ep in group)


def test_the_plugin_is_registered_through_pytest11(tmp_path):
    if not _plugin_installed():
        pytest.skip("nodemngr is not installed in this Python (tox installs it, which registers pytest11)")
    argv = [sys.executable, "-m", "pytest", "--fixtures", "-p", "no:xdist"] + QUIET_PYTEST + [str(tmp_path)]
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60,
                         cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=ROOT))
    assert "nodemngr_port_factory" in out.stdout and "nodemngr_socket" in out.stdout, out.stdout[-2000:]


@pytest.mark.parametrize("name", ["nodemngr", "pytest_nodemngr"])
def test_one_p_name_loads_the_plugin_installed_or_not(tmp_path, name):
    """`pytest -p nodemngr`, the name the README gives, loads the fixtures where the package is not
    installed (PYTEST_DISABLE_PLUGIN_AUTOLOAD stands for that) and where it is (pytest found them
    already: no "already registered" crash); so does `-p pytest_nodemngr`, the 1.1 way."""
    ways = ["not installed"] + (["installed"] if _plugin_installed() else [])
    for way in ways:
        env = dict(os.environ, PYTHONPATH=ROOT)
        if way == "not installed":
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        argv = [sys.executable, "-m", "pytest", "--fixtures", "-p", name, "-p", "no:xdist"] + QUIET_PYTEST + [str(tmp_path)]
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                             timeout=60, cwd=str(tmp_path), env=env)
        assert out.returncode == 0 and "nodemngr_port_factory" in out.stdout, (way, out.stdout[-2000:])


# --- what an adversarial run found (each failed before its fix) ------------------------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]   # (a Python
# any user may run: the one running the tests may sit in root's home)


def can_be_nobody():
    if shutil.which("setpriv") is None or os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs setpriv (util-linux), /usr/bin/python3 and root to act as another user; .ci/run runs as root")


def as_nobody(code, *args):
    can_be_nobody()
    return subprocess.run(NOBODY + ["-c", code] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=30, cwd="/")


RAW_CALL = ("import socket, sys, xmlrpc.client\n"
            "s = socket.socket(socket.AF_UNIX); s.connect('\\0' + sys.argv[1][1:])\n"
            "body = xmlrpc.client.dumps(tuple(eval(sys.argv[3])), sys.argv[2]).encode()\n"
            "s.sendall(b'POST /RPC2 HTTP/1.1\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n' % len(body) + body)\n"
            "print(s.makefile('rb').readline().decode().strip())\n")


def test_with_a_token_other_users_need_it_on_the_local_socket_too(daemon_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret")
    token.chmod(0o600)
    d = daemon_factory(size=10, state="none", extra_args=["--token-file", str(token)])
    port = nodemngr.request_socket("mine", address=local_address(d))[0]     # the daemon's own user: no token
    for method, params in (("listPorts", "[]"), ("delPort", "[%d]" % port), ("terminate", "[]")):
        out = as_nobody(RAW_CALL, local_address(d), method, params)
        assert out.stdout.startswith("HTTP/1.1 401 "), (method, out.stdout)
    out = as_nobody(PICKER.replace("import portpicker, sys", "import socket, sys\ns = socket.socket(socket.AF_UNIX)")
                    .replace("print(portpicker.pick_unused_port(), flush=True)",
                             "s.connect('\\0' + sys.argv[1][1:]); s.sendall(b'%d\\n' % __import__('os').getpid());"
                             " print(repr(s.recv(100)), flush=True)").replace("sys.stdin.read()\n", ""),
                    local_address(d))
    assert out.stdout.strip() == "b''", "the portserver protocol is closed to other users when a token is set"
    assert d.proc.poll() is None and list(holders_with_token(d, b"s3cret")) == [port]


def holders_with_token(d, token):
    rpc = xmlrpc.client.ServerProxy("http://x:%s@%s:%d/RPC2" % (token.decode(), d.host, d.port))
    return {e["port"]: e["pid"] for e in rpc.listPorts()}


SQUAT = ("import socket, sys, time\n"
         "s = socket.socket(socket.AF_UNIX); s.bind('\\0' + sys.argv[1][1:]); s.listen(5)\n"
         "print('bound', flush=True)\n"
         "c, _ = s.accept(); c.recv(65536); time.sleep(2)\n")


def test_a_squatter_on_the_local_address_is_refused_by_clients_and_costs_the_daemon_only_it(daemon_factory):
    can_be_nobody()
    d = daemon_factory(size=10, state="none", start=False)
    squatter = subprocess.Popen(NOBODY + ["-c", SQUAT, local_address(d)], stdout=subprocess.PIPE,
                                universal_newlines=True, cwd="/")
    try:
        assert squatter.stdout.readline().strip() == "bound"
        d.start()
        assert "in use by another program" in d.read_log() and "serving without a local socket" in d.read_log()
        assert d.rpc().newPort("tcp still works") == d.first
        with pytest.raises(nodemngr.NodeMngrException) as exc:
            nodemngr.request_socket("victim", address=local_address(d))
        assert "served by uid 65534" in str(exc.value)
    finally:
        stop_pid(squatter.pid)
        squatter.wait(10)


NS_CLIENT = ("import os, sys\n"
             "sys.path.insert(0, sys.argv[2])\n"
             "import nodemngr\n"
             "port, sock = nodemngr.request_socket('ns-socket', address=sys.argv[1])\n"
             "print(os.getpid(), port, flush=True)\n"
             "sys.stdin.read()\n")


def test_a_new_socket_from_another_pid_namespace_is_owned_by_the_caller(daemon_factory):
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare (util-linux) and root to make a pid namespace; .ci/run runs as root")
    d = daemon_factory(size=10, state="none", settings=FAST_REAP)
    proc = subprocess.Popen([unshare, "--pid", "--fork", "--kill-child", "sh", "-c", '"$0" -c "$1" "$2" "$3"; true',
                             sys.executable, NS_CLIENT, local_address(d), ROOT], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, universal_newlines=True)
    try:
        inner, port = (int(x) for x in proc.stdout.readline().split())
        owner = holders(d)[port]
        assert owner != inner and owner not in (0, 1) and pid_alive(owner), "not the pid the client sees"
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert wait_until(lambda: port not in holders(d), timeout=10), "freed once the caller ended"


def test_new_socket_without_a_pid_is_owned_by_its_caller_and_one_is_in_flight_per_connection(daemon):
    request = http_request(rpc_body("newSocket", "no pid given"))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(nodemngr.local_sockaddr(local_address(daemon)))
        s.sendall(request * 20)         # pipelined, none of the replies read yet
        time.sleep(0.3)
        data, fds = read_handovers(s, 20)
    for fd in fds:
        os.close(fd)
    replies = data.split(b"HTTP/1.1 200 OK")[1:]
    passed = [r for r in replies if b"<int>" in r and b"faultCode" not in r]
    assert len(passed) == len(fds) >= 1 and len(replies) == 20
    refused = [r for r in replies if b"faultCode" in r]
    assert all(b"one socket at a time on a connection" in r and b"<int>3</int>" in r for r in refused)
    assert sorted(holders(daemon).values()) == [os.getpid()] * len(fds), "owned by the caller, the others given back"


def test_run_passes_fd_3_with_stdin_and_stdout_closed(daemon, tmp_path):
    out = tmp_path / "out"
    script = "import socket; s = socket.socket(fileno=3); open(%r, 'w').write(str(s.getsockname()[1]))" % str(out)
    code = subprocess.run(["sh", "-c", 'exec 0<&- 1>&-; exec "$0" "$1" run --socket -- "$0" -c "$2"', sys.executable,
                           NODEMNGR, script], env=daemon.env, timeout=30).returncode
    assert code == 0 and daemon.first <= int(out.read_text()) <= daemon.last


def test_run_usage_errors_and_names(daemon_factory, tmp_path):
    d = daemon_factory(size=10, state="none", extra_args=["--unix", "none"])
    for args, code, text in ((["--udp", "--", "true"], 2, "give --socket too"),
                             (["--socket", "--", "true"], 1, "no node manager answers on the local socket")):
        out = run_cli(d, *args)
        assert out.returncode == code and text in out.stderr and out.stderr.count("\n") <= 2, out.stderr
    e = daemon_factory(size=10, state="none")
    out = run_cli(e, "--socket", "--name", "a:b c", "--", "sh", "-c", "echo $LISTEN_FDNAMES")
    assert out.stdout.strip() == "a_b_c", "':' separates names in LISTEN_FDNAMES"


def test_nodemngr_run_gives_the_command_the_signal_dispositions_a_shell_would(daemon_factory):
    # Python ignores SIGPIPE and SIGXFSZ at startup; os.execvpe keeps ignored dispositions, so the
    # command nodemngr run execs starts with both ignored (Popen's restore_signals would have reset
    # them): `nodemngr run -- bash -c 'yes | head -1'` has yes fail with "Broken pipe", status 1,
    # where run directly it dies of SIGPIPE (141) silently.  The mask itself is clean.
    d = daemon_factory()
    probe = "grep -E '^Sig(Ign|Blk)' /proc/self/status"
    direct = subprocess.run(["sh", "-c", probe], stdout=subprocess.PIPE, text=True, env=d.env, check=True).stdout
    via_run = subprocess.run([sys.executable, NODEMNGR, "run", "--", "sh", "-c", probe],
                             stdout=subprocess.PIPE, text=True, env=d.env, timeout=30, check=True).stdout

    def ignored(status):
        mask = int([line for line in status.splitlines() if line.startswith("SigIgn:")][0].split()[1], 16)
        return [sig.name for sig in (signal.SIGPIPE, signal.SIGXFSZ) if mask >> (sig - 1) & 1]
    assert "SigBlk:\t0000000000000000" in via_run
    assert ignored(via_run) == ignored(direct) == []


def test_an_auto_started_daemon_gets_a_relative_local_path_made_absolute(tmp_path, reap_pids):
    port, (first, last) = nodemngr_port_and_range()
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=str(tmp_path / "state.sqlite3"), NODEMNGR_UNIX="rel.sock")
    code = ("import os, sys; sys.path.insert(0, %r); os.chdir(%r)\n"
            "from nodemngr_proxy import NodeMngrProxy\n"
            "nm = NodeMngrProxy(); print(nm.status()['pid']); nm.newSocket('rel').close()\n" % (ROOT, str(tmp_path)))
    out = run_python(["-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    if out.stdout.split()[:1] and out.stdout.split()[0].isdigit():
        reap_pids.append(int(out.stdout.split()[0]))
    assert out.returncode == 0, out.stdout
    assert os.path.exists(str(tmp_path / "rel.sock"))


def nodemngr_port_and_range():
    from support import free_port
    return free_port(), free_range(10)
