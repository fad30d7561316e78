"""Running as a service (README, "Run it as a service"): socket activation under systemd's own
systemd-socket-activate, readiness on a NOTIFY_SOCKET the test binds, the unit files checked by
systemd-analyze, and GET /metrics read by a real Prometheus parser.  (SIGHUP and a rotated log:
tests/test_stop.py.)"""
import base64
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client

import pytest

from support import FAST_REAP, ROOT, ServerProcess, clean_env, free_port, free_range, launcher, wait_until

import nodemngr

UNITS = [os.path.join(ROOT, "contrib", "systemd", name) for name in ("nodemngr.socket", "nodemngr.service")]


def tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip("%s (Debian's systemd package) is not installed; .ci/run installs it" % name)
    return path


def comm(pid):
    with open("/proc/%d/comm" % pid) as f:
        return f.read().strip()


@pytest.mark.parametrize("with_local", [False, True], ids=["inet", "inet+unix"])
def test_socket_activation_starts_the_daemon_on_the_first_connection(tmp_path, with_local):
    activate = tool("systemd-socket-activate")
    port, (first, last) = free_port(), free_range(20)
    local = "@nodemngr-test-%d-%d" % (port, random.randrange(1 << 30))
    argv = [activate, "-l", "127.0.0.1:%d" % port] + (["-l", local] if with_local else []) + [
        sys.executable, "-c", launcher(), "serve", "--first-port", str(first), "--last-port", str(last),
        "--state", str(tmp_path / "state.sqlite3"), "--unix", "none"]
    server = ServerProcess("systemd-socket-activate", argv, port, str(tmp_path / "activate.log"))
    server.start(wait=False)
    try:
        assert wait_until(lambda: "Listening on 127.0.0.1:%d" % port in server.read_log(), timeout=10), server.read_log()
        assert comm(server.proc.pid) == "systemd-socket-activate"[:15], "nothing started before a client came"
        rpc = server.rpc()
        assert rpc.ping().startswith("NodeMngr at "), "the first connection is served"
        status = rpc.status()
        assert status["pid"] == server.proc.pid and (status["host"], status["port"]) == ("127.0.0.1", port)
        assert "Execing" in server.read_log() and comm(server.proc.pid).startswith("python")
        given = [rpc.newPort("activated %d" % i) for i in range(3)]
        assert given == list(range(first, first + 3))
        rpc.delPort(given[1])
        assert [e["port"] for e in rpc.listPorts()] == [given[0], given[2]]
        if with_local:      # the passed Unix socket is the local socket, though --unix said none
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(nodemngr.local_sockaddr(local))
                s.sendall(b"%d\n" % os.getpid())
                assert int(s.recv(100)) == first + 1
        log = server.read_log()
        assert ("serving on 127.0.0.1:%d and %s" % (port, local if with_local else "no local socket")) in log, log
        assert rpc.terminate() is True
        assert server.proc.wait(15) == 0
    finally:
        server.stop()


def test_readiness_and_status_reach_notify_socket(daemon_factory):
    address = "@nodemngr-notify-%d" % random.randrange(1 << 30)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(nodemngr.local_sockaddr(address))
        listener.settimeout(5)
        d = daemon_factory(size=10, state="none", env={"NOTIFY_SOCKET": address}, start=False)
        d.start(wait=False)
        deadline = time.monotonic() + 10
        while not d.answers():      # the first answer, however early: READY=1 is queued before it
            assert time.monotonic() < deadline and d.proc.poll() is None, d.read_log()
        first = listener.recv(4096).decode().split("\n")
        assert first[0] == "READY=1", first
        assert first[1].startswith("STATUS=serving on 127.0.0.1:%d" % d.port) and first[1].endswith(" 0 registered")
        d.rpc().newPort("counted")
        assert listener.recv(4096).decode().endswith(" 1 registered"), "STATUS= follows the registry"
        assert d.rpc().terminate() is True
        last = listener.recv(4096).decode().split("\n")
        assert last[0] == "STOPPING=1", last
        assert d.proc.wait(15) == 0


