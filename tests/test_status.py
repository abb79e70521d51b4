"""See what the server does: the status page (in a real browser), /metrics (read by Prometheus'
own parser), a token per developer, and the history that a restart keeps."""

import html.parser
import itertools
import json
import math
import os
import re
import shutil
import struct
import subprocess
import time
import urllib.request
import zlib

import numpy as np
import pytest
from conftest import read_events, start_server, stop
from prometheus_client.parser import text_string_to_metric_families

import app as server

ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
DAY = 86400
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\n\ndef main():\n    print(add(1, 2))\n"


def chromium():
    """Debian's chromium (.ci/run installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does)")
    return path


def browse(url, tmp_path, screenshot=None):
    """The DOM of url as headless Chromium renders it (and a screenshot of it, if asked)."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}"]  # fmt: skip
    if screenshot:
        shot = flags + ["--hide-scrollbars", "--window-size=900,1500", f"--screenshot={screenshot}"]
        subprocess.run(shot + [url], capture_output=True, timeout=60, check=True)
    done = subprocess.run(flags + ["--dump-dom", url], capture_output=True, timeout=60, check=True)
    return done.stdout.decode()


def brightness(path, block=50):
    """A PNG screenshot (8-bit RGB or RGBA, as Chromium writes them) as the mean brightness of
    each block x block square, 0-255: enough to see that two pictures show the same layout."""
    with open(path, "rb") as f:
        data = f.read()
    at, idat = 8, b""
    while at < len(data):
        size, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(
                ">IIBBBBB", data[at + 8 : at + 21]
            )
        idat += data[at + 8 : at + 8 + size] if kind == b"IDAT" else b""
        at += 12 + size
    assert (depth, interlace) == (8, 0) and color in (2, 6)
    step = 3 if color == 2 else 4  # bytes a pixel
    filtered = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, -1).astype(int)
    rows = np.zeros((height + 1, width * step), int)  # rows[0]: zeros, above the first row
    for y, (kind, line) in enumerate(zip(filtered[:, 0], filtered[:, 1:])):
        up = rows[y]
        if kind in (0, 1, 2):  # none, sub (a running sum along each channel), up
            line = line.reshape(-1, step).cumsum(0).reshape(-1) if kind == 1 else line
            rows[y + 1] = (line + (up if kind == 2 else 0)) % 256
            continue
        out, line, up = [0] * len(line), line.tolist(), up.tolist()
        for x in range(len(line)):  # average, Paeth: each byte needs the one before it
            a, b, c = (out[x - step], up[x], up[x - step]) if x >= step else (0, up[x], 0)
            pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
            guess = (
                (a + b) // 2 if kind == 3 else a if pa <= pb and pa <= pc else b if pb <= pc else c
            )
            out[x] = (line[x] + guess) % 256
        rows[y + 1] = out
    gray = rows[1:].reshape(height, width, step)[:, :, :3] @ [0.299, 0.587, 0.114]
    h, w = height // block * block, width // block * block
    return gray[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))


class Figures(html.parser.HTMLParser):
    """What a page shows: the text of each element with an id, and the rows and bars that carry
    data-language, data-user or data-day."""

    def __init__(self, page):
        super().__init__()
        self.ids, self.rows, self.days, self.open = {}, {}, {}, []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-day" in attrs:
            self.days[attrs["data-day"]] = (int(attrs["data-viewed"]), int(attrs["data-selected"]))
        for kind in ("language", "user"):
            if f"data-{kind}" in attrs:
                self.row = self.rows.setdefault((kind, attrs[f"data-{kind}"]), {})
        if "class" in attrs and attrs["class"] in ("viewed", "selected"):
            self.open.append(("row", attrs["class"]))
        elif "id" in attrs:
            self.open.append(("id", attrs["id"]))
        else:
            self.open.append(None)

    def handle_endtag(self, tag):
        if self.open:
            self.open.pop()

    def handle_data(self, data):
        where = self.open[-1] if self.open else None
        if where and where[0] == "id":
            self.ids[where[1]] = self.ids.get(where[1], "") + data
        elif where:
            self.row[where[1]] = int(data)


def record(user, ts, kind, **fields):
    return {"user": user, "ts": int(ts * 1000), "event": {kind: fields}}


