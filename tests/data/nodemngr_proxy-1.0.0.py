"""nodemngr_proxy -- the Python client of the node manager, which starts one when none answers.

    >>> from nodemngr_proxy import NodeMngrProxy
    >>> with NodeMngrProxy() as nm:           # NODEMNGR_HOST / NODEMNGR_PORT, else 127.0.0.1:11800
    ...     port = nm.newPort({"service": "echo"})
    ...     nm.delPort(port)
    0

Making a proxy opens nothing: it connects on its first call.  If nothing answers there and the
address is a loopback one, it forks and execs ``sys.executable nodemngr.py serve`` detached (its own
session, no terminal, output to ``PORT.log`` beside the state file) and waits until it answers.  Any
number of processes doing so at once end with one daemon: the others' daemons find the port bound
and exit.  ``NODEMNGR_AUTOSTART=0`` turns this off.  A proxy is safe to share between threads; each
call borrows a kept-alive connection from a small pool.
"""

import errno
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
import xmlrpc.client

import nodemngr
from nodemngr import NodeMngrException, exception_from_fault

__all__ = ["NodeMngrProxy", "start_daemon"]

_POOL_SIZE = 8                  # idle connections a proxy keeps
_spawn_lock = threading.Lock()  # one auto-start at a time in this process


def _new_spawn_lock():
    global _spawn_lock      # a child forked while another thread held it must not inherit it held
    _spawn_lock = threading.Lock()


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

    def listPorts(self):
        """Every registered port: a list of {port, info, pid, since} dicts, sorted by port."""
        return self.call("listPorts")

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
            except OSError as exc:
                server("close")()
                if attempt or not self._should_start(exc, autostart):
                    raise NodeMngrException(self._explain(exc)) from None
                start_daemon(self.host, self.port, self.timeout, self.token_file)
                continue
            except (xmlrpc.client.Error, ValueError) as exc:    # HTTP errors, unreadable replies
                server("close")()
                raise NodeMngrException(self._explain(exc)) from None
            self._give_back(server)
            return result

    def _borrow(self):
        if self._pid != os.getpid():    # forked: the pool's sockets belong to the parent
            self._pid, self._idle = os.getpid(), []
        try:
            return self._idle.pop()
        except IndexError:
            return nodemngr._client(self.host, self.port, self.token_file, self.timeout)

    def _give_back(self, server):
        if len(self._idle) < _POOL_SIZE:
            self._idle.append(server)
        else:
            server("close")()

    def _should_start(self, exc, autostart):
        if not (self.autostart if autostart is None else autostart):
            return False
        refused = isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) in (
            errno.ECONNREFUSED, errno.ENOENT)
        return refused and nodemngr.is_loopback(self.host)

    def _explain(self, exc):
        text = nodemngr.describe_call_error(exc, self.host, self.port)
        if isinstance(exc, ConnectionRefusedError) and not self.autostart:
            text += " (auto-start is off)"
        return text


# ---------------------------------------------------------------------------------------------
# Auto-start
# ---------------------------------------------------------------------------------------------

def start_daemon(host=None, port=None, timeout=nodemngr.SPAWN_TIMEOUT, token_file=None):
    """Start a detached node manager for *host*:*port* unless one answers; wait until one does.
    token_file: the daemon's token (else NODEMNGR_TOKEN_FILE, which it inherits)."""
    host, port = nodemngr.env_host(host), nodemngr.env_port(port)
    with _spawn_lock:
        if _answers(host, port):
            return
        log_path = _log_path(port)
        argv = [sys.executable, os.path.abspath(nodemngr.__file__), "serve",
                "--host", host, "--port", str(port), "--log-file", log_path]
        if token_file:
            argv += ["--token-file", os.path.abspath(token_file)]
        _spawn_detached(argv, log_path)
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not _answers(host, port):
            if time.monotonic() >= deadline:
                raise NodeMngrException("the node manager started for %s:%d did not answer within %g s; "
                                        "see its log %s" % (host, port, timeout, log_path))
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _answers(host, port):
    """True if a node manager (or anything speaking HTTP) answers ping at host:port."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            pass
    except OSError:
        return False
    try:
        nodemngr._TimeoutProxy(nodemngr.server_url(host, port), 2.0).ping()
        return True
    except xmlrpc.client.ProtocolError:
        return True             # e.g. 401: it runs, and wants a token
    except (OSError, xmlrpc.client.Error):
        return False


def _log_path(port):
    """NODEMNGR_LOG_FILE, else PORT.log beside the state file (default folder created 0700)."""
    path = os.environ.get("NODEMNGR_LOG_FILE")
    if path:
        return path
    state = os.environ.get("NODEMNGR_STATE", "")
    if state and state.lower() != "none":
        return os.path.join(os.path.dirname(os.path.abspath(state)), "%d.log" % port)
    folder = os.path.dirname(nodemngr.default_state_path(port))
    nodemngr.ensure_private_folder(folder)
    return os.path.join(folder, "%d.log" % port)


def _spawn_detached(argv, log_path):
    """fork, setsid, fork, exec: the daemon has its own session, no terminal and is not our child."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if not hasattr(os, "fork"):
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                             close_fds=True, start_new_session=True)
            return
        null_fd = os.open(os.devnull, os.O_RDWR)
        try:
            with warnings.catch_warnings():     # 3.12+ warns about fork in threaded programs
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:                        # child: only async-signal-safe work until exec
                try:
                    os.setsid()
                    if os.fork() == 0:
                        os.dup2(null_fd, 0)
                        os.dup2(log_fd, 1)
                        os.dup2(log_fd, 2)
                        os.execv(argv[0], argv)
                finally:
                    os._exit(0)
            os.waitpid(pid, 0)
        finally:
            os.close(null_fd)
    finally:
        os.close(log_fd)
