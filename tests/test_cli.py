"""The command line: every subcommand, exit codes 0/1/2/3, errors in one line without a traceback.

Client commands and usage errors run in this process through conftest's ``run_cli`` (nodemngr.main
with the product's variables of the environment given); ``python3 nodemngr.py`` itself runs as a
process where the process is the point: the script's entry point (a ping that works and one that
fails), and ``serve``, which binds, installs signal handlers and runs a loop."""
import os
import shutil
import socket
import subprocess
import sys
import threading
import xmlrpc.client

import pytest

from support import NODEMNGR, ROOT, clean_env, free_port, free_range, post, run_python, stop_pid, wait_until

import nodemngr


def cli(*args, env=None, timeout=30):
    """``python3 nodemngr.py ARGS`` as a process: (exit status, stdout, stderr).  (Forked where
    support's fork server can, as the script and with the interpreter's whole exit: what it prints
    even while its modules are torn down is there too.)"""
    proc = run_python([NODEMNGR] + [str(a) for a in args], env=env or clean_env(), capture_output=True,
                      text=True, timeout=timeout, finalize=True)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nodemngr: "), err


def test_client_subcommands(daemon, run_cli):
    env = daemon.env
    code, out, err = cli("ping", env=env)       # the script's entry point, in a process of its own
    assert (code, out.startswith("NodeMngr at "), err) == (0, True, "")
    code, out, err = run_cli("ping", env=env)           # the rest in this process
    assert (code, out.startswith("NodeMngr at "), err) == (0, True, "")
    code, out, _ = run_cli("new", "web frontend", env=env)
    assert code == 0 and int(out) == daemon.first
    code, out, _ = run_cli("new", "with owner", "--pid", os.getpid(), env=env)
    assert code == 0 and int(out) == daemon.first + 1
    code, out, _ = run_cli("list", env=env)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["PORT", "PID", "AGE", "INFO"]
    port, pid, age, info = lines[1].split(None, 3)
    assert (port, pid, age[-1], info) == (str(daemon.first), "0", "s", "web frontend")
    assert lines[2].split(None, 3)[:2] == [str(daemon.first + 1), str(os.getpid())]
    assert lines[1].index("web") == lines[0].index("INFO"), "columns are aligned"
    code, out, _ = run_cli("status", env=env)
    assert code == 0 and "registered 2" in " ".join(out.split())
    code, out, err = run_cli("del", daemon.first, env=env)
    assert (code, out, err) == (0, "", "")
    code, out, err = run_cli("del", daemon.first, env=env)
    assert code == 1 and err.strip() == "nodemngr: Node manager: Unknown port: %d" % daemon.first
    code, out, _ = run_cli("stop", env=env)
    assert code == 0 and "stopping" in out
    assert daemon.proc.wait(15) == 0


def test_flags_win_over_environment(any_daemon, run_cli):
    daemon = any_daemon
    env = clean_env(NODEMNGR_PORT=free_port(), NODEMNGR_AUTOSTART=0)
    code, out, _ = run_cli("ping", "--port", daemon.port, env=env)
    assert code == 0 and out.startswith("NodeMngr at ")


def test_errors_are_one_line_with_status_1():
    env = clean_env(NODEMNGR_PORT=free_port())
    code, out, err = cli("ping", env=env)       # a process: nothing else on its stderr, even at exit
    assert code == 1
    assert_one_line_error(err)
    assert "no node manager answers" in err
    code, _, err = cli("serve", "--port", free_port(), "--first-port", 2000, "--last-port", 1000, env=env)
    assert code == 1
    assert_one_line_error(err)


def test_usage_errors_are_status_2(run_cli):
    assert run_cli("frobnicate")[0] == 2
    assert run_cli("del", "not-a-number")[0] == 2
    code, out, _ = run_cli("--help")
    assert code == 0 and "serve" in out and "Exit status" in " ".join(out.split())


def test_serve_on_a_served_port_says_so_and_exits_3(any_daemon, tmp_path):
    daemon = any_daemon
    code, _, err = cli("serve", "--port", daemon.port, "--state", tmp_path / "other.sqlite3", env=daemon.env)
    assert code == 3
    assert_one_line_error(err)
    assert "already serving" in err
    assert daemon.rpc().ping()


def test_serve_on_a_port_held_by_something_else_exits_1(tmp_path):
    import socket
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        code, _, err = cli("serve", "--port", port, "--state", "none", timeout=30)
        assert code == 1
        assert_one_line_error(err)
        assert "held by another program" in err
    finally:
        holder.close()


