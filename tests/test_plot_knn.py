import json

import pytest

import plot_knn


def write_log(path, records):
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        for r in [{"config": {}, "environment": {}}, *records]:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_table_and_png(tmp_path, capsys):
    log = write_log(tmp_path / "run_a" / "log.jsonl", [
        {"epoch": 0, "step": 0, "knn_top1": 20.0, "elapsed_s": 6.0},
        {"epoch": 1, "step": 10, "loss": 6.1, "elapsed_s": 60.0},  # no k-NN this epoch: not a point
        {"epoch": 2, "step": 20, "loss": 6.0, "knn_top1": 42.5, "elapsed_s": 150.0}])
    assert plot_knn.read_points(log) == ("run_a", [(0.1, 20.0), (2.5, 42.5)])
    pytest.importorskip("matplotlib")
    out = tmp_path / "knn.png"
    plot_knn.main([log, "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == ["| run_a | 0.1 | 20.0 |", "| run_a | 2.5 | 42.5 |"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_log_without_points_is_an_error(tmp_path):
    log = write_log(tmp_path / "old" / "log.jsonl", [{"epoch": 1, "step": 10, "knn_top1": 30.0}])
    with pytest.raises(SystemExit, match="no k-NN record with elapsed_s"):
        plot_knn.main([log, "--out", str(tmp_path / "x.png")])
