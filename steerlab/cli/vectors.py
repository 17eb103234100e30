"""``steerlab vectors fit|eval|export-gguf``: fit steering vectors, evaluate them, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import TRAIT_HELP, app
from steerlab.cli._model import model_flags
from steerlab.cli._parse import number_list
from steerlab.errors import SteerlabError
from steerlab.placement import ModelOptions

sub = typer.Typer(help="Fit, evaluate and export steering vectors.", no_args_is_help=True)
app.add_typer(sub, name="vectors")


@sub.command("fit")
def fit(
    activations: Annotated[Path, typer.Argument(help="HDF5 file from `steerlab extract`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Vector path (stem).")],
    method: str = typer.Option("mean-diff", help="mean-diff, pca or probe."),
    layers: str = typer.Option("", help="Comma-separated subset of the captured layers."),
    mean: bool = typer.Option(False, help="Fit on response means, not the divergence point."),
    normalise: bool = typer.Option(False, help="Unit norm per layer."),
) -> None:
    """Fit a steering vector from captured activations (probe: prints held-out accuracy)."""
    from steerlab.fitters import fit_vector

    vec, result = fit_vector(activations, method, layers=number_list(layers, int, "layers") or None,
                             mean=mean)
    if normalise:
        vec = vec.normalise()
    path = vec.save(output)
    if result.accuracy is not None:
        for layer, acc in zip(vec.layers, result.accuracy.tolist(), strict=True):
            typer.echo(f"layer {layer}: held-out accuracy {acc:.3f}")
    typer.echo(f"wrote {path} ({result.n_pairs} pairs, {len(vec.layers)} layers)")


@sub.command("eval")
@model_flags
def evaluate(
    model: ModelOptions,
    vector: Annotated[Path, typer.Argument(help="Vector (.safetensors or stem).")],
    trait: str = typer.Option("pirate", help=TRAIT_HELP),
    layers: str = typer.Option("", help="Layers to sweep (default: the vector's)."),
    strengths: str = typer.Option("1,2,4,6", help="Strengths (x the vector) to sweep."),
    max_tokens: int = typer.Option(40, help="New tokens per answer."),
    output: str = typer.Option("steering-eval", help="Writes <output>.json and .html."),
) -> None:
    """Sweep layers x strengths on the trait's held-out questions and pick the best setting
    (highest trait score of coherent answers with coherence >= 0.8 x unsteered)."""
    from steerlab.evaluate import evaluate_steering
    from steerlab.traits import load_trait
    from steerlab.vectors import SteeringVector
    from steerlab.viz import steering_figure

    vec = SteeringVector.load(vector)
    t = load_trait(trait)
    questions = list(getattr(t, "held_out_questions", None) or [])
    if not questions:
        raise SteerlabError("the trait has no held-out questions", source=trait,
                            field="held_out_questions")
    bridge = model.load()
    ev = evaluate_steering(bridge, vec, questions, t.build_scorer(),
                           trait_instruction=t.trait_instruction,
                           layers=number_list(layers, int, "layers") or list(vec.layers),
                           strengths=number_list(strengths, float, "strengths"),
                           max_new_tokens=max_tokens)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    ev.save(out.with_name(out.name + ".json"))
    steering_figure(ev).write_html(out.with_name(out.name + ".html"))
    for s in ev.sweep:
        typer.echo(f"layer {s.layer:3d} alpha {s.alpha:6.2f}  trait {s.trait:5.1f}  "
                   f"coherent trait {s.coherent_trait:5.1f}  coherence {s.coherence:.2f}")
    b = ev.best
    typer.echo(f"best: layer {b.layer}, alpha {b.alpha} (closes {ev.gap_closed(b):.0%} of the "
               f"gap; random vector {ev.gap_closed(ev.random):.0%})")


@sub.command("export-gguf")
def export_gguf(
    vector: Annotated[Path, typer.Argument(help="Vector (.safetensors or stem).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file.")],
    model_hint: str = typer.Option("", help="controlvector.model_hint (default: model id)."),
) -> None:
    """Export a vector as a llama.cpp control vector (use with --control-vector)."""
    from steerlab.vectors import SteeringVector, read_gguf

    path = SteeringVector.load(vector).to_gguf(output, model_hint or None)
    typer.echo(f"wrote {path} ({len(read_gguf(path))} layers)")
