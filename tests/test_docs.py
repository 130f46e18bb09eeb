"""The README and docs/ cannot rot: every relative link and anchor resolves, every script they
name exists and accepts every flag shown with it, and every `train.py` command they show
composes with Hydra (no training), so a renamed key, group or flag breaks this test first."""

import ast
import re
import shlex
from functools import cache
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SCRIPT = re.compile(r"\bscripts/([\w.-]+\.(?:py|sh))\b")
# Shell words that end one command on a line (a pipe, a chain, a redirect, a comment).
COMMAND_END = {"|", "||", "&&", ";", ">", "2>&1", "#"}
COMMAND_START = {"python", "python3", "torchrun", "srun", "sbatch"}


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, markup and punctuation dropped, spaces to
    hyphens (hyphens and underscores kept)."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


def command_lines(page: Path) -> list[str]:
    """Commands (lines starting with python, torchrun, srun, sbatch or scripts/) of the page's
    fenced code blocks, continuations joined, and its inline code spans that start with `python`."""
    text = page.read_text()
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "shell", ""):
            lines += [line.strip().lstrip("$ ") for line in body.replace("\\\n", " ").splitlines()]
    inline = FENCE.sub("", text).replace("\n", " ")
    lines += re.findall(r"`(python [^`]+)`", inline)
    return [line for line in lines if line.split(" ")[0] in COMMAND_START or line.startswith("scripts/")]


def words_after(line: str, marker: str) -> list[str]:
    """The words of the command that follow `marker`, optional `[...]` groups opened, up to the
    end of that command."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split, lexer.commenters = True, ""
    words = [_unbracket(w) for w in lexer]
    start = next(i for i, w in enumerate(words) if w.endswith(marker)) + 1
    out = []
    for word in words[start:]:
        if word in COMMAND_END or word.startswith("#"):
            break
        out.append(word)
    return out


def _unbracket(word: str) -> str:
    """`[--force]`, `[data=local` and `data.path=val.jsonl]` are optional groups of a usage line;
    `quant.rules=[{...}]` is a value."""
    word = word.removeprefix("[") if word.startswith("[") and not word.startswith("[{") else word
    return word[:-1] if word.endswith("]") and word.count("]") > word.count("[") else word


@cache
def script_flags(name: str) -> set[str]:
    """The option strings a script's argument parser is given (read from its source: importing
    every script would pull in torchao and transformers)."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / "scripts" / name).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return found | {"-h", "--help"}


def shown_commands():
    for page in DOCS:
        for line in command_lines(page):
            yield page, line


def train_overrides(line: str) -> list[str]:
    """The overrides of a `train.py` command; a multirun's sweeps `a=1,2` take their first value,
    shell substitutions (`$(cat rules.yaml)`) and `...` are left out."""
    words = [w for w in words_after(line, "train.py") if w not in ("-m", "--multirun", "...") and "$" not in w]
    parsed = OverridesParser.create().parse_overrides(words)
    return [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line for o in parsed]


TRAIN_COMMANDS = [(p, line) for p, line in shown_commands() if re.search(r"(^|[\s/])train\.py(\s|$)", line)]
SCRIPT_COMMANDS = [(p, line, m.group(1)) for p, line in shown_commands() for m in SCRIPT.finditer(line) if m.group(1).endswith(".py")]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    for link in links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: link {link!r} -> {target} does not exist"
        if anchor:
            assert target.suffix == ".md", f"{page.name}: anchor on a non-page link {link!r}"
            assert anchor in anchors(target), f"{page.name}: no heading in {target.name} has the anchor #{anchor}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_script_named_exists(page):
    for name in SCRIPT.findall(page.read_text()):
        assert (ROOT / "scripts" / name).is_file(), f"{page.name} names scripts/{name}, which does not exist"


@pytest.mark.parametrize(("page", "line", "script"), SCRIPT_COMMANDS, ids=lambda x: x.name if isinstance(x, Path) else x[:70])
def test_every_flag_shown_with_a_script_is_accepted_by_its_parser(page, line, script):
    flags = {w.split("=")[0] for w in words_after(line, f"scripts/{script}") if w.startswith("-") and not re.match(r"-\d", w)}
    unknown = flags - script_flags(script)
    assert not unknown, f"{page.name}: scripts/{script} has no option {sorted(unknown)} (shown in: {line})"


@pytest.mark.parametrize(("page", "line"), TRAIN_COMMANDS, ids=lambda x: x.name if isinstance(x, Path) else x[:70])
def test_every_train_command_shown_composes(page, line):
    overrides = train_overrides(line)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    assert "model" in cfg and "quant" in cfg, (page.name, line)


def test_the_docs_show_commands_to_check():
    # The extraction itself must keep finding what the pages show.
    assert len(TRAIN_COMMANDS) >= 30 and len(SCRIPT_COMMANDS) >= 30, (len(TRAIN_COMMANDS), len(SCRIPT_COMMANDS))
    scripts = {s for _, _, s in SCRIPT_COMMANDS}
    assert {"export.py", "export_gguf.py", "ptq.py", "evaluate.py", "compare_torchao.py", "fit_scaling_law.py"} <= scripts


def test_github_slug_matches_githubs_anchors():
    assert github_slug("The first run") == "the-first-run"
    assert github_slug("Distillation from the 16-bit model (`distill=kd`)") == "distillation-from-the-16-bit-model-distillkd"
    assert github_slug("llama.cpp's own formats: Q4_0 / Q4_1 (2026-12-06)") == "llamacpps-own-formats-q4_0--q4_1-2026-12-06"


PROJECT_PATH = re.compile(r"`((?:qat|models|kernels|scripts|tests|configs)/[\w/.-]+\.(?:py|yaml|sh))`")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_project_file_named_exists(page):
    missing = [path for path in PROJECT_PATH.findall(page.read_text()) if not (ROOT / path).is_file()]
    assert not missing, f"{page.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("page", [ROOT / "README.md", ROOT / "docs" / "code.md"], ids=lambda p: p.name)
def test_the_layout_lists_every_package(page):
    packages = [p.parent.relative_to(ROOT).as_posix() + "/" for p in (ROOT / "qat").glob("*/__init__.py")]
    missing = [p for p in packages if not re.search(rf"^{re.escape(p)}\s", page.read_text(), re.M)]
    assert not missing, f"the layout in {page.name} leaves out {missing}"


TOPIC_PAGES = [p for p in DOCS if p.parent.name == "docs" and p.name not in ("results.md", "benchmarks.md")]


@pytest.mark.parametrize("page", TOPIC_PAGES, ids=lambda p: p.name)
def test_a_topic_page_says_what_it_covers_and_shows_commands_first(page):
    text = page.read_text()
    first_paragraph = text.split("\n\n")[1]
    assert first_paragraph.startswith("This page covers"), f"{page.name} starts with {first_paragraph[:60]!r}"
    if page.name != "code.md":  # the code tour has no command
        first_section = text.find("\n## ") % (len(text) + 1)  # the end of a page without sections
        assert text.index("```") < first_section, f"{page.name}: the first section comes before any command"


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the rest belongs in docs/"
