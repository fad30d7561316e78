"""The daemon over the wire: allocation, concurrency, faults, status and introspection, listings,
a full range, restart after kill -9; and daemons forked by the tests are what exec would start."""
import datetime
import os
import socket
import subprocess
import sys
import threading
import xmlrpc.client

import pytest

import support
from support import (FAST_REAP, ForkedProcess, ForkServer, clean_env, fork_server, fork_server_off, free_range,
                     popen_python, post, run_python, wait_until)


def fault_code(call, *args):
    with pytest.raises(xmlrpc.client.Fault) as info:
        call(*args)
    assert "Traceback" not in info.value.faultString and "<class" not in info.value.faultString
    return info.value.faultCode


def test_sixteen_threads_get_1600_distinct_ports(daemon_factory):
    d = daemon_factory(size=1800)
    nm = d.proxy()
    got = [[] for _ in range(16)]
    errors = []

    def worker(i):
        try:
            for n in range(100):
                got[i].append(nm.newPort("t%d-%d" % (i, n), 0))
        except Exception as exc:    # reported below, with the thread's number
            errors.append((i, exc))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    ports = [p for per in got for p in per]
    assert len(ports) == 1600 and len(set(ports)) == 1600
    listed = nm.listPorts()
    assert [e["port"] for e in listed] == sorted(ports)
    assert {e["port"]: e["info"] for e in listed} == {
        p: "t%d-%d" % (i, n) for i, per in enumerate(got) for n, p in enumerate(per)}


def test_exhaustion_is_fault_2_and_the_daemon_serves_on(daemon_factory):
    d = daemon_factory(size=3)
    rpc = d.rpc()
    ports = [rpc.newPort(i) for i in range(3)]
    with pytest.raises(xmlrpc.client.Fault) as info:
        rpc.newPort("one too many")
    assert info.value.faultCode == 2
    assert info.value.faultString.startswith("no free port in %d-%d" % (d.first, d.last))
    assert "3 registered" in info.value.faultString
    assert rpc.delPort(ports[1]) == 0
    assert rpc.newPort("fits again") == ports[1]


def test_fault_codes_over_the_wire(any_daemon):
    daemon = any_daemon
    rpc = daemon.rpc()
    assert fault_code(rpc.delPort, daemon.first) == 1
    assert fault_code(rpc.delPort, "11801") == 3
    assert fault_code(rpc.delPort, 0) == 3
    assert fault_code(rpc.newPort, "x", 2 ** 31 - 2) == 3        # no such pid
    assert fault_code(rpc.newPort, "x" * 5000) == 3             # info over 4 KiB
    deep = "leaf"
    for _ in range(17):
        deep = [deep]
    assert fault_code(rpc.newPort, deep) == 3
    assert fault_code(rpc.noSuchMethod) == -32601
    assert fault_code(getattr(rpc, "_dispatch"), "ping", []) == -32601
    assert fault_code(rpc.ping, 1) == -32602
    assert fault_code(rpc.newPort) == -32602
    reply = post(daemon, b"<methodCall><methodName>ping</methodName>")       # not well-formed
    assert b"<name>faultCode</name>\n<value><int>-32700</int>" in reply.body, reply
    assert rpc.ping().startswith("NodeMngr at ")


def test_unknown_port_text_is_the_legacy_one(any_daemon):
    daemon = any_daemon
    with pytest.raises(xmlrpc.client.Fault) as info:
        daemon.rpc().delPort(daemon.first)
    assert info.value.faultString == "Node manager: Unknown port: %d" % daemon.first


def test_info_values_are_kept_as_given(any_daemon):
    daemon = any_daemon
    rpc = daemon.rpc()
    infos = ["text", 42, 2.5, True, {"service": "echo", "nested": [1, {"a": "b"}]}, [1, "two"],
             b"\x00\x01binary", datetime.datetime(2001, 2, 3, 4, 5, 6), ""]
    ports = [rpc.newPort(info) for info in infos]
    listed = {e["port"]: e for e in rpc.listPorts()}
    for port, info in zip(ports, infos):
        assert listed[port]["info"] == info
        assert listed[port]["pid"] == 0
        assert isinstance(listed[port]["since"], datetime.datetime)


