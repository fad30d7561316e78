"""nodemngr_proxy -- the Python client of the node manager, which starts one when none answers.

    >>> from nodemngr_proxy import NodeMngrProxy
    >>> with NodeMngrProxy() as nm:           # NODEMNGR_HOST / NODEMNGR_PORT, else 127.0.0.1:11800
    ...     port = nm.newPort({"service": "echo"})
    ...     nm.delPort(port)
    0

Making a proxy opens nothing: it connects on its first call.  If nothing answers there and the
address is a loopback one, it forks and execs ``sys.executable nodemngr.py serve`` detached (its own
session, no terminal, output to ``PORT.log`` beside the state file, none of the caller's other open
files, working folder "/") and waits until it answers, spawning again if that daemon gave up (as it
may while the previous one is still on its way out).  Any number of processes doing so at once end
with one daemon: they take turns at a lock file beside the state file, so only the first starts
one, and should that lock fail them, the others' daemons find the port bound and exit.
``NODEMNGR_AUTOSTART=0`` turns this off.  Every failed call raises a NodeMngrException whose text is
one line.  A proxy is safe to share between threads; each call borrows a kept-alive connection from
a small pool.
"""

import contextlib
import errno
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import xmlrpc.client
from xml.parsers import expat

try:
    import fcntl
except ImportError:     # not on Windows
    fcntl = None

import nodemngr
from nodemngr import NodeMngrException, exception_from_fault

__all__ = ["NodeMngrProxy", "start_daemon"]

_POOL_SIZE = 8                  # idle connections a proxy keeps
_spawn_lock = threading.Lock()  # one auto-start at a time in this process
_turn_fds = set()               # the spawn lock file while this process holds its turn (_spawn_turn)
_RESPAWN_MIN = 0.2              # seconds between two spawns, at least
_RESPAWN_MAX = 2.0              # spawn again when nothing listens this long, whatever the last one does
_CLOSE_ALL_LIMIT = 65536        # above this many descriptors, close only up to the highest open
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

# What a reply that is not XML-RPC raises (a Fault or an HTTP status is handled before these).
_REPLY_ERRORS = (xmlrpc.client.Error, http.client.HTTPException, expat.ExpatError, ValueError,
                 TypeError, OverflowError)

# What nodemngr.who_answers says when a call can go ahead: it reaches a node manager, or it
# reaches another program, whose reply the call then reports.
_SOMEONE = ("nodemngr", "other")


def _new_spawn_lock():
    global _spawn_lock      # a child forked while another thread held it must not inherit it held
    _spawn_lock = threading.Lock()
    for fd in _turn_fds:    # nor the spawn turn: an flock is the open file's, and would live on in it
        os.close(fd)
    _turn_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_spawn_lock)


