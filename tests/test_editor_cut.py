"""Never cut what the editor would show. For each case (a document, the cursor, the text a model
writes there) the real tabby-agent is asked twice: once from a stub Tabby server that answers what
a Tabby server answers for the model's text (tabby_reference: Tabby's stop words and stop
condition, from its own files, sharing nothing with app.py), once from our server, which
generates the same text from a stub engine and stops where it predicts the editor cuts. What the
editor shows from ours must begin with what it shows from Tabby's, which is not blank unless
blank is the case's point."""

import http.server
import json
import re
import threading

import pytest
import tabby_reference as tabby
from conftest import start_server, stop
from tabbyagent import Agent

BLANK = []  # the cases whose point is that the editor shows nothing


def blank(*case):
    """A case where the editor shows nothing from Tabby's answer, and must show nothing from
    ours: the model writes nothing (or a blank line), or the editor drops what it writes."""
    BLANK.append(case)
    return case


# (language, the document with "│" at the cursor, what the model writes there). The five
# patterns of issue "Never cut what the editor would show" are marked.
CASES = [
    # Python
    (
        "python",
        "def add(a, b):\n    │\n\n\ndef main():\n    pass\n",
        "return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    ),
    ("python", "def add(a, b):\n    │\n", "x = a + b\n    return x\nprint(x)"),
    ("python", "def f(a, b):\n    x = a + b│\n", "\n    y = x * 2\n    return y"),  # 1
    (
        "python",
        "def f(a, b):\n    x = a + b│\n\n\ndef g():\n    pass\n",
        "\n    y = x * 2\n    return y\n\n\ndef h():\n    pass",
    ),  # 1
    (
        "python",
        "def f(a, b, c):\n    total = compute(a, │\n",
        "b,\n                    c)\n    return total\n\n\nprint(f(1, 2, 3))",
    ),  # 2
    (
        "python",
        "def f(a, b, c):\n    total = a + │\n",
        "b \\\n        + c\n    return total\n",
    ),  # 2
    ("python", "def f(a, b):\n    if a │\n", "> b:\n        return a\n    return b"),  # 3
    (
        "python",
        "def f(items):\n    total = 0\n    for x in │\n",
        "items:\n        total += x\n    return total\n\n\nf([])",
    ),  # 3
    (
        "python",
        "def f(a):\n    if a:\n        │\n",
        "return 1\n    else:\n        return 2\n    return 3\n",
    ),  # 4
    (
        "python",
        "def f(a):\n    if a > 1:\n        │\n",
        "return 1\n    elif a > 0:\n        return 2\n    else:\n        return 3\n",
    ),  # 4
    (
        "python",
        "def f():\n    try:\n        │\n",
        "x = g()\n    except ValueError:\n        x = None\n    return x",
    ),  # 4
    ("python", "def f(a):\n    compute(│, 2)\n", "alpha, 2)\n    x = 1"),  # 5
    ("python", "def f(x):\n    print(│, end='')\n", "value, end='')\n    return x\n"),  # 5
    # the first line does not end as the line after the cursor does: the agent drops it
    blank("python", "def f(a):\n    compute(│, 2)\n", "a, b)\n    x = 1"),
    ("python", "def f(a, b):\n    result = foo(│)\n", "a, b)\n    return result"),
    ("python", "def f(a, b):\n    result = │\n", "a + b\n    return result\n"),
    (
        "python",
        "def f(a, b):\n    result = │\n",
        "[\n        a,\n        b,\n    ]\n    print(result)",
    ),
    ("python", "def f():\n    config = │\n", '{\n        "a": 1,\n    }\n    return config'),
    ("python", "def f(a):\n\t│\n", "return a\n\ndef g():\n\treturn 1"),
    ("python", "def f(a):\n\tif a:\n\t\t│\n", "return 1\n\treturn 2\n"),
    (
        "python",
        "def add(a, b):\r\n    │\r\n",
        "return a + b\r\n\r\n\r\ndef sub(a, b):\r\n    return a - b\r\n",
    ),
    ("python", "def f(a, b):\r\n    x = a + b│\r\n", "\r\n    y = x * 2\r\n    return y"),  # 1
    ("python", "def f():\n    x = 1\n    │\n", "y = 2\n\n    z = 3\n    return z"),
    blank("python", "def f():\n    │\n", ""),
    blank("python", "def f():\n    │\n", "   \n  \n"),
    blank("python", "def f():\n    │\n", "\n\n    return 1"),  # a stop word at once
    (
        "python",
        "class A:\n    def f(self):\n        │\n",
        "return self.x\n\n    def g(self):\n        return 1",
    ),
    ("python", "import os\n\n│\n", "def main():\n    print(os.getcwd())\n\n\nmain()"),
    ("python", "def f(a, b):\n    # add up │\n", "a and b\n    total = a + b\n    return total"),
    ("python", 'def f():\n    msg = "hello │"\n', 'world"\n    print(msg)'),
    ("python", "def f(a, b):\n    return │\n", "a + b\n\n\ndef sub(a, b):"),
    ("python", "def f():\n    def g():\n        │\n", "return 1\n    return g\n\n\nf()"),
    (
        "python",
        "def f(p):\n    with open(p) as f:\n        │\n",
        "data = f.read()\n    return data\n",
    ),
    ("python", "def f():\n    def helper(x)│\n", ":\n        return x * 2\n    return helper"),  # 3
    ("python", "def f(a):\n    x = [│]\n", "a, a]\n    return x"),
    # JavaScript and TypeScript
    (
        "javascript",
        "function add(a, b) {\n  │\n}\n",
        "return a + b;\n}\n\nfunction sub(a, b) {\n  return a - b;\n}\n",
    ),
    (
        "javascript",
        "function get(url) {\n  return fetch(url)│\n}\n",
        "\n    .then((r) => r.json())\n    .then((d) => d.items);\n}",
    ),  # 1
    (
        "javascript",
        "function f(a) {\n  if (a) {\n    │\n  }\n}\n",
        "b();\n  } else {\n    c();\n  }\n  d();\n}",
    ),  # 4
    ("javascript", "function f(a) {\n  console.log(│);\n}\n", "alpha);\n  x = 1;"),  # 5
    (
        "javascript",
        "function f(user) {\n  const name = getName(│, true);\n}\n",
        "user, true);\n  return name;",
    ),  # 5
    (
        "javascript",
        "const add = (a, b) => {\n  │\n};\n",
        "return a + b;\n};\n\nconst sub = (a, b) => a - b;",
    ),
    (
        "javascript",
        "const config = {\n  │\n};\n",
        'port: 8080,\n  host: "localhost",\n};\n\nexport default config;',
    ),
    ("javascript", "function f(a, b) {\n  const x = │\n}\n", "a + b;\n  return x;\n}"),
    (
        "javascript",
        "function f(items) {\n  let total = 0;\n  items.forEach((item) => │\n}\n",
        "{\n    total += item;\n  });\n  return total;\n}",
    ),  # 3
    (
        "javascript",
        "function f() {\n  switch (k) {\n    case 1:\n      │\n  }\n}\n",
        "return 'one';\n    case 2:\n      return 'two';\n  }\n}",
    ),
    ("javascript", "function f() {\n\t│\n}\n", "return 1;\n}\n"),
    ("javascript", "function add(a, b) {\r\n  │\r\n}\r\n", "return a + b;\r\n}\r\n"),
    ("javascript", "function f() {\n  foo(│)\n}\n", "a, b)\n  bar();"),
    blank("javascript", "function f() {\n  │\n}\n", "  \n"),
    blank("javascript", "function f() {\n  │\n}\n", ""),
    ("javascript", "function f(x) {\n  if (│) {\n  }\n}\n", "x > 0) {"),  # 5
    (
        "javascript",
        "function f(a, b) {\n  const total = compute(a, │\n}\n",
        "b,\n    c);\n  return total;\n}",
    ),  # 2
    (
        "typescript",
        "interface User {\n  │\n}\n",
        "name: string;\n  age: number;\n}\n\nexport type Id = string;",
    ),
    (
        "typescript",
        "class A {\n  x = 0;\n  get(): number {\n    │\n  }\n}\n",
        "return this.x;\n  }\n\n  set(v: number) {\n    this.x = v;\n  }",
    ),
    (
        "typescript",
        "function f(a: number): number {\n  const b = a * 2│\n}\n",
        "\n  const c = b + 1;\n  return c;\n}",
    ),  # 1
    (
        "typescript",
        "function f(a: number) {\n  if (a │\n}\n",
        "> 0) {\n    return a;\n  }\n  return -a;\n}",
    ),  # 3
    # Go
    (
        "go",
        "func add(a, b int) int {\n\t│\n}\n",
        "return a + b\n}\n\nfunc sub(a, b int) int {\n\treturn a - b\n}",
    ),
    (
        "go",
        "func f(a, b int) int {\n\tif a > b {\n\t\t│\n\t}\n}\n",
        "return a\n\t} else {\n\t\treturn b\n\t}\n}",
    ),  # 4
    ("go", "func f(a, b int) int {\n\tx := │\n}\n", "a + b\n\treturn x\n}"),
    (
        "go",
        "func f(a int) int {\n\tresult := compute(a)│\n}\n",
        "\n\tif result > 0 {\n\t\treturn result\n\t}\n\treturn 0\n}",
    ),  # 1
    ("go", "func f(a, b int) {\n\tfmt.Println(│, b)\n}\n", "value, b)\n\treturn"),  # 5
    ("go", "type User struct {\n\t│\n}\n", "Name string\n\tAge  int\n}\n\nfunc main() {"),
    (
        "go",
        "func f(n int) int {\n\ttotal := 0\n\tfor i := 0; i < n; i++ │\n}\n",
        "{\n\t\ttotal += i\n\t}\n\treturn total\n}",
    ),  # 3
    (
        "go",
        "func f(x int) string {\n\tswitch x {\n\tcase 1:\n\t\t│\n\t}\n}\n",
        'return "one"\n\tcase 2:\n\t\treturn "two"\n\t}\n\treturn ""',
    ),  # 4
    (
        "go",
        "func f() error {\n\tv, err := g()\n\t│\n}\n",
        "if err != nil {\n\t\treturn err\n\t}\n\treturn use(v)\n}",
    ),
    blank("go", "func f() {\n\t│\n}\n", ""),
    (
        "go",
        "func f(a, b, c int) int {\n\ttotal := compute(a,│\n}\n",
        "\n\t\tb,\n\t\tc)\n\treturn total\n}",
    ),  # 2
    # Rust
    (
        "rust",
        "fn add(a: i32, b: i32) -> i32 {\n    │\n}\n",
        "a + b\n}\n\nfn sub(a: i32, b: i32) -> i32 {\n    a - b\n}",
    ),
    (
        "rust",
        "fn f(x: i32) -> &'static str {\n    match x {\n        │\n    }\n}\n",
        '1 => "one",\n        _ => "many",\n    }\n}',
    ),
    (
        "rust",
        "fn f(a: i32, b: i32) -> i32 {\n    if a > b {\n        │\n    }\n}\n",
        "a\n    } else {\n        b\n    }\n}",
    ),  # 4
    ("rust", "fn f(a: i32, b: i32) -> i32 {\n    let x = │\n}\n", "a + b;\n    x * 2\n}"),
    (
        "rust",
        "fn f(items: &[i32]) -> Vec<i32> {\n    let v = items.iter()│\n}\n",
        "\n        .map(|x| x * 2)\n        .collect::<Vec<_>>();\n    v\n}",
    ),  # 1
    ("rust", 'fn f(x: i32) {\n    println!("{}", │);\n}\n', "value);\n    ok"),  # 5
    (
        "rust",
        "impl Point {\n    fn new(x: i32) -> Self {\n        │\n    }\n}\n",
        "Point { x }\n    }\n\n    fn x(&self) -> i32 {\n        self.x\n    }",
    ),
    ("rust", "struct Point {\n    │\n}\n", "x: i32,\n    y: i32,\n}\n\nimpl Point {"),
    blank("rust", "fn f() {\n    │\n}\n", " \n\n"),
    (
        "rust",
        "fn f(a: i32) -> i32 {\n    let b = compute(a, │\n}\n",
        "1,\n        2);\n    b\n}",
    ),  # 2
    # text after the cursor, and a stop word right after the first line: a Tabby server answers
    # the first line alone, which the agent shows whole
    ("python", "def f(a):\n    compute(│, 2)\n", "alpha, 2)\n\n\ndef g():\n    pass"),  # 5
    ("python", "def f(a):\n    compute(│, 2)\n", "alpha, 2)\ndef g():\n    pass"),  # 5
    ("javascript", "function f(a) {\n  console.log(│);\n}\n", "value);\n\nfoo();"),  # 5
    ("go", "func f(a, b int) {\n\tfmt.Println(│, b)\n}\n", "alpha, b)\n\nfunc g() {"),  # 5
    ("rust", "fn f(x: i32) {\n    g(│, 1);\n}\n", "alpha, 1);\n\nfn h() {}"),  # 5
    # a blank line of whitespace inside the completion: the agent's Python rule for a closing
    # line after a blank line, and none elsewhere
    ("python", "def f(a):\n    if a:\n        │\n", "x = 1\n        \n    return x\n"),
    ("javascript", "function f(a) {\n  if (a) {\n    │\n", "x = 1;\n    \n  }\n  y();"),
    ("go", "func f(a int) {\n\tif a > 0 {\n\t\t│\n", "x := 1\n\t\t\n\t}\n\treturn"),
    # tabby-agent 1.9.0-dev's own rules: odd indentation reduced by one space, a completion's
    # lines that repeat the suffix removed, a rest of line of non-word characters replaced
    ("javascript", "function f(a) {\n   │\n}\n", "let x = a;\n   return x;\n}\n"),
    ("python", "def f(a):\n    │\n    return a\n", "a = a + 1\n    return a\n"),
    ("javascript", "function f(a) {\n  if (a │) {\n    g();\n  }\n}\n", "> 0) {\n    h();"),
    # CRLF in Go and Rust
    ("go", "func add(a, b int) int {\r\n\t│\r\n}\r\n", "return a + b\r\n}\r\n\r\nfunc g() {"),
    ("rust", "fn f(a: i32) -> i32 {\r\n    │\r\n}\r\n", "a * 2\r\n}\r\n\r\nfn g() {}"),
]
COMMENT = {"python": "#", "javascript": "//", "typescript": "//", "go": "//", "rust": "//"}
EXTENSION = {"python": "py", "javascript": "js", "typescript": "ts", "go": "go", "rust": "rs"}
# no debounce: one request per completion, at once
AGENT_CONFIG = '[completion.debounce]\nmode = "fixed"\ninterval = 0\n'


def case_of(text):
    """The number of the case whose document text is part of."""
    return int(re.search(r"case (\d+)\b", text).group(1))


def tabby_answer(language, raw, segments=None):
    """What a Tabby server answers when its model writes raw, a token-sized piece at a time (LF:
    Tabby's prompt has LF line ends): its stop condition, then, for a document with CRLF line
    ends, a CRLF for each LF that follows another character (completion.rs's
    override_generated_text)."""
    text = tabby.decode(pieces(raw.replace("\r\n", "\n")), language, "<fim_middle>")
    segments = segments or {"prefix": ""}
    crlf = "\r\n" in segments["prefix"] + (segments.get("suffix") or "")
    return re.sub(r"([^\r])\n", "\\1\r\n", text) if crlf else text


def pieces(text):
    """The model's text in pieces the size of tokens: a newline with its indentation, a word, ..."""
    return re.findall(r"\n[ \t]*|[ \t]+|\w+|[^\w\s]|\s", text)


class Stub(http.server.BaseHTTPRequestHandler):
    """Tabby's API, answering each case's text as a Tabby server would; and an engine for our
    server (llama-server's /completion), streaming each case's text a piece at a time."""

    def do_GET(self):
        version = {
            "build_date": "",
            "build_timestamp": "",
            "git_sha": "",
            "git_describe": "v0.32.0",
        }
        health = {"model": "stub", "device": "cpu", "arch": "x86_64", "cpu_info": "stub",
                  "cpu_count": 1, "cuda_devices": [], "version": version}  # fmt: skip
        self.reply(health if self.path == "/v1/health" else {"disable_client_side_telemetry": True})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/completions":
            language, _, raw = CASES[case_of(body["segments"]["prefix"])]
            text = tabby_answer(language, raw, body["segments"])
            return self.reply({"id": "cmpl-stub", "choices": [{"index": 0, "text": text}]})
        if self.path != "/completion":
            return self.reply({})
        raw = CASES[case_of(body["prompt"])][2].replace("\r\n", "\n")  # our server's model sees LF
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        try:
            for piece in pieces(raw):
                self.wfile.write(
                    b"data: " + json.dumps({"content": piece, "stop": False}).encode() + b"\n\n"
                )
            self.wfile.write(b'data: {"content": "", "stop": true}\n\n')
        except OSError:
            pass  # our server hung up: it has what it needs

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def document(n, language, marked):
    """(text, LSP position) of case n's document, its number in a comment on the first line."""
    newline = "\r\n" if "\r\n" in marked else "\n"
    marked = f"{COMMENT[language]} case {n}{newline}" + marked
    before = marked[: marked.index("│")]
    line = before.count("\n")
    return marked.replace("│", ""), {
        "line": line,
        "character": len(before) - len(before[: before.rfind("\n") + 1]),
    }


@pytest.fixture(scope="module")
def shown(agent_cli, tmp_path_factory):
    """For each case, (what the editor shows from Tabby's answer, from ours)."""
    folder = tmp_path_factory.mktemp("cut")
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    stub.daemon_threads = True
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    stub_url = f"http://127.0.0.1:{stub.server_address[1]}"
    template = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
    proc, ours = start_server(["--backend", stub_url + "/completion", "--prompt-template", template,
                               "--root", str(folder / "tabby"), "--max-tokens", "1000",
                               "--time-budget", "0"])  # fmt: skip
    agents = {"tabby": Agent(agent_cli, folder / "tabby-home", stub_url, config=AGENT_CONFIG),
              "ours": Agent(agent_cli, folder / "our-home", ours, config=AGENT_CONFIG)}  # fmt: skip
    results = {name: [None] * len(CASES) for name in agents}

    def ask(name):
        for n, (language, marked, _) in enumerate(CASES):
            text, position = document(n, language, marked)
            uri = f"file:///project/case{n}.{EXTENSION[language]}"
            results[name][n] = "".join(agents[name].complete(text, position, uri, language)[:1])

    try:
        threads = [threading.Thread(target=ask, args=(name,)) for name in agents]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        blocked = {name: agent.close() for name, agent in agents.items()}
    finally:
        stop(proc)
        stub.shutdown()
        stub.server_close()
    assert blocked == {"tabby": "", "ours": ""}, "an agent tried to reach beyond loopback"
    pairs = list(zip(results["tabby"], results["ours"]))
    same = sum(a == b for a, b in pairs)
    early = sum(len(text) < len(tabby_answer(CASES[n][0], CASES[n][2]))
                for n, text in answers(folder / "tabby").items())  # fmt: skip
    print(f"\n{len(pairs)} cases: the editor shows the same in {same}, more from ours in "
          f"{sum(a != b and b.startswith(a) for a, b in pairs)}; our server stopped before "
          f"Tabby's stop words in {early}")  # fmt: skip
    return pairs


def answers(root):
    """Case number -> the text our server answered (LF), from its events log."""
    texts = {}
    for path in (root / "events").glob("*.json"):
        for line in path.read_text().splitlines():
            completion = json.loads(line)["event"].get("completion")
            if completion:
                text = completion["choices"][0]["text"].replace("\r\n", "\n")
                texts[case_of(completion["segments"]["prefix"])] = text
    return texts


@pytest.mark.parametrize("n", range(len(CASES)))
def test_the_editor_shows_at_least_what_it_would_show_from_tabby(shown, n):
    tabby, ours = shown[n]
    assert tabby is not None and ours is not None, "the agent did not answer"
    # line ends aside: Tabby leaves a completion's first newline LF in a CRLF document
    tabby, ours = tabby.replace("\r\n", "\n"), ours.replace("\r\n", "\n")
    if CASES[n] in BLANK:
        assert (tabby, ours) == ("", ""), CASES[n]
    else:
        assert tabby.strip() and ours.startswith(tabby), (CASES[n], tabby, ours)
