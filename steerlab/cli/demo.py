"""``steerlab demo``: the whole pipeline on the embedded model in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import TRAIT_HELP, app
from steerlab.cli._model import ENGINE_HELP, check_engine, model_flags
from steerlab.model.options import ModelOptions
from steerlab.traits.trait import DEFAULT_TRAIT


@app.command()
@model_flags
def demo(
    model: ModelOptions,
    output_dir: Annotated[Path, typer.Option(
        help="Run folder; rerun with the same folder to resume.")] = Path("logs/steerlab-demo"),
    trait: str = typer.Option(DEFAULT_TRAIT, help=TRAIT_HELP),
    quick: bool = typer.Option(False, help="A small run (~2 min) exercising every stage."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Trait pairs (several samples per question, collect, judge, filter), capture to HDF5,
    fit vectors, search the steering strength per layer with random and shuffled-label
    controls and a validation report, a small persona-entropy run; HTML report and summary."""
    from dataclasses import replace

    from rich.console import Console

    from steerlab.demo import DemoConfig, run_demo

    config = replace(DemoConfig.quick() if quick else DemoConfig(), model=model, trait=trait,
                     engine=check_engine(engine))
    summary = run_demo(output_dir, config, progress=progress)
    console = Console()
    console.rule(f"steerlab demo ({summary.seconds:.0f} s)")
    for line in summary.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
