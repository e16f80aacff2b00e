"""``python -m tfcompress.demo [--epochs N] [--target F] [--output_dir DIR] [--seed S]``."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 8, "Epochs of float training and of pruning fine-tuning (QAT: a quarter).")
flags.DEFINE_float("target", 0.5, "Fraction of every group's filters to remove, in (0, 1).")
flags.DEFINE_string("output_dir", "tfcompress_demo", "Where to write report.md, plots, models and IRs (replaced "
                    "if it holds an earlier demo output, refused if it holds anything else).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; use --flag=value", file=sys.stderr)
        return 2
    from tfcompress._cli import import_tensorflow_quietly
    from tfcompress.demo.options import check_args
    from tfcompress.errors import ExportError

    check_args(FLAGS.output_dir, FLAGS.epochs, FLAGS.target, FLAGS.seed)  # before TensorFlow's seconds-long import
    try:
        import_tensorflow_quietly()
        from tfcompress.demo.run import run_demo
    except ImportError as e:  # the demo's extras (scikit-learn, matplotlib) are not installed
        raise ExportError(f"{e}; install the demo with: python -m pip install \"tfcompress[demo]\"") from None
    run_demo(FLAGS.output_dir, epochs=FLAGS.epochs, target=FLAGS.target, seed=FLAGS.seed)
    return 0


if __name__ == "__main__":
    from tfcompress._cli import run

    run(main)
