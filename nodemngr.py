#!/usr/bin/env python3
"""nodemngr -- one node manager per host: hands out ports, remembers what they are for.

The node manager gives each local process of a distributed application a port that no other holder
has, records what the port is for and who holds it, and takes it back when asked or when the holder
dies.  It is a modern re-implementation of the 1999 Open-ORB ``nodemngr`` module (``ping``,
``newPort``, ``delPort``, ``terminate``) that speaks XML-RPC, so any language can call it.

This one file (Python 3.8+, standard library only) is a whole deployment: the daemon, its command
line and the Python client::

    $ python3 nodemngr.py                 # serve on 127.0.0.1:11800, ports 11801-12800
    $ python3 nodemngr.py new "echo service"
    11801

    >>> from nodemngr import nm          # the client starts a daemon if none answers
    >>> p = nm.newPort("my capsule")
    >>> nm.delPort(p)
    0

Sections, in file order; each uses only the sections above it:

    Constants            ports, limits and the wire protocol's fault codes
    Exceptions           NodeMngrException and one subclass per fault
    Owners               a pid, its start time and pid namespace; is it alive?  who is the peer?
    Host checks          is a port bound by anybody on this host?  is an address ours?
    Values               infos checked and marshalled; text for users, text for logs
    XML-RPC bodies       parse_call (a fast path, else expat with DTDs refused), replies' bytes
    Settings             Settings: a given value, else the environment, else the default
    The allocator        PortAllocator: pure logic, no sockets, no files
    The state store      StateStore: sqlite3, one row per held port
    The service          NodeMngr: the wire methods and owner reaping; Caller, who calls
    The dispatcher       Dispatcher: the method table, rights, multicall, counters, /metrics
    HTTP framing         read_head and the replies' heads (pure functions over bytes)
    The transport        Connection: one asyncio protocol per connection, and its three doors
    The server           NodeMngrServer: listening sockets, accept, deadlines, the stop
    The cluster view     ClusterView and EtcdClient: the registry published to etcd, read back
    The status page      StatusPages: GET / for people, GET /status.json for programs
    The client           NodeMngrProxy, who_answers, request_socket, start_daemon (auto-start)
    Serving              run_daemon: the daemon in this process, systemd, signals
    The command line     main()
    Legacy names         nm, made on first use

Layers talk one way.  The service knows no transport; every door (XML-RPC over HTTP on TCP and on
the local socket, portpicker's portserver line, the socket handover) goes through one Dispatcher,
which checks, counts and logs every call and fault the same way.  The server asks a connection
questions (expired(), quiet()); a connection asks its server through a few named methods
(owed_bytes(), release(), run_slow()).  The cluster view is handed a snapshot function and told of
changes through one callback; it never calls the service.  Limits are class attributes that tests
may shorten, as in socketserver.

One call's path: a socket -> Connection (HTTP framing, or the portserver line) -> Dispatcher
(Caller, rights, method lookup, counters) -> NodeMngr (the method) -> PortAllocator and StateStore
-> NodeMngr (on_change: the cluster view) -> Dispatcher (marshalled reply, counted fault) ->
Connection (write; with SCM_RIGHTS for a handover).

Where each feature lives (names of this module; tests/test_structure.py checks that they exist):

    names, sticky ports  name_of, explicit_name, PortAllocator.take, PortAllocator.memory_change, NodeMngr.lookup
    blocks               NodeMngr.newPorts, NodeMngr.delPorts, NodeMngr.newSockets, PortAllocator.take_block,
                         PortAllocator.block_memory_change, StateStore.add_block, request_sockets,
                         NodeMngrProxy.newPorts, NodeMngrProxy.newSockets, _pass_from_fd_3
    newSocket            NodeMngr.newSocket, Handover, Connection._hand_over, Dispatcher.handover_failed,
                         request_socket, NodeMngrProxy.newSocket, _run_command
    portserver protocol  Connection._answer_portserver, Dispatcher.portserver
    owners and reaping   process_start_time, owner_alive, pid_of_local_peer, NodeMngr.reap_step
    the cluster view     ClusterView, EtcdClient, NodeMngr.locate, NodeMngr.listCluster, _cluster_settings
    metrics              Dispatcher.metrics, Dispatcher.add_gauge, read_head
    status page          StatusPages, Dispatcher.add_page, Dispatcher.page, NodeMngr.remembered
    systemd              activated_sockets, sd_notifier, NodeMngrServer._tell
    settings             Settings, _parser, NodeMngrProxy
    tokens and rights    Settings.token, Dispatcher.caller, Dispatcher.authorize, Dispatcher.portserver, privileged
    auto-start           NodeMngrProxy.call, start_daemon, _spawn_turn, _spawn_detached
"""

import base64
import binascii
import collections
import contextlib
import email.utils
import errno
import functools
import heapq
import http.client
import ipaddress
import logging
import math
import os
import re
import reprlib
import select
import shlex
import signal
import socket
import _socket
import sqlite3
import ssl
import stat
import struct
import sys
import threading
import time
import urllib.parse
import warnings
import xmlrpc.client
import zlib
from collections import namedtuple
from datetime import datetime, timezone
from xml.parsers import expat
from xmlrpc.client import Fault
# Imported where they are used, so that a client (importing nodemngr, making a proxy, calling) does
# not pay for what only the daemon or the command line needs, about 25 ms together: asyncio (the
# server), concurrent.futures (its threads for slow calls), json (the cluster view), hmac (the
# token check), inspect (system.methodHelp), argparse (the command line), subprocess (spawning
# where there is no fork), tempfile (the default state folder without XDG_RUNTIME_DIR).

try:
    import fcntl
    import resource
    import termios
except ImportError:     # not on Windows
    fcntl = resource = termios = None

# Every public name, by section (all but the module's logger, logging.getLogger("nodemngr")).
__all__ = [
    # Constants
    "nmPort", "firstPort", "lastPort", "RECENT_REAPS", "MAX_INFO_BYTES", "MAX_INFO_DEPTH", "MAX_BLOCK", "MAX_BODY", "MAX_HEAD",
    "MAX_HEADERS",
    "IDLE_TIMEOUT", "STALL_TIMEOUT", "MAX_CONNECTIONS", "REAP_INTERVAL", "BUSY_RETRY", "SPAWN_TIMEOUT",
    "UNKNOWN_PORT", "NO_FREE_PORT", "BAD_ARGUMENT", "FORBIDDEN", "CLUSTER_UNAVAILABLE", "NOT_WELL_FORMED",
    "INVALID_REQUEST", "METHOD_NOT_FOUND", "INVALID_PARAMS", "INTERNAL_ERROR",
    # Exceptions
    "NodeMngrException", "UnknownPortError", "NoFreePortError", "BadArgumentError", "UnsendableError",
    "ForbiddenError", "StoreError", "ClusterError", "exception_from_fault",
    # Owners, host checks
    "process_start_time", "owner_alive", "is_thread_of_another", "process_uids", "is_kernel_thread", "PidNamespace",
    "UNKNOWN_NAMESPACE", "pid_namespace", "pid_of_local_peer", "peer_credentials", "port_is_bindable", "is_loopback",
    "is_this_host", "tcp_peer_uid", "tcp_listener_uid",
    # Values, XML-RPC bodies
    "dumps", "marshal_info", "unmarshal_info", "unmarshal_infos", "check_port", "utc", "printable", "describe", "parse_call",
    "Marshalled", "marshal_reply",
    # Settings
    "bounded_int", "default_state_path", "ensure_private_folder", "read_token", "Settings",
    # The allocator, the state store, the service
    "Registration", "name_of", "explicit_name", "PortAllocator", "StateStore", "Caller", "IN_PROCESS", "privileged",
    "NodeMngr",
    # The dispatcher, HTTP framing, the transport, the server
    "Busy", "Deferred", "Sliced", "Handover", "Dispatcher", "RequestHead", "read_head", "Connection", "local_sockaddr",
    "NodeMngrServer",
    # The cluster view
    "CLUSTER_PREFIX", "MAX_CLUSTER_VALUE", "published_entry", "cluster_entry", "EtcdClient", "ClusterView",
    # The status page
    "StatusPages",
    # The client
    "server_url", "server_proxy", "who_answers", "request_socket", "request_sockets", "describe_call_error", "NodeMngrProxy",
    "start_daemon",
    # Serving, the command line, legacy names
    "run_daemon", "activated_sockets", "sd_notifier", "spawner_notifier", "reopen_log_files", "main", "format_table", "nm",
]
__version__ = "1.3.0"

log = logging.getLogger("nodemngr")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

nmPort = 11800          #: the node manager's own port (legacy name)
firstPort = 11801       #: the first port it hands out (legacy name)
lastPort = 12800        #: the last port it hands out

RECENT_REAPS = 20       # reaped registrations the status page lists
MAX_INFO_BYTES = 4096   # an info value, marshalled
MAX_INFO_DEPTH = 16     # nesting of arrays and structs in an info value
MAX_BLOCK = 64          # ports of one block (newPorts, newSockets)
MAX_BODY = 64 * 1024    # a request body, after any Content-Encoding is undone
MAX_HEAD = 16 * 1024    # request line and headers together
MAX_HEADERS = 64
IDLE_TIMEOUT = 30.0     # a keep-alive connection with no request
STALL_TIMEOUT = 10.0    # a request to its last byte, and a reply the client stops taking (a steady reader is not cut)
MAX_CONNECTIONS = 128
REAP_INTERVAL = 2.0     # seconds between two looks at the owners' liveness
BUSY_RETRY = 1.0        # a port another program holds is not probed again for this long
SPAWN_TIMEOUT = 10.0    # how long a client waits for a daemon it started

# Fault codes of the wire protocol (CONTRACT, "Wire protocol").
UNKNOWN_PORT, NO_FREE_PORT, BAD_ARGUMENT, FORBIDDEN, CLUSTER_UNAVAILABLE = 1, 2, 3, 4, 5
NOT_WELL_FORMED, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)

_INT32_MIN, _INT32_MAX = -2 ** 31, 2 ** 31 - 1

# ---------------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------------


class NodeMngrException(Exception):
    """Base of every error of the node manager; ``faultCode`` is its wire fault code."""

    faultCode = INTERNAL_ERROR

    def __init__(self, message, faultCode=None):
        super().__init__(message)
        if faultCode is not None:
            self.faultCode = faultCode

    @property
    def faultString(self):
        return str(self)


class UnknownPortError(NodeMngrException, IndexError):
    """delPort of a port that is not registered (fault 1, legacy text)."""

    faultCode = UNKNOWN_PORT

    def __init__(self, port):
        if isinstance(port, str):      # rebuilt from a fault string by a client
            super().__init__(port)
        else:
            super().__init__("Node manager: Unknown port: %s" % port)


class NoFreePortError(NodeMngrException):
    """Every port of the range is registered or held by another program (fault 2)."""

    faultCode = NO_FREE_PORT


class BadArgumentError(NodeMngrException, ValueError):
    """A parameter of the wrong type or out of range, an info too big, a dead pid (fault 3)."""

    faultCode = BAD_ARGUMENT


class UnsendableError(BadArgumentError, TypeError):
    """A call argument that XML-RPC cannot carry (the client sent nothing); also a TypeError."""


class ForbiddenError(NodeMngrException, PermissionError):
    """An administrative call from a peer that is not on this host (fault 4)."""

    faultCode = FORBIDDEN


class StoreError(NodeMngrException):
    """The state could not be saved, so the change was not made (fault -32603)."""

    faultCode = INTERNAL_ERROR


class ClusterError(NodeMngrException):
    """No cluster view is configured, or etcd cannot be reached (fault 5)."""

    faultCode = CLUSTER_UNAVAILABLE


_FAULT_CLASSES = {UNKNOWN_PORT: UnknownPortError, NO_FREE_PORT: NoFreePortError,
                  BAD_ARGUMENT: BadArgumentError, FORBIDDEN: ForbiddenError, CLUSTER_UNAVAILABLE: ClusterError}


def exception_from_fault(fault):
    """The NodeMngrException a client raises for an xmlrpc.client.Fault."""
    cls = _FAULT_CLASSES.get(fault.faultCode)
    if cls is None:
        return NodeMngrException(fault.faultString, fault.faultCode)
    return cls(fault.faultString)


# ---------------------------------------------------------------------------------------------
# Owners
# ---------------------------------------------------------------------------------------------
# A pid and the start time of that process, so that a reused pid is a different owner; pid
# namespaces; the peer of a Unix socket.

_HAVE_PROC = os.path.isdir("/proc/self") and os.path.exists("/proc/self/stat")


def process_start_time(pid):
    """The start time of process *pid* (clock ticks since boot); 0 when the process exists but its
    start time cannot be read (no /proc, or /proc mounted hidepid= and the process is another
    user's); None when no such process runs (zombies count as ended).

    Raises OSError when it cannot tell now (out of file descriptors, say): only "no such process"
    means ended, so a caller that cannot tell must keep what the owner holds.
    """
    if not _HAVE_PROC:
        return _pid_exists(pid)
    try:
        fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        return _pid_exists(pid)     # hidepid= hides other users' processes; kill() still sees them
    try:
        line = os.read(fd, 1024)
    except ProcessLookupError:      # it ended between open and read
        return None
    finally:
        os.close(fd)
    fields = line.rpartition(b")")[2].split()
    if len(fields) < 20 or (fields[0] in (b"Z", b"X", b"x") and not _threads_live(pid)):
        return None
    return int(fields[19])


def owner_alive(pid, start=0):
    """True while the process that registered as (*pid*, *start*) may run: False only when it
    has certainly ended (no such process, a zombie, or the pid now belongs to a later process).
    With start 0, whether any process *pid* runs.  The one liveness test of this module."""
    try:
        now = process_start_time(pid)
    except OSError:
        return True
    return now is not None and (not start or not now or now == start)


def _pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:     # it exists, and belongs to somebody else
        pass
    return 0


def _threads_live(pid):
    """True if a process shown as a zombie still runs threads: its main thread ended
    (pthread_exit) and the others carry on, and with them the process."""
    threads = _status_field(pid, b"Threads")
    return threads is not None and threads > 1


def _status_field(pid, name):
    """The number in line *name* of /proc/PID/status, or None where it cannot be read."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            match = re.search(rb"\n%s:\s*(\d+)" % name, f.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return int(match.group(1)) if match else None


def is_thread_of_another(pid):
    """True if *pid* is a thread of some process rather than a process (Linux: its Tgid differs).
    A thread id would free its port when the thread ends, while its process runs on."""
    if not _HAVE_PROC:
        return False
    tgid = _status_field(pid, b"Tgid")
    return tgid is not None and tgid != pid


def process_uids(pid):
    """The real and effective uid of process *pid* (a set), or None where /proc does not say
    (no /proc, hidepid=, or no such process)."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            match = re.search(rb"\nUid:\s*(\d+)\s+(\d+)", f.read())
    except OSError:
        return None
    return {int(match.group(1)), int(match.group(2))} if match else None


def is_kernel_thread(pid):
    """True if *pid* is a kernel thread (kthreadd and its children: PF_KTHREAD in /proc/PID/stat),
    which never ends: a port it owned would be held for good."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return False
    return len(fields) > 6 and fields[6].isdigit() and bool(int(fields[6]) & 0x00200000)


PidNamespace = namedtuple("PidNamespace", "depth inode")
PidNamespace.__doc__ = """The pid namespace of a local-socket client, as read when it connected:
depth (1: the daemon's own; more: nested below it, a container's) and inode (the namespace's
identity, from /proc/PID/ns/pid; None where the daemon may not read it).  UNKNOWN_NAMESPACE:
the client could not be read (it had exited, or /proc hides it)."""
UNKNOWN_NAMESPACE = PidNamespace(0, None)


def pid_namespace(pid):
    """The PidNamespace of process *pid*, read now (NSpid: of /proc/PID/status, which needs no
    ptrace); UNKNOWN_NAMESPACE when it cannot be read."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            match = re.search(rb"\nNSpid:\s*([\d\s]+?)\n", f.read())
    except OSError:
        return UNKNOWN_NAMESPACE
    if match is None:           # (a kernel without NSpid: no nested namespaces to tell apart)
        return PidNamespace(1, None)
    depth = len(match.group(1).split())
    return PidNamespace(depth, _namespace_inode(pid) if depth > 1 else None)


def _namespace_inode(pid):
    try:
        return os.stat("/proc/%d/ns/pid" % pid).st_ino
    except OSError:
        return None


def pid_of_local_peer(sent, peer_pid, namespace, uid=None):
    """The pid, as this daemon sees it, of the process that a client of the local socket named
    *sent* in its own pid namespace; peer_pid: the client's pid here (SO_PEERCRED) and
    namespace its PidNamespace, both read when it connected.  None when it cannot be told: the
    client could not be read (fail closed), or no process of its namespace has that pid (a pid of
    the host named from a container, say).  uid: look only among that user's processes."""
    if namespace.depth == 1:
        return sent
    if namespace.depth == 0 or peer_pid is None:
        return None
    if sent == _innermost_pid(peer_pid):
        return peer_pid
    if namespace.inode is None:     # (its namespace cannot be told from a sibling's)
        return None
    return _NAMESPACE_PIDS.find(sent, namespace, uid)


class _NamespacePids:
    """{pid in a pid namespace: pid here}, for the namespaces that clients name pids from, made by
    reading /proc (whose cost grows with the host's processes) at most rebuild_rate times a second
    in all: a client that names pid after pid, or namespace after namespace, finds the map it has,
    and a pid it does not hold is refused rather than looked for again."""

    rebuild_rate, rebuild_burst, kept = 4.0, 4.0, 64

    def __init__(self):
        self._maps = collections.OrderedDict()      # (namespace inode, uid) -> {pid there: pid here}
        self._budget, self._at = self.rebuild_burst, time.monotonic()

    def find(self, sent, namespace, uid):
        key = (namespace.inode, uid)
        here = self._maps.get(key, {}).get(sent)
        if here is not None and _innermost_pid(here, namespace.depth) == sent and (
                _namespace_inode(here) == namespace.inode):
            return here
        now = time.monotonic()
        self._budget = min(self.rebuild_burst, self._budget + (now - self._at) * self.rebuild_rate)
        self._at = now
        if self._budget < 1:
            return None
        self._budget -= 1
        self._maps[key] = found = {}
        self._maps.move_to_end(key)
        if len(self._maps) > self.kept:
            self._maps.popitem(last=False)
        for name in os.listdir("/proc"):    # every process of that namespace, by its pid there
            if name.isdigit() and (uid is None or _proc_owner(name) == uid):
                inner = _innermost_pid(int(name), namespace.depth)
                if inner is not None and _namespace_inode(int(name)) == namespace.inode:
                    found[inner] = int(name)
        return found.get(sent)


_NAMESPACE_PIDS = _NamespacePids()


def _proc_owner(name):
    try:
        return os.stat("/proc/" + name).st_uid
    except OSError:
        return None


def _innermost_pid(pid, depth=None):
    """The pid of process *pid* in its own pid namespace (the last of NSpid:), if it lives *depth*
    namespaces down (any depth when None); else None."""
    try:
        with open("/proc/%d/status" % pid, "rb") as f:
            match = re.search(rb"\nNSpid:\s*([\d\s]+?)\n", f.read())
    except OSError:
        return None
    levels = match.group(1).split() if match else []
    return int(levels[-1]) if levels and (depth is None or len(levels) == depth) else None


def peer_credentials(sock):
    """(pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED); (None, None)
    where the kernel cannot say."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (AttributeError, OSError):
        return None, None
    return pid or None, uid


# ---------------------------------------------------------------------------------------------
# Host checks
# ---------------------------------------------------------------------------------------------
# Is a port bound by anybody on this host?  Is an address one of this host's?

def _probes():
    """(family, type, address, set V6ONLY off) for each bind that port_is_bindable tries: one
    dual-stack IPv6 socket sees IPv4 and IPv6 holders alike, where the host has IPv6."""
    if socket.has_ipv6:
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
                v6only = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.bind(("::", 0))
            return [(socket.AF_INET6, kind, "::", bool(v6only)) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)]
        except (OSError, AttributeError):
            pass
    return [(socket.AF_INET, kind, "", False) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM)]


_PROBES = None
_TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_TIME_WAIT = b"06"
_TABLE_TTL = 0.25       # seconds a reading of the TCP tables is used again
_table = [float("-inf"), b""]     # when read, and the tables' text


def port_is_bindable(port):
    """True if no socket on this host has *port* bound: TCP or UDP, IPv4 or IPv6, any address,
    listening, connected or neither, with or without SO_REUSEADDR.  A TCP socket in TIME_WAIT
    does not count, as servers reuse such ports at once.

    A plain wildcard bind conflicts with every holder of the port, TIME_WAIT included.  When it
    fails and a bind with SO_REUSEADDR succeeds, the holder is in TIME_WAIT, or is a socket with
    SO_REUSEADDR that does not listen; the kernel's TCP table tells the two apart.  Raises
    OSError when no probe socket can be made (out of descriptors), which says nothing of the port.
    """
    global _PROBES
    if _PROBES is None:
        _PROBES = _probes()
    for family, kind, address, v6only in _PROBES:
        if not _bind_probe(family, kind, address, v6only, port, reuse=False):
            if kind != socket.SOCK_STREAM or not _bind_probe(family, kind, address, v6only, port, reuse=True):
                return False
            if not _only_time_wait(port):
                return False
    return True


def _bind_probe(family, kind, address, v6only, port, reuse):
    s = _socket.socket(family, kind)    # (socket.socket's Python layer costs 0.7 us a probe, two a newPort)
    try:
        if v6only:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOBUFS, errno.ENOMEM):
            raise
        return False
    finally:
        s.close()


def _only_time_wait(port):
    """True if every TCP socket the kernel lists on local *port* is in TIME_WAIT, and there is
    one.  None listed means a holder the tables do not show (bound, not listening): held.
    Without /proc, trust the bind with SO_REUSEADDR.  The tables are read at most once per
    _TABLE_TTL and searched by one pattern, not line by line: a local user can fill them with
    a hundred thousand TIME_WAIT sockets at no cost of his own."""
    now = time.monotonic()
    if now - _table[0] > _TABLE_TTL:
        _table[:] = [now, _read_tcp_tables()]
    text = _table[1]
    if text is None:
        return True
    states = set(re.findall(rb"^ *\d+: [0-9A-F]+:%04X [0-9A-F]+:[0-9A-F]{4} ([0-9A-F]{2}) " % port, text, re.M))
    return states == {_TIME_WAIT}


def _read_tcp_tables():
    """The text of the kernel's TCP tables (IPv4 and IPv6), or None without /proc."""
    text = b""
    for table in _TCP_TABLES:
        try:
            with open(table, "rb") as f:
                text += f.read()
        except FileNotFoundError:
            if not os.path.exists("/proc/net"):
                return None     # not Linux
    return text


def _ip_address(text):
    """*text* as an ipaddress object (an IPv4-mapped IPv6 address as its IPv4 one, a zone id
    dropped), or None when it is not an IP address."""
    try:
        addr = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr if mapped is None else mapped


def is_loopback(host):
    """True for 127.0.0.0/8, ::1, an IPv4-mapped loopback and names that resolve only there."""
    host = host.strip("[]")
    addr = _ip_address(host)
    if addr is None:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(is_loopback(info[4][0]) for info in infos)
    return addr.is_loopback


def is_this_host(address):
    """True if *address* (a peer's) is one of this host's own addresses, loopback or not: the
    kernel then routes to it from itself.  (Not "it can be bound": with ip_nonlocal_bind set,
    as on many keepalived hosts, any address can.)"""
    addr = _ip_address(address)
    if addr is None:
        return False
    if addr.is_loopback:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((address if addr.version == 6 else str(addr), 9))    # (UDP: nothing is sent;
            return s.getsockname()[0].split("%")[0] == str(addr)           # a link-local keeps its scope)
    except OSError:
        return False


_SOCK_DIAG_BY_FAMILY, _NETLINK_SOCK_DIAG = 20, 4
_TCP_LISTEN = 10


def _sock_diag(family, states, local=("", 0), remote=("", 0), dump=False):
    """The kernel's socket table (netlink sock_diag, as ss uses it) for one query of TCP sockets:
    [(state, local port, local address as 16 bytes, uid, inode)]; None where netlink cannot be
    used (not Linux, or a service manager's RestrictAddressFamilies), so that the caller may read
    /proc.  A closed socket the kernel keeps for a while (TIME_WAIT, or FIN_WAIT2 once closed) has
    no owner left: inode 0, and uid 0, which says nothing."""
    def packed(host):
        return socket.inet_pton(family, host or ("::" if family == socket.AF_INET6 else "0.0.0.0")).ljust(16, b"\0")
    sockid = (struct.pack("!HH", local[1], remote[1]) + packed(local[0]) + packed(remote[0])
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))    # (any interface; no cookie)
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, states) + sockid
    flags = 1 | (0x300 if dump else 0)     # NLM_F_REQUEST, NLM_F_DUMP
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    except (OSError, AttributeError):
        return None
    found = []
    try:
        with nl:
            nl.settimeout(1.0)
            nl.sendto(struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, flags, 1, 0) + request, (0, 0))
            while True:
                data, offset = nl.recv(1 << 16), 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind != _SOCK_DIAG_BY_FAMILY or length < 16 + 72:    # NLMSG_DONE, NLMSG_ERROR
                        return found
                    found.append((data[offset + 17], struct.unpack_from("!H", data, offset + 20)[0],
                                  data[offset + 24:offset + 40]) + struct.unpack_from("=II", data, offset + 80))
                    offset += (length + 3) & ~3
                if not dump:
                    return found
    except (OSError, ValueError):
        return found


def _tcp_table(family):
    """What /proc/net/tcp (or tcp6) says, in _sock_diag's shape: [(state, local port, local
    address, uid, inode, remote port, remote address)].  Read only where netlink cannot be used:
    its cost grows with the host's sockets."""
    found = []
    try:
        with open("/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        try:
            (local, lport), (remote, rport) = (field.split(":") for field in fields[1:3])
            found.append((int(fields[3], 16), int(lport, 16), _table_address(local), int(fields[7]), int(fields[9]),
                          int(rport, 16), _table_address(remote)))
        except (ValueError, IndexError):
            continue
    return found


def _table_address(text):
    """The 16 bytes (as sock_diag gives them) of an address written as /proc/net/tcp writes it:
    32-bit words in the host's byte order."""
    raw = bytes.fromhex(text)
    return b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4)).ljust(16, b"\0")


def tcp_peer_uid(local, peer):
    """The uid that owns the TCP socket at *peer* connected to our socket at *local*, both
    (address, port) as the server's socket sees them, from the kernel's socket table (netlink's
    sock_diag: one lookup of that one connection; /proc/net/tcp where netlink is refused).  None
    when it is not a socket of this host (a remote peer), when it has closed (no owner is left to
    name), or when the kernel cannot say."""
    family, local_host, peer_host = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET, local[0], peer[0]
    peer_addr, local_addr = _ip_address(peer_host), _ip_address(local_host)
    if peer_addr is None or local_addr is None:
        return None
    if peer_addr.version == 4:      # (an IPv4 peer of a dual-stack socket: its socket is AF_INET)
        family, peer_host, local_host = socket.AF_INET, str(peer_addr), str(local_addr)
    peer_host, local_host = peer_host.split("%")[0], local_host.split("%")[0]
    found = _sock_diag(family, 0xFFFFFFFF, (peer_host, peer[1]), (local_host, local[1]))
    if found is None:
        want = (peer[1], socket.inet_pton(family, peer_host).ljust(16, b"\0"), local[1],
                socket.inet_pton(family, local_host).ljust(16, b"\0"))
        found = [row[:5] for row in _tcp_table(family) if (row[1], row[2], row[5], row[6]) == want]
    found = [uid for _, _, _, uid, inode in found if inode]
    return found[0] if found else None


def tcp_listener_uid(host, port):
    """The uid of the socket listening on TCP *port* at address *host* (or at the wildcard
    address) of this host, from the kernel's socket table; None when none listens there, when
    sockets of different users do, or when the kernel cannot say."""
    addr = _ip_address(host)
    if addr is None:
        return None
    uids = set()
    for family in ([socket.AF_INET6] if addr.version == 6 else [socket.AF_INET, socket.AF_INET6]):
        wanted = {bytes(16), socket.inet_pton(family, str(addr) if family == socket.AF_INET or addr.version == 6
                                              else "::ffff:" + str(addr)).ljust(16, b"\0")}
        found = _sock_diag(family, 1 << _TCP_LISTEN, dump=True)
        if found is None:
            found = [row[:5] for row in _tcp_table(family) if row[0] == _TCP_LISTEN]
        uids.update(uid for _, local_port, address, uid, _ in found if local_port == port and address in wanted)
    return uids.pop() if len(uids) == 1 else None


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------
# What an info may be, how it is marshalled, and how a value a client sent is shown: printable()
# and describe() for what a user reads, _loggable for the log.

_PARAMS_OVERHEAD = len(xmlrpc.client.dumps((0,))) - len("<value><int>0</int></value>")
# What dumps writes for one string param and for an int or string reply, filled in directly: the
# shapes of nearly every call (tests/test_values.py and test_fastpath.py check they match byte for byte).
_STRING_PARAMS = "<params>\n<param>\n<value><string>%s</string></value>\n</param>\n</params>\n"
_INT_REPLY = ("<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><int>%d</int>"
              "</value>\n</param>\n</params>\n</methodResponse>\n")
_STR_REPLY = _INT_REPLY.replace("<int>%d</int>", "<string>%s</string>")
# A reply listing entries (listPorts, lookup): this, each entry's struct as dumps writes it, then that.
_LIST_HEAD = b"<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><array><data>\n"
_LIST_FOOT = b"</data></array></value>\n</param>\n</params>\n</methodResponse>\n"
_LIST_HEAD_SIZE, _LIST_FOOT_SIZE = len(_LIST_HEAD), len(_LIST_FOOT)
_NESTED_HEAD = b"<value><array><data>\n" * 2                # a multicall's [listing]
_NESTED_FOOT = b"</data></array></value>\n" * 2


def _list_item(value):
    """*value* marshalled as an item of a reply's array (what _LIST_HEAD and _LIST_FOOT enclose)."""
    return dumps(([value],), methodresponse=True, allow_none=False)[_LIST_HEAD_SIZE:-_LIST_FOOT_SIZE].encode("utf-8")


class _Snapshot(list):
    """The registrations a listing of a system.multicall shows, by port; whole: all of them."""
    __slots__ = ("whole",)

    def __init__(self, regs, whole):
        super().__init__(regs)
        self.whole = whole


@functools.lru_cache(maxsize=64)
def _str_reply(text):
    """The reply whose result is the ASCII string *text*, as dumps writes it (ping's, always the same)."""
    return (_STR_REPLY % xmlrpc.client.escape(text).replace("\r", "&#13;")).encode("ascii")


def dumps(values, **kw):
    """xmlrpc.client.dumps, with carriage returns written as &#13; so that parsers keep them
    (xmlrpc.client leaves them raw; XML readers turn a raw CR into LF).  The marshaller writes
    no CR of its own, so every CR in its output comes from a string value."""
    return xmlrpc.client.dumps(values, **kw).replace("\r", "&#13;")


def marshal_info(info):
    """Check *info* and return it marshalled (the text the state file keeps).

    Raises BadArgumentError for a value XML-RPC cannot carry back (nil, ints beyond 32 bits,
    NaN), one nested deeper than MAX_INFO_DEPTH or larger than MAX_INFO_BYTES marshalled.
    """
    if type(info) is str:
        text = (_STRING_PARAMS % xmlrpc.client.escape(info)).replace("\r", "&#13;")
    else:
        text = _marshal_value(info)
    size = (len(text) if text.isascii() else len(text.encode("utf-8"))) - _PARAMS_OVERHEAD
    if size > MAX_INFO_BYTES:
        raise BadArgumentError("info is %d bytes marshalled; the limit is %d" % (size, MAX_INFO_BYTES))
    return text


def _marshal_value(info):
    _check_depth(info, 0)
    try:
        return dumps((info,), allow_none=False)
    except OverflowError:
        raise BadArgumentError("info holds an integer outside 32 bits; XML-RPC carries -2147483648 to 2147483647 only")
    except TypeError:
        raise BadArgumentError("info holds nil or a value XML-RPC cannot carry; use strings, numbers, "
                               "booleans, structs, arrays, base64 or dateTime")


def _check_depth(value, depth):
    if isinstance(value, (list, dict)):
        if depth >= MAX_INFO_DEPTH:
            raise BadArgumentError("info is nested deeper than %d levels" % MAX_INFO_DEPTH)
        for item in (value.values() if isinstance(value, dict) else value):
            _check_depth(item, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadArgumentError("info holds a double that is not finite (NaN or infinity)")


def unmarshal_info(text):
    return xmlrpc.client.loads(text, use_builtin_types=True)[0][0]


_PARAMS_HEAD, _PARAMS_FOOT = "<params>\n", "</params>\n"


def unmarshal_infos(texts, batch=1000):
    """[unmarshal_info(text) for text in texts], parsed a thousand at a time by one parser (its
    making was most of the cost of each: a restart reads 25,000 of them).  A batch that does not
    read as one value per text is read text by text, so that one that is not an info says so."""
    values = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        inner = [t[len(_PARAMS_HEAD):-len(_PARAMS_FOOT)] for t in chunk
                 if t.startswith(_PARAMS_HEAD) and t.endswith(_PARAMS_FOOT)]
        read = None
        if len(inner) == len(chunk):
            try:
                read = xmlrpc.client.loads(_PARAMS_HEAD + "".join(inner) + _PARAMS_FOOT, use_builtin_types=True)[0]
            except (expat.ExpatError, ValueError, TypeError, xmlrpc.client.Error):
                read = None
        values.extend(read if read is not None and len(read) == len(chunk) else [unmarshal_info(t) for t in chunk])
    return values


def check_port(port):
    """*port* as an int from 1 to 65535, else BadArgumentError naming the value."""
    if type(port) is not int or not 1 <= port <= 65535:
        raise BadArgumentError("port must be an integer from 1 to 65535, not %s" % describe(port))
    return port


def _age(seconds):
    """A duration as people read it at a glance: 42s, 5m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def utc(epoch):
    """A naive UTC datetime, as XML-RPC's dateTime.iso8601 carries no zone."""
    return datetime.fromtimestamp(int(epoch), timezone.utc).replace(tzinfo=None)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 2
_XMLRPC_TYPES = ((bool, "a boolean"), (int, None), (float, "a double"), (str, None), (bytes, "base64"),
                 (datetime, "a dateTime.iso8601"), (list, "an array"), (dict, "a struct"),
                 (type(None), "nil"))


class _loggable:
    """A value a client sent, for the log: a short, safe repr (bounded in length and depth),
    made only if the record is written."""

    __slots__ = ("value", "limit")

    def __init__(self, value, limit=80):
        self.value, self.limit = value, limit

    def __str__(self):
        text = _REPR.repr(self.value)
        return text if len(text) <= self.limit else text[:self.limit - 3] + "..."


# What could forge lines of a table or drive a terminal: control characters (C0, DEL, C1), line
# and paragraph separators, and the bidirectional overrides and isolates that reorder what follows.
# (Not the joiners and spaces that text in many scripts needs: ZWNJ, ZWJ, no-break space.)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text, limit=None):
    """*text* (any value, as str()) safe to show a user on one line: each character that could
    forge lines of a table or drive a terminal written as its escape (\\n, \\x1b, \\u202e), the rest
    as given; cut to *limit* characters with "..."."""
    text = _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def describe(value, limit=40):
    """A value a client sent, or an error, for a message a user reads (a fault, a CLI error): 7,
    'text', a struct; an exception as its own message on one line, without its class (the str()
    of xmlrpc.client.Error is a repr)."""
    if isinstance(value, BaseException):
        text = " ".join((value.args[0] if value.args and isinstance(value.args[0], str) else "").split())
        return printable(text, 120) if text else "a value is malformed"
    for kind, name in _XMLRPC_TYPES:
        if isinstance(value, kind):
            return str(_loggable(value, limit)) if name is None else name
    return "a value of an unknown type"


# ---------------------------------------------------------------------------------------------
# XML-RPC bodies
# ---------------------------------------------------------------------------------------------
# Requests read with expat with DTDs refused, in the dialects real clients send (and a fast path
# for the shape nearly every call has); replies written as every client reads them.

class _Unmarshaller(xmlrpc.client.Unmarshaller):
    """xmlrpc.client's reader, more liberal: booleans as true/false, whitespace around scalars."""

    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)

    def end_boolean(self, data):
        word = data.strip().lower()
        if word not in ("0", "1", "true", "false"):
            raise ValueError("bad boolean value %s" % describe(data))
        self.append(word in ("1", "true"))
        self._value = 0
    dispatch["boolean"] = end_boolean

    def end_int(self, data):
        try:
            self.append(int(data))
        except ValueError:
            raise ValueError("bad integer value %s" % describe(data.strip()))
        self._value = 0
    for _tag in ("i1", "i2", "i4", "i8", "int", "biginteger"):
        dispatch[_tag] = end_int
    del _tag

    def end_struct(self, data):
        items = self._stack[self._marks[-1]:]
        if len(items) % 2 or not all(isinstance(name, str) for name in items[::2]):
            raise ValueError("each struct member needs a <name> string and a <value>")
        xmlrpc.client.Unmarshaller.end_struct(self, data)
    dispatch["struct"] = end_struct

    def end_dateTime(self, data):
        xmlrpc.client.Unmarshaller.end_dateTime(self, data.strip())
        self._value = 0
    dispatch["dateTime.iso8601"] = end_dateTime

    def end_base64(self, data):
        try:
            xmlrpc.client.Unmarshaller.end_base64(self, data)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("bad base64 value")
    dispatch["base64"] = end_base64


