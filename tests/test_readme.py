"The README's results are what the committed reports say (`make readme` renders them; nobody types them)."

from conftest import ROOT

from reco_lab.reports import comparison_markdown, configuration_page, results_markdown, verdict_markdown


def test_readme_results_are_generated_from_the_reports():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    reports = ROOT / "reports"
    for table in (
        *(
            render(reports / variant)
            for variant in ("", "next_n", "min_rating_4")
            for render in (results_markdown, verdict_markdown)
        ),
        comparison_markdown(reports / "defaults", reports),
    ):
        assert table in readme, f"README.md is out of date with the reports: run `make readme`\n{table}"


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into docs/guides/"


def test_the_configuration_guide_is_generated_from_the_settings():
    page = (ROOT / "docs" / "guides" / "configuration.md").read_text(encoding="utf-8")
    assert page == configuration_page(), (
        "docs/guides/configuration.md is out of date with the settings: run `make readme`"
    )
