"""Puts a benchmark run's table into README.md, so that no figure there is
typed by hand:

    python -m benchmarks --out benchmarks/results/cpu
    python -m benchmarks.readme benchmarks/results/cpu

The README block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``
(NAME is the results folder's name) is replaced with the run's machine, date,
command, table.txt and speedup.png. tests/test_benchmark.py checks that the
README still matches the committed results.
"""

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block(results_dir):
    """The README block (markers included) for one results folder."""
    name = os.path.basename(os.path.normpath(results_dir))
    with open(os.path.join(results_dir, "results.json")) as f:
        report = json.load(f)
    with open(os.path.join(results_dir, "table.txt")) as f:
        table = f.read().rstrip()
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine.get('cpu')}, {machine.get('threads')} threads"
    args = report["args"]
    command = "python -m benchmarks" + "".join(
        f" --{key.replace('_', '-')} {value}"
        for key, value in args.items()
        if value not in (None, False) and key not in ("out",)
    ).replace(" True", "")
    rel = os.path.relpath(results_dir, ROOT)
    lines = [
        f"<!-- bench:{name} -->",
        f"From `{command}` on {where}, torch {report['torch']}, {report['date'][:10]} "
        f"(`{rel}/results.json`; {report['wall_s']:.0f} s):",
        "",
        "```text",
        table,
        "```",
        "",
    ]
    if os.path.exists(os.path.join(results_dir, "speedup.png")):
        lines += [f"![speedup of the fused op against tensor size]({rel}/speedup.png)", ""]
    lines.append(f"<!-- /bench:{name} -->")
    return "\n".join(lines)


def update(readme_text, results_dir):
    name = os.path.basename(os.path.normpath(results_dir))
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    if not pattern.search(readme_text):
        raise SystemExit(f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
    return pattern.sub(lambda _: block(results_dir), readme_text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    for results_dir in argv:
        text = update(text, results_dir)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
