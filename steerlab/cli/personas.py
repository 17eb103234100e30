"""``steerlab personas map|drift``: where personae sit in the residual stream, and how a
conversation moves along an axis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import app
from steerlab.cli._parse import number_list

sub = typer.Typer(help="Persona space: map a run's personae, measure drift along an axis.",
                  no_args_is_help=True)
app.add_typer(sub, name="personas")

AXIS = "assistant_axis"


@sub.command("map")
def map_command(
    run: Annotated[Path, typer.Argument(help="A finished `steerlab infer --capture-layers` "
                                        "run folder.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for persona_space.json, assistant_axis.safetensors "
        "(+ .json) and persona_space.html (default: RUN/persona-space).")] = None,
    assistant: str = typer.Option("assistant", help="The category (personae.json) whose "
                                  "personae are the default assistant."),
    section: str = typer.Option("reply", help="Average activations over the 'reply', its "
                                "'thinking' or its 'output'."),
    layers: str = typer.Option("", help="A subset of the captured layers (e.g. 8,12; default "
                               "all)."),
    n_boot: int = typer.Option(2000, help="Bootstrap resamples of the intervals."),
    seed: int = typer.Option(0, help="Seeds the bootstrap."),
) -> None:
    """Map a run's personae: per-persona means, PCA per layer, the assistant axis (saved as a
    steering vector whose reference is the assistant's own projections, so `cap` bounds may be
    percentiles such as 25%), projections with intervals, and their correlation with entropy
    and top-k mass. Needs no model."""
    from steerlab.base.checks import output_dir
    from steerlab.base.files import write_json_atomic
    from steerlab.inference.geometry import persona_space
    from steerlab.inference.report import write_persona_space_page
    from steerlab.inference.results import run_files
    from steerlab.inference.runs import check_finished

    check_finished(run)
    out = output_dir(output or run / "persona-space", "output",
                     inputs={"run": run_files(run)})
    chosen = number_list(layers, int, "layers") or None
    space = persona_space(run, assistant=assistant, section=section, layers=chosen,
                          n_boot=n_boot, seed=seed)
    axis = space.axis_vector()  # everything computed before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "persona_space.json", space.summary(), allow_nan=False)
    axis.save(out / AXIS)
    write_persona_space_page(space, out / "persona_space.html")
    for i, layer in enumerate(space.layers):
        typer.echo(f"layer {layer}: PC1 explains {space.explained[i, 0]:.0%}, cosine with the "
                   f"assistant axis {space.pc1_cosine[i]:+.2f}")
    typer.echo(f"wrote {out} (persona_space.json, {AXIS}.safetensors, persona_space.html)")
