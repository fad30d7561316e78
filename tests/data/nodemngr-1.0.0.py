#!/usr/bin/env python3
"""nodemngr -- one node manager per host: hands out ports, remembers what they are for.

The node manager gives each local process of a distributed application a port that no other holder
has, records what the port is for and who holds it, and takes it back when asked or when the holder
dies.  It is a modern re-implementation of the 1999 Open-ORB ``nodemngr`` module (``ping``,
``newPort``, ``delPort``, ``terminate``) that speaks XML-RPC, so any language can call it.

Run it (this one file, Python 3.8+, standard library only)::

    $ python3 nodemngr.py                 # serve on 127.0.0.1:11800, ports 11801-12800
    $ nodemngr new "echo service"         # from another shell
    11801
    $ nodemngr list
    PORT   PID  AGE  INFO
    11801  0    3s   echo service
    $ nodemngr del 11801; nodemngr stop

Use it from Python (the client lives in nodemngr_proxy.py and starts a daemon if none answers)::

    >>> from nodemngr import nm
    >>> p = nm.newPort("my capsule")
    >>> nm.delPort(p)
    0
"""

import argparse
import base64
import binascii
import email.utils
import errno
import heapq
import hmac
import inspect
import ipaddress
import logging
import math
import os
import re
import reprlib
import selectors
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import xmlrpc.client
import zlib
from collections import namedtuple
from datetime import datetime, timezone
from xml.parsers import expat
from xmlrpc.client import Fault
from xmlrpc.server import SimpleXMLRPCServer

__all__ = [
    "nmPort", "firstPort", "lastPort", "NodeMngrException", "UnknownPortError", "NoFreePortError",
    "BadArgumentError", "ForbiddenError", "StoreError", "PortAllocator", "StateStore", "NodeMngr",
    "NodeMngrServer", "NodeMngrProxy", "nm", "main",
]
__version__ = "1.0.0"

log = logging.getLogger("nodemngr")

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

nmPort = 11800          #: the node manager's own port (legacy name)
firstPort = 11801       #: the first port it hands out (legacy name)
lastPort = 12800        #: the last port it hands out

MAX_INFO_BYTES = 4096   # an info value, marshalled
MAX_INFO_DEPTH = 16     # nesting of arrays and structs in an info value
MAX_BODY = 64 * 1024    # a request body, after any Content-Encoding is undone
MAX_HEAD = 16 * 1024    # request line and headers together
MAX_HEADERS = 64
IDLE_TIMEOUT = 30.0     # a keep-alive connection with no request
STALL_TIMEOUT = 10.0    # from the first byte of a request to the last byte of its reply
MAX_CONNECTIONS = 128
REAP_INTERVAL = 2.0     # seconds between two looks at the owners' liveness
BUSY_RETRY = 1.0        # a port another program holds is not probed again for this long
SPAWN_TIMEOUT = 10.0    # how long a client waits for a daemon it started

# Fault codes of the wire protocol (CONTRACT.md).
UNKNOWN_PORT, NO_FREE_PORT, BAD_ARGUMENT, FORBIDDEN = 1, 2, 3, 4
NOT_WELL_FORMED, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)

_INT32_MIN, _INT32_MAX = -2 ** 31, 2 ** 31 - 1
_STORE_APP_ID = 0x4E4D4E47      # "NMNG": marks a state file as ours
_STORE_SCHEMA = 1

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


class ForbiddenError(NodeMngrException, PermissionError):
    """An administrative call from a peer that is not on this host (fault 4)."""

    faultCode = FORBIDDEN


class StoreError(NodeMngrException):
    """The state could not be saved, so the change was not made (fault -32603)."""

    faultCode = INTERNAL_ERROR


_FAULT_CLASSES = {UNKNOWN_PORT: UnknownPortError, NO_FREE_PORT: NoFreePortError,
                  BAD_ARGUMENT: BadArgumentError, FORBIDDEN: ForbiddenError}


def exception_from_fault(fault):
    """The NodeMngrException a client raises for an xmlrpc.client.Fault."""
    cls = _FAULT_CLASSES.get(fault.faultCode)
    if cls is None:
        return NodeMngrException(fault.faultString, fault.faultCode)
    return cls(fault.faultString)


# ---------------------------------------------------------------------------------------------
# Owners: a pid and the start time of that process, so that a reused pid is a different owner
# ---------------------------------------------------------------------------------------------

_HAVE_PROC = os.path.isdir("/proc/self") and os.path.exists("/proc/self/stat")


def process_start_time(pid):
    """The start time of process *pid* (clock ticks since boot), 0 where it cannot be read, or
    None if there is no live process with that pid (zombies count as dead)."""
    if _HAVE_PROC:
        try:
            fd = os.open("/proc/%d/stat" % pid, os.O_RDONLY)
        except OSError:
            return None
        try:
            stat = os.read(fd, 1024)
        except OSError:
            return None
        finally:
            os.close(fd)
        fields = stat.rpartition(b")")[2].split()
        if len(fields) < 20 or fields[0] in (b"Z", b"X", b"x"):
            return None
        return int(fields[19])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def owner_alive(pid, start):
    """True while the process that registered as (*pid*, *start*) runs."""
    now = process_start_time(pid)
    return now is not None and (not start or not now or now == start)


# ---------------------------------------------------------------------------------------------
# Host checks: is a port bound by anybody on this host?
# ---------------------------------------------------------------------------------------------

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


def port_is_bindable(port):
    """True if no process on this host has *port* bound, TCP or UDP, IPv4 or IPv6.

    A bind on the wildcard address conflicts with every holder of the port; a TCP socket in
    TIME_WAIT does not count (SO_REUSEADDR), as servers reuse such ports at once.
    """
    global _PROBES
    if _PROBES is None:
        _PROBES = _probes()
    for family, kind, address, v6only in _PROBES:
        s = socket.socket(family, kind)
        try:
            if v6only:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def is_loopback(host):
    """True for 127.0.0.0/8, ::1, an IPv4-mapped loopback and names that resolve only there."""
    host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return False
        return bool(infos) and all(is_loopback(info[4][0]) for info in infos)
    if getattr(addr, "ipv4_mapped", None) is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# ---------------------------------------------------------------------------------------------
# Values: what an info may be, and how it is checked
# ---------------------------------------------------------------------------------------------

_PARAMS_OVERHEAD = len(xmlrpc.client.dumps((0,))) - len("<value><int>0</int></value>")
# What xmlrpc.client.dumps writes for one string param and for an int reply, filled in directly: the
# two shapes of nearly every call (tests/test_values.py checks they match dumps byte for byte).
_STRING_PARAMS = "<params>\n<param>\n<value><string>%s</string></value>\n</param>\n</params>\n"
_INT_REPLY = ("<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><int>%d</int>"
              "</value>\n</param>\n</params>\n</methodResponse>\n")


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


