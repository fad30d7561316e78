"""Names (README, "Names"): lookup, and sticky ports for explicit names, on real daemons.

A registration's name is its info when that is a string, or the string ``name`` member of a struct
info.  Explicit names (the struct kind) get their last port back whenever it is free: across
delPort, the owner's death, a restart and a kill -9; other registrations take such a port only
when nothing else is free.
"""
import os
import re
import sqlite3
import subprocess
import sys
import xmlrpc.client

import pytest

from support import FAST_REAP, NODEMNGR, ROOT, daemon_settings, run_python, wait_until

OLD_RELEASE = os.path.join(ROOT, "tests", "data", "nodemngr-1.0.0.py")   # 482246a's, unchanged


def ports(entries):
    return [e["port"] for e in entries]


def names_table(path):
    """{name: port} as the state file of a stopped daemon keeps them."""
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, port FROM names"))
    finally:
        db.close()


def test_lookup_finds_string_and_struct_names(daemon_factory, run_cli):
    d = daemon_factory(size=10, state="none")
    rpc = d.rpc()
    web1 = rpc.newPort("web")
    unnamed = rpc.newPort({"info": "no name here"})
    web2 = rpc.newPort({"name": "web", "tls": True})
    number = rpc.newPort(7)
    db = rpc.newPort({"name": "db"})
    found = rpc.lookup("web")
    assert ports(found) == [web1, web2]
    assert [(e["name"], e["info"], e["pid"]) for e in found] == [("web", "web", 0), ("web", {"name": "web", "tls": True}, 0)]
    assert ports(rpc.lookup("db")) == [db]
    assert rpc.lookup("nobody") == [] and rpc.lookup("") == []
    listed = {e["port"]: e["name"] for e in rpc.listPorts()}
    assert listed == {web1: "web", unnamed: "", web2: "web", number: "", db: "db"}
    for bad in (7, ["web"], {"name": "web"}):
        with pytest.raises(xmlrpc.client.Fault) as fault:
            rpc.lookup(bad)
        assert fault.value.faultCode == 3 and "name must be a string" in fault.value.faultString
    with pytest.raises(xmlrpc.client.Fault) as fault:
        rpc.lookup()
    assert fault.value.faultCode == -32602
    help_text = rpc.system.methodHelp("lookup")
    assert "name" in help_text and "listPorts" in help_text and "Fault 3" in help_text
    assert ["array", "string"] in rpc.system.methodSignature("lookup")

    # the proxy and the command line
    assert ports(d.proxy().lookup("web")) == [web1, web2]
    code, out, err = run_cli("lookup", "web", env=d.env)
    lines = out.splitlines()
    assert code == 0 and err == "" and len(lines) == 2, (code, out, err)
    assert lines[0].split()[:2] == [str(web1), "0"] and re.fullmatch(r"\d+[smhd]", lines[0].split()[2])
    assert lines[0].split()[3] == "web"
    assert lines[1].split()[0] == str(web2) and "tls" in lines[1]
    code, out, err = run_cli("lookup", "nobody", env=d.env)
    assert (code, out) == (1, "") and err.count("\n") == 1 and "no port is registered under the name 'nobody'" in err
    rpc.delPort(db)
    code, out, err = run_cli("new", "postgres on the test box", "--name", "db", env=d.env)
    assert code == 0 and int(out) == db, "the explicit name got its port back"
    assert rpc.lookup("db")[0]["info"] == {"name": "db", "info": "postgres on the test box"}


def test_string_infos_keep_the_legacy_lowest_free_rule(daemon_factory):
    d = daemon_factory(size=8, state="none")
    rpc = d.rpc()
    first = d.first
    given = [rpc.newPort("legacy %d" % i) for i in range(5)]
    assert given == list(range(first, first + 5))
    rpc.delPort(first + 3)
    rpc.delPort(first + 1)
    assert [rpc.newPort("again"), rpc.newPort("again")] == [first + 1, first + 3], "freed ports, lowest first"
    assert ports(rpc.lookup("again")) == [first + 1, first + 3]


