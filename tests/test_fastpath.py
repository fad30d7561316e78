"""The fast request reader agrees with expat wherever it answers, and answers for common calls."""
import xmlrpc.client

from hypothesis import HealthCheck, given, settings, strategies as st

import nodemngr

INTS = st.integers(min_value=-2 ** 40, max_value=2 ** 40)
TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=("Cs",)),
               max_size=40)
PARAMS = st.lists(st.one_of(INTS, TEXT), max_size=5)
PARAMS32 = st.lists(st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1), TEXT), max_size=5)   # what dumps can write
NAMES = st.sampled_from(["newPort", "delPort", "ping", "system.listMethods", "a.b:c", "x_1"])
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))


def expat(body):
    try:
        return nodemngr._parse_call_expat(body)
    except xmlrpc.client.Fault as fault:
        return fault


def render(params, name, decl, ws, int_tag):
    """A call as a client might write it: declaration, whitespace and int tag vary."""
    out = [decl, ws, b"<methodCall>", ws, b"<methodName>", name.encode(), b"</methodName>", ws, b"<params>"]
    for p in params:
        if isinstance(p, int):
            value = b"<%s>%d</%s>" % (int_tag, p, int_tag)
        else:
            value = b"<string>" + xmlrpc.client.escape(p).encode("utf-8", "surrogatepass") + b"</string>"
        out += [ws, b"<param>", ws, b"<value>", value, b"</value>", ws, b"</param>"]
    out += [ws, b"</params>", ws, b"</methodCall>", ws]
    return b"".join(out)


@SETTINGS
@given(PARAMS, NAMES, st.sampled_from([b"", b"<?xml version='1.0'?>", b'<?xml version="1.0"?>',
                                       b"<?xml version='1.0' encoding='iso-8859-1'?>"]),
       st.sampled_from([b"", b"\n", b" \t", b"\r\n", b"\x0b"]), st.sampled_from([b"int", b"i4", b"i8"]))
def test_fast_reader_agrees_with_expat(params, name, decl, ws, int_tag):
    body = render(params, name, decl, ws, int_tag)
    fast = nodemngr._parse_simple_call(body)
    if fast is not None:
        assert fast == expat(body)


@SETTINGS
@given(PARAMS32, NAMES, st.lists(st.tuples(st.integers(0, 10 ** 6), st.binary(max_size=3)), min_size=1, max_size=4))
def test_mutated_bodies_never_read_differently(params, name, edits):
    body = bytearray(xmlrpc.client.dumps(tuple(params), name, allow_none=True).encode("utf-8", "surrogatepass"))
    for position, insert in edits:
        position %= len(body) + 1
        body[position:position + (len(insert) % 2)] = insert    # replace or insert a few bytes
    body = bytes(body)
    fast = nodemngr._parse_simple_call(body)
    if fast is not None:
        assert fast == expat(body)


@SETTINGS
@given(st.lists(st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1),
                          st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFFFD,
                                                blacklist_characters="<>&", blacklist_categories=("Cs",)))),
                max_size=4), NAMES)
def test_common_calls_take_the_fast_path(params, name):
    body = xmlrpc.client.dumps(tuple(params), name).encode("utf-8")
    assert nodemngr._parse_simple_call(body) == (tuple(params), name)
