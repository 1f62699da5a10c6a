"""The hub's merge (fieldlearn.fleet.merge): exact, counted once, and refusing bad input whole."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import unicodedata

import pytest
import torch

from fieldlearn.device.classifier import SHRINK_GRID, solve_head
from fieldlearn.device.learner import classifier_features
from fieldlearn.store.state import load_state, load_version
from fieldlearn.fleet.contribution import make_contribution
from fieldlearn.fleet.merge import merge_round, read_ledger
from fieldlearn.runtime.layout import version_names
from tests.fleet.fleet_setup import DEVICES, class_images, learn, make_base


def fresh_hub(fleet, tmp_path):
    hub = tmp_path / "hub"
    shutil.copytree(fleet[1], hub)
    return hub


def union_reference(dirs, data, classes):
    """The statistics one state forms from every device's images, increment by increment
    (each device's increment folded in as that device folded it: one batch each), with the
    merged class order: what the fleet must equal."""
    base = load_state(dirs["hub"] / ".." / "hub-base")
    s = base.student
    stats = s.stats
    stats.widen(len(classes) - stats.sums.shape[0])
    for plan in DEVICES.values():
        new = class_images(data, plan)
        x = classifier_features(s, new, base.config)                                  # [N, D]
        y = torch.tensor([classes.index(new.class_names[int(i)]) for i in new.labels])
        stats.add(x, y)
    return stats, base


def test_merged_model_equals_one_state_that_learned_the_union(fleet, data):
    """If this fails, the fleet's model is not the model of all the devices' images: a
    device's statistics were dropped, counted twice, put on the wrong class, or the shared
    class ("kiwi0", on devices a and c) became two classes."""
    dirs, _, sent, result = fleet
    assert result.published and sorted(result.merged) == ["a", "b", "c"] and not result.refused
    merged = load_state(dirs["hub"])
    names = data.class_names
    assert merged.classes == [names[i] for i in (0, 1, 2, 3, 4, 5, 6, 7)]     # kiwi0 (4) once
    ref, base = union_reference(dirs, data, merged.classes)
    m = merged.student.stats
    # The merge itself adds float64 sums exactly; the features under it are float32 and come out
    # a few ulps apart when the union is encoded in other batches or on other threads (pytest -n),
    # so the tolerance is float32's, far below one image's weight in a class sum (~1e-2)
    assert torch.allclose(m.sums, ref.sums, rtol=1e-6, atol=1e-6)
    assert torch.allclose(m.gram, ref.gram, rtol=1e-6, atol=1e-6)
    assert torch.equal(m.seen, ref.seen)
    assert m.counts[4] == 20                                                   # 10 from a + 10 from c
    # The scatter adds exactly too, but kiwi0's two halves were each learned as a class of
    # their own (a covariance over 10 images and 1 in the class tally, on a and on c), where
    # one state folds c's half into a known class (its share of a 20-image covariance): the
    # union's scatter is not the fleet's for a class two devices learned. It is where the
    # devices learned disjoint classes (test_the_merge_carries_the_class_scatter).
    want_scatter = load_state(dirs["hub"] / ".." / "hub-base").student.stats.scatter + sum(
        sent[d].scatter for d in DEVICES)
    assert torch.allclose(m.scatter, want_scatter, rtol=1e-12, atol=1e-12)
    assert float(m.scatter[-1, -1]) == 3 + 2 + 2 + 2                          # kiwi0 counted by a and by c
    ref.scatter.copy_(m.scatter)
    ref.votes.copy_(m.votes)           # the devices' votes add (test_the_merge_sums_the_shrink_votes)
    # logits of the published head = the union's head (with the fleet's temperature)
    test = data.subset(data.labels < 8)
    x = classifier_features(merged.student, test, merged.config)
    got = merged.student.classifier(x.float()).double()
    cfg = merged.config.model
    w, b, _ = solve_head(ref, cfg.classifier, cfg.ridge, ref.shrink(cfg.shrink))
    want = (x @ w.T + b) / m.temperature
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    assert float((got.argmax(1) == test.labels).float().mean()) > 0.5


def test_the_merge_carries_the_class_scatter(fleet, data, tmp_path):
    """If this fails, the fleet drops or miscounts ClassStats.scatter (the lda head's
    class-balanced covariance): the merged model's covariance is not the one of all the
    devices' classes, and its lda head predicts otherwise than one state that learned them.
    Devices a and b learn disjoint classes, so one state folding in both increments is exact."""
    dirs, pristine, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    r = merge_round(hub, [(sent[d], sent[d].id) for d in ("a", "b")], export=False, log=lambda s: None)
    assert r.published and r.merged == ["a", "b"]
    merged = load_state(hub)
    m = merged.student.stats
    base = load_state(pristine)
    s = base.student.stats
    # additive: the base's scatter, plus each device's own minus the base (counted once)
    devs = [load_state(dirs[d]).student.stats.scatter for d in ("a", "b")]
    assert torch.allclose(m.scatter, devs[0] + devs[1] - s.scatter, rtol=1e-12, atol=1e-12)
    assert float(m.scatter[-1, -1]) == len(merged.classes) == 7               # 3 base + 2 from a + 2 from b
    # equal to one state that folded in both devices' images
    s.widen(len(merged.classes) - s.sums.shape[0])
    for d in ("a", "b"):
        new = class_images(data, DEVICES[d])
        x = classifier_features(base.student, new, base.config)
        s.add(x, torch.tensor([merged.classes.index(new.class_names[int(i)]) for i in new.labels]))
    assert torch.allclose(m.scatter, s.scatter, rtol=1e-6, atol=1e-6)
    # the published lda head is the head solved from those statistics
    cfg = merged.config.model
    assert cfg.classifier == "lda"
    s.votes.copy_(m.votes)
    w, b, _ = solve_head(s, cfg.classifier, cfg.ridge, s.shrink(cfg.shrink))
    test = data.subset(data.labels < 7)
    x = classifier_features(merged.student, test, merged.config)
    got = merged.student.classifier(x.float()).double()
    want = (x @ w.T + b) / m.temperature
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    # what the devices take carries it too
    assert torch.equal(r.model.scatter, m.scatter)


def test_a_ledger_written_before_the_scatter_still_reads(fleet, tmp_path):
    """If this fails, a hub whose last version was merged before ClassStats.scatter existed
    cannot run its next round (its ledger lacks the contributions' scatters)."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    from fieldlearn.device.classifier import pooled_scatter
    from fieldlearn.runtime.layout import FLEET_LEDGER

    dirs, _, _, _ = fleet
    vd = tmp_path / "old"
    shutil.copytree(load_state(dirs["hub"]).version_dir, vd)
    raw = (vd / FLEET_LEDGER).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8: 8 + n])["__metadata__"]
    tensors = {k: v for k, v in load_st(raw).items() if not k.endswith(".scatter")}
    (vd / FLEET_LEDGER).write_bytes(save_st(tensors, metadata=meta))
    new, old = read_ledger(load_state(dirs["hub"]).version_dir), read_ledger(vd)
    assert sorted(old) == sorted(new) == ["a", "b", "c"]
    for d, e in old.items():
        c = e.contribution
        assert torch.equal(c.scatter, pooled_scatter(c.gram, c.sums)) and e.id == new[d].id


