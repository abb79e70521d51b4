"""End to end with the real client: tabby-agent 1.5.0 (what the Tabby IDE extensions run), over LSP."""

import os
import re
import time

import pytest
from conftest import ROOT, output, read_events, start_engine, start_server, stop
from tabbyagent import Agent

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
    shown = agent(url).complete(DOC, CURSOR)
    [record] = [e["event"]["completion"] for e in read_events(events) if "completion" in e["event"]]
    assert record["segments"] == {
        "prefix": "import math\n\n\ndef add(a, b):\n    ",
        "suffix": "\n\n\ndef main():\n    print(add(1, 2))\n",
    }
    assert record["choices"][0]["text"] == "total = a + b\n    return total"
    assert shown == [record["choices"][0]["text"]]


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
    url, events = serve("--token", "s3cret")
    client = agent(url, token=token)
    assert client.complete(DOC, CURSOR) == []
    messages = [
        n["params"]["message"]
        for n in client.notifications
        if n.get("method") == "window/showMessage"
    ]
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
