"""The fleet every test here starts from (tests/fleet/fleet_setup.py), built once per session:
tests that change a state work on a copy."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def data():
    from tests.fleet.fleet_setup import fleet_data

    return fleet_data()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory, data):
    """(dirs, the hub's base before any merge, {device: its contribution}, the round's result):
    the fleet of fleet_setup after one merge of its three devices into the hub."""
    from fieldlearn.fleet.contribution import make_contribution
    from fieldlearn.fleet.merge import merge_round
    from tests.fleet.fleet_setup import DEVICES, make_fleet

    root = tmp_path_factory.mktemp("fleet")
    dirs = make_fleet(root, data)
    pristine = root / "hub-base"
    shutil.copytree(dirs["hub"], pristine)
    sent = {d: make_contribution(dirs[d], d) for d in DEVICES}
    result = merge_round(dirs["hub"], [(c, c.id) for c in sent.values()], export=False, log=lambda s: None)
    return dirs, pristine, sent, result
