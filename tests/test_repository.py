"""Repository context (--repo): a git repository made here, indexed in SQLite, and the right
chunk of another file in the prompt of a completion that calls into it."""

import os
import re
import subprocess
import sys
import time

import llama_cpp
import pytest
from conftest import ROOT, read_events, start_server, stop
from tabbyagent import Agent, LinesAgent, install

import app as server

FILES = {
    "calc/ops.py": (
        "def compute_total(items, tax):\n"
        '    """Sum the items and add the tax."""\n'
        "    return sum(items) * (1 + tax)\n"
        "\n\n"
        "def unrelated_helper():\n"
        "    return 42\n"
    ),
    "calc/main.py": "from calc.ops import compute_total\n\n\ndef run(cart):\n    return compute_total(",
    "web/app.js": "function compute_total(items) {\n  return items.reduce((a, b) => a + b, 0);\n}\n",
    "README.md": "# compute_total\n",
}
PREFIX = FILES["calc/main.py"]
REMOTE = "https://github.com/acme/shop.git"


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def repo(tmp_path):
    """A git checkout named shop, with a remote, and the files above committed."""
    path = tmp_path / "shop"
    for name, text in FILES.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git("init", "-q", cwd=path)
    git("remote", "add", "origin", REMOTE, cwd=path)
    git("add", ".", cwd=path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "shop", cwd=path)
    return path


def snippets(client, git_url=REMOTE, filepath="calc/main.py", language="python", **debug):
    body = {"language": language, "segments": {"prefix": PREFIX, "suffix": "\n", "filepath": filepath,
                                               "git_url": git_url},
            "debug_options": {"return_snippets": True, "return_prompt": True, **debug}}  # fmt: skip
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.json["debug_data"].get("snippets", []), r.json["debug_data"]["prompt"]


def test_the_definition_of_the_function_being_called_comes_into_the_prompt(make_app, repo):
    app, events = make_app(repo=(str(repo),))
    found, prompt = snippets(app.test_client())
    assert [s["filepath"] for s in found] == ["calc/ops.py"]  # not main.py itself, not app.js
    assert found[0]["body"].startswith("def compute_total(items, tax):")
    assert "# Path: calc/ops.py\n# def compute_total(items, tax):\n" in prompt
    [event] = [e["event"]["completion"] for e in read_events(events)]
    assert "def compute_total(items, tax)" in event["prompt"] and event["snippets"] == found


@pytest.mark.parametrize("git_url", [REMOTE, "https://github.com/acme/shop", "git@github.com:acme/shop.git",
                                     "ssh://git@github.com/acme/shop.git", "https://me:s3cret@github.com/acme/shop.git",
                                     "https://gitlab.example/fork/shop.git"])  # fmt: skip
def test_git_url_in_each_spelling_finds_the_repository(make_app, repo, git_url):
    found, _ = snippets(make_app(repo=(str(repo),))[0].test_client(), git_url=git_url)
    assert [s["filepath"] for s in found] == ["calc/ops.py"]  # the last one: by its name


def test_another_repository_or_language_gets_nothing(make_app, repo):
    client = make_app(repo=(str(repo),))[0].test_client()
    assert snippets(client, git_url="https://github.com/acme/other.git")[0] == []
    assert (
        snippets(client, language="javascript", filepath="web/other.js")[0][0]["filepath"]
        == "web/app.js"
    )
    assert snippets(client, language="go", filepath="x.go")[0] == []
    assert snippets(client, disable_retrieval_augmented_code_completion=True)[0] == []
    # without a git_url: an absolute path inside the checkout, or the only repository
    assert (
        snippets(client, git_url=None, filepath=str(repo / "calc" / "main.py"))[0][0]["filepath"]
        == "calc/ops.py"
    )
    assert snippets(client, git_url=None, filepath=None)[0][0]["filepath"] == "calc/ops.py"


