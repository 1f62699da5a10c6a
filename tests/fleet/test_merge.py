"""The hub's merge (fieldlearn.fleet.merge): exact, counted once, and refusing bad input whole."""

from __future__ import annotations

import dataclasses
import shutil
import unicodedata

import pytest
import torch

from fieldlearn.device.classifier import solve_head
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
    # logits of the published head = the union's head (with the fleet's temperature)
    test = data.subset(data.labels < 8)
    x = classifier_features(merged.student, test, merged.config)
    got = merged.student.classifier(x.float()).double()
    cfg = merged.config.model
    w, b, _ = solve_head(ref, cfg.classifier, cfg.ridge, cfg.shrink)
    want = (x @ w.T + b) / m.temperature
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max())
    assert float((got.argmax(1) == test.labels).float().mean()) > 0.5


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
