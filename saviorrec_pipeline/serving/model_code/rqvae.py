"""saviorrec-rqvae, as MLflow loads it: the class below, its weights from the model's artifacts."""

from mlflow.models import set_model

from saviorrec_pipeline.serving.pyfunc import SemanticIdModel

set_model(SemanticIdModel())