def test_the_merge_sums_the_shrink_votes(fleet, tmp_path):
    """If this fails, the fleet drops or miscounts ClassStats.votes (per SHRINK_GRID value, the
    images its lda head got right left out): the hub's head, with ModelConfig.shrink 0, is
    solved with another shrink than the one all the devices' images vote for, and a device
    that takes the fleet's version changes shrink with no new image."""
    dirs, pristine, sent, _ = fleet
    base = load_state(pristine).student.stats.votes
    devs = {d: load_state(dirs[d]).student.stats.votes for d in ("a", "b")}
    for d in ("a", "b"):
        assert torch.equal(sent[d].votes, devs[d] - base) and float(sent[d].votes.sum()) > 0
    # device a's votes made to choose another shrink than the base's and b's together
    unbiased = base + sent["b"].votes
    other = min(range(len(SHRINK_GRID)), key=lambda j: float(unbiased[j]))
    votes = sent["a"].votes.clone()
    votes[other] += float(unbiased.max() + sent["a"].votes.max()) + 1
    a = dataclasses.replace(sent["a"], votes=votes)
    hub = fresh_hub(fleet, tmp_path)
    r = merge_round(hub, [(a, a.id), (sent["b"], sent["b"].id)], export=False, log=lambda s: None)
    assert r.published and r.merged == ["a", "b"]
    merged = load_state(hub)
    m = merged.student.stats
    assert torch.equal(m.votes, base + votes + sent["b"].votes)                # reference + the differences
    assert torch.equal(r.model.votes, m.votes)                                 # what the devices take
    cfg = merged.config.model
    assert cfg.classifier == "lda" and cfg.shrink == 0.0
    assert m.shrink(cfg.shrink) == SHRINK_GRID[other] == SHRINK_GRID[int(m.votes.argmax())]
    # the published head is solved at that shrink, not at the one the votes without a's chose
    got = merged.student.classifier.weight.double() * m.temperature
    w, _, _ = solve_head(m, cfg.classifier, cfg.ridge, SHRINK_GRID[other])
    w_unbiased, _, _ = solve_head(m, cfg.classifier, cfg.ridge, max(zip(unbiased.tolist(), SHRINK_GRID))[1])
    tol = 1e-5 * float(w.abs().max())
    assert torch.allclose(got, w, rtol=1e-5, atol=tol)
    assert not torch.allclose(got, w_unbiased, rtol=1e-2, atol=1e3 * tol)
    # the ledger keeps each device's votes: one sent again is not counted twice
    assert torch.equal(read_ledger(merged.version_dir)["a"].contribution.votes, votes)
    again = merge_round(hub, [(a, a.id)], export=False, log=lambda s: None)
    assert not again.published and torch.equal(again.model.votes, m.votes)


