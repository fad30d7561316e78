"""The dispatcher, in-process and without a socket: one method table, rights, multicall, the
portserver line and the socket handover, every call and fault counted the same way whatever door
it came through.  The last tests check, on a real daemon, that those doors' counts reach /metrics.

The in-process service is a real NodeMngr (real host checks, a range of free ports, no state file).
"""
import os
import socket
import xmlrpc.client

import pytest

from support import counters, free_range, http_request, read_handovers, rpc_body, wait_until

import nodemngr
from nodemngr import Deferred, Dispatcher, Handover, NodeMngr


body = rpc_body


def answer(reply):
    """What an XML reply says (bytes, parts, or a Sliced the transport would make): its value, or the Fault."""
    if isinstance(reply, nodemngr.Sliced):
        reply = reply.finish()
    if isinstance(reply, list):
        reply = b"".join(reply)
    try:
        return xmlrpc.client.loads(reply, use_builtin_types=True)[0][0]
    except xmlrpc.client.Fault as fault:
        return fault


@pytest.fixture
def dispatcher():
    first, last = free_range(20)
    service = NodeMngr(first, last)
    yield Dispatcher(service)
    service.close()


@pytest.fixture
def local(dispatcher):
    """A caller on the local socket: this process, as SO_PEERCRED would say it."""
    return dispatcher.caller("local", uid=os.getuid(), pid=os.getpid())


@pytest.fixture
def tcp(dispatcher):
    return dispatcher.caller("tcp", address="127.0.0.1")


def test_every_wire_method_of_the_service_is_in_one_table(dispatcher, tcp):
    methods = answer(dispatcher.dispatch(tcp, body("system.listMethods")))
    assert methods == sorted(methods) and set(methods) == {
        "ping", "newPort", "newSocket", "delPort", "listPorts", "lookup", "status", "locate", "listCluster",
        "terminate", "namedPort", "newPorts", "delPorts", "newSockets", "system.listMethods", "system.methodHelp", "system.methodSignature",
        "system.multicall"}
    for method in methods:      # help for a reader in another language, and signatures
        assert answer(dispatcher.dispatch(tcp, body("system.methodHelp", method)))
        assert answer(dispatcher.dispatch(tcp, body("system.methodSignature", method)))[0][0] in (
            "int", "string", "array", "struct", "boolean")


def test_calls_are_answered_and_counted_and_faults_counted_by_code(dispatcher, tcp):
    port = answer(dispatcher.dispatch(tcp, body("newPort", "web")))
    assert dispatcher.service.allocator.first <= port
    assert [e["port"] for e in answer(dispatcher.dispatch(tcp, body("lookup", "web")))] == [port]
    assert answer(dispatcher.dispatch(tcp, body("delPort", port))) == 0
    for call, code in ((body("delPort", port), 1), (body("newPort", "x", 2 ** 31 - 1), 3),
                       (body("nosuch"), -32601), (body("ping", 1), -32602), (b"<not xml", -32700),
                       (b"<?xml version='1.0'?><methodCall></methodCall>", -32600)):
        assert answer(dispatcher.dispatch(tcp, call)).faultCode == code
    assert dispatcher.requests == {"newPort": 2, "lookup": 1, "delPort": 2, "unknown": 1, "ping": 1}
    assert dispatcher.faults == {1: 1, 3: 1, -32601: 1, -32602: 1, -32700: 1, -32600: 1}


def test_call_runs_in_this_thread_checked_and_counted(dispatcher, tcp):
    port = dispatcher.call(tcp, "newPort", ("in-process",))
    with pytest.raises(xmlrpc.client.Fault) as fault:
        dispatcher.call(tcp, "delPort", (port + 1000,))
    assert fault.value.faultCode == 1 and fault.value.faultString == "Node manager: Unknown port: %d" % (port + 1000)
    assert dispatcher.requests["newPort"] == dispatcher.requests["delPort"] == 1 and dispatcher.faults[1] == 1


