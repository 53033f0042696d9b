"""k-NN top-1 against wall-clock minutes, from the log.jsonl files of train.py runs (needs matplotlib).

    python plot_knn.py runs/a/log.jsonl runs/b/log.jsonl --out knn.png --title "Fashion-MNIST, one H100"

Prints the table of points too, so the figure's numbers can be pasted next to it.
"""
import argparse
import json
import os


def read_points(path: str) -> tuple[str, list[tuple[float, float]]]:
    """(run name, [(minutes since the run began, k-NN top-1 %), ...]) from one log.jsonl; one-line errors for a
    missing file, a folder or one that is not a train.py log."""
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
    points = [(r["elapsed_s"] / 60, r["knn_top1"]) for r in records if "knn_top1" in r and "elapsed_s" in r]
    return os.path.basename(os.path.dirname(os.path.abspath(path))), points


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files")
    parser.add_argument("--out", default="knn.png")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = [read_points(path) for path in args.logs]
    for path, (_, points) in zip(args.logs, runs):
        if not points:
            raise SystemExit(f"error: {path} has no k-NN record with elapsed_s (logs of train.py from this version on)")
    print("| run | minutes | k-NN top-1 (%) |\n| --- | --- | --- |")
    for name, points in runs:
        for minutes, top1 in points:
            print(f"| {name} | {minutes:.1f} | {top1:.1f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib); the table above is complete")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in runs:
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("wall-clock minutes (k-NN evaluations included)")
    ax.set_ylabel("k-NN top-1 (%), k = 20")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
