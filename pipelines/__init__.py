"""mmray's jobs on Ray (curate, train, tune, serve), their CLI, the demo and a local cluster."""

import os
from pathlib import Path

# Ray Data's console at warnings and errors (ray_data_logging.yaml says why), in this
# process and, through the environment, in the processes of a Ray it starts. A user's own
# RAY_DATA_LOGGING_CONFIG wins.
os.environ.setdefault(
    "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).parent / "ray_data_logging.yaml")
)
# Ray Train's preemption watcher polls for node drains (spot instances being reclaimed). A Ray
# that mmray starts on this machine (and cluster/local.sh's) has none, and every run printed
# an error-level line from the watcher's actor ("has constructor arguments in the object
# store and max_restarts > 0"). On a user's own cluster the cluster's environment decides.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's DatasetManager sets an option Ray Data has deprecated, and its actor printed the
# RayDeprecationWarning (two lines) in every run. Only that message is silenced, in the
# processes of a Ray mmray starts; a user's own PYTHONWARNINGS wins.
os.environ.setdefault("PYTHONWARNINGS", "ignore:`ExecutionOptions.exclude_resources` is deprecated")
