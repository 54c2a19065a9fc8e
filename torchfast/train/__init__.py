"""Training: the Trainer, its callbacks and atomic checkpoints."""
from torchfast.train.callbacks import Callback, EarlyStopping, ModelCheckpoint, TensorBoard
from torchfast.train.checkpoint import load_checkpoint, save_checkpoint
from torchfast.train.trainer import Trainer, accuracy

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "TensorBoard", "Trainer", "accuracy", "load_checkpoint",
           "save_checkpoint"]
