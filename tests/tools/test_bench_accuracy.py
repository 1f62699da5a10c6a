"""`fieldlearn bench accuracy` end to end on a tiny configuration: the output files and
their schema (no accuracy thresholds: the tiny net is random-init and trains one epoch)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_image_folder

TINY = ["--width", "0.35", "--no-pretrained", "--freeze-blocks", "10", "--epochs", "1", "--base-epochs", "1",
        "--batch-size", "16", "--no-progress"]
ROWS = ["ncm", "analytic", "none+analytic", "lwm+analytic", "lwm+ncm", "finetune", "lwf_mc", "lwm", "lc_lad", "joint", "joint+lda"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, gen_train, gen_test):
    """A 7-class ImageFolder with train/ and test/ (generated images: no accuracy is asserted)."""
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root / "train", gen_train, list(range(7)), per_class=14)
    write_image_folder(root / "test", gen_test, list(range(7)), per_class=4)
    return root


def _run(argv):
    from fieldlearn.cli.main import main

    return main(["bench", "accuracy", *argv])


def test_all_rows_one_run_schema(folder, tmp_path):
    out = tmp_path / "out"
    # a fixed shrink: the schema is the point here, and the shrink votes (7 leave-one-out
    # passes per lda step at D = 2560) were a third of this test's time
    rc = _run(["--data", str(folder), "--base", "3", "--steps", "2", "--order-seed", "1,2", "--val-fraction", "0.25",
               "--methods", ",".join(ROWS), "--shrink", "0.5", "--out", str(out), *TINY])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    # what the issue asks every run to record; a missing key means the output is not self-describing
    for key in ("fieldlearn_version", "git_commit", "config", "protocol", "orders", "summary", "command"):
        assert key in r, key
    assert r["protocol"]["order_seeds"] == [1, 2]
    assert len(r["orders"]) == 2
    for order in r["orders"]:
        assert [len(g) for g in order["groups"]] == [3, 2, 2]
        assert set(order["methods"]) == set(ROWS), "rows are named exactly as asked"
        lin = {n: m["accuracy"][0] for n, m in order["methods"].items() if "+" not in n and n not in ("ncm", "analytic")}
        assert len(set(lin.values())) == 1, f"step 0 must be one shared base network: {lin}"
        for name, m in order["methods"].items():
            assert len(m["accuracy"]) == 3 and [len(row) for row in m["matrix"]] == [1, 2, 3]
            for key in ("average_incremental", "last", "forgetting", "seconds", "config", "val", "settings"):
                assert key in m, (name, key)
            assert m["stores_data"] == name.startswith("joint")
            assert m["config"]["model"]["width"] == 0.35
        ms = order["methods"]
        assert ms["ncm"]["config"]["model"]["classifier"] == "ncm" and ms["ncm"]["config"]["model"]["features"] == "frozen"
        assert ms["analytic"]["config"]["model"]["classifier"] == "analytic"
        assert ms["lwm+analytic"]["config"]["method"] == "lwm"
        assert ms["lwm+analytic"]["config"]["model"]["classifier"] == "analytic"
        assert ms["lwm"]["config"]["model"]["classifier"] == "linear"
        assert "upper bound" in ms["joint"]["note"]
        assert all("ridge" in c for c in ms["lwm+analytic"]["classifier"]), "the ridge each step solved with is recorded"
    assert set(r["summary"]) == set(ROWS)
    md = (out / "results.md").read_text()
    assert "stores data" in md and "| lwm |" in md and "| ncm |" in md and "| lwm+analytic |" in md
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_row_with_an_unknown_method_or_classifier_is_one_line():
    from fieldlearn.tools.bench_accuracy import parse_row
    from fieldlearn.runtime.errors import UserError

    assert parse_row("lwm+analytic").classifier == "analytic" and parse_row("ncm").pretrained_only
    for bad in ("lwn", "lwm+knn", "joint+knn", "none"):
        with pytest.raises(UserError, match="--methods"):
            parse_row(bad)
    from fieldlearn.device.protocol import stores_data

    # the upper bound with the best head: it keeps every image, and says so wherever it is named
    joint = parse_row("joint+lda")
    assert joint.method == "joint" and joint.classifier == "lda" and stores_data(joint.name)
    assert not stores_data("none+lda") and parse_row("lda").pretrained_only


def test_sweep_chooses_on_validation(folder, tmp_path):
    out = tmp_path / "sweep"
    # the built-in grid trains the base for up to 30 epochs: 1 and 2 keep the search, at CI time
    rc = _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "finetune,lwm+analytic", "--sweep",
               "--sweep-keys", "lr,lc_span,ridge,base_epochs", "--sweep-grid", "base_epochs=1,2;lr=0.001,0.01;ridge=0.1,1.0",
               "--val-fraction", "0.25", "--out", str(out), *TINY])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    trials = r["orders"][0]["sweep"]["lwm+analytic"]
    assert len(trials) >= 6, "the grid covers base epochs, lr, LC span and the ridge"
    assert {k for t in trials for k in t["settings"]} >= {"lr", "lc_span", "ridge", "base_epochs"}
    start = trials[0]["settings"]         # the row's CHOSEN settings (γ among them for lwm+analytic)
    varied = {k for t in trials for k, v in t["settings"].items() if start.get(k) != v}
    assert varied <= {"lr", "lc_span", "ridge", "base_epochs"}, "--sweep-keys narrows the search"
    best = max(trials, key=lambda t: t["val_average_incremental"])
    assert r["chosen"]["lwm+analytic"] == best["settings"], "the chosen setting must be the best on validation, not test"
    assert r["orders"][0]["methods"]["lwm+analytic"]["settings"] == r["chosen"]["lwm+analytic"]
    ft_spans = {t["settings"].get("lc_span") for t in r["orders"][0]["sweep"]["finetune"]}
    assert ft_spans == {"all", "new"}
    # --settings reuses the sweep's choices
    out2 = tmp_path / "again"
    assert _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "lwm+analytic", "--settings",
                 str(out / "results.json"), "--val-fraction", "0.25", "--out", str(out2), *TINY]) == 0
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["orders"][0]["methods"]["lwm+analytic"]["settings"] == r["chosen"]["lwm+analytic"]
    # an option given on the command line overrides the per-row settings
    out3 = tmp_path / "override"
    assert _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "lwm", "--lr", "0.003",
                 "--val-fraction", "0.25", "--out", str(out3), *TINY]) == 0
    r3 = json.loads((out3 / "results.json").read_text())
    assert r3["orders"][0]["methods"]["lwm"]["config"]["train"]["lr"] == 0.003


def test_an_image_folder_larger_than_one_load_gives_its_per_class_sample(folder, tmp_path, monkeypatch, capsys):
    """If this fails, `bench accuracy --data FOLDER --per-class N` refuses a folder larger than
    one load ("exceed the limit of one load") instead of sampling N per class before decoding
    (7 x 14 training images here against a limit lowered to 60; the sample is 7 x 8)."""
    import fieldlearn.device.data as data

    monkeypatch.setattr(data, "MAX_IMAGES", 60)
    out = tmp_path / "out"
    assert _run(["--data", str(folder), "--base", "3", "--steps", "2", "--per-class", "8", "--test-per-class", "3",
                 "--val-fraction", "0.25", "--methods", "ncm", "--out", str(out), *TINY]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("order 1993:")][0]
    assert line == f"order 1993: {7 * 6} train, {7 * 2} validation, {7 * 3} test images", line


def test_sweep_grid_replaces_a_keys_values_and_refuses_what_the_config_would():
    """If this fails, --sweep-grid tries values the config validator refuses, keeps the
    built-in values it was asked to replace, or takes a typo'd key as a key that sweeps nothing."""
    from fieldlearn.runtime.errors import UserError
    from fieldlearn.tools.bench_accuracy import SWEEP_STAGES, parse_grid, with_grid

    grid = parse_grid("lr=0.003, 0.03; freeze_bn_in_increments=false")
    assert grid == {"lr": [0.003, 0.03], "freeze_bn_in_increments": [False]}
    stages = with_grid(grid)
    lr_stage = next(s for s in stages if "lr" in s)
    assert lr_stage["lr"] == [0.003, 0.03] and lr_stage["increment_blocks"] == [1, 2, -1]
    assert [list(s) for s in stages] == [list(s) for s in SWEEP_STAGES]      # each key keeps its stage
    for bad in ("lrate=0.1", "lr=-1", "lr=", "epochs=2.5", "shrink", "freeze_bn_in_increments=maybe"):
        with pytest.raises(UserError, match="--sweep-grid"):
            parse_grid(bad)


