"""Interoperability: real non-Python XML-RPC clients, and a hand-written HTTP/1.1 exchange.

The clients live in tests/clients/ and are installed by .ci/run (Debian: librpc-xml-perl, ruby,
ruby-xmlrpc; npm: xmlrpc into tests/clients/node). A client that is not installed is skipped, not failed.
"""
import os
import re
import shutil
import subprocess

import pytest

from support import RawConnection, http_request

CLIENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clients")
NODE_MODULES = os.path.join(CLIENTS, "node", "node_modules")


# Each client: (argv, what its interpreter prints when the library is missing, the skip message).
# The client itself finds out (loading the library is most of its run: Perl's takes 0.5 s of CPU),
# rather than a probe loading it once more first.
PERL_LIBRARY = "Perl RPC::XML::Client (Debian librpc-xml-perl) not installed; .ci/run installs it"
RUBY_LIBRARY = "Ruby xmlrpc library (Debian ruby, ruby-xmlrpc) not installed; .ci/run installs it"


def _perl():
    perl = shutil.which("perl")
    if not perl:
        pytest.skip(PERL_LIBRARY)
    return [perl, os.path.join(CLIENTS, "perl_client.pl")], r"Can't locate RPC/XML[/\w]*\.pm in @INC", PERL_LIBRARY


def _ruby():
    ruby = shutil.which("ruby")
    if not ruby:
        pytest.skip(RUBY_LIBRARY)
    return [ruby, os.path.join(CLIENTS, "ruby_client.rb")], r"cannot load such file -- xmlrpc/client", RUBY_LIBRARY


def _node():
    node = shutil.which("node") or shutil.which("nodejs")
    if not node:
        pytest.skip("Node.js not installed; .ci/run installs the npm xmlrpc client for it")
    if not os.path.isfile(os.path.join(NODE_MODULES, "xmlrpc", "package.json")):
        pytest.skip("npm package xmlrpc not installed in tests/clients/node; .ci/run installs it (npm ci)")
    return [node, os.path.join(CLIENTS, "node_client.js")], None, None


@pytest.mark.parametrize("client", [_perl, _ruby, _node], ids=["perl", "ruby", "node"])
def test_foreign_client(any_daemon, client):
    daemon = any_daemon
    argv, missing, why = client()
    proc = subprocess.run(argv + [daemon.url], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=120, universal_newlines=True)
    if proc.returncode != 0 and missing and re.search(missing, proc.stderr):
        pytest.skip(why)
    report = "exit %s\nstdout:\n%s\nstderr:\n%s\ndaemon log:\n%s" % (
        proc.returncode, proc.stdout, proc.stderr, daemon.read_log()[-4000:])
    assert proc.returncode == 0, report
    lines = proc.stdout.split()
    assert lines and lines[-1] == "OK", report
    p1, p2 = int(lines[0]), int(lines[1])
    # newPort hands out the lowest free port: a later one is above an earlier one, all in range.
    assert daemon.first <= p1 < p2 <= daemon.last, report
    # The client gave its ports back.
    assert daemon.rpc().listPorts() == [], report


# --- a raw HTTP/1.1 exchange: no XML-RPC library on this side -------------------------------------

CALL = ('<?xml version="1.0"?>\r\n<methodCall><methodName>%s</methodName>'
        '<params><param><value>%s</value></param></params></methodCall>\r\n')


def call(conn, method, value):
    """Send one call with a <value> written by hand on *conn* (a RawConnection); its reply body,
    checked as a well-behaved client would need it."""
    conn.send(http_request((CALL % (method, value)).encode("utf-8"), headers=["User-Agent: nodemngr-raw-test"]))
    reply = conn.reply()    # (an HTTP/1.1 reply framed by Content-Length: RawConnection checks it)
    assert reply.status == 200, reply
    assert reply.headers.get("content-type", "").split(";")[0].strip() == "text/xml", reply
    assert reply.headers.get("connection", "").lower() != "close", "daemon closed a keep-alive connection"
    body = reply.body.decode("utf-8")
    assert "<methodResponse>" in body, body
    assert not re.search(r"<(\w+:)?nil\b", body), "reply carries a nil: %r" % body
    return body


def _int_value(body):
    m = re.search(r"<params>\s*<param>\s*<value>\s*<(int|i4)>\s*(-?\d+)\s*</\1>\s*</value>", body)
    assert m, "no int result in %r" % body
    return int(m.group(2))


def test_raw_http_keepalive(any_daemon):
    daemon = any_daemon
    with RawConnection(daemon) as conn:
        # newPort("raw socket") -> the lowest free port.
        body = call(conn, "newPort", "<string>raw socket</string>")
        port = _int_value(body)
        assert daemon.first <= port <= daemon.last, body

        # Same connection: delPort(port) -> 0.
        body = call(conn, "delPort", "<int>%d</int>" % port)
        assert "<fault>" not in body, body
        assert _int_value(body) == 0, body

        # Same connection: delPort of a port no longer registered -> fault 1.
        body = call(conn, "delPort", "<int>%d</int>" % port)
        fault = re.search(r"<fault>(.*)</fault>", body, re.S)
        assert fault, "no <fault> in %r" % body
        code = re.search(r"<name>\s*faultCode\s*</name>\s*<value>\s*<(int|i4)>\s*(-?\d+)\s*</\1>",
                         fault.group(1))
        assert code and int(code.group(2)) == 1, "faultCode is not the int 1 in %r" % body
        text = re.search(r"<name>\s*faultString\s*</name>\s*<value>\s*(?:<string>)?([^<]*)",
                         fault.group(1))
        assert text, "no faultString in %r" % body
        assert "Node manager: Unknown port:" in text.group(1), body
        assert text.group(1).strip().endswith(str(port)), body
    assert daemon.rpc().listPorts() == []
