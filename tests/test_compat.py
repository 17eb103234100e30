"""The KV-cache shim for transformers >= 5.24, and ``steerlab doctor`` that checks it end to end."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os

import pytest
from typer.testing import CliRunner

from steerlab.base.compat import (
    SHIM_ENV,
    cache_keyword,
    ensure_bridge_reads_cache,
    kv_cache_filled,
)
from steerlab.cli import app
from steerlab.doctor import PACKAGES, self_check
from steerlab.model.templates import encode_chat


@contextlib.contextmanager
def without_shim():
    """TransformerLens's own ``_update_kv_cache`` for a while: what users had before the fix."""
    old = os.environ.get(SHIM_ENV)
    os.environ[SHIM_ENV] = "0"
    try:
        assert ensure_bridge_reads_cache() is False
        yield
    finally:
        if old is None:
            del os.environ[SHIM_ENV]
        else:
            os.environ[SHIM_ENV] = old
        ensure_bridge_reads_cache()


def test_shim_is_idempotent_and_keeps_the_old_keyword(tiny_model, tokenizer):
    first, second = ensure_bridge_reads_cache(), ensure_bridge_reads_cache()
    assert first == second
    assert kv_cache_filled(tiny_model, encode_chat(tokenizer, "Hi"))


def test_without_the_shim_the_cache_stays_empty_where_transformers_passes_cache(tiny_model,
                                                                                tokenizer):
    """Proves the shim is what fixes transformers >= 5.24, and that the check catches it."""
    if cache_keyword(tiny_model.original_model) != "cache":
        pytest.skip("this transformers passes past_key_values: the shim has nothing to fix")
    with without_shim():
        assert not kv_cache_filled(tiny_model, encode_chat(tokenizer, "Hi"))
    assert kv_cache_filled(tiny_model, encode_chat(tokenizer, "Hi"))


@pytest.mark.slow
def test_doctor_prints_the_stack_and_passes_its_self_check():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for name in ("torch", "transformers", "transformer-lens"):
        assert f"{name} " in result.output
        assert importlib.metadata.version(name) in result.output
    assert "self-check sdpa   ok" in result.output
    assert "self-check eager  ok" in result.output


@pytest.mark.slow
def test_doctor_json_without_check_is_quick_and_parseable():
    result = CliRunner().invoke(app, ["doctor", "--no-check", "--json"])
    assert result.exit_code == 0, result.output
    env = json.loads(result.output)
    assert set(env["packages"]) == set(PACKAGES) and "self_check" not in env
    assert env["packages"]["transformers"] == importlib.metadata.version("transformers")


@pytest.mark.slow
def test_self_check_fails_without_the_shim_where_transformers_passes_cache(embedded_model):
    if cache_keyword(embedded_model.original_model) != "cache":
        pytest.skip("this transformers passes past_key_values: the shim has nothing to fix")
    with without_shim():
        broken = self_check("eager")  # the bridge's own attention: the path the shim fixes
        result = CliRunner().invoke(app, ["doctor"])
    assert not broken.cache_filled and not broken.matches_reference and not broken.ok
    assert result.exit_code == 1 and "FAILED" in result.output

