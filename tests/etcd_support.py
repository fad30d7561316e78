"""A real etcd for the cluster tests and the benchmark: its own free ports and a temporary data
folder, started and stopped by pid, read back through its JSON gateway.  No pytest here (bench/
uses it too)."""
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request

from support import ServerError, free_port, stop_pid, wait_until


def etcd_binary():
    """The etcd server's path, or None (Debian: etcd-server; .ci/run installs it)."""
    return shutil.which("etcd")


class Etcd:
    """One etcd member serving on 127.0.0.1 on free ports, its data in *folder*/etcd."""

    def __init__(self, folder):
        self.data = os.path.join(str(folder), "etcd")
        self.log = os.path.join(str(folder), "etcd.log")
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.client_port

    def start(self, timeout=15.0):
        peer = "http://127.0.0.1:%d" % self.peer_port
        argv = [etcd_binary(), "--name", "nodemngr-test", "--data-dir", self.data,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "nodemngr-test=" + peer, "--log-level", "warn"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if not wait_until(self.answers, timeout=timeout, interval=0.05):
            self.stop()
            with open(self.log, errors="replace") as f:
                raise ServerError("etcd did not answer within %ss; log:\n%s" % (timeout, f.read()[-3000:]))
        return self

    def answers(self):
        if self.proc.poll() is not None:
            raise ServerError("etcd exited with %s" % self.proc.returncode)
        try:
            self.call("kv/range", {"key": _b64("health")})
            return True
        except OSError:
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_pid(self.proc.pid)
            self.proc.wait(10)

    def call(self, path, body):
        request = urllib.request.Request(self.url + "/v3/" + path, json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.loads(reply.read())

    def get_prefix(self, prefix):
        """{key: value} of the keys under *prefix*, values JSON-decoded."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self.call("kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in kvs}

    def transactions(self):
        """etcd's own count of the transactions it has run (etcd_mvcc_txn_total)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("etcd_mvcc_txn_total "):
                    return int(float(line.split()[1]))
        raise ServerError("etcd's metrics have no etcd_mvcc_txn_total")


def _b64(text):
    return base64.b64encode(text.encode()).decode()


def wait_for(predicate, timeout):
    """wait_until, returning the seconds it took (or None if it never held)."""
    start = time.monotonic()
    return time.monotonic() - start if wait_until(predicate, timeout=timeout, interval=0.02) else None
