"""A fuzzing worker: reads one JSON request per line on stdin, answers one JSON line per request.

Requests: ``{"op": "prepare"}`` writes the seeds; ``{"op": "warm"}`` runs every seed through the
oracle (imports everything, and proves the seeds are clean); ``{"op": "case", "target": T,
"index": I}`` generates case I of target T (deterministic from the run's seed), runs its CLI
commands in this process and answers the failures (target ``probe`` tests the runner itself).
Answers go to a duplicate of the original stdout; fd 1 itself is sent to /dev/null so stray
C-level prints cannot corrupt the protocol.

    PYTHONPATH=tests python -m fuzz.worker RUN_DIR SEED [--keep] [--memory-gb=N]
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

SECRET_NAME = "secret.txt"


def case_rng(seed: int, target: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{target}/{index}")


def case_name(target: str, index: int) -> str:
    return f"{target.replace(':', '-')}-{index}"


def secret_paths(run_dir: Path, case_dir: Path) -> list[str]:
    """Ways a hostile file can name the secret: absolute, climbing out with .., and a system file."""
    secret = run_dir / "secret" / SECRET_NAME
    return [str(secret), os.path.relpath(secret, case_dir), "/etc/passwd", "../" * 12 + "etc/passwd"]


def build_case(run_dir: Path, manifest: dict, seed: int, target: str, index: int) -> tuple[Path, str, list]:
    """Write case ``index`` of ``target`` into its folder; return (folder, mutation label, CLI commands)."""
    from fuzz import engine_cases, onnx_cases, viewer_cases
    rng = case_rng(seed, target, index)
    case_dir = run_dir / "cases" / case_name(target, index)
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    canary = str(run_dir / "canary" / case_name(target, index))
    secrets = secret_paths(run_dir, case_dir)
    if target == "onnx":
        name = rng.choice(sorted(manifest["onnx"]))
        path = case_dir / "model.onnx"
        label, flags = onnx_cases.make(Path(manifest["onnx"][name]), path, rng, secrets)
        return case_dir, f"{name}:{label}", onnx_cases.calls(path, flags, name)
    if target == "engine":
        name = rng.choice(sorted(manifest["engine"]))
        path = case_dir / "model.kiln"
        label = engine_cases.make(Path(manifest["engine"][name]), path, rng, canary, secrets)
        return case_dir, f"{name}:{label}", engine_cases.calls(path)
    fmt = target.split(":", 1)[1]
    seed_dir = run_dir / "seeds" / "view" / fmt
    main = rng.choice(manifest["view"][fmt])
    target_path, label = viewer_cases.make(seed_dir, main, case_dir, rng, canary, secrets)
    return case_dir, label, viewer_cases.calls(target_path, case_dir)


class Worker:
    def __init__(self, run_dir: Path, seed: int, keep: bool) -> None:
        from fuzz import oracle
        self.run_dir, self.seed, self.keep = run_dir, seed, keep
        self.secret = (run_dir / "secret" / SECRET_NAME).read_text().strip()
        self.watch = oracle.Watch(oracle.allowed_roots(run_dir))
        sys.addaudithook(self.watch.hook)
        self.manifest: dict = {}

    def load_manifest(self) -> dict:
        if not self.manifest:
            self.manifest = json.loads((self.run_dir / "seeds" / "manifest.json").read_text())
        return self.manifest

    def judge(self, case_dir: Path, calls: list, canary: Path | None, strict: bool = False,
              codes: list | None = None) -> list[dict]:
        """Run ``calls`` in ``case_dir``; their failures as dicts (exit statuses appended to ``codes``)."""
        from fuzz import oracle
        failures = []
        for argv in calls:
            if argv[0] == "run" and not Path(argv[1]).exists():
                continue                       # the build before it refused the model
            os.chdir(case_dir)
            (case_dir / "running.txt").write_text(" ".join(argv))       # names the command if this one hangs
            code, found = oracle.run_call(argv, case_dir, self.watch, self.secret, strict)
            failures += found
            if codes is not None:
                codes.append(code if isinstance(code, int) else None)
            if canary is not None and canary.exists():
                failures.append(oracle.Failure("code-exec", " ".join(argv), f"the payload created {canary.name}"))
                canary.unlink()
        os.chdir(self.run_dir)
        (case_dir / "running.txt").unlink(missing_ok=True)
        for name in oracle.leaked_secret(case_dir, self.secret):
            failures.append(oracle.Failure("secret", "(files written)", f"{name} contains the secret file's content"))
        return [f.as_dict() for f in failures]

    def case(self, target: str, index: int) -> dict:
        if target == "probe":              # the runner's self-test: case 0 hangs, case 1 dies, others answer
            if index == 0:
                time.sleep(3600)
            if index == 1:
                os._exit(3)
            return {"label": "probe", "failures": []}
        t0 = time.perf_counter()
        try:
            case_dir, label, calls = build_case(self.run_dir, self.load_manifest(), self.seed, target, index)
        except Exception as exc:            # a generator bug is the harness's, reported as such
            return {"label": "generator", "failures": [{"kind": "generator", "command": "", "where": "",
                                                        "detail": f"{type(exc).__name__}: {exc}"[:300]}]}
        (case_dir / "case.json").write_text(json.dumps({"target": target, "index": index, "label": label,
                                                        "commands": [" ".join(c) for c in calls]}))
        codes: list = []
        failures = self.judge(case_dir, calls, self.run_dir / "canary" / case_name(target, index), codes=codes)
        if not failures and not self.keep:
            shutil.rmtree(case_dir, ignore_errors=True)
        return {"label": label, "failures": failures, "seconds": round(time.perf_counter() - t0, 3), "codes": codes}

    def warm(self) -> dict:
        """Each seed through its commands, unmutated (and each engine re-forged by ``engine_cases.forge``),
        all of which must exit 0: imports every reader and proves the seeds and the forger are sound."""
        from fuzz import engine_cases, mutate, onnx_cases, viewer_cases
        manifest = self.load_manifest()
        out = {}
        seeds = [(f"onnx:{n}", Path(f), lambda p, n=n: onnx_cases.calls(p, [], n)) for n, f in manifest["onnx"].items()]
        seeds += [(f"engine:{n}", Path(f), engine_cases.calls) for n, f in manifest["engine"].items()]
        seeds += [(f"view:{fmt}:{main}", self.run_dir / "seeds" / "view" / fmt / main, None)
                  for fmt, mains in manifest["view"].items() if isinstance(mains, list) for main in mains]
        for k, (name, seed_file, calls_of) in enumerate(seeds):
            case_dir = self.run_dir / "cases" / f"seed-{k}-{os.getpid()}"
            folder = seed_file.parent if calls_of else self.run_dir / "seeds" / "view" / name.split(":")[1]
            shutil.copytree(folder, case_dir, dirs_exist_ok=True)
            path = case_dir / seed_file.relative_to(folder)
            if name.startswith("engine:"):
                fields, header, weights = engine_cases.split(path.read_bytes())
                path.write_bytes(engine_cases.forge(fields, mutate.dumps(header).encode(), weights))
            calls = calls_of(path) if calls_of else viewer_cases.calls(path, case_dir)
            out[name] = self.judge(case_dir, calls, None, strict=True)
            shutil.rmtree(case_dir, ignore_errors=True)
        return {"seeds": {k: v for k, v in out.items() if v}}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        if op == "prepare":
            from fuzz import seeds
            return {"manifest": seeds.prepare(self.run_dir / "seeds")}
        if op == "warm":
            return self.warm()
        if op == "case":
            return self.case(req["target"], int(req["index"]))
        return {"error": f"unknown op {op!r}"}


def main(argv: list[str]) -> int:
    run_dir, seed, keep = Path(argv[0]), int(argv[1]), "--keep" in argv
    memory = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--memory-gb=")), 0)
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory << 30, memory << 30))
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.chdir(run_dir)
    worker = Worker(run_dir, seed, keep)
    answers.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            answer = worker.handle(req)
        except Exception as exc:           # the harness itself failed; say so instead of dying silently
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
