"""The one validator (fieldlearn.device.validate) and the publish gate (fieldlearn.store.publish).

Every config field declares what it accepts; each declared bound is enforced on the command
line and in a saved state's meta.json; a step that did not train is never published.
"""

from __future__ import annotations

import ast
import dataclasses
import json

import pytest
import torch

from fieldlearn.cli.main import main
from fieldlearn.device.config import VALID, LossConfig, ModelConfig, RunConfig, TrainConfig
from fieldlearn.device.learner import StepReport
from fieldlearn.device.model import build_student
from fieldlearn.store.publish import NotTrained, check_trained, publish
from fieldlearn.store.state import save_version
from fieldlearn.device.validate import check_field, undeclared_fields, validate_config
from fieldlearn.runtime.errors import UserError
from fieldlearn.runtime.layout import current_version_name
from tests.conftest import ROOT, tiny_config, write_image_folder
from tests.cli.test_bad_input import refused, tree_hash

SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
LEARN = ["--no-progress", "--epochs", "1", "--batch-size", "8", "--teacher-backend", "torch", "--no-export",
         "--num-threads", "1"]


def test_every_config_field_declares_its_valid_values():
    """If this fails, a config field (e.g. one added by a later change) has no declared range
    or choices, so nothing stops a nonsense value of it: add it to config.VALID."""
    assert undeclared_fields() == []


def test_the_method_choices_are_the_registered_methods():
    """If this fails, --method accepts a name no method answers to (or refuses a real one)."""
    from fieldlearn.device.methods import METHODS

    assert set(VALID[RunConfig]["method"].choices) == set(METHODS)


def test_shipped_configs_are_valid():
    """If this fails, a default, the demo's config, a benchmark preset or a method's shipped
    settings would be refused by the validator (or never were checked)."""
    from fieldlearn.tools.bench_accuracy import PRESETS, SWEEP_STAGES
    from fieldlearn.field.demo import DEMO_CONFIG
    from fieldlearn.device.protocol import CHOSEN, apply_settings

    validate_config(RunConfig())
    validate_config(DEMO_CONFIG)
    for preset in PRESETS.values():
        cfg = RunConfig(model=ModelConfig(**preset["model"]), train=TrainConfig(**preset["train"]))
        for settings in (row for table in CHOSEN.values() for row in table.values()):
            validate_config(apply_settings(cfg, settings))
        for stage in SWEEP_STAGES:          # every value a sweep may try
            for key, values in stage.items():
                for v in values:
                    validate_config(apply_settings(cfg, {key: v}))


def _bounds():
    """(section, field, value just outside, value on the bound) for every declared numeric bound."""
    out = []
    for section, klass in SECTIONS.items():
        hints = {f.name: f.type for f in dataclasses.fields(klass)}
        for name, v in VALID[klass].items():
            if v.choices or v.pattern:
                continue
            is_int = "int" in str(hints[name]) and "float" not in str(hints[name])
            step = 1 if is_int else 1e-9 * max(1.0, abs(v.lo or 0), abs(v.hi or 0))
            for bound, sign, is_open in ((v.lo, -1, v.lo_open), (v.hi, 1, v.hi_open)):
                if bound is None:
                    continue
                inside = None if is_open else bound
                outside = bound if is_open else bound + sign * step
                out.append((section, name, int(outside) if is_int else outside, inside))
    return out


@pytest.mark.parametrize("section,name,outside,inside", _bounds())
def test_each_declared_bound_is_enforced_on_the_command_line(section, name, outside, inside):
    """If this fails, a declared range is not what the CLI enforces (a bound off by one, or an
    open end accepted): the value just outside must be refused naming the flag and the range."""
    klass = SECTIONS[section]
    value = (outside,) * 3 if name in ("mean", "std") else outside
    assert check_field(klass, name, value) is not None
    cfg = RunConfig()
    setattr(getattr(cfg, section), name, value)
    cfg.model.pretrained = cfg.model.width == 1.0      # (a width other than 1.0 needs --no-pretrained)
    with pytest.raises(UserError, match=f"^--{name.replace('_', '-')} .*: must be "):
        validate_config(cfg)
    if inside is not None:
        assert check_field(klass, name, (inside,) * 3 if name in ("mean", "std") else inside) is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "3", None])