class NodeMngrProxy:
    """A client of the node manager at *host*:*port* (else NODEMNGR_HOST/PORT, else defaults).

    autostart: start a daemon when none answers (else NODEMNGR_AUTOSTART, default on; only for
    loopback addresses).  token_file: the token for a daemon that needs one (else
    NODEMNGR_TOKEN_FILE).  timeout: seconds to wait for one reply.
    """

    def __init__(self, host=None, port=None, autostart=None, token_file=None, timeout=10.0):
        self.host = nodemngr.env_host(host)
        self.port = nodemngr.env_port(port)
        if autostart is None:
            autostart = os.environ.get("NODEMNGR_AUTOSTART", "1").strip() != "0"
        self.autostart = bool(autostart)
        self.token_file = token_file or os.environ.get("NODEMNGR_TOKEN_FILE") or None
        self.timeout = timeout
        self._idle = []
        self._pid = os.getpid()

    def __repr__(self):
        return "<NodeMngrProxy %s:%d>" % (self.host, self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the node manager's methods ------------------------------------------------------------

    def ping(self):
        """"NodeMngr at HOSTNAME is alive"."""
        return self.call("ping")

    def newPort(self, info, pid=None):
        """A port nobody else holds, registered with *info*; freed by itself once *pid* (by
        default this process) has ended.  Give pid=0 for a port that outlives this process."""
        return self.call("newPort", info, os.getpid() if pid is None else pid)

    def delPort(self, port):
        """Give *port* back; 0.  UnknownPortError (an IndexError) if it is not registered."""
        return self.call("delPort", port)

    def newSocket(self, info, kind="tcp", host="127.0.0.1", pid=None):
        """A socket.socket that the node manager bound (TCP: also listening) to a port nobody else
        holds, passed over its local socket; the port is registered with *info* as newPort does
        (freed once *pid*, by default this process, has ended, or by delPort).  No other process
        can take the port between its allocation and the bind.  kind: "tcp" or "udp"; host: the
        address to bind ("127.0.0.1", "0.0.0.0", "::1", "::")."""
        address = nodemngr.env_unix(None, self.port)
        if address is None:
            raise NodeMngrException("newSocket needs the node manager's local socket, and NODEMNGR_UNIX is none")
        for attempt in (0, 1):
            try:
                return nodemngr.request_socket(info, kind, host, pid, address, self.timeout)[1]
            except xmlrpc.client.Fault as fault:
                raise exception_from_fault(fault) from None
            except OSError as exc:
                if attempt or not self._should_start(exc, None):
                    raise NodeMngrException("no node manager answers on the local socket %s: %s" % (
                        address, exc.strerror or exc)) from None
                start_daemon(self.host, self.port, nodemngr.SPAWN_TIMEOUT, self.token_file)
            except _REPLY_ERRORS as exc:
                raise NodeMngrException("the local socket %s did not answer like a node manager: %s" % (
                    address, nodemngr.describe(exc))) from None

    def listPorts(self):
        """Every registered port: a list of {port, name, info, pid, since} dicts, sorted by port."""
        return self.call("listPorts")

    def lookup(self, name):
        """The ports registered under *name* (a string info, or a struct info's "name"), as
        listPorts lists them; [] when none."""
        return self.call("lookup", name)

    def locate(self, name):
        """The ports named *name* on every host of the cluster (etcd): a list of {host, port, name,
        info, pid, since} dicts, sorted by host then port.  ClusterError when there is no cluster
        view or etcd cannot be reached."""
        return self.call("locate", name)

    def listCluster(self):
        """Every host's registrations, from the cluster view, as locate lists them."""
        return self.call("listCluster")

    def status(self):
        """The daemon's status: a dict (version, pid, host, port, range, counts, uptime, state)."""
        return self.call("status")

    def terminate(self):
        """Stop the node manager; True."""
        try:
            return self.call("terminate", autostart=False)
        finally:
            self.close()

    stopserve = terminate   # the 1999 module's name

    def close(self):
        """Close the kept-alive connections (the proxy stays usable)."""
        idle, self._idle = self._idle, []
        for server in idle:
            server("close")()

    # -- plumbing ------------------------------------------------------------------------------

    def call(self, method, *args, autostart=None):
        """Call any wire *method* (e.g. "system.listMethods") with *args*."""
        for attempt in (0, 1):
            server = self._borrow()
            try:
                result = getattr(server, method)(*args)
            except xmlrpc.client.Fault as fault:
                self._give_back(server)
                raise exception_from_fault(fault) from None
            except NodeMngrException:   # refused before sending (a character XML cannot carry)
                self._give_back(server)
                raise
            except OSError as exc:
                server("close")()
                if attempt or not self._should_start(exc, autostart):
                    raise NodeMngrException(self._explain(exc)) from None
                start_daemon(self.host, self.port, nodemngr.SPAWN_TIMEOUT, self.token_file)
                continue
            except _REPLY_ERRORS as exc:     # HTTP errors, unreadable replies, unsendable arguments
                server("close")()
                reason = _unsendable(args) if isinstance(exc, (TypeError, OverflowError)) else None
                if reason:
                    raise UnsendableError("cannot send this %s call: %s" % (method, reason)) from None
                raise NodeMngrException(self._explain(exc)) from None
            self._give_back(server)
            return result

    def _borrow(self):
        if self._pid != os.getpid():    # forked: the pool's sockets belong to the parent
            self._pid, self._idle = os.getpid(), []
        try:
            return self._idle.pop()
        except IndexError:
            return nodemngr.make_proxy(self.host, self.port, nodemngr.read_token(self.token_file), self.timeout)

    def _give_back(self, server):
        if len(self._idle) < _POOL_SIZE:
            self._idle.append(server)
        else:
            server("close")()

    def _should_start(self, exc, autostart):
        """Refused, or cut off mid-call by a daemon on its way out: start one (loopback only)."""
        if not (self.autostart if autostart is None else autostart):
            return False
        gone = isinstance(exc, ConnectionError) or getattr(exc, "errno", None) in (
            errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE)
        return gone and nodemngr.is_loopback(self.host)

    def _explain(self, exc):
        """One line for a failed call, naming host:port (never a class repr or a traceback)."""
        where = "%s:%d" % (self.host, self.port)
        if isinstance(exc, socket.timeout):     # TimeoutError since 3.10
            return "the node manager at %s did not answer within %g s" % (where, self.timeout)
        if isinstance(exc, (OSError, xmlrpc.client.ProtocolError)):
            text = nodemngr.describe_call_error(exc, self.host, self.port)
            if isinstance(exc, ConnectionRefusedError) and not self.autostart:
                text += " (auto-start is off)"
            return _one_line(text, 300)
        if isinstance(exc, http.client.BadStatusLine):     # e.g. an SSH server's banner
            return "the server at %s is not a node manager: it answered %s where HTTP was due" % (
                where, _quoted(exc.line))
        if isinstance(exc, http.client.IncompleteRead):
            return "the reply from %s was cut short" % where
        if isinstance(exc, http.client.HTTPException):     # e.g. a header line too long
            return "the server at %s sent a broken HTTP reply (%s)" % (
                where, _one_line(exc) or type(exc).__name__)
        detail = "" if isinstance(exc, xmlrpc.client.Error) else " (%s)" % _one_line(exc)
        return "the server at %s is not a node manager: its reply is not XML-RPC%s" % (where, detail)


class UnsendableError(nodemngr.BadArgumentError, TypeError):
    """A call argument that XML-RPC cannot carry (nothing was sent); also a TypeError."""


def _unsendable(args):
    """Why *args* cannot be marshalled, or None if they can (so the reply was at fault)."""
    try:
        xmlrpc.client.dumps(tuple(args), "call")
    except (TypeError, OverflowError) as exc:
        return _one_line(re.sub(r"<class '([\w.]+)'>", r"\1", str(exc)))
    return None


def _one_line(value, limit=160):
    """*value* as text on one line: control characters escaped, length bounded."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value).strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _quoted(value):
    return '"%s"' % _one_line(value, 80)


# ---------------------------------------------------------------------------------------------
# Auto-start
# ---------------------------------------------------------------------------------------------

def start_daemon(host=None, port=None, timeout=nodemngr.SPAWN_TIMEOUT, token_file=None):
    """Start a detached node manager for *host*:*port* unless one answers; wait until one does.
    token_file: the daemon's token (else NODEMNGR_TOKEN_FILE).

    A daemon started while the previous one is still on its way out may give up (the state file
    is still held); so while nothing listens and the daemon spawned last has exited, spawn again.
    Spawned daemons race safely: one binds the port, the others find it bound and exit."""
    host, port = nodemngr.env_host(host), nodemngr.env_port(port)
    deadline = time.monotonic() + timeout
    if not _spawn_lock.acquire(timeout=timeout):    # (another thread of ours took all of it)
        if nodemngr.who_answers(host, port) in _SOMEONE:
            return
        raise NodeMngrException("no node manager answered at %s:%d within %g s" % (host, port, timeout))
    try:
        log_path = _log_path(port)
        try:
            lock_path = os.path.join(_state_folder(port), "%d.spawn.lock" % port)
        except NodeMngrException:       # (NODEMNGR_LOG_FILE set: the state folder was not needed)
            lock_path = None
        # half the time at most for the turn: a holder stuck (stopped) must not fail the others
        with _spawn_turn(lock_path, deadline - timeout / 2, lambda: nodemngr.who_answers(host, port)):
            _spawn_until_answered(host, port, log_path, token_file, deadline, timeout)
    finally:
        _spawn_lock.release()


def _spawn_until_answered(host, port, log_path, token_file, deadline, timeout):
    """start_daemon's loop: spawn, and spawn again while nothing listens, until one answers."""
    # (another thread of ours, or the client whose turn came first, may have started one)
    answer = nodemngr.who_answers(host, port)
    argv = _daemon_argv(host, port, log_path, token_file)
    daemon, spawned_at, delay = None, None, 0.005
    while answer not in _SOMEONE:
        now = time.monotonic()
        if answer is None and _time_to_spawn(daemon, spawned_at, now):
            daemon, spawned_at, delay = _spawn_detached(argv, log_path), now, 0.005
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
        answer = nodemngr.who_answers(host, port)
        if answer not in _SOMEONE and time.monotonic() >= deadline:
            if spawned_at is None:
                raise NodeMngrException("something at %s:%d accepts connections but did not answer "
                                        "within %g s" % (host, port, timeout))
            raise NodeMngrException("the node manager started for %s:%d did not answer within %g s; "
                                    "see its log %s%s" % (host, port, timeout, log_path, _last_words(log_path)))


def _time_to_spawn(pid, spawned_at, now):
    """Nothing listens: spawn if no daemon was spawned yet, if the last one (*pid*) has exited,
    or if it has not listened for a long while (its pid unknown, or a very slow machine).  Not
    on a timer alone: on a loaded machine a daemon may take over 0.5 s to listen, and a spawn
    per racing client per half second would only load it more."""
    if spawned_at is None:
        return True
    waited = now - spawned_at
    return waited >= _RESPAWN_MAX or (waited >= _RESPAWN_MIN and pid is not None and _gone(pid))


def _gone(pid):
    """True if process *pid* has ended (a zombie that its new parent has not reaped included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False            # EPERM: it exists (the pid was reused by another user)
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _last_words(log_path):
    """The last line of the daemon's log as " (it ends: LINE)", or "" if there is none."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " (it ends: %s)" % _one_line(lines[-1]) if lines else ""


def _daemon_argv(host, port, log_path, token_file):
    """The daemon's command line.  It runs in "/", so every path it is given is absolute,
    including the relative ones the environment holds (NODEMNGR_STATE, NODEMNGR_TOKEN_FILE,
    NODEMNGR_UNIX)."""
    argv = [os.path.abspath(sys.executable), os.path.abspath(nodemngr.__file__), "serve",
            "--host", host, "--port", str(port), "--log-file", log_path]
    state = os.environ.get("NODEMNGR_STATE", "")
    if state and state.lower() != "none":
        argv += ["--state", os.path.abspath(state)]
    token_file = token_file or os.environ.get("NODEMNGR_TOKEN_FILE")
    if token_file:
        argv += ["--token-file", os.path.abspath(token_file)]
    local = os.environ.get("NODEMNGR_UNIX", "")
    if local and local.lower() != "none" and not local.startswith("@"):
        argv += ["--unix", os.path.abspath(local)]
    return argv


@contextlib.contextmanager
def _spawn_turn(path, until, answers):
    """Hold the lock file *path* (an flock, released if this process dies; a child forked
    meanwhile closes its copy) until the block ends, so that of many clients finding no daemon
    at once only one starts a Python for it, and the others find that one answering.  Waits
    until the time *until* at most, or until answers() says someone answers, then goes ahead
    without it, as it does when the lock cannot be opened: the daemons' own race on the port
    keeps the outcome right; the lock only saves the losers' starts."""
    fd = None
    if path is not None and fcntl is not None:
        try:        # (O_NONBLOCK: a lease on the file, or a FIFO there, must not hold the open)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | _NOFOLLOW, 0o600)
        except OSError:
            pass
    if fd is not None:
        _turn_fds.add(fd)
    try:
        delay = 0.005
        while fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= until:
                    break
            if answers() in _SOMEONE:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        yield
    finally:
        if fd is not None:
            _turn_fds.discard(fd)
            os.close(fd)


def _log_path(port):
    """NODEMNGR_LOG_FILE, else PORT.log beside the state file; absolute.  A log folder that does
    not exist is an error, as it is for the daemon."""
    path = os.environ.get("NODEMNGR_LOG_FILE")
    return os.path.abspath(path) if path else os.path.join(_state_folder(port), "%d.log" % port)


def _state_folder(port):
    """The folder of the state file, absolute, created (0700) as the daemon itself would."""
    state = os.environ.get("NODEMNGR_STATE", "")
    if state and state.lower() != "none":
        folder = os.path.dirname(os.path.abspath(state))
        try:
            os.makedirs(folder, 0o700, exist_ok=True)
        except OSError as exc:
            raise NodeMngrException("cannot create the state folder %s (NODEMNGR_STATE): %s"
                                    % (folder, exc.strerror or exc)) from None
    else:
        folder = os.path.dirname(nodemngr.default_state_path(port))
        try:
            nodemngr.ensure_private_folder(folder)
        except OSError as exc:
            raise NodeMngrException("cannot create the node manager's folder %s: %s"
                                    % (folder, exc.strerror or exc)) from None
    return folder


def _spawn_detached(argv, log_path):
    """fork, setsid, fork, exec: the daemon has its own session, no terminal and is not our child.
    It inherits no descriptor but 0 (/dev/null), 1 and 2 (its log), so a lock or a pipe end the
    caller holds is released when the caller ends; and it runs in "/", pinning no mount point.
    Returns the daemon's pid, or None if it is not known."""
    try:        # (O_NONBLOCK: a lease on the file must not hold the open for the kernel's 45 s)
        log_fd = _open_above_stdio(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o600)
        os.set_blocking(log_fd, True)       # (the daemon's output: a FIFO reader may be slow)
    except OSError as exc:
        raise NodeMngrException("cannot open the node manager's log file %s: %s"
                                % (log_path, exc.strerror or exc)) from None
    try:
        if not hasattr(os, "fork"):
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                             close_fds=True, start_new_session=True, cwd=os.path.abspath(os.sep))
            return None         # (os.kill(pid, 0) would terminate it on Windows)
        null_fd = _open_above_stdio(os.devnull, os.O_RDWR)
        pid_r, pid_w = os.pipe()                # the middle child tells the daemon's pid
        try:
            fd_limit = _fd_limit()
            with warnings.catch_warnings():     # 3.12+ warns about fork in threaded programs
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:                        # child: only async-signal-safe work until exec
                try:
                    os.setsid()
                    daemon = os.fork()
                    if daemon:
                        os.write(pid_w, b"%d" % daemon)
                    else:
                        os.dup2(null_fd, 0)
                        os.dup2(log_fd, 1)
                        os.dup2(log_fd, 2)
                        os.closerange(3, fd_limit)
                        os.chdir("/")
                        if hasattr(signal, "pthread_sigmask"):  # a mask survives exec: SIGTERM must get in
                            signal.pthread_sigmask(signal.SIG_SETMASK, ())
                        os.execv(argv[0], argv)
                finally:
                    os._exit(0)
            os.close(pid_w)
            pid_w = None
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:       # SIGCHLD ignored: the system reaped it already
                pass
            told = os.read(pid_r, 32)
            return int(told) if told.isdigit() else None
        finally:
            for fd in (null_fd, pid_r, pid_w):
                if fd is not None:
                    os.close(fd)
    except OSError as exc:      # fork failed (EAGAIN, ENOMEM)
        raise NodeMngrException("cannot start a node manager: %s" % (exc.strerror or exc)) from None
    finally:
        os.close(log_fd)


def _open_above_stdio(path, flags, mode=0o777):
    """os.open, but never as 0, 1 or 2 (free in a caller that closed them): the child's dup2
    onto 0, 1 and 2 would overwrite such a descriptor before copying it."""
    fd = os.open(path, flags, mode)
    low = []
    while fd <= 2:
        low.append(fd)
        fd = os.dup(fd)
    for extra in low:
        os.close(extra)
    return fd


def _fd_limit():
    """One above the highest descriptor the child may hold, computed before fork.

    Where the limit is huge (containers may allow 2**30), closing one by one (Python < 3.10, or
    a kernel without close_range) would take seconds or minutes; then close up to the highest
    descriptor open now, plus room for any that other threads open before the fork."""
    try:
        limit = os.sysconf("SC_OPEN_MAX")
    except (AttributeError, ValueError, OSError):
        limit = -1
    if 0 < limit <= _CLOSE_ALL_LIMIT:
        return limit
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return max(int(fd) for fd in os.listdir(folder)) + 1 + 1024
        except (OSError, ValueError):
            continue
    return limit if limit > 0 else _CLOSE_ALL_LIMIT
