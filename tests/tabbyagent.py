"""The real client for end-to-end tests, driven over LSP as an editor drives it: tabby-agent
1.5.0, the newest on npm (installed once into tests/.agent), and 1.9.0-dev, what Tabby's VS Code
extension 1.28 bundles (built from Tabby's source: tests/clients/tabby-agent-1.9.0-dev/README.md).

Each agent gets a throwaway HOME, its telemetry off, and a guard that refuses every connection
off loopback (and records the try)."""

import json
import os
import queue
import shutil
import subprocess
import threading
import time

HERE = os.path.dirname(__file__)
AGENT_DIR = os.path.join(HERE, ".agent")
VERSIONS = ["1.5.0", "1.9.0-dev"]
NEWEST = os.path.join(HERE, "clients", "tabby-agent-1.9.0-dev", "tabby-agent.js")

GUARD_JS = r"""
// loaded with node --require: no DNS lookup or TCP connect off loopback; each refusal is recorded
const fs = require('fs'), net = require('net'), dns = require('dns');
const log = process.env.HOME + '/guard_blocked.log';
const local = (h) => !h || h === 'localhost' || h === '::1' || /^127\./.test(h);
const refuse = (what) => { fs.appendFileSync(log, what + '\n'); const e = new Error('blocked: ' + what); e.code = 'ECONNREFUSED'; return e; };
const connect = net.Socket.prototype.connect;
net.Socket.prototype.connect = function (...args) {
  const o = args[0], host = typeof o === 'object' ? (o.path ? 'localhost' : o.host) : args[1];
  if (!local(host)) { const e = refuse('connect ' + host); process.nextTick(() => this.destroy(e)); return this; }
  return connect.apply(this, args);
};
const lookup = dns.lookup;
dns.lookup = function (host, ...rest) {
  if (!local(host)) { const cb = rest[rest.length - 1]; const e = refuse('lookup ' + host); process.nextTick(() => cb(e)); return {}; }
  return lookup.call(this, host, ...rest);
};
"""


