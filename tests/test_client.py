"""The Python client's failures: whatever answers at its address (an HTML server, an SSH banner, a
server that accepts and never answers), and whatever it cannot send, a failed call is a
NodeMngrException (or a TypeError) in one sentence that names the address.  (Auto-start's own
failures: test_autostart.py.)"""
import http.server
import socket
import threading
import time

import pytest

from support import assert_one_sentence, free_port

import nodemngr_proxy
from nodemngr import NodeMngrException


class Served:
    """Runs *handle(conn)* for each connection accepted at a fresh port, in a thread."""

    def __init__(self, handle):
        self.port = free_port()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.handle, self.stopped = handle, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self.handle(conn)
                except OSError:
                    pass

    def stop(self):
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def served():
    made = []

    def make(handle):
        made.append(Served(handle))
        return made[-1]
    yield make
    for s in made:
        s.stop()


def drain(conn):
    """Read until the peer closes, so that our close sends FIN rather than RST."""
    while conn.recv(65536):
        pass


HTML_BODIES = {"well-formed": b"<html><body>hi</body></html>",
               "not-xml": b"<!DOCTYPE html>\n<html><meta charset=utf-8><p>hi<br>there\n"}


@pytest.mark.parametrize("kind", sorted(HTML_BODIES))
def test_html_server_gives_one_sentence(kind, env):
    body = HTML_BODIES[kind]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = httpd.server_address[1]
    try:
        with pytest.raises(NodeMngrException) as caught:
            nodemngr_proxy.NodeMngrProxy(port=port, autostart=True).ping()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert_one_sentence(caught.value, port)
    assert "not a node manager" in str(caught.value)


def test_ssh_banner_gives_one_sentence(served, env):
    def ssh(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")
        drain(conn)
    server = served(ssh)
    with pytest.raises(NodeMngrException) as caught:
        nodemngr_proxy.NodeMngrProxy(port=server.port, autostart=True).ping()
    assert_one_sentence(caught.value, server.port)
    assert '"SSH-2.0-OpenSSH_9.0"' in str(caught.value)


def test_silent_server_gives_timeout_in_one_sentence(env):
    with socket.socket() as listener:       # the kernel accepts; nobody ever answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        began = time.monotonic()
        with pytest.raises(NodeMngrException) as caught:
            nodemngr_proxy.NodeMngrProxy(port=port, timeout=0.2).ping()
        elapsed = time.monotonic() - began
    assert_one_sentence(caught.value, port)
    assert "did not answer within 0.2 s" in str(caught.value)
    assert elapsed < 2


def test_unsendable_argument_is_one_sentence_and_a_type_error(any_daemon):
    daemon = any_daemon
    with daemon.proxy() as nm:
        with pytest.raises(TypeError) as caught:
            nm.newPort(object())
        assert_one_sentence(caught.value)
        assert "newPort" in str(caught.value)
        assert nm.listPorts() == [], "nothing was registered"
