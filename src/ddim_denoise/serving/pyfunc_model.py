"""The MLflow "models from code" entry point of the served denoiser (see ``serving/pyfunc.py``).

``log_pyfunc_model`` logs this file as the model's code instead of a pickled object, so loading the model runs this
import rather than unpickling: nothing but ordinary package code executes. It is meant to be run by MLflow, not
imported.
"""

from mlflow.models import set_model

from ddim_denoise.serving.pyfunc import DenoiserModel

set_model(DenoiserModel())
