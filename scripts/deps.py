"""Maintain requirements/lock.txt: the exact versions CI and the README's quick start install.

    python scripts/deps.py lock            # re-freeze the lock: keeps every pin, adds what pyproject newly needs
    python scripts/deps.py lock --upgrade  # move every pin to the newest release pyproject's ranges allow
    python scripts/deps.py latest          # suite on the newest releases pyproject allows (are the ranges honest?)
    python scripts/deps.py beyond          # each direct dependency alone raised past its upper bound: which break?
    python scripts/deps.py lowest          # suite on pyproject's lower bounds

Each mode builds a throwaway venv under a temporary folder (or --venv DIR), so the caller's environment is never
touched. `latest`, `beyond` and `lowest` print one table: package, locked version, tried version, result (the test
count and the first failing tests). docs/dependencies.md says how to read it and when to move the lock.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
EXTRAS = "dev"
# torch comes from the machine's wheel cache; a newer torch from PyPI is a CUDA build of several GB.
HEAVY = {"torch"}
LOCK_HEADER = """\
# The exact versions sdtune is tested with (CI and the README's quick start install through this file as a pip
# constraints file: `pip install -c requirements/lock.txt ...`). Python 3.11, Linux x86_64, CPU torch.
# Do not edit by hand: `python scripts/deps.py lock` writes it; docs/dependencies.md says when and how to move it.
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[norm(name)] = version.strip()
    return pins


