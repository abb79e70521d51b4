"""Repository context: how often the definition of the function being called reaches the prompt,
with our rules and with Tabby's, and what the index costs.

    python bench/retrieval.py                      # werkzeug (installed with Flask) and CPython's Lib
    python bench/retrieval.py --library jinja2 --cases 300
    python bench/retrieval.py --model none         # without what retrieval adds to a completion

Both trees are copied into a temporary git checkout (code nobody here wrote). A case is a call site
of a function or method defined once, in another file of the library, and no class's name
(name(...), or x.name(...) where x is self, cls, that file's module, or no standard module): the
editor's 20 lines before the call and 20 after, the cursor after the name and its "(", or in the
name, cut at 40-70 % of it (where the agent asks mid-word); then each keystroke of the rest of the
name, to see whether the snippets stay (and with them the KV cache of the prompt after them). A hit
is the definition's line among the snippets of its file (in a chunk, or in the signatures of the
names that begin with the typed name) that fit Tabby's 768-character budget. Tabby's rules, on the
same index: BM25 over all the prefix's words, scores of 8 and more, at most 2 chunks a file. The
cost is measured on CPython's Lib (about 700k lines): index build time and size, memory, the time
per lookup, and what retrieval adds to a completion (1 token, so that the prompt is most of it)
with the bench's model: of a new prompt (the name complete, or half typed), and of each keystroke
as the rest of a name is typed (the KV cache of the prompt kept).
"""

import argparse
import ast
import builtins
import contextlib
import importlib.util
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import run  # noqa: E402  (bench/run.py: its models)

import app as server  # noqa: E402


def checkout(source, folder):
    """A git checkout at folder of the .py files under source."""
    for top, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(top, name)
                target = os.path.join(folder, os.path.relpath(path, source))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(path, target)
    for args in (
        ["init", "-q"],
        ["add", "."],
        ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "x"],
    ):
        subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True)
    return server.open_repository(folder, tempfile.mkdtemp())