def test_multicall_counts_each_call_and_keeps_socket_and_etcd_calls_out(dispatcher, local):
    calls = [{"methodName": "newPort", "params": ["a"]}, {"methodName": "delPort", "params": [1]},
             {"methodName": "newSocket", "params": ["s"]}, {"methodName": "locate", "params": ["x"]},
             {"methodName": "system.multicall", "params": [[]]}, {"methodName": "listPorts", "params": []},
             {"methodName": "listPorts", "params": []}, "not a struct"]
    results = answer(dispatcher.dispatch(local, body("system.multicall", calls)))
    assert isinstance(results[0][0], int)
    assert [r["faultCode"] for r in results[1:5]] == [1, 3, 3, -32600]
    assert "local socket can carry, one call per request" in results[2]["faultString"]
    assert "answers from the cluster view in a thread of its own" in results[3]["faultString"]
    assert len(results[5][0]) == 1 and results[6]["faultCode"] == 3 and results[7]["faultCode"] == -32600
    assert dispatcher.requests["newPort"] == 1 and dispatcher.requests["system.multicall"] == 1
    assert dispatcher.faults == {1: 1, 3: 3, -32600: 2}
    assert dispatcher.service.registered == 1, "nothing of newSocket was registered"


def test_listings_and_lookups_are_marshalled_once_per_change(dispatcher, tcp):
    first = dispatcher.dispatch(tcp, body("listPorts"))
    assert dispatcher.dispatch(tcp, body("listPorts")) is first
    named = dispatcher.dispatch(tcp, body("lookup", "db"))
    assert dispatcher.dispatch(tcp, body("lookup", "db")) is named
    dispatcher.dispatch(tcp, body("newPort", "db"))
    assert answer(dispatcher.dispatch(tcp, body("listPorts")))[0]["name"] == "db"
    assert len(answer(dispatcher.dispatch(tcp, body("lookup", "db")))) == 1
    assert dispatcher.requests["listPorts"] == 3 and dispatcher.requests["lookup"] == 3


def test_a_large_reply_is_refused_when_replies_wait_but_small_ones_are_served(dispatcher, tcp):
    with pytest.raises(nodemngr.Busy):
        dispatcher.dispatch(tcp, body("listPorts"), short_of_memory=True)
    assert answer(dispatcher.dispatch(tcp, body("ping"), short_of_memory=True)).startswith("NodeMngr at ")


def test_terminate_is_for_callers_on_this_host_of_its_own_user_root_or_the_token(dispatcher):
    stops = []
    dispatcher.service.on_terminate = stops.append
    dispatcher.token = b"s3cret"
    remote = dispatcher.caller("tcp", address="192.0.2.7", uid=-1)     # (TEST-NET-1: never this host's)
    assert answer(dispatcher.dispatch(remote._replace(token=True), body("terminate"))).faultCode == 4
    other = dispatcher.caller("tcp", address="127.0.0.1", uid=os.getuid() + 4242)
    fault = answer(dispatcher.dispatch(other, body("terminate")))
    assert fault.faultCode == 4 and "own user (uid %d), root, or a caller with its token" % os.getuid() in (
        fault.faultString)
    unknown = dispatcher.caller("tcp", address="127.0.0.1")
    assert answer(dispatcher.dispatch(unknown, body("terminate"))).faultCode == 4
    assert stops == []
    for allowed in (dispatcher.caller("tcp", address="127.0.0.1", uid=os.getuid()),
                    dispatcher.caller("local", uid=0, pid=1), other._replace(token=True)):
        assert answer(dispatcher.dispatch(allowed, body("terminate"))) is True
    assert len(stops) == 3 and dispatcher.faults == {4: 3}


def test_the_token_rule(dispatcher):
    dispatcher.token = b"s3cret"
    good = b"Basic " + __import__("base64").b64encode(b"anyone:s3cret")
    tcp = dispatcher.caller("tcp", address="127.0.0.1", uid=os.getuid())
    assert dispatcher.authorize(tcp, None) is None and dispatcher.authorize(tcp, b"Basic eDp5") is None
    assert dispatcher.authorize(tcp, good) == tcp._replace(token=True)
    ours = dispatcher.caller("local", uid=os.getuid(), pid=os.getpid())
    theirs = dispatcher.caller("local", uid=os.getuid() + 12345, pid=1)
    unknown = dispatcher.caller("local", uid=None, pid=None)
    assert ours.trusted and dispatcher.authorize(ours, None) is ours
    assert not theirs.trusted and not unknown.trusted and dispatcher.authorize(theirs, None) is None
    assert dispatcher.authorize(theirs, good).token and dispatcher.authorize(ours, good).token
    assert dispatcher.authorize(ours, b"Basic eDp5") is ours, "a wrong token takes nothing from a trusted caller"
    assert dispatcher.portserver(theirs, b"%d" % os.getpid()) is None, "the portserver line carries no token"
    assert dispatcher.faults == {4: 1}
    dispatcher.token = None
    assert dispatcher.authorize(tcp, good) is tcp, "no token set: nobody holds it"


