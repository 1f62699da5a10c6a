"""init -> learn -> eval on real CIFAR-100 classes, through the CLI.

LwM must keep more of the old classes than fine-tuning after one increment, measured
on real test images with a fixed seed. If this fails, the distillation terms are not
doing their job (e.g. LAD/LD lost their gradient, or the teacher is the student).
"""

import json
import shutil

import pytest

from fieldlearn.cli.main import main
from tests.conftest import write_image_folder

BASE, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]   # positions in a seeded class order
COMMON = ["--no-progress", "--num-threads", "1"]


@pytest.mark.slow
def test_lwm_keeps_old_classes_better_than_finetuning(tmp_path, cifar_train, cifar_test, capsys):
    from fieldlearn.device.data import class_order

    order = class_order(100, 1993)
    base = [order[i] for i in BASE]
    new = [order[i] for i in NEW]
    write_image_folder(tmp_path / "base" / "train", cifar_train, base, 100)
    write_image_folder(tmp_path / "base" / "test", cifar_test, base, 100)
    write_image_folder(tmp_path / "new", cifar_train, new, 100)

    state = tmp_path / "state"
    assert main(["init", "--data", str(tmp_path / "base"), "--state", str(state), "--variant", "cifar",
                 "--input-size", "32", "--freeze-blocks", "14", "--base-epochs", "6", *COMMON]) == 0
    states = {}
    for method in ("finetune", "lwm"):
        states[method] = tmp_path / f"state-{method}"
        shutil.copytree(state, states[method])
        assert main(["learn", str(tmp_path / "new"), "--state", str(states[method]), "--method", method,
                     "--epochs", "6", "--teacher-backend", "torch", *COMMON]) == 0
    capsys.readouterr()
    old_acc = {}
    for method, st in states.items():
        assert main(["eval", "--state", str(st), "--data", str(tmp_path / "base"), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["classes_known"] == 10 and result["classes_evaluated"] == 5
        old_acc[method] = result["per_step"][0]["accuracy"]
    print(old_acc)
    assert old_acc["lwm"] > old_acc["finetune"], old_acc
