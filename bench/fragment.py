"""Turn one bench's printed output into the Markdown fragment the docs' Speed page includes (``make bench``).

    python bench/fragment.py NAME OUTPUT.txt --threads T --seconds S
    python bench/fragment.py --targets        # docs/bench/targets.md from every fragment's verdict lines
    python bench/fragment.py --total S [NAMES]  # docs/bench/total.md: how long the last (full) `make bench` took

``bench/all.sh`` calls it after each bench: the fragment ``docs/bench/NAME.md`` holds the conditions of the run
(date, CPU, threads, wall time, the command) and the bench's own output, its
Markdown tables kept as they are and its other lines as a list. ``docs/speed.md`` includes the fragments with the
snippets extension (``--8<--``), so every number on that page is what the last ``make bench`` printed; nothing
there is copied by hand. Fragments are written whole to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = Path(os.environ.get("BENCH_DOCS", ROOT / "docs/bench"))
HEADER = "<!-- written by `make bench` (bench/all.sh, bench/fragment.py): do not edit by hand -->"


def benches() -> list[str]:
    """The benches ``bench/all.sh`` runs (its ``run NAME ...`` lines), in its order."""
    return re.findall(r"^(?:\S+=\S+ )*run ([\w-]+) ", (ROOT / "bench/all.sh").read_text(), re.M)


def cpu() -> str:
    """The CPU model and the number of cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def body(text: str) -> str:
    """A bench's stdout as Markdown: its tables as they are, ``### x`` as a bold line, other lines as list items."""
    out: list[str] = []
    kind = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line.strip():
            continue
        if line.startswith("|"):
            new = "table"
        elif line.startswith("#"):
            new, line = "heading", "**" + line.lstrip("#").strip() + "**"
        else:
            new = "list"
            m = re.match(r"command: (.*)", line)
            line = f"- command: `{m.group(1)}`" if m else "- " + line.replace("*", r"\*").replace("<", "&lt;")
        if out and (new != kind or new == "heading"):
            out.append("")
        out.append(line)
        kind = new
    return "\n".join(out) + "\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def fragment(name: str, output: Path, threads: str, seconds: float) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cond = (f"*Measured {when} with {threads} torch/OMP thread{'s' if threads != '1' else ''} on {cpu()}, "
            f"{seconds:.0f} s. Regenerate on your machine: `bash bench/all.sh {name}`.*")
    return f"{HEADER}\n\n{cond}\n\n{body(output.read_text())}"


NOT_YET = "*Not measured on this code yet: `bash bench/all.sh {name}` writes this table.*"


def targets() -> str:
    """Every verdict line (one that names a target) of every fragment, in ``bench/all.sh``'s order."""
    rows = []
    for name in benches():
        path = DOCS / f"{name}.md"
        text = path.read_text() if path.is_file() else NOT_YET.format(name=name)
        if NOT_YET.format(name=name) in text:
            rows.append(f"| `{name}` | not measured yet (`bash bench/all.sh {name}`) |")
            continue
        verdicts = [line[2:].replace("|", "/") for line in text.splitlines() if line.startswith("- ") and "target" in line]
        rows += [f"| `{name}` | {v} |" for v in verdicts] or [f"| `{name}` | measured, no target (see its table) |"]
    return f"{HEADER}\n\n| bench | verdict, as the bench printed it |\n|---|---|\n" + "\n".join(rows) + "\n"


def total(seconds: float, only: str) -> None:
    """docs/bench/total.md: how long the run took; a partial run's time is kept only until a full run."""
    path = DOCS / "total.md"
    full = "full `make bench`"
    if only and path.is_file() and full in path.read_text():
        return
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    meta = f"{when}, {cpu()}"
    took = f"**{seconds / 60:.0f} minutes**"
    text = (f"A {full} took {took} ({meta})." if not only else
            f"A {full} has not been timed on this version; `bash bench/all.sh {only}` alone took {took} ({meta}).")
    write(path, f"{HEADER}\n\n{text}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("output", nargs="?", type=Path)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--targets", action="store_true", help="write docs/bench/targets.md (and a note for each "
                                                           "bench never run)")
    ap.add_argument("--total", type=float, help="write docs/bench/total.md (seconds of the run; NAME: the "
                                                "benches of a partial run)")
    args = ap.parse_args()
    if args.targets:
        for name in benches():
            if not (DOCS / f"{name}.md").is_file():
                write(DOCS / f"{name}.md", f"{HEADER}\n\n{NOT_YET.format(name=name)}\n")
        write(DOCS / "targets.md", targets())
    elif args.total is not None:
        total(args.total, (args.name or "").strip())
    elif args.name and args.output:
        if not re.fullmatch(r"[a-z0-9-]+", args.name):
            raise SystemExit(f"fragment: bad bench name {args.name!r}")
        write(DOCS / f"{args.name}.md", fragment(args.name, args.output, args.threads, args.seconds))
    else:
        ap.error("give NAME OUTPUT, --targets or --total")


if __name__ == "__main__":
    main()
