"""Every page a person opens, in a real browser: headless Chromium (Debian's, through selenium and chromedriver) loads
each page of the docs site over HTTP and each committed report from the checkout (file://), and finds no console
error, no request to another host, no internal link or anchor that leads nowhere, no page wider than a 1400 px
window, and the README's headline leaderboard whole at that width (no scrollbar hiding a column)."""

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlsplit

import pytest

from reco_lab.core import free_port

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1400, 1000
# requests a page may make without reaching a host
LOCAL_SCHEMES = ("data:", "blob:", "about:", "chrome-extension:", "chrome:", "devtools:")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev requirement: make test installs it")


def _missing() -> str:
    gone = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    return f"{' and '.join(gone)} not installed: scripts/install-system-parts installs Debian's" if gone else ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "browser present")


@dataclass
class Visit:
    "What the browser saw on one page."

    url: str
    errors: list[str] = field(default_factory=list)  # console messages at level SEVERE
    foreign: list[str] = field(default_factory=list)  # requests to another host
    links: list[str] = field(default_factory=list)  # every a[href], absolute
    ids: set[str] = field(default_factory=set)  # anchors a link may point at
    width: int = 0  # the document's scroll width
    window: int = 0  # the viewport's width


@pytest.fixture(scope="module")
def browser() -> Iterator:
    "Headless Chromium at 1400 px, logging the console and the network."
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WIDTH},{HEIGHT}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--allow-file-access-from-files",  # a report opened from the checkout may read its own folder
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def served(site) -> Iterator[str]:
    "The docs site behind a real HTTP server on a free local port."
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base, timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"http.server on port {port} did not answer")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


_PAGE = """
return {
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
  ids: Array.from(document.querySelectorAll('[id], a[name]')).map(e => e.id || e.getAttribute('name')),
  width: document.documentElement.scrollWidth,
  window: window.innerWidth,
};
"""


def visit(driver, url: str) -> Visit:
    "Load `url`, let its scripts settle, and read the console, the network and the page."
    driver.get_log("browser"), driver.get_log("performance")  # drop what the previous page left
    driver.get(url)
    deadline = time.monotonic() + 10
    while driver.execute_script("return document.readyState") != "complete" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # workers and fetches started on load (search index, iframe-worker)
    page = driver.execute_script(_PAGE)
    seen = Visit(url, links=page["links"], ids=set(page["ids"]), width=page["width"], window=page["window"])
    seen.errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(url)) if not url.startswith("file:") else "file://"
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            asked = message["params"]["request"]["url"]
            if not asked.startswith(origin) and not asked.startswith(LOCAL_SCHEMES):
                seen.foreign.append(asked)
    return seen


def crawl(driver, pages: list[str]) -> dict[str, Visit]:
    return {url: visit(driver, url) for url in pages}


def dead_links(visits: dict[str, Visit], exists) -> list[str]:
    "Internal links whose page is missing, or whose #anchor is not on the page (pages the crawl visited)."
    dead = []
    for visit_ in visits.values():
        for link in visit_.links:
            target, anchor = urldefrag(link)
            if not exists(target):
                if exists(target) is not None:
                    dead.append(f"{visit_.url} -> {link}: no such page")
                continue
            if anchor and target in visits and unquote(anchor) not in visits[target].ids:
                dead.append(f"{visit_.url} -> {link}: no #{anchor} on the page")
    return dead


def problems(visits: dict[str, Visit]) -> list[str]:
    "Console errors, requests to other hosts and pages wider than the window."
    found = []
    for v in visits.values():
        found += [f"{v.url}: console error: {e}" for e in v.errors]
        found += [f"{v.url}: request to another host: {u}" for u in v.foreign]
        if v.width > v.window:
            found.append(f"{v.url}: {v.width} px wide in a {v.window} px window")
    return found


def headline_fits(driver, url: str) -> tuple[int, int, list[str]]:
    "The first table's width, the width it has, and its header: the README's headline leaderboard."
    driver.get(url)
    return tuple(
        driver.execute_script(
            """
            const t = document.querySelector('article table, main table, table');
            const box = t.closest('.md-typeset__scrollwrap') || t.parentElement;
            return [t.getBoundingClientRect().width, box.clientWidth,
                    Array.from(t.querySelectorAll('th')).map(th => th.textContent.trim())];
            """
        )
    )