def history(now):
    """Events of earlier days, as the server logs them: (records, what they add up to)."""
    records, numbers = [], itertools.count(1)

    def completion(user, ts, language, total_ms, reason="stop", viewed=False, selected=False):
        n = next(numbers)
        fields = {"completion_id": f"cmpl-old-{n}", "language": language, "prompt_tokens": 100,
                  "reused_tokens": 90, "generated_tokens": 5, "finish_reason": reason,
                  "model_ms": total_ms - 1, "total_ms": total_ms}  # fmt: skip
        records.append(record(user, ts, "completion", **fields))
        for kind in ["view"] * viewed + ["select"] * selected:
            records.append(
                record(user, ts + 1, kind, completion_id=f"cmpl-old-{n}", choice_index=0)
            )

    for i in range(6):  # three days ago: alice, in Python, 6 completions, 4 viewed, 2 taken
        completion("alice", now - 3 * DAY, "python", 100 + 10 * i, viewed=i < 4, selected=i < 2)
    for i in range(4):  # yesterday: bob, in Go; one typed through; 2 viewed, 1 taken
        reason = "typed through" if i == 0 else "stop"
        completion("bob", now - DAY, "go", 200 + 10 * i, reason, viewed=i < 2, selected=i < 1)
    records.append(record("bob", now - DAY, "completion_cancelled", completion_id="c",
                          language="go", total_ms=5.0))  # fmt: skip
    return records


def write_history(root, records):
    folder = root / "events"
    folder.mkdir(parents=True)
    for r in records:
        day = time.strftime("%Y-%m-%d", time.gmtime(r["ts"] / 1000))
        with open(folder / f"{day}.json", "a") as f:
            f.write(json.dumps(r) + "\n")
    with open(folder / "2020-01-01.json", "w") as f:  # too old for the page
        f.write(json.dumps(record("alice", 1577836800, "view", completion_id="x", choice_index=0)))
    with open(folder / f"{time.strftime('%Y-%m-%d', time.gmtime(time.time() - 2 * DAY))}.json",
              "w") as f:  # fmt: skip
        f.write('{"not": "ours"}\n[1, 2]\nnot json\n')  # other lines are skipped


def call(url, path, token, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or "null")


def complete(url, token, language, prefix=PREFIX):
    body = {"language": language, "segments": {"prefix": prefix, "suffix": SUFFIX}}
    return call(url, "/v1/completions", token, body)


def event(url, token, kind, completion_id):
    call(
        url, "/v1/events", token, {"type": kind, "completion_id": completion_id, "choice_index": 0}
    )


def nearest_rank(values, share):
    values = sorted(values)
    return values[max(0, math.ceil(share * len(values)) - 1)]


def assert_ms(text, expected):
    """A latency as the page shows it, within the 2 % of its buckets (and the rounding)."""
    shown = float(text.split()[0]) * (1000 if text.endswith(" s") else 1)
    assert abs(shown - expected) <= 0.025 * expected + 0.5, (text, expected)