def test_the_portserver_line_registers_to_its_pid_and_refusals_are_counted(dispatcher, local):
    port = dispatcher.portserver(local, b"%d" % os.getpid())
    [entry] = dispatcher.service.listPorts()
    assert (entry["port"], entry["pid"], entry["info"]) == (port, os.getpid(), "portserver")
    for line in (None, b"", b"1", b"0", b"12a", b"%d" % (2 ** 31 - 1), b"2"):
        assert dispatcher.portserver(local, line) is None, line
    assert dispatcher.requests["portserver"] == 8 and dispatcher.faults == {3: 7}


def test_new_socket_is_a_handover_on_the_local_socket_only(dispatcher, local, tcp):
    assert answer(dispatcher.dispatch(tcp, body("newSocket", "web"))).faultCode == 3
    handover = dispatcher.dispatch(local, body("newSocket", "web"))
    assert type(handover) is Handover and len(handover.sockets) == 1
    with handover.sockets[0] as sock:
        assert sock.getsockname()[1] == handover.ports[0] == answer(handover.reply)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert dispatcher.service.listPorts()[0]["pid"] == os.getpid(), "owned by the caller by default"
    reply = dispatcher.handover_failed(handover, BrokenPipeError(32, "Broken pipe"))
    assert answer(reply).faultCode == -32603 and "given back" in answer(reply).faultString
    assert dispatcher.service.registered == 0
    again = dispatcher.dispatch(local, body("newSocket", "web"))
    again.sockets[0].close()
    reply = answer(dispatcher.handover_failed(again, None))
    assert reply.faultCode == 3 and reply.faultString.startswith("one socket at a time on a connection")
    assert dispatcher.service.registered == 0
    assert dispatcher.requests["newSocket"] == 3 and dispatcher.faults == {3: 2, -32603: 1}


class EtcdDown:
    """A cluster view whose etcd cannot be reached and that has nothing mirrored: what a slow call
    meets then.  (The real one, with a real etcd, is tests/test_cluster.py's.)"""

    skipped = {}

    def locate(self, name=None):
        raise nodemngr.ClusterError("etcd cannot be reached")

    def status(self):
        return "etcd cannot be reached"


def test_a_slow_call_is_deferred_run_in_a_thread_and_finished_counted(dispatcher, tcp):
    assert answer(dispatcher.dispatch(tcp, body("locate", "db"))).faultCode == 5, "no cluster: fault 5 at once"
    dispatcher.faults.clear()
    dispatcher.service.cluster = EtcdDown()
    deferred = dispatcher.dispatch(tcp, body("locate", "db"))
    assert type(deferred) is Deferred and dispatcher.slow_calls == 1
    deferred.run()      # (the transport runs it in a thread)
    fault = answer(dispatcher.finish(deferred))
    assert fault.faultCode == 5 and "etcd cannot be reached" in fault.faultString
    assert dispatcher.slow_calls == 0 and dispatcher.faults == {5: 1}
    held = [dispatcher.dispatch(tcp, body("locate", "db")) for _ in range(dispatcher.max_slow_calls)]
    assert answer(dispatcher.dispatch(tcp, body("locate", "db"))).faultCode == 5, "beyond 8 waiting: at once"
    for deferred in held:
        deferred.run()
        dispatcher.finish(deferred)
    assert dispatcher.slow_calls == 0


def test_at_most_two_listings_of_the_cluster_are_made_at_once(dispatcher, tcp):
    """Each is megabytes, made in a thread before the server can count it as owed to a client."""
    dispatcher.service.cluster = EtcdDown()
    made = [dispatcher.dispatch(tcp, body("listCluster")) for _ in range(dispatcher.max_large_slow_calls)]
    assert all(type(deferred) is Deferred for deferred in made)
    with pytest.raises(nodemngr.Busy):
        dispatcher.dispatch(tcp, body("listCluster"))
    assert type(dispatcher.dispatch(tcp, body("locate", "db"))) is Deferred, "small ones still wait their turn"
    made[0].run()
    dispatcher.finish(made[0])
    with pytest.raises(nodemngr.Busy):     # (replies owed to clients that do not read are over the bound)
        dispatcher.dispatch(tcp, body("listCluster"), short_of_memory=True)
    assert type(dispatcher.dispatch(tcp, body("listCluster"))) is Deferred, "one done: the next may start"


