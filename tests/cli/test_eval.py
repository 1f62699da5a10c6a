"""fieldlearn eval (fieldlearn.cli.commands.evaluate): what it prints for a state's steps."""

from __future__ import annotations

import json

import torch

from fieldlearn.cli.main import main
from fieldlearn.device.model import build_student
from fieldlearn.store.state import save_version
from tests.conftest import tiny_config, write_image_folder


def test_a_step_with_no_images_in_the_data_says_so_instead_of_nan(tmp_path, gen_test, capsys):
    """If this fails, `eval` prints `nan%` (or JSON's invalid `NaN`) for a step whose classes
    have no image in the data, instead of saying there is nothing to measure."""
    cfg = tiny_config()
    torch.manual_seed(0)
    names = [gen_test.class_names[c] for c in (3, 4)]
    state = tmp_path / "state"
    save_version(state, build_student(cfg.model, 2), names, cfg, 1,
                 [{"step": 0, "method": "base", "new_classes": names[:1]},
                  {"step": 1, "method": "none", "new_classes": names[1:]}])
    data = write_image_folder(tmp_path / "data", gen_test, [3], 6)     # images of step 0's class only
    assert main(["eval", "--state", str(state), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower(), out
    step1 = [ln for ln in out.splitlines() if "classes of step  1" in ln]
    assert len(step1) == 1 and "no images" in step1[0], out
    assert main(["eval", "--state", str(state), "--data", str(data), "--json"]) == 0
    raw = capsys.readouterr().out
    assert "NaN" not in raw, raw
    per = json.loads(raw)["per_step"]
    assert per[1]["accuracy"] is None and 0 <= per[0]["accuracy"] <= 1
