"""Plotly figures of inference results: per-category boxes, summary statistics, lens heatmap."""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

ENTROPY_FIELDS = ("avg_entropy_thinking", "avg_entropy_output", "avg_entropy")
TOP_K_FIELDS = ("avg_top_k_mass_thinking", "avg_top_k_mass_output", "avg_top_k_mass")
THINK_FIELDS = ("think_end_position",)
METRIC_FIELDS = ENTROPY_FIELDS + TOP_K_FIELDS + THINK_FIELDS


def categories(records: Iterable[dict]) -> list[str]:
    """The categories present, in first-seen order."""
    return list(dict.fromkeys(r["category"] for r in records))


def filter_records(records: Iterable[dict], keep: Iterable[str] | None = None) -> list[dict]:
    """Records whose category is in ``keep`` (all records when ``keep`` is None)."""
    keep = None if keep is None else set(keep)
    return [r for r in records if keep is None or r["category"] in keep]


def _values(records: Iterable[dict], field: str) -> list[float]:
    return [float(r[field]) for r in records if r.get(field) is not None]


def box_by_category(records: Sequence[dict], fields: Sequence[str], title: str = "") -> Any:
    """Box-and-whisker per category, one panel per field (missing values are left out). A
    panel with no value at all says so, and why for the thinking fields.

    Examples:
        >>> fig = box_by_category(sl.load_results("logs/run"), ["avg_entropy", "avg_top_k_mass"])
        >>> len(fig.data)  # a box per category and field; fig.show() draws it
        2
    """
    import plotly.colors  # deferred: plotly
    from plotly.subplots import make_subplots  # deferred: plotly

    fig = make_subplots(rows=1, cols=len(fields), subplot_titles=list(fields))
    palette = plotly.colors.qualitative.Plotly
    for i, cat in enumerate(categories(records)):
        rows = [r for r in records if r["category"] == cat]
        # the legend entry goes on the first panel with values: plotly hides an empty box
        # trace, legend entry and all
        shown = next((f for f in fields if _values(rows, f)), None)
        for col, field in enumerate(fields, start=1):
            fig.add_box(y=_values(rows, field), name=cat, legendgroup=cat,
                        showlegend=field == shown, marker_color=palette[i % len(palette)],
                        boxmean=True, row=1, col=col)
    for col, field in enumerate(fields, start=1):
        if not _values(records, field):
            why = (" (no reply had a thinking section: the model's chat template has no "
                   "thinking mode, or thinking was off)" if "think" in field else "")
            axis = "" if col == 1 else str(col)
            # plotly does not wrap annotations (a set width clips them): lines of at most
            # ~200 px of 11 px text per panel of three
            text = "<br>".join(textwrap.wrap(f"no {field} values{why}", 96 // len(fields)))
            fig.add_annotation(text=text, showarrow=False, xref=f"x{axis} domain",
                               yref=f"y{axis} domain", x=0.5, y=0.5, font_size=11)
    fig.update_layout(title=title, boxmode="group", height=420)
    return fig


def summary_figures(records: Sequence[dict]) -> dict[str, Any]:
    """The viewer's three figures: entropy, top-k mass and ``think_end_position`` by category.

    Examples:
        >>> figures = summary_figures(sl.load_results("logs/run"))
        >>> sorted(figures)
        ['entropy', 'think_end_position', 'top_k_mass']
    """
    return {
        "entropy": box_by_category(records, ENTROPY_FIELDS, "Entropy (nats) by category"),
        "top_k_mass": box_by_category(records, TOP_K_FIELDS, "Top-k probability mass"),
        "think_end_position": box_by_category(records, THINK_FIELDS, "Thinking tokens"),
    }


def summary_stats(records: Sequence[dict], fields: Sequence[str] = METRIC_FIELDS) -> list[dict]:
    """Count, mean, std, median, min and max of each field per category.

    Examples:
        >>> summary_stats(sl.load_results("logs/run"), ["avg_entropy"])[0]
        {'category': 'assistant', 'field': 'avg_entropy', 'n': 1, 'mean': ...}
    """
    out = []
    for cat in categories(records):
        rows = [r for r in records if r["category"] == cat]
        for field in fields:
            v = np.asarray(_values(rows, field))
            stats = (dict(mean=v.mean(), std=v.std(), median=np.median(v), min=v.min(),
                          max=v.max()) if len(v) else dict.fromkeys(
                              ("mean", "std", "median", "min", "max")))
            out.append({"category": cat, "field": field, "n": int(len(v)),
                        **{k: None if x is None else float(x) for k, x in stats.items()}})
    return out


def lens_heatmap(values: Any, tokens: Sequence[str] | None = None,
                 title: str = "Logit-lens entropy (nats)") -> Any:
    """Layer x token heatmap of a per-token lens metric ``[n_tokens, n_layers]``.

    Examples:
        >>> from steerlab.inference import read_per_token
        >>> a = read_per_token("logs/run", 0)
        >>> tokens = model.tokenizer.convert_ids_to_tokens(a["tokens"])
        >>> fig = lens_heatmap(a["lens_entropy"], tokens)
        >>> fig.data[0].z.shape == a["lens_entropy"].T.shape  # [layer, token]
        True
    """
    import plotly.graph_objects as go  # deferred: plotly

    z = np.asarray(values, dtype=float).T  # [layer, token]
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)] if tokens is not None else None
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=list(range(z.shape[0])), colorscale="Viridis",
                               colorbar=dict(title="nats")))
    fig.update_layout(title=title, xaxis_title="generated token", yaxis_title="layer",
                      height=max(300, 14 * z.shape[0] + 120))
    return fig