def test_sweep_grid_without_sweep_is_refused(folder, tmp_path, capsys):
    assert _run(["--data", str(folder), "--methods", "ncm", "--sweep-grid", "lr=0.01", "--out",
                 str(tmp_path / "o"), *TINY]) == 2
    assert "--sweep-grid: changes nothing without --sweep" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_joint_row_is_swept_on_validation_too(folder, tmp_path):
    """If this fails, --sweep runs the upper bound at its preset's settings and says nothing
    (it did: a joint+lda sweep over lr ran one trial, at 0.01), so the bound is not the best
    its own validation finds and may sit below the rows it bounds."""
    out = tmp_path / "joint"
    assert _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "joint", "--sweep",
                 "--sweep-keys", "lr", "--sweep-grid", "lr=0.001,0.01", "--val-fraction", "0.25",
                 "--out", str(out), *TINY]) == 0
    r = json.loads((out / "results.json").read_text())
    trials = r["orders"][0]["sweep"]["joint"]
    assert {t["settings"]["lr"] for t in trials} == {0.001, 0.01}
    best = max(trials, key=lambda t: t["val_average_incremental"])
    assert r["chosen"]["joint"] == best["settings"]
    assert r["orders"][0]["methods"]["joint"]["config"]["train"]["lr"] == best["settings"]["lr"]