def test_a_ledger_written_before_the_votes_reads_them_as_none(fleet, data, tmp_path):
    """If this fails, a hub whose last version was merged before ClassStats.votes existed
    cannot run its next round, or a device's contribution it replaces takes votes away that
    were never added (the hub's own votes were none then: its config fixed the shrink)."""
    from safetensors.torch import load as load_st
    from safetensors.torch import save as save_st

    from fieldlearn.runtime.layout import FLEET_LEDGER

    dirs, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    merge_round(hub, [(sent["a"], sent["a"].id)], export=False, log=lambda s: None)
    vd = load_state(hub).version_dir
    raw = (vd / FLEET_LEDGER).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8: 8 + n])["__metadata__"]
    tensors = {k: v for k, v in load_st(raw).items() if not k.endswith(".votes")}
    (vd / FLEET_LEDGER).write_bytes(save_st(tensors, metadata=meta))
    old = read_ledger(vd)["a"]
    assert old.id == sent["a"].id and torch.equal(old.contribution.votes, torch.zeros(len(SHRINK_GRID),
                                                                                      dtype=torch.float64))
    before = load_state(hub).student.stats.votes
    dev = tmp_path / "a"
    shutil.copytree(dirs["a"], dev)
    learn(dev, class_images(data, {8: slice(0, 20)}))
    grown = make_contribution(dev, "a")
    r = merge_round(hub, [(grown, grown.id)], export=False, log=lambda s: None)   # replaces a's first one
    assert r.published and r.merged == ["a"]
    # the replaced one takes no votes away (an old hub's own votes were none: it ends with the grown one's)
    assert torch.equal(load_state(hub).student.stats.votes, before + grown.votes)


def test_a_contribution_sent_again_is_counted_once(fleet, tmp_path):
    """If this fails, a device that retries (or re-joins after a crash) doubles its classes."""
    dirs, _, sent, first = fleet
    hub = dirs["hub"]
    before = version_names(hub)
    again = merge_round(hub, [(sent["a"], sent["a"].id)], export=False, log=lambda s: None)
    assert not again.published and again.counted_before == ["a"] and version_names(hub) == before
    assert set(again.model.counted) == {"a", "b", "c"}


def test_a_device_that_learned_more_replaces_its_contribution(fleet, data, tmp_path):
    """If this fails, a device that learned another class before the hub's version reached it
    has its first contribution counted twice (or its new class lost)."""
    dirs, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    merge_round(hub, [(sent["a"], sent["a"].id)], export=False, log=lambda s: None)
    dev = tmp_path / "a"
    shutil.copytree(dirs["a"], dev)
    learn(dev, class_images(data, {8: slice(0, 20)}))
    grown = make_contribution(dev, "a")
    r = merge_round(hub, [(grown, grown.id)], export=False, log=lambda s: None)
    assert r.published and r.merged == ["a"]
    m = load_state(hub).student.stats
    assert m.counts.tolist() == [20, 20, 20, 20, 10, 20]                       # class 3 once, not twice
    assert torch.allclose(m.gram, load_state(dev).student.stats.gram, rtol=1e-10, atol=1e-9)
    assert read_ledger(load_state(hub).version_dir)["a"].id == grown.id


