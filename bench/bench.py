#!/usr/bin/env python3
"""nodemngr benchmark: our daemon against the twenty-line stdlib server a user would write.

Run from the repository root::

    python3 bench/bench.py             # full run (3 rounds, under two minutes on 2 cores)
    python3 bench/bench.py --quick     # short smoke run
    python3 bench/bench.py --rounds 5

Both servers run as subprocesses on 127.0.0.1, on ports found free at start, and are measured with
the same plain ``xmlrpc.client.ServerProxy`` client.  Rounds alternate stdlib / ours; the table shows
the median over rounds and every round's value.  Standard library only; everything started is stopped
by pid and every temporary directory is removed, whatever happens.
"""
import argparse
import multiprocessing
import os
import platform
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
NODEMNGR = os.path.join(ROOT, "nodemngr.py")
PROXY_MODULE = os.path.join(ROOT, "nodemngr_proxy.py")
RESERVED_PORT = 11800          # nmPort: never touched by the benchmark
BATCH = 250                     # newPort calls per system.multicall batch
FLAT_MANY = 25000               # registered ports for the "flat cost" case
WIDE_RANGE = (20000, 59999)     # range for the 25,000-registered daemon
PRODUCT_VARS = ("NODEMNGR_HOST", "NODEMNGR_PORT", "NODEMNGR_FIRST_PORT", "NODEMNGR_LAST_PORT",
                "NODEMNGR_STATE", "NODEMNGR_TOKEN_FILE", "NODEMNGR_LOG_LEVEL", "NODEMNGR_LOG_FILE",
                "NODEMNGR_AUTOSTART")

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


class BenchError(Exception):
    """A server failed or misbehaved; the message says how."""


class Watchdog(Exception):
    """The overall time limit of the run was reached."""


# ----------------------------------------------------------------------------- ports and processes

def port_is_free(port):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


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


def free_range(size, low=20000, high=30000):
    """A range of *size* ports below 30000, every one of them free (TCP and UDP) now."""
    for first in range(low, high - size + 1, size):
        if first <= RESERVED_PORT <= first + size - 1:
            continue
        if all(port_is_free(p) for p in range(first, first + size)):
            return first, first + size - 1
    raise BenchError("no fully free range of %d ports below 30000" % size)


def clean_env():
    return {k: v for k, v in os.environ.items() if k not in PRODUCT_VARS}


class Server:
    """A server subprocess; stop() ends it by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name, argv, port, logdir):
        self.name = name
        self.port = port
        self.url = "http://127.0.0.1:%d/" % port
        self.logpath = os.path.join(logdir, "%s-%d.log" % (name, port))
        self.log = open(self.logpath, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT)

    def log_tail(self, n=600):
        try:
            with open(self.logpath, "rb") as f:
                data = f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
        return data[-n:]

    def wait_ready(self, timeout=15.0):
        """Poll ping until it answers; no fixed sleep."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError("%s exited with status %s before answering ping; output: %r"
                                 % (self.name, self.proc.returncode, self.log_tail()))
            try:
                xmlrpc.client.ServerProxy(self.url).ping()
                return
            except (OSError, xmlrpc.client.Error) as exc:
                last = exc
            time.sleep(0.01)
        raise BenchError("%s did not answer ping within %.0f s (last error: %r); output: %r"
                         % (self.name, timeout, last, self.log_tail()))

    def check_alive(self):
        if self.proc.poll() is not None:
            raise BenchError("%s died (status %s); output: %r"
                             % (self.name, self.proc.returncode, self.log_tail()))

    def stop(self):
        pid = self.proc.pid
        try:
            if self.proc.poll() is None:
                os.kill(pid, signal.SIGTERM)
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.kill(pid, signal.SIGKILL)
                    self.proc.wait(5)
        except ProcessLookupError:
            pass
        finally:
            self.log.close()


def start_stdlib(picker, tmp, first, last):
    script = os.path.join(tmp, "stdlib_server.py")
    if not os.path.exists(script):
        with open(script, "w") as f:
            f.write(STDLIB_SERVER)
    port = picker.take()
    server = Server("stdlib", [sys.executable, script, str(port), str(first), str(last)], port, tmp)
    return server


def start_ours(picker, tmp, first, last, tag):
    port = picker.take()
    state_dir = tempfile.mkdtemp(prefix="state-%s-" % tag, dir=tmp)
    argv = [sys.executable, NODEMNGR, "serve", "--host", "127.0.0.1", "--port", str(port),
            "--first-port", str(first), "--last-port", str(last),
            "--state", os.path.join(state_dir, "state.sqlite3"), "--log-level", "WARNING"]
    return Server("ours", argv, port, tmp)


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


def _mc_new(proxy, n, info="bench"):
    mc = xmlrpc.client.MultiCall(proxy)
    for _ in range(n):
        mc.newPort(info)
    return list(mc())                                   # iterating raises on any fault


def _mc_del(proxy, ports):
    mc = xmlrpc.client.MultiCall(proxy)
    for p in ports:
        mc.delPort(p)
    for r in mc():
        if r != 0:
            raise BenchError("delPort in multicall returned %r" % (r,))


