"""End to end with the real client over LSP: tabby-agent 1.5.0 and 1.9.0-dev (tests/tabbyagent.py),
the same tests with each; what only one version does has a test of its own."""

import json
import os
import re
import threading
import time
import urllib.request

import pytest
from conftest import ROOT, output, read_events, start_engine, start_server, stop
from tabbyagent import Agent, install

DOC = "import math\n\n\ndef add(a, b):\n    \n\n\ndef main():\n    print(add(1, 2))\n"
CURSOR = {"line": 4, "character": 4}


@pytest.fixture
def serve(model_path, tmp_path):
    """serve(*flags) -> (url, events dir): python app.py on a free loopback port, stopped after the test."""
    procs = []

    def start(*flags):
        proc, url = start_server(
            ["--model", model_path(), "--root", str(tmp_path / "tabby"), *flags]
        )
        procs.append(proc)
        return url, tmp_path / "tabby" / "events"

    yield start
    for proc in procs:
        stop(proc)


@pytest.fixture
def agent(agent_cli, tmp_path):
    agents = []

    def make(url, token=None):
        agents.append(Agent(agent_cli, tmp_path / f"home{len(agents)}", url, token))
        return agents[-1]

    yield make
    for a in agents:
        assert a.close() == "", "the agent tried to reach beyond loopback"


def test_the_editor_shows_our_completion(serve, agent):
    url, events = serve()
    client = agent(url)
    shown = client.complete(DOC, CURSOR)
    [record] = [e["event"]["completion"] for e in read_events(events) if "completion" in e["event"]]
    assert record["segments"] == {
        "prefix": "import math\n\n\ndef add(a, b):\n    ",
        "suffix": "\n\n\ndef main():\n    print(add(1, 2))\n",
        # 1.9.0-dev: always (outside a workspace and a git repository: the file's URI)
        **({"filepath": "file:///project/demo.py"} if client.newest else {}),
    }
    assert record["choices"][0]["text"] == "total = a + b\n    return total"
    assert shown == [record["choices"][0]["text"]]
    if client.newest:  # what VS Code's status bar item says (README)
        status = client.request("tabby/status", {})
        assert status["tooltip"] == "Tabby: Automatic Code Completion Enabled", status


def test_the_editor_shows_an_engines_completion(model_path, tmp_path, agent):
    """tabby-agent -> our server -> llama-cpp-python's server: the engine generates, we do the rest."""
    engine, engine_url = start_engine(model_path(), "tiny-starcoder", tmp_path)
    try:
        proc, url = start_server(
            ["--backend", engine_url + "/v1", "--root", str(tmp_path / "tabby")]
        )
        try:
            assert agent(url).complete(DOC, CURSOR) == ["total = a + b\n    return total"]
        finally:
            stop(proc)
    finally:
        engine.terminate()
        engine.wait(10)


def test_with_the_right_token(serve, agent):
    url, _ = serve("--token", "s3cret")
    assert agent(url, token="s3cret").complete(DOC, CURSOR) == ["total = a + b\n    return total"]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_without_the_right_token_the_agent_reports_unauthorized(serve, agent, token):
    """1.5.0 says so in a message; 1.9.0-dev asks nothing until it is let in, and its status
    (VS Code's status bar item) says so."""
    url, events = serve("--token", "s3cret")
    client = agent(url, token=token)
    assert client.complete(DOC, CURSOR, wait=2) == []
    if client.newest:
        status = client.request("tabby/status", {})
        assert (status["status"], status["tooltip"]) == (
            "unauthorized",
            "Tabby: Authorization Required",
        )
    else:
        messages = [n["params"]["message"] for n in client.notifications
                    if n.get("method") == "window/showMessage"]  # fmt: skip
        assert any("unauthorized" in m for m in messages), client.notifications
    assert read_events(events) == []


