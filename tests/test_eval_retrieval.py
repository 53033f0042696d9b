import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval_retrieval
from conftest import run_single_and_torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_class_retrieval_matches_loops_from_the_definitions():
    torch.manual_seed(0)
    db, queries = F.normalize(torch.randn(40, 6), dim=1), F.normalize(torch.randn(15, 6), dim=1)
    db_labels, query_labels = torch.randint(0, 4, (40,)), torch.randint(0, 5, (15,))  # class 4: no database image
    result = eval_retrieval.class_retrieval(queries, query_labels, db, db_labels, ks=(1, 5, 10), chunk_size=4)
    ap_at_r, ap, recall, counted = [], [], {1: [], 5: [], 10: []}, 0
    for q in range(15):
        ranked = [int(i) for i in (db @ queries[q]).argsort(descending=True)]
        relevant = [int(db_labels[i] == query_labels[q]) for i in ranked]
        R = sum(relevant)
        if R == 0:
            continue
        counted += 1
        precision = [sum(relevant[:i + 1]) / (i + 1) for i in range(40)]
        ap_at_r.append(sum(precision[i] * relevant[i] for i in range(R)) / R)
        ap.append(sum(precision[i] * relevant[i] for i in range(40)) / R)
        for k in recall:
            recall[k].append(float(any(relevant[:k])))
    assert result["queries"] == counted < 15
    assert result["mAP@R"] == pytest.approx(100 * sum(ap_at_r) / counted)
    assert result["mAP"] == pytest.approx(100 * sum(ap) / counted)
    for k in recall:
        assert result[f"recall@{k}"] == pytest.approx(100 * sum(recall[k]) / counted)


def test_separated_classes_give_100():
    centres = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    db_labels, query_labels = torch.arange(3).repeat(10), torch.arange(3).repeat(4)
    result = eval_retrieval.class_retrieval(centres[query_labels], query_labels, centres[db_labels], db_labels)
    assert all(value == 100.0 for key, value in result.items() if key != "queries")


def revisited_ap_loop(ranking, positives, junk):
    """Straight from the revisitop description: drop junk from the ranking, then the trapezoid rule."""
    kept = [i for i in ranking if i not in junk]
    ranks = [r for r, i in enumerate(kept) if i in positives]
    ap = 0.0
    for j, r in enumerate(ranks):
        before = 1.0 if r == 0 else j / r
        ap += (before + (j + 1) / (r + 1)) / 2 / len(positives)
    return ap


def test_revisited_map_matches_a_loop_on_random_rankings():
    generator = torch.Generator().manual_seed(2)
    ranking = torch.stack([torch.randperm(30, generator=generator) for _ in range(6)])
    gnd = []
    for _ in range(6):
        images = torch.randperm(30, generator=generator)
        gnd.append(dict(easy=images[:4], hard=images[4:7], junk=images[7:12]))
    gnd[5]["hard"] = torch.zeros(0, dtype=torch.int64)  # no hard positive: left out of the Hard mean
    medium = [revisited_ap_loop(r.tolist(), set(q["easy"].tolist() + q["hard"].tolist()), set(q["junk"].tolist()))
              for r, q in zip(ranking, gnd)]
    hard = [revisited_ap_loop(r.tolist(), set(q["hard"].tolist()), set(q["junk"].tolist() + q["easy"].tolist()))
            for r, q in zip(ranking[:5], gnd[:5])]
    assert eval_retrieval.revisited_map(ranking, gnd, "medium") == pytest.approx(100 * sum(medium) / 6)
    assert eval_retrieval.revisited_map(ranking, gnd, "hard") == pytest.approx(100 * sum(hard) / 5)


class MeanColour(torch.nn.Module):
    """A stand-in backbone whose [CLS] is the mean normalised colour: it ranks solid-colour images by hue angle."""
    embed_dim = 3

    def forward(self, x):
        return x.mean((2, 3))[:, None]  # (B, 1, 3)


