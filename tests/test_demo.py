"""The demo, run the way the README tells a new user to run it (with one epoch per stage; the README's install
part is the test environment's own)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def readme_demo_command() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- demo-command -->\s*```\s*\n(.+?)\n```\s*<!-- /demo-command -->", readme, re.S)
    assert block, "README.md must give the demo command between <!-- demo-command --> markers"
    return block.group(1).strip()


def run(command: str, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900, **kw)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    install, command = (part.strip() for part in readme_demo_command().split("&&"))
    # the install is the README's; the test environment already holds it (the demo extra is part of the test
    # extra, tests/test_repository.py), and tests install nothing
    assert install == 'python -m pip install -e ".[demo]"' and command == "python -m tfcompress.demo"
    proc = run(f"{command} --epochs 1 --output_dir {out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_writes_report_plots_and_artifacts(demo):
    out, stdout = demo
    assert f"wrote {out}" in stdout
    assert "| FLOPs |" in stdout  # the table is printed
    for png in ("filters.png", "training.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![filters per layer](filters.png)" in report and "| latency b1, INT8 (ms) |" in report
    for d in ("original", "pruned_float", "compressed"):
        assert (out / d / "model_fp32.xml").exists() and (out / d / "model.onnx").exists()
    assert (out / "compressed" / "model_int8.xml").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tfcompress-")]  # no temp dir left


def test_demo_numbers_hold_together(demo):
    import keras
    import numpy as np
    import openvino as ov

    from tfcompress import calibration
    from tfcompress.demo import workload

    out, _ = demo
    s = json.loads((out / "summary.json").read_text())
    # target 0.5 of every group's filters: about a quarter of the FLOPs remain
    assert s["flops"]["compressed"] < 0.35 * s["flops"]["original"]
    assert s["params"]["compressed"] < 0.5 * s["params"]["original"]
    assert s["ir_bytes"]["compressed_int8"] < s["ir_bytes"]["original_fp32"] / 2
    assert s["filters"]["compressed"]["block2_conv2"] == 32
    assert len(s["history"]["pruning"]["flops_ratio"]) == 1 and "pruning_level" in s["history"]["pruning"]
    speed = s["speed"]
    assert len(speed) == 6 and all(v["b1_ms"] > 0 and v["b32_ips"] > 0 for v in speed.values())

    # re-measure what the summary says from the written artifacts
    _, _, xt, yt = workload.digits()
    import tfcompress.quantization  # noqa: F401  registers the QAT layers, as a user's script must before loading

    small = keras.models.load_model(out / "models" / "compressed_qat_stripped.keras")
    keras_acc = float(np.mean(np.argmax(small.predict(xt, verbose=0), 1) == yt))
    assert keras_acc == pytest.approx(s["accuracy"]["compressed_stripped"], abs=1e-6)
    compiled = ov.Core().compile_model(str(out / "compressed" / "model_int8.xml"), "CPU")
    assert calibration.int8_layers(compiled) == s["int8_layers"]["compressed"]
    assert s["int8_layers"]["compressed"]["int8"] == s["int8_layers"]["compressed"]["total"] == 10
    # in batches of 256 as the export measured it: on a CPU without VNNI, INT8 kernels chosen for another batch
    # size can round (saturate) differently
    out = np.concatenate([compiled({0: xt[i:i + 256]})[compiled.outputs[0]] for i in range(0, len(xt), 256)])
    ov_acc = float(np.mean(np.argmax(out, 1) == yt))
    assert ov_acc == pytest.approx(s["accuracy"]["compressed_openvino_int8"], abs=1e-6)
    assert abs(ov_acc - keras_acc) <= 0.02  # INT8 in OpenVINO vs the QAT model in Keras


def test_demo_refuses_a_foreign_output_dir_and_bad_flags(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run(f"{sys.executable} -m tfcompress.demo --epochs 1 --output_dir {foreign}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: output directory")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    proc = run(f"{sys.executable} -m tfcompress.demo --target 1.5 --output_dir {tmp_path / 'x'}")
    assert proc.returncode == 2 and "--target must be in (0, 1)" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_demo_help_usage_names_every_flag():
    proc = run(f"{sys.executable} -m tfcompress.demo --help")
    assert proc.returncode == 0, proc.stderr
    usage = proc.stdout.strip().splitlines()[0]
    for flag in ("--epochs", "--target", "--output_dir", "--seed"):
        assert flag in usage, usage
