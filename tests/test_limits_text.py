"""Limits on what goes in: text from files and flags, the context window, the memory.

* Text: a lone surrogate (JSON and YAML carry one as ``\\ud800``), a NUL or an over-long
  value in any field of a prompts, personae, pairs, trait or extract.yaml file (or a text
  flag) is refused when the file is read: exit code 2, one line naming the file and the field,
  the model never loaded, no output folder. A Hypothesis property runs the readers over
  arbitrary JSON files.
* Context: a rendered prompt plus its new tokens (a pair's sequence) longer than the model's
  positions is refused, naming the row, before a run folder or output exists.
* Memory: :func:`steerlab.generation.budget.batch_memory` against the real tensors of a tiny model
(the
  KV cache and the recorded metrics exactly; the peak of a prefill and of a decode step's
  logits from above, within 1.5x), and the split/refusal decision with an injected
  ``available`` number of bytes.
"""

from __future__ import annotations

import json
import tempfile
import weakref
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_tokens, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from steerlab.base.errors import SteerlabError
from steerlab.generation.budget import HEADROOM, batch_memory, context_length, rows_per_batch
from steerlab.model.personas import MAX_PERSONA_CHARS, MAX_SYSTEM_PROMPT_CHARS
from steerlab.model.templates import MAX_MESSAGE_CHARS

LONE, NUL = "\ud800", "\x00"
DATA = files("steerlab.builtin") / "data"
GOOD_PROMPTS, GOOD_PERSONAE = str(DATA / "prompts.json"), str(DATA / "personae.json")
FINE = {"persona": "Hamlet", "category": "fictional-character", "article": ""}
PAIR = {"prompt": "Hi", "chosen": "Ahoy!", "rejected": "Hello."}
TRAIT = {"name": "t", "trait_instruction": "Speak like a pirate.", "questions": ["Hi?"]}


