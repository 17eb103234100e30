"""Figures and standalone HTML pages of runs, persona spaces and steering sweeps."""

from steerlab.reporting.figures import (
    box_by_category,
    categories,
    filter_records,
    lens_heatmap,
    steering_figure,
    summary_figures,
    summary_stats,
)
from steerlab.reporting.pages import html_table, write_page
from steerlab.reporting.persona_figures import persona_space_figures

__all__ = [
    "box_by_category", "categories", "filter_records", "html_table", "lens_heatmap",
    "persona_space_figures", "steering_figure", "summary_figures", "summary_stats",
    "write_page",
]
