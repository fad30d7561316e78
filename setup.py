"""Packaging for nodemngr: two standard-library modules, the `nodemngr` console script, and the
pytest plugin pytest_nodemngr (entry point pytest11)."""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """The __version__ = "..." of nodemngr.py, read without importing it."""
    with open(os.path.join(HERE, "nodemngr.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__\s*=\s*[\'"]([^\'"]+)[\'"]', f.read(), re.M)
    if not match:
        raise RuntimeError("no __version__ line in nodemngr.py")
    return match.group(1)


def read_readme():
    try:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


setup(
    name="nodemngr",
    version=read_version(),
    description="Per-host node manager: hands out, tracks and takes back communication ports over XML-RPC",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="MIT",
    py_modules=["nodemngr", "nodemngr_proxy", "pytest_nodemngr"],
    python_requires=">=3.8",
    install_requires=[],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "portpicker", "prometheus_client"]},
    # pytest finds the fixtures of pytest_nodemngr.py through pytest11, which names nodemngr, whose
    # pytest_plugins names pytest_nodemngr (that module imports pytest, which nodemngr and
    # nodemngr_proxy never do: they stay standard library only); `pytest -p nodemngr` does the same
    # where the package is not installed
    entry_points={"console_scripts": ["nodemngr = nodemngr:main"], "pytest11": ["nodemngr = nodemngr"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.8",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Operating System :: POSIX",
        "Topic :: System :: Distributed Computing",
    ],
)
