"""`fieldlearn doctor`: one screen that says what the device has, what fieldlearn will use,
and the command that fixes each missing piece; exit status 1 when a required one is missing."""

from __future__ import annotations

import json
import sys

import pytest

from fieldlearn.cli.main import main
from fieldlearn.field import doctor


def fake_state(root, classes=("apple", "pear"), step=1, onnx=True):
    vd = root / "versions" / "0002"
    vd.mkdir(parents=True)
    (vd / "meta.json").write_text(json.dumps({"format": 1, "classes": list(classes), "step": step}))
    if onnx:
        (vd / "model.onnx").write_bytes(b"onnx")
    (root / "current").write_text("0002\n")
    return root


def test_doctor_reports_this_machine(tmp_path, capsys):
    """If this fails, doctor misses a line the field needs or fails on a healthy dev box."""
    state = fake_state(tmp_path / "state")
    assert main(["doctor", "--state", str(state), "--no-compile"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "numpy", "Pillow", "safetensors", "onnxruntime", "torch", "GPU", "NVRTC",
                 "TensorRT", "ORT providers", "memory", "state"):
        assert f"  {name} " in out, f"no {name} line:\n{out}"
    assert "CPUExecutionProvider" in out and "GiB available of" in out
    assert f"{state}: version 0002, step 1, 2 classes, serves model.onnx" in out
    assert out.rstrip().endswith("ready") and "uses: training on" in out


def test_doctor_json_and_state_from_environment(tmp_path, capsys, monkeypatch):
    """If this fails, scripts cannot read doctor, or $FIELDLEARN_STATE is ignored."""
    monkeypatch.setenv("FIELDLEARN_STATE", str(tmp_path / "nowhere"))
    assert main(["doctor", "--json", "--no-compile"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["state_dir"] == str(tmp_path / "nowhere")
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["torch"]["ok"] and checks["torch"]["required"]
    assert checks["state"]["detail"].endswith("no model yet") and "fieldlearn init" in checks["state"]["fix"]


def test_missing_required_package_fails_with_its_fix(tmp_path, capsys, monkeypatch):
    """If this fails, a device without a required package is reported ready."""
    monkeypatch.setitem(sys.modules, "safetensors", None)        # import safetensors -> ImportError
    assert main(["doctor", "--state", str(tmp_path), "--no-compile"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if " safetensors " in x)
    assert line.lstrip().startswith("!!") and "not installed" in line
    assert "-m pip install safetensors" in out and "NOT READY: missing safetensors" in out


def test_kernel_compile_check_without_gpu(tmp_path, capsys):
    """If this fails, doctor does not prove the fused kernel compiles for the Jetson target."""
    from fieldlearn.device.ops import cuda_attention as ca

    try:
        ca.nvrtc_version()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"NVRTC unavailable here: {e}")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: doctor compiles for its arch instead (covered by the GPU check)")
    assert main(["doctor", "--state", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "NVRTC + kernel" in x)
    assert line.lstrip().startswith("ok") and "compiles for sm_87" in line


def test_jetson_is_recognised_and_never_sent_to_pypi_torch(tmp_path):
    """If this fails, doctor on a Jetson would tell the user to install PyPI's (CPU) torch."""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: Mon May  6 17:34:21 UTC 2024\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    info = doctor.jetson_info(tmp_path)
    assert info == {"model": "NVIDIA Jetson AGX Orin Developer Kit", "l4t": "R36.3.0", "l4t_major": "36"}
    assert doctor.jetpack_of(info["l4t_major"]) == "JetPack 6"
    fix = doctor.torch_fix(info)
    assert "jetson-ai-lab" in fix and "jp6/cu126" in fix and "2.14.1" not in fix
    assert doctor.jetson_info(tmp_path / "not-a-jetson") is None


def test_a_state_with_versions_but_no_current_is_sent_to_rollback_not_init(tmp_path):
    """If this fails, doctor tells the owner of a state whose `current` went missing to run
    `fieldlearn init`, which starts a new base model over the learned versions (issue 14)."""
    state = tmp_path / "state"
    (state / "versions" / "0003").mkdir(parents=True)
    check = doctor.check_state(state)
    assert check.ok is False and "fieldlearn rollback" in check.detail and "--to 3" in check.detail, check
    assert "init" not in (check.fix or "")
    assert doctor.check_state(tmp_path / "empty").fix.startswith("fieldlearn init")