def test_a_file_url_is_cloned_and_health_says_what_is_indexed(make_app, repo, tmp_path):
    app, _ = make_app(repo=("file://" + str(repo),))
    client = app.test_client()
    assert (tmp_path / "tabby" / "repositories").is_dir()
    assert [s["filepath"] for s in snippets(client, git_url="file://" + str(repo))[0]] == [
        "calc/ops.py"
    ]
    assert [s["filepath"] for s in snippets(client)[0]] == [
        "calc/ops.py"
    ]  # matched by its name, shop
    [info] = client.get("/v1/health").json["repositories"]
    assert (info["name"], info["files"], info["chunks"]) == ("shop", 3, 3)  # README.md is not code


def seconds_until(done, timeout=10):
    """How long until done() says yes (None: not within timeout seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if done():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_a_repository_that_changes_is_indexed_again(make_app, repo):
    """Every --repo-refresh seconds (and a moment to index what changed: 0.5 s here, on 2 busy
    cores, for a repository this small)."""
    client = make_app(repo=(str(repo),), repo_refresh=1)[0].test_client()
    ops = repo / "calc" / "ops.py"
    ops.write_text(FILES["calc/ops.py"].replace("compute_total", "total_of"))  # no longer defined
    took = [seconds_until(lambda: snippets(client)[0] == [])]
    ops.write_text(FILES["calc/ops.py"])
    took.append(
        seconds_until(lambda: [s["filepath"] for s in snippets(client)[0]] == ["calc/ops.py"])
    )
    assert None not in took and max(took) < 1.5, took


def test_the_editors_snippets_come_first_in_the_budget(make_app, repo):
    client = make_app(repo=(str(repo),))[0].test_client()
    declarations = [{"filepath": "d.py", "body": "x = 1\n" * 90}]  # 540 of the 768 characters
    found, _ = snippets(client)
    body = {"language": "python", "segments": {"prefix": PREFIX, "suffix": "\n", "filepath": "calc/main.py",
                                               "git_url": REMOTE, "declarations": declarations},
            "debug_options": {"return_snippets": True}}  # fmt: skip
    picked = client.post("/v1/completions", json=body).json["debug_data"]["snippets"]
    assert [s["filepath"] for s in picked] == ["d.py"]  # 228 left: no search (Tabby's 256)
    assert len(found[0]["body"]) <= 768


def run(args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABBYPY_")}
    return subprocess.run([sys.executable, os.path.join(ROOT, "app.py"), *args], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


@pytest.mark.parametrize("make_spec, words", [
    (lambda tmp: str(tmp / "plain"), "not a git checkout"),
    (lambda tmp: str(tmp / "missing"), "no such folder"),
    (lambda tmp: "file://" + str(tmp / "missing.git"), "git clone failed"),
])  # fmt: skip
def test_a_repository_that_cannot_be_opened_stops_start_up(model_path, tmp_path, make_spec, words):
    (tmp_path / "plain").mkdir()
    spec = make_spec(tmp_path)
    result = run(["--model", model_path(), "--root", str(tmp_path / "tabby"), "--repo", spec])
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1].startswith(f"error: --repo {spec}: {words}"), result.stderr


def test_knobs_that_cannot_work_stop_start_up(make_app, repo):
    """Not an index thread that dies at its first look for changes (a division by zero), nor a
    repository that silently gives nothing."""
    with pytest.raises(SystemExit, match="--repo-refresh must be more than 0 seconds"):
        make_app(repo=(str(repo),), repo_refresh=0)
    with pytest.raises(SystemExit, match="--repo-context-tokens must be 0 or more"):
        make_app(repo=(str(repo),), repo_context_tokens=-1)


def test_start_up_says_what_it_indexed(model_path, repo, tmp_path):
    proc, _ = start_server(
        ["--model", model_path(), "--root", str(tmp_path / "tabby"), "--repo", str(repo)]
    )
    log = stop(proc)
    assert (
        f"repository shop at {repo} ({repo}, github.com/acme/shop): 3 files, 3 chunks indexed"
        in log
    )


def test_a_model_with_repository_tokens_gets_the_code_as_files_before_its_prompt(
    make_app, repo, caplog
):
    caplog.set_level("INFO")
    client = make_app("qwen", repo=(str(repo),))[0].test_client()
    found, prompt = snippets(client)
    ops = FILES["calc/ops.py"]  # one chunk: it is small
    assert prompt == (
        "<|repo_name|>shop\n<|file_sep|>calc/ops.py\n" + ops + "<|file_sep|>calc/main.py\n"
        "<|fim_prefix|>" + PREFIX[: PREFIX.rfind("\n") + 1] + "<|fim_suffix|>\n<|fim_middle|>"
        + PREFIX[PREFIX.rfind("\n") + 1 :]
    )  # fmt: skip
    assert [s["filepath"] for s in found] == ["calc/ops.py"]
    # typing on the line: the files stay, and so does the KV cache
    for typed in ("i", "it", "ite"):
        body = {"language": "python", "segments": {"prefix": PREFIX + typed, "suffix": "\n",
                                                   "filepath": "calc/main.py", "git_url": REMOTE}}  # fmt: skip
        assert client.post("/v1/completions", json=body).status_code == 200
        line = caplog.records[-1].getMessage()
        size, reused = map(int, re.search(r"(\d+) prompt tokens \((\d+) reused\)", line).groups())
        assert reused >= size - 3, line


@pytest.mark.parametrize("family, rep, sep, fim, ids", [
    ("qwen", "<|repo_name|>", "<|file_sep|>", "<|fim_prefix|>{}<|fim_suffix|>{}<|fim_middle|>",
     [4, 5, 5, 1, 2, 3]),  # llama.cpp names them (fim_rep, fim_sep in the GGUF)
    ("starcoder2", "<repo_name>", "<file_sep>", "<fim_prefix>{}<fim_suffix>{}<fim_middle>",
     [5, 6, 6, 1, 3, 2]),  # found by their text
])  # fmt: skip
def test_the_repository_layout_gives_exact_tokens(model_path, family, rep, sep, fim, ids):
    model = server.LocalModel(
        server.load_config(["--model", model_path(family), "--ctx", "512"], environ={})
    )
    found = [{"filepath": "calc/ops.py", "body": "def f():\n    pass\n", "score": 1.0}]
    ids_of = server.repo_tokens(model.llm)
    head, shown = server.repo_head(model, ids_of, 1024, "shop", "calc/main.py", found)
    assert shown == found
    tokens, text, size = model.prompt("def run():\n    ", "\n", head)
    assert text == (f"{rep}shop\n{sep}calc/ops.py\ndef f():\n    pass\n{sep}calc/main.py\n"
                    + fim.format("def run():\n    ", "\n"))  # fmt: skip
    assert tokens == model.llm.tokenize(text.encode(), add_bos=False, special=True) and size == len(
        tokens
    )
    assert [t for t in tokens if t < 7] == ids  # repo_name, file_sep x2, then FIM


def test_the_repository_code_keeps_to_its_budget_and_the_context(make_app, model_path, repo):
    """--repo-context-tokens is a budget in tokens, and never more than half the room the
    context has: a small --ctx gets less of the repository, not an error, and what it gets
    fills its budget (the first file left out would not have fit)."""
    for n in range(40):  # many definitions of the name the prefix calls, more than fit
        body = "    items = [item * 2 for item in items]\n" * (n % 7)
        (repo / "calc" / f"more{n}.py").write_text(f"def compute_total(items, tax={n}):\n" + body)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "more", cwd=repo)
    vocab = llama_cpp.Llama(model_path("qwen"), vocab_only=True, verbose=False)

    def tokens(text):
        return len(vocab.tokenize(text.encode(), add_bos=False, special=True))

    for ctx, budget in ((256, 1024), (512, 1024), (4096, 1024), (4096, 150)):
        app = make_app(
            "qwen", repo=(str(repo),), ctx=ctx, max_tokens=16, repo_context_tokens=budget
        )
        found, prompt = snippets(app[0].test_client())
        room = min(budget, (ctx - 16) // 2)
        head = prompt[: prompt.index("<|fim_prefix|>")]
        # (debug_data lists the files found, those the budget left out too)
        files = [f"<|file_sep|>{s['filepath']}\n{s['body']}" for s in found]
        kept = [text for text in files if text in head]
        # (at ctx 256, 120 tokens: calc/ops.py's chunk, imported by the file, first, and too big)
        assert head.startswith("<|repo_name|>shop\n") and (kept or ctx == 256)
        assert kept == files[: len(kept)]
        assert tokens(head) <= room
        assert kept == files or tokens(head) + tokens(files[len(kept)]) > room, ctx


def test_the_current_file_is_never_its_own_context(make_app, repo):
    """Called from the file that defines it, a function's definition is already in the file."""
    client = make_app(repo=(str(repo),))[0].test_client()
    body = {"language": "python", "segments": {
        "prefix": "def total_with_tax(items):\n    return compute_total(", "suffix": "\n",
        "filepath": "calc/ops.py", "git_url": REMOTE}, "debug_options": {"return_snippets": True}}  # fmt: skip
    assert client.post("/v1/completions", json=body).json["debug_data"].get("snippets") == []
    # the editor's own clone of the repository, elsewhere: the file is known by its path in it
    body["segments"]["filepath"] = "/home/alice/src/shop/calc/ops.py"
    assert client.post("/v1/completions", json=body).json["debug_data"].get("snippets") == []
    body["segments"]["filepath"] = "/home/alice/src/shop/calc/other.py"
    found = client.post("/v1/completions", json=body).json["debug_data"]["snippets"]
    assert [s["filepath"] for s in found] == ["calc/ops.py"]


