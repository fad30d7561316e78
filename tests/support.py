"""Helpers shared by the tests and the benchmark (bench/bench.py): ports, the product's environment,
the daemon's settings, processes stopped by pid, a real daemon in a subprocess, and raw HTTP.
Test modules import them from here (conftest.py holds only fixtures and hooks).

Standard library only, and no pytest: bench/bench.py imports this module with the tests folder put
on sys.path.
"""
import atexit
import io
import marshal
import os
import random
import resource
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import xmlrpc.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODEMNGR = os.path.join(ROOT, "nodemngr.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import nodemngr     # noqa: E402  (the repository's, whatever copy a test or bench runs)
RESERVED_PORT = 11800           # nmPort, the default port: never used by a test or the benchmark

#: Environment variables of the product that a test or the benchmark must never inherit from the machine.
PRODUCT_VARS = ("NODEMNGR_HOST", "NODEMNGR_PORT", "NODEMNGR_FIRST_PORT", "NODEMNGR_LAST_PORT",
                "NODEMNGR_STATE", "NODEMNGR_TOKEN_FILE", "NODEMNGR_LOG_LEVEL", "NODEMNGR_LOG_FILE",
                "NODEMNGR_AUTOSTART", "NODEMNGR_UNIX", "NODEMNGR_CLUSTER", "NODEMNGR_ADVERTISE_HOST",
                "NODEMNGR_CLUSTER_TTL", "NODEMNGR_CLUSTER_CA", "NODEMNGR_CLUSTER_CERT", "NODEMNGR_CLUSTER_KEY",
                "NODEMNGR_CLUSTER_USER_FILE", "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                "PORTSERVER_ADDRESS")


class ServerError(RuntimeError):
    """A server subprocess exited, or did not answer in time; the message has its log's end."""


def clean_env(**extra):
    """os.environ without the product's variables, plus *extra* (values made str)."""
    env = {k: v for k, v in os.environ.items() if k not in PRODUCT_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ----------------------------------------------------------------------------- ports

def free_port():
    """A TCP port on 127.0.0.1 that nothing holds now (never 11800)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != RESERVED_PORT:
            return port


def port_is_free(port):
    """Nothing holds *port*, TCP or UDP, on any address."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind)
        try:
            s.bind(("", port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def worker_ports():
    """The share of 14000-29999 this test process draws ranges from: under pytest-xdist each worker
    has its own, so that two daemons of tests running at once never share a port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    share = 16000 // max(1, count)
    return 14000 + index * share, 14000 + (index + 1) * share


_reserved = []      # ranges of daemons that outlive a test (shared ones): free_range() avoids them


def reserve_range(first, last):
    """Keep free_range() from handing out ports of [first, last] in this process from now on."""
    _reserved.append((first, last))


def free_range(size, check=8):
    """A range of *size* ports in this worker's share, picked at random, whose first *check* are free
    now (checking all of a 1,000-port range on every test would cost more than the collisions it
    avoids: a test that binds them all checks them all), and which overlaps no reserved range.  A
    range the share cannot hold away from the reserved ones (with 4 workers a share is 4,000 ports)
    is looked for in all of 14000-29999, and one that cannot be found there either (a few tests need
    most of the span) overlaps what it must: those take their chances with the other daemons."""
    low, high = worker_ports()
    spans = [(low, high, _reserved)] if high - low >= 2 * size else []
    spans += [(14000, 30000, _reserved), (14000, 30000, [])]
    for low, high, reserved in spans:
        for _ in range(200):
            first = random.randrange(low, high - size)
            last = first + size - 1
            if first <= RESERVED_PORT <= last or any(a <= last and first <= b for a, b in reserved):
                continue
            if all(port_is_free(p) for p in range(first, first + min(size, check))):
                return first, last
    raise ServerError("no free port range found")


def scan_free_range(size, low, high, step=None):
    """The first range of *size* ports in [low, high), every one of them free now (the benchmark's
    ranges: outside the tests' 14000-29999 when it runs beside them, and reproducible)."""
    for first in range(low, high - size + 1, step or size):
        if first <= RESERVED_PORT <= first + size - 1:
            continue
        if all(port_is_free(p) for p in range(first, first + size)):
            return first, first + size - 1
    raise ServerError("no fully free range of %d ports in %d-%d" % (size, low, high - 1))


# ----------------------------------------------------------------------------- processes

def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll *predicate* until it returns a true value or *timeout* seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def pid_alive(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_pid(pid, timeout=10.0):
    """SIGTERM then SIGKILL one process by pid; ignore one that is gone."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), timeout=timeout):
            return


# Runs a copy of nodemngr.py the way `python3 nodemngr.py ARGS` does (its folder first on sys.path,
# main() as the program), with some class attributes changed first: limits are settings, as in
# socketserver, so a test of a 10 s limit can wait 1 s on the same code path.  Importing rather than
# running the file as a script also lets the ~300 daemons of a test run share one bytecode file
# instead of each compiling 100 KB of source.
LAUNCHER = """import importlib.util, os, sys
script = %(script)r
sys.path.insert(0, os.path.dirname(script))
spec = importlib.util.spec_from_file_location("nodemngr", script)
nodemngr = importlib.util.module_from_spec(spec)
sys.modules["nodemngr"] = nodemngr
spec.loader.exec_module(nodemngr)
for name, value in %(settings)r.items():
    cls, attr = name.split(".")
    if not hasattr(getattr(nodemngr, cls), attr):
        sys.exit("no setting %%s in %%s" %% (name, script))
    setattr(getattr(nodemngr, cls), attr, value)
sys.argv[0] = script
sys.exit(nodemngr.main())
"""


#: The daemon's settings that tests change, by the short names tests use, as the "Class.attribute"
#: of nodemngr.py that the launcher sets before the daemon serves (it refuses one the daemon lacks).
#: The one place these names are written: a rename in nodemngr.py is one edit here.
SETTINGS = {
    "reap_interval": "NodeMngrServer.reap_interval",    # between two owner checks (2 s)
    "busy_retry": "NodeMngrServer.busy_retry",          # before a port found busy is probed again
    "stall_timeout": "NodeMngrServer.stall_timeout",    # a client stalled mid-request is cut (10 s)
    "idle_timeout": "NodeMngrServer.idle_timeout",      # an idle keep-alive connection is closed (30 s)
    "linger": "NodeMngrServer.linger",                  # after its last reply, for what a client still sends
    "max_connections": "NodeMngrServer.max_connections",    # at once (128)
    "busy_window": "NodeMngrServer.busy_window",        # a request or reply that moved this recently is not stalled
    "max_pending_bytes": "NodeMngrServer.max_pending_bytes",    # of replies waiting for slow readers
    "stop_grace": "NodeMngrServer.stop_grace",          # a stop waits this long for incomplete requests
    "tick": "NodeMngrServer.tick",                      # between two sweeps for deadlines
    "lock_wait": "StateStore.lock_wait",                # for a state file another daemon holds
    "cluster_resync": "ClusterView.resync_interval",    # between two comparisons of what it published and the registry
    "page_rows": "StatusPages.rows",                    # registrations the status page shows (500)
    "page_host_ports": "StatusPages.host_ports",        # ports of each cluster host the status page names (20)
    "slice_budget": "Sliced.budget",                    # of work per turn of the loop for a long reply (4 ms)
}


def daemon_settings(**values):
    """``Daemon(settings=...)`` from short names: ``daemon_settings(stall_timeout=0.5)`` is
    ``{"NodeMngrServer.stall_timeout": 0.5}`` (KeyError for a name SETTINGS does not have)."""
    return {SETTINGS[name]: value for name, value in values.items()}


#: Seconds between two owner checks in the daemons of FAST_REAP (2 s by default).  Tests that
#: check a port is *kept* wait a few of these, so it sets their length: a pass over a few owners
#: takes microseconds, and 0.2 s leaves the loop idle nearly all the time.
REAP_INTERVAL = 0.2
#: Short limits for tests that wait for the owner check.
FAST_REAP = daemon_settings(reap_interval=REAP_INTERVAL)
#: How long a daemon waits for a state file another daemon holds.
SHORT_LOCK_WAIT = daemon_settings(lock_wait=0.2)


def launcher(script=NODEMNGR, settings=None):
    """The ``python -c`` program that runs *script* (a nodemngr.py) with *settings* applied."""
    return LAUNCHER % {"script": os.path.abspath(script), "settings": dict(settings or {})}


def nodemngr_argv(*args, **launcher_kw):
    """``["-c", LAUNCHER, ARGS...]``: ``python3 nodemngr.py ARGS`` for popen_python() and
    run_python(), run as Daemon runs it (forked, where the fork server may)."""
    return ["-c", launcher(**launcher_kw)] + [str(a) for a in args]


def stop_process(proc, timeout=10.0):
    """stop_pid() for a process this one started (a Popen, or a ForkedProcess): SIGTERM then
    SIGKILL by its pid, waiting for its exit status rather than polling /proc."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    return proc.wait(timeout)


# ----------------------------------------------------------------------------- the fork server
#
# A Python that imports nodemngr.py costs about 0.3 s of CPU on the slow 2-core test machine, nearly
# all of it importing the standard library (asyncio, xmlrpc.server, sqlite3, http.client...): the
# module itself takes 5 ms.  A run starts over a hundred such Pythons (daemons, clients, racers).
# The fork server is a Python started once per test process, exactly as those would be (this
# interpreter, no flags, clean_env(), inherited rlimits and signal dispositions and mask), that
# imports the standard modules nodemngr.py and nodemngr_proxy.py import -- not these two -- and
# then, for each ``python -c PROGRAM ARGS`` or ``python SCRIPT ARGS`` asked of it, forks a
# monitor that forks the program.  The program's process sets itself up as Popen's child would be
# (its stdin, stdout and stderr, no other descriptor, cwd, umask, rlimits, environment, sys.argv,
# sys.path[0], a __main__ of its own) and runs the program; it ends as the interpreter ends one
# (SystemExit("text") printed and status 1, an uncaught exception's traceback and status 1,
# KeyboardInterrupt's death by SIGINT, non-daemon threads joined, atexit functions, stdout and
# stderr flushed, status 120 if that fails), then os._exit: see _finish.  The monitor tells the test
# process the pid, then the exit status; it reaps the process only once the test process has that
# status (the test process closes its end then), so a pid is not reused before it is known dead,
# as with Popen.  A -c program costs about 15 ms of CPU this way, a daemon 40 ms (its readiness
# pings and its stop included), a run of the 100 KB script 80 ms (compiling it).
#
# It serves only what is the same program: sys.executable -c or a script, no preexec_fn or other
# Popen option, and the fork server's own environment but for variables nothing reads before the
# program runs (the product's NODEMNGR_*, PYTEST_CURRENT_TEST: see _startup_env).  Otherwise, with
# TESTS_EXEC_DAEMONS=1, and without use_fork_server() (the benchmark), it is exec'd.  What still
# differs from an exec: those standard modules are in sys.modules before the program runs (and
# frozen for the collector), the hash seed is the fork server's, /proc/PID/cmdline and
# /proc/PID/environ are the fork server's, the parent is the monitor, the glibc-internal signals
# 32 and 33 are not ignored (Popen from a threaded process leaves them ignored; nothing can send or
# set them), a SyntaxError in a script is placed as compile() places it (3.8's differs by a line),
# and at exit the modules are not torn down unless finalize=True: an object still referenced then
# is not finalized (what the program closed, flushed or collected is).  Tests that check that a
# process prints nothing more, even at exit, ask for finalize=True (0.07 s more).  test_daemon
# compares both kinds with exec'd ones.
#
# Ending a program as the interpreter does, and quoting a -c program's source in its tracebacks,
# takes CPython internals that nothing public offers (threading._shutdown, atexit._run_exitfuncs,
# linecache's registry of -c sources: see _finish and _register_source).  Before it serves, the
# fork server checks that this Python has them and that they still do what they did, on probes
# (_unsupported); where they do not, there is no fork server: every process is exec'd, as with
# TESTS_EXEC_DAEMONS=1, and fork_server_off() says why.  The umask a program is given is read from
# /proc/self/status, not by setting it (current_umask).

ZYGOTE = r"""__import__("sys")._fork_main = dict(globals())     # __main__ as python -c makes it
import os, sys
%(preload)s
%(before_check)s


def _serve(ctl_fd):
    # First what this Python lacks, if anything (the test process then execs every program);
    # then a monitor per request.  Returns None when the test process hangs up, and in the
    # program's process, the program.
    import gc, marshal, select, socket, struct
    ctl = socket.socket(fileno=ctl_fd)
    why_not = _unsupported()
    ctl.send(marshal.dumps(("unsupported", why_not) if why_not else ("ready", None)))
    if why_not:
        return None
    gc.collect()
    gc.freeze()     # what is here now stays: no collection in a child copies its pages
    while True:
        while True:             # monitors that are done
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        try:
            if not select.select([ctl], [], [], 1.0)[0]:
                continue
            msg, anc, _, _ = ctl.recvmsg(1 << 20, socket.CMSG_SPACE(4 * struct.calcsize("i")))
        except KeyboardInterrupt:
            msg = b""
        if not msg:             # the test process closed its end: wait for the monitors, then exit
            while True:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return None
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(data) // struct.calcsize("i")
                fds.extend(struct.unpack("%%di" %% n, data[:n * struct.calcsize("i")]))
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            try:
                os.close(ctl.detach())
                conn, stdio = fds[0], fds[1:4]
                request = marshal.loads(msg)
            except BaseException:
                os._exit(1)
            return _monitor(conn, stdio, request)   # (only the program's process returns)
        for fd in fds:          # the monitor has them (or the test process hears EOF)
            os.close(fd)


def _monitor(conn, stdio, request):
    import marshal, signal
    try:
        pid = os.fork()
    except OSError as exc:
        try:
            os.write(conn, marshal.dumps(("error", "fork: %%s" %% exc)))
        finally:
            os._exit(1)
    if pid == 0:
        os.close(conn)
        return _become(stdio, request)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)    # a ^C is for the program and the tests
        for fd in stdio:
            os.close(fd)
        os.write(conn, marshal.dumps(("pid", pid)))
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)     # (a zombie still)
        status = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        try:
            os.write(conn, marshal.dumps(("exit", status)))
            os.read(conn, 1)    # returns when the test process closes its end: it has the status
        except OSError:
            pass
        os.waitpid(pid, 0)
    finally:
        os._exit(0)


def _become(stdio, request):
    # What Popen([sys.executable, "-c", PROGRAM] + ARGS, stdin=, stdout=, stderr=, cwd=, env=)
    # would have given the program's process; returns the program.
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.close(int(name))
            except OSError:
                pass
    if request["cwd"] is not None:
        os.chdir(request["cwd"])
    os.umask(request["umask"])
    import resource
    for which, limits in request["rlimits"]:
        if resource.getrlimit(which) != limits:
            resource.setrlimit(which, limits)
    os.environ.clear()
    os.environ.update(request["env"])
    if request["script"] is None:
        sys.argv[:] = ["-c"] + request["args"]
    else:                       # python SCRIPT: its folder (links resolved) first on sys.path
        sys.argv[:] = [request["script"]] + request["args"]
        sys.path[0] = os.path.dirname(os.path.realpath(request["script"]))
    return request["program"], request["script"], request["finalize"]


def _compiled(program, script, g, sys=sys):
    # The program's code; a script's __file__, __cached__ and __loader__ in *g*, a -c program's
    # source where tracebacks look for it (python -c registers it).
    if script is not None:
        from importlib.machinery import SourceFileLoader
        g.update(__file__=script, __cached__=None, __loader__=SourceFileLoader("__main__", script))
        with open(script, "rb") as f:
            return compile(f.read(), script, "exec")
    code = compile(program, "<string>", "exec")
    _register_source(code, program)
    return code


def _register_source(code, program, sys=sys):
    # python -c registers its source for tracebacks since 3.13 (3.13.0 under the name "<string>"
    # in linecache.cache, later ones under the code object, through linecache._register_code).
    # The fork server, a -c program itself, has its own source there: a program's must replace
    # it, or the program's tracebacks would quote the fork server.  No public function registers
    # source text: this writes linecache.cache (a module dict the documentation does not
    # mention) and calls the private linecache._register_code.  _unsupported tries it on a probe
    # before the fork server serves: should a Python register -c sources otherwise, the probe's
    # traceback quotes the wrong text and the tests exec every process.  Tracebacks of forked
    # and exec'd programs are compared by test_daemon's test_forked_programs_and_daemons_...
    linecache = sys.modules.get("linecache")
    for key in list(linecache.cache) if linecache is not None else ():
        if key == "<string>":
            linecache.cache[key] = (len(program), None, [line + "\n" for line in program.splitlines()], key)
        elif getattr(key, "co_filename", None) == "<string>":
            del linecache.cache[key]
            linecache._register_code(code, program, "<string>")


def _run(program, script, finalize, sys=sys, os=os, compiled=_compiled):
    # python -c PROGRAM or python SCRIPT, in this process: a __main__ as python makes it, a
    # -c program's source where tracebacks look for it, the fork server's frames left out of
    # tracebacks.  With *finalize*, the rest is the interpreter's: what the program raises leaves
    # this function, and the fork server's program ends there.  Without, the end is done here as
    # Py_FinalizeEx does it -- uncaught exceptions and SystemExit handled as the interpreter does,
    # non-daemon threads joined, atexit functions, stdout and stderr flushed (status 120 if that
    # fails), a last collection -- but for the teardown of every module, which would copy the fork
    # server's memory page by page (0.06 s of CPU a process): objects still referenced then are not
    # finalized, and what a finalizer would print is not printed.
    # (sys._getframe: documented, as a CPython detail; its caller is the fork server's module code)
    ours, previous = {sys._getframe().f_code, sys._getframe(1).f_code, compiled.__code__}, sys.excepthook

    def excepthook(kind, value, tb):
        sys.excepthook = previous
        while tb is not None and tb.tb_frame.f_code in ours:
            tb = tb.tb_next
        if isinstance(value, BaseException):
            value.__traceback__ = tb    # (what some Pythons print)
        sys.last_type, sys.last_value, sys.last_traceback = kind, value, tb
        previous(kind, value, tb)
    sys.excepthook = excepthook
    main = type(sys)("__main__")        # a __main__ of its own, not the fork server's
    main.__dict__.update(sys.__dict__.pop("_fork_main"), __annotations__={})
    sys.modules["__main__"], g = main, main.__dict__
    if finalize:
        __import__("gc").unfreeze()     # (frozen, __main__ would not be torn down)
        exec(compiled(program, script, g), g)
        return
    interrupted = False
    try:
        exec(compiled(program, script, g), g)
        status = 0
    except SystemExit as exc:
        status = exc.code
        if status is None:
            status = 0
        elif not isinstance(status, int):
            if sys.stderr is not None:
                sys.stderr.write("%%s\n" %% (status,))
            status = 1
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        interrupted, status = isinstance(exc, KeyboardInterrupt), 1
    _finish(status, interrupted)


def _finish(status, interrupted=False, sys=sys, os=os):
    # Py_FinalizeEx but for the teardown of the modules, then os._exit.  Two private functions,
    # for want of public ones:
    # - threading._shutdown(), Py_FinalizeEx's first step (wait_for_thread_shutdown): it runs what
    #   threading._register_atexit registered (concurrent.futures tells its idle workers to exit:
    #   non-daemon threads since 3.9, and the daemon has an executor) and joins the non-daemon
    #   threads.  Joining threading.enumerate() here instead would wait forever for those workers.
    # - atexit._run_exitfuncs(): the atexit functions, last registered first, what they raise
    #   printed (3.8 also raises the last one again).  Nothing public runs them.
    # Should either go, or change so that a program no longer ends as an exec'd one does (its
    # threads cut short, a hang, atexit output lost), _unsupported sees it before the fork server
    # serves and the tests exec every process (test_daemon's test_a_fork_server_...); what the
    # check does not try, test_daemon's test_forked_programs_and_daemons_... compares.
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    try:
        __import__("atexit")._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            status = 120
    __import__("gc").collect()
    if interrupted:
        import signal
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _unsupported():
    # Why a forked program would not be what an exec'd one is on this Python (None: it would):
    # the CPython internals used above are there and do what they did, tried on probes.
    import select, time, traceback
    for module, name in (("sys", "_getframe"), ("threading", "_shutdown"), ("atexit", "_run_exitfuncs")):
        if not callable(getattr(__import__(module), name, None)):
            return "this Python has no %%s.%%s" %% (module, name)
    # a -c program's traceback quotes its own source where this Python's python -c does so
    quotes = traceback.extract_stack(sys._getframe())[-1].line     # (the fork server is a -c program)
    probe = "raise LookupError('a probe of the fork server')\n"
    code = compile(probe, "<string>", "exec")
    try:
        _register_source(code, probe)
        exec(code, {})
    except LookupError as exc:
        quoted = traceback.extract_tb(exc.__traceback__)[-1].line or ""
    except Exception as exc:
        return "registering a -c program's source failed: %%r" %% (exc,)
    if quoted != (probe.strip() if quotes else ""):
        return "a -c program's traceback would quote %%r" %% (quoted,)
    # a program's end: its threads joined (an idle executor's worker told to exit), then atexit
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            import atexit, threading
            from concurrent.futures import ThreadPoolExecutor
            ThreadPoolExecutor(1).submit(int).result()
            threading.Thread(target=lambda: (time.sleep(0.01), os.write(w, b"thread, "))).start()
            atexit.register(os.write, w, b"atexit")
            _finish(3)
        finally:
            os._exit(99)
    os.close(w)
    said, deadline = b"", time.monotonic() + 10
    while select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(r, 100)
        if not chunk:
            break
        said += chunk
    else:
        os.kill(pid, 9)
    os.close(r)
    status = os.waitpid(pid, 0)[1]
    if said != b"thread, atexit" or not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 3:
        return "a program would end otherwise than an exec'd one: %%r, wait status %%d" %% (said, status)
    return None


_program = _serve(int(sys.argv[1]))
if _program is None:
    sys.exit(0)
_run(*_program)
"""


def _preload_source():
    """``import`` lines for the standard modules nodemngr.py and nodemngr_proxy.py import, at their
    top level or in a function (read from their source, so that a change of theirs is followed)."""
    import ast
    names = []
    for path in (NODEMNGR, os.path.join(ROOT, "nodemngr_proxy.py")):
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            else:
                continue
            names += [n for n in found if n.split(".")[0] not in ("nodemngr", "nodemngr_proxy") and n not in names]
    return "\n".join("try:\n    import %s\nexcept ImportError:\n    pass" % n for n in names)


_RLIMITS = [getattr(resource, name) for name in sorted(dir(resource)) if name.startswith("RLIMIT_")]


def _startup_env(env):
    """*env* without what nothing reads before a program runs: the product's variables (nodemngr.py
    reads them in main()), portpicker's (read when it picks a port) and the name of the test pytest
    runs now."""
    return {k: v for k, v in env.items()
            if not k.startswith("NODEMNGR_") and k not in ("PORTSERVER_ADDRESS", "PYTEST_CURRENT_TEST")}


class ForkedProcess:
    """A program the fork server started, with what tests use of a Popen: args, pid, returncode,
    stdin/stdout/stderr (file objects for PIPE), poll(), wait(timeout) (TimeoutExpired),
    communicate(input, timeout), send_signal(), terminate(), kill(), a with block.  The exit
    status is the real one (negative: the signal that killed it)."""

    def __init__(self, args, pid, conn, stdin=None, stdout=None, stderr=None, running=None):
        self.args, self.pid, self.returncode = args, pid, None
        self._running = running if running is not None else set()     # its fork server's, it in it
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._conn, self._lock, self._pumps = conn, threading.Lock(), None

    def _collect(self, timeout):
        with self._lock:
            if self.returncode is None:
                if not select.select([self._conn], [], [], timeout)[0]:
                    return False
                msg = self._conn.recv(4096)
                self._conn.close()      # the monitor now reaps the process and exits
                self._running.discard(self)
                if not msg:
                    raise ServerError("the monitor of process %d ended without its exit status" % self.pid)
                self.returncode = marshal.loads(msg)[1]
            return True

    def poll(self):
        self._collect(0)
        return self.returncode

    def wait(self, timeout=None):
        if not self._collect(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def communicate(self, input=None, timeout=None):
        """Popen.communicate: write *input* and close stdin, read stdout and stderr to their ends
        (after what readline() took), wait; TimeoutExpired leaves it running, to be called again."""
        if self._pumps is None:
            self._pumps, self._outputs = [], {}

            def feed():
                try:
                    if input:
                        self.stdin.write(input)
                    self.stdin.close()
                except BrokenPipeError:
                    pass

            def drain(name, f):
                try:
                    self._outputs[name] = f.read()
                finally:
                    f.close()
            if self.stdin is not None:
                self._pumps.append(threading.Thread(target=feed, daemon=True))
            for name in ("stdout", "stderr"):
                if getattr(self, name) is not None:
                    self._pumps.append(threading.Thread(target=drain, args=(name, getattr(self, name)), daemon=True))
            for t in self._pumps:
                t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._pumps:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self._outputs.get("stdout"), self._outputs.get("stderr")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()
        self.wait()

    def __repr__(self):
        return "<ForkedProcess pid=%d returncode=%s>" % (self.pid, self.returncode)


class ForkServer:
    """A fork server (see ZYGOTE): unsupported() waits until it has started and says why it cannot
    serve on this Python (None: it can); then spawn() starts a ``python -c`` program or a ``python
    SCRIPT``.  *before_check*: Python code it runs after its imports, before it checks this Python
    (for tests of that check)."""

    def __init__(self, env, before_check=""):
        self.env, self.forked, self._why_not = env, 0, False
        self.running = set()        # the ForkedProcess it started whose exit status is not known yet
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            program = ZYGOTE % {"preload": _preload_source(), "before_check": before_check}
            self.proc = subprocess.Popen([sys.executable, "-c", program, str(theirs.fileno())], env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.sock, self._lock = ours, threading.Lock()

    def unsupported(self, timeout=60):
        """None once it serves; or why it will not on this Python (it has exited then)."""
        if self._why_not is False:
            if not select.select([self.sock], [], [], timeout)[0]:
                raise ServerError("the fork server (pid %d) did not start within %s s" % (self.proc.pid, timeout))
            msg = self.sock.recv(4096)
            if not msg:
                raise ServerError("the fork server ended as it started (status %s)" % self.proc.wait(10))
            self._why_not = marshal.loads(msg)[1]
        return self._why_not

    def serves(self, env):
        """Whether a program with environment *env* is the same program forked from here: the same
        environment but for what nothing reads before the program runs (it gets *env* whole)."""
        return _startup_env(env) == _startup_env(self.env)

    def spawn(self, argv, env, cwd=None, stdin=None, stdout=None, stderr=None, text=False, finalize=False):
        """Popen([sys.executable] + *argv*, ...) for argv = ["-c", PROGRAM, ARGS...] or [SCRIPT, ARGS...]."""
        umask = current_umask()
        if umask is None:
            raise ServerError("the umask cannot be read without changing it")
        program, script, args = (argv[1], None, argv[2:]) if argv[0] == "-c" else (None, str(argv[0]), argv[1:])
        request = marshal.dumps({"program": program, "script": script, "finalize": finalize,
                                 "args": [str(a) for a in args], "env": dict(env),
                                 "cwd": None if cwd is None else str(cwd), "umask": umask,
                                 "rlimits": [(r, resource.getrlimit(r)) for r in _RLIMITS]})
        theirs, ours, to_close = [], [None, None, None], []
        try:
            for i, spec in enumerate((stdin, stdout, stderr)):
                if spec is None:
                    theirs.append(i)                    # inherited, as Popen does
                elif spec == subprocess.DEVNULL:
                    theirs.append(os.open(os.devnull, os.O_RDWR))
                    to_close.append(theirs[-1])
                elif spec == subprocess.PIPE:
                    r, w = os.pipe()
                    mine, child = (w, r) if i == 0 else (r, w)
                    f = io.open(mine, "wb" if i == 0 else "rb", -1)
                    if text:
                        f = io.TextIOWrapper(f, write_through=True) if i == 0 else io.TextIOWrapper(f)
                    ours[i] = f
                    theirs.append(child)
                    to_close.append(child)
                elif spec == subprocess.STDOUT and i == 2:
                    theirs.append(theirs[1])
                else:
                    theirs.append(spec if isinstance(spec, int) else spec.fileno())
            conn, conn_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            to_close.append(conn_theirs.detach())
            with self._lock:
                try:
                    self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   struct.pack("4i", to_close[-1], *theirs))])
                except OSError as exc:
                    raise ServerError("the fork server (pid %d) is gone (%s; status %s)"
                                      % (self.proc.pid, exc, self.proc.poll()))
        except BaseException:
            for f in ours:
                if f is not None:
                    f.close()
            raise
        finally:
            for fd in to_close:
                os.close(fd)
        if not select.select([conn], [], [], 60)[0]:
            conn.close()
            raise ServerError("the fork server (pid %d) started nothing within 60 s" % self.proc.pid)
        msg = conn.recv(4096)
        kind, value = marshal.loads(msg) if msg else ("error", "it ended (status %s)" % self.proc.poll())
        if kind != "pid":
            conn.close()
            raise ServerError("the fork server could not start a process: %s" % value)
        proc = ForkedProcess([sys.executable] + list(argv), value, conn, *ours, running=self.running)
        self.running.add(proc)
        self.forked += 1
        return proc

    def close(self):
        """Stop what it started that still runs (a test should have, by pid), then it."""
        for proc in list(self.running):
            if proc.poll() is None:
                sys.stderr.write("support: process %d (%s) was still running: stopped\n"
                                 % (proc.pid, " ".join(proc.args[2:])[:60]))
                stop_process(proc)
        self.sock.close()       # the fork server waits for its monitors, then exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop_pid(self.proc.pid)
            self.proc.wait(10)


def current_umask():
    """This process's umask, or None where it cannot be read without changing it: os.umask() reads
    it only by setting it, and files another thread creates meanwhile would get the wrong mode.
    Linux shows it in /proc/self/status (since 4.7)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return None


# the environment it runs with, the ForkServer, and why every process is exec'd (None: they are not)
_fork_server = {"env": None, "server": None, "off": "use_fork_server() was not called"}
_fork_server_lock = threading.Lock()


def use_fork_server(enabled=True):
    """Start ``python -c`` programs (daemons among them) through a fork server from now on (the
    tests; the benchmark execs every daemon), one that runs with clean_env() as it is now.  With
    TESTS_EXEC_DAEMONS=1 (any value but 0) in the environment, every process is exec'd."""
    if os.environ.get("TESTS_EXEC_DAEMONS", "") not in ("", "0"):
        enabled, _fork_server["off"] = False, "TESTS_EXEC_DAEMONS is set"
    elif not enabled:
        _fork_server["off"] = "use_fork_server(False)"
    elif current_umask() is None:
        enabled, _fork_server["off"] = False, "the umask cannot be read here without changing it"
    _fork_server["env"] = clean_env() if enabled else None
    if enabled:
        _fork_server["off"] = None


def fork_server():
    """This process's ForkServer, started on first use; None when every process is exec'd (then
    fork_server_off() says why).  A fork server that finds this Python lacking what it needs is
    stopped, and every process is exec'd from then on: a fork server never runs a program
    otherwise than an exec'd Python would."""
    with _fork_server_lock:
        if _fork_server["env"] is None:
            return None
        if _fork_server["server"] is None:
            server = ForkServer(_fork_server["env"])
            why_not = server.unsupported()
            if why_not:
                server.close()
                _fork_server["env"], _fork_server["off"] = None, "no fork server: " + why_not
                sys.stderr.write("support: %s; every process is exec'd\n" % _fork_server["off"])
                return None
            _fork_server["server"] = server
        return _fork_server["server"]


def fork_server_off():
    """Why every process is exec'd (None: programs are forked where they can be)."""
    return _fork_server["off"]


@atexit.register
def stop_fork_server():
    """Stop the fork server (by pid, and what it started first); the next program starts another."""
    with _fork_server_lock:
        server, _fork_server["server"] = _fork_server["server"], None
    if server is not None:
        server.close()


def popen_python(argv, stdin=None, stdout=None, stderr=None, env=None, cwd=None, text=False, finalize=False,
                 **popen_kw):
    """subprocess.Popen([sys.executable] + *argv*, ...): for ``["-c", PROGRAM, ARGS...]`` or
    ``[SCRIPT, ARGS...]`` with no other option, a ForkedProcess from the fork server when it is the
    same program.  finalize=True: it ends with the interpreter's whole teardown, as an exec'd one
    (for tests of what a process prints even at exit), not without the modules' (see _run)."""
    bad = [a for a in argv if not isinstance(a, (str, bytes, os.PathLike))]
    if bad:     # (as an exec'd run would: the fork server must not hide it)
        raise TypeError("expected str, bytes or os.PathLike object, not %s" % type(bad[0]).__name__)
    text = text or popen_kw.pop("universal_newlines", False)
    forkable = argv[0] == "-c" and len(argv) >= 2 or not str(argv[0]).startswith("-") and os.path.isfile(str(argv[0]))
    server = fork_server() if not popen_kw and forkable else None
    if server is not None and server.serves(os.environ if env is None else env):
        return server.spawn(argv, dict(os.environ if env is None else env), cwd, stdin, stdout, stderr, text,
                            finalize)
    return subprocess.Popen([sys.executable] + list(argv), stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                            cwd=cwd, text=text, **popen_kw)


def run_python(argv, input=None, capture_output=False, timeout=None, check=False, **kw):
    """subprocess.run([sys.executable] + *argv*, ...) through popen_python()."""
    if capture_output:
        kw["stdout"] = kw["stderr"] = subprocess.PIPE
    if input is not None:
        kw["stdin"] = subprocess.PIPE
    with popen_python(argv, **kw) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        result.check_returncode()
    return result


class ServerProcess:
    """A server in a subprocess, its output in a log file; stop() ends it by pid."""

    def __init__(self, name, argv, port, log, host="127.0.0.1", env=None, cwd=None, preexec_fn=None,
                 exec_only=False):
        self.name, self.host, self.port, self.log = name, host, port, log
        self._argv, self.env, self.cwd, self.preexec_fn = argv, env, cwd, preexec_fn
        self.exec_only = exec_only
        self.proc = self._logf = None

    @property
    def url(self):
        return "http://%s:%d/RPC2" % (self.host, self.port)

    def argv(self):
        return list(self._argv)

    def start(self, wait=True):
        self._logf = open(self.log, "ab")
        self.proc = self._spawn(self.env if self.env is not None else clean_env())
        if wait:
            self.wait_ready()
        return self

    def _spawn(self, env):
        argv, how = self.argv(), dict(env=env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=self._logf,
                                      stderr=subprocess.STDOUT)
        if argv[0] == sys.executable and self.preexec_fn is None and not self.exec_only:
            return popen_python(argv[1:], **how)    # forked when that is the same (see ZYGOTE)
        return subprocess.Popen(argv, preexec_fn=self.preexec_fn, **how)

    def answers(self):
        """Whether the server answers a ping now (one that wants a token counts): the product's
        own check, which its client and serve use too."""
        return nodemngr.who_answers(self.host, self.port, timeout=0.5) in ("nodemngr", "other")

    def wait_ready(self, timeout=10.0):
        """Poll until it answers (no fixed sleep); ServerError if it exits or does not answer in time."""
        def up():
            self.check_alive()
            return self.answers()
        if not wait_until(up, timeout, interval=0.01):
            raise ServerError("%s did not answer within %ss; log:\n%s" % (self.name, timeout, self.log_tail()))

    def check_alive(self):
        if self.proc.poll() is not None:
            raise ServerError("%s exited with %s; log:\n%s" % (self.name, self.proc.returncode, self.log_tail()))

    def rpc(self, **kw):
        """A fresh plain ServerProxy to this server (no pid sent, unlike NodeMngrProxy)."""
        return xmlrpc.client.ServerProxy(self.url, use_builtin_types=True, **kw)

    def read_log(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=3000):
        return self.read_log()[-n:]

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)
        if self._logf:
            self._logf.close()
            self._logf = None


class Daemon(ServerProcess):
    """One real nodemngr daemon in a subprocess, with a range and state of its own.

    Attributes: host, port, first, last, state (path or "none"), log (path), proc, url, env (the
    environment a client of this daemon needs: NODEMNGR_HOST/PORT set, autostart off).
    settings: {"Class.attribute": value} set in the daemon before it serves, e.g.
    daemon_settings(stall_timeout=1.0).  script: the nodemngr.py to run (the benchmark's
    --baseline runs an older copy).  preexec_fn: run in the child before it starts (rlimits).
    cwd: its working folder (default: this process's).  exec_only: exec it even where the fork
    server could start it (see ZYGOTE).
    """

    def __init__(self, folder, first=None, last=None, size=50, state=None, host="127.0.0.1",
                 port=None, extra_args=(), env=None, python=None, settings=None, script=NODEMNGR,
                 log_level="DEBUG", name="daemon", preexec_fn=None, cwd=None, exec_only=False):
        if first is None:
            first, last = free_range(size)
        port_given = port
        port = port or free_port()
        super().__init__(name, None, port, os.path.join(str(folder), "%s-%d.log" % (name, port)), host=host,
                         cwd=cwd, preexec_fn=preexec_fn, exec_only=exec_only)
        self._own_port = port_given is None     # a port we picked may be taken before the daemon binds it
        self.first, self.last = first, last
        self.state = os.path.join(str(folder), "state.sqlite3") if state is None else str(state)
        self.extra_args = list(extra_args)
        self.python = python or sys.executable
        self.settings = dict(settings or {})
        self.script, self.log_level = script, log_level
        self.env = clean_env(NODEMNGR_HOST=self.host, NODEMNGR_PORT=self.port, NODEMNGR_AUTOSTART=0,
                             **(env or {}))

    def args(self):
        """The command line's arguments (what follows ``nodemngr.py``)."""
        return ["serve", "--host", self.host, "--port", str(self.port), "--first-port", str(self.first),
                "--last-port", str(self.last), "--state", self.state, "--log-level", self.log_level] + self.extra_args

    def argv(self):
        return [self.python, "-c", launcher(self.script, self.settings)] + self.args()

    def start(self, wait=True):
        for attempt in range(3):
            super().start(wait=False)
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except ServerError:
                lost = "is held by another program" in self.read_log() and self.proc.poll() is not None
                if not (lost and self._own_port) or attempt == 2:
                    raise
            # another process took the free port between free_port() and the bind: pick again
            self._logf.close()
            self.port = free_port()
            self.env["NODEMNGR_PORT"] = str(self.port)
        return self

    def proxy(self, **kw):
        """A NodeMngrProxy aimed at this daemon, autostart off."""
        import nodemngr_proxy
        kw.setdefault("autostart", False)
        return nodemngr_proxy.NodeMngrProxy(host=self.host, port=self.port, **kw)

    def kill(self):
        """kill -9, and reap it."""
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout=15.0):
        """SIGTERM; return the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def registered(daemon):
    """{port: listPorts entry} of *daemon* (a Daemon), asked with xmlrpc.client."""
    return {e["port"]: e for e in daemon.rpc().listPorts()}


def assert_one_sentence(exc, port=None):
    """*exc* is a NodeMngrException whose text is one line, with no class repr or traceback (and
    names 127.0.0.1:*port*, if given): what every failed call of the client must be."""
    text = str(exc)
    assert isinstance(exc, nodemngr.NodeMngrException), repr(exc)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    assert "<class" not in text and "Error(" not in text and "Traceback" not in text, text
    if port is not None:
        assert "127.0.0.1:%d" % port in text, text


# ----------------------------------------------------------------------------- a daemon's load

def memory_kib(pid, field="VmRSS"):
    """A memory figure of /proc/PID/status in KiB: VmRSS (now) or VmHWM (the peak so far)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError("no %s in /proc/%d/status" % (field, pid))


def fill_registry(daemon, count, info_bytes=3900):
    """Register *count* ports with big infos (about *info_bytes* each), so that one listPorts reply
    is megabytes: count=1000 makes it about 4 MB."""
    rpc = daemon.rpc()
    per_batch = 60000 // (info_bytes + 100)
    for first in range(0, count, per_batch):
        multi = xmlrpc.client.MultiCall(rpc)
        for i in range(first, min(count, first + per_batch)):
            multi.newPort("%05d" % i + "x" * (info_bytes - 5))
        multi()


# ----------------------------------------------------------------------------- raw HTTP
#
# For tests that must write or read the bytes themselves: requests malformed on purpose, cut short
# or pipelined, replies nobody reads, headers the daemon writes.  http_request() builds a request;
# RawConnection sends any bytes, on a connection of its own or on a socket the test made, and reads
# complete replies; post() is one request and its reply on a fresh connection.  An ordinary call is
# made with xmlrpc.client (Daemon.rpc()), not with these.

def counters(daemon, name):
    """{label's value: count} of the labelled counter *name* (nodemngr_requests_total, say) in
    *daemon*'s /metrics (its samples with one label)."""
    found = {}
    for line in post(daemon, method="GET", path="/metrics").body.decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            found[labels.split("=", 1)[1].strip('"')] = float(value)
    return found


def rpc_body(method, *params):
    """An XML-RPC methodCall as xmlrpc.client writes it, as bytes."""
    return xmlrpc.client.dumps(params, method).encode()


def http_request(body=b"", method="POST", path="/RPC2", version="HTTP/1.1", headers=(), length=True):
    """The bytes of one request: the request line, ``Host: 127.0.0.1``, ``Content-Type: text/xml``,
    *headers* ("Name: value" strs, written as given and in order), ``Content-Length: len(body)``, a
    blank line, *body*.  *length* an int: that Content-Length instead (a body cut short); false: none
    (a test writes its own among *headers*, or tests its absence).  What this cannot write (no Host,
    a broken request line) a test writes as bytes."""
    lines = ["%s %s %s" % (method, path, version), "Host: 127.0.0.1", "Content-Type: text/xml"]
    lines += list(headers)
    if length is True:
        lines.append("Content-Length: %d" % len(body))
    elif length is not False and length is not None:
        lines.append("Content-Length: %d" % length)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Reply:
    """One HTTP reply read by RawConnection: version ("HTTP/1.1"), status (int), reason (str),
    headers ({lower-case name: value}), body (bytes)."""

    __slots__ = ("version", "status", "reason", "headers", "body")

    def __init__(self, version, status, reason, headers, body):
        self.version, self.status, self.reason, self.headers, self.body = version, status, reason, headers, body

    def result(self):
        """The XML-RPC result it carries: the value (bytes and datetime as Python's), or the
        xmlrpc.client.Fault; AssertionError unless it is a 200 text/xml reply."""
        assert self.status == 200, self
        assert self.headers.get("content-type", "").startswith("text/xml"), self
        try:
            (value,), _ = xmlrpc.client.loads(self.body, use_builtin_types=True)
        except xmlrpc.client.Fault as fault:
            return fault
        return value

    def __repr__(self):
        return "<Reply %s %d %s %r %r>" % (self.version, self.status, self.reason, self.headers, self.body[:300])


class RawConnection:
    """One TCP connection, for bytes.  ``RawConnection(daemon)`` (anything with .host and .port) or
    ``RawConnection((host, port))`` connects; ``RawConnection(sock)`` uses a socket the test made (with
    a small receive buffer, say).  *timeout* bounds every send and read; *read_size* is the most one
    read takes, and *read_pause* the seconds between two reads (a slow but steady reader).

    send(data) sends all of *data*, whatever it is; reply() reads one complete reply (EOFError if
    the peer closes first); replies(n) reads n, or fewer if the peer closes first; at_eof() says
    whether the peer closes next.  Reading checks what it needs to split replies and what every
    reply of the daemon must be: an ``HTTP/1.1 NNN reason`` status line, no header twice, a body
    framed by Content-Length (never chunked), none for a 1xx.  Bytes past the replies read are kept
    for the next read: none is lost, however the peer split or joined them."""

    def __init__(self, to, timeout=10.0, read_size=1 << 20, read_pause=0.0):
        self.read_size, self.read_pause = read_size, read_pause
        if isinstance(to, socket.socket):
            self.sock = to
        else:
            self.sock = socket.create_connection((to.host, to.port) if hasattr(to, "port") else to, timeout=timeout)
        self.sock.settimeout(timeout)
        self._data, self._at = bytearray(), 0       # what was received; where the next reply begins

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        replies = self.replies(1)
        if not replies:
            raise EOFError("the peer closed the connection; unread: %r" % bytes(self._data[self._at:self._at + 200]))
        return replies[0]

    def replies(self, count):
        replies = []
        while len(replies) < count:
            reply = self._next()
            if reply is not None:
                replies.append(reply)
                continue
            if self.read_pause and self._data:
                time.sleep(self.read_pause)
            chunk = self.sock.recv(self.read_size)
            if not chunk:
                break
            self._data += chunk
        return replies

    def _next(self):
        """The next complete reply in what was received, or None."""
        data, at = self._data, self._at
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            return None
        lines = bytes(data[at:end]).decode("latin-1").split("\r\n")
        version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        assert version == "HTTP/1.1" and status.isdigit() and len(status) == 3, "status line %r" % lines[0]
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name.strip() == name, "header line %r" % line
            assert name.lower() not in headers, "header %s twice" % name
            headers[name.lower()] = value.strip()
        assert "transfer-encoding" not in headers, "a reply with Transfer-Encoding: %r" % lines
        if 100 <= int(status) < 200:
            length = 0
        else:
            assert headers.get("content-length", "").isdigit(), "no Content-Length: %r" % lines
            length = int(headers["content-length"])
        start = end + 4
        if len(data) < start + length:
            return None
        reply = Reply(version, int(status), reason, headers, bytes(data[start:start + length]))
        self._at = start + length
        if self._at > 1 << 20:      # drop what was read now and then, not at every reply
            del data[:self._at]
            self._at = 0
        return reply

    def at_eof(self, timeout=3.0):
        """Whether the peer closes (FIN or reset) within *timeout* seconds, sending nothing more
        (AssertionError if it sends more)."""
        assert self._at == len(self._data), "unexpected bytes after the replies: %r" % bytes(self._data[self._at:][:200])
        previous = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(previous)
        assert not data, "unexpected bytes after the replies: %r" % data[:200]
        return True

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_handovers(sock, replies, max_fds=64, timeout=10.0):
    """(bytes, descriptors) of *replies* whole XML-RPC replies read from the local socket *sock*,
    with every descriptor passed along them (SCM_RIGHTS); the caller closes those."""
    data, fds = b"", []
    deadline = time.monotonic() + timeout
    while data.count(b"</methodResponse>") < replies:
        assert time.monotonic() < deadline, "%d replies not read within %s s: %r" % (replies, timeout, data[-200:])
        chunk, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(4 * max_fds))
        assert chunk, "the connection was dropped with replies owed"
        data += chunk
        fds += [fd for _, _, c in ancillary for fd in struct.unpack("%di" % (len(c) // 4), c)]
    return data, fds


def post(to, body=b"", timeout=10.0, **request):
    """One request, ``http_request(body, **request)``, on a fresh connection to *to* (as for
    RawConnection): its Reply."""
    with RawConnection(to, timeout) as c:
        c.send(http_request(body, **request))
        return c.reply()


def slow_readers(daemon, count, request):
    """*count* connections (sockets) that each send *request* and read nothing, with small receive
    buffers: the daemon's replies wait in it."""
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((daemon.host, daemon.port))
        s.sendall(request)
        socks.append(s)
    return socks


def count_turned_away(socks, wait=0.2):
    """How many of *socks* have a 503 waiting to be read, or arriving within *wait* seconds (all of
    them watched at once)."""
    count, deadline = 0, time.monotonic() + wait
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while sel.get_map():
            ready = sel.select(max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for key, _ in ready:
                sel.unregister(key.fileobj)
                count += key.fileobj.recv(100).startswith(b"HTTP/1.1 503 ")
    return count


# ----------------------------------------------------------------------------- other users, pid namespaces

NOBODY = 65534                  # a uid that is not the tests': numeric uids need no account
OTHER_PYTHON = "/usr/bin/python3"   # a Python any user may run (the tests' may sit in root's home)


def as_user_argv(uid, argv):
    """*argv* run as user *uid*, its group *uid* and no other (setpriv, as root)."""
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups"] + list(argv)


def in_pid_namespace_argv(argv, uid=None):
    """*argv* run in a pid namespace of its own with its own /proc, as a container's process is
    (unshare, as root), as user *uid* when given.  The process running *argv* is not the
    namespace's init: a shell of the same user is, and stays (the namespace's pid 1 is a process
    of its own, and argv's own pid there is 2)."""
    init = ["sh", "-c", '"$@"; exit $?', "init"] + list(argv)
    return ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"] + (
        init if uid is None else as_user_argv(uid, init))


def why_not_other_users():
    """Why processes of other users and pid namespaces cannot be made here, or None when they can."""
    import shutil
    if os.geteuid() != 0:
        return "needs root to act as other users and make pid namespaces; .ci/run runs as root"
    missing = [tool for tool in ("setpriv", "unshare") if shutil.which(tool) is None]
    if missing or not os.path.exists(OTHER_PYTHON):
        return "needs util-linux's setpriv and unshare and %s; .ci/run installs them" % OTHER_PYTHON
    return None


class OtherUser:
    """Runs Python programs as user *uid*, with a folder of its own that holds a copy of the product
    (nodemngr.py, nodemngr_proxy.py), readable by every user: ``folder``.  file(name, text,
    mode) writes a file there that the user owns (a token file, say)."""

    def __init__(self, uid, parent):
        import shutil
        import tempfile
        self.uid = uid
        self.folder = tempfile.mkdtemp(prefix="nodemngr-uid%d-" % uid, dir=parent)
        for name in ("nodemngr.py", "nodemngr_proxy.py"):
            shutil.copy(os.path.join(ROOT, name), self.folder)
        os.chmod(self.folder, 0o755)
        os.chown(self.folder, uid, uid)

    def file(self, name, text, mode=0o600):
        path = os.path.join(self.folder, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        os.chown(path, self.uid, self.uid)
        return path

    def argv(self, code, *args, namespace=False):
        """The command line that runs Python program *code* with *args* as this user (in a pid
        namespace of its own: in_pid_namespace_argv)."""
        argv = [OTHER_PYTHON, "-c", "import sys; sys.path.insert(0, %r)\n" % self.folder + code] + [str(a) for a in args]
        return in_pid_namespace_argv(argv, self.uid) if namespace else as_user_argv(self.uid, argv)

    def run(self, code, *args, env=None, timeout=30, namespace=False):
        """The CompletedProcess of *code* run as this user (stdout and stderr as text)."""
        return subprocess.run(self.argv(code, *args, namespace=namespace), capture_output=True, text=True,
                              timeout=timeout, cwd="/", env=clean_env(**(env or {})))

    def popen(self, code, *args, env=None, namespace=False, **kw):
        return subprocess.Popen(self.argv(code, *args, namespace=namespace), cwd="/", env=clean_env(**(env or {})),
                                text=True, **kw)