def test_a_bug_is_one_sentence_for_the_caller_and_a_traceback_in_the_log(dispatcher, tcp, caplog):
    dispatcher.service.allocator.held = None    # a bug: listPorts now fails inside the service
    fault = answer(dispatcher.dispatch(tcp, body("listPorts")))
    assert fault.faultCode == -32603 and fault.faultString in (
        "internal error in listPorts (%s); the node manager's log has the details" % kind
        for kind in ("AttributeError", "TypeError"))
    assert "Traceback" in caplog.text and dispatcher.faults == {-32603: 1}


def test_metrics_text_has_every_counter_and_the_gauges_others_keep(dispatcher, tcp):
    dispatcher.add_gauge("nodemngr_connections", "Client connections open now.", lambda: 3)
    dispatcher.dispatch(tcp, body("newPort", "x"))
    dispatcher.portserver(tcp, None)
    text = dispatcher.metrics()
    for line in ('nodemngr_requests_total{method="newPort"} 1', 'nodemngr_requests_total{method="portserver"} 1',
                 'nodemngr_faults_total{code="3"} 1', "nodemngr_ports_registered 1", "nodemngr_connections 3"):
        assert line in text.splitlines(), line


# -- every door reaches the same counters, on a real daemon ---------------------------------------

def local_connection(daemon):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(nodemngr.local_sockaddr("@nodemngr-%d" % daemon.port))
    return s


def test_portserver_requests_and_handover_faults_reach_metrics_like_any_call(daemon):
    before = counters(daemon, "nodemngr_faults_total")
    with local_connection(daemon) as s:         # a portserver request served
        s.sendall(b"%d\n" % os.getpid())
        assert daemon.first <= int(s.recv(100)) <= daemon.last
    with local_connection(daemon) as s:         # and one refused: closed without a reply
        s.sendall(b"0\n")
        assert s.recv(100) == b""
    request = http_request(rpc_body("newSocket", "pipelined"))
    with local_connection(daemon) as s:         # two handovers pipelined: the second cannot go
        s.sendall(request * 2)                  # (both answered before this client reads any)
        assert wait_until(lambda: counters(daemon, "nodemngr_requests_total").get("newSocket") == 2)
        data, fds = read_handovers(s, 2)
    for fd in fds:
        os.close(fd)
    assert len(fds) == 1 and data.count(b"faultCode") == 1, data
    requests = counters(daemon, "nodemngr_requests_total")
    faults = counters(daemon, "nodemngr_faults_total")
    assert requests["portserver"] == 2 and requests["newSocket"] == 2
    assert faults.get("3", 0) - before.get("3", 0) == 2, "the refused portserver request, the second handover"
    assert wait_until(lambda: len(daemon.rpc().listPorts()) == 2), "the port of the failed handover was given back"


def test_the_changes_of_a_multicall_are_told_once_after_they_are_saved(dispatcher, tcp, tmp_path):
    service = NodeMngr(dispatcher.service.allocator.first, dispatcher.service.allocator.last,
                       store=nodemngr.StateStore(str(tmp_path / "state.sqlite3")))
    told = []
    service.on_change = lambda changes: told.append((list(changes), service.store._held))
    grouped = Dispatcher(service)
    try:
        kept = answer(grouped.dispatch(tcp, body("newPort", "kept")))
        del told[:]
        calls = [{"methodName": "newPort", "params": ["a"]}, {"methodName": "newPort", "params": ["b"]},
                 {"methodName": "delPort", "params": [kept]}, {"methodName": "delPort", "params": [1]}]
        results = answer(grouped.dispatch(tcp, body("system.multicall", calls)))
        assert [r if isinstance(r, dict) else r[0] for r in results][:3] == [kept + 1, kept + 2, 0]
        assert results[3]["faultCode"] == 1, "a call that fails is a fault of its own, the others are made"
        assert len(told) == 1, "the cluster view hears of a multicall once"
        changes, held = told[0]
        assert held is None, "told after the transaction, not during it"
        assert [(port, reg is not None) for port, reg in changes] == [(kept + 1, True), (kept + 2, True), (kept, False)]
    finally:
        service.close()


@pytest.fixture
def sliced(monkeypatch):
    """(first port, service, dispatcher, a TCP caller) in this process, with a range of 400 and
    listings made a slice of 100 entries at a time."""
    monkeypatch.setattr(nodemngr.Sliced, "budget", 0.0)
    first, last = free_range(400)
    service = NodeMngr(first, last, host_check=lambda port: True)
    dispatcher = Dispatcher(service)
    try:
        yield first, service, dispatcher, dispatcher.caller("tcp", address="127.0.0.1", uid=os.getuid())
    finally:
        service.close()