def test_a_name_being_typed_brings_its_definition_and_keeps_it(make_app, repo):
    """The editor asks at each keystroke, mostly while a name is half typed: its definition is
    found by the name's start (3 characters at least), and the snippets (and the KV cache after
    them) stay put while the rest of it is typed."""
    client = make_app(repo=(str(repo),))[0].test_client()
    for above in ("    from calc.ops import compute_total\n", ""):  # imported in view, or not
        prefix, seen = f"def run(cart):\n{above}    x = ", []
        for typed in ("co", "com", "compute_t", "compute_total", "compute_total("):
            body = {"language": "python", "segments": {"prefix": prefix + typed, "suffix": "\n",
                    "filepath": "calc/main.py", "git_url": REMOTE},
                    "debug_options": {"return_snippets": True}}  # fmt: skip
            found = client.post("/v1/completions", json=body).json["debug_data"].get("snippets", [])
            seen.append([(s["filepath"], s["body"][:24]) for s in found])
        ops = ("calc/ops.py", "def compute_total(items,")  # its signature, or its chunk
        typing = [ops, ops] if above else [ops]  # in view: the chunk too, after the signature
        assert seen == [typing[1:]] + [typing] * 3 + [[ops]], seen


def test_typing_a_keyword_leaves_the_snippets_be(make_app, repo):
    """ "ret" may begin retry_all, defined in the repository, but it begins return, typed far
    more often: no name is looked up by the start of a keyword, so the snippets (and the KV
    cache after them) stay while one is typed; "retr" is no keyword's start any more."""
    (repo / "calc" / "retry.py").write_text("def retry_all(items):\n    return list(items)\n")
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "retry", cwd=repo)
    client = make_app(repo=(str(repo),))[0].test_client()
    seen = []
    for typed in ("r", "re", "ret", "retu", "return", "return ", "retr"):
        body = {"language": "python", "segments": {"prefix": "def run(cart):\n    " + typed,
                "suffix": "\n", "filepath": "calc/main.py", "git_url": REMOTE},
                "debug_options": {"return_snippets": True}}  # fmt: skip
        found = client.post("/v1/completions", json=body).json["debug_data"].get("snippets", [])
        seen.append([s["filepath"] for s in found])
    assert seen == [[]] * 6 + [["calc/retry.py"]], seen