def test_a_sticky_port_comes_back_after_delport_reaping_restart_and_kill_9(daemon_factory, tmp_path, sleeper):
    d = daemon_factory(size=20, settings=FAST_REAP)
    rpc = d.rpc()
    fillers = [rpc.newPort("filler %d" % i) for i in range(3)]
    db = rpc.newPort({"name": "db", "v": 1})
    assert db == d.first + 3
    for port in fillers:
        rpc.delPort(port)
    rpc.delPort(db)
    assert rpc.newPort("plain") == d.first, "lowest-free for a string info"

    # delPort
    assert rpc.newPort({"name": "db", "v": 2}) == db, "not the lowest free port: its own"
    # the owner died and was reaped
    rpc.delPort(db)
    assert rpc.newPort({"name": "db"}, sleeper.pid) == db
    sleeper.kill()
    sleeper.wait()
    assert wait_until(lambda: rpc.lookup("db") == [], timeout=10), "the dead owner's port was not reaped"
    assert rpc.newPort("after the reaping") == d.first + 1, "another registration leaves the remembered port alone"
    assert rpc.newPort({"name": "db"}) == db
    # a clean restart
    rpc.delPort(db)
    assert d.terminate() == 0
    assert names_table(d.state) == {"db": db}
    d.start()
    rpc = d.rpc()
    assert rpc.newPort({"name": "db"}) == db, "not the lower free port %d" % (d.first + 2)
    assert rpc.newPort("after the restart") == d.first + 2
    # kill -9 while the name holds it, then while it is free
    d.kill()
    d.start()
    rpc = d.rpc()
    assert ports(rpc.lookup("db")) == [db]
    rpc.delPort(db)
    rpc.delPort(d.first)
    d.kill()
    d.start()
    rpc = d.rpc()
    assert rpc.newPort({"name": "db"}) == db


def test_remembered_ports_go_to_others_only_when_nothing_else_is_free(daemon_factory):
    d = daemon_factory(size=4)
    rpc = d.rpc()
    p0, p1, p2, p3 = range(d.first, d.first + 4)
    assert rpc.newPort({"name": "a"}) == p0 and rpc.newPort({"name": "b"}) == p1
    rpc.delPort(p0)
    rpc.delPort(p1)
    assert [rpc.newPort("x"), rpc.newPort({"name": "c"})] == [p2, p3], "a's and b's ports are skipped"
    assert rpc.newPort("y") == p0, "the range is otherwise full: a's port goes, and a forgets it"
    assert rpc.newPort({"name": "a"}) == p1, "a takes b's, and b forgets it"
    with pytest.raises(xmlrpc.client.Fault) as fault:
        rpc.newPort({"name": "b"})
    assert fault.value.faultCode == 2
    rpc.delPort(p2)
    assert rpc.newPort({"name": "b"}) == p2
    for port in (p0, p1, p2, p3):
        rpc.delPort(port)
    assert [rpc.newPort("z"), rpc.newPort({"name": "c"})] == [p0, p3]
    assert d.terminate() == 0
    assert names_table(d.state) == {"a": p1, "b": p2, "c": p3}, "one port per name; forgotten names are gone"


def test_several_holders_of_one_name_keep_the_first_ones_port(daemon_factory):
    d = daemon_factory(size=6, state="none")
    rpc = d.rpc()
    first = rpc.newPort({"name": "worker"})
    second = rpc.newPort({"name": "worker"})
    assert second == first + 1 and ports(rpc.lookup("worker")) == [first, second]
    rpc.delPort(first)
    rpc.delPort(second)
    assert rpc.newPort("plain") == first + 1, "the second holder's port is not remembered"
    assert rpc.newPort({"name": "worker"}) == first


