"""Emu1's Causal Transformer (C-Former): a fixed number of learned queries that attend causally to
each other and cross-attend all ViT tokens, giving a causal sequence of visual embeddings.

Emu1 (official causal_former.py) builds it from a randomly initialised T5-base decoder: causal
self-attention over the queries, cross-attention to the LayerNorm'd EVA features, an FFN. We use
transformers' T5 decoder stack the same way; a linear map brings the ViT width to the C-Former
width so the cross-attention keys and values have the decoder's size.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Stack

from emu.model.config import CFormerConfig


class CausalFormer(nn.Module):
    def __init__(self, config: CFormerConfig, vision_width: int, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.config = config
        self.ln_visual = nn.LayerNorm(vision_width, eps=layer_norm_eps)
        self.visual_to_width = nn.Linear(vision_width, config.width)
        self.queries = nn.Parameter(torch.randn(1, config.queries, config.width) * 0.02)
        t5 = T5Config(d_model=config.width, d_kv=config.width // config.heads, d_ff=config.ffn_dim,
                      num_layers=config.layers, num_decoder_layers=config.layers, num_heads=config.heads,
                      dropout_rate=0.0, is_decoder=True, use_cache=False, is_encoder_decoder=False,
                      vocab_size=1, pad_token_id=0, eos_token_id=None, decoder_start_token_id=0)
        self.decoder = T5Stack(t5)

    def forward(self, vit_tokens_BND: torch.Tensor) -> torch.Tensor:
        """(B, N_vit, D_vit) -> (B, queries, width). Query i sees queries <= i and every ViT token."""
        memory = self.visual_to_width(self.ln_visual(vit_tokens_BND))
        queries = self.queries.expand(vit_tokens_BND.shape[0], -1, -1)
        out = self.decoder(inputs_embeds=queries, encoder_hidden_states=memory, use_cache=False)
        return out.last_hidden_state
