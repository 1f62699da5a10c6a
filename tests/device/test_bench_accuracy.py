"""`fieldlearn bench accuracy` end to end on a tiny configuration: the output files and
their schema (no accuracy thresholds: the tiny net is random-init and trains one epoch)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_image_folder

TINY = ["--width", "0.35", "--no-pretrained", "--freeze-blocks", "10", "--epochs", "1", "--base-epochs", "1",
        "--batch-size", "16", "--no-progress"]
METHODS = ["finetune", "lwf_mc", "lwm", "lc_lad", "joint"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_train, cifar_test):
    """A 7-class ImageFolder with train/ and test/ (real CIFAR-100 images)."""
    root = tmp_path_factory.mktemp("imagefolder")
    write_image_folder(root / "train", cifar_train, list(range(7)), per_class=12)
    write_image_folder(root / "test", cifar_test, list(range(7)), per_class=4)
    return root


def _run(argv):
    from fieldlearn.cli.main import main

    return main(["bench", "accuracy", *argv])


def test_all_methods_one_run_schema(folder, tmp_path):
    out = tmp_path / "out"
    rc = _run(["--data", str(folder), "--base", "3", "--steps", "2", "--order-seed", "1,2", "--out", str(out), *TINY])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    # what the issue asks every run to record; a missing key means the output is not self-describing
    for key in ("fieldlearn_version", "git_commit", "config", "protocol", "orders", "summary", "command"):
        assert key in r, key
    assert r["protocol"]["order_seeds"] == [1, 2]
    assert len(r["orders"]) == 2
    for order in r["orders"]:
        assert [len(g) for g in order["groups"]] == [3, 2, 2]
        assert set(order["methods"]) == set(METHODS)
        accs = {n: m["accuracy"][0] for n, m in order["methods"].items()}
        assert len(set(accs.values())) == 1, f"step 0 must be one shared base model: {accs}"
        for name, m in order["methods"].items():
            assert len(m["accuracy"]) == 3 and [len(row) for row in m["matrix"]] == [1, 2, 3]
            for key in ("average_incremental", "last", "forgetting", "seconds", "config", "val", "settings"):
                assert key in m, (name, key)
            assert m["stores_data"] == (name == "joint")
            assert m["config"]["model"]["width"] == 0.35
        assert "upper bound" in order["methods"]["joint"]["note"]
    assert set(r["summary"]) == set(METHODS)
    md = (out / "results.md").read_text()
    assert "stores data" in md and "| lwm |" in md
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_chooses_on_validation(folder, tmp_path):
    out = tmp_path / "sweep"
    rc = _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "finetune,lwm", "--sweep",
               "--out", str(out), *TINY])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    trials = r["orders"][0]["sweep"]["lwm"]
    assert len(trials) >= 6, "the lwm grid covers LC span x LD form, beta/gamma and lr"
    best = max(trials, key=lambda t: t["val_average_incremental"])
    assert r["chosen"]["lwm"] == best["settings"], "the chosen setting must be the best on validation, not test"
    assert r["orders"][0]["methods"]["lwm"]["settings"] == r["chosen"]["lwm"]
    ft_spans = {t["settings"]["lc_span"] for t in r["orders"][0]["sweep"]["finetune"]}
    assert ft_spans == {"all", "new"}
    # --settings reuses the sweep's choices
    out2 = tmp_path / "again"
    assert _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "lwm", "--settings",
                 str(out / "results.json"), "--out", str(out2), *TINY]) == 0
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["orders"][0]["methods"]["lwm"]["settings"] == r["chosen"]["lwm"]
    # an option given on the command line overrides the per-method settings
    out3 = tmp_path / "override"
    assert _run(["--data", str(folder), "--base", "3", "--steps", "2", "--methods", "lwm", "--lr", "0.003",
                 "--out", str(out3), *TINY]) == 0
    r3 = json.loads((out3 / "results.json").read_text())
    assert r3["orders"][0]["methods"]["lwm"]["config"]["train"]["lr"] == 0.003