def test_a_1_0_state_file_is_migrated_in_place(daemon_factory, tmp_path):
    state = tmp_path / "old.sqlite3"
    old = daemon_factory(size=10, state=state, script=OLD_RELEASE, name="nodemngr-1.0.0")
    assert old.rpc().status()["version"] == "1.0.0"
    rpc = old.rpc()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        legacy = rpc.newPort("legacy")
        db = rpc.newPort({"name": "db", "path": "/srv/db"})
        owned = rpc.newPort({"name": "owned"}, owner.pid)
        rpc.delPort(rpc.newPort("gap"))
        since = {e["port"]: e["since"] for e in rpc.listPorts()}
        old.kill()      # kill -9: what 1.0.0 left in its file and WAL is what we migrate
        new = daemon_factory(first=old.first, last=old.last, state=state, settings=FAST_REAP)
        rpc = new.rpc()
        listed = rpc.listPorts()
        assert [(e["port"], e["name"], e["info"], e["since"]) for e in listed] == [
            (legacy, "legacy", "legacy", since[legacy]), (db, "db", {"name": "db", "path": "/srv/db"}, since[db]),
            (owned, "owned", {"name": "owned"}, since[owned])]
        assert [e["pid"] for e in listed] == [0, 0, owner.pid]
        assert "migrated from the schema of nodemngr 1.0" in new.read_log()
        rpc.delPort(db)
        assert rpc.newPort("plain") == db + 2, "db's port is remembered from the migrated registration"
        assert rpc.newPort({"name": "db"}) == db
    finally:
        owner.kill()
        owner.wait()
    assert wait_until(lambda: rpc.lookup("owned") == [], timeout=15), "the 1.0 owner is still reaped"
    assert new.terminate() == 0
    assert not [p for p in os.listdir(str(tmp_path)) if ".bad-" in p], "nothing was moved aside"
    db_file = sqlite3.connect(str(state))
    try:
        assert db_file.execute("PRAGMA user_version").fetchone()[0] == 3
    finally:
        db_file.close()
    assert names_table(str(state)) == {"db": db, "owned": owned}
    new.start()
    assert new.rpc().newPort({"name": "owned"}) == owned, "the migrated file serves again as it is"


def test_lookups_in_one_multicall_list_one_registry_at_most(any_daemon):
    rpc = any_daemon.rpc()
    crowd = [rpc.newPort("crowd") for _ in range(3)]
    solo = rpc.newPort("solo")
    calls = [("lookup", ["crowd"]), ("lookup", ["solo"]), ("lookup", ["nobody"]),
             ("lookup", ["crowd"]),     # a second time: 7 entries, with 4 registered
             ("ping", [])]
    results = rpc.system.multicall([{"methodName": m, "params": p} for m, p in calls])
    assert [ports(r[0]) for r in results[:3]] == [crowd, [solo], []], "distinct names always fit"
    assert results[3]["faultCode"] == 3 and "4 entries at most" in results[3]["faultString"], results[3]
    assert results[4][0].startswith("NodeMngr at "), "the calls after it still run"


# --- what an adversarial run found (each failed before its fix) ------------------------------------

def test_a_1_0_file_that_cannot_be_migrated_now_is_left_as_it_is(daemon_factory, tmp_path):
    import resource
    state = tmp_path / "old.sqlite3"
    old = daemon_factory(size=10, state=state, script=OLD_RELEASE, name="nodemngr-1.0.0")
    held = [old.rpc().newPort("legacy %d" % i) for i in range(3)]
    assert old.terminate() == 0
    size = os.path.getsize(str(state))

    def small_files():      # a full disk: no file may grow past its size now
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    full = daemon_factory(first=old.first, last=old.last, state=state, preexec_fn=small_files, start=False)
    full.start(wait=False)
    assert full.proc.wait(15) == 1
    assert "cannot migrate the state file" in full.read_log() and "left as it is" in full.read_log()
    assert not [p for p in os.listdir(str(tmp_path)) if ".bad-" in p], "a good file was moved aside"
    new = daemon_factory(first=old.first, last=old.last, state=state)
    assert ports(new.rpc().listPorts()) == held, "the registrations of 1.0 survived"


