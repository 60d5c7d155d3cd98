"""The fine-tune models: the blocks after the activations' cut plus a trained head, in Keras
(`finetune_keras`) and in low-level TensorFlow (`finetune_tf`), on the cached activations.

Registered in imgclf/registry.py like the heads (`inputs="activations"`, `base` = the head each
starts from); a package of its own because they train on other inputs, in stages of their own.
Each model module has `train_finetune_<x>`, `save_finetune_<x>`, `load_finetune_<x>`,
`count_parameters`, `predictor` (activations -> probabilities), `uses_test_time_flip`, and for
the end-to-end models `graph_head` and `weights_digest`; `common.predict_images` scores a subset
of activations with or without test-time flips.
"""
