"""transformers' and huggingface_hub's bars and logs follow steerlab's --no-progress and -v."""

from __future__ import annotations

import json
import logging

import huggingface_hub.utils
import pytest
from conftest import run_cli
from transformers.utils import logging as hf_logging

from steerlab.base.progress import quiet_hf


@pytest.fixture
def hf_state():
    """Bars on and transformers' default verbosity before the test, and again after it."""
    hub = logging.getLogger("huggingface_hub")
    saved = hf_logging.get_verbosity(), hub.level
    hf_logging.enable_progress_bar()
    yield
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity(saved[0])
    hub.setLevel(saved[1])


def _levels() -> tuple[int, int]:
    return hf_logging.get_verbosity(), logging.getLogger("huggingface_hub").level


def test_quiet_hf_maps_the_level_and_turns_bars_off(hf_state):
    quiet_hf(True, logging.INFO)
    assert _levels() == (logging.ERROR, logging.ERROR)  # the default: their errors only
    assert hf_logging.is_progress_bar_enabled()
    assert not huggingface_hub.utils.are_progress_bars_disabled()
    quiet_hf(True, logging.DEBUG)
    assert _levels() == (logging.INFO, logging.INFO)  # --verbose: their info and warnings
    quiet_hf(False, logging.INFO)
    assert not hf_logging.is_progress_bar_enabled()
    assert huggingface_hub.utils.are_progress_bars_disabled()


def test_the_cli_maps_verbose_onto_transformers(hf_state, capsys):
    assert run_cli("traits", "list") == 0
    assert _levels() == (logging.ERROR, logging.ERROR)
    assert run_cli("-v", "traits", "list") == 0
    assert _levels() == (logging.INFO, logging.INFO)
    assert hf_logging.is_progress_bar_enabled()  # no command flag: bars left as they were


@pytest.mark.slow
def test_no_progress_hides_the_loading_weights_bar(hf_state, tmp_path, capfd):
    """`traits collect` loads the embedded model: its "Loading weights" bar shows by default
    and not with --no-progress."""
    trait = tmp_path / "t.json"
    trait.write_text(json.dumps({
        "name": "t", "trait_instruction": "x", "positive_instructions": ["Be x."],
        "negative_instructions": ["Be y."], "questions": ["Hi?"]}))
    args = ["traits", "collect", str(trait), "--max-tokens", "1", "--samples", "1",
            "--device", "cpu"]
    assert run_cli(*args, "--run-dir", str(tmp_path / "a")) == 0
    assert "Loading weights" in capfd.readouterr().err  # the bar this test is about exists
    assert run_cli(*args, "--run-dir", str(tmp_path / "b"), "--no-progress") == 0
    out, err = capfd.readouterr()
    assert "2 answers written" in out
    assert "Loading weights" not in err and "%|" not in err
