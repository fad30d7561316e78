"""The daemon over the wire: allocation, concurrency, host checks, faults, restart after kill -9."""
import datetime
import os
import socket
import threading
import xmlrpc.client

import pytest

from conftest import free_range


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


def test_ports_bound_by_others_are_skipped(daemon_factory):
    first, last = free_range(10)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", first))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", first + 2))
    try:
        d = daemon_factory(first=first, last=last)
        rpc = d.rpc()
        assert [rpc.newPort("x") for _ in range(3)] == [first + 1, first + 3, first + 4]
        assert [e["port"] for e in rpc.listPorts()] == [first + 1, first + 3, first + 4]
    finally:
        tcp.close()
        udp.close()


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
    with socket.create_connection((daemon.host, daemon.port)) as s:
        body = b"<methodCall><methodName>ping</methodName>"
        s.sendall(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = s.recv(65536)
    assert b"<name>faultCode</name>\n<value><int>-32700</int>" in reply
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
    assert rpc.listPorts() == [{"port": port, "name": "", "info": "", "pid": 0, "since": rpc.listPorts()[0]["since"]}]
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
