"""mmray's jobs on Ray (curate, train, tune, serve), their CLI, the demo and a local cluster."""

import os
from pathlib import Path

# Ray Data's console at warnings and errors (ray_data_logging.yaml says why), in this
# process and, through the environment, in the processes of a Ray it starts. A user's own
# RAY_DATA_LOGGING_CONFIG wins.
os.environ.setdefault(
    "RAY_DATA_LOGGING_CONFIG", str(Path(__file__).parent / "ray_data_logging.yaml")
)
