"""The documentation's commands are real: every command line in a fenced code block of README.md
and docs/*.md that runs `revjepa <sub>` (or `python -m revjepa <sub>`, or the seed's scripts
`train_jepa.py` / `evaluate_all_splits.py`, which are `train` / `evaluate`) names a subcommand
that exists and only flags that the subcommand's parser has.

The real subcommands and flags come from the CLI's own `--help` output, run in-process once per
subcommand: every `--flag` that the help text names counts, which includes the negations that
the help mentions but does not list (`--no_jepa`, `--untie_embeddings`, ...).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from revjepa.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Fenced blocks in these languages hold no shell commands (a sweep spec, JSON, code).
NON_SHELL_LANGS = {"yaml", "yml", "json", "python", "py", "toml"}
# The seed's scripts and the subcommand each one is.
SCRIPT_ALIASES = {"train_jepa.py": "train", "evaluate_all_splits.py": "evaluate"}
# Programs that may run the command (python -m revjepa, torchrun train_jepa.py, srun ...).
LAUNCHERS = re.compile(r"^(python[\d.]*|torchrun|srun|time|nohup|exec|env|\$\w+|\$\{\w+\})$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
FLAG = re.compile(r"^[\[(]*(--[A-Za-z0-9][\w-]*)")
HELP_FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w-]*")
SHELL_OPERATOR = re.compile(r"^[;&|<>()]+$")


@dataclass(frozen=True)
class DocCommand:
    path: Path
    line: int  # 1-based line of the command's first physical line
    text: str  # the logical line (continuations joined, comment dropped)
    sub: str  # the subcommand as written (train for the seed's train_jepa.py)
    flags: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


# ----------------------------------------------------------------------------- the real CLI


def _help_text(argv: list[str]) -> str:
    """What `revjepa ARGV` prints on stdout (in-process; wide lines so no flag is wrapped)."""
    out = io.StringIO()
    old_columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "250"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                main(argv)
            except SystemExit:  # argparse's --help exits
                pass
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns
    return out.getvalue()


@functools.cache
def real_subcommands() -> frozenset[str]:
    """The subcommands of `revjepa --help` (`usage: revjepa {gen-data, train, ...}`)."""
    match = re.search(r"\{([^}]*)\}", _help_text(["--help"]))
    assert match, "revjepa --help names no subcommands"
    return frozenset(name.strip() for name in match.group(1).split(",") if name.strip())


@functools.cache
def real_flags(sub: str) -> frozenset[str]:
    """Every --flag that `revjepa SUB --help` names."""
    text = _help_text([sub, "--help"])
    assert text.strip(), f"revjepa {sub} --help printed nothing"
    return frozenset(HELP_FLAG.findall(text))


# ----------------------------------------------------------------------------- the docs


def _fenced_lines(text: str):
    """(line number, line) of every line inside a shell-like fenced code block."""
    fence: str | None = None
    shell = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            if stripped.startswith("```"):
                fence = stripped[: len(stripped) - len(stripped.lstrip("`"))]
                lang = stripped[len(fence) :].strip().split(" ")[0].lower()
                shell = lang not in NON_SHELL_LANGS
        elif stripped.startswith(fence) and not stripped.strip("`"):
            fence = None
        elif shell:
            yield number, line


def _logical_lines(text: str):
    """(first line number, logical line): backslash continuations joined."""
    start, parts = None, []
    for number, line in _fenced_lines(text):
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(p.strip() for p in parts)
        start, parts = None, []
    if parts:
        yield start, " ".join(p.strip() for p in parts)


def _tokens(line: str) -> list[str]:
    """Shell words of a line, `# comment` dropped, operators (`&&`, `|`, `>`) as their own words."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # an unbalanced quote: fall back to plain words
        return re.sub(r"(^|\s)#.*$", "", line).split()


def _segments(tokens: list[str]):
    """The simple commands of a token list (split at ;, &&, ||, |, redirections)."""
    segment: list[str] = []
    for token in tokens:
        if SHELL_OPERATOR.match(token):
            if segment:
                yield segment
            segment = []
        else:
            segment.append(token)
    if segment:
        yield segment


def _at_command_position(prefix: list[str]) -> bool:
    """True if what precedes the program is only VAR=value words and, optionally, a launcher
    (python -m, torchrun with its own options, srun, ...)."""
    rest = list(prefix)
    while rest and ENV_ASSIGNMENT.match(rest[0]):
        rest.pop(0)
    return not rest or bool(LAUNCHERS.match(rest[0].rsplit("/", 1)[-1]))


def _command_of(segment: list[str]) -> tuple[str, list[str]] | None:
    """(subcommand, its arguments) if the segment runs revjepa or a seed script, else None."""
    for i, token in enumerate(segment):
        name = token.rsplit("/", 1)[-1]
        if name == "revjepa" and _at_command_position(segment[:i]):
            sub = segment[i + 1] if i + 1 < len(segment) else ""
            return sub, segment[i + 2 :]
        if name in SCRIPT_ALIASES and _at_command_position(segment[:i]):
            return SCRIPT_ALIASES[name], segment[i + 1 :]
    return None


