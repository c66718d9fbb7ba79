"`reco-lab bench serve` end to end with the built-in load generator (CI machines may have no wrk)."

from support import demo_export, reco_lab


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    "The pipe tables of a markdown text, each as rows of {column: cell}."
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            header, _, *rows = block  # the second line is the alignment row
            tables.append([dict(zip(header, row)) for row in rows])
            block = []
    return tables


def test_bench_serve_writes_the_report_without_wrk(tmp_path):
    report = tmp_path / "service_bench.md"
    options = ["--seconds", "1", "--repeats", "2", "--tool", "asyncio", "--output", str(report)]
    done = reco_lab("bench", "serve", "--models-dir", str(demo_export(tmp_path)), *options)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-2000:]  # 1: a target missed, not timed here
    text = report.read_text()
    served, side = text.split("## Side by side", 1)
    assert "load by `asyncio`, 16 connections" in text and "Worker RSS with all models loaded" in text
    assert "`cpu_ms` is the worker's CPU time per request" in served and served.count("the target:") == 4
    (targets,) = markdown_tables(served)
    assert [row["target"] for row in targets] == [
        "/health",
        "/reco/popular",
        "/reco/knn",
        "/reco/als",
        "/reco (all models)",
    ]
    assert all(float(row["non_2xx"]) == 0 for row in targets)

    (table,) = markdown_tables(side)
    comparisons = {row["comparison"]: row for row in table}
    assert comparisons["legitimate /reco, Sentry on vs off"]["goal"] == ">= 0.9x"
    assert comparisons["unknown model vs /health, Sentry on"]["goal"] == ">= 0.5x"
    for label in (
        "unknown model, every event sent vs throttled",
        "legitimate /reco, Sentry's ASGI integrations on vs off",
        "legitimate /reco, httptools+uvloop vs h11+asyncio",
        "/health, httptools+uvloop vs h11+asyncio",
        "legitimate /reco vs a bare ASGI app, same JSON, same server",
    ):
        assert comparisons[label]["ratio"].endswith("x") and comparisons[label]["cpu_ratio"].endswith("x"), label
        assert float(comparisons[label]["cpu_ms"]) > 0, label
    legitimate = [row for label, row in comparisons.items() if "unknown model" not in label]
    assert all(row["non_2xx"] == "0" for row in legitimate)
    assert "One Sentry capture" in side and "`sentry` " in side  # the throttled configuration's event count