def direct_requirements() -> list[tuple[str, str]]:
    """(name, specifier) of pyproject's runtime and dev dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"].get(EXTRAS, []))
    out = []
    for r in reqs:
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", r.split(";")[0])
        assert m, r
        out.append((norm(m.group(1)), m.group(2).strip()))
    return out


def lower_bound(spec: str) -> str | None:
    m = re.search(r">=\s*([0-9][^,\s]*)", spec)
    return m.group(1) if m else None


class Venv:
    def __init__(self, path: Path) -> None:
        self.path = path
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
        self.python = str(path / "bin" / "python")

    def pip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.python, "-m", "pip", "--disable-pip-version-check", "-q", *args]
        print("+ pip " + " ".join(args), flush=True)
        return subprocess.run(cmd, check=check, text=True, capture_output=not check)

    def freeze(self) -> dict[str, str]:
        out = subprocess.run([self.python, "-m", "pip", "list", "--format=json", "--exclude-editable"],
                             check=True, text=True, capture_output=True).stdout
        return {norm(p["name"]): p["version"] for p in json.loads(out)}

    def pytest(self, args: list[str]) -> tuple[bool, str]:
        """(passed, one-line summary with the first failures)."""
        # tests/test_lock.py asserts the environment equals the lock, which these runs vary on purpose
        proc = subprocess.run([self.python, "-m", "pytest", "-rf", "-p", "no:cacheprovider",
                               "--ignore=tests/test_lock.py", *args],
                              cwd=ROOT, text=True, capture_output=True, env=_test_env())
        lines = proc.stdout.splitlines()
        summary = next((l for l in reversed(lines) if re.search(r"\d+ (passed|failed|error)", l)), "no summary")
        failed = [l.split(" ", 1)[1].split(" - ")[0] for l in lines if l.startswith("FAILED ")]
        files = sorted({f.split("::")[0] for f in failed})
        detail = f"; failing files: {', '.join(files)}" if files else ""
        first_error = next((l for l in lines if l.startswith("E  ")), "")
        if first_error:
            detail += f"; first error: {first_error[1:].strip()[:200]}"
        return proc.returncode == 0, summary.strip("= ") + detail


def _test_env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def torch_pin() -> str:
    """The locked torch (the machine's CPU wheel); the first lock takes pyproject's lower bound."""
    if LOCK.exists():
        return "torch==" + read_lock()["torch"]
    return "torch==" + next(lower_bound(s) for n, s in direct_requirements() if n == "torch")


def install_project(venv: Venv, *extra: str) -> None:
    venv.pip("install", torch_pin(), "-e", f"{ROOT}[{EXTRAS}]", *extra)


def cmd_lock(venv: Venv, upgrade: bool) -> None:
    constraints = [] if upgrade or not LOCK.exists() else ["-c", str(LOCK)]
    install_project(venv, *constraints)
    pins = venv.freeze()
    pins.pop("sdtune", None)
    for tool in ("pip", "setuptools", "wheel"):
        pins.pop(tool, None)
    pins["torch"] = pins["torch"].split("+", 1)[0]  # the local label (+cpu) is the machine's, not the lock's
    LOCK.parent.mkdir(exist_ok=True)
    LOCK.write_text(LOCK_HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(pins.items())), encoding="utf-8")
    print(f"wrote {LOCK.relative_to(ROOT)}: {len(pins)} packages")


def releases(venv: Venv, name: str) -> list[str]:
    """Every release of `name` on the index, newest first (pre-releases excluded)."""
    proc = subprocess.run([venv.python, "-m", "pip", "--disable-pip-version-check", "index", "versions", name],
                          text=True, capture_output=True)
    m = re.search(r"Available versions: (.*)", proc.stdout)
    if not m:
        raise SystemExit(f"cannot read the releases of {name} from the index: {proc.stderr.strip()[-300:]}")
    versions = [v.strip() for v in m.group(1).split(",")] if m else []
    return [v for v in versions if re.fullmatch(r"[0-9.]+", v)]


def minor_heads_above(versions: list[str], locked: str) -> list[str]:
    """The newest patch of every minor line newer than `locked`'s, oldest first."""
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    heads: dict[tuple[int, ...], str] = {}
    for v in versions:
        line = key(v)[:2]
        if key(v) > key(locked) and line != key(locked)[:2] and (line not in heads or key(v) > key(heads[line])):
            heads[line] = v
    return [heads[k] for k in sorted(heads)]


def report(rows: list[tuple[str, str, str, str]]) -> None:
    print("\npackage | locked | tried | result")
    print("--- | --- | --- | ---")
    for row in rows:
        print(" | ".join(row))


def cmd_latest(venv: Venv, pytest_args: list[str]) -> None:
    install_project(venv, "--upgrade", "--upgrade-strategy", "eager")
    lock, got = read_lock(), venv.freeze()
    ok, summary = venv.pytest(pytest_args)
    moved = [(n, lock.get(n, "-"), v) for n, v in sorted(got.items())
             if n in lock and lock[n] != v.split("+")[0]]
    rows = [(n, old, new, "") for n, old, new in moved] or [("(all)", "as locked", "as locked", "")]
    rows.append(("suite", "", "", ("PASS " if ok else "FAIL ") + summary))
    report(rows)


def cmd_beyond(venv: Venv, pytest_args: list[str], packages: list[str]) -> None:
    """Start from the lock; raise one direct dependency at a time to each newer minor line; run the suite."""
    lock = read_lock()
    install_project(venv, "-c", str(LOCK))
    direct = [n for n, _ in direct_requirements()]
    rows = []
    for name in packages or direct:
        if name in HEAVY and not packages:
            rows.append((name, lock[name], "-", "skipped (a newer torch is a multi-GB CUDA download; name it)"))
            continue
        heads = minor_heads_above(releases(venv, name), lock[name])
        if not heads:
            rows.append((name, lock[name], lock[name], "newest release is locked"))
        others = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        others.write("".join(f"{n}=={lock[n]}\n" for n in direct if n != name and n in lock))
        others.close()
        for version in heads:
            proc = venv.pip("install", f"{name}=={version}", "-c", others.name, check=False)
            if proc.returncode != 0:
                rows.append((name, lock[name], version, "does not install beside the lock: "
                             + (proc.stderr.strip().splitlines() or ["?"])[-1][:200]))
                continue
            ok, summary = venv.pytest(pytest_args)
            rows.append((name, lock[name], version, ("PASS " if ok else "FAIL ") + summary))
        if heads:  # back to exactly the lock before the next package
            venv.pip("install", "-c", str(LOCK), *(f"{n}=={v}" for n, v in lock.items() if n != "torch"))
    report(rows)


def cmd_lowest(venv: Venv, pytest_args: list[str]) -> None:
    pins = [f"{n}=={lower_bound(s)}" for n, s in direct_requirements() if lower_bound(s)]
    install_project(venv, *pins)
    ok, summary = venv.pytest(pytest_args)
    report([(p.split("==")[0], read_lock().get(p.split("==")[0], "-"), p.split("==")[1], "") for p in pins]
           + [("suite", "", "", ("PASS " if ok else "FAIL ") + summary)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["lock", "latest", "beyond", "lowest"])
    ap.add_argument("--upgrade", action="store_true", help="lock: newest allowed releases instead of the pins")
    ap.add_argument("--package", action="append", default=[], help="beyond: only these packages (repeatable)")
    ap.add_argument("--venv", type=Path, help="where to build the throwaway venv (default: a temporary folder)")
    ap.add_argument("pytest_args", nargs="*", help="after --: arguments for pytest (default: the whole suite)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtune-deps-") as tmp:
        venv = Venv(args.venv or Path(tmp) / "venv")
        if args.mode == "lock":
            cmd_lock(venv, args.upgrade)
        elif args.mode == "latest":
            cmd_latest(venv, args.pytest_args)
        elif args.mode == "beyond":
            cmd_beyond(venv, args.pytest_args, [norm(p) for p in args.package])
        else:
            cmd_lowest(venv, args.pytest_args)


if __name__ == "__main__":
    main()
