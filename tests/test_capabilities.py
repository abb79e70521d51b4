"""Every capability is a section of app.py that can be deleted: cut the section (its knobs are
in it) and its line in create_app(), and what remains is a server that passes the core tests.
For each section this writes the cut file to a folder of its own, beside copies of the core
tests, and runs them there: the server starts as a process and answers, and test_completions.py
passes."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

SECTIONS = [
    "Remote engines",
    "Chat",
    "Speculation",
    "Drafts",
    "Repository context",
    "Status page and /metrics",
    "Tokens per developer",
    "Hugging Face download",
]
CORE_TESTS = ["conftest.py", "tinymodel.py", "tabbyagent.py", "test_completions.py"]
SERVES = """
import json
import urllib.request

from conftest import start_server, stop


def test_the_cut_server_starts_and_answers(model_path, tmp_path):
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path)])
    try:
        body = {"language": "python", "segments": {"prefix": "def f(a, b):\\n    ", "suffix": "\\n"}}
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response)["choices"][0]["text"] == "total = a + b\\n    return total"
        with urllib.request.urlopen(url + "/v1/health", timeout=30) as response:
            assert json.load(response)["model"].endswith(".gguf")
    finally:
        stop(proc)
"""


def cut(source, name):
    """source without the section titled name and its line in create_app()."""
    lines = source.splitlines(keepends=True)
    rule = "# " + "-" * 95 + "\n"
    start = next(i for i, line in enumerate(lines) if re.match(rf"# {re.escape(name)}[ :(]", line))
    assert lines[start - 1] == rule, name
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(("# ---", "# ===")))
    section = "".join(lines[start - 1 : end])
    adds = re.findall(r"^def (add_\w+)\(server\)", section, re.M)
    assert len(adds) == 1, (name, adds)  # one line attaches it
    kept = lines[: start - 1] + lines[end:]
    attach = [i for i, line in enumerate(kept) if line.strip() == f"{adds[0]}(server)"]
    assert len(attach) == 1, (name, adds)
    del kept[attach[0]]
    return "".join(kept)


def test_the_core_comes_first_and_names_nothing_after_it():
    source = open(os.path.join(ROOT, "app.py")).read()
    core, rest = source.split("\n# Capabilities beyond the core\n")
    assert core.count("\n") + 1 <= 1800
    after = {node.name if hasattr(node, "name") else node.targets[0].id
             for node in ast.parse(rest).body
             if isinstance(node, (ast.FunctionDef, ast.ClassDef)) or isinstance(node, ast.Assign)
             and isinstance(node.targets[0], ast.Name)} - {"create_app"}  # fmt: skip
    used = {node.id for node in ast.walk(ast.parse(core)) if isinstance(node, ast.Name)}
    assert len(after) > 50 and not after & used


@pytest.mark.parametrize("name", SECTIONS)
def test_a_capability_deleted_leaves_a_server_that_passes_the_core_tests(name, tmp_path):
    source = open(os.path.join(ROOT, "app.py")).read()
    cut_source = cut(source, name)
    assert len(cut_source) < len(source) - 1000
    (tmp_path / "app.py").write_text(cut_source)
    tests = tmp_path / "tests"
    tests.mkdir()
    for file in CORE_TESTS:
        shutil.copy(os.path.join(ROOT, "tests", file), tests / file)
    (tests / "test_serves.py").write_text(SERVES)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "F821", "--no-cache",
                           str(tmp_path / "app.py")], capture_output=True, text=True)  # fmt: skip
    assert lint.returncode == 0, lint.stdout  # nothing left names what went
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TABBYPY_", "FLASK_"))}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(tests)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_the_readme_lays_out_the_code_as_it_is():
    """README's "How the code is laid out": the core's last line where it is, and every section
    of app.py in its table, with its lines within 10 %."""
    source = open(os.path.join(ROOT, "app.py")).read().splitlines()
    rules = [i for i, line in enumerate(source) if line in ("# " + "-" * 95, "# " + "=" * 95)]
    rules.append(len(source))
    sections = {source[a + 1][2:]: b - a for a, b in zip(rules, rules[1:])}
    del sections[next(title for title in sections if title.startswith("Each section below"))]
    readme = open(os.path.join(ROOT, "README.md")).read()
    layout = readme[readme.index("## How the code is laid out") :]
    marker = source.index("# Capabilities beyond the core") + 1
    said = re.search(r"`# Capabilities beyond the core`\s+\(line ([\d,]+);", layout)
    assert said and said[1] == f"{marker:,}", said
    rows = [line.split("|")[1:-1] for line in layout.splitlines() if line.startswith("| ")][1:]
    cells = [cell.strip() for row in rows for cell in row if cell.strip()]
    listed = dict(zip(cells[::2], cells[1::2]))
    assert len(listed) == len(sections), (sorted(listed), sorted(sections))
    for name, lines in listed.items():
        title = next(t for t in sections if re.match(rf"{re.escape(name)}[ :(,]", t))
        assert abs(int(lines) - sections[title]) <= 0.1 * sections[title], (name, lines)
