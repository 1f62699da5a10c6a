"""fieldlearn learn tells the user how the step went, and can refuse a step that did not
take (issue "Learning that pays", item 6); every class has at least MIN_IMAGES images."""

from __future__ import annotations

import json

import torch

from fieldlearn.device.classifier import MIN_IMAGES
from fieldlearn.field.increment import hold_out
from fieldlearn.device.data import ImageSet
from fieldlearn.store.state import load_state
from tests.cli.test_bad_input import LEARN, base_state, good_folder, refused, run, state, tree_hash  # noqa: F401


def test_hold_out_never_leaves_a_class_fewer_than_min_images_to_learn_from():
    labels = torch.tensor([0] * 5 + [1] * 6 + [2] * 40)
    data = ImageSet(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels, ["a", "b", "c"])
    learn, held = hold_out(data, 0.5, seed=0)
    counts = torch.bincount(learn.labels, minlength=3).tolist()
    assert counts == [5, 5, 20], "a class keeps MIN_IMAGES; above that, the fraction is held out (halves up)"
    assert torch.bincount(held.labels, minlength=3).tolist() == [0, 1, 20]
    assert hold_out(data, 0.0, seed=0) == (data, None)


def test_learn_reports_new_class_accuracy_and_folds_held_out_images_in(state, tmp_path, gen_test, capsys):
    """If this fails, the user is not told how often the new classes are recognised (or taken
    for old ones), or the held-out images are left out of the published model."""
    inbox = tmp_path / "new"
    good_folder(inbox, gen_test, "cherry", n=12, cls=20)
    good_folder(inbox, gen_test, "grape", n=12, cls=30)
    rc, out, err = run(capsys, "learn", inbox, "--state", state, "--val-fraction", "0.25", *LEARN)
    assert rc == 0, err
    assert "held-out accuracy on the new classes (among all 4)" in out and "taken for a class known before" in out
    assert "the 6 held-out images were then added to their classes' statistics" in out
    entry = json.loads((state / "versions" / "0002" / "meta.json").read_text())["history"][-1]
    assert entry["n_val_images"] == 6 and 0 <= entry["new_class_val_accuracy"] <= 1
    assert 0 <= entry["new_class_taken_for_old"] <= 1
    st = load_state(state)
    assert st.student.stats.counts[2:].tolist() == [12, 12], "held-out images join their class statistics"


def test_too_few_held_out_images_are_said_not_to_be_folded_in(state, tmp_path, gen_test, capsys):
    """If this fails, learn says held-out images joined the statistics when they could not:
    fewer than MIN_IMAGES images are never folded in at once (no stored sum may be one
    image's feature), so the class counts stay at the images it learned from."""
    inbox = tmp_path / "new"
    good_folder(inbox, gen_test, "cherry", n=12, cls=20)
    good_folder(inbox, gen_test, "grape", n=12, cls=30)
    rc, out, err = run(capsys, "learn", inbox, "--state", state, "--val-fraction", "0.1", *LEARN)
    assert rc == 0, err
    assert "were then added" not in out and "held-out images were not added to the statistics" in out
    assert load_state(state).student.stats.counts[2:].tolist() == [11, 11]


def test_min_new_accuracy_refuses_a_step_that_did_not_take(state, tmp_path, gen_test, capsys):
    inbox = tmp_path / "new"
    good_folder(inbox, gen_test, "cherry", n=12, cls=20)
    good_folder(inbox, gen_test, "grape", n=12, cls=30)
    before = tree_hash(state)
    rc, out, err = run(capsys, "learn", inbox, "--state", state, "--val-fraction", "0.25",
                       "--min-new-accuracy", "100.1", *LEARN)
    refused(rc, err, "--min-new-accuracy")
    rc, out, err = run(capsys, "learn", inbox, "--state", state, "--val-fraction", "0.25",
                       "--min-new-accuracy", "100", *LEARN)
    if rc != 0:   # a random-weight tiny model does not get 100 % of the held-out images
        line = refused(rc, err, "--min-new-accuracy", "not published")
        assert "held-out accuracy" in line
        assert tree_hash(state) == before, "a refused step changes nothing"


def test_min_new_accuracy_without_held_out_images_is_refused(state, tmp_path, gen_test, capsys):
    inbox = tmp_path / "new"
    good_folder(inbox, gen_test, "cherry", n=MIN_IMAGES, cls=20)
    before = tree_hash(state)
    rc, out, err = run(capsys, "learn", inbox, "--state", state, "--min-new-accuracy", "10", *LEARN)
    refused(rc, err, "--min-new-accuracy", "held-out")
    assert tree_hash(state) == before


def test_a_class_with_fewer_than_min_images_is_refused(state, tmp_path, gen_test, capsys):
    """If this fails, a class statistic could be formed from one or two images (a per-image
    feature in all but name)."""
    inbox = tmp_path / "new"
    good_folder(inbox, gen_test, "cherry", n=MIN_IMAGES - 1, cls=20)
    good_folder(inbox, gen_test, "grape", n=MIN_IMAGES, cls=30)
    before = tree_hash(state)
    rc, out, err = run(capsys, "learn", inbox, "--state", state, *LEARN)
    refused(rc, err, inbox / "cherry", f"at least {MIN_IMAGES}")
    assert tree_hash(state) == before


def test_options_the_method_does_not_read_are_named_in_one_warning(state, tmp_path, gen_test, capsys, recwarn):
    """If this fails, `learn --epochs 5 --lr 0.1` under the default method (none: it trains
    nothing in increments) changes nothing without a word, or the warning names options that
    do change the step (--seed, --batch-size) or comes as several lines."""
    good_folder(tmp_path / "new", gen_test, "cherry", n=6)
    rc, out, err = run(capsys, "learn", tmp_path / "new", "--state", state, "--no-progress", "--no-export",
                       "--num-threads", "1", "--epochs", "5", "--lr", "0.1", "--base-lr", "0.2", "--seed", "3",
                       "--batch-size", "8")
    assert rc == 0, err
    said = [str(w.message) for w in recwarn if "change nothing" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in recwarn]
    line = said[0]
    assert "\n" not in line
    assert "--epochs, --lr: --method none trains nothing" in line and "--base-lr: read only by init" in line, line
    assert "--seed" not in line and "--batch-size" not in line, line


def test_what_a_step_ignores_follows_the_method_and_head():
    """If this fails, the warning's source of truth (protocol.row_uses) says a training method
    ignores its own knobs, or method none reads training knobs."""
    from fieldlearn.device.config import RunConfig
    from fieldlearn.device.protocol import ignored_in_increment

    keys = {"epochs", "lr", "gamma", "temperature", "drift_shrink", "teacher_backend", "base_epochs", "seed"}
    none = RunConfig()
    assert none.method == "none"
    assert ignored_in_increment(none, keys) == (sorted(keys - {"base_epochs", "seed"}), ["base_epochs"])
    lwm = RunConfig(method="lwm")
    assert ignored_in_increment(lwm, keys) == ([], ["base_epochs"])
    finetune = RunConfig(method="finetune")
    assert ignored_in_increment(finetune, keys) == (["gamma", "teacher_backend", "temperature"], ["base_epochs"])
    lwm.model.classifier = "linear"     # the trained head: no class statistics to carry along the drift
    assert ignored_in_increment(lwm, keys) == (["drift_shrink"], ["base_epochs"])
