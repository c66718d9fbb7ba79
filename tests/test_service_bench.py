"`reco-lab bench serve` end to end with the built-in load generator (CI machines may have no wrk)."

from conftest import ROOT, run, tool

from reco_lab.data import make_synthetic
from reco_lab.service.demo import build_demo_export


def test_bench_serve_writes_the_report_without_wrk(tmp_path):
    export = build_demo_export(tmp_path / "models", make_synthetic(400, 200, 4_000))
    report = tmp_path / "service_bench.md"
    done = run(
        [
            tool("reco-lab"),
            "bench",
            "serve",
            "--models-dir",
            str(export),
            "--seconds",
            "1",
            "--repeats",
            "2",
            "--tool",
            "asyncio",
            "--output",
            str(report),
        ],
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode in (0, 1), (
        done.stdout[-2000:] + done.stderr[-2000:]
    )  # 1: a target missed; no timed assertions here
    text = report.read_text()
    served, side = text.split("## Side by side", 1)
    assert "load by `asyncio`, 16 connections" in text and "Worker RSS with all models loaded" in text
    rows = [line for line in served.splitlines() if line.startswith("| /")]
    assert [r.split(" | ")[0] for r in rows] == [
        "| /health",
        "| /reco/popular",
        "| /reco/knn",
        "| /reco/als",
        "| /reco (all models)",
    ]
    assert all(r.split(" | ")[4] == "0.0" for r in rows)  # no non-2xx answer
    assert "`cpu_ms` is the worker's CPU time per request" in served
    assert served.count("the target:") == 4

    cells = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in side.splitlines() if line.startswith("| ")
    ]
    comparisons = {row[0]: dict(zip(cells[0], row)) for row in cells[2:]}  # cells[1] is the --- line
    assert comparisons["legitimate /reco, Sentry on vs off"]["goal"] == ">= 0.8x"
    assert comparisons["unknown model vs /health, Sentry on"]["goal"] == ">= 0.5x"
    for label in (
        "unknown model, every event sent vs throttled",
        "legitimate /reco, Sentry's ASGI integrations on vs off",
        "legitimate /reco, httptools+uvloop vs h11+asyncio",
        "/health, httptools+uvloop vs h11+asyncio",
    ):
        assert comparisons[label]["ratio"].endswith("x") and comparisons[label]["cpu_ratio"].endswith("x"), label
        assert float(comparisons[label]["cpu_ms"]) > 0, label
    assert all(
        row["non_2xx"] == "0" for label, row in comparisons.items() if "unknown model" not in label
    )  # legitimate: all 2xx
    assert "One Sentry capture" in side and "`sentry` " in side  # the throttled configuration's event count
