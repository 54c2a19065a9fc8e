"""Training: the Trainer, its callbacks and atomic checkpoints."""
from torchfast.train.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torchfast.train.checkpoint import load_checkpoint, save_checkpoint
from torchfast.train.trainer import Trainer, accuracy

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "Trainer", "accuracy", "load_checkpoint",
           "save_checkpoint"]
