#!/usr/bin/env python3
"""nodemngr benchmark: our daemon against the twenty-line stdlib server a user would write.

Run from the repository root::

    python3 bench/bench.py             # full run (3 rounds)
    python3 bench/bench.py --quick     # short smoke run
    python3 bench/bench.py --rounds 5
    git show 482246a:nodemngr.py > /tmp/nodemngr-1.0.0.py
    python3 bench/bench.py --baseline /tmp/nodemngr-1.0.0.py     # before/after in one run

Both servers run as subprocesses on 127.0.0.1, on ports found free at start, and are measured with
the same plain ``xmlrpc.client.ServerProxy`` client.  Rounds alternate stdlib / ours; the table shows
the median over rounds and every round's value.  With ``--baseline PATH`` every scenario of ours also
runs against that older copy of nodemngr.py (ours and the baseline swap order every round) and the
table gains baseline columns.  Scenario 6 ("one call can stall everyone", issue 8 item 4) runs a
daemon whose range of 2,000 ports is full: 1,000 registered to live owner processes (``sleep``),
1,000 bound by the benchmark itself; a second process pings every 10 ms while failing newPort
multicalls run, and again with nothing else running (the periodic owner check).  Standard library
only; everything started is stopped by pid and every temporary directory is removed, whatever happens.
"""
import argparse
import base64
import hashlib
import http.client
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The helpers the test suite uses too (ports, environment, daemons in subprocesses): one copy.
sys.path.insert(0, os.path.join(ROOT, "tests"))
from support import (NODEMNGR, RESERVED_PORT, Daemon, ServerError, ServerProcess,  # noqa: E402
                     clean_env, memory_kib, port_is_free, scan_free_range)
from etcd_support import Etcd, etcd_binary  # noqa: E402

PROXY_MODULE = os.path.join(ROOT, "nodemngr_proxy.py")
BATCH = 250                     # newPort calls per system.multicall batch
FLAT_MANY = 25000               # registered ports for the "flat cost" case
WIDE_RANGE = (20000, 59999)     # range for the 25,000-registered daemon
STALL_RANGE = 2000              # scenario 6: ports in the range, all of them unavailable:
STALL_OWNERS = 1000             #   this many registered, one each to a live owner process,
STALL_BATCH = 300               #   the rest bound by the benchmark; failing newPort per multicall
PING_PERIOD = 0.010             # scenario 6: the pinger sends one ping every 10 ms
STALL_BATCH_TIMEOUT = 45.0      # scenario 6: a failing batch with no answer by then is an error

# (a) The bare stdlib server, as a user would write it: default SimpleXMLRPCServer, a dict, a loop.
# The one extra line a user adds for scenario 3 is register_multicall_functions().
STDLIB_SERVER = r'''
import sys
from xmlrpc.server import SimpleXMLRPCServer

PORT, FIRST, LAST = (int(a) for a in sys.argv[1:4])
ports = {}

def newPort(info):
    port = FIRST
    while port in ports:
        port += 1
    if port > LAST:
        raise ValueError("no free port")
    ports[port] = info
    return port

def delPort(port):
    del ports[port]
    return 0

def ping():
    return "alive"

server = SimpleXMLRPCServer(("127.0.0.1", PORT), logRequests=False)
server.register_function(newPort)
server.register_function(delPort)
server.register_function(ping)
server.register_multicall_functions()
server.serve_forever()
'''

# (c) Scenario 6's pinger, a process of its own so that the failing client's CPU work in the
# benchmark process never delays a ping: one ping every PERIOD seconds on one kept-alive connection,
# each latency recorded, until a line (or EOF) on stdin or its own hard deadline; then one JSON line.
PINGER = r'''
import json, select, socket, sys, time, xmlrpc.client

url, period, limit = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
pairs = sys.argv[4:] == ["pairs"]           # a newPort/delPort pair each time, not a ping
perf = time.perf_counter
hard_end = perf() + limit                   # never runs past this, whatever the parent does
socket.setdefaulttimeout(limit)            # longer than any failing batch may take
lat = []
out = {}
try:
    proxy = xmlrpc.client.ServerProxy(url)  # HTTP/1.1: one connection, kept alive
    for _ in range(3):
        proxy.ping()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    next_t = perf()
    while perf() < hard_end:
        wait = max(0.0, min(next_t, hard_end) - perf())
        if select.select([sys.stdin], [], [], wait)[0]:
            break                           # "stop" or EOF from the benchmark
        t0 = perf()
        if pairs:
            proxy.delPort(proxy.newPort("pinger", 0))
        else:
            proxy.ping()
        t1 = perf()
        lat.append(t1 - t0)
        next_t = max(next_t + period, t1)   # a late ping is not followed by a burst
except BaseException as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
out["latencies"] = lat
sys.stdout.write(json.dumps(out) + "\n")
sys.stdout.flush()
'''


class BenchError(Exception):
    """A server failed or misbehaved; the message says how."""


class Watchdog(Exception):
    """The overall time limit of the run was reached."""


# ----------------------------------------------------------------------------- ports and processes

class PortPicker:
    """Hands out server ports in 13000-13999: outside every allocation range used here, above the
    default range 11801-12800 and below the 14000-30000 the test suite draws its ranges from."""

    def __init__(self, start=13000, stop=14000):
        self.next = start
        self.stop = stop

    def take(self):
        while self.next < self.stop:
            port = self.next
            self.next += 1
            if port != RESERVED_PORT and port_is_free(port):
                return port
        raise BenchError("no free server port in 13000-13999")


def free_range(size, low=20000, high=30000, step=None):
    """A range of *size* ports in [low, high), every one of them free (TCP and UDP) now."""
    try:
        return scan_free_range(size, low, high, step)
    except ServerError as exc:
        raise BenchError(str(exc)) from None


def find_stall_range():
    """Scenario 6's range, in 30000-32767: above the test suite's ranges (14000-29999) and below the
    kernel's ephemeral ports, so that the sockets the scenario holds for a while are never in the
    way of tests running at the same time, nor of outgoing connections."""
    high = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    return free_range(STALL_RANGE, low=30000, high=high, step=100)


