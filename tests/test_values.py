"""Values: the fast paths write exactly what xmlrpc.client writes, and info limits hold."""
import datetime
import xmlrpc.client

import pytest

import nodemngr

STRINGS = ["", "plain", "a<b>&c", "tab\tnewline\ncr\rend", "\u00e9t\u00e9 \u2603 \U0001f600", "x" * 800,
           "]]>", "&amp; already escaped", "%s %d %%"]


@pytest.mark.parametrize("text", STRINGS)
def test_string_info_is_marshalled_as_dumps_would(text):
    expected = xmlrpc.client.dumps((text,), allow_none=False).replace("\r", "&#13;")
    assert nodemngr.marshal_info(text) == expected
    assert nodemngr.unmarshal_info(nodemngr.marshal_info(text)) == text


@pytest.mark.parametrize("value", [0, 1, -1, 11801, 65535, 2 ** 31 - 1, -2 ** 31])
def test_int_reply_is_what_dumps_writes(value):
    assert nodemngr._INT_REPLY % value == xmlrpc.client.dumps((value,), methodresponse=True)


@pytest.mark.parametrize("info", [{"a": [1, 2.5, True]}, [b"\x00bytes", datetime.datetime(2001, 1, 1)], 7, 1.5])
def test_other_info_round_trips(info):
    assert nodemngr.unmarshal_info(nodemngr.marshal_info(info)) == info


def test_info_size_limit_counts_the_marshalled_value():
    limit = nodemngr.MAX_INFO_BYTES - len("<value><string></string></value>")
    nodemngr.marshal_info("y" * limit)
    with pytest.raises(nodemngr.BadArgumentError):
        nodemngr.marshal_info("y" * (limit + 1))
    with pytest.raises(nodemngr.BadArgumentError):     # escaping counts: 4 bytes each
        nodemngr.marshal_info("<" * (limit // 4 + 1))


def test_values_named_for_callers_in_any_language():
    assert nodemngr.describe(7) == "7"
    assert nodemngr.describe(True) == "a boolean"
    assert nodemngr.describe({"a": 1}) == "a struct"
    assert nodemngr.describe([1]) == "an array"
    assert nodemngr.describe(datetime.datetime(2001, 1, 1)) == "a dateTime.iso8601"
    assert len(nodemngr.describe(10 ** 1000)) <= 40
    assert len(nodemngr.describe("z" * 10000)) <= 40


def test_heads_are_read_and_repeats_joined_or_refused():
    # the two Connection lines are joined ("keep-alive, close"), so the connection closes
    head = nodemngr.read_head(b"POST /RPC2 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                              b"connection: close\r\nContent-Length: 5")
    assert head == nodemngr.RequestHead(False, 5, b"identity", False, False, None, None)
    head = nodemngr.read_head(b"POST / HTTP/1.0\nConnection: keep-alive\nContent-Length: 0\n"
                              b"Authorization: Basic eA==")
    assert head == nodemngr.RequestHead(True, 0, b"identity", False, True, b"Basic eA==", None)
    for bad in (b"POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5",
                b"POST / HTTP/1.1\r\n folded: line", b"POST / HTTP/1.1\r\nno colon here",
                b"POST / HTTP/1.1\r\nBad Name: x", b"POST / HTTP/1.1\r\nX: a\rb"):
        with pytest.raises(nodemngr._HTTPError) as info:
            nodemngr.read_head(bad)
        assert info.value.status == 400


def test_infos_read_together_are_those_read_one_by_one():
    """A restart reads a thousand infos with one parser; what it gets is what reading each alone
    gets, whatever the infos hold, and one that is not an info fails it as it would alone."""
    import datetime
    infos = ["plain", "", "a</param><param><value>x</value>", {"name": "db", "n": [1, 2.5, True]},
             datetime.datetime(2026, 1, 2, 3, 4, 5), b"\x00\xff", "caf\u00e9 \r\n", {"nested": {"deep": []}}] * 300
    texts = [nodemngr.marshal_info(info) for info in infos]
    assert nodemngr.unmarshal_infos(texts) == [nodemngr.unmarshal_info(t) for t in texts] == infos
    broken = texts[:5] + ["<params>\n<param>\n<value><int>oops</int></value>\n</param>\n</params>\n"] + texts[5:]
    with pytest.raises(ValueError):
        nodemngr.unmarshal_infos(broken)
    shifted = texts[:3] + ["<params>\n<param>\n<value>a</value>\n</param><param><value>b</value></param>\n</params>\n"]
    assert nodemngr.unmarshal_infos(shifted) == [nodemngr.unmarshal_info(t) for t in shifted], \
        "two values in one text do not shift the others"
