"""Tiny checkpoints and tokenizers in the public layouts, written offline for the tests of
pretrained-weight loading (emu.model.pretrained, emu.model.sdxl, emu.model.inspect).

Nothing here downloads: tokenizers are trained on a few sentences, weights are random.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

def corpus(n: int = 200, seed: int = 0) -> list[str]:
    """Sentences a tiny tokenizer is trained on and a tiny LM learns (shapes-world captions)."""
    from emu.data.sequence import CAPTION_INSTRUCTION, DEFAULT_SYSTEM_MESSAGES
    from emu.data.synth import world

    rng = random.Random(seed)
    texts = [world.caption(world.sample_scene(rng)) for _ in range(n)]
    prompts = [CAPTION_INSTRUCTION, "What color is the shape? [USER]: [ASSISTANT]: yes, no.",
               "You are a helpful assistant.", *DEFAULT_SYSTEM_MESSAGES.values()]
    return texts + prompts * 20


def sentencepiece_folder(folder: Path, texts: list[str], vocab_size: int = 700) -> Path:
    """A LLaMA-2-style tokenizer folder: a SentencePiece BPE `tokenizer.model` trained as Meta's
    was (byte fallback, dummy prefix, no whitespace squeezing, identity normalisation, <unk> <s>
    </s> = 0 1 2, no pad) and a `tokenizer_config.json` naming LlamaTokenizer with legacy=True, as
    the Llama-2 checkpoints on the Hub ship it."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 4096}), encoding="utf-8")
    return folder


def sentencepiece_without_prefix(folder: Path):
    """The same SentencePiece model with the dummy prefix switched off: its encoding of a text is
    that text's ids inside a longer one (" red" -> "▁red", ":" -> ":"): the reference for pieces."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((Path(folder) / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def byte_level_folder(folder: Path, texts: list[str], bos: str | None, eos: str, vocab_size: int = 400,
                      pad: str | None = None, extra: tuple[str, ...] = ()) -> Path:
    """A byte-level BPE tokenizer folder, as Llama-3 (bos <|begin_of_text|>, eos <|end_of_text|>)
    and Qwen2 (no bos, eos <|endoftext|>) ship theirs: tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (bos, eos, pad, *extra) if t]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(dict.fromkeys(specials)),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


# ---- EVA-CLIP state dicts ------------------------------------------------------------------------

def eva_state_dict(width: int = 32, layers: int = 2, mlp_dim: int = 64, patch: int = 4, grid: int = 4,
                   embed_dim: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of an EVA-CLIP vision tower under the names the public code gives them
    (baaivision/EVA, EVA-CLIP/rei/eva_clip/eva_vit_model.py, `EVAVisionTransformer` built by
    model.py `_build_vision_tower` with use_mean_pooling=False and num_classes=embed_dim):
    patch_embed.proj, cls_token, pos_embed, blocks.N.{norm1, attn.{qkv, q_bias, v_bias, proj},
    norm2, mlp.{fc1, fc2}} and, after the blocks, `norm` (final LayerNorm) and `head` (the CLIP
    projection). Scales are far from an init's, so a mixed-up tensor shows in the outputs."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": rnd(1, 1, width), "pos_embed": rnd(1, grid * grid + 1, width),
          "patch_embed.proj.weight": rnd(width, 3, patch, patch), "patch_embed.proj.bias": rnd(width)}
    for i in range(layers):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": 1 + rnd(width), b + "norm1.bias": rnd(width),
                   b + "attn.q_bias": rnd(width), b + "attn.v_bias": rnd(width),
                   b + "attn.qkv.weight": rnd(3 * width, width), b + "attn.proj.weight": rnd(width, width),
                   b + "attn.proj.bias": rnd(width), b + "norm2.weight": 1 + rnd(width), b + "norm2.bias": rnd(width),
                   b + "mlp.fc1.weight": rnd(mlp_dim, width), b + "mlp.fc1.bias": rnd(mlp_dim),
                   b + "mlp.fc2.weight": rnd(width, mlp_dim), b + "mlp.fc2.bias": rnd(width)})
    sd.update({"norm.weight": 1 + rnd(width), "norm.bias": rnd(width),
               "head.weight": rnd(embed_dim, width), "head.bias": rnd(embed_dim)})
    return sd