def _refuse_dtd(*args):
    raise Fault(NOT_WELL_FORMED, "DOCTYPE and ENTITY declarations are refused")


# The shape of nearly every call (xmlrpc.client's and most other clients'): UTF-8, int or string
# params, no entities, no markup in strings.  parse_call reads a body of exactly this shape with
# two patterns instead of expat, about four times as fast; anything else, expat reads.  A string
# here holds no "<", ">", "&", CR or control character, so expat would read its bytes unchanged.
_XML_WS = rb"[ \t\r\n]*"
_SIMPLE_VALUE = rb"<value>(?:<(int|i4)>(-?[0-9]{1,10})</\1>|<string>([^<>&\r\x00-\x08\x0b\x0c\x0e-\x1f]*)</string>)</value>"
_SIMPLE_CALL = re.compile(
    rb"(?:<\?xml version=(?:'1\.0'|\"1\.0\")\?>)?%(ws)s<methodCall>%(ws)s<methodName>([A-Za-z0-9_.:]{1,100})"
    rb"</methodName>%(ws)s(?:<params>%(ws)s((?:<param>%(ws)s%(value)s%(ws)s</param>%(ws)s)*)</params>%(ws)s)?"
    rb"</methodCall>%(ws)s\Z" % {b"ws": _XML_WS, b"value": _SIMPLE_VALUE.replace(b"\\1", b"\\3")})
_SIMPLE_PARAM = re.compile(_SIMPLE_VALUE)
# A system.multicall of such calls, as xmlrpc.client writes it (each call a struct of methodName,
# then params), is read the same way: expat costs about 15 us per call of a multicall, this 2.
_ITEM_VALUE = rb"<value>(?:<(?P<tag>int|i4)>-?[0-9]{1,10}</(?P=tag)>|<string>[^<>&\r\x00-\x08\x0b\x0c\x0e-\x1f]*</string>)</value>"
_SIMPLE_ITEM = (rb"<value><struct>%(ws)s<member>%(ws)s<name>methodName</name>%(ws)s<value><string>([A-Za-z0-9_.:]{1,100})"
                rb"</string></value>%(ws)s</member>%(ws)s<member>%(ws)s<name>params</name>%(ws)s<value><array><data>%(ws)s"
                rb"((?:%(value)s%(ws)s)*)</data></array></value>%(ws)s</member>%(ws)s</struct></value>"
                % {b"ws": _XML_WS, b"value": _ITEM_VALUE})
_SIMPLE_MULTICALL = re.compile(
    rb"(?:<\?xml version=(?:'1\.0'|\"1\.0\")\?>)?%(ws)s<methodCall>%(ws)s<methodName>system\.multicall</methodName>%(ws)s"
    rb"<params>%(ws)s<param>%(ws)s<value><array><data>%(ws)s((?:%(item)s%(ws)s)*)</data></array></value>%(ws)s</param>%(ws)s"
    rb"</params>%(ws)s</methodCall>%(ws)s\Z" % {b"ws": _XML_WS, b"item": _SIMPLE_ITEM})
_SIMPLE_ITEMS = re.compile(_SIMPLE_ITEM)


def _simple_params(text):
    """The params (a list) of the <value>s in *text*, of the shape above; None if a string is
    not UTF-8 or holds a non-character, for expat to refuse."""
    params = []
    for tag, number, text in _SIMPLE_PARAM.findall(text):
        if tag:
            params.append(int(number))
        else:
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                return None
            if "\ufffe" in text or "\uffff" in text:     # not XML characters: expat's error
                return None
            params.append(text)
    return params


def _parse_simple_call(data):
    """(params, method) of a body of the shape above, or None for expat to read it."""
    match = _SIMPLE_CALL.match(data)
    if match is None:
        return None
    params = _simple_params(match.group(2) or b"")
    return None if params is None else (tuple(params), match.group(1).decode("ascii"))


def _parse_simple_multicall(data):
    """(params, "system.multicall") of a multicall of the shape above, or None for expat."""
    match = _SIMPLE_MULTICALL.match(data)
    if match is None:
        return None
    calls = []
    for item in _SIMPLE_ITEMS.finditer(match.group(1)):
        params = _simple_params(item.group(2))
        if params is None:
            return None
        calls.append({"methodName": item.group(1).decode("ascii"), "params": params})
    return (calls,), "system.multicall"


def parse_call(data):
    """(params, method) of an XML-RPC request body; Fault -32700 or -32600 when it is not one."""
    simple = _parse_simple_call(data)
    if simple is None and b"<methodName>system.multicall<" in data[:200]:
        simple = _parse_simple_multicall(data)
    if simple is not None:
        return simple
    return _parse_call_expat(data)


def _parse_call_expat(data):
    # This drives xmlrpc.client.Unmarshaller through its internals (_encoding, _type, _marks,
    # _stack and the dispatch table _Unmarshaller extends), as xmlrpc.client.loads does not refuse
    # DTDs; tests/test_fastpath.py fails if a Python release changes them.
    u = _Unmarshaller(use_builtin_types=True)
    u._encoding = None
    p = expat.ParserCreate(None, None)
    p.buffer_text = True
    p.StartElementHandler = u.start
    p.EndElementHandler = u.end
    p.CharacterDataHandler = u.data
    p.StartDoctypeDeclHandler = _refuse_dtd
    p.EntityDeclHandler = _refuse_dtd
    try:
        p.Parse(data, True)
    except Fault:       # (_refuse_dtd's)
        raise
    except expat.ExpatError as exc:
        raise Fault(NOT_WELL_FORMED, "the request is not well-formed XML: %s" % exc)
    except (ValueError, TypeError, OverflowError, xmlrpc.client.Error, IndexError, KeyError, ArithmeticError) as exc:
        raise Fault(INVALID_REQUEST, "the request is not valid XML-RPC: %s" % describe(exc))
    except LookupError as exc:      # after IndexError and KeyError: an encoding expat does not know
        raise Fault(NOT_WELL_FORMED, "the request's XML encoding is unknown: %s" % describe(exc))
    method = u.getmethodname()
    if not isinstance(method, str) or u._type not in ("params", "methodName") or u._marks:
        raise Fault(INVALID_REQUEST, "the request is not valid XML-RPC: expected a <methodCall> "
                    "with a <methodName> and <params>")
    return tuple(u._stack), method


Marshalled = namedtuple("Marshalled", "reply")
Marshalled.__doc__ = """A method's result already marshalled as an XML-RPC reply, in parts (a
list of bytes): the transport sends them as they are (a listing of the cluster, joined from
pieces made beforehand, a part at a time, so that no part holds the interpreter for long)."""


def marshal_reply(response, method):
    """(the XML reply as bytes, the fault code it answers or None) for *response*, a 1-tuple or a
    Fault.  A reply that cannot be marshalled (a bug) is logged and answered as an internal error."""
    try:
        return (dumps(response, methodresponse=True, allow_none=False).encode("utf-8"),
                response.faultCode if isinstance(response, Fault) else None)
    except Exception:
        log.exception("could not marshal the reply to %s", method)
        return dumps(Fault(INTERNAL_ERROR, "internal error: the reply to %s could not be marshalled; see the "
                           "node manager's log" % method), methodresponse=True).encode("utf-8"), INTERNAL_ERROR


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
# Every setting is the value given (a flag, an argument), else its environment variable, else its
# default (CONTRACT, "Configuration"), read here for the daemon, the command line and the client.

def bounded_int(text, low, high, what):
    """*text* as an int from *low* to *high*, else NodeMngrException naming *what*."""
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = None
    if value is None or not low <= value <= high:
        raise NodeMngrException("%s must be an integer from %d to %d, not %s" % (what, low, high, printable(text, 80)))
    return value


