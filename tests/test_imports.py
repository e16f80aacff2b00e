"""Importing the package and rejecting a command's bad flags do not wait for TensorFlow (seconds, log noise)."""

import json
import subprocess
import sys

import pytest

PROBE = """
import json, runpy, sys
sys.argv = {argv!r}
code = None
if len(sys.argv) > 1:
    try:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
else:
    import tfcompress, tfcompress.demo, tfcompress.export
print(json.dumps({{"code": code, "tensorflow": "tensorflow" in sys.modules}}))
"""


def _probe(argv: list[str]) -> tuple[dict, subprocess.CompletedProcess]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def test_import_is_lazy_and_names_resolve_on_use():
    result, proc = _probe(["import"])
    assert result["tensorflow"] is False, proc.stderr[-2000:]
    import tfcompress

    assert set(tfcompress.__all__) <= set(dir(tfcompress))
    assert callable(tfcompress.strip) and tfcompress.pruning.FilterPruning.__name__ == "FilterPruning"
    # the README's calls after a bare `import tfcompress`
    assert callable(tfcompress.quantization.quantize_model) and callable(tfcompress.export.to_onnx)
    assert callable(tfcompress.calibration.calibrate)
    import tfcompress.stripping.savedmodel_strip  # noqa: F401  (a subpackage import must not shadow strip())

    assert callable(tfcompress.strip)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tfcompress.nope


@pytest.mark.parametrize("argv, code, message", [
    (["tfcompress.demo", "--target=1.5", "--output_dir=/nonexistent/x"], 2, "--target must be in (0, 1)"),
    (["tfcompress.demo", "--epochs=0"], 2, "--epochs must be a whole number in 1..10000, got 0"),
    # beyond what TensorFlow's step counters hold: a traceback after TensorFlow had loaded
    (["tfcompress.demo", "--epochs=99999999999999999999999"], 2, "--epochs must be a whole number in 1..10000"),
    (["tfcompress.demo", "--seed=-1"], 2, "--seed must be a whole number in 0..4294967295"),
    (["tfcompress.demo", "--seed=4294967296"], 2, "--seed must be a whole number in 0..4294967295"),
    (["tfcompress.export", "--saved_model_dir=a", "--output_dir=b", "--opset=3"], 2, "--opset must be in 13..18"),
    (["tfcompress.export", "--saved_model_dir=a", "--output_dir=b"], 2, "SavedModel directory 'a' does not exist"),
    (["tfcompress.export", "--saved_model_dir=a", "--output_dir=b", "--nope"], 2, "Unknown command line flag"),
    (["tfcompress.export", "--help"], 0, "--calibration_data"),
])
def test_commands_reject_bad_flags_before_importing_tensorflow(argv, code, message):
    result, proc = _probe(argv)
    assert result == {"code": code, "tensorflow": False}, proc.stderr[-2000:]
    assert message in (proc.stderr if code else proc.stdout)


def test_openvino_telemetry_is_off_unless_the_user_opts_in():
    code = ("import tfcompress, openvino\n"
            "from openvino.tools.ovc import telemetry_utils\n"
            "print(telemetry_utils.tm.__name__)\n")
    for env, expected in (({}, "openvino.tools.ovc.telemetry_stub"), ({"TFCOMPRESS_OPENVINO_TELEMETRY": "1"},
                                                                    "openvino_telemetry")):
        import os

        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, **env))
        assert proc.stdout.strip().splitlines()[-1] == expected, proc.stderr[-2000:]
