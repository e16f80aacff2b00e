"""tfcompress: filter pruning, QAT, stripping, ONNX/OpenVINO export and INT8 calibration for Keras 3."""

from setuptools import find_packages, setup

setup(
    name="tfcompress",
    version="0.1.0",
    description="Make TensorFlow/Keras models small and fast for CPU inference without leaving model.fit",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tfcompress", "tfcompress.*"]),
    package_data={"tfcompress": ["configs/*.json"]},  # load_config("resnet8_flops40")
    # lower bounds: the oldest releases the tests pass with, pinned together in .ci/minimum-versions.txt
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.9",  # keras.layers.RMSNormalization
        "tf2onnx>=1.16",
        "onnx>=1.15",
        "openvino>=2025.0",  # import openvino.opset13 (2024.x has it only as openvino.runtime.opset13)
        "numpy>=1.26",
        "absl-py>=1.0",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3.2", "onnxruntime>=1.17", "scikit-learn>=1.3", "matplotlib>=3.7",
                 "tensorboard>=2.16"],  # the TensorBoard callback (TensorFlow 2.21 no longer installs it)
        "demo": ["scikit-learn>=1.3", "matplotlib>=3.7"],
        # the TFX release for TensorFlow 2.21; its wheels need glibc >= 2.39 (see README)
        "tfx": ["tfx>=1.21,<1.22"],
    },
    license="Apache-2.0",
)
