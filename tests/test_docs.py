"""The docs run as shown: every shell and Python block of README.md and of each page of docs/, in
order, page by page, against a node manager of the page's own, with the outputs the blocks show.

The convention the pages follow (docs/contributing.md, "Docs that run", says it for writers):

- A fence's language says what runs.  ``console``: a transcript; each ``$ `` line is a command (it
  goes on over lines ending in a backslash, or while a quote is open), and the lines after it, up to
  the next ``$ ``, are what it prints (stdout and stderr together).  ``sh``: a script that must exit
  0, its output not checked.  ``python``: a program that must exit 0.  ``pycon``: an interpreter
  session, checked as a doctest.  Any other language is shown, never run.
- After the language, one attribute may follow: ``file: NAME`` (the block is written to NAME in the
  page's folder instead of run), ``needs: WHAT...`` (run only where each is here: a command on PATH,
  or ``perl:MODULE``, ``ruby:LIBRARY``, ``python:MODULE``; skipped with that reason elsewhere) or
  ``not-run: REASON`` (never run, for blocks that change the machine or take minutes).
- In expected output, ``...`` matches anything (within a line, or whole lines), runs of blanks are
  equal, and an age in a table (``3s``, ``2m``) matches any age.
- The docs show the default port 11800 and range 11801-12800.  Each page runs with a port and a
  1,000-port range of its own (NODEMNGR_PORT, NODEMNGR_FIRST_PORT, NODEMNGR_LAST_PORT, and a state
  file of its own in NODEMNGR_STATE); in the blocks and their outputs, 11800 stands for the page's
  port and 11801 + N for the range's first port + N.  etcd's 2379 and 2380 stand for free ports.
- Each block runs in a fresh shell or interpreter, in a folder of the page's own where the
  repository's files are linked; ``nodemngr`` and ``python3`` on PATH are the repository's
  nodemngr.py and the Python running the tests.  Nothing is running when a page starts: the blocks
  start what they need (a client starts the node manager).  Whatever they leave running is stopped
  by pid at the page's end: every process left in the sessions the blocks ran in, and every node
  manager started for the page (its state file, in the page's folder, is on its command line).

Other checks: the README is a front door (at most 1,500 words, links to every page of docs/), every
relative link of the docs leads to a file, and no user-facing text cites an internal issue number.
"""
import doctest
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from support import ROOT, clean_env, free_port, free_range, pid_alive, stop_pid

DOCS = os.path.join(ROOT, "docs")
PAGES = ["README.md"] + sorted("docs/" + name for name in os.listdir(DOCS) if name.endswith(".md"))

DOC_PORT, DOC_FIRST, DOC_LAST = 11800, 11801, 12800     # nmPort, firstPort, lastPort: what the docs show
DOC_OTHER_PORTS = (2379, 2380)                          # etcd's client and peer ports (docs/cluster.md)
NUMBER = re.compile(r"(?<![\d.])\d{4,5}(?!\d)")
AGE = re.compile(r"(?<=\s)\d+[smhd](?=\s|$)", re.M)
MARK = re.compile(r"\x1e(\d+)\x1e")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)(?P<rest>.*)$")
ATTRIBUTE = re.compile(r"^(?P<key>file|needs|not-run):\s*(?P<value>\S.*)$")
SHELLS = ("sh", "bash", "shell")
CHECK = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
BLOCK_TIMEOUT = 60

DOCTEST = """import doctest, sys
text = sys.stdin.read()
test = doctest.DocTestParser().get_doctest(text, {"__name__": "__main__"}, sys.argv[1], sys.argv[1], 0)
runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
runner.run(test)
sys.exit(1 if runner.failures else 0)
"""


class Block:
    def __init__(self, page, line, lang, attribute, text):
        self.page, self.line, self.lang, self.text = page, line, lang, text
        self.key, self.value = attribute

    def __repr__(self):
        return "%s:%d (%s)" % (self.page, self.line, self.lang or "plain")


def blocks(page):
    """The fenced blocks of *page*, in order."""
    lines = open(os.path.join(ROOT, page), encoding="utf-8").read().split("\n")
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = m.group("indent"), i + 1
        rest = m.group("rest").strip()
        attribute = (None, None)
        if rest:
            a = ATTRIBUTE.match(rest)
            assert a, "%s:%d: a fence takes one attribute, file:, needs: or not-run:, not %r" % (page, start, rest)
            attribute = (a.group("key"), a.group("value").strip())
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        assert i < len(lines), "%s:%d: a fence is never closed" % (page, start)
        found.append(Block(page, start, m.group("lang"), attribute, "\n".join(body) + "\n"))
        i += 1
    return found