def test_a_member_being_typed_is_looked_up_in_the_module_it_is_a_member_of(make_app, repo):
    """utils.get_e: the part after the last dot is the name's start, and the module before it,
    imported at the top of the file (out of the editor's view), says which file: of two
    get_entry definitions, the one in the module imported as utils."""
    for name, text in (("calc/utils.py", "def get_entry(rows, key):\n    return rows[key]\n"),
                       ("api/views.py", "def get_entry(request):\n    return request.args\n"),
                       ("calc/report.py", "from calc import utils\n\n\ndef report(rows):\n"
                                          "    return None\n")):  # fmt: skip
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_text(text)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "more", cwd=repo)
    client = make_app(repo=(str(repo),))[0].test_client()
    prefix = (
        "".join(f"line_{i} = {i}\n" for i in range(30))
        + "def report(rows):\n    return utils.get_e"
    )
    body = {"language": "python", "segments": {"prefix": prefix, "suffix": "\n",
            "filepath": "calc/report.py", "git_url": REMOTE},
            "debug_options": {"return_snippets": True}}  # fmt: skip
    found = client.post("/v1/completions", json=body).json["debug_data"]["snippets"]
    assert [s["filepath"] for s in found][:1] == ["calc/utils.py"], found


def test_a_name_imported_by_the_file_is_no_member_of_self(make_app, repo):
    """self.chec: a method (here the base class's check_total), not check_tax, a function the
    file imports by name (a test file that imports a helper and calls self.assert...)."""
    for name, text in (("calc/base.py", "class Base:\n    def check_total(self, cart):\n"
                                        "        return cart.total\n"),
                       ("calc/taxes.py", "def check_tax(rate):\n    return rate < 1\n")):  # fmt: skip
        (repo / name).write_text(text)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "more", cwd=repo)
    client = make_app(repo=(str(repo),))[0].test_client()
    prefix = ("from calc.base import Base\nfrom calc.taxes import check_tax\n\n\n"
              "class TestCart(Base):\n    def test_total(self):\n        self.chec")  # fmt: skip
    body = {"language": "python", "segments": {"prefix": prefix, "suffix": "\n",
            "filepath": "calc/test_cart.py", "git_url": REMOTE},
            "debug_options": {"return_snippets": True}}  # fmt: skip
    found = client.post("/v1/completions", json=body).json["debug_data"]["snippets"]
    assert [s["filepath"] for s in found][:1] == ["calc/base.py"], found


