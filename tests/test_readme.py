"""Every snippet of README.md works as written.

How the README's fenced blocks are read:

- ```python blocks run, in README order, in one temporary working directory shared by the whole README (so a
  block can read what an earlier one wrote). The blocks of one ``## `` section share a namespace: a block
  continues the ones above it in its section; a new section starts afresh.
- ```bash blocks: a trailing backslash joins lines, ``#`` starts a comment. ``NAME=value`` lines are evaluated by
  bash (the running venv's ``python`` first on PATH), and ``$NAME`` is replaced in the lines after them;
  ``NAME=value`` words before ``rankscope`` are that command's environment. Every ``rankscope`` line is parsed by
  the real CLI (click's ``make_context``: unknown options, wrong names and bad types fail), its option values
  checked the way the command checks them before any work (train and study: variants and ``--key value``
  settings resolved and validated; analyze: ``check_cli_options``; sql: the query parsed by DuckDB), and then run
  in-process with exit code 0 unless ``PARSE_ONLY`` names it and says why. Any other command is in ``OTHER_COMMANDS``.
- ```text blocks and blocks without a language are output or synopses, never run. A line of one that starts with
  ``rankscope `` is a synopsis: each ``--option`` it names must exist, and listed choices (``--attention a|b``)
  must be accepted. A ``$ rankscope ...`` transcript line is parse-checked like a bash line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import duckdb
import pytest
import typer
from typer.testing import CliRunner

import rankscope.cli
from rankscope.cli import SQL_FORMATS, app
from rankscope.commands.analyze import FORMATS, check_cli_options
from rankscope.errors import InputError
from rankscope.nn.config import ModelConfig
from rankscope.train.config import PRESETS, TrainConfig, parse_pairs, resolve
from rankscope.vocab import KIND_GROUPS, NULLS, STUDY_VARIANTS, VARIANTS

README = Path(__file__).resolve().parents[1] / "README.md"
CLI = typer.main.get_command(app)
# typer ≥ 0.2x carries its own copy of click: its errors derive from typer.TyperException, --help raises typer.Exit
PARSE_ERRORS = (click.ClickException, *([typer.TyperException] if hasattr(typer, "TyperException") else []))
EXITS = (click.exceptions.Exit, typer.Exit)
SETTINGS = {f.name for f in dataclasses.fields(ModelConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}

# Commands of the README's bash blocks that are parsed and checked but not run here, each with the reason (matched
# as the start of the line's words, before $VAR substitution). Each must match exactly one README line, so a
# stale entry fails, and a new command that is not here runs: a slow one makes this test slow until it is listed.
PARSE_ONLY = {
    "rankscope analyze $GGUF --kinds qk,ov --out smol":
        "SmolLM2's 540 heads: 10 s warm, 28 s with a cold null cache on 2 busy cores; more than this file may take",
    "rankscope analyze out/ --out series --jobs 2": "needs the reader's Hugging Face Trainer output",
    "rankscope analyze ckpt-*.safetensors --out series": "needs the reader's checkpoints",
    "rankscope analyze runs/smoke-mha --out series": "needs a trained run with two or more checkpoints",
    "rankscope sql series": "queries the series the lines above write",
    "rankscope report series": "draws the series the lines above write",
    "rankscope study --preset cpu --seeds 5 --jobs 2 --out studies/cpu": "the CPU study: 53 minutes on 2 cores",
    "rankscope train --preset smoke --attention mla_prerope_coupled": "trains a BPE tokenizer and a model",
    "rankscope sql runs/smoke-mla_prerope_coupled": "queries the run of the line above",
}
OTHER_COMMANDS = {"./dev run", "./dev test"}  # bash lines that do not invoke rankscope (tests/test_hygiene.py: ./dev)

# Options whose values the commands check against a closed list: a synopsis's alternatives must be in it.
CHOICES = {"--attention": set(VARIANTS), "--preset": set(PRESETS), "--null": set(NULLS),
           "--kinds": set(KIND_GROUPS), "--variants": set(STUDY_VARIANTS)}
FORMAT_CHOICES = {"analyze": set(FORMATS), "sql": set(SQL_FORMATS)}


@dataclasses.dataclass
class Block:
    lang: str  # "python", "bash", "text" or "" (output)
    line: int  # 1-based README line of its first body line
    section: str  # the ``## `` heading it is under
    body: str


def blocks() -> list[Block]:
    found, section, fence, body, lang, start = [], "", None, [], "", 0
    for number, line in enumerate(README.read_text().splitlines(), 1):
        opening = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence is None:
            if line.startswith("## "):
                section = line
            elif opening:
                fence, lang, body, start = opening.group(1), opening.group(2), [], number + 1
        elif line.strip() == "```":
            found.append(Block(lang, start, section, "\n".join(b[len(fence):] if b.startswith(fence) else b
                                                               for b in body)))
            fence = None
        else:
            body.append(line)
    assert fence is None, "README.md: a fenced block is not closed"
    return found


def logical_lines(block: Block) -> list[tuple[int, str]]:
    """(README line, text): backslash continuations joined, and a line whose quotes are still open joined to the
    next (a transcript's query may wrap)."""
    out, pending, first = [], "", 0
    for offset, raw in enumerate(block.body.splitlines()):
        if not pending:
            first = block.line + offset
        text = (pending + " " + raw.strip()) if pending else raw
        if text.endswith("\\"):
            pending = text[:-1].rstrip()
            continue
        try:
            shlex.split(text, comments=True)
        except ValueError:  # an open quote: the command goes on
            pending = text
            continue
        pending = ""
        if text.strip():
            out.append((first, text.strip()))
    assert not pending, f"README.md:{first}: an unfinished command: {pending!r}"
    return out


def bash_commands() -> list[tuple[Block, int, str]]:
    return [(b, n, text) for b in blocks() if b.lang == "bash" for n, text in logical_lines(b)]


def transcript_commands() -> list[tuple[int, str]]:
    """(README line, command) of each ``$ rankscope ...`` line of an output block; a query may wrap."""
    out = []
    for block, lines, i, line in output_lines("$ rankscope "):
        text, more = line[2:], iter(lines[i + 1:])
        while True:
            try:
                shlex.split(text)
                break
            except ValueError:  # an open quote: the command goes on
                text += " " + next(more).strip()
        out.append((block.line + i, text))
    return out


def output_lines(start: str):
    """(block, its lines, index, line) of each line of an output or text block that starts with ``start``."""
    for block in blocks():
        if block.lang in ("", "text"):
            lines = block.body.splitlines()
            yield from ((block, lines, i, line) for i, line in enumerate(lines) if line.startswith(start))


ASSIGNMENT = re.compile(r"^([A-Za-z_]\w*)=(.*)$")


def assigned(text: str) -> str | None:
    """The variable a line sets (``NAME=$(...)...`` or a single ``NAME=word``), else None (``NAME=v cmd`` runs cmd)."""
    m = ASSIGNMENT.match(text)
    if m and (m.group(2).startswith("$(") or len(shlex.split(text, comments=True)) == 1):
        return m.group(1)
    return None


def shell_value(assignment: str) -> str:
    """The value bash gives ``NAME=...`` (command substitution included), with this venv's python on PATH."""
    name = assigned(assignment)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run(["bash", "-c", f'{assignment}\nprintf %s "${name}"'], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    return done.stdout


def split_command(text: str, variables: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """(environment, the arguments after ``rankscope``), ``$NAME`` replaced by the block's variables."""
    words = shlex.split(text, comments=True)
    env = {}
    while words and ASSIGNMENT.match(words[0]) and words[0].split("=")[0].isupper():
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words and words[0] == "rankscope", text

    def substitute(word: str) -> str:
        def value(m):
            name = m.group(1) or m.group(2)
            assert name in variables, f"${name} is not set by its block"
            return variables[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, word)

    return env, [substitute(w) for w in words[1:]]


def command_of(args: list[str]):
    """The (typer's) click command a line names (``store check`` included), the arguments left and its name."""
    command, rest, name = CLI, list(args), "rankscope"
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        name = rest[0]
        command = command.commands[rest.pop(0)]
    return command, rest, name


def check_parses(args: list[str], where: str) -> None:
    """Parse ``rankscope ARGS`` as the CLI does, then check the option values the way the command checks them
    before any work. Fails with the README line on anything the CLI would refuse."""
    command, rest, name = command_of(args)
    try:
        ctx = command.make_context(name, rest)
    except EXITS as done:  # --help, --version
        assert done.exit_code == 0, where
        return
    except PARSE_ERRORS as exc:
        raise AssertionError(f"{where}: rankscope {shlex.join(args)}: {exc.format_message()}") from exc
    if hasattr(command, "commands"):  # a group parses its own options only: the subcommand must exist
        raise AssertionError(f"{where}: rankscope {shlex.join(args)}: {name} has no such command")
    p = ctx.params
    if name == "train":
        assert p["attention"] in VARIANTS, f"{where}: --attention {p['attention']}: not one of {list(VARIANTS)}"
        resolve(p["preset"], {**VARIANTS[p["attention"]], **parse_pairs(ctx.args)})
    elif name == "study":
        chosen = [v.strip() for v in p["variants"].split(",") if v.strip()]
        assert set(chosen) <= set(STUDY_VARIANTS), f"{where}: --variants {chosen}"
        sets = dict(pair.split("=", 1) for pair in p["set_"])
        resolve(p["preset"], {**sets, **parse_pairs(ctx.args)})
    elif name == "analyze":
        check_cli_options(kinds=p["kinds"], null=p["null"], fpr=p["fpr"], out=p["out"], fmt=p["fmt"],
                          threads=p["threads"], experts=p["experts"], jobs=p["jobs"])
    elif name == "sql":
        assert p["fmt"] in SQL_FORMATS, f"{where}: --format {p['fmt']}"
        assert duckdb.extract_statements(p["query"]), f"{where}: no SQL statement"  # raises on a syntax error


def parse_only_reason(text: str) -> str | None:
    words = " ".join(shlex.split(text, comments=True))
    hits = [reason for prefix, reason in PARSE_ONLY.items() if words.startswith(prefix)]
    assert len(hits) <= 1, f"{text}: matches several PARSE_ONLY entries"
    return hits[0] if hits else None


# ---- the checks that need no run ------------------------------------------------------------------------------


def sort_commands(lines: list[tuple[int, str]]) -> tuple[list[str], dict[str, int]]:
    """(lines that are neither rankscope, an assignment nor in OTHER_COMMANDS; how many lines each PARSE_ONLY
    entry matches)."""
    unknown, used = [], {prefix: 0 for prefix in PARSE_ONLY}
    for number, text in lines:
        words = shlex.split(text, comments=True)
        if assigned(text):
            continue
        while words and ASSIGNMENT.match(words[0]):
            words.pop(0)
        if words[:1] != ["rankscope"]:
            if " ".join(words) not in OTHER_COMMANDS:
                unknown.append(f"README.md:{number}: {text}")
            continue
        for prefix in PARSE_ONLY:
            used[prefix] += " ".join(shlex.split(text, comments=True)).startswith(prefix)
    return unknown, used


def test_every_bash_line_is_a_known_kind_of_command_and_every_parse_only_entry_is_used():
    lines = [(number, text) for _, number, text in bash_commands()]
    assert len(lines) > 10 and any(b.lang == "python" for b in blocks())  # the reader found the blocks
    unknown, used = sort_commands(lines)
    assert not unknown, unknown
    assert all(n == 1 for n in used.values()), {prefix: n for prefix, n in used.items() if n != 1}
    # negative controls: a command of another kind, and a parse-only entry whose line was removed
    unknown, used = sort_commands([*lines[1:], (0, "make run")])
    assert unknown == ["README.md:0: make run"]
    without = [(n, text) for n, text in lines if "studies/cpu" not in text]
    assert sort_commands(without)[1]["rankscope study --preset cpu --seeds 5 --jobs 2 --out studies/cpu"] == 0


def test_every_rankscope_command_of_the_readme_parses_against_the_real_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out directories are checked for writability here, never made
    variables: dict[str, str] = {}
    last_block = None
    checked = 0
    for block, number, text in bash_commands():
        if block is not last_block:
            variables, last_block = {}, block
        if assigned(text):
            variables[assigned(text)] = shell_value(text)
            continue
        if "rankscope" not in shlex.split(text, comments=True):
            continue
        _, args = split_command(text, variables)
        check_parses(args, f"README.md:{number}")
        checked += 1
    for number, text in transcript_commands():
        _, args = split_command(text, {})
        check_parses(args, f"README.md:{number}")
        checked += 1
    assert checked >= 15


def test_a_bad_command_fails_the_parse_check(tmp_path, monkeypatch):
    """Negative controls: each kind of drift the parse check is there to catch."""
    monkeypatch.chdir(tmp_path)
    bad = [
        ["analyze", "m", "--kind", "qk"],  # a misspelt option
        ["analyze", "m", "--fpr", "often"],  # a bad type
        ["analyze", "m", "--kinds", "attention"],  # an unknown kind group
        ["train", "--attention", "mla_prerope", "--rope_mode", "coupled"],  # the old variant names
        ["train", "--preset", "smoke", "--learning_rate", "1e-3"],  # no such setting
        ["study", "--variants", "mha,mla"],  # no such variant
        ["sql", "runs/x", "select step from train where \"null\" = \\'product\\'"],  # shell quoting gone wrong
        ["sql", "runs/x", "select 1", "--format", "yaml"],
        ["store", "verify", "runs/x"],  # no such subcommand: store is a group, "verify" an extra argument
    ]
    for args in bad:
        with pytest.raises((AssertionError, InputError, duckdb.Error)):
            check_parses(args, "control")
    check_parses(["train", "--attention", "mla_prerope_coupled", "--n_layer", "2"], "control")  # and a good one


def synopses() -> list[tuple[int, str]]:
    """(README line, text) of each synopsis: a line of an output or text block that starts with ``rankscope ``,
    with its indented continuation lines, its comment cut."""
    out = []
    for block, lines, i, line in output_lines("rankscope "):
        text = line
        for more in lines[i + 1:]:
            if not more.startswith(" ") or more.strip().startswith(("rankscope", "$")):
                break
            text += " " + more.strip()
        out.append((block.line + i, text.split(" # ")[0]))
    return out


def check_synopsis(text: str, where: str) -> None:
    """Each ``--option`` a synopsis names exists (train and study also take ``--key value`` settings), and the
    alternatives it lists for an option with a closed set of values are accepted."""
    command, _, name = command_of(text.split()[1:])
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for option in re.findall(r"--[a-z][\w-]*", text):
        if name in ("train", "study") and (option == "--key" or option[2:] in SETTINGS):
            continue
        assert option in known, f"{where}: rankscope {name} has no option {option}"
    for option, values in re.findall(r"(--[a-z][\w-]*)[ =]([\w.:|,]+)", text):
        allowed = FORMAT_CHOICES.get(name) if option == "--format" else CHOICES.get(option)
        if allowed is not None:
            given = set(re.split(r"[|,]", values)) - {"..."}
            assert given <= allowed, f"{where}: {option} {sorted(given - allowed)}: not accepted"


def test_every_synopsis_names_real_options_and_accepted_choices():
    found = synopses()
    assert {text.split()[1] for _, text in found} >= {"analyze", "describe", "diff", "train", "sql", "study", "report"}
    for number, text in found:
        check_synopsis(text, f"README.md:{number}")
    for bad in ("rankscope analyze PATH [--kind qk]", "rankscope train [--attention mha|mla_prerope]",
                "rankscope analyze PATH [--format table|xlsx]", "rankscope study [--variants mha,mla]",
                "rankscope sql DIR QUERY [--format table|parquet]"):  # negative controls
        with pytest.raises(AssertionError):
            check_synopsis(bad, "control")


# ---- the blocks, run in order -----------------------------------------------------------------------------------


def test_the_readme_python_blocks_and_cheap_commands_run_in_order(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything the README runs is offline
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr(rankscope.cli.console, "width", 200)
    import matplotlib.pyplot as plt

    runner = CliRunner()
    namespace: dict = {}
    section = None
    variables: dict[str, str] = {}
    ran = {"python": 0, "rankscope": 0}
    for block in blocks():
        if block.section != section:
            namespace, section = {"__name__": "readme"}, block.section
        if block.lang == "python":
            exec(compile(block.body, f"README.md:{block.line}", "exec"), namespace)  # a traceback names the line
            plt.close("all")
            ran["python"] += 1
        elif block.lang == "bash":
            variables = {}
            for number, text in logical_lines(block):
                if assigned(text):
                    variables[assigned(text)] = shell_value(text)
                    continue
                if "rankscope" not in shlex.split(text, comments=True) or parse_only_reason(text):
                    continue
                env, args = split_command(text, variables)
                result = runner.invoke(app, args, env=env)
                assert result.exit_code == 0, f"README.md:{number}: {text}\n{result.output}\n{result.exception!r}"
                ran["rankscope"] += 1
    assert ran["python"] >= 5 and ran["rankscope"] >= 4, ran
    assert (tmp_path / "out" / "analysis.csv").exists() and (tmp_path / "runs" / "hf").is_dir()
