"""tox's inline plugin for nodemngr: run every Python 3.8 to 3.13 the machine has, pyenv's included,
and say which ran and which are missing, and why.

tox finds an interpreter for py38 by looking for python3.8 on PATH.  pyenv puts shims there that
answer only for the versions pyenv has selected, so a Python that pyenv installed but did not select
looked missing ("could not find python interpreter"), and tox skipped it quietly.  This plugin adds
the newest plain release of each 3.8-3.13 under PYENV_ROOT (else ~/.pyenv) to the interpreters tox
tries first (its --discover option), which both of tox's ways of making an environment use.  On a
machine without pyenv it adds nothing, and tox finds what PATH has as usual.

When tox runs environments, it first says, for each Python of the matrix, which interpreter will
run it, or that none is here; an environment with none is skipped (skip_missing_interpreters), and
tox's summary lists it as SKIP.
"""
import glob
import os
import re
import shutil
import sys

from tox.plugin import impl

MINORS = range(8, 14)


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


def path_python(minor):
    """python3.X on PATH, unless it is one of pyenv's shims (which answer only when selected)."""
    exe = shutil.which("python3.%d" % minor)
    if exe and os.path.dirname(os.path.abspath(exe)) == os.path.join(pyenv_root(), "shims"):
        return None
    return exe


def runs_environments(options):
    """Whether this tox command runs environments (not tox -l, --showconfig, config, ...)."""
    command = getattr(options, "command", None)
    if command in ("legacy", "le"):
        return not any(getattr(options, flag, None) for flag in ("list_envs", "list_envs_all", "show_config",
                                                                  "devenv_path"))
    return command in ("r", "run", "p", "run-parallel")


@impl
def tox_add_core_config(core_conf, state):
    options = state.conf.options
    pythons = pyenv_pythons()
    options.discover = list(getattr(options, "discover", None) or []) + [pythons[m] for m in sorted(pythons)]
    if not runs_environments(options):
        return
    lines = []
    for minor in MINORS:
        if minor in pythons:
            lines.append("py3%d: %s (pyenv)" % (minor, pythons[minor]))
        elif path_python(minor):
            lines.append("py3%d: %s (PATH)" % (minor, path_python(minor)))
        else:
            lines.append("py3%d: MISSING: no python3.%d on PATH, and none installed by pyenv in %s; its "
                         "environment is skipped" % (minor, minor, os.path.join(pyenv_root(), "versions")))
    print("Pythons for the matrix:\n  " + "\n  ".join(lines), file=sys.stdout, flush=True)
