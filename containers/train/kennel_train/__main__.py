"""python -m kennel_train: the training program without the SageMaker toolkit (see kennel_train.main)."""
import sys

from .main import cli

sys.exit(cli())
