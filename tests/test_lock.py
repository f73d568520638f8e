"""The lock is what is tested: the running environment matches requirements/lock.txt, and pyproject's ranges admit
exactly the locked release lines (docs/dependencies.md)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


def _direct() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    out = {}
    for req in project["dependencies"] + project["optional-dependencies"]["dev"]:
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", req)
        assert m, req
        out[_norm(m.group(1))] = m.group(2)
    return out


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def test_every_locked_package_is_installed_at_its_locked_version():
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {n: (v, installed.get(n)) for n, v in _lock().items()
             if installed.get(n, "").split("+")[0] != v}  # torch's local label (+cpu) is the machine's
    assert not wrong, ("installed versions differ from requirements/lock.txt (install with "
                       f"`pip install -c requirements/lock.txt ...`): {wrong}")


def test_every_direct_dependency_is_locked():
    lock = _lock()
    assert set(_direct()) <= set(lock), set(_direct()) - set(lock)


@pytest.mark.parametrize("name", sorted(_direct()))
def test_pyproject_range_has_a_lower_and_an_upper_bound_around_the_lock(name):
    spec = _direct()[name]
    lower = re.search(r">=\s*([0-9.]+)", spec)
    upper = re.search(r"<\s*([0-9.]+)", spec)
    assert lower and upper, f"{name}{spec}: needs >= (tested) and < (next untested line)"
    locked = _version(_lock()[name])
    assert _version(lower.group(1)) <= locked < _version(upper.group(1)), (name, spec, locked)


def test_toml_reader_needs_no_backport():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["requires-python"] == ">=3.11"  # tomllib is in the standard library from 3.11