def clip_text_state_dict(width: int = 16, embed_dim: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    """A (one-layer) text tower of an EVA-CLIP `CustomCLIP` (`text.*`, eva_clip/transformer.py
    TextTransformer) and its `logit_scale`: what the full CLIP checkpoint holds besides `visual.*`."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"text.token_embedding.weight": r(64, width), "text.positional_embedding": r(8, width),
            "text.transformer.resblocks.0.attn.in_proj_weight": r(3 * width, width),
            "text.transformer.resblocks.0.ln_1.weight": r(width), "text.ln_final.weight": r(width),
            "text.text_projection": r(width, embed_dim), "logit_scale": torch.tensor(4.6052)}


def eva_reference_forward(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int, eps: float = 1e-6,
                          postnorm: bool = True) -> torch.Tensor:
    """EVA-CLIP's `forward_features(x, return_all_features=True)` written out from the public code
    (eva_vit_model.py: PatchEmbed, Attention with qkv bias cat(q_bias, 0, v_bias) and scale
    head_dim ** -0.5, exact GELU Mlp, postnorm Block `x + norm1(attn(x))`), in plain tensor ops on
    the state dict: the reference our EvaVisionTransformer is compared with."""
    F = torch.nn.functional
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"],
                 stride=sd["patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    B, _, C = x.shape
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["pos_embed"]
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731

        def attn(h):
            bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
            qkv = F.linear(h, p("attn.qkv.weight"), bias).reshape(B, -1, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (C // heads) ** -0.5, qkv[1], qkv[2]
            out = (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v
            return F.linear(out.transpose(1, 2).reshape(B, -1, C), p("attn.proj.weight"), p("attn.proj.bias"))

        def mlp(h):
            return F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                            p("mlp.fc2.bias"))

        def ln(h, name):
            return F.layer_norm(h, (C,), p(f"{name}.weight"), p(f"{name}.bias"), eps)

        if postnorm:
            x = x + ln(attn(x), "norm1")
            x = x + ln(mlp(x), "norm2")
        else:
            x = x + attn(ln(x, "norm1"))
            x = x + mlp(ln(x, "norm2"))
    return x


# ---- a tiny pretrained LM ------------------------------------------------------------------------

def pretrained_llama_folder(folder: Path, texts: list[str], steps: int = 150, hidden: int = 128, layers: int = 3,
                            seed: int = 0) -> Path:
    """A tiny LLaMA with a LLaMA-2-style SentencePiece tokenizer, trained for `steps` steps of
    next-token prediction on `texts` (`<s> text </s>`), saved as a Hugging Face folder (weights,
    config, tokenizer): a stand-in for a pretrained checkpoint that already knows the language."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = sentencepiece_folder(Path(folder), texts)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    rows = [[tok.bos_token_id, *tok(t, add_special_tokens=False).input_ids, tok.eos_token_id] for t in texts]
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    rng = random.Random(seed)
    lm.train()
    for _ in range(steps):
        batch = rng.sample(rows, 32)
        width = max(map(len, batch))
        ids = torch.tensor([r + [tok.eos_token_id] * (width - len(r)) for r in batch])
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in batch])
        loss = lm(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    lm.save_pretrained(folder)
    return folder


# ---- an SDXL-layout diffusers folder -------------------------------------------------------------

#: SDXL-base's UNet layout (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json) at toy
#: sizes: text_time added embedding, linear projections, a 2-layer transformer at the inner level;
#: the cross-attention reads 48-wide "text features" and the pooled text is 24 wide (SDXL: 2048 and
#: 1280), 6 time ids x 8 (SDXL: x 256).
SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=48, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=32)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.13025)
#: SDXL-base's scheduler/scheduler_config.json.
SDXL_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                      interpolation_type="linear", use_karras_sigmas=False)


def sdxl_folder(folder: Path, seed: int = 0, **unet_overrides) -> Path:
    """A diffusers SDXL pipeline folder as save_pretrained writes it: model_index.json, unet/, vae/
    (config.json + diffusion_pytorch_model.safetensors), scheduler/, weights random but far from
    an init."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**SDXL_UNET, **unet_overrides})
    vae = AutoencoderKL(**SDXL_VAE)
    with torch.no_grad():
        for p in [*unet.parameters(), *vae.parameters()]:
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    EulerDiscreteScheduler(**SDXL_SCHEDULER).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}), encoding="utf-8")
    return folder