def colour(angle_degrees):
    """uint8 RGB whose normalised value (data.normalize_images) is (cos a, sin a, ~0)."""
    a = math.radians(angle_degrees)
    v = (math.cos(a), math.sin(a), 0.0)
    return tuple(round(255 * (v[c] * data.IMAGENET_STD[c] + data.IMAGENET_MEAN[c])) for c in range(3))


def write_oxford_like(root, gnd_pickle_bytes=None):
    """A fabricated revisited-Oxford folder: 5 database images at hue angles 10..50 degrees, 2 queries.

    q0 is two halves, 0 degrees (left, its box) and 90 degrees (right): only the crop ranks d0 d1 d2 d3 d4.
    q1 is 60 degrees everywhere: it ranks d4 first. PNG bytes under .jpg names keep the colours exact.
    """
    from PIL import Image
    (root / "jpg").mkdir(parents=True)
    for i, angle in enumerate((10, 20, 30, 40, 50)):
        Image.new("RGB", (16, 12), colour(angle)).save(root / "jpg" / f"d{i}.jpg", format="PNG")
    q0 = Image.new("RGB", (64, 40), colour(90))
    q0.paste(Image.new("RGB", (32, 40), colour(0)), (0, 0))
    q0.save(root / "jpg" / "q0.jpg", format="PNG")
    Image.new("RGB", (20, 20), colour(60)).save(root / "jpg" / "q1.jpg", format="PNG")
    gnd = [dict(easy=[1], hard=[3], junk=[0], bbx=[0, 0, 32, 40]),  # numpy-free lists, as well as arrays below
           dict(easy=np.array([4]), hard=np.array([], dtype=np.int64), junk=np.array([], dtype=np.int64),
                bbx=[np.float64(v) for v in (0, 0, 20, 20)])]  # numpy scalars
    payload = gnd_pickle_bytes or pickle.dumps(dict(imlist=[f"d{i}" for i in range(5)], qimlist=["q0", "q1"],
                                                    gnd=gnd))
    (root / "gnd_roxford5k.pkl").write_bytes(payload)


@pytest.mark.parametrize("multiscale", [False, True])
def test_oxford_protocol_on_a_hand_computed_case(tmp_path, multiscale):
    write_oxford_like(tmp_path)
    result = eval_retrieval.oxford_paris_evaluate(MeanColour(), tmp_path, "roxford5k", torch.device("cpu"),
                                                  imsize=32, multiscale=multiscale)
    # q0 ranks d0 (junk), d1 (easy), d2, d3 (hard), d4.
    #   Medium: positives d1, d3, junk d0 removed -> ranks 0 and 2;
    #           AP = 1/2 [(1 + 1)/2] + 1/2 [(1/2 + 2/3)/2] = 1/2 + 7/24 = 19/24 (1/3 if the junk were kept).
    #   Hard:   positive d3, junk d0 and d1 (easy) removed -> rank 1; AP = 1/1 [(0/1 + 1/2)/2] = 1/4.
    # q1 ranks d4 (easy) first: Medium AP = 1; no hard positive, so it is left out of Hard.
    assert result["medium"] == pytest.approx(100 * (19 / 24 + 1) / 2)
    assert result["hard"] == pytest.approx(100 * 1 / 4)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_ground_truth_pickle_cannot_run_code(tiny_run, tmp_path):
    out, _ = tiny_run
    marker = tmp_path / "pwned"
    write_oxford_like(tmp_path / "ox", pickle.dumps(dict(imlist=[], qimlist=[], gnd=[Exploit(str(marker))])))
    with pytest.raises(SystemExit, match=r"^error: cannot read .*gnd_roxford5k.pkl: forbidden global posix.system"):
        eval_retrieval.main(["--checkpoint", str(out / "checkpoint.pth"), "--dataset", "roxford5k",
                             "--data_path", str(tmp_path / "ox"), "--device", "cpu"])
    assert not marker.exists()


