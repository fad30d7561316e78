"""Who may do what (CONTRACT, "1.3: depth"): every door knows the caller's uid; who may stop the
daemon, free a port, or name a pid as a port's owner; pids named from a pid namespace of their own
(a container's); the token on the local socket too.

Real users (nobody, 65534, by setpriv), real pid namespaces (unshare --pid --mount-proc), real
daemons; the tests run as root in CI, and the daemon runs as root unless a test says otherwise.
"""
import os
import socket
import subprocess
import xmlrpc.client

import pytest

from support import NOBODY, OTHER_PYTHON, Daemon, registered, wait_until

import nodemngr


def owners(d):
    return {e["port"]: (e["pid"], e["uid"]) for e in d.rpc().listPorts()}


def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(x) for x in f.read().split()]


# What a client of another user runs: one call, printed as its result or "fault CODE TEXT".
CALL = """
import os, sys, xmlrpc.client
import nodemngr
door, method = sys.argv[1], sys.argv[2]
params = [os.getpid() if p == "self" else int(p) if p.isdigit() else p for p in sys.argv[3:]]
try:
    if door == "tcp":
        print(getattr(xmlrpc.client.ServerProxy(os.environ["URL"]), method)(*params))
    else:
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect(nodemngr.local_sockaddr(os.environ["LOCAL"]))
        body = xmlrpc.client.dumps(tuple(params), method).encode()
        auth = os.environ.get("AUTH", "")
        s.sendall(b"POST /RPC2 HTTP/1.1\\r\\nContent-Length: %d\\r\\n%sConnection: close\\r\\n\\r\\n"
                  % (len(body), auth.encode()) + body)
        reply = s.makefile("rb").read()
        head, _, body = reply.partition(b"\\r\\n\\r\\n")
        if not head.startswith(b"HTTP/1.1 200"):
            print("http", head.split(b"\\r\\n")[0].decode())
        else:
            print(xmlrpc.client.loads(body)[0][0])
except xmlrpc.client.Fault as fault:
    print("fault", fault.faultCode, fault.faultString)
except xmlrpc.client.ProtocolError as exc:
    print("http", exc.errcode)
"""


