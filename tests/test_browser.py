"""The workbench as a user meets it: JupyterLab in headless Chromium, driven by Playwright.

A JupyterLab server starts on 127.0.0.1 with a random token over a copy of ``notebooks/``; Debian's
Chromium (``/usr/bin/chromium``) is installed with apt when it is missing and the tests run as root
(otherwise they are skipped, saying so). Every notebook runs through the UI with no error and no
stderr output; the steering grid is clicked, generates, and steers only generated tokens with the
"generated" scope; the explorer and an expert card open; the dark theme keeps the grid readable.
Screenshots land in ``runs/browser/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SCREENSHOTS = ROOT / "runs" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
# no background traffic: this machine's network is closed, and Chromium retries refused connections
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
RUN_TIMEOUT_MS = 600_000


def _chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get): run `sudo apt-get install chromium`")
    environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Lab:
    """One JupyterLab server and one browser page; notebooks are opened and run at most once."""

    def __init__(self, page, url: str) -> None:
        self.page, self.url = page, url
        self.ran: dict[str, list[dict]] = {}

    def command(self, name: str, args: dict | None = None) -> None:
        """Run a JupyterLab command and wait for it (its result, often a widget, is not sent back)."""
        self.page.evaluate("([name, args]) => window.jupyterapp.commands.execute(name, args).then(() => null)", [name, args or {}])

    def open(self, name: str) -> None:
        """Show notebook ``name`` (opening it and waiting for its idle kernel the first time)."""
        self.command("docmanager:open", {"path": name + ".ipynb"})
        self.page.wait_for_function(
            """name => { const w = window.jupyterapp.shell.currentWidget;
                return w && w.context && w.context.path === name && w.sessionContext.session
                    && w.sessionContext.session.kernel && w.sessionContext.session.kernel.status === 'idle' }""",
            arg=name + ".ipynb", timeout=120_000,
        )

    def run(self, name: str) -> list[dict]:
        """Run every cell of notebook ``name`` through the UI; its outputs as nbformat dicts."""
        if name not in self.ran:
            self.open(name)
            self.command("notebook:run-all-cells")
            self.wait_idle()
            # as a JSON string: plotly outputs nest deeper than Playwright's own serialisation goes
            self.ran[name] = json.loads(self.page.evaluate(
                "() => JSON.stringify(window.jupyterapp.shell.currentWidget.content.widgets.flatMap(c => c.model.type === 'code' ? c.model.outputs.toJSON() : []))"
            ))
        else:
            self.open(name)
        return self.ran[name]

    def wait_idle(self) -> None:
        """Wait until the current notebook's kernel is idle and every code cell has run (or one failed)."""
        self.page.wait_for_function(
            """() => { const w = window.jupyterapp.shell.currentWidget;
                const cells = w.content.widgets.filter(c => c.model.type === 'code');
                const running = cells.some(c => c.node.querySelector('.jp-InputPrompt').textContent.includes('*'));
                // run-all stops at an error: the cells after it never run
                const failed = cells.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
                return w.sessionContext.session.kernel.status === 'idle' && !running
                    && (failed || cells.every(c => c.model.executionCount !== null)) }""",
            timeout=RUN_TIMEOUT_MS, polling=500,
        )

    def execute(self, code: str) -> str:
        """Append a cell with ``code`` to the current notebook, run it, and return its text output."""
        self.page.evaluate(
            """code => { const app = window.jupyterapp; const notebook = app.shell.currentWidget.content;
                notebook.activeCellIndex = notebook.widgets.length - 1;
                return app.commands.execute('notebook:insert-cell-below').then(() => {
                    notebook.activeCell.model.sharedModel.setSource(code);
                    return app.commands.execute('notebook:run-cell'); }).then(() => null) }""",
            code,
        )
        self.wait_idle()
        outputs = json.loads(self.page.evaluate("() => JSON.stringify(window.jupyterapp.shell.currentWidget.content.activeCell.model.outputs.toJSON())"))
        errors = [o for o in outputs if o["output_type"] == "error"]
        assert not errors, errors
        return "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")

    def theme(self, name: str) -> None:
        self.command("apputils:change-theme", {"theme": name})
        light = "true" if "Light" in name else "false"
        self.page.wait_for_function(f"document.body.dataset.jpThemeLight === '{light}'", timeout=30_000)
        self.page.wait_for_timeout(500)  # the theme's stylesheet applies after the attribute

    def panel(self):
        """The current notebook's panel (the notebooks opened before stay in the page, hidden):
        every query of a test goes through it, so it never finds another notebook's widgets."""
        widget_id = self.page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
        return self.page.locator(f"[id='{widget_id}']")

    def screenshot(self, name: str, selector: str | None = None) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        target = self.panel().locator(selector).first if selector else self.page
        target.screenshot(path=str(path))
        return path

    def colors(self, selector: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(background, text) colours of the first element matching ``selector``, as computed by the browser."""
        values = self.panel().locator(selector).first.evaluate("e => [getComputedStyle(e).backgroundColor, getComputedStyle(e).color]")
        return tuple(tuple(int(float(v)) for v in value[value.index("(") + 1 : -1].split(",")[:3]) for value in values)


def _luminance(rgb: tuple[int, ...]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is part of the test extra: make setup installs it")
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", root / "notebooks")
    shutil.copytree(ROOT / "data", root / "data")  # the notebooks read ../data/probes
    settings = root / "settings"
    for plugin, values in {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    port, token = _free_port(), os.urandom(16).hex()
    environment = dict(
        os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"),
        JUPYTER_CONFIG_DIR=str(root / "config"), JUPYTER_RUNTIME_DIR=str(root / "runtime"),
    )
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root / 'notebooks'}", "--LabApp.expose_app_in_browser=True",
        ],
        env=environment, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.2)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
            try:
                # tall: element screenshots are clipped to the viewport
                page = browser.new_page(viewport={"width": 1500, "height": 2400})
                page.goto(f"http://127.0.0.1:{port}/lab?token={token}")
                page.wait_for_function("window.jupyterapp && window.jupyterapp.started", timeout=120_000)
                yield Lab(page, f"http://127.0.0.1:{port}")
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_jupyterlab_without_errors_or_stderr(lab, path):
    outputs = lab.run(path.stem)
    assert outputs, f"{path.name} produced no output"
    errors = [f"{o['ename']}: {o['evalue']}" for o in outputs if o["output_type"] == "error"]
    assert not errors
    stderr = ["".join(o["text"]) for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr"]
    assert not stderr, f"{path.name} printed on stderr (shown red in JupyterLab): {stderr}"
    lab.screenshot(f"notebook-{path.stem}")


def test_steering_grid_paints_generates_and_steers_only_generated_tokens(lab):
    lab.run("02_steering")
    page = lab.page
    grid = lab.panel().locator(".moelens-grid").first
    grid.scroll_into_view_if_needed()
    cells = grid.locator(".moelens-cell")
    assert cells.count() > 16
    lab.execute("grid.state.clear()")  # a change from code redraws the grid
    on_background, _ = lab.colors(".moelens-grid .moelens-cell")
    cells.nth(0).click()  # the default brush disables
    page.wait_for_function("cell => cell.title.endsWith(': disabled')", arg=cells.nth(0).element_handle())
    disabled_background, disabled_text = lab.colors(".moelens-grid .moelens-cell")
    assert disabled_background == (217, 83, 79) != on_background and disabled_text == (255, 255, 255)
    assert "disabled (reroute) L0: 0" in grid.locator(".moelens-status").inner_text()

    # the "generated" scope: disable half the experts of every layer, generate, read the traces in the kernel
    lab.execute(
        "grid.state.mark({layer: range(8) for layer in grid.state.layers}, 'disabled')\n"
        "grid.prompts.value = 'def add(a, b): return a +\\nThe option is ignored when'\n"
        "grid.references.value = ' b'"
    )
    grid.locator(".moelens-scope select").select_option("generated")
    grid.locator(".moelens-generate").click()
    grid.locator(".moelens-comparison .moelens-row").nth(1).wait_for(timeout=RUN_TIMEOUT_MS)
    page.wait_for_function("button => !button.disabled", arg=grid.locator(".moelens-generate").element_handle(), timeout=RUN_TIMEOUT_MS)
    table = grid.locator(".moelens-comparison").inner_text()
    assert "def add(a, b): return a +" in table and "over 1 token" in table  # the reference's log-prob, both runs
    check = lab.execute(
        "import json\n"
        "def changed(c, generated):\n"
        "    keys = ['position', 'layer', 'rank']\n"
        "    a, b = (t.routes.merge(t.tokens[['position', 'generated']], on='position') for t in (c.baseline_trace, c.steered_trace))\n"
        "    a, b = (x[x.generated == generated].set_index(keys)['expert'] for x in (a, b))\n"
        "    both = a.index.intersection(b.index)\n"
        "    return int((a[both] != b[both]).sum()), len(both)\n"
        "print(json.dumps({'scope': grid.state.options.scope, 'prompt': [changed(c, False) for c in grid.comparisons],\n"
        "                  'generated': [changed(c, True) for c in grid.comparisons]}))"
    )
    result = json.loads(check)
    assert result["scope"] == "generated" and len(result["prompt"]) == 2
    assert all(count > 0 and differ == 0 for differ, count in result["prompt"])  # the prompts' routing untouched
    assert all(count > 0 and differ > 0 for differ, count in result["generated"])  # every continuation steered
    lab.screenshot("grid-light", ".moelens-grid")

    lab.theme("JupyterLab Dark")
    try:
        background, text = lab.colors(".moelens-grid .moelens-cell[title$=': on']")
        assert _luminance(background) < 100 and _luminance(text) > 150, (background, text)  # on cells follow the theme
        lab.screenshot("grid-dark", ".moelens-grid")
    finally:
        lab.theme("JupyterLab Light")


def test_explorer_shows_a_steered_diff_and_an_expert_card(lab):
    outputs = lab.run("04_explorer")
    assert outputs
    page = lab.page
    explorer = lab.panel().locator(".moelens-explorer").first
    explorer.scroll_into_view_if_needed()
    assert explorer.locator(".moelens-token").count() > 5
    assert explorer.locator(".moelens-token-changed").count() > 0  # the steered trace's changed decisions
    token = explorer.locator(".moelens-token").nth(3)
    token.click()  # opens the token's routing at every layer
    detail = token.locator("xpath=..").locator(".moelens-token-detail")
    detail.wait_for(state="visible")
    assert "L0" in detail.inner_text() or "layer" in detail.inner_text()
    lab.screenshot("explorer", ".moelens-explorer")
    card = lab.panel().locator(".moelens-card").first
    card.scroll_into_view_if_needed()
    assert "load" in card.inner_text().lower()
    lab.screenshot("expert-card", ".moelens-card")


def test_a_heatmap_click_selects_the_expert_in_the_grid_and_opens_its_card(lab):
    lab.run("04_explorer")
    page = lab.page
    lab.execute("grid.state.select([])\ngrid.card_view.value = ''")
    plot = lab.panel().locator(".js-plotly-plot .nsewdrag").last  # the linked heatmap (a FigureWidget)
    plot.scroll_into_view_if_needed()
    box = plot.bounding_box()
    assert box is not None and box["width"] > 50
    page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    grid = lab.panel().locator(".moelens-grid").first
    grid.locator(".moelens-card-view", has_text="expert").wait_for(timeout=60_000)
    layer, expert = json.loads(lab.execute("import json\nprint(json.dumps(grid.state.selection[-1]))"))
    card = grid.locator(".moelens-card-view").inner_text()
    assert f"Layer {layer}, expert {expert}" in card  # the card of the clicked cell, in the grid
    lab.screenshot("linked-heatmap-and-grid", ".moelens-grid")