def test_a_commit_is_indexed_within_seconds(make_app, repo):
    """A new HEAD (a commit, a checkout, a pull) is seen at the next look at HEAD, every 2
    seconds, whatever --repo-refresh says (and indexed in a moment: 0.5 s here)."""
    client = make_app(repo=(str(repo),), repo_refresh=600)[0].test_client()
    ops = repo / "calc" / "ops.py"
    took = []
    for name in ("total_of", "compute_total"):
        ops.write_text(FILES["calc/ops.py"].replace("compute_total", name))
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", name, cwd=repo)
        found = name == "compute_total"
        took.append(seconds_until(lambda: bool(snippets(client)[0]) == found))
    assert None not in took and max(took) < 2.5, took


def test_the_real_agent_sends_the_git_url_and_gets_the_other_files_code(
    model_path, repo, lines_agent_cli, tmp_path
):
    """tabby-agent over JSON lines (as vim-tabby and IntelliJ run it), in a checkout with a
    remote: its request carries the git_url, and the prompt the chunk from calc/ops.py."""
    proc, url = start_server(
        ["--model", model_path(), "--root", str(tmp_path / "tabby"), "--repo", str(repo)]
    )
    agent = LinesAgent(lines_agent_cli, tmp_path / "home", url)
    try:
        text = PREFIX + "\n"
        request = {"filepath": str(repo / "calc" / "main.py"), "language": "python", "text": text,
                   "position": len(PREFIX), "git": {"root": str(repo), "remotes": [{"name": "origin", "url": REMOTE}]}}  # fmt: skip
        answer = agent.call("provideCompletions", request, {"signal": True})
    finally:
        blocked = agent.close()
        stop(proc)
    assert blocked == "" and answer and answer["choices"]
    [event] = [e["event"]["completion"] for e in read_events(tmp_path / "tabby" / "events")]
    assert (
        event["segments"]["git_url"] == REMOTE and event["segments"]["filepath"] == "calc/main.py"
    )
    assert "# Path: calc/ops.py\n# def compute_total(items, tax):" in event["prompt"]


