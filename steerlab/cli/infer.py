"""``steerlab infer`` (batch persona inference) and ``steerlab report`` (static HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from steerlab.cli._app import app


@app.command()
def infer(
    prompts_json: Annotated[Path, typer.Option(help="Prompts: a JSON list of strings or of "
                                               "{\"prompt\": ...}.")],
    personae_json: Annotated[Path, typer.Option(help="Personae: a JSON list of "
                                                "{\"persona\", \"category\", \"article\"}.")],
    model: str = typer.Option("embedded", help="'embedded', a hub id or a local directory."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0: greedy)."),
    max_tokens: int = typer.Option(1024, help="Most new tokens per reply."),
    batch_size: int = typer.Option(256, help="Replies generated together."),
    n_reps: int = typer.Option(1, help="Repetitions of every (persona, prompt)."),
    top_k_mass_k: int = typer.Option(5, help="k of the top-k probability mass."),
    thinking_mode: bool = typer.Option(True, help="enable_thinking for templates that take it."),
    system_prompt_style: str = typer.Option(
        "you-are-a", help="'you-are-a', 'none', or a format string with {persona}."),
    output_dir: Annotated[Path | None, typer.Option(
        help="Run folder (default: logs/personae-inference-{SLURM_JOB_ID or timestamp}); "
        "rerun with the same folder to resume.")] = None,
    seed: int = typer.Option(0, help="Sampling seed (batch b uses seed + b)."),
    lens: bool = typer.Option(False, help="Also record logit-lens metrics at every layer."),
    dtype: str = typer.Option("float32", help="Weights dtype, e.g. bfloat16 on GPUs."),
    device: Annotated[str | None, typer.Option(help="Device (default: cuda, mps or cpu).")] = None,
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Generate every persona x prompt x rep and record entropy / top-k mass (resumable)."""
    from steerlab.infer import InferConfig, default_output_dir, load_prompts, run_inference
    from steerlab.models import load_model
    from steerlab.personas import load_personae

    # Everything is validated before the model loads and before the run folder exists.
    prompts = load_prompts(prompts_json)
    personae = load_personae(personae_json)
    config = InferConfig(model=model, temperature=temperature, max_tokens=max_tokens,
                         batch_size=batch_size, n_reps=n_reps, top_k_mass_k=top_k_mass_k,
                         thinking_mode=thinking_mode, system_prompt_style=system_prompt_style,
                         seed=seed, lens=lens).validate()
    output_dir = output_dir or default_output_dir()
    bridge = load_model(model, dtype=dtype, device=device)
    out = run_inference(bridge, prompts, personae, output_dir, config, progress=progress,
                        extra_config={"prompts_json": str(prompts_json),
                                      "personae_json": str(personae_json), "dtype": dtype})
    typer.echo(f"wrote {out}")


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A run folder of `steerlab infer`.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HTML file (default: RESULTS_DIR/report.html).")] = None,
) -> None:
    """Write a standalone HTML report (no kernel, no network) of an inference run."""
    from steerlab.report import run_tokenizer, write_report

    typer.echo(f"wrote {write_report(results_dir, output, tokenizer=run_tokenizer(results_dir))}")
