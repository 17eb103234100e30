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
    checks, with sdpa and with eager attention, that the embedded model's greedy reply equals
    plain HF generate on the same weights and that the KV cache fills after the prefill. On a
    CUDA machine it then runs the static engine against the eager one on each GPU (tokens,
    metrics, a strength and a persona change between calls, a finished row refilled) and
    records a pass in the cache folder: from then on engine auto picks static on that GPU for
    these versions. Paste the output into bug reports.
    """
    from transformers.utils import logging as hf_logging

    from steerlab.doctor import environment, self_check, static_checks

    hf_logging.disable_progress_bar()
    env = environment()
    results = [self_check(attn) for attn in ("sdpa", "eager")] if check else []
    statics = static_checks() if check else []
    if as_json:
        if results:
            env["self_check"] = {r.attn_implementation: {
                "ok": r.ok, "cache_filled": r.cache_filled,
                "matches_reference": r.matches_reference, "seconds": round(r.seconds, 2)}
                for r in results}
            env["static_engine"] = [{"device": r.device, "dtype": r.dtype, "ok": r.ok,
                                     "summary": r.summary(), "recorded": path}
                                    for r, path in statics]
        typer.echo(json.dumps(env, indent=2))
    else:
        rows = {"python": f"{env['python']} ({env['platform']})", **env["packages"],
                "devices": "; ".join(env["devices"]),
                "kv-cache shim": "on (the bridge also reads `cache`, see docs/compatibility.md)"
                if env["kv_cache_shim"] else "not needed"}
        for name, value in rows.items():
            typer.echo(f"{name:<18}{value}")
        for result in results:
            verdict = "ok" if result.ok else "FAILED"
            typer.echo(f"{'self-check ' + result.attn_implementation:<18}{verdict} in "
                       f"{result.seconds:.1f} s:"
                       f" KV cache {'filled' if result.cache_filled else 'EMPTY after prefill'},"
                       f" greedy reply {'equals' if result.matches_reference else 'DIFFERS FROM'}"
                       f" plain HF generate")
            typer.echo(f"{'':<18}reply: {result.reply!r}")
        for result, path in statics:
            then = f"engine auto uses it there (recorded in {path})" if path else \
                "engine auto stays eager there"
            typer.echo(f"{'static ' + result.dtype:<18}{'ok' if result.ok else 'FAILED'} in "
                       f"{result.seconds:.1f} s: {result.summary()}; {then}")
    if not all(r.ok for r in results) or not all(r.ok for r, _ in statics):
        sys.exit(1)