def start_stdlib(picker, tmp, first, last):
    script = os.path.join(tmp, "stdlib_server.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(STDLIB_SERVER)
    port = picker.take()
    argv = [sys.executable, script, str(port), str(first), str(last)]
    return ServerProcess("stdlib", argv, port, os.path.join(tmp, "stdlib-%d.log" % port), cwd=ROOT).start(wait=False)


def start_ours(picker, tmp, first, last, tag, script=NODEMNGR, name="ours"):
    """Our daemon (or, with *script* and *name*, the baseline copy) with its defaults."""
    port = picker.take()
    state_dir = tempfile.mkdtemp(prefix="state-%s-%s-" % (name, tag), dir=tmp)
    return Daemon(state_dir, first, last, port=port, script=script, log_level="WARNING", name=name,
                  cwd=ROOT).start(wait=False)


# ----------------------------------------------------------------------------- client workloads

def pairs_loop(proxy, duration):
    """newPort("bench")/delPort(p) pairs for *duration* seconds; returns (calls, elapsed)."""
    for _ in range(3):                                  # warm-up: connection, caches
        proxy.delPort(proxy.newPort("bench"))
    pairs = 0
    t0 = time.perf_counter()
    end = t0 + duration
    now = t0
    while now < end:
        port = proxy.newPort("bench")
        if proxy.delPort(port) != 0:
            raise BenchError("delPort(%r) did not return 0" % port)
        pairs += 1
        now = time.perf_counter()
    return 2 * pairs, now - t0


def _worker(url, duration, barrier, results, index):
    try:
        socket.setdefaulttimeout(30)
        proxy = xmlrpc.client.ServerProxy(url)
        proxy.delPort(proxy.newPort("bench"))           # warm-up before the common start
        barrier.wait(30)
        calls, elapsed = pairs_loop(proxy, duration)
        results.put((index, calls, elapsed, None))
    except BaseException as exc:                        # reported by the parent, never lost
        try:
            barrier.abort()
        except Exception:
            pass
        results.put((index, 0, 0.0, "%s: %s" % (type(exc).__name__, exc)))


def mp_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def four_clients(url, duration, n=4):
    """n client processes, each its own ServerProxy, started together; aggregate calls/s."""
    ctx = mp_context()
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, duration, barrier, results, i), daemon=True)
             for i in range(n)]
    try:
        for p in procs:
            p.start()
        got = []
        deadline = time.monotonic() + duration + 40
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("client processes did not finish in time")
            try:
                got.append(results.get(timeout=left))
            except Exception:
                raise BenchError("client processes did not finish in time")
        errors = [e for (_, _, _, e) in got if e]
        if errors:
            raise BenchError("client process failed: %s" % errors[0])
        return sum(calls / elapsed for (_, calls, elapsed, _) in got)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()                           # SIGTERM to that pid
                p.join(5)


def multicall_rate(proxy, duration, min_batches=3):
    """Batches of BATCH newPort in one system.multicall, each freed by a delPort multicall.

    Only the newPort batches are timed; returns newPort/s."""
    for _ in range(1):                                   # warm-up batch
        ports = list(_mc_new(proxy, BATCH))
        _mc_del(proxy, ports)
    done = 0
    timed = 0.0
    t_end = time.perf_counter() + duration
    batches = 0
    while batches < min_batches or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        ports = _mc_new(proxy, BATCH)
        timed += time.perf_counter() - t0
        if len(set(ports)) != BATCH:
            raise BenchError("a multicall batch returned duplicate ports")
        done += BATCH
        batches += 1
        _mc_del(proxy, ports)
    return done / timed


def _mc_new(proxy, n, info="bench", start=0):
    """newPort n times in one multicall; *info* may be a function of the call's number."""
    mc = xmlrpc.client.MultiCall(proxy)
    for i in range(start, start + n):
        mc.newPort(info(i) if callable(info) else info)
    return list(mc())                                   # iterating raises on any fault


def _mc_del(proxy, ports):
    mc = xmlrpc.client.MultiCall(proxy)
    for p in ports:
        mc.delPort(p)
    for r in mc():
        if r != 0:
            raise BenchError("delPort in multicall returned %r" % (r,))


def new_del_pair(proxy, info="bench"):
    proxy.delPort(proxy.newPort(info))


def pair_samples(proxies, duration, chunk=20, op=new_del_pair):
    """Seconds per op(proxy) (a newPort+delPort pair by default) on each proxy, alternating chunks
    of *chunk* so that machine drift hits every proxy alike; returns one list of samples per proxy."""
    for proxy in proxies:
        for _ in range(5):
            op(proxy)
    samples = [[] for _ in proxies]
    perf = time.perf_counter
    end = perf() + duration
    while perf() < end or len(samples[0]) < 100:
        for proxy, out in zip(proxies, samples):
            for _ in range(chunk):
                t0 = perf()
                op(proxy)
                out.append(perf() - t0)
    return samples


# ----------------------------------------------------------------------------- scenarios per server

def run_common(server, durations, results, label, proxy_factory=None):
    """Scenarios 1-3 (and the NodeMngrProxy row) against one running server."""
    d = durations
    proxy = xmlrpc.client.ServerProxy(server.url)
    calls, elapsed = pairs_loop(proxy, d["pairs"])
    results.add("one", label, calls / elapsed)
    server.check_alive()
    results.add("four", label, four_clients(server.url, d["pairs"]))
    server.check_alive()
    results.add("multi", label, multicall_rate(proxy, d["multi"]))
    server.check_alive()
    if proxy_factory is not None:
        nm = proxy_factory(server.port)
        try:
            calls, elapsed = pairs_loop(nm, d["pairs"])
        finally:
            nm.close()
        results.add("proxy", label, calls / elapsed)
        server.check_alive()


def run_flat(few_srv, many_srv, durations, results, label="ours"):
    """Scenario 4 (ours only): pair cost on a daemon holding 10 ports vs one holding FLAT_MANY.

    Both daemons run at once with the same wide range; pairs alternate between them in small chunks.
    Every port held has a name of its own ({"name": "svc-N"}: explicit, so each is remembered too);
    4n times pairs for an explicit name (its sticky port), 4l lookup of one name (1.1 and later)."""
    few = xmlrpc.client.ServerProxy(few_srv.url)
    many = xmlrpc.client.ServerProxy(many_srv.url)
    _mc_new(few, 10, held_info)
    registered = 0
    t0 = time.perf_counter()
    while registered < FLAT_MANY:
        n = min(100, FLAT_MANY - registered)     # (250 struct infos would pass the 64 KiB body limit)
        _mc_new(many, n, held_info, registered)
        registered += n
        if time.perf_counter() - t0 > durations["fill_limit"]:
            raise BenchError("registering %d ports took over %.0f s (%d done)"
                             % (FLAT_MANY, durations["fill_limit"], registered))
    fill = time.perf_counter() - t0
    many_srv.check_alive()
    s_few, s_many = pair_samples([few, many], durations["flat"])
    few_srv.check_alive()
    many_srv.check_alive()
    m_few, m_many = statistics.median(s_few) * 1e6, statistics.median(s_many) * 1e6
    results.add("flat_few", label, m_few)
    results.add("flat_many", label, m_many)
    results.add("flat_ratio", label, m_many / m_few)
    results.add("fill", label, FLAT_MANY / fill)
    ops = [("named", lambda proxy: new_del_pair(proxy, {"name": "bench-sticky"}))]
    try:
        many.lookup("svc-7")
        ops.append(("lookup", lambda proxy: proxy.lookup("svc-7")))
    except xmlrpc.client.Fault:     # (a baseline from before names)
        pass
    for key, op in ops:
        s_few, s_many = pair_samples([few, many], durations["flat"], op=op)
        results.add(key + "_few", label, statistics.median(s_few) * 1e6)
        results.add(key + "_many", label, statistics.median(s_many) * 1e6)
    few_srv.check_alive()
    many_srv.check_alive()


