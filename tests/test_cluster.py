"""Many hosts (README, "Many hosts"): two daemons, as two hosts would be, publishing to one real
etcd (started here on free ports with a temporary data folder), located from either, surviving a
kill -9, an etcd outage and its restart, and a burst of 1,000 registrations."""
import datetime
import json
import os
import signal
import time
import xmlrpc.client
from base64 import b64decode, b64encode

import pytest

from support import FAST_REAP, counters, memory_kib, wait_until
from etcd_support import Etcd, Proxy, etcd_binary, make_certificates, wait_for

TTL = 3         # seconds: the lease of each daemon's keys (--cluster-ttl)


def host_daemon(daemon_factory, etcd, host, extra_args_more=(), ready=True, urls=None, ttl=TTL, **kw):
    """A daemon publishing to *etcd* (through *urls*, when given) as *host*; ready: once its view
    is read and current."""
    kw.setdefault("state", etcd.data + "-%s.sqlite3" % host)    # (a state file each)
    d = daemon_factory(extra_args=["--cluster", urls or etcd.url, "--advertise-host", host, "--cluster-ttl", str(ttl)]
                       + list(extra_args_more), name=host, **kw)
    if ready:
        assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=10), d.rpc().status()
    return d


def published(etcd, host=None):
    """{(host, port): value} under nodemngr/v1/ports/ (HOST/ only, when given)."""
    prefix = "nodemngr/v1/ports/" + ("%s/" % host if host else "")
    return {(v["host"], v["port"]): v for v in etcd.get_prefix(prefix).values()}


def registry(d, host):
    """What d's registry should look like in etcd."""
    return {(host, e["port"]): e for e in d.rpc().listPorts()}


def matches(etcd, d, host):
    got, want = published(etcd, host), registry(d, host)
    return set(got) == set(want) and all(got[k]["pid"] == want[k]["pid"] for k in want)


def test_two_hosts_publish_and_each_locates_both(daemon_factory, etcd, run_cli):
    a = host_daemon(daemon_factory, etcd, "host-a", size=20)
    b = host_daemon(daemon_factory, etcd, "host-b", size=20)
    when = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)
    pa = a.rpc().newPort({"name": "db", "shard": 1, "blob": xmlrpc.client.Binary(b"\x00\x01"),
                          "at": xmlrpc.client.DateTime(datetime.datetime(2026, 1, 2, 3, 4, 5))})
    pb = b.rpc().newPort({"name": "db", "shard": 2}, os.getpid())
    b.rpc().newPort("web")
    assert wait_until(lambda: len(published(etcd)) == 3, timeout=5), published(etcd)
    for d in (a, b):    # (each daemon's mirror follows etcd within milliseconds: a watch)
        assert wait_until(lambda: len(d.rpc().locate("db")) == 2, timeout=5)
        found = d.rpc().locate("db")
        assert [(e["host"], e["port"]) for e in found] == [("host-a", pa), ("host-b", pb)]
        assert found[1]["pid"] == os.getpid() and found[1]["info"] == {"name": "db", "shard": 2}
        assert d.rpc().locate("nobody") == []
        assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=5), d.rpc().status()
    # keys and values exactly as the contract says
    value = etcd.get_prefix("nodemngr/v1/ports/host-a/%d" % pa)["nodemngr/v1/ports/host-a/%d" % pa]
    since = value.pop("since")
    assert value == {"host": "host-a", "port": pa, "name": "db", "pid": 0,
                     "info": {"name": "db", "shard": 1, "blob": {"base64": "AAE="}, "at": "2026-01-02T03:04:05"}}
    assert abs(datetime.datetime.strptime(since, "%Y-%m-%dT%H:%M:%SZ") - when) < datetime.timedelta(seconds=5)
    assert set(etcd.get_prefix("nodemngr/")) == {"nodemngr/v1/ports/host-a/%d" % pa,
                                                  "nodemngr/v1/ports/host-b/%d" % pb,
                                                  "nodemngr/v1/ports/host-b/%d" % (pb + 1)}
    # the command line and the proxy
    code, out, err = run_cli("locate", "db", env=a.env)
    assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [["host-a", str(pa)], ["host-b", str(pb)]]
    code, out, err = run_cli("list", "--cluster", env=b.env)
    assert code == 0 and out.splitlines()[0].split() == ["HOST", "PORT", "PID", "AGE", "SEEN", "INFO"]
    assert len(out.splitlines()) == 4 and all(" stale" not in line for line in out.splitlines())
    code, out, err = run_cli("locate", "nobody", env=a.env)
    assert code == 1 and "no host of the cluster has a port named 'nobody'" in err
    assert [e["host"] for e in a.proxy().locate("db")] == ["host-a", "host-b"]
    # a delPort is published too
    b.rpc().delPort(pb + 1)
    assert wait_until(lambda: matches(etcd, b, "host-b"), timeout=5)


