"""Packaging for nodemngr: two standard-library modules and the `nodemngr` console script."""
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
    py_modules=["nodemngr", "nodemngr_proxy"],
    python_requires=">=3.8",
    install_requires=[],
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis"]},
    entry_points={"console_scripts": ["nodemngr = nodemngr:main"]},
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
