"""A standalone HTML report of an inference run (plotly JS inlined: no kernel, no network)."""

from __future__ import annotations

import html
import json
import logging
import os
from pathlib import Path
from typing import Any

from steerlab.base.checks import output_file
from steerlab.base.files import read_json
from steerlab.inference.results import CONFIG, PER_TOKEN, load_results, read_per_token, run_files
from steerlab.inference.runs import check_finished
from steerlab.model.loading import embedded_model_dir
from steerlab.reporting.figures import lens_heatmap, summary_figures, summary_stats
from steerlab.reporting.pages import html_table, write_page

log = logging.getLogger(__name__)

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
    heatmap of the first result (when the run used ``--lens``) and the raw table.

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
    parts.append("<h2>Results</h2>" + html_table(records, TABLE_COLUMNS))
    return write_page(output, "steerlab report", "".join(parts))
