"""The oracle: run one CLI command in this process and say what, if anything, went wrong.

A command fails when: an exception escapes ``kiln.cli.main`` or "Traceback" is printed
(``traceback``); it exits with a status other than 0 or 2 (``exit``; ``check`` may exit 1);
it exits 2 without exactly one stderr line (``stderr``); it opens a file outside the case
folder that is not part of Python, Kiln or the run's cache and temp folders (``escape``, seen
by an audit hook on ``open``); the secret planted beside the case shows up in its output
(``secret``); the canary file named by the hostile payloads exists afterwards (``code-exec``);
or an exported HTML page's embedded data can break out of its ``<script>`` (``html``).
Hangs and crashes are judged by the runner, which owns the worker process.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import kiln

SRC = Path(kiln.__file__).resolve().parent
DATA_SCRIPT = re.compile(r'<script id="kiln-data" type="application/json">(.*?)</script>', re.S | re.I)


@dataclass
class Failure:
    kind: str                 # traceback, exit, stderr, escape, secret, code-exec, html (runner: hang, crash)
    command: str              # the argv that failed, joined
    detail: str               # one line: the exception, the path, the status
    where: str = ""           # innermost kiln frame, "kiln/engine/format.py:read_prelude"

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Watch:
    """Paths opened while a case runs (the audit hook records them only while ``active``)."""

    allowed: list[str] = field(default_factory=list)
    active: bool = False
    opened: list[str] = field(default_factory=list)

    def hook(self, event: str, args: tuple) -> None:
        if not self.active or event != "open" or not args or isinstance(args[0], int) or args[0] is None:
            return
        try:
            p = os.fsdecode(args[0])
            self.opened.append(os.path.realpath(os.path.join(os.getcwd(), p)))
        except Exception:
            pass

    def escapes(self, case_dir: str) -> list[str]:
        roots = [os.path.realpath(case_dir)] + self.allowed
        return sorted({p for p in self.opened if not any(p == r or p.startswith(r.rstrip("/") + "/") for r in roots)})


def allowed_roots(run_dir: Path) -> list[str]:
    """What a command may open besides its case folder: Python, installed packages, Kiln, the run's caches
    (and the canary folder, whose files are reported as code execution instead)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(SRC), str(Path(__file__).resolve().parents[1]),
             str(run_dir / "tmp"), str(run_dir / "cache"), str(run_dir / "canary"), "/dev/null", "/dev/urandom",
             "/proc", "/sys",
             "/etc/localtime", "/usr/share/zoneinfo", "/etc/ld.so.cache"}
    roots |= {p for p in sysconfig.get_paths().values()}
    roots |= {p for p in sys.path if p and os.path.isdir(p) and "site-packages" in p}
    return sorted(os.path.realpath(r) for r in roots)


def _kiln_frame(tb: traceback.StackSummary) -> str:
    frames = [f for f in tb if f.filename.startswith(str(SRC))]
    if not frames:
        return f"{Path(tb[-1].filename).name}:{tb[-1].name}" if tb else ""
    f = frames[-1]
    return f"kiln/{Path(f.filename).resolve().relative_to(SRC).as_posix()}:{f.name}"


def _html_problem(path: Path) -> str | None:
    text = path.read_text("utf-8", "replace")
    m = DATA_SCRIPT.search(text)
    if m is None:
        return "exported HTML has no complete kiln-data script"
    data = m.group(1)
    low = data.lower()
    for bad in ("<!--", "<script", "</script"):
        if bad in low:
            return f"embedded page data contains {bad!r} (the inline script can break out)"
    try:
        json.loads(data)
    except ValueError as exc:
        return f"embedded page data is not JSON: {exc}"
    return None


def run_call(argv: list[str], case_dir: Path, watch: Watch, secret: str,
             strict: bool = False) -> tuple[object, list[Failure]]:
    """Run ``kiln <argv>`` in-process with captured output; return (exit status, failures). ``strict``
    (valid seed files) also requires exit status 0."""
    from kiln.cli import main
    out, err = io.StringIO(), io.StringIO()
    cmd = " ".join(argv)
    failures: list[Failure] = []
    watch.opened.clear()
    watch.active = True
    code: object = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - every escape is a finding (RecursionError, MemoryError, ...)
        if isinstance(exc, KeyboardInterrupt):
            raise
        tb = traceback.extract_tb(exc.__traceback__)
        line = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        failures.append(Failure("traceback", cmd, line, _kiln_frame(tb)))
    finally:
        watch.active = False
    stdout, stderr = out.getvalue(), err.getvalue()
    if not failures and ("Traceback" in stderr or "Traceback" in stdout):
        failures.append(Failure("traceback", cmd, "printed a traceback: " + stderr.strip().splitlines()[-1][:300]))
    ok = (0,) if strict else (0, 1, 2) if argv[0] == "check" else (0, 2)
    if not failures and code not in ok:
        failures.append(Failure("exit", cmd, f"exit status {code!r}; stderr {stderr.strip()[-200:]!r}"))
    if code == 2 and len(stderr.strip().splitlines()) != 1:
        lines = stderr.strip().splitlines()
        failures.append(Failure("stderr", cmd, f"exit 2 with {len(lines)} stderr lines: {lines[:3]!r}"[:300]))
    for path in watch.escapes(str(case_dir)):
        failures.append(Failure("escape", cmd, f"opened {path}"))
    if secret in stdout or secret in stderr:
        failures.append(Failure("secret", cmd, "the secret file's content was printed"))
    if code == 0 and argv[0] == "view" and "--export" in argv:
        html = Path(argv[argv.index("--export") + 1])
        why = _html_problem(html) if html.suffix == ".html" and html.exists() else None
        if why:
            failures.append(Failure("html", cmd, why))
    return code, failures


def leaked_secret(case_dir: Path, secret: str) -> list[str]:
    """Files written in the case folder (exports, outputs) that contain the secret."""
    hits = []
    needle = secret.encode()
    for p in case_dir.rglob("*"):
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
            hits.append(p.name)
    return hits
