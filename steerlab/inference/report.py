"""A standalone HTML report of an inference run, and the page of its persona space (plotly JS
inlined: no kernel, no network)."""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from steerlab.base.checks import output_file
from steerlab.base.errors import SteerlabError
from steerlab.base.files import read_json
from steerlab.inference.geometry import PersonaSpace, persona_space
from steerlab.inference.results import (
    ACTIVATIONS,
    CONFIG,
    PER_TOKEN,
    load_results,
    read_per_token,
    run_files,
)
from steerlab.inference.runs import check_finished
from steerlab.model.loading import embedded_model_dir
from steerlab.reporting.figures import categories, lens_heatmap, summary_figures, summary_stats
from steerlab.reporting.pages import html_table, write_page
from steerlab.reporting.persona_figures import correlation_text, persona_space_figures

log = logging.getLogger(__name__)

ASSISTANT_CATEGORY = "assistant"  # persona_space's default: the report's axis is the default's
TABLE_COLUMNS = ("persona", "category", "prompt", "rep", "avg_entropy", "avg_top_k_mass",
                 "think_end_position", "n_tokens", "response")


def run_tokenizer(results_dir: str | os.PathLike) -> Any:
    """The tokenizer of the model a run used (from its ``config.json``), or None if unavailable.

    Used to label logit-lens heatmaps with token text; loads only local files (no network).

    Examples:
        >>> tok = run_tokenizer("logs/run")  # a run of the embedded model
        >>> tok.get_vocab() == model.tokenizer.get_vocab()
        True
    """
    config = Path(results_dir) / CONFIG
    if not config.is_file():
        return None
    try:
        model = json.loads(config.read_text(encoding="utf-8"))["model"]
        from transformers import AutoTokenizer  # deferred: transformers

        if model == "embedded":
            model = embedded_model_dir()
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as err:  # labels are a nicety: fall back to token ids
        log.warning("no tokenizer for %s (%s); heatmaps show token ids", results_dir, err)
        return None


def report_path(results_dir: str | os.PathLike, output: str | os.PathLike | None = None
                ) -> Path:
    """Where :func:`write_report` writes (``output``, default ``results_dir/report.html``),
    checked before anything is read: the run is finished, and the page is writable and none
    of the run's own files (``results.json``, ``config.json``, ``per_token.h5``, …).

    Examples:
        >>> report_path("logs/run", "logs/run/results.json")  # refused: the run's results
    """
    root = check_finished(results_dir)
    return output_file(Path(output) if output else root / "report.html", "output",
                       inputs={"results_dir": run_files(root)})


def write_run_report(results_dir: str | os.PathLike, output: str | os.PathLike | None = None,
                 tokenizer: Any = None) -> Path:
    """Write ``report.html``: run config, summary statistics, the three box figures, a lens
    heatmap of the first result (when the run used ``--lens``), the persona space (when it
    captured activations: ``--capture-layers``) and the raw table.

    Args:
        results_dir: the run folder of :func:`steerlab.inference.infer.run_inference`.
        output: the HTML file (default ``results_dir/report.html``).
        tokenizer: labels heatmap tokens with text when given (ids otherwise).

    Examples:
        >>> write_run_report("logs/run")
        PosixPath('logs/run/report.html')
    """
    import plotly.io as pio  # deferred: plotly

    root = Path(results_dir)
    output = report_path(root, output)
    records = load_results(root)
    cfg = read_json(root / CONFIG, "a run's config.json")  # check_finished: it is there
    parts = [f"<h1>steerlab inference report: {html.escape(root.name)}</h1>",
             "<h2>Run</h2>" + html_table([{"setting": k, "value": v} for k, v in cfg.items()])]
    parts.append(f"<h2>Summary ({len(records)} results)</h2>" + html_table(summary_stats(records)))
    first = True
    for fig in summary_figures(records).values():
        parts.append(pio.to_html(fig, include_plotlyjs=first, full_html=False))
        first = False
    if records and (root / PER_TOKEN).is_file():
        arrays = read_per_token(root, records[0]["id"])
        if "lens_entropy" in arrays and len(arrays["tokens"]):
            ids = [int(t) for t in arrays["tokens"]]
            labels = tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else ids
            fig = lens_heatmap(arrays["lens_entropy"], [str(x) for x in labels],
                               f"Logit-lens entropy: {records[0]['persona']}, result 0")
            parts.append(pio.to_html(fig, include_plotlyjs=False, full_html=False))
    if (root / ACTIVATIONS).is_file():
        parts.append("<h2>Persona space</h2>" + _persona_section(root, records))
    parts.append("<h2>Results</h2>" + html_table(records, TABLE_COLUMNS))
    return write_page(output, "steerlab report", "".join(parts))