def held_info(i):
    return {"name": "svc-%d" % i}


# ----------------------------------------------------------------------------- scenario 7: etcd

def run_cluster(picker, tmp, first, last, durations, results, rnd):
    """Scenario 7 (ours only): pair cost on a daemon publishing to etcd, with etcd up (7a) and
    stopped (7b), against a daemon without --cluster, pairs alternating between the two."""
    etcd = Etcd(tempfile.mkdtemp(prefix="etcd-r%d-" % rnd, dir=tmp)).start()
    plain = clustered = None
    try:
        plain = start_ours(picker, tmp, first, (first + last) // 2, "plain%d" % rnd)
        state_dir = tempfile.mkdtemp(prefix="state-cluster-%d-" % rnd, dir=tmp)
        clustered = Daemon(state_dir, (first + last) // 2 + 1, last, port=picker.take(), log_level="WARNING",
                           name="cluster", cwd=ROOT, extra_args=["--cluster", etcd.url, "--advertise-host", "bench"]
                           ).start()
        plain.wait_ready(15.0)
        proxies = [xmlrpc.client.ServerProxy(plain.url), xmlrpc.client.ServerProxy(clustered.url)]
        for key in ("etcd_up", "etcd_down"):
            if key == "etcd_down":
                etcd.stop()
                deadline = time.monotonic() + 10
                while "cannot be reached" not in proxies[1].status()["cluster"] and time.monotonic() < deadline:
                    proxies[1].delPort(proxies[1].newPort("bench"))     # (the daemon finds out)
            s_plain, s_cluster = pair_samples(proxies, durations["flat"])
            results.add(key + "_plain", "ours", statistics.median(s_plain) * 1e6)
            results.add(key + "_cluster", "ours", statistics.median(s_cluster) * 1e6)
        clustered.check_alive()
    finally:
        for srv in (plain, clustered):
            if srv is not None:
                srv.stop()
        etcd.stop()


# ----------------------------------------------------------------------------- scenario 8: cluster scale

SCALE_HOSTS, SCALE_ENTRIES = 50, 1000   # scenario 8: simulated hosts, and entries of each, in etcd


def fill_cluster(etcd, hosts=SCALE_HOSTS, entries=SCALE_ENTRIES):
    """Publish *hosts* x *entries* registrations in etcd as that many daemons would: in the exact
    shape, each host's keys on a lease of its own."""
    def b64(text):
        return base64.b64encode(text.encode()).decode()
    for h in range(hosts):
        host = "host-%02d" % h
        lease = etcd.call("lease/grant", {"TTL": 3600})["ID"]
        ops = []
        for n in range(entries):
            port = 20000 + n
            value = json.dumps({"host": host, "port": port, "name": "svc-%d" % n, "info": {"name": "svc-%d" % n,
                                "replica": h}, "pid": 0, "since": "2026-01-01T00:00:00Z"}, separators=(",", ":"))
            ops.append({"requestPut": {"key": b64("nodemngr/v1/ports/%s/%d" % (host, port)), "value": b64(value),
                                       "lease": lease}})
            if len(ops) == 128:     # (etcd's default --max-txn-ops)
                etcd.call("kv/txn", {"success": ops})
                ops = []
        if ops:
            etcd.call("kv/txn", {"success": ops})


def run_cluster_scale(picker, tmp, first, last, results, label, script, etcd):
    """Scenario 8: a daemon (ours or the baseline) joins a cluster of SCALE_HOSTS hosts of
    SCALE_ENTRIES entries each in etcd.  While a separate client makes newPort/delPort pairs (one
    every 10 ms), it times the daemon's first locate once its view is read, the median of 20 more,
    and of 3 listCluster (every host's entries); then it counts etcd's revisions for 1,000 local
    changes (500 pairs), and reads the daemon's RSS."""
    state_dir = tempfile.mkdtemp(prefix="state-scale-%s-" % label, dir=tmp)
    srv = Daemon(state_dir, first, last, port=picker.take(), log_level="WARNING", name="scale-" + label, cwd=ROOT,
                 script=script, extra_args=["--cluster", etcd.url, "--advertise-host", "bench-" + label])
    srv.start()
    try:
        proxy = xmlrpc.client.ServerProxy(srv.url)
        began = time.monotonic()
        while time.monotonic() - began < 60 and proxy.status()["cluster"] != "ok":
            time.sleep(0.05)
        results.add("scale_ready", label, (time.monotonic() - began) * 1e3)
        pinger = Pinger(srv.url, tmp, 300, pairs=True)
        try:
            pinger.wait_ready()
            times = []
            for n in range(21):
                t0 = time.perf_counter()
                found = proxy.locate("svc-%d" % (n * 37 % SCALE_ENTRIES))
                times.append(time.perf_counter() - t0)
                if len(found) != SCALE_HOSTS:
                    raise BenchError("locate found %d entries, not %d" % (len(found), SCALE_HOSTS))
            listings = []
            for _ in range(3):
                t0 = time.perf_counter()
                listed = proxy.listCluster()
                listings.append(time.perf_counter() - t0)
                if len(listed) < SCALE_HOSTS * SCALE_ENTRIES:
                    raise BenchError("listCluster listed %d entries, not %d" % (len(listed), SCALE_HOSTS * SCALE_ENTRIES))
            pairs = pinger.finish()
        finally:
            pinger.kill()
        results.add("scale_locate_first", label, times[0] * 1e3)
        results.add("scale_locate", label, statistics.median(times[1:]) * 1e3)
        results.add("scale_list", label, statistics.median(listings) * 1e3)
        results.add("scale_pair_worst", label, max(pairs) * 1e3)
        results.add("scale_pair_p99", label, percentile(pairs, 0.99) * 1e3)
        before = int(etcd.call("kv/range", {"key": "eA=="})["header"]["revision"])
        for _ in range(500):
            proxy.delPort(proxy.newPort("change", 0))
        own = "nodemngr/v1/ports/bench-%s/" % label
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and etcd.get_prefix(own):     # (the last delete reached etcd)
            time.sleep(0.05)
        time.sleep(0.5)         # (and nothing more is on its way)
        results.add("scale_revisions", label, int(etcd.call("kv/range", {"key": "eA=="})["header"]["revision"]) - before)
        results.add("scale_rss", label, memory_kib(srv.proc.pid) / 1024.0)
        srv.check_alive()
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- scenario 6: stalls

def raise_nofile(need):
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; BenchError if that is < need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        raise BenchError("scenario 6 needs %d open files; the limit is %d (hard %s)"
                         % (need, soft, hard))


def _user_tasks(uid):
    """Processes and threads of *uid* now (what RLIMIT_NPROC counts)."""
    n = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/status" % name) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                n += int(fields.get("Threads", "1"))
        except (OSError, ValueError, KeyError):
            pass
    return n


def check_nproc(n):
    """BenchError unless *n* more processes fit under `ulimit -u` (raised to the hard limit)."""
    if os.geteuid() == 0:
        return                                          # the kernel does not apply it to root
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    if soft == resource.RLIM_INFINITY:
        return
    need = _user_tasks(os.getuid()) + n + 100
    if soft < need and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        raise BenchError("scenario 6 starts %d owner processes; ulimit -u is %d and %d are needed"
                         % (n, soft, need))


class Sleepers:
    """*n* live owner processes (`sleep SECONDS`: each ends by itself at its deadline); stop() kills
    each by pid."""

    def __init__(self):
        self.procs = []

    def start(self, n, seconds):
        check_nproc(n)
        exe = shutil.which("sleep") or "/bin/sleep"
        for _ in range(n):
            self.procs.append(subprocess.Popen([exe, "%d" % seconds], stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def check_alive(self):
        dead = [p.pid for p in self.procs if p.poll() is not None]
        if dead:
            raise BenchError("%d owner processes ended early (pid %d ...)" % (len(dead), dead[0]))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []


def bind_foreign(ports):
    """The "other programs": one listening TCP socket on 0.0.0.0 per port, in this process.  Nothing
    ever connects to them; they only make the daemon's host check see the ports as taken."""
    socks = []
    try:
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind(("0.0.0.0", port))
            s.listen(1)
    except OSError as exc:
        for s in socks:
            s.close()
        raise BenchError("could not bind port %d as another program for scenario 6: %s" % (port, exc))
    return socks


class Pinger:
    """The PINGER script as a subprocess; finish() stops it and returns its latencies (s)."""

    def __init__(self, url, tmp, limit, pairs=False):
        script = os.path.join(tmp, "pinger.py")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write(PINGER)
        self.errpath = os.path.join(tmp, "pinger.err")
        with open(self.errpath, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, script, url, repr(PING_PERIOD), repr(limit)]
                                         + ["pairs"] * pairs,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=clean_env(), cwd=tmp, bufsize=0)

    def _error(self, what, line=b""):
        try:
            line = json.loads(line.decode()).get("error") or line
        except ValueError:
            pass
        try:
            with open(self.errpath, "rb") as f:
                tail = f.read().decode("utf-8", "replace").strip()[-400:]
        except OSError:
            tail = ""
        return BenchError("pinger %s: %r %s" % (what, line, tail))

    def wait_ready(self, timeout=15.0):
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise self._error("gave no sign of life within %.0f s" % timeout)
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise self._error("failed at start")

    def finish(self, timeout=STALL_BATCH_TIMEOUT + 15):
        try:
            out, _ = self.proc.communicate(b"stop\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError("pinger did not stop within %.0f s of being asked" % timeout)
        lines = out.strip().splitlines()
        try:
            data = json.loads(lines[-1].decode())
        except (IndexError, ValueError):
            raise self._error("gave no result", out[-200:])
        if data.get("error"):
            raise BenchError("pinger: %s (after %d pings)" % (data["error"], len(data["latencies"])))
        if not data["latencies"]:
            raise BenchError("pinger: no ping was answered")
        return data["latencies"]

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


_FAULT_CODE = re.compile(rb"<name>faultCode</name>\s*<value>\s*<(?:int|i4)>\s*(-?\d+)\s*</")


def _check_all_no_free_port(data, n):
    """BenchError unless the multicall reply *data* holds *n* faults, every one fault 2."""
    codes = _FAULT_CODE.findall(data)
    if len(codes) == n and all(c == b"2" for c in codes):
        return
    try:
        items = xmlrpc.client.loads(data)[0][0]
    except Exception as exc:
        raise BenchError("a failing multicall got a reply that is not an XML-RPC array: %s: %s"
                         % (type(exc).__name__, exc))
    if len(items) != n:
        raise BenchError("a multicall of %d failing newPort got %d results" % (n, len(items)))
    for item in items:
        if not (isinstance(item, dict) and item.get("faultCode") == 2):
            raise BenchError("a newPort in a full range answered %r instead of fault 2" % (item,))


def multicall_body(method, params, n):
    """A system.multicall request of *n* identical calls, written without whitespace and with
    untyped struct values: 300 newPort fit in the daemon's 64 KiB body limit (xmlrpc.client's own
    marshalling of them is 72 KB).  The same body read back by xmlrpc.client is checked to match."""
    one = ("<value><struct><member><name>methodName</name><value>%s</value></member><member><name>"
           "params</name><value><array><data>%s</data></array></value></member></struct></value>"
           % (method, "".join(xmlrpc.client.dumps((p,)).replace("\n", "")[len("<params><param>"):
                                                                         -len("</param></params>")]
                              for p in params)))
    body = ('<?xml version="1.0"?><methodCall><methodName>system.multicall</methodName><params>'
            "<param><value><array><data>%s</data></array></value></param></params></methodCall>"
            % (one * n)).encode()
    want = ([{"methodName": method, "params": list(params)}] * n,)
    if xmlrpc.client.loads(body) != (want, "system.multicall") or len(body) > 64 * 1024:
        raise BenchError("the multicall body of %d %s is wrong or over 64 KiB (%d B)"
                         % (n, method, len(body)))
    return body


def failing_newports(port, duration, batch=STALL_BATCH):
    """system.multicall batches of *batch* newPort("stall") that all fail with fault 2, on one
    kept-alive connection, for *duration* seconds (at least one batch; each must be answered within
    STALL_BATCH_TIMEOUT).  The request is written
    once and each reply checked with a regular expression, so that this process does little work.
    Returns (failed calls, elapsed s, batches, longest batch s)."""
    body = multicall_body("newPort", ["stall"], batch)
    headers = {"Content-Type": "text/xml", "User-Agent": "nodemngr-bench"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=STALL_BATCH_TIMEOUT)
    perf = time.perf_counter
    calls = batches = 0
    longest = 0.0
    try:
        t0 = perf()
        end = t0 + duration
        while batches == 0 or perf() < end:
            b0 = perf()
            try:
                conn.request("POST", "/RPC2", body, headers)
                resp = conn.getresponse()
                data = resp.read()
            except socket.timeout:
                raise BenchError("a multicall of %d failing newPort had no answer within %.0f s (after %d "
                                 "batches): the loop, and every client, waited at least that long"
                                 % (batch, STALL_BATCH_TIMEOUT, batches))
            longest = max(longest, perf() - b0)
            if resp.status != 200:
                raise BenchError("a failing multicall got HTTP %d %s" % (resp.status, resp.reason))
            _check_all_no_free_port(data, batch)
            calls += batch
            batches += 1
        return calls, perf() - t0, batches, longest
    finally:
        conn.close()


def percentile(values, q):
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run_stall(server, sleepers, first, last, durations, results, tmp, label):
    """Scenario 6 against one running daemon with range [first, last] (STALL_RANGE ports).

    Its lower STALL_OWNERS ports are registered, one to each live sleeper; the others are bound by
    this process (listening TCP on 0.0.0.0) before anything is registered, so no port is free.
    (a) idle: the pinger alone for durations["stall_idle"] s, a few reap intervals: its worst
        latency is the longest the loop stalled on the periodic owner check.
    (b) stall: failing newPort multicalls for durations["stall_fail"] s while the pinger runs."""
    pids = sleepers.pids
    socks = bind_foreign(range(first + len(pids), last + 1))
    try:
        proxy = xmlrpc.client.ServerProxy(server.url)
        got = []
        for i in range(0, len(pids), 200):            # 250 with a pid would exceed 64 KiB
            mc = xmlrpc.client.MultiCall(proxy)
            for pid in pids[i:i + 200]:
                mc.newPort("owner %d" % pid, pid)
            got.extend(mc())                            # iterating raises on any fault
        if sorted(got) != list(range(first, first + len(pids))):
            raise BenchError("registering %d owners returned other ports than the %d lowest"
                             % (len(pids), len(pids)))
        server.check_alive()

        pinger = Pinger(server.url, tmp, durations["stall_idle"] + 30)
        try:
            pinger.wait_ready()
            time.sleep(durations["stall_idle"])
            idle = pinger.finish()
        finally:
            pinger.kill()
        server.check_alive()
        results.add("stall_idle_worst", label, max(idle) * 1e3)
        results.add("stall_idle_p99", label, percentile(idle, 0.99) * 1e3)

        pinger = Pinger(server.url, tmp, durations["stall_fail"] + STALL_BATCH_TIMEOUT + 60)
        try:
            pinger.wait_ready()
            calls, elapsed, batches, longest = failing_newports(server.port, durations["stall_fail"])
            busy = pinger.finish()
        finally:
            pinger.kill()
        server.check_alive()
        sleepers.check_alive()
        registered = xmlrpc.client.ServerProxy(server.url).status()["registered"]   # fresh connection
        if registered != len(pids):
            raise BenchError("%d ports registered after the run instead of %d: live owners' ports "
                             "were freed" % (registered, len(pids)))
    finally:
        for s in socks:
            s.close()
    results.add("stall_worst", label, max(busy) * 1e3)
    results.add("stall_p99", label, percentile(busy, 0.99) * 1e3)
    results.add("stall_rate", label, calls / elapsed)
    results.add("stall_pings", label, len(busy))
    results.add("stall_batch", label, longest * 1e3)
    results.add("stall_ping_median", label, statistics.median(busy) * 1e3)


# ----------------------------------------------------------------------------- physical floor

def request_response_bytes(port=21000):
    """Byte-exact sizes of a ServerProxy newPort("bench") request and a server's reply."""
    body = xmlrpc.client.dumps(("bench",), "newPort").encode()
    req = ("POST /RPC2 HTTP/1.1\r\nHost: 127.0.0.1:18000\r\nAccept-Encoding: gzip\r\n"
           "Content-Type: text/xml\r\nUser-Agent: %s\r\nContent-Length: %d\r\n\r\n"
           % (xmlrpc.client.Transport.user_agent, len(body))).encode() + body
    rbody = xmlrpc.client.dumps((port,), methodresponse=True).encode()
    resp = ("HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6 Python/%s\r\n"
            "Date: Thu, 01 Jan 2025 00:00:00 GMT\r\nContent-type: text/xml\r\n"
            "Content-length: %d\r\n\r\n" % (platform.python_version(), len(rbody))).encode() + rbody
    return len(req), len(resp)


def _recv_exact(sock, n):
    got = 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError
        got += len(chunk)


def loopback_rtt_us(duration):
    """Median µs of a loopback TCP round trip of XML-RPC newPort size, echo server in a thread."""
    req_len, resp_len = request_response_bytes()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    reply = b"x" * resp_len

    def serve():
        conn, _ = lsock.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    _recv_exact(conn, req_len)
                    conn.sendall(reply)
            except (EOFError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    samples = []
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = b"y" * req_len
        perf = time.perf_counter
        for _ in range(200):
            client.sendall(request)
            _recv_exact(client, resp_len)
        end = perf() + duration
        while True:
            t0 = perf()
            client.sendall(request)
            _recv_exact(client, resp_len)
            t1 = perf()
            samples.append(t1 - t0)
            if t1 >= end:
                break
    finally:
        client.close()
        thread.join(5)
        lsock.close()
    return statistics.median(samples) * 1e6, req_len, resp_len


def bind_close_us(n=20000, chunk=100):
    """µs of socket() + bind(("127.0.0.1", 0)) + close(), median over chunks of *chunk*."""
    per = []
    perf = time.perf_counter
    for _ in range(n // chunk):
        t0 = perf()
        for _ in range(chunk):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.close()
        per.append((perf() - t0) / chunk)
    return statistics.median(per) * 1e6


# ----------------------------------------------------------------------------- results and table

class Results:
    def __init__(self):
        self.data = {}
        self.errors = {}

    def add(self, key, label, value):
        self.data.setdefault((key, label), []).append(value)

    def error(self, key, label, message):
        self.errors.setdefault((key, label), message)

    def median(self, key, label):
        v = self.data.get((key, label))
        return statistics.median(v) if v else None


def fmt_num(v, unit=""):
    if v is None:
        return "n/a"
    if v >= 100:
        s = "{:,.0f}".format(v)
    elif v >= 10:
        s = "{:.1f}".format(v)
    else:
        s = "{:.2f}".format(v)
    return s + unit


def fmt_rounds(values, unit=""):
    if not values:
        return ""
    return " / ".join(fmt_num(v, unit) for v in values)


def cell(res, key, label, unit="", err_key=None):
    err = res.errors.get((err_key or key, label))
    v = res.median(key, label)
    if err and v is None:
        return "ERROR (see below)"
    return fmt_num(v, unit)


def fmt_ratio(num, den, suffix=""):
    if not (num and den):
        return "n/a"
    r = num / den
    if r < 0.1:
        text = "%.2gx" % r
    elif r < 100:
        text = "%.2fx" % r
    else:
        text = "{:,.0f}x".format(r)
    return text + suffix


def file_id(path):
    """"version V, git blob XXXXXXXXXXXX" of a nodemngr.py copy (the blob id is what `git hash-object`
    prints, so a copy can be matched to its commit)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return "unreadable: %s" % exc
    m = re.search(rb'^__version__ = "([^"]*)"', data, re.M)
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return "version %s, git blob %s" % (m.group(1).decode() if m else "?", blob[:12])


def render(res, floor, args, cmdline, elapsed, load):
    lines = []
    out = lines.append
    base = bool(args.baseline)
    B = "baseline"
    out("# nodemngr benchmark")
    out("")
    out("machine: %s cores, Python %s (%s), %s" % (os.cpu_count(), platform.python_version(),
                                                   platform.python_implementation(), platform.platform()))
    out("load average at start: %s" % load)
    out("command: %s" % cmdline)
    if base:
        out("ours: %s (%s); baseline: %s (%s)" % (os.path.relpath(NODEMNGR, ROOT), file_id(NODEMNGR),
                                                  args.baseline, file_id(args.baseline)))
        out("rounds: %d (stdlib, then ours and baseline, which swap order every round; medians over "
            "rounds); timed window per scenario: %.1f s" % (args.rounds, args.duration))
    else:
        out("rounds: %d (stdlib and ours alternate; medians over rounds); timed window per scenario: %.1f s"
            % (args.rounds, args.duration))
    out("")

    def row(num, name, unit, stdlib, baseline, ours, r_std, r_base, target, met, rs, rb, ro, pad=True):
        cells = ([num, name, unit, stdlib] + ([baseline] if base else []) + [ours, r_std]
                 + ([r_base] if base else []) + [target, met, rs] + ([rb] if base else []) + [ro])
        out("|" + "|".join((" %s " % c if pad else str(c)) if c != "" else " " for c in cells) + "|")

    row("#", "scenario", "unit", "stdlib", B, "ours", "ours/stdlib", "ours/baseline", "target", "met",
        "stdlib per round", "baseline per round", "ours per round")
    row("---", "---", "---", "---:", "---:", "---:", "---:", "---:", "---", "---", "---", "---", "---",
        pad=False)

    def rounds(key, label):
        return fmt_rounds(res.data.get((key, label)))

    def ratio_row(num, name, key, unit, target, target_text):
        s, b, o = res.median(key, "stdlib"), res.median(key, B), res.median(key, "ours")
        ratio = (o / s) if (s and o) else None
        met = "" if ratio is None else ("yes" if ratio >= target else "**no**")
        row(num, name, unit, cell(res, key, "stdlib"), cell(res, key, B, err_key="one"),
            cell(res, key, "ours"), "n/a" if ratio is None else "%.2fx" % ratio, fmt_ratio(o, b),
            target_text, met, rounds(key, "stdlib"), rounds(key, B), rounds(key, "ours"))

    ratio_row(1, "one client, ServerProxy, newPort/delPort pairs", "one", "calls/s", 1.3, ">= 1.3x")
    # 1c: row 1 as time per call, the figure a change on the per-call path (the host check) moves
    us = {label: [1e6 / v for v in res.data.get(("one", label), [])] for label in ("stdlib", B, "ours")}
    med = {label: statistics.median(v) if v else None for label, v in us.items()}
    if med["ours"] or med[B]:
        row("1c", "one client: time per call (row 1 inverted; includes the host check)", "µs/call",
            fmt_num(med["stdlib"]), fmt_num(med[B]), fmt_num(med["ours"]),
            fmt_ratio(med["ours"], med["stdlib"]), fmt_ratio(med["ours"], med[B]), "", "",
            fmt_rounds(us["stdlib"]), fmt_rounds(us[B]), fmt_rounds(us["ours"]))
    ratio_row(2, "four client processes, aggregate", "four", "calls/s", 1.5, ">= 1.5x")
    # 3: absolute target on ours
    s, b, o = res.median("multi", "stdlib"), res.median("multi", B), res.median("multi", "ours")
    row(3, "system.multicall, batches of %d newPort (newPort batches timed)" % BATCH, "newPort/s",
        cell(res, "multi", "stdlib"), cell(res, "multi", B, err_key="one"), cell(res, "multi", "ours"),
        fmt_ratio(o, s), fmt_ratio(o, b), "ours >= 10,000/s",
        "" if o is None else ("yes" if o >= 10000 else "**no**"),
        rounds("multi", "stdlib"), rounds("multi", B), rounds("multi", "ours"))

    def flat(label, key="flat"):
        few, many = res.median(key + "_few", label), res.median(key + "_many", label)
        per = " / ".join("%s→%s" % (fmt_num(a), fmt_num(c)) for a, c in
                         zip(res.data.get((key + "_few", label), []), res.data.get((key + "_many", label), [])))
        if few is None:
            value = "ERROR (see below)" if res.errors.get(("flat", label)) else "n/a"
        else:
            value = "%s → %s" % (fmt_num(few), fmt_num(many))
        ratio = res.median("flat_ratio", label) if key == "flat" else (many / few if few else None)
        return value, per, ratio, many

    labels = ("ours", B) if base else ("ours",)
    flat_rows = (("4", "flat", "pair cost"), ("4n", "named", "pair cost for an explicit name (sticky)"),
                 ("4l", "lookup", "lookup of one name"))
    for num, key, what in flat_rows:
        if not any(res.data.get((key + "_few", x)) or res.errors.get(("flat", x)) for x in labels):
            continue
        o_value, o_per, fr, o_many = flat("ours", key)
        b_value, b_per, b_fr, b_many = flat(B, key)
        if b_fr is not None:
            b_value += " (%.2fx)" % b_fr
        row(num, "flat cost, %s: %s with 10 → %s named ports registered"
            % ("daemons only" if base else "ours only", what, "{:,}".format(FLAT_MANY)),
            "µs/call" if key == "lookup" else "µs/pair", "–",
            b_value, o_value, "n/a" if fr is None else "%.2fx (25k/10)" % fr,
            fmt_ratio(o_many, b_many, " (at 25k)"), "<= 1.3x",
            "" if fr is None else ("yes" if fr <= 1.3 else "**no**"), "", b_per, o_per)
    if any(res.data.get(("proxy", x)) or res.errors.get(("proxy", x)) for x in labels):
        p, pb, s = res.median("proxy", "ours"), res.median("proxy", B), res.median("one", "stdlib")
        row("1p", "ours via NodeMngrProxy, one client", "calls/s", cell(res, "one", "stdlib"),
            cell(res, "proxy", B, err_key="one"), cell(res, "proxy", "ours"), fmt_ratio(p, s),
            fmt_ratio(p, pb), "", "", "", rounds("proxy", B), rounds("proxy", "ours"))
    for num, key, what in (("7a", "etcd_up", "etcd up"), ("7b", "etcd_down", "etcd stopped")):
        p, c = res.median(key + "_plain", "ours"), res.median(key + "_cluster", "ours")
        if p is None and not res.errors.get(("cluster", "ours")):
            continue
        per = " / ".join("%s→%s" % (fmt_num(a), fmt_num(b)) for a, b in zip(
            res.data.get((key + "_plain", "ours"), []), res.data.get((key + "_cluster", "ours"), [])))
        row(num, "ours, newPort/delPort pair: no --cluster → --cluster, %s" % what, "µs/pair", "–", "",
            "ERROR (see below)" if p is None else "%s → %s" % (fmt_num(p), fmt_num(c)),
            "n/a" if p is None else "%.2fx" % (c / p), "", "within noise", "", "", "", per)
    scale = (("8a", "scale_ready", "cluster scale: from start to a view read whole", "ms", ""),
             ("8b", "scale_locate_first", "cluster scale: first locate (one name, %d hosts)" % SCALE_HOSTS, "ms",
              "< 50 ms"),
             ("8c", "scale_locate", "cluster scale: locate, median of 20", "ms", "< 50 ms"),
             ("8d", "scale_list", "cluster scale: listCluster (%s entries), median of 3"
              % fmt_num(SCALE_HOSTS * SCALE_ENTRIES), "ms", ""),
             ("8e", "scale_pair_worst", "cluster scale: worst local newPort/delPort pair meanwhile", "ms", "<= 50 ms"),
             ("8f", "scale_pair_p99", "cluster scale: 99th-percentile pair meanwhile", "ms", ""),
             ("8g", "scale_revisions", "cluster scale: etcd revisions for 1,000 local changes", "revisions", ""),
             ("8h", "scale_rss", "cluster scale: the daemon's RSS at the end", "MiB", "< 100 MiB"))
    for num, key, what, unit, target in scale:
        if not any(res.data.get((key, x)) for x in labels):
            continue
        o, b = res.median(key, "ours"), res.median(key, B)
        row(num, what, unit, "–", cell(res, key, B), cell(res, key, "ours"), "",
            fmt_ratio(o, b) if o is not None and b else "", target, "", "", "", "")
    if floor:
        rtt, req_len, resp_len, bind = floor
        row("5a", "floor: loopback TCP round trip, %d B request / %d B reply (echo thread)"
            % (req_len, resp_len), "µs", "", "", fmt_num(rtt), "", "", "", "", "", "",
            "(= %s round trips/s)" % fmt_num(1e6 / rtt))
        row("5b", "floor: socket() + bind((\"127.0.0.1\", 0)) + close()", "µs", "", "", fmt_num(bind),
            "", "", "", "", "", "", "")
    if any(res.data.get(("stall_worst", x)) or res.errors.get(("stall", x)) for x in labels):
        few_ms = "a few ms (issue 8 #4)"
        for num, name, key, unit, target in (
                ("6a", "one call can stall everyone: worst ping (one every %d ms) while failing newPort "
                 "multicalls run; range %s: %s held by live owners, %s bound by other programs"
                 % (PING_PERIOD * 1e3, "{:,}".format(STALL_RANGE), "{:,}".format(STALL_OWNERS),
                    "{:,}".format(STALL_RANGE - STALL_OWNERS)), "stall_worst", "ms", few_ms),
                ("6b", "same: 99th percentile ping", "stall_p99", "ms", ""),
                ("6c", "same: failing newPort (fault 2, multicalls of %d) answered" % STALL_BATCH,
                 "stall_rate", "calls/s", ""),
                ("6d", "periodic owner check, %s owners: worst ping over %g s with nothing else running"
                 % ("{:,}".format(STALL_OWNERS), args.stall_idle), "stall_idle_worst", "ms", few_ms)):
            o, b = res.median(key, "ours"), res.median(key, B)
            row(num, name, unit, "–", cell(res, key, B, err_key="stall"),
                cell(res, key, "ours", err_key="stall"), "", fmt_ratio(o, b), target, "", "",
                rounds(key, B), rounds(key, "ours"))
    out("")
    notes = [
        "stdlib = `SimpleXMLRPCServer((\"127.0.0.1\", port), logRequests=False)`, defaults otherwise "
        "(single-threaded, HTTP/1.0: a new TCP connection per call), a dict and a lowest-free loop; no "
        "bound-port check, no state. The one line added for scenario 3 is "
        "`server.register_multicall_functions()`.",
        "ours = `nodemngr.py serve` with defaults (state file on, bound-port check on), `--log-level WARNING`.",
    ]
    if base:
        notes.append("baseline = `%s serve`, started exactly as ours. ours/baseline is the ratio of the "
                     "two medians: above 1 is better for rates (calls/s), below 1 for times (µs, ms)."
                     % args.baseline)
    notes += [
        "Same client for both: plain `xmlrpc.client.ServerProxy` (socket default timeout 30 s).",
        "Scenario 4: two more daemons of ours run at once, both with range %d-%d, one holding 10 ports "
        "and one 25,000; pairs alternate between them in chunks of 20 and the median pair time of each is "
        "compared. Server ports are in 13000-13999, outside every range." % WIDE_RANGE,
    ]
    for label in labels:
        fill = res.data.get(("fill", label))
        if fill:
            notes.append("Registering the %s ports (multicall batches of %d) ran at %s newPort/s per round%s."
                         % ("{:,}".format(FLAT_MANY), BATCH, fmt_rounds(fill),
                            " (%s)" % label if base else ""))
    if any(res.data.get(("stall_worst", x)) or res.errors.get(("stall", x)) for x in labels):
        notes.append(
            "Scenario 6 (issue 8 item 4): a fresh daemon per round with a range of %s ports; its lowest %s "
            "are registered by `newPort(info, pid)`, one to each of %s live `sleep` processes, and the "
            "rest are bound first by the benchmark process (listening TCP on 0.0.0.0, never connected "
            "to), so no port is free. A separate pinger process sends `ping` every %d ms on its own "
            "kept-alive connection and times each. 6d: the pinger alone for %.1f s (the daemon looks at "
            "its owners every 2 s). 6a-6c: for %.1f s (and at least one batch) one client sends "
            "`system.multicall` batches of %d `newPort` that all fail with fault 2, on one kept-alive "
            "connection; the daemon must still hold all %s ports afterwards."
            % ("{:,}".format(STALL_RANGE), "{:,}".format(STALL_OWNERS), "{:,}".format(STALL_OWNERS),
               PING_PERIOD * 1e3, args.stall_idle, args.stall_fail, STALL_BATCH,
               "{:,}".format(STALL_OWNERS)))
        for label in labels:
            if res.data.get(("stall_pings", label)):
                notes.append(
                    "Scenario 6, %s, per round: longest failing multicall %s ms; pings answered while "
                    "failing calls ran %s (median %s ms); idle 99th percentile ping %s ms." % (
                        label, fmt_rounds(res.data.get(("stall_batch", label))),
                        " / ".join("%d" % n for n in res.data.get(("stall_pings", label))),
                        fmt_rounds(res.data.get(("stall_ping_median", label))),
                        fmt_rounds(res.data.get(("stall_idle_p99", label)))))
    for (key, label), msg in sorted(res.errors.items()):
        notes.append("**ERROR** %s/%s: %s" % (label, key, msg))
    for n in notes:
        out("- " + n)
    out("")
    out("total run time: %.1f s" % elapsed)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

ERRORS = (BenchError, ServerError, OSError, xmlrpc.client.Error, EOFError, http.client.HTTPException,
          subprocess.SubprocessError)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (1 round, short windows)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of stdlib/ours (default 3, quick 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help="timed window per scenario in seconds (default 2, quick 0.5)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="an older copy of nodemngr.py (e.g. `git show 482246a:nodemngr.py > "
                    "/tmp/nodemngr-1.0.0.py`): every scenario of ours also runs against it")
    ap.add_argument("--no-stall", action="store_true",
                    help="skip scenario 6 (starts %d sleep processes)" % STALL_OWNERS)
    ap.add_argument("--no-cluster", action="store_true", help="skip scenario 7 (starts etcd, if installed)")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 0.5 if args.quick else 2.0
    if args.rounds < 1 or args.duration <= 0:
        ap.error("--rounds must be >= 1 and --duration > 0")
    if args.baseline is not None:
        if not os.path.isfile(args.baseline):
            ap.error("--baseline %s: no such file" % args.baseline)
        args.baseline = os.path.abspath(args.baseline)
    args.stall_idle = 2.5 if args.quick else 6.0        # >= one reap interval (2 s); full: three
    args.stall_fail = 1.5 if args.quick else 5.0
    return args


def load_proxy_factory():
    if not os.path.exists(PROXY_MODULE):
        return None
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import nodemngr_proxy                               # noqa: E402  (optional, only if present)

    def factory(port):
        return nodemngr_proxy.NodeMngrProxy(host="127.0.0.1", port=port, autostart=False)
    return factory


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cmdline = shlex.join([os.path.basename(sys.executable)] + sys.argv) if hasattr(shlex, "join") \
        else " ".join([os.path.basename(sys.executable)] + sys.argv)
    start = time.monotonic()
    try:
        load = " ".join("%.2f" % x for x in os.getloadavg()) + " (1/5/15 min; other work on the machine skews results)"
    except OSError:
        load = "unknown"
    socket.setdefaulttimeout(30)
    d = {"pairs": args.duration, "multi": min(args.duration, 1.5), "flat": min(args.duration, 1.5),
         "fill_limit": 15.0, "stall_idle": args.stall_idle, "stall_fail": args.stall_fail}
    daemons = [("ours", NODEMNGR)] + ([("baseline", args.baseline)] if args.baseline else [])
    stall_each = 0 if args.no_stall else (d["stall_idle"] + d["stall_fail"] + STALL_BATCH_TIMEOUT + 25)
    # A safety net against hangs, not a schedule: stdlib 3 windows; each daemon 4 windows plus the
    # flat fill (up to fill_limit) and starts; scenario 6 bounded by STALL_BATCH_TIMEOUT.
    per_daemon = 4 * args.duration + d["fill_limit"] + 8 + stall_each
    limit = int(40 + args.rounds * (3 * args.duration + 3 + len(daemons) * per_daemon))
    # default: 403 s, 739 s with --baseline; --quick: 143 s, 242 s with --baseline

    def on_alarm(signum, frame):
        raise Watchdog("run exceeded %d s" % limit)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)

    res = Results()
    floor = None
    tmp = tempfile.mkdtemp(prefix="nodemngr-bench-")
    servers = []
    sleepers = Sleepers()
    have_ours = os.path.exists(NODEMNGR)
    try:
        picker = PortPicker()
        first, last = free_range(1000)
        stall_range = None
        if not args.no_stall and have_ours:
            try:
                raise_nofile(STALL_RANGE - STALL_OWNERS + 200)
                stall_range = find_stall_range()
            except BenchError as exc:
                for label, _ in daemons:
                    res.error("stall", label, str(exc))
        try:
            proxy_factory = load_proxy_factory()
        except Exception as exc:
            proxy_factory = None
            res.error("proxy", "ours", "importing nodemngr_proxy failed: %s: %s" % (type(exc).__name__, exc))
        if not have_ours:
            res.error("one", "ours", "%s does not exist; only stdlib and floor measured" % NODEMNGR)
        for rnd in range(args.rounds):
            # (a) stdlib
            srv = start_stdlib(picker, tmp, first, last)
            servers.append(srv)
            try:
                srv.wait_ready(15.0)
                run_common(srv, d, res, "stdlib")
            except ERRORS as exc:
                res.error("one", "stdlib", "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
            finally:
                srv.stop()
                servers.remove(srv)
            if not have_ours:
                continue
            order = daemons if rnd % 2 == 0 else daemons[::-1]
            # (b) ours (and the baseline), scenarios 1-3 (+ NodeMngrProxy)
            for label, script in order:
                srv = start_ours(picker, tmp, first, last, "r%d" % rnd, script, label)
                servers.append(srv)
                try:
                    srv.wait_ready(15.0)
                    run_common(srv, d, res, label, proxy_factory)
                except ERRORS as exc:
                    res.error("one", label, "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
                finally:
                    srv.stop()
                    servers.remove(srv)
            # (b') flat cost: two daemons on the wide range, 10 vs FLAT_MANY registered
            for label, script in order:
                pair = []
                try:
                    for tag in ("few", "many"):
                        srv = start_ours(picker, tmp, WIDE_RANGE[0], WIDE_RANGE[1], "%s%d" % (tag, rnd),
                                         script, label)
                        servers.append(srv)
                        pair.append(srv)
                    for srv in pair:
                        srv.wait_ready(15.0)
                    run_flat(pair[0], pair[1], d, res, label)
                except ERRORS as exc:
                    res.error("flat", label, "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
                finally:
                    for srv in pair:
                        srv.stop()
                        servers.remove(srv)
            # (c) scenario 6: one call can stall everyone (1,000 live owners, 1,000 foreign-bound)
            if stall_range is None:
                continue
            if not sleepers.procs:
                try:
                    sleepers.start(STALL_OWNERS, limit + 60)
                except (BenchError, OSError) as exc:
                    sleepers.stop()
                    for label, _ in daemons:
                        res.error("stall", label, "starting the owner processes: %s" % exc)
                    stall_range = None
                    continue
            for label, script in order:
                srv = start_ours(picker, tmp, stall_range[0], stall_range[1], "s%d" % rnd, script, label)
                servers.append(srv)
                try:
                    srv.wait_ready(15.0)
                    run_stall(srv, sleepers, stall_range[0], stall_range[1], d, res, tmp, label)
                except ERRORS as exc:
                    res.error("stall", label, "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
                finally:
                    srv.stop()
                    servers.remove(srv)
        sleepers.stop()
        for rnd in range(args.rounds if have_ours and etcd_binary() and not args.no_cluster else 0):
            try:
                run_cluster(picker, tmp, first, last, d, res, rnd)
            except ERRORS as exc:
                res.error("cluster", "ours", "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
        if have_ours and etcd_binary() and not args.no_cluster:    # scenario 8, once: ours and the baseline
            etcd = Etcd(tempfile.mkdtemp(prefix="etcd-scale-", dir=tmp)).start()
            try:
                fill_cluster(etcd)
                for label, script in daemons:
                    try:
                        run_cluster_scale(picker, tmp, first, last, res, label, script, etcd)
                    except ERRORS as exc:
                        res.error("scale", label, "%s: %s" % (type(exc).__name__, exc))
            except ERRORS as exc:
                res.error("scale", "ours", "filling etcd: %s: %s" % (type(exc).__name__, exc))
            finally:
                etcd.stop()
        rtt, req_len, resp_len = loopback_rtt_us(d["flat"])
        floor = (rtt, req_len, resp_len, bind_close_us())
    except Watchdog as exc:
        res.error("run", "bench", str(exc))
    finally:
        signal.alarm(0)
        for srv in list(servers):
            srv.stop()
        sleepers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(res, floor, args, cmdline, time.monotonic() - start, load))
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
