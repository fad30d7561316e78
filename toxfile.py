"""tox's inline plugin for nodemngr: run every Python 3.8 to 3.13 the machine has, pyenv's included,
and say which ran and which are missing, and why.

tox finds an interpreter for py38 by looking for python3.8 on PATH.  pyenv puts shims there that
answer only for the versions pyenv has selected, so a Python that pyenv installed but did not select
looked missing ("could not find python interpreter"), and tox skipped it quietly.  For each 3.X of
the matrix that no python3.X on PATH runs, this plugin selects for the py3X environment alone the
newest plain release pyenv has under PYENV_ROOT (else ~/.pyenv), through PYENV_VERSION in its
set_env: tox's discovery reads it to resolve pyenv's shim (in either of tox's ways of making an
environment), and the tests' own python3.X calls find it too.  Other environments (exec: python3)
see no change.  On a machine without pyenv it does nothing, and tox finds what PATH has as usual.

Before it makes or runs environments, tox says, for each Python of the matrix, which interpreter
will run it, or that none is here; an environment with none is skipped (skip_missing_interpreters),
and tox's summary lists it as SKIP.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from tox.plugin import impl

MINORS = range(8, 14)
_SELECT = {}    # {minor: pyenv version name} of the Pythons found only through pyenv


def pyenv_root():
    return os.environ.get("PYENV_ROOT") or os.path.join(os.path.expanduser("~"), ".pyenv")


def pyenv_pythons():
    """{minor: path} of the newest plain release (3.X.Y, not 3.13.0t or 3.12-dev) of each 3.X of the
    matrix that pyenv has installed, selected or not."""
    found = {}
    for folder in glob.glob(os.path.join(pyenv_root(), "versions", "3.*")):
        m = re.fullmatch(r"3\.(\d+)\.(\d+)", os.path.basename(folder))
        if not m or int(m.group(1)) not in MINORS:
            continue
        minor, micro = int(m.group(1)), int(m.group(2))
        exe = os.path.join(folder, "bin", "python3.%d" % minor)
        if os.access(exe, os.X_OK) and micro >= found.get(minor, (-1, None))[0]:
            found[minor] = (micro, exe)
    return {minor: exe for minor, (_, exe) in found.items()}


def on_path(minor):
    """The interpreter python3.X on PATH runs (None when there is none, or it is one of pyenv's
    shims for a version pyenv has not selected, which only says "command not found")."""
    exe = shutil.which("python3.%d" % minor)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-c", "import sys; print(sys.executable)"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or exe if out.returncode == 0 else None


def only_lists(options):
    """Whether this tox command only lists or shows (tox -l, --showconfig, config), making nothing."""
    command = getattr(options, "command", None)
    if command in ("legacy", "le"):
        return any(getattr(options, flag, None) for flag in ("list_envs", "list_envs_all", "show_config"))
    return command in ("l", "list", "c", "config", "q", "quickstart", "depends", "de")


@impl
def tox_add_core_config(core_conf, state):
    options = state.conf.options
    if only_lists(options):
        return
    pyenv = pyenv_pythons()
    lines = []
    for minor in MINORS:
        found = on_path(minor)
        if found:
            lines.append("py3%d: %s (PATH)" % (minor, found))
        elif minor in pyenv:
            _SELECT[minor] = os.path.basename(os.path.dirname(os.path.dirname(pyenv[minor])))
            lines.append("py3%d: %s (pyenv, not selected: PYENV_VERSION=%s for py3%d)" % (
                minor, pyenv[minor], _SELECT[minor], minor))
        else:
            lines.append("py3%d: MISSING: no python3.%d on PATH, and none installed by pyenv in %s; its "
                         "environment is skipped" % (minor, minor, os.path.join(pyenv_root(), "versions")))
    print("Pythons for the matrix:\n  " + "\n  ".join(lines), file=sys.stdout, flush=True)


@impl
def tox_add_env_config(env_conf, state):
    m = re.fullmatch(r"(?:py|\.pkg-cpython)3(\d+)", env_conf.name)     # (and its package environment)
    if m and int(m.group(1)) in _SELECT:
        env_conf["set_env"].update({"PYENV_VERSION": _SELECT[int(m.group(1))], "PYENV_ROOT": pyenv_root()})
