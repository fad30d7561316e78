"""A real etcd for the cluster tests and the benchmark: its own free ports and a temporary data
folder, started and stopped by pid, read back through its JSON gateway.  No pytest here (bench/
uses it too)."""
import base64
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

from support import ServerError, free_port, stop_pid, wait_until


def etcd_binary():
    """The etcd server's path, or None (Debian: etcd-server; .ci/run installs it)."""
    return shutil.which("etcd")


class Etcd:
    """One etcd member serving on 127.0.0.1 on free ports, its data in *folder*/etcd."""

    def __init__(self, folder, tls=None):
        """tls: (ca, cert, key) files to serve https:// and ask clients for a certificate the CA signed."""
        self.data = os.path.join(str(folder), "etcd")
        self.log = os.path.join(str(folder), "etcd.log")
        self.client_port, self.peer_port = free_port(), free_port()
        self.tls = tls
        self.proc = None

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.client_port)

    def start(self, timeout=15.0):
        peer = "http://127.0.0.1:%d" % self.peer_port
        argv = [etcd_binary(), "--name", "nodemngr-test", "--data-dir", self.data,
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", "nodemngr-test=" + peer, "--log-level", "warn"]
        if self.tls:
            argv += ["--trusted-ca-file", self.tls[0], "--cert-file", self.tls[1], "--key-file", self.tls[2],
                     "--client-cert-auth"]
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
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls[0])
            context.load_cert_chain(self.tls[1], self.tls[2])
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return json.loads(reply.read())

    def get_prefix(self, prefix):
        """{key: value} of the keys under *prefix*, values JSON-decoded."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        kvs = self.call("kv/range", {"key": _b64(prefix), "range_end": _b64(end)}).get("kvs", [])
        return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"])) for kv in kvs}

    def keys(self, prefix):
        """The keys under *prefix* (text or bytes) as etcd holds them: bytes, sorted."""
        prefix = prefix if isinstance(prefix, bytes) else prefix.encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        reply = self.call("kv/range", {"key": _b64(prefix), "range_end": _b64(end), "keys_only": True})
        return [base64.b64decode(kv["key"]) for kv in reply.get("kvs", [])]

    def transactions(self):
        """etcd's own count of the transactions it has run (etcd_mvcc_txn_total)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("etcd_mvcc_txn_total "):
                    return int(float(line.split()[1]))
        raise ServerError("etcd's metrics have no etcd_mvcc_txn_total")


class Proxy:
    """An etcd endpoint on 127.0.0.1 that forwards to a real one (threads of this process) until
    told to go bad, as a member or a network may:
    - trickle(): new connections get an HTTP head one byte every 50 ms, for ever;
    - freeze_after(marker, others): once the reply to a request holding *marker* went through,
      nothing moves on any connection of this proxy and of *others*, old or new (they stay open);
    - freeze_existing(): the connections open now stop moving, new ones pass (a NAT or a firewall
      that forgot a long-lived flow without a reset).
    close() closes all."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.mode, self.marker, self.others, self.frozen, self.sockets = "pass", None, [], set(), []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.url = "http://127.0.0.1:%d" % self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def trickle(self):
        self.mode = "trickle"

    def freeze_after(self, marker, others=()):
        self.others, self.marker = list(others), marker

    def freeze_existing(self):
        self.frozen.update(id(s) for s in self.sockets)

    def close(self):
        self.closed = True
        self.listener.close()
        for s in list(self.sockets):
            s.close()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            threading.Thread(target=self._trickle if self.mode == "trickle" else self._pump, args=(client,),
                             daemon=True).start()

    def _trickle(self, client):
        try:
            client.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 60000:
                if self.closed:
                    return
                client.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass

    def _pump(self, client):
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        self.sockets.append(upstream)
        marked = False
        try:
            while not self.closed:
                ready, _, _ = select.select([client, upstream], [], [], 0.05)
                if self.mode == "freeze" or id(client) in self.frozen:
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (upstream if s is client else client).sendall(data)
                    if s is client and self.marker and self.marker in data:
                        marked = True
                    elif s is upstream and marked:
                        for proxy in [self] + self.others:
                            proxy.mode = "freeze"
        except (OSError, ValueError):     # (ValueError: select() on a socket another thread closed)
            pass
        finally:
            client.close()
            upstream.close()


def _b64(text):
    return base64.b64encode(text if isinstance(text, bytes) else text.encode()).decode()


def wait_for(predicate, timeout):
    """wait_until, returning the seconds it took (or None if it never held)."""
    start = time.monotonic()
    return time.monotonic() - start if wait_until(predicate, timeout=timeout, interval=0.02) else None


def make_certificates(folder):
    """(ca, cert, key): a CA, and a certificate it signed for 127.0.0.1 that serves and is a client
    too, made with the openssl command (None when it is missing)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    folder = str(folder)
    ca, ca_key = os.path.join(folder, "ca.pem"), os.path.join(folder, "ca.key")
    cert, key, csr = (os.path.join(folder, n) for n in ("cert.pem", "cert.key", "cert.csr"))
    ext = os.path.join(folder, "ext.cnf")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
                "keyUsage=digitalSignature,keyEncipherment\nauthorityKeyIdentifier=keyid,issuer\n"
                "subjectKeyIdentifier=hash\n")     # (Python 3.13 checks certificates strictly)
    for argv in ([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
                  "-days", "2", "-subj", "/CN=nodemngr test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                 [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                 [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
                  "-days", "2", "-extfile", ext]):
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    return ca, cert, key