def test_the_newest_agent_sends_a_relative_filepath_and_the_git_url(model_path, repo, tmp_path):
    """tabby-agent 1.9.0-dev (VS Code's) over LSP, in a workspace that is a checkout with a
    remote: it asks git itself, and sends the path relative to the checkout with the remote's
    URL; the prompt gets the chunk from calc/ops.py, not from another repository's."""
    other = tmp_path / "other"
    (other / "lib").mkdir(parents=True)
    (other / "lib" / "ops.py").write_text("def compute_total(rows):\n    return len(rows)\n")
    git("init", "-q", cwd=other)
    git("remote", "add", "origin", "https://github.com/acme/other.git", cwd=other)
    git("add", ".", cwd=other)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "other", cwd=other)
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path / "tabby"),
                              "--repo", str(other), "--repo", str(repo)])  # fmt: skip
    agent = Agent(install("1.9.0-dev"), tmp_path / "home", url)
    try:
        line = PREFIX.split("\n")[-1]
        agent.complete(PREFIX + "\n", {"line": PREFIX.count("\n"), "character": len(line)},
                       uri=(repo / "calc" / "main.py").as_uri(), root=repo.as_uri())  # fmt: skip
    finally:
        blocked = agent.close()
        stop(proc)
    assert blocked == ""
    [event] = [e["event"]["completion"] for e in read_events(tmp_path / "tabby" / "events")]
    assert (event["segments"]["git_url"], event["segments"]["filepath"]) == (REMOTE, "calc/main.py")
    assert "# Path: calc/ops.py\n# def compute_total(items, tax):" in event["prompt"]
    assert "lib/ops.py" not in event["prompt"]


def test_a_top_level_definition_ranks_before_a_method_or_an_assignment():
    body = "def run(a):\n    pass\n\nclass Cart:\n    def total(self):\n        pass\n\ntotal = 3\n"
    assert server.defined(body) == {"run": 0, "Cart": 0, "total": 1}  # the method beats total =
    assert server.defined("x = 1\nfn main() {}\n") == {"x": 2, "main": 0}


def test_a_signature_is_the_defining_line_until_its_parentheses_close():
    assert (
        server.signature("x = 1\n\ndef f(a,\n      b):\n    return a\n", "f")
        == "def f(a,\n      b):\n"
    )
    assert (
        server.signature("function add(a, b) {\n  return a + b;\n}\n", "add")
        == "function add(a, b) {\n"
    )


def test_the_names_a_start_may_become_come_as_signatures_and_stay(make_app, repo):
    """compute_t may become compute_total or compute_tax: the signatures of both (the name and
    its arguments: what the model writes next) come, one snippet a file, and stay the same
    while the rest of the name is typed (and so does the KV cache after them)."""
    (repo / "calc" / "taxes.py").write_text("def compute_tax(rate,\n                amount):\n"
                                            "    return rate * amount\n")  # fmt: skip
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tax", cwd=repo)
    client = make_app(repo=(str(repo),))[0].test_client()
    seen = []
    for typed in ("com", "compute", "compute_t", "compute_to", "compute_tot"):
        body = {"language": "python", "segments": {"prefix": "def run(cart):\n    x = " + typed,
                "suffix": "\n", "filepath": "calc/main.py", "git_url": REMOTE},
                "debug_options": {"return_snippets": True}}  # fmt: skip
        found = client.post("/v1/completions", json=body).json["debug_data"].get("snippets", [])
        seen.append([(s["filepath"], s["body"]) for s in found])
    both = [("calc/ops.py", "def compute_total(items, tax):\n"),  # main.py imports it
            ("calc/taxes.py", "def compute_tax(rate,\n                amount):\n")]  # fmt: skip
    assert seen == [both] * 5, seen


