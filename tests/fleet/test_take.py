"""A device takes the fleet's version (fieldlearn.fleet.take): the merged classes, its own kept."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from fieldlearn.store.state import load_state
from fieldlearn.store.versions import rollback
from fieldlearn.fleet.contribution import make_contribution
from fieldlearn.fleet.take import take
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import version_names
from tests.fleet.fleet_setup import class_images, learn


def device_copy(fleet, name, tmp_path):
    d = tmp_path / name
    shutil.copytree(fleet[0][name], d)
    return d


def test_each_device_ends_with_the_fleets_model(fleet, tmp_path):
    """If this fails, a device that took part does not end with the merged classes, or its
    model predicts differently from the hub's, or its next contribution sends again what the
    fleet already holds."""
    dirs, _, sent, result = fleet
    hub = load_state(dirs["hub"])
    for name in ("a", "b", "c"):
        dev = device_copy(fleet, name, tmp_path)
        take(dev, name, result.model, sent[name], export=False, log=lambda s: None)
        got = load_state(dev)
        assert got.classes == hub.classes
        assert torch.equal(got.student.classifier.weight, hub.student.classifier.weight)
        assert torch.equal(got.student.classifier.bias, hub.student.classifier.bias)
        nxt = make_contribution(dev, name)
        assert nxt.classes == [] and nxt.ref == hub.version_dir.name and float(nxt.gram.abs().max()) == 0.0
        assert torch.equal(got.student.stats.scatter, hub.student.stats.scatter)
        assert float(nxt.scatter.abs().max()) == 0.0
        assert torch.equal(got.student.stats.votes, hub.student.stats.votes)   # the same shrink as the hub's
        assert float(nxt.votes.abs().max()) == 0.0


def test_a_device_keeps_what_it_learned_after_it_sent(fleet, data, tmp_path):
    """If this fails, a device that learned a class while the round ran loses it when it takes
    the fleet's version, or sends it twice in the next round."""
    dirs, _, sent, result = fleet
    dev = device_copy(fleet, "a", tmp_path)
    learn(dev, class_images(data, {8: slice(0, 20)}))                         # after it sent
    own = make_contribution(dev, "a")
    before = version_names(dev)
    take(dev, "a", result.model, sent["a"], export=False, log=lambda s: None)
    got = load_state(dev)
    assert got.classes == result.model.classes + [data.class_names[8]]
    assert len(version_names(dev)) == len(before) + 2                       # the fleet's, then its own on top
    nxt = make_contribution(dev, "a")
    assert nxt.classes == [data.class_names[8]] and nxt.counts.tolist() == [20]
    # its own votes kept (recalls summed over classes are fractions: equal up to rounding)
    assert torch.allclose(nxt.votes, own.votes - sent["a"].votes, rtol=0, atol=1e-12) and float(nxt.votes.sum()) > 0
    assert nxt.ref == result.model.hub_version
    # the rollback goes to the fleet's version, then to the device's own before it
    rollback(dev)
    assert load_state(dev).classes == result.model.classes
    rollback(dev)
    assert load_state(dev).classes == load_state(dirs["a"]).classes + [data.class_names[8]]


def test_a_device_that_did_not_take_part_keeps_its_classes(fleet, data, tmp_path):
    """If this fails, taking the fleet's version drops a device's classes that were never sent."""
    dirs, pristine, _, result = fleet
    dev = tmp_path / "d"
    shutil.copytree(pristine, dev)
    learn(dev, class_images(data, {9: slice(0, 20)}))
    take(dev, "d", result.model, None, export=False, log=lambda s: None)
    assert load_state(dev).classes == result.model.classes + [data.class_names[9]]
    own = make_contribution(dev, "d")
    assert own.classes == [data.class_names[9]]


def test_a_device_on_another_base_cannot_take(fleet, tmp_path):
    """If this fails, a device whose features differ loads statistics it cannot use."""
    dev = device_copy(fleet, "b", tmp_path)
    other = dataclasses.replace(fleet[3].model, base="f" * 64)
    before = version_names(dev)
    with pytest.raises(UserError, match="fleet's base hashes ffffffffffffffff"):
        take(dev, "b", other, None, export=False, log=lambda s: None)
    assert version_names(dev) == before



def test_taking_the_same_version_again_writes_nothing(fleet, tmp_path):
    """If this fails, every round writes a new, identical version on every device (a fleet
    that merges nothing new fills the devices' stores)."""
    _, _, sent, result = fleet
    dev = device_copy(fleet, "c", tmp_path)
    first = take(dev, "c", result.model, sent["c"], export=False, log=lambda s: None)
    again = take(dev, "c", result.model, None, export=False, log=lambda s: None)
    assert again == first and version_names(dev)[-1] == first.name