def transcript(text):
    """[(command, expected output)] of a console block."""
    pairs, lines = [], text.rstrip("\n").split("\n")
    i = 0
    assert lines and lines[0].startswith("$ "), "a console block starts with a $ command"
    while i < len(lines):
        command = lines[i][2:]
        i += 1
        while command.endswith("\\") or not _complete(command):
            assert i < len(lines), "a command is cut off: %r" % command
            command += "\n" + lines[i]
            i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        pairs.append((command, "\n".join(output)))
    return pairs


def _complete(command):
    try:
        shlex.split(command, comments=True)
    except ValueError:      # a quote still open
        return False
    return True


class Page:
    """A page's run: its port, range, folder and environment, and the processes to stop."""

    def __init__(self, page, tmp_path):
        self.page = page
        self.port = free_port()
        self.first, last = free_range(DOC_LAST - DOC_FIRST + 1, check=32)
        self.others = {port: free_port() for port in DOC_OTHER_PORTS}
        self.folder = tmp_path / "page"
        self.folder.mkdir()
        for name in ("nodemngr.py", "nodemngr_proxy.py", "pytest_nodemngr.py", "contrib", "bench", "setup.py"):
            os.symlink(os.path.join(ROOT, name), str(self.folder / name))
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        # nodemngr as the installed console script runs it (an import, so the bytecode cache serves)
        console_script = "import sys; sys.path.insert(0, %r); import nodemngr; sys.exit(nodemngr.main())" % ROOT
        for name, argv in (("nodemngr", [sys.executable, "-c", console_script]),
                           ("python3", [sys.executable]), ("python", [sys.executable])):
            path = bin_dir / name
            path.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(shlex.quote(a) for a in argv))
            path.chmod(0o755)
        env = {k: v for k, v in clean_env().items() if not k.startswith(("PYTEST_", "COV_", "TOX_"))}
        env.update(NODEMNGR_PORT=str(self.port), NODEMNGR_FIRST_PORT=str(self.first),
                   NODEMNGR_LAST_PORT=str(last), NODEMNGR_STATE=str(tmp_path / "state" / "nodemngr.sqlite3"),
                   PATH=str(bin_dir) + os.pathsep + env.get("PATH", os.defpath), PYTHONPATH=ROOT, COLUMNS="80")
        self.env = env
        self.sessions = []
        self.skipped = []

    def to_test(self, text):
        """The docs' port numbers in *text* made this page's."""
        def sub(m):
            n = int(m.group(0))
            if n == DOC_PORT:
                return str(self.port)
            if DOC_FIRST <= n <= DOC_LAST:
                return str(self.first + n - DOC_FIRST)
            return str(self.others.get(n, n))
        return NUMBER.sub(sub, text)

    # -- running ---------------------------------------------------------------------------------

    def run(self, argv, block, stdin=None):
        """Run *argv* in a session of its own; (exit status, output)."""
        out_path = self.folder.parent / "out"
        with open(str(out_path), "w+b") as out:
            proc = subprocess.Popen(argv, cwd=str(self.folder), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    start_new_session=True)
            self.sessions.append(proc.pid)
            try:
                proc.communicate(stdin.encode() if stdin is not None else None, timeout=BLOCK_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.stop_sessions()
                proc.wait()
                pytest.fail("%r did not end within %d s" % (block, BLOCK_TIMEOUT))
            out.seek(0)
            return proc.returncode, out.read().decode("utf-8", "replace")

    def why_not(self, needs):
        """Why a block that needs *needs* cannot run here, or None."""
        missing = []
        for need in needs.split():
            lang, _, module = need.partition(":")
            if not module:
                ok = shutil.which(need, path=self.env["PATH"]) is not None
            else:
                check = {"perl": ["perl", "-M" + module, "-e1"], "ruby": ["ruby", "-r" + module, "-e0"],
                         "python": [sys.executable, "-c", "import " + module]}[lang]
                ok = shutil.which(check[0]) is not None and subprocess.run(
                    check, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env).returncode == 0
            if not ok:
                missing.append(need)
        return "needs %s" % ", ".join(missing) if missing else None

    def block(self, block):
        if block.key == "not-run":
            return
        if block.key == "needs":
            reason = self.why_not(block.value)
            if reason:
                self.skipped.append("%r %s" % (block, reason))
                return
        text = self.to_test(block.text)
        if block.key == "file":
            (self.folder / block.value).write_text(text)
        elif block.lang == "console":
            self.console(block, text)
        elif block.lang in SHELLS:
            status, out = self.run(["bash", "-e", "-c", text], block)
            assert status == 0, "%r exited %d:\n%s" % (block, status, out)
        elif block.lang == "python":
            status, out = self.run([sys.executable, "-"], block, stdin=text)
            assert status == 0, "%r exited %d:\n%s" % (block, status, out)
        elif block.lang == "pycon":
            status, out = self.run([sys.executable, "-c", DOCTEST, repr(block)], block, stdin=text)
            assert status == 0, "%r is not what the session shows:\n%s" % (block, out)

    def console(self, block, text):
        pairs = transcript(text)
        script = "exec 2>&1\n" + "".join("printf '\\036%d\\036'\n%s\n" % (i, command)
                                          for i, (command, _) in enumerate(pairs))
        _, out = self.run(["bash", "-c", script], block)
        pieces = MARK.split(out)
        got = {int(pieces[i]): pieces[i + 1] for i in range(1, len(pieces) - 1, 2)}
        checker = doctest.OutputChecker()
        for i, (command, want) in enumerate(pairs):
            assert i in got, "%r: the block stopped before `%s`:\n%s" % (block, command, out)
            have = AGE.sub("0s", got[i].rstrip())
            if not checker.check_output(AGE.sub("0s", want.rstrip()) + "\n", have + "\n", CHECK):
                pytest.fail("%r: `%s` printed\n%s\nwhere the page shows\n%s" % (
                    block, command, got[i].rstrip() or "(nothing)", want or "(nothing)"))

    # -- stopping --------------------------------------------------------------------------------

    def stop_sessions(self):
        """Stop, by pid, every process left in the sessions the blocks ran in."""
        for pid in self.processes(lambda pid: int(_read("/proc/%d/stat" % pid).rsplit(b")", 1)[1].split()[3])
                                  in self.sessions):
            stop_pid(pid)

    def stop(self):
        """Stop what the page left running: the processes of its blocks' sessions, and the node
        managers started for it (a client starts one detached, in a session of its own, with the
        page's state file on its command line)."""
        self.stop_sessions()
        mine = str(self.folder.parent).encode() + b"/"
        left = self.processes(lambda pid: mine in _read("/proc/%d/cmdline" % pid) and pid != os.getpid())
        for pid in left:
            stop_pid(pid)
        assert not [pid for pid in left if pid_alive(pid)]

    @staticmethod
    def processes(predicate):
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if predicate(int(name)):
                        found.append(int(name))
                except (OSError, IndexError, ValueError):    # (gone meanwhile)
                    continue
        return found


def _read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("page", PAGES)
def test_the_blocks_run_as_shown(page, tmp_path):
    run = Page(page, tmp_path)
    try:
        for block in blocks(page):
            run.block(block)
    finally:
        run.stop()
    if run.skipped:
        pytest.skip("every other block ran as shown; not here: %s" % "; ".join(run.skipped))


# --- the pages as a whole --------------------------------------------------------------------------

def read(page):
    return open(os.path.join(ROOT, page), encoding="utf-8").read()


def test_the_readme_is_a_front_door():
    readme = read("README.md")
    words = len(readme.split())
    assert words <= 1500, "the README has %d words; a five-minute read is at most 1,500" % words
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]+)?\)", readme))
    assert linked == set(PAGES[1:]), "pages the README does not link: %s" % sorted(set(PAGES[1:]) - linked)


@pytest.mark.parametrize("page", PAGES)
def test_links_lead_somewhere_and_no_internal_issue_is_cited(page):
    text = read(page)
    folder = os.path.dirname(os.path.join(ROOT, page))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(os.path.join(folder, target.split("#")[0]))
        assert os.path.exists(path), "%s links to %s, which does not exist" % (page, target)
    cited = re.findall(r"(?i)\bissues?\b[^.\n]{0,20}\d+|(?<![\w&/])#\d+\b", text)
    assert not cited, "%s cites issue numbers, which mean nothing to its readers: %s" % (page, cited)


def test_the_block_conventions_hold():
    """Every fence is closed and has at most one known attribute, and every console block starts with
    a command, on every page (blocks() and transcript() assert them)."""
    for page in PAGES:
        for block in blocks(page):
            if block.lang == "console" and block.key not in ("file", "not-run"):
                transcript(block.text)