def test_non_loopback_host_without_token_is_refused():
    code, _, err = cli("serve", "--host", "0.0.0.0", "--port", free_port(), "--state", "none")
    assert code == 1
    assert_one_line_error(err)
    assert "token" in err


def test_main_is_callable_with_argv_and_returns_the_status(capsys):
    import nodemngr
    with pytest.raises(SystemExit) as info:
        nodemngr.main(["--version"])
    assert info.value.code == 0 and nodemngr.__version__ in capsys.readouterr().out
    assert nodemngr.main(["ping", "--port", str(free_port())]) == 1
    assert_one_line_error(capsys.readouterr().err)


PYTHONS = ["python3.8", "python3.13"]


@pytest.mark.parametrize("python", PYTHONS)
def test_single_file_serves_in_isolated_mode(python, tmp_path):
    exe = shutil.which(python)
    if exe is None or subprocess.run([exe, "-c", ""], capture_output=True).returncode != 0:
        pytest.skip("%s is not installed here; .ci/run puts every installed Python on PATH" % python)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "nodemngr.py"), str(alone / "nodemngr.py"))
    port = free_port()
    env = clean_env(NODEMNGR_PORT=port, NODEMNGR_STATE=tmp_path / "state.sqlite3")
    proc = subprocess.Popen([exe, "-I", "nodemngr.py"], cwd=str(alone), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def ping():
            r = subprocess.run([exe, "-I", "nodemngr.py", "ping"], cwd=str(alone), env=env,
                               capture_output=True, text=True, timeout=30)
            return r.returncode == 0 and r.stdout.startswith("NodeMngr at ")
        assert wait_until(ping, 15), proc.stdout.read1(65536) if proc.poll() is not None else "no answer"
        r = subprocess.run([exe, "-I", "nodemngr.py", "new", "from a lone file"], cwd=str(alone), env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and 11801 <= int(r.stdout) <= 12800
        r = subprocess.run([exe, "-I", "nodemngr.py", "stop"], cwd=str(alone), env=env,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0
        assert proc.wait(15) == 0
        assert sorted(os.listdir(str(alone))) == ["nodemngr.py"], "nothing written beside the file"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# --- errors in one line, and what listings print --------------------------------------------------

def test_cli_errors_are_one_line(any_daemon, run_cli):
    daemon = any_daemon
    for args, expected in ((["new", "x", "--pid", "3000000000"], 2), (["del", "3000000000"], 2),
                           (["serve", "--port", "70000"], 2), (["del", "0"], 2),
                           (["serve", "--state", "none", "--port", str(free_port()),
                             "--log-file", "/nonexistent/x.log"], 1)):
        run = cli if expected == 1 else run_cli     # usage errors in this process; serve's own as one
        code, _, err = run(*args, env=daemon.env)
        assert code == expected, (args, err)
        assert "Traceback" not in err and err.count("\n") == 1, (args, err)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def speak_ssh():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")
            conn.close()
    threading.Thread(target=speak_ssh, daemon=True).start()
    try:
        code, _, err = run_cli("ping", env=clean_env(NODEMNGR_PORT=listener.getsockname()[1]))
    finally:
        stop.set()
        listener.close()
    assert code == 1 and "Traceback" not in err and err.count("\n") == 1, err


def test_carriage_returns_round_trip_and_listings_escape_control_characters(any_daemon, run_cli):
    daemon = any_daemon
    nm = daemon.proxy()
    tricky = "a\rb\r\nc"
    port = nm.newPort(tricky, 0)
    forged = "real\r\n%d  0    0s   forged\x9b2J" % (port + 1)
    nm.newPort(forged, 0)
    assert [e["info"] for e in nm.listPorts()] == [tricky, forged]
    code, out, err = run_cli("list", env=daemon.env)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3, lines
    assert lines[2].endswith("real\\r\\n%d  0    0s   forged\\x9b2J" % (port + 1))
    assert "\x9b" not in out


def test_more_errors_in_one_line(any_daemon, run_cli):
    daemon = any_daemon
    for args, env in ((["ping", "--host", "127.0.0.1:5"], clean_env(NODEMNGR_PORT=free_port())),
                      (["stop"], clean_env(NODEMNGR_HOST="[::1", NODEMNGR_PORT=free_port())),
                      (["new", "a\x1bb"], daemon.env)):
        code, _, err = run_cli(*args, env=env)
        assert code == 1 and "Traceback" not in err and err.count("\n") == 1, (args, err)
    assert "U+001B" in err
    with pytest.raises(nodemngr.BadArgumentError) as info:
        daemon.proxy().newPort("a\x01b")
    assert "U+0001" in str(info.value)
    with pytest.raises(xmlrpc.client.Fault) as fault:
        daemon.rpc()._ServerProxy__request("newPort", ())  # a warm-up that is well-formed: arity fault
    assert fault.value.faultCode == -32602
    body = (b"<?xml version='1.0'?><methodCall><methodName>newPort</methodName><params><param><value>"
            b"<struct><member><value><int>1</int></value></member></struct></value></param></params></methodCall>")
    fault = post(daemon, body, headers=["Connection: close"]).result()
    assert isinstance(fault, xmlrpc.client.Fault), fault
    assert fault.faultCode == -32600 and "<name>" in fault.faultString


def test_list_shows_text_in_any_script_as_it_was_given(daemon_factory, tmp_path, run_cli):
    """`nodemngr list` (and `lookup`) show an info as given, in any script: Persian needs its
    zero-width non-joiner, emoji sequences their zero-width joiner, French its no-break spaces; only
    what could forge rows or drive the terminal is escaped."""
    d = daemon_factory(size=10, state="none")
    infos = ["\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",         # Persian, with U+200C
             "dev \U0001F469\u200d\U0001F4BB",                           # woman technologist (U+200D)
             "caf\u00e9\u00a0au\u00a0lait",                              # no-break spaces
             "\u0928\u092e\u0938\u094d\u200d\u0924\u0947"]              # Devanagari with U+200D
    rpc = d.rpc()
    for info in infos:
        rpc.newPort(info)
    code, out, err = run_cli("list", env=d.env)
    assert code == 0, err
    for info in infos:
        assert info in out, "%r is not shown as given:\n%s" % (info, out)
    code, out, err = run_cli("lookup", infos[0], env=d.env)
    assert code == 0 and infos[0] in out, out
    # what could forge rows or drive the terminal is escaped (a C1 CSI, a line break, a line separator)
    rpc.newPort("a\u009b2Jb\nfake row\u2028x")     # (C1 CSI, a line break, a line separator)
    code, out, err = run_cli("list", env=d.env)
    assert code == 0 and not any(c in out for c in "\u009b\u2028") and "\nfake row" not in out, out


@pytest.mark.parametrize("host", ["my..host", "a" * 64 + ".example"])
def test_a_host_name_idna_refuses_is_one_line_and_exit_1(tmp_path, host):
    """NODEMNGR_HOST with an empty label (a typo: two dots) or a label over 63 characters, which
    the resolver's IDNA codec refuses (UnicodeError, not an OSError): one line and exit 1 from the
    command line and from serve, not a traceback."""
    env = clean_env(NODEMNGR_HOST=host, NODEMNGR_PORT=free_port(), NODEMNGR_AUTOSTART=0,
                    NODEMNGR_STATE=tmp_path / "state.sqlite3", NODEMNGR_UNIX=tmp_path / "local.sock")
    for args in (["ping"], ["list"], ["new", "x"], ["serve"]):
        r = subprocess.run([sys.executable, NODEMNGR] + args, env=env, capture_output=True, text=True, timeout=30)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, (
            args, r.returncode, r.stderr[-600:])


# --- a newcomer's command line: it starts its daemon, takes options anywhere, says how ------------

@pytest.fixture
def nobody_serving(tmp_path):
    """The environment of a node manager nobody runs yet (its own port, range and state); at the
    end, a daemon a command started there is stopped by its pid."""
    first, last = free_range(10)
    env = clean_env(NODEMNGR_PORT=free_port(), NODEMNGR_FIRST_PORT=first, NODEMNGR_LAST_PORT=last,
                    NODEMNGR_STATE=tmp_path / "state.sqlite3")
    yield env
    try:
        pid = nodemngr.server_proxy("127.0.0.1", int(env["NODEMNGR_PORT"]), timeout=2.0).status()["pid"]
    except (OSError, xmlrpc.client.Error):
        return
    stop_pid(pid)


def test_commands_that_need_a_node_manager_start_one_and_the_others_never_do(nobody_serving, run_cli):
    env = nobody_serving
    for command in (["ping"], ["status"], ["stop"]):
        code, out, err = run_cli(*command, env=env)
        assert code == 1 and "no node manager answers" in err and "auto-start" not in err, (command, err)
    code, out, err = run_cli("new", "x", env=dict(env, NODEMNGR_AUTOSTART="0"))
    assert code == 1 and "(auto-start is off)" in err, err
    code, out, err = run_cli("new", "web", env=env)
    assert code == 0 and int(out) == int(env["NODEMNGR_FIRST_PORT"]), err
    code, out, err = run_cli("ping", env=env)
    assert code == 0 and out.startswith("NodeMngr at "), "the daemon new started serves on"


def test_global_options_stand_before_or_after_the_command(any_daemon, run_cli):
    env = clean_env(NODEMNGR_PORT=free_port(), NODEMNGR_AUTOSTART=0)    # (nobody there)
    for args in (["--port", any_daemon.port, "ping"], ["ping", "--port", any_daemon.port],
                 ["--port=%d" % any_daemon.port, "ping"], ["--host", "127.0.0.1", "--port", any_daemon.port, "new", "x"],
                 ["--port", free_port(), "ping", "--port", any_daemon.port]):
        code, out, err = run_cli(*args, env=env)
        assert code == 0 and err == "", (args, err)


def test_help_lists_every_command_and_every_option_of_each(run_cli):
    code, out, _ = run_cli("help")
    assert code == 0
    commands = ["serve", "ping", "status", "list", "locate", "new", "port", "lookup", "del", "stop", "run", "help"]
    for command in commands:
        assert command in out.split(), command
    parser, subcommands = nodemngr._parser()
    for command in commands:
        code, out, _ = run_cli("help", command)
        assert code == 0 and out.startswith("usage: nodemngr"), command
        options = [o for action in subcommands[command]._actions for o in action.option_strings]
        for option in options + (["--host", "--port", "--token-file"] if command != "help" else []):
            assert option in out, "%s --help lacks %s" % (command, option)
        assert run_cli(command, "--help")[1] == out
    code, out, err = run_cli("help", "frobnicate")
    assert code == 2 and "there is no command frobnicate" in err and len(err.strip().splitlines()) == 1


def test_new_with_several_words_says_to_quote_them(run_cli):
    code, out, err = run_cli("new", "web", "frontend")
    assert code == 2 and out == ""
    assert "quote it if it has spaces: nodemngr new 'web frontend'" in err and len(err.strip().splitlines()) == 1


def test_port_prints_the_same_port_for_a_name_every_time(daemon, run_cli):
    env = daemon.env
    code, out, err = run_cli("port", "db", "the database", env=env)
    assert code == 0 and int(out) == daemon.first, err
    assert run_cli("new", "something else", env=env)[1].strip() == str(daemon.first + 1)
    assert run_cli("port", "db", env=env)[1].strip() == str(daemon.first), "the same port, whatever INFO says"
    code, out, _ = run_cli("lookup", "db", env=env)
    assert code == 0 and "{'name': 'db', 'info': 'the database'}" in out
    held = daemon.rpc().newPort({"name": "cache"})
    assert daemon.proxy().namedPort("cache") == held, "a name newPort registered is that name's port"
    assert run_cli("del", daemon.first, env=env)[0] == 0
    assert run_cli("port", "db", env=env)[1].strip() == str(daemon.first), "sticky: back on its port"
    with pytest.raises(xmlrpc.client.Fault) as info:
        daemon.rpc().namedPort("")
    assert info.value.faultCode == 3 and "non-empty string" in info.value.faultString
    with pytest.raises(xmlrpc.client.Fault) as info:
        daemon.rpc().namedPort(7)
    assert info.value.faultCode == 3


def test_status_says_nothing_of_a_cluster_there_is_not(daemon, run_cli):
    code, out, _ = run_cli("status", env=daemon.env)
    assert code == 0 and "registered" in out
    assert "cluster" not in out, "no cluster view: no cluster rows"


def test_new_with_count_prints_a_block_one_port_a_line(daemon, run_cli):
    env = daemon.env
    code, out, err = run_cli("new", "trio", "--count", 3, "--consecutive", env=env)
    assert code == 0 and err == "" and out.splitlines() == [str(p) for p in range(daemon.first, daemon.first + 3)]
    code, out, err = run_cli("new", "a pair", "--name", "pair", "--count", 2, "--pid", os.getpid(), env=env)
    assert code == 0 and [int(p) for p in out.split()] == [daemon.first + 3, daemon.first + 4], err
    assert [(e["port"], e["pid"], e["info"]) for e in daemon.rpc().lookup("pair")] == [
        (p, os.getpid(), {"name": "pair", "info": "a pair"}) for p in (daemon.first + 3, daemon.first + 4)]
    for args, text in ((["--consecutive"], "--consecutive asks for a block of ports: give --count N too"),
                       (["--count", 0], "--count must be an integer from 1 to 64, not 0"),
                       (["--count", 65], "not 65"), (["--count", "three"], "not three")):
        code, out, err = run_cli("new", "x", *args, env=env)
        assert code == 2 and out == "" and text in err and len(err.strip().splitlines()) == 1, (args, err)
    code, out, err = run_cli("new", "too many", "--count", 64, "--consecutive", env=env)
    assert code == 1 and out == "" and "no block of 64 consecutive ports free" in err
    assert_one_line_error(err)
