"""The entry point MLflow loads for a logged end-to-end model (models from code): the model is
this file plus the imgclf package logged beside it, not a pickled Python object."""

from mlflow.models import set_model

from imgclf.end_to_end import ImageClassifier

set_model(ImageClassifier())
