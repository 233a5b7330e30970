"""The System-1 recipe's init against an independent transcription of the official code (alexiglad/EBT at 0ad3628),
as recipes/official/*.yaml set it up:

    # model/ar_transformer.py:200-207 (model/ar_ebt_time_embed.py:331-338 alike): q, k and v are separate linears
    self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
    init_whole_model_weights(self.wq, args.weight_initialization, ...)  # then wk, then wv, the same
    # model/model_utils.py:320-321: weight_initialization "xavier"
    nn.init.xavier_normal_(m.weight)
"""

import math

import torch

from ebwm_scale.models.blocks import Attention, init_weights
from tests.conftest import tiny_model_config


def test_official_init_draws_q_k_v_as_three_matrices():
    """Under model.init: official the fused (3D, D) q/k/v weight is three xavier-normal (D, D) matrices, each
    N(0, 2 / (D + D)) as the official wq, wk, wv (not the fused matrix's 2 / (D + 3D), 1 / sqrt(2) of that std)."""
    dim = 64
    attention = Attention(tiny_model_config(dim=dim, init="official"))
    torch.manual_seed(0)
    init_weights(attention, "official")
    torch.manual_seed(0)
    std = math.sqrt(2.0 / (dim + dim))  # xavier-normal: gain * sqrt(2 / (fan_in + fan_out)), gain 1
    official = torch.cat([torch.randn(dim, dim) * std for _ in ("wq", "wk", "wv")])
    torch.testing.assert_close(attention.wqkv.weight.detach(), official, rtol=1e-6, atol=0)
