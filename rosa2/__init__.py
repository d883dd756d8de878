"""rosa2: test-time co-adaptation of language models (ROSA2, "Words & Weights").

The core library: models, the parametric and semantic streams, the session loop, rewards,
datasets and metrics. It imports neither Prefect nor MLflow; flows and tasks wrap it.
"""

from rosa2 import env as _env

_env.apply()

__version__ = "0.1.0"