def pair_samples(proxies, duration, chunk=20):
    """Per-pair seconds of newPort+delPort on each proxy, alternating chunks of *chunk* pairs so
    that machine drift hits every proxy alike; returns one list of samples per proxy."""
    for proxy in proxies:
        for _ in range(5):
            proxy.delPort(proxy.newPort("bench"))
    samples = [[] for _ in proxies]
    perf = time.perf_counter
    end = perf() + duration
    while perf() < end or len(samples[0]) < 100:
        for proxy, out in zip(proxies, samples):
            for _ in range(chunk):
                t0 = perf()
                proxy.delPort(proxy.newPort("bench"))
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


def run_flat(few_srv, many_srv, durations, results):
    """Scenario 4 (ours only): pair cost on a daemon holding 10 ports vs one holding FLAT_MANY.

    Both daemons run at once with the same wide range; pairs alternate between them in small chunks."""
    few = xmlrpc.client.ServerProxy(few_srv.url)
    many = xmlrpc.client.ServerProxy(many_srv.url)
    _mc_new(few, 10, "held")
    registered = 0
    t0 = time.perf_counter()
    while registered < FLAT_MANY:
        n = min(BATCH, FLAT_MANY - registered)
        _mc_new(many, n, "held")
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
    results.add("flat_few", "ours", m_few)
    results.add("flat_many", "ours", m_many)
    results.add("flat_ratio", "ours", m_many / m_few)
    results.add("fill", "ours", FLAT_MANY / fill)


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


def cell(res, key, label, unit=""):
    err = res.errors.get((key, label))
    v = res.median(key, label)
    if err and v is None:
        return "ERROR (see below)"
    return fmt_num(v, unit)


