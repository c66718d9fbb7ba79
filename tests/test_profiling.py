"`reco-lab profile` end to end on a small real export: every report file, parseable, with application frames and no reloader."

import json
import xml.dom.minidom

from conftest import ROOT, run, tool

from reco_lab.data import make_synthetic
from reco_lab.service.demo import build_demo_export


def test_reco_lab_profile_writes_every_report(tmp_path):
    export = build_demo_export(tmp_path / "models", make_synthetic(400, 200, 4_000))
    out = tmp_path / "profiling"
    done = run(
        [
            tool("reco-lab"),
            "profile",
            "--models-dir",
            str(export),
            "--out",
            str(out),
            "--seconds",
            "2",
            "--rate",
            "100",
        ],
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    targets = ["health", "popular", "knn", "als"]
    for target in targets:
        xml.dom.minidom.parse(str(out / f"{target}.svg"))
        scope = json.loads((out / f"{target}.speedscope.json").read_text())
        assert scope["profiles"][0]["samples"] and scope["shared"]["frames"]
        raw = (out / f"{target}.txt").read_text()
        assert "reco_lab/service/" in raw and "reload" not in raw
        if target != "health":
            assert "get_reco" in raw and "Export.recommend (reco_lab/export.py" in raw
    profiles = json.loads((out / "profiles.json").read_text())
    assert [t["target"] for t in profiles["targets"]] == targets
    readme = (out / "README.md").read_text()
    assert (
        readme.count("No reloader frame was sampled.") == 4 and "![CPU per request by layer](comparison.png)" in readme
    )
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "40_profiling.ipynb").exists()
    assert not (out / "service.log").exists()
