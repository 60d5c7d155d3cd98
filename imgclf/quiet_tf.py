"""Import TensorFlow without its C++ start-up notices, before anything else imports it.

TensorFlow 2.21 prints oneDNN and CUDA notices to stderr before its logging is set up,
whatever TF_CPP_MIN_LOG_LEVEL says: six lines per stage that bury what the stage has to say.
TF stages import this module first (`import imgclf.quiet_tf`). If the import fails, what
TensorFlow printed is shown with the error.
"""

from __future__ import annotations

import os
import sys
import tempfile


def import_tensorflow_quietly() -> None:
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_logical_devices()  # the CUDA probe logs here, not at import
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


import_tensorflow_quietly()
