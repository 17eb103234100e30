"""No output may alias an input: the check itself, and every command that writes.

``checks.aliased`` is the one rule (the same path once ``..`` and symlinks are resolved, the
same inode, a path inside an input folder, a written folder holding an input);
``checks.output_file`` and ``checks.output_dir`` apply it to a command's ``inputs``. Each row of
``ROWS`` is a command line whose output aliases one of its inputs (``{name}`` placeholders
name files of the workspace below); it must exit 2 with one line naming the field and the
aliased input before any model loads, and leave every file of the workspace unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bad_inputs import _acts, _snapshot

from steerlab.base.checks import aliased, output_dir, output_file
from steerlab.base.errors import SteerlabError
from steerlab.inference.results import run_files

# ------------------------------------------------------------------------ the check itself


@pytest.fixture
def files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text("[]\n")
    (tmp_path / "in.txt").write_text("input\n")
    return tmp_path


def test_the_same_file_by_path_dots_symlink_and_hard_link(files):
    inp = files / "in.txt"
    inputs = {"prompts_json": inp}
    assert aliased(inp, inputs) == f"is {inp} (input 'prompts_json')"
    assert aliased(files / "run" / ".." / "in.txt", inputs).startswith(f"resolves to {inp}")
    (files / "link").symlink_to(inp)
    assert aliased(files / "link", inputs).startswith(f"resolves to {inp}")
    os.link(inp, files / "hard.txt")
    assert aliased(files / "hard.txt", inputs) == f"is a hard link to {inp} (input " \
        "'prompts_json')"
    (files / "dangling").symlink_to(files / "run" / "per_token.h5")  # a file not yet written
    assert "resolves to" in aliased(files / "dangling", {"results_dir": run_files(
        files / "run")})


def test_inside_an_input_folder_and_holding_an_input(files):
    run = files / "run"
    parts = {"results_dir": run_files(run)}  # parts/ does not exist: a folder the run owns
    assert aliased(run / "parts" / "x.html", parts).startswith(f"is inside {run / 'parts'}")
    assert aliased(run, {"results_dir": run / "results.json"}).startswith("holds")
    assert aliased(run, {"results_dir": run / "results.json"}, holds=False) is None
    # an input file is not a folder: a path under it is not an alias (it cannot be written)
    assert aliased(files / "in.txt" / "x", {"i": files / "in.txt"}) is None


def test_unrelated_paths_do_not_alias(files):
    run = files / "run"
    inputs = {"results_dir": run_files(run), "prompts_json": files / "in.txt", "none": None,
              "empty": ""}
    for out in (run / "report.html", files / "run2" / "results.json", files / "in.txt2",
                files / "out" / "in.txt", files / "run" / "results.json.bak"):
        assert aliased(out, inputs) is None, out
    (files / "loop").symlink_to(files / "loop")  # a symlink loop is compared as written
    assert aliased(files / "loop", inputs) is None


def test_output_file_and_dir_refuse_before_writing(files):
    inp = files / "run" / "results.json"
    before = inp.read_bytes()
    with pytest.raises(SteerlabError) as err:
        output_file(inp, "output", inputs={"results_dir": run_files(files / "run")})
    msg = str(err.value)
    assert msg.startswith(f"{inp}, field 'output': is {inp} (input 'results_dir')"), msg
    assert "\n" not in msg
    with pytest.raises(SteerlabError, match="would write .*config.json, which is"):
        output_dir(files / "new", "output_dir", inputs={"prompts_json": files / "new" /
                   "config.json"}, owns=run_files(files / "new"))
    with pytest.raises(SteerlabError, match="field 'output': would write .*x.json, which is"):
        output_file(files / "x.safetensors", "output", owns=[files / "x.json"],
                    inputs={"vector": files / "x.json"})
    # a folder may hold inputs besides the files written in it; nothing was created
    assert output_dir(files, "run_dir", inputs={"trait": files / "in.txt"},
                      owns=[files / "collected.jsonl"]) == files
    assert inp.read_bytes() == before
    assert sorted(p.name for p in files.iterdir()) == ["in.txt", "run"]


# ------------------------------------------------------------------------ every command


ROWS: list[tuple[str, str, tuple[str, ...]]] = [
    # (id, the field and the input path the line must name, command line)
    ("report-results", "output|{run}/results.json",
     ("report", "{run}", "-o", "{run}/results.json")),
    ("report-dotdot", "output|{run}/config.json",
     ("report", "{run}", "-o", "{w}/run/../run/config.json")),
    ("report-symlink", "output|{run}/results.json", ("report", "{run}", "-o", "{w}/link.html")),
    ("report-per-token", "output|{run}/per_token.h5",
     ("report", "{run}", "--output", "{run}/per_token.h5")),
    ("infer-prompts-as-config", "output_dir|{w}/prun/config.json",
     ("infer", "--prompts-json", "{w}/prun/config.json", "--personae-json", "{personae}",
      "--output-dir", "{w}/prun")),
    ("infer-dir-is-prompts", "output_dir|{prompts}",
     ("infer", "--prompts-json", "{prompts}", "--personae-json", "{personae}",
      "--output-dir", "{prompts}")),
    ("infer-model-folder", "output_dir|{model}/config.json",
     ("infer", "--model", "{model}", "--prompts-json", "{prompts}", "--personae-json",
      "{personae}", "--output-dir", "{model}")),
    ("extract-output-is-pairs", "output|{pairs}", ("extract", "-c", "{x_pairs}")),
    ("extract-output-is-config", "output|{x_self}", ("extract", "-c", "{x_self}")),
    ("extract-log-is-pairs", "log_file|{pairs}", ("extract", "-c", "{x_log}")),
    ("merge-output-is-shard", "output|{acts}", ("merge", "{acts}", "{acts2}", "-o", "{acts}")),
    ("merge-output-symlink", "output|{acts2}",
     ("merge", "{acts}", "{acts2}", "-o", "{w}/acts-link.h5")),
    ("fit-output-is-activations", "output|{actsjson}",
     ("vectors", "fit", "{actsjson}", "-o", "{w}/captured")),
    ("eval-output-is-sidecar", "output|{w}/vec.json",
     ("vectors", "eval", "{vec}", "--output", "{w}/vec")),
    ("export-over-sidecar", "output|{w}/vec.json",
     ("vectors", "export-gguf", "{vec}", "-o", "{w}/vec.json")),
    ("export-over-safetensors", "output|{vec}",
     ("vectors", "export-gguf", "{w}/vec", "-o", "{vec}")),
    ("filter-over-judged", "output|{trun}/judged.jsonl",
     ("traits", "filter", "pirate", "--run-dir", "{trun}", "--output", "{trun}/judged.jsonl")),
    ("filter-over-collected", "output|{trun}/collected.jsonl",
     ("traits", "filter", "pirate", "--run-dir", "{trun}", "--output",
      "{trun}/../trait-run/collected.jsonl")),
    ("judge-judged-symlink", "run_dir|{linkrun}/collected.jsonl",
     ("traits", "judge", "pirate", "--run-dir", "{linkrun}")),
    ("collect-over-trait", "run_dir|{ctrait}",
     ("traits", "collect", "{ctrait}", "--run-dir", "{w}/crun")),
    ("pairs-merge-over-input", "output|{pairs}",
     ("traits", "merge", "{pairs}", "{pairs2}", "{pairs}")),
    ("pairs-merge-hard-link", "output|{pairs}", ("traits", "merge", "{w}/hard.jsonl", "{pairs}")),
    ("demo-pairs-hold-trait", "output_dir|{w}/demo/pairs/pirate.json",
     ("demo", "--output-dir", "{w}/demo", "--trait", "{w}/demo/pairs/pirate.json")),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model):
    from importlib.resources import files as package

    from steerlab.inference.infer import InferConfig, run_inference
    from steerlab.model.personas import Persona
    from steerlab.steering.vector import SteeringVector

    w = tmp_path_factory.mktemp("aliasing")
    names = {"w": str(w)}

    def put(name: str, rel: str, text: str) -> Path:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(text, encoding="utf-8")
        names[name] = str(w / rel)
        return w / rel

    put("prompts", "prompts.json", json.dumps(["Hi"]))
    put("personae", "personae.json", json.dumps([{"persona": "pirate", "category": "x"}]))
    put("prun", "prun/config.json", json.dumps(["Hi"]))  # prompts where a run writes
    put("model", "model/config.json", json.dumps({"model_type": "llama", "vocab_size": 100,
                                                  "num_hidden_layers": 2, "hidden_size": 64}))
    names["model"] = str(w / "model")
    run = run_inference(tiny_model, ["Hi"], [Persona("pirate", "x")], w / "run",
                        InferConfig(max_tokens=2, batch_size=1), progress=False)
    names["run"] = str(run)
    (w / "link.html").symlink_to(run / "results.json")
    pair = {"prompt": "Hi", "chosen": "Arr, hi.", "rejected": "Hello."}
    put("pairs", "pairs.jsonl", json.dumps(pair) + "\n")
    put("pairs2", "pairs2.jsonl", json.dumps({**pair, "prompt": "Yo"}) + "\n")
    os.link(w / "pairs.jsonl", w / "hard.jsonl")
    cfg = {"pairs": names["pairs"], "output": names["pairs"], "layers": [1]}
    put("x_pairs", "extract-pairs.yaml", yaml.safe_dump(cfg))
    put("x_self", "extract-self.yaml", yaml.safe_dump({**cfg, "output": str(w /
                                                                          "extract-self.yaml")}))
    put("x_log", "extract-log.yaml", yaml.safe_dump({**cfg, "output": str(w / "new.h5"),
                                                     "log_file": names["pairs"]}))
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((4, 1, 576)).astype(np.float32) for _ in range(2)]
    names["acts"] = str(_acts(w / "acts.h5", *rows))
    names["acts2"] = str(_acts(w / "acts2.h5", *rows))
    (w / "acts-link.h5").symlink_to(w / "acts2.h5")
    names["actsjson"] = str(_acts(w / "captured.json", *rows))  # an activation file's name
    vec = SteeringVector(torch.from_numpy(rng.standard_normal((2, 576)).astype(np.float32)),
                         (10, 11))
    names["vec"] = str(vec.save(w / "vec"))
    rec = {"id": "q0", "index": 0, "prompt": "Hi", "sample": 0, "responder": "r"}
    put("trun", "trait-run/collected.jsonl", "".join(
        json.dumps({**rec, "role": r, "text": t}) + "\n"
        for r, t in (("chosen", "Arr."), ("rejected", "Hello."))))
    put("judged", "trait-run/judged.jsonl", "".join(
        json.dumps({"id": "q0", "role": r, "sample": 0, "score": s}) + "\n"
        for r, s in (("chosen", 90.0), ("rejected", 0.0))))
    names["trun"] = str(w / "trait-run")
    put("linkrun", "link-run/collected.jsonl", (w / "trait-run/collected.jsonl").read_text())
    (w / "link-run/judged.jsonl").symlink_to(w / "link-run/collected.jsonl")
    names["linkrun"] = str(w / "link-run")
    pirate = (package("steerlab.builtin") / "traits" / "pirate.json").read_text()
    put("ctrait", "crun/collected.jsonl", pirate)  # a trait file where collect writes
    put("demotrait", "demo/pairs/pirate.json", pirate)
    return w, names


@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_an_output_aliasing_an_input_is_refused(case, workspace, tripwire, monkeypatch,
                                                capsys):
    from conftest import run_cli

    w, names = workspace
    _, want, args = case
    field, path = (x.format(**names) for x in want.split("|"))
    monkeypatch.chdir(w)
    before = _snapshot(w)
    capsys.readouterr()
    code = run_cli(*(a.format(**names) for a in args))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"field {field!r}" in lines[0] and path in lines[0], lines[0]
    assert "not one of the command's inputs" in lines[0], lines[0]
    assert _snapshot(w) == before, "a refused command changed the workspace"


def test_the_library_writers_refuse_too(workspace, tiny_model):
    from steerlab.extraction.extractor import extract, merge_shards
    from steerlab.inference.report import write_run_report
    from steerlab.traits.judging import filter_pairs, judge, scorer_judge
    from steerlab.traits.pairs import load_pairs
    from steerlab.traits.trait import load_trait

    w, names = workspace
    before = _snapshot(w)
    trun = Path(names["trun"])
    calls = [
        lambda: write_run_report(names["run"], Path(names["run"]) / "config.json"),
        lambda: extract(tiny_model, load_pairs(names["pairs"]), names["pairs"],
                        pairs_file=names["pairs"]),
        lambda: merge_shards([names["acts"], names["acts2"]], names["acts2"]),
        lambda: filter_pairs(trun / "collected.jsonl", trun / "judged.jsonl",
                             trun / "collected.jsonl"),
        lambda: judge(Path(names["linkrun"]) / "collected.jsonl",
                      Path(names["linkrun"]) / "judged.jsonl",
                      scorer_judge(load_trait("pirate").build_scorer()), progress=False),
    ]
    for call in calls:
        with pytest.raises(SteerlabError, match="not one of the command's inputs"):
            call()
    assert _snapshot(w) == before


def test_an_output_beside_its_inputs_is_still_written(workspace, tmp_path):
    """The default report beside the run's files, and a vector named after its activation
    file (acts.h5 -> acts.h5.safetensors and .json), are not aliases."""
    import shutil

    from conftest import run_cli

    w, names = workspace
    run = shutil.copytree(names["run"], tmp_path / "run")
    assert run_cli("report", str(run)) == 0
    assert (run / "report.html").is_file()
    acts = shutil.copy(names["acts"], tmp_path / "acts.h5")
    assert run_cli("vectors", "fit", str(acts), "-o", str(acts)) == 0
    assert (tmp_path / "acts.h5.safetensors").is_file()