def check_port(port):
    """*port* as an int from 1 to 65535, else BadArgumentError naming the value."""
    if type(port) is not int or not 1 <= port <= 65535:
        raise BadArgumentError("port must be an integer from 1 to 65535, not %s" % describe(port))
    return port


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlevel = 2
_XMLRPC_TYPES = ((bool, "a boolean"), (int, None), (float, "a double"), (str, None), (bytes, "base64"),
                 (datetime, "a dateTime.iso8601"), (list, "an array"), (dict, "a struct"),
                 (type(None), "nil"))


def _show(value, limit=80):
    """A short, safe repr of a value a client sent (bounded in length and depth), for logs."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Shown:
    """_show(value), computed only if a log record is actually written."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __str__(self):
        return _show(self.value)


def describe(value):
    """A value a client sent, as a caller in any language would name it: 7, "text", a struct."""
    for kind, name in _XMLRPC_TYPES:
        if isinstance(value, kind):
            return _show(value, 40) if name is None else name
    return "a value of an unknown type"


# ---------------------------------------------------------------------------------------------
# The allocator: pure logic, no sockets, no files
# ---------------------------------------------------------------------------------------------

Registration = namedtuple("Registration", "port info pid start since blob")
Registration.__doc__ = """One held port: its info, owner (pid 0 = none, start time), since (epoch
seconds) and blob (info marshalled, as the state file keeps it)."""


class PortAllocator:
    """The ports of ``[first, last]``: which are held, by whom, and which is the lowest free one.

    Free ports sit in a heap, so taking the lowest and giving one back are O(log n).  Ports that
    the host check refused are set aside for BUSY_RETRY seconds rather than probed on every call.
    Not thread-safe: NodeMngr serialises calls.
    """

    def __init__(self, first, last, registrations=(), clock=time.monotonic):
        if not 1 <= first <= last <= 65535:
            raise BadArgumentError("the port range %s-%s is not within 1-65535 with first <= last" % (first, last))
        self.first, self.last = first, last
        self.held = {}          # port -> Registration
        self.owners = {}        # (pid, start) -> set of ports
        self._busy = []         # heap of (retry_at, port): refused by the host check lately
        self._clock = clock
        for reg in registrations:
            self._hold(reg)
        self._free = [p for p in range(first, last + 1) if p not in self.held]   # sorted: a heap

    def __len__(self):
        return len(self.held)

    @property
    def free_count(self):
        return len(self._free) + len(self._busy)

    def take(self, usable):
        """Remove and return the lowest free port that ``usable(port)`` accepts, or None."""
        now = self._clock()
        if self._busy and self._busy[0][0] <= now:
            while self._busy and self._busy[0][0] <= now:
                heapq.heappush(self._free, heapq.heappop(self._busy)[1])
        while self._free:
            port = heapq.heappop(self._free)
            if usable(port):
                return port
            heapq.heappush(self._busy, (now + BUSY_RETRY, port))
        return None

    def untake(self, port):
        """Give back a port from take() that could not be registered after all."""
        heapq.heappush(self._free, port)

    def hold(self, reg):
        """Record a port taken with take()."""
        self._hold(reg)

    def release(self, port):
        """Forget a held port and make it free again; return its Registration."""
        reg = self.held.pop(port)
        key = (reg.pid, reg.start)
        if reg.pid:
            ports = self.owners[key]
            ports.discard(port)
            if not ports:
                del self.owners[key]
        if self.first <= port <= self.last:
            heapq.heappush(self._free, port)
        return reg

    def _hold(self, reg):
        self.held[reg.port] = reg
        if reg.pid:
            self.owners.setdefault((reg.pid, reg.start), set()).add(reg.port)

    def recall_all_busy(self):
        """Probe every set-aside port again on the next take() (before saying none is free)."""
        while self._busy:
            heapq.heappush(self._free, heapq.heappop(self._busy)[1])


# ---------------------------------------------------------------------------------------------
# The state store: sqlite3, one row per held port
# ---------------------------------------------------------------------------------------------

def default_state_path(port):
    """$XDG_RUNTIME_DIR/nodemngr/PORT.sqlite3, else TMPDIR/nodemngr-UID/PORT.sqlite3."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        folder = os.path.join(runtime, "nodemngr")
    else:
        folder = os.path.join(tempfile.gettempdir(), "nodemngr-%s" % _uid())
    return os.path.join(folder, "%d.sqlite3" % port)


def _uid():
    return os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")


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


class _NotOurs(Exception):
    pass


class StateStore:
    """The held ports, saved in a sqlite3 file so that they survive a crash of the daemon.

    Every change is its own transaction, committed before the caller is answered.  A commit has
    reached the operating system when it returns, which is all that a ``kill -9`` of the daemon
    can lose.  WAL without fsync (synchronous=OFF): with fsync, each checkpoint flushed megabytes
    under load and stalled every caller for up to 0.4 s.  A power cut or an OS crash can then lose
    or damage the file, but it also ends every local process that held those ports; a damaged
    file is moved aside at start, and a port in use stays protected by the bind check.
    Exclusive locking: a second process cannot use the file
    while a daemon holds it, and the WAL index lives in memory rather than in a mapped -shm file
    (a mapped file that turns read-only kills the process with SIGBUS; a write just fails).
    ``StateStore(None)`` keeps nothing (``--state none``).
    """

    def __init__(self, path):
        self.path = path
        self._db = None
        if path is not None:
            self._db = self._open_or_move_aside(path)

    def load(self):
        """Every saved Registration."""
        if self._db is None:
            return []
        rows = self._db.execute("SELECT port, info, pid, start, since FROM ports").fetchall()
        return [Registration(port, unmarshal_info(blob), pid, start, since, blob)
                for port, blob, pid, start, since in rows]

    def add(self, reg):
        self._write("INSERT INTO ports(port, info, pid, start, since) VALUES (?, ?, ?, ?, ?)",
                    (reg.port, reg.blob, reg.pid, reg.start, reg.since))

    def remove(self, ports):
        if len(ports) == 1:
            self._write("DELETE FROM ports WHERE port = ?", (ports[0],))
        else:
            self._write("DELETE FROM ports WHERE port = ?", [(p,) for p in ports], many=True)

    def close(self):
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, sql, args, many=False):
        if self._db is None:
            return
        try:
            if many:    # one transaction: all or nothing (autocommit mode would do each alone)
                self._db.execute("BEGIN")
                self._db.executemany(sql, args)
                self._db.execute("COMMIT")
            else:
                self._db.execute(sql, args)
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
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            return self._open(path)
        except (sqlite3.DatabaseError, _NotOurs, ValueError, xmlrpc.client.Error, expat.ExpatError) as exc:
            aside = "%s.bad-%s" % (path, time.strftime("%Y%m%dT%H%M%S"))
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.replace(path + suffix, aside + suffix)
            log.warning("state file %s is unreadable or not a nodemngr state file (%s); moved it aside "
                        "to %s and started empty", path, exc, aside)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            return self._open(path)

    @staticmethod
    def _open(path):
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            try:
                db.execute("BEGIN EXCLUSIVE")
                db.execute("COMMIT")
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
                    "PRAGMA application_id=%d; PRAGMA user_version=%d;"
                    "CREATE TABLE ports(port INTEGER PRIMARY KEY, info TEXT NOT NULL,"
                    " pid INTEGER NOT NULL, start INTEGER NOT NULL, since REAL NOT NULL);"
                    % (_STORE_APP_ID, _STORE_SCHEMA))
            elif app_id != _STORE_APP_ID:
                raise _NotOurs("application id %#x, not nodemngr's" % app_id)
            elif db.execute("PRAGMA user_version").fetchone()[0] != _STORE_SCHEMA:
                raise _NotOurs("schema version is not %d" % _STORE_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise _NotOurs("integrity check: %s" % check)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            for port, blob in db.execute("SELECT port, info FROM ports"):
                unmarshal_info(blob)     # unreadable rows: the whole file is suspect
            return db
        except BaseException:
            db.close()
            raise


# ---------------------------------------------------------------------------------------------
# The node manager: the service behind the wire methods
# ---------------------------------------------------------------------------------------------

def _rpc(*signatures):
    """Mark a NodeMngr method as a wire method with its XML-RPC signatures."""
    def mark(func):
        func.rpc_signatures = [list(s) for s in signatures]
        return func
    return mark


def _utc(epoch):
    """A naive UTC datetime, as XML-RPC's dateTime.iso8601 carries no zone."""
    return datetime.fromtimestamp(int(epoch), timezone.utc).replace(tzinfo=None)