def cases(folder, limit):
    """(path, prefix, suffix, name, cut, line of its definition, path of it, kind, the cursor's
    line) for call sites of functions and methods (async ones too) defined once, in another file,
    and no class's name (datetime(...) calls the class): kind "call" (name(...)) or
    "member" (x.name(...)); the prefix ends after the name and its "(" (cut None), or with the
    name cut after cut of its characters, 40-70 % of it (what the agent sends mid-word)."""
    defined, sources, classes = {}, {}, set()
    for top, _, files in os.walk(folder):
        for name in files:
            if name.endswith(".py") and ".git" not in top:
                path = os.path.relpath(os.path.join(top, name), folder)
                text = open(os.path.join(folder, path), encoding="utf-8", errors="replace").read()
                try:
                    tree = ast.parse(text)
                except SyntaxError:
                    continue
                sources[path] = (text, tree)
                methods = [n for c in tree.body if isinstance(c, ast.ClassDef) for n in c.body]
                function = (ast.FunctionDef, ast.AsyncFunctionDef)
                for node in tree.body + methods:
                    if isinstance(node, function) and not node.name.startswith("__"):
                        defined.setdefault(node.name, []).append((path, node.lineno))
                classes |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    found = []
    for path, (text, tree) in sorted(sources.items()):
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            kind = "call" if isinstance(node.func, ast.Name) else "member"
            name = node.func.id if kind == "call" else getattr(node.func, "attr", None)
            where = defined.get(name, [])
            if len(where) != 1 or where[0][0] == path or len(name) < 6 or name in classes:
                continue
            if kind == "member" and not surely(node.func, where[0][0]) or name in BUILTINS:
                continue  # (enumerate(...) calls the builtin, not threading's)
            line, column = node.func.end_lineno - 1, node.func.end_col_offset
            if line >= len(lines) or lines[line][column : column + 1] != "(":
                continue
            start = column - len(name)
            cut = round(len(name) * (0.4 + 0.3 * (len(found) % 4) / 3))  # 40, 50, 60, 70 %
            for end, at in ((column + 1, None), (start + cut, cut)):
                prefix = "".join(lines[max(0, line - 19) : line]) + lines[line][:end]
                suffix = lines[line][end:] + "".join(lines[line + 1 : line + 21])
                found.append((path, prefix, suffix, name, at, where[0][1], where[0][0], kind, line))
    step = max(1, len(found) // (2 * limit)) * 2  # a complete case and its half-typed twin
    return [case for i in range(0, len(found), step) for case in found[i : i + 2]][: 2 * limit]


BUILTINS = set(dir(builtins))
BUILTIN = {name for kind in (list, dict, str, bytes, set, tuple, int, float) for name in dir(kind)}


def surely(func, def_path):
    """Whether x.name(...) surely calls the name defined at def_path: x is self or cls, or the
    module of that file; else name is no builtin type's method and x no standard module (re,
    sys: their own compile, write) but that file's."""
    if isinstance(func.value, ast.Name) and func.value.id in ("self", "cls"):
        return True  # (self.items.append: a list's, perhaps)
    root = func.value
    while isinstance(root, ast.Attribute):
        root = root.value
    root = getattr(root, "id", "")
    module = os.path.splitext(def_path)[0].replace("/__init__", "").replace(os.sep, "/")
    if module.split("/")[-1] == root:
        return True
    return func.attr not in BUILTIN and root not in sys.stdlib_module_names


@contextlib.contextmanager
def unwritten(index, repo, path, line):
    """The index as it was before the cursor's line was written (the file without it), as while
    the user writes it: the line does not tell its own names."""
    full = os.path.join(repo.path, path)
    with open(full, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)

    def write(content):
        with open(full, "w", encoding="utf-8") as f:
            f.write(content)
        index.update(repo)
        index.bm25.cache_clear()

    write("".join(lines[:line] + lines[line + 1 :]))
    try:
        yield
    finally:
        write(text)


def tabby_find(index, repo, path, prefix):
    """Tabby's rules: BM25 over every word of the prefix (64 characters at most), 8 or more, at
    most 2 chunks a file, none of the current file, in the 768-character budget."""
    words = sorted({w.lower() for w in server.WORD.findall(prefix)})
    query = " OR ".join(f'"{w}"' for w in words)
    rows = index.reader.execute(
        "SELECT c.path, c.body, -bm25(search) FROM search JOIN chunks c ON c.id = search.rowid "
        "WHERE search MATCH ? AND c.repo = ? AND c.family = 'python' ORDER BY rank LIMIT 20",
        (query, repo.path)).fetchall()  # fmt: skip
    picked, per_file, used = [], {}, 0
    for file, body, score in rows:
        if (
            score < server.MIN_BM25
            or file == path
            or per_file.get(file, 0) >= 2
            or used + len(body) > 768
        ):
            continue
        picked.append((file, body))
        per_file[file], used = per_file.get(file, 0) + 1, used + len(body)
    return picked


def ours_find(index, repo, path, prefix, suffix, times):
    t = time.perf_counter()
    found = index.find(repo, "python", path, prefix, suffix, 768)
    times.append(time.perf_counter() - t)
    return [(s["filepath"], s["body"]) for s in found]


def hit(found, def_path, def_text):
    """Whether the definition's line (def_text) is in a snippet of its file: in a chunk, or in
    the signatures of the names that begin with the typed name."""
    return any(file == def_path and def_text in body.splitlines() for file, body in found)


def measure(folder, label, limit, log, model=None):
    started, rss = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    repo = checkout(folder, tempfile.mkdtemp())
    copied = time.monotonic() - started
    db = os.path.join(tempfile.mkdtemp(), "code.sqlite3")
    started = time.monotonic()
    index = server.CodeIndex([repo], db, 3600, log)
    built = time.monotonic() - started
    [stats] = index.stats()
    size = sum(os.path.getsize(db + tail) for tail in ("", "-wal") if os.path.exists(db + tail))
    memory = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"{label}: {stats['files']} files, {stats['chunks']} chunks; copied in {copied:.1f} s, indexed "
          f"in {built:.1f} s ({stats['files'] / built:.0f} files/s), {size / 2**20:.0f} MB on disk, "
          f"+{memory:.0f} MB of memory at most", flush=True)  # fmt: skip
    times, hits, kept, keystrokes = [], {}, 0, 0
    for path, prefix, suffix, name, cut, def_line, def_path, kind, line in cases(repo.path, limit):
        with unwritten(index, repo, path, line):
            mine = ours_find(index, repo, path, prefix, suffix, times)
            if cut:  # the keystrokes of the rest of the name: do the snippets stay?
                before, last = prefix[: len(prefix) - cut], None
                for n in range(server.PARTIAL_MIN, len(name) + 1):
                    now = ours_find(index, repo, path, before + name[:n], suffix, times)
                    if last is not None:
                        keystrokes, kept = keystrokes + 1, kept + (now == last)
                    last = now
        key = (kind, "half typed" if cut else "complete")
        with open(os.path.join(repo.path, def_path), encoding="utf-8", errors="replace") as f:
            def_text = f.read().splitlines()[def_line - 1]
        tabby = hit(tabby_find(index, repo, path, prefix), def_path, def_text)
        counts = hits.get(key, (0, 0, 0))
        hits[key] = (counts[0] + hit(mine, def_path, def_text), counts[1] + tabby, counts[2] + 1)
    for (kind, typed), (ours, tabby, n) in sorted(hits.items()):
        print(f"{label}: {n} {kind} sites into another file, the name {typed}: the definition "
              f"among the snippets: ours {ours} ({100 * ours / n:.0f}%), Tabby's rules {tabby} "
              f"({100 * tabby / n:.0f}%)")  # fmt: skip
    print(f"{label}: snippets unchanged across {kept} of {keystrokes} keystrokes of a name "
          f"({100 * kept / max(1, keystrokes):.0f}%)")  # fmt: skip
    times.sort()
    print(
        f"{label}: lookup p50 {statistics.median(times) * 1000:.1f} ms, "
        f"p90 {times[int(0.9 * len(times))] * 1000:.1f} ms",
        flush=True,
    )
    if model:  # what retrieval adds to a completion, in all (prompt included), on this tree
        config = server.load_config(["--model", model, "--repo", repo.path, "--root", tempfile.mkdtemp(),
                                     "--max-tokens", "1", "--completion-cache", "0", "--speculate", "false",
                                     "--events", "off"], environ={})  # fmt: skip
        app = server.create_app(config)
        app.logger.setLevel(logging.WARNING)  # not a line a completion
        client = app.test_client()
        sites = cases(repo.path, 40)
        for typed, asked in (("complete", sites[::2]), ("half typed", sites[1::2])):  # not mixed:
            took = {True: [], False: []}  # a site's two cases share their prompt (the KV cache)
            for n, (path, prefix, suffix, *_) in enumerate(asked):
                for on in (n % 2 == 0, n % 2 == 1):  # which goes first alternates
                    body = {"language": "python", "segments": {"prefix": prefix, "suffix": suffix, "filepath": path},
                            "debug_options": {"disable_retrieval_augmented_code_completion": not on}}  # fmt: skip
                    started = time.perf_counter()
                    assert client.post("/v1/completions", json=body).status_code == 200
                    took[on].append(time.perf_counter() - started)
            on, off = (statistics.median(took[k]) * 1000 for k in (True, False))
            print(f"{label}: a completion (1 token, {os.path.basename(model)}), the name {typed}, p50 "
                  f"{on:.0f} ms with repository context, {off:.0f} ms without: +{on - off:.0f} ms", flush=True)  # fmt: skip
        # typing the rest of a name: a request a keystroke (the first left out: its prompt is new)
        took = {True: [], False: []}
        for n, (path, prefix, suffix, name, cut, *_) in enumerate(sites[1::2]):
            for on in (n % 2 == 0, n % 2 == 1):
                for end in range(cut, len(name) + 1):
                    body = {"language": "python", "segments": {"prefix": prefix[: len(prefix) - cut] + name[:end],
                            "suffix": suffix, "filepath": path},
                            "debug_options": {"disable_retrieval_augmented_code_completion": not on}}  # fmt: skip
                    started = time.perf_counter()
                    assert client.post("/v1/completions", json=body).status_code == 200
                    took[on] += [time.perf_counter() - started] if end > cut else []
        on, off = (statistics.median(took[k]) * 1000 for k in (True, False))
        print(f"{label}: typing the rest of a name, a keystroke's completion p50 {on:.0f} ms with repository "
              f"context, {off:.0f} ms without: +{on - off:.0f} ms ({len(took[True])} keystrokes)", flush=True)  # fmt: skip
    rate = {typed: sum(h[0] for (_, t), h in hits.items() if t == typed)
            / max(1, sum(h[2] for (_, t), h in hits.items() if t == typed))
            for typed in ("complete", "half typed")}  # fmt: skip
    return statistics.median(times), times[int(0.9 * len(times))], rate, kept / max(1, keystrokes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--library", default="werkzeug", help="an installed package, for the hit rate"
    )
    parser.add_argument("--cases", type=int, default=300, help="call sites (each also half typed)")
    parser.add_argument("--model", default="gemma", help="for what retrieval adds to a completion: "
                        "gemma, fim, a GGUF path, or none")  # fmt: skip
    args = parser.parse_args()
    log = logging.getLogger("bench")
    library = os.path.dirname(importlib.util.find_spec(args.library).origin)
    model = None if args.model == "none" else run.model_path(args.model)
    results = [measure(library, args.library, args.cases, log),
               measure(os.path.dirname(os.__file__), "CPython Lib", args.cases, log, model)]  # fmt: skip
    for label, (p50, p90, rate, kept) in zip((args.library, "CPython Lib"), results):
        ok = rate["complete"] >= 0.95 and rate["half typed"] >= 0.9 and kept >= 0.9
        print(f"{'PASS' if ok else 'FAIL'}  {label}: the definition found, name complete "
              f"{rate['complete']:.0%} (target 95 %), half typed {rate['half typed']:.0%} (90 %); "
              f"snippets kept across keystrokes {kept:.0%} (90 %)")  # fmt: skip
    p50 = results[1][0]
    print(f"{'PASS' if p50 < 0.005 else 'FAIL'}  lookup on CPython's Lib: p50 {p50 * 1000:.1f} ms "
          "(target < 5 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
