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
    renamed = tmp_path / "sop-seed0.jsonl"  # a log copied under results/: named by its file
    renamed.write_text(open(log).read())
    assert plot_knn.read_points(str(renamed))[0] == "sop-seed0"
    pytest.importorskip("matplotlib")
    out = tmp_path / "knn.png"
    plot_knn.main([log, "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == ["| run_a | 0.1 | 20.0 |", "| run_a | 2.5 | 42.5 |"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_any_field_from_the_step_records(tmp_path, capsys):
    log = write_log(tmp_path / "run_b" / "log.jsonl", [
        {"epoch": 0, "step": 0, "knn_top1": 20.0, "elapsed_s": 6.0},
        {"kind": "step", "step": 5, "loss": 6.5, "teacher_image_entropy": 5.5, "elapsed_s": 30.0},
        {"kind": "step", "step": 10, "loss": 6.1, "teacher_image_entropy": 5.0, "elapsed_s": 60.0},
        {"epoch": 1, "step": 10, "loss": 6.3, "teacher_image_entropy": 5.25, "distinct_prototypes": 90,
         "elapsed_s": 66.0}])
    assert plot_knn.read_points(log, "teacher_image_entropy") == ("run_b", [(0.5, 5.5), (1.0, 5.0)])  # per step
    assert plot_knn.read_points(log, "distinct_prototypes") == ("run_b", [(1.1, 90)])  # epoch records only
    with pytest.raises(SystemExit, match="no record with los "):
        plot_knn.main([log, "--field", "los", "--out", str(tmp_path / "x.png")])


def test_log_without_points_is_an_error(tmp_path):
    log = write_log(tmp_path / "old" / "log.jsonl", [{"epoch": 1, "step": 10, "knn_top1": 30.0}])
    with pytest.raises(SystemExit, match="no record with knn_top1 and elapsed_s"):
        plot_knn.main([log, "--out", str(tmp_path / "x.png")])


def test_missing_empty_and_wrong_kind_logs_give_one_line(tmp_path):
    (tmp_path / "text.jsonl").write_text("not json\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "empty.jsonl").write_text("")
    for path, message in ((tmp_path / "missing.jsonl", "no such file"), (tmp_path, "a directory"),
                          (tmp_path / "text.jsonl", "not a log.jsonl"), (tmp_path / "list.jsonl", "not a log.jsonl"),
                          (tmp_path / "empty.jsonl", "has no record with knn_top1")):
        with pytest.raises(SystemExit) as info:
            plot_knn.main([str(path), "--out", str(tmp_path / "x.png")])
        assert str(info.value).startswith("error: ") and message in str(info.value) and "\n" not in str(info.value)
