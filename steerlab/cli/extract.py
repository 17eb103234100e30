"""``steerlab extract`` and ``steerlab merge``: divergence-point activations into HDF5."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from steerlab.base.errors import SteerlabError
from steerlab.cli._app import app
from steerlab.cli._model import model_flags
from steerlab.model.loading import load_from_options, model_geometry

log = logging.getLogger("steerlab.extraction.extractor")


def _log_to(path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))


@app.command()
@model_flags(overrides=True)
def extract(
    model: dict,
    config: Annotated[Path, typer.Option("--config", "-c", help="extract.yaml of the study.")],
    shard: str | None = typer.Option(
        None, help="Capture shard i/n only (default: SLURM array vars)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Capture divergence-point activations of a pairs file into HDF5 (resumable).

    The model flags, where given, override the config's model keys."""
    from steerlab.base.checks import output_file
    from steerlab.base.shards import parse_shard
    from steerlab.extraction.extractor import check_output, load_config
    from steerlab.extraction.extractor import extract as run
    from steerlab.extraction.store import activation_files
    from steerlab.model.hooks import check_layers
    from steerlab.model.personas import system_prompt_style
    from steerlab.traits.pairs import load_pairs

    # everything is checked before the model loads and before anything is written
    cfg = load_config(config, overrides=model)
    part = parse_shard(shard)
    style = system_prompt_style(cfg.system_prompt)
    pairs = load_pairs(cfg.pairs)
    geometry = model_geometry(cfg.model.model)
    try:
        inputs = {"config": config, "pairs": cfg.pairs, "model": cfg.model.local_files()}
        target = check_output(cfg.output, part, inputs)
        if cfg.log_file is not None:  # appended to: no input, nor the output, is a log
            output_file(cfg.log_file, "log_file",
                        inputs={**inputs, "output": activation_files(target)})
        if cfg.layers is not None and geometry:
            check_layers(geometry["n_layers"], list(cfg.layers))
    except SteerlabError as err:
        raise SteerlabError(str(err), source=str(config)) from None
    _log_to(cfg.log_file)
    log.info("config %s: %d pairs from %s, shard %d/%d", config, len(pairs), cfg.pairs, *part)
    bridge = load_from_options(cfg.model)
    try:
        layers = None if cfg.layers is None else check_layers(bridge, list(cfg.layers))
    except SteerlabError as err:
        raise SteerlabError(str(err), source=str(config)) from None
    out = run(bridge, pairs, cfg.output, layers=layers, hook=cfg.hook,
              mean="mean" in cfg.positions, batch_size=cfg.batch_size,
              flush_every=cfg.flush_every, shard=part, system_prompt=style,
              pairs_file=str(cfg.pairs), progress=progress)
    typer.echo(f"wrote {out}")


@app.command()
def merge(
    shards: Annotated[
        list[Path] | None,
        typer.Argument(help="Shard files in order (default: from the config), or the run "
                       "folder of a sharded `steerlab infer`."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="extract.yaml whose shards to join."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Merged file (default: the config's)."),
    ] = None,
) -> None:
    """Join the shards of a sharded ``steerlab extract`` (files) or ``steerlab infer`` (RUN)."""
    from steerlab.base.checks import output_file
    from steerlab.extraction.extractor import load_config, merge_shards
    from steerlab.extraction.store import activation_files

    if shards and len(shards) == 1 and shards[0].is_dir():
        from steerlab.inference.runs import merge_run

        if config is not None or output is not None:
            raise SteerlabError("an inference run is merged in place; drop --config and "
                                "--output", source=str(shards[0]))
        typer.echo(f"wrote {merge_run(shards[0])}")
        return
    if config is not None:
        cfg = load_config(config)
        output = output or cfg.output
        if not shards:
            shards = sorted(cfg.output.parent.glob(f"{cfg.output.stem}.shard-*-of-*.h5"))
    if output is None:
        raise SteerlabError("give --output or --config", field="output")
    output_file(output, "output", inputs={
        "config": config, "shards": [p for s in shards or () for p in activation_files(s)]})
    out = merge_shards(shards or [], output)
    typer.echo(f"wrote {out}")
