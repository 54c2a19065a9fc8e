"""Drop-in fused optimizers: same constructor, param_groups and state_dict as torch.optim."""
from torchfast.optim.adam import Adam, AdamW
from torchfast.optim.sgd import SGD

__all__ = ["Adam", "AdamW", "SGD"]