class NodeMngr:
    """The node manager: a PortAllocator, its StateStore, owner reaping, and the wire methods.

    The wire methods keep the legacy camelCase names; their docstrings are what remote callers
    read through ``system.methodHelp``.
    """

    def __init__(self, first=firstPort, last=lastPort, store=None, host_check=port_is_bindable,
                 hostname=None):
        self.store = store if store is not None else StateStore(None)
        self.allocator = PortAllocator(first, last, self.store.load())
        self.host_check = host_check
        self.hostname = hostname or socket.gethostname()
        self.started = time.time()
        self.reaped = 0
        self.server = None      # set by NodeMngrServer: terminate() stops it
        self.local = threading.local()      # .peer: the caller's address, set per request
        self._lock = threading.Lock()
        self.reap()

    # -- wire methods ------------------------------------------------------------------------

    @_rpc(["string"])
    def ping(self):
        """Return "NodeMngr at HOSTNAME is alive"; use it to see that the node manager runs."""
        return "NodeMngr at %s is alive" % self.hostname

    @_rpc(["int", "string"], ["int", "string", "int"])
    def newPort(self, info, pid=0):
        """Register and return a port (int) that nobody else on this host holds.

        info: any XML-RPC value saying what the port is for (at most 4 KiB marshalled, 16 levels
        deep); it is kept and returned by listPorts as given.  pid: optional, the process that
        holds the port; when it is non-zero the port is freed automatically once that process has
        ended.  Returns the lowest free port of the range.  Faults: 2 when no port is free,
        3 for a bad info or a pid with no live process.
        """
        if info is None:
            info = ""           # a top-level nil means "no info": replies never carry nil
        blob = marshal_info(info)
        if pid is None:
            pid = 0
        if type(pid) is not int or not 0 <= pid <= _INT32_MAX:
            raise BadArgumentError("pid must be an integer from 0 to %d, not %s" % (_INT32_MAX, describe(pid)))
        start = 0
        if pid:
            start = process_start_time(pid)
            if start is None:
                raise BadArgumentError("pid %d is not a live process on this host" % pid)
        return self._register(info, blob, pid, start)

    @_rpc(["int", "int"])
    def delPort(self, port):
        """Give back a port that newPort returned; returns 0.

        Fault 1 ("Node manager: Unknown port: N") if the port is not registered, 3 if port is
        not an integer from 1 to 65535.
        """
        check_port(port)
        with self._lock:
            reg = self.allocator.held.get(port)
            if reg is None:
                raise UnknownPortError(port)
            self.store.remove([port])
            self.allocator.release(port)
        log.debug("freed port %d (%s)", port, _Shown(reg.info))
        return 0

    @_rpc(["array"])
    def listPorts(self):
        """Return every registered port as an array of structs, sorted by port:
        {port: int, info: as given to newPort, pid: int (0 = none), since: dateTime.iso8601 UTC}.
        """
        with self._lock:
            regs = sorted(self.allocator.held.values())
        return [{"port": r.port, "info": r.info, "pid": r.pid,
                 "since": _utc(r.since)} for r in regs]

    @_rpc(["struct"])
    def status(self):
        """Return a struct describing the node manager: version, pid, host, port, firstPort,
        lastPort, registered, free, reaped (ports of dead owners freed since start),
        uptime (seconds, double) and state (the state file's path, or "" when none).
        """
        server = self.server
        with self._lock:
            registered, free = len(self.allocator), self.allocator.free_count
        return {"version": __version__, "pid": os.getpid(), "host": server.host if server else "",
                "port": server.port if server else 0, "firstPort": self.allocator.first,
                "lastPort": self.allocator.last, "registered": registered, "free": free,
                "reaped": self.reaped, "uptime": time.time() - self.started,
                "state": self.store.path or ""}

    @_rpc(["boolean"])
    def terminate(self):
        """Stop the node manager: it answers true, finishes the requests in flight, saves its
        state and exits.  Only callers on this host may do this (fault 4 otherwise).
        """
        peer = getattr(self.local, "peer", None)
        if peer is not None and not is_loopback(peer):
            raise ForbiddenError("terminate is only allowed from this host, not from %s" % peer)
        if self.server is not None:
            self.server.request_stop("terminate called")
        return True

    # -- internals -----------------------------------------------------------------------------

    def _register(self, info, blob, pid, start):
        with self._lock:
            port = self.allocator.take(self.host_check)
            if port is None:
                port = self._take_after_reaping()
            reg = Registration(port, info, pid, start, time.time(), blob)
            try:
                self.store.add(reg)
            except StoreError:
                self.allocator.untake(port)
                raise
            self.allocator.hold(reg)
        log.debug("gave port %d to pid %d (%s)", port, pid, _Shown(info))
        return port

    def _take_after_reaping(self):
        """Called with the lock held when take() found nothing: reap dead owners, probe again."""
        self._reap_locked(self._dead_owners(list(self.allocator.owners)))
        self.allocator.recall_all_busy()
        port = self.allocator.take(self.host_check)
        if port is None:
            a = self.allocator
            mine = sum(1 for p in a.held if a.first <= p <= a.last)
            raise NoFreePortError("no free port in %d-%d: %d registered, %d held by other programs"
                                  % (a.first, a.last, mine, a.last - a.first + 1 - mine))
        return port

    @staticmethod
    def _dead_owners(owners):
        return [key for key in owners if not owner_alive(*key)]

    def reap(self):
        """Free the ports of owners that have ended; return how many were freed."""
        with self._lock:
            owners = list(self.allocator.owners)
        dead = self._dead_owners(owners)    # /proc reads, outside the lock
        if not dead:
            return 0
        with self._lock:
            return self._reap_locked(dead)

    def _reap_locked(self, dead):
        ports = [p for key in dead for p in sorted(self.allocator.owners.get(key, ()))]
        if not ports:
            return 0
        try:
            self.store.remove(ports)
        except StoreError as exc:
            log.warning("could not free the ports of ended owners yet: %s", exc)
            return 0
        for port in ports:
            reg = self.allocator.release(port)
            log.info("reaped port %d: owner pid %d has ended (%s)", port, reg.pid, _Shown(reg.info))
        self.reaped += len(ports)
        return len(ports)

    def close(self):
        with self._lock:
            self.store.close()


