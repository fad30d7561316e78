"""Connection limits: idle keep-alive connections make room; beyond max_connections (128) busy
ones, newcomers are answered 503."""
import select
import socket
import xmlrpc.client

import pytest

import nodemngr
from support import (RawConnection, clean_env, daemon_settings, fill_registry, http_request, memory_kib, rpc_body,
                     run_python, slow_readers, wait_until)

PING_REQUEST = http_request(rpc_body("ping"))


def served_once(daemon):
    """A connection to *daemon* that was served one call, and is now idle (kept alive)."""
    c = RawConnection(daemon)
    c.send(PING_REQUEST)
    assert c.reply().status == 200
    return c


def test_idle_keepalive_connections_make_room_for_a_new_client(daemon):
    idle = [served_once(daemon) for _ in range(nodemngr.MAX_CONNECTIONS)]
    try:
        assert daemon.rpc().ping().startswith("NodeMngr at "), "a new client is served, not turned away"
        readable, _, _ = select.select([c.sock for c in idle], [], [], 5)
        assert readable and all(c.at_eof(10) for c in idle if c.sock in readable), "closed, with nothing sent"
        assert readable[0] in [c.sock for c in idle[:3]], "the longest-idle connection was the one closed"
    finally:
        for c in idle:
            c.close()


def test_beyond_128_busy_connections_new_ones_get_503(any_daemon):
    # The shared daemon is enough: an idle connection another test left would make room (closed),
    # a busy one would only bring the 503 sooner; and the test waits until it serves again.
    daemon = any_daemon
    busy = []
    try:
        for _ in range(nodemngr.MAX_CONNECTIONS):
            busy.append(RawConnection(daemon))
            busy[-1].send(b"POST /RPC2 HTTP/1.1\r\nHost: t\r\n")      # stalls mid-request
        with RawConnection(daemon) as extra:
            reply = extra.reply()
        assert (reply.status, reply.reason) == (503, "Service Unavailable"), reply
    finally:
        for c in busy:
            c.close()
    def served():
        try:
            return daemon.rpc().ping().startswith("NodeMngr at ")
        except xmlrpc.client.ProtocolError as exc:   # 503 until the daemon has seen them close
            assert exc.errcode == 503
            return False
    assert wait_until(served, 5), "once they close, calls are served"


def test_newcomers_turned_away_read_a_503(daemon_factory):
    d = daemon_factory(settings=daemon_settings(max_connections=8))
    held = []
    try:
        for _ in range(8):
            held.append(RawConnection(d))
            held[-1].send(http_request(b"<?xml", length=100))
        for _ in range(20):
            with pytest.raises(xmlrpc.client.ProtocolError) as info:
                d.rpc().ping()
            assert info.value.errcode == 503
    finally:
        for s in held:
            s.close()


def test_a_portserver_client_is_served_while_the_house_is_full_of_idlers(daemon_factory):
    """Every connection taken by clients that sent nothing, or stopped mid-request: the one idle or
    stalled the longest gives way, so a real portpicker client gets a port nodemngr registered
    (an HTTP 503 is not its protocol: it would fall back, silently, to a port nobody registered)."""
    portpicker = pytest.importorskip("portpicker", reason="portpicker is a test dependency (tox.ini installs it)")
    assert portpicker
    d = daemon_factory(size=10, state="none", settings=daemon_settings(max_connections=8, busy_window=0))
    address = nodemngr.local_sockaddr("@nodemngr-%d" % d.port)
    held = []
    try:
        for n in range(8):
            s = socket.socket(socket.AF_UNIX)
            s.connect(address)
            if n % 2:
                s.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\n")      # stalls mid-request
            held.append(s)
        out = run_python(["-c", "import portpicker; print(portpicker.pick_unused_port())"], capture_output=True,
                         text=True, timeout=30, env=clean_env(PORTSERVER_ADDRESS="@nodemngr-%d" % d.port))
        assert out.returncode == 0, out.stderr
        port = int(out.stdout)
        assert [e["info"] for e in d.rpc().listPorts() if e["port"] == port] == ["portserver"], (
            "the port came from nodemngr, not from portpicker's own fallback")
    finally:
        for s in held:
            s.close()


