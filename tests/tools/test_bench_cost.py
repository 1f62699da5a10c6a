"""fieldlearn bench cost: end to end on a tiny config, output schema, the naive LwM baseline.

No timing is asserted (the machine is shared); what is checked is that every number the
report promises is there, and that the baseline computes the same loss as ours.
"""

from __future__ import annotations

import json

import torch

from tests.conftest import tiny_config, write_image_folder

TINY = ["--width", "0.35", "--variant", "cifar", "--input-size", "32", "--no-pretrained", "--freeze-blocks", "10",
        "--batch-size", "16", "--epochs", "1"]


def test_naive_lwm_computes_the_same_loss_as_ours():
    """The naive baseline (hooks, autograd Grad-CAM, teacher per batch) must compute LwM's
    loss, or the cost comparison compares different things. With dropout off, Grad-CAM by
    autograd equals the closed form, so the losses match."""
    from fieldlearn.tools.profile.harness import StepHarness, StepSpec

    cfg = tiny_config()
    cfg.model.dropout = 0.0
    cfg.teacher_backend = "torch"
    ours = StepHarness(StepSpec(cfg, "lwm", n_old=5, n_new=3))
    naive = StepHarness(StepSpec(cfg, "naive_lwm", n_old=5, n_new=3))
    torch.testing.assert_close(ours.z, naive.z)
    assert torch.equal(ours.labels, naive.labels)
    a = ours._loss()
    b = naive.naive_step.loss(naive.z)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    b.backward()                       # the double backward runs and reaches the top blocks
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in naive.student.top.parameters())


def test_bench_cost_end_to_end_writes_the_promised_report(tmp_path, gen_train, capsys):
    """`fieldlearn bench cost` on a tiny config: every method timed and measured, the
    teacher backends listed (TensorRT as unavailable here), a whole increment timed by
    phase, the targets evaluated, JSON and markdown written. (The increment's images are
    generated ones, given with --data: no accuracy is measured.)"""
    from fieldlearn.cli.main import main

    data = write_image_folder(tmp_path / "data" / "train", gen_train, [0, 1], 6).parent
    out = tmp_path / "cost"
    rc = main(["bench", "cost", "--out", str(out), "--repeats", "2", "--warmup", "1", "--old-classes", "4",
               "--new-classes", "2", "--per-class", "6", "--methods", "finetune,lwm,naive_lwm", "--method", "lwm", "--data", str(data),
               *TINY])
    assert rc == 0
    report = json.loads((out / "cost.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["finetune", "lwm", "naive_lwm"]
    for r in report["rows"]:
        for key in ("step_s", "step_plus_precompute_s", "step_x_finetune", "step_peak_bytes", "step_peak_x_finetune"):
            assert r[key] > 0, (r["method"], key)
    assert report["rows"][0]["step_x_finetune"] == 1.0
    assert set(report["memory"]) == {"finetune", "lwm", "naive_lwm"}
    assert all(m["meter"] == "cpu" for m in report["memory"].values())
    teachers = report["precompute"]["teacher"]
    assert teachers["torch"]["available"] and teachers["torch"]["s_per_image"] > 0
    assert report["precompute"]["encode"]["onnxruntime"]["s_per_image"] > 0
    assert "available" in teachers["tensorrt"]
    inc = report["time_to_learn"]
    assert set(inc["phases_s"]) == {"read", "encode", "setup", "teacher", "train", "classifier", "eval", "fold in",
                                    "export", "save", "other"}
    # --method lwm: the timed increment trains, with a teacher (the default, none, does neither)
    assert inc["method"] == "lwm" and inc["phases_s"]["train"] > 0 and inc["teacher_backend"]
    assert inc["phases_s"]["encode"] > 0 and inc["phases_s"]["eval"] > 0     # the trunk ran; the held-out check ran
    assert inc["n_train"] + inc["n_val"] == 2 * 6 and inc["total_s"] > 0
    assert {t["target"].split(" ")[0] for t in report["targets"]} == {"LwM"}
    md = (out / "cost.md").read_text()
    assert "| LwM (ours) |" in md and "Time to learn" in md
    assert "| fine-tuning |" in capsys.readouterr().out