def commands_in(path: Path) -> list[DocCommand]:
    found = []
    for number, line in _logical_lines(path.read_text(encoding="utf-8")):
        if not re.search(r"revjepa|train_jepa\.py|evaluate_all_splits\.py", line):
            continue
        tokens = _tokens(line)
        for segment in _segments(tokens):
            command = _command_of(segment)
            if command is None:
                continue
            sub, args = command
            flags = tuple(m.group(1) for a in args if (m := FLAG.match(a)))
            text = " ".join(tokens)
            found.append(DocCommand(path, number, text, sub, flags))
    return found


def problems_of(command: DocCommand) -> list[str]:
    """What is wrong with one documented command (empty: nothing)."""
    if command.sub not in real_subcommands():
        return [
            f"{command.where}: unknown subcommand {command.sub!r} "
            f"(real: {', '.join(sorted(real_subcommands()))}): {command.text}"
        ]
    unknown = [f for f in command.flags if f not in real_flags(command.sub)]
    if unknown:
        return [
            f"{command.where}: revjepa {command.sub} has no flag {', '.join(unknown)}: "
            f"{command.text}"
        ]
    return []


def problems_in(path: Path) -> list[str]:
    return [p for c in commands_in(path) for p in problems_of(c)]


DOC_COMMANDS = [c for path in DOC_FILES for c in commands_in(path)]


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=lambda c: c.where)
def test_documented_command_is_real(command):
    assert problems_of(command) == []


def test_docs_hold_commands():
    """The extraction works on the real docs: every doc page is read, and every subcommand has
    at least one example command in a code block."""
    assert {p.name for p in DOC_FILES} >= {
        "README.md",
        "cli.md",
        "experiments.md",
        "clusters.md",
        "families.md",
        "reproduce.md",
        "recovery.md",
    }
    documented = {c.sub for c in DOC_COMMANDS}
    missing = real_subcommands() - documented
    assert not missing, f"subcommands with no example command in the docs: {sorted(missing)}"


def test_real_flags_come_from_help():
    assert {"train", "evaluate", "sweep", "report"} <= real_subcommands()
    train = real_flags("train")
    assert {"--max_steps", "--resume_from", "--bf16", "--config"} <= train
    assert {"--no_jepa", "--untie_embeddings", "--no_position_embeddings"} <= train
    assert "--checkpoint" in real_flags("evaluate")
    assert "--max_steps" not in real_flags("evaluate")


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(body, encoding="utf-8")
    return path


def test_made_up_flag_is_caught(tmp_path):
    doc = _write(tmp_path, "Text.\n\n```bash\nrevjepa train --max_steps 10 --no_such_flag 3\n```\n")
    problems = problems_in(doc)
    assert len(problems) == 1
    assert "revjepa train has no flag --no_such_flag: " in problems[0]
    assert "page.md:4" in problems[0]


def test_flag_of_another_subcommand_is_caught(tmp_path):
    doc = _write(
        tmp_path, "```\npython evaluate_all_splits.py --checkpoint c.pt --max_steps 5\n```\n"
    )
    problems = problems_in(doc)
    assert len(problems) == 1 and "evaluate has no flag --max_steps" in problems[0]


def test_unknown_subcommand_is_caught(tmp_path):
    doc = _write(tmp_path, "```bash\npython -m revjepa trian --max_steps 5\n```\n")
    problems = problems_in(doc)
    assert len(problems) == 1 and "unknown subcommand 'trian'" in problems[0]


def test_continuations_placeholders_comments_and_launchers(tmp_path):
    doc = _write(
        tmp_path,
        "```bash\n"
        "# a comment line: revjepa train --not_checked\n"
        "OMP_NUM_THREADS=1 revjepa train --data_dir $DATA \\\n"
        '    --output_dir "$OUT/run" \\\n'
        "    --bogus_flag 1   # and a comment --also_not_checked\n"
        "torchrun --nproc_per_node 4 train_jepa.py --output_dir runs/x --max_steps=10\n"
        ".venv/bin/revjepa evaluate --checkpoint x > out.txt && revjepa plot runs/x --out p.png\n"
        "sbatch train_jepa_osc.sh\n"
        "pip install 'revjepa[wandb]'\n"
        "```\n"
        "```yaml\n"
        "base:   # revjepa train --neither_checked\n"
        "```\n",
    )
    commands = commands_in(doc)
    assert [(c.line, c.sub, c.flags) for c in commands] == [
        (3, "train", ("--data_dir", "--output_dir", "--bogus_flag")),
        (6, "train", ("--output_dir", "--max_steps")),
        (7, "evaluate", ("--checkpoint",)),
        (7, "plot", ("--out",)),
    ]
    problems = problems_in(doc)
    assert len(problems) == 1 and "--bogus_flag" in problems[0] and "page.md:3" in problems[0]