def test_a_killed_host_loses_its_keys_within_the_ttl(daemon_factory, etcd):
    a = host_daemon(daemon_factory, etcd, "host-a", size=10)
    b = host_daemon(daemon_factory, etcd, "host-b", size=10)
    for d in (a, b):
        d.rpc().newPort("kept")
    assert wait_until(lambda: len(published(etcd)) == 2, timeout=5)
    b.kill()
    took = wait_for(lambda: not published(etcd, "host-b"), timeout=TTL + 2)
    assert took is not None, "host-b's keys outlived its lease"
    assert matches(etcd, a, "host-a"), "the other host's keys remain"
    assert a.rpc().locate("kept")[0]["host"] == "host-a"


def test_an_etcd_outage_costs_nothing_locally_and_the_view_comes_back(daemon_factory, etcd, sleeper):
    a = host_daemon(daemon_factory, etcd, "host-a", size=20, settings=FAST_REAP)
    b = host_daemon(daemon_factory, etcd, "host-b", size=20)
    before = [a.rpc().newPort("before %d" % i) for i in range(3)] + [b.rpc().newPort("before")]
    assert wait_until(lambda: len(published(etcd)) == 4, timeout=5)
    etcd.stop()
    rpc = a.rpc()
    during = [rpc.newPort("during %d" % i) for i in range(3)]      # answered, etcd or not
    rpc.delPort(before[0])
    rpc.delPort(during[0])
    b.rpc().newPort("owned during", sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    assert wait_until(lambda: "etcd cannot be reached" in rpc.status()["cluster"], timeout=5), rpc.status()["cluster"]
    found = rpc.locate("before 1")      # from the mirror, marked stale
    assert [(e["host"], e["port"], e["stale"]) for e in found] == [("host-a", before[1], True)]
    with pytest.raises(xmlrpc.client.Fault) as fault:
        rpc.locate("during 1")          # stale, and nothing matches
    assert fault.value.faultCode == 5 and "stale" in fault.value.faultString
    log = a.read_log()
    assert log.count("cluster view unavailable") == 1, "logged once per outage, not per call"
    etcd.start()
    for d, host in ((a, "host-a"), (b, "host-b")):
        assert wait_until(lambda: matches(etcd, d, host), timeout=8), (published(etcd, host), registry(d, host))
    assert wait_until(lambda: rpc.status()["cluster"] == "ok", timeout=8), rpc.status()["cluster"]
    assert wait_until(lambda: [e["stale"] for e in rpc.locate("during 1")] == [False], timeout=5), "current again"
    assert "etcd answers again" in a.read_log()
    assert sorted(p for _, p in published(etcd, "host-a")) == sorted(before[1:3] + during[1:])


def test_a_burst_of_1000_reaches_etcd_in_a_few_transactions(daemon_factory, etcd):
    d = host_daemon(daemon_factory, etcd, "host-a", size=1000, state="none")
    rpc = d.rpc()
    assert wait_until(lambda: rpc.status()["cluster"] == "ok", timeout=5)
    txns = etcd.transactions()
    for i in range(4):
        rpc.system.multicall([{"methodName": "newPort", "params": ["burst %d" % n]} for n in range(i * 250, i * 250 + 250)])
    took = wait_for(lambda: len(published(etcd, "host-a")) == 1000, timeout=10)
    assert took is not None and took < 2.0, took
    count = etcd.transactions() - txns
    assert count <= 16, "%d transactions for 1,000 registrations" % count
    print("1,000 registrations reached etcd in %.2f s, %d transactions" % (took, count))
    assert matches(etcd, d, "host-a")


def test_without_a_cluster_locate_is_fault_5(any_daemon):
    rpc = any_daemon.rpc()
    for call in (lambda: rpc.locate("x"), rpc.listCluster):
        with pytest.raises(xmlrpc.client.Fault) as fault:
            call()
        assert fault.value.faultCode == 5 and "no cluster view" in fault.value.faultString
    assert rpc.status()["cluster"] == ""
    result = rpc.system.multicall([{"methodName": "locate", "params": ["x"]}])
    assert result[0]["faultCode"] == 3 and "alone" in result[0]["faultString"]


def test_an_etcd_user_from_a_file_is_what_publishes(daemon_factory, etcd, tmp_path):
    for path, body in (("auth/role/add", {"name": "root"}), ("auth/user/add", {"name": "root", "password": "rootpw"}),
                       ("auth/user/grant", {"user": "root", "role": "root"}), ("auth/enable", {})):
        etcd.call(path, body)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("root:rootpw\n")
    bad.write_text("root:wrong\n")
    a = host_daemon(daemon_factory, etcd, "host-a", size=10, extra_args_more=["--cluster-user-file", str(good)])
    b = host_daemon(daemon_factory, etcd, "host-b", size=10, extra_args_more=["--cluster-user-file", str(bad)],
                    ready=False)
    port = a.rpc().newPort({"name": "db"})
    assert wait_until(lambda: a.rpc().status()["cluster"] == "ok", timeout=5), a.rpc().status()["cluster"]
    assert wait_until(lambda: "authentication failed" in b.rpc().status()["cluster"], timeout=5), \
        b.rpc().status()["cluster"]
    assert wait_until(lambda: [(e["host"], e["port"]) for e in a.rpc().locate("db")] == [("host-a", port)], timeout=5)
    assert not [line for line in command_lines() if "rootpw" in line], "never on a command line"


def command_lines():
    """The command line of every process of this host that can be read."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                found.append(f.read().replace(b"\0", b" ").decode("utf-8", "replace"))
        except OSError:     # not a process, or one that ended meanwhile
            pass
    return found


def test_https_with_a_ca_and_a_client_certificate(daemon_factory, tmp_path):
    if etcd_binary() is None:
        pytest.skip("etcd (Debian's etcd-server) is not installed; .ci/run installs it")
    tls = make_certificates(tmp_path)
    if tls is None:
        pytest.skip("the openssl command is not installed (Debian: openssl); .ci/run installs it")
    ca, cert, key = tls
    server = Etcd(tmp_path, tls=tls).start()
    try:
        a = host_daemon(daemon_factory, server, "host-a", size=10,
                        extra_args_more=["--cluster-ca", ca, "--cluster-cert", cert, "--cluster-key", key])
        b = host_daemon(daemon_factory, server, "host-b", size=10, extra_args_more=["--cluster-ca", ca], ready=False)
        port = a.rpc().newPort({"name": "db"})
        assert wait_until(lambda: [e["port"] for e in a.rpc().locate("db")] == [port], timeout=5)
        assert wait_until(lambda: "etcd cannot be reached" in b.rpc().status()["cluster"], timeout=5), \
            "no client certificate, no etcd: " + b.rpc().status()["cluster"]
    finally:
        server.stop()


# --- what an adversarial run found (each failed before its fix) ------------------------------------

def test_a_hung_etcd_holds_up_neither_locate_nor_other_calls_nor_the_stop(daemon_factory, etcd):
    """etcd stopped (SIGSTOP: it takes connections and never answers): locate still answers at once,
    from the mirror, marked stale once etcd has not confirmed it for the TTL; local calls are served;
    and the stop takes about a second, whatever etcd does."""
    d = host_daemon(daemon_factory, etcd, "host-a", size=20)
    port = d.rpc().newPort({"name": "db"})
    assert wait_until(lambda: d.rpc().locate("db") and d.rpc().status()["cluster"] == "ok", timeout=5)
    os.kill(etcd.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(12):
            began = time.monotonic()
            assert [e["port"] for e in d.rpc().locate("db")] == [port]
            assert time.monotonic() - began < 1.0, "locate waited for etcd"
        assert wait_until(lambda: d.rpc().locate("db")[0]["stale"], timeout=3 * TTL), "stale once unconfirmed"
        assert d.rpc().locate("db")[0]["seen"] > TTL
        assert d.rpc().newPort("served meanwhile") in range(d.first, d.last + 1)
        began = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        assert time.monotonic() - began < 2.0, "the stop waited for etcd"
    finally:
        os.kill(etcd.proc.pid, signal.SIGCONT)


def test_large_infos_are_published_in_transactions_etcd_accepts(daemon_factory, etcd):
    d = host_daemon(daemon_factory, etcd, "host-a", size=120, state="none")
    big = "\u2603" * 1000       # 3,000 bytes of UTF-8: 6,000 as JSON escapes
    rpc = d.rpc()
    for i in range(90):
        rpc.newPort({"name": "big %d" % i, "text": big})
    assert wait_until(lambda: len(published(etcd, "host-a")) == 90, timeout=10), rpc.status()["cluster"]
    assert rpc.status()["cluster"] == "ok"


def test_the_mirror_marshals_an_entry_as_dumps_does():
    """The mirror keeps an entry's values and fills a template in one step when it lists them
    (a piece kept marshalled cost twice the memory); the bytes must be xmlrpc.client.dumps'."""
    import nodemngr
    for info in ["plain", "a<b&c>", "", "\u00e9\u2028 \U0001f600", {"name": "db", "info": [1, 2.5, True, "y"]},
                 {"k": {"n": []}}, [{"x": "<y>"}]]:
        entry = {"host": "h<&>", "port": 65535, "name": "n&<", "info": info, "pid": 2 ** 31 - 1,
                 "since": datetime.datetime(999, 1, 2, 3, 4, 5)}
        made = xmlrpc.client.dumps((entry,), allow_none=False)
        piece = made[len("<params>\n<param>\n"):-len(nodemngr._STRUCT_END + "</param>\n</params>\n")]
        assert nodemngr._ENTRY_PIECE % nodemngr._mirrored(entry) == piece, info


def test_the_mirror_writes_a_carriage_return_of_a_host_or_name_as_dumps_does():
    """nodemngr's dumps writes a carriage return as &#13; (a raw one is read back as a line feed);
    the mirror's pieces must too, for the host and the name as for the info, or a listing says
    "a\nb" of a port named "a\rb"."""
    import nodemngr
    for host, name, info in [("h\rz", "n", "i"), ("h", "d\rb", "i"), ("h\r&<", "\r\n&", {"k\r": "\r"})]:
        entry = {"host": host, "port": 7, "name": name, "info": info, "pid": 1,
                 "since": datetime.datetime(2026, 1, 2, 3, 4, 5)}
        made = nodemngr.dumps((entry,), allow_none=False)
        piece = made[len("<params>\n<param>\n"):-len(nodemngr._STRUCT_END + "</param>\n</params>\n")]
        assert nodemngr._ENTRY_PIECE % nodemngr._mirrored(entry) == piece, (host, name)


def test_a_carriage_return_in_a_host_or_name_is_listed_as_it_is(daemon_factory, etcd):
    """End to end: an entry whose host and name hold a carriage return (cluster_entry takes both)
    comes back from listCluster with it, not with a line feed."""
    lease = etcd.call("lease/grant", {"TTL": 60})["ID"]
    put(etcd, "nodemngr/v1/ports/h\rz/7", {"host": "h\rz", "port": 7, "name": "d\rb", "info": "x\ry", "pid": 0,
                                           "since": "2026-01-01T00:00:00Z"}, lease)
    d = host_daemon(daemon_factory, etcd, "host-a", size=10)
    assert [(e["host"], e["name"], e["info"]) for e in d.rpc().listCluster()] == [("h\rz", "d\rb", "x\ry")]


def test_entries_nodemngr_would_not_write_are_skipped_and_counted(daemon_factory, etcd):
    """Only entries of the exact shape nodemngr writes, whose value agrees with the key and which
    hang on a live lease, are answered; the others are skipped and counted by reason (metrics,
    status), whether the mirror read them whole (a daemon that starts) or from the watch.  A forged
    value never keeps a daemon from reading the view, never breaks a listing (a lone surrogate is
    valid JSON but no XML-RPC string), and never leaves a change of its transaction unapplied: the
    view is never answered as fresh while it is wrong."""
    a = host_daemon(daemon_factory, etcd, "host-a", size=10)
    port = a.rpc().newPort({"name": "db"})
    lease = etcd.call("lease/grant", {"TTL": 60})["ID"]
    good = {"host": "hz", "port": 7, "name": "db", "info": "x", "pid": 0, "since": "2026-01-01T00:00:00Z"}
    nested = "[" * 3000 + "]" * 3000        # (json.loads raises RecursionError)
    forged = {"hz/1": (dict(good, port=1, info=None), lease), "hz/2": (dict(good, port=2, pid=2 ** 40), lease),
              "hz/3": (dict(good, port=3, info="\u0007"), lease), "hz/4": (dict(good, port="4"), lease),
              "hz/5": ("not json", lease), "hz/6": ([1, 2], lease),
              "hz/8": (dict(good, port=8), None),                                   # no lease
              "hostc/7": (good, lease),                                             # names another host
              "7": (dict(good, host=""), lease),                                    # no host part
              "hostd/1/2/3": (dict(good, host="hostd", port=1), lease),             # nested
              "hz/9": (dict(good, port=9, info="x" * (70 * 1024)), lease),          # over 64 KiB
              "hz/10": (nested, lease),                                             # nested 3,000 deep
              "hz/11": (json.dumps(dict(good, port=11, name="\udfff")), lease),     # a lone surrogate
              "hz/12": (dict(good, port=12), lease),                                # deleted below
              "hz/7": (good, lease)}                                                # the one that fits
    for tail, (value, with_lease) in forged.items():
        put(etcd, "nodemngr/v1/ports/" + tail, value, with_lease)
    etcd.call("kv/txn", {"success": [      # (a saw hz/12 come; the delete is in the nested value's transaction)
        {"requestPut": {"key": b64("nodemngr/v1/ports/hz/13"), "value": b64(nested), "lease": lease}},
        {"requestDeleteRange": {"key": b64("nodemngr/v1/ports/hz/12")}}]})
    b = host_daemon(daemon_factory, etcd, "host-b", size=10)     # (reads them whole; a saw them come)
    reasons = {"value": 9, "lease": 1, "disagrees": 1, "key": 2, "size": 1}
    for d in (a, b):
        def fresh(d=d):
            return [(e["host"], e["port"]) for e in d.rpc().locate("db") if not e["stale"]]
        assert wait_until(lambda: fresh() == [("host-a", port), ("hz", 7)], timeout=5), (fresh(), d.rpc().status())
        assert wait_until(lambda: d.rpc().status()["clusterSkipped"] == 14, timeout=5), d.rpc().status()
        assert len(d.rpc().listCluster()) == 2
        assert counters(d, "nodemngr_cluster_skipped") == reasons
    put(etcd, "nodemngr/v1/ports/hz/8", dict(good, port=8), lease)     # mended: counted no more
    assert wait_until(lambda: a.rpc().status()["clusterSkipped"] == 13, timeout=5)


def test_keys_that_are_not_utf8_are_paged_counted_and_deleted_by_their_bytes(daemon_factory, etcd):
    """Keys are tracked by their bytes, as etcd holds them, never by a decoded text (which would
    make two keys one, and name a key etcd does not have): a range goes on past keys that are not
    UTF-8, each is counted once, and forged ones under this host's own prefix are deleted and
    never stop its publishing.  (Pages of 10 keys here, so that 11 keys make two.)"""
    prefix, own = b"nodemngr/v1/ports/", b"nodemngr/v1/ports/host-a/"
    forged = [prefix + b"\xf0%04d" % i for i in range(11)] + [prefix + b"x/\xff", prefix + b"x/\xfe"]
    forged_own = [own + b"\xf0%04d" % i for i in range(11)] + [own + b"\xff"]
    for key in forged + forged_own:
        put(etcd, key, "1")
    put(etcd, "nodemngr/v1/ports/hz/7", {"host": "hz", "port": 7, "name": "db", "info": "x", "pid": 0,
                                         "since": "2026-01-01T00:00:00Z"}, etcd.call("lease/grant", {"TTL": 60})["ID"])
    d = host_daemon(daemon_factory, etcd, "host-a", size=10, settings={"EtcdClient.page": 10})
    port = d.rpc().newPort("kept")
    assert wait_until(lambda: etcd.keys(own) == [own + b"%d" % port], timeout=5), etcd.keys(own)
    assert wait_until(lambda: d.rpc().status()["clusterSkipped"] == len(forged), timeout=5), d.rpc().status()
    assert [(e["host"], e["port"], e["stale"]) for e in d.rpc().locate("db")] == [("hz", 7, False)]
    assert d.rpc().status()["cluster"] == "ok"


def test_big_values_are_read_in_bounded_pages_and_skipped_as_they_come(daemon_factory, etcd):
    """Values within etcd's defaults never make the view unreadable: a value over the 64 KiB bound
    is dropped as it is read (never held), and a range is read in pages of about
    EtcdClient.page_bytes (1 MiB) of what etcd sends, ended after their last whole key, so that no
    reply kept is much larger and none holds the interpreter long to decode.  Here every reply is
    refused over 1 MiB kept (max_reply; 64 MiB by default): two values of 1.2 MB, and thirty of
    60 KB (under the bound), all under no lease; a daemon that starts reads them all, skips and
    counts them, and answers the one entry that fits."""
    for i in (1, 2):
        put(etcd, "nodemngr/v1/ports/big/%d" % i, "y" * 1200000)
    for n in (0, 15):       # (etcd takes requests of 1.5 MiB at most)
        etcd.call("kv/txn", {"success": [{"requestPut": {"key": b64("nodemngr/v1/ports/mid/%d" % i),
                                                         "value": b64("y" * 60000)}} for i in range(n + 1, n + 16)]})
    put(etcd, "nodemngr/v1/ports/hz/7", {"host": "hz", "port": 7, "name": "db", "info": "x", "pid": 0,
                                         "since": "2026-01-01T00:00:00Z"}, etcd.call("lease/grant", {"TTL": 60})["ID"])
    d = host_daemon(daemon_factory, etcd, "host-a", size=10, settings={"EtcdClient.max_reply": 1 << 20})
    assert [(e["host"], e["port"], e["stale"]) for e in d.rpc().locate("db")] == [("hz", 7, False)]
    assert counters(d, "nodemngr_cluster_skipped") == {"size": 2, "lease": 30}


def test_forged_keys_deleted_from_this_hosts_prefix_leave_nothing_behind(daemon_factory, etcd):
    """A forged key under this host's prefix is deleted, and forgotten once etcd says so: rounds of
    forged keys of 512 KiB, each deleted, leave the daemon's memory where it was.  (glibc's malloc
    is told to give blocks of 64 KiB and more back when they are freed, so that its resident size
    is what the daemon holds.)"""
    d = host_daemon(daemon_factory, etcd, "host-a", size=10, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    own = b"nodemngr/v1/ports/host-a/"
    kept = own + b"%d" % d.rpc().newPort("kept")
    assert wait_until(lambda: etcd.keys(own) == [kept], timeout=5)
    pad, sizes = b"z" * (512 * 1024), []
    for n in range(2):
        for i in range(8):
            put(etcd, own + b"forged-%d-%d-" % (n, i) + pad, "1")
        assert wait_until(lambda: etcd.keys(own) == [kept], timeout=5), "forged keys were not deleted"
        assert wait_until(lambda: d.rpc().status()["clusterSkipped"] == 0, timeout=5)
        sizes.append(memory_kib(d.proc.pid))
    assert sizes[-1] - sizes[0] < 2048, "8 forged keys of 512 KiB, all deleted, grew the daemon by %d KiB (%s)" % (
        sizes[-1] - sizes[0], sizes)


def b64(key):
    """A key or value (text, or bytes as they are) as etcd's gateway takes it."""
    return b64encode(key if isinstance(key, bytes) else key.encode()).decode()


def put(etcd, key, value, lease=None):
    """Put *value* (JSON-encoded unless it is a str) at *key* (text, or bytes) of etcd, on *lease* if given."""
    text = value if isinstance(value, str) else json.dumps(value)
    etcd.call("kv/put", dict({"key": b64(key), "value": b64(text)}, **({"lease": lease} if lease else {})))


def test_cluster_settings_that_cannot_work_are_one_line(daemon_factory, tmp_path):
    for args, text in ((["--cluster", "http://127.0.0.1:99999"], "valid port"),
                       (["--cluster", "https://127.0.0.1:2379", "--cluster-ca", str(tmp_path / "none.pem")],
                        "cannot use the cluster's TLS files"),
                       (["--cluster", "http://127.0.0.1:2379", "--advertise-host", "localhost"],
                        "every host needs a name of its own")):
        d = daemon_factory(size=10, state="none", extra_args=args, start=False)
        d.start(wait=False)
        assert d.proc.wait(15) == 1
        log = d.read_log()
        assert text in log and "Traceback" not in log, log


def test_a_key_deleted_in_etcd_is_put_back(daemon_factory, etcd):
    d = host_daemon(daemon_factory, etcd, "host-a", size=10)
    port = d.rpc().newPort("kept")
    key = "nodemngr/v1/ports/host-a/%d" % port
    assert wait_until(lambda: key in etcd.get_prefix("nodemngr/"), timeout=5)
    import base64 as b64
    assert etcd.call("kv/deleterange", {"key": b64.b64encode(key.encode()).decode()}).get("deleted") == "1"
    assert wait_until(lambda: key in etcd.get_prefix("nodemngr/"), timeout=5), (
        "a key deleted by hand stays deleted", d.rpc().status(), d.log_tail())


def test_an_endpoint_that_is_not_etcd_is_one_sentence_in_status(daemon_factory):
    import http.server
    import threading

    class NotEtcd(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), NotEtcd)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        d = daemon_factory(size=10, state="none", extra_args=["--cluster", "http://127.0.0.1:%d" % server.server_port,
                                                                 "--advertise-host", "host-a"])
        assert wait_until(lambda: "not etcd" in d.rpc().status()["cluster"], timeout=5), d.rpc().status()["cluster"]
        assert d.read_log().count("Traceback") == 0
    finally:
        server.shutdown()
        server.server_close()


# --- trust at scale: short leases, refused writes, forged keys of its own, a stop that never waits ---

def hung_endpoint():
    """An address that takes connections and never answers, as a hung etcd or a black hole does."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


def test_a_short_lease_is_kept_when_the_endpoints_listed_first_hang(daemon_factory, etcd):
    """Keep-alive never waits behind a slow endpoint, nor behind anything else the daemon asks
    etcd: two endpoints that answered until now hang right after a renewal (as two members of five
    may), listed before a healthy one, and the lease (TTL 2) is kept while etcd is up.  Each
    endpoint gets a share of a third of the TTL, and the one that answered is tried first from
    then on."""
    a, b = Proxy(etcd.client_port), Proxy(etcd.client_port)
    try:
        d = host_daemon(daemon_factory, etcd, "host-a", size=10, urls=",".join((a.url, b.url, etcd.url)), ttl=2)
        port = d.rpc().newPort("kept")
        assert wait_until(lambda: matches(etcd, d, "host-a"), timeout=5)
        a.freeze_after(b"/v3/lease/keepalive", others=[b])
        assert wait_until(lambda: a.mode == "freeze", timeout=3)
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert list(published(etcd, "host-a")) == [("host-a", port)], (
                "the keys were lost while etcd was up: " + d.rpc().status()["cluster"])
            time.sleep(0.1)
    finally:
        a.close()
        b.close()


def test_refused_writes_cost_no_keys_and_the_view_says_it_is_stale(daemon_factory, etcd):
    """etcd refuses writes (its NOSPACE alarm): the lease is still kept, so this host's keys stay;
    status says what is wrong and since when; locate answers from the mirror, marked stale (it lists
    a port deleted meanwhile, and misses a new one); once etcd takes writes again, it all matches."""
    d = host_daemon(daemon_factory, etcd, "host-a", size=10, extra_args_more=["--cluster-ttl", "2"])
    old = d.rpc().newPort({"name": "db"})
    assert wait_until(lambda: d.rpc().status()["cluster"] == "ok" and d.rpc().locate("db"), timeout=5)
    member = etcd.call("kv/range", {"key": "eA=="})["header"]["member_id"]
    etcd.call("maintenance/alarm", {"action": "ACTIVATE", "memberID": member, "alarm": "NOSPACE"})
    try:
        rpc = d.rpc()
        rpc.delPort(old)
        new = rpc.newPort({"name": "web"})
        assert wait_until(lambda: "refused" in rpc.status()["cluster"], timeout=5), rpc.status()["cluster"]
        assert "database space exceeded" in rpc.status()["cluster"] and "since" in rpc.status()["cluster"]
        assert [(e["port"], e["stale"]) for e in rpc.locate("db")] == [(old, True)], "stale, and said so"
        with pytest.raises(xmlrpc.client.Fault) as fault:
            rpc.locate("web")       # (stale, and nothing matches)
        assert fault.value.faultCode == 5 and "stale" in fault.value.faultString
        until = time.monotonic() + 2 * 2        # (two leases)
        while time.monotonic() < until:
            assert list(published(etcd, "host-a")) == [("host-a", old)], "a refused write cost the host its keys"
            time.sleep(0.2)
    finally:
        etcd.call("maintenance/alarm", {"action": "DEACTIVATE", "memberID": member, "alarm": "NOSPACE"})
    assert wait_until(lambda: matches(etcd, d, "host-a"), timeout=10)
    assert wait_until(lambda: [(e["port"], e["stale"]) for e in d.rpc().locate("web")] == [(new, False)], timeout=5)
    assert d.rpc().locate("db") == []
    assert d.rpc().status()["cluster"] == "ok"


def test_keys_of_its_own_that_another_writer_changes_are_repaired_on_sight(daemon_factory, etcd):
    d = host_daemon(daemon_factory, etcd, "host-a", size=10)
    kept, gone = d.rpc().newPort("kept"), d.rpc().newPort("gone")
    d.rpc().delPort(gone)
    assert wait_until(lambda: matches(etcd, d, "host-a"), timeout=5)
    lease = etcd.call("lease/grant", {"TTL": 60})["ID"]
    forged = {"host": "host-a", "port": kept, "name": "forged", "info": "forged", "pid": 0,
              "since": "2026-01-01T00:00:00Z"}
    began = time.monotonic()
    put(etcd, "nodemngr/v1/ports/host-a/%d" % kept, forged, lease)
    put(etcd, "nodemngr/v1/ports/host-a/%d" % gone, dict(forged, port=gone), lease)
    put(etcd, "nodemngr/v1/ports/host-a/junk", "junk", lease)
    def repaired():
        keys = [b64decode(kv["key"]) for kv in etcd.call("kv/range", {"key": b64encode(b"nodemngr/").decode(),
                                                                       "range_end": b64encode(b"nodemngr0").decode(),
                                                                       "keys_only": True}).get("kvs", [])]
        return keys == [b"nodemngr/v1/ports/host-a/%d" % kept] and matches(etcd, d, "host-a") and (
            published(etcd, "host-a")[("host-a", kept)]["info"] == "kept")
    assert wait_until(repaired, timeout=5)
    assert time.monotonic() - began < 3.0, "repaired at the next comparison (30 s), not on sight"
    assert wait_until(lambda: d.rpc().locate("kept") and not d.rpc().locate("forged"), timeout=5)


def test_a_lost_lease_is_replaced_at_once_said_logged_counted_and_the_keys_written_back(daemon_factory, etcd):
    """A lease etcd no longer knows (revoked behind the daemon's back, as an expiry would do): the
    refusal of the repair ("lease not found") has a new lease granted at once, not at the
    keeper's next renewal, so the keys are back within a second while etcd is up (TTL 6: a
    renewal every 2 s); the loss is said, logged and counted."""
    d = host_daemon(daemon_factory, etcd, "host-a", size=10, ttl=6)
    port = d.rpc().newPort("kept")
    assert wait_until(lambda: matches(etcd, d, "host-a"), timeout=5)
    key = b64("nodemngr/v1/ports/host-a/%d" % port)
    gone = []
    for _ in range(2):      # (the second right after a grant: the keeper's next renewal is furthest)
        lease = etcd.call("kv/range", {"key": key})["kvs"][0]["lease"]
        began = time.monotonic()
        etcd.call("lease/revoke", {"ID": lease})        # (the keys go with it)
        assert wait_until(lambda: matches(etcd, d, "host-a"), timeout=5), d.rpc().status()["cluster"]
        gone.append(time.monotonic() - began)
    assert max(gone) < 1.0, "this host's keys were gone %.1f s after a revoke, etcd up" % max(gone)
    assert wait_until(lambda: d.read_log().count("wrote 1 keys of this host back") == 2, timeout=5), d.read_log()
    assert d.read_log().count("etcd lost this host's lease") == 2
    metrics = {line.split()[0]: float(line.split()[1]) for line in metrics_text(d).splitlines()
               if line.startswith("nodemngr_cluster_") and " " in line}
    assert metrics["nodemngr_cluster_lease_losses_total"] == 2 and metrics["nodemngr_cluster_rewrites_total"] >= 2
    assert metrics["nodemngr_cluster_written_back_timestamp_seconds"] >= (
        metrics["nodemngr_cluster_lease_lost_timestamp_seconds"] > 0)
    assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=5)


def metrics_text(d):
    from support import post
    return post(d, method="GET", path="/metrics").body.decode()


def test_the_stop_takes_about_a_second_whatever_etcd_does(daemon_factory):
    hung = hung_endpoint()
    try:
        for stop in ("terminate", "SIGTERM"):
            d = daemon_factory(size=5, state="none", extra_args=[
                "--cluster", "http://127.0.0.1:%d" % hung.getsockname()[1], "--advertise-host", "host-a"])
            d.rpc().newPort("x")
            began = time.monotonic()
            if stop == "terminate":
                assert d.rpc().terminate() is True
            else:
                d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(15) == 0
            assert time.monotonic() - began < 1.6, "%s took %.1f s" % (stop, time.monotonic() - began)
    finally:
        hung.close()


def test_an_endpoint_that_trickles_costs_no_keys_and_holds_up_no_stop(daemon_factory, etcd):
    """An endpoint that answered, then sends each reply's head a byte every 50 ms: every request
    ends by its deadline, not merely each read within a timeout.  Listed first, it costs this
    host no keys while etcd is up (the keep-alive goes on to the next endpoint in time: TTL 2);
    alone, it holds up no stop (which revokes the lease) for more than about a second."""
    proxy = Proxy(etcd.client_port)
    try:
        a = host_daemon(daemon_factory, etcd, "host-a", size=10, urls=proxy.url + "," + etcd.url, ttl=2)
        b = host_daemon(daemon_factory, etcd, "host-b", size=10, urls=proxy.url, ttl=2)
        key = "nodemngr/v1/ports/host-a/%d" % a.rpc().newPort("kept")
        b.rpc().newPort("kept")
        assert wait_until(lambda: len(etcd.keys("nodemngr/")) == 2, timeout=5)
        proxy.trickle()
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            assert key.encode() in etcd.keys("nodemngr/"), "lost while etcd was up: " + a.rpc().status()["cluster"]
            time.sleep(0.1)
        began = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(15) == 0
        assert time.monotonic() - began < 1.5, "the stop waited %.1f s on a trickle" % (time.monotonic() - began)
    finally:
        proxy.close()


def test_a_watch_that_silently_stops_is_made_again_within_about_a_ttl(daemon_factory, etcd):
    """The watch's flow is dropped without a reset (a NAT or a firewall forgetting a long-lived flow;
    new connections work): etcd's revision moves on while the watch brings nothing, so it is made
    again from the mirror's revision within about a TTL (2 s here), and what it missed comes:
    another host moves its "db" (one delete, one put: as many keys as before), and the old port is
    not answered as fresh for longer than that."""
    proxy = Proxy(etcd.client_port)
    try:
        d = host_daemon(daemon_factory, etcd, "host-a", size=10, urls=proxy.url, ttl=2)
        lease = etcd.call("lease/grant", {"TTL": 60})["ID"]
        good = {"host": "hz", "port": 1, "name": "db", "info": "x", "pid": 0, "since": "2026-01-01T00:00:00Z"}
        put(etcd, "nodemngr/v1/ports/hz/1", good, lease)

        def fresh():
            return [(e["host"], e["port"]) for e in d.rpc().locate("db") if not e["stale"]]
        assert wait_until(lambda: fresh() == [("hz", 1)], timeout=5)
        proxy.freeze_existing()
        etcd.call("kv/txn", {"success": [
            {"requestDeleteRange": {"key": b64("nodemngr/v1/ports/hz/1")}},
            {"requestPut": {"key": b64("nodemngr/v1/ports/hz/2"), "value": b64(json.dumps(dict(good, port=2))),
                            "lease": lease}}]})
        took = wait_for(lambda: fresh() == [("hz", 2)], timeout=6)
        assert took is not None and took < 3.0, "hz/1 was deleted; %s s later locate answered %s" % (
            took, d.rpc().locate("db"))
        assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=5), d.rpc().status()["cluster"]
    finally:
        proxy.close()


def test_the_view_is_read_again_after_a_compaction_it_missed(daemon_factory, etcd):
    """The watch broke (etcd restarted) and, meanwhile, etcd compacted the revisions it would
    resume from: the daemon reads the whole prefix again, and misses nothing."""
    d = host_daemon(daemon_factory, etcd, "host-a", size=10)
    d.rpc().newPort({"name": "db"})
    assert wait_until(lambda: len(d.rpc().locate("db")) == 1, timeout=5)
    etcd.stop()
    etcd.start()
    lease = etcd.call("lease/grant", {"TTL": 60})["ID"]
    for port in (7, 8):
        put(etcd, "nodemngr/v1/ports/hz/%d" % port, {"host": "hz", "port": port, "name": "db", "info": "x", "pid": 0,
                                                     "since": "2026-01-01T00:00:00Z"}, lease)
    revision = etcd.call("kv/range", {"key": "eA=="})["header"]["revision"]
    etcd.call("kv/compaction", {"revision": revision, "physical": True})
    assert wait_until(lambda: [(e["host"], e["port"]) for e in d.rpc().locate("db")][1:] == [("hz", 7), ("hz", 8)],
                      timeout=10), (d.rpc().status(), d.rpc().locate("db"), d.log_tail())
    assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=10)
