"The sync check regenerates the library from the notebooks and fails when the committed export differs."

import json
import shutil

from conftest import ROOT, run


def copy_project(dst):
    for name in ("settings.ini", "nbs", "reco_lab", "scripts"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
    return dst


def test_sync_check_passes_on_the_committed_tree(tmp_path):
    proj = copy_project(tmp_path)
    result = run([str(proj / "scripts" / "check-sync"), str(proj)])
    assert result.returncode == 0, result.stderr
    assert "matches the notebooks" in result.stdout


def test_sync_check_fails_on_an_edited_export_cell(tmp_path):
    proj = copy_project(tmp_path)
    nb_path = proj / "nbs" / "01_data.ipynb"
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and "def data_dir" in "".join(c["source"]))
    cell["source"] = [
        line.replace("the user's cache dir.\"", "the user's cache dir (edited in the notebook only).\"")
        for line in cell["source"]
    ]
    nb_path.write_text(json.dumps(nb, indent=1))
    result = run([str(proj / "scripts" / "check-sync"), str(proj)])
    assert result.returncode == 1
    assert "sync check FAILED" in result.stderr and "reco_lab/data.py" in result.stderr
    assert "edited in the notebook only" in result.stderr


def test_sync_check_fails_on_a_hand_edited_library(tmp_path):
    proj = copy_project(tmp_path)
    with open(proj / "reco_lab" / "core.py", "a") as f:
        f.write("\nHAND_EDIT = True\n")
    result = run([str(proj / "scripts" / "check-sync"), str(proj)])
    assert result.returncode == 1 and "HAND_EDIT" in result.stderr
