"""Repository context: how often the definition of the function being called reaches the prompt,
with our rules and with Tabby's, and what the index costs.

    python bench/retrieval.py                      # werkzeug (installed with Flask) and CPython's Lib
    python bench/retrieval.py --library jinja2 --cases 300

Both trees are copied into a temporary git checkout (code nobody here wrote). A case is a call
site of a function defined in one other file of the library: the editor's 20 lines before the
call (up to and with the name and its "(") and 20 after; a hit is the definition's chunk among
the snippets that fit Tabby's 768-character budget. Tabby's rules, on the same index: BM25 over
all the prefix's words, scores of 8 and more, at most 2 chunks a file. The cost is measured on
CPython's Lib (about 700k lines): index build time and size, memory, and the time per lookup.
"""

import argparse
import ast
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


def cases(folder, limit, typed=True):
    """(path, prefix, suffix, name, line of its definition, path of it) for call sites of
    functions defined once, in another file: the cursor after the name and its "(" (typed), or
    before the name (not typed yet)."""
    defined, sources = {}, {}
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
                for node in tree.body:
                    if isinstance(node, ast.FunctionDef) and not node.name.startswith("__"):
                        defined.setdefault(node.name, []).append((path, node.lineno))
    found = []
    for path, (text, tree) in sorted(sources.items()):
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = (
                node.func.id
                if isinstance(node.func, ast.Name)
                else getattr(node.func, "attr", None)
            )
            where = defined.get(name, [])
            if len(where) != 1 or where[0][0] == path:
                continue
            line, column = node.func.end_lineno - 1, node.func.end_col_offset
            if line >= len(lines) or lines[line][column : column + 1] != "(":
                continue
            if not typed:  # the cursor where the name begins
                column -= len(name) + 1
            prefix = "".join(lines[max(0, line - 19) : line]) + lines[line][: column + 1]
            suffix = lines[line][column + 1 :] + "".join(lines[line + 1 : line + 21])
            found.append((path, prefix, suffix, name, where[0][1], where[0][0]))
    step = max(1, len(found) // limit)
    return found[::step][:limit]


def tabby_find(index, repo, path, prefix):
    """Tabby's rules: BM25 over every word of the prefix (64 characters at most), 8 or more, at
    most 2 chunks a file, none of the current file, in the 768-character budget."""
    words = sorted({w.lower() for w in server.WORD.findall(prefix)})
    query = " OR ".join(f'"{w}"' for w in words)
    rows = index.reader.execute(
        "SELECT c.path, c.line, c.body, -bm25(search) FROM search JOIN chunks c ON c.id = search.rowid "
        "WHERE search MATCH ? AND c.repo = ? AND c.family = 'python' ORDER BY rank LIMIT 20",
        (query, repo.path)).fetchall()  # fmt: skip
    picked, per_file, used = [], {}, 0
    for file, line, body, score in rows:
        if (
            score < server.MIN_BM25
            or file == path
            or per_file.get(file, 0) >= 2
            or used + len(body) > 768
        ):
            continue
        picked.append((file, line, body))
        per_file[file], used = per_file.get(file, 0) + 1, used + len(body)
    return picked


def ours_find(index, repo, path, prefix, suffix, times):
    t = time.perf_counter()
    found = index.find(repo, "python", path, prefix, suffix, 768)
    times.append(time.perf_counter() - t)
    lines = {}
    for s in found:
        row = index.reader.execute("SELECT line FROM chunks WHERE repo = ? AND path = ? AND body = ?",
                                   (repo.path, s["filepath"], s["body"])).fetchone()  # fmt: skip
        lines[(s["filepath"], s["body"])] = row[0] if row else -1
    return [(s["filepath"], lines[(s["filepath"], s["body"])], s["body"]) for s in found]


def hit(found, def_path, def_line):
    """Whether the chunk holding the definition's line is among what was found."""
    return any(
        f == def_path and line < def_line <= line + body.count("\n") + 1 for f, line, body in found
    )


def measure(folder, label, limit, log):
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
    times = []
    for typed in (False, True):
        chosen = cases(repo.path, limit, typed)
        ours_hits = tabby_hits = 0
        for path, prefix, suffix, name, def_line, def_path in chosen:
            mine = ours_find(index, repo, path, prefix, suffix, times)
            ours_hits += hit(mine, def_path, def_line)
            tabby_hits += hit(tabby_find(index, repo, path, prefix), def_path, def_line)
        n = max(1, len(chosen))
        where = "after the name and (" if typed else "before the name"
        print(f"{label}: {len(chosen)} call sites into another file, the cursor {where}; the "
              f"definition among the snippets: ours {ours_hits} ({100 * ours_hits / n:.0f}%), "
              f"Tabby's rules {tabby_hits} ({100 * tabby_hits / n:.0f}%)")  # fmt: skip
    times.sort()
    print(
        f"{label}: lookup p50 {statistics.median(times) * 1000:.1f} ms, "
        f"p90 {times[int(0.9 * len(times))] * 1000:.1f} ms",
        flush=True,
    )
    return statistics.median(times), times[int(0.9 * len(times))], ours_hits / n, tabby_hits / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--library", default="werkzeug", help="an installed package, for the hit rate"
    )
    parser.add_argument("--cases", type=int, default=300)
    args = parser.parse_args()
    log = logging.getLogger("bench")
    library = os.path.dirname(importlib.util.find_spec(args.library).origin)
    _, _, ours, tabby = measure(library, args.library, args.cases, log)
    p50, p90, _, _ = measure(os.path.dirname(os.__file__), "CPython Lib", args.cases, log)
    print(
        f"{'PASS' if ours > tabby else 'FAIL'}  hit rate, ours vs Tabby's rules: {ours:.0%} vs {tabby:.0%}"
    )
    print(
        f"{'PASS' if p90 < 0.005 else 'FAIL'}  lookup on CPython's Lib: p50 {p50 * 1000:.1f} ms, "
        f"p90 {p90 * 1000:.1f} ms (target < 5 ms)"
    )


if __name__ == "__main__":
    main()