def render(res, floor, args, cmdline, elapsed, load):
    lines = []
    out = lines.append
    out("# nodemngr benchmark")
    out("")
    out("machine: %s cores, Python %s (%s), %s" % (os.cpu_count(), platform.python_version(),
                                                   platform.python_implementation(), platform.platform()))
    out("load average at start: %s" % load)
    out("command: %s" % cmdline)
    out("rounds: %d (stdlib and ours alternate; medians over rounds); timed window per scenario: %.1f s"
        % (args.rounds, args.duration))
    out("")
    out("| # | scenario | unit | stdlib | ours | ours/stdlib | target | met | stdlib per round | ours per round |")
    out("|---|---|---|---:|---:|---:|---|---|---|---|")

    def ratio_row(num, name, key, unit, target, target_text, stdlib_key=None):
        s_label, o_label = "stdlib", "ours"
        s = res.median(stdlib_key or key, s_label)
        o = res.median(key, o_label)
        ratio = (o / s) if (s and o) else None
        met = "" if ratio is None else ("yes" if ratio >= target else "**no**")
        out("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            num, name, unit, cell(res, key, s_label), cell(res, key, o_label),
            "n/a" if ratio is None else "%.2fx" % ratio, target_text, met,
            fmt_rounds(res.data.get((key, s_label))), fmt_rounds(res.data.get((key, o_label)))))

    ratio_row(1, "one client, ServerProxy, newPort/delPort pairs", "one", "calls/s", 1.3, ">= 1.3x")
    ratio_row(2, "four client processes, aggregate", "four", "calls/s", 1.5, ">= 1.5x")
    # 3: absolute target on ours
    s, o = res.median("multi", "stdlib"), res.median("multi", "ours")
    out("| 3 | system.multicall, batches of %d newPort (newPort batches timed) | newPort/s | %s | %s | %s "
        "| ours >= 10,000/s | %s | %s | %s |" % (
            BATCH, cell(res, "multi", "stdlib"), cell(res, "multi", "ours"),
            "%.2fx" % (o / s) if (s and o) else "n/a",
            "" if o is None else ("yes" if o >= 10000 else "**no**"),
            fmt_rounds(res.data.get(("multi", "stdlib"))), fmt_rounds(res.data.get(("multi", "ours")))))
    few, many, fr = (res.median("flat_few", "ours"), res.median("flat_many", "ours"),
                     res.median("flat_ratio", "ours"))
    if few is not None or res.errors.get(("flat", "ours")):
        rounds = " / ".join("%s→%s" % (fmt_num(a), fmt_num(b)) for a, b in
                            zip(res.data.get(("flat_few", "ours"), []),
                                res.data.get(("flat_many", "ours"), [])))
        value = ("%s → %s" % (fmt_num(few), fmt_num(many))) if few is not None else "ERROR (see below)"
        out("| 4 | flat cost, ours only: pair cost with 10 → %s registered | µs/pair | – | %s | "
            "%s (25k/10) | <= 1.3x | %s | | %s |" % (
                "{:,}".format(FLAT_MANY), value, "n/a" if fr is None else "%.2fx" % fr,
                "" if fr is None else ("yes" if fr <= 1.3 else "**no**"), rounds))
    if res.data.get(("proxy", "ours")) or res.errors.get(("proxy", "ours")):
        p, s = res.median("proxy", "ours"), res.median("one", "stdlib")
        out("| 1p | ours via NodeMngrProxy, one client | calls/s | %s | %s | %s | | | | %s |" % (
            cell(res, "one", "stdlib"), cell(res, "proxy", "ours"),
            "%.2fx" % (p / s) if (p and s) else "n/a", fmt_rounds(res.data.get(("proxy", "ours")))))
    if floor:
        rtt, req_len, resp_len, bind = floor
        out("| 5a | floor: loopback TCP round trip, %d B request / %d B reply (echo thread) | µs | | %s | "
            "| | | | (= %s round trips/s) |" % (req_len, resp_len, fmt_num(rtt), fmt_num(1e6 / rtt)))
        out("| 5b | floor: socket() + bind((\"127.0.0.1\", 0)) + close() | µs | | %s | | | | | |"
            % fmt_num(bind))
    out("")
    fill = res.data.get(("fill", "ours"))
    notes = [
        "stdlib = `SimpleXMLRPCServer((\"127.0.0.1\", port), logRequests=False)`, defaults otherwise "
        "(single-threaded, HTTP/1.0: a new TCP connection per call), a dict and a lowest-free loop; no "
        "bound-port check, no state. The one line added for scenario 3 is "
        "`server.register_multicall_functions()`.",
        "ours = `nodemngr.py serve` with defaults (state file on, bound-port check on), `--log-level WARNING`.",
        "Same client for both: plain `xmlrpc.client.ServerProxy` (socket default timeout 30 s).",
        "Scenario 4: two more daemons of ours run at once, both with range %d-%d, one holding 10 ports "
        "and one 25,000; pairs alternate between them in chunks of 20 and the median pair time of each is "
        "compared. Server ports are in 13000-13999, outside every range." % WIDE_RANGE,
    ]
    if fill:
        notes.append("Registering the %s ports (multicall batches of %d) ran at %s newPort/s per round."
                     % ("{:,}".format(FLAT_MANY), BATCH, fmt_rounds(fill)))
    for (key, label), msg in sorted(res.errors.items()):
        notes.append("**ERROR** %s/%s: %s" % (label, key, msg))
    for n in notes:
        out("- " + n)
    out("")
    out("total run time: %.1f s" % elapsed)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (1 round, short windows)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of stdlib/ours (default 3, quick 1)")
    ap.add_argument("--duration", type=float, default=None,
                    help="timed window per scenario in seconds (default 2, quick 0.5)")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.duration is None:
        args.duration = 0.5 if args.quick else 2.0
    if args.rounds < 1 or args.duration <= 0:
        ap.error("--rounds must be >= 1 and --duration > 0")
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
         "fill_limit": 15.0}
    limit = max(30, int(10 + args.rounds * (15 * args.duration + 3)))   # default: 109 s

    def on_alarm(signum, frame):
        raise Watchdog("run exceeded %d s" % limit)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)

    res = Results()
    floor = None
    tmp = tempfile.mkdtemp(prefix="nodemngr-bench-")
    servers = []
    have_ours = os.path.exists(NODEMNGR)
    try:
        picker = PortPicker()
        first, last = free_range(1000)
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
                srv.wait_ready()
                run_common(srv, d, res, "stdlib")
            except (BenchError, OSError, xmlrpc.client.Error, EOFError) as exc:
                res.error("one", "stdlib", "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
            finally:
                srv.stop()
                servers.remove(srv)
            if not have_ours:
                continue
            # (b) ours, scenarios 1-3 (+ NodeMngrProxy)
            srv = start_ours(picker, tmp, first, last, "r%d" % rnd)
            servers.append(srv)
            try:
                srv.wait_ready()
                run_common(srv, d, res, "ours", proxy_factory)
            except (BenchError, OSError, xmlrpc.client.Error, EOFError) as exc:
                res.error("one", "ours", "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
            finally:
                srv.stop()
                servers.remove(srv)
            # (b') ours, flat cost: two daemons on the wide range, 10 vs FLAT_MANY registered
            pair = []
            try:
                for tag in ("few", "many"):
                    srv = start_ours(picker, tmp, WIDE_RANGE[0], WIDE_RANGE[1], "%s%d" % (tag, rnd))
                    servers.append(srv)
                    pair.append(srv)
                for srv in pair:
                    srv.wait_ready()
                run_flat(pair[0], pair[1], d, res)
            except (BenchError, OSError, xmlrpc.client.Error, EOFError) as exc:
                res.error("flat", "ours", "round %d: %s: %s" % (rnd + 1, type(exc).__name__, exc))
            finally:
                for srv in pair:
                    srv.stop()
                    servers.remove(srv)
        rtt, req_len, resp_len = loopback_rtt_us(d["flat"])
        floor = (rtt, req_len, resp_len, bind_close_us())
    except Watchdog as exc:
        res.error("run", "bench", str(exc))
    finally:
        signal.alarm(0)
        for srv in servers:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(res, floor, args, cmdline, time.monotonic() - start, load))
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