def test_non_numbers_and_non_finite_values_are_refused(value):
    """If this fails, NaN (every comparison false), inf, a bool or a string slips through a range check."""
    assert check_field(TrainConfig, "lr", value) is not None


def test_cross_field_rule_pretrained_needs_width_1():
    """If this fails, --width 0.5 with ImageNet weights ends in a ValueError traceback."""
    cfg = RunConfig()
    cfg.model.width = 0.5
    with pytest.raises(UserError, match="--width: 0.5 needs --no-pretrained"):
        validate_config(cfg)


@pytest.fixture
def state(tmp_path):
    cfg = tiny_config()
    torch.manual_seed(0)
    d = tmp_path / "state"
    save_version(d, build_student(cfg.model, 2), ["apple", "pear"], cfg, 0,
                 [{"step": 0, "method": "base", "new_classes": ["apple", "pear"]}])
    return d


@pytest.fixture
def new_folder(tmp_path, gen_test):
    return write_image_folder(tmp_path / "new", gen_test, [20], 6)


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "-3"], ["--batch-size", "0"], ["--batch-size", "-8"],
                                  ["--lr", "-1"], ["--device", "tpu"], ["--lr", "nan"], ["--momentum", "1"]])
def test_learn_with_bad_numbers_exits_2_and_current_is_unchanged(state, new_folder, capsys, argv):
    """If this fails, `fieldlearn learn --epochs 0` (issue 14 item 1) trains nothing and
    publishes the untrained model as current, or a bad number ends in a traceback."""
    before = tree_hash(state)
    rc = main(["learn", str(new_folder), "--state", str(state), *LEARN, *argv])
    refused(rc, capsys.readouterr().err, argv[0])
    assert tree_hash(state) == before and current_version_name(state) == "0001"


def test_a_bad_value_in_a_saved_config_is_one_line_naming_the_file(state, new_folder, capsys):
    """If this fails, a state saved with epochs 0 (as fieldlearn < 0.2 could) is trained from
    again, or crashes; the message must name the meta.json and the field, and a valid value
    on the command line does not hide the broken file."""
    meta = state / "versions" / "0001" / "meta.json"
    d = json.loads(meta.read_text())
    d["config"]["train"]["epochs"] = 0
    meta.write_text(json.dumps(d))
    before = tree_hash(state)
    rc = main(["learn", str(new_folder), "--state", str(state), *LEARN])
    line = refused(rc, capsys.readouterr().err, meta, "config.train.epochs 0", "[1, 10000]")
    assert "Traceback" not in line and tree_hash(state) == before


def test_check_trained_refuses_a_step_that_did_not_train():
    """If this fails, a step with an epoch of no optimiser step, or with NaN weights, is
    published (the gate is the last line before `current` moves)."""
    student = build_student(tiny_config().model, 2)
    ok = StepReport(step=1, method="lwm", n_old=1, n_new=1, n_images=8, optimizer_steps=[1, 2])
    check_trained(ok, 2, student)
    with pytest.raises(NotTrained, match="ran 1 of 2 epochs"):
        check_trained(StepReport(1, "lwm", 1, 1, 8, optimizer_steps=[1]), 2, student)
    with pytest.raises(NotTrained, match="epoch 1 made no optimiser step"):
        check_trained(StepReport(1, "lwm", 1, 1, 1, optimizer_steps=[1, 0]), 2, student)
    with pytest.raises(NotTrained, match="ran 0 of 0 epochs"):
        check_trained(StepReport(1, "lwm", 1, 1, 8), 0, student)
    with torch.no_grad():
        student.head.weight[0, 0] = float("nan")
    with pytest.raises(NotTrained, match="head.weight are not finite"):
        check_trained(ok, 2, student)


