"""E and ALTO (Zhao et al., NeurIPS 2025) for distributed pretraining."""

from e_dist._hooks import install_deepspeed_hooks
from e_dist.alto import ALTO
from e_dist.e import E
from e_dist.groups import weight_decay_groups
from e_dist.hparams import alto_preset, e_preset

__all__ = ["ALTO", "E", "alto_preset", "e_preset", "weight_decay_groups"]
__version__ = "0.1.0"

install_deepspeed_hooks()