def test_the_readmes_agent_config_keeps_the_agent_on_loopback(serve, agent_cli, tmp_path):
    """The agent's config as the README gives it, on a fresh home: from its first start to its
    shutdown the agent reaches nothing but 127.0.0.1. Without the README's
    [anonymousUsageTracking] entry the guard sees it try app.tabbyml.com."""
    url, _ = serve()
    readme = open(os.path.join(ROOT, "README.md")).read()
    config = (
        re.search(r"```toml\n(.*?)```", readme, re.S).group(1).replace("http://127.0.0.1:8080", url)
    )
    assert "[anonymousUsageTracking]" in config and url in config
    runs = {}
    for name, text in (
        ("readme", config),
        ("without", config.split("[anonymousUsageTracking]")[0]),
    ):
        client = Agent(agent_cli, tmp_path / name, url, whole_config=text)
        shown = client.complete(DOC, CURSOR)
        runs[name] = shown, client.close()
    assert runs["readme"] == (["total = a + b\n    return total"], "")
    assert "tabbyml.com" in runs["without"][1], runs["without"]  # the guard caught its reports


def test_vscodes_settings_keep_the_newest_agent_on_loopback(serve, tmp_path):
    """VS Code's extension gives its agent the endpoint and "Tabby › Config: Telemetry"
    (tabby.config.telemetry: true, "Disable anonymous usage tracking") from its own settings: with
    that ticked, the README's config block is not needed. Without it, the guard sees the try."""
    url, _ = serve()
    tried = {}
    for disable in (True, False):
        client = Agent(install("1.9.0-dev"), tmp_path / f"vscode-{disable}", url, whole_config="",
                       vscode={"server": {"endpoint": url, "token": ""},
                               "anonymousUsageTracking": {"disable": disable}})  # fmt: skip
        shown = client.complete(DOC, CURSOR)
        tried[disable] = shown, client.close()
    assert tried[True] == (["total = a + b\n    return total"], "")
    assert "tabbyml.com" in tried[False][1], tried


