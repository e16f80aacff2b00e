"""What the ``python -m tfcompress.*`` commands share: flag parsing, quiet start-up, one-line errors.

A command's output belongs to its user: flag errors, bad input, a full disk or Ctrl-C end with one line on
stderr and a documented exit code (2: the user's input or environment; 130: interrupted; 143: terminated;
141: its standard output was closed, as by ``| head``), never a Python traceback; TensorFlow's and tf2onnx's
start-up and deprecation chatter is filtered out. A BrokenPipeError from a pipe or socket the command opened
itself (not its standard output or error) is an error of exit code 2 like other OSErrors.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
from typing import Callable, Iterator

__all__ = ["Terminated", "import_tensorflow_quietly", "run"]

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")

# Lines TensorFlow's native code writes to stderr at start-up on a CPU-only machine: not the user's business.
_NOISE = re.compile(r"absl::InitializeLog|oneDNN custom operations|cuda|cuInit|CUDA|TensorRT|TF-TRT|cuDNN|cuFFT|"
                    r"cuBLAS|computation placer|This TensorFlow binary is optimized|rebuild TensorFlow with")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup (staging directories) runs as for Ctrl-C."""


# the signals received, as exit codes: an interrupt that reaches TensorFlow's native code while it builds a
# graph comes back as another exception (a pybind11 RuntimeError, a graph-nesting AssertionError), so the
# exception alone cannot tell that the user stopped the command
_signalled: list[int] = []


def _interrupt(signum, frame) -> None:
    _signalled.append(130)
    raise KeyboardInterrupt()


def _terminate(signum, frame) -> None:
    _signalled.append(143)
    raise Terminated()


def _install_signal_handlers() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores SIGINT
        signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _terminate)


def _error_code(e: BaseException) -> int | None:
    """Print the one line for ``main``'s exception ``e`` and return the exit code; None for a bug's."""
    from tfcompress.errors import ExportError
    from tfcompress.output_dir import describe_os_error

    if _signalled or isinstance(e, (KeyboardInterrupt, Terminated)):
        code = _signalled[0] if _signalled else 143 if isinstance(e, Terminated) else 130
        print(f"error: {'interrupted' if code == 130 else 'terminated'}; nothing was written", file=sys.stderr)
        return code
    if isinstance(e, BrokenPipeError) and _standard_stream_closed():
        with contextlib.suppress(OSError):  # standard error may be the stream that closed
            print("error: standard output was closed before the command finished", file=sys.stderr)
        _stdout_closed()
    if isinstance(e, BrokenPipeError):  # a pipe or socket of the command's own, not its output
        print(f"error: a pipe or connection the command wrote to was closed by its reader ({describe_os_error(e)})",
              file=sys.stderr)
        return 2
    if isinstance(e, ExportError):
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    if isinstance(e, OSError):
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    return None


@contextlib.contextmanager
def _native_stderr_filtered() -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 meanwhile; replay the lines that are not noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            for line in buf.read().decode(errors="replace").splitlines():
                if line.strip() and not _NOISE.search(line):
                    print(line, file=sys.stderr)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and initialise its devices with the start-up lines filtered; silence deprecations."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()
    tf.get_logger().setLevel("ERROR")  # tf2onnx's calls of TF 1 APIs log deprecation warnings
    from absl import logging

    logging.set_verbosity(logging.ERROR)


def _standard_stream_closed() -> bool:
    """Whether the reader of standard output or standard error has gone (a pipe's write end whose read end is
    closed polls as an error; a socket whose peer left, as hung up), so that a BrokenPipeError came from them
    and not from a pipe or socket the command opened itself."""
    import select

    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced by an object without a file descriptor
            continue
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
            return True
    return False


def _stdout_closed() -> None:
    """Exit 141 (as a process killed by SIGPIPE) once the reader of standard output has gone, as after
    ``--help | head``: what is still buffered goes to /dev/null, so the exit cannot fail on it."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(141)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run(main: Callable[[list[str]], int]) -> None:
    """Parse absl flags and call ``main(argv)``; exit with its code, or with one error line.

    Exit codes: ``main``'s own; 0 after ``--help``; 2 for a flag error, an :class:`ExportError` or an
    ``OSError`` (disk full, permission denied ...); 130 on Ctrl-C and 143 on SIGTERM (whatever exception the
    signal became in native code); 141 when standard output is closed (after one line on stderr, silently
    after ``--help``).
    """
    from absl import app, flags

    app.define_help_flags()  # --help, --helpshort, --helpfull (app.run would define them)

    _install_signal_handlers()  # before the flags are parsed: that can take a while too (a --flagfile)
    if any(a in _HELP for a in sys.argv[1:]):
        code = 0
        try:
            flags.FLAGS(sys.argv)
        except SystemExit as e:  # absl exits 1 after printing the help it was asked for
            code = 0 if e.code in (0, 1) else e.code
        except BrokenPipeError:
            _stdout_closed()
        except (KeyboardInterrupt, Terminated) as e:
            code = _error_code(e)
        _flush_or_exit()
        sys.exit(code)
    try:
        try:
            argv = flags.FLAGS(sys.argv)
        except flags.Error as e:
            print(f"error: {_first_line(e)} (see --help)", file=sys.stderr)
            sys.exit(2)
        code = main(argv)
    except SystemExit:
        raise
    except BaseException as e:
        code = _error_code(e)
        if code is None:
            raise
    _flush_or_exit()
    sys.exit(code)


def _flush_or_exit() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_closed()
