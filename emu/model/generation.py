"""Generation: text through Hugging Face `generate` on `inputs_embeds`, and images by regressing the
visual embeddings after `[IMG]` one at a time.

Image embeddings use the KV cache: the prompt is encoded once, and each new embedding costs one
position's forward. The official Emu2 `generate_image` re-tokenises and re-runs the whole sequence
for each of the 64 embeddings (official emu.py); `use_cache=False` reproduces that, for tests and
for bench/bench_generation.py, which measures the speed-up.
"""

from __future__ import annotations

import torch

from emu.model.emu import EmuModel


def _positions(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def generate_image_embeddings(model: EmuModel, input_ids_BT: torch.Tensor, n_tokens: int,
                              attention_mask: torch.Tensor | None = None,
                              image_embeds: torch.Tensor | None = None, frame_embeds: torch.Tensor | None = None,
                              use_cache: bool = True) -> torch.Tensor:
    """Regress `n_tokens` visual embeddings (B, n, D_vis) after a prompt that ends with `[IMG]`.

    Step i feeds project_up(e_{i-1}) at the next position and reads project_down of the last
    hidden state, exactly as the training objective scores it. Rows may be left-padded
    (`attention_mask` 0 on the left).
    """
    decoder = model.lm.get_decoder()
    B = input_ids_BT.shape[0]
    mask = torch.ones_like(input_ids_BT) if attention_mask is None else attention_mask.clone()
    embeds = model.embed(input_ids_BT, image_embeds, frame_embeds)
    positions = _positions(mask)
    one = torch.ones(B, 1, dtype=mask.dtype, device=mask.device)
    produced = []
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    for i in range(n_tokens):
        e_BD = model.project_down(out.last_hidden_state[:, -1])
        produced.append(e_BD)
        if i == n_tokens - 1:
            break
        step = model.project_up(e_BD).unsqueeze(1).to(embeds.dtype)
        mask = torch.cat((mask, one), dim=1)
        positions = torch.cat((positions, positions[:, -1:] + 1), dim=1)
        if use_cache:
            out = decoder(inputs_embeds=step, attention_mask=mask, position_ids=positions[:, -1:],
                          past_key_values=out.past_key_values, use_cache=True)
        else:
            embeds = torch.cat((embeds, step), dim=1)
            out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
    return torch.stack(produced, dim=1)


@torch.no_grad()
def generate_text(model: EmuModel, input_ids_BT: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  image_embeds: torch.Tensor | None = None, frame_embeds: torch.Tensor | None = None,
                  **generate_kwargs) -> torch.Tensor:
    """New token ids (B, L) continuing the prompt: Hugging Face `generate` on the multimodal
    `inputs_embeds` (greedy by default; `num_beams=5` is Emu2's evaluation setting, App. E).
    Left-pad batched prompts."""
    embeds = model.embed(input_ids_BT, image_embeds, frame_embeds)
    mask = torch.ones_like(input_ids_BT) if attention_mask is None else attention_mask
    generate_kwargs.setdefault("do_sample", False)
    return model.lm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
