"""audiogen-finetune: the Dora package (train.py), the fine-tuning solver and the library code the scripts share."""
import os
from pathlib import Path

# audiocraft looks for its cluster config beside its (uninstalled) source tree unless told otherwise.
os.environ.setdefault('AUDIOCRAFT_CONFIG', str(Path(__file__).with_name('audiocraft_env.yaml')))
