"""Bad input gets a 4xx with {"error": ...}; the server keeps serving and the events log stays whole."""

import pytest
from conftest import complete, read_events

GOOD = {"language": "python", "segments": {"prefix": "def f():\n    ", "suffix": "\n"}}


@pytest.mark.parametrize(
    "data, status, message",
    [
        (b"not json", 400, "body is not valid JSON"),
        (b'{"segments": {"prefix": "\xff\xfe"}}', 400, "body is not valid UTF-8"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'"a string"', 400, "body must be a JSON object"),
        (b"", 400, "body is not valid JSON"),
        (b"{}", 400, "segments is required"),
        (b'{"segments": null}', 400, "segments is required"),
        (b'{"segments": "def f"}', 400, "segments must be an object"),
        (b'{"segments": {}}', 400, "segments.prefix is required"),
        (b'{"segments": {"prefix": 42}}', 400, "segments.prefix must be a string"),
        (
            b'{"segments": {"prefix": "x", "suffix": ["y"]}}',
            400,
            "segments.suffix must be a string",
        ),
        (
            b'{"segments": {"prefix": "x", "declarations": {}}}',
            400,
            "segments.declarations must be a list",
        ),
        (
            b'{"segments": {"prefix": "x", "declarations": ["y"]}}',
            400,
            "segments.declarations[0] must be an object",
        ),
        (
            b'{"segments": {"prefix": "x", "declarations": [{"filepath": "a"}]}}',
            400,
            "segments.declarations[0].body is required",
        ),
        (
            b'{"segments": {"prefix": "x", "relevant_snippets_from_changed_files": [{"filepath": "a", "body": "b", "score": "high"}]}}',
            400,
            "segments.relevant_snippets_from_changed_files[0].score must be a number",
        ),
        (b'{"segments": {"prefix": "x"}, "language": 3}', 400, "language must be a string"),
        (
            b'{"segments": {"prefix": "x"}, "temperature": "hot"}',
            400,
            "temperature must be a number",
        ),
        (b'{"segments": {"prefix": "x"}, "temperature": NaN}', 400, "temperature must be a number"),
        (b'{"segments": {"prefix": "x"}, "temperature": -1}', 400, "temperature must be 0 or more"),
        (b'{"segments": {"prefix": "x"}, "seed": 1.5}', 400, "seed must be an integer"),
        (b'{"segments": {"prefix": "x"}, "seed": true}', 400, "seed must be an integer"),
        (b'{"segments": {"prefix": "x"}, "seed": -1}', 400, "seed must be 0 or more"),
        (
            b'{"segments": {"prefix": "x"}, "mode": "next_edit_suggestion"}',
            400,
            "next_edit_suggestion is not supported",
        ),
        (b'{"debug_options": {"raw_prompt": 1}}', 400, "debug_options.raw_prompt must be a string"),
        (
            b'{"segments": {"prefix": "x"}, "debug_options": {"return_prompt": "yes"}}',
            400,
            "debug_options.return_prompt must be true or false",
        ),
    ],
)
def test_bad_completion_requests(make_app, data, status, message):
    app, events = make_app()
    client = app.test_client()
    r = client.post("/v1/completions", data=data, content_type="application/json")
    assert r.status_code == status and r.is_json
    assert message in r.json["error"]
    assert (
        complete(client, "def f():\n    ", "\n") == "total = a + b\n    return total"
    )  # still serving
    assert [list(line["event"]) for line in read_events(events)] == [
        ["completion"]
    ]  # the bad one left no trace


@pytest.mark.parametrize(
    "body, message",
    [
        ({"completion_id": "c", "choice_index": 0}, "type is required"),
        ({"type": 1, "completion_id": "c", "choice_index": 0}, "type must be a string"),
        ({"type": "view", "choice_index": 0}, "completion_id is required"),
        (
            {"type": "view", "completion_id": "c", "choice_index": "0"},
            "choice_index must be an integer",
        ),
        (
            {"type": "view", "completion_id": "c", "choice_index": 0, "elapsed": "1s"},
            "elapsed must be an integer",
        ),
        # the server's own records cannot be forged (nor break --events meta, which reads them)
        ({"type": "completion", "completion_id": "c", "choice_index": 0}, "server's own record"),
        ({"type": "chat_completion", "completion_id": "c", "choice_index": 0}, "server's own"),
    ],
)
def test_bad_events(make_app, body, message):
    app, events = make_app()
    r = app.test_client().post("/v1/events", json=body)
    assert r.status_code == 400 and message in r.json["error"]
    assert read_events(events) == []


def test_a_body_over_the_limit_gets_413(make_app):
    app, events = make_app(max_body=1000)
    client = app.test_client()
    r = client.post("/v1/completions", json={"segments": {"prefix": "x" * 2000}})
    assert r.status_code == 413 and "error" in r.json
    r = client.post(
        "/v1/events", json={"type": "view", "completion_id": "x" * 2000, "choice_index": 0}
    )
    assert r.status_code == 413 and read_events(events) == []
    assert complete(client, "def f():\n    ", "\n") == "total = a + b\n    return total"


def test_unknown_routes_and_methods_answer_json(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.is_json and r.json["error"]
    r = client.get("/v1/completions")
    assert r.status_code == 405 and r.is_json and r.json["error"]
    r = client.delete("/v1/health")
    assert r.status_code == 405 and r.is_json


def test_content_type_is_not_required(client):
    r = client.post(
        "/v1/completions",
        data=b'{"segments": {"prefix": "def f():\\n    "}}',
        content_type="text/plain",
    )
    assert r.status_code == 200


# every route that needs the token when one is set (README: /v1/*, /v1beta/*, /metrics and /),
# and what it answers with the right one (chat: 501, there is no chat model here)
ROUTES = [
    ("get", "/v1/health", 200),
    ("post", "/v1/health", 200),
    ("post", "/v1/completions", 200),
    ("post", "/v1/events", 200),
    ("get", "/v1beta/server_setting", 200),
    ("post", "/v1/chat/completions", 501),
    ("post", "/v1beta/chat/completions", 501),
    ("get", "/metrics", 200),
    ("get", "/", 200),
]


@pytest.mark.parametrize("method, path, _", ROUTES)
@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Bearer", "s3cret", "Bearer s3cret2", "Bearer s3cr\u00e9t"]
)
def test_token_required_on_every_route(make_app, method, path, _, header):
    app, events = make_app(token="s3cret")
    headers = {"Authorization": header} if header else {}
    r = getattr(app.test_client(), method)(path, json=GOOD, headers=headers)
    assert r.status_code == 401 and "token" in r.json["error"]
    assert read_events(events) == []


@pytest.mark.parametrize("method, path, status", ROUTES)
def test_right_token_passes(make_app, method, path, status):
    app, _ = make_app(token="s3cret")
    body = (
        {"type": "view", "completion_id": "c", "choice_index": 0} if path == "/v1/events" else GOOD
    )
    r = getattr(app.test_client(), method)(
        path, json=body, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == status


def test_unknown_paths_need_no_token_but_still_answer_json(make_app):
    r = make_app(token="s3cret")[0].test_client().get("/nowhere")
    assert r.status_code == 404 and r.is_json
