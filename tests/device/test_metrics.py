"""Class-incremental metrics against accuracy matrices worked out by hand."""

from __future__ import annotations

import pytest

from fieldlearn.device.metrics import AccuracyMatrix


def _matrix(acc, rows, sizes=None) -> AccuracyMatrix:
    m = AccuracyMatrix(sizes or [2] * len(rows))
    for a, r in zip(acc, rows):
        m.add(a, r)
    return m


# rows[t][g]: accuracy on class group g after step t; acc[t]: on all classes seen after step t.
ACC = [0.9, 0.70, 0.60, 0.50]
ROWS = [[0.9],
        [0.6, 0.8],
        [0.7, 0.5, 0.85],
        [0.4, 0.55, 0.3, 0.75]]


def test_forgetting_is_the_mean_drop_from_each_old_groups_best_accuracy():
    """If this fails, `forgetting` no longer means what the README's tables report: the mean
    over old groups of (best accuracy before the last step - accuracy at the last step)."""
    # group 0: best of 0.9, 0.6, 0.7 is 0.9, last 0.4 -> 0.5
    # group 1: best of 0.8, 0.5 is 0.8, last 0.55     -> 0.25
    # group 2: best of 0.85, last 0.3                 -> 0.55
    m = _matrix(ACC, ROWS)
    assert m.forgetting == pytest.approx((0.5 + 0.25 + 0.55) / 3)
    assert m.to_dict()["forgetting"] == pytest.approx((0.5 + 0.25 + 0.55) / 3)


def test_forgetting_does_not_count_the_last_step_as_a_best():
    """If this fails, a group that is better at the last step than ever before counts as
    forgotten 0 instead of negative forgetting (the last row taken into the max)."""
    m = _matrix([0.5, 0.6, 0.7], [[0.5], [0.4, 0.9], [0.6, 0.7, 0.8]])
    # group 0: max(0.5, 0.4) - 0.6 = -0.1; group 1: 0.9 - 0.7 = 0.2
    assert m.forgetting == pytest.approx((-0.1 + 0.2) / 2)


def test_forgetting_with_one_step_is_zero():
    """If this fails, a run with only its base step reports forgetting it cannot have."""
    assert _matrix([0.8], [[0.8]]).forgetting == 0.0


def test_average_incremental_accuracy_includes_step_0():
    """If this fails, the average incremental accuracy leaves out (or double counts) the base
    step: the README's 'avg incr.' column is the mean over every step, step 0 included."""
    m = _matrix(ACC, ROWS)
    assert m.average_incremental == pytest.approx((0.9 + 0.7 + 0.6 + 0.5) / 4)
    assert m.last == 0.5
    assert m.seen_classes() == [2, 4, 6, 8]
    d = m.to_dict()
    assert d["average_incremental"] == pytest.approx(0.675) and d["last"] == 0.5
    back = AccuracyMatrix.from_dict(d)
    assert back.average_incremental == pytest.approx(0.675) and back.forgetting == pytest.approx(m.forgetting)


def test_a_step_needs_one_accuracy_per_group_seen():
    """If this fails, a row with the wrong number of group accuracies is stored silently."""
    m = _matrix([0.9], [[0.9]])
    with pytest.raises(ValueError):
        m.add(0.5, [0.5])


def test_forgetting_after_one_increment_is_the_base_groups_drop():
    """If this fails, a run with a base step and one increment (the README demo's shortest
    form) reports no forgetting however much the base classes lost."""
    assert _matrix([0.9, 0.5], [[0.9], [0.3, 0.7]]).forgetting == pytest.approx(0.6)


def test_the_plot_draws_each_methods_accuracy(tmp_path, monkeypatch):
    """If this fails, `bench accuracy`'s PNG is not written, or its curves are not the
    accuracies in % against the number of classes seen, on a 0-100 axis, named by method and
    average incremental accuracy, or each figure stays open (memory grows over a sweep)."""
    import matplotlib.pyplot as plt

    from fieldlearn.device.metrics import plot_accuracy

    closed = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: closed.append(fig))
    plot_accuracy({"lwm": _matrix([0.9, 0.5], [[0.9], [0.3, 0.7]])}, tmp_path / "a.png", title="demo")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(closed) == 1
    ax = closed[0].axes[0]
    real_close(closed[0])
    (line,) = ax.lines
    assert line.get_xdata().tolist() == [2, 4] and line.get_ydata().tolist() == pytest.approx([90, 50])
    assert ax.get_ylim() == (0, 100) and line.get_label() == "lwm (70.0)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["lwm (70.0)"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "number of classes", "accuracy on all seen classes (%)", "demo")
