"""The fine-tune models: the blocks after the activations' cut plus a trained head, in Keras
(`finetune_keras`) and in low-level TensorFlow (`finetune_tf`), on the cached activations.

A package of its own rather than imgclf.heads, whose modules are loaded by name for the frozen
heads. Each model module has `train_finetune_<x>`, `save_finetune_<x>`, `load_finetune_<x>`,
`count_parameters`, `predictor` (activations -> probabilities) and `uses_test_time_flip`;
`common.predict_images` scores a subset of activations with or without test-time flips.
"""