# ---------------------------------------------------------------------------------------------
# Reading requests: expat with DTDs refused, and the dialects real clients send
# ---------------------------------------------------------------------------------------------

class _Unmarshaller(xmlrpc.client.Unmarshaller):
    """xmlrpc.client's reader, more liberal: booleans as true/false, whitespace around scalars."""

    dispatch = dict(xmlrpc.client.Unmarshaller.dispatch)

    def end_boolean(self, data):
        word = data.strip().lower()
        if word not in ("0", "1", "true", "false"):
            raise ValueError("bad boolean value %s" % _show(data, 40))
        self.append(word in ("1", "true"))
        self._value = 0
    dispatch["boolean"] = end_boolean

    def end_int(self, data):
        try:
            self.append(int(data))
        except ValueError:
            raise ValueError("bad integer value %s" % _show(data.strip(), 40))
        self._value = 0
    for _tag in ("i1", "i2", "i4", "i8", "int", "biginteger"):
        dispatch[_tag] = end_int
    del _tag

    def end_struct(self, data):
        names = self._stack[self._marks[-1]::2]
        if not all(isinstance(name, str) for name in names):
            raise ValueError("a struct member name must be a string")
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


class _DTDRefused(Exception):
    pass


def _refuse_dtd(*args):
    raise _DTDRefused()