def test_cli_class_level_on_a_training_checkpoint(tiny_run, capsys):
    out, _ = tiny_run
    result = eval_retrieval.main(["--checkpoint", str(out / "checkpoint.pth"), "--device", "cpu",
                                  "--chunk_size", "100"])
    assert 0 <= result["mAP@R"] <= result["mAP"] * 1.0001 + 1e-9 and 0 <= result["recall@1"] <= 100
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"retrieval mAP@R {result['mAP@R']:.2f} %"


def test_cli_oxford_errors_are_one_line(tiny_run, tmp_path):
    out, _ = tiny_run
    checkpoint = str(out / "checkpoint.pth")
    with pytest.raises(SystemExit, match=r"^error: --dataset roxford5k needs .*gnd_roxford5k.pkl .*revisitop"):
        eval_retrieval.main(["--checkpoint", checkpoint, "--dataset", "roxford5k", "--data_path", str(tmp_path)])
    with pytest.raises(SystemExit, match="^error: --pixels works on the class-level datasets only"):
        eval_retrieval.main(["--pixels", "--dataset", "rparis6k"])
    with pytest.raises(SystemExit, match="^error: --chunk_size 0: must be a positive integer"):
        eval_retrieval.main(["--pixels", "--dataset", "synthetic", "--chunk_size", "0"])
    result = subprocess.run([sys.executable, "eval_retrieval.py", "--pixels", "--dataset", "imagenet9"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().startswith("error: --dataset 'imagenet9': unknown")
    assert len(result.stderr.strip().splitlines()) == 1


def write_random_oxford_like(root, n_db: int = 24, n_queries: int = 6, seed: int = 0):
    """A revisited-Oxford folder of noise images of random sizes, with random easy/hard/junk lists per query."""
    from PIL import Image
    generator = np.random.default_rng(seed)
    (root / "jpg").mkdir(parents=True)
    names = [f"d{i}" for i in range(n_db)] + [f"q{i}" for i in range(n_queries)]
    for name in names:
        h, w = generator.integers(12, 40, size=2)
        Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "jpg" / f"{name}.jpg",
                                                                                     format="PNG")
    gnd = []
    for _ in range(n_queries):
        order = generator.permutation(n_db)
        gnd.append(dict(easy=order[:4], hard=order[4:7], junk=order[7:9], bbx=[0, 0, 10, 10]))
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(dict(imlist=names[:n_db], qimlist=names[n_db:], gnd=gnd)))


# Class-level retrieval shards through eval_knn.extract_features, checked under torchrun by tests/test_eval_knn.py
# and tests/test_eval_linear.py; only the Oxford-style path (its own image sharding) runs here, to keep the suite short.
@pytest.mark.parametrize("oxford", [True])
def test_torchrun_two_processes_print_the_single_process_numbers(tiny_run, tmp_path, oxford):
    flags = ["--checkpoint", str(tiny_run[0] / "checkpoint.pth"), "--device", "cpu", "--batch_size", "64"]
    if oxford:
        write_random_oxford_like(tmp_path)
        flags += ["--dataset", "roxford5k", "--data_path", str(tmp_path), "--imsize", "32", "--multiscale"]
    lines, multi = run_single_and_torchrun("eval_retrieval.py", flags)
    assert len(lines) == (1 if oxford else 2) and "mAP" in lines[-1]
    assert multi == lines  # the same numbers, printed once


def test_oxford_features_are_the_same_whichever_rank_embeds_them(tmp_path, monkeypatch):
    """embed_images fills its rows in [rank::world] shards; the shards of two ranks add up to the whole."""
    import torch.distributed as dist
    write_random_oxford_like(tmp_path, n_db=7, n_queries=1)
    paths = sorted((tmp_path / "jpg").glob("d*.jpg"))
    args = (MeanColour(), paths, [None] * len(paths), torch.device("cpu"), 16, (1.0,))
    whole = eval_retrieval.embed_images(*args)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_reduce", lambda tensor: None)  # this rank's part only
        shards.append(eval_retrieval.embed_images(*args))
    assert (shards[0][1::2] == 0).all() and (shards[1][0::2] == 0).all()
    assert torch.equal(shards[0] + shards[1], whole) and (whole.norm(dim=1) > 0.99).all()


