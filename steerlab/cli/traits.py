"""``steerlab traits list|generate|collect|judge|filter|merge``: the trait data pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from steerlab.base.errors import SteerlabError
from steerlab.cli._app import TRAIT_HELP, app
from steerlab.cli._model import model_flags
from steerlab.model.loading import load_from_options
from steerlab.model.options import ModelOptions
from steerlab.traits.collection import SAMPLES, TEMPERATURE
from steerlab.traits.judging import MIN_DISTINCT, THRESHOLD
from steerlab.traits.responders import ANSWER_TOKENS

sub = typer.Typer(help="Trait data pipeline: list, generate, collect, judge, filter, merge.",
                  no_args_is_help=True)
app.add_typer(sub, name="traits")

RunDir = Annotated[Path | None, typer.Option(help="Stage files [default: runs/traits/<name>].")]
KEY_HELP = "Environment variable holding the API key ('' for none)."


def _run_dir(run_dir: Path | None, trait: Any) -> Path:
    return run_dir or Path("runs") / "traits" / trait.name


def _client(url: str, model: str, key_env: str, concurrency: int, retries: int, timeout: float,
            field: str = "base_url"):
    from steerlab.traits.client import Endpoint, EndpointClient

    url = _check_endpoint(url, concurrency, retries, timeout, field) or url
    return EndpointClient(Endpoint(url, model, key_env or None, timeout=timeout,
                                   max_retries=retries, concurrency=concurrency))


def _check_endpoint(url: str | None, concurrency: int, retries: int, timeout: float,
                    field: str = "base_url") -> str | None:
    """An endpoint's flags (``url`` None: a local responder), checked before anything loads
    or is sent."""
    from steerlab.base.checks import integer, number
    from steerlab.base.checks import url as check_url

    integer(concurrency, "concurrency", lo=1)
    integer(retries, "retries", lo=0)
    number(timeout, "timeout", lo=0, lo_open=True)
    return None if url is None else check_url(url, field)


def _unreachable(err: RuntimeError, url: str, field: str) -> SteerlabError:
    """A request that failed after its retries, as the one line of bad input it is."""
    return SteerlabError(f"cannot reach a working endpoint at {url} ({err}); expected a "
                         "running OpenAI-compatible server", field=field)


def _system(flag: str | None, default: tuple[str, ...], field: str) -> str | None:
    if flag is not None:
        return None if flag == "none" else flag
    if not default:
        raise SteerlabError("the trait has none; pass the system prompt explicitly", field=field)
    return default[0]


@sub.command("list")
def list_() -> None:
    """List the traits a name finds: ./traits first, then the built-in ones.

    One line each: name, questions, held-out questions, scorer kind and the file it loads.
    """
    from steerlab.traits.trait import list_traits, load_trait

    for name, path in list_traits().items():
        try:
            t = load_trait(name)
        except SteerlabError as err:
            typer.echo(f"{name:<14} invalid: {err}")
            continue
        kind = t.scorer["type"] if t.scorer else "llm-rubric" if t.evaluation_prompt else "none"
        typer.echo(f"{name:<14} {len(t.questions):>3} questions {len(t.held_out_questions):>3} "
                   f"held out  scorer {kind:<12} {path}")


@sub.command()
def generate(
    trait: Annotated[str, typer.Argument(help=TRAIT_HELP)],
    base_url: str = typer.Option(..., help="OpenAI-compatible base URL of a capable model."),
    model: str = typer.Option(..., help="Model name at that endpoint."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=KEY_HELP),
    output: Annotated[Path | None, typer.Option(help="Trait file to write [default: "
                                                "traits/<name>.json].")] = None,
    n_questions: int = typer.Option(40, help="Questions for pairs."),
    n_held_out: int = typer.Option(10, help="Held-out questions for evaluation."),
    force: bool = typer.Option(False, help="Regenerate artefacts the trait already has."),
    retries: int = typer.Option(4, help="Retries per request on 429/5xx/timeouts."),
    timeout: float = typer.Option(300.0, help="Seconds per request."),
) -> None:
    """Have an LLM write instructions, questions and a 0-100 rubric for a trait."""
    from steerlab.base.checks import integer, output_file
    from steerlab.traits.elicit import elicit_trait
    from steerlab.traits.trait import load_trait

    t = load_trait(trait)
    integer(n_questions, "n_questions", lo=1)
    integer(n_held_out, "n_held_out", lo=0)
    out = output_file(output or Path("traits") / f"{t.name}.json", "output")
    client = _client(base_url, model, api_key_env, 1, retries, timeout)
    if t.questions and t.positive_instructions and not force:
        typer.echo(f"{t.name} already has artefacts; pass --force to regenerate")
        return
    try:
        new = elicit_trait(client, t, n_questions=n_questions, n_held_out=n_held_out)
    except RuntimeError as err:
        raise _unreachable(err, base_url, "base_url") from None
    typer.echo(f"wrote {new.save(out)}: {len(new.questions)} questions, "
               f"{len(new.held_out_questions)} held out")


def _responder(side: str, t: Any, url: str | None, model_name: str, key_env: str,
               system: str | None, persona: str | None, local: Any, opts: dict) -> Any:
    from steerlab.model.personas import ASSISTANT, Persona
    from steerlab.traits.responders import EndpointResponder, LocalResponder

    defaults = t.positive_instructions if side == "chosen" else t.negative_instructions
    sys_prompt = _system(system, defaults, f"{side}_system")
    if url:
        client = _client(url, model_name, key_env, opts["concurrency"], opts["retries"],
                         opts["timeout"], f"{side}_url")
        extra = {"persona": persona} if persona else None
        return EndpointResponder(client, sys_prompt, opts["max_tokens"], extra_body=extra,
                                 name=f"{model_name}@{url}")
    return LocalResponder(local(), sys_prompt, Persona(persona, "custom") if persona else ASSISTANT,
                          opts["max_tokens"], opts["batch_size"], name="local")


@sub.command()
@model_flags
def collect(
    model: ModelOptions,
    trait: Annotated[str, typer.Argument(help=TRAIT_HELP)],
    run_dir: RunDir = None,
    chosen_url: Annotated[str | None, typer.Option(help="Endpoint of the chosen responder "
                                                   "[default: the local model].")] = None,
    chosen_model: str = typer.Option("embedded", help="Model name at --chosen-url."),
    chosen_key_env: str = typer.Option("", help=KEY_HELP),
    chosen_system: Annotated[str | None, typer.Option(help="System prompt ('none': no system "
                             "message) [default: the first positive instruction].")] = None,
    chosen_persona: Annotated[str | None, typer.Option(help="Persona of the chosen side.")] = None,
    rejected_url: Annotated[str | None, typer.Option(help="Endpoint of the rejected "
                                                     "responder.")] = None,
    rejected_model: str = typer.Option("embedded", help="Model name at --rejected-url."),
    rejected_key_env: str = typer.Option("", help=KEY_HELP),
    rejected_system: Annotated[str | None, typer.Option(help="System prompt [default: the "
                               "first negative instruction].")] = None,
    rejected_persona: Annotated[str | None, typer.Option(help="Persona, rejected side.")] = None,
    held_out: bool = typer.Option(False, help="Answer the held-out questions instead."),
    max_tokens: int = typer.Option(ANSWER_TOKENS, help="Most new tokens per answer."),
    samples: int = typer.Option(SAMPLES, help="Answers per question and side: the first as the "
                                "responder is (greedy), the rest sampled; the filter keeps "
                                "each question's best-separated loop-free pair."),
    temperature: float = typer.Option(TEMPERATURE, help="Temperature of samples 2, 3, ..."),
    seed: int = typer.Option(0, help="Base seed of the sampled answers."),
    batch_size: int = typer.Option(64, help="Questions per local generation batch."),
    concurrency: int = typer.Option(8, help="Requests in flight per endpoint."),
    retries: int = typer.Option(4, help="Retries per request on 429/5xx/timeouts."),
    timeout: float = typer.Option(120.0, help="Seconds per request."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Answer the trait's questions with a chosen and a rejected responder (resumable)."""
    from functools import cache

    from steerlab.base.checks import integer, number
    from steerlab.base.checks import seed as check_seed
    from steerlab.traits.collection import collect as run_collect
    from steerlab.traits.trait import load_trait

    # every flag is checked before the model loads or a request goes out
    t = load_trait(trait)
    for value, name in ((max_tokens, "max_tokens"), (samples, "samples"),
                        (batch_size, "batch_size")):
        integer(value, name, lo=1)
    number(temperature, "temperature", lo=0)
    check_seed(seed)
    _check_sides({"chosen": (chosen_system, chosen_persona),
                  "rejected": (rejected_system, rejected_persona)})
    for url, field in ((chosen_url, "chosen_url"), (rejected_url, "rejected_url")):
        _check_endpoint(url or None, concurrency, retries, timeout, field)
    questions = _questions(t, held_out, trait)
    out = _collected_file(_run_dir(run_dir, t), held_out, trait, model)
    local = cache(lambda: load_from_options(model))
    opts = dict(max_tokens=max_tokens, batch_size=batch_size, concurrency=concurrency,
                retries=retries, timeout=timeout)
    a = _responder("chosen", t, chosen_url, chosen_model, chosen_key_env, chosen_system,
                   chosen_persona, local, opts)
    b = _responder("rejected", t, rejected_url, rejected_model, rejected_key_env,
                   rejected_system, rejected_persona, local, opts)
    r = run_collect(questions, a, b, out, samples=samples, temperature=temperature, seed=seed,
                    progress=progress)
    typer.echo(f"{out}: {r.written} answers written, {r.failed} failed, {r.skipped} present")


