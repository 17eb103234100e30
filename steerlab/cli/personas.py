"""``steerlab personas map|drift``: where personae sit in the residual stream, and how a
conversation moves along an axis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import app
from steerlab.cli._model import ENGINE_HELP, check_engine, check_vector_file, model_flags
from steerlab.cli._parse import number_list
from steerlab.model.loading import load_from_options
from steerlab.model.options import ModelOptions

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


@sub.command("drift")
@model_flags
def drift_command(
    model: ModelOptions,
    axis: Annotated[Path, typer.Option(help="The vector to follow (e.g. assistant_axis of "
                                       "`steerlab personas map`).")],
    conversations: Annotated[Path, typer.Option(help="A JSON list of conversations, each a "
                                                "list of user turns (or {\"turns\": [...]}).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The drift JSON file.")],
    layer: int | None = typer.Option(None, help="Where the axis is read (default: its "
                                     "middle layer)."),
    cap: str | None = typer.Option(None, help="Cap the projection on the axis at its layers: a "
                                   "floor such as 25% (a percentile of its reference "
                                   "projections) or a number in norm units, or LO:HI."),
    persona: str = typer.Option("assistant", help="Who answers (relabels the assistant turn)."),
    system: str | None = typer.Option(None, help="System prompt text (default: 'You are "
                                      "PERSONA.')."),
    max_tokens: int = typer.Option(64, help="New tokens per reply (greedy)."),
    batch_size: int = typer.Option(16, help="Conversations generated together."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Run scripted conversations turn by turn and record each reply's mean projection on an
    axis (after the interventions and before them), optionally capped: the drift curve."""
    from steerlab.base.checks import integer, output_file
    from steerlab.base.files import write_json_atomic
    from steerlab.chat.drift import conversation_drift, load_conversations
    from steerlab.model.personas import ASSISTANT, Persona, persona_name, system_prompt_text
    from steerlab.steering.intervention import Steering
    from steerlab.steering.operators import bounds_from_text
    from steerlab.steering.vector import vector_paths

    convs = load_conversations(conversations)
    followed = check_vector_file(model, str(axis), [] if layer is None else [layer])
    bounds = None if cap is None else bounds_from_text(cap, "cap")  # a lone value is a floor
    name = persona_name(persona, "persona")
    if system is not None:
        system_prompt_text(system, "system")
    integer(max_tokens, "max_tokens", lo=1)
    integer(batch_size, "batch_size", lo=1)
    engine = check_engine(engine)
    output_file(output, "output", inputs={"axis": vector_paths(axis),
                                          "conversations": conversations,
                                          "model": model.local_files()})
    bridge = load_from_options(model)
    capped = () if bounds is None else (
        Steering.create(bridge, followed, op="cap", bounds=bounds),)
    who = ASSISTANT if name == "assistant" else Persona(name, "custom", "")
    drift = conversation_drift(bridge, convs, followed, layer=layer, persona=who,
                               system=system, interventions=capped, max_tokens=max_tokens,
                               batch_size=batch_size, engine=engine, progress=progress)
    write_json_atomic(output, {**drift.to_dict(convs), "axis": str(axis), "cap": cap},
                      allow_nan=False)
    for t, value in enumerate(drift.per_turn()):
        typer.echo(f"turn {t + 1}: mean projection {value:+.3f}")
    typer.echo(f"wrote {output}")