@pytest.mark.parametrize("flags, message", [
    (["--imsize", "0"], "error: --imsize 0: valid: 1 to 4096"),
    (["--imsize", "100000"], "error: --imsize 100000: valid: 1 to 4096"),
    (["--batch_size=-1"], "error: --batch_size -1: must be a positive integer"),
    (["--num_workers=-1"], "error: --num_workers -1: must be >= 0"),
    (["--image_size", "0"], "error: --image_size 0: valid: 1 to 4096"),
    (["--image_size", "100000"], "error: --image_size 100000: valid: 1 to 4096"),
    (["--synthetic_size", "0"], "error: --synthetic_size 0: valid: 1 to 1000000"),
    (["--synthetic_size", "100000000"], "error: --synthetic_size 100000000: valid: 1 to 1000000"),
    (["--interpolate_offset", "nan"], "error: --interpolate_offset nan: valid: 0 <= offset < 1"),
    (["--patch_size=-4"], "error: --patch_size -4: valid: 1 to 4096"),
    (["--dataset", "folder", "--data_path", "/nonexistent"], "error: dataset 'folder' needs the directory "),
])
def test_bad_flags_are_one_line_errors(flags, message):
    with pytest.raises(SystemExit) as excinfo:
        eval_retrieval.main(["--pixels", "--dataset", "synthetic", "--synthetic_size", "100", "--device", "cpu"]
                            + flags)
    assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value)


def test_checkpoint_and_oxford_file_errors_are_one_line(tiny_run, tmp_path):
    checkpoint = ["--checkpoint", str(tiny_run[0] / "checkpoint.pth"), "--device", "cpu"]
    empty = dict(imlist=[], qimlist=[], gnd=[])
    write_oxford_like(tmp_path / "empty", pickle.dumps(empty))
    write_oxford_like(tmp_path / "absent")
    (tmp_path / "absent" / "jpg" / "d3.jpg").unlink()
    write_oxford_like(tmp_path / "blank")
    (tmp_path / "blank" / "gnd_roxford5k.pkl").write_bytes(b"")
    write_oxford_like(tmp_path / "broken")
    (tmp_path / "broken" / "jpg" / "d2.jpg").write_bytes(b"not an image")
    for flags, message in (
            (["--image_size", "6"], "error: --image_size 6: must be a multiple of the patch size 4"),
            (["--dataset", "roxford5k", "--data_path", str(tmp_path / "empty")],
             "error: " + str(tmp_path / "empty" / "gnd_roxford5k.pkl") + ": 'imlist' and 'qimlist' must name at "
             "least one image each (got 0 and 0)"),
            (["--dataset", "roxford5k", "--data_path", str(tmp_path / "absent")],
             "error: " + str(tmp_path / "absent" / "jpg") + " lacks 1 of the images gnd_roxford5k.pkl names, "
             "e.g. d3.jpg"),
            (["--dataset", "roxford5k", "--data_path", str(tmp_path / "blank")],
             "error: cannot read " + str(tmp_path / "blank" / "gnd_roxford5k.pkl")),
            (["--dataset", "roxford5k", "--data_path", str(tmp_path / "broken"), "--imsize", "8", "--multiscale"],
             "error: image " + str(tmp_path / "broken" / "jpg" / "d0.jpg") + " is 8 x 6 px at --imsize 8: its "
             "shorter side at scale 0.5 is below the patch size 4; use a larger --imsize"),
            (["--dataset", "roxford5k", "--data_path", str(tmp_path / "broken")],
             "error: cannot read image " + str(tmp_path / "broken" / "jpg" / "d2.jpg"))):
        with pytest.raises(SystemExit) as excinfo:
            eval_retrieval.main(checkpoint + flags)
        assert str(excinfo.value).startswith(message) and "\n" not in str(excinfo.value), str(excinfo.value)
