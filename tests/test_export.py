"The serving export read by a user other than its writer, as the service's non-root container does."

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from support import demo_export

LOAD = (
    "import sys; from reco_lab.export import ExportError, load_export\n"
    "try:\n    print(load_export(sys.argv[1]))\nexcept ExportError as e:\n    print('ExportError:', e)\n"
)


def as_other_user(folder: Path) -> subprocess.CompletedProcess:
    "`load_export(folder)` in a fresh interpreter as an unprivileged user (nobody when the tests run as root)."
    prefix = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot read as another user")
        prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return subprocess.run(
        prefix + [sys.executable, "-c", LOAD, str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": "/tmp"},
        cwd="/",
    )


@pytest.fixture
def export_dir():
    root = Path(tempfile.mkdtemp(prefix="reco-lab-export-"))
    root.chmod(0o755)  # mkdtemp's 0700 would hide the export itself, not what this test is about
    try:
        yield demo_export(root)
    finally:
        shutil.rmtree(root)


def test_another_user_reads_the_export(export_dir):
    done = as_other_user(export_dir)
    assert done.returncode == 0 and done.stdout.startswith("Export("), done.stdout + done.stderr


@pytest.mark.parametrize("rel", ["knn/topk.npy", "manifest.json"])
def test_an_unreadable_file_is_one_error_naming_it(export_dir, rel):
    (export_dir / rel).chmod(0)
    if os.geteuid() != 0 and os.access(export_dir / rel, os.R_OK):
        pytest.skip("this user reads files without read permission")
    done = as_other_user(export_dir)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stdout.strip().endswith(f"{export_dir / rel} cannot be read: Permission denied"), done.stdout
    assert done.stdout.startswith("ExportError: ") and done.stdout.count("\n") == 1
