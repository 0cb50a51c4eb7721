"""Which lines of ``mpo_core/`` and ``benchmarks/`` the tests never execute, against ``docs/gpu.md``.

``bash scripts/coverage.sh [PYTEST ARGS]`` runs pytest (default: the whole suite, as CI does) under
coverage.py, subprocesses included (the benchmarks' smoke runs, the check's re-exec), then
prints every line never executed and compares it with the list in ``docs/gpu.md``: each entry
there is a line that only a GPU runs (a kernel launch or a CUDA-only call) with the reason.

* a line never executed and not listed: a failure (exit 1), printed in the list's format;
* a listed line that ran, or whose code is gone: stale, a failure too (the list stays true).

Entries name the code, not the line number (``- path: `code` — reason``), so that edits above
a line do not make the list stale. ``--files GLOB ...`` restricts the comparison to some files
(for a run over a part of the suite); ``--data FILE`` reuses a coverage data file.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "gpu.md"
PACKAGES = ("mpo_core", "benchmarks")
ENTRY = re.compile(r"^- (?P<path>[\w./-]+\.py): `(?P<code>.+)` — (?P<reason>\S.*)$")


def read_list(doc: Path = DOC) -> dict[tuple[str, str], str]:
    """``{(path, code): reason}`` of every entry of the list in ``doc``."""
    entries = {}
    for line in doc.read_text().splitlines():
        m = ENTRY.match(line.strip())
        if m:
            entries[(m["path"], m["code"].strip())] = m["reason"].strip()
    return entries


def source_files(globs: list[str] | None = None) -> list[str]:
    """Every ``.py`` file of :data:`PACKAGES`, relative to the repository, optionally only those matching ``globs``."""
    files = sorted(str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    return [f for f in files if not globs or any(fnmatch.fnmatch(f, g) for g in globs)]


def unexecuted(data_file: str, files: list[str]) -> dict[tuple[str, str], list[int]]:
    """``{(path, code): [line numbers]}`` of the statements of ``files`` that ``data_file`` never saw run."""
    import coverage

    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    out: dict[tuple[str, str], list[int]] = {}
    for rel in files:
        path = ROOT / rel
        _, _, _, missing, _ = cov.analysis2(str(path))
        text = path.read_text().splitlines()
        for n in missing:
            out.setdefault((rel, text[n - 1].strip()), []).append(n)
    return out


def compare(missing: dict[tuple[str, str], list[int]], listed: dict[tuple[str, str], str],
            files: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(unlisted, stale)``: lines never run that the list lacks; listed lines (of ``files``) that ran or are gone."""
    unlisted = sorted(k for k in missing if k not in listed)
    stale = sorted(k for k in listed if k[0] in files and k not in missing)
    return unlisted, stale


def run_suite(pytest_args: list[str], data_file: str) -> int:
    """pytest under coverage.py (subprocesses too); returns pytest's exit status."""
    rc = Path(data_file).parent / "coveragerc"  # not .coverage.*: combine would read it as data
    rc.write_text("[run]\n" f"source = {', '.join(str(ROOT / p) for p in PACKAGES)}\n" "parallel = True\n"
                  "patch = subprocess, execv\n" f"data_file = {data_file}\n")
    env = dict(os.environ, COVERAGE_RCFILE=str(rc))
    status = subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-q",
                             *pytest_args], cwd=ROOT, env=env).returncode
    subprocess.run([sys.executable, "-m", "coverage", "combine", f"--rcfile={rc}", "--quiet"], cwd=ROOT, env=env,
                   check=True)
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="+", help="compare only these files (globs relative to the repository)")
    ap.add_argument("--data", help="an existing coverage data file (skips running the tests)")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (default: tests/)")
    args = ap.parse_args(argv)
    files = source_files(args.files)
    if not files:
        raise SystemExit(f"--files {args.files} matches no file of {PACKAGES}")
    with tempfile.TemporaryDirectory(prefix="mpo_cov_") as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, ".coverage")
            status = run_suite(args.pytest_args or ["tests"], data)
            if status not in (0, 1):
                print(f"pytest exited {status}", file=sys.stderr)
        missing = unexecuted(data, files)
    listed = read_list()
    unlisted, stale = compare(missing, listed, files)
    total = sum(len(v) for v in missing.values())
    print(f"{total} statements of {len(files)} files never executed; {len(missing) - len(unlisted)} listed in "
          f"{DOC.relative_to(ROOT)}")
    for path, code in sorted(missing):
        lines = ",".join(map(str, missing[(path, code)]))
        mark = "" if (path, code) in listed else "   <- NOT LISTED"
        print(f"  {path}:{lines}: {code}{mark}")
    if unlisted:
        print(f"\n{len(unlisted)} never-executed lines missing from {DOC.relative_to(ROOT)} (its format; give the reason):")
        for path, code in unlisted:
            print(f"- {path}: `{code}` — ")
    if stale:
        print(f"\n{len(stale)} listed lines that ran or are gone (remove them from the list):")
        for path, code in stale:
            print(f"- {path}: `{code}`")
    return 1 if unlisted or stale else 0


if __name__ == "__main__":
    sys.exit(main())