def test_what_the_agent_asks_after_an_accept_was_computed_ahead(model_path, tmp_path, agent):
    """The user accepts the completion shown; the editor asks again where it ends, and the agent
    sends its 20-line window, moved down by the lines accepted: the server's speculation made
    that very request, so its answer comes without the model."""
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path / "tabby")])
    try:
        above = "".join(f"x{i} = {i}\n" for i in range(30))  # more than the agent's window
        doc = above + DOC
        line = doc[: doc.index("def add")].count("\n") + 1
        client = agent(url)
        [shown] = client.complete(doc, {"line": line, "character": 4})
        deadline = time.monotonic() + 10  # the model is idle: it speculates (milliseconds)
        while "speculation:" not in output(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
        cursor = doc.index("    \n\n\ndef main") + 4
        accepted = doc[:cursor] + shown + doc[cursor:]
        end = accepted[: cursor + len(shown)]
        position = {"line": end.count("\n"), "character": len(end) - end.rfind("\n") - 1}
        client.complete(accepted, position, uri="file:///project/accepted.py")
    finally:
        stop(proc)
    events = read_events(tmp_path / "tabby" / "events")
    reasons = [
        e["event"]["completion"]["finish_reason"] for e in events if "completion" in e["event"]
    ]
    assert reasons == ["stop", "speculated"]


# --- What only tabby-agent 1.9.0-dev does, each asked through it as VS Code asks


@pytest.fixture
def newest(tmp_path):
    """newest(url) -> tabby-agent 1.9.0-dev for the server at url; each closed after the test."""
    agents = []

    def make(url, **kw):
        agents.append(Agent(install("1.9.0-dev"), tmp_path / f"newest{len(agents)}", url, **kw))
        return agents[-1]

    yield make
    for a in agents:
        assert a.close() == "", "the agent tried to reach beyond loopback"


def completions_logged(events):
    return [e["event"]["completion"] for e in read_events(events) if "completion" in e["event"]]


@pytest.mark.parametrize(
    "line, script",
    [("    print(│)", "total)"), ("    foo(a, │);", "b, total);")],
)
def test_closing_characters_are_left_to_the_answer(model_path, tmp_path, newest, line, script):
    """1.9.0-dev leaves a line's closing characters out of the suffix and replaces them with the
    completion: the answer must keep the ones the model writes, or the editor deletes the
    user's. (The model here writes script after the code before the cursor.)"""
    before, after = line.split("│")
    doc = f"def add(a, b):\n{before}{after}\n"
    model = model_path(fim_script=script + "\n", plain_script=script + "\n")
    proc, url = start_server(["--model", model,
                              "--root", str(tmp_path / "tabby")])  # fmt: skip
    try:
        client = newest(url)
        shown = client.complete(doc, {"line": 1, "character": len(before)})
    finally:
        stop(proc)
    [record] = completions_logged(tmp_path / "tabby" / "events")
    assert record["segments"]["suffix"] == "\n"  # the closing characters left out
    assert record["choices"][0]["text"] == script + "\n"  # all the model wrote
    assert client.shown == [(script, {"start": {"line": 1, "character": len(before)},
                                      "end": {"line": 1, "character": len(line) - 1}})]  # fmt: skip
    assert shown == [script]


def test_a_manual_trigger_gets_distinct_completions(model_path, tmp_path, newest):
    """Alt+\\ in VS Code: up to 3 requests at temperature 0.8 (up to 6 tries), for the editor to
    offer different answers. None of them may come from the completion cache (one cached text,
    every time); the automatic request that came first sent no temperature, and its answer is
    cached."""
    # small enough to draw from a flat distribution: 40 texts of 40 samples (seed 3 at width 64:
    # one text in 7, so that two or three tries were the same one in about a run of 50). At most
    # 5 tokens: its texts fall into loops ("NoneNoneNone..."), and the client drops a line that
    # ends in 6 repeats, so that at 16 tokens all three tries were dropped in a run of 25.
    model = model_path(weights="random", newlines=False, seed=3, n_embd=16, n_ff=32)
    proc, url = start_server(["--model", model, "--root", str(tmp_path / "tabby"),
                              "--max-tokens", "5", "--time-budget", "0"])  # fmt: skip
    try:
        client = newest(url)
        typed = client.complete(DOC, CURSOR)
        again = client.complete(DOC, CURSOR, uri="file:///project/again.py")
        manual = client.complete(DOC, CURSOR, manual=True)
    finally:
        stop(proc)
    logged = completions_logged(tmp_path / "tabby" / "events")
    reasons = [r["finish_reason"] for r in logged]
    assert typed and again == typed and reasons[:2] == ["length", "cached"]
    assert manual and "cached" not in reasons[2:] and len(reasons) >= 4, logged
    assert len({r["choices"][0]["text"] for r in logged[2:]}) >= 2, logged[2:]  # sampled anew


def test_a_blank_prefix_is_answered(serve, newest):
    """1.9.0-dev asks at the very start of a file too (1.5.0 does not)."""
    url, events = serve()
    client = newest(url)
    client.complete(DOC, CURSOR)  # connected
    client.complete(
        "\n\ndef main():\n    pass\n", {"line": 0, "character": 0}, uri="file:///p/b.py"
    )
    assert [r["segments"]["prefix"] for r in completions_logged(events)][1:] == [""]


def test_health_checks_wait_for_nothing(model_path, tmp_path):
    """The agent asks /v1/health every 60 s (30 s while it is not connected), from every editor:
    each answer comes at once while the model is busy with someone's long completion, and
    leaves nothing in the events log."""
    proc, url = start_server(["--model", model_path(weights="random", newlines=False, n_embd=512,
                                                    n_layer=8, n_ff=1024, n_head=8, n_head_kv=4),
                              "--root", str(tmp_path / "tabby"), "--max-tokens", "1500",
                              "--time-budget", "0"])  # fmt: skip
    try:
        body = json.dumps({"language": "css", "segments": {"prefix": "a {\n", "suffix": "\n"}})
        busy = threading.Thread(target=lambda: urllib.request.urlopen(
            urllib.request.Request(url + "/v1/completions", body.encode(),
                                   {"Content-Type": "application/json"}), timeout=120).read())  # fmt: skip
        busy.start()
        time.sleep(0.3)
        took = []
        for _ in range(20):
            started = time.monotonic()
            urllib.request.urlopen(url + "/v1/health", timeout=30).read()
            took.append(time.monotonic() - started)
        still_busy = busy.is_alive()
        busy.join(120)
    finally:
        stop(proc)
    assert still_busy and max(took) < 0.25, took
    assert len(read_events(tmp_path / "tabby" / "events")) == 1  # the completion's, alone