def test_the_status_page_shows_in_a_browser_what_the_server_did(model_path, tmp_path):
    now = time.time()
    root = tmp_path / "tabby"
    write_history(root, history(now))
    tokens = tmp_path / "tokens"
    tokens.write_text("# who may use the server\nalice a-s3cret\nbob b-s3cret  # since May\n")
    proc, url = start_server(
        ["--model", model_path(), "--root", str(root), "--tokens", str(tokens)]
    )
    try:
        ids = [complete(url, "a-s3cret", "python")["id"] for _ in range(3)]
        ids += [complete(url, "b-s3cret", "javascript")["id"] for _ in range(2)]
        for kind, completion_id in [("view", ids[0]), ("view", ids[0]), ("select", ids[0]),
                                    ("view", ids[1]), ("view", ids[3])]:  # fmt: skip
            event(url, "b-s3cret" if completion_id == ids[3] else "a-s3cret", kind, completion_id)
        refused = browse(url + "/", tmp_path)
        os.makedirs(ARTIFACTS, exist_ok=True)
        shot = os.path.join(ARTIFACTS, "status-page.png")
        page = browse(url.replace("//", "//anyone:a-s3cret@") + "/", tmp_path, screenshot=shot)
    finally:
        log = stop(proc)
    # without credentials: a 401 asking for Basic auth, which headless Chromium cannot answer
    assert re.search(r'GET / HTTP/1\.1\S*" 401', log) and "days-served" not in refused
    assert os.path.getsize(shot) > 10_000
    # the README's picture is this page: the same size and layout, only some figures differ (a
    # line of text moved by 10 pixels makes a difference of 2)
    readme_shot = os.path.join(os.path.dirname(ARTIFACTS), "status-page.png")
    ours, readmes = brightness(shot), brightness(readme_shot)
    assert ours.shape == readmes.shape and np.abs(ours - readmes).mean() < 0.5
    shown = Figures(page)
    today = root / "events" / time.strftime("%Y-%m-%d.json", time.gmtime())
    live = [e["event"]["completion"] for e in map(json.loads, today.read_text().splitlines())
            if "completion" in e["event"]]  # fmt: skip
    assert len(live) == 5 and {c["completion_id"] for c in live} == set(ids)
    # the last hour: what was served now; the last 14 days: that and the history
    assert shown.ids["hour-served"] == "5" and shown.ids["days-served"] == "15"
    assert shown.ids["hour-cancelled"] == "0%" and shown.ids["days-cancelled"] == "6%"  # 1 of 16
    assert shown.ids["days-typed"] == "7%"  # 1 of 15
    old_ms = [100 + 10 * i for i in range(6)] + [200 + 10 * i for i in range(4)]
    all_ms = old_ms + [c["total_ms"] for c in live]
    assert_ms(shown.ids["days-p50"], nearest_rank(all_ms, 0.5))
    assert_ms(shown.ids["days-p90"], nearest_rank(all_ms, 0.9))
    assert_ms(shown.ids["hour-p90"], nearest_rank([c["total_ms"] for c in live], 0.9))
    reused = 10 * 90 + sum(c["reused_tokens"] for c in live)
    prompt = 10 * 100 + sum(c["prompt_tokens"] for c in live)
    assert shown.ids["days-reused"] == f"{100 * reused / prompt:.0f}%"
    # acceptance: each completion once (a second view of ids[0] is no new view)
    assert (shown.ids["viewed"], shown.ids["selected"]) == ("9", "4")  # 4+2 before, 3 now
    assert shown.ids["rate"] == "44%"
    assert shown.rows["language", "python"] == {"viewed": 6, "selected": 3}
    assert shown.rows["language", "go"] == {"viewed": 2, "selected": 1}
    assert shown.rows["language", "javascript"] == {"viewed": 1, "selected": 0}
    assert shown.rows["user", "alice"] == {"viewed": 6, "selected": 3}
    assert shown.rows["user", "bob"] == {"viewed": 3, "selected": 1}
    day = lambda ago: time.strftime("%Y-%m-%d", time.gmtime(now - ago * DAY))  # noqa: E731
    assert len(shown.days) == 14 and shown.days[day(3)] == (4, 2) and shown.days[day(1)] == (2, 1)
    assert shown.days[day(0)] == (3, 1) and shown.days[day(2)] == (0, 0)
    # aggregates only: nothing of anyone's code
    assert "add(a, b)" not in page and "total = a + b" not in page


def test_metrics_are_read_by_prometheus_parser_and_count_what_happened(make_app):
    app, events = make_app()
    client = app.test_client()
    for language in ("python", "python", "go"):
        body = {"language": language, "segments": {"prefix": PREFIX, "suffix": SUFFIX}}
        assert client.post("/v1/completions", json=body).status_code == 200
    for kind in ("view", "select", "dismiss", "view"):
        body = {"type": kind, "completion_id": "cmpl-1", "choice_index": 0}
        assert client.post("/v1/events", json=body).status_code == 200
    completions = [
        e["event"]["completion"] for e in read_events(events) if "completion" in e["event"]
    ]
    shutil.rmtree(events)
    events.write_text("not a folder")  # one event lost
    assert client.post("/v1/events", json={"type": "view", "completion_id": "c",
                                           "choice_index": 0}).status_code == 503  # fmt: skip
    r = client.get("/metrics")
    assert r.status_code == 200 and r.content_type.startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        assert family.name.startswith("tabbypy_")
        for s in family.samples:
            samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    assert samples["tabbypy_completions_total", (("language", "python"), ("reason", "stop"))] == 1
    assert samples["tabbypy_completions_total", (("language", "python"), ("reason", "cached"))] == 1
    assert samples["tabbypy_completions_total", (("language", "go"), ("reason", "stop"))] == 1
    for name in ("prompt_tokens", "reused_tokens", "generated_tokens"):
        assert samples[f"tabbypy_{name}_total", ()] == sum(c[name] for c in completions)
    assert samples["tabbypy_completion_seconds_count", ()] == 3
    assert samples["tabbypy_completion_seconds_bucket", (("le", "+Inf"),)] == 3
    total = sum(c["total_ms"] for c in completions) / 1000
    assert samples["tabbypy_completion_seconds_sum", ()] == pytest.approx(total, abs=1e-6)
    assert samples["tabbypy_completion_model_seconds_count", ()] == 3
    assert samples["tabbypy_events_total", (("type", "view"),)] == 3  # the lost one is counted
    assert samples["tabbypy_events_total", (("type", "completion"),)] == 3
    assert samples["tabbypy_events_lost_total", ()] == 1
    assert samples["tabbypy_requests_waiting", ()] == 0
    assert samples["tabbypy_kv_cache_bytes", ()] >= 0
    assert samples["tabbypy_start_time_seconds", ()] <= time.time()


