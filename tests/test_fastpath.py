"""The fast request reader agrees with expat wherever it answers, and answers for common calls;
the xmlrpc.client internals the expat reader drives are still there in this Python."""
import binascii
import datetime
import xmlrpc.client
from xml.parsers import expat as pyexpat

from hypothesis import given, settings, strategies as st

import nodemngr

INTS = st.integers(min_value=-2 ** 40, max_value=2 ** 40)
TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=("Cs",)),
               max_size=40)
PARAMS = st.lists(st.one_of(INTS, TEXT), max_size=5)
PARAMS32 = st.lists(st.one_of(st.integers(-2 ** 31, 2 ** 31 - 1), TEXT), max_size=5)   # what dumps can write
NAMES = st.sampled_from(["newPort", "delPort", "ping", "system.listMethods", "a.b:c", "x_1"])
# No health check is suppressed: with deadline=None, too_slow allows 30 s of drawing for the first
# ten examples (these take milliseconds); no fixtures; and about one draw in ten is discarded,
# far from the 50 in a row filter_too_much needs, or the 20 overruns of data_too_large.
SETTINGS = settings(max_examples=600, deadline=None)


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


CALLS = st.lists(st.tuples(NAMES, PARAMS32), max_size=6)


def render_multicall(calls, ws, int_tag):
    """A system.multicall as a client might write it: whitespace and int tag vary."""
    def value(p):
        if isinstance(p, int):
            return b"<value><%s>%d</%s></value>" % (int_tag, p, int_tag)
        return b"<value><string>" + xmlrpc.client.escape(p).encode("utf-8", "surrogatepass") + b"</string></value>"
    items = [b"<value><struct>%(w)s<member>%(w)s<name>methodName</name>%(w)s<value><string>%(n)s</string></value>%(w)s"
             b"</member>%(w)s<member>%(w)s<name>params</name>%(w)s<value><array><data>%(w)s%(p)s</data></array></value>"
             b"%(w)s</member>%(w)s</struct></value>" % {b"w": ws, b"n": name.encode(),
                                                        b"p": b"".join(value(p) + ws for p in params)}
             for name, params in calls]
    return (b"<?xml version='1.0'?>%(w)s<methodCall>%(w)s<methodName>system.multicall</methodName>%(w)s<params>%(w)s"
            b"<param>%(w)s<value><array><data>%(w)s%(i)s</data></array></value>%(w)s</param>%(w)s</params>%(w)s"
            b"</methodCall>%(w)s" % {b"w": ws, b"i": b"".join(item + ws for item in items)})


@SETTINGS
@given(CALLS, st.sampled_from([b"", b"\n", b" \t", b"\r\n", b"\x0b"]), st.sampled_from([b"int", b"i4", b"i8"]))
def test_fast_multicall_reader_agrees_with_expat(calls, ws, int_tag):
    body = render_multicall(calls, ws, int_tag)
    fast = nodemngr._parse_simple_multicall(body)
    if fast is not None:
        assert fast == expat(body)


@SETTINGS
@given(CALLS, st.lists(st.tuples(st.integers(0, 10 ** 6), st.binary(max_size=3)), min_size=1, max_size=4))
def test_mutated_multicalls_never_read_differently(calls, edits):
    body = bytearray(xmlrpc.client.dumps(([{"methodName": n, "params": p} for n, p in calls],), "system.multicall")
                     .encode("utf-8", "surrogatepass"))
    for position, insert in edits:
        position %= len(body) + 1
        body[position:position + (len(insert) % 2)] = insert
    body = bytes(body)
    fast = nodemngr._parse_simple_multicall(body)
    if fast is not None:
        assert fast == expat(body)


@SETTINGS
@given(st.lists(st.tuples(NAMES, st.lists(st.one_of(
    st.integers(-2 ** 31, 2 ** 31 - 1), st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFFFD,
                                                              blacklist_characters="<>&", blacklist_categories=("Cs",)))),
    max_size=3)), max_size=5))
def test_common_multicalls_take_the_fast_path(calls):
    listed = [{"methodName": n, "params": p} for n, p in calls]
    body = xmlrpc.client.dumps((listed,), "system.multicall").encode("utf-8")
    assert nodemngr._parse_simple_multicall(body) == ((listed,), "system.multicall")
    assert nodemngr.parse_call(body) == ((listed,), "system.multicall")


# -- the xmlrpc.client internals nodemngr's expat reader relies on --------------------------------
# nodemngr._parse_call_expat and nodemngr._Unmarshaller drive xmlrpc.client.Unmarshaller through
# private attributes and its dispatch table.  They are not an API, and a Python release may change
# them: this test names each one, so that CI on the new Python says which, before users get -32603.

PINNED_ATTRIBUTES = {"_encoding": str, "_type": type(None), "_marks": list, "_stack": list, "_value": bool}
PINNED_METHODS = ("start", "end", "data", "getmethodname", "end_struct", "end_dateTime", "end_base64")
PINNED_TAGS = ("boolean", "int", "i4", "i8", "double", "string", "name", "value", "array", "struct",
               "dateTime.iso8601", "base64", "nil", "params", "methodName")
