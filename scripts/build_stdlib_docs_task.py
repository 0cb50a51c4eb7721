"""Build the bundled ``stdlib-docs`` task: which area of the Python standard library a docstring documents.

Real text, real labels, offline: every public function, class and method docstring of a fixed list of
standard-library modules (CPython, PSF License), its first paragraph (at least 40 characters, whitespace
normalised, deduplicated; a paragraph found under two areas is dropped), labelled by the module's area
(eight areas, below), one example per docstring, split 80/20 with a fixed seed. The shipped TSVs (``mpobert/data/tasks/stdlib-docs``) were written by this script on CPython 3.11.7;
another version gives a slightly different set, so the shipped files, not this script, are the task.

    python scripts/build_stdlib_docs_task.py mpobert/data/tasks/stdlib-docs
"""
from __future__ import annotations

import importlib
import inspect
import random
import sys
from pathlib import Path

AREAS: dict[str, tuple[str, ...]] = {
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "stringprep", "locale", "gettext"),
    "datatypes": ("collections", "datetime", "calendar", "heapq", "bisect", "array", "enum", "copy", "pprint",
                  "weakref", "types", "graphlib", "zoneinfo"),
    "numeric": ("math", "cmath", "decimal", "fractions", "random", "statistics", "numbers", "operator",
                "itertools", "functools"),
    "files": ("os", "os.path", "pathlib", "shutil", "glob", "fnmatch", "tempfile", "filecmp", "stat", "fileinput",
              "linecache", "io"),
    "formats": ("pickle", "json", "csv", "sqlite3", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile",
                "configparser", "plistlib", "shelve", "marshal", "dbm", "tomllib"),
    "concurrency": ("threading", "multiprocessing", "concurrent.futures", "subprocess", "sched", "queue",
                    "asyncio", "signal", "selectors", "contextvars"),
    "internet": ("socket", "ssl", "select", "http.client", "http.server", "http.cookies", "urllib.request",
                 "urllib.parse", "email", "email.message", "smtplib", "ftplib", "imaplib", "poplib", "base64",
                 "mimetypes", "html", "html.parser", "xml.etree.ElementTree", "xml.dom.minidom", "ipaddress",
                 "webbrowser", "uuid", "socketserver", "wsgiref.simple_server", "xmlrpc.client"),
    "devtools": ("unittest", "doctest", "pdb", "inspect", "traceback", "logging", "warnings", "dis", "ast",
                 "typing", "importlib", "argparse", "timeit", "cProfile", "pstats", "trace", "tracemalloc", "gc",
                 "sys", "atexit", "contextlib", "abc", "dataclasses", "code", "tokenize", "pydoc"),
}


def first_paragraph(doc: str) -> str:
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(para.split())


def members(module) -> list[tuple[str, str]]:
    """(qualified name, first paragraph) of the module's public functions, classes and their methods."""
    out = []
    prefix = module.__name__
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", prefix) not in (prefix, f"_{prefix}", None) and not prefix.startswith("os"):
            continue
        items = [(f"{prefix}.{name}", obj)]
        if inspect.isclass(obj):
            items += [(f"{prefix}.{name}.{m}", f) for m, f in sorted(vars(obj).items())
                      if not m.startswith("_") and (inspect.isfunction(f) or inspect.ismethoddescriptor(f))]
        for qual, item in items:
            doc = getattr(item, "__doc__", None)
            if isinstance(doc, str) and doc.strip():
                text = first_paragraph(doc)
                if len(text) >= 40:
                    out.append((qual, text))
    return out


def main(folder: str) -> None:
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    seen: dict[str, set[str]] = {}
    rows: list[tuple[str, str, str]] = []
    for area, modules in AREAS.items():
        for mod_name in modules:
            module = importlib.import_module(mod_name)
            for qual, text in members(module):
                seen.setdefault(text, set()).add(area)
                rows.append((qual, text, area))
    unique, done = [], set()
    for qual, text, area in rows:
        if len(seen[text]) == 1 and text not in done:
            done.add(text)
            unique.append((qual, text, area))
    rng = random.Random(0)
    rng.shuffle(unique)
    cut = int(0.8 * len(unique))
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", unique[:cut]), ("dev", unique[cut:])):
        lines = ["sentence\tlabel"] + [f"{text}\t{area}" for _, text, area in part]  # text: no tabs or newlines
        (out / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = {a: sum(r[2] == a for r in unique) for a in AREAS}
    print(f"{len(unique)} examples ({cut} train, {len(unique) - cut} dev) on Python {sys.version.split()[0]}: {counts}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mpobert/data/tasks/stdlib-docs")
