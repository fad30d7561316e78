"""Blocks of ports (CONTRACT, "Blocks (1.3)"): newPorts registers count ports at once, all or none,
consecutive when asked; delPorts frees several, all or none; newSockets hands over a block of bound
sockets; an explicit name remembers its block.

The allocator's walk and the names' memory are checked in this process (pure logic, and a
NodeMngr on a real state file); the rest on real daemons, real client processes, real sockets.
"""
import json
import os
import socket
import sqlite3
import subprocess
import textwrap
import time
import xmlrpc.client

import pytest

from support import (FAST_REAP, ROOT, free_range, http_request, popen_python, post, read_handovers, registered,
                     rpc_body, wait_until)

import nodemngr
from nodemngr import NodeMngr, PortAllocator, StateStore


def fault_of(call, *args):
    with pytest.raises(xmlrpc.client.Fault) as fault:
        call(*args)
    return fault.value.faultCode, fault.value.faultString


def blocks_table(path):
    """{name: [ports]} as the state file of a stopped daemon keeps the names' blocks."""
    db = sqlite3.connect(path)
    try:
        found = {}
        for name, port in db.execute("SELECT name, port FROM blocks ORDER BY name, port"):
            found.setdefault(name, []).append(port)
        return found
    finally:
        db.close()


# --- the allocator, in this process ------------------------------------------------------------

def test_a_consecutive_block_is_the_lowest_free_run_and_a_busy_port_breaks_runs():
    busy = {103}
    a = PortAllocator(100, 111)
    usable = lambda port: port not in busy     # noqa: E731
    assert a.take_block(usable, 3, consecutive=True) == [100, 101, 102]
    assert a.take_block(usable, 3, consecutive=True) == [104, 105, 106], "103 is held by another program"
    assert 103 in a._busy_ports and 103 not in a._is_free
    assert a.take_block(usable, 2) == [107, 108], "not consecutive: the lowest free ones"
    before = set(a._is_free)
    assert a.take_block(usable, 4, consecutive=True) is None, "109-111 are three"
    assert a._is_free == before, "a refused block takes nothing"
    assert a.longest_free_run() == (3, 109, 3)
    assert a.take_block(usable, 3) == [109, 110, 111]


def test_a_port_held_in_every_run_cannot_make_one_block_call_probe_the_whole_range():
    # A user with a few hundred sockets, one every 64 ports, breaks every run of 64: one call
    # probed each free port (a bind each, about half a second of the daemon's only thread for
    # 30,000).  Now each call probes at most 1024, those found busy stay set aside, and a
    # caller asking again goes further until it finds the run past them.
    first, last = 10000, 29999
    busy = set(range(first + 63, last - 1000, 64))
    probes = []

    def check(port):
        probes.append(port)
        return port not in busy
    m = NodeMngr(first, last, StateStore(None), host_check=check)
    for calls in range(1, 40):
        del probes[:]
        try:
            ports = m.newPorts("wide", 64, 0, True)
            break
        except nodemngr.NoFreePortError as exc:
            assert str(exc).startswith("no block of 64 consecutive ports found in 10000-29999 within 1024 probes: "
                                       "other programs hold a port in each run tried ("), exc
            assert len(probes) <= 1024 and m.registered == 0
    assert ports == list(range(max(busy) + 1, max(busy) + 65)) and len(probes) <= 1024, calls
    assert m.newPort("one") == first, "single ports are not held up"


def test_ports_back_from_the_set_aside_ones_are_probed_first_in_a_run():
    # They come back when due without a probe; still busy, each would cost a run's worth of
    # binds before it refused the run again.
    now = [0.0]
    a = PortAllocator(100, 131, clock=lambda: now[0])
    a.busy_probe_burst = a._probes = 1000
    busy = {107, 115, 123}
    probes = []

    def usable(port):
        probes.append(port)
        return port not in busy
    assert a.take_block(usable, 8, True) == [124, 125, 126, 127, 128, 129, 130, 131]
    for port in range(124, 132):
        a.untake(port)
    now[0] += 2 * a.busy_retry      # due again, still busy
    del probes[:]
    assert a.take_block(usable, 8, True) == [124, 125, 126, 127, 128, 129, 130, 131]
    assert probes == [107, 115, 123] + list(range(124, 132)), "one probe for each busy run"