def _reason(exc):
    """An exception's message, one line and short, without its class (the str() of
    xmlrpc.client.Error is a repr)."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
    text = " ".join(text.split())
    if not text:
        return "a value is malformed"
    return text if len(text) <= 120 else text[:117] + "..."


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


def _parse_simple_call(data):
    """(params, method) of a body of the shape above, or None for expat to read it."""
    match = _SIMPLE_CALL.match(data)
    if match is None:
        return None
    params = []
    for tag, number, text in _SIMPLE_PARAM.findall(match.group(2) or b""):
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
    return tuple(params), match.group(1).decode("ascii")


def parse_call(data):
    """(params, method) of an XML-RPC request body; Fault -32700 or -32600 when it is not one."""
    simple = _parse_simple_call(data)
    if simple is not None:
        return simple
    return _parse_call_expat(data)


def _parse_call_expat(data):
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
    except _DTDRefused:
        raise Fault(NOT_WELL_FORMED, "DOCTYPE and ENTITY declarations are refused")
    except expat.ExpatError as exc:
        raise Fault(NOT_WELL_FORMED, "the request is not well-formed XML: %s" % exc)
    except (ValueError, TypeError, OverflowError, xmlrpc.client.Error, IndexError, KeyError, ArithmeticError) as exc:
        raise Fault(INVALID_REQUEST, "the request is not valid XML-RPC: %s" % _reason(exc))
    except LookupError as exc:      # after IndexError and KeyError: an encoding expat does not know
        raise Fault(NOT_WELL_FORMED, "the request's XML encoding is unknown: %s" % _reason(exc))
    method = u.getmethodname()
    if not isinstance(method, str) or u._type not in ("params", "methodName") or u._marks:
        raise Fault(INVALID_REQUEST, "the request is not valid XML-RPC: expected a <methodCall> "
                    "with a <methodName> and <params>")
    return tuple(u._stack), method


# ---------------------------------------------------------------------------------------------
# The server: SimpleXMLRPCServer's method table, one selector loop, lean HTTP/1.1 keep-alive
# ---------------------------------------------------------------------------------------------

class _HTTPError(Exception):
    def __init__(self, status, message, extra=""):
        super().__init__(message)
        self.status, self.extra = status, extra


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 503: "Service Unavailable"}
_date_cache = [0, ""]


def _http_date():
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _date_cache[1]


def _response(status, body, content_type, close, extra=""):
    return ("HTTP/1.1 %d %s\r\nServer: nodemngr/%s\r\nDate: %s\r\nContent-Type: %s\r\n"
            "Content-Length: %d\r\n%s%s\r\n" % (
                status, _REASONS[status], __version__, _http_date(), content_type, len(body),
                "Connection: close\r\n" if close else "", extra)).encode("latin-1") + body


def _xml_response(body, close):
    """_response(200, body, "text/xml", close), on the per-call path."""
    return b"%s%s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        _OK_HEAD, _http_date().encode("ascii"), len(body), b"Connection: close\r\n" if close else b"", body)


_OK_HEAD = ("HTTP/1.1 200 OK\r\nServer: nodemngr/%s\r\nContent-Type: text/xml\r\nDate: " % __version__).encode()


_INBUF_LIMIT = MAX_HEAD + MAX_BODY     # read no further ahead than one request of the largest size
_TURN_REQUESTS = 16                     # requests of one connection answered per turn of the loop


class _Connection:
    """One client connection, driven by the server's loop: bytes come in, each request is answered
    once it is complete, replies go out.  Non-blocking throughout, so a slow or stalled client only
    ever holds its own connection.  Nothing is read while a reply waits to be taken, nor beyond one
    request of the largest size, so a client that does not read costs one reply of memory.

    HTTP is hand-rolled rather than http.server's, for limits the stdlib lacks (body size after
    decoding, Content-Length sanity, head size, deadlines) and for speed on the per-call path.
    """

    __slots__ = ("server", "sock", "peer", "inbuf", "outbuf", "head", "deadline", "served",
                 "closing", "lingering", "closed", "eof", "events")

    def __init__(self, server, sock, peer):
        self.server, self.sock, self.peer = server, sock, peer
        self.inbuf = self.outbuf = b""
        self.head = None            # _read_head() of a request whose body is awaited
        self.deadline = time.monotonic() + STALL_TIMEOUT
        self.served = 0
        self.closing = None         # "close" or "linger" once the last reply is queued
        self.lingering = self.closed = self.eof = False
        self.events = 0             # what the selector watches for (NodeMngrServer.watch)

    @property
    def idle(self):
        """Between requests, with nothing received and nothing to send."""
        return not (self.inbuf or self.outbuf or self.head or self.closing)

    def wants_read(self):
        return self.lingering or (not self.eof and self.closing is None and not self.outbuf
                                  and len(self.inbuf) < _INBUF_LIMIT)

    def on_readable(self):
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:     # reset: nobody is left to answer
            self.server.close_conn(self)
            return
        if self.lingering:
            if not data:
                self.server.close_conn(self)
            return
        if not data:
            self.eof = True     # half-closed: answer what was sent, then close
        else:
            if self.idle:       # the first byte of a request: it has STALL_TIMEOUT to finish
                self.deadline = time.monotonic() + STALL_TIMEOUT
            self.inbuf += data
        self.serve_buffered()

    def on_writable(self):
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.server.close_conn(self)
            return
        self.outbuf = self.outbuf[sent:]
        if not self.outbuf:
            self._sent_all()
            if not self.closed:
                self.serve_buffered()       # requests that were pipelined behind this reply; watch

    def serve_buffered(self):
        """Answer the complete requests in inbuf, in order, while no reply waits to be taken;
        a few per turn, so that one connection's pipeline cannot hold up the others."""
        server = self.server
        for _ in range(_TURN_REQUESTS):
            if self.outbuf or self.closing or self.closed:
                break
            try:
                request = self._take_request()
            except _HTTPError as exc:
                self._fail(exc)
                break
            if request is None:
                if self.eof or (server.stopping and self.head is None and not self.inbuf):
                    server.close_conn(self)     # nothing more will come, or may be taken
                break
            keep_alive, body = request
            server.node.local.peer = self.peer[0]
            reply = server.dispatch_body(body)
            self.served += 1
            if not keep_alive:
                self.closing = "close"
            self._send(_xml_response(reply, self.closing is not None))
        else:
            server.backlog.add(self)    # more may be complete: the next turn answers them
        if not self.closed:
            server.watch(self)

    def _take_request(self):
        """(keep_alive, body) of the next complete request in inbuf, or None; _HTTPError if bad."""
        if self.head is None:
            buf = self.inbuf.lstrip(b"\r\n")
            end = buf.find(b"\n\r\n")         # the blank line, CRLF or bare LF
            bare = buf.find(b"\n\n")
            if bare >= 0 and (end < 0 or bare < end):
                end, skip = bare, 2
            else:
                skip = 3
            if (end if end >= 0 else len(buf)) > MAX_HEAD:
                raise _HTTPError(400, "the request line and headers exceed %d bytes" % MAX_HEAD)
            if end < 0:
                self.inbuf = buf
                return None
            self.head = _read_head(buf[:end], self.server)
            self.inbuf = buf[end + skip:]
            if len(self.inbuf) < self.head[1] and self.head[3]:
                self._send(b"HTTP/1.1 100 Continue\r\n\r\n")
        keep_alive, length, encoding, _ = self.head
        if len(self.inbuf) < length:
            return None
        body, self.inbuf = self.inbuf[:length], self.inbuf[length:]
        self.head = None
        if encoding != b"identity":
            body = _decode_body(body, encoding)
        return keep_alive, body

    def _send(self, data):
        if not self.outbuf:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.server.close_conn(self)
                return
            data = data[sent:]
            if not data:
                self._sent_all()
                return
        self.outbuf += data

    def _sent_all(self):
        """Everything queued has left: close, linger, or wait for the next request."""
        if self.closing == "close":
            self.server.close_conn(self)
        elif self.closing == "linger":
            # read and drop what the client still sends, so that closing does not reset the reply
            _shut(self.sock, socket.SHUT_WR)
            self.lingering = True       # (serve_buffered, which always follows, watches for reads)
            self.deadline = time.monotonic() + 1.0
        else:   # idle until the next request, or it has begun (pipelined) and has to finish
            idle = self.head is None and not self.inbuf
            self.deadline = time.monotonic() + (IDLE_TIMEOUT if idle else STALL_TIMEOUT)

    def _fail(self, exc):
        """Answer an HTTP-level error in one sentence, then close."""
        body = (str(exc) + "\n").encode("utf-8")
        self.closing = "linger"
        self.inbuf = b""
        self._send(_response(exc.status, body, "text/plain; charset=utf-8", True, exc.extra))


def _read_head(head, server):
    """(keep_alive, length, encoding, expects 100-continue) of a request head; _HTTPError if bad.

    A keep-alive client sends the same head bytes call after call, so good heads are remembered
    by their exact bytes (a few, bounded): the same bytes always get the same answer."""
    known = server.heads.get(head)
    if known is None:
        keep_alive, headers = _parse_head(head, server)
        length, encoding = _framing(headers)
        known = (keep_alive, length, encoding, headers.get(b"expect", b"").lower() == b"100-continue")
        if len(server.heads) >= 64:
            server.heads.clear()
        server.heads[head] = known
    return known


def _parse_head(head, server):
    """(keep_alive, headers) from a request head; _HTTPError for anything off."""
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
    if method != b"POST":
        raise _HTTPError(405, "only POST is served; send XML-RPC calls to / or /RPC2", "Allow: POST\r\n")
    if target not in (b"/", b"/RPC2"):
        raise _HTTPError(404, "no such path; send XML-RPC calls to / or /RPC2")
    server.check_auth(headers.get(b"authorization"))
    connection = headers.get(b"connection", b"").lower()
    if version == b"HTTP/1.0":
        return b"keep-alive" in connection, headers
    return b"close" not in connection, headers


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
    if len(length.lstrip(b"0")) > 9 or int(length) > MAX_BODY:
        raise _HTTPError(413, "the body exceeds %d bytes" % MAX_BODY)
    return int(length), headers.get(b"content-encoding", b"identity").lower()


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
    return data