def default_state_path(port):
    """$XDG_RUNTIME_DIR/nodemngr/PORT.sqlite3, else TMPDIR/nodemngr-UID/PORT.sqlite3."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        folder = os.path.join(runtime, "nodemngr")
    else:
        import tempfile
        uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
        folder = os.path.join(tempfile.gettempdir(), "nodemngr-%s" % uid)
    return os.path.join(folder, "%d.sqlite3" % port)


def ensure_private_folder(folder):
    """Create *folder* 0700 if missing; refuse one that another user owns or that is a link."""
    os.makedirs(folder, 0o700, exist_ok=True)
    st = os.lstat(folder)
    if not os.path.isdir(folder) or os.path.islink(folder):
        raise NodeMngrException("state folder %s is not a plain folder; remove it or set NODEMNGR_STATE" % folder)
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise NodeMngrException("state folder %s belongs to uid %d, not to you (uid %d); remove it or set "
                                "NODEMNGR_STATE" % (folder, st.st_uid, os.getuid()))
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)


def read_token(path):
    """The token in the file *path* (bytes), or None when *path* is None.  The file must not be
    readable by group or others."""
    if not path:
        return None
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise NodeMngrException("cannot read token file %s: %s" % (path, exc.strerror or exc))
    if hasattr(os, "getuid") and st.st_mode & 0o077:
        raise NodeMngrException("token file %s is readable by others (mode %o); chmod 600 it"
                                % (path, st.st_mode & 0o777))
    if not token:
        raise NodeMngrException("token file %s is empty" % path)
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        raise NodeMngrException("token file %s is not UTF-8 text" % path) from None
    return token


def _port_from_environ(var, text):
    try:
        port = int(text)
    except ValueError:
        raise NodeMngrException("%s=%s is not a port number" % (var, describe(text, 80)))
    if not 1 <= port <= 65535:
        raise NodeMngrException("%s=%d is not within 1-65535" % (var, port))
    return port


def _host_name_ok(host):
    """Whether *host* is an IP address or a name the resolver can be asked about (IDNA refuses an
    empty label, "a..b", and labels over 63 characters)."""
    if _ip_address(host) is not None:
        return True
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


class Settings:
    """The node manager's settings, each one the value given here (a flag, a constructor's
    argument; None or "" means not given), else its environment variable, else its default.
    A setting is read and checked when it is first asked for, so that a client never fails on
    a setting it does not use; a wrong one is a NodeMngrException in one sentence.

        >>> Settings(port=11899).port, Settings(environ={"NODEMNGR_PORT": "11900"}).port
        (11899, 11900)
    """

    VARIABLES = {
        "host": "NODEMNGR_HOST", "port": "NODEMNGR_PORT", "first_port": "NODEMNGR_FIRST_PORT",
        "last_port": "NODEMNGR_LAST_PORT", "state": "NODEMNGR_STATE", "unix": "NODEMNGR_UNIX",
        "token_file": "NODEMNGR_TOKEN_FILE", "autostart": "NODEMNGR_AUTOSTART", "log_level": "NODEMNGR_LOG_LEVEL",
        "log_file": "NODEMNGR_LOG_FILE", "cluster": "NODEMNGR_CLUSTER", "cluster_ttl": "NODEMNGR_CLUSTER_TTL",
        "advertise_host": "NODEMNGR_ADVERTISE_HOST", "cluster_ca": "NODEMNGR_CLUSTER_CA",
        "cluster_cert": "NODEMNGR_CLUSTER_CERT", "cluster_key": "NODEMNGR_CLUSTER_KEY",
        "cluster_user_file": "NODEMNGR_CLUSTER_USER_FILE",
    }

    def __init__(self, environ=None, **given):
        unknown = set(given).difference(self.VARIABLES)
        if unknown:
            raise TypeError("no such setting: %s" % ", ".join(sorted(unknown)))
        self.environ = os.environ if environ is None else environ
        self._given = {name: value for name, value in given.items() if value is not None and value != ""}

    def updated(self, **given):
        """These settings, with the values *given* given too."""
        return Settings(self.environ, **dict(self._given, **given))

    def given(self, name):
        """The value given for *name*, else its environment variable's text, else None."""
        value = self._given.get(name)
        return value if value is not None else (self.environ.get(self.VARIABLES[name]) or None)

    def _parsed(self, name, parse, default):
        """The value given for *name*, else parse(variable, text) of its environment variable's
        text, else *default*."""
        value = self._given.get(name)
        if value is not None:
            return value
        var = self.VARIABLES[name]
        text = self.environ.get(var)
        return parse(var, text) if text else default

    def _port(self, name, default):
        return self._parsed(name, _port_from_environ, default)

    @property
    def host(self):
        """The node manager's address (brackets around an IPv6 one dropped); 127.0.0.1."""
        host = self.given("host") or "127.0.0.1"
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or any(c in host for c in "[]/@ ") or (host.count(":") == 1) or not _host_name_ok(host):
            raise NodeMngrException("%s is not a host name or address (give the port with --port or "
                                    "NODEMNGR_PORT)" % describe(host, 80))
        return host

    @property
    def port(self):
        return self._port("port", nmPort)

    @property
    def first_port(self):
        return self._port("first_port", firstPort)

    @property
    def last_port(self):
        return self._port("last_port", lastPort)

    @property
    def state(self):
        """The state file's path, or None for "none" (keep nothing)."""
        text = self.given("state")
        if text is None:
            return default_state_path(self.port)
        return None if str(text).lower() == "none" else str(text)

    def state_folder(self):
        """The folder of the state file (of the default one with state none), absolute, created
        0700 if missing; the default folder is also refused if another user owns it."""
        text = self.given("state")
        if text is not None and str(text).lower() != "none":
            folder = os.path.dirname(os.path.abspath(str(text)))
            try:
                os.makedirs(folder, 0o700, exist_ok=True)
            except OSError as exc:
                raise NodeMngrException("cannot create the state folder %s (NODEMNGR_STATE): %s"
                                        % (folder, exc.strerror or exc)) from None
            return folder
        folder = os.path.dirname(os.path.abspath(default_state_path(self.port)))
        try:
            ensure_private_folder(folder)
        except OSError as exc:
            raise NodeMngrException("cannot create the node manager's folder %s: %s"
                                    % (folder, exc.strerror or exc)) from None
        return folder

    @property
    def unix(self):
        """The local socket's address: @NAME (Linux's abstract namespace) or a path; None for
        "none".  Default @nodemngr-PORT, or PORT.sock beside the state file where there is no
        abstract namespace."""
        text = str(self.given("unix") or "")
        if text.lower() == "none":
            return None
        if not text:
            if sys.platform.startswith("linux"):
                return "@nodemngr-%d" % self.port
            return os.path.join(os.path.dirname(self.state or default_state_path(self.port)), "%d.sock" % self.port)
        if "\0" in text or text == "@" or len(text.encode("utf-8", "surrogateescape")) > 107:
            raise NodeMngrException("%s is not a local socket address (@NAME, or a path of at most 107 bytes)"
                                    % describe(text, 80))
        return text

    token_file = property(lambda self: self.given("token_file"), doc="The token file's path, or None.")

    @property
    def token(self):
        """The token (bytes) in the token file, or None when there is no token file."""
        return read_token(self.token_file)

    @property
    def autostart(self):
        """Whether a client starts a daemon when none answers: NODEMNGR_AUTOSTART=0 says no."""
        return bool(self._parsed("autostart", lambda var, text: text.strip() != "0", True))

    @property
    def log_level(self):
        level = str(self.given("log_level") or "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise NodeMngrException("log level %s is not one of DEBUG, INFO, WARNING, ERROR" % describe(level, 80))
        return level

    log_file = property(lambda self: self.given("log_file"), doc="The log file's path, or None (stderr).")

    @property
    def cluster(self):
        """The etcd endpoints' URLs (a list; empty: no cluster view)."""
        return [url for url in str(self.given("cluster") or "").split(",") if url.strip()]

    @property
    def cluster_ttl(self):
        """Seconds of the lease of this host's keys in etcd."""
        return self._parsed("cluster_ttl", lambda var, text: bounded_int(text, 2, 3600, var), 10)


# ---------------------------------------------------------------------------------------------
# The allocator
# ---------------------------------------------------------------------------------------------
# Pure logic: no sockets, no files, an injected host check and clock.

Registration = namedtuple("Registration", "port info pid start since blob uid", defaults=(-1,))
Registration.__doc__ = """One held port: its info, owner (pid 0 = none, start time), since (epoch
seconds), blob (info marshalled, as the state file keeps it) and uid (of the user who registered
it; -1: unknown)."""


def name_of(info):
    """The name of a registration whose info is *info*: the info itself when it is a string, else
    the ``name`` member of a struct info when that is a string, else None (CONTRACT, "Names")."""
    return info if type(info) is str else explicit_name(info)


def explicit_name(info):
    """The name of a struct info's string ``name`` member (a name whose port is sticky), else None."""
    return info["name"] if type(info) is dict and type(info.get("name")) is str else None


class PortAllocator:
    """The ports of ``[first, last]``: which are held, by whom, under what name, which port each
    explicit name had last (and which block: take_block), and which is the lowest free one.

    Free ports sit in two heaps, those that no name remembers and those that one does (taken
    only when the first heap is empty), so taking the lowest and giving one back are O(log n).
    A port is remembered for one name at most, as its port or as a port of its block.
    A sticky port is taken out of its heap's middle: heap entries whose port is no longer free,
    or has changed heaps, are skipped when they come up.  Ports that the host check refused are
    set aside for busy_retry seconds rather than probed on every call.  Not thread-safe:
    NodeMngr serialises calls (its loop's thread makes them all).
    """

    busy_probe_rate = 2000  # set-aside ports probed again per second, at most,
    busy_probe_burst = 32   # and at once
    # Ports one take_block() call probes at most (about 20 ms of binds): a user holding a port in
    # every run of the range (a few hundred sockets) must not stall the node manager on each call;
    # those found busy are set aside, so a caller asking again goes further.
    block_probes = 1024

    def __init__(self, first, last, registrations=(), remembered=None, clock=time.monotonic,
                 busy_retry=BUSY_RETRY, blocks=None):
        if not 1 <= first <= last <= 65535:
            raise BadArgumentError("the port range %s-%s is not within 1-65535 with first <= last" % (first, last))
        self.first, self.last = first, last
        self.held = {}          # port -> Registration
        self.owners = {}        # (pid, start) -> set of ports
        self.names = {}         # name -> set of held ports: lookup's index
        self.changes = 0        # counts changes to held: a listing made at the same count is current
        self.in_range = 0       # held ports within [first, last] (a saved state may hold others)
        self.remembered = {n: p for n, p in (remembered or {}).items() if first <= p <= last}
        self._remembered_by = {p: n for n, p in self.remembered.items()}
        self.blocks = {}        # explicit name -> the ports of the block it had last (ascending)
        self._block_of = {}     # port -> the name whose block it is
        for name, ports in (blocks or {}).items():
            ports = tuple(sorted(set(ports)))
            if (0 < len(ports) <= MAX_BLOCK and first <= ports[0] and ports[-1] <= last
                    and not any(p in self._remembered_by or p in self._block_of for p in ports)):
                self.blocks[name] = ports
                self._block_of.update(dict.fromkeys(ports, name))
        self._busy = []         # heap of (retry_at, port): refused by the host check lately
        self._busy_ports = set()    # the ports in it
        self._unprobed = set()      # ports back from it, free but not probed since
        self._budget, self.gave_up = 0, False   # probes left to take_block(); it stopped at block_probes
        # A walk for a run costs O(range): a failed one is remembered until a port is freed (the
        # free ports only shrink till then), so that a stream or a multicall of refused blocks
        # costs one walk, not one each.
        self._freed = 0                 # ports made free so far
        self._no_run = (-1, 0)          # (_freed when a walk found no run of this many or more, that many)
        self._longest = (None, None)    # (_freed and free count, longest_free_run() then)
        self._probes, self._probed_at = self.busy_probe_burst, clock()     # a token bucket for probing those again
        self._clock, self.busy_retry = clock, busy_retry
        for reg in registrations:
            self.hold(reg)
        self._is_free = set(range(first, last + 1)).difference(self.held)
        self._rebuild_heaps()

    def __len__(self):
        return len(self.held)

    @property
    def free_count(self):
        return len(self._is_free) + len(self._busy)

    def lookup(self, name):
        """The Registrations named *name*, sorted by port."""
        return sorted(self.held[p] for p in self.names.get(name, ()))

    def take(self, usable, name=None):
        """Remove and return a free port that ``usable(port)`` accepts, or None: the port that
        explicit name *name* had last when it is free, else the lowest free port no name
        remembers, else the lowest that one does.  The set-aside ports due for another probe come
        back at busy_probe_rate a second at most: a thousand found busy together must not be probed
        again within one call (or multicall)."""
        now = self._due_back()
        port = self.remembered.get(name)
        if port in self._is_free and self._try(usable, port, now):
            return port
        for heap, kept in ((self._free, False), (self._kept, True)):
            while heap:
                port = heapq.heappop(heap)
                if (port in self._is_free and (port in self._remembered_by or port in self._block_of) is kept
                        and self._try(usable, port, now)):
                    return port
        return None

    def take_block(self, usable, count, consecutive=False, name=None):
        """Remove and return *count* free ports that ``usable(port)`` accepts, ascending, or None
        (then none is taken): the block explicit name *name* had last when all of it is free (and
        consecutive, if asked), else with *consecutive* the lowest run of *count* free ports, else
        the *count* ports take() would give one by one; ports that no name remembers first, as
        take() does.  A run is found by one walk up from the lowest free port (a membership test
        per port passed, so O(ports above it) at worst), then a probe of each of its ports: one
        that another program holds ends the run, is set aside, and the walk goes on past it."""
        now = self._due_back()
        self._budget, self.gave_up = self.block_probes, False
        kept = self.blocks.get(name)
        if (kept is not None and len(kept) == count and (not consecutive or kept[-1] - kept[0] == count - 1)
                and all(p in self._is_free for p in kept) and self._try_run(usable, kept, now) is None):
            return list(kept)
        if consecutive:
            if self._no_run[0] == self._freed and count >= self._no_run[1]:
                return None
            for spare in (True, False):     # ports no name remembers, else any
                run = self._take_run(usable, count, now, spare)
                if run is not None or self.gave_up:
                    return run
            self._no_run = (self._freed, count)
            return None
        taken = []
        try:
            while len(taken) < count:
                port = self.take(usable)
                if port is None:
                    break
                taken.append(port)
        finally:
            if len(taken) < count:      # (none, or the check failed): all given back
                for port in taken:
                    self._make_free(port)
        return sorted(taken) if len(taken) == count else None

    @property
    def set_aside_count(self):
        """How many ports the host check refused lately are set aside (not probed again yet)."""
        return len(self._busy)

    def longest_free_run(self):
        """(length, first port or None) of the longest run of consecutive free ports (remembered
        ones included), and how many ports are free in all: what a refused block is told.  Costs a
        sort of the free ports, which are few when a block is refused for want of them."""
        key = (self._freed, len(self._is_free))   # (till a port is freed, the free ports only shrink)
        if self._longest[0] == key:
            return self._longest[1]
        best = (0, None)
        run, previous = 0, -2
        for port in sorted(self._is_free):
            run = run + 1 if port == previous + 1 else 1
            previous = port
            if run > best[0]:
                best = (run, port - run + 1)
        self._longest = (key, (best[0], best[1], len(self._is_free)))
        return self._longest[1]

    def block_memory_change(self, ports, info):
        """What holding *ports* (ascending) as one block for *info* changes in the names' memory:
        (the explicit name that remembers this block from now on, or None; the names that forget
        their blocks, a port of which goes to this one; the ports that the names remembering them
        as their port forget).  As for one port (memory_change), a name keeps its block while a
        port of it is held under its name or was just found busy, unless this block takes one of
        its ports; else the name moves to this block."""
        ports = tuple(ports)
        name = explicit_name(info)
        losers = {self._block_of[p] for p in ports if p in self._block_of}
        singles = tuple(p for p in ports if p in self._remembered_by)
        old = self.blocks.get(name)
        if old == ports:
            return None, (), ()
        if old is not None and name not in losers and any(
                p in self._busy_ports or (p in self.held and explicit_name(self.held[p].info) == name) for p in old):
            name = None
        losers.discard(name)    # (its old block goes when it remembers this one)
        return name, tuple(sorted(losers)), singles

    def hold_block(self, regs, memory=(None, (), ())):
        """Record the ports of a block taken with take_block(), with the block_memory_change the
        caller saved."""
        remember, forget_blocks, forget_ports = memory
        for reg in regs:
            self.hold(reg)
        for port in forget_ports:
            del self.remembered[self._remembered_by.pop(port)]
        for name in forget_blocks:
            self._forget_block(name)
        if remember is not None:
            self._forget_block(remember)
            ports = tuple(reg.port for reg in regs)
            self.blocks[remember] = ports
            self._block_of.update(dict.fromkeys(ports, remember))

    def probe_busy_early(self, usable, limit=8):
        """Probe up to *limit* of the ports set aside as busy before they are due, the soonest due
        first, as far as the probing budget allows; stop at the first usable one, which becomes
        free.  True if one did: called before saying that no port is free, so that a port its
        holder has just let go is handed out at once."""
        now = self._refill()
        due = [heapq.heappop(self._busy) for _ in range(min(limit, int(self._probes), len(self._busy)))]
        try:
            while due:      # (each once: one found busy again goes back behind the others)
                self._probes -= 1
                if self._probe(usable, due.pop(0)[1], now):
                    return True
            return False
        finally:
            for entry in due:   # (not probed: as they were)
                heapq.heappush(self._busy, entry)

    def _due_back(self):
        """Make free the set-aside ports due for another probe, as far as the probing budget allows
        (take() probes them as it hands them out); return the time now."""
        now = self._refill()
        while self._probes >= 1 and self._busy and self._busy[0][0] <= now:
            port = heapq.heappop(self._busy)[1]
            self._make_free(port)
            self._unprobed.add(port)
            self._probes -= 1
        return now

    def _refill(self):
        """Refill the probing budget (a token bucket) for the time passed; return the time now."""
        now = self._clock()
        self._probes = min(self.busy_probe_burst, self._probes + (now - self._probed_at) * self.busy_probe_rate)
        self._probed_at = now
        return now

    def _try(self, usable, port, now):
        self._is_free.discard(port)
        self._unprobed.discard(port)
        self._budget -= 1
        try:
            if usable(port):
                return True
        except BaseException:   # the check failed, not the port: it stays free
            self._make_free(port)
            raise
        self._set_aside(port, now)
        return False

    def _try_run(self, usable, ports, now):
        """Take free *ports* while usable() accepts them, those back from the set-aside ones first
        (likely still busy: then one probe refuses the run, not a run's worth); return None when it
        took them all, else the port refused (set aside), the others taken being free again."""
        unprobed = self._unprobed
        order = sorted(ports, key=lambda p: p not in unprobed) if unprobed else ports
        taken = []
        try:
            for port in order:
                if not self._try(usable, port, now):
                    return port
                taken.append(port)
        finally:
            if len(taken) < len(ports):
                for port in taken:
                    self._make_free(port)
        return None

    def _take_run(self, usable, count, now, spare):
        """Take the lowest run of *count* consecutive free ports that usable() accepts (spare: no
        port of it remembered by a name); the ports, or None."""
        is_free, single, block = self._is_free, self._remembered_by, self._block_of
        start = self._lowest_free(spare)
        while start is not None and start + count - 1 <= self.last:
            end, stop = start, start + count
            while end < stop and end in is_free and not (spare and (end in single or end in block)):
                end += 1
            if end < stop:      # (port end breaks the run: the next may begin after it)
                start = end + 1
                continue
            if self._budget < count:    # (those found busy so far are set aside: a next call goes further)
                self.gave_up = True
                return None
            run = range(start, stop)
            refused = self._try_run(usable, run, now)
            if refused is None:
                return list(run)
            start = refused + 1     # (past the one another program holds)
        return None

    def _lowest_free(self, spare):
        """The lowest free port (spare: of those no name remembers), or None; stale entries at the
        heaps' tops are dropped on the way, as take() drops them."""
        lowest = None
        for heap, kept in ((self._free, False), (self._kept, True))[:1 if spare else 2]:
            while heap and not (heap[0] in self._is_free
                                and (heap[0] in self._remembered_by or heap[0] in self._block_of) is kept):
                heapq.heappop(heap)
            if heap and (lowest is None or heap[0] < lowest):
                lowest = heap[0]
        return lowest

    def untake(self, port):
        """Give back a port from take() that could not be registered after all."""
        self._make_free(port)

    def set_aside(self, port):
        """A free port found busy after all (a bind failed): probe it again after busy_retry."""
        self._is_free.discard(port)
        self._set_aside(port, self._clock())

    def memory_change(self, port, info):
        """What holding *port* for *info* changes in the names' memory: (the explicit name that
        remembers *port* from now on, or None; whether the name that remembered it, as its port or
        in its block, forgets it: a block is forgotten whole).
        A name moves to a new port only when the port it remembers is neither held under its name
        (several holders of one name keep the first one's port) nor just found busy (another
        program holds it for a moment: the name gets it back once it is free)."""
        name, other = explicit_name(info), self._remembered_by.get(port)
        if name == other and port not in self._block_of:
            return None, False
        kept_port = self.remembered.get(name)
        kept = self.held.get(kept_port)
        if (kept is not None and explicit_name(kept.info) == name) or kept_port in self._busy_ports:
            name = None
        return name, other is not None or port in self._block_of

    def release(self, port):
        """Forget a held port and make it free again; return its Registration."""
        reg = self.held.pop(port)
        self.changes += 1
        self.in_range -= self.first <= port <= self.last
        if reg.pid:
            self._discard(self.owners, (reg.pid, reg.start), port)
        name = name_of(reg.info)
        if name is not None:
            self._discard(self.names, name, port)
        if self.first <= port <= self.last:
            self._make_free(port)
        return reg

    def hold(self, reg, memory=(None, False)):
        """Record a port taken with take() (or one a saved state holds), with the memory_change
        the caller saved."""
        self.held[reg.port] = reg
        self.changes += 1
        self.in_range += self.first <= reg.port <= self.last
        if reg.pid:
            self.owners.setdefault((reg.pid, reg.start), set()).add(reg.port)
        name = name_of(reg.info)
        if name is not None:
            self.names.setdefault(name, set()).add(reg.port)
        remember, forget = memory
        if forget:
            if reg.port in self._remembered_by:
                del self.remembered[self._remembered_by.pop(reg.port)]
            else:
                self._forget_block(self._block_of[reg.port])
        if remember is not None:
            self._forget(remember)
            self.remembered[remember], self._remembered_by[reg.port] = reg.port, remember

    def restore(self, registrations, remembered, blocks=None):
        """Start again from a saved state: the changes since it could not be saved.  The count of
        changes goes on (a listing made before is not current)."""
        changes = self.changes
        self.__init__(self.first, self.last, registrations, remembered, self._clock, self.busy_retry, blocks)
        self.changes = changes + 1

    def remember_held(self):
        """Let each explicit name of a held port that remembers none remember its lowest such
        port (a state file from 1.0, which had no memory); return the (name, port) pairs added.
        A name that remembers a block has a memory: a port it holds besides (a block asked for
        while its own was held) must not become its port at a restart."""
        added = {}
        for port in sorted(self.held):
            name = explicit_name(self.held[port].info)
            if (name is not None and name not in self.remembered and name not in self.blocks and name not in added
                    and port not in self._remembered_by and port not in self._block_of
                    and self.first <= port <= self.last):
                added[name] = port
        for name, port in added.items():
            self.remembered[name], self._remembered_by[port] = port, name
        return list(added.items())

    def probe_busy(self, usable, limit=32):
        """Probe up to *limit* set-aside ports that are due again; the usable ones become free.
        The server calls this between turns, so that a port its holder let go comes back
        however rarely clients ask.  True while more are due."""
        now = self._clock()
        for _ in range(limit):
            if not self._busy or self._busy[0][0] > now:
                return False
            self._probe(usable, heapq.heappop(self._busy)[1], now)
        return bool(self._busy) and self._busy[0][0] <= now

    def _probe(self, usable, port, now):
        """Probe *port*, taken out of the set-aside ones: free if usable(port), else set aside again."""
        free = False
        try:
            free = usable(port)
        finally:    # (if the check failed, not the port, the port stays set aside)
            if free:
                self._make_free(port)
            else:
                self._set_aside(port, now)
        return free

    def _forget(self, name):
        port = self.remembered.pop(name, None)
        if port is not None:
            del self._remembered_by[port]
            if port in self._is_free:   # it moves to the heap of ports nobody remembers
                heapq.heappush(self._free, port)

    def _forget_block(self, name):
        for port in self.blocks.pop(name, ()):
            del self._block_of[port]
            if port in self._is_free:
                heapq.heappush(self._free, port)

    def _make_free(self, port):
        self._freed += 1
        self._busy_ports.discard(port)
        self._is_free.add(port)
        heapq.heappush(self._kept if port in self._remembered_by or port in self._block_of else self._free, port)
        if len(self._free) + len(self._kept) > 2 * len(self._is_free) + 64:    # mostly skipped entries
            self._rebuild_heaps()

    def _rebuild_heaps(self):
        kept = self._remembered_by.keys() | self._block_of.keys()
        self._free = sorted(p for p in self._is_free if p not in kept)
        self._kept = sorted(p for p in self._is_free if p in kept)

    @staticmethod
    def _discard(index, key, port):
        ports = index[key]
        ports.discard(port)
        if not ports:
            del index[key]

    def _set_aside(self, port, now):
        # each port comes back after its own share of busy_retry (half to all of it), so that
        # a thousand ports found busy together are not all due at once
        heapq.heappush(self._busy, (now + self.busy_retry * (0.5 + (port * 0.6180339887) % 0.5), port))
        self._busy_ports.add(port)


# ---------------------------------------------------------------------------------------------
# The state store
# ---------------------------------------------------------------------------------------------
# sqlite3, one row per held port, one transaction per change.

_STORE_APP_ID = 0x4E4D4E47      # "NMNG": marks a state file as ours
_STORE_SCHEMA = 3       # 1: 1.0's, ports only; 2: names' last ports too; 3: the registering uid and names' blocks too


class _NotOurs(Exception):
    pass


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _is_regular_file(path):
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _create_regular_file(path):
    """Create the state file 0600 if missing; refuse a path that is anything but a regular file
    (a device, FIFO, socket, folder, or a link to anything): it is never opened, never moved."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is None or stat.S_ISREG(mode):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):   # replaced meanwhile
                raise
        else:
            mode = os.fstat(fd).st_mode
            os.close(fd)
            if stat.S_ISREG(mode):
                return
        mode = os.lstat(path).st_mode
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise NodeMngrException("state file %s is %s, not a regular file; give --state the path of a file "
                            "(or none)" % (path, kind))


_CREATE_NAMES = "CREATE TABLE names(name TEXT NOT NULL PRIMARY KEY, port INTEGER NOT NULL UNIQUE);"
# The block each explicit name had last (newPorts), a row per port.  Created wherever it is missing
# when a file is opened (1.2's files, and schema 3 files of 1.3's development before blocks), so it
# is no migration step of its own; a daemon that knows nothing of it leaves it alone.
_CREATE_BLOCKS = ("CREATE TABLE blocks(name TEXT NOT NULL, port INTEGER NOT NULL UNIQUE, "
                  "PRIMARY KEY(name, port));")
_INSERT_PORT = "INSERT INTO ports(port, info, pid, start, since, uid) VALUES (?, ?, ?, ?, ?, ?)"
# How a file of each older schema becomes one of the next (each step in the migration's transaction).
_MIGRATIONS = {1: _CREATE_NAMES, 2: "ALTER TABLE ports ADD COLUMN uid INTEGER NOT NULL DEFAULT -1;"}
_RELEASE_OF_SCHEMA = {1: "1.0", 2: "1.1 and 1.2"}
_REMEMBER = "INSERT OR REPLACE INTO names(name, port) VALUES (?, ?)"
_REMEMBER_BLOCK = "INSERT OR REPLACE INTO blocks(name, port) VALUES (?, ?)"
_FORGET_BLOCK = "DELETE FROM blocks WHERE name = ?"
_FORGET_BLOCK_OF_PORT = "DELETE FROM blocks WHERE name IN (SELECT name FROM blocks WHERE port = ?)"
# Rows of blocks that are not nodemngr's (edited by hand): the whole block of such a row goes.
_BAD_BLOCKS = ("SELECT name FROM blocks WHERE typeof(name) != 'text' OR typeof(port) != 'integer' OR port < 1 "
               "OR port > 65535 OR port IN (SELECT port FROM names) OR port IN (SELECT port FROM blocks GROUP BY "
               "port HAVING count(*) > 1) UNION SELECT name FROM blocks GROUP BY name HAVING count(*) > %d" % MAX_BLOCK)


class StateStore:
    """The held ports, saved in a sqlite3 file so that they survive a crash of the daemon.

    Every change is its own transaction, committed before the caller is answered, or one of a
    group (begin(), then commit(): the calls of a system.multicall).  A commit has
    reached the operating system when it returns, which is all that a ``kill -9`` of the daemon
    can lose.  WAL, not fsynced (synchronous=OFF): README, "Owners and crashes", says why and what
    that risks.  Exclusive locking: a second process cannot use the file
    while a daemon holds it, and the WAL index lives in memory rather than in a mapped -shm file
    (a mapped file that turns read-only kills the process with SIGBUS; a write just fails).
    ``StateStore(None)`` keeps nothing (``--state none``).
    """

    lock_wait = 5.0     # seconds to wait for a state file that another daemon still holds

    def __init__(self, path):
        self.path = path
        self._db = None
        self._held = None       # between begin() and commit(): the statements of the group
        self._rows = None       # the Registrations read when the file was opened, until load()
        if path is not None:
            self._db = self._open_or_move_aside(path)

    def load(self):
        """Every saved Registration, {explicit name: the port it had last} and {explicit name: the
        ports of the block it had last}."""
        if self._db is None:
            return [], {}, {}
        rows, self._rows = self._rows, None     # (read at the open, to check them: once is enough)
        if rows is None:
            rows = self._read_rows(self._db)
        blocks = {}
        for name, port in self._db.execute("SELECT name, port FROM blocks ORDER BY name, port"):
            blocks.setdefault(name, []).append(port)
        return rows, dict(self._db.execute("SELECT name, port FROM names")), blocks

    @staticmethod
    def _read_rows(db):
        """Every row as a Registration; an unreadable info raises (the whole file is suspect)."""
        rows = db.execute("SELECT port, info, pid, start, since, uid FROM ports").fetchall()
        infos = unmarshal_infos([row[1] for row in rows])
        return [Registration(port, info, pid, start, since, blob, uid)
                for (port, blob, pid, start, since, uid), info in zip(rows, infos)]

    def add(self, reg, memory=(None, False)):
        """Save *reg* with a PortAllocator.memory_change, in one transaction."""
        row = (reg.port, reg.blob, reg.pid, reg.start, reg.since, reg.uid)
        remember, forget = memory
        if remember is None and not forget:     # (nearly every call: one statement)
            self._write([(_INSERT_PORT, row)])
            return
        statements = [(_INSERT_PORT, row)]
        if forget:      # (its name forgets it: as its port, or its whole block)
            statements += [("DELETE FROM names WHERE port = ?", (reg.port,)), (_FORGET_BLOCK_OF_PORT, (reg.port,))]
        if remember is not None:    # (the REPLACE deletes the row of the name's old port)
            statements.append((_REMEMBER, (remember, reg.port)))
        self._write(statements)

    def add_block(self, regs, memory=(None, (), ())):
        """Save the Registrations of a block with a PortAllocator.block_memory_change, in one
        transaction."""
        remember, forget_blocks, forget_ports = memory
        statements = [(_INSERT_PORT, (r.port, r.blob, r.pid, r.start, r.since, r.uid)) for r in regs]
        statements += [("DELETE FROM names WHERE port = ?", (port,)) for port in forget_ports]
        statements += [(_FORGET_BLOCK, (name,)) for name in forget_blocks]
        if remember is not None:
            statements.append((_FORGET_BLOCK, (remember,)))
            statements += [(_REMEMBER_BLOCK, (remember, r.port)) for r in regs]
        self._write(statements)

    def remember(self, pairs):
        """Save (name, port) pairs for names' memory."""
        self._write([(_REMEMBER, pair) for pair in pairs])

    def remove(self, ports):
        self._write([("DELETE FROM ports WHERE port = ?", (p,)) for p in ports])

    def begin(self):
        """Hold the changes from now on until commit() saves them together."""
        self._held = []

    def commit(self):
        """Save the changes held since begin() in one transaction: all of them, or none and
        StoreError."""
        held, self._held = self._held, None
        self._write(held)

    def close(self):
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, statements):
        """Run [(sql, args)] as one transaction: all or nothing (held for commit() in a group)."""
        if self._held is not None:
            self._held.extend(statements)
            return
        if self._db is None or not statements:
            return
        try:
            if len(statements) == 1:
                self._db.execute(*statements[0])
            else:   # (autocommit mode would commit each alone)
                self._db.execute("BEGIN")
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.rollback()
            raise StoreError("could not save the state to %s (%s); nothing was changed"
                             % (self.path, self._diagnose(exc)))

    def _diagnose(self, exc):
        """sqlite says "disk I/O error"; the operating system can say why."""
        for path in (self.path + "-wal", self.path):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
            except FileNotFoundError:
                continue
            except OSError as err:
                return "%s: %s" % (exc, err.strerror)
        return str(exc)

    def _open_or_move_aside(self, path):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, 0o700, exist_ok=True)
        _create_regular_file(path)
        try:
            return self._open(path)
        except sqlite3.OperationalError as exc:     # a full disk, a lock, I/O: not the file's fault
            raise NodeMngrException("cannot open the state file %s: %s; it was left as it is" % (path, exc))
        except (sqlite3.DatabaseError, _NotOurs, ValueError, xmlrpc.client.Error, expat.ExpatError) as exc:
            aside = "%s.bad-%s" % (path, time.strftime("%Y%m%dT%H%M%S"))
            for suffix in ("", "-wal", "-shm"):
                if _is_regular_file(path + suffix):     # never a device, FIFO, folder or link
                    os.replace(path + suffix, aside + suffix)
            log.warning("state file %s is unreadable or not a nodemngr state file (%s); moved it aside "
                        "to %s and started empty", path, exc, aside)
            _create_regular_file(path)
            return self._open(path)

    def _open(self, path):
        before = os.lstat(path)
        # a daemon on its way out releases the file within about a second: wait that long for it
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=self.lock_wait)
        try:
            after = os.lstat(path)      # sqlite opens by name: the file it opened must be the one checked
            if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
                raise NodeMngrException("state file %s was replaced while it was being opened; refusing it" % path)
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            try:
                db.execute("BEGIN EXCLUSIVE")
                db.execute("COMMIT")
                db.execute("PRAGMA busy_timeout=0")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc):
                    raise NodeMngrException("state file %s is in use by another process (a node manager "
                                            "on another port?); give each daemon its own --state" % path)
                raise
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id == 0 and tables == 0:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(
                    "BEGIN; PRAGMA application_id=%d; PRAGMA user_version=%d;"
                    "CREATE TABLE ports(port INTEGER PRIMARY KEY, info TEXT NOT NULL, pid INTEGER NOT NULL,"
                    " start INTEGER NOT NULL, since REAL NOT NULL, uid INTEGER NOT NULL DEFAULT -1);%s %s COMMIT;"
                    % (_STORE_APP_ID, _STORE_SCHEMA, _CREATE_NAMES, _CREATE_BLOCKS))
            elif app_id != _STORE_APP_ID:
                raise _NotOurs("application id %#x, not nodemngr's" % app_id)
            else:
                self._migrate(db, path)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _NotOurs("integrity check: %s" % check)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            self._rows = self._read_rows(db)     # (unreadable rows: the whole file is suspect)
            return db
        except BaseException:
            db.close()
            raise

    @staticmethod
    def _migrate(db, path):
        """Bring a state file of an older schema to this one, in place, in one transaction (its
        registrations stay; a 1.0 file's names' memory starts empty, a 1.2 file's uids are -1, and
        the blocks' memory of a file without one starts empty)."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > _STORE_SCHEMA:
            raise NodeMngrException("state file %s was written by a later nodemngr (schema %d; this one knows %d at "
                                    "most); it was left as it is: run that version, or give --state another file"
                                    % (path, version, _STORE_SCHEMA))
        if version not in _MIGRATIONS and version != _STORE_SCHEMA:
            raise _NotOurs("schema version %d is not one this nodemngr knows (1 to %d)" % (version, _STORE_SCHEMA))
        if version < _STORE_SCHEMA:
            steps = "".join(_MIGRATIONS[v] for v in range(version, _STORE_SCHEMA))
            try:
                db.executescript("BEGIN; %s PRAGMA user_version=%d; COMMIT;" % (steps, _STORE_SCHEMA))
            except sqlite3.OperationalError as exc:     # (a full disk: the old file stays as it is)
                if db.in_transaction:
                    db.rollback()
                raise NodeMngrException("cannot migrate the state file %s from nodemngr %s (%s); it was left as "
                                        "it is" % (path, _RELEASE_OF_SCHEMA[version], exc))
            log.info("state file %s: migrated from the schema of nodemngr %s", path, _RELEASE_OF_SCHEMA[version])
        if [row[1] for row in db.execute("PRAGMA table_info(ports)")] != ["port", "info", "pid", "start", "since", "uid"]:
            raise _NotOurs("its ports table is not nodemngr's")
        kind = db.execute("SELECT type FROM sqlite_master WHERE name = 'names'").fetchone()
        if kind is None:    # (lost by hand: the registrations stay, the names' memory starts empty)
            db.executescript("BEGIN; %s COMMIT;" % _CREATE_NAMES)
            kind = ("table",)
        columns = [(row[1], row[2].upper()) for row in db.execute("PRAGMA table_info(names)")]
        if kind != ("table",) or columns != [("name", "TEXT"), ("port", "INTEGER")]:
            raise _NotOurs("its names table is not nodemngr's")
        bad = db.execute("SELECT count(*) FROM names WHERE typeof(name) != 'text' OR typeof(port) != 'integer' "
                         "OR port < 1 OR port > 65535 OR port IN (SELECT port FROM names GROUP BY port "
                         "HAVING count(*) > 1)").fetchone()[0]
        if bad:     # (edited by hand: the names' memory is a convenience, the registrations are not)
            db.execute("DELETE FROM names WHERE typeof(name) != 'text' OR typeof(port) != 'integer' OR port < 1 "
                       "OR port > 65535 OR port IN (SELECT port FROM names GROUP BY port HAVING count(*) > 1)")
            log.warning("state file %s: forgot %d remembered ports that were not valid", path, bad)
        kind = db.execute("SELECT type FROM sqlite_master WHERE name = 'blocks'").fetchone()
        if kind is None:    # (1.2's files, and those of 1.3's development before blocks)
            db.executescript("BEGIN; %s COMMIT;" % _CREATE_BLOCKS)
            kind = ("table",)
        columns = [(row[1], row[2].upper()) for row in db.execute("PRAGMA table_info(blocks)")]
        if kind != ("table",) or columns != [("name", "TEXT"), ("port", "INTEGER")]:
            raise _NotOurs("its blocks table is not nodemngr's")
        bad = db.execute("SELECT count(*) FROM (%s)" % _BAD_BLOCKS).fetchone()[0]
        if bad:
            db.execute("DELETE FROM blocks WHERE name IN (%s) OR name IS NULL OR port IS NULL" % _BAD_BLOCKS)
            log.warning("state file %s: forgot %d remembered blocks that were not valid", path, bad)


# ---------------------------------------------------------------------------------------------
# The service
# ---------------------------------------------------------------------------------------------
# NodeMngr: the wire methods as Python methods, owner reaping, names.  It knows nothing of HTTP,
# sockets or etcd: the Dispatcher calls it, and it tells whoever listens of its changes.

def _rpc(*signatures, name=None, admin=False, slow=False, handover=False):
    """Mark a method of NodeMngr as a wire method, with its XML-RPC signatures; the Dispatcher
    serves every method so marked.  name: the wire name (default: the method's).  admin: only
    callers on this host may call it (fault 4).  slow: it waits for another server (etcd), so
    the transport runs it in a thread, never inside system.multicall.  handover: it returns
    (result, [sockets]) and the sockets go to the caller with the reply (SCM_RIGHTS), which only
    the local socket can carry, one call per request.  A method that wants to know its caller
    (a Caller) declares a keyword-only parameter ``caller``."""
    def mark(func):
        code = func.__code__
        positional = code.co_argcount - 1   # (after self)
        keyword_only = code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]
        func.rpc_name = name or func.__name__
        func.rpc_signatures = [list(s) for s in signatures]
        func.rpc_arity = (positional - len(func.__defaults__ or ()), positional)
        func.rpc_caller = "caller" in keyword_only
        func.rpc_admin, func.rpc_slow, func.rpc_handover = admin, slow, handover
        return func
    return mark


Caller = namedtuple("Caller", "door address uid pid trusted token namespace")
Caller.__doc__ = """Who makes a call, as far as its door can tell: door ("tcp", "local" for the
local socket, "process" for a call made in this process); address (the peer's IP address over
TCP, else None); uid (the peer's: SO_PEERCRED on the local socket, the kernel's socket table over
loopback TCP; -1 when unknown, as for a remote peer); pid (the local socket's peer process, else
None); trusted (it needs no token: the local socket's peer is the daemon's own user or root);
token (this request presented the token); namespace (the local socket peer's PidNamespace, in
which the pids it names are read; None: the daemon's).  The Dispatcher makes one per connection,
and one with token true for a request that carries the token."""
_OWN_UID = os.getuid() if hasattr(os, "getuid") else -1
IN_PROCESS = Caller("process", None, _OWN_UID, None, True, False, None)


def privileged(caller):
    """Whether *caller* may act for other users: root, or a holder of the token."""
    return caller.uid == 0 or caller.token


def _socket_kind(kind, host):
    """(family, type) of a socket of *kind* ("tcp" or "udp") bound to *host*; BadArgumentError."""
    if kind not in ("tcp", "udp"):
        raise BadArgumentError('kind must be "tcp" or "udp", not %s' % describe(kind))
    try:
        version = ipaddress.ip_address(host).version if type(host) is str else None
    except ValueError:
        version = None
    if version is None:
        raise BadArgumentError("host must be an IP address of this host (127.0.0.1, 0.0.0.0, ::1, :: ...), "
                               "not %s" % describe(host))
    return (socket.AF_INET6 if version == 6 else socket.AF_INET), (
        socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)


def _bound_socket(family, type_, host, port):
    sock = socket.socket(family, type_)
    try:
        if type_ == socket.SOCK_STREAM:     # as servers do: a restart need not wait for TIME_WAIT
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if type_ == socket.SOCK_STREAM:
            sock.listen(128)
        return sock
    except BaseException:
        sock.close()
        raise


# What a socket of the node manager's own could not have for want of the host's resources, not
# because of the caller's arguments: a fault 3 would tell a client not to try again.
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _bind_failure(exc, kind, host, port, count):
    """The error for the socket of *port*, one of *count* asked for, that could not be made or
    bound (not EADDRINUSE); none of them is registered any more."""
    reason = exc.strerror or exc
    if exc.errno in _OUT_OF_RESOURCES:
        return NodeMngrException("the node manager cannot open %d %s socket%s now (%s); nothing was registered, try "
                                 "again later or ask for fewer" % (count, kind, "s" if count > 1 else "", reason))
    return BadArgumentError("cannot bind %s port %d on %s: %s" % (kind, port, host, reason))


def _block_shape(count, consecutive):
    """(count, consecutive) of a block, checked: BadArgumentError."""
    if type(count) is not int or not 1 <= count <= MAX_BLOCK:
        raise BadArgumentError("count must be an integer from 1 to %d, not %s" % (MAX_BLOCK, describe(count)))
    if consecutive is None or (type(consecutive) is int and consecutive in (0, 1)):   # (clients without booleans)
        consecutive = bool(consecutive)
    if type(consecutive) is not bool:
        raise BadArgumentError("consecutive must be a boolean, not %s" % describe(consecutive))
    return count, consecutive


def _span(ports):
    """Ports for a log line: 11801-11808 when consecutive, else 11801, 11803."""
    if len(ports) > 1 and ports[-1] - ports[0] == len(ports) - 1:
        return "%d-%d" % (ports[0], ports[-1])
    return ", ".join(map(str, ports))


def _listed(regs):
    return [{"port": r.port, "name": name_of(r.info) or "", "info": r.info, "pid": r.pid,
             "since": utc(r.since), "uid": r.uid} for r in regs]


class NodeMngr:
    """The node manager: a PortAllocator, its StateStore, owner reaping, and the wire methods.

    The wire methods keep the legacy camelCase names; their docstrings are what remote callers
    read through ``system.methodHelp``.  Every call is made from one thread (the server's loop),
    so nothing here takes a lock.

    Hooks, set by whoever runs it: on_terminate(reason) is called when terminate asks to stop;
    on_change(changes) is told of every change once it is saved, changes being a list of
    (port, Registration, or None when the port was freed); cluster answers locate and
    listCluster and the status' cluster (a ClusterView: locate(name), status()).
    """

    def __init__(self, first=firstPort, last=lastPort, store=None, host_check=port_is_bindable,
                 hostname=None, address=("", 0), reap_interval=REAP_INTERVAL, busy_retry=BUSY_RETRY):
        """address: the (host, port) it is served on, which status reports; reap_interval: the
        least time between two sweeps over the owners that failing calls make (the server paces
        its own)."""
        self.store = store if store is not None else StateStore(None)
        registrations, remembered, blocks = self.store.load()
        self.allocator = PortAllocator(first, last, registrations, remembered, busy_retry=busy_retry, blocks=blocks)
        try:
            self.store.remember(self.allocator.remember_held())
        except StoreError as exc:   # (the names are remembered here all the same, until a restart)
            log.warning("could not save the ports of the names found in the state file: %s", exc)
        self.host_check = host_check
        self.hostname = hostname or socket.gethostname()
        self.started = time.time()
        self.reaped = 0
        self._unchecked = []    # owners the current reap pass has yet to look at
        self._owners_seen = set()   # (pid, start, uid checked or None) found to be a fitting owner
        self._next_sweep = 0.0  # _take_after_reaping sweeps again from then
        self.address, self.reap_interval = address, reap_interval
        self.on_terminate = self.on_change = self.cluster = None
        self._group = None      # between begin_group() and end_group(): the changes made
        self._depth = 0         # groups begun and not ended (they nest)
        self.recent_reaps = collections.deque(maxlen=RECENT_REAPS)  # (Registration, when) of the last reaped
        self.reap_step(budget=None)     # owners that ended while no daemon ran

    # -- wire methods ------------------------------------------------------------------------

    @_rpc(["string"])
    def ping(self):
        """Return "NodeMngr at HOSTNAME is alive"; use it to see that the node manager runs."""
        return "NodeMngr at %s is alive" % self.hostname

    @_rpc(["int", "string"], ["int", "string", "int"])
    def newPort(self, info, pid=0, *, caller=IN_PROCESS):
        """Register and return a port (int) that nobody else on this host holds.

        info: any XML-RPC value saying what the port is for (at most 4 KiB marshalled, 16 levels
        deep); it is kept and returned by listPorts as given.  A string info is the port's name
        for lookup; so is the string member "name" of a struct info, and such an explicit name
        gets the same port back whenever it is free ({"name": "db", ...} is sticky across
        delPort, the owner's death and restarts).  pid: optional, the process that holds the
        port; when it is non-zero the port is freed automatically once that process has ended.
        A pid is read in the caller's pid namespace and must be a process of the caller's user
        (root, or a caller with the token, may name any), never init or a kernel thread.
        Returns the explicit name's last port if free, else the lowest free port of the range
        that no other explicit name had last (those are handed out only when nothing else is
        free).  Faults: 2 when no port is free, 3 for a bad info or a pid that does not fit.
        """
        return self._hold_port(*self._checked(info, pid, caller))

    @_rpc(["int", "string"], ["int", "string", "string"], ["int", "string", "string", "string"],
          ["int", "string", "string", "string", "int"], handover=True)
    def newSocket(self, info, kind="tcp", host="127.0.0.1", pid=None, *, caller=IN_PROCESS):
        """Register a port as newPort does, bind it inside the node manager, and pass the bound
        socket to the caller with the reply (SCM_RIGHTS ancillary data): no other process can
        take the port between its allocation and the bind.  Only on the node manager's local
        (Unix) socket, one call per request (not in system.multicall).

        info: as for newPort.  pid: the owner, whose end frees the port; by default the calling
        process (0: no owner).  kind: "tcp" (the socket is also listening) or "udp".  host: the IP
        address to bind, e.g. "127.0.0.1", "0.0.0.0", "::1" or "::".  Returns the port (int).
        Faults: as newPort; 3 over TCP, in a multicall, or for a bad kind or host.
        """
        family, type_ = _socket_kind(kind, host)
        checked = self._checked(info, caller.pid or 0, caller, named=False) if pid is None else (
            self._checked(info, pid, caller))
        for _ in range(8):
            port = self._hold_port(*checked)
            try:
                return port, [_bound_socket(family, type_, host, port)]
            except OSError as exc:
                self.delPort(port)
                if exc.errno != errno.EADDRINUSE:
                    raise _bind_failure(exc, kind, host, port, 1)
                self.allocator.set_aside(port)
                log.info("port %d was taken between its check and the bind; trying another", port)
        raise NodeMngrException("every port tried was taken between its check and the bind; try again")

    @_rpc(["int", "int"])
    def delPort(self, port, *, caller=IN_PROCESS):
        """Give back a port that newPort returned; returns 0.

        Fault 1 ("Node manager: Unknown port: N") if the port is not registered, 3 if port is
        not an integer from 1 to 65535, 4 if another user registered it (only that user, root,
        or a caller with the token may free it).
        """
        check_port(port)
        reg = self.allocator.held.get(port)
        if reg is None:
            raise UnknownPortError(port)
        self._may_free(reg, caller)
        self.store.remove([port])
        self.allocator.release(port)
        self._changed([(port, None)])
        log.debug("freed port %d (%s)", port, _loggable(reg.info))
        return 0

    @_rpc(["array", "string", "int"], ["array", "string", "int", "int"], ["array", "string", "int", "int", "boolean"])
    def newPorts(self, info, count, pid=0, consecutive=False, *, caller=IN_PROCESS):
        """Register a block of *count* ports (int, 1 to 64) that nobody else on this host holds, all
        to one owner and one info, in one transaction: all of them or none.  Returns their numbers,
        an array of ints in ascending order.

        info and pid: as for newPort (the pid owns every port of the block).  consecutive: optional
        boolean (0 or 1 accepted too), default false; when true the ports are first, first+1, ...,
        first+count-1, the lowest such run that is free (a port another program holds breaks a
        run).  Without it, the ports are those count newPort calls would give.  Every port passes
        newPort's check that nothing on the host has it bound.  An explicit name (the string
        member "name" of a struct info) remembers its block: asked again with the same name and
        count, it gets the same block back whenever all of it is free, across delPorts, the
        owner's death and restarts; other registrations take a remembered port only when nothing
        else is free, and the name then forgets the whole block.  Afterwards each port is an
        ordinary registration: delPort frees one, delPorts several, the owner's end all of them,
        and lookup lists each.  Faults: 2 when the range cannot give the block (the text says how
        many were asked, whether consecutive, and the longest run of free ports; or, when other
        programs hold a port in every run of the 1024 ports probed, that asking again looks
        further), 3 for a count outside 1-64, a consecutive that is not a boolean, or what
        newPort refuses.
        """
        count, consecutive = _block_shape(count, consecutive)
        return self._hold_ports(self._checked(info, pid, caller), count, consecutive)

    @_rpc(["int", "array"])
    def delPorts(self, ports, *, caller=IN_PROCESS):
        """Give back several ports (an array of ints) in one transaction: all of them, or none.
        Returns 0.  A port listed twice is freed once.

        Fault 1 ("Node manager: Unknown port: N") naming the first port of the array that is not
        registered, 3 when ports is not an array of integers from 1 to 65535, 4 when another user
        registered one of them (only that user, root, or a caller with the token may free it);
        after any fault every port is still registered.
        """
        if type(ports) is not list:
            raise BadArgumentError("ports must be an array of ports, not %s" % describe(ports))
        for port in ports:
            check_port(port)
        ports = list(dict.fromkeys(ports))
        held = self.allocator.held
        for port in ports:
            reg = held.get(port)
            if reg is None:
                raise UnknownPortError(port)
            self._may_free(reg, caller)
        self._free_ports(ports)
        return 0

    @_rpc(["array", "string", "int"], ["array", "string", "int", "boolean"], ["array", "string", "int", "boolean", "string"],
          ["array", "string", "int", "boolean", "string", "string"],
          ["array", "string", "int", "boolean", "string", "string", "int"], handover=True)
    def newSockets(self, info, count, consecutive=False, kind="tcp", host="127.0.0.1", pid=None, *, caller=IN_PROCESS):
        """Register a block of ports as newPorts does, bind each inside the node manager, and pass
        the bound sockets to the caller with the reply, all in one SCM_RIGHTS message, in the order
        of the ports: no other process can take a port between its allocation and the bind.  Only
        on the node manager's local (Unix) socket, one call per request (not in system.multicall),
        one handover in flight per connection.

        info, count, consecutive: as for newPorts.  kind: "tcp" (every socket is also listening) or
        "udp".  host: the IP address to bind, e.g. "127.0.0.1", "0.0.0.0", "::1" or "::".  pid: the
        owner, whose end frees the ports; by default the calling process (0: no owner).  Returns
        the ports (array of ints, ascending).  Faults: as newPorts; 3 over TCP, in a multicall,
        for a bad kind or host, or while the previous handover on the connection is not taken.
        """
        count, consecutive = _block_shape(count, consecutive)
        family, type_ = _socket_kind(kind, host)
        checked = self._checked(info, caller.pid or 0, caller, named=False) if pid is None else (
            self._checked(info, pid, caller))
        for _ in range(8):
            ports = self._hold_ports(checked, count, consecutive)
            socks = []
            try:
                for port in ports:
                    socks.append(_bound_socket(family, type_, host, port))
                return ports, socks
            except OSError as exc:
                for sock in socks:
                    sock.close()
                self._free_ports(ports)
                port = ports[len(socks)]
                if exc.errno != errno.EADDRINUSE:
                    raise _bind_failure(exc, kind, host, port, count)
                self.allocator.set_aside(port)
                log.info("port %d was taken between its check and the bind; trying another block", port)
        raise NodeMngrException("every block tried had a port taken between its check and the bind; try again")

    @_rpc(["array"])
    def listPorts(self):
        """Return every registered port as an array of structs, sorted by port:
        {port: int, name: string ("" when none), info: as given to newPort, pid: int (0 = none),
        since: dateTime.iso8601 UTC, uid: int (the user who registered it; -1 when unknown)}.
        """
        return _listed(sorted(self.allocator.held.values()))

    @_rpc(["array", "string"])
    def lookup(self, name):
        """Return the registered ports named *name* (string), as listPorts does: an array of
        structs {port, name, info, pid, since}, sorted by port; an empty array when there are
        none.  A port's name is its info when newPort was given a string, or the string member
        "name" of a struct info.  Fault 3 when name is not a string.
        """
        if type(name) is not str:
            raise BadArgumentError("name must be a string, not %s" % describe(name))
        return _listed(self.allocator.lookup(name))

    @_rpc(["int", "string"], ["int", "string", "string"])
    def namedPort(self, name, info="", *, caller=IN_PROCESS):
        """Return the port registered under the explicit name *name* (string): the lowest if
        several hold it, whoever registered them; when none does, register one as newPort does
        for the info {name: name, info: info}, with no owner process (held until delPort), and
        return it.  The same port every time, as long as it is held; sticky, as every explicit
        name, after a delPort.  Faults: 2 when no port is free, 3 for a name that is not a
        non-empty string or an info that newPort would refuse.
        """
        if type(name) is not str or not name:
            raise BadArgumentError("name must be a non-empty string, not %s" % describe(name))
        for reg in self.allocator.lookup(name):
            if explicit_name(reg.info) == name:
                return reg.port
        return self._hold_port(*self._checked({"name": name, "info": info}, 0, caller))

    @_rpc(["struct"])
    def status(self):
        """Return a struct describing the node manager: version, pid, host, port, firstPort,
        lastPort, registered, free, reaped (ports of dead owners freed since start),
        uptime (seconds, double), state (the state file's path, or "" when none), cluster
        ("" when no cluster view is configured, "ok", or a sentence saying what is wrong and since
        when) and clusterSkipped (keys under the cluster's prefix skipped as not nodemngr's).
        """
        a = self.allocator
        return {"version": __version__, "pid": os.getpid(), "host": self.address[0],
                "port": self.address[1], "firstPort": a.first, "lastPort": a.last, "registered": len(a),
                "free": a.free_count, "reaped": self.reaped, "uptime": time.time() - self.started,
                "state": self.store.path or "", "cluster": self.cluster.status() if self.cluster else "",
                "clusterSkipped": sum(list(self.cluster.skipped.values())) if self.cluster else 0}

    @_rpc(["array", "string"], slow=True)
    def locate(self, name):
        """Return the registrations named *name* (string) on every host of the cluster, as
        published in etcd and mirrored here: an array of structs {host, port, name, info, pid,
        since, stale, seen}, sorted by host then port (info as JSON carries it: dateTime as text,
        base64 as {base64: text}).  stale (boolean): etcd has not confirmed the mirror within the
        lease's TTL, or this host's own publishing is failing; seen: seconds since etcd last
        confirmed it.  Answered from the mirror, never waiting for etcd.  Fault 5 when no cluster
        view is configured, the mirror was never read, or it is stale and nothing matches; 3 when
        name is not a string.
        """
        if type(name) is not str:
            raise BadArgumentError("name must be a string, not %s" % describe(name))
        return self._cluster().locate(name)

    @_rpc(["array"], slow=True)
    def listCluster(self):
        """Return every registration of every host of the cluster, as locate does for one name
        (stale and seen included).  Fault 5 when no cluster view is configured, the mirror was
        never read, or it is stale and empty."""
        return self._cluster().locate()

    @_rpc(["boolean"], admin=True)
    def terminate(self):
        """Stop the node manager: it answers true, finishes the requests in flight, saves its
        state and exits.  Only callers on this host may do this (fault 4 otherwise).
        """
        if self.on_terminate is not None:
            self.on_terminate("terminate called")
        return True

    # -- what the dispatcher and the server ask ------------------------------------------------

    def begin_group(self):
        """Save the changes of the calls made from now on together, at end_group(): one
        transaction for the calls of a system.multicall, or of a turn of the server's loop, each
        acknowledged only after it.  Groups nest: the outermost end_group() saves."""
        self._depth += 1
        if self._group is None:
            self.store.begin()
            self._group = []

    def end_group(self):
        """Save the changes made since begin_group() in one transaction, then tell on_change.  If
        that fails, every one of them is undone (the registry is read back from the state file,
        which the failed transaction left as it was) and StoreError says so."""
        self._depth -= 1
        if self._depth:
            return
        changes, self._group = self._group, None
        try:
            self.store.commit()
        except StoreError as exc:
            self._read_back()
            raise StoreError("%s; none of the %d changes of these calls was made" % (exc, len(changes)))
        self._changed(changes)

    def unsaved(self):
        """Whether the open group holds changes not saved yet."""
        return bool(self._group)

    def holdings(self, ports):
        """The Registrations of registered *ports* now, for a later give_back()."""
        held = self.allocator.held
        return tuple(held[port] for port in ports if port in held)

    def give_back(self, regs):
        """Free the ports of Registrations *regs* (from holdings()) that are still registered as
        they were: ports handed out with sockets that could not be passed after all.  A reply
        waits for its turn's commit while other callers are served, so a port of it may have been
        freed and registered again meanwhile: that registration is not this one to give back."""
        held = self.allocator.held
        self._free_ports(list({reg.port: reg for reg in regs if held.get(reg.port) is reg}))

    @property
    def changes(self):
        """A count of the changes to the registry: a listing made at the same count is current."""
        return self.allocator.changes

    @property
    def registered(self):
        return len(self.allocator)

    def count_named(self, name):
        """How many registrations are named *name* now."""
        return len(self.allocator.names.get(name, ()))

    def names_remembered(self):
        return len(self.allocator.remembered)

    def named(self, name):
        """The Registrations named *name*, by port."""
        return self.allocator.lookup(name)

    def remembered(self):
        """{explicit name: the port it had last}, a copy."""
        return dict(self.allocator.remembered)

    def registrations(self, ordered=False):
        """The Registrations held now (a snapshot: a list of immutable tuples), by port if
        *ordered*."""
        held = self.allocator.held
        return [held[port] for port in sorted(held)] if ordered else list(held.values())

    def summary(self):
        """The range and how many are registered, for a service manager's status line."""
        a = self.allocator
        return "ports %d-%d, %d registered" % (a.first, a.last, len(a))

    def reap_step(self, budget=0.002):
        """Look at the next owners for about *budget* seconds (None: all of them) and free the
        ports of those that have ended; return (pass complete, ports freed).  The server calls
        it until the pass is complete, one slice per turn of its loop, so that thousands of
        owners never hold up the callers."""
        if not self._unchecked:
            self._unchecked = list(self.allocator.owners)
        deadline = None if budget is None else time.monotonic() + budget
        dead = []
        while self._unchecked:
            key = self._unchecked.pop()
            if key in self.allocator.owners and not owner_alive(*key):
                dead.append(key)
            if deadline is not None and len(self._unchecked) % 16 == 0 and time.monotonic() >= deadline:
                break
        return not self._unchecked, self._reap(dead)

    def probe_busy_step(self):
        """Probe a few of the ports set aside as busy that are due again; True while more are."""
        try:
            return self.allocator.probe_busy(self.host_check)
        except OSError:     # no descriptor for a probe now: the ports stay set aside
            return False

    def close(self):
        self.store.close()

    # -- internals -----------------------------------------------------------------------------

    def _cluster(self):
        if self.cluster is None:
            raise ClusterError("no cluster view is configured on this node manager (serve --cluster URL)")
        return self.cluster

    def _changed(self, changes):
        if self._group is not None:     # (told once the group is saved)
            self._group.extend(changes)
        elif self.on_change is not None and changes:
            self.on_change(changes)

    def _read_back(self):
        """The registry as the state file has it: after a group of changes could not be saved."""
        try:
            self.allocator.restore(*self.store.load())      # (registrations, names' ports, names' blocks)
        except sqlite3.Error as exc:
            log.error("could not read the state back after a failed save (%s); the registry in memory "
                      "keeps the changes that were not saved until a restart", exc)

    def _checked(self, info, pid, caller=IN_PROCESS, named=True):
        """(info, blob, pid, start, uid) for _hold_port, from a caller's info and pid.  named: the
        caller named *pid*, which is then read in its pid namespace (translated for a client of
        the local socket in a container) and must pass _owner_start's rules; else it is the
        caller's own pid as this daemon sees it."""
        if info is None:
            info = ""           # a top-level nil means "no info": replies never carry nil
        blob = marshal_info(info)
        if pid is None:
            pid = 0
        if type(pid) is not int or not 0 <= pid <= _INT32_MAX:
            raise BadArgumentError("pid must be an integer from 0 to %d, not %s" % (_INT32_MAX, describe(pid)))
        sent = pid
        if pid and named and caller.namespace is not None:
            pid = pid_of_local_peer(pid, caller.pid, caller.namespace, None if privileged(caller) else caller.uid)
            if pid is None:
                raise BadArgumentError("pid %d is not a process of your pid namespace that this node manager can "
                                       "see; give your own pid, or 0" % sent)
        return info, blob, pid, self._owner_start(pid, sent, caller, named) if pid else 0, caller.uid

    def _owner_start(self, pid, sent, caller, named):
        """The start time to record for owner *pid* (*sent*, as the caller named it);
        BadArgumentError unless it is a live process, not a thread of one, a process of the
        caller's own user (unless the caller is root or holds the token; where /proc hides whose
        it is, hidepid=, a live one is taken, as in 1.1) and, when the caller named it, neither
        init nor a kernel thread (which never end)."""
        try:
            start = process_start_time(pid)
        except OSError as exc:
            raise NodeMngrException("cannot check pid %d now (%s); nothing was registered, try again"
                                    % (sent, exc.strerror or exc))
        if start is None:
            raise BadArgumentError("pid %d is not a live process on this host" % sent)
        key = (pid, start, None if privileged(caller) else caller.uid)     # (named or not: a pid reused)
        if key in self._owners_seen:        # a client calls again and again with its own pid
            return start
        if is_thread_of_another(pid):
            raise BadArgumentError("pid %d is a thread, not a process; give the process id (getpid)" % sent)
        if named and (pid == 1 or is_kernel_thread(pid)):
            raise BadArgumentError("pid %d is %s, which never ends; give the pid of the process that holds the "
                                   "port, or 0" % (sent, "init" if pid == 1 else "a kernel thread"))
        uids = process_uids(pid) if key[2] is not None else None
        if uids is not None and caller.uid not in uids:
            if caller.uid < 0:
                raise BadArgumentError("this node manager cannot tell which user you are, so you may name no "
                                       "process but 0 (or present the token)")
            raise BadArgumentError("pid %d is not a process of yours (uid %d); only root, or a caller with the "
                                   "token, may name another user's process" % (sent, caller.uid))
        if len(self._owners_seen) >= 1024:
            self._owners_seen.clear()
        self._owners_seen.add(key)
        return start

    def _hold_port(self, info, blob, pid, start, uid):
        name = explicit_name(info)
        if name is not None:
            self._reap_holder_of(name)
        try:
            port = self.allocator.take(self.host_check, name)
            if port is None:
                port = self._take_after_reaping(lambda: self.allocator.take(self.host_check, name), self._no_port)
        except OSError as exc:
            raise NodeMngrException("cannot check which ports are free now (%s); nothing was "
                                    "registered, try again" % (exc.strerror or exc))
        reg = Registration(port, info, pid, start, time.time(), blob, uid)
        memory = self.allocator.memory_change(port, info)
        try:
            self.store.add(reg, memory)
        except StoreError:
            self.allocator.untake(port)
            raise
        self.allocator.hold(reg, memory)
        self._changed([(port, reg)])
        log.debug("gave port %d to pid %d (%s)", port, pid, _loggable(info))
        return port

    def _hold_ports(self, checked, count, consecutive):
        """Register a block (newPorts): its ports, saved in one transaction, told once."""
        info, blob, pid, start, uid = checked
        a = self.allocator
        name = explicit_name(info)
        if name is not None:
            self._reap_holders(a.blocks.get(name, ()))

        def take():
            return a.take_block(self.host_check, count, consecutive, name)
        refusal = functools.partial(self._no_block, count, consecutive)
        try:
            ports = take()
            if ports is None:
                if a.gave_up:   # (another try now would probe as much again: the caller asks again)
                    raise refusal()
                ports = self._take_after_reaping(take, refusal)
        except OSError as exc:
            raise NodeMngrException("cannot check which ports are free now (%s); nothing was "
                                    "registered, try again" % (exc.strerror or exc))
        since = time.time()
        regs = [Registration(port, info, pid, start, since, blob, uid) for port in ports]
        memory = a.block_memory_change(ports, info)
        try:
            self.store.add_block(regs, memory)
        except StoreError:
            for port in ports:
                a.untake(port)
            raise
        a.hold_block(regs, memory)
        self._changed([(reg.port, reg) for reg in regs])
        log.debug("gave ports %s to pid %d (%s)", _span(ports), pid, _loggable(info))
        return ports

    def _may_free(self, reg, caller):
        if reg.uid not in (-1, caller.uid) and not privileged(caller):
            raise ForbiddenError("port %d was registered by uid %d; only that user, root, or a caller with the token "
                                 "may free it" % (reg.port, reg.uid))

    def _free_ports(self, ports):
        """Free registered *ports* in one transaction, told once."""
        if not ports:
            return
        self.store.remove(ports)
        for port in ports:
            self.allocator.release(port)
        self._changed([(port, None) for port in ports])
        log.debug("freed ports %s", _span(ports))

    def _reap_holders(self, ports):
        """Free now the ports of those of *ports* whose owners have ended (a name's block: see
        _reap_holder_of)."""
        held = self.allocator.held
        owners = {(reg.pid, reg.start) for reg in map(held.get, ports) if reg is not None and reg.pid}
        dead = [key for key in owners if not owner_alive(*key)]
        if dead:
            self._reap(dead)

    def _reap_holder_of(self, name):
        """If the port explicit name *name* remembers is held by an owner that has ended, free it
        now rather than at the next owner check: `nodemngr run --name web` run again at once
        gets its port back."""
        held = self.allocator.held.get(self.allocator.remembered.get(name))
        if held is not None and held.pid and not owner_alive(held.pid, held.start):
            self._reap([(held.pid, held.start)])

    def _take_after_reaping(self, take, refusal):
        """Called when take() found nothing: reap the ended owners, and probe again the ports set
        aside as busy (another program may have let one go), before raising refusal(): what
        take() gives then, else the exception that says why not.
        Failing calls advance the pass over the owners that the server makes every reap
        interval, a slice each, and start no new pass sooner: a stream of them must not read /proc
        for every owner again and again.  The probes come out of the allocator's budget
        (busy_probe_rate a second, a few at a time): a thousand ports held by other programs
        must not be probed on every failing call."""
        now = time.monotonic()
        if now >= self._next_sweep:
            done, reaped = self.reap_step(0.002)
            if done:
                self._next_sweep = now + self.reap_interval
                log.debug("no port free: swept the owners")
            taken = take() if reaped else None
            if taken is not None:
                return taken
        if self.allocator.probe_busy_early(self.host_check):
            taken = take()
            if taken is not None:
                return taken
        raise refusal()

    def _no_port(self):
        a = self.allocator
        return NoFreePortError("no free port in %d-%d: %d registered, %d held by other programs"
                               % (a.first, a.last, a.in_range, a.last - a.first + 1 - a.in_range))

    def _no_block(self, count, consecutive):
        a = self.allocator
        if a.gave_up:
            return NoFreePortError("no block of %d consecutive ports found in %d-%d within %d probes: other programs "
                                   "hold a port in each run tried (%d set aside for now); ask again to look further"
                                   % (count, a.first, a.last, a.block_probes, a.set_aside_count))
        run, at, free = a.longest_free_run()
        return NoFreePortError("no block of %d%s %s free in %d-%d: the longest run of free ports is %s, and %d "
                               "%s free in all; %d registered, %d held by other programs" % (
                                   count, " consecutive" if consecutive else "", "port" if count == 1 else "ports",
                                   a.first, a.last,
                                   "%d (%d-%d)" % (run, at, at + run - 1) if run else "0", free,
                                   "is" if free == 1 else "are", a.in_range, a.last - a.first + 1 - a.in_range - free))

    def _reap(self, dead):
        ports = [p for key in dead for p in sorted(self.allocator.owners.get(key, ()))]
        if not ports:
            return 0
        try:
            self.store.remove(ports)
        except StoreError as exc:
            log.warning("could not free the ports of ended owners yet: %s", exc)
            return 0
        now = time.time()
        for port in ports:
            reg = self.allocator.release(port)
            self.recent_reaps.append((reg, now))
            log.info("reaped port %d: owner pid %d has ended (%s)", port, reg.pid, _loggable(reg.info))
        self.reaped += len(ports)
        self._changed([(port, None) for port in ports])
        return len(ports)


# ---------------------------------------------------------------------------------------------
# The dispatcher
# ---------------------------------------------------------------------------------------------
# Every door's calls, checked, counted and logged the same way; it knows no socket and no framing.

_LARGE_REPLIES = ("listPorts", "lookup", "system.multicall", "listCluster")  # the calls whose reply can be megabytes
_LARGE_PAGES = (b"/", b"/status.json")     # the pages whose reply can be megabytes (Dispatcher.page)


class Busy(Exception):
    """A call whose reply can be megabytes, while replies already wait beyond the server's bound:
    the door answers that it is busy (HTTP 503) without running it."""


class Deferred:
    """A call that waits for another server (etcd): the transport run()s it in a thread (which
    also marshals the reply, off the loop), then gives it to Dispatcher.finish on the loop."""

    __slots__ = ("method", "function", "reply", "fault", "abandoned")

    def __init__(self, method, function):
        self.method, self.function, self.reply, self.fault = method, function, None, None
        self.abandoned = False      # answered without its result (the stop came first)

    def run(self):
        try:
            response = (self.function(),)
            if type(response[0]) is Marshalled:
                self.reply, self.fault = response[0].reply, None
                return
        except NodeMngrException as exc:
            response = Fault(exc.faultCode, str(exc))
        except Exception as exc:
            log.exception("internal error in %s", self.method)
            response = Fault(INTERNAL_ERROR, "internal error in %s (%s); the node manager's log has the details"
                             % (self.method, type(exc).__name__))
        self.reply, self.fault = marshal_reply(response, self.method)


class Sliced:
    """A reply made a slice at a time on the loop, so that nobody waits behind it: *steps* is a
    generator that does a few milliseconds of work per next() and returns the reply (bytes, or a
    list of its parts).  The transport runs one step per turn of the loop (NodeMngrServer.
    run_sliced), then gives it to Dispatcher.finish like a Deferred."""

    __slots__ = ("_steps", "method", "reply", "fault", "_begun")
    budget = 0.004      # seconds of work a step may take before it gives the loop back

    def __init__(self, steps, method):
        self._steps, self.method, self.reply, self.fault, self._begun = steps, method, None, None, False

    def start(self):
        """The first slice, made for the first who asks; True once the reply is made.  Those who
        ask for the same reply later make no slice here: a hundred asking in one turn of the loop
        would otherwise make a hundred slices in it (the loop makes the rest, a slice a turn)."""
        if self._begun:
            return self._steps is None
        self._begun = True
        return self.step()

    def step(self):
        """One slice of the work; True once the reply is made (several connections waiting for
        the same reply may each step it)."""
        if self._steps is None:
            return True
        try:
            next(self._steps)
        except StopIteration as done:
            self._steps, self.reply = None, done.value
            return True
        except Exception as exc:    # (a bug: one sentence for the caller, the traceback in the log)
            log.exception("internal error in %s", self.method)
            self._steps = None
            self.reply, self.fault = marshal_reply(Fault(INTERNAL_ERROR, "internal error in %s (%s); the node "
                                                         "manager's log has the details" % (self.method, type(exc).__name__)),
                                                   self.method)
            return True
        return False

    def finish(self):
        """The reply, made now in one go (at the stop)."""
        while not self.step():
            pass
        return self.reply


Handover = namedtuple("Handover", "reply ports sockets regs", defaults=((),))
Handover.__doc__ = """The reply (bytes) of a call whose result comes with sockets to pass to the
caller (SCM_RIGHTS), the ports they are bound to, the sockets, and the Registrations the call
made (what is given back).  If they cannot be passed, the door asks Dispatcher.handover_failed
for the reply to send instead."""


class Dispatcher:
    """The method table of a NodeMngr (its @_rpc methods, and system.listMethods, methodHelp,
    methodSignature and multicall), the rights of each caller, the reply caches, and the counters
    behind /metrics.  It knows nothing of sockets or HTTP: every door turns what it read into
    one of these calls, and what they return into bytes on its connection.

    - caller(door, address, uid, pid): the Caller of a new connection.
    - authorize(caller, authorization): the Caller a request is made as (holding the token or
      not), or None when it may not be served (the token rule).
    - dispatch(caller, body, short_of_memory): the reply to an XML-RPC body: bytes, a Deferred
      (run it in a thread, then finish() it, or abandon() it at the stop), or a Handover (bytes
      and sockets to pass); Busy.
    - call(caller, method, params): one call in this thread (in-process callers, tests).
    - portserver(caller, text): the port for a portserver request, or None (refused).
    - begin_group(), end_group(): the calls dispatched between them are saved in one transaction;
      while unsaved() says there are changes, replies wait for end_group() (its reply instead if
      it failed).
    - handover_failed(handover, reason): the reply to send when the sockets could not go.
    - metrics(): the text of GET /metrics; add_gauge() adds a gauge the server keeps.
    - page(path): the bytes of a GET page (/metrics, and those add_page() adds), or None.

    It is used from one thread (the server's loop), like the service behind it.
    """

    max_slow_calls = 8      # calls waiting for etcd at once (locate); beyond, fault 5 at once
    max_large_slow_calls = 2    # of them, listings of the cluster being made at once; beyond, Busy

    def __init__(self, service, token=None):
        """service: a NodeMngr; token: the token (bytes) callers must present, or None."""
        self.service, self.token = service, token
        self.funcs = {}         # wire name -> callable
        for target in (service, self):
            for attr in dir(type(target)):
                if hasattr(getattr(type(target), attr), "rpc_signatures"):
                    method = getattr(target, attr)
                    self.funcs[method.rpc_name] = method
        self.requests = collections.Counter()   # calls by method ("unknown": not offered; "portserver")
        self.faults = collections.Counter()     # faults answered, by code
        self.slow_calls = 0     # Deferred handed out and not finished yet
        self.large_slow_calls = 0   # of them, those whose reply can be megabytes (_LARGE_REPLIES)
        self._families = []     # functions giving the families that others keep, for /metrics
        self._pages = {b"/metrics": lambda: self.metrics().encode("utf-8")}     # path -> its bytes, made now
        self._listed = (None, None)     # (service.changes, listPorts reply)
        self._lookups = (None, None)    # (service.changes, {name: lookup reply})
        self._entries = {}      # port -> (Registration, its listPorts entry marshalled), while it is held
        self._uid = os.getuid() if hasattr(os, "getuid") else None

    # -- who calls -------------------------------------------------------------------------------

    def caller(self, door, address=None, uid=-1, pid=None, namespace=None):
        """The Caller of a connection made through *door*: trusted (no token needed) when it is
        the local socket and the kernel says the peer is the daemon's own user or root."""
        uid = -1 if uid is None else uid
        return Caller(door, address, uid, pid, door == "local" and uid in (0, self._uid), False, namespace)

    def authorize(self, caller, authorization):
        """The Caller to make a request of *caller* as, given the Authorization header it carries
        (bytes, or None): itself, or itself holding the token when the header is HTTP Basic auth
        whose password is the token (compared in constant time); None when it may not be served
        (a token is set, the caller is not trusted, and it did not present the token)."""
        if self.token is None or (authorization is None and caller.trusted):
            return caller
        given = b""
        if authorization and authorization[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(authorization[6:].strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                given = b""
        import hmac
        if hmac.compare_digest(given, self.token):
            return caller._replace(token=True)
        return caller if caller.trusted else None

    # -- calls -----------------------------------------------------------------------------------

    def dispatch(self, caller, body, short_of_memory=False):
        """The reply to one XML-RPC request *body* from *caller*: bytes, a Deferred or a Handover.
        short_of_memory: replies already wait beyond the server's bound, so a call whose reply can
        be megabytes raises Busy before it runs; small ones are served."""
        method = "a call that could not be read"
        try:
            params, method = parse_call(body)
            if short_of_memory and method in _LARGE_REPLIES:
                raise Busy("too many replies wait for slow clients to take them; try again shortly")
            if method == "listPorts" and not params:
                self.requests["listPorts"] += 1
                return self._listing_reply(caller)
            if method == "lookup" and len(params) == 1 and type(params[0]) is str:
                self.requests["lookup"] += 1
                return self._lookup_reply(caller, params[0])
            if method == "system.multicall" and len(params) == 1 and type(params[0]) is list:
                return self._multicall_reply(caller, params[0])
            func = self._checked(caller, method, params)
            if func.rpc_slow and self.service.cluster is not None:     # (without one: fault 5 at once)
                return self._deferred(method, func, params)
            if func.rpc_handover and caller.door != "local":
                raise self._alone(method)
            result = self._invoke(caller, method, func, params)
            if func.rpc_handover:
                result, sockets = result
                ports = result if type(result) is list else [result]
                return Handover(self._reply((result,), method), ports, sockets, self.service.holdings(ports))
            if type(result) is int and _INT32_MIN <= result <= _INT32_MAX:
                return (_INT_REPLY % result).encode("ascii")
            if type(result) is str and result.isascii():     # (ping's): as dumps writes it, 2 us sooner
                return _str_reply(result)
            if type(result) is Marshalled:
                return result.reply
            response = (result,)
        except Fault as fault:
            response = fault
        return self._reply(response, method)

    def call(self, caller, method, params=()):
        """Run wire *method* with *params* for *caller* in this thread, checked and counted as
        any door's call (a slow one waits here): its result ((result, sockets) for a method that
        hands sockets over), or a Fault, counted."""
        try:
            func = self._checked(caller, method, params)
            return self._invoke(caller, method, func, params)
        except Fault as fault:
            self.faults[fault.faultCode] += 1
            raise

    def begin_group(self):
        """Save the changes of the calls dispatched from now on in one transaction, at end_group()."""
        self.service.begin_group()

    def unsaved(self):
        """Whether the open group holds changes: then a reply given meanwhile waits for end_group()."""
        return self.service.unsaved()

    def end_group(self):
        """Save the group's changes: None when saved, else the reply every call of the group gets
        instead of its own (fault -32603: none of them was made; count it with group_failed())."""
        try:
            self.service.end_group()
        except StoreError as exc:
            return marshal_reply(Fault(exc.faultCode, str(exc)), "a group of calls")[0]
        return None

    def group_failed(self, reply):
        """Count one call answered with end_group()'s *reply*; return it."""
        self.faults[INTERNAL_ERROR] += 1
        return reply

    def finish(self, deferred):
        """The reply of a Deferred that has run (its fault, if any, is counted here), or of a
        Sliced that is made; None if it was abandoned meanwhile."""
        if type(deferred) is Sliced:
            return self._made(deferred)
        if deferred.abandoned:
            return None
        self._slow_call_done(deferred)
        if deferred.reply is None:      # (it never ran: its thread could not be had)
            failed = Fault(INTERNAL_ERROR, "internal error: %s did not run; see the node manager's log" % deferred.method)
            deferred.reply, deferred.fault = marshal_reply(failed, deferred.method)
        if deferred.fault is not None:
            self.faults[deferred.fault] += 1
        return deferred.reply

    def abandon(self, deferred):
        """The reply to a Deferred the stop will not wait for: fault 5, counted; whatever its thread
        does later is dropped (finish() then returns None).  A Sliced is made at once instead."""
        if type(deferred) is Sliced:
            deferred.finish()
            return self._made(deferred)
        deferred.abandoned = True
        self._slow_call_done(deferred)
        return self._reply(Fault(CLUSTER_UNAVAILABLE, "the node manager is stopping; %s's answer from etcd was "
                                 "not waited for" % deferred.method), deferred.method)

    def portserver(self, caller, line):
        """portpicker's portserver protocol: *line*, a request's bytes without the newline (a pid
        in decimal), or None for a request that broke the protocol's framing, gets a port
        registered to that pid, or None for a refusal, which that protocol says by closing
        without a reply.  Counted as "portserver", and each refusal as a fault."""
        self.requests["portserver"] += 1
        try:
            if self.token is not None and not caller.trusted:
                raise Fault(FORBIDDEN, "a token is set, and the client is not of the node manager's user")
            if line is None or not line.isdigit() or int(line) < 1:
                raise Fault(BAD_ARGUMENT, "not a pid, in decimal, on a line of at most 20 bytes")
            return self._invoke(caller, "portserver", self.service.newPort, ("portserver", int(line)))
        except Fault as fault:
            self.faults[fault.faultCode] += 1
            log.debug("portserver request %s refused: %s", _loggable(line), fault.faultString)
            return None

    def handover_failed(self, handover, reason):
        """The reply to send instead of *handover*'s when its sockets could not be passed
        (*reason*: an OSError, or None when the caller has not taken the previous socket yet):
        its ports are given back, whoever registered them, and the fault is counted."""
        try:
            self.service.give_back(handover.regs)
        except NodeMngrException as exc:    # (a save that failed: the owner's end frees them)
            log.warning("could not give back ports %s: %s", _span(handover.ports), exc)
        several = len(handover.ports) > 1
        ports = "%s %s" % ("ports" if several else "port", _span(handover.ports))
        if reason is None:
            fault = Fault(BAD_ARGUMENT, "one socket at a time on a connection: read the reply that carries the "
                          "previous one before asking for the next (%s %s given back)"
                          % (ports, "were" if several else "was"))
        else:
            fault = Fault(INTERNAL_ERROR, "the node manager could not pass the %s of %s now (%s); %s given back, try "
                          "again" % ("sockets" if several else "socket", ports,
                                     getattr(reason, "strerror", None) or reason, "they were" if several else "the port was"))
        return self._reply(fault, "the socket handover")

    # -- system methods --------------------------------------------------------------------------

    @_rpc(["array"], name="system.listMethods")
    def system_listMethods(self):
        """Return the names of the methods this node manager offers."""
        return sorted(self.funcs)

    @_rpc(["string", "string"], name="system.methodHelp")
    def system_methodHelp(self, name):
        """Return the help text of method *name*, for callers in any language."""
        import inspect
        return inspect.getdoc(self._method(name)) or ""

    @_rpc(["array", "string"], name="system.methodSignature")
    def system_methodSignature(self, name):
        """Return the signatures of method *name*: an array of arrays, the return type first."""
        return self._method(name).rpc_signatures

    @_rpc(["array", "array"], name="system.multicall")
    def system_multicall(self, calls, *, caller=IN_PROCESS):
        """Run several calls in one request.  calls: an array of structs {methodName, params};
        returns an array whose items are [result] or a fault struct {faultCode, faultString}.
        listPorts may appear once; lookups may list as many entries together as are registered.
        The changes of all the calls are saved in one transaction before the reply: if that fails,
        none of them is made and the whole request gets fault -32603.
        """
        if not isinstance(calls, list):
            raise BadArgumentError("system.multicall takes an array of {methodName, params} structs")
        self.service.begin_group()
        try:
            return self._multicall(caller, calls)
        finally:
            self.service.end_group()

    def _multicall_reply(self, caller, calls):
        """system.multicall's reply over the wire: its calls made now, in order, in one group; a
        listing among them (listPorts, lookup) is the registrations of its moment, marshalled as
        listPorts' own is (kept entries, a slice at a time): 25,000 entries made in one go would
        hold up every other caller for a second."""
        try:
            self._checked(caller, "system.multicall", (calls,))
            self.service.begin_group()
            try:
                results = self._multicall(caller, calls, snapshots=True)
            finally:
                self.service.end_group()
        except NodeMngrException as exc:
            raise Fault(exc.faultCode, str(exc))
        if not any(type(r) is list and type(r[0]) is _Snapshot for r in results):
            return self._reply((results,), "system.multicall")
        reply = Sliced(self._multicall_steps(results), "system.multicall")
        return self._made(reply) if reply.step() else reply

    def _multicall_steps(self, results):
        pieces = [_LIST_HEAD]
        for result in results:
            if type(result) is list and type(result[0]) is _Snapshot:
                pieces.append(_NESTED_HEAD)     # ([listing]: an array in an array)
                yield from self._entry_pieces(result[0], pieces, result[0].whole)
                pieces.append(_NESTED_FOOT)
            else:
                pieces.append(_list_item(result))
        pieces.append(_LIST_FOOT)
        return pieces

    def _multicall(self, caller, calls, snapshots=False):
        """The results of *calls*; with *snapshots*, a listing's is a _Snapshot to marshal later."""
        results = []
        listings = looked = 0
        for call in calls:
            try:
                if (not isinstance(call, dict) or not isinstance(call.get("methodName"), str)
                        or not isinstance(call.get("params", []), list)):
                    raise Fault(INVALID_REQUEST, "each call must be a struct {methodName: string, params: array}")
                method, params = call["methodName"], call.get("params", [])
                if method == "system.multicall":
                    raise Fault(INVALID_REQUEST, "system.multicall cannot be nested")
                if method == "listPorts":   # each is the whole registry: bound the reply
                    listings += 1
                    if listings > 1:
                        raise Fault(BAD_ARGUMENT, "listPorts may appear once in a system.multicall")
                elif method == "lookup" and len(params) == 1 and type(params[0]) is str:
                    named = self.service.count_named(params[0])     # (counted before any is built)
                    looked += named
                    if looked > self.service.registered:    # (distinct names never get here)
                        looked -= named
                        raise Fault(BAD_ARGUMENT, "the lookups of one system.multicall may list %d entries at "
                                    "most, as many as are registered" % self.service.registered)
                func = self._checked(caller, method, params)
                if func.rpc_slow or func.rpc_handover:
                    raise self._alone(method)
                if snapshots and method == "listPorts":
                    results.append([_Snapshot(self.service.registrations(ordered=True), True)])
                elif snapshots and method == "lookup" and type(params[0]) is str:
                    results.append([_Snapshot(self.service.named(params[0]), False)])
                else:
                    results.append([self._invoke(caller, method, func, params)])
            except Fault as fault:
                self.faults[fault.faultCode] += 1
                results.append({"faultCode": fault.faultCode, "faultString": fault.faultString})
        return results

    # -- /metrics --------------------------------------------------------------------------------

    def add_gauge(self, name, text, read):
        """Serve the gauge *name* (help *text*) in /metrics, its value read() when asked."""
        self._families.append(lambda: [(name, "gauge", text, [("", read())])])

    def add_families(self, read):
        """Serve the families read() gives when asked: [(name, kind, help, [(labels, value)])]."""
        self._families.append(read)

    def add_page(self, path, render):
        """Serve GET *path* (bytes, one of the transport's pages) as what render() returns (bytes)."""
        self._pages[path] = render

    def page(self, path, short_of_memory=False):
        """The reply to GET *path*: bytes, a list of its parts, or a Sliced being made (shared:
        one made already is its reply); None when no such page is served.  short_of_memory:
        replies already wait beyond the server's bound, so a page that can be megabytes raises
        Busy, as listPorts would."""
        render = self._pages.get(path)
        if render is None:
            return None
        if short_of_memory and path in _LARGE_PAGES:
            raise Busy("too many replies wait for slow clients to take them; try again shortly")
        reply = render()
        return self._made(reply) if type(reply) is Sliced and reply.start() else reply

    def metrics(self):
        """The Prometheus text exposition (version 0.0.4) of GET /metrics."""
        status = self.service.status()
        lines = []

        def family(name, kind, text, samples):
            lines.extend(("# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)))
            lines.extend("%s%s %s" % (name, labels, value) for labels, value in samples)
        family("nodemngr_ports_registered", "gauge", "Ports registered now.", [("", status["registered"])])
        family("nodemngr_ports_free", "gauge", "Ports of the range free now (not registered, not found bound).",
               [("", status["free"])])
        family("nodemngr_ports_reaped_total", "counter", "Ports freed because their owner process ended.",
               [("", status["reaped"])])
        family("nodemngr_names_remembered", "gauge", "Explicit names with a port remembered (sticky ports).",
               [("", self.service.names_remembered())])
        family("nodemngr_requests_total", "counter", "Calls by method (inside system.multicall too; "
               "portserver: requests of portpicker's protocol).",
               [('{method="%s"}' % m, n) for m, n in sorted(self.requests.items())])
        family("nodemngr_faults_total", "counter", "Faults answered, by fault code (refused portserver "
               "requests and socket handovers included).",
               [('{code="%d"}' % c, n) for c, n in sorted(self.faults.items())])
        for read in self._families:
            for name, kind, text, samples in read():
                family(name, kind, text, samples)
        family("nodemngr_uptime_seconds", "gauge", "Seconds since the node manager started.",
               [("", "%.3f" % status["uptime"])])
        return "\n".join(lines) + "\n"

    # -- internals -------------------------------------------------------------------------------

    def _checked(self, caller, method, params):
        """The function of wire *method*, counted, once *params* and *caller* fit it; else Fault."""
        func = self.funcs.get(method)
        self.requests[method if func is not None else "unknown"] += 1
        if func is None:
            raise Fault(METHOD_NOT_FOUND, "method %s is not offered here; system.listMethods lists "
                        "those that are" % describe(method, 80))
        least, most = func.rpc_arity
        if not least <= len(params) <= most:
            wanted = str(least) if least == most else "%d to %d" % (least, most)
            raise Fault(INVALID_PARAMS, "%s takes %s parameter%s, not %d" % (
                method, wanted, "" if wanted == "1" else "s", len(params)))
        if func.rpc_admin:
            if caller.address is not None and not is_this_host(caller.address):
                raise Fault(FORBIDDEN, "%s is only allowed from this host, not from %s" % (method, caller.address))
            if not (caller.token or caller.uid in (0, self._uid)):
                raise Fault(FORBIDDEN, "%s is allowed to the node manager's own user (uid %d), root, or a caller "
                            "with its token; you are %s" % (method, self._uid, "uid %d" % caller.uid
                                                            if caller.uid >= 0 else "a user it cannot tell"))
        return func

    @staticmethod
    def _alone(method):
        """The fault for a call that must be made alone: slow, or handing sockets over."""
        if method in ("newSocket", "newSockets"):
            return Fault(BAD_ARGUMENT, "%s passes sockets, which only the node manager's local socket can carry, "
                         "one call per request (not over TCP, not in system.multicall)" % method)
        return Fault(BAD_ARGUMENT, "%s answers from the cluster view in a thread of its own, so it cannot run "
                     "inside system.multicall; call it alone" % method)

    def _invoke(self, caller, method, func, params):
        try:
            return func(*params, caller=caller) if func.rpc_caller else func(*params)
        except NodeMngrException as exc:
            raise Fault(exc.faultCode, str(exc))
        except Fault:
            raise
        except Exception as exc:
            log.exception("internal error in %s", method)
            raise Fault(INTERNAL_ERROR, "internal error in %s (%s); the node manager's log has the "
                        "details" % (method, type(exc).__name__))

    def _deferred(self, method, func, params):
        if self.slow_calls >= self.max_slow_calls:
            raise Fault(CLUSTER_UNAVAILABLE, "%d calls to etcd are in flight already; try again shortly"
                        % self.slow_calls)
        large = method in _LARGE_REPLIES
        if large and self.large_slow_calls >= self.max_large_slow_calls:
            # (each is megabytes, made in a thread before the server can count it as owed to a client)
            raise Busy("%d listings of the cluster are being made already; try again shortly" % self.large_slow_calls)
        self.slow_calls += 1
        self.large_slow_calls += large
        return Deferred(method, functools.partial(func, *params))

    def _slow_call_done(self, deferred):
        self.slow_calls -= 1
        self.large_slow_calls -= deferred.method in _LARGE_REPLIES

    def _reply(self, response, method):
        """*response* (a 1-tuple or a Fault) marshalled; a fault is counted."""
        reply, fault = marshal_reply(response, method)
        if fault is not None:
            self.faults[fault] += 1
        return reply

    def _method(self, name):
        func = self.funcs.get(name) if isinstance(name, str) else None
        if func is None:
            raise BadArgumentError("there is no method %s; system.listMethods lists the methods" % describe(name))
        return func

    def _lookup_reply(self, caller, name):
        """lookup's reply: the listing of the registrations named *name* (one name can have
        thousands of holders), kept per name and state of the registry (the 64 names asked last)."""
        changes = self.service.changes
        if self._lookups[0] != changes:
            self._lookups = (changes, collections.OrderedDict())
        replies = self._lookups[1]
        reply = replies.pop(name, None)
        if reply is None:
            reply = Sliced(self._listing_steps(lambda: self.service.named(name), False), "lookup")
            if len(replies) >= 64:
                replies.popitem(last=False)
        replies[name] = reply   # (one being made is shared by those who ask meanwhile)
        return self._made(reply) if reply.start() else reply

    def _listing_reply(self, caller):
        """listPorts' reply, kept per state of the registry: it can be megabytes, and many clients
        asking at once must not each pay for making it."""
        changes = self.service.changes
        if self._listed[0] != changes:      # (one being made is shared by those who ask meanwhile)
            steps = self._listing_steps(lambda: self.service.registrations(ordered=True), True)
            self._listed = (changes, Sliced(steps, "listPorts"))
        reply = self._listed[1]
        return self._made(reply) if reply.start() else reply

    def _made(self, sliced):
        """The reply of a Sliced that is made, its fault (a bug's) counted."""
        if sliced.fault is not None:
            self.faults[sliced.fault] += 1
        return sliced.reply

    def _listing_steps(self, registrations, whole):
        """Make the reply listing registrations() (Registrations, by port, read at the first step)
        as listPorts entries: a list of its pieces.  Each entry is marshalled once and kept while its
        registration is held (whole: they are the whole registry, and the entries of ports no longer
        held are dropped), so that a listing after a change is a join; the entries not made yet
        (25,000 after a restart) are made a slice at a time (see Sliced), so that nobody waits."""
        pieces = [_LIST_HEAD]
        yield from self._entry_pieces(registrations(), pieces, whole)
        pieces.append(_LIST_FOOT)
        return pieces       # (the transport sends them a chunk at a time: never joined whole)

    def _entry_pieces(self, regs, pieces, whole):
        """Append the marshalled entries of *regs* to *pieces*, yielding when a slice's budget is
        spent (see _listing_steps)."""
        # An entry made is kept at once, for the listings being made meanwhile too (twelve of them,
        # of twelve states of the registry, each made the same 25,000 entries); kept entries are
        # used as they are, so that a listing makes no new object the collector would scan.
        cache, listed = self._entries, set()
        until = time.monotonic() + Sliced.budget
        for count, reg in enumerate(regs, 1):
            entry = cache.get(reg.port)
            if entry is None or entry[0] is not reg:
                entry = cache[reg.port] = (reg, _list_item(_listed((reg,))[0]))
            listed.add(reg.port)
            pieces.append(entry[1])
            if count % 100 == 0 and time.monotonic() >= until:
                yield
                until = time.monotonic() + Sliced.budget
        if whole:   # (entries of ports no longer held go; one a later state holds is made again)
            for port in [port for port in cache if port not in listed]:
                del cache[port]


# ---------------------------------------------------------------------------------------------
# HTTP framing
# ---------------------------------------------------------------------------------------------
# Request heads and bodies in, replies' heads out: pure functions over bytes.

class _HTTPError(Exception):
    """An error at the HTTP level: answered with *status* and one sentence, then the connection
    closes.  extra: header lines to add (each ending in CRLF)."""

    def __init__(self, status, message, extra=""):
        super().__init__(message)
        self.status, self.extra = status, extra


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 503: "Service Unavailable"}
_date_cache = [0, "", b""]     # the second it is for, and the Date header's value (str, bytes)


def _http_date(kind=1):
    """The Date header's value now: str (kind 1) or bytes (kind 2), made once a second."""
    now = int(time.time())
    if now != _date_cache[0]:
        text = email.utils.formatdate(now, usegmt=True)
        _date_cache[:] = [now, text, text.encode("ascii")]
    return _date_cache[kind]


def _text_response(status, message, extra=""):
    """An error or refusal in one sentence, after which the connection closes."""
    body = (message + "\n").encode("utf-8")
    return ("HTTP/1.1 %d %s\r\nServer: nodemngr/%s\r\nDate: %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Length: %d\r\nConnection: close\r\n%s\r\n" % (
                status, _REASONS[status], __version__, _http_date(), len(body), extra)).encode("latin-1") + body


_OK_HEAD = ("HTTP/1.1 200 OK\r\nServer: nodemngr/%s\r\nContent-Type: text/xml\r\nDate: " % __version__).encode()


# The pages served to GET, with the head of their replies (every other GET is 405 or 404); what
# each holds is the dispatcher's (Dispatcher.page).  The status page and its stylesheet load
# nothing from elsewhere and run no script (the browser is told so), and no page is sniffed.  The
# page and its JSON are never stored: they may sit behind the token, and a copy kept would show
# ports freed since.
_PAGE_SAFETY = (b"X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'none'; style-src 'self'; "
                b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'\r\nDate: ")
_NO_STORE = b"Cache-Control: no-store\r\n" + _PAGE_SAFETY
_PAGES = {b"/metrics": _OK_HEAD.replace(b"text/xml", b"text/plain; version=0.0.4; charset=utf-8"),
          b"/": _OK_HEAD.replace(b"text/xml", b"text/html; charset=utf-8").replace(b"Date: ", _NO_STORE),
          b"/status.json": _OK_HEAD.replace(b"text/xml", b"application/json").replace(b"Date: ", _NO_STORE),
          b"/status.css": _OK_HEAD.replace(b"text/xml", b"text/css; charset=utf-8").replace(b"Date: ", _PAGE_SAFETY)}


def _reply_head(head, length):
    """The head of the reply of *length* bytes to a request whose RequestHead is *head*, on the
    per-call path.  An HTTP/1.0 client that asked for keep-alive is told it got it (1.0 closes
    by default)."""
    connection = (b"Connection: close\r\n" if not head.keep_alive else
                  b"Connection: keep-alive\r\n" if head.echo_keep_alive else b"")
    return b"%s%s\r\nContent-Length: %d\r\n%s\r\n" % (_OK_HEAD if head.page is None else _PAGES[head.page],
                                                       _http_date(2), length, connection)


RequestHead = namedtuple("RequestHead", "keep_alive length encoding expect_continue echo_keep_alive authorization "
                                        "page")
RequestHead.__doc__ = """What a request's head says: keep the connection open after the reply?
the body's length and Content-Encoding, whether the client waits for 100 Continue, whether to
echo keep-alive (an HTTP/1.0 client asked for it), the Authorization header (or None), and the
page a GET asks for (None: an XML-RPC call)."""


@functools.lru_cache(maxsize=64)
def read_head(head):
    """The RequestHead of a request line and its headers (bytes, without the blank line), or
    _HTTPError (400, 404, 405, 411, 413).  Pure, hence cached: a keep-alive client sends the same
    head bytes call after call.  Hand-written rather than http.client.parse_headers, which costs
    about 11 us more per call and accepts folded lines."""
    request_line, _, block = head.partition(b"\n")
    parts = request_line.rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _HTTPError(400, "malformed request line")
    method, target, version = parts
    headers = {}
    if block:
        block += b"\n"
        pairs = _HEADER.findall(block)
        if len(pairs) != block.count(b"\n"):   # each match is one whole line, from its start
            raise _HTTPError(400, "malformed header line")
        if len(pairs) > MAX_HEADERS:
            raise _HTTPError(400, "more than %d header lines" % MAX_HEADERS)
        headers = {name.lower(): value.strip(b" \t") for name, value in pairs}
        if len(headers) < len(pairs):
            headers = _join_repeated(pairs)
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"    # absolute-form
    path = target.partition(b"?")[0]
    if path in _PAGES:      # (a scraper's parameters: nothing here reads them)
        target = path
    page = target if method == b"GET" and target in _PAGES else None
    if method != b"POST" and page is None:
        raise _HTTPError(405, "only POST is served, and GET of /, /status.json, /status.css and /metrics; send "
                         "XML-RPC calls to / or /RPC2", "Allow: %s\r\n" % (
                             "GET, POST" if target == b"/" else "GET" if target in _PAGES else "POST"))
    if target not in (b"/", b"/RPC2") and page is None:
        raise _HTTPError(404, "no such path; send XML-RPC calls to / or /RPC2")
    connection = headers.get(b"connection", b"").lower()
    http10 = version == b"HTTP/1.0"
    keep_alive = b"keep-alive" in connection if http10 else b"close" not in connection
    length, encoding = _framing(headers) if page is None or b"content-length" in headers or (
        b"transfer-encoding" in headers) else (0, b"identity")
    return RequestHead(keep_alive, length, encoding, headers.get(b"expect", b"").lower() == b"100-continue",
                       keep_alive and http10, headers.get(b"authorization"), page)


def _framing(headers):
    """(body length, content encoding) of a request, or _HTTPError (411, 400, 413)."""
    if b"transfer-encoding" in headers:
        raise _HTTPError(411 if b"content-length" not in headers else 400,
                         "chunked bodies are not accepted; send a Content-Length")
    length = headers.get(b"content-length")
    if length is None:
        raise _HTTPError(411, "a Content-Length header is required")
    if not length.isdigit():
        raise _HTTPError(400, "Content-Length must be a non-negative decimal number")
    digits = length.lstrip(b"0") or b"0"     # (int() refuses thousands of digits, zeros included)
    if len(digits) > 9 or int(digits) > MAX_BODY:
        raise _HTTPError(413, "the body exceeds %d bytes" % MAX_BODY)
    return int(digits), headers.get(b"content-encoding", b"identity").lower()


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_HEADER = re.compile(rb"^(%s):([^\r\n]*)\r?\n" % _TOKEN, re.M)      # a whole "name: value" line


def _join_repeated(pairs):
    """Headers given more than once: joined with commas, as HTTP allows, except the ones whose
    repetition is a smuggling or confusion attempt."""
    headers = {}
    for name, value in pairs:
        name, value = name.lower(), value.strip(b" \t")
        if name in headers:
            if name in (b"content-length", b"authorization", b"content-encoding", b"transfer-encoding"):
                raise _HTTPError(400, "duplicate %s header" % name.decode("latin-1"))
            value = headers[name] + b", " + value
        headers[name] = value
    return headers


def _decode_body(body, encoding):
    if encoding in (b"gzip", b"x-gzip"):
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        decoder = zlib.decompressobj()
    else:
        raise _HTTPError(415, "Content-Encoding %s is not supported; use gzip, deflate or none"
                         % encoding.decode("latin-1")[:40])
    try:
        data = decoder.decompress(body, MAX_BODY + 1)
    except zlib.error:
        raise _HTTPError(400, "the body is not valid %s data" % encoding.decode("latin-1"))
    if len(data) > MAX_BODY or decoder.unconsumed_tail:
        raise _HTTPError(413, "the body exceeds %d bytes once decompressed" % MAX_BODY)
    if not decoder.eof:
        raise _HTTPError(400, "the %s body is truncated" % encoding.decode("latin-1"))
    if decoder.unused_data:     # trailing bytes, or a second gzip member: say so, never cut silently
        raise _HTTPError(400, "the %s body has data after its end" % encoding.decode("latin-1"))
    return data


# ---------------------------------------------------------------------------------------------
# The transport
# ---------------------------------------------------------------------------------------------
# One asyncio protocol per connection, and its three doors: XML-RPC over HTTP (TCP and the local
# socket), portpicker's portserver line and the socket handover (the local socket only).

_INBUF_LIMIT = MAX_HEAD + MAX_BODY     # taken at a stop: at most one request of the largest size
_TURN_REQUESTS = 16                     # requests of one connection answered per turn of the loop
_CHUNK = 256 * 1024                     # a longer reply goes to the transport this much at a time
_PORTSERVER_MAX = 20                    # bytes of a portserver request (a pid, and a newline)
_PORTSERVER_FIRST = frozenset(b"%d" % i for i in range(10)) | {b"-", b"+"}  # how one begins
_READ_BUFFER = bytearray(65536)         # every connection reads into it (Connection.get_buffer)
_READ_VIEW = memoryview(_READ_BUFFER)
_BLANK_LINE = re.compile(rb"\n\r?\n")    # the end of a request's head (CRLF or bare LF lines)

# What a connection is doing (Connection.phase): taking requests; answering what a client that
# half-closed sent, then closing; closing once its last reply has left; lingering after its last
# reply (reading and dropping what still comes, so that closing does not reset the reply); closed.
_READING, _DRAINING, _CLOSING, _LINGERING, _CLOSED = "reading", "draining", "closing", "lingering", "closed"


class Connection:
    """One client connection on the server's loop (an asyncio.BufferedProtocol: see _as_protocol): bytes come in, each request is answered once it
    is complete, replies go out.  A slow or stalled client only ever holds its own connection.
    Nothing is read while a reply waits to be taken (the transport's high-water mark is 0, so any
    byte it cannot send at once pauses writing, and reading with it).  A long reply is handed over
    a chunk at a time, so a client that does not read costs one reply of memory (counted with the
    server's owed_bytes from the moment it is queued), not copies of it.

    What it asks of its server (NodeMngrServer): dispatcher, loop, stopping, released and the
    limits idle_timeout, stall_timeout and linger, which it reads; owed_bytes(delta),
    short_of_memory(), release(connection), run_slow(deferred, done), run_sliced(sliced, done), open_group(),
    must_hold(connection) and end_turn(), which it calls.
    What the server asks of it: expired(now), expire(), quiet(), deadline, unfinished(),
    taking_replies(until), answer_the_rest(grace), release_held(failed) and close().

    Every connection reads into one shared buffer, taken out at once: asyncio's own reads
    allocate 256 KiB each, which glibc serves by mmap, measured at +80 us of CPU per call.
    """

    __slots__ = ("server", "sock", "peer", "caller", "transport", "phase", "deadline", "inbuf", "pos", "head",
                 "outbuf", "pending", "queued", "between", "served", "owed", "awaiting", "active", "request_caller", "paused_left",
                 "more", "held")

    def __init__(self, server, sock, peer, caller):
        """peer: the client's address, for the log; caller: the Caller its calls are made as."""
        self.server, self.sock, self.peer, self.caller = server, sock, peer, caller
        self.transport = None           # until connection_made
        self.phase = _READING
        self.deadline = time.monotonic() + server.stall_timeout
        self.inbuf, self.pos = b"", 0   # bytes received, and where the next request starts in them
        self.head = None                # the RequestHead of a request whose body is awaited
        self.outbuf = collections.deque()   # what waits to be given to the transport
        self.pending = 0                # bytes the transport holds for the client when writing paused
        self.queued = 0                 # bytes of outbuf (both are counted in the server's owed bytes)
        self.between = True             # between requests: no byte of the next one yet
        self.served = 0
        self.owed = math.inf            # once stopping: bytes of its replies left at the last look
        self.awaiting = None            # (head, Deferred or Sliced) of a reply being made meanwhile
        self.active = time.monotonic()  # when the client last sent bytes or took some of a reply
        self.request_caller = caller    # the Caller of the request whose body is awaited
        self.more = False               # the next chunk of a long reply is due at the next turn
        self.held = []                  # (head, reply) waiting for the turn's group commit
        self.paused_left = None         # bytes of its replies not taken when writing last paused

    # -- what the server asks --------------------------------------------------------------------

    def expired(self, now):
        """Whether it is past its deadline: idle too long, stalled mid-request, done lingering."""
        return self.deadline < now

    def expire(self):
        """Close it for having passed its deadline (logged)."""
        if self.phase is not _LINGERING:
            log.debug("closing %s connection from %s", "idle" if self.idle else "stalled", self.peer)
        self.close()

    @property
    def idle(self):
        """Between requests, with nothing received and nothing to send."""
        return self.phase is _READING and not (self.inbuf or self.head or self.pending or self.outbuf or self.awaiting
                                               or self.held)

    def quiet_since(self, window):
        """When its client last sent bytes or took some of a reply, if it may be closed to make
        room: idle (between requests, or before its first) or stalled (a request or a reply that
        has not moved for *window* seconds).  None while it is busy: a slow call, a request just
        in, or bytes moving."""
        if self.awaiting is not None:
            return None
        if self.idle:
            return None if _has_unread(self.sock) else self.active
        return self.active if self.active <= time.monotonic() - window else None

    def quiet(self):
        """Idle, and the client has sent nothing more: closing it loses nothing."""
        return self.idle and not _has_unread(self.sock)

    def unfinished(self):
        """Whether part of a request has come in (or waits unread in the kernel), or a slow
        call's reply is still to come."""
        return self.head is not None or bool(self.inbuf) or self.awaiting is not None or _has_unread(self.sock)

    def taking_replies(self, until):
        """Whether the client took some of its replies since the last look (what is left, ours, the
        transport's and the kernel's send queue, has shrunk); if so, its deadline moves to *until*."""
        if self.transport is None:
            return False
        left = self._left()
        taking = 0 < left < self.owed
        self.owed = left
        if taking:
            self.deadline = until
        return taking

    def reading_reply(self, until):
        """Whether the client took some of its reply since writing last paused (a reply of
        megabytes that a client parses as it reads can take it longer than stall_timeout: it is
        not stalled); if so, its deadline moves to *until*."""
        if self.transport is None or self.paused_left is None or not (self.phase is _READING or self.phase is _DRAINING):
            return False
        left = self._left()
        if not 0 < left < self.paused_left:
            return False
        self.paused_left, self.deadline = left, until
        return True

    def _left(self):
        """Bytes of its replies not taken yet: ours, the transport's and the kernel's send queue."""
        return sum(map(len, self.outbuf)) + self.transport.get_write_buffer_size() + _unsent_bytes(self.sock)

    # -- asyncio's calls -------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(0)
        if self.phase is _CLOSED:        # cut before it got here
            transport.abort()

    def get_buffer(self, sizehint):
        return _READ_BUFFER

    def buffer_updated(self, nbytes):
        if self.phase is not _READING:   # lingering: dropped
            return
        data = bytes(_READ_VIEW[:nbytes])
        self.active = time.monotonic()
        if self.between:    # a request's first byte (blank lines before it count): it has
            self.between = False        # stall_timeout to finish
            self.deadline = time.monotonic() + self.server.stall_timeout
        if self.inbuf:
            self.inbuf = self.inbuf[self.pos:] + data
            self.pos = 0
        else:
            self.inbuf = data
        self.answer_received()

    def eof_received(self):
        if self.phase is _LINGERING:     # the client is done: close once its replies have left
            return bool(self.outbuf)    # (the transport sends its own buffer before it closes)
        if self.phase is _READING:
            self.phase = _DRAINING       # half-closed: answer what was sent, then close
            self.answer_received()
        return True

    def pause_writing(self):
        """A reply waits to be taken: count it, and read nothing more until it has left."""
        self.paused_left = self._left()
        size = self.transport.get_write_buffer_size()
        self.server.owed_bytes(size - self.pending)
        self.pending = size
        if self.phase is _READING:
            self.transport.pause_reading()

    def resume_writing(self):
        self.active = time.monotonic()
        self.server.owed_bytes(-self.pending)
        self.pending = 0
        self._send(b"")
        if not self.pending and not self.outbuf:
            self._sent_all()
            self.answer_received()

    # -- requests and replies --------------------------------------------------------------------

    def answer_received(self):
        """Answer the complete requests received, in order, while no reply waits to be taken; a few
        per turn, so that one connection's pipeline cannot hold up the others."""
        server = self.server
        for _ in range(_TURN_REQUESTS):
            if (self.pending or self.outbuf or self.awaiting or self.held or server.released
                    or (self.phase is not _READING and self.phase is not _DRAINING)):
                return
            try:
                if (not self.served and self.caller.door == "local"
                        and self.inbuf[self.pos:self.pos + 1] in _PORTSERVER_FIRST):
                    self._answer_portserver()
                    return
                request = self._take_request() if self.inbuf else None
                if request is None:
                    if self.phase is _DRAINING or (server.stopping and self.head is None and not self.inbuf
                                                  and not _has_unread(self.sock)):
                        self.phase = _CLOSING    # nothing more will come, or may be taken
                        self._sent_all()
                    else:
                        self.transport.resume_reading()
                    return
                self._answer(*request)
            except _HTTPError as exc:
                self._fail(exc)
                return
        self.transport.pause_reading()      # more may be complete: the next turn answers them
        server.loop.call_soon(self.answer_received)

    def _answer(self, head, body, caller):
        server = self.server
        grouped = server.open_group()       # (asked first: the call's changes join the group)
        try:
            reply = self._reply_to(head, body, caller)
        finally:    # (whatever happened: a group with nothing to save is closed)
            held = grouped and server.must_hold(self)
        if reply is None:
            return
        kind = type(reply)
        if kind is Deferred:    # (it waits for etcd, never shows the registry)
            self._await(head, reply)
        elif held:  # sent once the turn's group is saved (release_held); a Sliced is made only then, as
            self.held.append((head, reply))     # its snapshot may show the group's changes
            if kind is Sliced:
                self.awaiting = (head, reply)
        elif kind is Sliced:
            self._await(head, reply)
        else:
            self._reply(head, reply)

    def _await(self, head, deferred):
        """Wait for *deferred* (a Deferred or a Sliced), reading nothing more meanwhile."""
        server = self.server
        self.awaiting = (head, deferred)
        self.deadline = math.inf    # (the node manager's own work, however long: not the client stalling)
        self.transport.pause_reading()
        run = server.run_slow if type(deferred) is Deferred else server.run_sliced
        run(deferred, functools.partial(self._slow_done, deferred))

    def _reply_to(self, head, body, caller):
        """The reply to a request: bytes, a list of them, a Handover, or a Deferred or Sliced to
        wait for."""
        server = self.server
        dispatcher = server.dispatcher
        try:
            if head.page is not None:   # (GET of a page: /metrics, the status page)
                reply = dispatcher.page(head.page, server.short_of_memory())
                if reply is None:
                    raise _HTTPError(404, "no such page here")
            else:
                reply = dispatcher.dispatch(caller, body, server.short_of_memory())
        except Busy as exc:
            raise _HTTPError(503, str(exc))
        kind = type(reply)
        if (kind is Deferred or kind is Sliced) and server.stopping:    # (no new wait once the stop has begun)
            return dispatcher.abandon(reply)
        return reply

    def release_held(self, failed):
        """The turn's group commit is done: send the replies held for it, in order, or *failed*
        instead of each (the group's fault: none of its calls was made; a page gets a 503), then
        answer on at the next turn: not now, while the server ends the turn (a request answered
        now would open a group that the server's end_turn() caller believes closed)."""
        held, self.held = self.held, []
        dispatcher = self.server.dispatcher
        for head, reply in held:
            if type(reply) is Handover and (failed is not None or self.phase is _CLOSED):
                if failed is None:      # (gone meanwhile: its ports are given back)
                    dispatcher.handover_failed(reply, ConnectionResetError("the client has gone"))
                for sock in reply.sockets:
                    sock.close()
            if type(reply) is Sliced:   # (a listing that may show the group's changes)
                self.awaiting = None
                if failed is None and self.phase is not _CLOSED:
                    self._await(head, reply)
                    continue
            if self.phase is _CLOSED:
                continue
            if failed is not None and head.page is not None:
                dispatcher.group_failed(failed)
                self._fail(_HTTPError(503, "the node manager could not save its state just now; try again shortly"))
                return
            self._reply(head, dispatcher.group_failed(failed) if failed is not None else reply)
        self.server.loop.call_soon(self.answer_received)

    def _slow_done(self, deferred):
        reply = self.server.dispatcher.finish(deferred)
        if reply is None or self.awaiting is None or self.awaiting[1] is not deferred:
            return      # (answered already, at the stop)
        head, self.awaiting = self.awaiting[0], None
        if self.phase is _CLOSED:       # (gone meanwhile: nobody is left to tell)
            return
        self.deadline = time.monotonic() + self.server.stall_timeout
        self._reply(head, reply)
        self.answer_received()

    def _reply(self, head, reply):
        """Send *reply* (bytes, a list of the bytes of one reply, or a Handover) to the request
        whose head is *head*."""
        self.served += 1
        if not head.keep_alive:
            self.phase = _CLOSING
        if type(reply) is Handover:
            reply = self._hand_over(head, reply)    # (what is left to send: a fault, if it could not)
        if reply is None:
            pass
        elif type(reply) is list:   # (a listing, in pieces made beforehand, which clients share)
            cursor = _Cursor(reply)
            self._send(_reply_head(head, cursor.left))
            self.outbuf.append(cursor)
            self._queue(cursor.cost)
            self._send(b"")
        elif len(reply) <= _CHUNK and not self.outbuf and not self.pending:
            self.transport.write(_reply_head(head, len(reply)) + reply)
        else:   # a listing, which clients share, is sent as it is, not copied
            self._send(_reply_head(head, len(reply)))
            self._send(reply)
        if not self.pending and not self.outbuf:
            self._sent_all()

    def _hand_over(self, head, handover):
        """Send the reply of *handover* with its sockets attached (SCM_RIGHTS), then close our
        copies of them; return what is left to send the usual way (None: nothing, or the
        connection is gone).  The bytes go straight to the socket, around the transport, which
        holds nothing then (no request is read while a reply waits).  One handover in flight per
        connection: while the client has not read the previous reply, or the kernel will not
        take the sockets, the ports are given back and the reply is a fault, so that a client
        that does not read cannot pile up the node manager's descriptors in its socket."""
        data = _reply_head(head, len(handover.reply)) + handover.reply
        try:
            if _unsent_bytes(self.sock):    # (the previous socket has not been taken)
                return self.server.dispatcher.handover_failed(handover, None)
            fds = [sock.fileno() for sock in handover.sockets]
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))
            sent = self.sock.sendmsg([data], [rights])
        except OSError as exc:
            log.debug("could not pass the sockets of ports %s: %s", handover.ports, exc)
            reply = self.server.dispatcher.handover_failed(handover, exc)
            if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                self.close()
                return None
            return reply
        finally:
            for sock in handover.sockets:
                sock.close()
        if sent < len(data):
            self._send(data[sent:])
        return None

    def _answer_portserver(self):
        """portpicker's portserver protocol: a pid in decimal (a newline optional, 20 bytes at
        most) gets "PORT\\n" for a port registered to it; any failure closes the connection without
        a reply, which is that protocol's way to say no."""
        data = self.inbuf[self.pos:]
        line, newline, rest = data.partition(b"\n")
        if not newline and self.phase is _READING and len(data) <= _PORTSERVER_MAX and line.isdigit():
            self.transport.resume_reading()     # the rest of the pid, or the end, is to come
            return
        self.served += 1
        self.inbuf, self.pos, self.phase = b"", 0, _CLOSING
        line = line[:-1] if line.endswith(b"\r") else line
        self.server.end_turn()      # (its port is answered at once: saved alone, not in the turn's group)
        port = self.server.dispatcher.portserver(self.caller, None if len(data) > _PORTSERVER_MAX or rest else line)
        if port is None:
            self.close()
            return
        self.transport.write(b"%d\n" % port)
        self._sent_all()

    def answer_the_rest(self, grace):
        """Stopping, just before the state file closes: answer every complete request received,
        even those behind a reply not yet taken, drop what is incomplete, and close once the
        replies are taken (lingering: a reset would lose what the kernel has not sent)."""
        if self.awaiting is not None:   # its slow call did not end within the stop's grace
            (head, deferred), self.awaiting = self.awaiting, None
            self._reply(head, self.server.dispatcher.abandon(deferred))
        if self.phase is _READING:
            try:
                self.inbuf = self.inbuf[self.pos:] + self.sock.recv(
                    max(1, _INBUF_LIMIT - len(self.inbuf) + self.pos), socket.MSG_DONTWAIT)
                self.pos = 0
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self.close()
                return
        while self.phase is _READING or self.phase is _DRAINING:
            try:
                request = self._take_request()
                if request is None:
                    break
                self._answer(*request)
            except _HTTPError as exc:
                self._fail(exc)
        if self.phase is _CLOSED:
            return
        if not self.served:     # nothing was ever sent on it, so nothing a reset could lose
            self.close()
            return
        self.head, self.inbuf, self.pos = None, b"", 0
        self.deadline = min(self.deadline, time.monotonic() + grace)
        if self.phase is _READING or self.phase is _DRAINING:
            self.phase = _LINGERING if self.phase is _READING else _CLOSING
            if not self.pending and not self.outbuf:
                self._sent_all()

    def _take_request(self):
        """(head, body, caller) of the next complete request received, or None; _HTTPError if bad."""
        buf, pos = self.inbuf, self.pos
        if self.head is None:
            while buf[pos:pos + 1] in (b"\r", b"\n"):
                pos += 1
            blank = _BLANK_LINE.search(buf, pos)
            if (blank.start() if blank else len(buf)) - pos > MAX_HEAD:
                raise _HTTPError(400, "the request line and headers exceed %d bytes" % MAX_HEAD)
            if blank is None:
                _check_request_line(buf, pos)
                self.inbuf, self.pos = buf[pos:], 0
                return None
            end, after = blank.span()
            head = read_head(buf[pos:end])
            self.request_caller = self.server.dispatcher.authorize(self.caller, head.authorization)
            if self.request_caller is None:
                raise _HTTPError(401, "this node manager needs HTTP Basic auth with its token as password",
                                 'WWW-Authenticate: Basic realm="nodemngr"\r\n')
            self.head = head
            pos = self.pos = after
            if len(buf) - pos < head.length and head.expect_continue:
                self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = self.head
        end = pos + head.length
        if len(buf) < end:
            return None
        body = buf[pos:end]
        if end == len(buf):
            self.inbuf, self.pos = b"", 0
        else:
            self.pos = end
        self.head = None
        if head.encoding != b"identity":
            body = _decode_body(body, head.encoding)
        return head, body, self.request_caller

    def _send(self, data):
        """Give *data* to the transport after what waits in outbuf, _CHUNK bytes at most at a time:
        the next once the previous one has left (resume_writing sends it) and not before the next
        turn of the loop.  A reply the client does not read is then held once, not copied into the
        transport's buffer, and one of megabytes that it reads as fast as it comes does not hold
        the others up while it all goes."""
        if not self.outbuf and not self.pending and len(data) <= _CHUNK:
            self.transport.write(data)
            return
        outbuf = self.outbuf
        if data:
            outbuf.append(data)
            self._queue(len(data))
        if outbuf and not self.pending and not self.more:
            piece = outbuf[0]
            if type(piece) is _Cursor:
                piece = piece.take(_CHUNK)
                if outbuf[0].done:
                    self._queue(-outbuf.popleft().cost)
            elif len(piece) > _CHUNK:
                view = memoryview(piece)
                outbuf[0], piece = view[_CHUNK:], view[:_CHUNK]
                self._queue(-len(piece))
            else:
                outbuf.popleft()
                self._queue(-len(piece))
            self.transport.write(piece)
            if outbuf and not self.pending:
                self.more = True
                self.server.loop.call_soon(self._send_more)

    def _queue(self, delta):
        self.queued += delta
        self.server.owed_bytes(delta)

    def _send_more(self):
        """The next chunk of a long reply, a turn of the loop after the one before it."""
        self.more = False
        if self.phase is _CLOSED or self.pending:   # (resume_writing goes on once it is taken)
            return
        self._send(b"")
        if not self.pending and not self.outbuf:
            self._sent_all()
            self.answer_received()

    def _sent_all(self):
        """Everything queued has left: close, linger, or wait (idle, or for a pipelined request)."""
        phase = self.phase
        if phase is _CLOSING:    # going: it no longer holds a place among the connections
            self.server.release(self)
            self.server.loop.call_soon(self.transport.close)    # (3.13 miscounts a close in resume_writing)
        elif phase is _LINGERING:
            self.transport.write_eof()
            self.transport.resume_reading()
            self.deadline = time.monotonic() + self.server.linger
        elif phase is _READING:
            self.between = self.head is None and not self.inbuf
            self.deadline = time.monotonic() + (self.server.idle_timeout if self.between else self.server.stall_timeout)

    def _fail(self, exc):
        """Answer an HTTP-level error in one sentence, then linger; a client that half-closed
        sends nothing more: close once the reply has left."""
        self.phase = _LINGERING if self.phase is _READING else _CLOSING
        self.inbuf, self.pos, self.head = b"", 0, None
        self._send(_text_response(exc.status, str(exc), exc.extra))
        if not self.pending:
            self._sent_all()

    def close(self, exc=None):
        """Close now, dropping whatever is not sent yet; also asyncio's connection_lost(exc)."""
        if self.phase is _CLOSED:
            return
        self.phase = _CLOSED
        self.server.release(self)
        if self.transport is not None:
            self.transport.abort()
        self.server.owed_bytes(-self.pending - self.queued)
        self.pending = self.queued = 0
        self.outbuf.clear()

    connection_lost = close


class _Cursor:
    """A reply in pieces (a listing's: shared with the other clients sent it, and with the kept
    entries) in a connection's outbuf, sent a chunk at a time from where it is up to: a client
    that does not read holds a reference to the list, not a copy of its 25,000 references."""

    __slots__ = ("pieces", "index", "left", "cost")
    _sized = (None, 0)      # (the last list sized, its size): many clients are sent the same listing

    def __init__(self, pieces):
        if _Cursor._sized[0] is not pieces:
            _Cursor._sized = (pieces, sum(map(len, pieces)))
        self.pieces, self.index, self.left = pieces, 0, _Cursor._sized[1]
        self.cost = 8 * len(pieces)     # (what it holds of its own, for the server's bound)

    def __len__(self):
        return self.left

    @property
    def done(self):
        return self.index >= len(self.pieces)

    def take(self, most):
        """The next pieces, joined: *most* bytes at most, unless one piece alone is more."""
        pieces, first = self.pieces, self.index
        end, size = first + 1, len(pieces[first])
        while end < len(pieces) and size + len(pieces[end]) <= most:
            size += len(pieces[end])
            end += 1
        self.index, self.left = end, self.left - size
        if end >= len(pieces) and _Cursor._sized[0] is pieces:     # (sent: kept by nobody for its size)
            _Cursor._sized = (None, 0)
        return b"".join(pieces[first:end])


def _check_request_line(buf, pos):
    """_HTTPError 400 once the first line of a request has come in and is not an HTTP request
    line (a client that speaks another protocol is told at once, not when it times out)."""
    end = buf.find(b"\n", pos)
    if end >= 0:
        parts = buf[pos:end].rstrip(b"\r").split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise _HTTPError(400, "malformed request line; this is an HTTP server (XML-RPC, and portpicker's "
                             "portserver protocol on the local socket)")


@functools.lru_cache(maxsize=None)
def _as_protocol(connection, base):
    """*connection* (the class) as a subclass of *base*, asyncio.BufferedProtocol, which asyncio's
    transports ask isinstance of; made when a server starts, so that a client, which never serves,
    never imports asyncio (14 ms of its import)."""
    return type(connection.__name__, (connection, base), {"__slots__": ()})


def _has_unread(sock):
    """Whether the peer has sent bytes that were not read yet."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _unsent_bytes(sock):
    """Bytes the kernel still holds to send on *sock* (Linux's SIOCOUTQ); 0 where it cannot say."""
    if fcntl is None or not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------
# Listening sockets (TCP, the local socket, or those systemd passed), accept, deadlines, the stop.

def local_sockaddr(address):
    """The socket address of a local socket: "@name" is Linux's abstract namespace."""
    return "\0" + address[1:] if address.startswith("@") else address


def _listen_tcp(host, port, backlog):
    """A listening TCP socket on host:port, with SO_REUSEADDR as servers do; OSError if not."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        return sock
    except BaseException:
        sock.close()
        raise


def _listen_local(address):
    """(a listening Unix stream socket at *address*, the inode of its file or None).  A path
    is made 0666 (the local socket is for every local user, as the TCP port is); a socket file
    left by a daemon that died is replaced, anything else there is refused."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not address.startswith("@"):
            _clear_stale_socket(address)
        try:
            sock.bind(local_sockaddr(address))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NodeMngrException("the local socket %s is in use by another program; give --unix "
                                        "another address, or none" % address)
            raise NodeMngrException("cannot make the local socket %s: %s" % (address, exc.strerror or exc))
        inode = None
        if not address.startswith("@"):
            os.chmod(address, 0o666)
            inode = os.stat(address).st_ino
        sock.listen(256)
        return sock, inode
    except BaseException:
        sock.close()
        raise


def _clear_stale_socket(path):
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise NodeMngrException("%s is not a socket; give --unix the path of a socket (or none)" % path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # nobody listens there: left by a daemon that died
            os.unlink(path)
            return
        except OSError:
            pass
    raise NodeMngrException("the local socket %s is in use by another program; give --unix another "
                            "path, or none" % path)


def _local_address(sock):
    """The address of a listening Unix socket, written as --unix takes it."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        return "@" + name[1:].decode("utf-8", "replace")
    return "@" + name[1:] if name.startswith("\0") else name


def _spare_descriptors():
    """How many more files this process may open now: the soft limit less those open."""
    if resource is None:
        return 1 << 20
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        used = len(os.listdir("/proc/self/fd" if _HAVE_PROC else "/dev/fd"))
    except OSError:
        used = 32
    return soft - used


def _drain(sock):
    """Read and drop what has arrived: closing with unread bytes resets the connection."""
    try:
        while sock.recv(4096, socket.MSG_DONTWAIT):
            pass
    except OSError:
        pass
    return sock


def _loop_error(loop, context):
    """A bug costs one connection, never the daemon: log it and serve on."""
    log.error("internal error: %s", context["message"], exc_info=context.get("exception"))


class NodeMngrServer:
    """The daemon's sockets, served by one thread from an asyncio loop of its own (README,
    "Performance", says why not a thread each), one Connection per client connection.

    NodeMngrServer(host, port, local, activated) binds and listens at once: the bound port is
    what keeps a second daemon out.  serve(dispatcher, housekeeping, summary, on_release) then
    serves until request_stop(reason) (in the loop's thread: a call, a signal; or before serve),
    answers what was received and returns; close() closes what is left.  housekeeping: (interval,
    step) pairs; each step() runs every interval, and again at the next turn of the loop while it
    returns True (more is due).  summary(): the service's part of the status line a service
    manager shows (notify: an sd_notify function, or None).  on_release(): called once, at the
    stop, when no request will be answered any more (the state file closes then).

    What a Connection may use of it is listed in Connection's docstring.  The limits are class
    attributes, as in socketserver, so that a test or a subclass can change them.
    """

    request_queue_size = 256
    idle_timeout = IDLE_TIMEOUT     # a keep-alive connection with no request is closed then
    stall_timeout = STALL_TIMEOUT   # from a request's first byte to its reply's last
    max_connections = MAX_CONNECTIONS
    max_pending_bytes = 32 * 1024 * 1024    # replies waiting for slow clients; beyond it, 503
    stop_grace = 1.0                # a stopping daemon drops what is not complete by then
    linger = 1.0                    # after its last reply, what a client still sends is dropped
    fd_reserve = 16                 # descriptors kept for calls in progress (probes, /proc, sqlite)
    reap_interval = REAP_INTERVAL   # seconds between two passes over the owners
    busy_retry = BUSY_RETRY         # a port another program holds is not probed again for this long
    tick = 0.25                     # seconds between two sweeps for deadlines and due busy ports
    busy_window = 0.5               # a request or reply that moved this recently is not stalled

    def __init__(self, host="127.0.0.1", port=nmPort, local=None, activated=([], None)):
        """local: the address of the local (Unix) socket to serve too ("@name": Linux's abstract
        namespace; else a path), or None.  activated: (inet, unix) listening sockets a service
        manager passed (activated_sockets()), served instead of binding host:port and local."""
        self.dispatcher = self.loop = self.notify = self.on_ready = None   # (on_ready: called once, serving)
        self._connection_type = None    # Connection as asyncio's protocol, once serving
        self._group = None      # connections holding replies for the turn's group commit, while one is open
        self.stop_reason = None     # why it stops, once asked
        self.stopping = False       # it takes no new request (set once the stop has begun)
        self.released = False       # stopping, and no request will be answered any more
        self.connections = set()
        self._pending_bytes = 0     # bytes of replies queued and not yet taken by their clients
        self._refused = collections.deque()     # (close at, socket) answered 503, half-closed
        self._listening = False
        self._executor = None       # threads for slow calls, made on the first one
        self._sliced = {}           # Sliced being made -> the done() of each connection waiting for it
        self._slicing = collections.deque()     # those Sliced, in turn: one step of the first a turn
        self._told = None           # the last STATUS= line sent
        self._accept_warned = 0.0
        self._summary, self._on_release = (lambda: ""), (lambda: None)
        inet, unix = activated
        self.listeners = list(inet) or [_listen_tcp(host, port, self.request_queue_size)]
        self.address = self.listeners[0].getsockname()[:2]
        self.port = self.address[1]
        self.local_listener, self.local_address, self._local_inode = None, None, None
        if unix is not None:        # (the service manager's: never unlinked)
            self.local_listener, self.local_address = unix, _local_address(unix)
        elif local is not None:
            try:
                self.local_listener, self._local_inode = _listen_local(local)
                self.local_address = local
            except NodeMngrException as exc:    # (a squatter must not keep the daemon from serving TCP)
                log.warning("%s; serving without a local socket", exc)
            except BaseException:
                self.close()
                raise

    # -- what a Connection calls -------------------------------------------------------------------

    def owed_bytes(self, delta):
        """Replies queued for clients that have not taken them grew (or shrank) by *delta* bytes."""
        self._pending_bytes += delta

    def short_of_memory(self):
        """Whether replies owed to slow clients exceed max_pending_bytes."""
        return self._pending_bytes > self.max_pending_bytes

    def release(self, connection):
        """*connection* no longer holds a place among the connections."""
        self.connections.discard(connection)

    def open_group(self):
        """Before a connection dispatches a request: whether a group of calls is open, to be saved
        in one transaction at the end of this turn of the loop.  One opens when other callbacks
        wait in the turn (other clients' requests, most likely): under load, a call's own commit
        was most of its cost.  A lone call is saved and answered at once, as ever."""
        if self._group is None:
            waiting = getattr(self.loop, "_ready", None)    # (asyncio's; not an API: without it, no groups)
            if not waiting or self.stopping:
                return False
            self.dispatcher.begin_group()
            self._group = []
        return True

    def must_hold(self, connection):
        """After it dispatched a request in an open group: whether *connection* must hold the reply
        until end_turn() has saved the group, as it has changes to save (this call's, or earlier
        ones' that the reply may show).  A group with none is closed: a ping costs no turn."""
        if not self.dispatcher.unsaved():
            self._group = None
            self.dispatcher.end_group()
            return False
        if not self._group:
            self.loop.call_soon(self.end_turn)
        self._group.append(connection)
        return True

    def end_turn(self):
        """Save the turn's group of calls, then let the connections send the replies they held.
        Also called before a reply that cannot wait (a portserver line) and at the stop."""
        group, self._group = self._group, None
        if group is None:
            return
        failed = self.dispatcher.end_group()
        for connection in group:
            connection.release_held(failed)

    def run_slow(self, deferred, done):
        """Run *deferred* (a call waiting for etcd) in a thread, then done() on the loop; done()
        at once if no thread can be started now (the deferred has not run, then)."""
        if self._executor is None:
            import concurrent.futures
            self._executor = concurrent.futures.ThreadPoolExecutor(self.dispatcher.max_slow_calls, "nodemngr-slow")
        try:
            future = self.loop.run_in_executor(self._executor, deferred.run)
        except RuntimeError as exc:     # ("can't start new thread": a limit of the host, for a moment)
            log.warning("cannot run %s now: %s", deferred.method, exc)
            self.loop.call_soon(done)
            return
        future.add_done_callback(lambda future: done())

    def run_sliced(self, sliced, done):
        """Make *sliced*, then done(): one step of one Sliced per turn of the loop, whatever is
        being made, so that other clients are served between any two slices.  A reply shared by
        many connections (a listing, the status page) is made once, then the done() of each is
        called; replies of different states of the registry (a listing asked between changes by
        each of 120 clients) take their turns, not a slice each per turn."""
        waiting = self._sliced.get(sliced)
        if waiting is not None:
            waiting.append(done)
            return
        self._sliced[sliced] = [done]
        self._slicing.append(sliced)
        if len(self._slicing) == 1:
            self.loop.call_soon(self._slice_turn)

    def _slice_turn(self):
        sliced = self._slicing[0]
        if sliced.step():
            self._slicing.popleft()
            for each in self._sliced.pop(sliced):
                self.loop.call_soon(each)       # (each on its own: one that fails spoils no other)
        else:
            self._slicing.rotate(-1)
        if self._slicing:
            self.loop.call_soon(self._slice_turn)

    # -- the loop --------------------------------------------------------------------------------

    def serve(self, dispatcher, housekeeping=(), summary=None, on_release=None):
        """Serve *dispatcher*'s calls on an asyncio loop of its own until request_stop(), then
        answer what was received and return."""
        self.dispatcher = dispatcher
        self._summary = summary or self._summary
        self._on_release = on_release or self._on_release
        dispatcher.add_gauge("nodemngr_connections", "Client connections open now.", lambda: len(self.connections))
        import asyncio
        self._connection_type = _as_protocol(Connection, asyncio.BufferedProtocol)
        self.loop = loop = asyncio.new_event_loop()
        loop.set_exception_handler(_loop_error)
        self.connection_limit = min(self.max_connections, max(1, _spare_descriptors() - self.fd_reserve))
        self._done = loop.create_future()
        try:
            for sock in self._listeners():
                sock.setblocking(False)
            self._listen()
            if self.notify is not None:
                loop.call_soon(self._tell, "READY=1")
            if self.on_ready is not None:
                loop.call_soon(self.on_ready)
            if self.stop_reason is not None:    # asked before the loop ran
                loop.call_soon(self._begin_stop)
            loop.call_later(self.tick, self._sweep)
            for interval, step in housekeeping:
                loop.call_later(interval, self._housekeep, interval, step)
            loop.run_until_complete(self._done)
            if self.connections:
                log.warning("%d connections still busy at exit", len(self.connections))
            for connection in list(self.connections):
                connection.close()
            for _ in range(2):      # the transports close, then tell their connections
                loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()
            if self._executor is not None:
                self._executor.shutdown(wait=False)     # (each call is bounded by etcd's deadline)

    def _housekeep(self, interval, step):
        if self.stopping:
            return
        more = False
        try:
            more = step()
        except Exception:
            log.exception("housekeeping failed (%s)", getattr(step, "__name__", step))
        finally:    # (whatever failed, even the log, it goes on)
            self.loop.call_later(0 if more else interval, self._housekeep, interval, step)

    def _sweep(self):
        """Every tick: close connections past their deadline (idle too long, stalled mid-request,
        lingering; once stopping, no longer taking the replies owed), and listen again after a
        pause."""
        now = time.monotonic()
        while self._refused and self._refused[0][0] < now:
            _drain(self._refused.popleft()[1]).close()
        for connection in [c for c in self.connections if c.expired(now)]:
            if self.released:
                if not connection.taking_replies(now + self.stop_grace):
                    connection.expire()
            elif not connection.reading_reply(now + self.stall_timeout):
                connection.expire()
        if not self.stopping:
            if self.notify is not None:
                self._tell()
            if not self._listening:
                self._listen()
        self.loop.call_later(self.tick, self._sweep)

    def _tell(self, *lines):
        """Send the service manager *lines* and, when it has changed, a STATUS= line."""
        status = "STATUS=serving on %s:%d and %s, %s" % (
            self.address[0], self.port, self.local_address or "no local socket", self._summary())
        if lines or status != self._told:
            self._told = status
            self.notify(*lines + (status,))

    def _listen(self):
        for listener in self._listeners():
            self.loop.add_reader(listener, self._accept, listener)
        self._listening = True

    def _listeners(self):
        return self.listeners + ([] if self.local_listener is None else [self.local_listener])

    def _accept(self, listener, limit=64):
        """Take the connections waiting, a new Connection each.  Beyond connection_limit a newcomer
        is answered 503.  (loop.create_server would accept a burst beyond the limit and hold, for
        a few turns, the descriptors kept for the calls in progress.)"""
        local = listener is self.local_listener
        for _ in range(limit):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # out of descriptors, say: pause until the next tick
                now = time.monotonic()
                if now - self._accept_warned > 60:
                    self._accept_warned = now
                    log.warning("cannot accept connections for now: %s", exc.strerror or exc)
                self._unlisten()
                return
            if len(self.connections) >= self.connection_limit and not self._evict_idlest():
                self._turn_away(sock)
                continue
            if local:   # (the peer's namespace is read now: the process may be gone when it names a pid)
                pid, uid = peer_credentials(sock)
                peer, caller = ("the local socket", 0), self.dispatcher.caller(
                    "local", uid=uid, pid=pid, namespace=UNKNOWN_NAMESPACE if pid is None else pid_namespace(pid))
            else:   # (a reply in parts must not wait for the client's delayed ACK: 40 ms each)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                caller = self.dispatcher.caller("tcp", address=peer[0], uid=tcp_peer_uid(sock.getsockname(), peer))
            connection = self._connection_type(self, sock, peer, caller)
            self.connections.add(connection)
            self.loop.create_task(self.loop.connect_accepted_socket(lambda c=connection: c, sock))

    def _unlisten(self):
        if self._listening:
            for listener in self._listeners():
                self.loop.remove_reader(listener)
            self._listening = False

    def _evict_idlest(self):
        """Make room by closing the connection idle or stalled the longest (between requests, or
        before its first, or with a request or reply that has not moved for busy_window seconds),
        if there is one: holding connections must not lock others out."""
        quiet = [(c.quiet_since(self.busy_window), c) for c in self.connections]
        quiet = [(since, c) for since, c in quiet if since is not None]
        if not quiet:
            return False
        connection = min(quiet, key=lambda pair: pair[0])[1]
        log.debug("closed %s connection from %s to make room", "idle" if connection.idle else "stalled", connection.peer)
        connection.close()
        return True

    def _turn_away(self, sock):
        """Answer 503 and close, after reading what the client sent and keeping the socket half-closed
        a moment (a few at most): a reset would show the client a broken pipe, not the 503."""
        try:
            _drain(sock).send(_text_response(503, "too many connections; try again shortly"), socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        if len(self._refused) >= self.fd_reserve // 2:    # the oldest has most likely been read
            _drain(self._refused.popleft()[1]).close()
        self._refused.append((time.monotonic() + self.linger, sock))

    # -- stopping --------------------------------------------------------------------------------

    def request_stop(self, reason):
        """Stop serving soon (in the loop's thread: a request, a signal; or before it runs)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon(self._begin_stop)   # after the reply of the call that asked

    def _begin_stop(self):
        """Take no new request: answer what was received (connections the kernel accepted for us
        included), close the idle connections and the listening sockets."""
        if self.stopping:       # (asked twice before the loop ran: a signal, then serve)
            return
        if self.notify is not None:
            self.notify("STOPPING=1", "STATUS=stopping (%s)" % self.stop_reason)
        for listener in self._listeners():
            self._accept(listener, self.connection_limit)
        self.stopping = True
        self._unlisten()
        self._close_listeners()
        for connection in list(self.connections):
            if connection.quiet():
                connection.close()
        now = time.monotonic()
        self._release_at = now + self.stop_grace
        self._stop_deadline = now + self.stall_timeout + 1     # for replies owed to slow readers
        self._while_stopping()

    def _while_stopping(self):
        """Once no request is left half-received (or stop_grace has passed): answer every complete
        one, drop the rest, and release (the state file closes, so that the next daemon can start
        at once).  Replies owed are still sent to clients that keep taking them (each gets
        stop_grace from its last bytes taken); serve returns once they are, or the stall limit
        passed."""
        now = time.monotonic()
        if not self.released and (now >= self._release_at or not any(
                c.unfinished() for c in self.connections)):
            self.end_turn()
            for connection in list(self.connections):
                try:
                    connection.answer_the_rest(self.stop_grace)
                except Exception:       # a bug costs that connection, never the stop
                    log.exception("internal error answering %s at the stop", connection.peer)
                    connection.close()
            self.released = True
            self._on_release()
        if self.released and (not self.connections or now >= self._stop_deadline):
            if not self._done.done():
                self._done.set_result(None)
            return
        self.loop.call_later(0.01, self._while_stopping)

    def _close_listeners(self):
        for sock in self.listeners:
            sock.close()
        if self.local_listener is not None:
            self.local_listener.close()
            if self._local_inode is not None:
                try:        # (unless another daemon has put its own there since)
                    if os.stat(self.local_address).st_ino == self._local_inode:
                        os.unlink(self.local_address)
                except OSError:
                    pass

    def close(self):
        """Close every connection and listening socket left (after serve, or instead of it)."""
        for connection in list(self.connections):
            connection.close()
        while self._refused:
            self._refused.popleft()[1].close()
        self._close_listeners()


# ---------------------------------------------------------------------------------------------
# The cluster view
# ---------------------------------------------------------------------------------------------
# Every host's registry published to etcd, and every host's read back into a local mirror that
# an etcd watch keeps current (README, "Many hosts").  It is handed a snapshot of the registry and
# told of its changes; it never calls the service, and no local call waits for etcd.

CLUSTER_PREFIX = "nodemngr/v1/ports/"
MAX_CLUSTER_VALUE = 64 * 1024   # bytes of a published value; a larger one is skipped, never decoded
_CLUSTER_KEY = re.compile(r"nodemngr/v1/ports/([^/]+)/([1-9][0-9]{0,4})\Z")
_OVERSIZED = "!"                # what stands for a value over MAX_CLUSTER_VALUE (it is not base64)
# What no string of an entry may hold, as none the local side takes can (XML-RPC brings it): a
# character XML 1.0 cannot carry, or a lone surrogate (valid JSON, but no UTF-8 can write it).
_XML_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class _NoSuchLease(ClusterError):
    """etcd refused a write: it does not know the lease given (it expired, or was revoked)."""


def _bytes(key):
    """A key as etcd holds it: bytes (text as UTF-8)."""
    return key if isinstance(key, bytes) else key.encode("utf-8")


def _b64(key):
    """A key or value (text, or bytes as they are) as etcd's gateway takes it: base64."""
    return base64.b64encode(_bytes(key)).decode("ascii")


def _json_value(value):
    """An info as JSON: dateTime as ISO 8601 text, base64 as {"base64": "..."}."""
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, xmlrpc.client.DateTime):
        return datetime.strptime(value.value, "%Y%m%dT%H:%M:%S").isoformat()
    return value


def published_entry(host, reg):
    """The etcd key and JSON value that publish Registration *reg* of *host*."""
    import json
    return "%s%s/%d" % (CLUSTER_PREFIX, host, reg.port), json.dumps(
        {"host": host, "port": reg.port, "name": name_of(reg.info) or "", "info": _json_value(reg.info),
         "pid": reg.pid, "since": datetime.fromtimestamp(int(reg.since), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")},
        sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cluster_entry(key, value, lease):
    """(the struct a published key stands for, None), or (None, why it is skipped): only what
    nodemngr writes is passed on, a key HOST/PORT whose value agrees with it and which hangs on a
    lease.  key: as etcd holds it (bytes; one that is not UTF-8 is not nodemngr's), or text;
    value: the key's value as etcd's gateway gives it (base64), or _OVERSIZED."""
    import json
    try:
        match = _CLUSTER_KEY.match(key.decode("utf-8") if isinstance(key, bytes) else key)
    except UnicodeDecodeError:
        match = None
    if match is None or int(match.group(2)) > 65535:
        return None, "key"
    if value == _OVERSIZED:
        return None, "size"
    if not lease:
        return None, "lease"
    try:
        entry = json.loads(base64.b64decode(value, validate=True))
        if not (isinstance(entry, dict) and type(entry.get("host")) is str and type(entry.get("name")) is str
                and type(entry.get("port")) is int and type(entry.get("pid")) is int
                and 0 <= entry["pid"] <= _INT32_MAX):
            return None, "value"
        if entry["host"] != match.group(1) or entry["port"] != int(match.group(2)):
            return None, "disagrees"
        entry = {k: entry[k] for k in ("host", "port", "name", "info", "pid", "since")}
        entry["since"] = datetime.strptime(entry["since"], "%Y-%m-%dT%H:%M:%SZ")
        if _XML_UNSAFE.search(marshal_info(entry["info"]) + entry["host"] + entry["name"]):
            return None, "value"
    except (ValueError, KeyError, TypeError, binascii.Error, NodeMngrException, RecursionError):
        return None, "value"    # (RecursionError: JSON nested thousands deep, which json.loads refuses so)
    return entry, None


class _Trimmed:
    """A reply of etcd's gateway kept as it is read, each base64 "value" longer than the bound
    (MAX_CLUSTER_VALUE decoded) replaced by _OVERSIZED on the way: a huge value is neither held
    nor decoded.  (Base64 holds no quote: the next one ends a value.)  feed() it pieces; size is
    what it keeps, read what it was fed."""

    MARK = b'"value":"'
    LIMIT = (MAX_CLUSTER_VALUE + 2) // 3 * 4    # base64 characters of the largest value kept

    def __init__(self):
        self.pieces, self.size, self.read = [], 0, 0
        self._rest = b""            # the end of what came, which may begin a mark or a value
        self._skipping = False      # in an oversized value: dropped up to its quote

    def feed(self, data):
        self.read += len(data)
        data, at, self._rest = self._rest + data, 0, b""
        while at < len(data):
            if self._skipping:
                at = data.find(b'"', at)
                if at < 0:
                    return
                self._skipping = False
            start = data.find(self.MARK, at)
            if start < 0:
                keep = max(at, len(data) - len(self.MARK) + 1)
                self._keep(data[at:keep])
                self._rest = data[keep:]
                return
            begin = start + len(self.MARK)
            end = data.find(b'"', begin)
            if (len(data) if end < 0 else end) - begin > self.LIMIT:
                self._keep(data[at:begin] + _OVERSIZED.encode())
                self._skipping, at = end < 0, len(data) if end < 0 else end
            elif end < 0:
                self._keep(data[at:start])
                self._rest = data[start:]
                return
            else:
                self._keep(data[at:end])
                at = end

    def _keep(self, data):
        if data:
            self.pieces.append(data)
            self.size += len(data)

    def body(self):
        """What was kept (the reply has ended)."""
        return b"".join(self.pieces) + self._rest

    def cut(self):
        """What was kept of a range's reply, ended after its last whole key-value as the reply of
        a range that has more; None before the first is whole.  (etcd's gateway writes compact
        JSON, and a key-value holds no brace: "},{" is found between two of them only.)"""
        kept = b"".join(self.pieces)
        self.pieces = [kept]
        end = kept.rfind(b"},{")
        return None if end < 0 else kept[:end + 1] + b'],"more":true}'


def _loads_within_bound(body):
    """json.loads of a reply of etcd's gateway, each base64 "value" of more than MAX_CLUSTER_VALUE
    bytes replaced by _OVERSIZED first: a huge value is neither decoded nor copied, and nothing
    holds the interpreter for long (searching bytes is fast; decoding megabytes of JSON is not)."""
    import json
    trimmed = _Trimmed()
    trimmed.feed(body)
    return json.loads(trimmed.body())


def _read_within(reply, limit, cut=None):
    """A reply's JSON object, read by pieces, trimmed as they come (_Trimmed) and up to *limit*
    bytes kept (a reply must not fill the memory).  cut: a range's reply is ended after its last
    whole key-value once that many bytes are read (the rest is not: the next page has it), and
    says how many were, as "_read" (no field of etcd's begins with "_")."""
    import json
    trimmed = _Trimmed()
    while True:
        piece = reply.read1(65536)
        if not piece:
            answer = json.loads(trimmed.body() or b"{}")
            if not isinstance(answer, dict):
                raise ValueError("not a JSON object")
            break
        trimmed.feed(piece)
        body = trimmed.cut() if cut and trimmed.read > cut else None
        if body is not None:
            answer = json.loads(body)
            break
        if trimmed.size > limit:
            raise ValueError("etcd's reply is over %d bytes" % limit)
    if cut:
        answer["_read"] = trimmed.read
    return answer


class _Deadline:
    """What makes a socket end each read and write by its deadline (a time.monotonic(); inf:
    none), not merely within a timeout of its own: http.client reads a reply's head a line at a
    time, and an endpoint that sends a byte every few milliseconds would hold a call for ever."""

    deadline = math.inf

    def _time_left(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        self.settimeout(None if left == math.inf else left)

    def recv_into(self, *args):
        self._time_left()
        return super().recv_into(*args)

    def sendall(self, *args):
        self._time_left()
        return super().sendall(*args)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineTLSSocket(_Deadline, ssl.SSLSocket):
    pass


def _connect_by(address, deadline):
    """A _DeadlineSocket connected to *address* (host, port) by *deadline*."""
    error = OSError("no address for %s" % address[0])
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM):
        sock = _DeadlineSocket(family, kind, proto)
        sock.deadline = deadline
        try:
            sock._time_left()
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class EtcdClient:
    """The calls of etcd's v3 API the cluster view makes, as JSON over HTTP(S) through etcd's
    gateway, with the standard library.  Each call tries the endpoints in turn, the one that
    answered last first, each within its own timeout (a call may give a shorter one, a share of
    its time), whatever an endpoint sends (a trickle included); ClusterError (one sentence) when
    none answers.  user_file: a file holding "USER:PASSWORD" (never a flag).  Safe to share
    between threads: each call has a connection of its own."""

    timeout = 2.0       # seconds one endpoint has to answer
    max_reply = 64 * 1024 * 1024    # bytes of a reply kept (values over the bound skipped)
    page = 1000         # keys a range reads at once, at most
    page_bytes = 1 << 20    # and about bytes: decoding that holds the interpreter a few ms

    def __init__(self, urls, ca_file=None, cert_file=None, key_file=None, user_file=None):
        self.endpoints = []
        for url in urls:
            try:
                parts = urllib.parse.urlsplit(url.strip())
                endpoint = (parts.scheme, parts.hostname, parts.port or 2379)
            except ValueError as exc:
                endpoint = ("", None, str(exc))
            if endpoint[0] not in ("http", "https") or not endpoint[1]:
                raise NodeMngrException("cluster endpoint %s is not an http:// or https:// URL with a valid "
                                        "port" % describe(url, 80))
            self.endpoints.append(endpoint)
        self._tls = None
        try:
            if any(scheme == "https" for scheme, _, _ in self.endpoints):
                self._tls = ssl.create_default_context(cafile=ca_file)
                self._tls.sslsocket_class = _DeadlineTLSSocket
                if cert_file:
                    self._tls.load_cert_chain(cert_file, key_file)
        except (OSError, ValueError) as exc:    # (ssl.SSLError is an OSError)
            raise NodeMngrException("cannot use the cluster's TLS files (%s): %s" % (
                ", ".join(f for f in (ca_file, cert_file, key_file) if f), getattr(exc, "strerror", None) or exc))
        self._user = _read_user_file(user_file) if user_file else None
        self._token = None
        self._lock = threading.Lock()   # (for the token)
        self._first = 0                 # the endpoint that answered last: tried first
        self._watching = None           # the connection of the watch in progress

    def call(self, path, body, timeout=None, cut=None):
        """POST *body* (a dict) to /v3/*path*; the reply as a dict, or ClusterError.  cut: bytes
        after which a range's reply is ended (_read_within)."""
        try:
            return self._post(path, body, self._auth_token(timeout), timeout, cut)
        except ClusterError as exc:
            if self._user is None or "invalid auth token" not in str(exc):
                raise
            with self._lock:
                self._token = None      # expired: authenticate again, once
        return self._post(path, body, self._auth_token(timeout), timeout, cut)

    def _auth_token(self, timeout):
        if self._user is None:
            return None
        with self._lock:
            if self._token is None:
                self._token = self._post("auth/authenticate", {"name": self._user[0], "password": self._user[1]},
                                         None, timeout).get("token")
            return self._token

    def _connect(self, index, deadline):
        """A connection to endpoint *index*, made (and its TLS handshake done) by *deadline*, its
        every read and write then ending by that deadline too (move conn.sock.deadline on)."""
        scheme, host, port = self.endpoints[index]
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port)
        conn._create_connection = lambda address, *_: _connect_by(address, deadline)   # (what connect() calls)
        conn.connect()
        conn.sock.deadline = deadline
        return conn

    def _order(self):
        first = self._first
        return [first] + [i for i in range(len(self.endpoints)) if i != first]

    def _post(self, path, body, token, timeout=None, cut=None):
        import json
        data = json.dumps(body).encode("utf-8")
        timeout = timeout or self.timeout
        headers = dict({"Content-Type": "application/json"}, **({"Authorization": token} if token else {}))
        reasons = []
        deadline = time.monotonic() + len(self.endpoints) * timeout    # the whole call, whatever they do
        for index in self._order():
            scheme, host, port = self.endpoints[index]
            left = deadline - time.monotonic()
            if left <= 0:
                reasons.append("%s:%d: no time left" % (host, port))
                continue
            conn = reply = None
            try:
                conn = self._connect(index, time.monotonic() + min(left, timeout))
                conn.request("POST", "/v3/" + path, data, headers)
                reply = conn.getresponse()
                answer = _read_within(reply, self.max_reply, cut)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                reasons.append("%s:%d: %s" % (host, port, _why_not(exc, reply, min(left, timeout))))
                continue
            finally:
                if conn is not None:
                    conn.close()
            if reply.status != 200 or "error" in answer:
                reason = " ".join(str(answer.get("message") or answer.get("error") or reply.reason).split())
                raise (_NoSuchLease if "lease not found" in reason else ClusterError)(
                    "etcd at %s:%d refused %s: %s" % (host, port, path, reason[:200]))
            self._first = index
            return answer
        raise ClusterError("etcd cannot be reached (%s)" % "; ".join(reasons))

    def grant(self, ttl, timeout=None):
        lease = self.call("lease/grant", {"TTL": ttl}, timeout).get("ID")
        if lease is None:
            raise ClusterError("etcd answered a lease grant without a lease: not etcd's v3 API?")
        return lease

    def keepalive(self, lease, timeout=None):
        """The lease's TTL left after renewing it; 0 when etcd no longer knows it."""
        return int(self.call("lease/keepalive", {"ID": lease}, timeout).get("result", {}).get("TTL", 0))

    def revoke(self, lease, timeout=None):
        self.call("lease/revoke", {"ID": lease}, timeout)

    def range(self, prefix):
        """The keys under *prefix* as pages of [(key, value, lease, mod_revision)] (key bytes,
        value base64 or _OVERSIZED) read at one revision, the first page's; yields (page,
        revision).  A page is page keys at most and about page_bytes: one read that far is ended
        after its last whole key.  The first asks for a hundredth of page keys, and each next one
        for as many as page_bytes held in the last, so that etcd never makes a reply much larger
        than what is read of it, nor takes long to send one.  (A page goes on right after the
        bytes of the last key read: a key need not be UTF-8.)"""
        prefix = _bytes(prefix)
        end, key, revision, limit = _b64(_prefix_end(prefix)), _b64(prefix), None, max(1, self.page // 100)
        while True:
            body = {"key": key, "range_end": end, "limit": limit}
            if revision is not None:
                body["revision"] = revision
            reply = self.call("kv/range", body, cut=self.page_bytes)
            try:
                if revision is None:        # (a reply's header says etcd's revision now, not the one read)
                    revision = int(reply["header"]["revision"])
                page = [_kv(kv) for kv in reply.get("kvs", [])]
            except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
                raise ClusterError("etcd answered a range with something that is not etcd's v3 JSON")
            yield page, revision
            if not reply.get("more") or not page:
                return
            key = _b64(page[-1][0] + b"\0")
            limit = max(1, min(self.page, len(page) * self.page_bytes // max(1, reply["_read"])))

    def count(self, prefix):
        """(revision, how many keys there are under *prefix*): cheap, whatever their number."""
        reply = self.call("kv/range", {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "count_only": True})
        try:
            return int(reply["header"]["revision"]), int(reply.get("count", 0))
        except (KeyError, TypeError, ValueError):
            raise ClusterError("etcd answered a count with something that is not etcd's v3 JSON")

    def txn(self, puts, deletes, lease):
        """Put {key: value} with *lease* and delete *deletes*, in one transaction; its revision."""
        ops = [{"requestDeleteRange": {"key": _b64(key)}} for key in deletes]
        ops += [{"requestPut": {"key": _b64(key), "value": _b64(value), "lease": lease}} for key, value in puts.items()]
        try:
            return int(self.call("kv/txn", {"success": ops})["header"]["revision"])
        except (KeyError, TypeError, ValueError):
            raise ClusterError("etcd answered a transaction with something that is not etcd's v3 JSON")

    def watch(self, prefix, start_revision):
        """The changes under *prefix* from *start_revision* on, as etcd streams them: yields
        (events, through) -- events [(key, value or None when deleted, lease, mod_revision)], through
        the revision up to which every change has now come, or None -- from the answer that
        creates the watch (no events, None) until the stream ends (ClusterError) or close_watch()
        cuts it.  ClusterError("compacted") when etcd no longer has that revision: read the prefix
        again.  Progress notifications are asked for (an etcd that sends them says how far a quiet
        prefix is current), and big batches in fragments (none is then decoded in one piece)."""
        import json
        index = self._order()[0]
        scheme, host, port = self.endpoints[index]
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
                                   "start_revision": start_revision, "progress_notify": True, "fragment": True}}
        token, conn = self._auth_token(None), None
        try:
            conn = self._connect(index, time.monotonic() + self.timeout)
            conn.request("POST", "/v3/watch", json.dumps(body).encode("utf-8"),
                         dict({"Content-Type": "application/json"}, **({"Authorization": token} if token else {})))
            reply = conn.getresponse()
            if reply.status != 200:
                raise ClusterError("etcd at %s:%d refused a watch: HTTP %d" % (host, port, reply.status))
            conn.sock.deadline = math.inf   # (a quiet prefix sends nothing for hours; close_watch() cuts it)
            self._watching = conn
            while True:
                line = reply.readline(self.max_reply)
                if not line:
                    raise ClusterError("etcd at %s:%d ended the watch" % (host, port))
                result = _loads_within_bound(line).get("result") or {}
                if result.get("compact_revision") or result.get("canceled"):
                    raise ClusterError("compacted")
                events = [(_kv(e["kv"])[:2] if e.get("type") != "DELETE" else (_kv(e["kv"])[0], None))
                          + _kv(e["kv"])[2:] for e in result.get("events", [])]
                yield events, _through(result, events)
        except OSError as exc:
            raise ClusterError("etcd cannot be reached (%s:%d: %s)" % (host, port, _why_not(exc, None, self.timeout)))
        except (http.client.HTTPException, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ClusterError("the watch on etcd at %s:%d broke: %s" % (host, port, describe(exc)))
        finally:
            self._watching = None
            if conn is not None:
                conn.close()

    def close_watch(self):
        """Cut the watch in progress (from another thread): its generator raises ClusterError.
        Whether there was one."""
        conn = self._watching
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
                return True
            except OSError:
                pass
        return False


def _through(result, events):
    """The revision up to which a watch's answer says every change has come: its last event's (but
    for a fragment's, whose last revision goes on in the next answer); a progress notification's
    header (etcd sends one only once the watch has everything); None for the answer that created
    the watch (changes before etcd's revision then may still be on their way)."""
    if events:
        return events[-1][3] - (1 if result.get("fragment") else 0)
    return None if result.get("created") else int(result["header"]["revision"])


def _why_not(exc, reply, timeout):
    """Why an endpoint did not answer a call, for the sentence that lists them."""
    if isinstance(exc, socket.timeout):
        return "no answer within %g s" % timeout
    status = getattr(reply, "status", None)
    return getattr(exc, "strerror", None) or (
        "HTTP %s, not etcd's v3 JSON" % status if status and status != 200 else describe(exc))


def _prefix_end(prefix):
    """The first key after every key under *prefix* (bytes)."""
    prefix = _bytes(prefix)
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _kv(kv):
    """(key, value, lease, mod_revision) of a KeyValue of etcd's JSON: the key as etcd holds it
    (bytes: keys are counted, paged and deleted by their bytes, whether UTF-8 or not), the value
    base64 (or _OVERSIZED)."""
    return base64.b64decode(kv["key"]), kv.get("value", ""), int(kv.get("lease", 0)), int(kv.get("mod_revision", 0))


def _read_user_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            user, sep, password = f.readline().rstrip("\r\n").partition(":")
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeMngrException("cannot read the etcd user file %s: %s" % (path, getattr(exc, "strerror", None) or exc))
    if not sep or not user:
        raise NodeMngrException("the etcd user file %s must hold USER:PASSWORD on its first line" % path)
    return user, password


def _when(epoch):
    """A moment for a status sentence: UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


_REPLY_HEAD = "<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><array><data>\n"
_REPLY_FOOT = "</data></array></value>\n</param>\n</params>\n</methodResponse>\n"
_STRUCT_END = "</struct></value>\n"


# A cluster entry's struct as dumps() writes it, but for its stale and seen members and its end
# (_STRUCT_END): filled with _mirrored(entry), it is what ClusterView.locate joins for a listing.
_ENTRY_PIECE = ("<value><struct>\n<member>\n<name>host</name>\n<value><string>%s</string></value>\n</member>\n"
                "<member>\n<name>port</name>\n<value><int>%d</int></value>\n</member>\n"
                "<member>\n<name>name</name>\n<value><string>%s</string></value>\n</member>\n"
                "<member>\n<name>info</name>\n%s</member>\n"
                "<member>\n<name>pid</name>\n<value><int>%d</int></value>\n</member>\n"
                "<member>\n<name>since</name>\n<value><dateTime.iso8601>%s</dateTime.iso8601></value>\n</member>\n")


def _mirrored(entry):
    """What the mirror keeps of a cluster entry (a dict of cluster_entry's): the values that fill
    _ENTRY_PIECE, marshalled where they are not numbers.  A piece is made from it in a
    microsecond, with no Python code between (a listing of 50,000 in a thread holds up the loop
    no longer than before), and it holds about half the memory of the piece."""
    since = entry["since"]
    info = dumps((entry["info"],), allow_none=False)[len("<params>\n<param>\n"):-len("</param>\n</params>\n")]
    # (host and name as dumps writes them: escaped, and a carriage return as &#13;, kept so)
    host, name = (xmlrpc.client.escape(entry[k]).replace("\r", "&#13;") for k in ("host", "name"))
    return (host, entry["port"], name, info, entry["pid"],
            "%04d%02d%02dT%02d:%02d:%02d" % (since.year, since.month, since.day, since.hour, since.minute, since.second))


class ClusterView:
    """The cluster view: this host's registry published under nodemngr/v1/ports/HOST/ in etcd,
    and every host's entries read back into a mirror, which locate and listCluster answer from.

    snapshot(): the Registrations held, read once, at start(); from then on changed() tells it of
    each change (from the service's thread: it only notes it).  Four threads of its own talk to
    etcd, so that none waits behind another:
    - the keeper renews the lease every ttl/3 seconds, each endpoint given a share of that, and
      grants a new lease when etcd has lost it (the publisher then writes every key back);
    - the confirmer, every ttl/6, confirms the mirror: etcd's count of the keys under the prefix
      must be its own, and its revision one the watch has brought (or the watch has spoken
      lately); a watch silent for too long is made again;
    - the publisher writes changes, coalesced (a burst is a few transactions of at most txn_ops
      operations and txn_bytes), and makes the HOST prefix match the registry at start, after a
      lost lease, and when it sees a key there that it did not write;
    - the watcher reads the prefix in pages, then follows it with an etcd watch from that
      revision, reading it again after a compaction or a broken watch.
    Only entries of nodemngr's exact shape with a live lease are mirrored; the others are counted
    by reason.  Each answer says whether it is stale (not confirmed within ttl, or this host's
    own publishing failing) and how many seconds ago it was seen current.  Nothing here is ever
    locked by the service: the mirror has a lock of its own, taken by the watcher and by the
    threads answering locate."""

    coalesce = 0.02     # seconds to gather changes into one transaction
    retry = 0.5         # seconds between two tries while etcd cannot be reached (doubling to 4)
    txn_ops = 128       # operations per transaction: etcd's default --max-txn-ops
    txn_bytes = 1 << 20     # and bytes (etcd's default --max-request-bytes is 1.5 MiB)
    resync_interval = 30.0  # seconds between two comparisons of this host's prefix with the registry

    def __init__(self, client, host, ttl, snapshot):
        self.client, self.host, self.ttl, self._snapshot = client, host, ttl, snapshot
        self.prefix = "%s%s/" % (CLUSTER_PREFIX, host)
        self._own = self.prefix.encode("utf-8")     # (keys are bytes from here on)
        self.lease_losses = self.rewrites = self.transactions = 0
        self._lease = None
        self._problems = {}         # what is wrong: "keeper", "publisher", "watcher" -> (since, sentence)
        self._lost_at = self._written_back_at = None
        self._registry = {}         # port -> Registration: the registry as changed() told it
        self._published = {}        # key (bytes) -> value this host wrote and etcd holds, as far as it knows
        self._wrote = {}            # key (bytes) -> (base64 value or None: deleted, lease): this host's last write
        self._dirty = set()         # ports changed since the last flush
        self._forced = set()        # of them, those to put whatever this host thinks etcd holds
        self._rewrite = "start"     # why the whole prefix must be made to match, or None
        self._reload = False        # the watcher must read the whole prefix again
        self._wake = threading.Condition()      # (guards the publisher's part: the above)
        self._stop = threading.Event()
        self._kick = threading.Event()          # the keeper must not wait: a write found the lease gone
        self._mirror = threading.Lock()         # (guards the mirror: what follows)
        self._pieces = {}           # host -> {port: entry}: listCluster's (entry: its values, a tuple)
        self._named = {}            # name -> {(host, port): entry}: locate's
        self._keys = {}             # every key (bytes) under the prefix -> (host, port, name) or why skipped
        self._changed_at = {}       # host -> time.time() when the watch last brought a change of its
        self._revision = None       # the revision the mirror reflects (None: never read)
        self._live = False          # the watch runs (etcd answered it), and nothing broke it since
        self._heard = 0.0           # time.monotonic() when the watch last said anything
        self._recreate = False      # the confirmer cut the watch to have it made again (not broken)
        self._confirmed = None      # time.monotonic() when etcd last confirmed the mirror current
        self.skipped = collections.Counter()    # keys skipped now, by reason
        self._threads = [threading.Thread(target=target, name="nodemngr-cluster-" + name, daemon=True)
                         for name, target in (("keeper", self._keep), ("confirmer", self._confirming),
                                              ("publisher", self._publish), ("watcher", self._follow))]

    # -- what the daemon calls -------------------------------------------------------------------

    def start(self):
        """Read the registry (snapshot()) and start publishing it and following the others'."""
        self._registry = {reg.port: reg for reg in self._snapshot()}
        for thread in self._threads:
            thread.start()

    def changed(self, changes):
        """The registry changed: *changes* is a list of (port, its Registration, or None when it
        was freed).  Only noted here: the publisher's thread writes it to etcd."""
        with self._wake:
            for port, reg in changes:
                if reg is None:
                    self._registry.pop(port, None)
                else:
                    self._registry[port] = reg
                self._dirty.add(port)
            self._wake.notify()

    def status(self):
        """"ok", or one sentence saying what is wrong and since when."""
        problems = list(self._problems.values())
        if problems:
            since, sentence = min(problems)
            return "%s (since %s)" % (sentence, _when(since))
        lost, back = self._lost_at, self._written_back_at
        if lost is not None and (back is None or back < lost):
            return "etcd lost this host's lease at %s; its keys are being written back" % _when(lost)
        if self._lease is None:     # (the view is stale until it has one: "ok" never says otherwise)
            return "etcd has not granted this host's lease yet"
        if self._revision is None:
            return "reading the cluster view from etcd"
        seen = self.seen()
        if seen == math.inf:
            return "the cluster view is being read again from etcd"
        if seen > self.ttl:
            return "etcd has not confirmed the cluster view for %d s" % seen
        return "ok"

    def seen(self):
        """Seconds since etcd last confirmed the mirror current (inf: never)."""
        confirmed = self._confirmed
        return math.inf if confirmed is None else time.monotonic() - confirmed

    def hosts(self, most=None):
        """Every host of the view, by name: (host, its entries' count, [(port, name)] by port, the
        first *most* of them, when the watch last brought a change of its (epoch seconds; None:
        none since this daemon read the view))."""
        with self._mirror:
            by_host = {}
            for where in self._keys.values():
                if isinstance(where, tuple):
                    by_host.setdefault(where[0], []).append(where[1:])
            changed = dict(self._changed_at)
        return [(host, len(entries), sorted(entries)[:most], changed.get(host)) for host, entries in sorted(by_host.items())]

    def stale(self):
        return self.seen() > self.ttl or "publisher" in self._problems or self._lease is None

    def metrics(self):
        """(name, kind, help, samples) of the cluster view's families for /metrics."""
        seen = self.seen()
        return [("nodemngr_cluster_entries", "gauge", "Entries of the cluster view (every host's).",
                 [("", sum(len(p) for p in list(self._pieces.values())))]),
                ("nodemngr_cluster_skipped", "gauge", "Keys under the prefix that nodemngr would not write, "
                 "skipped, by reason.", [('{reason="%s"}' % r, n) for r, n in sorted(self.skipped.items())]),
                ("nodemngr_cluster_seen_seconds", "gauge", "Seconds since etcd last confirmed the cluster view.",
                 [("", "%.3f" % seen if seen != math.inf else "+Inf")]),
                ("nodemngr_cluster_lease_losses_total", "counter", "Times etcd lost this host's lease.",
                 [("", self.lease_losses)]),
                ("nodemngr_cluster_rewrites_total", "counter", "Times this host's keys in etcd were found not to "
                 "match its registry and were written back.", [("", self.rewrites)]),
                ("nodemngr_cluster_lease_lost_timestamp_seconds", "gauge", "When etcd last lost this host's lease "
                 "(0: never).", [("", self._lost_at or 0)]),
                ("nodemngr_cluster_written_back_timestamp_seconds", "gauge", "When this host's keys were last "
                 "written back under a new lease (0: never).", [("", self._written_back_at or 0)])]

    def locate(self, name=None):
        """Every host's entries (those named *name* when given), sorted by host then port, each
        with stale and seen: Marshalled (in parts of 200 entries).  ClusterError when the mirror
        was never filled, or is stale and has nothing that matches."""
        stale, seen = self.stale(), self.seen()
        with self._mirror:
            if self._revision is None:
                raise ClusterError("the cluster view has not been read from etcd yet: %s" % self.status())
            if name is None:
                pieces = [(host, sorted(ports.items())) for host, ports in self._pieces.items()]
                pieces = [piece for _, ports in sorted(pieces) for _, piece in ports]
            else:
                pieces = [piece for _, piece in sorted(self._named.get(name, {}).items())]
        if stale and not pieces:
            raise ClusterError("the cluster view is stale (%s) and has %s" % (
                self.status(), "no entry" if name is None else "no port named %s" % describe(name)))
        tail = ("<member>\n<name>stale</name>\n<value><boolean>%d</boolean></value>\n</member>\n<member>\n"
                "<name>seen</name>\n<value><double>%r</double></value>\n</member>\n" % (
                    stale, round(min(seen, 1e9), 3))) + _STRUCT_END
        parts = []
        for i in range(0, len(pieces), 200):
            parts.append((tail.join(map(_ENTRY_PIECE.__mod__, pieces[i:i + 200])) + tail).encode("utf-8"))
            time.sleep(0)   # (this runs in a thread: the loop gets the GIL back at once, not in 5 ms)
        return Marshalled([_REPLY_HEAD.encode("ascii")] + parts + [_REPLY_FOOT.encode("ascii")])

    def stop(self, timeout=0.5):
        """Stop publishing and drop the lease: this host's keys go at once (a restart puts them
        back).  Within about *timeout* seconds, whatever etcd does."""
        with self._wake:
            self._stop.set()
            self._wake.notify()
        self._kick.set()
        self.client.close_watch()
        lease = self._lease
        if lease is not None:
            try:
                self.client.revoke(lease, timeout / len(self.client.endpoints))
            except (ClusterError, NodeMngrException):
                pass

    # -- the keeper: the lease -------------------------------------------------------------------

    def _keep(self):
        share = max(0.2, self.ttl / 3.0 / len(self.client.endpoints))     # each endpoint's time
        while not self._stop.is_set():     # (every third of the TTL; a sixth after a failure)
            if self._kick.wait(self.ttl / (3.0 if self._renew(share) else 6.0)):
                self._kick.clear()

    def _renew(self, share):
        """Renew the lease, or grant one when there is none (etcd lost it: its keys are then
        written back under the new one); whether etcd answered."""
        try:
            lease = self._lease
            if lease is not None and self.client.keepalive(lease, share) <= 0:
                self._lease_lost(lease)
            if self._lease is None:
                lease = int(self.client.grant(self.ttl, share))
                with self._wake:
                    self._lease = lease
                    self._rewrite = self._rewrite or "a new lease"
                    self._wake.notify()
            self._solved("keeper")
            return True
        except ClusterError as exc:
            self._problem("keeper", str(exc))
            return False

    def _lease_lost(self, lease):
        """etcd no longer knows *lease* (it expired, or was revoked behind this daemon's back): the
        keeper grants a new one now, not at its next renewal, and the publisher writes every key
        back under it."""
        with self._wake:
            if self._lease != lease:
                return      # (replaced already)
            self._lease, self._lost_at = None, time.time()
            self.lease_losses += 1
        log.warning("etcd lost this host's lease; writing its keys back")
        self._kick.set()

    # -- the confirmer: the mirror is current ----------------------------------------------------
    # (a thread of its own: the keep-alive must never wait behind a count on a slow endpoint)

    def _confirming(self):
        while not self._stop.wait(self.ttl / 6.0):
            self._confirm()

    def _confirm(self):
        """Ask etcd whether the mirror is current, by revision: the watch runs, the mirror holds as
        many keys as etcd has under the prefix, and it has every change up to etcd's revision --
        or, when etcd's revision is ahead, the watch has spoken within half a TTL (it runs, and
        what changed was elsewhere in etcd).  Changes on their way are waited for a little.  A
        watch silent for half a TTL while etcd's revision moved on is cut and made again from the
        mirror's revision: a flow that a NAT or a firewall dropped without a word brings nothing,
        and would be trusted for ever.  A mirror that drifted is read again."""
        if self._revision is None:
            return
        for _ in range(3):
            try:
                revision, total = self.client.count(CLUSTER_PREFIX)
            except ClusterError:
                return
            with self._mirror:
                agrees = total == len(self._keys) and self._live and not self._reload
                behind = self._revision < revision
            silent = time.monotonic() - self._heard >= self.ttl / 2.0
            if agrees and not (behind and silent):
                self._confirmed = time.monotonic()
                return
            if self._stop.wait(0.05):
                return
        if behind and silent and self._live:
            self._recreate = True
            if not self.client.close_watch():
                self._recreate = False
        elif self.seen() > 2 * self.ttl:    # the mirror drifted, or the watch hangs: read it again
            log.warning("the cluster view was not confirmed for %d s; reading it again", self.seen())
            self._reload = True
            self.client.close_watch()

    # -- the publisher: this host's registry -> etcd --------------------------------------------

    def _publish(self):
        delay = self.retry
        while not self._stop.is_set():
            lease = self._lease
            try:
                if lease is not None:
                    if self._rewrite or time.monotonic() >= self._next_resync:
                        self._resync(self._rewrite, lease)
                    else:
                        self._flush(lease)
                    if "publisher" in self._problems:
                        log.warning("etcd takes this host's writes again; its keys match its registry")
                    self._solved("publisher")
                    delay = self.retry
                self._wait_for_changes()
            except _NoSuchLease:
                self._lease_lost(lease)     # (no pause: the keys follow the new lease at once)
            except ClusterError as exc:
                self._problem("publisher", str(exc))
                self._stop.wait(delay)      # (changes meanwhile only gather: calls must not wake it)
                delay = min(delay * 2, 4.0)
            except Exception:       # a bug must not end publishing for good (logged once)
                if "publisher" not in self._problems:
                    log.exception("cluster view failed")
                self._problem("publisher", "the cluster view failed; the node manager's log has the details")
                self._stop.wait(delay)
                delay = min(delay * 2, 4.0)

    _next_resync = 0.0

    def _wait_for_changes(self):
        with self._wake:
            if self._lease is None:     # (the keeper says when it has one)
                self._wake.wait(1.0)
            elif not self._dirty and not self._rewrite and not self._stop.is_set():
                self._wake.wait(max(0.05, self._next_resync - time.monotonic()))
        if self._dirty:
            time.sleep(self.coalesce)   # let a burst gather

    def _desired(self, ports=None):
        """{key (bytes): value} of the registry (of *ports* only, when given)."""
        with self._wake:
            regs = list(self._registry.values()) if ports is None else [
                self._registry[p] for p in ports if p in self._registry]
        return {_bytes(key): value for key, value in (published_entry(self.host, reg) for reg in regs)}

    def _key(self, port):
        return b"%s%d" % (self._own, port)

    def _resync(self, why, lease):
        """Make the HOST prefix match the registry exactly: stale keys deleted, every key put with
        the current *lease* (a key of an earlier lease would expire with it).  why: what asked for
        it (None: the periodic comparison, which repairs a restored backup or a hand's change)."""
        with self._wake:
            self._dirty.clear()
            self._forced.clear()
            self._rewrite = None
        try:
            actual = {key: (value, kv_lease) for page, _ in self.client.range(self._own)
                      for key, value, kv_lease, _ in page}
            desired = self._desired()
            puts = {k: v for k, v in desired.items() if actual.get(k) != (_b64(v), lease)}
            deletes = [k for k in actual if k not in desired]
            self._write(puts, deletes, lease)
        except ClusterError:
            with self._wake:
                self._rewrite = self._rewrite or why or "the periodic comparison"
            raise
        with self._wake:
            self._published, self._next_resync = desired, time.monotonic() + self.resync_interval
            if lease == self._lease and self._lost_at is not None and (self._written_back_at or 0) < self._lost_at:
                self._written_back_at = time.time()     # (every key is now under a lease etcd knows)
        if (puts or deletes) and why != "start":
            self.rewrites += 1
            log.warning("wrote %d keys of this host back to etcd and deleted %d (%s)", len(puts), len(deletes),
                        why or "they did not match its registry")

    def _flush(self, lease):
        with self._wake:
            ports, self._dirty = self._dirty, set()
            forced, self._forced = {self._key(p) for p in self._forced}, set()
        if not ports:
            return
        desired = self._desired(ports)
        keys = {self._key(p) for p in ports}
        with self._wake:
            puts = {k: v for k, v in desired.items() if k in forced or self._published.get(k) != v}
        deletes = [k for k in keys if k not in desired]
        try:
            self._write(puts, deletes, lease)
        except ClusterError:
            with self._wake:
                self._dirty.update(ports)
                self._forced.update(int(k[len(self._own):]) for k in forced)
            raise
        with self._wake:
            for k in deletes:
                self._published.pop(k, None)
            self._published.update(puts)

    def _write(self, puts, deletes, lease):
        """In transactions of txn_ops operations and txn_bytes at most (one, when the change is
        that small).  What each key becomes is noted first, so that the watcher tells this host's
        writes from others' (which it repairs)."""
        ops = [("delete", k, None) for k in deletes] + [("put", k, v) for k, v in puts.items()]
        with self._wake:
            self._wrote.update((k, (None if v is None else _b64(v), lease)) for _, k, v in ops)
        chunk, size = [], 0
        for op in ops + [None]:
            cost = 0 if op is None else (len(op[1]) + len((op[2] or "").encode("utf-8"))) * 4 // 3 + 64
            if chunk and (op is None or len(chunk) >= self.txn_ops or size + cost > self.txn_bytes):
                self.client.txn({k: v for o, k, v in chunk if o == "put"}, [k for o, k, _ in chunk if o == "delete"],
                                lease)
                self.transactions += 1
                chunk, size = [], 0
            if op is not None:
                chunk.append(op)
                size += cost

    # -- the watcher: every host's entries -> the mirror ----------------------------------------

    def _follow(self):
        delay = self.retry
        while not self._stop.is_set():
            try:
                if self._revision is None or self._reload:
                    self._load()
                for events, through in self.client.watch(CLUSTER_PREFIX, self._revision + 1):
                    self._heard = time.monotonic()
                    if events or through is not None:
                        self._apply(events, through)
                    self._live = True
                    self._solved("watcher")
                    delay = self.retry
            except ClusterError as exc:
                self._live = False
                if self._stop.is_set():
                    return
                if str(exc) == "compacted":
                    self._reload = True
                elif self._recreate:    # (cut by the confirmer: made again at once, from where it was)
                    self._recreate = False
                else:
                    self._problem("watcher", str(exc))
                    self._stop.wait(delay)
                    delay = min(delay * 2, 4.0)
            except Exception:       # (a bug: logged once, and the view read again)
                # The mirror may be half changed: stale at once, never answered as fresh, until
                # it is read again.
                self._live, self._reload, self._confirmed = False, True, None
                if "watcher" not in self._problems:
                    log.exception("cluster view failed")
                self._problem("watcher", "the cluster view failed; the node manager's log has the details")
                self._stop.wait(delay)

    def _load(self):
        """Read the whole prefix, a page at a time, into a new mirror, then put it in place (after
        a compaction or a broken watch this host's own prefix is compared with its registry too)."""
        pieces, named, keys, skipped, revision = {}, {}, {}, collections.Counter(), 0
        for page, revision in self.client.range(CLUSTER_PREFIX):
            for key, value, lease, _ in page:
                self._enter(key, value, lease, pieces, named, keys, skipped)
        with self._mirror:
            first = self._revision is None
            self._pieces, self._named, self._keys, self.skipped = pieces, named, keys, skipped
            self._revision, self._confirmed, self._reload = revision, time.monotonic(), False
        with self._wake:    # (deletes of this host's done meanwhile, whose events were never seen)
            for key in [k for k, (value, _) in self._wrote.items() if value is None and k not in keys]:
                del self._wrote[key]
            if not first:
                self._rewrite = self._rewrite or "the cluster view was read again"
                self._wake.notify()

    def _apply(self, events, through):
        """Changes the watch brought, every one up to revision *through* (None: not known): into
        the mirror; one of this host's keys that it did not write so is repaired."""
        with self._mirror:
            now = time.time()
            for key, value, lease, _ in events:
                before = self._keys.get(key)
                self._leave(key)
                if value is not None:
                    self._enter(key, value, lease, self._pieces, self._named, self._keys, self.skipped)
                for where in (before, self._keys.get(key)):     # (the hosts whose entries changed)
                    if isinstance(where, tuple):
                        self._changed_at[where[0]] = now
            if through is not None:
                self._revision = max(self._revision, through)
        own = []
        with self._wake:
            for key, value, lease, _ in events:
                if not key.startswith(self._own):
                    continue
                wrote = self._wrote.get(key)
                if (wrote != (value, lease)) if value is not None else (wrote is not None and wrote[0] is not None):
                    own.append(key)     # (put, or deleted, by another than this host)
                elif value is None and wrote is not None:
                    del self._wrote[key]    # (this host's delete, done: nothing to remember, or forged
                                            # keys would grow the memory without end)
        if own:
            self._repair(own)

    @staticmethod
    def _enter(key, value, lease, pieces, named, keys, skipped):
        entry, why = cluster_entry(key, value, lease)
        if entry is None:
            keys[key] = why
            skipped[why] += 1
            return
        # (not sys.intern'ed: an interned string is immortal on Python 3.12, and these are whatever
        # any writer of the prefix put there)
        host, name = entry["host"], entry["name"]
        where = (host, entry["port"])
        piece = _mirrored(entry)
        pieces.setdefault(host, {})[where[1]] = piece
        named.setdefault(name, {})[where] = piece
        keys[key] = where + (name,)

    def _leave(self, key):
        was = self._keys.pop(key, None)
        if isinstance(was, str):
            self.skipped[was] -= 1
            if not self.skipped[was]:
                del self.skipped[was]
        elif was is not None:
            host, port, name = was
            self._pieces.get(host, {}).pop(port, None)
            if not self._pieces.get(host, True):
                del self._pieces[host]
            self._named.get(name, {}).pop((host, port), None)
            if not self._named.get(name, True):
                del self._named[name]

    def _repair(self, keys):
        """Keys under this host's prefix that another writer changed: made to match the registry."""
        ports = set()
        for key in keys:
            tail = key[len(self._own):]
            if tail.isdigit() and 1 <= int(tail) <= 65535 and b"%d" % int(tail) == tail:
                ports.add(int(tail))
            else:       # (not a port's key: deleted by the next rewrite)
                with self._wake:
                    self._rewrite = self._rewrite or "a key that is not a port's"
        log.info("repairing %d keys of this host that another writer changed in etcd", len(keys))
        with self._wake:       # (what etcd holds is not what this host wrote: put it, whatever it thinks)
            self._dirty.update(ports)
            self._forced.update(ports)
            self._wake.notify()

    # -- what is wrong ---------------------------------------------------------------------------

    def _problem(self, part, sentence):
        if not self._problems:      # once per outage, not per call
            log.warning("cluster view unavailable: %s; serving on, and trying again", sentence)
        since = self._problems.get(part, (time.time(), None))[0]
        self._problems[part] = (since, sentence)

    def _solved(self, part):
        if self._problems.pop(part, None) is not None and not self._problems:
            log.warning("etcd answers again; the cluster view is current")


# ---------------------------------------------------------------------------------------------
# The status page
# ---------------------------------------------------------------------------------------------
# GET / for people and GET /status.json for programs, the same data: built from the service's
# answers and the cluster view's, and served by the dispatcher (Dispatcher.add_page) under the
# token rule of every request.  No script and nothing from elsewhere: it refreshes itself with a
# meta refresh, and every value is escaped.

_PAGE_CSS = b"""body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; } th, td { text-align: left; padding: .15em .8em .15em 0; vertical-align: top; }
th { border-bottom: 1px solid #999; } tr:nth-child(even) td { background: #f3f3f3; }
td.info { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; max-width: 50em; }
progress { width: 24em; height: 1.1em; } .muted { color: #777; } .bad { color: #b00; }
"""


class StatusPages:
    """The status page (html()), its data as JSON (json()) and its stylesheet (css()), for
    *service* (a NodeMngr) and its cluster view, if any.  The page and the JSON are each a Sliced
    (made a slice per turn of the loop: nobody waits behind 25,000 registrations), shared by all
    who ask for the same state of the registry within a second (a hundred browsers cost one page
    and hold one copy).  Each registration's JSON is made once and kept while it is held, so that
    the JSON of 25,000 is mostly references to pieces made before."""

    rows = 500          # registrations, names and hosts the page shows; the others are counted (the JSON has them all)
    host_ports = 20     # ports of each host of the cluster view the page names; the others are counted
    refresh = 5         # seconds between two loads of the page by the browser

    def __init__(self, service):
        self.service = service
        self._json_pieces = {}      # port -> (Registration, its JSON as bytes)
        self._shared = {}           # "html" or "json" -> (service.changes, monotonic time, its Sliced)

    def css(self):
        return _PAGE_CSS

    def json(self):
        """The page's data, {version, host, range, registrations, reaps, names, uptime, cluster}: a
        Sliced whose reply is a list of the JSON's pieces."""
        return self._share("json", self._json_steps)

    def html(self):
        """The page (a Sliced): the range and how full it is, the registrations, the last reaps,
        the names remembered and the cluster view by host (the first *rows* of each, counted)."""
        return self._share("html", self._html_steps)

    def _share(self, kind, steps):
        """The page *kind* made, or being made, for this state of the registry less than a second
        ago (ages and uptime are shown to the second), or a new one."""
        now, shared = time.monotonic(), self._shared.get(kind)
        if shared is None or shared[0] != self.service.changes or now - shared[1] >= 1.0:
            shared = self._shared[kind] = (self.service.changes, now, Sliced(steps(), "GET of the status page"))
        return shared[2]

    def _json_steps(self):
        import json
        regs, summary = self.service.registrations(ordered=True), self._summary(self.rows)   # (one moment's)
        yield
        pieces, kept, cached = [b'{"registrations": ['], {}, self._json_pieces

        def entry(reg):
            made = cached.get(reg.port)
            if made is None or made[0] is not reg:
                made = (reg, json.dumps(_json_entry(reg)).encode("utf-8"))
            kept[reg.port] = made
            pieces.extend((b", ", made[1]) if len(pieces) > 1 else (made[1],))
        yield from _in_slices(regs, entry)
        self._json_pieces = kept
        names = sorted(self.service.remembered().items())
        pieces.append(b'], "names": [')
        yield
        yield from _in_slices(range(0, len(names), 64), lambda i: pieces.append(b", " * (i > 0) + json.dumps(
            [{"name": n, "port": p} for n, p in names[i:i + 64]])[1:-1].encode("utf-8")), every=1)
        pieces.append(b"], " + json.dumps(summary, sort_keys=True)[1:].encode("utf-8"))
        return pieces

    def _summary(self, host_ports):
        """Everything of the page's data but the registrations and names."""
        status = self.service.status()
        cluster = self.service.cluster
        return {"version": status["version"], "host": status["host"], "port": status["port"],
                "range": {"first": status["firstPort"], "last": status["lastPort"], "registered": status["registered"],
                          "free": status["free"]},
                "reaps": [dict(_json_entry(reg), reaped=_iso(when)) for reg, when in reversed(self.service.recent_reaps)],
                "reaped": status["reaped"], "uptime": round(status["uptime"], 1),
                "cluster": None if cluster is None else self._cluster(cluster, status, host_ports)}

    def _cluster(self, cluster, status, host_ports):
        """The cluster view's part: its state, and each host with its entries' count, the first
        *host_ports* of them and when the last change of its was seen."""
        seen = cluster.seen()
        return {"status": status["cluster"], "skipped": status["clusterSkipped"], "stale": cluster.stale(),
                "seen": None if seen == math.inf else round(seen, 1),
                "hosts": [{"host": host, "entries": count, "lastChange": None if when is None else _iso(when),
                           "ports": [{"port": port, "name": name} for port, name in first]}
                          for host, count, first, when in cluster.hosts(host_ports)]}

    def _html_steps(self):
        summary, regs = self._summary(self.host_ports), self.service.registrations(ordered=True)
        yield
        names, now, rows = sorted(self.service.remembered().items()), time.time(), []
        yield from _in_slices(regs[:self.rows], lambda reg: rows.append((
            reg.port, _shown_name(reg.info), _shown(reg.info), reg.pid or "",
            "" if not reg.pid else ("alive" if owner_alive(reg.pid, reg.start) else "ended"), _age(now - reg.since))))
        out = [self._html_head(summary), _html_table(("port", "name", "info", "pid", "owner", "age"), rows, "none"),
               _more(len(regs), self.rows, "registrations"),
               '<h2>Reaped lately (%d since the start)</h2>' % summary["reaped"],
               _html_table(("port", "name", "info", "pid", "reaped"), [
                   (reg.port, _shown_name(reg.info), _shown(reg.info), reg.pid, _age(now - when) + " ago")
                   for reg, when in reversed(self.service.recent_reaps)], "none"),
               '<h2>Names remembered (sticky ports)</h2>',
               _html_table(("name", "port"), [(printable(n, 300), p) for n, p in names[:self.rows]], "none"),
               _more(len(names), self.rows, "names")]
        yield
        out.append(self._cluster_html(summary["cluster"]))
        out.append('<p class="muted">The same as JSON: <a href="/status.json">/status.json</a></p></body></html>\n')
        return "".join(out).encode("utf-8")

    def _html_head(self, summary):
        import html
        esc, r = html.escape, summary["range"]
        size = r["last"] - r["first"] + 1
        return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                '<meta http-equiv="refresh" content="%d"><title>nodemngr on %s:%d</title>'
                '<link rel="stylesheet" href="/status.css"></head><body>'
                '<h1>nodemngr on %s:%d</h1><p class="muted">version %s, up %s, refreshed every %d s</p>'
                '<h2>Range %d-%d</h2><p><progress max="%d" value="%d"></progress> %d of %d registered, %d free'
                ' (the others are held by other programs)</p><h2>Registrations</h2>'
                % (self.refresh, esc(summary["host"]), summary["port"], esc(summary["host"]), summary["port"],
                   esc(summary["version"]), _age(summary["uptime"]), self.refresh, r["first"], r["last"], size,
                   r["registered"], r["registered"], size, r["free"]))

    def _cluster_html(self, cluster):
        import html
        if cluster is None:
            return '<h2>Cluster</h2><p class="muted">no cluster view (serve --cluster URL)</p>'
        hosts = cluster["hosts"]
        return ''.join((
            '<h2>Cluster</h2><p class="%s">%s%s; confirmed current by etcd %s</p>' % (
                "bad" if cluster["stale"] else "muted", html.escape(cluster["status"]),
                " (stale)" if cluster["stale"] else "",
                "never" if cluster["seen"] is None else _age(cluster["seen"]) + " ago"),
            _html_table(("host", "entries", "last change seen", "ports"), [
                (printable(h["host"], 300), h["entries"], h["lastChange"] or "none since this view was read",
                 ", ".join("%d %s" % (p["port"], printable(p["name"], 300)) for p in h["ports"]) + (
                     " and %d more" % (h["entries"] - len(h["ports"])) if h["entries"] > len(h["ports"]) else ""))
                for h in hosts[:self.rows]], "no host publishes"),
            _more(len(hosts), self.rows, "hosts")))


def _in_slices(items, do, every=64):
    """do(item) for each of *items*, giving the loop back (a yield) whenever a slice's budget
    (Sliced.budget) is spent, looked at every *every* items."""
    until = time.monotonic() + Sliced.budget
    for i, item in enumerate(items, 1):
        do(item)
        if i % every == 0 and time.monotonic() >= until:
            yield
            until = time.monotonic() + Sliced.budget


def _more(count, shown, what):
    """The line under a table cut at *shown* rows, saying how many of *what* it leaves out."""
    if count <= shown:
        return ""
    return ('<p class="muted">and %d more %s: /status.json and <code>nodemngr list</code> list them all</p>'
            % (count - shown, what))


def _json_entry(reg):
    """A registration as listPorts gives it, in JSON's terms (dateTime as ISO 8601 text, base64 as
    {"base64": ...})."""
    return {"port": reg.port, "name": name_of(reg.info) or "", "info": _json_value(reg.info), "pid": reg.pid,
            "since": _iso(reg.since), "uid": reg.uid}


def _iso(epoch):
    return utc(epoch).isoformat()


def _shown(info):
    """An info as a person reads it on the page (printable: no control characters)."""
    return printable(info if isinstance(info, str) else repr(info), 300)


def _shown_name(info):
    """The name of a registration as a person reads it: printable, as its info is (a name can
    hold a right-to-left override or a line separator that would disguise it)."""
    return printable(name_of(info) or "", 300)


def _html_table(columns, rows, empty):
    import html
    if not rows:
        return '<p class="muted">%s</p>' % empty
    esc = html.escape
    head = "".join("<th>%s</th>" % c for c in columns)
    body = "".join("<tr>%s</tr>" % "".join(
        '<td%s>%s</td>' % (' class="info"' if c == "info" else "", esc(str(v))) for c, v in zip(columns, row))
        for row in rows)
    return "<table><thead><tr>%s</tr></thead><tbody>%s</tbody></table>" % (head, body)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
# NodeMngrProxy and the calls the command line makes; they speak the wire, nothing else of the
# daemon.  A proxy that finds no daemon on a loopback address starts one (start_daemon).

def server_url(host, port, token=None):
    """The URL of a node manager, with the token as Basic-auth password when there is one."""
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    auth = "nodemngr:%s@" % urllib.parse.quote(token.decode("utf-8"), safe="") if token else ""
    return "http://%s%s:%d/RPC2" % (auth, host, port)


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout):
        super().__init__(use_builtin_types=True)
        self.timeout = timeout

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn

    def request(self, host, handler, request_body, verbose=False):
        bad = _XML_FORBIDDEN.search(request_body)
        if bad:
            raise BadArgumentError("cannot send the control character U+%04X: XML 1.0, and so XML-RPC, "
                                   "has no way to carry it" % ord(bad.group()))
        # xmlrpc.client writes a CR inside a string raw, and XML readers turn a raw CR into LF; the
        # marshaller writes no CR of its own, so every CR here belongs to a string
        return super().request(host, handler, request_body.replace(b"\r", b"&#13;"), verbose)


_XML_FORBIDDEN = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def server_proxy(host, port, token=None, timeout=10.0):
    """A plain xmlrpc.client.ServerProxy (no auto-start, no pid sent) to the node manager at
    host:port (token: bytes or None) whose calls give up after *timeout* seconds, and which
    writes any string XML can carry."""
    return xmlrpc.client.ServerProxy(server_url(host, port, token), transport=_TimeoutTransport(timeout),
                                     use_builtin_types=True)


def who_answers(host, port, token=None, timeout=2.0):
    """What answers a ping at host:port: "nodemngr" (a node manager, or a server that wants a
    token), "other" (another program answered), "silent" (it took the connection but said
    nothing within *timeout* seconds: a daemon still starting, or a busy one), or None (nothing
    listens, or what listened went away without a word, as a daemon on its way out does)."""
    try:
        text = server_proxy(host, port, token, timeout).ping()
    except socket.timeout:      # (an OSError)
        return "silent"
    except OSError:             # refused, reset, cut off
        return None
    except xmlrpc.client.ProtocolError as exc:
        return "nodemngr" if exc.errcode == 401 else "other"
    except (xmlrpc.client.Error, http.client.HTTPException, expat.ExpatError, ValueError):
        return "other"
    return "nodemngr" if isinstance(text, str) and text.startswith("NodeMngr at ") else "other"


def request_socket(info, kind="tcp", host="127.0.0.1", pid=None, address=None, timeout=10.0, token=None,
                   server=None):
    """Ask the node manager at local socket *address* (default: Settings().unix) for a port and
    the socket it bound to it: (port, socket.socket).  pid: the owner (default: this process).
    token: the token (bytes) to present, or None.  Fault, or OSError when nothing listens there.

    Anyone can bind an abstract name first, so the server must run as this user or root
    (SO_PEERCRED), or, for a caller with the token, as the user that serves the node manager's
    TCP port *server* (host, port); and what it passes must be a socket bound to the port it
    names (TCP: listening); else NodeMngrException."""
    params = (info, kind, host, os.getpid() if pid is None else pid)
    port, socks = _request_sockets("newSocket", params, 1, kind, address, timeout, token, server)
    return port, socks[0]


def request_sockets(info, count, consecutive=False, kind="tcp", host="127.0.0.1", pid=None, address=None, timeout=10.0,
                    token=None, server=None):
    """request_socket for a block (newSockets): (ports, [socket.socket]), *count* sockets passed in
    one handover, each bound to its port, in the order of the ports (ascending; consecutive if
    asked)."""
    params = (info, count, bool(consecutive), kind, host, os.getpid() if pid is None else pid)
    ports, socks = _request_sockets("newSockets", params, count, kind, address, timeout, token, server)
    if consecutive and ports[-1] - ports[0] != count - 1:
        for sock in socks:
            sock.close()
        raise xmlrpc.client.ResponseError("the reply to newSockets gave ports %s, not consecutive ones" % ports)
    return ports, socks


def _request_sockets(method, params, count, kind, address, timeout, token, server):
    """(result, sockets) of wire *method* (newSocket, newSockets) called with *params* on the local
    socket: the sockets checked against the ports the result names (an int, or a list of them)."""
    address = address or Settings().unix
    body = dumps(params, methodname=method, allow_none=False).encode("utf-8")
    auth = b"Authorization: Basic %s\r\n" % base64.b64encode(b"nodemngr:" + token) if token else b""
    request = (b"POST /RPC2 HTTP/1.1\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n"
               b"%sConnection: close\r\n\r\n%s" % (len(body), auth, body))
    fds, reply, socks = [], b"", []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(local_sockaddr(address))
        uid = peer_credentials(conn)[1]
        if uid is not None and uid not in (0, os.getuid()) and not (
                token and server is not None and tcp_listener_uid(*server) == uid):
            raise NodeMngrException("the local socket %s is served by uid %d, neither you nor root%s: not a node "
                                    "manager to trust with your ports; refusing it" % (
                                        address, uid, ", nor the user serving its TCP port" if token else ""))
        conn.sendall(request)
        while len(reply) < MAX_HEAD + MAX_BODY:
            data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * MAX_BLOCK),
                                                 getattr(socket, "MSG_CMSG_CLOEXEC", 0))
            for level, kind_, cdata in ancillary:
                if level == socket.SOL_SOCKET and kind_ == socket.SCM_RIGHTS:
                    fds.extend(struct.unpack("%di" % (len(cdata) // 4), cdata[:len(cdata) // 4 * 4]))
            if not data:
                break
            reply += data
    try:
        head, _, body = reply.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1:2]
        if status == [b"401"]:
            raise NodeMngrException("the node manager on the local socket %s wants a token: set NODEMNGR_TOKEN_FILE "
                                    "or --token-file" % address)
        if status != [b"200"]:
            raise xmlrpc.client.ProtocolError("local socket %s" % address, int(status[0]) if status and status[0].isdigit()
                                              else 0, describe(body.decode("utf-8", "replace")), {})
        result = xmlrpc.client.loads(body, use_builtin_types=True)[0][0]
        ports = [result] if type(result) is int else result
        if (len(fds) != count or type(ports) is not list or len(ports) != count
                or any(type(p) is not int for p in ports) or ports != sorted(set(ports))):
            raise xmlrpc.client.ResponseError("the reply to %s carried %d sockets and %s" % (method, len(fds), describe(result)))
        wanted = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
        for port in ports:
            sock = socket.socket(fileno=fds.pop(0))
            socks.append(sock)
            if (sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != wanted
                    or sock.getsockname()[1] != port
                    or (kind == "tcp" and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))):
                raise xmlrpc.client.ResponseError("the socket passed is not a %s socket bound to port %d" % (kind, port))
        return result, socks
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    finally:
        for fd in fds:
            os.close(fd)


def describe_call_error(exc, host, port):
    """One sentence for an error a client call raised."""
    if isinstance(exc, Fault):
        return exc.faultString
    if isinstance(exc, NodeMngrException):
        return str(exc)
    if isinstance(exc, xmlrpc.client.ProtocolError):
        if exc.errcode == 401:
            return "the node manager at %s:%d wants a token: set NODEMNGR_TOKEN_FILE or --token-file" % (host, port)
        return "the node manager at %s:%d answered HTTP %d %s" % (host, port, exc.errcode, exc.errmsg)
    if isinstance(exc, ConnectionRefusedError):
        return "no node manager answers at %s:%d" % (host, port)
    if isinstance(exc, OSError):
        return "cannot reach the node manager at %s:%d: %s" % (host, port, exc.strerror or exc)
    if isinstance(exc, http.client.HTTPException):
        return "%s:%d does not answer like a node manager: %s" % (host, port, describe(exc))
    return "unexpected reply from %s:%d: %s" % (host, port, describe(exc))


# What a call raises when the server is not a node manager or the connection broke
# (_CALL_ERRORS), and what a reply that is not XML-RPC raises (a Fault or an HTTP status is
# handled before these).
_CALL_ERRORS = (OSError, xmlrpc.client.Error, expat.ExpatError, http.client.HTTPException)
_REPLY_ERRORS = (xmlrpc.client.Error, http.client.HTTPException, expat.ExpatError, ValueError,
                 TypeError, OverflowError)
_POOL_SIZE = 8                  # idle connections a proxy keeps

# What who_answers says when a call can go ahead: it reaches a node manager, or it reaches
# another program, whose reply the call then reports.
_SOMEONE = ("nodemngr", "other")


class NodeMngrProxy:
    """A client of the node manager at *host*:*port* (else NODEMNGR_HOST/PORT, else 127.0.0.1:11800).

        >>> with NodeMngrProxy() as nm:
        ...     port = nm.newPort({"service": "echo"})
        ...     nm.delPort(port)
        0

    autostart: start a daemon when none answers (else NODEMNGR_AUTOSTART, default on; only for
    loopback addresses).  token_file: the token for a daemon that needs one (else
    NODEMNGR_TOKEN_FILE).  timeout: seconds to wait for one reply.

    Making a proxy opens nothing: it connects on its first call.  If nothing answers there and
    the address is a loopback one, it starts a daemon (start_daemon) and calls again.  Every
    failed call raises a NodeMngrException whose text is one line.  A proxy is safe to share
    between threads; each call borrows a kept-alive connection from a small pool.
    """

    def __init__(self, host=None, port=None, autostart=None, token_file=None, timeout=10.0):
        settings = Settings(host=host, port=port, autostart=autostart, token_file=token_file)
        self.host, self.port = settings.host, settings.port
        self.autostart, self.token_file = settings.autostart, settings.token_file
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
        return self._over_local_socket("newSocket", lambda address, token: request_socket(
            info, kind, host, pid, address, self.timeout, token, (self.host, self.port))[1])

    def newPorts(self, info, count, pid=None, consecutive=False):
        """A block of *count* ports (1 to 64) nobody else holds, registered with *info* all at once
        or not at all: a list of ints, ascending; with *consecutive*, first..first+count-1.  Freed
        by themselves once *pid* (by default this process) has ended; pid=0 for ports that outlive
        it.  NoFreePortError when the range cannot give them (it says the longest free run)."""
        return self.call("newPorts", info, count, os.getpid() if pid is None else pid, bool(consecutive))

    def delPorts(self, ports):
        """Give several ports back at once, all or none; 0.  UnknownPortError naming the first one
        that is not registered (then none was freed)."""
        return self.call("delPorts", list(ports))

    def newSockets(self, info, count, consecutive=False, kind="tcp", host="127.0.0.1", pid=None):
        """newSocket for a block of *count* ports (newPorts): a list of sockets the node manager
        bound (TCP: also listening), one per port in ascending order, passed over its local socket
        in one handover; the ports are registered to *pid* (by default this process)."""
        return self._over_local_socket("newSockets", lambda address, token: request_sockets(
            info, count, consecutive, kind, host, pid, address, self.timeout, token, (self.host, self.port))[1])

    def _over_local_socket(self, method, ask):
        """ask(address, token) on the daemon's local socket, starting a daemon when none listens
        there (as call() does); every failure a NodeMngrException of one line."""
        address = Settings(port=self.port).unix
        if address is None:
            raise NodeMngrException("%s needs the node manager's local socket, and NODEMNGR_UNIX is none" % method)
        for attempt in (0, 1):
            try:
                return ask(address, read_token(self.token_file))
            except Fault as fault:
                raise exception_from_fault(fault) from None
            except OSError as exc:
                if attempt or not self._should_start(exc, None):
                    raise NodeMngrException("no node manager answers on the local socket %s: %s" % (
                        address, exc.strerror or exc)) from None
                start_daemon(self.host, self.port, SPAWN_TIMEOUT, self.token_file)
            except _REPLY_ERRORS as exc:
                raise NodeMngrException("the local socket %s did not answer like a node manager: %s" % (
                    address, describe(exc))) from None

    def listPorts(self):
        """Every registered port: a list of {port, name, info, pid, since} dicts, sorted by port."""
        return self.call("listPorts")

    def lookup(self, name):
        """The ports registered under *name* (a string info, or a struct info's "name"), as
        listPorts lists them; [] when none."""
        return self.call("lookup", name)

    def namedPort(self, name, info=""):
        """The port registered under the explicit name *name*, registered now (for {name, info},
        held until delPort) if there is none: the same port every time, like port-for."""
        return self.call("namedPort", name, info)

    def locate(self, name):
        """The ports named *name* on every host of the cluster (etcd): a list of {host, port, name,
        info, pid, since, stale, seen} dicts, sorted by host then port, from the daemon's mirror
        (stale: not confirmed current by etcd lately; seen: seconds since it was).  ClusterError
        when there is no cluster view, or the view is stale and has no such port."""
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
            except Fault as fault:
                self._give_back(server)
                raise exception_from_fault(fault) from None
            except NodeMngrException:   # refused before sending (a character XML cannot carry)
                self._give_back(server)
                raise
            except OSError as exc:
                server("close")()
                if attempt or not self._should_start(exc, autostart):
                    raise NodeMngrException(self._explain(exc)) from None
                start_daemon(self.host, self.port, SPAWN_TIMEOUT, self.token_file)
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
            return server_proxy(self.host, self.port, read_token(self.token_file), self.timeout)

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
        return gone and is_loopback(self.host)

    def _explain(self, exc):
        """One line for a failed call, naming host:port (never a class repr or a traceback)."""
        where = "%s:%d" % (self.host, self.port)
        if isinstance(exc, socket.timeout):     # TimeoutError since 3.10
            return "the node manager at %s did not answer within %g s" % (where, self.timeout)
        if isinstance(exc, (OSError, xmlrpc.client.ProtocolError)):
            text = describe_call_error(exc, self.host, self.port)
            if isinstance(exc, ConnectionRefusedError) and not self.autostart:
                text += " (auto-start is off)"
            return printable(text, 300)
        if isinstance(exc, http.client.BadStatusLine):     # e.g. an SSH server's banner
            return "the server at %s is not a node manager: it answered \"%s\" where HTTP was due" % (
                where, printable(str(exc.line).strip(), 80))
        if isinstance(exc, http.client.IncompleteRead):
            return "the reply from %s was cut short" % where
        if isinstance(exc, http.client.HTTPException):     # e.g. a header line too long
            return "the server at %s sent a broken HTTP reply (%s)" % (
                where, printable(str(exc).strip(), 160) or type(exc).__name__)
        detail = "" if isinstance(exc, xmlrpc.client.Error) else " (%s)" % printable(str(exc).strip(), 160)
        return "the server at %s is not a node manager: its reply is not XML-RPC%s" % (where, detail)


def _unsendable(args):
    """Why *args* cannot be marshalled, or None if they can (so the reply was at fault)."""
    try:
        xmlrpc.client.dumps(tuple(args), "call")
    except (TypeError, OverflowError) as exc:
        return printable(re.sub(r"<class '([\w.]+)'>", r"\1", str(exc)).strip(), 160)
    return None


# -- auto-start --------------------------------------------------------------------------------
#
# start_daemon forks and execs ``sys.executable nodemngr.py serve`` detached (its own session, no
# terminal, output to PORT.log beside the state file, none of the caller's other open files,
# working folder "/") and waits until it answers, spawning again if that daemon gave up (as it
# may while the previous one is still on its way out).  Any number of processes doing so at once
# end with one daemon: they take turns at a lock file beside the state file, so only the first
# starts one, and should that lock fail them, the others' daemons find the port bound and exit.

_spawn_lock = threading.Lock()  # one auto-start at a time in this process
_turn_fds = set()               # the spawn lock file while this process holds its turn (_spawn_turn)
_RESPAWN_MIN = 0.2              # seconds between two spawns, at least
_RESPAWN_MAX = 2.0              # spawn again when nothing listens this long, whatever the last one does
_CLOSE_ALL_LIMIT = 65536        # above this many descriptors, close only up to the highest open
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _new_spawn_lock():
    global _spawn_lock      # a child forked while another thread held it must not inherit it held
    _spawn_lock = threading.Lock()
    for fd in _turn_fds:    # nor the spawn turn: an flock is the open file's, and would live on in it
        os.close(fd)
    _turn_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_spawn_lock)


def start_daemon(host=None, port=None, timeout=SPAWN_TIMEOUT, token_file=None):
    """Start a detached node manager for *host*:*port* unless one answers; wait until one does.
    token_file: the daemon's token (else NODEMNGR_TOKEN_FILE).

    A daemon started while the previous one is still on its way out may give up (the state file
    is still held); so while nothing listens and the daemon spawned last has exited, spawn again.
    Spawned daemons race safely: one binds the port, the others find it bound and exit."""
    settings = Settings(host=host, port=port, token_file=token_file)
    host, port = settings.host, settings.port
    deadline = time.monotonic() + timeout
    if not _spawn_lock.acquire(timeout=timeout):    # (another thread of ours took all of it)
        if who_answers(host, port) in _SOMEONE:
            return
        raise NodeMngrException("no node manager answered at %s:%d within %g s" % (host, port, timeout))
    try:
        log_path = os.path.abspath(settings.log_file) if settings.log_file else os.path.join(
            settings.state_folder(), "%d.log" % port)     # (a folder that cannot be made: an error)
        try:
            lock_path = os.path.join(settings.state_folder(), "%d.spawn.lock" % port)
        except NodeMngrException:       # (NODEMNGR_LOG_FILE set: the state folder was not needed)
            lock_path = None
        # half the time at most for the turn: a holder stuck (stopped) must not fail the others
        turn = _spawn_turn(lock_path, deadline - timeout / 2, lambda: who_answers(host, port))
        with turn, _ReadySignal() as ready:
            _spawn_until_answered(host, port, log_path, _daemon_argv(settings, log_path),
                                  _daemon_env(ready.address), deadline, timeout, ready.wait)
    finally:
        _spawn_lock.release()


def _spawn_until_answered(host, port, log_path, argv, env, deadline, timeout, wait):
    """start_daemon's loop: spawn, and spawn again while nothing listens, until one answers.
    wait(seconds): sleep that long, or less if a daemon said it is ready."""
    # (another thread of ours, or the client whose turn came first, may have started one)
    answer = who_answers(host, port)
    daemon, spawned_at, delay = None, None, 0.005
    while answer not in _SOMEONE:
        now = time.monotonic()
        if answer is None and _time_to_spawn(daemon, spawned_at, now):
            daemon, spawned_at, delay = _spawn_detached(argv, env, log_path), now, 0.005
        wait(delay)
        delay = min(delay * 2, 0.1)
        answer = who_answers(host, port)
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
    return waited >= _RESPAWN_MAX or (waited >= _RESPAWN_MIN and pid is not None and not owner_alive(pid))


def _last_words(log_path):
    """The last line of the daemon's log as " (it ends: LINE)", or "" if there is none."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " (it ends: %s)" % printable(lines[-1].strip(), 160) if lines else ""


def _daemon_argv(settings, log_path):
    """The daemon's command line.  It runs in "/", so every path it is given is absolute,
    including the relative ones the environment holds (NODEMNGR_STATE, NODEMNGR_TOKEN_FILE,
    NODEMNGR_UNIX).  It imports this file (_SERVE_BY_IMPORT) rather than run it as a script, so
    that its bytecode cache serves: a script is compiled every time, 25 to 50 ms of a cold start.
    The file's path is on the command line all the same, for ps to show."""
    argv = [os.path.abspath(sys.executable), "-c", _SERVE_BY_IMPORT, os.path.abspath(__file__), "serve",
            "--host", settings.host, "--port", str(settings.port), "--log-file", log_path]
    state = settings.given("state")
    if state and state.lower() != "none":
        argv += ["--state", os.path.abspath(state)]
    if settings.token_file:
        argv += ["--token-file", os.path.abspath(settings.token_file)]
    local = settings.given("unix") or ""
    if local and local.lower() != "none" and not local.startswith("@"):
        argv += ["--unix", os.path.abspath(local)]
    return argv


# python -c this FILE serve ...: imports the module at FILE by its path (bytecode cache and all),
# whatever sys.path holds
# whatever its name (an installed copy may have no .py), and runs main() with the arguments after it.
_SERVE_BY_IMPORT = ("import importlib.machinery, importlib.util, sys; loader = importlib.machinery.SourceFileLoader("
                    "'nodemngr', sys.argv[1]); module = importlib.util.module_from_spec(importlib.util.spec_from_loader("
                    "'nodemngr', loader)); sys.modules['nodemngr'] = module; loader.exec_module(module); "
                    "sys.exit(module.main(sys.argv[2:]))")
_SPAWNER_VAR = "NODEMNGR_SPAWNER_SOCKET"    # where the daemon a client spawns says READY=1 (spawner_notifier)


def _daemon_env(ready_address):
    """The daemon's environment: ours, with _SPAWNER_VAR set to *ready_address*, and without
    NOTIFY_SOCKET: a daemon started by a program that systemd runs must not speak to systemd as if
    it were that program."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", _SPAWNER_VAR)}
    if ready_address is not None:
        env[_SPAWNER_VAR] = ready_address
    return env


class _ReadySignal:
    """Where a daemon being spawned says "READY=1", once, as soon as it listens (spawner_notifier),
    so that its spawner asks at once rather than at its next poll, which could come up to 100 ms
    late.  A datagram socket at an abstract address (Linux);
    elsewhere, or if it cannot be made, address is None and wait() just sleeps.  Only datagrams
    of this user count (SO_PASSCRED): another user's cannot make a spawner spin."""

    def __init__(self):
        self.address, self._sock = None, None
        if not sys.platform.startswith("linux") or not hasattr(socket, "SO_PASSCRED"):
            return
        name = "nodemngr-spawn-%d-%s" % (os.getpid(), os.urandom(6).hex())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind("\0" + name)
        except OSError:
            sock.close()
            return
        self.address, self._sock = "@" + name, sock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._sock is not None:
            self._sock.close()

    def wait(self, seconds):
        """Sleep *seconds*, or less: until this user's daemon sends something."""
        end = time.monotonic() + seconds
        while self._sock is not None:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self._sock], [], [], left)[0]:
                return
            try:
                _, ancillary, _, _ = self._sock.recvmsg(64, socket.CMSG_SPACE(12), socket.MSG_DONTWAIT)
            except OSError:
                continue
            for level, kind, data in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS) and len(data) >= 12 and \
                        struct.unpack("3i", data[:12])[1] == os.getuid():
                    return
        time.sleep(max(0.0, end - time.monotonic()))


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


def _spawn_detached(argv, env, log_path):
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
            import subprocess
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, env=env,
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
                        os.execve(argv[0], argv, env)
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


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------
# The daemon in this process, from the bind to the exit: the parts above wired together, the
# sockets systemd passes, sd_notify, signals and the log.

_SIGHUP = getattr(signal, "SIGHUP", None)
_SIGNALS = [sig for sig in (signal.SIGTERM, signal.SIGINT, _SIGHUP) if sig is not None]


def run_daemon(settings, activated=([], None)):
    """Run the daemon that *settings* (a Settings) describe in this process until terminate,
    SIGTERM or SIGINT; return the exit status.  activated: the sockets a service manager passed
    (activated_sockets()), whose address then wins over the settings'."""
    if activated[0]:    # the service manager's socket says where it serves
        settings = settings.updated(host=activated[0][0].getsockname()[0], port=activated[0][0].getsockname()[1])
    host, port, first, last = settings.host, settings.port, settings.first_port, settings.last_port
    if first > last:
        raise NodeMngrException("first port %d is above last port %d" % (first, last))
    state, token = settings.state, settings.token
    if state is not None and settings.given("state") is None:
        ensure_private_folder(os.path.dirname(state))
    cluster = _cluster_settings(settings)
    if not is_loopback(host) and token is None:
        raise NodeMngrException("refusing to listen on %s without a token: anyone who can reach it could "
                                "take and free ports; give --token-file, or use a loopback address" % host)
    mask = _hold_signals()      # until the handlers are set: clients may signal once the port listens
    try:
        try:
            server = NodeMngrServer(host, port, settings.unix, activated)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise NodeMngrException("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc))
            if who_answers(host, port, token, 0.5) != "nodemngr":    # one answers in milliseconds
                raise NodeMngrException("port %d on %s is held by another program" % (port, host))
            print("nodemngr: a node manager is already serving on %s:%d; leaving it alone" % (host, port),
                  file=sys.stderr)
            return 3
        _catch_signals(server)
    finally:
        _release_signals(mask)      # (what came meanwhile is handled now)
    service = view = None
    try:
        try:
            service = NodeMngr(first, last, StateStore(state), address=(host, server.port),
                               reap_interval=server.reap_interval, busy_retry=server.busy_retry)
        except (OSError, sqlite3.Error) as exc:
            raise NodeMngrException("cannot open the state file %s: %s" % (state, getattr(exc, "strerror", None) or exc))
        service.on_terminate = server.request_stop
        if cluster is not None:
            view = ClusterView(*cluster, snapshot=service.registrations)
            view.start()
            service.cluster, service.on_change = view, view.changed
        server.notify, server.on_ready = sd_notifier(), spawner_notifier()
        _raise_descriptor_limit()
        log.info("node manager %s serving on %s:%d and %s, ports %d-%d, state %s, pid %d", __version__,
                 server.address[0], server.port, server.local_address or "no local socket", first, last,
                 state or "none", os.getpid())
        dispatcher = Dispatcher(service, token)
        if view is not None:
            dispatcher.add_families(view.metrics)
        pages = StatusPages(service)
        for path, render in ((b"/", pages.html), (b"/status.json", pages.json), (b"/status.css", pages.css)):
            dispatcher.add_page(path, render)
        server.serve(dispatcher, housekeeping=[(server.reap_interval, lambda: not service.reap_step()[0]),
                                               (server.tick, service.probe_busy_step)],
                     summary=service.summary, on_release=service.close)
        log.info("node manager stopped (%s)", server.stop_reason)
        return 0
    finally:
        server.close()
        if view is not None:
            view.stop()
        if service is not None:
            service.close()
        for sig in _SIGNALS:    # exiting: Python's own exit would put the default (fatal) ones back
            signal.signal(sig, signal.SIG_IGN)


def _host_name():
    """The FQDN, unless it is a loopback name ("localhost"), which every host has: then the host name."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.split(".")[0] in ("localhost", "ip6-localhost") else fqdn


def _cluster_settings(settings):
    """(EtcdClient, advertised host, TTL) of the cluster view *settings* ask for, or None when off."""
    if not settings.cluster:
        return None
    client = EtcdClient(settings.cluster, settings.given("cluster_ca"), settings.given("cluster_cert"),
                        settings.given("cluster_key"), settings.given("cluster_user_file"))
    advertise = settings.given("advertise_host") or _host_name()
    try:
        advertise.encode("utf-8")
    except UnicodeEncodeError:
        advertise = "/"
    if not advertise or "/" in advertise or is_loopback(advertise):
        raise NodeMngrException("%s cannot name this host in the cluster: every host needs a name of its own "
                                "(give --advertise-host)" % describe(advertise))
    return client, advertise, settings.cluster_ttl


def activated_sockets():
    """([inet, ...], unix): the listening stream sockets a service manager passed to this process
    (systemd's LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES; fds 3 on); ([], None) when none.  Inet
    sockets (IPv4 and IPv6, say) are XML-RPC listeners and a Unix one the local socket; names
    "http" and "local" in LISTEN_FDNAMES must agree.  A socket bound but not listening is made to
    listen.  The variables are then removed, so that no child sees them."""
    try:
        count, pid = int(os.environ.get("LISTEN_FDS", "")), int(os.environ.get("LISTEN_PID", ""))
    except ValueError:
        return [], None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if pid != os.getpid():
        return [], None
    inet, unix = [], None
    for i in range(max(0, min(count, 64))):
        fd = 3 + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise NodeMngrException("fd %d of LISTEN_FDS is not a socket: %s" % (fd, exc.strerror or exc))
        os.set_inheritable(fd, False)
        kind = "local" if sock.family == getattr(socket, "AF_UNIX", None) else "http"
        named = names[i] if i < len(names) else ""
        if named in ("http", "local") and named != kind:
            raise NodeMngrException("the socket passed as fd %d is named %s but is %s" % (
                fd, named, "a Unix socket" if kind == "local" else "an inet socket"))
        if sock.type != socket.SOCK_STREAM or (kind == "local" and unix is not None):
            log.warning("ignoring the socket passed as fd %d: not a stream socket, or a second Unix one", fd)
            sock.close()
            continue
        address = sock.getsockname()
        if not address or (kind == "http" and address[1] == 0):
            raise NodeMngrException("the socket passed as fd %d is not bound to an address" % fd)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(256)
        if kind == "http":
            inet.append(sock)
        else:
            unix = sock
    return inet, unix


def sd_notifier():
    """A function sending sd_notify lines ("READY=1", "STATUS=...", "STOPPING=1") to the
    service manager at NOTIFY_SOCKET ("@name" is abstract), or None when it is not set.  It never
    waits: a line that the receiver's queue cannot take now is dropped (MSG_DONTWAIT)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not hasattr(socket, "AF_UNIX"):
        return None
    address = local_sockaddr(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def notify(*lines):
        try:
            sock.sendto("\n".join(lines).encode("utf-8"), socket.MSG_DONTWAIT, address)
        except OSError as exc:
            log.debug("could not notify the service manager at %r: %s", address, exc)
    return notify


def spawner_notifier():
    """A function telling the client that spawned this daemon, once, that it serves: READY=1 to
    the abstract address that client listens at (_SPAWNER_VAR, taken out of the environment), never
    waiting; None when no client waits.  Once: nothing is ever sent there again, whoever holds
    that name later."""
    address = os.environ.pop(_SPAWNER_VAR, None)
    if not address or not address.startswith("@") or not hasattr(socket, "AF_UNIX"):
        return None

    def ready():
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(b"READY=1", socket.MSG_DONTWAIT, local_sockaddr(address))
            except OSError:     # (its queue full, or it has gone: it polls all the same)
                pass
    return ready


def _hold_signals():
    """Block SIGTERM, SIGINT and SIGHUP; return the mask to restore (None where there is none)."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _release_signals(mask):
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _catch_signals(server):
    """From the bind on, SIGTERM and SIGINT ask the server to stop and SIGHUP (logrotate's
    postrotate) reopens the log files: through the server's loop while it runs, at once before
    (opening the state file can take seconds) and after it.  None of them kills the daemon."""
    def on_signal(signum, frame):
        func, args = ((reopen_log_files, ()) if signum == _SIGHUP
                      else (server.request_stop, (signal.Signals(signum).name,)))
        if server.loop is not None and server.loop.is_running():
            server.loop.call_soon_threadsafe(func, *args)
        else:
            func(*args)
    for sig in _SIGNALS:
        signal.signal(sig, on_signal)


def reopen_log_files():
    """Reopen the log's files, which logrotate may have moved away (SIGHUP)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                stream = handler._open()
            except OSError as exc:      # the old file stays in use: a record must never fail
                sys.stderr.write("nodemngr: cannot reopen the log file %s: %s\n" % (handler.baseFilename, exc.strerror))
                continue
            else:
                if handler.stream is not None:
                    handler.stream.close()
                handler.stream = stream
            finally:
                handler.release()
    log.info("reopened the log file (SIGHUP)")


def _raise_descriptor_limit():
    """Lift the soft limit on open files to the hard one: each connection costs a descriptor."""
    if resource is None:
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 1 << 20) if hard != resource.RLIM_INFINITY
                                                        else 1 << 20, hard))
    except (OSError, ValueError):
        pass


def _setup_logging(settings):
    """Send the log to NODEMNGR_LOG_FILE (or --log-file), else stderr, at the level asked."""
    level, path = settings.log_level, settings.log_file
    try:
        handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    except OSError as exc:
        raise NodeMngrException("cannot open the log file %s: %s" % (path, exc.strerror or exc))
    handler.setFormatter(logging.Formatter("%(asctime)s nodemngr[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

_PYTHON_IGNORES = [getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)]
# The flags of serve that are settings (Settings.VARIABLES' names, as argparse names them).
_SERVE_SETTINGS = ("host", "port", "first_port", "last_port", "state", "token_file", "log_level", "log_file",
                   "unix", "cluster", "cluster_ttl", "advertise_host", "cluster_ca", "cluster_cert", "cluster_key",
                   "cluster_user_file")


def _int_arg(low, high, what):
    """An argparse type: an int from *low* to *high* (bounded_int), its error in one line."""
    def parse(text):
        try:
            return bounded_int(text, low, high, what)
        except NodeMngrException as exc:
            import argparse
            raise argparse.ArgumentTypeError(str(exc))
    return parse


_port_arg = _int_arg(1, 65535, "a port")
_pid_arg = _int_arg(0, _INT32_MAX, "a pid")
_count_arg = _int_arg(1, MAX_BLOCK, "--count")


# The subcommands that need a node manager start one when none answers (as the Python client
# does); those that only look at one, or stop it, never do.
_STARTING = ("new", "del", "list", "lookup", "port", "run", "locate")
_GLOBAL = ("--host", "--port", "--token-file")      # the global options, which take a value each


def _parser():
    import argparse

    class _ArgumentParser(argparse.ArgumentParser):
        def error(self, message):
            """One line, as every other error of the command line (argparse prints the usage too)."""
            self.exit(2, "%s: %s (see %s --help)\n" % (self.prog, message, self.prog))

    def global_options(parser, default):
        # Before the subcommand and after it alike; after it, only what is given is set
        # (SUPPRESS), so that a value given before is not reset to the default.
        parser.add_argument("--host", default=default, help="address of the node manager (env NODEMNGR_HOST, "
                            "default 127.0.0.1)")
        parser.add_argument("--port", type=_port_arg, default=default, help="its port (env NODEMNGR_PORT, "
                            "default %d)" % nmPort)
        parser.add_argument("--token-file", metavar="PATH", default=default, help="file holding the token; every "
                            "request then needs it (env NODEMNGR_TOKEN_FILE)")

    common = _ArgumentParser(add_help=False)
    global_options(common, argparse.SUPPRESS)
    parser = _ArgumentParser(
        prog="nodemngr", description="One node manager per host: hands out ports that nobody else holds, "
        "remembers what each is for, and takes them back. With no command it serves.",
        epilog="Run 'nodemngr help COMMAND' for the options of a command; the global options may also "
        "follow the command. Commands that need a node manager start one when none answers "
        "(NODEMNGR_AUTOSTART=0: never); ping, status and stop never do. Exit status: 0 done, 1 error, "
        "2 usage, 3 a node manager already serves that port.")
    parser.add_argument("--version", action="version", version="nodemngr " + __version__)
    global_options(parser, None)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", parents=[common], help="run the node manager in the foreground (the default)")
    s.add_argument("--first-port", type=_port_arg, help="first port handed out (env NODEMNGR_FIRST_PORT, default %d)" % firstPort)
    s.add_argument("--last-port", type=_port_arg, help="last port handed out (env NODEMNGR_LAST_PORT, default %d)" % lastPort)
    s.add_argument("--state", metavar="PATH", help="state file, or 'none' to keep nothing (env NODEMNGR_STATE, "
                   "default $XDG_RUNTIME_DIR/nodemngr/PORT.sqlite3 or TMPDIR/nodemngr-UID/PORT.sqlite3)")
    s.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env NODEMNGR_LOG_LEVEL, default INFO)")
    s.add_argument("--log-file", metavar="PATH", help="log here instead of stderr (env NODEMNGR_LOG_FILE)")
    s.add_argument("--cluster", metavar="URL[,URL...]", help="publish the registry to etcd at these v3 "
                   "endpoints (env NODEMNGR_CLUSTER; default: off)")
    s.add_argument("--advertise-host", metavar="HOST", help="this host's name in the cluster (env "
                   "NODEMNGR_ADVERTISE_HOST, default the FQDN)")
    s.add_argument("--cluster-ttl", type=_int_arg(2, 3600, "seconds"), metavar="SECONDS",
                   help="lease of this host's keys (env NODEMNGR_CLUSTER_TTL, default 10)")
    s.add_argument("--cluster-ca", metavar="FILE", help="CA certificates for https:// endpoints (env NODEMNGR_CLUSTER_CA)")
    s.add_argument("--cluster-cert", metavar="FILE", help="client certificate for etcd (env NODEMNGR_CLUSTER_CERT)")
    s.add_argument("--cluster-key", metavar="FILE", help="its key (env NODEMNGR_CLUSTER_KEY)")
    s.add_argument("--cluster-user-file", metavar="FILE", help="file holding USER:PASSWORD for etcd's auth "
                   "(env NODEMNGR_CLUSTER_USER_FILE)")
    s.add_argument("--unix", metavar="ADDR", help="the local socket: @NAME (abstract) or a path, or none "
                   "(env NODEMNGR_UNIX, default @nodemngr-PORT)")
    sub.add_parser("ping", parents=[common], help="say whether a node manager answers (never starts one)")
    sub.add_parser("status", parents=[common], help="show the node manager's status (never starts one)")
    li = sub.add_parser("list", parents=[common], help="list the registered ports: port, pid, age, info")
    li.add_argument("--cluster", action="store_true", help="every host's, from the cluster view: host, port, pid, age, info")
    lo = sub.add_parser("locate", parents=[common], help="list the ports named NAME on every host of the cluster")
    lo.add_argument("name", help="a string info, or a struct info's name")
    n = sub.add_parser("new", parents=[common], help="register a port and print it")
    n.add_argument("info", nargs="+", metavar="INFO", help="what the port is for (quote it if it has spaces)")
    n.add_argument("--pid", type=_pid_arg, default=0, help="free the port when this process ends (e.g. $$)")
    n.add_argument("--name", help="register {name: NAME, info: INFO}: NAME gets the same port back whenever "
                   "it is free (sticky)")
    n.add_argument("--count", type=_count_arg, metavar="N", help="a block of N ports (1-%d), all or none, one a line"
                   % MAX_BLOCK)
    n.add_argument("--consecutive", action="store_true", help="with --count: N consecutive ports")
    pt = sub.add_parser("port", parents=[common], help="print the port registered under the name NAME, "
                        "registering one (sticky, held until deleted) if there is none: the same port every time")
    pt.add_argument("name", metavar="NAME", help="the port's name")
    pt.add_argument("port_info", metavar="INFO", nargs="?", default="", help="what it is for (kept when it is registered)")
    k = sub.add_parser("lookup", parents=[common], help="list the ports registered under a name: port, pid, age, info")
    k.add_argument("name", help="a string info, or the name given to new --name or port")
    d = sub.add_parser("del", parents=[common], help="give a port back")
    d.add_argument("del_port", metavar="PORT", type=_port_arg, help="the port newPort gave")
    sub.add_parser("stop", parents=[common], help="stop the node manager (never starts one)")
    r = sub.add_parser("run", help="run a command on a port of its own: it gets the port in PORT and in place "
                       "of {port} in its arguments, and owns it (freed when it ends)",
                       usage="nodemngr [--host H] [--port P] [--token-file PATH] run [--name NAME] [--count N "
                       "[--consecutive]] [--socket] [--udp] [--host ADDR] [--port P] [--token-file PATH] -- CMD ARG...",
                       epilog="--host after 'run' is the address the socket is bound to; the node manager's own "
                       "address is --host before 'run', or NODEMNGR_HOST. With --count N the command gets PORT (the "
                       "first), PORTS (all, space-separated) and PORT0..PORT{N-1}, and {port0}.. in its arguments; "
                       "with --socket too, N sockets from fd 3 (LISTEN_FDS=N).")
    r.add_argument("--name", help="register {name: NAME, cmd: ...}: the port is sticky")
    r.add_argument("--count", type=_count_arg, metavar="N", help="a block of N ports (1-%d), registered all at once"
                   % MAX_BLOCK)
    r.add_argument("--consecutive", action="store_true", help="with --count: N consecutive ports")
    r.add_argument("--socket", action="store_true", help="pass the socket the node manager bound as fd 3 "
                   "(LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES: systemd's socket activation); with --count, N sockets "
                   "from fd 3")
    r.add_argument("--udp", action="store_true", help="a UDP socket (with --socket)")
    r.add_argument("--host", dest="bind_host", metavar="ADDR", default="127.0.0.1", help="the address the socket "
                   "is bound to (with --socket; default 127.0.0.1)")
    r.add_argument("--port", type=_port_arg, default=argparse.SUPPRESS, help="the node manager's port (env "
                   "NODEMNGR_PORT, default %d)" % nmPort)
    r.add_argument("--token-file", metavar="PATH", default=argparse.SUPPRESS, help="file holding the token "
                   "(env NODEMNGR_TOKEN_FILE)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command and its arguments")
    h = sub.add_parser("help", help="show the help of nodemngr, or of COMMAND")
    h.add_argument("topic", metavar="COMMAND", nargs="?", help="a command")
    return parser, sub.choices


def _with_command(argv, commands):
    """*argv* with "serve" put in where no command is given (nodemngr [OPTIONS] serves): after the
    global options and their values, when what comes next is not a command."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _GLOBAL:
            i += 2
        elif arg.split("=", 1)[0] in _GLOBAL:
            i += 1
        elif arg in commands or arg in ("-h", "--help", "--version"):
            return argv
        else:
            break
    return argv[:i] + ["serve"] + argv[i:]


def main(argv=None):
    """The command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parser()
    args = parser.parse_args(_with_command(argv, commands))
    if args.command == "help":
        if args.topic is None:
            parser.print_help()
        elif args.topic in commands:
            commands[args.topic].print_help()
        else:
            parser.error("there is no command %s; the commands are %s" % (args.topic, ", ".join(commands)))
        return 0
    if args.command == "new" and len(args.info) > 1:
        parser.error("new takes one INFO; quote it if it has spaces: nodemngr new '%s'" % " ".join(args.info))
    if getattr(args, "consecutive", False) and args.count is None:
        parser.error("--consecutive asks for a block of ports: give --count N too")
    try:
        if args.command == "serve":
            settings = Settings(**{name: getattr(args, name) for name in _SERVE_SETTINGS})
            _setup_logging(settings)
            return run_daemon(settings, activated_sockets())
        if args.command == "run":
            return _run_command(parser, args)
        return _run_client_command(args)
    except NodeMngrException as exc:
        print("nodemngr: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


def _run_client_command(args):
    """A command that asks the node manager: through a NodeMngrProxy, which starts one when none
    answers, for the commands of _STARTING (unless NODEMNGR_AUTOSTART=0); never for the others."""
    settings = Settings(host=args.host, port=args.port, token_file=args.token_file)
    host, port = settings.host, settings.port
    proxy = NodeMngrProxy(host, port, token_file=settings.token_file)
    starts = None if args.command in _STARTING else False
    if args.command == "ping":
        print(proxy.call("ping", autostart=starts))
    elif args.command == "status":
        status = proxy.call("status", autostart=starts)
        for key, value in sorted(status.items()):
            if key.startswith("cluster") and status.get("cluster") == "":
                continue    # (no cluster view: nothing to say of it)
            print("%-14s %s" % (key, round(value, 1) if isinstance(value, float) else value))
    elif args.command == "list":
        print(format_table(proxy.listCluster(), with_host=True) if args.cluster else format_table(proxy.listPorts()))
    elif args.command == "locate":
        entries = proxy.locate(args.name)
        if not entries:
            raise NodeMngrException("no host of the cluster has a port named %s" % describe(args.name))
        print(format_table(entries, header=False, with_host=True))
    elif args.command == "new":
        info = args.info[0] if args.name is None else {"name": args.name, "info": args.info[0]}
        if args.count is None:
            print(proxy.newPort(info, args.pid))
        else:
            print("\n".join(map(str, proxy.newPorts(info, args.count, args.pid, args.consecutive))))
    elif args.command == "port":
        print(proxy.namedPort(args.name, args.port_info))
    elif args.command == "lookup":
        entries = proxy.lookup(args.name)
        if not entries:
            raise NodeMngrException("no port is registered under the name %s" % describe(args.name))
        print(format_table(entries, header=False))
    elif args.command == "del":
        proxy.delPort(args.del_port)
    elif args.command == "stop":
        proxy.terminate()
        print("node manager at %s:%d is stopping" % (host, port))
    return 0


def _run_command(parser, args):
    """nodemngr run: register a port (--count: a block of them) to this process, then exec the
    command, which keeps the pid and so owns the ports."""
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("run needs a command: nodemngr run [--name NAME] -- CMD ARG...")
    if not args.socket and (args.udp or args.bind_host != "127.0.0.1"):
        parser.error("--udp and --host say how to bind the socket that --socket passes; give --socket too")
    line = " ".join(shlex.quote(a) for a in cmd)
    info = line if args.name is None else {"name": args.name, "cmd": line}
    proxy = NodeMngrProxy(args.host, args.port, token_file=args.token_file)     # (it starts a daemon if none answers)
    env = dict(os.environ)
    fdname = re.sub(r"[^A-Za-z0-9_.-]", "_", args.name or "nodemngr")[:255]
    if args.count is not None:
        if args.socket:
            socks = proxy.newSockets(info, args.count, args.consecutive, "udp" if args.udp else "tcp", args.bind_host)
            ports = [sock.getsockname()[1] for sock in socks]
            _pass_from_fd_3(socks)
            env.update(LISTEN_FDS=str(len(socks)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join([fdname] * len(socks)))
        else:
            ports = proxy.newPorts(info, args.count, None, args.consecutive)    # (owned by this process)
        env.update(PORT=str(ports[0]), PORTS=" ".join(map(str, ports)))
        env.update(("PORT%d" % i, str(port)) for i, port in enumerate(ports))

        def expand(match):      # {port}: the first; {portI}: the I-th, from 0; past the last: left as it is
            i = int(match.group(1) or 0)
            return str(ports[i]) if i < len(ports) else match.group(0)
        _exec_command([re.sub(r"\{port([0-9]*)\}", expand, a) for a in cmd], env)
        try:
            proxy.delPorts(ports)
        except NodeMngrException:
            pass
        return 127
    if args.socket:
        sock = proxy.newSocket(info, "udp" if args.udp else "tcp", args.bind_host)
        given = sock.getsockname()[1]
        if sock.fileno() == 3:      # (stdin was closed, so the socket came in as fd 3)
            os.set_inheritable(sock.detach(), True)
        else:
            os.dup2(sock.fileno(), 3)   # (inheritable: the command gets it)
            sock.close()
        env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=fdname)
    else:
        given = proxy.newPort(info)     # (owned by this process, which the command becomes)
    env["PORT"] = str(given)
    _exec_command([a.replace("{port}", str(given)) for a in cmd], env)
    try:
        proxy.delPort(given)
    except NodeMngrException:
        pass
    return 127


def _pass_from_fd_3(socks):
    """Make *socks* fds 3, 4, ... (inheritable), in order, as systemd passes sockets; each is moved
    above that span first, so that putting one in place never closes another."""
    fds = []
    for sock in socks:
        fd = sock.detach()
        if 3 <= fd < 3 + len(socks):
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(socks))
            os.close(fd)
            fd = moved
        fds.append(fd)
    for i, fd in enumerate(fds):
        os.dup2(fd, 3 + i)      # (inheritable: the command gets it)
        os.close(fd)


def _exec_command(argv, env):
    """Exec *argv*; if it cannot be run, say so in one line and return (the caller gives its ports back)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:      # (None when the caller closed it)
            stream.flush()
    # Python ignores SIGPIPE and SIGXFSZ, and exec keeps what is ignored: the command gets them
    # as a shell would give them (as Popen's restore_signals does), or `yes | head` fails loudly.
    kept = [(sig, signal.signal(sig, signal.SIG_DFL)) for sig in _PYTHON_IGNORES]
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as exc:
        for sig, handler in kept:
            signal.signal(sig, handler)
        print("nodemngr: cannot run %s: %s" % (argv[0], exc.strerror or exc), file=sys.stderr)


def format_table(entries, now=None, header=True, with_host=False):
    """listPorts entries as an aligned text table: PORT PID AGE INFO; with_host, the cluster view's
    (locate's), HOST PORT PID AGE SEEN INFO, SEEN saying how long ago etcd confirmed the view, and
    "stale" when that is too long ago.  Every value is printable(): an info cannot forge rows or
    drive the terminal."""
    now = utc(time.time()) if now is None else now
    rows = [("HOST",) * with_host + ("PORT", "PID", "AGE") + ("SEEN",) * with_host + ("INFO",)] if header else []
    for e in entries:
        since = e["since"]
        if not isinstance(since, datetime):
            since = datetime.strptime(str(since), "%Y%m%dT%H:%M:%S")
        info = printable(e["info"] if isinstance(e["info"], str) else repr(e["info"]))
        seen = (_age(e.get("seen", 0)) + (" stale" if e.get("stale") else ""),) * with_host
        rows.append((printable(e.get("host")),) * with_host + (
            str(e["port"]), str(e["pid"]), _age((now - since).total_seconds())) + seen + (info,))
    columns = len(rows[0]) - 1 if rows else 0
    widths = [max(len(r[i]) for r in rows) for i in range(columns)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(columns)) + "  " + r[-1] for r in rows)


# ---------------------------------------------------------------------------------------------
# Legacy names
# ---------------------------------------------------------------------------------------------
# nmPort, firstPort, NodeMngrException, NodeMngr and NodeMngrProxy are defined above, under the
# 1999 module's names; nm is its shared proxy.

class _LazyProxy:
    """``nm``: a NodeMngrProxy made on first use, so that importing nodemngr spawns nothing,
    opens nothing and fails nothing (a wrong NODEMNGR_PORT fails the first call, not the import)."""

    def __init__(self):
        self._proxy = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        if name.startswith("_"):    # copy and pickle look for these on an instance without __init__
            raise AttributeError(name)
        with self._lock:
            if self._proxy is None:
                self._proxy = NodeMngrProxy()
        return getattr(self._proxy, name)

    def __repr__(self):
        return "<nodemngr.nm: %s>" % ("not used yet" if self._proxy is None else self._proxy)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._proxy is not None:
            self._proxy.close()


nm = _LazyProxy()

# pytest: `pytest -p nodemngr`, and the pytest11 entry point (which names this module), load the
# fixtures of pytest_nodemngr.py, installed or not.  This module only names that one, which
# imports pytest.  (The entry point names this module rather than that one so that `-p
# pytest_nodemngr`, the 1.1 way, still works where the package is installed.)
pytest_plugins = ["pytest_nodemngr"]


if __name__ == "__main__":
    sys.exit(main())
