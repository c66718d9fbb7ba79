import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    "A throw-away embedded MLflow store for one test."
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def tool(name: str) -> str:
    "A console script of the test environment (the .venv beside the interpreter)."
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name) or name


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **kw.pop("env", {})}
    return subprocess.run(cmd, env=env, **kw)


def query(stack, sql: str, *args) -> list[tuple]:
    "Rows of a SQL query against a `reco_lab.stack` PostgreSQL."
    from reco_lab import stack as st

    conn = st.connect(stack)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()
