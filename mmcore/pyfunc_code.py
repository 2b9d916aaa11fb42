"""The code MLflow logs as an mmray model's pyfunc (MLflow's "models from code"): loading it
imports ``mmcore.pyfunc`` from the installed mmray, and nothing goes through pickling."""

from mlflow.models import set_model

from mmcore.pyfunc import ImageTextPyfunc

set_model(ImageTextPyfunc())
