"""audiogen-finetune: the Dora package (train.py), the fine-tuning solver and the library code the scripts share."""

import os
from pathlib import Path

# audiocraft looks for its cluster config beside its (uninstalled) source tree unless told otherwise.
os.environ.setdefault('AUDIOCRAFT_CONFIG', str(Path(__file__).with_name('audiocraft_env.yaml')))

# Every entry point (dora run, the scripts, notebooks) imports this package before audiocraft: silence, once and here,
# the start-up messages a user can't act on (xFormers' "reinstall", Hydra's migration notes, ...).
from solvers.project import quiet_dependencies  # noqa: E402

quiet_dependencies()
