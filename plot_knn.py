"""k-NN top-1 (or any logged number) against wall-clock minutes, from the log.jsonl files of train.py runs (needs
matplotlib).

    python plot_knn.py runs/a/log.jsonl runs/b/log.jsonl --out knn.png --title "Fashion-MNIST, one H100"
    python plot_knn.py runs/a/log.jsonl --field teacher_image_entropy --out entropy.png   # a diagnostic

A field of the per-step records (README, "Reading the diagnostics") is drawn from those, every log_every steps;
k-NN and distinct_prototypes come from the epoch records.

Prints the table of points too, so the figure's numbers can be pasted next to it.
"""
import argparse
import json
import os


def read_points(path: str, field: str = "knn_top1") -> tuple[str, list[tuple[float, float]]]:
    """(run name, [(minutes since the run began, value of field), ...]) from one log.jsonl, from its per-step
    records when it has the field there, else from the epoch records; the name is the folder of a log.jsonl, else
    the file's own name. One-line errors for a missing file, a folder or one that is not a train.py log."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path}: {'a directory, not a log file' if os.path.isdir(path) else 'no such file'}"
                         f" (train.py writes OUTPUT_DIR/log.jsonl)")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path} is not a log.jsonl of train.py (one JSON object per line): {e}")
    if not all(isinstance(r, dict) for r in records):
        raise SystemExit(f"error: {path} is not a log.jsonl of train.py (one JSON object per line)")
    records = [r for r in records if field in r and "elapsed_s" in r and isinstance(r[field], (int, float))]
    steps = [r for r in records if r.get("kind") == "step"]
    points = [(r["elapsed_s"] / 60, r[field]) for r in (steps or records)]
    name = os.path.basename(path).removesuffix(".jsonl")  # runs/a/log.jsonl -> a; logs/sop-seed0.jsonl -> sop-seed0
    return (os.path.basename(os.path.dirname(os.path.abspath(path))) if name == "log" else name), points


FORMATS = (".png", ".pdf", ".svg")  # what matplotlib's savefig writes without extra packages


def check_out(out: str) -> None:
    """One 'error: ...' line for an --out the figure could not be written to, before any log is read."""
    directory, problem = os.path.dirname(os.path.abspath(out)), None
    if os.path.isdir(out):
        problem = "is a directory"
    elif not os.path.isdir(directory):
        problem = f"directory {directory} does not exist"
    elif not out.lower().endswith(FORMATS):
        problem = "unknown format"
    if problem:
        raise SystemExit(f"error: --out {out}: {problem}; valid: a {', '.join(FORMATS)} file in an existing directory")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files")
    parser.add_argument("--out", default="knn.png")
    parser.add_argument("--title", default="")
    parser.add_argument("--field", default="knn_top1", help="any number of the log's records (default: k-NN top-1)")
    args = parser.parse_args(argv)
    check_out(args.out)
    runs = [read_points(path, args.field) for path in args.logs]
    for path, (_, points) in zip(args.logs, runs):
        if not points:
            raise SystemExit(f"error: {path} has no record with {args.field} and elapsed_s (logs of train.py from "
                             f"this version on{'' if args.field == 'knn_top1' else '; is the field name right?'})")
    label = "k-NN top-1 (%), k = 20" if args.field == "knn_top1" else args.field
    print(f"| run | minutes | {label} |\n| --- | --- | --- |")
    for name, points in runs:
        for minutes, value in points:
            print(f"| {name} | {minutes:.1f} | {value:.1f} |" if args.field == "knn_top1" else
                  f"| {name} | {minutes:.1f} | {value:.4g} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib); the table above is complete")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in runs:
        ax.plot(*zip(*points), marker="o" if len(points) < 40 else None, label=name)
    ax.set_xlabel("wall-clock minutes (k-NN evaluations included)")
    ax.set_ylabel(label)
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
