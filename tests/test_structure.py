"""The shape of the product: nodemngr.py is a whole deployment by itself, its map says the truth, its
sections depend one way, and nodemngr_proxy.py is a thin legacy name for its client.

The map and dependency checks read the source (ast, symtable); the single-file checks run a copy of
nodemngr.py alone, with no site-packages, against a daemon it starts itself on a free port.
"""
import ast
import bisect
import os
import re
import subprocess
import symtable
import sys
import textwrap

import pytest

from support import NODEMNGR, ROOT, clean_env, free_port, free_range, stop_pid, wait_until

import nodemngr
import nodemngr_proxy

SOURCE = open(NODEMNGR, encoding="utf-8").read()
TREE = ast.parse(SOURCE)
DOC = ast.get_docstring(TREE)
BANNER = re.compile(r"^# -{20,}\n# (\S[^\n]*)\n# -{20,}$", re.M)


def sections():
    """[(title, line)] of the section banners of nodemngr.py, in file order."""
    return [(m.group(1), SOURCE.count("\n", 0, m.start()) + 1) for m in BANNER.finditer(SOURCE)]


def docstring_block(heading):
    """The lines of the indented block that follows the line starting with *heading*."""
    after = DOC.split("\n" + heading, 1)[1].split("\n", 1)[1]
    return after.strip("\n").split("\n\n")[0].splitlines()


def section_of(line, starts):
    """The index of the section holding *line* (-1: above the first banner)."""
    return bisect.bisect_right(starts, line) - 1


def module_names():
    """{name: line} of every name bound at module level (imports included)."""
    names = {}

    def bind(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.setdefault(node.name, node.lineno)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    names.setdefault((alias.asname or alias.name).split(".")[0], node.lineno)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for sub in ast.walk(target):
                        if isinstance(sub, ast.Name):
                            names.setdefault(sub.id, node.lineno)
            for block in ("body", "orelse", "finalbody"):
                if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    bind(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                bind(handler.body)
    bind(TREE.body)
    return names


def global_reads():
    """(name, line of the scope) of every module-level name read inside a function or class body."""
    def walk(table):
        for child in table.get_children():
            for sym in child.get_symbols():
                if sym.is_referenced() and sym.is_global():
                    yield sym.get_name(), child.get_lineno()
            yield from walk(child)
    return list(walk(symtable.symtable(SOURCE, NODEMNGR, "exec")))


def test_the_map_lists_every_section_in_file_order():
    mapped = [re.split(r"\s{2,}", line.strip())[0] for line in docstring_block("Sections, in file order")]
    assert [title for title, _ in sections()] == mapped


def test_no_section_uses_a_name_defined_by_a_section_below_it():
    starts = [line for _, line in sections()]
    defined = {name: section_of(line, starts) for name, line in module_names().items()}
    titles = [title for title, _ in sections()]
    wrong = sorted({(titles[section_of(line, starts)], name, titles[defined[name]])
                    for name, line in global_reads()
                    if name in defined and defined[name] > section_of(line, starts)})
    assert not wrong, "a section uses a name of a section below it: %s" % [
        "%s uses %s (%s)" % w for w in wrong]


def test_the_feature_index_names_what_exists():
    named = 0
    for line in docstring_block("Where each feature lives"):
        names = line.strip() if line.startswith(" " * 12) else re.split(r"\s{2,}", line.strip(), maxsplit=1)[-1]
        for name in filter(None, re.split(r",\s*", names)):
            obj = nodemngr
            for part in name.strip().split("."):
                assert hasattr(obj, part), "the feature index names %s, which nodemngr does not have" % name
                obj = getattr(obj, part)
            named += 1
    assert named >= 20


def test_all_lists_every_public_name_and_nothing_else():
    public = {name for name in module_names() if not name.startswith("_")}
    imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(TREE)
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    assert set(nodemngr.__all__) == public - imported - {"log", "pytest_plugins"}     # (pytest's, not an API)
    assert len(nodemngr.__all__) == len(set(nodemngr.__all__))


def test_nodemngr_imports_only_the_standard_library_and_never_its_proxy():
    imported = {(node.module if isinstance(node, ast.ImportFrom) else a.name).split(".")[0]
                for node in ast.walk(TREE) if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    assert "nodemngr_proxy" not in imported and "pytest" not in imported
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib is None:
        pytest.skip("sys.stdlib_module_names is new in Python 3.10; the newer Pythons of the matrix check it")
    assert imported <= set(stdlib), imported - set(stdlib)


def test_the_proxy_module_is_a_thin_name_for_the_client():
    tree = ast.parse(open(os.path.join(ROOT, "nodemngr_proxy.py"), encoding="utf-8").read())
    code = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    assert [type(node).__name__ for node in code] == ["ImportFrom", "Assign"], "an import and __all__, nothing else"
    assert code[0].module == "nodemngr"
    for name in nodemngr_proxy.__all__:
        assert getattr(nodemngr_proxy, name) is getattr(nodemngr, name) and name in nodemngr.__all__


ALONE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.getcwd())                 # (-I leaves the working folder out)
    from nodemngr import nm, NodeMngrProxy, NodeMngrException
    import nodemngr
    assert "nodemngr_proxy" not in sys.modules and os.path.dirname(nodemngr.__file__) == os.getcwd()
    port = nm.newPort("alone")                      # no daemon answers: this starts one
    print(port, nm.status()["pid"], flush=True)
    assert [e["port"] for e in NodeMngrProxy(autostart=False).lookup("alone")] == [port]
    nm.delPort(port)
    try:
        nm.delPort(port)
    except NodeMngrException as exc:
        print(exc.faultCode, isinstance(exc, IndexError))
""")


def test_nodemngr_py_alone_is_a_whole_deployment(tmp_path):
    """Copied alone into a folder and run with no site-packages (where tox installs the package),
    `from nodemngr import nm` starts a daemon from that same file and serves the 1999 calls."""
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "nodemngr.py").write_bytes(open(NODEMNGR, "rb").read())
    first, last = free_range(5)
    port = free_port()
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=tmp_path / "state.sqlite3")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", ALONE], cwd=str(alone), env=env, capture_output=True,
                       text=True, timeout=30)
    lines = r.stdout.split()
    daemon = int(lines[1]) if len(lines) > 1 else None
    try:
        assert r.returncode == 0, r.stderr
        assert first <= int(lines[0]) <= last and lines[2:] == ["1", "True"], r.stdout
        cmdline = open("/proc/%d/cmdline" % daemon, "rb").read().split(b"\0")
        assert str(alone / "nodemngr.py").encode() in cmdline, "the daemon runs the lone copy"
    finally:
        if daemon is not None:
            stop_pid(daemon)
    assert wait_until(lambda: not os.path.exists("/proc/%d" % daemon), timeout=10)


def test_the_suite_runs_serially_where_pytest_xdist_is_missing():
    """tox.ini asks for -n 3; `python3 -m pytest` in a clone without pytest-xdist (no plugin
    loaded here stands for it) runs the tests one at a time instead of failing on -n."""
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_structure.py",
                          "-k", "all_lists_every_public_name"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=clean_env(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1"))
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