class NodeMngrServer(SimpleXMLRPCServer):
    """The XML-RPC daemon: one thread serves every connection from a selector loop.

    SimpleXMLRPCServer binds, listens and keeps the method table.  Connections are served by one
    loop rather than a thread each: threads hand the GIL to each other around every system call
    (bind probes, sqlite, send), which cost a quarter of the daemon's CPU per call when measured;
    one loop needs no watchdog either, since it sees every deadline itself.
    """

    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, host="127.0.0.1", port=nmPort, token=None):
        """Bind and listen at once: the bound port is what keeps a second daemon out."""
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.host, self.token = host, token
        self.node = None
        self.stopping = False
        self.stop_reason = None
        self.conns = {}             # socket -> _Connection
        self.heads = {}             # request head bytes -> what _read_head made of them
        self.backlog = set()        # connections with requests left over from their last turn
        self._listening = True      # the listening socket is watched (not paused)
        self._accept_warned = 0.0
        self._methods = {}
        self._stopped = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()    # request_stop() wakes the loop with it
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        SimpleXMLRPCServer.__init__(self, (host, port), logRequests=False, allow_none=False,
                                    encoding="utf-8", bind_and_activate=True)
        self.port = self.server_address[1]
        self.socket.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")

    def attach(self, node):
        """Serve the wire methods of *node* (a NodeMngr)."""
        self.node, node.server = node, self
        for name in ("ping", "newPort", "delPort", "terminate", "listPorts", "status"):
            self._register(getattr(node, name), name)
        for name in ("listMethods", "methodHelp", "methodSignature", "multicall"):
            self._register(getattr(self, "system_" + name), "system." + name)

    def _register(self, func, name):
        params = list(inspect.signature(func).parameters.values())
        required = sum(1 for p in params if p.default is inspect.Parameter.empty)
        self._methods[name] = (func, required, len(params))
        self.funcs[name] = func

    # -- dispatch --------------------------------------------------------------------------------

    def dispatch_body(self, body):
        """The XML reply (bytes) to one request body."""
        try:
            params, method = parse_call(body)
            result = self._dispatch(method, params)
            if type(result) is int and _INT32_MIN <= result <= _INT32_MAX:
                return (_INT_REPLY % result).encode("ascii")
            response = (result,)
        except Fault as fault:
            response = fault
        try:
            return dumps(response, methodresponse=True, allow_none=False).encode("utf-8")
        except Exception:
            log.exception("could not marshal the reply")
            return xmlrpc.client.dumps(Fault(INTERNAL_ERROR, "internal error: the reply could not be "
                                             "marshalled; see the node manager's log"),
                                       methodresponse=True).encode("utf-8")

    def _dispatch(self, method, params):
        entry = self._methods.get(method)
        if entry is None:
            raise Fault(METHOD_NOT_FOUND, "method %s is not offered here; system.listMethods lists "
                        "those that are" % _show(method, 80))
        func, least, most = entry
        if not least <= len(params) <= most:
            wanted = str(least) if least == most else "%d to %d" % (least, most)
            raise Fault(INVALID_PARAMS, "%s takes %s parameter%s, not %d" % (
                method, wanted, "" if wanted == "1" else "s", len(params)))
        try:
            return func(*params)
        except NodeMngrException as exc:
            raise Fault(exc.faultCode, str(exc))
        except Fault:
            raise
        except Exception as exc:
            log.exception("internal error in %s", method)
            raise Fault(INTERNAL_ERROR, "internal error in %s (%s); the node manager's log has the "
                        "details" % (method, type(exc).__name__))

    def system_listMethods(self):
        """Return the names of the methods this node manager offers."""
        return sorted(self._methods)

    def system_methodHelp(self, name):
        """Return the help text of method *name*, for callers in any language."""
        return inspect.getdoc(self._method(name)) or ""

    def system_methodSignature(self, name):
        """Return the signatures of method *name*: an array of arrays, the return type first."""
        return getattr(self._method(name), "rpc_signatures", None) or "undef"

    def _method(self, name):
        entry = self._methods.get(name) if isinstance(name, str) else None
        if entry is None:
            raise BadArgumentError("there is no method %s; system.listMethods lists the methods" % describe(name))
        return entry[0]

    system_listMethods.rpc_signatures = [["array"]]
    system_methodHelp.rpc_signatures = [["string", "string"]]
    system_methodSignature.rpc_signatures = [["array", "string"]]

    def system_multicall(self, calls):
        """Run several calls in one request.  calls: an array of structs {methodName, params};
        returns an array whose items are [result] or a fault struct {faultCode, faultString}.
        """
        if not isinstance(calls, list):
            raise BadArgumentError("system.multicall takes an array of {methodName, params} structs")
        results = []
        listings = 0
        for call in calls:
            try:
                if (not isinstance(call, dict) or not isinstance(call.get("methodName"), str)
                        or not isinstance(call.get("params", []), list)):
                    raise Fault(INVALID_REQUEST, "each call must be a struct {methodName: string, params: array}")
                if call["methodName"] == "system.multicall":
                    raise Fault(INVALID_REQUEST, "system.multicall cannot be nested")
                if call["methodName"] == "listPorts":   # each is the whole registry: bound the reply
                    listings += 1
                    if listings > 1:
                        raise Fault(BAD_ARGUMENT, "listPorts may appear once in a system.multicall")
                results.append([self._dispatch(call["methodName"], call.get("params", []))])
            except Fault as fault:
                results.append({"faultCode": fault.faultCode, "faultString": fault.faultString})
        return results

    system_multicall.rpc_signatures = [["array", "array"]]

    def check_auth(self, header):
        """Raise a 401 _HTTPError unless the request carries the token (or none is needed)."""
        if self.token is None:
            return
        given = b""
        if header and header[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(header[6:].strip(), validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                given = b""
        if not hmac.compare_digest(given, self.token):
            raise _HTTPError(401, "this node manager needs HTTP Basic auth with its token as password",
                             'WWW-Authenticate: Basic realm="nodemngr"\r\n')

    # -- the loop --------------------------------------------------------------------------------

    def serve_forever(self, poll_interval=0.25):
        """Serve until request_stop(), then answer what was received and return."""
        next_tick = time.monotonic()
        next_reap = next_tick + REAP_INTERVAL
        try:
            while not self.stopping or (self.conns and time.monotonic() < self._stop_deadline):
                accept = False
                for key, events in self._selector.select(0 if self.backlog else poll_interval):
                    if key.data == "accept":
                        accept = True
                    elif key.data == "wake":
                        _drain_socket(self._wake_r)
                    else:
                        self._serve_events(key.data, events)
                for conn in list(self.backlog):
                    self.backlog.discard(conn)
                    self._serve_events(conn, 0)
                if accept:      # after the batch's closes, which may have made room
                    self._accept()
                now = time.monotonic()
                if self.stop_reason is not None and not self.stopping:
                    self._begin_stop(now)
                if now >= next_tick:
                    next_tick = now + 0.25
                    self._cut_overdue(now)
                    if not self._listening and not self.stopping:
                        self._listen(True)
                if now >= next_reap and self.node is not None:
                    next_reap = now + REAP_INTERVAL
                    self._reap()
        finally:
            self._stopped.set()

    def _serve_events(self, conn, events):
        """Let *conn* write, read, or (events 0, from the backlog) answer what it has."""
        try:
            if events & selectors.EVENT_WRITE and not conn.closed:
                conn.on_writable()
            if events & selectors.EVENT_READ and not conn.closed:
                conn.on_readable()
            if not events and not conn.closed:
                conn.serve_buffered()
        except Exception:       # a bug must cost one connection, never the daemon
            log.exception("internal error serving %s", conn.peer)
            self.close_conn(conn)

    def _reap(self):
        try:
            self.node.reap()
        except Exception:
            log.exception("reaping failed")

    def _accept(self, limit=64):
        for _ in range(limit):
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # e.g. out of file descriptors: pause until the next tick
                now = time.monotonic()
                if now - self._accept_warned > 60:
                    self._accept_warned = now
                    log.warning("cannot accept connections for now: %s", exc.strerror or exc)
                if self._listening and not self.stopping:
                    self._listen(False)
                return
            if len(self.conns) >= MAX_CONNECTIONS and not self._evict_idlest():
                _turn_away(sock)
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:     # reset before we got to it
                sock.close()
                continue
            conn = _Connection(self, sock, peer)
            self.conns[sock] = conn
            self.watch(conn)

    def _listen(self, on):
        """Watch the listening socket again, or stop watching it for a while."""
        if on:
            self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        else:
            self._selector.unregister(self.socket)
        self._listening = on

    def _evict_idlest(self):
        """Make room by closing the keep-alive connection idle the longest, if one has served a
        request and sent nothing since: holding idle connections must not lock others out."""
        idle = [c for c in self.conns.values() if c.served and c.idle]
        for conn in sorted(idle, key=lambda c: c.deadline):
            if not _has_pending(conn.sock):
                log.debug("closed idle connection from %s to make room", conn.peer)
                self.close_conn(conn)
                return True
        return False

    def watch(self, conn):
        """Watch *conn* for what its state wants: writing a reply, or reading (see wants_read)."""
        events = selectors.EVENT_WRITE if conn.outbuf else 0
        if conn.wants_read():
            events |= selectors.EVENT_READ
        if events == conn.events:
            return
        if not conn.events:
            self._selector.register(conn.sock, events, conn)
        elif not events:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def close_conn(self, conn):
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.sock, None)
        self.backlog.discard(conn)
        if conn.events:
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _cut_overdue(self, now):
        """Close connections past their deadline: idle too long, stalled mid-request, lingering."""
        for conn in [c for c in self.conns.values() if c.deadline < now]:
            if not conn.lingering:
                log.debug("closing %s connection from %s", "idle" if conn.idle else "stalled", conn.peer)
            self.close_conn(conn)

    # -- stopping --------------------------------------------------------------------------------

    def request_stop(self, reason):
        """Stop serving soon; safe from a signal handler and from a request."""
        if self.stop_reason is None:
            self.stop_reason = reason
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass

    def shutdown(self):
        """Stop serve_forever (running in another thread) and wait until it has returned."""
        self.request_stop("shutdown called")
        self._stopped.wait()

    def _begin_stop(self, now):
        """Take no new request: answer what was received (connections the kernel accepted for us
        included), close the idle connections and the listening socket."""
        self.stopping = True
        self._accept(limit=MAX_CONNECTIONS)
        if self._listening:
            self._listen(False)
        self.socket.close()
        for conn in list(self.conns.values()):
            if conn.idle and not _has_pending(conn.sock):
                self.close_conn(conn)
        self._stop_deadline = now + STALL_TIMEOUT + 1

    def server_close(self):
        for conn in list(self.conns.values()):
            self.close_conn(conn)
        self._selector.close()      # (also called by TCPServer when the bind fails)
        self._wake_r.close()
        self._wake_w.close()
        SimpleXMLRPCServer.server_close(self)


def _turn_away(sock):
    body = b"too many connections; try again shortly\n"
    try:
        sock.setblocking(False)
        sock.send(_response(503, body, "text/plain; charset=utf-8", True))
    except OSError:
        pass
    sock.close()


def _shut(sock, how=socket.SHUT_RDWR):
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _has_pending(sock):
    """Whether the peer has sent bytes that were not read yet."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False


def _drain_socket(sock):
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Configuration and the client used by the command line
# ---------------------------------------------------------------------------------------------

def env_host(value=None):
    return value or os.environ.get("NODEMNGR_HOST") or "127.0.0.1"


def env_port(value=None, var="NODEMNGR_PORT", default=nmPort):
    if value is not None:
        return value
    raw = os.environ.get(var)
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise NodeMngrException("%s=%s is not a port number" % (var, _show(raw)))
    if not 1 <= port <= 65535:
        raise NodeMngrException("%s=%d is not within 1-65535" % (var, port))
    return port


def read_token(path):
    """The token in *path*, which must not be readable by group or others."""
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
    return token


def server_url(host, port, token=None):
    """The URL of a node manager, with the token as Basic-auth password when there is one."""
    from urllib.parse import quote
    if ":" in host and not host.startswith("["):
        host = "[%s]" % host
    auth = "nodemngr:%s@" % quote(token.decode("utf-8"), safe="") if token else ""
    return "http://%s%s:%d/RPC2" % (auth, host, port)


def _client(host, port, token_file=None, timeout=10.0):
    token_file = token_file or os.environ.get("NODEMNGR_TOKEN_FILE")
    token = read_token(token_file) if token_file else None
    return _TimeoutProxy(server_url(host, port, token), timeout)


class _TimeoutTransport(xmlrpc.client.Transport):
    def __init__(self, timeout):
        super().__init__(use_builtin_types=True)
        self.timeout = timeout

    def make_connection(self, host):
        conn = super().make_connection(host)
        conn.timeout = self.timeout
        return conn


def _TimeoutProxy(url, timeout):
    return xmlrpc.client.ServerProxy(url, transport=_TimeoutTransport(timeout), use_builtin_types=True)


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
    return "unexpected reply from %s:%d: %s" % (host, port, exc)


# ---------------------------------------------------------------------------------------------
# Serving
# ---------------------------------------------------------------------------------------------

def serve(host, port, first, last, state, token=None):
    """Run the daemon in this process until terminate, SIGTERM or SIGINT; return the exit status."""
    if not is_loopback(host) and token is None:
        raise NodeMngrException("refusing to listen on %s without a token: anyone who can reach it could "
                                "take and free ports; give --token-file, or use a loopback address" % host)
    node = None
    try:
        server = NodeMngrServer(host, port, token)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise NodeMngrException("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc))
        return _port_taken(host, port, token)
    try:
        try:
            node = NodeMngr(first, last, StateStore(state))
        except (OSError, sqlite3.Error) as exc:
            raise NodeMngrException("cannot open the state file %s: %s" % (state, getattr(exc, "strerror", None) or exc))
        server.attach(node)
        _install_signals(server)
        log.info("node manager %s serving on %s:%d, ports %d-%d, state %s, pid %d", __version__,
                 host, server.port, first, last, state or "none", os.getpid())
        server.serve_forever()
        if server.conns:
            log.warning("%d connections still busy at exit", len(server.conns))
        log.info("node manager stopped (%s)", server.stop_reason)
        return 0
    finally:
        server.server_close()
        if node is not None:
            node.close()


def _port_taken(host, port, token):
    try:
        text = _TimeoutProxy(server_url(host, port, token), 2.0).ping()
        found = isinstance(text, str) and text.startswith("NodeMngr at ")
    except xmlrpc.client.ProtocolError as exc:
        found = exc.errcode == 401
    except (OSError, xmlrpc.client.Error, expat.ExpatError):
        found = False
    if found:
        print("nodemngr: a node manager is already serving on %s:%d; leaving it alone" % (host, port),
              file=sys.stderr)
        return 3
    raise NodeMngrException("port %d on %s is held by another program" % (port, host))


def _install_signals(server):
    def on_signal(signum, frame):
        server.request_stop(signal.Signals(signum).name)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def _serve_config(args):
    host = env_host(args.host)
    port = env_port(args.port)
    first = env_port(args.first_port, "NODEMNGR_FIRST_PORT", firstPort)
    last = env_port(args.last_port, "NODEMNGR_LAST_PORT", lastPort)
    if first > last:
        raise NodeMngrException("first port %d is above last port %d" % (first, last))
    state = args.state or os.environ.get("NODEMNGR_STATE") or ""
    if state.lower() == "none":
        state = None
    elif not state:
        state = default_state_path(port)
        ensure_private_folder(os.path.dirname(state))
    token_file = args.token_file or os.environ.get("NODEMNGR_TOKEN_FILE")
    token = read_token(token_file) if token_file else None
    return host, port, first, last, state, token


def _setup_logging(args):
    level = (args.log_level or os.environ.get("NODEMNGR_LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise NodeMngrException("log level %s is not one of DEBUG, INFO, WARNING, ERROR" % _show(level))
    path = args.log_file or os.environ.get("NODEMNGR_LOG_FILE")
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s nodemngr[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

_COMMANDS = ("serve", "ping", "status", "list", "new", "del", "stop")


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--host", help="address of the node manager (env NODEMNGR_HOST, default 127.0.0.1)")
    common.add_argument("--port", type=int, help="its port (env NODEMNGR_PORT, default %d)" % nmPort)
    common.add_argument("--token-file", metavar="PATH",
                        help="file holding the token; every request then needs it (env NODEMNGR_TOKEN_FILE)")
    parser = argparse.ArgumentParser(
        prog="nodemngr", description="One node manager per host: hands out ports that nobody else holds, "
        "remembers what each is for, and takes them back. With no command it serves.",
        epilog="Run 'nodemngr COMMAND --help' for the flags of a command. Exit status: 0 done, "
        "1 error, 2 usage, 3 a node manager already serves that port.")
    parser.add_argument("--version", action="version", version="nodemngr " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("serve", parents=[common], help="run the node manager in the foreground (default)")
    s.add_argument("--first-port", type=int, help="first port handed out (env NODEMNGR_FIRST_PORT, default %d)" % firstPort)
    s.add_argument("--last-port", type=int, help="last port handed out (env NODEMNGR_LAST_PORT, default %d)" % lastPort)
    s.add_argument("--state", metavar="PATH", help="state file, or 'none' to keep nothing (env NODEMNGR_STATE, "
                   "default $XDG_RUNTIME_DIR/nodemngr/PORT.sqlite3 or TMPDIR/nodemngr-UID/PORT.sqlite3)")
    s.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (env NODEMNGR_LOG_LEVEL, default INFO)")
    s.add_argument("--log-file", metavar="PATH", help="log here instead of stderr (env NODEMNGR_LOG_FILE)")
    sub.add_parser("ping", parents=[common], help="say whether a node manager answers")
    sub.add_parser("status", parents=[common], help="show the node manager's status")
    sub.add_parser("list", parents=[common], help="list the registered ports: port, pid, age, info")
    n = sub.add_parser("new", parents=[common], help="register a port and print it")
    n.add_argument("info", help="what the port is for")
    n.add_argument("--pid", type=int, default=0, help="free the port when this process ends (e.g. $$)")
    d = sub.add_parser("del", parents=[common], help="give a port back")
    d.add_argument("del_port", metavar="PORT", type=int, help="the port newPort gave")
    sub.add_parser("stop", parents=[common], help="stop the node manager")
    return parser


def main(argv=None):
    """The command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "serve":
            _setup_logging(args)
            return serve(*_serve_config(args))
        return _run_client_command(args)
    except NodeMngrException as exc:
        print("nodemngr: %s" % exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1


def _run_client_command(args):
    host, port = env_host(args.host), env_port(args.port)
    proxy = _client(host, port, args.token_file)
    try:
        if args.command == "ping":
            print(proxy.ping())
        elif args.command == "status":
            for key, value in sorted(proxy.status().items()):
                print("%-10s %s" % (key, round(value, 1) if isinstance(value, float) else value))
        elif args.command == "list":
            print(format_table(proxy.listPorts()))
        elif args.command == "new":
            print(proxy.newPort(args.info, args.pid))
        elif args.command == "del":
            proxy.delPort(args.del_port)
        elif args.command == "stop":
            proxy.terminate()
            print("node manager at %s:%d is stopping" % (host, port))
    except (OSError, xmlrpc.client.Error, expat.ExpatError) as exc:
        raise NodeMngrException(describe_call_error(exc, host, port))
    return 0


def format_table(entries, now=None):
    """listPorts entries as an aligned text table: PORT PID AGE INFO."""
    now = _utc(time.time()) if now is None else now
    rows = [("PORT", "PID", "AGE", "INFO")]
    for e in entries:
        since = e["since"]
        if not isinstance(since, datetime):
            since = datetime.strptime(str(since), "%Y%m%dT%H:%M:%S")
        info = e["info"] if isinstance(e["info"], str) else repr(e["info"])
        rows.append((str(e["port"]), str(e["pid"]), _age((now - since).total_seconds()), info))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows)


def _age(seconds):
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


# ---------------------------------------------------------------------------------------------
# Legacy names served lazily: the client lives in nodemngr_proxy.py
# ---------------------------------------------------------------------------------------------

def __getattr__(name):
    if name in ("NodeMngrProxy", "nm"):
        import nodemngr_proxy
        if name == "nm":
            globals()["nm"] = nodemngr_proxy.NodeMngrProxy()
        else:
            globals()[name] = nodemngr_proxy.NodeMngrProxy
        return globals()[name]
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


if __name__ == "__main__":
    sys.exit(main())
