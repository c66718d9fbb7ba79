"""The same commit gives the same per-user results in every process: two quick studies of real ML-100k, run side by
side with different hash seeds, thread counts and numpy CPU kernels (the second as an AVX2 machine's numpy would
run, with AVX-512 switched off), the first running its notebooks one at a time and the second its candidates two at
a time, must leave byte-identical per-user scores, exports and splits."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from reco_lab.catalog import MODEL_NAMES as MODELS
from reco_lab.core import _cpu_flags, console_script

from support import BIN, ROOT

# what numpy dispatches to AVX-512 kernels on this build: switched off, numpy runs its AVX2 (or older) kernels
AVX512 = sorted(f for f in np.core._multiarray_umath.__cpu_dispatch__ if f.startswith("AVX512"))
SETTINGS = {
    "one": {"PYTHONHASHSEED": "1", "RECO_LAB_THREADS": "1"},
    "two": {"PYTHONHASHSEED": "2", "RECO_LAB_THREADS": "2", "NPY_DISABLE_CPU_FEATURES": " ".join(AVX512)},
}
WORKERS = {"one": "1", "two": "2"}  # notebooks at once: one after another, or the candidates side by side


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    "Two quick studies started at once, each with its own store, output and environment: {name: folder}."
    folders, procs = {}, {}
    for name, extra in SETTINGS.items():
        folder = folders[name] = tmp_path_factory.mktemp(f"study-{name}")
        env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **extra}
        env |= {
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "RECO_LAB_MODELS_DIR": str(folder / "models"),
        }
        env = {k: v for k, v in env.items() if k not in ("OPENBLAS_CORETYPE", "RECO_LAB_BLAS_CORETYPE")}
        log = open(folder / "log.txt", "w")  # noqa: SIM115 (closed below, after the process)
        procs[name] = (
            subprocess.Popen(
                [
                    console_script("reco-lab"),
                    "run",
                    "--quick",
                    "--workers",
                    WORKERS[name],
                    "--output-dir",
                    str(folder / "out"),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            ),
            log,
        )
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=1800)
        log.close()
        assert code == 0, (folders[name] / "log.txt").read_text()[-4000:]
    return folders


def runs_by_model(folder: Path) -> tuple[MlflowClient, dict]:
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = {}
    for experiment in client.search_experiments():
        if experiment.name == "study":
            for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'"):
                runs[run.data.tags["model"]] = run
    return client, runs


def artifact_bytes(client: MlflowClient, run_id: str, path: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return Path(client.download_artifacts(run_id, path, tmp)).read_bytes()


def test_every_models_per_user_scores_are_identical(studies):
    (one, runs_one), (two, runs_two) = (runs_by_model(studies[n]) for n in SETTINGS)
    assert set(runs_one) == set(runs_two) == set(MODELS)
    for model in MODELS:
        a = artifact_bytes(one, runs_one[model].info.run_id, "eval/per_user.csv")
        b = artifact_bytes(two, runs_two[model].info.run_id, "eval/per_user.csv")
        assert a == b, f"{model}: per-user scores differ between the two processes"
        assert len(a.splitlines()) > 1000, model  # validation and test users of two folds each


def test_the_exports_are_identical_file_by_file(studies):
    one, two = (studies[n] / "models" for n in SETTINGS)
    files = sorted(p.relative_to(one) for p in one.rglob("*.npy"))
    assert {f.parts[0] for f in files if len(f.parts) > 1} == set(MODELS)
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), f"export file {rel} differs"


def test_the_champion_holds_the_splits_and_validation_never_meets_a_test(studies):
    (one, runs_one), (two, runs_two) = (runs_by_model(studies[n]) for n in SETTINGS)
    holding = [r for r in runs_one.values() if one.list_artifacts(r.info.run_id, "splits")]
    assert len(holding) == 1, "the study's champion (here: the quick study's best run) holds the splits"
    (champion,) = holding
    names = {a.path for a in one.list_artifacts(champion.info.run_id, "splits")}
    assert names == {f"splits/{role}_fold_{k}.csv" for role in ("validation", "test") for k in range(2)}
    twin = runs_two[champion.data.tags["model"]].info.run_id
    for name in names:
        content = artifact_bytes(one, champion.info.run_id, name)
        assert content == artifact_bytes(two, twin, name) and content.startswith(b"user_id,item_id,datetime\n")
    for run in (*runs_one.values(), *runs_two.values()):
        assert run.data.metrics["val_test_shared"] == 0


def test_every_run_used_the_pinned_blas_kernel(studies):
    kernels = {r.data.tags["blas"] for n in SETTINGS for r in runs_by_model(studies[n])[1].values()}
    assert len(kernels) == 1, kernels
    if {"avx2", "fma"} <= _cpu_flags():
        assert kernels == {"openblas Haswell"}


def test_lightfm_is_built_for_any_x86_64_cpu():
    "LightFM's own build adds -march=native; `make` builds it portable (no AVX registers in its machine code)."
    import lightfm

    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    (binary,) = Path(lightfm.__file__).parent.glob("_lightfm_fast*.so")
    code = subprocess.run(["objdump", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    wide = sum(code.count(register) for register in ("%ymm", "%zmm"))
    assert wide == 0, f"{binary} uses {wide} AVX registers: rebuild it with `make` (LIGHTFM_NO_CFLAGS=1)"
