"""pytest_nodemngr -- pytest fixtures for ports that never collide, across processes and xdist workers.

Installed with nodemngr, this plugin is found by pytest through its ``pytest11`` entry point;
where the package is not installed, load it with ``pytest -p nodemngr`` (nodemngr.py and this file
importable, e.g. from a clone's root).  Its fixtures ask the node manager at
NODEMNGR_HOST:NODEMNGR_PORT (starting one if none answers, as the proxy does)::

    def test_server(nodemngr_port):             # an int port, registered to this test process
        server = start_my_server(port=nodemngr_port)

    def test_cluster(nodemngr_port_factory):    # as many as needed
        a, b = nodemngr_port_factory(), nodemngr_port_factory("replica")
        ring = nodemngr_port_factory(count=3, consecutive=True)    # a block: [p, p + 1, p + 2]

    def test_listen(nodemngr_socket):           # a listening TCP socket on 127.0.0.1, bound for you
        port = nodemngr_socket.getsockname()[1]

Every port is freed at the test's teardown, and by the node manager itself if the test process
dies first.  Each port's info is the test's node id, so ``nodemngr list`` shows who holds what.
"""

import time

import pytest

from nodemngr import NodeMngrException, NodeMngrProxy, UnknownPortError, read_token, who_answers

__all__ = ["nodemngr_port", "nodemngr_port_factory", "nodemngr_socket"]


@pytest.fixture(scope="session")
def nodemngr_proxy():
    """The NodeMngrProxy the fixtures share (one per test process).  If what holds the node
    manager's port is not a node manager (it never answers, or answers something else), every
    fixture fails at once with one sentence saying so, rather than each after its timeout."""
    proxy = NodeMngrProxy()
    _check_what_answers(proxy)
    yield proxy
    proxy.close()


def _check_what_answers(proxy, within=1.5):
    deadline = time.monotonic() + within    # (a daemon another worker is starting answers well within it)
    while True:
        answer = who_answers(proxy.host, proxy.port, read_token(proxy.token_file), timeout=0.5)
        if answer == "other":
            raise NodeMngrException("%s:%d answers, but not as a node manager: another program holds the port; "
                                    "set NODEMNGR_PORT to the node manager's" % (proxy.host, proxy.port))
        if answer != "silent":
            return
        if time.monotonic() >= deadline:
            raise NodeMngrException("%s:%d accepts connections but does not answer like a node manager: another "
                                    "program holds the port; set NODEMNGR_PORT to the node manager's"
                                    % (proxy.host, proxy.port))


def _give_back(proxy, port):
    try:
        proxy.delPort(port)
    except UnknownPortError:    # freed already (by the test itself, say)
        pass


@pytest.fixture
def nodemngr_port_factory(nodemngr_proxy, request):
    """A function returning a new port each call (its info: the test's node id, or what it is
    given); with count=N, a list of N ports registered at once (newPorts), consecutive ones with
    consecutive=True.  Every one of them is freed at teardown."""
    ports = []

    def new_port(info=None, count=None, consecutive=False):
        info = request.node.nodeid if info is None else info
        if count is None:
            if consecutive:
                raise ValueError("consecutive=True asks for a block of ports: give count=N too")
            port = nodemngr_proxy.newPort(info)
            ports.append(port)
            return port
        block = nodemngr_proxy.newPorts(info, count, consecutive=consecutive)
        ports.extend(block)
        return block

    yield new_port
    for port in ports:
        _give_back(nodemngr_proxy, port)


@pytest.fixture
def nodemngr_port(nodemngr_port_factory):
    """A port (int) nobody else holds, registered to this test process, freed at teardown."""
    return nodemngr_port_factory()


@pytest.fixture
def nodemngr_socket(nodemngr_proxy, request):
    """A listening TCP socket on 127.0.0.1 that the node manager bound (no other process can take
    its port between allocation and bind); closed and its port freed at teardown."""
    sock = nodemngr_proxy.newSocket(request.node.nodeid)
    port = sock.getsockname()[1]
    yield sock
    sock.close()
    _give_back(nodemngr_proxy, port)
