"""The Emu2 multimodal LM and its one training objective.

    image --EVA ViT--> patch tokens --pool 8x8 (or C-Former)--> visual embeddings e (B, n, D_vis)
    sequence: text tokens, and per image `[IMG]` + n x `<image>` + `[/IMG]`
    inputs_embeds: token embeddings, with every `<image>` / `[gIMG]` row replaced by project_up(e)
    hidden states h = LM(inputs_embeds)        (any Hugging Face causal LM; LLaMA by default)

The unified objective (Emu2 §2.1, "predict the next multimodal element"). The hidden state at
position t predicts whatever comes at t + 1:

  * if t + 1 holds a text token y (including `[IMG]`, `[/IMG]` and `</s>`), h_t is scored with
    cross-entropy of lm_head(h_t) against y, when the sample's text mask supervises that target;
  * if t + 1 holds a visual embedding e_j (so t is `[IMG]` for the first one, or the previous
    visual position), h_t is scored with the squared error ||project_down(h_t) - e_j||^2, when the
    image's regression mask supervises it. Targets are the encoder's pooled embeddings, detached:
    the regression trains the LM to produce them, never the encoder to be easy to predict.

    text_loss  = mean over supervised text targets of CE          (token mean)
    image_loss = mean over supervised visual targets and dims of (project_down(h_t) - e_j)^2  (MSE)
    loss       = text_weight * text_loss + image_weight * image_loss

Token means (not per-sample means) make a packed row of several samples score exactly as the
samples do apart.

Every forward calls each module exactly once, in the same order, whatever the batch holds, and
every module's output reaches the loss along the same path: the encoder runs once on all images
and frames together (on one blank image when `encode_blank` is set and the batch has none),
`project_up` once on all visual embeddings (on the blank's, or on one zero row, when there are
none: added to the LM input with weight 0), `lm_head` and `project_down` once each (on one row
with weight 0 when nothing is scored). Data-parallel ranks hold different batches, and ZeRO-3
gathers a module's parameters at each call, in forward and again in backward, while ZeRO-2
reduces gradients bucket by bucket as backward produces them: ranks that called different
modules, or whose backward met them in another order, would stop lining up (DESIGN.md
multi-rank rules).

Training passes a `SequenceLayout` computed on the host from the CPU batch: the forward then
gathers scored positions and scatters visual embeddings by index, and never reads a value back
from the device (no `.item()`, `bool(tensor)`, boolean indexing or `nonzero`: on a GPU each one
stalls the host until every queued kernel has finished, so the next micro-batch's kernels cannot
be queued behind the running ones). Without one (generation, evaluation) it is computed from the
tensors, wherever they are.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from emu.errors import ConfigError
from emu.model.cformer import CausalFormer
from emu.model.config import EmuConfig, LMConfig
from emu.model.vision import EvaVisionTransformer, normalize, pool_patches

IGNORE = -100  # text target that is not supervised (Hugging Face convention)


@dataclass(frozen=True)
class VisualTokenIds:
    """Token ids whose positions carry visual embeddings: `<image>` (images) and `[gIMG]` (frames)."""

    image: int
    frame: int


@dataclass
class SequenceLayout:
    """Where a batch's supervised and visual positions are, as indices into its B*T flattened
    positions (row-major), and which visual embeddings are regression targets. Every count the
    forward needs is a tensor's length, which the host knows without asking the device."""

    text_positions: torch.Tensor   # (n_text,) positions whose next token is supervised
    text_labels: torch.Tensor      # (n_text,) those next tokens
    image_positions: torch.Tensor  # (N_img * n,) the `<image>` positions, in embedding order
    frame_positions: torch.Tensor  # (N_frame * n,) the `[gIMG]` positions, likewise
    image_regressed: torch.Tensor  # rows of the flattened image embeddings that are regressed
    frame_regressed: torch.Tensor  # rows of the flattened frame embeddings that are regressed

    @classmethod
    def of(cls, input_ids: torch.Tensor, text_targets: torch.Tensor, token_ids: VisualTokenIds,
           image_regress: torch.Tensor | None = None, frame_regress: torch.Tensor | None = None) -> SequenceLayout:
        """The layout of a batch (EmuModel.forward's arguments of the same names). Run on CPU
        tensors it costs no device sync (emu.train.lm_step does so in the data loader)."""
        flat_ids = input_ids.reshape(-1)
        flat_targets = text_targets.reshape(-1)
        text_positions = (flat_targets != IGNORE).nonzero().reshape(-1)
        image_positions = (flat_ids == token_ids.image).nonzero().reshape(-1)
        frame_positions = (flat_ids == token_ids.frame).nonzero().reshape(-1)
        return cls(text_positions=text_positions, text_labels=flat_targets[text_positions],
                   image_positions=image_positions, frame_positions=frame_positions,
                   image_regressed=_regressed_rows(image_positions, image_regress),
                   frame_regressed=_regressed_rows(frame_positions, frame_regress))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceLayout:
        return SequenceLayout(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                                 for f in fields(self)})

    def pin_memory(self) -> SequenceLayout:
        return SequenceLayout(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def _regressed_rows(positions: torch.Tensor, regress: torch.Tensor | None) -> torch.Tensor:
    """Rows of the flattened (N * n, D) visual embeddings whose item is regressed: each of the N
    items has n = len(positions) / N consecutive rows."""
    if regress is None or len(regress) == 0:
        return positions.new_zeros(0)
    per_item = len(positions) // len(regress)
    if per_item * len(regress) != len(positions):
        raise ValueError(f"{len(positions)} visual placeholders do not split into {len(regress)} equal blocks")
    return regress.to(torch.bool).repeat_interleave(per_item).nonzero().reshape(-1)


@dataclass
class EmuOutput:
    """`loss` = text_weight * text_loss + image_weight * image_loss. The two parts keep their
    graph so a trainer accumulating micro-batches can weight each by its share of the step's
    targets (an exact token mean over the whole step)."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    image_loss: torch.Tensor
    text_targets: int    # how many text targets were supervised (0: text_loss is a zero with a graph)
    image_targets: int   # how many visual embeddings were regressed (0: likewise)


def build_lm(config: LMConfig, vocab_size: int, base_vocab: int | None = None,
             resizing: Callable[[], AbstractContextManager] = nullcontext) -> PreTrainedModel:
    """A LLaMA from the size settings, or any Hugging Face causal LM from `config.pretrained`
    (a folder or s3:// URI; emu.model.pretrained.load_pretrained_lm). Its embeddings then get one
    row per token of the tokenizer (`vocab_size`, Emu2 special tokens included):

      * rows the tokenizer does not have (an LM whose embeddings were padded past its vocabulary,
        as Qwen2's 151,936 rows for ~151.6k tokens) are dropped first, but only when the
        tokenizer is the LM's own, whose size as shipped (`base_vocab`, before Emu added its
        tokens) is then known; any other tokenizer with fewer tokens than the LM has rows is an
        error (an LM loaded with another tokenizer would be cut down to it and read wrong ids);
      * new rows, input and output embeddings both, start at the mean of the existing ones
        (transformers' `mean_resizing`: the mean, plus noise of 1e-9 times their covariance),
        so the special tokens do not change what the LM predicts for text. Under ZeRO-3
        transformers gathers the partitioned embeddings to resize them; `resizing()` is the
        context it must do so in (outside deepspeed.zero.Init, PartitionedInit.unpartitioned)."""
    if config.pretrained:
        from emu.model.pretrained import load_pretrained_lm

        lm = load_pretrained_lm(config.pretrained, config.attn_implementation)
        rows = lm.get_input_embeddings().num_embeddings
        if base_vocab is not None and base_vocab > rows:
            raise ConfigError(f"model.lm.pretrained {config.pretrained}: its tokenizer has {base_vocab} tokens but "
                              f"the LM only {rows} token embeddings; the tokenizer does not belong to this LM")
        if base_vocab is not None and base_vocab < rows:
            with resizing():
                lm.resize_token_embeddings(base_vocab, mean_resizing=False)  # padding rows no token uses
        elif vocab_size < rows:
            raise ConfigError(f"model.lm.pretrained {config.pretrained}: the LM has {rows} token embeddings but the "
                              f"tokenizer {vocab_size} tokens (Emu2 special tokens included): building it would "
                              "shrink the LM's vocabulary and scramble its token ids; use the LM's own tokenizer "
                              "(leave stage1.tokenizer empty)")
    else:
        # from_config, not the class itself: under ZeRO-3 transformers then builds it partitioned
        # and initialises it gathered (emu.train.engine.PartitionedInit).
        lm = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
            max_position_embeddings=config.max_positions, rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta, tie_word_embeddings=False), attn_implementation=config.attn_implementation)
    if lm.get_input_embeddings().num_embeddings != vocab_size:
        with resizing():
            lm.resize_token_embeddings(vocab_size, mean_resizing=True)
    return lm


def _is_own_tokenizer(tokenizer, pretrained: str) -> bool:
    """Whether the tokenizer was loaded from the LM's folder (transformers records where)."""
    from pathlib import Path

    from emu.model.io import local_folder

    try:
        return Path(tokenizer.name_or_path).resolve() == local_folder(pretrained).resolve()
    except (ConfigError, OSError, TypeError):
        return False


class Projection(nn.Linear):
    """A bias-free linear map initialised like the LM's own linear layers (normal, std =
    initializer_range, 0.02 for LLaMA), not PyTorch's fan-in default: visual inputs then enter at
    a scale the LM's pretrained (or freshly initialised) layers are used to. The init runs in the
    constructor, so a model built partitioned (ZeRO-3) gets it before its weights are split."""

    def __init__(self, in_features: int, out_features: int, std: float):
        self.std = std
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class EmuModel(nn.Module):
    """Visual encoder, connector, `project_up`, causal LM, regression head `project_down` (the
    official Emu2 names). Pure torch: no I/O, no distributed setup, no logging."""

    def __init__(self, config: EmuConfig, token_ids: VisualTokenIds, lm: PreTrainedModel):
        super().__init__()
        self.config = config
        self.token_ids = token_ids
        self.visual = EvaVisionTransformer(config.vision)
        self.cformer = (CausalFormer(config.cformer, config.vision.width, config.vision.layer_norm_eps)
                        if config.connector == "cformer" else None)
        self.lm = lm
        hidden = lm.get_input_embeddings().embedding_dim
        std = getattr(lm.config, "initializer_range", 0.02)
        self.project_up = Projection(config.visual_dim, hidden, std)    # EVA space -> LM
        self.project_down = Projection(hidden, config.visual_dim, std)  # LM -> EVA space (regression)

    @classmethod
    def build(cls, config: EmuConfig, tokenizer, partitioned=None) -> EmuModel:
        """A model whose LM vocabulary is the tokenizer's (Emu2 special tokens included; build_lm),
        its LM from `model.lm.pretrained` and its encoder from `model.vision.pretrained` when they
        are set (emu.model.pretrained), the rest freshly initialised. `partitioned` is where a
        stage builds models (emu.train.engine.PartitionedInit): its `load_weights` copies the
        encoder's weights into ZeRO-3 partitions and its `unpartitioned()` is where the
        vocabulary is resized; by default, weights load whole."""
        from emu.data.tokenizer import GIMG, IMAGE, base_vocab_size

        ids = VisualTokenIds(image=tokenizer.convert_tokens_to_ids(IMAGE), frame=tokenizer.convert_tokens_to_ids(GIMG))
        own = bool(config.lm.pretrained) and _is_own_tokenizer(tokenizer, config.lm.pretrained)
        lm = build_lm(config.lm, len(tokenizer), base_vocab_size(tokenizer) if own else None,
                      resizing=partitioned.unpartitioned if partitioned is not None else nullcontext)
        model = cls(config, ids, lm)
        if config.vision.pretrained:
            from emu.model.pretrained import load_vision_weights

            load_vision_weights(model.visual, config.vision.pretrained,
                                partitioned.load_weights if partitioned is not None else None)
        return model

    # ---- images to visual embeddings -------------------------------------------------------

    def encode_images(self, pixels_BCHW: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, n, D_vis) visual embeddings: the ViT's patch
        tokens mean-pooled to side x side (Emu2), or the C-Former's queries (Emu1). Runs without
        autograd when nothing in the encoder trains (stages 2, decoder, instruct)."""
        return self._encode([(pixels_BCHW, self.config.image_tokens_side if side is None else side)])[0]

    def _encode(self, inputs: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Several pixel batches (each with its pooled side) through one encoder call. uint8
        pixels (emu.model.vision.resize_images, what the data loader ships) are normalised here."""
        trainable = any(p.requires_grad for p in self.visual.parameters()) or (
            self.cformer is not None and any(p.requires_grad for p in self.cformer.parameters()))
        pixels = [normalize(p, self.visual.config) if p.dtype == torch.uint8 else p for p, _ in inputs]
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            tokens = self.visual(torch.cat(pixels))
            if self.cformer is not None:
                tokens = self.cformer(tokens)
            out, start = [], 0
            for pixels, side in inputs:
                part = tokens[start:start + pixels.shape[0]]
                out.append(part if self.cformer is not None else pool_patches(part, side))
                start += pixels.shape[0]
            return out

    # ---- sequence embedding ----------------------------------------------------------------

    def embed(self, input_ids_BT: torch.Tensor, image_embeds: torch.Tensor | None = None,
              frame_embeds: torch.Tensor | None = None, filler: torch.Tensor | None = None,
              layout: SequenceLayout | None = None) -> torch.Tensor:
        """Token embeddings with each `<image>` / `[gIMG]` position replaced, in row-major order,
        by project_up of the next visual embedding (official emu.py fills them the same way).
        project_up runs exactly once: without visual embeddings, on `filler` (a blank image's
        embeddings) or one zero row, added with weight 0 (module docstring). The positions come
        from `layout` when given (no device sync), else from the ids."""
        embeds = self.lm.get_input_embeddings()(input_ids_BT)
        if layout is None:
            flat_ids = input_ids_BT.reshape(-1)
            image_positions = (flat_ids == self.token_ids.image).nonzero().reshape(-1)
            frame_positions = (flat_ids == self.token_ids.frame).nonzero().reshape(-1)
        else:
            image_positions, frame_positions = layout.image_positions, layout.frame_positions
        kinds = [(self.token_ids.image, image_positions, image_embeds),
                 (self.token_ids.frame, frame_positions, frame_embeds)]
        positions, flat = [], []
        for token_id, where, visual in kinds:
            given = 0 if visual is None else visual.shape[0] * visual.shape[1]
            if len(where) != given:
                raise ValueError(f"the sequence has {len(where)} visual placeholders (token {token_id}) but "
                                 f"{given} visual embeddings were given")
            if given:
                positions.append(where)
                flat.append(visual.reshape(-1, visual.shape[-1]))
        dtype = self.project_up.weight.dtype
        if not flat:
            if filler is None:
                filler = embeds.new_zeros(1, self.config.visual_dim, dtype=dtype)
            up = self.project_up(filler.reshape(-1, filler.shape[-1]).to(dtype))
            return embeds + up.sum().to(embeds.dtype) * 0.0
        up = self.project_up(torch.cat(flat).to(dtype)).to(embeds.dtype)
        batch, length, width = embeds.shape
        return embeds.reshape(-1, width).index_copy(0, torch.cat(positions), up).reshape(batch, length, width)

    def hidden_states(self, input_ids_BT: torch.Tensor, image_embeds: torch.Tensor | None = None,
                      frame_embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, filler: torch.Tensor | None = None,
                      layout: SequenceLayout | None = None) -> torch.Tensor:
        """Final (normed) hidden states of the LM body, (B, T, H)."""
        embeds = self.embed(input_ids_BT, image_embeds, frame_embeds, filler, layout)
        out = self.lm.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    # ---- the objective ---------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, text_targets: torch.Tensor,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                images: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                frames: torch.Tensor | None = None, frame_embeds: torch.Tensor | None = None,
                image_regress: torch.Tensor | None = None, frame_regress: torch.Tensor | None = None,
                text_weight: float = 1.0, image_weight: float = 1.0, encode_blank: bool = False,
                layout: SequenceLayout | None = None) -> EmuOutput:
        """The unified loss of the module docstring.

        input_ids (B, T); text_targets (B, T): the token h_t must predict, or IGNORE.
        Visual inputs, each in the order the images appear in the batch (row-major):
        images (N_img, 3, S, S) pixels or image_embeds (N_img, n, D_vis) precomputed; the same for
        video frames. image_regress / frame_regress (N,) bool: whether each image's embeddings
        are regression targets (default: none are). encode_blank: run the encoder on one blank
        image when no pixels are given (a trainer that encodes online sets it, module docstring).
        layout: the batch's SequenceLayout, computed on the host (no device sync); by default it is
        computed here from the tensors.
        """
        if layout is None:
            layout = SequenceLayout.of(input_ids, text_targets, self.token_ids, image_regress, frame_regress)
        filler = None
        pending = [(pixels, side) for pixels, embeds, side in (
            (images, image_embeds, self.config.image_tokens_side), (frames, frame_embeds, self.config.video_tokens_side))
            if embeds is None and pixels is not None]
        if pending:
            encoded = iter(self._encode(pending))
            if image_embeds is None and images is not None:
                image_embeds = next(encoded)
            if frame_embeds is None and frames is not None:
                frame_embeds = next(encoded)
        elif encode_blank:
            size = self.visual.config.image_size
            blank = torch.zeros(1, 3, size, size, device=input_ids.device)  # cast by the encoder
            filler = self._encode([(blank, self.config.image_tokens_side)])[0]
        hidden = self.hidden_states(input_ids, image_embeds, frame_embeds, attention_mask, position_ids, filler,
                                    layout)

        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        n_text = len(layout.text_positions)
        # Only scored positions reach lm_head: saves the (B*T, vocab) logits' memory.
        scored = flat_hidden.index_select(0, layout.text_positions) if n_text else flat_hidden[:1]
        logits = self.lm.get_output_embeddings()(scored)
        if n_text:
            text_loss = F.cross_entropy(logits.float(), layout.text_labels)
        else:
            text_loss = logits.float().sum() * 0.0

        predictions, targets = [], []
        for positions, regressed, visual in ((layout.image_positions, layout.image_regressed, image_embeds),
                                             (layout.frame_positions, layout.frame_regressed, frame_embeds)):
            if visual is None or not len(regressed):
                continue
            # h at the position before each visual embedding predicts it ([IMG] precedes the first).
            predictions.append(flat_hidden.index_select(0, positions.index_select(0, regressed) - 1))
            targets.append(visual.reshape(-1, visual.shape[-1]).index_select(0, regressed))
        if predictions:
            predicted = self.project_down(torch.cat(predictions))
            target = torch.cat(targets).detach().to(predicted.dtype)
            image_loss = F.mse_loss(predicted.float(), target.float())
            n_image = predicted.shape[0]
        else:
            image_loss = self.project_down(flat_hidden[:1]).float().sum() * 0.0
            n_image = 0
        loss = text_weight * text_loss + image_weight * image_loss
        return EmuOutput(loss=loss, text_loss=text_loss, image_loss=image_loss,
                         text_targets=n_text, image_targets=n_image)