def test_a_method_of_self_comes_from_the_base_class_and_as_the_file_uses_it(make_app, repo):
    """self.asse in a TestCase: the methods of the class the file's classes derive from (imported
    from its package) come before those of a module the file imports (mocks.asserts, shorter),
    and among more names than fit, those the file uses most (assertIsNone, used three times)
    before the shorter ones. Not after self.mocks., and also for a class not indexed yet."""
    asserts = ["In", "Is", "Not", "All", "True", "Less", "Equal", "False", "Regex", "Raises"]
    case = "class TestCase:\n" + "".join(
        f"    def assert{a}(self, a):\n        pass\n\n" for a in asserts
    )
    files = {"testing/__init__.py": "from testing.case import TestCase\n",
             "testing/case.py": case + "    def assertIsNone(self, obj, msg=None):\n        pass\n",
             "other/mocks.py": "class Mock:\n    def asserts(self):\n        pass\n",
             "tests/test_shop.py": "from testing import TestCase\nfrom other import mocks\n\n\n"
                                   "class ShopTest(TestCase):\n    def test_a(self):\n"
                                   + "        self.assertIsNone(mocks.Mock())\n" * 3}  # fmt: skip
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tests", cwd=repo)
    client = make_app(repo=(str(repo),))[0].test_client()

    def found(prefix, path="tests/test_shop.py"):
        body = {"language": "python", "segments": {"prefix": prefix, "suffix": "\n", "filepath": path,
                "git_url": REMOTE}, "debug_options": {"return_snippets": True}}  # fmt: skip
        return client.post("/v1/completions", json=body).json["debug_data"]["snippets"]

    first = found("    def test_b(self):\n        self.asse")[0]
    assert first["filepath"] == "testing/case.py", first
    assert first["body"].startswith("    def assertIsNone(self, obj, msg=None):\n"), first
    assert (
        found("    def test_b(self):\n        self.mocks.asse")[0]["filepath"] == "other/mocks.py"
    )
    new = "from testing import TestCase\n\n\nclass NewTest(TestCase):\n    def test_b(self):\n"
    assert found(new + "        self.asse", "tests/test_new.py")[0]["filepath"] == "testing/case.py"


def test_prose_defines_nothing_and_a_function_inside_one_ranks_last():
    doc = '    """Call the function named in it, as the class\n    does."""\n'
    assert server.defined(doc) == {}
    code = ("enum class Color { RED }\nlocal function helper(x)\npub const fn size() -> usize {\n"
            "public sealed partial class Foo {\n@Composable fun Screen() {\n"
            "template <typename T> class Vec {\n")  # fmt: skip
    assert server.defined(code) == dict.fromkeys(
        ["Color", "helper", "size", "Foo", "Screen", "Vec"], 0
    )
    body = "class Mock:\n    def called(self):\n        def called(*args):\n            pass\n"
    assert server.defined(body) == {"Mock": 0, "called": 1}
    body = "class Mock:\n    def setup(self):\n        def called(*args):\n            pass\n"
    assert server.defined(body) == {"Mock": 0, "setup": 1, "called": 3}
    assert server.defined(body.replace("    ", "\t")) == {"Mock": 0, "setup": 1, "called": 3}


def test_the_signatures_that_come_fit_the_budget_and_hold_the_name_being_typed(make_app, repo):
    """Eight long signatures would not fit Tabby's 768 characters (and their snippet would not
    come at all): those that fit come, the likeliest first (imported, the shortest), of the
    shortest start whose list holds the name being typed (parse_c: the 5 of parse_ do not)."""
    names = [f"parse_{word}_header" for word in ("age", "date", "etag", "range", "csp", "cache")]
    names += ["parse_content_range_header", "parse_options_header"]
    args = "(\n    value: str | None,\n    on_update: Callable[[Headers], None] | None = None,\n"
    http = "".join(
        f"def {name}{args}    cls: type | None = None,\n):\n    pass\n\n\n" for name in names
    )
    (repo / "web" / "http.py").write_text(http)
    (repo / "web" / "response.py").write_text(
        "".join(f"from web.http import {name}\n" for name in names) + "\n\ndef handle(value):\n"
    )
    git("add", ".", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "http", cwd=repo)
    client = make_app(repo=(str(repo),))[0].test_client()
    body = {"language": "python", "segments": {"prefix": "def handle(value):\n    rv = parse_content_ra",
            "suffix": "\n", "filepath": "web/response.py", "git_url": REMOTE},
            "debug_options": {"return_snippets": True}}  # fmt: skip
    found = client.post("/v1/completions", json=body).json["debug_data"]["snippets"]
    assert found and found[0]["filepath"] == "web/http.py", found
    shown = ["parse_csp_header", "parse_cache_header", "parse_content_range_header"]  # parse_c
    signatures = "".join(f"def {name}{args}    cls: type | None = None,\n" for name in shown)
    assert found[0]["body"] == signatures, found[0]["body"]  # (4 lines each, at most)
