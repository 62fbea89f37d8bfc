"""SAGEMAKER_TRAINING_MODULE for the out-of-memory contract test: kennel_train.main.main, whose training step
raises torch.OutOfMemoryError as an exhausted allocator does."""
import torch

from kennel_train import loop
from kennel_train.main import main as _real_main


def _out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")


def main() -> None:
    loop.train_one_epoch = _out_of_memory
    _real_main()
