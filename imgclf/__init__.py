"""Transfer-learning image classification: TensorFlow or Keras, on frozen Inception V3."""