def _persona_section(root: Path, records: list[dict]) -> str:
    """The persona-space figures of a run with activations, or one line saying why not."""
    cats = categories(records)
    if ASSISTANT_CATEGORY not in cats or len(cats) < 2:
        return (f"<p>No persona space: it needs the {ASSISTANT_CATEGORY!r} category and at "
                f"least one other; this run has {html.escape(', '.join(cats) or 'none')}.</p>")
    try:
        space = persona_space(root)
    except (SteerlabError, OSError) as err:
        log.warning("no persona space for %s: %s", root, err)
        return f"<p>No persona space: {html.escape(str(err))}</p>"
    return _space_html(space, False) + ("<p>The same on its own page, with a table of the "
                                        "personae: <code>steerlab personas map</code>.</p>")


def _space_html(space: PersonaSpace, include_plotlyjs: bool) -> str:
    """A note on the axis and the four figures (plotly.js inlined before the first if asked)."""
    import plotly.io as pio  # deferred: plotly

    layer = space.layers[len(space.layers) // 2]
    figures = persona_space_figures(space, layer)
    note = (f"<p>{len(space.personae)} personae, {space.n_prompts} prompts, the "
            f"{html.escape(space.section)} activations; the assistant axis is the mean of the "
            f"{html.escape(space.assistant)!r} personae minus the others'. Figures at layer "
            f"{layer} (of {list(space.layers)}).</p>")
    return note + "".join(pio.to_html(f, include_plotlyjs=include_plotlyjs and n == 0,
                                      full_html=False)
                          for n, f in enumerate(figures.values()))


def write_persona_space_page(space: PersonaSpace, path: str | os.PathLike) -> Path:
    """Write a standalone HTML page of a persona space: the four figures of
    :func:`steerlab.reporting.persona_space_figures` (at the middle captured layer) and a
    table of the personae (category, projection and its interval per layer, metrics).

    Args:
        space: from :func:`steerlab.inference.geometry.persona_space`.
        path: the HTML file to write.

    Examples:
        >>> space = sl.persona_space("logs/personas")
        >>> write_persona_space_page(space, "logs/personas/space.html")
        PosixPath('logs/personas/space.html')
    """
    path = output_file(path, "output")
    layer = space.layers[len(space.layers) // 2]
    i = space.layer_index(layer)
    rows = []
    for j in np.argsort(-space.projections[:, i], kind="stable"):
        row = {"persona": space.personae[j], "category": space.categories[j]}
        for li, lay in enumerate(space.layers):
            lo, hi = space.intervals[j, li]
            row[f"projection L{lay}"] = float(space.projections[j, li])
            row[f"95% interval L{lay}"] = f"[{lo:.3f}, {hi:.3f}]"
        rows.append(row | {m: float(v[j]) if np.isfinite(v[j]) else None
                           for m, v in space.metrics.items()})
    corr = "".join(f"<li>projection vs {html.escape(m)} at layer {lay}: "
                   f"{html.escape(correlation_text(c[li]))}</li>"
                   for m, c in space.correlations.items() for li, lay in enumerate(space.layers))
    title = f"steerlab persona space: {Path(space.run).name}"
    body = (f"<h1>{html.escape(title)}</h1><p>run {html.escape(space.run)}, model "
            f"{html.escape(space.model)}</p>" + _space_html(space, True)
            + f"<h2>Correlations</h2><ul>{corr}</ul><h2>Personae</h2>" + html_table(rows))
    return write_page(path, title, body)
