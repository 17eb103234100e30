"""``steerlab vectors fit|eval|export-gguf|bake``: fit steering vectors, evaluate them, export
them, bake them into checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.base.errors import SteerlabError
from steerlab.cli._app import TRAIT_HELP, app
from steerlab.cli._model import ENGINE_HELP, check_engine, model_flags
from steerlab.cli._parse import layer_groups, number_list
from steerlab.evaluation.calibrate import Search
from steerlab.evaluation.evaluate import EvalConfig
from steerlab.model.loading import load_from_options, model_geometry
from steerlab.model.options import ModelOptions
from steerlab.traits.trait import DEFAULT_TRAIT

SEARCH, EVAL = Search(), EvalConfig()  # the library's defaults are the flags' defaults

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
    from steerlab.base.checks import output_file
    from steerlab.extraction.fitters import fit_vector
    from steerlab.extraction.store import activation_files
    from steerlab.steering.vector import vector_paths

    for path in vector_paths(output):  # before the fit: a bad target loses no work
        output_file(path, "output", inputs={"activations": activation_files(activations)})
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
    trait: str = typer.Option(DEFAULT_TRAIT, help=TRAIT_HELP),
    layers: str = typer.Option("", help="Layer groups to try, comma-separated; '+' steers "
                               "layers together (e.g. 12,16,10+12+14) [default: every run of "
                               "three adjacent layers of the vector, a smaller push on each]."),
    strengths: str = typer.Option("", help="A fixed list of strengths to sweep instead of "
                                  "the automatic search."),
    units: str = typer.Option(str(EVAL.units), help="Strength units: norm (fraction of the layer's "
                              "residual norm, the same scale for every vector) or raw (x the "
                              "stored vector)."),
    positions: str = typer.Option("all", help="Steer all positions, generated tokens only, "
                                  "or output tokens (after </think>)."),
    preserve_norm: bool = typer.Option(False, help="Rescale steered residuals to their "
                                       "norm before steering."),
    start: float = typer.Option(SEARCH.start, help="Search: first strength per layer group."),
    max_alpha: float = typer.Option(SEARCH.max_alpha, help="Search: strongest strength tried."),
    refine: int = typer.Option(SEARCH.refine, help="Search: bisection steps once coherence "
                               "breaks."),
    budget: int = typer.Option(SEARCH.budget, help="Search: most generations in all (0: no "
                               "limit)."),
    activations: Annotated[Path | None, typer.Option(
        help="Activation file for the shuffled-label control [default: the one the vector "
        "was fitted from, when it exists].")] = None,
    max_tokens: int = typer.Option(EVAL.max_new_tokens, help="New tokens per answer."),
    engine: str = typer.Option("auto", help=ENGINE_HELP),
    output: str = typer.Option("steering-eval", help="Writes <output>.json, <output>.html "
                               "and the resumable <output>.points.jsonl."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Search the strength per layer group on the trait's held-out questions (raise it until
    coherence falls below 0.8 x unsteered, then refine), pick the best coherent setting, run
    a random and a shuffled-label control, and report with bootstrap intervals. Resumable."""
    from steerlab.base.checks import input_file, integer
    from steerlab.evaluation.evaluate import evaluate_steering
    from steerlab.extraction.store import activation_files
    from steerlab.steering.vector import vector_paths
    from steerlab.traits.trait import trait_file

    # everything is checked before the model loads, let alone the first generation
    vec = _model_vector(model, vector)
    integer(max_tokens, "max_tokens", lo=1)
    t, questions = _held_out(trait)
    scorer = t.build_scorer()
    config = EvalConfig(units=units, positions=positions, preserve_norm=preserve_norm,
                        search=Search(start, max_alpha=max_alpha, refine=refine, budget=budget),
                        max_new_tokens=max_tokens, engine=check_engine(engine))
    groups, fixed = _groups_and_strengths(vec, vector, layers, strengths)
    source = activations or (Path(vec.provenance.source) if vec.provenance.source else None)
    if activations is not None:
        input_file(activations, "activations", what="a steerlab activation file")
    out = Path(output)
    inputs = {"vector": vector_paths(vector), "trait": trait_file(trait),
              "activations": activation_files(source) if source else None,
              "model": model.local_files()}
    _check_eval_outputs(out, inputs)
    shuffled = _shuffled_control(vec, source)
    bridge = load_from_options(model)
    ev = evaluate_steering(bridge, vec, questions, scorer, trait_instruction=t.prompted_instruction,
                           layers=groups, strengths=fixed, config=config, shuffled=shuffled,
                           resume=out.with_name(out.name + ".points.jsonl"), progress=progress)
    _write_eval(ev, out, t.name)


def _model_vector(model: ModelOptions, vector: Path) -> Any:
    """The vector file, refused before the model loads when it is of another model."""
    from steerlab.steering.vector import SteeringVector

    vec = SteeringVector.load(vector)
    geometry = model_geometry(model.model)
    if geometry:  # a vector of another model is refused before this one loads
        vec.check_model(geometry["n_layers"], geometry["d_model"], source=str(vector))
    return vec


def _held_out(trait: str) -> tuple[Any, list[str]]:
    """The trait and its held-out questions (a trait without any is refused)."""
    from steerlab.traits.trait import load_trait

    t = load_trait(trait)
    questions = list(t.held_out_questions)
    if not questions:
        raise SteerlabError("the trait has no held-out questions", source=trait,
                            field="held_out_questions")
    return t, questions