def test_refused_blocks_in_a_fragmented_range_cost_one_walk_not_one_each():
    # Every other port of 50,000 registered: each refused consecutive block walked the range
    # (twice) and sorted its free ports, 20-60 ms, and a multicall of 200 held the daemon for
    # seconds.  Until a port is freed, the free ports only shrink: a refusal is remembered.
    first, last = 10000, 59999
    m = NodeMngr(first, last, StateStore(None), host_check=lambda port: True)
    m.allocator = PortAllocator(first, last, [nodemngr.Registration(p, "x", 0, 0, 0.0, "", 0)
                                              for p in range(first, last + 1, 2)])
    dispatcher = nodemngr.Dispatcher(m)
    caller = dispatcher.caller("local", uid=os.getuid(), pid=os.getpid())
    calls = [{"methodName": "newPorts", "params": ["pair", 2, 0, True]}] * 200
    t0 = time.monotonic()
    results = xmlrpc.client.loads(dispatcher.dispatch(caller, rpc_body("system.multicall", calls)))[0][0]
    elapsed = time.monotonic() - t0
    assert [r["faultCode"] for r in results] == [2] * 200 and "the longest run of free ports is 1" in \
        results[-1]["faultString"]
    assert elapsed < 1.5, "%.2f s" % elapsed
    m.delPort(first + 2)
    assert m.newPorts("pair", 2, 0, True) == [first + 1, first + 2], "a port freed: looked for again"


def test_a_refused_block_of_one_says_port_not_ports():
    m = NodeMngr(100, 100, StateStore(None), host_check=lambda port: True)
    m.newPort("the only one", 0)
    with pytest.raises(nodemngr.NoFreePortError, match="^no block of 1 port free in 100-100: the longest run "
                       "of free ports is 0, and 0 are free in all; 1 registered, 0 held by other programs$"):
        m.newPorts("one more", 1, 0)


def test_a_consecutive_block_avoids_remembered_ports_while_it_can():
    a = PortAllocator(100, 109, remembered={"db": 102})
    usable = lambda port: True      # noqa: E731
    assert a.take_block(usable, 3, consecutive=True) == [103, 104, 105], "100-102 holds db's port"
    assert a.take_block(usable, 4, consecutive=True) == [106, 107, 108, 109]
    assert a.take_block(usable, 3, consecutive=True) == [100, 101, 102], "nothing else is free: db's port goes"


def _hold(a, ports, info):
    regs = [nodemngr.Registration(p, info, 0, 0, 0.0, "") for p in ports]
    a.hold_block(regs, a.block_memory_change(ports, info))


def test_a_name_remembers_its_block_and_forgets_it_when_a_port_goes_to_another():
    a = PortAllocator(100, 107)
    usable = lambda port: True      # noqa: E731
    ring = a.take_block(usable, 3, True, "ring")
    _hold(a, ring, {"name": "ring"})
    assert a.blocks == {"ring": (100, 101, 102)}
    for port in ring:
        a.release(port)
    assert a.take(usable) == 103, "single registrations skip a remembered block"
    assert a.take_block(usable, 2, True) == [104, 105], "and so do blocks"
    assert a.take_block(usable, 3, True, "ring") == [100, 101, 102], "the name gets its block back"
    for port in (100, 101, 102):
        a.untake(port)
    a.take_block(usable, 2, True)   # 106-107: now only ring's ports are free
    port = a.take(usable)
    assert port == 100
    a.hold(nodemngr.Registration(port, "other", 0, 0, 0.0, ""), a.memory_change(port, "other"))
    assert a.blocks == {} and not a._block_of, "a port of it went to another: the whole block is forgotten"
    assert a.take(usable) == 101, "its other ports are plain free ports again"