def call_as(user, d, door, method, *params, token=None, namespace=False):
    env = {"URL": d.url, "LOCAL": "@nodemngr-%d" % d.port}
    if token:
        env["URL"] = "http://x:%s@%s:%d/RPC2" % (token, d.host, d.port)
        env["AUTH"] = "Authorization: Basic %s\r\n" % __import__("base64").b64encode(b"x:" + token.encode()).decode()
    out = user.run(CALL, door, method, *params, env=env, namespace=namespace)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def token_daemon(daemon_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret")
    token.chmod(0o600)
    return daemon_factory(size=10, state="none", extra_args=["--token-file", str(token)])


def nobody_daemon(nobody, **kw):
    """A Daemon (not started) that runs as nobody, from nobody's copy of the product."""
    return Daemon(nobody.folder, size=10, state="none", python=OTHER_PYTHON, exec_only=True,
                  script=os.path.join(nobody.folder, "nodemngr.py"),
                  preexec_fn=lambda: (os.setgid(NOBODY), os.setgroups([]), os.setuid(NOBODY)), **kw)


# -- who may stop it ----------------------------------------------------------------------------

def test_another_user_may_not_stop_the_daemon_on_either_door(daemon, nobody):
    for door in ("tcp", "local"):
        out = call_as(nobody, daemon, door, "terminate")
        assert out.startswith("fault 4 ") and "own user (uid %d), root, or a caller with its token" % os.getuid() in out
    cli = nobody.run("import nodemngr, sys; sys.exit(nodemngr.main(sys.argv[1:]))", "stop", "--port", daemon.port)
    assert cli.returncode == 1 and cli.stderr.count("\n") == 1 and "uid %d" % NOBODY in cli.stderr, cli.stderr
    assert daemon.rpc().ping() and daemon.proc.poll() is None, "still serving"
    assert daemon.rpc().terminate() is True and daemon.proc.wait(10) == 0, "its own user (root) may"


def test_the_daemons_own_user_or_a_token_holder_may_stop_it(daemon_factory, nobody, tmp_path):
    d = nobody_daemon(nobody)
    try:
        d.start()
        assert call_as(nobody, d, "local", "terminate") == "True", "its own user, on the local socket"
        assert d.proc.wait(10) == 0
    finally:
        d.stop()
    token = tmp_path / "token"
    token.write_text("s3cret")
    token.chmod(0o600)
    d = daemon_factory(size=10, state="none", extra_args=["--token-file", str(token)])
    assert call_as(nobody, d, "tcp", "terminate") == "http 401"
    assert call_as(nobody, d, "tcp", "terminate", token="s3cret") == "True"
    assert d.proc.wait(10) == 0


# -- who may free a port ------------------------------------------------------------------------

def test_a_port_is_freed_only_by_its_user_root_or_a_token_holder(token_daemon, nobody):
    d = token_daemon
    rpc = xmlrpc.client.ServerProxy("http://x:s3cret@%s:%d/RPC2" % (d.host, d.port))
    mine = nodemngr.request_socket("root's", address="@nodemngr-%d" % d.port)   # (the local socket: no token)
    mine[1].close()
    port = mine[0]
    theirs = int(call_as(nobody, d, "tcp", "newPort", "nobody's", token="s3cret"))
    assert owners_with(rpc) == {port: os.getuid(), theirs: NOBODY}, "listPorts says who registered each"
    out = call_as(nobody, d, "tcp", "delPort", port, token="s3cret")
    assert out == "0", "a token holder may free any"
    port = nodemngr.request_socket("root's again", address="@nodemngr-%d" % d.port)
    port[1].close()
    out = call_as(nobody, d, "local", "delPort", port[0], token="s3cret")
    assert out == "0"
    assert rpc.delPort(theirs) == 0, "root may free any"


def owners_with(rpc):
    return {e["port"]: e["uid"] for e in rpc.listPorts()}


def test_another_user_may_not_free_your_port_but_frees_its_own(daemon, nobody):
    port = daemon.rpc().newPort("root's")
    for door in ("tcp", "local"):
        out = call_as(nobody, daemon, door, "delPort", port)
        assert out.startswith("fault 4 ") and "registered by uid %d" % os.getuid() in out, out
    assert owners(daemon) == {port: (0, os.getuid())}, "still registered"
    theirs = int(call_as(nobody, daemon, "tcp", "newPort", "nobody's"))
    assert owners(daemon)[theirs] == (0, NOBODY)
    assert call_as(nobody, daemon, "local", "delPort", theirs) == "0", "its own, on any door"
    assert daemon.rpc().delPort(port) == 0


# -- whose pid may be named ---------------------------------------------------------------------

def test_a_user_may_name_only_its_own_processes(daemon, nobody, sleeper):
    for door in ("tcp", "local"):
        out = call_as(nobody, daemon, door, "newPort", "pinned to root's process", sleeper.pid)
        assert out.startswith("fault 3 ") and "not a process of yours (uid %d)" % NOBODY in out, out
    assert registered(daemon) == {}
    port = int(call_as(nobody, daemon, "tcp", "newPort", "its own", "self"))
    assert owners(daemon)[port][1] == NOBODY
    assert daemon.rpc().newPort("root may name any", sleeper.pid) in range(daemon.first, daemon.last + 1)


def test_a_kernel_thread_or_init_is_never_an_owner(daemon):
    rpc = daemon.rpc()
    for pid in (1, 2):      # init and kthreadd
        with pytest.raises(xmlrpc.client.Fault) as fault:
            rpc.newPort("forever", pid)
        assert fault.value.faultCode == 3 and "never ends" in fault.value.faultString
    with socket.socket(socket.AF_UNIX) as s:    # the portserver line too: closed without a reply
        s.settimeout(5)
        s.connect(nodemngr.local_sockaddr("@nodemngr-%d" % daemon.port))
        s.sendall(b"2\n")
        assert s.recv(100) == b""
    assert registered(daemon) == {}


# A process in a pid namespace of its own connects to the local socket, forks, and exits; its
# child then names a pid (argv[3]) on that connection, as a portserver line or as newPort.
FORK_AND_NAME = """
import os, socket, sys, xmlrpc.client
r, w = os.pipe()
if os.fork() == 0:
    s = socket.socket(socket.AF_UNIX)
    s.connect("\\0" + sys.argv[1][1:])
    connected = os.getpid()
    if os.fork():
        os._exit(0)                     # the process the kernel saw connect is gone
    while os.getppid() == connected:    # (until this one is reparented)
        pass
    if sys.argv[2] == "portserver":
        s.sendall(b"%s\\n" % sys.argv[3].encode())
        os.write(w, repr(s.recv(100)).encode())
    else:
        body = xmlrpc.client.dumps(("from a container", int(sys.argv[3])), "newPort").encode()
        s.sendall(b"POST /RPC2 HTTP/1.1\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body) + body)
        reply = s.makefile("rb").read()
        try:
            os.write(w, str(xmlrpc.client.loads(reply.partition(b"\\r\\n\\r\\n")[2])[0][0]).encode())
        except xmlrpc.client.Fault as fault:
            os.write(w, ("fault %d %s" % (fault.faultCode, fault.faultString)).encode())
    os._exit(0)
os.close(w)
os.wait()
print(os.fdopen(r).read())              # (until the grandchild is done)
"""


def test_a_container_cannot_register_a_port_to_a_host_process(daemon, nobody):
    host_pid = os.getpid()      # (the tests' own process: no pid of the namespace is this large)
    for door in ("portserver", "newPort"):
        out = nobody.run(FORK_AND_NAME, "@nodemngr-%d" % daemon.port, door, host_pid, namespace=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "b''" if door == "portserver" else out.stdout.startswith("fault 3 "), out.stdout
    assert registered(daemon) == {}, "nothing was registered to a host process"


TCP_FROM_CONTAINER = """
import os, sys, xmlrpc.client
try:
    print(xmlrpc.client.ServerProxy(sys.argv[1]).newPort("from a container over TCP", int(sys.argv[2])))
except xmlrpc.client.Fault as fault:
    print("fault", fault.faultCode, fault.faultString)
"""


def test_a_container_over_tcp_may_name_no_process_of_another_user(daemon, nobody, sleeper):
    out = nobody.run(TCP_FROM_CONTAINER, daemon.url, sleeper.pid, namespace=True)
    assert out.stdout.startswith("fault 3 ") and "not a process of yours" in out.stdout, (out.stdout, out.stderr)
    assert registered(daemon) == {}


# The namespace's own init (pid 1 there: a shell) named on the portserver line by a process of it.
NAME_INIT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("\\0" + sys.argv[1][1:])
s.sendall(b"1\\n")
print(s.recv(100).decode().strip(), flush=True)
sys.stdin.read()
"""


def test_a_containers_init_is_translated_like_any_of_its_pids(daemon, nobody):
    proc = nobody.popen(NAME_INIT, "@nodemngr-%d" % daemon.port, namespace=True, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        init = children(proc.pid)[0]        # (unshare's child: the namespace's pid 1, as the host sees it)
        assert owners(daemon)[port] == (init, NOBODY), "registered to the container's init, as the host sees it"
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert wait_until(lambda: registered(daemon) == {}, timeout=10), "freed when the container's init ended"


# -- the token on the local socket --------------------------------------------------------------

NEW_SOCKET = """
import sys
from nodemngr import NodeMngrProxy, NodeMngrException
try:
    sock = NodeMngrProxy(port=int(sys.argv[1]), autostart=False, token_file=sys.argv[2] or None).newSocket("s")
    print(sock.getsockname()[1])
except NodeMngrException as exc:
    print("error", exc)
"""


def test_a_token_holder_of_another_user_gets_a_socket_over_the_local_socket(token_daemon, nobody):
    d = token_daemon
    token = nobody.file("token", "s3cret")
    out = nobody.run(NEW_SOCKET, d.port, token)
    assert out.stdout.strip().isdigit(), (out.stdout, out.stderr)
    port = int(out.stdout)
    rpc = xmlrpc.client.ServerProxy("http://x:s3cret@%s:%d/RPC2" % (d.host, d.port))
    assert port in owners_with(rpc) and owners_with(rpc)[port] == NOBODY
    out = nobody.run(NEW_SOCKET, d.port, "")
    assert out.stdout.strip() == ("error the node manager on the local socket @nodemngr-%d wants a token: set "
                                  "NODEMNGR_TOKEN_FILE or --token-file" % d.port), out.stdout


RUN_SOCKET = """
import sys
import nodemngr
sys.exit(nodemngr.main(["run", "--socket", "--port", sys.argv[1], "--token-file", sys.argv[2], "--",
                        "/usr/bin/python3", "-c", "import socket; print(socket.socket(fileno=3).getsockname()[1])"]))
"""


def test_nodemngr_run_socket_takes_the_token_file(token_daemon, nobody):
    token = nobody.file("token", "s3cret")
    out = nobody.run(RUN_SOCKET, token_daemon.port, token, env={"NODEMNGR_AUTOSTART": "0"})
    assert out.returncode == 0 and out.stdout.strip().isdigit(), (out.stdout, out.stderr)


def test_with_a_token_a_daemon_of_another_user_is_trusted_only_if_it_serves_the_tcp_port_too(nobody, tmp_path):
    """A daemon running as nobody; a client of root holding the token.  Root's own check (a local
    socket of another uid is no node manager to trust) gives way only to the user that also
    serves the TCP port: a squatter of the local address alone is still refused."""
    token = nobody.file("token", "s3cret")
    d = nobody_daemon(nobody, extra_args=["--token-file", token])
    mine = tmp_path / "token"
    mine.write_text("s3cret")
    mine.chmod(0o600)
    try:
        d.start()
        sock = nodemngr.NodeMngrProxy(port=d.port, autostart=False, token_file=str(mine)).newSocket("trusted")
        sock.close()
        with pytest.raises(nodemngr.NodeMngrException) as exc:
            nodemngr.NodeMngrProxy(port=d.port, autostart=False).newSocket("no token")
        assert "served by uid %d, neither you nor root:" % NOBODY in str(exc.value)
        with pytest.raises(nodemngr.NodeMngrException) as exc:     # a squatter: nobody serves no TCP port there
            nodemngr.request_socket("x", address="@nodemngr-%d" % d.port, token=b"s3cret", server=("127.0.0.1", 1))
        assert "nor the user serving its TCP port" in str(exc.value)
    finally:
        d.stop()