def _groups_and_strengths(vec: Any, vector: Path, layers: str, strengths: str
                          ) -> tuple[list[tuple[int, ...]] | None, list[float] | None]:
    """The ``--layers`` groups (every layer one of the vector's) and the ``--strengths``
    (finite); ``None`` for a flag left empty."""
    from steerlab.base.checks import number

    groups = layer_groups(layers) or None
    for layer in sorted({x for g in groups or () for x in g} - set(vec.layers)):
        raise SteerlabError(f"got layer {layer}; the vector has layers {list(vec.layers)}",
                            source=str(vector), field="layers")
    fixed = number_list(strengths, float, "strengths") or None
    for x in fixed or ():
        number(x, "strengths")
    return groups, fixed


def _check_eval_outputs(out: Path, inputs: dict[str, Any]) -> None:
    """Refuse an ``--output`` whose files cannot be written, alias an input, or whose points
    file another evaluation holds."""
    from steerlab.base.checks import output_file
    from steerlab.base.files import check_unlocked
    from steerlab.evaluation.evaluate import POINTS_BUSY, points_lock

    for suffix in (".json", ".html", ".points.jsonl"):
        output_file(out.with_name(out.name + suffix), "output", inputs=inputs)
    points = out.with_name(out.name + ".points.jsonl")
    output_file(points, "output", inputs=inputs, owns=[points_lock(points)])
    check_unlocked(points_lock(points), POINTS_BUSY)


def _shuffled_control(vec: Any, source: Path | None) -> Any:
    """The shuffled-label control vector fitted from ``source``, or ``None`` (with a warning
    where the file cannot give one)."""
    from steerlab.extraction.fitters import shuffled_control

    if source is None or not source.is_file():
        return None
    try:
        return shuffled_control(vec, source)
    except SteerlabError as err:
        logging.getLogger(__name__).warning("no shuffled-label control: %s", err)
        return None


def _write_eval(ev: Any, out: Path, trait: str) -> None:
    """Write ``<output>.json`` and ``.html`` and print every setting and the report."""
    from steerlab.evaluation.verdict import write_validation

    report = write_validation(out, ev, trait=trait)
    for s in ev.sweep:
        typer.echo(f"layer {s.label:>9} alpha {s.alpha:7.3g}  trait {s.trait:5.1f}  "
                   f"coherent trait {s.coherent_trait:5.1f}  coherence {s.coherence:.2f}")
    for line in report.lines():
        typer.echo(line)


@sub.command("export-gguf")
def export_gguf(
    vector: Annotated[Path, typer.Argument(help="Vector (.safetensors or stem).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file.")],
    model_hint: str = typer.Option("", help="controlvector.model_hint [default: the model's "
                                   "architecture, e.g. llama]."),
) -> None:
    """Export a vector as a llama.cpp control vector (use with --control-vector): steerlab
    layer L is direction.L (llama.cpp steers the output of its layer L); layer 0 has no slot
    there and is left out. A control vector is added (steering's add); to ablate a direction,
    bake it into a checkpoint with `steerlab vectors bake --op ablate`."""
    from steerlab.base.checks import output_file
    from steerlab.steering.vector import SteeringVector, read_gguf, vector_paths

    vec = SteeringVector.load(vector)
    output_file(output, "output", inputs={"vector": vector_paths(vector)})
    path = vec.to_gguf(output, model_hint or None)
    typer.echo(f"wrote {path} ({len(read_gguf(path))} layers)")


@sub.command("bake")
def bake_command(
    vector: Annotated[Path, typer.Argument(help="Vector (.safetensors or stem).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="A new or empty folder for "
                                         "the checkpoint (written whole, or not at all).")],
    op: str = typer.Option("ablate", help="ablate: orthogonalise every write into the "
                           "residual stream against the direction (Arditi et al. 2024); add: "
                           "add alpha x the vector to the layer's output through its MLP "
                           "output bias (llama, gpt2, gpt_neox)."),
    layer: Annotated[int | None, typer.Option(help="The vector's layer to bake [default: its "
                                              "only layer; needed when it has several].")
                     ] = None,
    alpha: Annotated[float | None, typer.Option(help="--op add: the strength.")] = None,
    units: str = typer.Option("norm", help="--op add: norm (fraction of the layer's residual "
                              "norm) or raw (x the stored vector)."),
    model: str = typer.Option("embedded", help="The checkpoint to bake: 'embedded', a hub "
                              "id or a local directory."),
    dtype: str = typer.Option("float32", help="Weights dtype of the checkpoint: float32, "
                              "bfloat16 or float16 (edits are computed in float64)."),
) -> None:
    """Bake a vector into a Hugging Face checkpoint that plain transformers loads.

    Writes weights, config and tokenizer: the vector's direction ablated from every residual
    write, or the vector added at a layer; steerlab_bake.json and config.steerlab_bake record
    what was baked."""
    from steerlab.steering.baking import BAKE_FILE, bake

    path = bake(model, vector, output, op=op, layer=layer, alpha=alpha, units=units,
                dtype=dtype)
    typer.echo(f"wrote {path} ({op}; record in {path / BAKE_FILE})")
