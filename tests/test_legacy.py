"""The 1999 module's usage runs unchanged, and a client with no daemon starts exactly one;
nodemngr.py alone gives every legacy name, and ``nm`` costs nothing until it is used."""
import json
import os
import subprocess
import sys
import textwrap

from support import (NODEMNGR, ROOT, clean_env, free_port, free_range, pid_alive, popen_python, port_is_free,
                      run_python, stop_pid, wait_until)

import nodemngr

LEGACY_SCRIPT = textwrap.dedent("""
    import json, socket, sys
    sys.path.insert(0, %(root)r)
    port = %(port)d

    def listening():
        s = socket.socket()
        try:
            return s.connect_ex(("127.0.0.1", port)) == 0
        finally:
            s.close()

    import nodemngr, nodemngr_proxy
    from nodemngr import nm
    out = {"after_import": listening()}
    out["ping"] = nm.ping()
    out["daemon_pid"] = nm.status()["pid"]
    ports = [nm.newPort("capsule %%d" %% i) for i in range(3)]
    out["ports"] = ports
    out["del"] = nm.delPort(ports[1])
    out["again"] = nm.newPort("again")
    try:
        nm.delPort(ports[0] + 1000)
    except IndexError as exc:
        out["unknown"] = [str(exc), isinstance(exc, nodemngr.NodeMngrException)]
    out["stop"] = nm.stopserve()
    print(json.dumps(out))
""")


def autostart_env(tmp_path, port, first, last):
    return clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                     NODEMNGR_STATE=tmp_path / "state.sqlite3")


def test_legacy_usage_unchanged_with_autostart(tmp_path, reap_pids):
    port = free_port()
    first, last = free_range(20)
    env = autostart_env(tmp_path, port, first, last)
    script = LEGACY_SCRIPT % {"root": ROOT, "port": port}
    proc = run_python(["-c", script], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    reap_pids.append(out["daemon_pid"])
    assert out["after_import"] is False, "importing nodemngr must not start or reach a daemon"
    assert out["ping"] == "NodeMngr at %s is alive" % os.uname().nodename
    assert out["ports"] == [first, first + 1, first + 2]
    assert out["del"] == 0
    assert out["again"] == first + 1, "the freed port comes back first"
    assert out["unknown"] == ["Node manager: Unknown port: %d" % (first + 1000), True]
    assert out["stop"] is True
    assert wait_until(lambda: not pid_alive(out["daemon_pid"]), 10), "stopserve() must end the daemon"
    # the detached daemon logged beside its state file, not to the caller's stderr
    assert "serving on 127.0.0.1:%d" % port in (tmp_path / ("%d.log" % port)).read_text()
    assert "serving on" not in proc.stderr


def test_import_and_proxy_creation_open_no_socket(tmp_path):
    port = free_port()
    script = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, %r)
        import nodemngr, nodemngr_proxy
        from nodemngr import nm, NodeMngrProxy
        p = NodeMngrProxy()
        with p:
            pass
        def target(fd):
            try:
                return os.readlink("/proc/self/fd/" + fd)
            except OSError:     # the listing's own descriptor, gone already
                return ""
        print(sum(1 for fd in os.listdir("/proc/self/fd") if target(fd).startswith("socket:")))
    """ % ROOT)
    env = autostart_env(tmp_path, port, 0, 0)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    assert port_is_free(port)


RACER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, %(root)r)
    from nodemngr_proxy import NodeMngrProxy
    print("ready", flush=True)
    sys.stdin.readline()    # the test answers every racer at once, when all are ready
    nm = NodeMngrProxy()
    port = nm.newPort("racer", 0)
    print(json.dumps({"port": port, "daemon": nm.status()["pid"]}))
""")


def daemons_serving(port):
    """Pids of processes whose command line is a nodemngr daemon for *port* (for counting only)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if NODEMNGR.encode() in argv and str(port).encode() in argv and b"serve" in argv:
            found.append(int(entry))
    return found


def test_eight_racing_processes_end_with_one_daemon(tmp_path, reap_pids):
    port = free_port()
    first, last = free_range(20)
    env = autostart_env(tmp_path, port, first, last)
    script = RACER % {"root": ROOT}
    procs = [popen_python(["-c", script], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) for _ in range(8)]
    results = []
    try:
        for p in procs:
            assert p.stdout.readline() == "ready\n", p.communicate(timeout=60)[1]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                stop_pid(p.pid)
        for pid in daemons_serving(port):
            reap_pids.append(pid)
    daemons = {r["daemon"] for r in results}
    assert len(daemons) == 1, "every racer must be served by the same daemon"
    assert sorted(r["port"] for r in results) == list(range(first, first + 8))
    # the losers' daemons found the port bound and left; exactly one remains
    assert wait_until(lambda: daemons_serving(port) == list(daemons), 10), daemons_serving(port)
    # and there were no losers: the racers took turns at the spawn lock, and the first one's daemon
    # answered all the others (eight Pythons started for one daemon cost a busy machine 3 s of CPU)
    log = (tmp_path / ("%d.log" % port)).read_text()
    assert log.count("serving on 127.0.0.1:%d" % port) == 1 and "already serving" not in log, log


def test_nm_can_be_copied_without_being_used():
    import copy
    clone = copy.copy(nodemngr.nm)
    assert clone is not None and nodemngr.nm._proxy is None