def test_a_name_keeps_its_block_while_it_holds_it_and_moves_when_it_does_not():
    a = PortAllocator(100, 111)
    usable = lambda port: True      # noqa: E731
    first = a.take_block(usable, 2, True, "pool")
    _hold(a, first, {"name": "pool"})
    second = a.take_block(usable, 2, True, "pool")
    _hold(a, second, {"name": "pool"})
    assert (first, second) == ([100, 101], [102, 103]) and a.blocks == {"pool": (100, 101)}, "the first holder's"
    bigger = a.take_block(usable, 3, True, "pool")
    assert bigger == [104, 105, 106]
    for port in first + second:
        a.release(port)
    _hold(a, bigger, {"name": "pool"})
    assert a.blocks == {"pool": (104, 105, 106)}, "not held any more under its name: the name moves"


def test_a_block_is_one_transaction_told_once_and_a_failed_save_takes_nothing(tmp_path):
    store = StateStore(str(tmp_path / "state.sqlite3"))
    told = []
    m = NodeMngr(100, 119, store, host_check=lambda port: True)
    m.on_change = told.append
    ports = m.newPorts({"name": "ring", "role": "replica"}, 3, 0, True)
    assert ports == [100, 101, 102] and [[p for p, _ in changes] for changes in told] == [ports]
    assert m.delPorts(ports) == 0 and told[-1] == [(p, None) for p in ports], "freed together, told once"

    saved = store._write

    def failing(statements):
        raise nodemngr.StoreError("could not save the state (a test)")
    store._write = failing
    free, memory = m.allocator.free_count, dict(m.allocator.blocks)
    with pytest.raises(nodemngr.StoreError):
        m.newPorts({"name": "other"}, 5, 0, True)
    assert (m.registered, m.allocator.free_count, m.allocator.blocks) == (0, free, memory), "nothing taken"
    store._write = saved
    assert m.newPorts({"name": "ring"}, 3, 0, True) == ports
    m.close()

    m = NodeMngr(100, 119, StateStore(str(tmp_path / "state.sqlite3")), host_check=lambda port: True)
    assert sorted(r.port for r in m.registrations()) == ports and m.allocator.blocks == {"ring": tuple(ports)}
    m.close()


def test_a_restart_keeps_the_names_memory_as_it_was_when_a_name_holds_ports_beside_its_block(tmp_path):
    # At the start, a name that held ports and remembered none got its lowest as its port (for
    # 1.0's files): a name remembering a block has a memory, and its extra port is not its port.
    path = str(tmp_path / "state.sqlite3")
    m = NodeMngr(100, 119, StateStore(path), host_check=lambda port: True)
    assert m.newPorts({"name": "a"}, 3, 0, True) == [100, 101, 102]
    assert m.newPorts({"name": "a"}, 1) == [103], "asked while its block is held: the name keeps that block"
    before = (m.remembered(), dict(m.allocator.blocks))
    m.close()
    m = NodeMngr(100, 119, StateStore(path), host_check=lambda port: True)
    assert (m.remembered(), m.allocator.blocks) == before == ({}, {"a": (100, 101, 102)})
    m.delPorts([103])
    assert m.newPort("plain") == 103, "103 is nobody's port"
    m.close()


def test_a_schema_3_file_without_the_blocks_table_gets_one_and_keeps_its_registrations(tmp_path):
    path = str(tmp_path / "state.sqlite3")
    m = NodeMngr(100, 119, StateStore(path), host_check=lambda port: True)
    held = [m.newPort({"name": "db"}), m.newPorts("block", 2)]
    m.close()
    db = sqlite3.connect(path)      # what 1.3's development wrote before blocks
    db.execute("DROP TABLE blocks")
    db.commit()
    db.close()
    m = NodeMngr(100, 119, StateStore(path), host_check=lambda port: True)
    assert [r.port for r in m.registrations(ordered=True)] == [held[0]] + held[1]
    assert m.remembered() == {"db": held[0]} and m.allocator.blocks == {}
    m.newPorts({"name": "ring"}, 2, 0, True)
    m.close()
    assert list(blocks_table(path)) == ["ring"]
    db = sqlite3.connect(path)      # rows edited by hand: a port twice, a block a name's port is in
    db.execute("DROP TABLE blocks")
    db.execute("CREATE TABLE blocks(name TEXT NOT NULL, port INTEGER NOT NULL)")
    db.executemany("INSERT INTO blocks VALUES (?, ?)", [("a", 110), ("a", 111), ("b", 111), ("c", held[0]),
                                                         ("c", 115), ("d", 116), ("d", 117)])
    db.commit()
    db.close()
    m = NodeMngr(100, 119, StateStore(path), host_check=lambda port: True)
    assert m.allocator.blocks == {"d": (116, 117)}
    m.close()


