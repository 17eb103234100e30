"""``steerlab doctor``: versions, devices and a self-check to paste into bug reports."""

from __future__ import annotations

import json
import sys

import typer

from steerlab.cli._app import app


@app.command()
def doctor(
    check: bool = typer.Option(True, help="Run the self-check (embedded model, a few seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Versions, devices and a self-check against plain HF generate (exit 1 if it fails).

    Prints steerlab, torch, transformers and transformer-lens versions and the devices, then
    checks that the embedded model's greedy reply equals plain HF generate on the same weights
    and that the KV cache fills after the prefill. Paste the output into bug reports.
    """
    from transformers.utils import logging as hf_logging

    from steerlab.doctor import environment, self_check

    hf_logging.disable_progress_bar()
    env = environment()
    result = self_check() if check else None
    if as_json:
        if result is not None:
            env["self_check"] = {"ok": result.ok, "cache_filled": result.cache_filled,
                                 "matches_reference": result.matches_reference,
                                 "seconds": round(result.seconds, 2)}
        typer.echo(json.dumps(env, indent=2))
    else:
        rows = {"python": f"{env['python']} ({env['platform']})", **env["packages"],
                "devices": "; ".join(env["devices"]),
                "kv-cache shim": "on (the bridge also reads `cache`, see docs/compatibility.md)"
                if env["kv_cache_shim"] else "not needed"}
        for name, value in rows.items():
            typer.echo(f"{name:<18}{value}")
        if result is not None:
            verdict = "ok" if result.ok else "FAILED"
            typer.echo(f"{'self-check':<18}{verdict} in {result.seconds:.1f} s:"
                       f" KV cache {'filled' if result.cache_filled else 'EMPTY after prefill'},"
                       f" greedy reply {'equals' if result.matches_reference else 'DIFFERS FROM'}"
                       f" plain HF generate")
            typer.echo(f"{'':<18}reply: {result.reply!r}")
    if result is not None and not result.ok:
        sys.exit(1)
