"""/v1/completions, /v1/health, /v1/events and server_setting through Flask's test client."""

import json
import os
import re
import threading

import llama_cpp
import pytest
import tinymodel
from conftest import complete, read_events

import app as server

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\n\ndef main():\n    print(add(1, 2))\n"


def test_fim_completion_is_cut_at_the_stop_word(client):
    assert complete(client, PREFIX, SUFFIX) == "total = a + b\n    return total"


def test_flash_attention_completes_the_same(model_path):
    args = ["--model", model_path("starcoder"), "--flash-attn", "true", "--events", "off"]
    config = server.load_config(args, environ={})
    model = server.LocalModel(config)
    assert model.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    body = {"language": "python", "segments": {"prefix": PREFIX, "suffix": SUFFIX}}
    request = server.parse_completion(body)
    answer = server.Completions(model, config).answer(request, ("me", None, None), bool)
    assert (answer.text, answer.reason) == ("total = a + b\n    return total", "stop")


@pytest.mark.parametrize(
    "flag, device, on",
    [("auto", "cpu", False), ("auto", "gpu", True), ("true", "cpu", True), ("false", "gpu", False)],
)
def test_flash_attention_auto_is_on_where_the_model_runs_on_a_gpu(
    model_path, monkeypatch, flag, device, on
):
    """--flash-attn auto: on with --device gpu (as llama-server), off on a CPU, where it made
    tokens slower; start-up and /v1/health say which. A CPU-only build is told it can offload
    (llama.cpp then keeps the layers on the CPU): the rule is what is tested, not a GPU."""
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    args = ["--model", model_path(), "--flash-attn", flag, "--device", device, "--events", "off"]
    model = server.LocalModel(server.load_config(args, environ={}))
    assert model.health() == {"flash_attn": on, "cuda_devices": []}
    assert f"flash attention {'on' if on else 'off'}" in model.describe()[0]


def test_health_names_the_gpus_as_nvidia_smi_lists_them(model_path, monkeypatch, tmp_path):
    """Tabby's /v1/health lists the CUDA devices by name. With no GPU here, llama.cpp is told it
    offloads to CUDA, and nvidia-smi is a script that answers as it does on an H200 machine."""
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nprintf 'NVIDIA H200\\nNVIDIA H200\\n'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CUDA : ARCHS = 900 |")
    args = ["--model", model_path(), "--device", "gpu", "--events", "off"]
    model = server.LocalModel(server.load_config(args, environ={}))
    assert (model.device, model.health()) == (
        "cuda", {"flash_attn": True, "cuda_devices": ["NVIDIA H200", "NVIDIA H200"]})  # fmt: skip


def test_requests_without_a_seed_each_get_their_own():
    """A manual trigger's requests come close together (and other editors' too): seeds drawn in
    one millisecond must still differ, or two of them sample the same text."""
    req = server.parse_completion({"segments": {"prefix": "x"}, "temperature": 0.8})
    seeds = [server.sampling(req, 0.1).seed for _ in range(100)]  # within a millisecond or two
    assert len(set(seeds)) == 100


def test_each_completion_logs_one_line_with_its_counts(make_app, caplog):
    caplog.set_level("INFO")
    client = make_app(completion_cache=0)[0].test_client()  # the model answers each time
    complete(client, PREFIX, SUFFIX)
    complete(client, PREFIX, SUFFIX)
    counts = [
        re.search(
            r"(\d+) prompt tokens \((\d+) reused\), (\d+) generated, ([\w ]+);", r.getMessage()
        )
        for r in caplog.records
    ]
    first, second = [m.groups() for m in counts if m]
    n = int(first[0])
    assert int(first[1]) < n // 2 and first[2:] == (
        "9",
        "stop",
    )  # "\n\n" arrives with the 9th token
    assert second == (
        str(n),
        str(n - 1),
        "9",
        "stop",
    )  # the same prompt again: all but the last token cached


def test_a_request_seen_before_is_answered_from_the_completion_cache(make_app, caplog):
    caplog.set_level("INFO")
    client = make_app()[0].test_client()
    first = complete(client, PREFIX, SUFFIX)
    assert complete(client, PREFIX + "x", SUFFIX) != first  # another request in between
    assert complete(client, PREFIX, SUFFIX) == first  # backspace: the first one again
    line = caplog.records[-1].getMessage()
    n = re.search(r"(\d+) prompt tokens", line).group(1)
    assert f"{n} prompt tokens ({n} reused), 0 generated, cached; 0.0 ms in the model" in line


