"""JupyterLab as a researcher opens the notebooks: a real server with the project's Jupyter configuration
(configs/jupyter/), headless Chromium through selenium (as tests/test_browser.py drives it) opens a notebook, waits for
its kernel, presses Ctrl+S without editing anything, and finds the file rewritten with the same bytes, no console
error and no request leaving the machine. The server runs in a temporary copy of settings.ini and the notebooks, with
its own Jupyter config, data and runtime folders, so that nothing of the checkout or of the user's Jupyter changes.

What it guards: the save hook (nbdev's clean_jupyter, `jupyter_hooks = True`), without which a save adds the kernel's
display name and language_info; news, update checks and the PyPI extension manager turned off; CatBoost's
catboost-widget extension, which fails to activate (a console error on every load) where ipywidgets' widget manager
is not installed beside it. The tab is still marked modified once the kernel connects (see
docs/guides/contributing.md); that is not asserted either way."""

import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from reco_lab.core import console_script, free_port

ROOT = Path(__file__).resolve().parents[1]
# a short notebook, and the ranker's (CatBoost)
NOTEBOOKS = ["00_core.ipynb", "18_ranker.ipynb"]

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev requirement: make test installs it")


def _missing() -> str:
    gone = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    return f"{' and '.join(gone)} not installed: scripts/install-system-parts installs Debian's" if gone else ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "browser present")


@dataclass
class Lab:
    url: str
    token: str
    folder: Path  # the server's root: settings.ini and nbs/
    log: Path

    def api(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    "`jupyter lab` with configs/jupyter/ on its config path, in a temporary copy of settings.ini and the notebooks."
    home = tmp_path_factory.mktemp("jupyterlab")
    folder = home / "repo"
    (folder / "nbs").mkdir(parents=True)
    shutil.copy2(ROOT / "settings.ini", folder)
    for name in NOTEBOOKS:
        shutil.copy2(ROOT / "nbs" / name, folder / "nbs" / name)
    dirs = {
        k: home / k.lower() for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR")
    }
    env = {
        **os.environ,
        **{k: str(v) for k, v in dirs.items()},
        "JUPYTER_CONFIG_PATH": str(ROOT / "configs" / "jupyter"),
    }
    env |= {"JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    port, token = free_port(), secrets.token_hex(16)
    command = [console_script("jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={port}"]
    command += [f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}"]
    command += ["--allow-root"] if os.geteuid() == 0 else []
    log = home / "lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT)
    served = Lab(f"http://127.0.0.1:{port}", token, folder, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                served.api("/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        assert "Extension Manager is 'readonly'" in log.read_text(), "configs/jupyter/ was not read"
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    "Headless Chromium, logging the console and the network."
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    for flag in ("--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(what: str, check, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return found


def kernel_idle(lab: Lab, path: str) -> bool:
    "The notebook's kernel is up and idle (the lab connected to it and set the kernel's metadata)."
    sessions = [s for s in lab.api("/api/sessions") if s["path"] == path]
    return bool(sessions) and sessions[0]["kernel"]["execution_state"] == "idle"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opening_and_saving_a_notebook_changes_nothing(lab, browser, name):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    path, file = f"nbs/{name}", lab.folder / "nbs" / name
    before, written = file.read_bytes(), file.stat().st_mtime_ns
    browser.get_log("browser"), browser.get_log("performance")  # what an earlier page left
    browser.get(f"{lab.url}/lab/tree/{path}?token={lab.token}")
    wait_for(f"{name}'s kernel", lambda: kernel_idle(lab, path), 120)
    panel = wait_for(
        "the notebook", lambda: browser.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel:not(.lm-mod-hidden)")
    )
    time.sleep(2)  # the lab sets the kernel's metadata when it connects, and the widget manager registers
    panel[0].find_element(By.CSS_SELECTOR, ".jp-Notebook").click()  # command mode, a cell selected
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    wait_for(f"{name} saved", lambda: file.stat().st_mtime_ns != written, 30)
    time.sleep(0.5)  # the lab reloads the saved model
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    foreign = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if urlsplit(url).hostname not in ("127.0.0.1", None) and not url.startswith(("data:", "blob:")):
                foreign.append(url)
    after = file.read_bytes()
    assert after == before, f"saving {name} without an edit changed it:\n{after.decode()[:3000]}"
    assert not errors, "\n".join(errors)
    assert not foreign, foreign