def test_a_listing_made_of_kept_entries_is_the_registry_byte_for_byte_through_changes(sliced):
    """listPorts and lookup join entries marshalled once each; whatever changed (a port freed,
    taken again with another info, a name's holders), the bytes are those dumps makes of the
    registry now, made in slices or at once."""
    first, service, dispatcher, tcp = sliced

    def expected(method, *params):
        return nodemngr.marshal_reply((dispatcher.call(tcp, method, params),), method)[0]

    def made(method, *params):
        reply = dispatcher.dispatch(tcp, body(method, *params))
        if isinstance(reply, nodemngr.Sliced):
            reply = reply.finish()
        return b"".join(reply) if isinstance(reply, list) else reply
    for i in range(350):
        service.newPort({"name": "crowd", "n": i} if i % 3 == 0 else "svc %d" % i)
    assert isinstance(dispatcher.dispatch(tcp, body("listPorts")), nodemngr.Sliced), "long: made in slices"
    assert made("listPorts") == expected("listPorts")
    assert made("lookup", "crowd") == expected("lookup", "crowd")
    for port in range(first, first + 350, 7):
        service.delPort(port)
    for i in range(30):
        service.newPort("again %d\r\n" % i if i % 2 else {"name": "crowd", "when": "now"})
    assert made("listPorts") == expected("listPorts")
    assert made("lookup", "crowd") == expected("lookup", "crowd")
    assert made("lookup", "nobody") == expected("lookup", "nobody")


def test_listings_of_two_states_made_at_once_share_the_entries_they_make(sliced):
    """Twelve listings of twelve states of the registry, made at once (120 clients asking between
    changes), each made all 25,000 entries again: twelve copies in memory (161 MiB).  An entry
    made by one is kept at once for the others; each listing is still its own state's."""
    first, service, dispatcher, tcp = sliced
    for i in range(300):
        service.newPort("svc %d" % i)
    older = dispatcher.dispatch(tcp, body("listPorts"))
    older.step()
    added = service.newPort("one more")
    newer = dispatcher.dispatch(tcp, body("listPorts"))
    assert isinstance(older, nodemngr.Sliced) and newer is not older
    while not (older.step() & newer.step()):
        pass
    old, new = older.finish(), newer.finish()
    assert len(new) == len(old) + 1 and ("<int>%d</int>" % added).encode() in b"".join(new)
    shared = sum(a is b for a, b in zip(old[1:-1], new[1:-1]))
    assert shared == len(old) - 2, "entries made twice: %d of %d shared" % (shared, len(old) - 2)


def test_listings_inside_a_multicall_are_made_in_slices_and_show_their_moment(sliced):
    """Promise: no caller waits behind a listing, whatever asks for it.  Broken: a listPorts (or
    lookups of a crowded name) inside system.multicall was marshalled whole, in one go: at 25,000
    registrations the loop stood still for half a second.  Now the multicall's reply is a Sliced of
    kept entries, each listing showing the registry as it was at its place among the calls."""
    first, service, dispatcher, tcp = sliced
    for i in range(300):
        service.newPort({"name": "crowd", "n": i} if i % 2 else "svc %d" % i)
    calls = [{"methodName": "lookup", "params": ["crowd"]}, {"methodName": "listPorts", "params": []}]
    reply = dispatcher.dispatch(tcp, body("system.multicall", calls))
    assert isinstance(reply, nodemngr.Sliced), "long listings in a multicall: made in slices"
    expected = [[dispatcher.call(tcp, "lookup", ("crowd",))], [dispatcher.call(tcp, "listPorts")]]
    assert b"".join(reply.finish()) == nodemngr.marshal_reply((expected,), "system.multicall")[0], "byte for byte"
    port = first + 300
    calls = [{"methodName": "newPort", "params": ["new"]}, {"methodName": "lookup", "params": ["new"]},
             {"methodName": "delPort", "params": [first]}, {"methodName": "listPorts", "params": []},
             {"methodName": "lookup", "params": [7]}]
    results = answer(dispatcher.dispatch(tcp, body("system.multicall", calls)))
    assert results[0] == [port] and [e["port"] for e in results[1][0]] == [port]
    assert [e["port"] for e in results[3][0]] == list(range(first + 1, first + 301)), "after the delPort"
    assert results[4]["faultCode"] == 3
    assert dispatcher.requests["lookup"] == 4 and dispatcher.requests["listPorts"] == 3, "each counted once"