def test_unknown_language_stops_at_the_first_newline(client):
    assert complete(client, PREFIX, SUFFIX, language="json") == "total = a + b"


def test_prefix_only_model(make_app):
    app, _ = make_app("plain")
    assert complete(app.test_client(), PREFIX, SUFFIX) == tinymodel.PLAIN_SCRIPT


def test_max_tokens_is_honoured(make_app):
    app, _ = make_app(max_tokens=3)
    assert complete(app.test_client(), PREFIX, SUFFIX) == "total = a"


@pytest.mark.parametrize(
    "body", [{}, {"temperature": 0}, {"temperature": 0.8, "seed": 42}, {"seed": 2**64 - 1}]
)
def test_same_text_twice(client, body):
    assert (
        complete(client, PREFIX, SUFFIX, **body)
        == complete(client, PREFIX, SUFFIX, **body)
        == "total = a + b\n    return total"
    )


def test_crlf_in_crlf_out(client):
    prefix = PREFIX.replace("\n", "\r\n")
    r = client.post(
        "/v1/completions",
        json={
            "language": "python",
            "segments": {"prefix": prefix, "suffix": "\r\n"},
            "debug_options": {"return_prompt": True},
        },
    )
    assert r.json["choices"][0]["text"] == "total = a + b\r\n    return total"
    assert "\r" not in r.json["debug_data"]["prompt"]


def test_snippets_become_a_comment_block(client):
    segments = {
        "prefix": PREFIX,
        "suffix": SUFFIX,
        "filepath": "calc.py",
        "declarations": [{"filepath": "util.py", "body": "def util(x):\n    return x"}],
        "relevant_snippets_from_changed_files": [
            {"filepath": "more.py", "body": "x = 1", "score": 0.8}
        ],
    }
    r = client.post(
        "/v1/completions",
        json={
            "language": "python",
            "segments": segments,
            "debug_options": {"return_prompt": True, "return_snippets": True},
        },
    )
    assert r.json["debug_data"]["prompt"] == (
        "<fim_prefix># Path: util.py\n# def util(x):\n#     return x\n#\n# Path: more.py\n# x = 1\n"
        + PREFIX
        + "<fim_suffix>"
        + SUFFIX
        + "<fim_middle>"
    )
    assert r.json["debug_data"]["snippets"] == [
        {"filepath": "util.py", "body": "def util(x):\n    return x", "score": 1.0},
        {"filepath": "more.py", "body": "x = 1", "score": 0.8},
    ]
    r = client.post(
        "/v1/completions",
        json={
            "language": "python",
            "segments": segments,
            "debug_options": {
                "return_prompt": True,
                "disable_retrieval_augmented_code_completion": True,
            },
        },
    )
    assert r.json["debug_data"] == {
        "prompt": "<fim_prefix>" + PREFIX + "<fim_suffix>" + SUFFIX + "<fim_middle>"
    }


def test_missing_suffix_becomes_a_newline_and_debug_data_only_when_asked(client):
    r = client.post(
        "/v1/completions",
        json={"segments": {"prefix": "x\n"}, "debug_options": {"return_prompt": True}},
    )
    assert r.json["debug_data"]["prompt"] == "<fim_prefix>x\n<fim_suffix>\n<fim_middle>"
    assert (
        "debug_data"
        not in client.post("/v1/completions", json={"segments": {"prefix": "x\n"}}).json
    )


def test_raw_prompt_is_used_verbatim_with_its_special_tokens(client):
    r = client.post(
        "/v1/completions",
        json={
            "language": "json",
            "debug_options": {
                "raw_prompt": "<fim_prefix>a<fim_suffix>b<fim_middle>",
                "return_prompt": True,
            },
        },
    )
    assert r.status_code == 200
    assert (
        r.json["choices"][0]["text"] == "total = a + b"
    )  # the FIM script: the markers were parsed
    assert r.json["debug_data"]["prompt"] == "<fim_prefix>a<fim_suffix>b<fim_middle>"


def test_suffix_first_template(make_app):
    r = (
        make_app("codestral")[0]
        .test_client()
        .post(
            "/v1/completions",
            json={
                "segments": {"prefix": "P", "suffix": "S"},
                "debug_options": {"return_prompt": True},
            },
        )
    )
    assert r.json["debug_data"]["prompt"] == "[SUFFIX]S[PREFIX]P"


