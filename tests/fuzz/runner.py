"""Spread fuzz cases over worker processes, one case at a time each, with a per-case timeout.

A worker that does not answer within the timeout is killed and the case recorded as a hang;
one that dies is recorded as a crash; either way a fresh worker takes its place. Targets are
``onnx``, ``engine`` and ``view:<reader module>`` for each viewer format.
"""
from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parents[1]
WARM_TIMEOUT = 600.0


@dataclass
class Result:
    target: str
    index: int
    label: str
    failures: list[dict]
    seconds: float = 0.0
    codes: list = field(default_factory=list)      # exit status of each command run (None: no status)


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    seeds: dict = field(default_factory=dict)          # manifest["view"]: what to open per format, or why none
    seed_failures: dict = field(default_factory=dict)  # failures of the unmutated seeds
    seconds: float = 0.0

    def failed(self) -> list[Result]:
        return [r for r in self.results if r.failures]

    def table(self) -> str:
        """Cases and failing cases per target and failure kind."""
        per: dict[str, Counter] = defaultdict(Counter)
        cases: Counter = Counter()
        calls: Counter = Counter()
        for r in self.results:
            cases[r.target] += 1
            calls[r.target] += len(r.codes)
            per[r.target]["exit0"] += sum(1 for c in r.codes if c == 0)
            kinds = {f["kind"] for f in r.failures}
            for kind in kinds | ({"escape"} if "secret" in kinds else set()):
                per[r.target][kind] += 1
        cols = ["cases", "traceback", "hang", "crash", "escape", "code-exec", "other", "accepted"]
        rows = [f"{'target':<18}" + "".join(f"{c:>11}" for c in cols)]
        for t in sorted(cases):
            c = per[t]
            other = sum(v for k, v in c.items() if k not in cols and k not in ("exit0", "secret"))
            accepted = f"{100 * c['exit0'] / calls[t]:.0f}%" if calls[t] else "-"
            vals = [cases[t], c["traceback"], c["hang"], c["crash"], c["escape"], c["code-exec"], other,
                    accepted]
            rows.append(f"{t:<18}" + "".join(f"{v:>11}" for v in vals))
        for fmt, why in sorted(self.seeds.items()):
            if isinstance(why, str):
                rows.append(f"view:{fmt:<13} no cases: {why[1:]}")
        rows.append("(failing cases per kind. escape: a file opened outside the case folder or the secret leaked; "
                    "other: exit status, not one stderr line, HTML data escaping its script, generator errors; "
                    "accepted: commands that exited 0, i.e. how far past the first check the cases got)")
        return "\n".join(rows)

    def classes(self) -> list[dict]:
        """Failures grouped by (target, kind, mutation kind, where, message shape), with an example case."""
        groups: dict[tuple, dict] = {}
        for r in self.failed():
            mutation = _mutation_kind(r.label)
            for f in r.failures:
                key = (r.target, f["kind"], mutation, f.get("where", ""), _shape(f["detail"]))
                g = groups.setdefault(key, {"target": r.target, "kind": f["kind"], "mutation": mutation,
                                            "where": f.get("where", ""), "detail": f["detail"],
                                            "command": f["command"].split(" ")[0], "count": 0,
                                            "example": f"{r.target}:{r.index}", "label": r.label})
                g["count"] += 1
        return sorted(groups.values(), key=lambda g: (g["target"], g["kind"], -g["count"]))

    def summary(self) -> str:
        lines = [self.table(), ""]
        for name, fails in self.seed_failures.items():
            for f in fails:
                lines.append(f"SEED {name}: {f['kind']} in `kiln {f['command']}`: {f['detail']} [{f.get('where', '')}]")
        for g in self.classes():
            lines.append(f"{g['target']:<16} {g['kind']:<9} {g['mutation']:<28} x{g['count']:<4} "
                         f"kiln {g['command']:<7} {g['where'] or '-'} | {g['detail'][:160]}  (e.g. {g['example']})")
        lines.append(f"{len(self.results)} cases, {len(self.failed())} failing, {self.seconds:.1f} s")
        return "\n".join(lines)


def _mutation_kind(label: str) -> str:
    """'mlp:attr-huge@Conv.pads' -> 'attr-huge'; 'model.json:path-plant@x' -> 'path-plant'."""
    kind = label.split(":", 1)[-1]
    for sep in "@=+/":
        kind = kind.split(sep, 1)[0]
    return kind.rstrip("-")[:40]


