"The README's results tables are what the committed reports say (`make readme` renders them; nobody types them)."

from conftest import ROOT

from reco_lab.runner import comparison_markdown, results_markdown


def test_readme_results_are_generated_from_the_reports():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    reports = ROOT / "reports"
    for table in (
        results_markdown(reports),
        results_markdown(reports / "next_n"),
        comparison_markdown(reports / "defaults", reports),
    ):
        assert table in readme, f"README.md is out of date with the reports: run `make readme`\n{table}"