def _bad(c, **changes):
    return dataclasses.replace(c, **changes)


@pytest.mark.parametrize("how, message", [
    ("few", "needs at least 5"),
    ("gram", "wrong shapes"),
    ("scatter", "wrong shapes"),
    ("tally", "a class tally is never negative"),
    ("votes", "wrong shapes"),
    ("negative votes", "a count of images is never negative"),
    ("nan votes", "non-finite statistics"),
    ("nan", "non-finite statistics"),
    ("tampered", "does not match its id"),
    ("case", "differ only by case or Unicode form"),
    ("nfd", "differ only by case or Unicode form"),
    ("base", "the fleet's base hashes"),
    ("moved", "its features moved"),
])
def test_bad_contributions_merge_nothing(fleet, tmp_path, how, message):
    """If this fails, a bad contribution (too few images, a wrong Gram, changed on the way, a
    class that only differs by case or Unicode form from one the fleet knows, another base, a
    device whose features moved) is merged, or refused without saying why."""
    _, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    merge_round(hub, [(sent["a"], sent["a"].id)], export=False, log=lambda s: None)   # the fleet knows kiwi0
    before = version_names(hub)
    c, sid = sent["b"], sent["b"].id
    if how == "few":
        sums = c.sums.clone()
        sums[0] *= 3 / 20                                                     # 3 images
        c = _bad(c, sums=sums)
    elif how == "gram":
        c = _bad(c, gram=c.gram[:-1, :-1])
    elif how == "scatter":
        c = _bad(c, scatter=c.scatter[:-1, :-1])
    elif how == "tally":
        scatter = c.scatter.clone()
        scatter[-1, -1] = -1.0
        c = _bad(c, scatter=scatter)
    elif how == "votes":
        c = _bad(c, votes=c.votes[:-1])
    elif how == "negative votes":
        votes = c.votes.clone()
        votes[0] = -1.0
        c = _bad(c, votes=votes)
    elif how == "nan votes":
        votes = c.votes.clone()
        votes[0] = float("nan")
        c = _bad(c, votes=votes)
    elif how == "nan":
        scatter = c.scatter.clone()
        scatter[0, 0] = float("nan")
        c = _bad(c, scatter=scatter)
    elif how == "tampered":
        sums = c.sums.clone()
        sums[0, 0] += 1e-3
        c = _bad(c, sums=sums)
        sid = sent["b"].id                                                    # the id the device sent
    elif how == "case":
        c = _bad(c, classes=["KIWI0", c.classes[1]])
    elif how == "base":
        c = _bad(c, base="0" * 64)
    elif how == "moved":
        c = _bad(c, moved="its step 1 trained the top with --method lwm")
    if how == "nfd":          # the fleet learns "kïwi" (NFC) from device n; b sends it in NFD
        n = _bad(sent["c"], device="n", classes=["k\u00efwi", sent["c"].classes[1]])
        assert merge_round(hub, [(n, n.id)], export=False, log=lambda s: None).published
        before = version_names(hub)
        c = _bad(c, classes=[unicodedata.normalize("NFD", "k\u00efwi"), c.classes[1]])
    if how != "tampered":
        sid = c.id
    r = merge_round(hub, [(c, sid)], export=False, log=lambda s: None)
    assert not r.published and version_names(hub) == before
    assert message in r.refused["b"] and r.refused["b"].startswith("device 'b': ")
    assert "\n" not in r.refused["b"]


def test_two_devices_under_one_name_do_not_replace_each_other(fleet, tmp_path):
    """If this fails, two devices sharing a name (a stock host name) merge as one that learned
    more: the second replaces the first and the first one's classes leave the fleet."""
    _, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    twin = _bad(sent["b"], device="a")
    r = merge_round(hub, [(sent["a"], sent["a"].id), (twin, twin.id)], export=False, log=lambda s: None)
    assert r.merged == ["a"] and "a second device of this name" in r.refused["a"]
    assert load_state(hub).classes[-2:] == sent["a"].classes


def test_a_device_synced_with_a_version_the_hub_rolled_back_is_refused(fleet, tmp_path):
    """If this fails, a device's statistics (counted against a hub version the hub no longer
    serves) are added to an older version that lacks part of what they are counted against."""
    _, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    ahead = _bad(sent["b"], ref="0009")
    r = merge_round(hub, [(ahead, ahead.id)], export=False, log=lambda s: None)
    assert "it synced with hub version 0009" in r.refused["b"] and not r.published


