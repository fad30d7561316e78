#!/usr/bin/env python3
"""nodemngr benchmark: our daemon against release 1.0.0, the stdlib server a user would write, and a no-op server.

Run from the repository root::

    python3 bench/bench.py                      # full run (3 rounds), 5 to 7 minutes with wrk and etcd
    python3 bench/bench.py --quick              # short smoke run
    python3 bench/bench.py --only speed         # just the speed table (issue 22), about 2 minutes
    python3 bench/bench.py --only speed --quick # the same, about 20 s
    python3 bench/bench.py --rounds 5
    git show HEAD~5:nodemngr.py > /tmp/nodemngr-before.py
    python3 bench/bench.py --baseline /tmp/nodemngr-before.py     # before/after in one run

Every server runs as a subprocess on 127.0.0.1, on a port found free at start, and is measured with
the same clients.  The speed table (issue 22) has five columns, all from the same run: the bare
stdlib server, release 1.0.0 (tests/data/nodemngr-1.0.0.py, started exactly as ours), the baseline
(only with ``--baseline PATH``), ours, and a no-op asyncio server that parses just enough HTTP to
answer each call with a canned reply: the ceiling no daemon can beat for these clients.  Each round
starts every server afresh, in an order reversed every other round so that drift hits all alike; the
table shows the median over rounds.  Its rows: one and four ServerProxy clients making newPort/delPort
pairs, multicall batches, the daemon's CPU per call (utime+stime of the serving pid over the one-client
window), wrk (``-t1 -c4``, where it is installed) with pairs and with ping, ``import nodemngr`` in a
fresh interpreter, and the cold first call (a fresh client process whose first newPort starts the
daemon).  The second table keeps the scenarios that run for ours and the baseline only: the
NodeMngrProxy client, flat cost (4), the physical floor (5), one call can stall everyone (6: a daemon
whose range of 2,000 ports is full, 1,000 registered to live ``sleep`` owners and 1,000 bound by the
benchmark; a second process pings every 10 ms while failing newPort multicalls run, and again with
nothing else running), ``--cluster`` cost (7) and cluster scale (8), those two where etcd is installed.
Standard library only (wrk optional); everything started is stopped by pid and every temporary
directory is removed, whatever happens.
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
                     clean_env, memory_kib, port_is_free, scan_free_range, stop_pid, stop_process)
from etcd_support import Etcd, etcd_binary  # noqa: E402

PROXY_MODULE = os.path.join(ROOT, "nodemngr_proxy.py")
RELEASE_1_0_0 = os.path.join(ROOT, "tests", "data", "nodemngr-1.0.0.py")         # 482246a's nodemngr.py
RELEASE_1_0_0_PROXY = os.path.join(ROOT, "tests", "data", "nodemngr_proxy-1.0.0.py")    # and its client
BATCH = 250                     # newPort calls per system.multicall batch
BLOCK = 8                       # scenario 4b: ports of a block (newPorts), against as many newPort calls
FLAT_MANY = 25000               # registered ports for the "flat cost" case
WIDE_RANGE = (20000, 59999)     # range for the 25,000-registered daemon
STALL_RANGE = 2000              # scenario 6: ports in the range, all of them unavailable:
STALL_OWNERS = 1000             #   this many registered, one each to a live owner process,
STALL_BATCH = 300               #   the rest bound by the benchmark; failing newPort per multicall
PING_PERIOD = 0.010             # scenario 6: the pinger sends one ping every 10 ms
REGISTRY_SCALE = 25000          # scenario 9: registrations with struct infos ({"name", "info"}, 500 names)
REGISTRY_PING = 0.002           # scenario 9: one ping every 2 ms while listings are made
STALL_BATCH_TIMEOUT = 45.0      # scenario 6: a failing batch with no answer by then is an error
WRK_ARGS = ["-t1", "-c4"]       # the speed table's wrk rows: one wrk thread, four connections
IMPORT_SAMPLES = 15             # speed table: `import nodemngr` samples per version (quick: 5)
COLD_SAMPLES = 7                # speed table: cold first calls per version (quick: 3), after one warm-up
COLD_TIMEOUT = 10.0             # a cold client still running after this is stopped, and the sample an error

# (a) The bare stdlib server, as a user would write it: default SimpleXMLRPCServer, a dict, a loop.
# The one extra line a user adds for the multicall row (s3) is register_multicall_functions().
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

# (d) The no-op server of the speed table (issue 22): the ceiling for these clients.  asyncio on the
# default loop, one plain Protocol per connection, HTTP/1.1 keep-alive (closing after the reply for
# HTTP/1.0 or `Connection: close`).  It parses only the head's end, Content-Length and the text
# between <methodName> tags, and answers each call with a canned reply shaped and sized like ours
# (the same headers, the same XML): newPort -> FIRST, delPort -> 0, ping -> a string, else a fault.
# No multicall.
NOOP_SERVER = r'''
import asyncio
import sys
import time
from email.utils import formatdate

PORT, GIVEN = int(sys.argv[1]), int(sys.argv[2])
MAX_REQUEST = 1 << 20


def _reply(value):
    return ("<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value>%s</value>\n</param>\n"
            "</params>\n</methodResponse>\n" % value).encode()


BODIES = {b"newPort": _reply("<int>%d</int>" % GIVEN), b"delPort": _reply("<int>0</int>"),
          b"ping": _reply("<string>NodeMngr at bench is alive</string>")}
FAULT = (b"<?xml version='1.0'?>\n<methodResponse>\n<fault>\n<value><struct>\n<member>\n<name>faultCode</name>\n"
         b"<value><int>-32601</int></value>\n</member>\n<member>\n<name>faultString</name>\n"
         b"<value><string>method not offered by the no-op server</string></value>\n</member>\n</struct></value>\n"
         b"</fault>\n</methodResponse>\n")
HEAD = ("HTTP/1.1 200 OK\r\nServer: nodemngr-noop/0\r\nContent-Type: text/xml\r\nDate: %s\r\n"
        "Content-Length: %d\r\n%s\r\n")
_date = [0, ""]


def head(n, close):
    now = int(time.time())
    if now != _date[0]:
        _date[0], _date[1] = now, formatdate(now, usegmt=True)
    return (HEAD % (_date[1], n, "Connection: close\r\n" if close else "")).encode()


class NoOp(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buf = transport, b""

    def data_received(self, data):
        buf = self.buf + data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_REQUEST:
                    return self.refuse(b"413 Payload Too Large")
                break
            lower = buf[:end].lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                return self.refuse(b"411 Length Required")
            stop = lower.find(b"\r\n", at + 2)
            try:
                length = int(lower[at + 17:stop if stop >= 0 else end])
            except ValueError:
                return self.refuse(b"400 Bad Request")
            total = end + 4 + length
            if length < 0 or total > MAX_REQUEST:
                return self.refuse(b"413 Payload Too Large")
            if len(buf) < total:
                break
            body = buf[end + 4:total]
            buf = buf[total:]
            a = body.find(b"<methodName>")
            b = body.find(b"</methodName>", a)
            reply = BODIES.get(body[a + 12:b].strip() if 0 <= a < b else b"", FAULT)
            eol = lower.find(b"\r\n")
            close = (lower[:eol] if eol >= 0 else lower).endswith(b"http/1.0") or b"\r\nconnection: close" in lower
            self.transport.write(head(len(reply), close) + reply)
            if close:
                self.transport.close()
                return
        self.buf = buf

    def refuse(self, status):
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        self.transport.close()


async def main():
    server = await asyncio.get_running_loop().create_server(NoOp, "127.0.0.1", PORT, reuse_address=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

# (e) wrk's Lua scripts (speed table).  Both count, per wrk thread, the responses, those whose body
# holds a <fault> and those whose status is not 200; done() prints them on one NODEMNGR-BENCH line
# (with wrk's own socket error counts) for bench to read: any fault or bad status makes the cell an
# ERROR.  The counters are globals so that done() can read each thread's with thread:get.
WRK_COUNT = r'''
responses, faults, bad_status = 0, 0, 0

local function count(status, body)     -- true if the response is a good one
   responses = responses + 1
   if status ~= 200 then bad_status = bad_status + 1 end
   if string.find(body, "<fault>", 1, true) then
      faults = faults + 1
      return false
   end
   return status == 200
end

local threads = {}
function setup(thread) threads[#threads + 1] = thread end

function done(summary, latency, requests)
   local r, f, b = 0, 0, 0
   for _, t in ipairs(threads) do
      r, f, b = r + t:get("responses"), f + t:get("faults"), b + t:get("bad_status")
   end
   local e = summary.errors
   io.write(string.format("NODEMNGR-BENCH responses=%d faults=%d bad_status=%d " ..
                          "connect=%d read=%d write=%d status=%d timeout=%d\n",
                          r, f, b, e.connect, e.read, e.write, e.status, e.timeout))
end
'''

# newPort("bench") / delPort(a port newPort gave): one queue of ports per wrk thread (module level,
# shared by its connections); request() sends delPort of a queued port if there is one, else newPort;
# response() queues the port of each newPort reply (delPort's is int 0).
WRK_PAIRS = WRK_COUNT + r'''
local NEW = "<?xml version='1.0'?>\n<methodCall>\n<methodName>newPort</methodName>\n<params>\n<param>\n" ..
            "<value><string>bench</string></value>\n</param>\n</params>\n</methodCall>\n"
local DEL = "<?xml version='1.0'?>\n<methodCall>\n<methodName>delPort</methodName>\n<params>\n<param>\n" ..
            "<value><int>%d</int></value>\n</param>\n</params>\n</methodCall>\n"
local headers = {["Content-Type"] = "text/xml"}
local queue = {}

function request()
   local n = #queue
   if n > 0 then
      local port = queue[n]
      queue[n] = nil
      return wrk.format("POST", "/RPC2", headers, string.format(DEL, port))
   end
   return wrk.format("POST", "/RPC2", headers, NEW)
end

function response(status, hdrs, body)
   if count(status, body) then
      local port = tonumber(string.match(body, "<int>%s*(%d+)%s*</int>") or string.match(body, "<i4>%s*(%d+)%s*</i4>"))
      if port and port > 0 then queue[#queue + 1] = port end
   end
end
'''

# Every request a ping (wrk's static request: no Lua per request).
WRK_PING = WRK_COUNT + r'''
wrk.method = "POST"
wrk.path = "/RPC2"
wrk.headers["Content-Type"] = "text/xml"
wrk.body = "<?xml version='1.0'?>\n<methodCall>\n<methodName>ping</methodName>\n<params>\n</params>\n</methodCall>\n"

function response(status, hdrs, body)
   count(status, body)
end
'''

# (f) `import nodemngr` in a fresh interpreter, timed around the import only; argv[1] is the folder
# holding the version's copy as nodemngr.py (every version imports by the same name).
IMPORT_TIMER = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
t0 = time.perf_counter()
import nodemngr
t1 = time.perf_counter()
if not nodemngr.__file__.startswith(sys.argv[1]):
    sys.exit("imported %s, not the copy in %s" % (nodemngr.__file__, sys.argv[1]))
print(repr(t1 - t0))
'''

# (g) The cold first call: a fresh client whose first newPort starts the daemon (auto-start), the
# daemon's port, range and state given by the environment.  argv[1]: the version's folder; argv[2]:
# the sample's folder (unused here: it marks the process and its forks for the clean-up).
COLD_CLIENT = r'''
import sys
sys.path.insert(0, sys.argv[1])
from %s import NodeMngrProxy
print(NodeMngrProxy().newPort("bench"))
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


def start_noop(picker, tmp, first):
    """The no-op server (NOOP_SERVER); its newPort always answers *first*."""
    script = os.path.join(tmp, "noop_server.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(NOOP_SERVER)
    port = picker.take()
    argv = [sys.executable, script, str(port), str(first)]
    return ServerProcess("noop", argv, port, os.path.join(tmp, "noop-%d.log" % port), cwd=ROOT).start(wait=False)


def _cmdline(pid):
    """The arguments of process *pid* ([] if it is gone or unreadable)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def serving_pid(server):
    """The pid of the process that serves *server*, whose CPU the speed table reads.  A nodemngr
    says its own in status(); the stdlib and no-op servers are the Python that runs their script
    (ServerProcess execs it: the benchmark never uses the tests' fork server), checked by its
    command line."""
    if isinstance(server, Daemon):
        pid = xmlrpc.client.ServerProxy(server.url).status()["pid"]
        if not any(os.path.abspath(server.script) in a for a in _cmdline(pid)):     # (in the launcher)
            raise BenchError("status() says pid %d, whose command line is not %s's" % (pid, server.name))
        return pid
    pid = server.proc.pid
    if server.argv()[1] not in _cmdline(pid):
        raise BenchError("pid %d does not run %s; cannot read the server's CPU" % (pid, server.argv()[1]))
    return pid