def test_clients_that_never_read_a_listing_do_not_deny_it_to_the_others(daemon_factory):
    """Promise: one slow or hostile client never stops the others from being served.  Broken: each
    listPorts reply waiting for a client that never reads counted its whole size (4 MB here)
    against the daemon's 32 MiB bound for replies owed, although every one of them is the same
    listing, its pieces shared: nine such clients, and every other caller's listPorts got HTTP 503
    until they were cut 10 s later (and asked again).  Now a waiting listing holds a reference
    to the pieces it shares, and counts that."""
    d = daemon_factory(size=1000)
    fill_registry(d, 1000)          # one listPorts reply is about 4 MB
    base = memory_kib(d.proc.pid)
    clients = slow_readers(d, 40, http_request(rpc_body("listPorts")))
    try:
        assert wait_until(lambda: all(_unread_reply(s) for s in clients), timeout=10), "each has its reply waiting"
        listing = d.rpc().listPorts()
        grown = memory_kib(d.proc.pid) - base
    finally:
        for s in clients:
            s.close()
    assert len(listing) == 1000, "a reader is served its listing"
    assert grown < 40 * 1024, "40 unread listings grew the daemon by %d KiB" % grown


def _unread_reply(sock):
    """Whether the head of a reply has reached *sock* (not read)."""
    r, _, _ = select.select([sock], [], [], 0)
    return bool(r) and sock.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 ")


def test_a_client_taking_a_long_listing_steadily_is_not_cut_as_stalled(daemon_factory):
    """Promise: a client that stalls is cut off; one that takes its reply is served.  Broken: the
    stall limit ran from a request's first byte to its reply's last, whether the client was
    taking the reply or not: at 25,000 registrations with 4 KiB infos a listing is 150 MB, which
    a Python client parses in more than the 10 s limit, so every listPorts there was cut
    mid-reply.  Now a client's deadline moves on whenever it takes some of its reply."""
    d = daemon_factory(size=600, settings=daemon_settings(stall_timeout=0.5))
    fill_registry(d, 500)           # one listPorts reply is about 4 MB, more than the kernel buffers
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect((d.host, d.port))
    with RawConnection(sock, read_size=16384, read_pause=0.01) as c:   # 2 to 3 s: slowly, steadily
        c.send(http_request(rpc_body("listPorts")))
        assert len(c.reply().result()) == 500


def test_a_listing_sent_whole_is_not_kept_for_its_size():
    """Cursors over one shared listing size it once; once a cursor has sent it all, nothing keeps
    the listing for that: a listCluster of 50,000 entries (40 MB) stayed in the daemon's memory
    until the next listing."""
    pieces = [b"a" * 10, b"b" * 20, b"c" * 5]
    cursor, other = nodemngr._Cursor(pieces), nodemngr._Cursor(pieces)
    assert len(cursor) == len(other) == 35
    assert cursor.take(30) == b"a" * 10 + b"b" * 20 and nodemngr._Cursor._sized[0] is pieces
    assert cursor.take(30) == b"c" * 5 and cursor.done
    assert nodemngr._Cursor._sized[0] is not pieces, "a listing sent whole is still kept"
    assert other.take(100) == b"a" * 10 + b"b" * 20 + b"c" * 5 and len(other) == 0


def test_hosts_and_names_etcd_brings_are_not_kept_once_their_entries_go():
    """The mirror must not sys.intern what etcd brings: from Python 3.12 on (up to 3.13) an
    interned string is immortal, so every host and name any writer of the prefix ever put (a name
    may be 64 KiB) stayed in the daemon's memory for good.  Entries made and dropped here must
    leave nothing behind, and what the mirror keeps is not the interpreter's interned text."""
    import base64
    import collections
    import json
    import sys
    import tracemalloc

    def value(host, name):
        return base64.b64encode(json.dumps({"host": host, "port": 7, "name": name, "info": "x", "pid": 0,
                                            "since": "2026-01-01T00:00:00Z"}).encode())

    def enter(host, name):
        pieces, named, keys, skipped = {}, {}, {}, collections.Counter()
        nodemngr.ClusterView._enter(b"nodemngr/v1/ports/%s/7" % host.encode(), value(host, name), 1,
                                    pieces, named, keys, skipped)
        return keys

    where = enter("host-%d" % id(enter), "name-%d" % id(enter))[b"nodemngr/v1/ports/host-%d/7" % id(enter)]
    assert sys.intern("host-%d" % id(enter)) is not where[0] and sys.intern("name-%d" % id(enter)) is not where[2]
    tracemalloc.start()
    try:
        enter("h0", "n0")
        before = tracemalloc.get_traced_memory()[0]
        for i in range(1000):
            enter("h-%d-%s" % (i, "y" * 1000), "n-%d-%s" % (i, "z" * 4000))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 512 * 1024, "1,000 entries made and dropped left %d KiB behind" % (grown // 1024)