def test_nil_info_is_stored_as_empty_and_replies_carry_no_nil(any_daemon):
    daemon = any_daemon
    rpc = xmlrpc.client.ServerProxy(daemon.url, allow_none=True)
    port = rpc.newPort(None)
    assert rpc.listPorts() == [{"port": port, "name": "", "info": "", "pid": 0, "since": rpc.listPorts()[0]["since"],
                                "uid": os.getuid()}]
    assert fault_code(rpc.newPort, {"a": None}) == 3


def test_status_and_introspection(any_daemon):
    daemon = any_daemon
    rpc = daemon.rpc()
    rpc.newPort("a")
    st = rpc.status()
    assert st["host"] == daemon.host and st["port"] == daemon.port
    assert (st["firstPort"], st["lastPort"]) == (daemon.first, daemon.last)
    assert st["registered"] == 1 and st["free"] == daemon.last - daemon.first
    assert st["state"] == daemon.state and st["uptime"] >= 0 and st["reaped"] == 0
    assert st["pid"] == daemon.proc.pid and st["version"]
    methods = rpc.system.listMethods()
    assert {"ping", "newPort", "delPort", "terminate", "listPorts", "status", "system.multicall",
            "system.listMethods", "system.methodHelp", "system.methodSignature"} <= set(methods)
    assert "pid" in rpc.system.methodHelp("newPort")
    assert ["int", "string"] in rpc.system.methodSignature("newPort")
    multi = xmlrpc.client.MultiCall(rpc)
    multi.newPort("m1")
    multi.delPort(1)
    multi.ping()
    results = multi()
    assert results[0] == daemon.first + 1
    with pytest.raises(xmlrpc.client.Fault) as info:
        results[1]
    assert info.value.faultCode == 1
    assert results[2].startswith("NodeMngr at ")


def test_kill_9_and_restart_keeps_every_port(daemon):
    rpc = daemon.rpc()
    given = [rpc.newPort("before crash %d" % i) for i in range(10)]
    rpc.delPort(given[3])
    held = set(given) - {given[3]}
    daemon.kill()
    daemon.start()
    rpc = daemon.rpc()
    assert {e["port"] for e in rpc.listPorts()} == held
    fresh = [rpc.newPort("after") for _ in range(5)]
    assert not held & set(fresh)
    assert fresh[0] == given[3], "the port freed before the crash is free after it"


def test_terminate_stops_with_status_0(daemon):
    assert daemon.rpc().terminate() is True
    assert daemon.proc.wait(15) == 0
    assert "stopped" in daemon.read_log()


def open_sockets():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink("/proc/self/fd/" + fd).startswith("socket:")
        except OSError:     # the listing's own descriptor
            pass
    return count


def test_the_proxy_keeps_one_connection_alive_across_calls(any_daemon):
    daemon = any_daemon
    nm = daemon.proxy()
    before = open_sockets()
    for i in range(25):
        nm.delPort(nm.newPort("kept alive %d" % i))
    assert open_sockets() - before == 1, "50 calls, one connection"
    nm.close()
    assert open_sockets() == before


# -- the tests' own fork server ------------------------------------------------------------------
# support.py starts most daemons and helper programs (``python -c PROGRAM``) by forking them from
# a fork server that has imported the standard library already, not by exec (support.ZYGOTE):
# tests of how a process behaves are only worth what that process is worth.  A program forked so
# must see what an exec'd one sees, and a forked daemon look like an exec'd one from outside.

SEEN_FROM_INSIDE = r"""
import json, os, resource, signal, sys
def fd_kind(fd):
    try:
        target = os.readlink("/proc/self/fd/%d" % fd)
    except OSError:
        return None
    return target.split(":")[0] if ":[" in target else target
print(json.dumps({
    "argv": sys.argv, "main": sorted(globals()), "path0": sys.path[0], "cwd": os.getcwd(),
    "env": dict(os.environ), "umask": os.umask(0o22), "flags": repr(sys.flags),
    "limits": [resource.getrlimit(getattr(resource, n)) for n in sorted(dir(resource)) if n.startswith("RLIMIT_")],
    "signals": [str(signal.getsignal(s)) for s in range(1, signal.NSIG) if s not in (32, 33)
                and s < signal.SIGRTMIN],
    "mask": sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    "fds": [fd_kind(int(fd)) for fd in sorted(os.listdir("/proc/self/fd"), key=int)[:3]],
    "more_fds": len(os.listdir("/proc/self/fd")),
    "stdio": [(f.encoding, f.errors, f.line_buffering) for f in (sys.stdin, sys.stdout, sys.stderr)],
}))
sys.stderr.write("to stderr\n")
__import__("atexit").register(sys.stderr.write, "at exit\n")
import concurrent.futures, threading, time
concurrent.futures.ThreadPoolExecutor(1).submit(int).result()     # an idle worker, told to end at exit
threading.Thread(target=lambda: (time.sleep(0.05), sys.stderr.write("thread done\n"))).start()
sys.exit(7)
"""