def cpu_seconds(pid):
    """utime + stime of process *pid* (all its threads) in seconds: fields 14 and 15 of /proc/PID/stat."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()      # (the name, field 2, may hold spaces)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")      # fields[0] is field 3


# ----------------------------------------------------------------------------- client workloads

def pairs_loop(proxy, duration, cpu_pid=None):
    """newPort("bench")/delPort(p) pairs for *duration* seconds; returns (calls, elapsed, cpu): cpu
    is the CPU seconds process *cpu_pid* used over the same window (None without cpu_pid)."""
    for _ in range(3):                                  # warm-up: connection, caches
        proxy.delPort(proxy.newPort("bench"))
    pairs = 0
    cpu0 = cpu_seconds(cpu_pid) if cpu_pid else None
    t0 = time.perf_counter()
    end = t0 + duration
    now = t0
    while now < end:
        port = proxy.newPort("bench")
        if proxy.delPort(port) != 0:
            raise BenchError("delPort(%r) did not return 0" % port)
        pairs += 1
        now = time.perf_counter()
    cpu = cpu_seconds(cpu_pid) - cpu0 if cpu_pid else None
    return 2 * pairs, now - t0, cpu


def _worker(url, duration, barrier, results, index):
    try:
        socket.setdefaulttimeout(30)
        proxy = xmlrpc.client.ServerProxy(url)
        proxy.delPort(proxy.newPort("bench"))           # warm-up before the common start
        barrier.wait(30)
        calls, elapsed, _ = pairs_loop(proxy, duration)
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

def run_wrk(url, script, seconds, cwd):
    """wrk WRK_ARGS for *seconds* with the Lua *script* against *url*; returns (requests/s, counts)
    where counts are the script's NODEMNGR-BENCH line (responses, faults, bad_status, and wrk's
    socket errors: connect, read, write, status, timeout).  BenchError if any response was a fault
    or not a 200, or wrk failed."""
    argv = [shutil.which("wrk") or "wrk"] + WRK_ARGS + ["-d%ds" % seconds, "-s", script, url]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=cwd)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish within %d s" % (seconds + 30))
    finally:
        if proc.poll() is None:
            stop_process(proc)
        proc.stdout.close()
    text = out.decode("utf-8", "replace")
    rate = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    line = re.search(r"^NODEMNGR-BENCH (.*)$", text, re.M)
    if proc.returncode != 0 or not rate or not line:
        raise BenchError("wrk (status %s) printed no result: %s" % (proc.returncode, " ".join(text.split())[-300:]))
    counts = {k: int(v) for k, v in (kv.split("=") for kv in line.group(1).split())}
    if counts["faults"] or counts["bad_status"]:
        raise BenchError("%d faults and %d statuses other than 200 in %d responses" % (
            counts["faults"], counts["bad_status"], counts["responses"]))
    return float(rate.group(1)), counts


def run_speed(server, label, d, res, rnd, wrk_scripts, tmp, proxy_factory=None):
    """The speed table's scenarios (issue 22) against one running server; a failure is recorded
    against its row and the next row still runs, unless the server is gone.  *wrk_scripts*:
    [(key, Lua script path)], empty where wrk is not installed."""
    url = server.url

    def one():          # one client, and the serving process's CPU over the same window
        pid = serving_pid(server)
        calls, elapsed, cpu = pairs_loop(xmlrpc.client.ServerProxy(url), d["pairs"], cpu_pid=pid)
        res.add("one", label, calls / elapsed)
        res.add("cpu", label, cpu / calls * 1e6)

    def wrk(key, script):
        rate, counts = run_wrk(url, script, d["wrk"], tmp)
        res.add(key, label, rate)
        socket_errors = sum(counts[k] for k in ("connect", "read", "write", "timeout"))
        if socket_errors:
            res.add(key + "_socket_errors", label, socket_errors)

    def proxy():        # (the second table's 1p row: ours and the baseline only)
        nm = proxy_factory(server.port)
        try:
            calls, elapsed, _ = pairs_loop(nm, d["pairs"])
        finally:
            nm.close()
        res.add("proxy", label, calls / elapsed)

    steps = [(("one", "cpu"), one),
             (("four",), lambda: res.add("four", label, four_clients(url, d["pairs"])))]
    if label != "noop":                             # (the no-op server has no multicall)
        steps.append((("multi",), lambda: res.add("multi", label, multicall_rate(
            xmlrpc.client.ServerProxy(url), d["multi"]))))
    for key, script in wrk_scripts:
        steps.append(((key,), lambda key=key, script=script: wrk(key, script)))
    if proxy_factory is not None:
        steps.append((("proxy",), proxy))
    for n, (keys, fn) in enumerate(steps):
        try:
            fn()
            server.check_alive()
        except ERRORS as exc:
            for key in keys:
                res.error(key, label, "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
            if server.proc.poll() is not None:
                for later, _ in steps[n + 1:]:
                    for key in later:
                        res.error(key, label, "round %d: not run, the server had exited" % (rnd + 1))
                return


# ----------------------------------------------------------------------------- speed table: import, cold start

def has_client_class(script):
    """Whether the nodemngr.py *script* defines NodeMngrProxy itself (1.3 and later) rather than
    in nodemngr_proxy.py (1.0.0 to 1.2, whose nodemngr.py at most forwards the name there)."""
    with open(script, "rb") as f:
        return re.search(rb"^class NodeMngrProxy\b", f.read(), re.M) is not None


def proxy_beside(script):
    """The nodemngr_proxy.py that goes with the nodemngr.py *script*: beside it under that name,
    or with the same suffix (tests/data/nodemngr-1.0.0.py -> nodemngr_proxy-1.0.0.py); or None."""
    folder, name = os.path.split(script)
    names = ["nodemngr_proxy.py"]
    if name.startswith("nodemngr") and name != "nodemngr.py":
        names.append("nodemngr_proxy" + name[len("nodemngr"):])
    for candidate in names:
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def version_folders(tmp, versions, res):
    """For each (label, nodemngr.py) of *versions*, a folder holding it as nodemngr.py, and the
    client's nodemngr_proxy.py beside it when the client lives there: [(label, folder, client
    module)].  A version whose client cannot be found gets module None (its cold row an error)."""
    out = []
    for label, script in versions:
        folder = os.path.join(tmp, "version-" + label)
        os.mkdir(folder)
        shutil.copyfile(script, os.path.join(folder, "nodemngr.py"))
        module = "nodemngr"
        if not has_client_class(script):
            proxy = RELEASE_1_0_0_PROXY if script == RELEASE_1_0_0 else proxy_beside(script)
            if proxy is None and script == NODEMNGR and os.path.exists(PROXY_MODULE):
                proxy = PROXY_MODULE
            if proxy is None:
                module = None
                res.error("cold", label, "%s has no NodeMngrProxy and there is no nodemngr_proxy.py beside it"
                          % script)
            else:
                shutil.copyfile(proxy, os.path.join(folder, "nodemngr_proxy.py"))
                module = "nodemngr_proxy"
        if module:
            res.info[("cold", label)] = "`from %s import NodeMngrProxy`" % module
        out.append((label, folder, module))
    return out


def python_env(**extra):
    """clean_env(**extra) for a fresh Python of the speed table; bytecode files written and read
    (the warm-up's __pycache__ serves every sample, as it does for a user)."""
    env = clean_env(**extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def import_times(folders, samples, res):
    """`import nodemngr` of each version in a fresh interpreter, *samples* times, versions
    alternating; ms into res ("import").  One untimed run each first (bytecode cache)."""
    env = python_env()
    live = list(folders)
    for i in range(-1, samples):
        for label, folder, _ in (live if i % 2 == 0 else live[::-1]):
            try:
                done = subprocess.run([sys.executable, "-c", IMPORT_TIMER, folder], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                      timeout=30)
                text = done.stdout.decode("utf-8", "replace").strip()
                if done.returncode != 0:
                    raise BenchError("status %d: %s" % (done.returncode, text[-300:]))
                seconds = float(text.splitlines()[-1])
            except (ERRORS + (ValueError, IndexError)) as exc:
                res.error("import", label, "%s: %s" % (type(exc).__name__, exc))
                live = [v for v in live if v[0] != label]
                continue
            if i >= 0:
                res.add("import", label, seconds * 1e3)


def pids_of_folder(folder):
    """Processes of this user with *folder* (or a path in it) among their arguments: a cold sample's
    client, its forks, and the daemon it started (whose --state or --log-file is in *folder*)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        if any(a == folder or a.startswith(folder + os.sep) for a in _cmdline(int(name))):
            found.append(int(name))
    return found


def stop_cold_daemon(port, folder):
    """Stop what a cold sample started: the daemon that answers at *port* (its pid from status(),
    checked by its command line), then anything else still running with *folder* among its
    arguments; each by pid, SIGTERM then SIGKILL.  Returns the daemon's pid, or None."""
    pid = None
    try:
        pid = xmlrpc.client.ServerProxy("http://127.0.0.1:%d/RPC2" % port).status()["pid"]
    except ERRORS:
        pass
    mine = pids_of_folder(folder)
    if pid is not None and pid in mine:
        stop_pid(pid)
    for other in mine:
        stop_pid(other)
    if pid is not None and pid not in mine:
        raise BenchError("status() at port %d says pid %d, which is not a daemon started for this sample"
                         % (port, pid))
    return pid


def cold_sample(folder, module, picker, tmp, started):
    """One cold first call: a fresh client process (python -c COLD_CLIENT) whose newPort starts the
    daemon, on a fresh port, range and state folder given by the environment; ms of wall time from
    starting the client to its exit, as this process sees it.  The daemon is stopped afterwards.
    *started*: the sample folders, for the clean-up of whatever still runs."""
    port = picker.take()
    first, last = free_range(20)
    work = tempfile.mkdtemp(prefix="cold-", dir=tmp)
    started.append(work)
    env = python_env(NODEMNGR_HOST="127.0.0.1", NODEMNGR_PORT=port, NODEMNGR_STATE=os.path.join(work, "state.sqlite3"),
                     NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last)
    outpath = os.path.join(work, "client.out")
    try:
        with open(outpath, "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", COLD_CLIENT % module, folder, work],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=folder)
            try:
                status = proc.wait(COLD_TIMEOUT)
                elapsed = time.perf_counter() - t0
            except subprocess.TimeoutExpired:
                raise BenchError("the client had not ended after %g s" % COLD_TIMEOUT)
            finally:
                if proc.poll() is None:
                    stop_process(proc)
        with open(outpath, "rb") as f:
            text = f.read().decode("utf-8", "replace").strip()
        if status != 0 or not text.isdigit():
            raise BenchError("the client failed (status %d): %s" % (status, " ".join(text.split())[-300:]))
        if not first <= int(text) <= last:
            raise BenchError("newPort gave %s, outside the range %d-%d given by the environment" % (text, first, last))
    finally:
        pid = stop_cold_daemon(port, work)
    if pid is None:
        raise BenchError("the client ended, and no daemon answered status() at port %d" % port)
    return elapsed * 1e3


def cold_times(folders, samples, res, picker, tmp, started):
    """The cold first call of each version, *samples* times, versions alternating, after one
    untimed sample each (bytecode cache); ms into res ("cold").  A version stops at its first error."""
    live = [v for v in folders if v[2] is not None]
    for i in range(-1, samples):
        for label, folder, module in (live if i % 2 == 0 else live[::-1]):
            try:
                ms = cold_sample(folder, module, picker, tmp, started)
            except ERRORS as exc:
                res.error("cold", label, "%s: %s" % (type(exc).__name__, exc))
                live = [v for v in live if v[0] != label]
                continue
            if i >= 0:
                res.add("cold", label, ms)


def run_flat(few_srv, many_srv, durations, results, label="ours"):
    """Scenario 4 (ours only): pair cost on a daemon holding 10 ports vs one holding FLAT_MANY.

    Both daemons run at once with the same wide range; pairs alternate between them in small chunks.
    Every port held has a name of its own ({"name": "svc-N"}: explicit, so each is remembered too);
    4n times pairs for an explicit name (its sticky port), 4l lookup of one name (1.1 and later), 4b a
    block of BLOCK ports (newPorts + delPorts, 1.3) against 4s, the same ports one call each."""
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
    try:
        many.delPorts(many.newPorts("bench-block", BLOCK))
        ops += [("block", block_pair), ("singles", singles_pair)]
    except xmlrpc.client.Fault:     # (a baseline from before blocks)
        pass
    for key, op in ops:
        s_few, s_many = pair_samples([few, many], durations["flat"], op=op)
        results.add(key + "_few", label, statistics.median(s_few) * 1e6)
        results.add(key + "_many", label, statistics.median(s_many) * 1e6)
    few_srv.check_alive()
    many_srv.check_alive()


def block_pair(proxy):
    """Scenario 4b: a block of BLOCK ports taken and given back (newPorts, delPorts: 1.3)."""
    proxy.delPorts(proxy.newPorts("bench-block", BLOCK))


def singles_pair(proxy):
    """Scenario 4s: the same ports one call each, as a client without blocks must."""
    ports = [proxy.newPort("bench-block") for _ in range(BLOCK)]
    for port in ports:
        proxy.delPort(port)


def held_info(i):
    return {"name": "svc-%d" % i}


# ----------------------------------------------------------------------------- scenario 7: etcd

def run_cluster(picker, tmp, first, last, durations, results, rnd, etcd_down=True):
    """Scenario 7 (ours only): pair cost on a daemon publishing to etcd, with etcd up (7a) and
    stopped (7b, unless not *etcd_down*), against a daemon without --cluster, pairs alternating
    between the two."""
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
        for key in ("etcd_up", "etcd_down") if etcd_down else ("etcd_up",):
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


def run_registry_scale(picker, tmp, results, label, script):
    """Scenario 9: a daemon (ours or the baseline) holding REGISTRY_SCALE registrations with struct
    infos.  Ten times a change (a newPort) then a listPorts, while a separate client pings every
    2 ms: the listings' median time, the worst and 99th-percentile ping; then the daemon's RSS,
    and how long a restart takes from its start to its first answer."""
    state_dir = tempfile.mkdtemp(prefix="state-registry-%s-" % label, dir=tmp)
    srv = Daemon(state_dir, WIDE_RANGE[0], WIDE_RANGE[1], port=picker.take(), log_level="WARNING",
                 name="registry-" + label, cwd=ROOT, script=script)
    srv.start()
    try:
        proxy = xmlrpc.client.ServerProxy(srv.url)
        _mc_new(proxy, 10, "warm-up")
        for start in range(0, REGISTRY_SCALE, 100):     # (100 struct infos a multicall: under the body limit)
            _mc_new(proxy, 100, lambda i: {"name": "svc-%d" % (i % 500), "info": "instance %d" % i}, start)
        pinger = Pinger(srv.url, tmp, 300, period=REGISTRY_PING)
        listings = []
        try:
            pinger.wait_ready()
            for n in range(10):
                proxy.newPort("change %d" % n)
                t0 = time.perf_counter()
                listed = proxy.listPorts()
                listings.append(time.perf_counter() - t0)
                if len(listed) != REGISTRY_SCALE + 10 + n + 1:
                    raise BenchError("listPorts listed %d entries, not %d" % (len(listed), REGISTRY_SCALE + 11 + n))
            pings = pinger.finish()
        finally:
            pinger.kill()
        results.add("registry_list", label, statistics.median(listings) * 1e3)
        results.add("registry_ping_worst", label, max(pings) * 1e3)
        results.add("registry_ping_p99", label, percentile(pings, 0.99) * 1e3)
        results.add("registry_rss", label, memory_kib(srv.proc.pid) / 1024.0)
        if srv.terminate() != 0:
            raise BenchError("the daemon did not stop cleanly")
        t0 = time.perf_counter()
        srv.start(wait=False)
        deadline = time.monotonic() + 30
        while True:
            try:
                xmlrpc.client.ServerProxy(srv.url).ping()
                break
            except (OSError, xmlrpc.client.Error):
                if time.monotonic() > deadline:
                    raise BenchError("the restarted daemon did not answer within 30 s")
                time.sleep(0.005)
        results.add("registry_restart", label, (time.perf_counter() - t0) * 1e3)
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

    def __init__(self, url, tmp, limit, pairs=False, period=PING_PERIOD):
        script = os.path.join(tmp, "pinger.py")
        if not os.path.exists(script):
            with open(script, "w") as f:
                f.write(PINGER)
        self.errpath = os.path.join(tmp, "pinger.err")
        with open(self.errpath, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, script, url, repr(period), repr(limit)]
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
        self.info = {}          # (key, label): text for the notes

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


SPEED_HEADS = {"stdlib": "stdlib", "1.0.0": "1.0.0", "baseline": "baseline", "ours": "ours", "noop": "no-op"}


def render_speed(res, args, out, wrk_path):
    """The speed table (issue 22): every server of the same run in its own column.  Returns its notes."""
    labels = ["stdlib", "1.0.0"] + (["baseline"] if args.baseline else []) + ["ours", "noop"]

    def line(cells, pad=True):
        out("|" + "|".join((" %s " % c if pad else str(c)) if c != "" else " " for c in cells) + "|")

    line(["#", "scenario", "unit"] + [SPEED_HEADS[x] for x in labels]
         + ["ours/1.0.0", "ours/no-op", "target", "met", "ours per round", "1.0.0 per round"])
    line(["---"] * 3 + ["---:"] * (len(labels) + 2) + ["---"] * 4, pad=False)

    def value(key, label, blank):
        if label in blank:
            return "–"
        if res.errors.get((key, label)):
            return "ERROR (see below)"
        return fmt_num(res.median(key, label))

    def per_round(key, label, samples=False):
        v = res.data.get((key, label))
        if not v or res.errors.get((key, label)):
            return ""
        if samples:
            return "%d samples: %s–%s" % (len(v), fmt_num(min(v)), fmt_num(max(v)))
        return fmt_rounds(v)

    rate_target = ">= 1.0.0 and >= 70% no-op"
    rows = [
        ("s1", "one client, ServerProxy, newPort/delPort pairs", "one", "calls/s", "rate", rate_target, ()),
        ("s2", "four client processes, aggregate", "four", "calls/s", "rate", rate_target, ()),
        ("s3", "system.multicall, batches of %d newPort (newPort batches timed)" % BATCH, "multi", "newPort/s",
         "multi", ">= 1.25x stdlib and >= 1.0.0", ("noop",)),
        ("s4", "daemon CPU per call (utime+stime of its pid over row s1's window)", "cpu", "µs/call", "time",
         "<= 1.0.0", ()),
        ("s5", "wrk %s, newPort/delPort pairs" % " ".join(WRK_ARGS), "wrk_pairs", "calls/s", "wrk", ">= 1.0.0", ()),
        ("s6", "wrk %s, ping" % " ".join(WRK_ARGS), "wrk_ping", "calls/s", "ping",
         ">= 1.0.0 (aim: 75% no-op)", ()),
        ("s7", "`import nodemngr`, fresh interpreter", "import", "ms", "time", "<= 1.0.0", ("stdlib", "noop")),
        ("s8", "cold first call: a fresh client's newPort starts the daemon", "cold", "ms", "time", "<= 1.0.0",
         ("stdlib", "noop")),
    ]
    for num, name, key, unit, kind, target, blank in rows:
        if key.startswith("wrk") and not wrk_path:
            line([num, name, unit, "wrk not installed"] + [""] * (len(labels) - 1) + [""] * 6)
            continue
        o, v, n, st = (res.median(key, x) for x in ("ours", "1.0.0", "noop", "stdlib"))
        judged = ["ours", "1.0.0"] + {"rate": ["noop"], "multi": ["stdlib"]}.get(kind, [])
        met = ""
        if not any(res.errors.get((key, x)) for x in judged) and o is not None and v is not None:
            if kind == "rate" and n is not None:
                met = "yes" if o >= v and o >= 0.7 * n else "**no**"
            elif kind == "multi" and st:
                met = ("yes" if o >= 1.25 * st and o >= v else "**no**") + " (%s stdlib)" % fmt_ratio(o, st)
            elif kind == "time":
                met = "yes" if o <= v else "**no**"
            elif kind in ("wrk", "ping"):
                met = "yes" if o >= v else "**no**"
                if kind == "ping" and n:
                    met += "; aim %s" % ("yes" if o >= 0.75 * n else "no")
        samples = key in ("import", "cold")
        line([num, name, unit] + [value(key, x, blank) for x in labels]
             + [fmt_ratio(o, v) if o and v else "", fmt_ratio(o, n) if o and n and "noop" not in blank else "",
                target, met, per_round(key, "ours", samples), per_round(key, "1.0.0", samples)])
    # s9: row 7a's ratio, where it ran
    p, c = res.median("etcd_up_plain", "ours"), res.median("etcd_up_cluster", "ours")
    name = "`--cluster` with etcd up: cost of a local newPort/delPort pair (= row 7a)"
    if p is not None:
        ratios = [b / a for a, b in zip(res.data[("etcd_up_plain", "ours")], res.data[("etcd_up_cluster", "ours")])]
        line(["s9", name, "ratio"] + ["–"] * (len(labels) - 2) + ["%.2fx" % (c / p), "–", "", "", "<= 1.05x",
             "yes" if c / p <= 1.05 else "**no**", " / ".join("%.2fx" % r for r in ratios), ""])
    else:
        why = ("ERROR (see below)" if res.errors.get(("cluster", "ours")) else
               "not run (--no-cluster)" if args.no_cluster else "not run (etcd not installed)")
        line(["s9", name, "ratio"] + [why] + [""] * (len(labels) - 1) + [""] * 6)

    notes = [
        "Speed table: every server is started afresh each round, in the order %s, reversed every other "
        "round; each value is the median over rounds. ours/1.0.0 and ours/no-op are ratios of medians: "
        "above 1 is better for rates (calls/s), below 1 for times (µs, ms)."
        % ", ".join(SPEED_HEADS[x] for x in labels),
        "1.0.0 = release 1.0.0 (`tests/data/nodemngr-1.0.0.py`, commit 482246a), started exactly as ours.",
        "no-op = an asyncio server on the default loop (a plain Protocol, HTTP/1.1 keep-alive) that parses "
        "only the request head's end, Content-Length and the method name, and sends a canned reply the size "
        "and shape of ours (newPort: a fixed port, delPort: 0, ping: a string); no multicall. The ceiling "
        "for these clients: no daemon doing any work can beat it.",
        "s4: utime+stime (/proc/PID/stat fields 14 and 15, all threads) of the serving process over row s1's "
        "timed window, divided by the calls of that window (tick %g ms); a nodemngr's pid is the one its "
        "status() reports, checked by its command line." % (1e3 / os.sysconf("SC_CLK_TCK")),
    ]
    if wrk_path:
        notes.append(
            "s5, s6: `wrk %s -d%ds` (%s) with a Lua script. s5: one queue of ports per wrk thread; each "
            "request is delPort of a queued port if there is one, else newPort(\"bench\"), whose port is "
            "queued. s6: every request is ping. A fault or a status other than 200 in any response makes the "
            "cell an ERROR." % (" ".join(WRK_ARGS), max(1, int(round(args.duration))), wrk_path))
        for key in ("wrk_pairs", "wrk_ping"):
            for label in labels:
                errs = res.data.get((key + "_socket_errors", label))
                if errs:
                    notes.append("%s, %s: wrk counted %s socket errors (connect, read, write, timeout) in the "
                                 "rounds that had any." % (key, SPEED_HEADS[label], fmt_rounds(errs)))
    else:
        notes.append("wrk is not installed (Debian package `wrk`; `.ci/run` installs it): rows s5 and s6 "
                     "were not run.")
    notes += [
        "s7: `python3 -c` code timing `import nodemngr` alone (time.perf_counter), the version's copy as "
        "nodemngr.py in a folder first on sys.path, bytecode cache warm (one untimed run first); %d samples "
        "per version, versions alternating; median." % args.import_samples,
        "s8: wall time, seen by the benchmark, from starting a fresh `python3 -c` client (%s) to its exit "
        "after its first newPort, which auto-starts the daemon; a fresh port, range and state folder each time, given "
        "by NODEMNGR_PORT, NODEMNGR_FIRST_PORT, NODEMNGR_LAST_PORT and NODEMNGR_STATE; the daemon is stopped "
        "by the pid its status() gives. One untimed sample per version first, then %d each, versions "
        "alternating; median." % ("; ".join("%s: %s" % (SPEED_HEADS[x], res.info[("cold", x)])
                                            for x in labels if ("cold", x) in res.info) or "none",
                                  args.cold_samples),
    ]
    return notes


def render(res, floor, args, cmdline, elapsed, load, wrk_path=None):
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
    out("ours: %s (%s); 1.0.0: %s (%s)%s" % (
        os.path.relpath(NODEMNGR, ROOT), file_id(NODEMNGR), os.path.relpath(RELEASE_1_0_0, ROOT),
        file_id(RELEASE_1_0_0), "; baseline: %s (%s)" % (args.baseline, file_id(args.baseline)) if base else ""))
    out("rounds: %d (medians over rounds); timed window per scenario: %.1f s (wrk: %d s)"
        % (args.rounds, args.duration, max(1, int(round(args.duration)))))
    out("")
    out("## Speed (issue 22)")
    out("")
    notes = render_speed(res, args, out, wrk_path)
    out("")
    table = []          # the other scenarios' table, printed if it has a row
    out = table.append

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
    flat_rows = (("4", "flat", "pair cost", "µs/pair"),
                 ("4n", "named", "pair cost for an explicit name (sticky)", "µs/pair"),
                 ("4l", "lookup", "lookup of one name", "µs/call"),
                 ("4b", "block", "a block of %d: newPorts + delPorts" % BLOCK, "µs/block"),
                 ("4s", "singles", "the same %d ports one call each: %d newPort + %d delPort" % ((BLOCK,) * 3),
                  "µs/block"))
    for num, key, what, unit in flat_rows:
        if not any(res.data.get((key + "_few", x)) or res.errors.get(("flat", x)) for x in labels):
            continue
        o_value, o_per, fr, o_many = flat("ours", key)
        b_value, b_per, b_fr, b_many = flat(B, key)
        if b_fr is not None:
            b_value += " (%.2fx)" % b_fr
        row(num, "flat cost, %s: %s with 10 → %s named ports registered"
            % ("daemons only" if base else "ours only", what, "{:,}".format(FLAT_MANY)),
            unit, "–",
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
    scale += (("9a", "registry_list", "25,000 registrations (struct infos): listPorts after a change, median of 10",
               "ms", ""),
              ("9b", "registry_ping_worst", "same: worst ping (one every 2 ms) meanwhile", "ms", "<= 50 ms"),
              ("9c", "registry_ping_p99", "same: 99th-percentile ping meanwhile", "ms", "<= 20 ms"),
              ("9d", "registry_rss", "same: the daemon's RSS after the listings", "MiB", "< 100 MiB"),
              ("9e", "registry_restart", "same: a restart, from its start to its first answer", "ms", "< 1,000 ms"))
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

    out = lines.append
    if len(table) > 2:
        out("## Other scenarios (ours%s)" % (" and the baseline" if base else ""))
        out("")
        lines.extend(table)
        out("")
        notes += [
            "stdlib = `SimpleXMLRPCServer((\"127.0.0.1\", port), logRequests=False)`, defaults otherwise "
            "(single-threaded, HTTP/1.0: a new TCP connection per call), a dict and a lowest-free loop; no "
            "bound-port check, no state. The one line added for row s3 is `server.register_multicall_functions()`.",
            "ours = `nodemngr.py serve` with defaults (state file on, bound-port check on), `--log-level WARNING`.",
        ]
    else:
        notes.insert(1, "stdlib = `SimpleXMLRPCServer((\"127.0.0.1\", port), logRequests=False)`, defaults "
                     "otherwise (HTTP/1.0), a dict and a lowest-free loop, plus `register_multicall_functions()`; "
                     "ours = `nodemngr.py serve` with defaults (state file on, bound-port check on), "
                     "`--log-level WARNING`.")
    if base:
        notes.append("baseline = `%s serve`, started exactly as ours. ours/baseline is the ratio of the "
                     "two medians: above 1 is better for rates (calls/s), below 1 for times (µs, ms)."
                     % args.baseline)
    notes.append("Same client for every server: plain `xmlrpc.client.ServerProxy` (socket default timeout 30 s), "
                 "but in rows s5 and s6 (wrk). Server ports are in 13000-13999, outside every range.")
    if any(res.data.get(("flat_few", x)) or res.errors.get(("flat", x)) for x in labels):
        notes.append("Scenario 4: two more daemons of ours run at once, both with range %d-%d, one holding 10 "
                     "ports and one 25,000; pairs alternate between them in chunks of 20 and the median pair time "
                     "of each is compared." % WIDE_RANGE)
    block, singles = res.median("block_few", "ours"), res.median("singles_few", "ours")
    if block and singles:
        notes.append("Scenario 4b against 4s (10 registered): %s blocks of %d a second with newPorts + delPorts, "
                     "against %s with %d newPort + %d delPort calls each: %.1fx as many."
                     % (fmt_num(1e6 / block), BLOCK, fmt_num(1e6 / singles), BLOCK, BLOCK, singles / block))
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
    ap.add_argument("--quick", action="store_true", help="short smoke run (1 round, short windows, fewer samples)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds over every server (default 3, quick 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help="timed window per scenario in seconds (default 2, quick 0.5; wrk: rounded, at least 1)")
    ap.add_argument("--only", choices=["speed", "registry"],
                    help="speed: only the speed table (and row 7a, where etcd is installed); registry: only "
                    "scenario 9 (25,000 registrations)")
    ap.add_argument("--baseline", metavar="PATH",
                    help="an older copy of nodemngr.py (e.g. `git show HEAD~5:nodemngr.py > "
                    "/tmp/nodemngr-before.py`): a column of its own in every table")
    ap.add_argument("--no-stall", action="store_true",
                    help="skip scenario 6 (starts %d sleep processes)" % STALL_OWNERS)
    ap.add_argument("--no-cluster", action="store_true", help="skip scenarios 7 and 8 (start etcd, if installed)")
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
    args.speed_only = args.only == "speed"
    args.registry_only = args.only == "registry"
    args.stall_idle = 2.5 if args.quick else 6.0        # >= one reap interval (2 s); full: three
    args.stall_fail = 1.5 if args.quick else 5.0
    args.import_samples = 5 if args.quick else IMPORT_SAMPLES
    args.cold_samples = 3 if args.quick else COLD_SAMPLES
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


SPEED_KEYS = ("one", "cpu", "four", "multi", "wrk_pairs", "wrk_ping")


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
    wrk_path = shutil.which("wrk")
    d = {"pairs": args.duration, "multi": min(args.duration, 1.5), "flat": min(args.duration, 1.5),
         "wrk": max(1, int(round(args.duration))), "fill_limit": 15.0, "stall_idle": args.stall_idle,
         "stall_fail": args.stall_fail}
    have_ours = os.path.exists(NODEMNGR)
    daemons = ([("ours", NODEMNGR)] if have_ours else []) + ([("baseline", args.baseline)] if args.baseline else [])
    # the speed table's servers, in the order of even rounds (odd rounds reverse it)
    speed_servers = ([("stdlib", None), ("1.0.0", RELEASE_1_0_0)]
                     + ([("baseline", args.baseline)] if args.baseline else [])
                     + ([("ours", NODEMNGR)] if have_ours else []) + [("noop", None)])
    versions = [(label, script) for label, script in speed_servers if script]    # import and cold rows
    cluster = bool(have_ours and etcd_binary() and not args.no_cluster)
    stall = not (args.no_stall or args.speed_only) and have_ours
    if args.registry_only:      # (scenario 9 alone: no other round, sample or cluster)
        args.rounds, versions, cluster, stall = 0, [], False, False
    # A safety net against hangs, not a schedule.  Per server and round of the speed table: its
    # start, the one- and four-client windows (with the four processes' start), the multicall
    # window and the two wrk runs.  Per daemon and round of the rest: the proxy window, flat cost
    # (fill up to fill_limit, three windows, two starts) and scenario 6 (bounded by
    # STALL_BATCH_TIMEOUT).  Then import and cold samples, the cluster rounds, scenario 8, the floor.
    per_speed = 5 + 2 * args.duration + 4 + d["multi"] + 2 + (2 * (d["wrk"] + 3) if wrk_path else 0)
    stall_each = (d["stall_idle"] + d["stall_fail"] + STALL_BATCH_TIMEOUT + 25) if stall else 0
    rest_each = 0 if args.speed_only else args.duration + 3 * d["flat"] + d["fill_limit"] + 10 + stall_each
    cluster_each = (20 + 2 * d["flat"] + (0 if args.speed_only else d["flat"] + 10)) if cluster else 0
    limit = int(60 + args.rounds * (len(speed_servers) * per_speed + len(daemons) * rest_each + cluster_each)
                + len(versions) * ((args.import_samples + 1) * 1.0 + (args.cold_samples + 1) * 3.0) + COLD_TIMEOUT
                + (0 if args.speed_only else 5 + 2 * d["flat"] + (180 if cluster else 0) + 90 * len(daemons)))
    # with wrk and etcd: --only speed 537 s (--quick 209 s), full 1097 s (--quick 506 s); with a baseline
    # 656 s (247 s) and 1554 s (646 s)

    def on_alarm(signum, frame):
        raise Watchdog("run exceeded %d s" % limit)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)

    res = Results()
    floor = None
    tmp = tempfile.mkdtemp(prefix="nodemngr-bench-")
    servers = []
    sleepers = Sleepers()
    cold_started = []       # the cold samples' folders: whatever runs with one among its arguments is ours
    try:
        picker = PortPicker()
        first, last = free_range(1000)
        stall_range = None
        if stall:
            try:
                raise_nofile(STALL_RANGE - STALL_OWNERS + 200)
                stall_range = find_stall_range()
            except BenchError as exc:
                for label, _ in daemons:
                    res.error("stall", label, str(exc))
        proxy_factory = None
        if not args.speed_only:
            try:
                proxy_factory = load_proxy_factory()
            except Exception as exc:
                res.error("proxy", "ours", "importing nodemngr_proxy failed: %s: %s" % (type(exc).__name__, exc))
        wrk_scripts = []
        if wrk_path:
            for key, text in (("wrk_pairs", WRK_PAIRS), ("wrk_ping", WRK_PING)):
                path = os.path.join(tmp, key + ".lua")
                with open(path, "w") as f:
                    f.write(text)
                wrk_scripts.append((key, path))
        if not have_ours:
            res.error("one", "ours", "%s does not exist; only the other servers measured" % NODEMNGR)
        for rnd in range(args.rounds):
            # (a) the speed table: every server afresh, the order reversed every other round
            for label, script in (speed_servers if rnd % 2 == 0 else speed_servers[::-1]):
                if label == "stdlib":
                    srv = start_stdlib(picker, tmp, first, last)
                elif label == "noop":
                    srv = start_noop(picker, tmp, first)
                else:
                    srv = start_ours(picker, tmp, first, last, "r%d" % rnd, script, label)
                servers.append(srv)
                try:
                    srv.wait_ready(15.0)
                    run_speed(srv, label, d, res, rnd, wrk_scripts, tmp,
                              proxy_factory if label in ("ours", "baseline") else None)
                except ERRORS as exc:
                    for key in SPEED_KEYS:
                        res.error(key, label, "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
                finally:
                    srv.stop()
                    servers.remove(srv)
            if args.speed_only:
                continue
            order = daemons if rnd % 2 == 0 else daemons[::-1]
            # (b) flat cost: two daemons on the wide range, 10 vs FLAT_MANY registered
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
        # (d) the speed table's import and cold first call: samples, versions alternating
        folders = version_folders(tmp, versions, res)
        import_times(folders, args.import_samples, res)
        cold_times(folders, args.cold_samples, res, picker, tmp, cold_started)
        for rnd in range(args.rounds if cluster else 0):
            try:
                run_cluster(picker, tmp, first, last, d, res, rnd, etcd_down=not args.speed_only)
            except ERRORS as exc:
                res.error("cluster", "ours", "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
        if cluster and not args.speed_only:     # scenario 8, once: ours and the baseline
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
        for label, script in (daemons if not args.speed_only else []):     # scenario 9, once each
            try:
                run_registry_scale(picker, tmp, res, label, script)
            except ERRORS as exc:
                res.error("registry", label, "%s: %s" % (type(exc).__name__, exc))
        if not args.speed_only:
            rtt, req_len, resp_len = loopback_rtt_us(d["flat"])
            floor = (rtt, req_len, resp_len, bind_close_us())
    except Watchdog as exc:
        res.error("run", "bench", str(exc))
    finally:
        signal.alarm(0)
        for srv in list(servers):
            srv.stop()
        sleepers.stop()
        for folder in cold_started:
            for pid in pids_of_folder(folder):
                stop_pid(pid)
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(res, floor, args, cmdline, time.monotonic() - start, load, wrk_path))
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