def test_publish_refuses_before_writing_anything(state):
    """If this fails, the gate runs after the version is written (a refused step leaves a
    version behind, or moves `current`)."""
    before = tree_hash(state)
    student = build_student(tiny_config().model, 2)
    with pytest.raises(NotTrained):
        publish(state, student, ["apple", "pear"], tiny_config(), step=1, history=[], epochs=1,
                report=StepReport(1, "lwm", 2, 0, 4, optimizer_steps=[0]))
    assert tree_hash(state) == before


def test_product_code_saves_versions_only_through_the_gate():
    """If this fails, some command (init, learn, watch, ...) calls save_version directly and
    can publish a step the gate would refuse. (bench cost writes an untrained base state to
    time an increment on: a benchmark tool in fieldlearn.tools, outside the product.)"""
    callers = []
    for folder in ("cli", "device", "store", "field", "export", "runtime"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "save_version":
                    callers.append(str(path.relative_to(ROOT)))
    assert callers == ["store/publish.py"], callers


def test_init_refuses_a_state_with_versions_and_learn_points_at_rollback(state, tmp_path, new_folder, capsys):
    """If this fails, a state whose `current` went missing tells the user to run init, init
    publishes a new base model over the learned versions, and a later prune deletes them
    (issue 14 item 6). The advice must be `fieldlearn rollback --to N`; init must refuse."""
    (state / "current").unlink()
    before = tree_hash(state)
    rc = main(["learn", str(new_folder), "--state", str(state), *LEARN])
    refused(rc, capsys.readouterr().err, "fieldlearn rollback", "--to 1")
    rc = main(["init", "--data", str(new_folder), "--state", str(state), "--no-pretrained", "--width", "0.35"])
    refused(rc, capsys.readouterr().err, "already holds versions", "--force")
    assert tree_hash(state) == before
    assert main(["rollback", "--state", str(state), "--to", "1"]) == 0
    assert current_version_name(state) == "0001"


def test_init_under_an_unwritable_place_is_one_line(tmp_path, new_folder, capsys):
    """If this fails, `init --state` under a file (or a read-only parent) is a traceback."""
    (tmp_path / "file").write_text("x")
    rc = main(["init", "--data", str(new_folder), "--state", str(tmp_path / "file" / "state")])
    refused(rc, capsys.readouterr().err, tmp_path / "file" / "state")


def test_each_knob_declares_its_help_and_range_in_one_place():
    """If this fails, a config field lost its help (the CLI shows a bare default), or its
    valid values live somewhere else than its declaration again: config.VALID is read from
    the fields' metadata, and the CLI help shows the declared help and range."""
    import argparse
    import dataclasses

    from fieldlearn.cli.flags import add_config_arguments
    from fieldlearn.device.config import StepOptions, help_of

    for klass in (ModelConfig, LossConfig, TrainConfig, RunConfig, StepOptions):
        for f in dataclasses.fields(klass):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                continue
            assert help_of(klass, f.name), f"{klass.__name__}.{f.name} declares no help"
            if f.name in VALID[klass]:
                assert f.metadata["valid"] is VALID[klass][f.name]
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    text = " ".join(p.format_help().split())
    assert f"{help_of(TrainConfig, 'epochs')} (an integer in [1, 10000]; default: 6)" in text


def test_presets_and_grids_name_config_fields_only():
    """If this fails, protocol.CHOSEN or bench_accuracy.SWEEP_STAGES holds a key that is no
    config field (a typo sweeps nothing), or restates a range or help instead of values."""
    import dataclasses

    from fieldlearn.device.protocol import CHOSEN
    from fieldlearn.tools.bench_accuracy import SWEEP_STAGES

    names = {f.name for k in (ModelConfig, LossConfig, TrainConfig, RunConfig) for f in dataclasses.fields(k)}
    for settings in [*(row for table in CHOSEN.values() for row in table.values()), *SWEEP_STAGES]:
        assert set(settings) <= names, set(settings) - names
        values = [x for v in settings.values() for x in (v if isinstance(v, list) else [v])]
        assert all(isinstance(x, (bool, int, float, str)) for x in values), settings
