"""What the events log keeps is the user's choice: --events full|meta|off, --events-days."""

import datetime
import http.client
import json
import os
import time

from conftest import read_events, start_server, stop

# strings that only the requests carry: none may reach a file with --events meta
SECRETS = ["s3cr3t_prefix_token", "s3cr3t_suffix_token", "s3cr3t_snippet", "s3cr3t_decl",
           "s3cr3t_clip", "s3cr3t/path.py", "s3cr3t.example/repo.git", "s3cr3t_chat"]  # fmt: skip
COMPLETION = {
    "language": "python",
    "user": "alice",
    "segments": {
        "prefix": "# s3cr3t_prefix_token\ndef add(a, b):\n    ",
        "suffix": "\n# s3cr3t_suffix_token\n",
        "filepath": "s3cr3t/path.py",
        "git_url": "https://s3cr3t.example/repo.git",
        "clipboard": "s3cr3t_clip",
        "declarations": [{"filepath": "d.py", "body": "s3cr3t_decl = 1"}],
        "relevant_snippets_from_changed_files": [
            {"filepath": "e.py", "body": "s3cr3t_snippet = 2"}
        ],
    },
}
CHAT = {"messages": [{"role": "user", "content": "s3cr3t_chat"}]}


def post(url, path, body):
    host, port = url.rsplit("/", 1)[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def serve_and_ask(model_path, root, *flags):
    """A server process with flags; one completion, its view and select, one chat."""
    proc, url = start_server(
        ["--model", model_path(), "--chat-model", model_path("chat"), "--root", str(root), *flags]
    )
    try:
        status, answer = post(url, "/v1/completions", COMPLETION)
        assert status == 200 and answer["choices"][0]["text"] == "total = a + b\n    return total"
        for kind in ("view", "select"):
            event = {
                "type": kind,
                "completion_id": answer["id"],
                "choice_index": 0,
                "user": "alice",
            }
            assert post(url, "/v1/events", event)[0] == 200
        status, chat = post(url, "/v1/chat/completions", CHAT)
        assert status == 200 and chat["choices"][0]["message"]["content"]
    finally:
        stop(proc)
    return answer["id"]


def test_events_meta_keeps_ids_sizes_and_times_but_no_code(model_path, tmp_path):
    completion_id = serve_and_ask(model_path, tmp_path, "--events", "meta")
    text = "".join(path.read_text() for path in (tmp_path / "events").glob("*.json"))
    assert [secret for secret in SECRETS if secret in text] == []
    assert "total = a + b" not in text and "Use the add function" not in text  # nor the answers
    events = read_events(tmp_path / "events")
    completion, view, select, chat = (e["event"] for e in events)
    record = completion["completion"]
    assert set(record) == {"completion_id", "language", "user_agent", "choices", "snippets", "prompt_tokens", "reused_tokens",
                           "generated_tokens", "finish_reason", "model_ms", "total_ms"}  # fmt: skip
    assert (record["completion_id"], record["language"]) == (completion_id, "python")
    assert record["choices"] == [{"index": 0, "chars": len("total = a + b\n    return total")}]
    assert (record["generated_tokens"], record["finish_reason"]) == (9, "stop")
    assert record["prompt_tokens"] > 20 and record["total_ms"] >= record["model_ms"] > 0
    assert (
        view == {"view": {"completion_id": completion_id, "choice_index": 0}} and "select" in select
    )
    assert (
        chat["chat_completion"]["messages"] == 1 and chat["chat_completion"]["output"]["chars"] > 0
    )
    assert [e["user"] for e in events[:3]] == ["alice"] * 3


def test_the_default_keeps_no_code_and_start_up_says_where_events_go(model_path, tmp_path):
    proc, url = start_server(["--model", model_path(), "--root", str(tmp_path)], events=None)
    try:
        status, _ = post(url, "/v1/completions", COMPLETION)
    finally:
        said = stop(proc)
    text = "".join(path.read_text() for path in (tmp_path / "events").glob("*.json"))
    assert status == 200 and '"completion_id"' in text
    assert [secret for secret in SECRETS if secret in text] == []
    assert f"events: {tmp_path / 'events'}: ids, sizes and timings, no code" in said


def test_events_full_keeps_tabbys_layout_with_the_code(model_path, tmp_path):
    serve_and_ask(model_path, tmp_path, "--events", "full")
    text = "".join(path.read_text() for path in (tmp_path / "events").glob("*.json"))
    assert [secret for secret in SECRETS if secret not in text] == []  # the control: all there


def test_events_off_writes_nothing(model_path, tmp_path):
    serve_and_ask(model_path, tmp_path / "tabby", "--events", "off")
    assert not (tmp_path / "tabby").exists()


def test_events_days_deletes_old_day_files_at_start_up(model_path, tmp_path):
    folder = tmp_path / "events"
    folder.mkdir()
    today = datetime.datetime.now(datetime.timezone.utc).date()
    names = [f"{today - datetime.timedelta(days=n)}.json" for n in (0, 1, 2, 30)] + ["notes.txt"]
    for name in names:
        (folder / name).write_text('{"user": null, "ts": 0, "event": {"view": {}}}\n')
    proc, _ = start_server(["--model", model_path(), "--root", str(tmp_path), "--events-days", "2"])
    stop(proc)
    assert sorted(os.listdir(folder)) == sorted([names[0], names[1], "notes.txt"])


def test_events_days_deletes_the_oldest_day_file_after_midnight_while_running(
    make_app, tmp_path, monkeypatch
):
    """The server's clock is set to 1.5 s before a UTC midnight: at start-up the day file two
    days old goes; just after midnight, with no event to write, so does the one that has become
    two days old; the next event goes to the new day's file."""
    real_time = time.time
    midnight = (real_time() // 86400 + 30) * 86400  # a midnight, 30 days on (no real file's)
    offset = midnight - 1.5 - real_time()
    monkeypatch.setattr(time, "time", lambda: real_time() + offset)
    day = lambda n: time.strftime("%Y-%m-%d.json", time.gmtime(midnight + n * 86400))  # noqa: E731
    folder = tmp_path / "tabby" / "events"  # (make_app's --root)
    folder.mkdir(parents=True)
    for n in (-3, -2, -1):  # the day before yesterday, yesterday, today
        (folder / day(n)).write_text('{"user": null, "ts": 0, "event": {"view": {}}}\n')
    (folder / "notes.txt").write_text("not a day file\n")
    client = make_app(events_days=2)[0].test_client()
    assert sorted(os.listdir(folder)) == sorted([day(-2), day(-1), "notes.txt"])
    deadline = real_time() + 10
    while (folder / day(-2)).exists() and real_time() < deadline:
        time.sleep(0.05)
    assert time.time() > midnight and sorted(os.listdir(folder)) == sorted([day(-1), "notes.txt"])
    event = {"type": "view", "completion_id": "c", "choice_index": 0}
    assert client.post("/v1/events", json=event).status_code == 200
    assert sorted(os.listdir(folder)) == sorted([day(-1), day(0), "notes.txt"])