def _refused(capsys, code: int, file: Path | None, field: str, fragment: str) -> str:
    """Exit 2 and one stderr line naming the file and the field; returns the line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    line = lines[0]
    assert file is None or str(file) in line, line
    assert f"field {field!r}" in line and fragment in line, line
    return line


# ------------------------------------------------------------------ text in files and flags

# (id, records, field named, fragment of the message); the good records around the bad one
# show that the field names the entry by index
PROMPT_ROWS = [
    ("surrogate", ["Hi", f"bad {LONE} prompt"], "prompts[1]", "lone surrogate (U+D800)"),
    ("nul-in-object", ["Hi", "Ho", {"prompt": f"a{NUL}b"}], "prompts[2].prompt", "NUL"),
    ("over-long", ["x" * (MAX_MESSAGE_CHARS + 1)], "prompts[0]", f"at most {MAX_MESSAGE_CHARS}"),
    ("blank", ["Hi", " \n"], "prompts[1]", "is empty"),
]
PERSONA_ROWS = [
    ("persona-surrogate", [FINE] * 3 + [{**FINE, "persona": f"Ham{LONE}let"}],
     "personae[3].persona", "lone surrogate"),
    ("persona-nul", [{**FINE, "persona": f"Ham{NUL}let"}], "personae[0].persona", "NUL"),
    ("persona-over-long", [{**FINE, "persona": "x" * (MAX_PERSONA_CHARS + 1)}],
     "personae[0].persona", f"at most {MAX_PERSONA_CHARS}"),
    ("persona-1mb", [{**FINE, "persona": "x" * 1_000_000}], "personae[0].persona",
     "1000000 characters"),
    ("persona-two-lines", [{**FINE, "persona": "Ham\nlet"}], "personae[0].persona", "one line"),
    ("category-surrogate", [FINE, {**FINE, "category": f"c{LONE}"}], "personae[1].category",
     "lone surrogate"),
    ("category-over-long", [{**FINE, "category": "c" * 257}], "personae[0].category",
     "at most 256"),
    ("article-nul", [{**FINE, "article": f"a{NUL}"}], "personae[0].article", "NUL"),
]


@pytest.mark.parametrize("rid, records, field, fragment", PROMPT_ROWS,
                         ids=[r[0] for r in PROMPT_ROWS])
def test_infer_refuses_bad_prompt_text(rid, records, field, fragment, tmp_path, tripwire,
                                       capsys):
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps(records))
    out = tmp_path / "run"
    code = run_cli("infer", "--prompts-json", str(bad), "--personae-json", GOOD_PERSONAE,
                   "--output-dir", str(out), "--no-progress")
    _refused(capsys, code, bad, field, fragment)
    assert not out.exists()


@pytest.mark.parametrize("rid, records, field, fragment", PERSONA_ROWS,
                         ids=[r[0] for r in PERSONA_ROWS])
def test_infer_refuses_bad_persona_text(rid, records, field, fragment, tmp_path, tripwire,
                                        capsys):
    bad = tmp_path / "personae.json"
    bad.write_text(json.dumps(records))
    out = tmp_path / "run"
    code = run_cli("infer", "--prompts-json", GOOD_PROMPTS, "--personae-json", str(bad),
                   "--output-dir", str(out), "--no-progress")
    line = _refused(capsys, code, bad, field, fragment)
    assert len(line) < 400  # the 1 MB name is not echoed
    assert not out.exists()


def _jsonl(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# (id, pairs file name, its text, the source the line names, field, fragment)
PAIRS_ROWS = [
    ("jsonl-prompt-surrogate", "p.jsonl", _jsonl(PAIR, {**PAIR, "prompt": f"Hi{LONE}"}),
     "p.jsonl:2", "prompt", "lone surrogate"),
    ("jsonl-chosen-nul", "p.jsonl", _jsonl({**PAIR, "chosen": f"A{NUL}hoy"}), "p.jsonl:1",
     "chosen", "NUL"),
    ("jsonl-rejected-over-long", "p.jsonl",
     _jsonl(PAIR, PAIR, {**PAIR, "rejected": "r" * (MAX_MESSAGE_CHARS + 1)}), "p.jsonl:3",
     "rejected", "characters long"),
    ("jsonl-id-surrogate", "p.jsonl", _jsonl({**PAIR, "id": f"a{LONE}"}), "p.jsonl:1", "id",
     "lone surrogate"),
    ("original-key-surrogate", "f.json",
     json.dumps({f"Hi{LONE}": {"pi_response": "a", "llama_response": "b"}}), "f.json",
     f"Hi{LONE}", "lone surrogate"),
    ("original-response-nul", "f.json",
     json.dumps({"Hi": {"pi_response": f"a{NUL}", "llama_response": "b"}}), "f.json",
     "Hi.pi_response", "NUL"),
]


def _config(w: Path, **changes) -> Path:
    cfg = {"pairs": str(w / "pairs.jsonl"), "output": str(w / "out" / "acts.h5"),
           "layers": [0], **changes}
    path = w / "extract.yaml"
    path.write_text(json.dumps(cfg))  # YAML reads JSON, escapes (\ud800, \u0000) included
    return path


@pytest.mark.parametrize("rid, name, text, source, field, fragment", PAIRS_ROWS,
                         ids=[r[0] for r in PAIRS_ROWS])
def test_extract_refuses_bad_pair_text(rid, name, text, source, field, fragment, tmp_path,
                                       tripwire, capsys):
    pairs = tmp_path / name
    pairs.write_text(text)
    code = run_cli("extract", "-c", str(_config(tmp_path, pairs=str(pairs))), "--no-progress")
    line = _refused(capsys, code, None, field, fragment)
    assert str(tmp_path / source) in line, line
    assert not (tmp_path / "out").exists()


CONFIG_ROWS = [
    ("system-prompt-surrogate", {"system_prompt": f"You are {{persona}}{LONE}"},
     "system_prompt", "lone surrogate"),
    ("system-prompt-over-long", {"system_prompt": "{persona}" + "s" * MAX_SYSTEM_PROMPT_CHARS},
     "system_prompt", f"at most {MAX_SYSTEM_PROMPT_CHARS}"),
    ("system-prompt-padded-field", {"system_prompt": "{persona:>999999999}"},
     "system_prompt", "not a plain field"),
    ("pairs-path-nul", {"pairs": f"pairs{NUL}.jsonl"}, "pairs", "NUL"),
    ("output-surrogate", {"output": f"out/a{LONE}.h5"}, "output", "lone surrogate"),
    ("model-surrogate", {"model": f"m{LONE}"}, "model", "lone surrogate"),
    ("device-map-key-nul", {"device_map": {f"model{NUL}": 0}}, f"device_map.model{NUL}", "NUL"),
]


@pytest.mark.parametrize("rid, changes, field, fragment", CONFIG_ROWS,
                         ids=[r[0] for r in CONFIG_ROWS])
def test_extract_refuses_bad_config_text(rid, changes, field, fragment, tmp_path, tripwire,
                                         capsys):
    (tmp_path / "pairs.jsonl").write_text(_jsonl(PAIR))
    config = _config(tmp_path, **changes)
    code = run_cli("extract", "-c", str(config), "--no-progress")
    _refused(capsys, code, config, field, fragment)
    assert not (tmp_path / "out").exists()


TRAIT_ROWS = [
    ("question-surrogate", {"questions": ["Hi?", f"Ho{LONE}?"]}, "questions[1]",
     "lone surrogate"),
    ("instruction-nul", {"positive_instructions": [f"Arr{NUL}"]}, "positive_instructions[0]",
     "NUL"),
    ("instruction-over-long", {"negative_instructions": ["n" * (MAX_SYSTEM_PROMPT_CHARS + 1)]},
     "negative_instructions[0]", f"at most {MAX_SYSTEM_PROMPT_CHARS}"),
    ("trait-instruction-surrogate", {"trait_instruction": f"x{LONE}"}, "trait_instruction",
     "lone surrogate"),
    ("name-over-long", {"name": "n" * 256}, "name", "at most 255"),
    ("rubric-nul", {"evaluation_prompt": f"{{answer}}{NUL}"}, "evaluation_prompt", "NUL"),
]


@pytest.mark.parametrize("rid, changes, field, fragment", TRAIT_ROWS,
                         ids=[r[0] for r in TRAIT_ROWS])
def test_trait_files_refuse_bad_text(rid, changes, field, fragment, tmp_path, tripwire,
                                     capsys):
    trait = tmp_path / "t.json"
    trait.write_text(json.dumps({**TRAIT, **changes}))
    out = tmp_path / "collect"
    code = run_cli("traits", "collect", str(trait), "--run-dir", str(out), "--no-progress")
    _refused(capsys, code, trait, field, fragment)
    assert not out.exists()


FLAG_ROWS = [
    ("infer-style-surrogate", ("infer", "--prompts-json", GOOD_PROMPTS, "--personae-json",
                               GOOD_PERSONAE, "--system-prompt-style", f"{{persona}}{LONE}"),
     "system_prompt_style", "lone surrogate"),
    ("chat-persona-over-long", ("chat", "--persona", "p" * (MAX_PERSONA_CHARS + 1)), "persona",
     f"at most {MAX_PERSONA_CHARS}"),
    ("chat-system-nul", ("chat", "--system", f"Be{NUL}"), "system", "NUL"),
    ("collect-persona-two-lines", ("traits", "collect", "pirate", "--chosen-persona", "a\nb"),
     "chosen_persona", "one line"),
    ("collect-system-over-long", ("traits", "collect", "pirate", "--rejected-system",
                                  "s" * (MAX_SYSTEM_PROMPT_CHARS + 1)), "rejected_system",
     "characters long"),
]


@pytest.mark.parametrize("rid, args, field, fragment", FLAG_ROWS, ids=[r[0] for r in FLAG_ROWS])
def test_text_flags_are_refused_before_the_model_loads(rid, args, field, fragment, tmp_path,
                                                       tripwire, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_cli(*args)
    _refused(capsys, code, None, field, fragment)
    assert list(tmp_path.iterdir()) == []


def test_counts():
    n = len(PROMPT_ROWS) + len(PERSONA_ROWS) + len(PAIRS_ROWS) + len(CONFIG_ROWS) + \
        len(TRAIT_ROWS) + len(FLAG_ROWS)
    print(f"\n{n} bad text inputs over 5 file kinds and the text flags")
    assert n >= 30


# ------------------------------------------------------------------ the readers, any JSON

_chars = st.one_of(st.characters(), st.sampled_from([LONE, "\udfff", NUL, "\n", " "]))
_plain = st.sampled_from(["Hamlet", "a pirate", "Hi?", "é 漢字 🙂"])
# plain names most of the time, so that many files are read, not only refused
_text = st.one_of(_plain, _plain, _plain, _plain, st.lists(_chars, max_size=12).map("".join),
                  st.sampled_from(["x" * (MAX_PERSONA_CHARS + 1), " ", "", f"Ham{LONE}let"]))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False) | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12)
_prompt = _text | st.fixed_dictionaries({"prompt": _text})
_prompts = _json | st.lists(_prompt, min_size=1, max_size=3) | \
    st.lists(_prompt | _json, max_size=5)
_persona = st.fixed_dictionaries({"persona": _text, "category": _text},
                                 optional={"article": _text})
_personae = _json | st.lists(_persona, min_size=1, max_size=3) | \
    st.lists(_persona | _json, max_size=5)
_pair = st.fixed_dictionaries({"prompt": _text, "chosen": _text, "rejected": _text},
                              optional={"id": _text | st.integers()})
_pairs = st.lists(_pair, min_size=1, max_size=3) | st.lists(_pair | _json, max_size=4)
SEEN = {"cases": 0, "read": 0, "refused": 0}


def test_readers_read_or_refuse_in_one_line():
    """Every generated prompts, personae and pairs file (arbitrary JSON, text with lone
    surrogates, NUL, line breaks, over-long names; written as JSON escapes or as raw bytes that
    are not UTF-8) is read into valid records or refused with one SteerlabError line (itself
    printable as UTF-8); no other exception escapes a reader."""
    _read_or_refuse()
    print(f"\n{SEEN['cases']} generated files: {SEEN['read']} read, {SEEN['refused']} refused")
    assert SEEN["read"] and SEEN["refused"]


@settings(max_examples=150, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(prompts=_prompts, personae=_personae, pairs=_pairs, ascii_only=st.booleans())
def _read_or_refuse(prompts, personae, pairs, ascii_only):
    from steerlab.inference.infer import load_prompts
    from steerlab.model.personas import load_personae
    from steerlab.traits.pairs import load_pairs

    def write(path: Path, text: str) -> Path:
        # ensure_ascii=False writes raw surrogates: bytes that are not UTF-8
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        return path

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cases = [
            (load_prompts, write(d / "prompts.json", json.dumps(prompts, ensure_ascii=ascii_only))),
            (load_personae, write(d / "personae.json",
                                  json.dumps(personae, ensure_ascii=ascii_only))),
            (load_pairs, write(d / "pairs.jsonl", "".join(
                json.dumps(p, ensure_ascii=ascii_only) + "\n" for p in pairs))),
        ]
        for reader, path in cases:
            SEEN["cases"] += 1
            try:
                records = reader(path)
            except SteerlabError as err:
                line = str(err)
                assert "\n" not in line and line.encode("utf-8"), line
                SEEN["refused"] += 1
                continue
            SEEN["read"] += 1
            assert records
            for r in records:
                texts = [r] if isinstance(r, str) else [
                    v for v in vars(r).values() if isinstance(v, str)]
                for t in texts:
                    t.encode("utf-8")  # no lone surrogate
                    assert NUL not in t
            if reader is load_personae:
                assert all(r.persona.strip() and "\n" not in r.persona
                           and len(r.persona) <= MAX_PERSONA_CHARS for r in records)
            if reader is load_prompts:
                assert all(r.strip() for r in records)


# ------------------------------------------------------------------ the context window

def test_generate_refuses_a_prompt_longer_than_the_context(tiny_model):
    from steerlab.generation.generator import generate

    n_ctx = context_length(tiny_model)
    assert n_ctx == tiny_model.original_model.config.max_position_embeddings == 1024
    with pytest.raises(SteerlabError, match=r"prompt 1 is 1020 tokens; with max_new_tokens 8 "
                       r"that is 1028 positions, more than the model's context of 1024"):
        generate(tiny_model, [[5] * 10, [5] * 1020], max_new_tokens=8)
    # exactly the context is fine
    assert len(generate(tiny_model, [[5] * (n_ctx - 2)], max_new_tokens=2).tokens[0]) <= 2


def test_infer_refuses_a_rendering_longer_than_the_context_before_the_run_folder(
        tiny_model, tmp_path, monkeypatch, capsys):
    from steerlab.model import loading as models
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: tiny_model)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hi", "word " * 1100]))
    out = tmp_path / "run"
    code = run_cli("infer", "--prompts-json", str(prompts), "--personae-json", GOOD_PERSONAE,
                   "--output-dir", str(out), "--max-tokens", "4", "--no-progress")
    line = _refused(capsys, code, None, "prompts[1]", "more than the model's context of 1024")
    assert "rendered for persona" in line and "max_tokens 4" in line
    assert not out.exists()


def test_extract_refuses_a_pair_longer_than_the_context_before_any_output(tiny_model,
                                                                         tmp_path):
    from steerlab.extraction.extractor import extract
    from steerlab.traits.pairs import Pair

    pairs = [Pair("short", "Hi", "Ahoy!", "Hello."), Pair("long", "word " * 1100, "a", "b")]
    out = tmp_path / "out" / "acts.h5"
    with pytest.raises(SteerlabError, match=r"pair 'long' \(prompt and response, rendered\) is "
                       r"\d+ tokens, more than the model's context of 1024") as err:
        extract(tiny_model, pairs, out, layers=[0], pairs_file="p.jsonl", progress=False)
    assert err.value.field == "pairs" and err.value.source == "p.jsonl"
    assert not out.parent.exists()


# ------------------------------------------------------------------ memory

class _Peak(TorchDispatchMode):
    """The most bytes held at once by tensors that ops create while it is active (their
    storages, freed when the last reference goes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.held: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or key in self.held:
                continue
            self.held.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.held.discard(key)


@pytest.mark.parametrize("rows, width", [(1, 16), (4, 200), (3, 500)])
def test_the_estimate_matches_the_tensors_of_a_prefill_and_a_step(tiny_model, rows, width):
    """The KV cache: exactly the DynamicCache's keys and values after a prefill. The most bytes
    held at once over a prefill and its first step (sampling, then the metrics): the estimate
    is within 0.9x (the 10% below are what HEADROOM leaves free) and 1.5x of it."""
    from steerlab.base.compat import ensure_bridge_reads_cache
    from steerlab.generation.decode import prefill
    from steerlab.generation.metrics import chosen_metrics
    from steerlab.generation.sampling import sample

    ensure_bridge_reads_cache()
    prompts = [[7 + r] * (width - r) for r in range(rows)]  # left-padded to width
    est = batch_memory(tiny_model, rows, width, 1, metrics=True)
    with torch.inference_mode():
        peak = _Peak()
        with peak:
            logits, cache, _, _ = prefill(tiny_model, prompts, 0, torch.device("cpu"), None)
            pick = sample(logits, torch.full((rows,), 0.7, dtype=torch.float64),
                          torch.arange(rows), 0)
            chosen_metrics(logits, 5, pick)
        kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv == est.prefill_cache == est.kv_cache * width // (width + 1)
    print(f"\n{rows} x {width}: peak {peak.peak}, estimate {est}, "
          f"{est.total / peak.peak:.2f}x")
    assert HEADROOM * peak.peak <= est.total <= 1.5 * peak.peak


def test_recorded_metrics_estimate_is_the_decode_state(tiny_model):
    from steerlab.generation.decode import DecodeState, StepProgram, fresh

    rows, new = 5, 37
    for lens in (False, True):
        program = StepProgram(5, lens, False, (), (0,), 0)
        st = DecodeState(fresh(torch.device("cpu")), rows, new, program, 3)
        held = st.tokens.nbytes + sum(t.nbytes for t in st.metrics.values())
        assert held == batch_memory(tiny_model, rows, 10, new, metrics=True, lens=lens).metrics


def test_lens_chunk_is_within_the_estimate(tiny_model):
    from steerlab.generation.lens import lens_metrics

    rows = 4
    est = batch_memory(tiny_model, rows, 8, 1, lens=True).logits - \
        batch_memory(tiny_model, rows, 8, 1).logits
    with torch.inference_mode():
        peak = _Peak()
        with peak:
            lens_metrics(tiny_model, torch.randn(3, rows, 64), 5)
    assert peak.peak <= est <= 1.5 * peak.peak


def test_rows_per_batch_splits_or_refuses_with_the_numbers():
    need = lambda rows: 100 * rows  # noqa: E731
    assert rows_per_batch(need, 5, available=1000) == 5  # 500 <= 900
    assert rows_per_batch(need, 50, available=1000) == 9  # 900 = HEADROOM x 1000
    assert rows_per_batch(need, 50, available=None) == 50  # unknown: no split
    with pytest.raises(SteerlabError, match=r"one row needs about 100 B of memory, but 99 B "
                       r"is free") as err:
        rows_per_batch(need, 3, available=99, what="x")
    assert err.value.field == "memory"
    assert HEADROOM == 0.9


def test_generate_splits_a_batch_that_does_not_fit_and_refuses_one_row(tiny_model, caplog):
    from steerlab.generation.budget import generation_need
    from steerlab.generation.generator import generate, generate_with_metrics

    prompts = [[5 + i] * (3 + 4 * i) for i in range(5)]
    kw = dict(max_new_tokens=6, engine="eager", lens=True)
    whole = generate_with_metrics(tiny_model, prompts, **kw)
    need = generation_need(tiny_model, max(map(len, prompts)), 6, metrics=True, lens=True)
    seen: list[list] = []
    with caplog.at_level("INFO", logger="steerlab.generation.generator"):
        parts = generate_with_metrics(tiny_model, prompts, **kw,
                                      available_memory=int(need(2) / HEADROOM) + 1,
                                      on_token=lambda new: seen.append(new))
    assert "generating it as 3 parts of at most 2 rows" in caplog.text
    assert all(len(new) == 5 for new in seen)
    assert [r for r, t in enumerate(seen[0]) if t is not None] == [0, 1]  # the first part
    for p, a, b in zip(prompts, whole, parts, strict=True):
        # another padding width rounds float32 otherwise: ties may part, never more
        assert_same_tokens(tiny_model, p, b.tokens, a.tokens, eps_units=64)
        if a.tokens == b.tokens:
            np.testing.assert_allclose(b.entropy, a.entropy, rtol=1e-4, atol=1e-4)
            assert b.lens_entropy.shape == a.lens_entropy.shape
    with pytest.raises(SteerlabError, match="one row needs about"):
        generate(tiny_model, prompts, max_new_tokens=6, available_memory=1000)


def test_capture_splits_a_batch_that_does_not_fit(tiny_model, caplog):
    from steerlab.extraction.capture import capture_positions

    seqs = [[5 + i] * (4 + 3 * i) for i in range(6)]
    pos = [len(s) - 1 for s in seqs]
    spans = [(0, len(s)) for s in seqs]
    whole = capture_positions(tiny_model, seqs, pos, [0, 2], spans=spans)
    one = batch_memory(tiny_model, 4, max(map(len, seqs))).total
    with caplog.at_level("INFO", logger="steerlab.extraction.capture"):
        parts = capture_positions(tiny_model, seqs, pos, [0, 2], spans=spans,
                                  available_memory=int(one / HEADROOM) + 1)
    assert "running it as 2 parts of at most 4" in caplog.text
    torch.testing.assert_close(parts.at, whole.at, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.mean, whole.mean, rtol=1e-5, atol=1e-5)
