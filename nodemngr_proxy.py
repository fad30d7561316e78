"""nodemngr_proxy -- the legacy import path of the Python client.

    >>> from nodemngr_proxy import NodeMngrProxy
    >>> with NodeMngrProxy() as nm:           # NODEMNGR_HOST / NODEMNGR_PORT, else 127.0.0.1:11800
    ...     port = nm.newPort({"service": "echo"})
    ...     nm.delPort(port)
    0

The client lives in nodemngr.py (``from nodemngr import NodeMngrProxy, nm``), which is a whole
deployment by itself; this module only names it again for code written against 1.1 and 1.2.
"""

from nodemngr import NodeMngrException, NodeMngrProxy, UnsendableError, start_daemon

__all__ = ["NodeMngrProxy", "start_daemon", "NodeMngrException", "UnsendableError"]