#: An uncaught exception: its traceback (the program's own frames and source lines only), status 1.
RAISES = """import sys
def fails(why):
    raise LookupError(why)
fails(sys.argv[1:])
"""


FINALIZED = """
class Kept:
    def __del__(self):
        sys.stderr.write("finalized\\n")
kept = Kept()
"""


def test_forked_programs_and_daemons_are_what_exec_would_start(tmp_path, daemon_factory):
    if fork_server() is None:
        pytest.skip("every process is exec'd: %s" % fork_server_off())
    env = clean_env(NODEMNGR_PORT=1, EXTRA="x")     # (not the fork server's: the product's variables differ)
    env.pop("EXTRA")
    how = dict(cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=30)
    forked = run_python(["-c", SEEN_FROM_INSIDE, "an", "argument"], **how)
    execd = subprocess.run([sys.executable, "-c", SEEN_FROM_INSIDE, "an", "argument"], **how)
    assert (forked.returncode, forked.stderr) == (execd.returncode, execd.stderr) == (
        7, "to stderr\nthread done\nat exit\n")
    assert json_of(forked.stdout) == json_of(execd.stdout)
    # an uncaught exception, in a -c program and in a script
    script = tmp_path / "raises.py"
    script.write_text(RAISES)
    for argv in (["-c", RAISES, "an", "argument"], [str(script), "an", "argument"]):
        forked = run_python(argv, **how)
        execd = subprocess.run([sys.executable] + argv, **how)
        assert forked.returncode == execd.returncode == 1
        assert forked.stderr == execd.stderr and "LookupError: ['an', 'argument']" in forked.stderr, argv
    # a script, ending with the interpreter's whole teardown (an object left referenced is finalized)
    script = tmp_path / "seen.py"
    script.write_text(SEEN_FROM_INSIDE.replace("sys.exit(7)", FINALIZED + "sys.exit(7)"))
    forked = run_python([str(script), "an", "argument"], finalize=True, **how)
    execd = subprocess.run([sys.executable, str(script), "an", "argument"], **how)
    assert (forked.returncode, forked.stderr) == (execd.returncode, execd.stderr) == (
        7, "to stderr\nthread done\nat exit\nfinalized\n")
    assert json_of(forked.stdout) == json_of(execd.stdout)

    a = daemon_factory(exec_only=True, state=str(tmp_path / "a.sqlite3"))
    b = daemon_factory(state=str(tmp_path / "b.sqlite3"))
    assert isinstance(b.proc, ForkedProcess) and not isinstance(a.proc, ForkedProcess)
    seen = [seen_from_outside(d) for d in (a, b)]
    assert seen[0] == seen[1]
    assert b.terminate() == a.terminate() == 0


def json_of(text):
    import json
    return json.loads(text)


def seen_from_outside(d):
    """What /proc shows of daemon *d* that a test could depend on, its own names made alike."""
    pid = d.proc.pid
    with open("/proc/%d/status" % pid) as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    seen = {k: status[k].strip() for k in ("SigBlk", "SigCgt", "Umask", "Threads", "NoNewPrivs")}
    seen["SigIgn"] = int(status["SigIgn"], 16) & 0x7FFFFFFF    # signals 1-31 (32, 33: glibc's own)
    with open("/proc/%d/limits" % pid) as f:
        seen["limits"] = f.read()
    with open("/proc/%d/stat" % pid, "rb") as f:
        seen["pgrp, session"] = f.read().rsplit(b")", 1)[1].split()[2:4]
    seen["cwd"] = os.readlink("/proc/%d/cwd" % pid)
    seen["stdio"] = [os.readlink("/proc/%d/fd/%d" % (pid, fd)).replace(d.log, "LOG") for fd in (0, 1, 2)]
    seen["exe"] = os.readlink("/proc/%d/exe" % pid)
    return seen


