"""`reco-lab profile` end to end on a small real export: every report file, parseable, with application frames
and no reloader."""

import json
import xml.dom.minidom

from support import demo_export, reco_lab


def test_reco_lab_profile_writes_every_report(tmp_path):
    out = tmp_path / "profiling"
    options = ["--seconds", "2", "--rate", "250"]  # the model work is about 2% of the samples of a /reco request
    done = reco_lab("profile", "--models-dir", str(demo_export(tmp_path)), "--out", str(out), *options, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    targets = ["health", "popular", "knn", "als"]
    for target in targets:
        xml.dom.minidom.parse(str(out / f"{target}.svg"))
        scope = json.loads((out / f"{target}.speedscope.json").read_text())
        assert scope["profiles"][0]["samples"] and scope["shared"]["frames"]
        raw = (out / f"{target}.txt").read_text()
        assert "reco_lab/service/" in raw and "reload" not in raw
        if target != "health":
            assert "FastPath._reco (reco_lab/service/app.py" in raw and "Export.recommend (reco_lab/export.py" in raw
    profiles = json.loads((out / "profiles.json").read_text())
    assert [t["target"] for t in profiles["targets"]] == targets
    readme = (out / "README.md").read_text()
    assert (
        readme.count("No reloader frame was sampled.") == 4 and "![CPU per request by layer](comparison.png)" in readme
    )
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "52_profiling.ipynb").exists()
    assert not (out / "service.log").exists()
