"""``steerlab infer`` (batch persona inference) and ``steerlab report`` (static HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import app
from steerlab.cli._model import ENGINE_HELP, check_engine, model_flags
from steerlab.cli._parse import number_list
from steerlab.model.loading import load_from_options, model_geometry
from steerlab.model.options import ModelOptions


@app.command()
@model_flags
def infer(
    model: ModelOptions,
    prompts_json: Annotated[Path, typer.Option(help="Prompts: a JSON list of strings or of "
                                               "{\"prompt\": ...}.")],
    personae_json: Annotated[Path, typer.Option(help="Personae: a JSON list of "
                                                "{\"persona\", \"category\", \"article\"}.")],
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    max_tokens: int = typer.Option(1024, help="Most new tokens per reply."),
    batch_size: int = typer.Option(256, help="Replies generated together."),
    n_reps: int = typer.Option(1, help="Repetitions of every (persona, prompt)."),
    top_k_mass_k: int = typer.Option(5, help="k of the top-k probability mass."),
    thinking_mode: bool = typer.Option(True, help="enable_thinking for templates that take it."),
    system_prompt_style: str = typer.Option(
        "you-are-a", help="'you-are-a', 'none', or a format string with {persona}."),
    output_dir: Annotated[Path | None, typer.Option(
        help="Run folder (default: logs/personae-inference-{SLURM_ARRAY_JOB_ID, SLURM_JOB_ID "
        "or timestamp}); rerun with the same folder to resume.")] = None,
    seed: int = typer.Option(0, help="Sampling seed (task t samples with seed + t)."),
    shard: Annotated[str | None, typer.Option(
        help="Run shard i/n (0-based) of the batches into the shared --output-dir (default: "
        "SLURM array variables), then `steerlab merge RUN`.")] = None,
    lens: bool = typer.Option(False, help="Also record logit-lens metrics at every layer."),
    capture_layers: str = typer.Option(
        "", help="Layers (e.g. 8,12,16; negative from the end) whose mean residual over each "
        "reply, its thinking and its output is written to activations.h5."),
    engine: str = typer.Option("auto", help=ENGINE_HELP + " Recorded in config.json; a "
                               "resume may use another."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Generate every persona x prompt x rep and record entropy / top-k mass (resumable)."""
    from steerlab.inference.infer import InferConfig, load_prompts, run_inference
    from steerlab.inference.runs import check_run_target
    from steerlab.model.personas import load_personae

    # Everything is validated before the model loads and before the run folder exists.
    prompts = load_prompts(prompts_json)
    personae = load_personae(personae_json)
    geometry = model_geometry(model.model)
    config = InferConfig(model=model.model, temperature=temperature, max_tokens=max_tokens,
                         batch_size=batch_size, n_reps=n_reps, top_k_mass_k=top_k_mass_k,
                         thinking_mode=thinking_mode, system_prompt_style=system_prompt_style,
                         seed=seed, lens=lens, engine=check_engine(engine),
                         capture_layers=tuple(number_list(capture_layers, int, "capture_layers")),
                         ).validate(vocab_size=geometry["vocab_size"] if geometry else None,
                                    n_layers=geometry["n_layers"] if geometry else None)
    part, output_dir = _run_folder(shard, output_dir)
    check_run_target(output_dir, part, inputs={"prompts_json": prompts_json,
                                                "personae_json": personae_json,
                                                "model": model.local_files()})
    bridge = load_from_options(model)
    out = run_inference(bridge, prompts, personae, output_dir, config, shard=part,
                        progress=progress,
                        extra_config={"prompts_json": str(prompts_json),
                                      "personae_json": str(personae_json),
                                      "model_options": model.to_dict()})
    if part[1] > 1:
        typer.echo(f"wrote shard {part[0]} of {part[1]} into {out}; once all shards are done: "
                   f"steerlab merge {out}")
    else:
        typer.echo(f"wrote {out}")


def _run_folder(shard: str | None, output_dir: Path | None) -> tuple[tuple[int, int], Path]:
    """The shard ``(i, n)`` and the run folder: shards of one run share it, so several shards
    need ``--output-dir`` (or a SLURM array job, whose id names the default folder)."""
    import os

    from steerlab.base.errors import SteerlabError
    from steerlab.base.shards import parse_shard
    from steerlab.inference.infer import default_output_dir

    part = parse_shard(shard)
    if part[1] > 1 and output_dir is None and "SLURM_ARRAY_JOB_ID" not in os.environ:
        raise SteerlabError("all shards must write one folder; give --output-dir",
                            field="output_dir")
    return part, output_dir or default_output_dir()


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A run folder of `steerlab infer`.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HTML file (default: RESULTS_DIR/report.html).")] = None,
) -> None:
    """Write a standalone HTML report (no kernel, no network) of an inference run."""
    from steerlab.inference.report import report_path, run_tokenizer, write_run_report

    report_path(results_dir, output)  # before the tokenizer loads: one line, no warning first
    written = write_run_report(results_dir, output, tokenizer=run_tokenizer(results_dir))
    typer.echo(f"wrote {written}")
