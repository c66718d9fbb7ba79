"""Helpers the tests share; conftest.py keeps the fixtures. Import with `from support import ...` (pytest puts
tests/ on sys.path, as it does for conftest.py)."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from reco_lab.core import console_script

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(cmd, **kw) -> subprocess.CompletedProcess:
    "`cmd` with this environment's console scripts first on PATH, its output captured as text."
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **kw.pop("env", {})}
    return subprocess.run(cmd, env=env, **kw)


def reco_lab(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    "`reco-lab ARGS` of this environment, run from the repository with `env` added to the environment."
    return run([console_script("reco-lab"), *args], env=env or {}, cwd=ROOT, timeout=timeout)


def study_dirs(folder: Path) -> list[str]:
    "`reco-lab run` options writing the executed notebooks and the reports under `folder`, not into the repository."
    return ["--output-dir", str(folder / "out"), "--reports-dir", str(folder / "reports")]


def get(url: str, token: str | None = None, method: str = "GET", timeout: float = 10) -> tuple[int, dict, object]:
    "Status, headers and JSON body (None if empty) of a request, with a bearer `token` if given."
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


def demo_export(folder: Path) -> Path:
    "A small real serving export (the demo models on synthetic data) in `folder`/models."
    from reco_lab.data import make_synthetic
    from reco_lab.precompute import build_demo_export

    return build_demo_export(folder / "models", make_synthetic(400, 200, 4_000))


def warm_user(export_dir: Path) -> int:
    "A user the export knows whose id does not fail on purpose when error emulation is on."
    from reco_lab.export import load_export
    from reco_lab.service.settings import FAILING_MULTIPLE

    return next(int(u) for u in load_export(export_dir).users if u % FAILING_MULTIPLE)


def make_images(target: str, engine, *, buildkit: bool, **variables: str) -> float:
    "`make <target>` against a Docker `engine` (conftest.Engine), with BuildKit or the classic builder; seconds taken."
    started = time.monotonic()
    done = run(
        ["make", "--no-print-directory", target, f"DOCKER={engine.cli}", *(f"{k}={v}" for k, v in variables.items())],
        cwd=ROOT,
        env={**engine.env, "DOCKER_BUILDKIT": "1" if buildkit else "0"},
        timeout=1800,
    )
    assert done.returncode == 0, f"make {target} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return time.monotonic() - started