def _check_sides(sides: dict[str, tuple[str | None, str | None]]) -> None:
    """Each side's ``--*-system`` and ``--*-persona`` flags, where given."""
    from steerlab.model.personas import persona_name, system_prompt_text

    for side, (system, persona) in sides.items():
        if system is not None:
            system_prompt_text(system, f"{side}_system")
        if persona is not None:
            persona_name(persona, f"{side}_persona")


def _questions(t: Any, held_out: bool, trait: str) -> tuple[str, ...]:
    """The trait's questions to answer (held-out ones with ``--held-out``), refused if none."""
    questions = t.held_out_questions if held_out else t.questions
    if not questions:
        raise SteerlabError("the trait has no questions; run `steerlab traits generate`",
                            source=trait, field="questions")
    return questions


def _collected_file(d: Path, held_out: bool, trait: str, model: ModelOptions) -> Path:
    """The answers file in the run folder ``d``, checked writable (and no input) before
    anything loads."""
    from steerlab.base.checks import output_dir
    from steerlab.traits.trait import trait_file

    out = d / ("collected_held_out.jsonl" if held_out else "collected.jsonl")
    output_dir(d, "run_dir", inputs={"trait": trait_file(trait), "model": model.local_files()},
               owns=[out])
    return out


@sub.command()
def judge(
    trait: Annotated[str, typer.Argument(help=TRAIT_HELP)],
    run_dir: RunDir = None,
    rubric_url: Annotated[str | None, typer.Option(help="Judge with the trait's LLM rubric at "
                          "this endpoint [default: the trait's built-in scorer].")] = None,
    rubric_model: str = typer.Option("gpt-4o-mini", help="Judge model at --rubric-url."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=KEY_HELP),
    concurrency: int = typer.Option(8, help="Judge requests in flight."),
    retries: int = typer.Option(4, help="Retries per request."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Score every collected answer 0-100 (resumable; failures are recorded)."""
    from steerlab.base.checks import input_file, output_file
    from steerlab.traits.judging import judge as run_judge
    from steerlab.traits.judging import rubric_judge, scorer_judge
    from steerlab.traits.trait import load_trait, trait_file

    t = load_trait(trait)
    _check_endpoint(rubric_url or None, concurrency, retries, 120.0, "rubric_url")
    d = _run_dir(run_dir, t)
    input_file(d / "collected.jsonl", "run_dir", what="the collect stage's answers "
               "(steerlab traits collect)")
    output_file(d / "judged.jsonl", "run_dir", inputs={"collected": d / "collected.jsonl",
                                                       "trait": trait_file(trait)})
    if rubric_url:
        if not t.evaluation_prompt:
            raise SteerlabError("the trait has no rubric", source=trait,
                                field="evaluation_prompt")
        fn = rubric_judge(_client(rubric_url, rubric_model, api_key_env, concurrency, retries,
                                  120.0, "rubric_url"), t.evaluation_prompt)
    else:
        fn = scorer_judge(t.build_scorer())
    r = run_judge(d / "collected.jsonl", d / "judged.jsonl", fn, progress=progress)
    typer.echo(f"{r.path}: {r.written} scored, {r.failed} failed, {r.skipped} already scored")


@sub.command("filter")
def filter_(
    trait: Annotated[str, typer.Argument(help=TRAIT_HELP)],
    run_dir: RunDir = None,
    threshold: float = typer.Option(THRESHOLD, help="Minimum chosen - rejected score difference."),
    min_distinct: float = typer.Option(
        MIN_DISTINCT, help="Drop pairs with a repetition loop: minimum distinct word-bigram "
        "share of both answers (0 keeps all; 0.5 drops 'aye, aye, aye' loops)."),
    output: Annotated[Path | None, typer.Option(help="Pairs JSONL [default: "
                                                "<run-dir>/pairs.jsonl].")] = None,
) -> None:
    """Keep, per question, the best-separated pair of samples whose score difference is at
    least the threshold (optionally loop-free); writes why the others were dropped."""
    from collections import Counter

    from steerlab.base.checks import input_file, number, output_file
    from steerlab.base.files import read_jsonl
    from steerlab.traits.judging import dropped_path, filter_pairs
    from steerlab.traits.trait import load_trait, trait_file

    d = _run_dir(run_dir, load_trait(trait))
    number(threshold, "threshold", lo=-100, hi=100)  # scores are 0-100
    number(min_distinct, "min_distinct", lo=0, hi=1)
    for stage, what in (("collected", "collect"), ("judged", "judge")):
        input_file(d / f"{stage}.jsonl", "run_dir", what=f"the {what} stage's records "
                   f"(steerlab traits {what})")
    inputs = {"collected": d / "collected.jsonl", "judged": d / "judged.jsonl",
              "trait": trait_file(trait)}
    out = output_file(output or d / "pairs.jsonl", "output", inputs=inputs,
                      owns=[dropped_path(output or d / "pairs.jsonl")])
    output_file(dropped_path(out), "output")
    pairs = filter_pairs(d / "collected.jsonl", d / "judged.jsonl", out, threshold=threshold,
                         min_distinct=min_distinct)
    dropped = read_jsonl(dropped_path(out))
    typer.echo(f"{out}: {len(pairs)} pairs of {len(pairs) + len(dropped)} questions")
    for reason, n in Counter(r["reason"] for r in dropped).most_common():
        typer.echo(f"  dropped {n}: {reason}")
    if dropped:
        typer.echo(f"  per question: {dropped_path(out)}")


@sub.command()
def merge(
    output: Annotated[Path, typer.Argument(help="Merged pairs JSONL.")],
    inputs: Annotated[list[Path], typer.Argument(help="Pairs files: JSONL or the original "
                                                 "filtered JSON.")],
) -> None:
    """Merge pairs files (first occurrence of each prompt wins)."""
    from steerlab.base.checks import output_file
    from steerlab.traits.pairs import merge_pairs, save_pairs

    output_file(output, "output", inputs={"inputs": inputs})
    pairs = merge_pairs(inputs)
    typer.echo(f"{save_pairs(pairs, output)}: {len(pairs)} pairs")
