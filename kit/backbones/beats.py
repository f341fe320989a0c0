"""BEATs (Chen et al., 2023): configs, layers, front-end and the filter of the released checkpoints.

Layout of the official model, with the checkpoint's parameter names:

- front-end: Kaldi fbank (128 mel bins, 25/10 ms, povey window) of ``wave * 2**15``, normalised with
  ``(x - 15.41663) / (2 * 6.55582)``;
- ``patch_embedding`` (16x16 Conv2d over time x mel) -> tokens in (time, freq) order (8 frequency
  patches per 16 frames), ``layer_norm``, ``post_extract_proj`` to the encoder width;
- ``encoder.pos_conv.0``: grouped Conv1d position embedding with the old weight-norm parametrisation
  (``weight_g`` / ``weight_v``, norm over every dim but the kernel position), then GELU;
- ``encoder.layers.N``: self-attention with a bucketed relative position bias (the table is stored in
  layer 0 and shared by all layers), gated per query by ``grep_linear`` / ``grep_a`` when
  ``gru_rel_pos``; post-LN with the ``deep_norm`` residual scale, or pre-LN (``layer_norm_first``);
- ``predictor`` (fine-tuned releases only): a linear classifier averaged over the valid tokens.

Differences from the official code, none of which changes its outputs on an unpadded clip:
attention runs through ``scaled_dot_product_attention`` with the (gated) bias and the key padding
folded into one float mask; the bucketed relative positions are computed once per sequence length;
the front-end is batched (:func:`kit.features.kaldi_fbank`). And padding is exact: the token mask
comes from each clip's own frame count and padded tokens are zeroed before the convolutional
position embedding, so a clip's valid tokens are the same in a padded batch as alone (in the official
code padding leaks into them through that convolution).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kit import features
from kit.backbones import Backbone, CheckpointError, loading

FBANK_MEAN = 15.41663
FBANK_STD = 6.55582
NUM_MEL_BINS = 128
SAMPLE_RATE = 16000


_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_accurate": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
    "linear": lambda x: x,
}


@dataclass(frozen=True)
class BEATsConfig:
    """The fields of the official ``BEATsConfig`` (defaults as there; checkpoints carry their own)."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0
    layer_norm_first: bool = False
    deep_norm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    dropout_input: float = 0.0
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280
    gru_rel_pos: bool = False
    finetuned_model: bool = False
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    def __post_init__(self) -> None:
        if self.input_patch_size <= 0 or NUM_MEL_BINS % self.input_patch_size:
            raise ValueError(f"input_patch_size {self.input_patch_size} must divide {NUM_MEL_BINS}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} is not a multiple of "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(
                f"activation_fn {self.activation_fn!r} is not supported "
                f"(expected one of {', '.join(_ACTIVATIONS)})"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm and layer_norm_first cannot both be set")


# Training-time fields that may be changed on a loaded checkpoint (the rest fix the weights' shapes).
REGULARISATION_FIELDS = (
    "dropout",
    "attention_dropout",
    "activation_dropout",
    "encoder_layerdrop",
    "dropout_input",
    "predictor_dropout",
    "layer_wise_gradient_decay_ratio",
)

# The flags of the released BEATs_iter3 models; the named configurations differ only in size.
_RELEASE_FLAGS = BEATsConfig(
    input_patch_size=16,
    conv_bias=False,
    activation_fn="gelu",
    layer_wise_gradient_decay_ratio=0.6,
    layer_norm_first=False,
    deep_norm=True,
    dropout=0.1,
    attention_dropout=0.1,
    activation_dropout=0.0,
    encoder_layerdrop=0.05,
    dropout_input=0.0,
    conv_pos=128,
    conv_pos_groups=16,
    relative_position_embedding=True,
    num_buckets=320,
    max_distance=800,
    gru_rel_pos=True,
    finetuned_model=False,
)

CONFIGS: dict[str, BEATsConfig] = {
    # BEATs_iter3 (about 90 M parameters)
    "release": replace(
        _RELEASE_FLAGS,
        embed_dim=512,
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
    ),
    # the same architecture and flags, small enough for CPU runs and tests
    "cpu": replace(
        _RELEASE_FLAGS,
        embed_dim=128,
        encoder_layers=4,
        encoder_embed_dim=192,
        encoder_ffn_embed_dim=768,
        encoder_attention_heads=4,
    ),
    # unit tests
    "unit": replace(
        _RELEASE_FLAGS,
        embed_dim=32,
        encoder_layers=2,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=2,
    ),
}
DEFAULT_CONFIG = "cpu"
# The released size (BEATs_iter3*.pt, about 90 M parameters) and its configuration, for kit.tools.bench.
RELEASES = {"BEATs_iter3": {"config": "release"}}


class _GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` backward (the official layer-wise gradient decay)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose weight is ``weight_g * weight_v / ||weight_v||`` with the norm over every dim
    but the kernel position: ``torch.nn.utils.weight_norm(conv, dim=2)`` under the same parameter names,
    so the official checkpoints load as they are."""

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel_size))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.weight_v.shape[-1] // 2, groups=self.groups)


class _SamePad(nn.Module):
    """Drops the extra output step that symmetric padding gives an even kernel."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:
        return x[..., : x.shape[-1] - self.remove]


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive relative position bias, optionally gated per query."""

    def __init__(self, config: BEATsConfig, owns_bias_table: bool) -> None:
        super().__init__()
        dim, heads = config.encoder_embed_dim, config.encoder_attention_heads
        self.num_heads, self.head_dim = heads, dim // heads
        self.dropout = config.attention_dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.gru_rel_pos = config.gru_rel_pos
        if config.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))
        if owns_bias_table:  # one table for all layers, stored (and trained) in layer 0
            self.relative_attention_bias = nn.Embedding(config.num_buckets, heads)

    def forward(self, x: Tensor, position_bias: Tensor | None, key_mask: Tensor | None) -> Tensor:
        """``x`` [B, N, D]; ``position_bias`` [H, N, N] or None; ``key_mask`` [B, 1, 1, N] (0 or -inf), or
        None when no clip of the batch has padding."""
        batch, length, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        mask = key_mask
        if position_bias is not None:
            if self.gru_rel_pos:
                # gate_a * (gate_b * grep_a - 1) + 2, from the unscaled query of each head
                gates = torch.sigmoid(self.grep_linear(q).view(batch, self.num_heads, length, 2, 4).sum(-1))
                gate_a, gate_b = gates.chunk(2, dim=-1)
                gate = gate_a * (gate_b * self.grep_a - 1.0) + 2.0
                # one pass over the [B, H, N, N] bias instead of a multiply and then an add
                mask = (
                    gate * position_bias if key_mask is None else torch.addcmul(key_mask, gate, position_bias)
                )
            else:
                mask = position_bias if key_mask is None else position_bias + key_mask
        if mask is not None:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class EncoderLayer(nn.Module):
    """Attention + feed-forward block, post-LN (with the deep_norm residual scale) or pre-LN."""

    def __init__(self, config: BEATsConfig, owns_bias_table: bool) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.self_attn = SelfAttention(config, owns_bias_table)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[config.activation_fn]
        self.layer_norm_first = config.layer_norm_first
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def _feed_forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.activation_dropout(self.activation(self.fc1(x)))))

    def forward(self, x: Tensor, position_bias: Tensor | None, key_mask: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), position_bias, key_mask))
            return x + self._feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(
            x * self.residual_scale + self.dropout(self.self_attn(x, position_bias, key_mask))
        )
        return self.final_layer_norm(x * self.residual_scale + self._feed_forward(x))


class TransformerEncoder(nn.Module):
    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.config = config
        # a Sequential so the conv's parameters keep the official names encoder.pos_conv.0.*
        self.pos_conv = nn.Sequential(
            WeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups),
            _SamePad(config.conv_pos),
            nn.GELU(),
        )
        self.layers = nn.ModuleList(
            EncoderLayer(config, owns_bias_table=config.relative_position_embedding and i == 0)
            for i in range(config.encoder_layers)
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)
        self._bucket_cache: dict[tuple[int, torch.device], Tensor] = {}

    def _relative_buckets(self, length: int, device: torch.device) -> Tensor:
        """[N, N] bucket of each key offset for each query (T5-style, bidirectional), cached per length."""
        key = (length, device)
        if key not in self._bucket_cache:
            positions = torch.arange(length, dtype=torch.long)
            offsets = positions[None, :] - positions[:, None]
            half = self.config.num_buckets // 2
            buckets = (offsets > 0).long() * half
            distance = offsets.abs()
            max_exact = half // 2
            # same float32 operations as the official code, so the bucket boundaries agree exactly
            log_ratio = torch.log(distance.clamp_min(1).float() / max_exact) / math.log(
                self.config.max_distance / max_exact
            )
            far = (max_exact + (log_ratio * (half - max_exact)).long()).clamp_max(half - 1)
            buckets = buckets + torch.where(distance < max_exact, distance, far)
            self._bucket_cache[key] = buckets.to(device)
        return self._bucket_cache[key]

    def prepare(self, x: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """What the layers take: ``x`` after the position conv (and the input LayerNorm of a post-LN
        model), the ungated relative position bias [H, N, N] (None without one), shared by every layer,
        and the additive key mask [B, 1, 1, N] (None when no clip of the batch has padding)."""
        # zeroed padding makes the conv see, at a clip's end, the zeros it sees when the clip is alone
        x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.config.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)

        position_bias = None
        if self.config.relative_position_embedding:
            table = self.layers[0].self_attn.relative_attention_bias
            position_bias = table(self._relative_buckets(x.shape[1], x.device)).permute(2, 0, 1).contiguous()
        key_mask = None  # no padding in the batch: no mask to add in every layer
        if padding_mask.any():
            key_mask = torch.zeros(padding_mask.shape, dtype=x.dtype, device=x.device)
            key_mask = key_mask.masked_fill(padding_mask, float("-inf"))[:, None, None, :]
        return x, position_bias, key_mask

    def forward(self, x: Tensor, padding_mask: Tensor, gradient_checkpointing: bool = False) -> Tensor:
        """``x`` [B, N, D], ``padding_mask`` [B, N] (True = padding) -> [B, N, D]."""
        x, position_bias, key_mask = self.prepare(x, padding_mask)

        decay = self.config.layer_wise_gradient_decay_ratio
        for layer in self.layers:
            if self.training and self.config.encoder_layerdrop > 0:
                if float(torch.rand(())) < self.config.encoder_layerdrop:
                    continue
            if decay != 1.0 and torch.is_grad_enabled():
                x = _GradMultiply.apply(x, decay)
            if gradient_checkpointing and self.training:
                x = checkpoint(layer, x, position_bias, key_mask, use_reentrant=False)
            else:
                x = layer(x, position_bias, key_mask)

        if self.config.layer_norm_first:
            x = self.layer_norm(x)
        return x


class BEATs(Backbone):
    """The BEATs encoder behind the :class:`kit.backbones.Backbone` interface."""

    name = "beats"
    lora_target_modules = r"(?:.*\.)?encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj"
    has_grid = True  # 16x16 patches: 8 frequency bands per 16 frames

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.encoder_embed_dim
        patch = config.input_patch_size
        self.freq_patches = NUM_MEL_BINS // patch
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        self.post_extract_proj = (
            nn.Linear(config.embed_dim, config.encoder_embed_dim)
            if config.embed_dim != config.encoder_embed_dim
            else None
        )
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = TransformerEncoder(config)
        if config.finetuned_model:
            self.predictor_dropout = nn.Dropout(config.predictor_dropout)
            self.predictor = nn.Linear(config.encoder_embed_dim, config.predictor_class)
        else:
            self.predictor = None
        self._init_weights()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def cfg(self) -> dict:
        """The configuration as the official ``cfg`` dict."""
        return asdict(self.config)

    def _init_weights(self) -> None:
        """Random initialisation as in the official code (BERT-style normal(0, 0.02), deep_norm scaling)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        conv = self.encoder.pos_conv[0]
        nn.init.normal_(conv.weight_v, std=math.sqrt(4 / (self.config.conv_pos * self.embed_dim)))
        with torch.no_grad():
            conv.weight_g.copy_(conv.weight_v.norm(dim=(0, 1), keepdim=True))
        if self.config.deep_norm:
            beta = (8 * self.config.encoder_layers) ** -0.25
            for layer in self.encoder.layers:
                attn = layer.self_attn
                for linear, gain in (
                    (attn.q_proj, 1.0),
                    (attn.k_proj, 1.0),
                    (attn.v_proj, beta),
                    (attn.out_proj, beta),
                    (layer.fc1, beta),
                    (layer.fc2, beta),
                ):
                    nn.init.xavier_normal_(linear.weight, gain=gain)

    def frontend(self, waves: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised 128-bin Kaldi fbank [B, F, 128] of ``waves`` [B, T] (16 kHz, in [-1, 1]) and the
        frame count of each clip; rows beyond a clip's own frames are 0."""
        fbank, n_frames = features.kaldi_fbank(
            waves * 2**15,
            lengths,
            num_mel_bins=NUM_MEL_BINS,
            sample_frequency=SAMPLE_RATE,
            frame_length=25.0,
            frame_shift=10.0,
        )
        fbank = (fbank - FBANK_MEAN) / (2 * FBANK_STD)
        valid = torch.arange(fbank.shape[1], device=fbank.device) < n_frames[:, None]
        return fbank.masked_fill(~valid[..., None], 0.0), n_frames

    def forward_features(self, fbank: Tensor, n_frames: Tensor) -> tuple[Tensor, Tensor]:
        """Encode front-end features (e.g. after SpecAugment): ``fbank`` [B, F, 128], ``n_frames`` [B] ->
        ``(tokens [B, N, D], padding_mask [B, N])``, N = F // 16 * 8; padded tokens are 0."""
        x, padding_mask = self.patch_tokens(fbank, n_frames)
        x = self.encoder(self.dropout_input(x), padding_mask, self.gradient_checkpointing)
        return x.masked_fill(padding_mask[..., None], 0.0), padding_mask

    def patch_tokens(self, fbank: Tensor, n_frames: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's input: patch embedding, LayerNorm and projection of ``fbank`` [B, F, 128] ->
        ``(x [B, N, D], padding_mask [B, N])``, tokens time-major (t * 8 + f)."""
        patch = self.config.input_patch_size
        time_patches = fbank.shape[1] // patch
        n_tokens = torch.div(n_frames, patch, rounding_mode="floor") * self.freq_patches
        if time_patches == 0 or bool((n_tokens == 0).any()):
            short = (n_tokens == 0).nonzero().flatten().tolist() if time_patches else "all"
            raise ValueError(
                f"clips {short} are too short for BEATs: one token needs {patch} fbank frames "
                f"(at least {400 + 160 * (patch - 1)} samples at 16 kHz)"
            )
        x = self.patch_embedding(fbank[:, None, : time_patches * patch])  # [B, E, time, freq]
        x = self.layer_norm(x.flatten(2).transpose(1, 2))  # tokens in (time, freq) order
        padding_mask = torch.arange(x.shape[1], device=x.device) >= n_tokens[:, None]
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return x, padding_mask

    def forward(
        self,
        waves: Tensor,
        lengths: Tensor | None = None,
        augment=None,
        reference=None,
        reference_lengths=None,
    ) -> tuple[Tensor, Tensor]:
        """``waves`` [B, T] at 16 kHz, ``lengths`` [B] samples -> ``(tokens [B, N, D], padding_mask [B, N])``
        (True = padding); ``augment(fbank, n_frames)`` is applied to the fbank in training mode."""
        self._no_reference(reference)
        fbank, n_frames = self.frontend(waves, lengths)
        return self.forward_features(self._augmented(fbank, n_frames, augment), n_frames)

    def grid_tokens(
        self,
        waves: Tensor,
        lengths: Tensor | None = None,
        reference: Tensor | None = None,
        reference_lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``forward``'s tokens on their patch grid: ``(tokens [B, T, 8, D], padding_mask [B, T])``, T the
        time patches (16 frames each), 8 the frequency patches (16 mel bins each, low to high). The
        tokens are time-major (token ``t * 8 + f``), so this is a reshape; a time patch is padding for
        all its bands at once."""
        tokens, padding_mask = self(waves, lengths, reference=reference, reference_lengths=reference_lengths)
        batch, n_tokens, dim = tokens.shape
        bands = self.freq_patches
        grid_mask = padding_mask.reshape(batch, n_tokens // bands, bands)[:, :, 0]
        return tokens.reshape(batch, n_tokens // bands, bands, dim), grid_mask

    def predict(self, waves: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Class probabilities [B, predictor_class] of a fine-tuned checkpoint: the predictor on every
        token, averaged over the clip's valid tokens, then a sigmoid."""
        if self.predictor is None:
            raise ValueError(
                "this BEATs model has no predictor: load a fine-tuned (finetuned_model) checkpoint"
            )
        tokens, padding_mask = self(waves, lengths)
        logits = self.predictor(self.predictor_dropout(tokens))
        valid = (~padding_mask)[..., None].to(logits.dtype)
        return torch.sigmoid((logits * valid).sum(1) / valid.sum(1))


def build(config_name: str = DEFAULT_CONFIG, **options) -> BEATs:
    """A randomly initialised BEATs of a named configuration; ``options`` override its fields."""
    if config_name not in CONFIGS:
        raise ValueError(
            f"unknown BEATs config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}"
        )
    known = {f.name for f in fields(BEATsConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown BEATs option(s) {unknown}: expected fields of BEATsConfig")
    return BEATs(replace(CONFIGS[config_name], **options))


# ----------------------------------------------------------------------------- checkpoint filter

_LAYER_COPY_OF_BIAS = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight")
_FIRST_BIAS_TABLE = "encoder.layers.0.self_attn.relative_attention_bias.weight"
_OTHER_BACKBONE_PREFIXES = ("modality_encoders.", "blocks.", "model.blocks.", "model.local_encoder.")


def _split_payload(payload: object) -> tuple[dict, dict]:
    if not isinstance(payload, dict) or "model" not in payload or "cfg" not in payload:
        found = list(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            "not a BEATs checkpoint: expected a dict with 'cfg' and 'model' "
            f"(as the official BEATs_iter3*.pt files), found {found}"
        )
    cfg, state = payload["cfg"], payload["model"]
    other = isinstance(cfg, dict) and isinstance(cfg.get("model"), dict)
    if isinstance(state, dict):
        other = other or any(str(k).startswith(_OTHER_BACKBONE_PREFIXES) for k in state)
    if other:
        raise CheckpointError(
            "this is a fairseq-style EAT or FISHER checkpoint (cfg['model'] sub-dict or "
            "'modality_encoders.' / 'blocks.' keys), not BEATs: load it with kit.backbones.load('eat' or "
            "'fisher', ...)"
        )
    if not isinstance(cfg, dict) or not isinstance(state, dict):
        raise CheckpointError("'cfg' and 'model' must both be dicts")
    return cfg, state


def filter_state(raw: object) -> tuple[BEATsConfig, dict]:
    """A read official-format file (``{"cfg": dict, "model": state_dict}``) -> (config, state dict).

    The official model shares one relative-position table between its layers, so its state dict may
    hold a copy under every layer; they must be equal, and only layer 0's is kept (as this model)."""
    cfg, state = _split_payload(raw)
    known = {f.name for f in fields(BEATsConfig)}
    try:
        config = BEATsConfig(**{k: v for k, v in cfg.items() if k in known})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"unusable BEATs cfg: {err}") from err
    state = dict(state)
    for key in [k for k in state if (m := _LAYER_COPY_OF_BIAS.fullmatch(str(k))) and m.group(1) != "0"]:
        copy = state.pop(key)
        first = state.get(_FIRST_BIAS_TABLE)
        if isinstance(first, Tensor) and isinstance(copy, Tensor) and not torch.equal(copy, first):
            raise CheckpointError(
                f"{key} differs from {_FIRST_BIAS_TABLE}; BEATs shares one relative position table across layers"
            )
    return config, state


def from_checkpoint(path: str | os.PathLike, **options) -> BEATs:
    """Load an official-format BEATs checkpoint (``{"cfg": dict, "model": state_dict}``, any size) with a
    strict key and shape check. ``options`` may change the training-time fields
    (``REGULARISATION_FIELDS``, e.g. ``encoder_layerdrop=0.0``); everything else comes from ``cfg``."""
    unknown = sorted(set(options) - set(REGULARISATION_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for a BEATs checkpoint: "
            f"expected some of {', '.join(REGULARISATION_FIELDS)}"
        )
    return loading.load_checkpoint(
        path, "BEATs", filter_state, lambda config: BEATs(replace(config, **options))
    )