def steering_figure(ev: Any) -> Any:
    """Plotly figure of a :class:`steerlab.evaluation.evaluate.SteeringEval`: coherent trait,
    raw trait and coherence against strength, one line per layer group (one colour per group in
    every panel), with the unsteered and prompted references, the coherence floor and the
    controls at the chosen setting.

    Examples:
        >>> fig = steering_figure(ev)  # ev from evaluate_steering; fig.show() draws it
    """
    import plotly.graph_objects as go  # deferred: plotly
    from plotly.colors import qualitative  # deferred: plotly
    from plotly.subplots import make_subplots  # deferred: plotly

    keys = (("coherent_trait", "coherent trait score"), ("trait", "trait score (all)"),
            ("coherence", "coherence"))
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in keys])
    palette = qualitative.Plotly
    labels = list(dict.fromkeys(s.label for s in ev.sweep))
    for i, label in enumerate(labels):
        pts = sorted((s for s in ev.sweep if s.label == label), key=lambda s: s.alpha)
        colour = palette[i % len(palette)]
        for col, (key, _) in enumerate(keys, 1):
            # markers too: left alone they take the colourway's colour of the trace's index,
            # so panels 2 and 3 would not match the legend
            fig.add_trace(go.Scatter(x=[s.alpha for s in pts], y=[getattr(s, key)
                                     for s in pts], mode="lines+markers",
                                     name=f"layer {label}", legendgroup=label,
                                     line_color=colour, marker_color=colour,
                                     showlegend=col == 1), row=1, col=col)
    # reference labels at opposite ends (and sides) of their lines, so they never overlap
    # however close the two values are
    for col, (key, _) in enumerate(keys, 1):
        for s, name, dash, where in ((ev.unsteered, "unsteered", "dot", "bottom left"),
                                     (ev.prompted, "prompted", "dash", "top right")):
            fig.add_hline(y=getattr(s, key), line_dash=dash, annotation_text=name,
                          annotation_position=where, row=1, col=col)
    fig.add_hline(y=ev.floor, line_dash="dot", line_color="red",
                  annotation_text="min coherence", annotation_position="bottom right",
                  row=1, col=3)
    # the controls in greys: left to the colourway (by trace index) they take a layer
    # group's colour once there are three groups or more
    for control, name, symbol, colour in ((ev.random, "random", "x", "#222222"),
                                          (ev.shuffled, "shuffled", "cross", "#888888")):
        if control is not None:
            fig.add_trace(go.Scatter(x=[control.alpha], y=[control.coherent_trait],
                                     mode="markers", marker_symbol=symbol, marker_size=10,
                                     marker_color=colour, name=f"{name} vector"), row=1, col=1)
    unit = "fraction of the residual norm" if ev.units == "norm" else "x vector"
    fig.update_xaxes(title_text=f"alpha ({unit})", type="log" if ev.units == "norm" else "linear")
    return fig
