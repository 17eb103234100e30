"""Notebook 03 and the demo's report.html in a real browser: JupyterLab and the distribution's
Chromium (/usr/bin/chromium), driven by Playwright. `make test-browser` installs both and runs
this file; elsewhere (no Playwright on the path, no Chromium) it is one skip.

What is checked, as a user would see it:

- Notebook 03 runs top to bottom through JupyterLab's Run menu, in a kernel of the venv.
- Typing a message into the chat widget's box and pressing Enter (no click) sends it: it is
  shown once, an answer follows it, and the box is emptied.
- Moving the strength slider (arrow keys on its handle, then a mouse drag) changes the status
  line at once to exactly the value the slider's readout shows, with the picked vector and
  layer; compared as numbers, with no tolerance: both come from the one widget value.
- In report.html, every drawn trace of every plotly figure has a legend entry whose colours
  (line, marker, box fill) are the trace's, in every panel, and no two legend entries share a
  colour. Colours are the computed SVG styles of the drawn elements, compared as exact
  strings: plotly draws a trace and its legend swatch from one colour value, so any
  difference is a wrong colour, not rounding.
- No two labels of a figure (subplot titles, reference-line labels, notes, text points)
  overlap: their text boxes may not intersect by more than 0.5 px both ways (the boxes are
  fractional; edges that touch by rounding are not an overlap). No label is cut off by its
  own box or leaves the figure by more than 1 px.
- No console error, no uncaught page error and no request off the machine, on any page;
  nothing is filtered.
- The figure checks again on a stress page: the demo's sweep redrawn with the prompted
  reference equal to the unsteered one (their labels on one line) and three layer groups
  (with the two controls, five legend entries).
- The same checks on the report of a `steerlab infer --capture-layers` run (its Persona space
  section: one colour per category in all three category figures, the assistant's first) and
  on a planted persona space of twelve categories at nearly equal projections.

Timeouts are bounds for a loaded 2-core machine, not measurements. The facts measured are
printed (`make test-browser` runs pytest with -s). Screenshots go to docs/img/.
STEERLAB_BROWSER_DEMO_DIR: run (or resume) the demo in that folder instead of a fresh one.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = bool(os.environ.get("STEERLAB_REQUIRE_BROWSER"))  # make test-browser: no skips
IMG = ROOT / "docs" / "img"
# as root on a closed network: no sandbox, no GPU, nothing that would call out (Playwright
# adds some of these itself; repeated flags are harmless)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MESSAGE = "Who are you?"

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("playwright is not installed (make test-browser installs it)",
                allow_module_level=True)
if not CHROMIUM.exists():
    if REQUIRED:
        raise RuntimeError(f"{CHROMIUM} is missing")
    pytest.skip(f"no {CHROMIUM} (make test-browser installs it)", allow_module_level=True)

pytestmark = pytest.mark.slow


def _fact(line: str) -> None:
    print(f"test-browser: {line}", flush=True)


def _poll(fn, timeout: float, every: float = 0.2):
    """``fn()`` until it is truthy or ``timeout`` seconds pass; its last value."""
    end = time.monotonic() + timeout
    while not (value := fn()) and time.monotonic() < end:
        time.sleep(every)
    return value


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no playwright there
    return {**env, **OFFLINE, **extra}


class Console:
    """Console errors, uncaught exceptions and requests that leave the machine, of a page
    from the moment it is watched."""

    LOCAL = re.compile(r"(https?|wss?)://127\.0\.0\.1[:/]|(file|data|blob|about):")

    def __init__(self, page):
        self.errors: list[str] = []
        self.outside: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("request", lambda r: self.LOCAL.match(r.url) or self.outside.append(r.url))

    def check(self, name: str) -> None:
        _fact(f"console errors in {name}: {len(self.errors)}; requests off the machine: "
              f"{len(self.outside)}")
        assert self.errors == [] and self.outside == [], (self.errors, self.outside)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=str(CHROMIUM),
            headless=True, args=CHROMIUM_ARGS, viewport={"width": 1200, "height": 900})
        try:
            yield context
        finally:
            context.close()


# --- notebook 03 in JupyterLab ----------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free loopback port, serving a copy of notebook 03."""
    tmp = tmp_path_factory.mktemp("lab")
    (tmp / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / "03_steering_chat.ipynb", tmp / "notebooks")
    settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no "fetch the news?" question, no update check
    (settings / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    port = free_port()
    token = secrets.token_hex(16)
    env = _child_env(JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_DATA_DIR=str(tmp / "data"),
                     JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
                     JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
                     JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    log = (tmp / "lab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'notebooks'}",
         "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",  # no PyPI listing
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert server.poll() is None, (tmp / "lab.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return True
        except OSError:
            return False

    try:
        assert _poll(up, 90, 0.5), "JupyterLab did not answer in 90 s"
        yield base, token
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


class Chat:
    """The chat widget's controls on the page (ipywidgets 8 DOM)."""

    def __init__(self, page):
        send = page.get_by_role("button", name="send", exact=True)
        self.root = page.locator(".widget-vbox", has=send)
        self.box = self.root.locator(".widget-hbox", has=send).locator("input[type=text]")
        self.output = self.root.locator(".widget-output")
        self.status = self.root.locator(":scope > .widget-html").last
        control = lambda name: self.root.locator(  # noqa: E731
            ".widget-inline-hbox", has=page.locator(f"label:text-is('{name}')"))
        self.slider = control("strength (norm)")  # the slider's units are in its label
        self.vector, self.layer = (control(n).locator("select") for n in ("vector", "layer"))

    def strength(self) -> float:
        return float(self.slider.locator(".widget-readout").inner_text())

    def picked(self, select) -> str:
        return select.evaluate("s => s.options[s.selectedIndex].text")

    def steering(self) -> tuple[str, float, str | None] | None:
        """(vector, strength, layer) as the status line states them; None when "off"."""
        m = re.search(r"steering (\S+) × (\S+?) norm(?: \(layer (\d+)\))?$",
                      self.status.inner_text().strip())
        return m and (m.group(1), float(m.group(2)), m.group(3))


@pytest.fixture(scope="module")
def notebook(browser, lab):
    """Notebook 03 opened in JupyterLab and run with Run > Run All Cells."""
    page = browser.new_page()
    console = Console(page)
    t0 = time.monotonic()
    base, token = lab
    page.goto(f"{base}/lab?token={token}")
    page.locator(".jp-DirListing-item", has_text="03_steering_chat.ipynb").dblclick(
        timeout=90_000)

    asked = []

    def kernel_idle() -> bool:
        # opened before the kernel specs have loaded, JupyterLab asks which kernel to start:
        # the notebook's own, preselected, is the answer
        if page.locator(".jp-Dialog", has_text="Select Kernel").is_visible():
            page.locator(".jp-Dialog").get_by_role("button", name="Select").click()
            asked.append(True)
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=5) as r:
            sessions = json.load(r)
        return any(s["kernel"]["execution_state"] == "idle" for s in sessions)

    assert _poll(kernel_idle, 90, 0.5), "the notebook's kernel did not start in 90 s"
    _fact("kernel: " + ("picked in JupyterLab's Select Kernel dialog" if asked else
                        "started by JupyterLab on opening the notebook"))
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    idle.wait_for(timeout=30_000)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    prompts = ("[...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]"
               ".map(e => e.textContent)")
    page.wait_for_function(  # done: no cell is queued or running ([*]), some have run
        f"() => {{ const p = {prompts}; return !p.some(t => t.includes('*')) "
        "&& p.some(t => /\\d/.test(t)); }", timeout=300_000)
    idle.wait_for(timeout=60_000)
    ran = page.evaluate(f"() => {prompts}")
    stderr = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert all(re.search(r"\[\d+\]", p) for p in ran), (ran, stderr.all_inner_texts())
    _fact(f"notebook 03 ran in JupyterLab (Run > Run All Cells): {len(ran)} code cells in "
          f"{time.monotonic() - t0:.0f} s, {stderr.count()} stderr outputs")
    chat = Chat(page)
    chat.box.wait_for(timeout=10_000)
    yield page, chat, console
    page.close()


def test_enter_sends_the_message(notebook):
    page, chat, _ = notebook
    idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
    chat.box.click()
    chat.box.press_sequentially(MESSAGE)
    chat.box.press("Enter")
    shown = _poll(lambda: MESSAGE in chat.output.inner_text(), 60)
    assert shown, f"Enter did not send: the box still holds {chat.box.input_value()!r}"
    idle.wait_for(timeout=120_000)  # the reply has streamed to its end
    text = chat.output.inner_text()
    assert text.count(f"you: {MESSAGE}") == 1, text  # sent once
    answer = re.search(rf"you: {re.escape(MESSAGE)}\n(\S+): (.*)", text, re.S)
    assert answer and answer.group(2).strip(), text
    assert chat.box.input_value() == ""
    _fact(f"Enter sent {MESSAGE!r}: answer of {len(answer.group(2).strip())} chars as "
          f"{answer.group(1)!r}, box emptied")


def test_status_line_follows_the_slider(notebook):
    page, chat, _ = notebook

    def check(how: str, before: float) -> None:
        now = chat.strength()
        assert now != before, f"the slider did not move ({how})"
        want = (chat.picked(chat.vector), now, chat.picked(chat.layer))
        got = _poll(lambda: chat.steering() == want and chat.steering(), 10)
        assert got == want, (f"status {chat.status.inner_text()!r} after the slider moved to "
                             f"{now:g} ({how}); want vector, strength, layer {want}")
        _fact(f"status after the slider ({how}): strength {got[1]:g} == slider {now:g}, "
              f"vector {got[0]}, layer {got[2]}")

    handle = chat.slider.locator(".noUi-handle")
    before = chat.strength()
    handle.focus()
    for _ in range(4):
        handle.press("ArrowRight")
    check("4 x ArrowRight", before)

    before = chat.strength()
    track = chat.slider.locator(".noUi-base").bounding_box()
    knob = handle.bounding_box()
    page.mouse.move(knob["x"] + knob["width"] / 2, knob["y"] + knob["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + 0.8 * track["width"], knob["y"] + knob["height"] / 2, steps=8)
    page.mouse.up()
    check("drag to 80% of the track", before)

    IMG.mkdir(parents=True, exist_ok=True)
    chat.root.screenshot(path=IMG / "notebook-chat.png")
    _fact(f"screenshot {(IMG / 'notebook-chat.png').relative_to(ROOT)}")


def test_jupyterlab_has_no_errors_and_stays_local(notebook):
    *_, console = notebook
    console.check("JupyterLab")


# --- the demo's report.html ---------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The folder of a `steerlab demo --quick` run."""
    out = Path(os.environ.get("STEERLAB_BROWSER_DEMO_DIR") or tmp_path_factory.mktemp("demo"))
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "steerlab.cli", "demo", "--quick",
                          "--no-progress", "--output-dir", str(out)],
                         env=_child_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    _fact(f"steerlab demo --quick: {time.monotonic() - t0:.0f} s")
    return out


def _stress_page(demo: Path, path: Path) -> Path:
    """The demo's strength sweep redrawn with the prompted reference equal to the unsteered
    one in every panel (their labels on one line) and the sweep copied into three layer
    groups (three legend colours): the cases the labels and colours must survive."""
    from dataclasses import replace

    import plotly.io as pio

    from steerlab.evaluation.evaluate import SteeringEval
    from steerlab.reporting.figures import steering_figure

    ev = SteeringEval.load(demo / "steering-eval.json")
    sweep = tuple(replace(s, layers=layers, coherence=s.coherence * k)
                  for layers, k in (((10,), 1.0), ((12,), 0.9), ((10, 12), 0.8))
                  for s in ev.sweep)
    fig = steering_figure(replace(ev, prompted=ev.unsteered, sweep=sweep))
    pio.write_html(fig, path, include_plotlyjs=True, full_html=True)
    return path


@pytest.fixture(scope="module")
def persona_run(tmp_path_factory) -> Path:
    """A `steerlab infer --capture-layers` run of one built-in persona per category, and its
    `steerlab report` (with the Persona space section)."""
    from importlib.resources import files

    data = files("steerlab.builtin") / "data"
    personae = json.loads((data / "personae.json").read_text())
    chosen = [next(p for p in personae if p["category"] == c)
              for c in dict.fromkeys(p["category"] for p in personae)]
    root = tmp_path_factory.mktemp("personae")
    (root / "personae.json").write_text(json.dumps(chosen))
    (root / "prompts.json").write_text(json.dumps(json.loads(
        (data / "prompts.json").read_text())[:4]))
    t0 = time.monotonic()
    for args in (["infer", "--prompts-json", str(root / "prompts.json"), "--personae-json",
                  str(root / "personae.json"), "--max-tokens", "12", "--capture-layers",
                  "10,20", "--output-dir", str(root / "run"), "--no-progress"],
                 ["report", str(root / "run")]):
        run = subprocess.run([sys.executable, "-m", "steerlab.cli", *args], env=_child_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    _fact(f"steerlab infer --capture-layers + report: {time.monotonic() - t0:.0f} s")
    return root / "run"


def _persona_stress_page(path: Path) -> Path:
    """The persona-space figures of a planted space: twelve categories (past plotly's ten
    default colours), two personae each at nearly equal projections, long names, ten
    components over five layers."""
    from types import SimpleNamespace

    import numpy as np
    import plotly.io as pio

    from steerlab.inference.geometry import Correlation
    from steerlab.reporting import persona_space_figures

    rng = np.random.default_rng(0)
    cats = tuple(["assistant"] + [f"category-{i}" for i in range(11)])
    names = tuple(f"{c} persona {j} with a long name" for c in cats for j in range(2))
    n, layers, k = len(names), (2, 6, 10, 14, 18), 10
    proj = 1.0 + 1e-3 * rng.normal(size=(n, len(layers)))
    space = SimpleNamespace(
        personae=names, categories=tuple(c for c in cats for _ in range(2)),
        assistant="assistant", layers=layers, projections=proj,
        intervals=np.stack([proj - 0.2, proj + 0.2], -1),
        explained=np.sort(rng.dirichlet(np.ones(k), size=len(layers)), 1)[:, ::-1],
        scores=rng.normal(size=(n, len(layers), k)), pc1_cosine=rng.uniform(-1, 1, len(layers)),
        metrics={"avg_entropy": rng.uniform(1, 3, n)},
        correlations={"avg_entropy": (Correlation(0.1234, -0.5, 0.6, n),) * len(layers)})
    figs = list(persona_space_figures(space).values())
    html = "".join(pio.to_html(f, include_plotlyjs=i == 0, full_html=False)
                   for i, f in enumerate(figs))
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{html}"
                    "</body></html>")
    return path


@pytest.fixture(scope="module",
                params=["report.html", "stress sweep", "persona report", "persona stress"])
def figures_page(request, browser, tmp_path_factory):
    """A page of plotly figures opened in Chromium, and what its figures drew."""
    if request.param == "persona report":
        path = request.getfixturevalue("persona_run") / "report.html"
    elif request.param == "persona stress":
        path = _persona_stress_page(tmp_path_factory.mktemp("stress") / "personae.html")
    elif request.param == "report.html":
        path = request.getfixturevalue("demo") / "report.html"
    else:
        path = _stress_page(request.getfixturevalue("demo"),
                            tmp_path_factory.mktemp("stress") / "sweep.html")
    page = browser.new_page()
    console = Console(page)
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot')]"
                           ".every(gd => gd.querySelector('.main-svg'))", timeout=60_000)
    figures = page.evaluate((ROOT / "tests" / "browser" / "figures.js").read_text())
    assert figures, f"no plotly figure in {path}"
    yield request.param, page, figures, console
    page.close()


def test_colours_match_the_legend(figures_page):
    name, page, figures, _ = figures_page
    for fig in figures:
        legend = {e["key"]: e["colours"] for e in fig["legend"]}
        if not legend and len({t["key"] for t in fig["drawn"]}) <= 1:
            _fact(f"{name}: figure {fig['title']!r}: {len(fig['drawn'])} drawn traces, no "
                  "legend needed")
            continue
        wrong = []
        for t in fig["drawn"]:
            want = legend.get(t["key"])
            if want is None:
                wrong.append(f"{t['name']} in {t['panel']}: no legend entry")
                continue
            shared = [p for p in t["colours"] if p in want]
            assert shared, (t, want)  # something to compare
            wrong += [f"{t['name']} in {t['panel']}: {p} {t['colours'][p]}, legend {want[p]}"
                      for p in shared if t["colours"][p] != want[p]]
        swatch = {e["name"]: e["colours"].get("line") or e["colours"]["marker"]
                  for e in fig["legend"]}
        wrong += [f"{a} and {b} share the legend colour {swatch[a]}" for i, a in
                  enumerate(swatch) for b in list(swatch)[i + 1:] if swatch[a] == swatch[b]]
        assert not wrong, f"{name}: figure {fig['title']!r}: " + "; ".join(wrong)
        panels = {t["panel"] for t in fig["drawn"]}
        swatches = ", ".join(f"{k} {v}" for k, v in swatch.items())
        _fact(f"{name}: figure {fig['title']!r}: {fig['panels']} panels, {len(legend)} legend "
              f"entries, {len(fig['drawn'])} drawn traces in {len(panels)} panels, colours "
              f"identical to the legend's ({swatches})")
    if name.startswith("persona"):
        _persona_figures_drawn(name, page, figures)
        return
    sweep = next(f for f in figures if "coherent trait score" in f["title"])
    assert sweep["panels"] == 3 and {t["panel"] for t in sweep["drawn"]} == {"x", "x2", "x3"}
    if name == "report.html":
        IMG.mkdir(parents=True, exist_ok=True)
        entropy = next(f for f in figures if f["title"].startswith("Entropy"))
        for fig, png in ((sweep, "report-sweep.png"), (entropy, "report-entropy.png")):
            page.locator(".js-plotly-plot").nth(figures.index(fig)).screenshot(path=IMG / png)
            _fact(f"screenshot {(IMG / png).relative_to(ROOT)}")


def _persona_figures_drawn(name: str, page, figures: list[dict]) -> None:
    """The four persona-space figures are there; in each category figure the legend is the
    categories', the assistant's first, and a category has the same colour in all three."""
    titles = ("Persona space at layer", "Assistant-axis projection", "Projection vs mean "
              "entropy", "Persona space per layer")
    found = [next(f for f in figures if f["title"].startswith(t)) for t in titles]
    by_category = [{e["name"]: e["colours"]["marker"] for e in f["legend"]} for f in found[:3]]
    assert list(by_category[0])[0] == "assistant"
    assert by_category[0] == by_category[1] == by_category[2], by_category
    assert found[3]["panels"] == 2
    _fact(f"{name}: persona-space figures: {len(by_category[0])} categories, one colour each "
          "in all three category figures, the assistant's first")
    if name == "persona report":
        IMG.mkdir(parents=True, exist_ok=True)
        page.locator(".js-plotly-plot").nth(figures.index(found[1])).screenshot(
            path=IMG / "report-persona-axis.png")
        _fact("screenshot docs/img/report-persona-axis.png")


def _overlap(a: dict, b: dict) -> float:
    """How far two boxes intersect in the direction they intersect least (<= 0: apart)."""
    return min(min(a["right"], b["right"]) - max(a["left"], b["left"]),
               min(a["bottom"], b["bottom"]) - max(a["top"], b["top"]))


def _inside(inner: dict, outer: dict, slack: float) -> bool:
    return (inner["left"] >= outer["left"] - slack and inner["right"] <= outer["right"] + slack
            and inner["top"] >= outer["top"] - slack
            and inner["bottom"] <= outer["bottom"] + slack)


def test_labels_do_not_overlap(figures_page):
    name, _, figures, _ = figures_page
    for fig in figures:
        labels = fig["labels"]
        bad = [f"{a['text']!r} and {b['text']!r} overlap by {_overlap(a['rect'], b['rect']):.1f}"
               f" px" for i, a in enumerate(labels) for b in labels[i + 1:]
               if _overlap(a["rect"], b["rect"]) > 0.5]
        bad += [f"{lab['text']!r} is cut off by its box" for lab in labels
                if lab["bg"] and not _inside(lab["rect"], lab["bg"], 1)]
        bad += [f"{lab['text']!r} leaves the figure" for lab in labels
                if not _inside(lab["rect"], fig["svg"], 1)]
        assert not bad, f"{name}: figure {fig['title']!r}: " + "; ".join(bad)
        _fact(f"{name}: figure {fig['title']!r}: {len(labels)} labels, none overlapping or cut "
              "off")


def test_no_errors_and_stays_local(figures_page):
    name, *_, console = figures_page
    console.check(name)