def test_an_engine_failing_is_counted_by_the_status_it_got(tmp_path):
    config = server.load_config(["--backend", "http://127.0.0.1:9/completion",
                                 "--prompt-template", "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
                                 "--root", str(tmp_path)], environ={})  # fmt: skip
    client = server.create_app(config).test_client()
    body = {"language": "python", "segments": {"prefix": PREFIX}}
    assert [client.post("/v1/completions", json=body).status_code for _ in range(2)] == [502, 502]
    families = text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    errors = next(f for f in families if f.name == "tabbypy_engine_errors")
    assert [(s.labels, s.value) for s in errors.samples] == [({"status": "502"}, 2)]


def test_a_token_per_developer_names_the_user_and_can_be_revoked(make_app, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice a-s3cret\nbob b-s3cret\n")
    app, events = make_app(tokens=str(tokens), token="shared")
    client = app.test_client()

    def ask(token, user=None):
        body = {"language": "python", "user": user, "segments": {"prefix": PREFIX}}
        return client.post(
            "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}
        )

    assert ask("a-s3cret", user="mallory").status_code == 200  # the token names the user
    assert ask("b-s3cret").status_code == 200
    assert ask("shared", user="carol").status_code == 200  # --token names nobody: the body does
    assert ask("nobody").status_code == 401
    event = {"type": "view", "completion_id": "c", "choice_index": 0}
    headers = {"Authorization": "Bearer b-s3cret"}
    assert client.post("/v1/events", json=event, headers=headers).status_code == 200
    users = [(r["user"], next(iter(r["event"]))) for r in read_events(events)]
    assert users == [("alice", "completion"), ("bob", "completion"), ("carol", "completion"),
                     ("bob", "view")]  # fmt: skip
    # bob's token revoked while the server runs, by an edit with a mistake in it: refused from
    # then on, without a restart (the broken line is left out, not the edit)
    tokens.write_text("alice a-s3cret\ncarol c-s3cret extra\n")
    edited = time.monotonic()
    while ask("b-s3cret").status_code != 401 and time.monotonic() < edited + 5:
        time.sleep(0.02)
    took = time.monotonic() - edited  # (the file is looked at every second)
    assert ask("b-s3cret").status_code == 401 and took < 1.25, took
    assert ask("a-s3cret").status_code == 200
    assert ask("c-s3cret").status_code == 401
    # a page for people: a browser's Basic auth, the token as the password; /metrics: a bearer
    assert client.get("/").status_code == 401
    assert client.get("/").headers["WWW-Authenticate"].startswith("Basic")
    assert client.get("/", auth=("anyone", "a-s3cret")).status_code == 200
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer shared"}).status_code == 200


@pytest.mark.parametrize("text, error", [
    ("alice\n", "line 1: not a user name and a token"),
    ("alice a\nbob b c\n", "line 2: not a user name and a token"),
    ("alice a\nbob a\n", "line 2: a token given twice"),
])  # fmt: skip
def test_a_bad_tokens_file_stops_start_up(tmp_path, text, error):
    path = tmp_path / "tokens"
    path.write_text(text)
    config = server.load_config(["--backend", "http://127.0.0.1:9/v1", "--backend-model", "starcoder",
                                 "--tokens", str(path), "--root", str(tmp_path)], environ={})  # fmt: skip
    with pytest.raises(SystemExit, match=f"error: --tokens {path}: {error}"):
        server.create_app(config)


def test_the_history_survives_a_restart(make_app, tmp_path):
    app, _ = make_app()
    client = app.test_client()
    for _ in range(4):
        body = {"language": "rust", "segments": {"prefix": PREFIX}}
        completion_id = client.post("/v1/completions", json=body).json["id"]
    client.post("/v1/events", json={"type": "select", "completion_id": completion_id,
                                    "choice_index": 0})  # fmt: skip
    before = Figures(client.get("/").get_data(as_text=True))
    again = Figures(make_app()[0].test_client().get("/").get_data(as_text=True))  # a new process
    assert before.ids["days-served"] == again.ids["days-served"] == "4"
    assert again.ids["hour-served"] == "4" and again.rows["language", "rust"] == {
        "viewed": 1, "selected": 1}  # fmt: skip
    assert again.ids["days-p50"] == before.ids["days-p50"]


def test_percentiles_and_tokens_read_as_they_should(make_app):
    tally = __import__("collections").Counter(
        {("total_ms", server.bucket(ms)): 1 for ms in (10, 20, 30, 40)}
    )
    assert server.percentile(tally, "total_ms", 0.5) == pytest.approx(20, rel=0.011)
    assert server.percentile(tally, "total_ms", 0.9) == pytest.approx(40, rel=0.011)
    assert server.percentile(tally, "model_ms", 0.5) is None
    client = make_app(token="p:w")[0].test_client()
    basic = "Basic " + __import__("base64").b64encode(b"me:p:w").decode()
    for header, status in (("Bearer p:w", 200), (basic, 200), ("Basic !!!", 401), ("p:w", 401)):
        assert client.get("/v1/health", headers={"Authorization": header}).status_code == status
    assert server.label_text((("a", 'x"\\\n'),)) == '{a="x\\"\\\\\\n"}'


def test_the_screenshot_in_the_readme_is_the_pages():
    """The README shows the page (tests/status-page.png, a copy of the browser test's artifact,
    which that test compares with the page it sees)."""
    readme = open(os.path.join(os.path.dirname(ARTIFACTS), "..", "README.md")).read()
    assert "](tests/status-page.png)" in readme
    assert os.path.getsize(os.path.join(os.path.dirname(ARTIFACTS), "status-page.png")) < 200_000


def test_the_page_and_metrics_are_open_without_a_token(make_app):
    client = make_app()[0].test_client()
    assert client.get("/").status_code == 200 and client.get("/metrics").status_code == 200


def test_odd_lines_in_the_history_are_skipped_and_cannot_grow_the_figures(make_app, tmp_path):
    """The events log is a file anyone may edit, and clients name their own languages, event
    types and users: none of that may stop the server, break the page or grow without bound."""
    folder = tmp_path / "tabby" / "events"
    folder.mkdir(parents=True)
    now = time.time()
    odd = [{"user": "x", "ts": 1e300, "event": {"view": {"completion_id": "a"}}},
           {"user": "x", "ts": float("inf"), "event": {"view": {"completion_id": "a"}}},
           {"user": "x", "ts": 10**400, "event": {"view": {"completion_id": "a"}}},
           record("x", now, "completion", completion_id="c1", language=5, total_ms=1e400,
                  model_ms=float("nan"), prompt_tokens="many", finish_reason=[]),
           record(None, now, "view", completion_id="c1", choice_index=0)]  # fmt: skip
    with open(folder / time.strftime("%Y-%m-%d.json", time.gmtime(now)), "w") as f:
        for r in odd:
            f.write(json.dumps(r) + "\n")
    app, _ = make_app()
    client = app.test_client()
    for n in range(50):  # the client's own languages and types, and users the body names
        body = {"language": f"lang{n}", "user": f"user{n}", "segments": {"prefix": PREFIX}}
        completion_id = client.post("/v1/completions", json=body).json["id"]
        body = {"type": f"type{n}", "completion_id": completion_id, "choice_index": 0}
        assert client.post("/v1/events", json=body, query_string={"u": n}).status_code == 200
    page = client.get("/")
    assert page.status_code == 200
    shown = Figures(page.get_data(as_text=True))
    assert shown.ids["days-served"] == "51"  # the odd completion counts, with no latency
    assert set(shown.rows) == {("language", "other")}  # no user by name: no tokens name them
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'type="other"' in metrics and "lang7" not in metrics and "type7" not in metrics
