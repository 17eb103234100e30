"""Plotly figures of a persona space (``steerlab.inference.geometry.PersonaSpace``): the
personae on their first two principal components, their projections on the assistant axis,
projection against entropy, and the explained variance and PC1-axis cosine per layer.

The space is read by attribute only (this layer does not import inference): ``personae``,
``categories``, ``assistant`` (optional, default ``"assistant"``), ``layers``,
``projections [persona, layer]``, ``intervals [persona, layer, 2]``, ``explained [layer,
k]``, ``scores [persona, layer, k]``, ``pc1_cosine [layer]``, ``metrics["avg_entropy"]
[persona]`` and ``correlations["avg_entropy"]`` (one ``Correlation(r, lo, hi, n)`` per
layer). Each category keeps one colour in every figure, the assistant category first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from steerlab.base.errors import SteerlabError

METRIC = "avg_entropy"  # the output metric the "entropy" figure sets against the projection
# the variance figure's lines (one per component) and the cosine: colours apart from the
# categories' (plotly's default palette), so no line reads as a category
_PC_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
               "#666666", "#17becf", "#8c564b")
_COSINE_COLOUR = "#222222"


def persona_space_figures(space: Any, layer: int | None = None) -> dict[str, Any]:
    """The four figures of a persona space at one captured layer (default the middle one).

    Args:
        space: a :class:`steerlab.inference.geometry.PersonaSpace` (or any object with the
            attributes this module's docstring lists).
        layer: a captured layer (default ``layers[len(layers) // 2]``); "variance" shows all.

    Returns:
        ``{"pc", "axis", "entropy", "variance"}``: PC1 x PC2 scatter, projections on the
        assistant axis with bootstrap intervals (sorted), projection vs ``avg_entropy`` with
        Pearson's r, explained variance and PC1-axis cosine per layer.

    Examples:
        >>> figures = persona_space_figures(sl.persona_space("logs/personas"))
        >>> sorted(figures)
        ['axis', 'entropy', 'pc', 'variance']
    """
    i = _layer_index(space, layer)
    colours = category_colours(space)
    return {"pc": _pc_figure(space, i, colours), "axis": _axis_figure(space, i, colours),
            "entropy": _entropy_figure(space, i, colours), "variance": _variance_figure(space)}


def category_colours(space: Any) -> dict[str, str]:
    """One colour per category: the assistant category first, then the others in first-seen
    order; plotly's default palette (as the run report's boxes), then Dark24's, so up to 34
    categories never share a colour."""
    from plotly.colors import qualitative  # deferred: plotly

    assistant = getattr(space, "assistant", "assistant")
    cats = list(dict.fromkeys(space.categories))
    cats.sort(key=lambda c: c != assistant)  # stable: the others keep their order
    palette = list(dict.fromkeys(c.lower() for c in qualitative.Plotly + qualitative.Dark24))
    return {c: palette[n % len(palette)] for n, c in enumerate(cats)}


def _layer_index(space: Any, layer: int | None) -> int:
    layers = list(space.layers)
    if layer is None:
        return len(layers) // 2
    if layer not in layers:
        raise SteerlabError(f"layer {layer} was not captured; the space has {layers}",
                            field="layer")
    return layers.index(layer)


def _members(space: Any, cat: str) -> np.ndarray:
    return np.array([c == cat for c in space.categories])


def _pc_figure(space: Any, i: int, colours: dict[str, str]) -> Any:
    import plotly.graph_objects as go  # deferred: plotly

    scores = np.asarray(space.scores, dtype=float)[:, i]
    explained = np.asarray(space.explained, dtype=float)[i]
    x = scores[:, 0]
    y = scores[:, 1] if scores.shape[1] > 1 else np.zeros(len(x))
    names = np.array(space.personae, dtype=object)
    fig = go.Figure()
    for cat, colour in colours.items():
        m = _members(space, cat)
        fig.add_trace(go.Scatter(
            x=x[m], y=y[m], mode="markers", name=cat, hovertext=list(names[m]),
            hovertemplate="%{hovertext}<br>PC1 %{x:.3g}<br>PC2 %{y:.3g}",
            marker=dict(color=colour, size=10)))
    pc2 = (f"PC2 ({100 * explained[1]:.1f}% of variance)" if len(explained) > 1
           else "PC2 (none: one persona dimension)")
    fig.update_layout(title=f"Persona space at layer {space.layers[i]}: PCA of persona means",
                      xaxis_title=f"PC1 ({100 * explained[0]:.1f}% of variance)",
                      yaxis_title=pc2, height=460, legend_title_text="category")
    return fig


def _axis_figure(space: Any, i: int, colours: dict[str, str]) -> Any:
    import plotly.graph_objects as go  # deferred: plotly

    proj = np.asarray(space.projections, dtype=float)[:, i]
    lo, hi = (np.asarray(space.intervals, dtype=float)[:, i, j] for j in (0, 1))
    order = np.argsort(proj, kind="stable")  # lowest at the bottom, the assistant end on top
    names = np.array(space.personae, dtype=object)
    fig = go.Figure()
    for cat, colour in colours.items():
        idx = [j for j in order if space.categories[j] == cat]
        fig.add_trace(go.Scatter(
            x=proj[idx], y=list(names[idx]), mode="markers", name=cat,
            hovertext=list(names[idx]), hovertemplate="%{hovertext}: %{x:.3g}",
            marker=dict(color=colour, size=10),
            error_x=dict(type="data", symmetric=False, array=hi[idx] - proj[idx],
                         arrayminus=proj[idx] - lo[idx], color=colour)))
    fig.update_yaxes(categoryorder="array", categoryarray=list(names[order]))
    fig.update_layout(title=f"Assistant-axis projection at layer {space.layers[i]} (95% "
                            "interval over prompts)",
                      xaxis_title="projection on the unit assistant axis",
                      yaxis_title="persona", legend_title_text="category",
                      legend_traceorder="normal", height=max(320, 22 * len(proj) + 160))
    return fig


def _entropy_figure(space: Any, i: int, colours: dict[str, str]) -> Any:
    import plotly.graph_objects as go  # deferred: plotly

    proj = np.asarray(space.projections, dtype=float)[:, i]
    metric = np.asarray(space.metrics[METRIC], dtype=float)
    names = np.array(space.personae, dtype=object)
    ok = np.isfinite(metric) & np.isfinite(proj)
    fig = go.Figure()
    for cat, colour in colours.items():
        m = _members(space, cat) & ok
        fig.add_trace(go.Scatter(
            x=proj[m], y=metric[m], mode="markers", name=cat, hovertext=list(names[m]),
            hovertemplate="%{hovertext}<br>projection %{x:.3g}<br>entropy %{y:.3g}",
            marker=dict(color=colour, size=10)))
    fig.update_layout(title=f"Projection vs mean entropy at layer {space.layers[i]}: "
                            + correlation_text(space.correlations[METRIC][i]),
                      xaxis_title="projection on the unit assistant axis",
                      yaxis_title="mean entropy per reply (nats)", height=460,
                      legend_title_text="category")
    return fig


def correlation_text(c: Any) -> str:
    """``"r = 0.62 [0.10, 0.91], n = 12"`` of a ``Correlation`` (its 95% bootstrap interval
    over personae), or why there is none."""
    if not math.isfinite(c.r):
        return f"Pearson r undefined (n = {c.n})"
    ci = f" [{c.lo:.2f}, {c.hi:.2f}]" if math.isfinite(c.lo) and math.isfinite(c.hi) else ""
    return f"Pearson r = {c.r:.2f}{ci}, n = {c.n}"


def _variance_figure(space: Any) -> Any:
    import plotly.graph_objects as go  # deferred: plotly
    from plotly.subplots import make_subplots  # deferred: plotly

    explained = np.asarray(space.explained, dtype=float)  # [layer, k]
    layers = list(space.layers)
    fig = make_subplots(rows=1, cols=2, subplot_titles=[
        "explained variance ratio", "cosine of PC1 with the assistant axis"])
    for k in range(explained.shape[1]):
        colour = _PC_COLOURS[k % len(_PC_COLOURS)]
        fig.add_trace(go.Scatter(x=layers, y=explained[:, k], mode="lines+markers",
                                 name=f"PC{k + 1}", line_color=colour, marker_color=colour),
                      row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=np.asarray(space.pc1_cosine, dtype=float),
                             mode="lines+markers", name="cos(PC1, axis)",
                             line_color=_COSINE_COLOUR, marker_color=_COSINE_COLOUR),
                  row=1, col=2)
    fig.update_xaxes(title_text="layer", tickvals=layers)
    fig.update_yaxes(title_text="fraction of variance", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="cosine", range=[-1.02, 1.02], row=1, col=2)
    fig.update_layout(title="Persona space per layer: explained variance and PC1-axis cosine",
                      height=420)
    return fig
