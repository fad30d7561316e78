"""The status page: GET / shows people the registrations, range, reaps and names, every value as
text; GET /status.json gives programs the same data; both under the token rule; a crowded registry
is shown in part, counted.  A real headless Chromium (Debian's chromium; .ci/run installs it)
loads the page from a real daemon.  `pytest tests/test_page.py --screenshot docs/status-page.png`
remakes the README's picture; an ordinary run writes none."""
import base64
import collections
import html.parser
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from support import daemon_settings


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium here (Debian's chromium; .ci/run installs it)")


def browse(tmp_path, url, *options):
    """Run headless Chromium on *url* with *options* (--dump-dom: the DOM it printed); it and its
    helpers are stopped by their process group's id if it overruns."""
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--user-data-dir=%s" % (tmp_path / "chromium")] + list(options) + [url]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return out.decode("utf-8")


class Dom(html.parser.HTMLParser):
    """The elements (tags) of a page, its title, and the text of each table row's cells."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.rows, self.title, self.text = set(), [], None, []
        self._in = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "title"):
            self._in, self._cell = tag, []

    def handle_endtag(self, tag):
        if tag == self._in:
            text = "".join(self._cell)
            if tag == "title":
                self.title = text
            else:
                self.rows[-1].append(text)
            self._in = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in:
            self._cell.append(data)


HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>"><svg onload=alert(1)>'
ELEMENTS = {"html", "head", "meta", "title", "link", "body", "h1", "h2", "p", "progress", "table", "thead", "tbody",
            "tr", "th", "td", "code", "a"}


def get(d, path, token=None):
    request = urllib.request.Request("http://%s:%d%s" % (d.host, d.port, path))
    if token is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(b"anyone:" + token).decode())
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.headers, reply.read()


def test_a_browser_sees_every_registration_as_text_and_a_freed_one_gone(daemon, tmp_path):
    rpc = daemon.rpc()
    web = rpc.newPort("web", os.getpid())
    db = rpc.newPort({"name": "db", "info": "<b>the database</b>"})
    hostile = rpc.newPort(HOSTILE)
    page = Dom(browse(tmp_path, "http://%s:%d/" % (daemon.host, daemon.port), "--dump-dom"))
    assert page.title == "nodemngr on %s:%d" % (daemon.host, daemon.port), "no script of an info ran"
    assert page.tags <= ELEMENTS, "an info made elements: %s" % (page.tags - ELEMENTS)
    rows = {row[0]: row for row in page.rows if row}
    assert rows[str(web)][1:5] == ["web", "web", str(os.getpid()), "alive"]
    assert rows[str(db)][1] == "db" and "<b>the database</b>" in rows[str(db)][2]
    assert rows[str(hostile)][1] == rows[str(hostile)][2] == HOSTILE, "shown as the text it is"
    rpc.delPort(web)
    page = Dom(browse(tmp_path, "http://%s:%d/" % (daemon.host, daemon.port), "--dump-dom"))
    assert str(web) not in {row[0] for row in page.rows if row} and str(db) in {row[0] for row in page.rows if row}


def test_the_json_holds_what_listPorts_holds(daemon):
    rpc = daemon.rpc()
    rpc.newPort("web", os.getpid())
    rpc.newPort({"name": "db", "when": __import__("datetime").datetime(2026, 1, 2, 3, 4, 5),
                 "blob": __import__("xmlrpc.client").client.Binary(b"\x00\xff")})
    headers, body = get(daemon, "/status.json")
    data = json.loads(body)
    assert headers["Content-Type"] == "application/json"
    listed = daemon.proxy().listPorts()
    expected = [dict(e, since=e["since"].isoformat()) for e in listed]
    for e in expected:
        if isinstance(e["info"], dict) and "when" in e["info"]:
            e["info"] = {"name": "db", "when": "2026-01-02T03:04:05", "blob": {"base64": "AP8="}}
    assert data["registrations"] == expected
    assert data["range"] == {"first": daemon.first, "last": daemon.last, "registered": 2,
                             "free": daemon.last - daemon.first - 1}
    assert data["names"] == [{"name": "db", "port": listed[1]["port"]}] and data["cluster"] is None
    assert set(data) >= {"version", "host", "range", "registrations", "reaps", "cluster"}


def test_the_page_and_the_json_need_the_token_when_there_is_one(daemon_factory, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    token_file.chmod(0o600)
    d = daemon_factory(size=10, state="none", extra_args=["--token-file", str(token_file)])
    for path in ("/", "/status.json"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(d, path)
        assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"].startswith("Basic")
        assert b"token as password" in refused.value.read(), "the 401 says how to get in"
        headers, body = get(d, path, b"s3cret")
        assert body


def test_the_page_tells_the_browser_to_run_no_script_and_load_nothing_else(daemon):
    """...and to keep no copy of what it shows (it can sit behind the token, and a page kept would
    show ports freed since)."""
    for path, kind in (("/", "text/html; charset=utf-8"), ("/status.json", "application/json"),
                       ("/status.css", "text/css; charset=utf-8")):
        headers, _ = get(daemon, path)
        assert headers["Content-Type"] == kind and headers["X-Content-Type-Options"] == "nosniff"
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "unsafe" not in policy and "script-src" not in policy
        assert path == "/status.css" or headers["Cache-Control"] == "no-store"


def test_a_name_that_would_disguise_itself_is_shown_escaped(daemon):
    """A name is shown as printable as its info is: a right-to-left override or a line separator
    in it is written as its escape, never obeyed (in the registrations and the names remembered)."""
    rpc = daemon.rpc()
    spoof = rpc.newPort({"name": "db\u202egnp.exe\u2028x", "info": 1})
    page = Dom(get(daemon, "/")[1].decode("utf-8"))
    rows = {row[0]: row for row in page.rows if row}
    assert rows[str(spoof)][1] == "db\\u202egnp.exe\\u2028x"
    assert rows["db\\u202egnp.exe\\u2028x"] == ["db\\u202egnp.exe\\u2028x", str(spoof)], "in the names remembered"
    assert "\u202e" not in "".join(page.text) and "\u2028" not in "".join(page.text)
    assert json.loads(get(daemon, "/status.json")[1])["registrations"][0]["name"] == "db\u202egnp.exe\u2028x"


def test_a_crowded_registry_is_shown_in_part_and_counted(daemon_factory):
    """The registrations and the names remembered (25,000 explicit names remember 25,000 ports)
    are each cut at page_rows and counted; the JSON has them all."""
    d = daemon_factory(size=20, state="none", settings=daemon_settings(page_rows=5))
    ports = [d.rpc().newPort({"name": "svc %02d" % i}) for i in range(12)]
    _, body = get(d, "/")
    page = Dom(body.decode("utf-8"))
    shown = [row[0] for row in page.rows if row and row[0].isdigit()]
    assert shown == [str(p) for p in ports[:5]] and "and 7 more registrations" in "".join(page.text)
    names = [row[0] for row in page.rows if len(row) == 2]
    assert names == ["svc %02d" % i for i in range(5)] and "and 7 more names" in "".join(page.text)
    data = json.loads(get(d, "/status.json")[1])
    assert len(data["registrations"]) == 12 and len(data["names"]) == 12, "the JSON has them all"


def test_a_screenshot_of_the_page_is_made_on_request(daemon, tmp_path, request):
    rpc = daemon.rpc()
    rpc.newPort("web frontend", os.getpid())
    rpc.newPort({"name": "db", "info": "postgres primary"})
    rpc.newPort("metrics")
    wanted = request.config.getoption("--screenshot")
    target = os.path.abspath(wanted) if wanted else str(tmp_path / "status-page.png")
    browse(tmp_path, "http://%s:%d/" % (daemon.host, daemon.port), "--screenshot=%s" % target,
           "--window-size=1000,640", "--hide-scrollbars")
    with open(target, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_json_of_many_registrations_is_made_a_slice_at_a_time(monkeypatch):
    """In-process: the JSON is a Sliced whose steps each give the loop back within the budget, and
    what the slices make is the whole registry, the same as made in one go, through changes."""
    import nodemngr
    service = nodemngr.NodeMngr(40000, 43999, host_check=lambda port: True)
    try:
        for i in range(3000):
            service.newPort({"name": "svc-%d" % (i % 50), "info": "instance %d" % i})
        pages = nodemngr.StatusPages(service)
        monkeypatch.setattr(nodemngr.Sliced, "budget", 0.0)     # (a slice of 64 entries each)
        sliced = pages.json()
        steps = 1
        while not sliced.step():
            steps += 1
        assert steps >= 3000 // 64, "made in slices"
        first = json.loads(b"".join(sliced.reply))
        assert [e["port"] for e in first["registrations"]] == list(range(40000, 43000))
        service.delPort(40057)      # (not the port an explicit name remembers: the lowest free)
        service.newPort("late")
        again = json.loads(b"".join(pages.json().finish()))
        assert [e["port"] for e in again["registrations"]] == list(range(40000, 43000))
        assert {e["port"]: e["info"] for e in again["registrations"]}[40057] == "late", "a changed port's entry is new"
        assert again["range"]["registered"] == 3000
    finally:
        service.close()


def test_pages_of_25000_registrations_are_made_in_short_slices_and_shared():
    """In-process, at the issue's 25,000 registrations, each with an explicit name the daemon
    remembers: the page and the JSON are each made a slice per turn of the loop, no slice near the
    50 ms another caller may wait; a page asked for again, nothing having changed, is the same one
    (a hundred browsers cost one page and hold one copy); a change makes a new one."""
    import gc
    import time
    import nodemngr
    service = nodemngr.NodeMngr(30000, 59999, host_check=lambda port: True)
    try:
        for i in range(25000):
            service.newPort({"name": "svc-%05d" % i})
        pages = nodemngr.StatusPages(service)
        for make in (pages.html, pages.json):
            sliced, longest = make(), 0.0
            assert make() is sliced, "asked again while it is made, nothing changed: the same page"
            gc.collect()
            gc.disable()    # (a full collection over 25,000 registrations, 20-70 ms, is not the slicing's)
            try:
                while True:
                    began = time.thread_time()      # (CPU of this thread: not the machine's load)
                    done = sliced.step()
                    longest = max(longest, time.thread_time() - began)
                    if done:
                        break
            finally:
                gc.enable()
            assert longest < 0.05, "%s: a slice took %.0f ms" % (make.__name__, longest * 1000)
        page = pages.html().finish().decode("utf-8")
        assert len(page) < 200000 and "and 24500 more names" in page and "and 24500 more registrations" in page
        data = json.loads(b"".join(pages.json().finish()))
        assert len(data["registrations"]) == len(data["names"]) == 25000
        service.delPort(30000)
        assert 30000 not in [e["port"] for e in json.loads(b"".join(pages.json().finish()))["registrations"]]
    finally:
        service.close()


def test_pages_for_readers_that_never_read_hold_memory_bounded(daemon_factory):
    """Many clients ask for the megabytes of /status.json and read nothing: they share one copy of
    its pieces (each owes a cursor over them, as for listPorts), so the daemon grows by one copy,
    not by one per reader (925 MB for these 100 before)."""
    from support import count_turned_away, fill_registry, http_request, memory_kib, slow_readers
    d = daemon_factory(size=1000, state="none")
    fill_registry(d, 1000)          # the JSON is about 8 MB (each info is its name too)
    base = memory_kib(d.proc.pid)
    request = http_request(method="GET", path="/status.json", length=False)
    clients = slow_readers(d, 100, request)
    try:
        assert d.rpc().ping().startswith("NodeMngr at ")       # served meanwhile
        count_turned_away(clients)      # (the daemon pushes what the kernel takes meanwhile)
        peak = memory_kib(d.proc.pid, "VmHWM")
    finally:
        for s in clients:
            s.close()
    assert peak - base < 100 * 1024, "pages waiting for readers grew the daemon by %d KiB" % (peak - base)


def test_the_page_lists_every_host_of_the_cluster_view(daemon_factory, etcd, tmp_path):
    """Two daemons publishing to a real etcd: each one's page lists both hosts, with their entries
    and when a change of theirs was last seen; the JSON says the same."""
    from support import wait_until

    def host(name):
        return daemon_factory(size=10, name=name, state=tmp_path / ("%s.sqlite3" % name),
                              extra_args=["--cluster", etcd.url, "--advertise-host", name, "--cluster-ttl", "3"])
    a, b = host("host-a"), host("host-b")
    for d in (a, b):
        assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=10)
    db = a.rpc().newPort({"name": "db"})
    web = b.rpc().newPort("web")

    def hosts():
        return {h["host"]: h for h in json.loads(get(a, "/status.json")[1])["cluster"]["hosts"]}
    assert wait_until(lambda: set(hosts()) == {"host-a", "host-b"}, timeout=10)
    seen = hosts()
    assert seen["host-a"]["entries"] == 1 and seen["host-a"]["ports"] == [{"port": db, "name": "db"}]
    assert seen["host-b"]["ports"] == [{"port": web, "name": "web"}] and seen["host-b"]["lastChange"]
    page = Dom(browse(tmp_path, "http://%s:%d/" % (a.host, a.port), "--dump-dom"))
    rows = {row[0]: row for row in page.rows if row and row[0].startswith("host-")}
    assert rows["host-a"][1] == "1" and rows["host-a"][3] == "%d db" % db
    assert rows["host-b"][1] == "1" and rows["host-b"][3] == "%d web" % web


def test_hostile_cluster_entries_are_text_and_many_hosts_are_counted(daemon_factory, etcd):
    """Entries another writer put in etcd (of the shape nodemngr writes, on a live lease): a host
    or name made of markup, or of a right-to-left override, shows as printable text; hosts past
    page_rows, and ports of a host past page_host_ports, are counted, not listed."""
    from support import wait_until
    d = daemon_factory(size=10, state="none", settings=daemon_settings(page_rows=4, page_host_ports=2),
                       extra_args=["--cluster", etcd.url, "--advertise-host", "host-a", "--cluster-ttl", "3"])
    assert wait_until(lambda: d.rpc().status()["cluster"] == "ok", timeout=10)
    lease = etcd.call("lease/grant", {"TTL": 60})["ID"]
    evil = "<img src=x onerror=alert(1)>\u202eevil"
    entries = [(evil, port, "<script>alert(1)</script>\u2028") for port in (1, 2, 3)]
    entries += [("host-%d" % i, 7, "web") for i in range(5)]
    for host, port, name in entries:
        value = {"host": host, "port": port, "name": name, "info": name, "pid": 0, "since": "2026-01-01T00:00:00Z"}
        key = "nodemngr/v1/ports/%s/%d" % (host, port)
        etcd.call("kv/put", {"key": base64.b64encode(key.encode()).decode(), "lease": lease,
                             "value": base64.b64encode(json.dumps(value).encode()).decode()})
    assert wait_until(lambda: len(json.loads(get(d, "/status.json")[1])["cluster"]["hosts"]) == 6, timeout=10)
    page = Dom(get(d, "/")[1].decode("utf-8"))
    assert page.tags <= ELEMENTS, "an entry made elements: %s" % (page.tags - ELEMENTS)
    rows = {row[0]: row for row in page.rows if len(row) == 4}
    shown = "<img src=x onerror=alert(1)>\\u202eevil"
    assert rows[shown][1] == "3" and rows[shown][3] == "1 <script>alert(1)</script>\\u2028, 2 <script>" \
        "alert(1)</script>\\u2028 and 1 more"
    assert len(rows) == 4 and "and 2 more hosts" in "".join(page.text)


def test_a_refused_method_is_told_what_the_path_takes(daemon):
    """405's Allow names every method the path serves: / takes XML-RPC POSTs and GET of the
    page, the JSON and the stylesheet only GET, /RPC2 only POST."""
    from support import post
    for method, path, allow in (("HEAD", "/", "GET, POST"), ("OPTIONS", "/", "GET, POST"),
                                ("HEAD", "/status.json", "GET"), ("DELETE", "/status.css", "GET"),
                                ("HEAD", "/RPC2", "POST")):
        reply = post(daemon, method=method, path=path, length=False)
        assert (reply.status, reply.headers["allow"]) == (405, allow), (method, path, reply)


def test_a_hundred_asking_at_once_make_one_slice_a_turn(monkeypatch):
    """In-process: a hundred requests for the JSON in one turn of the loop make its first slice
    once (not a hundred slices, the whole of it, in that turn); the loop then drives one chain of
    slices for all of them, a slice a turn, and tells each when it is made."""
    import asyncio
    import nodemngr
    monkeypatch.setattr(nodemngr.Sliced, "budget", 0.0)     # (a slice of 64 entries each)
    service = nodemngr.NodeMngr(40000, 43999, host_check=lambda port: True)
    loop = asyncio.new_event_loop()
    try:
        for i in range(3000):
            service.newPort("svc %d" % i)
        dispatcher = nodemngr.Dispatcher(service)
        dispatcher.add_page(b"/status.json", nodemngr.StatusPages(service).json)
        replies = [dispatcher.page(b"/status.json") for _ in range(100)]
        assert all(r is replies[0] for r in replies) and type(replies[0]) is nodemngr.Sliced, "one page, not made yet"
        server = object.__new__(nodemngr.NodeMngrServer)
        server.loop, server._sliced, server._slicing = loop, {}, collections.deque()
        turns, slices, told = [0], [], []
        real_step = nodemngr.Sliced.step
        monkeypatch.setattr(nodemngr.Sliced, "step", lambda self: slices.append(turns[0]) or real_step(self))

        def tick():
            turns[0] += 1
            if len(told) < 100:
                loop.call_soon(tick)
        for r in replies:
            server.run_sliced(r, lambda: told.append(1))
        loop.call_soon(tick)
        loop.run_until_complete(asyncio.sleep(0))
        while len(told) < 100:
            loop.run_until_complete(asyncio.sleep(0))
        assert max(slices.count(turn) for turn in set(slices)) == 1, "at most one slice a turn"
        assert len(json.loads(b"".join(replies[0].reply))["registrations"]) == 3000
    finally:
        loop.close()
        service.close()


def test_replies_of_different_states_take_turns_one_slice_a_turn_in_all():
    """In-process: twelve different replies being made at once (a listing asked between changes
    by each of 120 clients that never read) made a slice each per turn, twelve slices a turn:
    pings waited 100 ms.  They take turns, one slice a turn in all, and each is told when made."""
    import asyncio
    import nodemngr
    loop = asyncio.new_event_loop()
    try:
        server = object.__new__(nodemngr.NodeMngrServer)
        server.loop, server._sliced, server._slicing = loop, {}, collections.deque()
        turns, slices, told = [0], [], []

        def steps(n):
            for _ in range(5):
                slices.append(turns[0])
                yield
            return n
        made = [nodemngr.Sliced(steps(n), "listPorts") for n in range(12)]

        def tick():
            turns[0] += 1
            if len(told) < len(made):
                loop.call_soon(tick)
        for sliced in made:
            server.run_sliced(sliced, lambda: told.append(1))
        loop.call_soon(tick)
        while len(told) < len(made):
            loop.run_until_complete(asyncio.sleep(0))
        assert len(slices) == 12 * 5 and max(slices.count(turn) for turn in set(slices)) == 1, \
            "more than one slice in a turn"
        assert [sliced.reply for sliced in made] == list(range(12))
    finally:
        loop.close()
