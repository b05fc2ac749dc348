"""gqe_torch: the gqe model in PyTorch, and gqe checkpoints both ways.

    from gqe_torch import GQEConfig, GQEForCausalLM, load_pretrained, save_pretrained

Programs: python -m gqe_torch.train (byte-level training, 1 process or torchrun) and
python -m gqe_torch.convert (torch state_dict <-> gqe checkpoint folder).
"""

from .checkpoint import load_pretrained, save_pretrained, weight_shapes
from .config import GQEConfig, load_config
from .errors import BadInput
from .model import GQEForCausalLM, load_balancing_loss, select_experts

__all__ = ["BadInput", "GQEConfig", "GQEForCausalLM", "load_config", "load_balancing_loss", "load_pretrained",
           "save_pretrained", "select_experts", "weight_shapes"]
