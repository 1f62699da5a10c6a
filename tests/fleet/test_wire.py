"""What goes over the wire (fieldlearn.fleet.wire): exact, smallest, and no image in it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.common.serde import recorddict_to_proto  # noqa: E402

from fieldlearn.store.state import load_state  # noqa: E402
from fieldlearn.fleet.contribution import Refused, from_upper, upper  # noqa: E402
from fieldlearn.runtime.errors import UserError  # noqa: E402
from fieldlearn.fleet.wire import (contribution_from_record, contribution_to_record, model_from_record,  # noqa: E402
                                   model_to_record)
from tests.store.privacy_audit import Pattern, feature_patterns, pixel_patterns, scan  # noqa: E402
from tests.fleet.fleet_setup import DEVICES, class_images  # noqa: E402


def wire_bytes(rd) -> bytes:
    return recorddict_to_proto(rd).SerializeToString()


def test_a_contribution_crosses_the_wire_exactly_in_its_smallest_form(fleet):
    """If this fails, the hub merges other numbers than the device sent (float32 on the way,
    a transposed Gram), or the Gram travels whole (twice the bytes it needs)."""
    _, _, sent, result = fleet
    c = sent["a"]
    rd = contribution_to_record(c)
    back, sent_id = contribution_from_record(rd, "node 1")
    assert sent_id == c.id == back.id
    n = c.gram.shape[0]
    assert torch.equal(back.sums, c.sums) and torch.equal(back.calib, c.calib)
    # the Gram is its upper triangle, bit for bit (the lower one mirrors it: a BLAS product
    # can differ from its own transpose in the last bit, nothing more)
    assert torch.equal(back.gram, from_upper(upper(c.gram), n))
    assert torch.allclose(back.gram, c.gram, rtol=1e-13, atol=1e-15)
    assert torch.equal(back.scatter, from_upper(upper(c.scatter), n))        # the scatter likewise
    assert torch.allclose(back.scatter, c.scatter, rtol=1e-13, atol=1e-15) and float(back.scatter[-1, -1]) == 2
    assert torch.equal(back.votes, c.votes) and float(back.votes.sum()) > 0   # the shrink votes, as they are
    # the two upper triangles, fp64
    assert len(wire_bytes(rd)) < 8 * (n * (n + 1) + c.sums.numel() + c.seen.numel()) + 4096
    m = model_from_record(model_to_record(result.model))
    assert m.classes == result.model.classes and torch.equal(m.gram, result.model.gram)
    assert torch.equal(m.scatter, result.model.scatter) and torch.equal(m.votes, result.model.votes)
    assert m.counted == result.model.counted


def test_a_damaged_message_is_one_line(fleet):
    """If this fails, a truncated message crashes the hub's round instead of leaving that device out."""
    _, _, sent, _ = fleet
    rd = contribution_to_record(sent["b"])
    del rd["stats"]
    with pytest.raises(Refused, match="no readable statistics"):
        contribution_from_record(rd, "node 7")


@pytest.mark.parametrize("field", ["scatter", "votes"])
def test_a_message_without_the_scatter_or_the_votes_is_one_line(fleet, field):
    """If this fails, a contribution or a fleet version from a fieldlearn that sent no class
    scatter (or no shrink votes) crashes the round (a KeyError), or is read with it left out:
    its lda head would predict otherwise (another covariance, or another shrink)."""
    _, _, sent, result = fleet
    rd = contribution_to_record(sent["b"])
    del rd["stats"][field]
    with pytest.raises(Refused, match=rf"^device 'b': the message's statistics lack {field}") as e:
        contribution_from_record(rd, "node 7")
    assert "\n" not in str(e.value)
    rd = model_to_record(result.model)
    del rd["stats"][field]
    with pytest.raises(UserError, match=f"lack {field}"):
        model_from_record(rd)


def test_votes_of_another_length_are_one_line(fleet):
    """If this fails, a fleet version whose shrink votes are not one per SHRINK_GRID value (a
    fieldlearn with another grid) crashes the device's take instead of naming what is wrong."""
    from flwr.app import Array

    _, _, _, result = fleet
    rd = model_to_record(result.model)
    rd["stats"]["votes"] = Array(result.model.votes[:-1].numpy())
    with pytest.raises(UserError, match=r"votes \(6,\)") as e:
        model_from_record(rd)
    assert "\n" not in str(e.value)


def phi_patterns(student, images, cfg, label: str) -> list[Pattern]:
    """Each image's phi (what the statistics sum), as the float64 bytes the wire would carry
    and as float32 within tolerance."""
    from fieldlearn.device.data import ImageSet
    from fieldlearn.device.learner import classifier_features

    x = classifier_features(student, ImageSet(images, torch.zeros(len(images), dtype=torch.long), ["x"]), cfg)
    rows = list(range(len(x)))
    return [Pattern(f"phi float64 {label}", [r.numpy().tobytes() for r in x], rows),
            Pattern(f"phi float32 {label}", [r.float().numpy() for r in x], rows, "f32")]


def test_no_image_and_no_per_image_feature_goes_over_the_wire(fleet, data):
    """If this fails, a device sends something from which one of its images (pixels) or its
    feature vector (phi, or the pooled maps) can be read: the fleet's privacy promise
    (docs/GUARANTEES.md) is broken. The positive control: the same scan finds one planted phi."""
    dirs, _, sent, result = fleet
    blobs = [(f"contribution of {d}", wire_bytes(contribution_to_record(sent[d]))) for d in DEVICES]
    blobs.append(("the fleet's version", wire_bytes(model_to_record(result.model))))
    state = load_state(dirs["hub"])
    cfg = state.config
    patterns = []
    for d, plan in DEVICES.items():
        imgs = class_images(data, plan).images
        patterns += (pixel_patterns(imgs, cfg) + feature_patterns(state.student, imgs, cfg, d)
                     + phi_patterns(state.student, imgs, cfg, d))
    assert scan(blobs, patterns) == []
    planted = patterns[-2]                                                   # phi float64 of device c
    leak = ("planted", blobs[0][1][:1000] + planted.needles[3] + blobs[0][1][1000:])
    assert scan([leak], [planted]) == [(planted.name, 3, "planted")]