def install(version="1.5.0"):
    """The path of that version's script: 1.5.0's cli.js is installed with npm on first use."""
    if version == "1.9.0-dev":
        return NEWEST
    cli = os.path.join(AGENT_DIR, "node_modules", "tabby-agent", "dist", "cli.js")
    if not os.path.exists(cli):
        assert shutil.which("npm") and shutil.which("node"), (
            "the end-to-end tests need node and npm"
        )
        os.makedirs(AGENT_DIR, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--no-audit",
                "--no-fund",
                "--prefix",
                AGENT_DIR,
                "tabby-agent@1.5.0",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
    return cli


class Agent:
    """tabby-agent --lsp --stdio, driven as an editor drives it."""

    def __init__(self, cli, home, endpoint, token=None, config="", whole_config=None, vscode=None):
        """An agent for the server at endpoint; config: more of its config.toml; whole_config:
        all of it, as it is; vscode: more of what VS Code's extension tells 1.9.0-dev from its
        own settings (its trigger mode: automatic, VS Code's default)."""
        os.makedirs(home / ".tabby-client" / "agent")
        (home / ".tabby-client" / "agent" / "config.toml").write_text(
            whole_config
            if whole_config is not None
            else f'[server]\nendpoint = "{endpoint}"\n'
            + (f'token = "{token}"\n' if token else "")
            + '[logs]\nlevel = "debug"\n[anonymousUsageTracking]\ndisable = true\n'
            + config
        )
        (home / "guard.js").write_text(GUARD_JS)
        env = {
            "HOME": str(home),
            "PATH": os.environ["PATH"],
            "NODE_OPTIONS": f"--require {home / 'guard.js'}",
        }
        self.home, self.next_id, self.messages, self.notifications = home, 0, queue.Queue(), []
        self.initialized, self.newest = False, cli == NEWEST
        self.vscode = {"inlineCompletion": {"triggerMode": "auto"}, **(vscode or {})}
        self.proc = subprocess.Popen(
            ["node", cli, "--stdio"] if self.newest else ["node", cli, "--lsp", "--stdio"],
            cwd=home,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        out = self.proc.stdout
        while True:
            headers = {}
            while line := out.readline().decode().strip():
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            if not headers:
                return  # end of output
            self.messages.put(json.loads(out.read(int(headers["content-length"]))))

    def send(self, message):
        data = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(data) + data)
        self.proc.stdin.flush()

    def request(self, method, params, timeout=60, whole=False):
        """Its result (whole: the whole answer, an error perhaps)."""
        self.next_id += 1
        self.send({"id": self.next_id, "method": method, "params": params})
        while True:
            message = self.messages.get(timeout=timeout)  # queue.Empty ends a stuck test
            if message.get("id") == self.next_id and "method" not in message:
                return message if whole else message.get("result")
            if "id" in message and "method" in message:
                self.send({"id": message["id"], "result": None})  # a request from the agent
            else:
                self.notifications.append(message)

    def complete(self, text, position, uri="file:///project/demo.py", language="python",
                 manual=False, root=None, wait=30):  # fmt: skip
        """Open a document and ask for a completion at position: the ghost texts an editor would
        show (1.9.0-dev: as VS Code asks, with an inline completion, typed or manual=True; each
        text replaces its range, in self.shown). root: the workspace folder's URI. 1.9.0-dev
        answers an error until its health check has found a model: asked again for up to wait s."""
        if not self.initialized:
            kind = "inlineCompletion" if self.newest else "completion"
            folders = [{"uri": root, "name": "project"}] if root else None
            self.request(
                "initialize",
                {
                    "processId": None,
                    "rootUri": root,
                    "workspaceFolders": folders,
                    "clientInfo": {"name": "pytest"},
                    "capabilities": {"textDocument": {kind: {}}},
                    "initializationOptions": {"config": self.vscode},
                },
            )
            self.send({"method": "initialized", "params": {}})
            self.initialized = True
        self.send(
            {
                "method": "textDocument/didOpen",
                "params": {
                    "textDocument": {"uri": uri, "languageId": language, "version": 1, "text": text}
                },
            }
        )
        where = {"textDocument": {"uri": uri}, "position": position}
        if not self.newest:
            result = self.request("textDocument/completion", where)
            self.shown = [(item["textEdit"]["newText"], item["textEdit"]["range"])
                          for item in result["items"]]  # fmt: skip
            return [text for text, _ in self.shown]
        deadline = time.monotonic() + wait
        where["context"] = {"triggerKind": 0 if manual else 1}  # Invoked, Automatic
        while "error" in (
            answer := self.request("textDocument/inlineCompletion", where, whole=True)
        ):
            if time.monotonic() > deadline:
                return []
            time.sleep(0.05)
        items = (answer["result"] or {"items": []})["items"]
        self.shown = [(item["insertText"], item["range"]) for item in items]
        return [text for text, _ in self.shown]

    def close(self):
        try:
            self.request("shutdown", None, timeout=10)
            self.send({"method": "exit"})
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        blocked = self.home / "guard_blocked.log"
        return blocked.read_text() if blocked.exists() else ""


class LinesAgent:
    """tabby-agent with no flag: its JSON-lines protocol, as the Vim and IntelliJ plugins drive
    it (one JSON array a line: [id, {"func", "args"}] in, [id, result] out; events as [0, ...]).
    Its completion requests carry what the editor tells it: the file path, the git remotes."""

    def __init__(self, cli, home, endpoint):
        os.makedirs(home / ".tabby-client" / "agent")
        (home / ".tabby-client" / "agent" / "config.toml").write_text(
            f'[server]\nendpoint = "{endpoint}"\n[anonymousUsageTracking]\ndisable = true\n'
            '[completion.debounce]\nmode = "fixed"\ninterval = 0\n'
        )
        (home / "guard.js").write_text(GUARD_JS)
        env = {
            "HOME": str(home),
            "PATH": os.environ["PATH"],
            "NODE_OPTIONS": f"--require {home / 'guard.js'}",
        }
        self.home, self.next_id, self.results = home, 0, queue.Queue()
        self.proc = subprocess.Popen(["node", cli], cwd=home, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        self.call("initialize", {"clientProperties": {"user": {}, "session": {}}})

    def _read(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            if message[0]:  # 0: an event, not an answer
                self.results.put(message)

    def call(self, func, *args, timeout=60):
        self.next_id += 1
        line = json.dumps([self.next_id, {"func": func, "args": list(args)}]) + "\n"
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        while True:
            number, result = self.results.get(timeout=timeout)  # queue.Empty ends a stuck test
            if number == self.next_id:
                return result

    def close(self):
        """Stop it (SIGTERM: it does not exit at the end of its input); -> what the guard refused."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        blocked = self.home / "guard_blocked.log"
        return blocked.read_text() if blocked.exists() else ""