def test_a_bad_device_leaves_the_others_merged(fleet, tmp_path):
    """If this fails, one bad device blocks the fleet, or its part slips into the merge."""
    _, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    bad = _bad(sent["b"], gram=sent["b"].gram[:-1, :-1])
    r = merge_round(hub, [(sent["a"], sent["a"].id), (bad, bad.id)], export=False, log=lambda s: None)
    assert r.published and r.merged == ["a"] and "b" in r.refused
    assert load_state(hub).classes == load_state(fleet[1]).classes + sent["a"].classes


def test_a_device_on_another_base_is_refused_naming_both_hashes(fleet, data, tmp_path):
    """If this fails, a device whose features differ (another base) is merged: its statistics
    would be sums of other vectors, and the merged model wrong with no error."""
    _, pristine, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    other = tmp_path / "other"
    make_base(other, data, seed=1)                                            # another random init
    learn(other, class_images(data, {5: slice(0, 20)}))
    c = make_contribution(other, "x")
    r = merge_round(hub, [(c, c.id)], export=False, log=lambda s: None)
    line = r.refused["x"]
    from fieldlearn.fleet.base import base_hash
    assert c.base[:16] in line and base_hash(load_state(hub).student)[:16] in line
    assert not r.published


def test_a_device_whose_features_moved_is_refused(fleet, data, tmp_path):
    """If this fails, a device that trained its top in an increment (--method lwm) is merged:
    its statistics were formed over other features than the fleet's, and the merge is wrong."""
    _, pristine, _, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    dev = tmp_path / "lwm"
    shutil.copytree(pristine, dev)
    learn(dev, class_images(data, {5: slice(0, 20)}), method="lwm")
    c = make_contribution(dev, "lwm")
    r = merge_round(hub, [(c, c.id)], export=False, log=lambda s: None)
    assert "trained the top with --method lwm: its features moved" in r.refused["lwm"]
    assert c.base[:16] in r.refused["lwm"] and not r.published


def test_the_hub_publishes_through_the_store_and_rolls_back(fleet):
    """If this fails, the merged version is not a version like any other (no history entry,
    no rollback to the base)."""
    from fieldlearn.store.versions import rollback

    dirs, pristine, _, _ = fleet
    hub = dirs["hub"]
    merged = load_state(hub)
    assert merged.history[-1]["method"] == "fleet" and merged.step == 1
    assert sorted(merged.history[-1]["fleet"]["merged"]) == ["a", "b", "c"]
    base_name = version_names(pristine)[-1]
    assert load_version(hub / "versions" / base_name).classes == load_state(pristine).classes
    shutil.copytree(hub, hub.parent / "hub-rollback")
    old, new = rollback(hub.parent / "hub-rollback")
    assert new == base_name and load_state(hub.parent / "hub-rollback").classes == load_state(pristine).classes


def test_a_merge_interrupted_while_publishing_publishes_nothing(fleet, tmp_path, monkeypatch):
    """If this fails, a hub killed in the middle of writing a merged version leaves half of it
    current (a model without its ledger, or a ledger without its model)."""
    import fieldlearn.fleet.merge as merge
    from fieldlearn.store.versions import clean_leftovers

    _, _, sent, _ = fleet
    hub = fresh_hub(fleet, tmp_path)
    real = merge.ledger_writer

    def dying(ledger):
        write = real(ledger)

        def half(version_dir):
            write(version_dir)                      # the ledger is on disk in the staging dir, then the kill
            raise KeyboardInterrupt
        return half

    monkeypatch.setattr(merge, "ledger_writer", dying)
    before = version_names(hub)
    with pytest.raises(KeyboardInterrupt):
        merge_round(hub, [(sent["a"], sent["a"].id)], export=False, log=lambda s: None)
    clean_leftovers(hub)
    assert version_names(hub) == before and read_ledger(load_state(hub).version_dir) == {}
    monkeypatch.setattr(merge, "ledger_writer", real)
    r = merge_round(hub, [(sent["a"], sent["a"].id)], export=False, log=lambda s: None)   # the retry merges once
    assert r.published and load_state(hub).student.stats.counts.tolist()[-2:] == [20, 10]