def test_crowded_names_in_a_multicall_are_refused_before_they_are_built(any_daemon):
    rpc = any_daemon.rpc()
    crowd = [rpc.newPort("crowd") for _ in range(5)]
    solo, db = rpc.newPort("solo"), rpc.newPort("db")
    calls = [("listPorts", []), ("lookup", ["crowd"]), ("lookup", ["crowd"]), ("lookup", ["nothing"]),
             ("lookup", ["solo"]), ("lookup", ["db"])]
    results = rpc.system.multicall([{"methodName": m, "params": p} for m, p in calls])
    assert len(results[0][0]) == 7 and ports(results[1][0]) == crowd, "listPorts has a budget of its own"
    assert results[2]["faultCode"] == 3 and "7 entries at most" in results[2]["faultString"]
    assert [ports(r[0]) for r in results[3:]] == [[], [solo], [db]], "what fits still fits after a refusal"
    assert ports(rpc.lookup("crowd")) == crowd and ports(rpc.lookup("crowd")) == crowd, "a cached reply is the same"
    rpc.delPort(crowd[0])
    assert ports(rpc.lookup("crowd")) == crowd[1:], "the cache follows every change"


def test_a_names_table_edited_by_hand_is_checked_at_start(daemon_factory, tmp_path):
    state = str(tmp_path / "edited.sqlite3")
    d = daemon_factory(size=10, state=state)
    kept = d.rpc().newPort({"name": "kept"})
    plain = d.rpc().newPort("plain")
    d.rpc().delPort(kept)
    assert d.terminate() == 0
    db = sqlite3.connect(state)
    db.executescript("CREATE TABLE n2(name TEXT, port INTEGER); INSERT INTO n2 SELECT * FROM names;"
                     "DROP TABLE names; ALTER TABLE n2 RENAME TO names;"
                     "INSERT INTO names VALUES ('x', 'abc'); INSERT INTO names VALUES (NULL, %d);"
                     "INSERT INTO names VALUES ('y', 70000); INSERT INTO names VALUES ('twin1', %d);"
                     "INSERT INTO names VALUES ('twin2', %d);" % (d.first + 3, d.first + 5, d.first + 5))
    db.close()
    d.start()
    assert "forgot 5 remembered ports that were not valid" in d.read_log()
    rpc = d.rpc()
    assert ports(rpc.listPorts()) == [plain], "the registrations stay"
    assert rpc.newPort("string") == d.first + 2, "the lowest free port no name remembers (kept's is still kept)"
    assert rpc.newPort({"name": "y"}) == d.first + 3
    assert d.terminate() == 0
    db = sqlite3.connect(state)
    db.executescript("DROP TABLE names")
    db.close()
    d.start()
    assert sorted(ports(d.rpc().listPorts())) == sorted([plain, d.first + 2, d.first + 3]), "no names table: kept"


def test_a_name_keeps_its_port_while_another_program_holds_it_for_a_moment(daemon_factory):
    d = daemon_factory(size=10, state="none", settings=daemon_settings(busy_retry=0.2))
    rpc = d.rpc()
    rpc.newPort("below")
    db = rpc.newPort({"name": "db"})
    rpc.delPort(db)
    squatter = __import__("socket").socket()
    squatter.bind(("127.0.0.1", db))
    try:
        meanwhile = rpc.newPort({"name": "db"})
        assert meanwhile != db
    finally:
        squatter.close()
    rpc.delPort(meanwhile)
    assert wait_until(lambda: _sticky_again(rpc, db), timeout=5), "the name moved to the port it got meanwhile"


def _sticky_again(rpc, port):
    got = rpc.newPort({"name": "db"})
    if got == port:
        return True
    rpc.delPort(got)
    return False


def test_a_quick_rerun_of_nodemngr_run_with_a_name_gets_the_same_port(daemon_factory):
    """The owner of a name's port has just ended: the next run with that name gets the port back
    at once, without waiting for the owner check (2 s here, the default)."""
    d = daemon_factory(size=10, state="none")
    command = ["run", "--name", "web", "--", sys.executable, "-c", "import os; print(os.environ['PORT'])"]
    ports = []
    for _ in range(3):
        out = run_python([NODEMNGR] + command, env=d.env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        ports.append(int(out.stdout))
    assert ports == [d.first] * 3, ports
