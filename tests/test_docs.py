"""The docs tell the truth about the code: the configuration reference is generated from the
schema, every key has its line, every path and link named exists, and every shell block is run
by a named test or says why not."""

import json
import os
import re
import subprocess

import pytest

from tests import harness
from vncgate import config, reference

DOCS = os.path.join(harness.REPO, "docs")
SHELL = {"", "sh", "bash", "shell", "console"}
RUN_BY = re.compile(r"<!-- run by (tests/[\w/]+\.py)::(\w+) -->")
NOT_RUN = re.compile(r"<!-- not run: \S.* -->")


def pages():
    """README.md and every docs/*.md: (path relative to the repository, text)."""
    names = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(DOCS) if name.endswith(".md"))
    return [(name, open(os.path.join(harness.REPO, name), encoding="utf-8").read()) for name in names]


def shell_blocks(text):
    """(line number, language, the line before the fence) of every fenced block."""
    lines, blocks, inside = text.splitlines(), [], False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            if not inside:
                before = next((previous for previous in reversed(lines[:number]) if previous.strip()), "")
                blocks.append((number + 1, line[3:].strip(), before.strip()))
            inside = not inside
    return blocks


def indented_commands(text):
    """Line numbers of indented code blocks (outside fences, after a blank line) that start with a command."""
    lines, found, inside = text.splitlines(), [], False
    for number, line in enumerate(lines):
        if line.startswith("```"):
            inside = not inside
        elif (not inside and number and not lines[number - 1].strip()
              and re.match(r"    (\$ )?(python3?|pip|vncgate|vncgate-token|vncgate-connect|curl|scripts/|sudo)\b", line)):
            found.append(number + 1)
    return found


def test_every_config_key_has_a_doc():
    assert set(config.DEFAULTS) - set(reference.KEY_DOCS) == set(), "add a line for it to KEY_DOCS in vncgate/reference.py"
    assert set(reference.KEY_DOCS) - set(config.DEFAULTS) == set(), "KEY_DOCS names a key Config does not have"


def test_the_configuration_page_is_generated_from_the_schema():
    with open(os.path.join(DOCS, "configuration.md"), encoding="utf-8") as page:
        assert page.read() == reference.reference(), \
            "regenerate: python3 -m vncgate.reference > docs/configuration.md"


def test_the_reference_shows_each_key_with_its_default():
    text = reference.reference()
    for key in config.DEFAULTS:
        assert re.search(rf"^\| `{key}` \| ", text, re.M), key
    assert "| `port` | `6080` | 1 to 65535 |" in text and "| `audit_log` | (empty) |" in text


@pytest.mark.parametrize("name,text", pages(), ids=[name for name, _ in pages()])
def test_every_shell_block_is_run_by_a_test_or_marked(name, text):
    problems = []
    for line, language, before in shell_blocks(text):
        if language not in SHELL:
            continue
        run_by = RUN_BY.fullmatch(before)
        if run_by:
            path, test = run_by.groups()
            module = os.path.join(harness.REPO, path)
            if not os.path.exists(module) or not re.search(rf"^def {test}\(", open(module).read(), re.M):
                problems.append(f"{name}:{line}: {path} has no {test}")
        elif not NOT_RUN.fullmatch(before):
            problems.append(f"{name}:{line}: a shell block (```{language}) needs '<!-- run by tests/FILE.py::TEST -->'"
                            " or '<!-- not run: why -->' on the line before; label other blocks (```text, ```ini)")
    problems += [f"{name}:{line}: a command in an indented block: fence it (```sh) and mark it"
                 for line in indented_commands(text)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name,text", pages(), ids=[name for name, _ in pages()])
def test_every_path_and_link_named_exists(name, text):
    folder = os.path.dirname(os.path.join(harness.REPO, name))
    problems = [f"{name} names {path}, which does not exist"
                for path in re.findall(r"(?<![\w/.])vncgate/[\w/.-]*[\w/]", text)
                if not os.path.exists(os.path.join(harness.REPO, path))]
    problems += [f"{name} links to {target}, which does not exist"
                 for target in re.findall(r"\]\(([^)\s]+)\)", text)
                 if not re.match(r"[a-z]+:", target) and not target.startswith("#")
                 and not os.path.exists(os.path.join(folder, target.split("#")[0]))]
    assert not problems, "\n".join(problems)


def test_the_readme_is_short():
    assert len(open(os.path.join(harness.REPO, "README.md"), encoding="utf-8").read().splitlines()) <= 250


def marked_blocks(test):
    """The shell blocks of every page marked as run by tests/test_docs.py::test."""
    found = []
    for name, text in pages():
        lines = text.splitlines()
        for line, _, before in shell_blocks(text):
            if before == f"<!-- run by tests/test_docs.py::{test} -->":
                end = lines.index("```", line)
                found.append((f"{name}:{line}", "\n".join(lines[line:end])))
    return found


def test_offline_blocks_run(tmp_path):
    """Blocks that only mint (no console is reached at mint time) run as written, in a folder
    without a vncgate.ini (the built-in defaults: ./vncgate.db), and leave their tokens listed."""
    blocks = marked_blocks("test_offline_blocks_run")
    assert len(blocks) >= 2
    env = {key: value for key, value in os.environ.items() if key != "VNCGATE_CONFIG"}
    env["PATH"] = os.path.dirname(harness.console_script("vncgate-token")) + os.pathsep + env["PATH"]
    for where, block in blocks:
        folder = tmp_path / where.replace("/", "-").replace(":", "-")
        folder.mkdir()
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, f"{where}: {run.stderr}"
        minted = len(re.findall(r"^vncgate-token add ", block, re.M))
        assert len(re.findall(r"^https?://\S+token", run.stdout, re.M)) == minted, f"{where}: {run.stdout}"
        listed = subprocess.run(["vncgate-token", "list", "--json"], cwd=folder, env=env, capture_output=True,
                                text=True, timeout=60, check=True).stdout
        assert len(json.loads(listed)) == minted, where