# --- listings and a full range --------------------------------------------------------------------

def test_listings_follow_every_change(daemon_factory, reap_pids):
    d = daemon_factory(settings=FAST_REAP)
    rpc = d.rpc()
    assert rpc.listPorts() == []
    a = rpc.newPort("a", 0)
    assert [e["port"] for e in rpc.listPorts()] == [a]
    owner = subprocess.Popen(["sleep", "60"])
    reap_pids.append(owner.pid)
    b = rpc.newPort("b", owner.pid)
    assert [e["port"] for e in rpc.listPorts()] == [a, b]
    rpc.delPort(a)
    assert [e["port"] for e in rpc.listPorts()] == [b]
    owner.kill()
    owner.wait()
    assert wait_until(lambda: rpc.listPorts() == [], timeout=5), "a reaped port stayed listed"


def test_failing_calls_sweep_the_range_once_per_interval(daemon_factory, sleeper):
    first, last = free_range(20, check=20)      # the test binds half of them
    d = daemon_factory(first=first, last=last)
    rpc = d.rpc()
    for _ in range(10):
        rpc.newPort("owned", sleeper.pid)
    foreign = []
    try:
        for port in range(d.first + 10, d.last + 1):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            foreign.append(s)
        faults = []
        for _ in range(2):
            multi = xmlrpc.client.MultiCall(rpc)
            for _ in range(150):
                multi.newPort("one too many", 0)
            faults += [f for f in _results(multi()) if isinstance(f, xmlrpc.client.Fault)]
        assert len(faults) == 300 and {f.faultCode for f in faults} == {2}
        assert faults[0].faultString == "no free port in %d-%d: 10 registered, 10 held by other programs" % (d.first, d.last)
        assert d.read_log().count("no port free: swept the owners") == 1
    finally:
        for s in foreign:
            s.close()


def _results(results):
    """A MultiCall's results, with each fault as a Fault in its place."""
    out = []
    for i in range(len(results.results)):
        try:
            out.append(results[i])
        except xmlrpc.client.Fault as fault:
            out.append(fault)
    return out


#: What a Python could lack, or do otherwise, of what the fork server relies on (support.ZYGOTE),
#: as code run in a fork server before it checks this Python; and what it then says.
LACKING = {
    "no threading._shutdown": ("import threading\ndel threading._shutdown", "threading._shutdown"),
    "threads not joined": ("import threading\nthreading._shutdown = lambda: None", "end otherwise"),
    "no atexit._run_exitfuncs": ("import atexit\ndel atexit._run_exitfuncs", "atexit._run_exitfuncs"),
    "atexit not run": ("import atexit\natexit._run_exitfuncs = lambda: None", "end otherwise"),
    "no sys._getframe": ("del sys._getframe", "sys._getframe"),
    "-c sources kept otherwise": ("import linecache\nlinecache.getlines = lambda *a, **k: ['not it\\n'] * 99",
                                  "traceback would quote"),
}


def test_a_fork_server_that_finds_this_python_lacking_is_not_used(monkeypatch):
    servers = {case: ForkServer(clean_env(), before_check=code) for case, (code, _) in LACKING.items()}
    try:
        for case, server in servers.items():
            why_not = server.unsupported()
            assert why_not and LACKING[case][1] in why_not, (case, why_not)
            assert server.proc.wait(10) == 0, case
    finally:
        for server in servers.values():
            server.close()

    class Lacking(ForkServer):
        def __init__(self, env):
            super().__init__(env, before_check=LACKING["threads not joined"][0])
    # with such a fork server, every program is exec'd (not only that one: a test would fail)
    monkeypatch.setattr(support, "ForkServer", Lacking)
    for key, value in {"env": clean_env(), "server": None, "off": None}.items():
        monkeypatch.setitem(support._fork_server, key, value)
    for _ in range(2):
        proc = popen_python(["-c", "print('exec')"], stdout=subprocess.PIPE, text=True)
        assert type(proc) is subprocess.Popen and proc.communicate()[0] == "exec\n"
    assert "end otherwise" in fork_server_off()