def test_docs_site_in_a_browser(browser, served, site):
    pages = sorted(str(p.relative_to(site)) for p in site.rglob("*.html"))
    assert "index.html" in pages and any(p.startswith("reports/") for p in pages), pages
    visits = crawl(browser, [served + p for p in pages])

    def exists(url: str) -> bool | None:  # None: another host (the GitHub links of the API pages)
        if not url.startswith(served):
            return None if urlsplit(url).scheme in ("http", "https", "mailto") else True
        path = unquote(urlsplit(url).path).lstrip("/") or "index.html"
        return (site / path).is_file() or (site / path / "index.html").is_file()

    assert not (found := problems(visits)), "\n".join(found)
    assert not (dead := dead_links(visits, exists)), "\n".join(dead)
    width, room, header = headline_fits(browser, served + "index.html")
    assert "model" in [h.lower() for h in header], header
    assert width <= room + 1, f"the headline table is {width:.0f} px in {room} px at a {WIDTH} px window: {header}"


def test_committed_reports_in_a_browser(browser):
    "The reports as a reader of the checkout opens them (file://): the same checks, links within the repository."
    pages = sorted(p for p in (ROOT / "reports").rglob("*.html"))
    assert pages, "no HTML report is committed"
    visits = crawl(browser, [p.as_uri() for p in pages])

    def exists(url: str) -> bool | None:
        if not url.startswith("file://"):
            return None if urlsplit(url).scheme in ("http", "https", "mailto") else True
        return Path(unquote(urlsplit(url).path)).exists()

    assert not (found := problems(visits)), "\n".join(found)
    assert not (dead := dead_links(visits, exists)), "\n".join(dead)
    width, room, header = headline_fits(browser, (ROOT / "reports" / "index.html").as_uri())
    assert width <= room + 1, f"reports/index.html: the leaderboard is {width:.0f} px in {room} px: {header}"


_FLAMEGRAPHS = """
const objects = Array.from(document.querySelectorAll('object[type="image/svg+xml"]'));
const doc = objects[0].contentDocument;
const frames = Array.from(doc.querySelectorAll('g.f'));
const width = g => g.querySelector('rect').getBBox().width;
const label = g => g.querySelector('text');
const overflow = frames.filter(g => label(g).textContent && label(g).getComputedTextLength() + 3 > width(g) + 1)
  .map(g => label(g).textContent);
const target = frames.filter(g => width(g) < 0.9 * doc.documentElement.getBoundingClientRect().width)
  .sort((a, b) => width(b) - width(a))[0];
target.dispatchEvent(new MouseEvent('click', {bubbles: true}));
return {objects: objects.length, images: document.querySelectorAll('img[src$=".svg"]').length,
        column: objects[0].getBoundingClientRect().width, svg: doc.documentElement.getBoundingClientRect().width,
        overflow: overflow, zoomed: target.querySelector('rect').getAttribute('width'),
        reset: doc.getElementById('reset').getAttribute('display')};
"""


def test_profiling_flamegraphs_are_interactive(browser, served, site):
    "The profiling report embeds its flamegraphs as SVG documents whose script runs: column wide, labels fit, zoom."
    page = next(
        p for p in site.glob("reports/profiling/*.html") if 'type="image/svg+xml"' in p.read_text(encoding="utf-8")
    )
    visit(browser, served + page.relative_to(site).as_posix())
    seen = browser.execute_script(_FLAMEGRAPHS)
    assert seen["objects"] >= 2 and seen["images"] == 0, seen  # every target's flamegraph, none as a static image
    assert abs(seen["svg"] - seen["column"]) <= 1, seen  # the SVG takes the column's width, not 1200 px scaled
    assert not seen["overflow"], seen  # every label cut to its frame
    assert (seen["zoomed"], seen["reset"]) == ("100%", "inline"), seen  # a click spreads the frame over the width
