"""The docs site (`make docs`, scripts/build-docs), built into a temporary folder: the README is its index, every
notebook has a page, every name in every module's `__all__` has an entry, the links of `_modidx.py` land on them,
search lists every page and entry, and viewing a page fetches nothing from another host."""

import ast
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

from nbdev.config import get_config
from nbdev.doclinks import NbdevLookup, _nbpath2html  # nbdev's page names: the pages _modidx.py links to

ROOT = Path(__file__).resolve().parents[1]
CFG = get_config(path=ROOT)
NBS, LIB = Path(CFG.nbs_path), Path(CFG.lib_path)


class Page(HTMLParser):
    "What a test needs of an HTML page: its ids, headings, links and the URLs it loads."

    def __init__(self, path: Path):
        super().__init__()
        self.ids, self.headings, self.links, self.loads = set(), {}, [], []
        self._heading = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag in ("h1", "h2"):
            self._heading = (tag, [])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("script", "img", "iframe", "audio", "video", "source") and attrs.get("src"):
            self.loads.append(attrs["src"])
        if tag == "link" and attrs.get("href") and attrs.get("rel") not in ("canonical", "alternate"):
            self.loads.append(attrs["href"])

    def handle_data(self, data):
        if self._heading:
            self._heading[1].append(data)

    def handle_endtag(self, tag):
        if self._heading and tag == self._heading[0]:
            self.headings.setdefault(tag, []).append("".join(self._heading[1]).replace("¶", "").strip())
            self._heading = None


def plain(markdown: str) -> str:
    "A markdown heading's text: no code marks, emphasis or link targets."
    return re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", markdown).replace("`", "").replace("*", "").strip()


def notebooks() -> list[Path]:
    return sorted(p for p in NBS.rglob("*.ipynb") if not any(part[0] in "_." for part in p.relative_to(NBS).parts))


def title(notebook: Path) -> str:
    "The notebook's title: the first markdown cell's `# ` line, as nbdev reads it."
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    first = next(c for c in cells if c["cell_type"] == "markdown")
    return plain(re.search(r"^# (.+)$", "".join(first["source"]), re.MULTILINE).group(1))


def exported(module: Path) -> tuple[list[str], set[Path]]:
    "A module's `__all__` and the pages of the notebooks its cells come from."
    source = module.read_text(encoding="utf-8")
    names = next(
        ast.literal_eval(node.value)
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    notebooks = set(re.findall(r"^# %% (\S+\.ipynb)", source, re.MULTILINE))
    return names, {_nbpath2html((module.parent / nb).resolve().relative_to(NBS)) for nb in notebooks}


def test_index_is_the_readme(site):
    readme = re.sub(r"^```.*?^```", "", (ROOT / "README.md").read_text(encoding="utf-8"), flags=re.M | re.S)
    index = Page(site / "index.html")
    assert index.headings["h1"] == [plain(re.search(r"^# (.+)$", readme, re.MULTILINE).group(1))]
    sections = [plain(h) for h in re.findall(r"^## (.+)$", readme, re.MULTILINE)]
    assert sections and index.headings["h2"] == sections


def test_a_page_per_notebook(site):
    readme_nb = NBS / CFG.readme_nb
    pages = {nb: site / _nbpath2html(nb.relative_to(NBS)) for nb in notebooks() if nb != readme_nb}
    assert len(pages) > 20
    for nb, page in pages.items():
        assert page.is_file(), f"no page for {nb.name}: {page.name}"
        assert Page(page).headings["h1"][0] == title(nb), page


def test_an_entry_for_every_exported_name(site):
    reference = Page(site / "reference.html").links
    modules = [p for p in LIB.rglob("*.py") if not p.name.startswith("_")]
    assert len(modules) > 20
    count = 0
    for module in modules:
        names, pages = exported(module)
        ids = {page: Page(site / page).ids for page in pages}
        for name in names:
            # nbdev's anchor (the name lower-cased) for functions and classes, the name itself for a constant
            found = [f"{page.as_posix()}#{a}" for page in pages for a in (name.lower(), name) if a in ids[page]]
            assert found, f"{module.relative_to(ROOT)}: no entry for {name} on {sorted(map(str, pages))}"
            assert set(found) & set(reference), f"the API reference does not link {found}"
            count += 1
    assert count > 300


def test_modidx_links_land_on_entries(site):
    "settings.ini's doc_host and doc_baseurl make _modidx.py's links relative to the site's root."
    from reco_lab._modidx import d

    lookup, pages = NbdevLookup(), {}
    symbols = [s for module in d["syms"].values() for s in module]
    assert len(symbols) > 300
    for symbol in symbols:
        url = urlsplit(lookup.doc(symbol))
        assert not url.scheme and not url.netloc and not url.path.startswith("/"), (symbol, url.geturl())
        page = site / url.path
        assert page.is_file(), (symbol, url.geturl())
        if page not in pages:
            pages[page] = Page(page).ids
        assert url.fragment in pages[page], (symbol, url.geturl())


def test_search_lists_every_page_and_entry(site):
    index = json.loads((site / "search" / "search_index.json").read_text(encoding="utf-8"))
    locations = {doc["location"] for doc in index["docs"]}
    html_pages = {p.relative_to(site).as_posix() for p in site.glob("*.html") if p.name != "404.html"}
    assert html_pages and html_pages <= locations
    reference = {link for link in Page(site / "reference.html").links if re.match(r"[\w/]+\.html#", link)}
    assert len(reference) > 300 and reference <= locations, sorted(reference - locations)[:10]
    # the offline plugin's copy of the index, so that search works from file://
    assert (site / "search" / "search_index.js").read_text(encoding="utf-8").startswith("var __index = ")


def test_pages_load_nothing_from_other_hosts(site):
    pages = list(site.rglob("*.html"))
    remote = {
        (page.relative_to(site).as_posix(), url)
        for page in pages
        for url in Page(page).loads
        if urlsplit(url).scheme in ("http", "https") or url.startswith("//")
    }
    assert len(pages) > 30 and not remote, sorted(remote)[:10]
