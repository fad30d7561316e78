"""Exposure: loopback by default, tokens, and administrative calls only from this host."""
import base64
import os
import random
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from support import ROOT, clean_env, free_port, nodemngr_argv, post, rpc_body, run_python

import nodemngr


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cret/with:odd@chars\n")
    path.chmod(0o600)
    return path


PING = rpc_body("ping")


def basic(password, user=b"nodemngr"):
    """An Authorization header for HTTP Basic auth."""
    return "Authorization: Basic " + base64.b64encode(user + b":" + password).decode()


def test_token_is_required_and_checked(daemon_factory, token_file):
    d = daemon_factory(extra_args=["--token-file", str(token_file)])
    reply = post(d, PING)
    assert reply.status == 401
    assert reply.headers["www-authenticate"].startswith('Basic realm="nodemngr"'), reply
    assert post(d, PING, headers=[basic(b"wrong")]).status == 401
    assert post(d, PING, headers=["Authorization: Basic !!!notbase64"]).status == 401
    assert post(d, PING, headers=[basic(b"s3cret/with:odd@chars")]).status == 200
    assert post(d, PING, headers=[basic(b"s3cret/with:odd@chars", user=b"anyone")]).status == 200


def test_proxy_and_cli_use_the_token_file(daemon_factory, token_file, run_cli):
    d = daemon_factory(extra_args=["--token-file", str(token_file)])
    with pytest.raises(nodemngr.NodeMngrException) as info:
        d.proxy().ping()
    assert "token" in str(info.value)
    nm = d.proxy(token_file=str(token_file))
    port = nm.newPort("with token")
    assert nm.listPorts()[0]["port"] == port
    env = dict(d.env, NODEMNGR_TOKEN_FILE=str(token_file))
    code, out, _ = run_cli("list", env=env)
    assert code == 0 and "with token" in out
    # the module's nm, in a Python of its own, takes the token file from the environment it inherits
    script = "import sys; sys.path.insert(0, %r); from nodemngr import nm; print(nm.ping())" % ROOT
    r = run_python(["-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("NodeMngr at "), r.stderr
    code, _, err = run_cli("list", env=d.env)
    assert code == 1 and "NODEMNGR_TOKEN_FILE" in err and "Traceback" not in err


def test_a_token_file_readable_by_others_is_refused(token_file):
    token_file.chmod(0o644)
    r = run_python(nodemngr_argv("serve", "--port", free_port(), "--state", "none", "--token-file", token_file),
                   env=clean_env(), capture_output=True, text=True, timeout=30, finalize=True)
    assert r.returncode == 1 and "readable by others" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_non_loopback_without_token_is_refused_at_start(host):
    r = run_python(nodemngr_argv("serve", "--host", host, "--port", free_port(), "--state", "none"),
                   env=clean_env(), capture_output=True, text=True, timeout=30, finalize=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "without a token" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("address,local", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("10.0.0.1", False), ("192.168.1.20", False), ("::ffff:10.1.2.3", False),
    ("fe80::1", False), ("2001:db8::1", False), ("0.0.0.0", False), ("not-a-host.invalid", False)])
def test_peer_check(address, local):
    assert nodemngr.is_loopback(address) is local


@pytest.fixture
def test_host(tmp_path):
    """A second host: a network namespace joined to this one by a veth pair (10.231.x/30)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("making a network namespace needs root and iproute2")
    name = "nmt" + uuid.uuid4().hex[:8]
    sub = 4 * random.randrange(60)     # (tests run at once under xdist each pick one)
    here, there = "10.231.7.%d" % (sub + 1), "10.231.7.%d" % (sub + 2)
    veth = "v" + name

    def ip(*args):
        return subprocess.run(["ip"] + list(args), capture_output=True, text=True)

    if ip("netns", "add", name).returncode != 0:
        pytest.skip("network namespaces are not available here")
    try:
        steps = [("link", "add", veth, "type", "veth", "peer", "name", veth + "p"),
                 ("link", "set", veth + "p", "netns", name),
                 ("addr", "add", here + "/30", "dev", veth), ("link", "set", veth, "up"),
                 ("netns", "exec", name, "ip", "addr", "add", there + "/30", "dev", veth + "p"),
                 ("netns", "exec", name, "ip", "link", "set", veth + "p", "up"),
                 ("netns", "exec", name, "ip", "link", "set", "lo", "up")]
        for step in steps:
            r = ip(*step)
            if r.returncode != 0:
                pytest.skip("could not set up the test host: ip %s: %s" % (" ".join(step), r.stderr.strip()))
        yield name, here, there
    finally:
        ip("link", "del", veth)
        ip("netns", "del", name)


def test_terminate_from_another_host_is_fault_4(daemon_factory, token_file, test_host):
    name, here, there = test_host
    d = daemon_factory(host=here, extra_args=["--token-file", str(token_file)])
    script = textwrap.dedent("""
        import sys, xmlrpc.client
        from urllib.parse import quote
        url = "http://nodemngr:%%s@%s:%d/RPC2" %% quote(%r, safe="")
        rpc = xmlrpc.client.ServerProxy(url)
        print(rpc.newPort("from the other host"))
        try:
            rpc.terminate()
        except xmlrpc.client.Fault as f:
            print(f.faultCode, f.faultString)
    """ % (here, d.port, "s3cret/with:odd@chars"))
    r = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    port_line, fault_line = r.stdout.splitlines()
    assert int(port_line) == d.first
    assert fault_line.startswith("4 ") and there in fault_line
    assert d.proc.poll() is None
    assert d.proxy(token_file=str(token_file)).status()["registered"] == 1


def test_terminate_from_any_address_of_this_host_is_local(daemon_factory, token_file, test_host):
    name, here, there = test_host
    d = daemon_factory(host=here, extra_args=["--token-file", str(token_file)])
    assert nodemngr.is_this_host(here) and not nodemngr.is_this_host(there)
    nm = d.proxy(token_file=str(token_file))
    assert nm.status()["registered"] == 0
    assert nm.terminate() is True       # from this host's address on the veth, not loopback
    assert d.proc.wait(10) == 0


def test_an_address_any_socket_can_bind_is_not_this_host():
    # With ip_nonlocal_bind (keepalived, HAProxy hosts) every address can be bound: a remote peer
    # must still not count as this host (terminate would be allowed to it).
    unshare = shutil.which("unshare")
    script = ("import sys; sys.path.insert(0, %r); import nodemngr; "
              "print(nodemngr.is_this_host('8.8.8.8'), nodemngr.is_this_host('192.0.2.7'), "
              "nodemngr.is_this_host('127.0.0.1'))" % ROOT)
    shell = ("ip link set lo up && echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind && exec %s -c %s"
             % (sys.executable, "'%s'" % script.replace("'", "'\\''")))
    if unshare is None or subprocess.run([unshare, "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -n (a network namespace of its own), which this machine refuses")
    out = subprocess.run([unshare, "-n", "sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]
