"""Transfer-learning image classification: TensorFlow or Keras, on frozen Inception V3."""

import os

# TensorFlow logs a dozen lines of C++ chatter (oneDNN, CUDA probing) on import. Stages
# import TF through this package, so this one default keeps their output readable;
# set TF_CPP_MIN_LOG_LEVEL=0 to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