def test_the_unit_files_pass_systemd_analyze_verify():
    verify = [tool("systemd-analyze"), "verify"] + UNITS
    out = subprocess.run(verify, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout    # (it warns with exit 0)
    service = open(UNITS[1]).read()
    for setting in ("Type=notify", "DynamicUser=yes", "StateDirectory=nodemngr", "NoNewPrivileges=yes",
                    "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "RestrictAddressFamilies=",
                    "SystemCallFilter=@system-service", "ProtectProc=default"):
        assert "\n" + setting in service, setting
    assert "PrivateNetwork" not in service.replace("no PrivateNetwork=", ""), "the host check needs the host's ports"


def metrics(d, token=None):
    request = urllib.request.Request("http://%s:%d/metrics" % (d.host, d.port))
    if token:
        request.add_header("Authorization", "Basic " + base64.b64encode(b"x:" + token).decode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return reply.read().decode("utf-8")


def parse(text):
    parser = pytest.importorskip("prometheus_client.parser", reason="prometheus_client is a test dependency "
                                 "(tox.ini installs it)")
    values = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_are_valid_prometheus_text_and_match_status(daemon_factory, sleeper):
    d = daemon_factory(size=10, state="none", settings=FAST_REAP)
    rpc = d.rpc()
    before = parse(metrics(d))      # (the readiness pings are counted too)
    kept = [rpc.newPort("kept"), rpc.newPort({"name": "db"})]
    rpc.delPort(rpc.newPort("gone"))
    rpc.newPort("owned", sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    for call in (lambda: rpc.delPort(1), lambda: rpc.delPort(2), lambda: rpc.lookup(7), lambda: rpc.nosuch()):
        with pytest.raises(xmlrpc.client.Fault):
            call()
    rpc.system.multicall([{"methodName": "ping", "params": []}, {"methodName": "delPort", "params": [3]}])
    assert wait_until(lambda: len(rpc.listPorts()) == 2, timeout=10)
    status = rpc.status()
    values = parse(metrics(d))
    assert values[("nodemngr_ports_registered", ())] == status["registered"] == len(kept)
    assert values[("nodemngr_ports_free", ())] == status["free"] == 8
    assert values[("nodemngr_ports_reaped_total", ())] == status["reaped"] == 1
    assert values[("nodemngr_names_remembered", ())] == 1

    def delta(name, label):
        return {dict(k[1])[label]: v - before.get(k, 0) for k, v in values.items() if k[0] == name}
    requests = delta("nodemngr_requests_total", "method")
    assert {m: n for m, n in requests.items() if m not in ("listPorts", "status")} == {
        "newPort": 4, "delPort": 4, "lookup": 1, "unknown": 1, "system.multicall": 1, "ping": 1}, requests
    assert delta("nodemngr_faults_total", "code") == {"1": 3, "3": 1, "-32601": 1}
    assert values[("nodemngr_uptime_seconds", ())] > 0


def test_metrics_need_the_token_when_there_is_one(daemon_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    token_file.chmod(0o600)
    d = daemon_factory(size=10, state="none", extra_args=["--token-file", str(token_file)])
    with pytest.raises(urllib.error.HTTPError) as exc:
        metrics(d)
    assert exc.value.code == 401
    assert ("nodemngr_ports_registered", ()) in parse(metrics(d, b"s3cret"))
    for method, path, code in (("GET", "/other", 405), ("POST", "/metrics", 404), ("POST", "/status.json", 404)):
        request = urllib.request.Request("http://%s:%d%s" % (d.host, d.port, path), method=method,
                                         data=b"x" if method == "POST" else None)
        request.add_header("Authorization", "Basic " + base64.b64encode(b"x:s3cret").decode())
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(request, timeout=10)
        assert exc.value.code == code, (method, path)


# --- what an adversarial run found (each failed before its fix) ------------------------------------

def serve_with_fds(tmp_path, socks, names=None, extra=()):
    """The daemon started as a service manager would: *socks* as fds 3.., LISTEN_PID its own pid."""
    first, last = free_range(10)
    env = clean_env(LISTEN_FDS=len(socks), **({"LISTEN_FDNAMES": names} if names else {}))

    def to_3():
        for i, s in enumerate(socks):
            os.dup2(s.fileno(), 3 + i)
    argv = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", sys.executable, "-c", launcher(), "serve", "--first-port",
            str(first), "--last-port", str(last), "--state", "none", "--unix", "none"] + list(extra)
    log = open(str(tmp_path / "fds.log"), "ab")
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=to_3, pass_fds=range(3, 3 + len(socks)))
    log.close()
    return proc


def test_activation_serves_every_inet_socket_and_refuses_a_misnamed_one(tmp_path, reap_pids):
    port = free_port()
    v4, v6, bound_only = socket.socket(), socket.socket(socket.AF_INET6), socket.socket()
    try:
        v4.bind(("127.0.0.1", port))
        v4.listen(5)
        v6.bind(("::1", port))
        v6.listen(5)
        bound_only.bind(("127.0.0.1", free_port()))
        proc = serve_with_fds(tmp_path, [v4, v6])
        reap_pids.append(proc.pid)
        for host in ("127.0.0.1", "[::1]"):
            rpc = xmlrpc.client.ServerProxy("http://%s:%d/RPC2" % (host, port))
            assert wait_until(lambda: _pings(rpc), timeout=10), "%s is not served" % host
        proc.terminate()
        assert proc.wait(15) == 0
        proc = serve_with_fds(tmp_path, [bound_only])
        reap_pids.append(proc.pid)
        rpc = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % bound_only.getsockname()[1])
        assert wait_until(lambda: _pings(rpc), timeout=10), "a bound socket that did not listen is made to"
        proc.terminate()
        proc.wait(15)
        proc = serve_with_fds(tmp_path, [v4], names="local")
        assert proc.wait(15) == 1
        log = (tmp_path / "fds.log").read_text()
        assert "the socket passed as fd 3 is named local but is an inet socket" in log and "Traceback" not in log
    finally:
        for s in (v4, v6, bound_only):
            s.close()


def _pings(rpc):
    try:
        return rpc.ping().startswith("NodeMngr at ")
    except OSError:
        return False


def test_metrics_count_every_listing_and_portserver_request_and_take_query_strings(daemon):
    rpc = daemon.rpc()
    for _ in range(5):
        rpc.listPorts()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(nodemngr.local_sockaddr("@nodemngr-%d" % daemon.port))
        s.sendall(b"%d\n" % os.getpid())
        assert daemon.first <= int(s.recv(100)) <= daemon.last
    request = urllib.request.Request("http://%s:%d/metrics?name=nodemngr" % (daemon.host, daemon.port))
    values = parse(urllib.request.urlopen(request, timeout=10).read().decode())
    assert values[("nodemngr_requests_total", (("method", "listPorts"),))] == 5
    assert values[("nodemngr_requests_total", (("method", "portserver"),))] == 1
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(urllib.request.Request(request.full_url, method="HEAD"), timeout=10)
    assert exc.value.code == 405 and exc.value.headers["Allow"] == "GET"


def test_a_log_that_cannot_be_reopened_stops_neither_reaping_nor_a_clean_exit(daemon_factory, tmp_path):
    folder = tmp_path / "logs"
    folder.mkdir()
    d = daemon_factory(size=10, state="none", settings=FAST_REAP, extra_args=["--log-file", str(folder / "n.log")])
    shutil.rmtree(str(folder))
    d.proc.send_signal(__import__("signal").SIGHUP)
    owners = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        for owner in owners:
            d.rpc().newPort("owned", owner.pid)
    finally:
        for owner in owners:
            owner.kill()
            owner.wait()
    assert wait_until(lambda: d.rpc().listPorts() == [], timeout=10), "the owner check stopped"
    assert d.terminate() == 0