@pytest.mark.parametrize(
    "prefix, suffix",
    [
        (
            "".join(f"line_{i} = {i}\n" for i in range(3000)),
            "".join(f"after_{i}()\n" for i in range(3000)),
        ),
        (
            "x" * 200_000 + "\n" + PREFIX,
            "y" * 200_000,
        ),  # whole lines win, then a lone giant line is cut
        ("x" * 200_000 + " = ", ""),
    ],
)
def test_a_prompt_longer_than_the_context_is_cut_to_fit(make_app, model_path, prefix, suffix):
    client = make_app(ctx=512, max_tokens=16)[0].test_client()
    r = client.post(
        "/v1/completions",
        json={
            "language": "python",
            "segments": {"prefix": prefix, "suffix": suffix},
            "debug_options": {"return_prompt": True},
        },
    )
    assert r.status_code == 200
    prompt = r.json["debug_data"]["prompt"]
    above, rest = prompt[len("<fim_prefix>") :].split("<fim_suffix>")
    kept_suffix, line = rest.split("<fim_middle>")
    kept_prefix = above + line  # code on the cursor line comes after <fim_middle>
    assert prefix.endswith(kept_prefix) and (suffix or "\n").startswith(kept_suffix)
    assert kept_prefix.endswith((PREFIX, "\n", " = ")) and (
        kept_suffix.endswith("\n") or kept_suffix.strip("y") == ""
    )
    n = len(
        llama_cpp.Llama(model_path=model_path(), verbose=False).tokenize(
            prompt.encode(), add_bos=False, special=True
        )
    )
    assert (
        512 - 16 - 20 * 16 <= n <= 512 - 16
    )  # fits with room for the completion, less at most a step of lines
    # after code on the cursor line the model writes its plain script, to its end; where the
    # suffix goes on on the cursor line, the editor keeps one line: it gets that and its newline
    assert r.json["choices"][0]["text"] == ("pass\n" if line else "total = a + b\n")


@pytest.mark.parametrize(
    "prefix, suffix",
    [
        ("", ""),
        ("\x00\x00", "\x00"),
        ("a\ud800b", "\udfff"),
        ("😀 é \u2028", "\t"),
        ("<fim_middle>", "<|endoftext|>"),
    ],
)
def test_odd_but_valid_input_is_served(client, prefix, suffix):
    body = json.dumps(
        {"segments": {"prefix": prefix, "suffix": suffix}}
    )  # ASCII, lone surrogates as \\ud800
    r = client.post("/v1/completions", data=body, content_type="application/json")
    assert r.status_code == 200 and isinstance(r.json["choices"][0]["text"], str)


@pytest.mark.parametrize(
    "family, body",
    [
        (
            "plain",
            {"segments": {"prefix": "", "suffix": "x"}},
        ),  # no BOS token, no template: no tokens at all
        ("starcoder", {"debug_options": {"raw_prompt": ""}}),
    ],
)
def test_an_empty_prompt_gets_an_empty_completion(make_app, family, body):
    r = make_app(family)[0].test_client().post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json["choices"][0]["text"] == ""


def test_unknown_fields_are_ignored(client):
    assert (
        complete(client, PREFIX, SUFFIX, future_field={"x": 1}, mode="standard", user="alice")
        == "total = a + b\n    return total"
    )