EVERY_KIND = (b"<?xml version='1.0'?><methodCall><methodName>m.n</methodName><params>"
              b"<param><value><i4>-7</i4></value></param>"
              b"<param><value><i8>4294967296</i8></value></param>"
              b"<param><value><boolean>1</boolean></value></param>"
              b"<param><value><string>caf\xc3\xa9</string></value></param>"
              b"<param><value>untyped</value></param>"
              b"<param><value><struct><member><name>a</name><value><double>0.5</double></value></member>"
              b"</struct></value></param>"
              b"<param><value><array><data><value><int>1</int></value><value><nil/></value></data></array>"
              b"</value></param>"
              b"<param><value><dateTime.iso8601>20240102T03:04:05</dateTime.iso8601></value></param>"
              b"<param><value><base64>aGk=</base64></value></param>"
              b"</params></methodCall>")
EVERY_VALUE = (-7, 2 ** 32, True, "caf\u00e9", "untyped", {"a": 0.5}, [1, None],
               datetime.datetime(2024, 1, 2, 3, 4, 5), b"hi")


def fed_unmarshaller(body):
    """A plain xmlrpc.client.Unmarshaller fed *body* through expat the way _parse_call_expat does."""
    u = xmlrpc.client.Unmarshaller(use_builtin_types=True)
    u._encoding = None          # expat hands str, which end_string would try to .decode() again
    p = pyexpat.ParserCreate(None, None)
    p.buffer_text = True
    p.StartElementHandler, p.EndElementHandler, p.CharacterDataHandler = u.start, u.end, u.data
    p.Parse(body, True)
    return u


def test_the_xmlrpc_client_internals_the_expat_reader_drives_are_unchanged():
    changed = []
    cls = xmlrpc.client.Unmarshaller
    u = cls(use_builtin_types=True)
    for name, kind in PINNED_ATTRIBUTES.items():
        if type(getattr(u, name, None)) is not kind:
            changed.append("Unmarshaller()._%s is %r, was a %s" % (name.lstrip("_"), getattr(u, name, "missing"),
                                                                    kind.__name__))
    if getattr(u, "append", None) is None or (u.append(1), u._stack) != (None, [1]):
        changed.append("Unmarshaller().append no longer appends to _stack")
    for name in PINNED_METHODS:
        if not callable(getattr(cls, name, None)):
            changed.append("Unmarshaller.%s is gone" % name)
    dispatch = getattr(cls, "dispatch", None)
    if not isinstance(dispatch, dict):
        changed.append("Unmarshaller.dispatch is no longer a dict")
    else:
        changed += ["Unmarshaller.dispatch[%r] is gone" % tag for tag in PINNED_TAGS if not callable(dispatch.get(tag))]
    assert not changed, "xmlrpc.client changed in this Python; nodemngr's expat reader uses: " + "; ".join(changed)

    # How they behave on a small call: every kind of value, read by the stdlib class alone...
    u = fed_unmarshaller(EVERY_KIND)
    assert (u._type, u._marks, u.getmethodname()) == ("params", [], "m.n"), \
        "after a whole call, _type/_marks/getmethodname() now say %r" % ((u._type, u._marks, u.getmethodname()),)
    assert tuple(u._stack) == EVERY_VALUE, "_stack after a whole call: %r" % (u._stack,)
    # ...the base handlers nodemngr's overrides call, with (self, data)...
    u = cls(use_builtin_types=True)
    cls.end_dateTime(u, "20240102T03:04:05")
    cls.end_base64(u, "aGk=")
    u._marks.append(len(u._stack))
    u._stack += ["k", 1]
    cls.end_struct(u, "")
    assert u._stack == [datetime.datetime(2024, 1, 2, 3, 4, 5), b"hi", {"k": 1}] and u._marks == [], u._stack
    try:
        cls.end_base64(u, "a")
    except binascii.Error:      # nodemngr turns it into a -32600 "bad base64 value"
        pass
    else:
        raise AssertionError("end_base64 no longer raises binascii.Error on bad base64")
    # ...and by nodemngr's reader, overrides and all (true/false booleans, spaces around a dateTime).
    liberal = EVERY_KIND.replace(b"<boolean>1</boolean>", b"<boolean> true </boolean>").replace(
        b">20240102T03:04:05<", b"> 20240102T03:04:05\n<")
    assert nodemngr._parse_call_expat(liberal) == (EVERY_VALUE, "m.n")


@SETTINGS
@given(st.text(st.characters(max_codepoint=0x7F), max_size=30) | st.text(max_size=5))
def test_a_string_reply_is_written_as_the_marshaller_writes_it(name):
    service = nodemngr.NodeMngr(40000, 40009)
    try:
        service.hostname = name
        dispatcher = nodemngr.Dispatcher(service)
        reply = dispatcher.dispatch(dispatcher.caller("tcp", "127.0.0.1"), xmlrpc.client.dumps((), "ping").encode())
        assert reply == nodemngr.marshal_reply(("NodeMngr at %s is alive" % name,), "ping")[0]
    finally:
        service.close()
