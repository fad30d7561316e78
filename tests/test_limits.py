"""Connection limits: idle keep-alive connections make room; busy ones get a 503 beyond 128."""
import select
import socket
import xmlrpc.client

import nodemngr
from support import wait_until

PING = xmlrpc.client.dumps((), "ping").encode()
REQUEST = b"POST /RPC2 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(PING), PING)


def served_once(daemon):
    s = socket.create_connection((daemon.host, daemon.port), timeout=10)
    s.sendall(REQUEST)
    reply = b""
    while not reply.endswith(b"</methodResponse>\n"):
        chunk = s.recv(65536)
        assert chunk, reply
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK")
    return s


def status_line(s):
    s.settimeout(10)
    try:
        return s.recv(65536).split(b"\r\n", 1)[0]
    except ConnectionResetError:
        return b"reset"


def test_idle_keepalive_connections_make_room_for_a_new_client(daemon):
    idle = [served_once(daemon) for _ in range(nodemngr.MAX_CONNECTIONS)]
    try:
        assert daemon.rpc().ping().startswith("NodeMngr at "), "a new client is served, not turned away"
        readable, _, _ = select.select(idle, [], [], 5)
        assert readable and all(status_line(s) in (b"", b"reset") for s in readable)
        assert readable[0] in idle[:3], "the longest-idle connection was the one closed"
    finally:
        for s in idle:
            s.close()


def test_beyond_128_busy_connections_new_ones_get_503(any_daemon):
    # The shared daemon is enough: an idle connection another test left would make room (closed),
    # a busy one would only bring the 503 sooner; and the test waits until it serves again.
    daemon = any_daemon
    busy = []
    try:
        for _ in range(nodemngr.MAX_CONNECTIONS):
            s = socket.create_connection((daemon.host, daemon.port), timeout=10)
            s.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: t\r\n")      # stalls mid-request
            busy.append(s)
        extra = socket.create_connection((daemon.host, daemon.port), timeout=10)
        assert status_line(extra) == b"HTTP/1.1 503 Service Unavailable"
        extra.close()
    finally:
        for s in busy:
            s.close()
    def served():
        try:
            return daemon.rpc().ping().startswith("NodeMngr at ")
        except xmlrpc.client.ProtocolError as exc:   # 503 until the daemon has seen them close
            assert exc.errcode == 503
            return False
    assert wait_until(served, 5), "once they close, calls are served"
