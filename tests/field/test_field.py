"""The field scenario through the commands a user runs (issue 21): a base built from a big
data set (Fashion-MNIST's t-shirt, trouser and pullover, every training image), then a
folder of 36 photos each of two new classes (bag, sneaker), then `eval` and `classify`.

With the ridge head, 6,000 images per base class drowned 36 per new class: 57 % of the new
classes' test images came out right, and `classify` said "t-shirt" for a bag at 0.243
against 0.241. The LDA head counts each class once, and its calibrated softmax means what
it says. The base trains one epoch here (CI time); the imbalance, which is the point, is
the real one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from fieldlearn.cli.main import main
from fieldlearn.runtime.layout import META, current_version_dir

from ..conftest import FASHION_DIR, write_image_folder


BASE = ["--variant", "cifar", "--input-size", "32", "--base-epochs", "1", "--no-progress", "--num-threads", "1"]


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out + err


@pytest.mark.slow
def test_the_field_user_path(fashion, tmp_path, capsys):
    """init on 3 classes x 6,000 images, learn bag + sneaker from 36 photos each, then eval
    and classify: one test, so that pytest-xdist builds this base (minutes) on one worker
    only, not once per worker that draws a test of it.

    If this fails, either a user who built the base from a whole data set gets new classes
    that are mostly taken for old ones (the ridge head: 57 % new, issue 21); or `classify`
    on a bag it was not taught from answers with a probability that says nothing (0.243
    vs 0.241 with the ridge head); or the step report lost the nearest-class-mean accuracy
    that the warning for a head far below it is judged against."""
    train, test = fashion
    state = tmp_path / "st"
    assert main(["init", "--data", f"fashion-mnist:{FASHION_DIR}", "--classes", "3", "--state", str(state),
                 *BASE]) == 0
    bag, sneaker = train.class_names.index("bag"), train.class_names.index("sneaker")
    new = write_image_folder(tmp_path / "new", train, [bag, sneaker], 36)
    assert main(["learn", str(new), "--state", str(state), "--no-progress", "--num-threads", "1"]) == 0
    capsys.readouterr()

    rc, out = _run(capsys, "eval", "--state", state, "--data", f"fashion-mnist:{FASHION_DIR}", "--json")
    assert rc == 0
    steps = json.loads(out[out.index("{"):])["per_step"]
    old, new_acc = steps[0]["accuracy"], steps[1]["accuracy"]
    with capsys.disabled():                                   # shown under pytest -s
        print(f"\nthe user path: new classes {100 * new_acc:.1f} %, old {100 * old:.1f} % (test split)")
    assert new_acc >= 0.95, f"new classes {100 * new_acc:.1f}% (old {100 * old:.1f}%)"
    assert old >= 0.97, f"old classes {100 * old:.1f}% (new {100 * new_acc:.1f}%)"

    folder = write_image_folder(tmp_path / "probe", test, [test.class_names.index("bag")], 8)
    files = sorted((folder / "bag").iterdir())
    rc, out = _run(capsys, "classify", *files, "--state", state, "--json", "--top-k", "2")
    assert rc == 0
    top = [r["top"][0] for r in json.loads(out[out.index("{"):])["results"]]
    names = [t["label"] for t in top]
    probs = np.array([t["prob"] for t in top])
    assert names.count("bag") >= 7, names
    assert probs.mean() >= 0.8, f"mean top-1 probability {probs.mean():.3f} on photos of a learned class"

    entry = json.loads((current_version_dir(state) / META).read_text())["history"][-1]
    assert entry["n_val_images"] == 8                        # 10 % of 36, rounded, per class
    assert 0.5 <= entry["new_class_val_ncm_accuracy"] <= 1.0


def test_the_step_report_warns_when_the_head_is_far_below_the_nearest_class_mean():
    """If this fails, `learn` and `watch` publish a version whose head makes far less of the
    new classes than the nearest class mean does on the same held-out images, without a word
    (what the ridge head did next to a big base: 50 % on 8 held-out images, said nothing)."""
    from fieldlearn.field.increment import BELOW_NCM_MARGIN, NewClassCheck

    bad = NewClassCheck(accuracy=0.5, taken_for_old=0.5, n_images=8, chance=0.2, ncm_accuracy=0.875)
    assert bad.below_ncm and any("nearest class mean gets 87.5%" in w for w in bad.warnings())
    near = NewClassCheck(accuracy=0.875 - BELOW_NCM_MARGIN + 0.01, taken_for_old=0.0, n_images=8, chance=0.2,
                         ncm_accuracy=0.875)
    assert not near.below_ncm and near.warnings() == []
    # the issue's own path measured 6 of 8 against the mean's 8 of 8, with 95 % on the test split: noise
    noisy = NewClassCheck(accuracy=0.75, taken_for_old=0.25, n_images=8, chance=0.2, ncm_accuracy=1.0)
    assert not noisy.below_ncm
    linear = NewClassCheck(accuracy=0.5, taken_for_old=0.5, n_images=8, chance=0.2)   # no statistics: no NCM
    assert not linear.below_ncm
