import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import tabbyagent  # noqa: E402
import tinymodel  # noqa: E402

import app as server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def models_end_with_their_test(monkeypatch):
    """The model thread of each LocalModel a test makes ends with the test, and llama.cpp's
    OpenMP workers with it: libgomp counts idle workers too, and where its threads outnumber
    the cores it barely spins at a barrier, which made a model on 2 cores 4 times slower."""
    made, init = [], server.LocalModel.__init__
    monkeypatch.setattr(server.LocalModel, "__init__",
                        lambda model, *args, **kw: made.append(model) or init(model, *args, **kw))  # fmt: skip
    yield
    for model in made:
        if hasattr(model, "thread"):  # (not when its model failed to load)
            model.thread.shutdown(cancel_futures=True)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Tests never see the developer's TABBYPY_* or FLASK_* settings."""
    for name in list(os.environ):
        if name.startswith((server.ENV_PREFIX, "FLASK_")):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session", params=tabbyagent.VERSIONS)
def agent_cli(request):
    """The real tabby-agent's script, each version in turn (1.5.0 installed with npm into
    tests/.agent on first use)."""
    return tabbyagent.install(request.param)


@pytest.fixture(scope="session")
def lines_agent_cli():
    """tabby-agent 1.5.0, whose JSON-lines protocol the Vim and IntelliJ plugins speak (1.9.0-dev
    speaks LSP only)."""
    return tabbyagent.install("1.5.0")


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """model_path(family) -> a tiny scripted GGUF with that family's FIM tokens, built once."""
    folder = tmp_path_factory.mktemp("models")
    built = {}

    def make(family="starcoder", **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in built:
            built[key] = tinymodel.write_model(
                str(folder / f"{family}-{len(built)}.gguf"), family, **kw
            )
        return built[key]

    return make


@pytest.fixture
def make_app(model_path, tmp_path):
    """make_app(family, **config) -> (app, events dir): a test app on a tiny model."""

    def make(family="starcoder", **overrides):
        # --events full: the tests read what was asked there
        config = server.load_config(
            ["--model", model_path(family), "--root", str(tmp_path / "tabby"), "--events", "full"],
            environ={},
        )
        # --repack false: --repack auto's test load is a child process for each model file (half
        # a second); test_cli.py and the servers start_server() starts hold what it does. (An
        # engine takes no --repack.)
        config.update({} if overrides.get("backend") else {"repack": "false"}, **overrides)
        app = server.create_app(config)
        app.config["TESTING"] = True
        return app, tmp_path / "tabby" / "events"

    return make


@pytest.fixture
def app(make_app):
    return make_app()[0]


@pytest.fixture
def client(app):
    return app.test_client()


def complete(client, prefix, suffix=None, language="python", **body):
    """POST /v1/completions and return the one choice's text (asserting the response shape)."""
    segments = {"prefix": prefix} if suffix is None else {"prefix": prefix, "suffix": suffix}
    r = client.post("/v1/completions", json={"language": language, "segments": segments, **body})
    assert r.status_code == 200, r.get_data(as_text=True)
    data = r.get_json()
    r.close()  # as a server does once it has sent the response (a speculation begins then)
    assert (
        data["id"].startswith("cmpl-")
        and len(data["choices"]) == 1
        and data["choices"][0]["index"] == 0
    )
    return data["choices"][0]["text"]


def read_events(events_dir):
    lines = []
    for path in sorted(events_dir.glob("*.json")):
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    return lines


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, env=None, port=None, timeout=60, events="full"):
    """Start `python app.py ARGS --port P` on 127.0.0.1; wait until /v1/health answers.
    events: the --events the tests read what was asked from (None: the default's)."""
    port = port or free_port()
    if events and "--events" not in args:
        args = [*args, "--events", events]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(server.ENV_PREFIX)},
        **(env or {}),
    }
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs into a full pipe blocks
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "app.py"),
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    wait_for_health(proc, url, timeout)
    return proc, url


def wait_for_health(proc, url, timeout):
    """Wait until a server process (whose output goes to proc.log) answers /v1/health."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {output(proc)}")
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=2).close()
            return
        except urllib.error.HTTPError:  # up, and asking for a token
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not answer within {timeout}s: {output(proc)}")


def output(proc):
    proc.log.seek(0)
    return proc.log.read()


def stop(proc):
    """Stop a server from start_server and return what it printed."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return output(proc)


def generate(llm, tokens, max_tokens, temperature=0.1, seed=1, **limits):
    """app.generate() over a local model's tokens, as a request runs it: -> (text, n, reason)."""
    server.keep_kv(llm, tokens)
    return server.finish(
        server.generate(server.model_pieces(llm, tokens, temperature, seed), max_tokens, **limits)
    )


def start_engine(model, alias, folder):
    """llama-cpp-python's OpenAI-style server on 127.0.0.1 with model, named alias: (process, URL)."""
    port = free_port()
    with open(os.path.join(folder, f"engine-{port}.log"), "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                model,
                "--model_alias",
                alias,
                "--n_ctx",
                "1024",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=2).close()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"engine did not start: {open(out.name).read()}")
            time.sleep(0.1)