def _shape(detail: str) -> str:
    """A failure message with numbers, quoted names and paths blurred, for grouping."""
    import re
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", detail)
    text = re.sub(r"/[\w./-]+", "/…", text)
    return re.sub(r"\d+", "N", text)[:90]


class _Proc:
    """One worker process and its line-buffered answers."""

    def __init__(self, run_dir: Path, seed: int, keep: bool, memory_gb: int, env: dict) -> None:
        args = [sys.executable, "-m", "fuzz.worker", str(run_dir), str(seed), f"--memory-gb={memory_gb}"]
        if keep:
            args.append("--keep")
        self.log = open(run_dir / "tmp" / f"worker-{time.monotonic_ns()}.log", "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, cwd=run_dir, start_new_session=True)
        self.run_dir = run_dir
        self.buf = b""
        self.job: tuple[str, int] | None = None
        self.deadline = 0.0

    def send(self, req: dict, timeout: float) -> None:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        self.deadline = time.monotonic() + timeout

    def lines(self) -> list[dict] | None:
        """Complete answers read so far; None at end of file (the worker died)."""
        chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *done, self.buf = self.buf.split(b"\n")
        return [json.loads(x) for x in done if x.strip()]

    def kill(self) -> int | None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = self.proc.wait()
        self.log.close()
        return code

    def stderr_tail(self) -> str:
        self.log.flush()
        try:
            text = Path(self.log.name).read_text("utf-8", "replace").strip().splitlines()
        except OSError:
            return ""
        return text[-1][:200] if text else ""


def _env(run_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cache = run_dir / "cache"
    env.update({"XDG_CACHE_HOME": str(cache), "KILN_CACHE_DIR": str(cache / "kiln"), "TORCH_HOME": str(cache / "torch"),
                "TRITON_CACHE_DIR": str(cache / "triton"),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "KERAS_HOME": str(cache / "keras"),
                "MPLCONFIGDIR": str(cache / "mpl"), "TMPDIR": str(run_dir / "tmp"), "KERAS_BACKEND": "torch",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
                "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env


def _layout(run_dir: Path) -> None:
    for sub in ("seeds", "cases", "canary", "tmp", "cache", "secret"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "secret" / "secret.txt").write_text(f"kiln-fuzz-secret-{secrets.token_hex(12)}\n")


def _wait_one(proc: _Proc, timeout: float) -> dict:
    """Block for one answer of a worker that is not yet serving cases (startup, prepare, warm)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    try:
        while True:
            if proc.buf.count(b"\n"):
                line, proc.buf = proc.buf.split(b"\n", 1)
                return json.loads(line)
            left = end - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"fuzz worker gave no answer within {timeout:.0f} s; see {proc.log.name}")
            chunk = os.read(proc.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"fuzz worker died (status {proc.proc.wait()}): {proc.stderr_tail()}")
            proc.buf += chunk
    finally:
        sel.close()


def run(targets: dict[str, int], run_dir: Path, seed: int = 0, workers: int = 2, timeout: float = 20.0,
        keep: bool = False, memory_gb: int = 4, progress: Callable[[Result], None] | None = None,
        only: list[tuple[str, int]] | None = None) -> Report:
    """Fuzz ``targets`` ({"engine": 100, "onnx": 50, "view": 10 per format, or "view:tflite": 10});
    ``only`` runs just those (target, index) cases. Seeds, cases and logs go under ``run_dir``."""
    t0 = time.monotonic()
    run_dir = Path(run_dir).resolve()
    _layout(run_dir)
    env = _env(run_dir)
    report = Report()
    procs = [_Proc(run_dir, seed, keep, memory_gb, env) for _ in range(max(1, workers))]
    try:
        for p in procs:
            _wait_one(p, WARM_TIMEOUT)                       # {"ready": pid}
        procs[0].send({"op": "prepare"}, WARM_TIMEOUT)
        manifest = _wait_one(procs[0], WARM_TIMEOUT)
        if "manifest" not in manifest:
            raise RuntimeError(f"preparing the seeds failed: {manifest}")
        report.seeds = manifest["manifest"]["view"]
        for p in procs:
            p.send({"op": "warm"}, WARM_TIMEOUT)
        for p in procs:
            report.seed_failures.update(_wait_one(p, WARM_TIMEOUT).get("seeds", {}))
        jobs = only or _jobs(targets, manifest["manifest"])
        dispatch(jobs, procs, report, lambda: _Proc(run_dir, seed, keep, memory_gb, env), timeout, progress)
    finally:
        for p in procs:
            p.kill()
    report.seconds = time.monotonic() - t0
    return report


def _jobs(targets: dict[str, int], manifest: dict) -> list[tuple[str, int]]:
    """Cases interleaved across targets, so a slow target does not bunch up on one worker."""
    counts: dict[str, int] = {}
    for name, n in targets.items():
        if name == "view":
            counts.update({f"view:{f}": n for f, m in manifest["view"].items() if isinstance(m, list)})
        elif name.startswith("view:"):
            if isinstance(manifest["view"].get(name[5:]), list):
                counts[name] = n
        else:
            counts[name] = n
    jobs = []
    for i in range(max(counts.values(), default=0)):
        jobs += [(t, i) for t, n in sorted(counts.items()) if i < n]
    return jobs


WARMING = ("(warming)", -1)


def dispatch(jobs: list[tuple[str, int]], procs: list[_Proc], report: Report, new: Callable[[], _Proc],
             timeout: float, progress: Callable[[Result], None] | None = None, warm: bool = True) -> None:
    """Run ``jobs`` on ``procs`` (started and warm), one case per worker at a time. A worker that misses
    its deadline is killed (a hang) or that dies (a crash) is replaced by ``new()``, warmed without
    blocking the others when ``warm``."""
    queue = list(reversed(jobs))
    failed_warms = [0]
    sel = selectors.DefaultSelector()
    for p in procs:
        sel.register(p.proc.stdout, selectors.EVENT_READ, p)

    def give(p: _Proc) -> None:
        p.job = queue.pop() if queue else None
        if p.job:
            p.send({"op": "case", "target": p.job[0], "index": p.job[1]}, timeout)

    def add(r: Result) -> None:
        report.results.append(r)
        if progress:
            progress(r)

    def answered(p: _Proc, answer: dict) -> None:
        if "ready" in answer:
            return
        if p.job == WARMING:
            failed_warms[0] = 0
            give(p)
            return
        r = Result(*p.job, answer.get("label", "?"), answer.get("failures", []), answer.get("seconds", 0.0),
                   answer.get("codes", []))
        if "error" in answer:
            r.failures.append({"kind": "generator", "command": "", "where": "", "detail": answer["error"]})
        add(r)
        give(p)

    def replace(p: _Proc, kind: str, detail: str) -> None:
        sel.unregister(p.proc.stdout)
        code = p.kill()
        if p.job == WARMING:
            failed_warms[0] += 1
            if failed_warms[0] > 3:
                raise RuntimeError(f"fuzz workers keep failing to start ({kind}): {p.stderr_tail()}")
        else:
            label, command = _last_words(p.run_dir, *p.job)
            add(Result(*p.job, label, [{"kind": kind, "command": command, "where": "",
                                       "detail": detail.format(code=code)}]))
        q = new()
        procs[procs.index(p)] = q
        sel.register(q.proc.stdout, selectors.EVENT_READ, q)
        if warm and queue:
            q.job = WARMING
            q.send({"op": "warm"}, WARM_TIMEOUT)
        else:
            give(q)

    for p in procs:
        give(p)
    while any(p.job for p in procs):
        busy = [p for p in procs if p.job]
        for key, _ in sel.select(max(0.0, min(p.deadline for p in busy) - time.monotonic())):
            p = key.data
            answers = p.lines()
            if answers is None:
                replace(p, "crash", f"worker died with status {{code}}: {p.stderr_tail()}")
                continue
            for a in answers:
                answered(p, a)
        for p in list(procs):
            if p.job and time.monotonic() > p.deadline:
                answers = p.lines() if _readable(p) else []
                if answers is None:
                    replace(p, "crash", f"worker died with status {{code}}: {p.stderr_tail()}")
                elif answers:
                    for a in answers:
                        answered(p, a)
                else:
                    replace(p, "hang", f"no answer within {timeout:.0f} s (worker killed)")
    sel.close()


def _readable(p: _Proc) -> bool:
    import select
    return bool(select.select([p.proc.stdout], [], [], 0)[0])


def _last_words(run_dir: Path, target: str, index: int) -> tuple[str, str]:
    """(mutation label, command running) of a case whose worker hung or died, from what the worker wrote
    into the case folder before each step."""
    from fuzz.worker import case_name
    folder = run_dir / "cases" / case_name(target, index)
    try:
        label = json.loads((folder / "case.json").read_text())["label"]
    except (OSError, ValueError, KeyError):
        label = "?"
    try:
        command = (folder / "running.txt").read_text()
    except OSError:
        command = "(generating the case)"
    return label, command