def test_each_completion_is_logged_in_tabbys_layout(make_app):
    app, events = make_app()
    client = app.test_client()
    segments = {
        "prefix": PREFIX,
        "suffix": SUFFIX,
        "filepath": "a.py",
        "git_url": "https://example.invalid/r.git",
        "declarations": [{"filepath": "b.py", "body": "b = 1"}],
        "clipboard": "clip",
    }
    r = client.post(
        "/v1/completions",
        json={"language": "python", "segments": segments, "user": "alice"},
        headers={"User-Agent": "tabby-agent/1.5.0"},
    )
    [line] = read_events(events)
    assert (
        set(line) == {"user", "ts", "event"}
        and line["user"] == "alice"
        and isinstance(line["ts"], int)
    )
    record = line["event"]["completion"]
    tabbys = {"completion_id", "language", "segments", "prompt", "choices", "user_agent"}
    assert {k: v for k, v in record.items() if k in tabbys} == {
        "completion_id": r.json["id"],
        "language": "python",
        "segments": segments,
        "prompt": record["prompt"],
        "choices": r.json["choices"],
        "user_agent": "tabby-agent/1.5.0",
    }
    assert record["prompt"].startswith("<fim_prefix># Path: b.py\n# b = 1\n" + PREFIX)
    # and how it was made, for the status page and anyone reading the log
    ours = {k: v for k, v in record.items() if k not in tabbys}
    assert set(ours) == {"snippets", "prompt_tokens", "reused_tokens", "generated_tokens",
                         "finish_reason", "model_ms", "total_ms"}  # fmt: skip
    assert ours["snippets"] == [{"filepath": "b.py", "body": "b = 1", "score": 1.0}]
    assert (ours["generated_tokens"], ours["finish_reason"]) == (9, "stop")
    assert (
        ours["prompt_tokens"] > ours["reused_tokens"] >= 0
        and ours["total_ms"] >= ours["model_ms"] > 0
    )


def test_health(client):
    health = client.get("/v1/health").json
    assert client.post("/v1/health").json == health
    assert (
        health["model"].endswith(".gguf")
        and health["device"] == "cpu"
        and health["flash_attn"] is False  # --flash-attn auto, on a CPU
        and "chat_model" not in health
    )
    assert (
        isinstance(health["cpu_count"], int)
        and health["cuda_devices"] == []
        and health["arch"]
        and health["cpu_info"]
    )
    major, minor, _ = health["version"]["git_describe"].lstrip("v").split(".")
    assert (int(major), int(minor)) >= (0, 9)  # tabby-agent then asks for server_setting
    assert set(health["version"]) == {"build_date", "build_timestamp", "git_sha", "git_describe"}


def test_server_setting_disables_client_telemetry_by_default(make_app):
    assert make_app()[0].test_client().get("/v1beta/server_setting").json == {
        "disable_client_side_telemetry": True
    }
    assert make_app(client_telemetry=True)[0].test_client().get("/v1beta/server_setting").json == {
        "disable_client_side_telemetry": False
    }


@pytest.mark.parametrize("kind", ["view", "select", "dismiss", "some_future_event"])
def test_every_event_type_is_logged(make_app, kind):
    app, events = make_app()
    body = {
        "type": kind,
        "completion_id": "cmpl-1",
        "choice_index": 0,
        "view_id": "view-1",
        "elapsed": 850,
    }
    r = app.test_client().post("/v1/events", json=body)
    assert (r.status_code, r.data) == (200, b"")
    [line] = read_events(events)
    assert line["user"] is None and line["event"] == {
        kind: {"completion_id": "cmpl-1", "choice_index": 0, "view_id": "view-1", "elapsed": 850}
    }


def test_partial_accept_records_its_kind(make_app):
    app, events = make_app()
    r = app.test_client().post(
        "/v1/events?select_kind=line",
        json={
            "type": "select",
            "completion_id": "cmpl-1",
            "choice_index": 0,
            "select_kind": "line",
        },
    )
    assert r.status_code == 200
    assert read_events(events)[0]["event"] == {
        "select": {"completion_id": "cmpl-1", "choice_index": 0, "kind": "line"}
    }


def test_concurrent_writers_never_interleave_lines(make_app):
    app, events = make_app()
    big = "x" * 100_000  # far beyond one pipe/buffer write, where interleaving would show

    def post(i):
        client = app.test_client()
        for j in range(10):
            assert (
                client.post(
                    "/v1/events",
                    json={"type": "view", "completion_id": f"{i}-{j}-{big}", "choice_index": 0},
                ).status_code
                == 200
            )

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    lines = read_events(events)  # every line parses as JSON
    assert sorted(line["event"]["view"]["completion_id"][:5] for line in lines) == sorted(
        f"{i}-{j}-x"[:5] for i in range(8) for j in range(10)
    )
    assert all(len(line["event"]["view"]["completion_id"]) > 100_000 for line in lines)


def test_events_are_plain_json_lines_in_a_utc_dated_file(make_app):
    app, events = make_app()
    complete(app.test_client(), PREFIX, SUFFIX)
    [path] = events.glob("*.json")
    import datetime

    assert path.name == datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d.json")
    assert (
        json.loads(path.read_text())["event"]["completion"]["choices"][0]["text"]
        == "total = a + b\n    return total"
    )