def test_a_handover_that_cannot_go_gives_back_its_own_ports_not_ones_registered_again_since():
    # A handover's reply waits for the turn's group commit while other connections are served:
    # meanwhile its caller may free a port of it (delPorts on another connection) and somebody
    # else register that port.  Its failure must not free that other registration.
    first, last = free_range(6)
    service = NodeMngr(first, last)
    dispatcher = nodemngr.Dispatcher(service)
    try:
        local = dispatcher.caller("local", uid=os.getuid(), pid=os.getpid())
        handover = dispatcher.dispatch(local, rpc_body("newSockets", "pair", 2, True))
        for sock in handover.sockets:
            sock.close()
        service.delPorts([handover.ports[0]])
        assert service.newPort("theirs") == handover.ports[0]
        dispatcher.handover_failed(handover, None)
        assert [(r.port, r.info) for r in service.registrations()] == [(handover.ports[0], "theirs")]
    finally:
        service.close()


# --- on real daemons ---------------------------------------------------------------------------

RACER = textwrap.dedent("""
    import json, sys, xmlrpc.client
    rpc = xmlrpc.client.ServerProxy(sys.argv[1])
    rpc.ping()                          # connected: ready
    print("ready", flush=True)
    sys.stdin.readline()                # every racer goes at once
    answers = []
    for _ in range(int(sys.argv[3])):
        try:
            answers.append(rpc.newPorts("racer", int(sys.argv[2]), 0, True))
        except xmlrpc.client.Fault as fault:
            answers.append([fault.faultCode, fault.faultString])
    print(json.dumps(answers))
""")


def test_racing_clients_get_whole_disjoint_consecutive_blocks_or_fault_2(daemon_factory):
    first, last = free_range(40, check=40)
    d = daemon_factory(first=first, last=last, state="none")
    racers = [popen_python(["-c", RACER, d.url, "6", "2"], env=d.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True) for _ in range(6)]
    try:
        for proc in racers:
            assert proc.stdout.readline() == "ready\n"
        for proc in racers:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        answers = [a for proc in racers for a in json.loads(proc.communicate(timeout=30)[0])]
    finally:
        for proc in racers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    blocks = [a for a in answers if type(a[1]) is int]
    refused = [a for a in answers if type(a[1]) is str]
    assert len(blocks) == 6 and len(refused) == 6, answers
    for block in blocks:
        assert block == list(range(block[0], block[0] + 6)), "whole and consecutive"
    held = sorted(p for block in blocks for p in block)
    assert held == list(range(first, first + 36)), "disjoint, the lowest runs"
    assert sorted(registered(d)) == held, "no partial registration left by a refused block"
    for code, text in refused:
        assert code == 2 and "no block of 6 consecutive ports free in %d-%d" % (first, last) in text
        assert "the longest run of free ports is 4 (%d-%d)" % (last - 3, last) in text, text


def test_a_port_held_by_another_program_is_skipped_by_consecutive_blocks(daemon_factory):
    first, last = free_range(10, check=10)
    d = daemon_factory(first=first, last=last, state="none")
    rpc = d.rpc()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", first + 3))
    squatter.listen(1)
    try:
        assert rpc.newPorts("a", 4, 0, True) == list(range(first + 4, first + 8)), "the run under it is broken"
        assert rpc.newPorts("b", 3, 0, True) == [first, first + 1, first + 2]
        code, text = fault_of(rpc.newPorts, "c", 3, 0, True)
        assert code == 2 and "the longest run of free ports is 2 (%d-%d), and 2 are free in all" % (
            first + 8, first + 9) in text and "1 held by other programs" in text, text
        assert rpc.newPorts("d", 2) == [first + 8, first + 9]
        assert first + 3 not in registered(d)
    finally:
        squatter.close()
    rpc.delPorts([first, first + 1, first + 2])
    assert rpc.newPorts("e", 4, 0, True) == list(range(first, first + 4)), "let go: probed again before a refusal"


OWNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, %r)
    from nodemngr import NodeMngrProxy
    print(NodeMngrProxy(autostart=False).newPorts("mine", 4, consecutive=True), flush=True)
    sys.stdin.read()
""" % ROOT)


def test_kill_9_of_the_owner_frees_the_whole_block_within_the_reap_interval(daemon_factory):
    d = daemon_factory(size=10, state="none", settings=FAST_REAP)
    proc = popen_python(["-c", OWNER], env=d.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ports = json.loads(proc.stdout.readline())
        assert ports == list(range(d.first, d.first + 4))
        assert {p: e["pid"] for p, e in registered(d).items()} == dict.fromkeys(ports, proc.pid)
        proc.kill()
        t0 = time.monotonic()
        assert wait_until(lambda: not registered(d), timeout=5), "the block outlived its owner"
        print("freed after %.2f s" % (time.monotonic() - t0))
    finally:
        proc.kill()
        proc.wait(10)
    assert d.rpc().status()["reaped"] == 4


def test_a_block_acknowledged_survives_a_kill_9_and_the_name_keeps_it(daemon_factory):
    d = daemon_factory(size=16)
    rpc = d.rpc()
    rpc.newPort("below")
    ports = rpc.newPorts({"name": "crash", "n": 1}, 5, 0, True)
    d.kill()    # right after the acknowledgement
    d.start()
    rpc = d.rpc()
    assert [(p, e["name"], e["info"]) for p, e in sorted(registered(d).items())] == [(d.first, "below", "below")] + [
        (p, "crash", {"name": "crash", "n": 1}) for p in ports]
    assert rpc.delPorts(ports) == 0
    assert rpc.newPorts("plain", 2) == [ports[-1] + 1, ports[-1] + 2], "the remembered block is skipped"
    assert rpc.newPorts({"name": "crash"}, 5, 0, True) == ports, "after delPorts"
    assert rpc.delPorts(ports) == 0
    d.kill()
    d.start()
    assert d.rpc().newPorts({"name": "crash"}, 5, 0, True) == ports, "after a restart"
    assert d.terminate() == 0
    assert blocks_table(d.state) == {"crash": ports}


def test_delports_is_all_or_nothing(daemon_factory, nobody):
    d = daemon_factory(size=10, state="none")
    rpc = d.rpc()
    ports = rpc.newPorts("three", 3)
    assert fault_of(rpc.delPorts, [ports[0], ports[1], d.last]) == (1, "Node manager: Unknown port: %d" % d.last)
    assert fault_of(rpc.delPorts, [ports[0], 0]) == (3, "port must be an integer from 1 to 65535, not 0")
    assert fault_of(rpc.delPorts, ports[0])[0] == 3
    assert sorted(registered(d)) == ports, "nothing freed"
    theirs = json.loads(nobody.run(textwrap.dedent("""
        import json, sys, xmlrpc.client
        rpc = xmlrpc.client.ServerProxy(sys.argv[1])
        mine = rpc.newPorts("nobody's", 2)
        try:
            rpc.delPorts(mine + [int(sys.argv[2])])
        except xmlrpc.client.Fault as fault:
            print(json.dumps([mine, fault.faultCode, fault.faultString]))
    """), d.url, ports[0]).stdout)
    mine, code, text = theirs
    assert code == 4 and "port %d was registered by uid %d" % (ports[0], os.getuid()) in text
    assert sorted(registered(d)) == sorted(ports + mine), "not even nobody's own were freed"
    assert rpc.delPorts(ports + [ports[0]] + mine) == 0, "root may free any; a port twice is freed once"
    assert registered(d) == {} and rpc.delPorts([]) == 0


def test_bad_and_hostile_blocks_are_refused_in_one_sentence(daemon_factory, nobody, sleeper):
    d = daemon_factory(size=10, state="none")
    rpc = d.rpc()
    for count in (0, 65, -1, 2 ** 31 - 1, "3", 3.0, True, [3]):
        code, text = fault_of(rpc.newPorts, "x", count)
        assert code == 3 and text.startswith("count must be an integer from 1 to 64, not "), text
    code, text = fault_of(rpc.newPorts, "x", 2, 0, "yes")
    assert code == 3 and "consecutive must be a boolean" in text
    assert rpc.newPorts("int for a boolean", 2, 0, 1) == [d.first, d.first + 1]
    huge = post(d, rpc_body("newPorts", "x", 1).replace(b"<int>1</int>", b"<i8>1099511627776</i8>"))
    assert huge.result().faultCode == 3 and "not 1099511627776" in huge.result().faultString
    code, text = fault_of(rpc.newPorts, "x", 20)
    assert code == 2 and "no block of 20 ports free" in text, "more than the range holds"
    code, text = fault_of(rpc.newPorts, "x", 2, 2 ** 31 - 1)
    assert code == 3 and "not a live process" in text
    out = nobody.run("import sys, xmlrpc.client\n"
                     "try:\n"
                     "    xmlrpc.client.ServerProxy(sys.argv[1]).newPorts('pinned to root', 3, int(sys.argv[2]))\n"
                     "except xmlrpc.client.Fault as fault:\n"
                     "    print(fault.faultCode, fault.faultString)\n", d.url, sleeper.pid)
    assert out.stdout.startswith("3 pid %d is not a process of yours" % sleeper.pid), out
    code, text = fault_of(rpc.newSockets, "x", 2)
    assert code == 3 and "only the node manager's local socket can carry" in text
    multi = xmlrpc.client.MultiCall(rpc)
    multi.newSockets("x", 2)
    multi.newPorts("in a multicall", 2)
    results = multi().results
    assert results[0]["faultCode"] == 3 and results[1] == [[d.first + 2, d.first + 3]]
    assert sorted(registered(d)) == list(range(d.first, d.first + 4)), "only the good ones"


def _few_descriptors():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


def test_a_daemon_out_of_descriptors_says_so_rather_than_blame_the_callers_arguments(daemon_factory):
    d = daemon_factory(size=70, state="none", preexec_fn=_few_descriptors)
    nm = d.proxy()
    with pytest.raises(nodemngr.NodeMngrException) as refused:
        nm.newSockets("many", 64)
    assert not isinstance(refused.value, nodemngr.BadArgumentError), "fault 3 would say: do not try again"
    assert refused.value.faultCode == -32603 and "the node manager cannot open 64 tcp sockets now (Too many " \
        "open files); nothing was registered, try again later or ask for fewer" in str(refused.value)
    assert registered(d) == {}
    socks = nm.newSockets("few", 2)
    for sock in socks:
        sock.close()
    assert sorted(registered(d)) == [d.first, d.first + 1]


def test_new_sockets_hands_over_a_block_at_once_one_in_flight_per_connection(daemon_factory):
    d = daemon_factory(size=12, state="none")
    nm = d.proxy()
    socks = nm.newSockets("trio", 3, consecutive=True)
    udp = nm.newSockets("pair", 2, kind="udp", host="::1")
    try:
        ports = [s.getsockname()[1] for s in socks]
        assert ports == [d.first, d.first + 1, d.first + 2]
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in socks)
        assert [s.type for s in udp] == [socket.SOCK_DGRAM] * 2 and udp[0].family == socket.AF_INET6
        assert {p: e["pid"] for p, e in registered(d).items()} == dict.fromkeys(range(d.first, d.first + 5), os.getpid())
    finally:
        for s in socks + udp:
            s.close()
    nm.delPorts(range(d.first, d.first + 5))
    request = http_request(rpc_body("newSockets", "piped", 2, False, "tcp", "127.0.0.1", 0))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(nodemngr.local_sockaddr("@nodemngr-%d" % d.port))
        s.sendall(request * 3)      # pipelined, no reply read yet
        time.sleep(0.3)
        data, fds = read_handovers(s, 3)
    for fd in fds:
        os.close(fd)
    replies = data.split(b"HTTP/1.1 200 OK")[1:]
    passed = [r for r in replies if b"faultCode" not in r]
    assert len(replies) == 3 and len(fds) == 2 * len(passed) >= 2, "each block's two sockets in one handover"
    assert all(b"one socket at a time on a connection" in r and b"were given back" in r and b"<int>3</int>" in r
               for r in replies if r not in passed)
    assert len(registered(d)) == len(fds), "the refused blocks were given back"
