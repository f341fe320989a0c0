"""NA-BEATs (MERL, the DCASE 2026 Task 2 winner): frozen BEATs on the near channel and on a noise
reference (the far channel), with a trainable cross-attention fusion block after every layer.

Architecture (written from the description of the release format, ``shared/fixtures/nabeats/README.md``;
MERL's code is not used): both streams go through the same frozen BEATs (``kit.backbones.beats``):
front-end, patch embedding, position conv, and layer by layer. After BEATs layer ``i``, fusion block
``i`` updates the near stream ``x`` from the reference stream ``r`` at the same depth:
``x = x + MHA(RMSNorm_q(x), RMSNorm_kv(r), RMSNorm_kv(r))``, ``x = x + SwiGLU(RMSNorm_ffn(x))`` (8
heads, SwiGLU hidden width 3C, RMSNorm eps 1e-6, no bias); the fused ``x`` enters layer ``i + 1``,
the reference stream is plain BEATs. The output is ``x`` after the last block: ``[B, N, C]``, tokens
time-major (token = t * 8 + f), no final norm (post-LN base).

Padding is exact, as in the project's BEATs: each stream's token mask comes from its own clip
lengths, padded tokens are zeroed before the position conv, self-attention ignores padded keys of
its own stream and cross-attention ignores padded reference tokens. A clip's valid tokens are the
same in a padded batch as alone (the authors' code leaks padding through the position conv, and its
token mask, derived as upstream BEATs does, flags the wrong tokens under the time-major order).

Loading (``kit.backbones.load("nabeats", checkpoint, base=...)``): a release is TWO files.

- ``checkpoint``: a PyTorch Lightning ``.ckpt`` holding only the fusion layers. It is a pickle with
  omegaconf objects in its hyper-parameters; it is read by a restricted unpickler (``read_lightning``)
  that admits only tensor storages and their rebuild functions, ``OrderedDict``/``defaultdict``/
  ``dict`` and ``typing.Any``, and turns the omegaconf classes into plain dicts and values; any other
  global is refused, so no code in the file runs and omegaconf need not be installed. The weights are
  ``state_dict`` (the EMA weights when trained with MERL's EMA callback), never
  ``current_model_state`` (the raw training weights).
- ``base``: Microsoft's ``BEATs_iter3.pt`` (``{"cfg", "model"}``), which sets every size. Given as a
  path or URL; by default the file named by the checkpoint's ``model_id`` (``BEATs_iter3.pt``) beside
  the checkpoint, else in the cache (``$KIT_CACHE/urls``, MERL's ``$NASSL_CACHE_DIR`` or
  ``~/.cache/nassl``), else downloaded from the release into the cache.

Release names (``checkpoint="dcase2026_nabeats_seed0"``, ``_seed1``, ``_seed2``) resolve to
``https://github.com/merlresearch/noise-aware-audio-ssl/releases/download/v1.0.0/<name>.ckpt`` and
the base to ``.../v1.0.0/BEATs_iter3.pt``, both fetched once into the cache
(``kit.backbones.resolve_checkpoint``). Licences: per the release's ``PRETRAINED-MODEL-LICENES.md``,
the ``*.ckpt`` weights are AGPL-3.0-or-later (Copyright 2026 MERL); the re-hosted ``BEATs_iter3.pt``
is MIT (Copyright 2022 Microsoft). This file contains no MERL code.

Training: the base is frozen and always runs in eval mode (the release's ``trainable_base: false``,
``eval_base: true``); the fusion blocks are the trainable part (``blocks``; mode ``full`` or
``partial`` with every block trains them, as MERL does). ``lora_target_modules`` matches the BEATs
attention projections (q, k, v, out: shared by both streams) and the fusion blocks' attention output
projections. Layer-wise gradient decay of BEATs is not applied (its base is frozen): an assumption,
the release format does not say.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import typing
import zipfile
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from kit.backbones import (
    DEFAULT_CACHE,
    Backbone,
    CheckpointError,
    CheckpointNotFoundError,
    beats,
    loading,
    resolve_checkpoint,
)

RELEASE_URL = "https://github.com/merlresearch/noise-aware-audio-ssl/releases/download/v1.0.0"
RELEASE_IDS = ("dcase2026_nabeats_seed0", "dcase2026_nabeats_seed1", "dcase2026_nabeats_seed2")
RELEASES = {name: f"{RELEASE_URL}/{name}.ckpt" for name in RELEASE_IDS}
RELEASE_SIZES = {name: {"config": "release"} for name in RELEASE_IDS}  # their size, for kit.tools.bench
BASE_NAME = "BEATs_iter3"
BASE_URL = f"{RELEASE_URL}/{BASE_NAME}.pt"
STATE_PREFIX = "model.encoder."  # the fusion weights' prefix in the Lightning state_dict
FUSION_PREFIX = "fusion_layers."


def release_checkpoint(spec):
    """A release name (``dcase2026_nabeats_seed0``, ...) -> its URL; anything else as it is
    (``kit.backbones.load`` calls this before resolving the checkpoint)."""
    return RELEASES.get(str(spec), spec)


@dataclass(frozen=True)
class FusionConfig:
    """The fusion blocks (``PreNormCrossAttnBlock`` of the release config)."""

    num_heads: int = 8
    hidden_dim_multiplier: int = 3
    norm_eps: float = 1e-6
    dropout: float = 0.1  # attention dropout, in training only


CONFIGS: dict[str, tuple[str, FusionConfig]] = {
    # BEATs_iter3 sizes (12 layers, 768 wide) + 12 fusion blocks: the released model
    "release": ("release", FusionConfig()),
    # the project's small BEATs (4 layers, 192 wide) + 4 fusion blocks, for CPU runs
    "cpu": ("cpu", FusionConfig()),
    # unit tests
    "unit": ("unit", FusionConfig()),
}
DEFAULT_CONFIG = "cpu"


# ----------------------------------------------------------------------------------------------
# The fusion block


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)  # in float32 under autocast
        return (x.float() * scale).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """``down(silu(gate(h)) * up(h))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class CrossAttention(nn.Module):
    """``nn.MultiheadAttention`` with queries and keys from different sequences, under the same
    parameter names (packed ``in_proj_weight`` rows q, k, v; ``out_proj``), so the release loads as
    it is; written out so that the output projection is an ordinary ``nn.Linear`` call (LoRA can
    wrap it) and the key mask is the additive one BEATs builds."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion width {dim} is not a multiple of its {num_heads} attention heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, context: Tensor, key_mask: Tensor | None) -> Tensor:
        """``query`` [B, N, C], ``context`` [B, M, C], ``key_mask`` [B, 1, 1, M] (0 / -inf) or None."""
        batch, n, dim = query.shape
        w_q, w_kv = self.in_proj_weight.split([dim, 2 * dim])
        b_q, b_kv = self.in_proj_bias.split([dim, 2 * dim])
        heads = self.num_heads
        q = F.linear(query, w_q, b_q).view(batch, n, heads, -1).transpose(1, 2)
        k, v = F.linear(context, w_kv, b_kv).view(batch, -1, 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, dim))


class FusionBlock(nn.Module):
    """Pre-norm cross-attention from the near stream to the reference stream, then a SwiGLU."""

    def __init__(self, dim: int, config: FusionConfig) -> None:
        super().__init__()
        self.norm_q = RMSNorm(dim, config.norm_eps)
        self.norm_kv = RMSNorm(dim, config.norm_eps)
        self.attention = CrossAttention(dim, config.num_heads, config.dropout)
        self.norm_ffn = RMSNorm(dim, config.norm_eps)
        self.ffn = SwiGLU(dim, config.hidden_dim_multiplier * dim)

    def forward(self, x: Tensor, reference: Tensor, key_mask: Tensor | None, trace: dict | None = None):
        attended = self.attention(self.norm_q(x), self.norm_kv(reference), key_mask)
        if trace is not None:
            trace["fusion_attn_out"] = attended
        x = x + attended
        return x + self.ffn(self.norm_ffn(x))


# ----------------------------------------------------------------------------------------------
# The model


class NABEATs(Backbone):
    """NA-BEATs behind the :class:`kit.backbones.Backbone` interface (``takes_reference``: the far
    channel is a required second input)."""

    name = "nabeats"
    takes_reference = True
    has_grid = True
    lora_target_modules = (
        r"(?:.*\.)?(?:base\.encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj"
        r"|fusion_layers\.\d+\.attention\.out_proj)"
    )

    def __init__(self, base: beats.BEATs, fusion: FusionConfig) -> None:
        super().__init__()
        if base.config.layer_norm_first:
            raise ValueError("NA-BEATs is built on a post-LN BEATs (layer_norm_first False, as BEATs_iter3)")
        self.base = base
        self.fusion = fusion
        self.embed_dim = base.embed_dim
        self.freq_patches = base.freq_patches
        self.fusion_layers = nn.ModuleList(
            FusionBlock(self.embed_dim, fusion) for _ in range(base.config.encoder_layers)
        )
        for block in self.fusion_layers:  # the release's init_identity: an untrained block is the identity
            nn.init.zeros_(block.attention.out_proj.weight)
            nn.init.zeros_(block.attention.out_proj.bias)
            nn.init.zeros_(block.ffn.down_proj.weight)
            nn.init.zeros_(block.ffn.down_proj.bias)
        self.base.requires_grad_(False)
        self.base.eval()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.fusion_layers

    def train(self, mode: bool = True) -> NABEATs:
        super().train(mode)
        self.base.eval()  # the frozen encoder never runs dropout or layerdrop (the release's eval_base)
        return self

    def frontend(self, waves: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.base.frontend(waves, lengths)

    def _reference_input(self, waves: Tensor, reference, reference_lengths) -> tuple[Tensor, Tensor | None]:
        if reference is None:
            raise ValueError(
                "nabeats needs a noise reference: call model(waves, lengths, reference=far, "
                "reference_lengths=...) with the far channel of the same clips (in extraction and "
                "training the toolkit passes it for stereo data)"
            )
        if reference.ndim != 2 or reference.shape[0] != waves.shape[0]:
            raise ValueError(
                f"reference must be [batch, samples] with the batch of waves ({waves.shape[0]}), got "
                f"{tuple(reference.shape)}"
            )
        return reference, reference_lengths

    def _tokens(self, waves: Tensor, lengths, stream: str, augment=None, trace=None):
        fbank, n_frames = self.base.frontend(waves, lengths)
        fbank = self._augmented(fbank, n_frames, augment)
        if trace is not None:
            trace[f"fbank_{stream}"] = fbank
        try:
            x, padding_mask = self.base.patch_tokens(fbank, n_frames)
        except ValueError as err:
            raise ValueError(f"{'reference ' if stream == 'nref' else ''}{err}") from err
        if trace is not None:
            trace[f"patch_features_{stream}"] = x
        return x, padding_mask

    def _step(self, i: int, x: Tensor, r: Tensor, context: tuple, trace=None) -> tuple[Tensor, Tensor]:
        """BEATs layer ``i`` on both streams, then fusion block ``i`` on ``x``."""
        layer, block = self.base.encoder.layers[i], self.fusion_layers[i]
        bias_x, mask_x, bias_r, mask_r = context
        joint = not torch.is_grad_enabled() or self._base_trains()
        if joint and x.shape == r.shape and (mask_x is None) == (mask_r is None):
            # one call for both streams when their shapes allow: larger matrix products
            both_mask = None if mask_x is None else torch.cat([mask_x, mask_r])
            x, r = layer(torch.cat([x, r]), bias_x, both_mask).chunk(2)
        else:
            x = layer(x, bias_x, mask_x)
            with self._reference_grad():
                r = layer(r, bias_r, mask_r)
        inner = {} if trace is not None else None
        if trace is not None:
            trace[f"layer{i}_x_beats_out"], trace[f"layer{i}_nref_beats_out"] = x, r
        x = block(x, r, mask_r, inner)
        if trace is not None:
            trace[f"layer{i}_fusion_attn_out"], trace[f"layer{i}_x_fused"] = inner["fusion_attn_out"], x
        return x, r

    def _base_trains(self) -> bool:
        return any(p.requires_grad for p in self.base.parameters())

    def _reference_grad(self):
        """The reference stream depends only on the base: no graph for it unless a base weight trains
        (LoRA on the BEATs projections), which saves its activations in training."""
        return contextlib.nullcontext() if self._base_trains() else torch.no_grad()

    def encode(
        self,
        waves: Tensor,
        lengths: Tensor | None,
        reference: Tensor,
        reference_lengths: Tensor | None = None,
        augment=None,
        trace: dict | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(tokens [B, N, C], padding_mask [B, N])``; ``trace``, when a dict, receives the
        intermediate tensors under the names of the release fixture (``fbank_x``, ``encoder_in_x``,
        ``layer{i}_x_fused``, ...)."""
        x, pad_x = self._tokens(waves, lengths, "x", augment, trace)
        with self._reference_grad():
            r, pad_r = self._tokens(reference, reference_lengths, "nref", None, trace)
            r, bias_r, mask_r = self.base.encoder.prepare(r, pad_r)
        x, bias_x, mask_x = self.base.encoder.prepare(x, pad_x)
        if trace is not None:
            trace.update(encoder_in_x=x, encoder_in_nref=r, layer0_pos_bias=bias_x)
        context = (bias_x, mask_x, bias_r, mask_r)
        for i in range(len(self.fusion_layers)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and trace is None:
                x, r = activation_checkpoint(self._step, i, x, r, context, use_reentrant=False)
            else:
                x, r = self._step(i, x, r, context, trace)
        return x.masked_fill(pad_x[..., None], 0.0), pad_x

    def forward(
        self,
        waves: Tensor,
        lengths: Tensor | None = None,
        augment=None,
        reference: Tensor | None = None,
        reference_lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``waves`` [B, T] (near channel) and ``reference`` [B, T'] (its far channel), 16 kHz, with
        their sample lengths -> ``(tokens [B, N, C], padding_mask [B, N])``; ``augment(fbank,
        n_frames)`` applies to the near channel's fbank in training mode."""
        reference, reference_lengths = self._reference_input(waves, reference, reference_lengths)
        return self.encode(waves, lengths, reference, reference_lengths, augment)

    def grid_tokens(
        self,
        waves: Tensor,
        lengths: Tensor | None = None,
        reference: Tensor | None = None,
        reference_lengths: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(tokens [B, T, 8, C], padding_mask [B, T])``: the tokens on their time x frequency grid."""
        tokens, padding_mask = self(waves, lengths, reference=reference, reference_lengths=reference_lengths)
        batch, n, dim = tokens.shape
        grid = tokens.view(batch, n // self.freq_patches, self.freq_patches, dim)
        return grid, padding_mask[:, :: self.freq_patches]


def build(config_name: str = DEFAULT_CONFIG, **options) -> NABEATs:
    """A randomly initialised NA-BEATs of a named configuration (the fusion blocks start as the
    identity, as the release's ``init_identity``); ``options`` override BEATs config fields."""
    if config_name not in CONFIGS:
        raise ValueError(
            f"unknown nabeats config {config_name!r}: expected one of {', '.join(sorted(CONFIGS))}"
        )
    if "base" in options:
        raise ValueError(
            "nabeats: base= goes with a checkpoint (the .ckpt holds the fusion layers, the base file the "
            "frozen BEATs); without a checkpoint a random-init configuration is built, base and all"
        )
    base_config, fusion = CONFIGS[config_name]
    return NABEATs(beats.build(base_config, **options), fusion)


# ----------------------------------------------------------------------------------------------
# Reading a Lightning checkpoint without running its pickle


class _OmegaConf:
    """Stands in for an omegaconf class while unpickling: keeps the pickled state, nothing else."""

    kind = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.state = None

    def __setstate__(self, state) -> None:
        self.state = state


_OMEGACONF_CLASSES = {
    "omegaconf.dictconfig": ("DictConfig",),
    "omegaconf.listconfig": ("ListConfig",),
    "omegaconf.base": ("ContainerMetadata", "Metadata"),
    "omegaconf.nodes": (
        "AnyNode",
        "StringNode",
        "IntegerNode",
        "FloatNode",
        "BooleanNode",
        "BytesNode",
        "PathNode",
    ),
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


@dataclass(frozen=True)
class _LazyTensor:
    """A tensor of the archive, read only when it is kept (optimiser moments never are)."""

    key: str
    dtype: torch.dtype
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, offset: int, size, stride, requires_grad=False, hooks=None, metadata=None):
    key, dtype = storage
    return _LazyTensor(key, dtype, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): defaultdict,
    ("builtins", "dict"): dict,
    ("typing", "Any"): typing.Any,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch zip checkpoint admitting only the globals above: tensors become
    ``_LazyTensor`` references into the archive (rebuilt by this module's own functions), omegaconf
    objects become ``_OmegaConf``."""

    def __init__(self, data: bytes, source: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.source = source

    def find_class(self, module: str, name: str):
        import _compat_pickle  # protocol 2 (torch.save's default) names Python 2 modules

        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if name in _OMEGACONF_CLASSES.get(module, ()):
            return type(name, (_OmegaConf,), {"kind": name})
        raise CheckpointError(
            f"{self.source}: refusing to load the global {module}.{name} from this pickle (only tensors, "
            "plain containers and omegaconf configs are read from a NA-BEATs checkpoint)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != "storage":
            raise CheckpointError(f"{self.source}: unknown persistent id {str(pid)[:80]} in the pickle")
        if not isinstance(pid[1], torch.dtype):
            raise CheckpointError(f"{self.source}: storage {pid[2]} has no known element type ({pid[1]!r})")
        return str(pid[2]), pid[1]


def _plain(value, tensor):
    """omegaconf stand-ins -> dicts, lists and values, ``_LazyTensor`` -> ``tensor(it)``; containers
    converted recursively (an ``OrderedDict`` stays one)."""
    if isinstance(value, _LazyTensor):
        return tensor(value)
    if isinstance(value, _OmegaConf):
        state = value.state if isinstance(value.state, dict) else {}
        if value.kind in ("DictConfig", "ListConfig"):
            return _plain(state.get("_content"), tensor)
        if value.kind.endswith("Node"):
            return _plain(state.get("_val"), tensor)
        return None  # metadata
    if isinstance(value, dict):
        converted = {k: _plain(v, tensor) for k, v in value.items()}
        return OrderedDict(converted) if isinstance(value, OrderedDict) else converted
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, tensor) for v in value)
    return value


def read_lightning(path: str | os.PathLike, keep: tuple[str, ...] | None = None) -> dict:
    """The content of a PyTorch Lightning ``.ckpt`` (torch zip format) as plain Python: tensors,
    dicts (state dicts stay ``OrderedDict``), lists and values; omegaconf configs as dicts. Nothing
    in the pickle is executed; a global other than those ``_RestrictedUnpickler`` admits is refused.
    ``keep``: only these top-level entries; the others are None (their tensors are never read)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.lstrip()[:1] == b"<":
        raise CheckpointError(
            f"{path} is a text/HTML page, not a NA-BEATs checkpoint (a failed download? an error page "
            "saved under the checkpoint's name); delete it and download the .ckpt again"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a torch checkpoint archive (no single */data.pkl inside)")
            prefix = pickles[0][: -len("data.pkl")]
            if prefix + "byteorder" in archive.namelist():
                if archive.read(prefix + "byteorder").decode().strip() != "little":
                    raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
            raw = _RestrictedUnpickler(archive.read(pickles[0]), path).load()
            if keep is not None and isinstance(raw, dict):
                raw = {k: (v if k in keep else None) for k, v in raw.items()}
            storages: dict[str, Tensor] = {}

            def tensor(ref: _LazyTensor) -> Tensor:
                if ref.key not in storages:
                    data = archive.read(f"{prefix}data/{ref.key}")
                    storages[ref.key] = (
                        torch.frombuffer(bytearray(data), dtype=ref.dtype)
                        if data
                        else torch.empty(0, dtype=ref.dtype)
                    )
                return storages[ref.key].as_strided(ref.size, ref.stride, ref.offset)

            return _plain(raw, tensor)
    except CheckpointError:
        raise
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        OSError,
        KeyError,
        ValueError,
        RuntimeError,
    ) as err:
        raise CheckpointError(
            f"{path}: not a readable NA-BEATs checkpoint (corrupt, truncated or not a Lightning .ckpt; "
            f"{type(err).__name__}: {err})"
        ) from err


# ----------------------------------------------------------------------------------------------
# From the read checkpoint to the fusion weights


_FUSION_KEY = re.compile(r"fusion_layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Release:
    """What the ``.ckpt`` says: the fusion settings, the number and width of its fusion layers and
    the base model it names (``model_id``)."""

    fusion: FusionConfig
    layers: int
    dim: int
    model_id: str


def filter_state(raw: object) -> tuple[Release, dict[str, Tensor]]:
    """A read Lightning checkpoint -> (what it describes, the fusion weights named ``fusion_layers.*``).

    ``state_dict`` is used (the EMA weights when MERL's EMA callback trained it); only
    ``hyper_parameters["model_cfg"]`` is read besides it (release defaults where it is absent)."""
    if not isinstance(raw, dict) or "state_dict" not in raw:
        if isinstance(raw, dict) and {"cfg", "model"} <= set(raw):
            raise CheckpointError(
                "this is a BEATs file ({'cfg', 'model'}), the frozen base of NA-BEATs, not its checkpoint: "
                "pass it as base=... and the NA-BEATs .ckpt as the checkpoint"
            )
        found = sorted(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(
            f"not a NA-BEATs Lightning checkpoint: expected a dict with 'state_dict' and "
            f"'hyper_parameters', found {found}"
        )
    hyper = raw.get("hyper_parameters") or {}
    model_cfg = (hyper.get("model_cfg") if isinstance(hyper, dict) else None) or {}
    target = str(model_cfg.get("_target_", "NABEATs"))
    if target.rsplit(".", 1)[-1] != "NABEATs":
        raise CheckpointError(
            f"its model_cfg builds {target}, not NA-BEATs (nassl.model.NABEATs): only NA-BEATs is "
            "supported (not NA-EAT, NA-Dasheng or the IWAENC variants)"
        )
    if model_cfg.get("trainable_base"):
        raise CheckpointError("its model_cfg has trainable_base: true; only a frozen base is supported")
    layer_cfg = model_cfg.get("fusion_layer_cfg") or {}
    layer_target = str(layer_cfg.get("_target_", "PreNormCrossAttnBlock"))
    if (
        layer_target.rsplit(".", 1)[-1] != "PreNormCrossAttnBlock"
        or layer_cfg.get("ffn_type", "swiglu") != "swiglu"
    ):
        raise CheckpointError(
            f"its fusion layers are {layer_target} (ffn_type {layer_cfg.get('ffn_type', 'swiglu')!r}); only "
            "PreNormCrossAttnBlock with a SwiGLU feed-forward (the DCASE 2026 release) is supported"
        )
    attention = layer_cfg.get("attention_cfg") or {}
    defaults = FusionConfig()
    fusion = FusionConfig(
        num_heads=int(attention.get("num_heads", defaults.num_heads)),
        hidden_dim_multiplier=int(layer_cfg.get("hidden_dim_multiplier", defaults.hidden_dim_multiplier)),
        norm_eps=float(layer_cfg.get("norm_eps", defaults.norm_eps)),
        dropout=float(attention.get("dropout", defaults.dropout)),
    )

    weights = raw["state_dict"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"its state_dict is a {type(weights).__name__}, expected a dict of tensors")
    state = {
        k[len(STATE_PREFIX) :]: v
        for k, v in weights.items()
        if str(k).startswith(STATE_PREFIX + FUSION_PREFIX)
    }
    if not state:
        raise CheckpointError(
            f"its state_dict holds no fusion layers (no '{STATE_PREFIX}{FUSION_PREFIX}*' keys among "
            f"{len(weights)}: {sorted(weights)[:4]}): not a NA-BEATs checkpoint"
        )
    others = sorted(k for k in weights if not str(k).startswith(STATE_PREFIX + FUSION_PREFIX))
    if others:
        raise CheckpointError(
            f"its state_dict holds weights besides the fusion layers: {others[:5]} ({len(others)}); a NA-BEATs "
            "release holds only those (the frozen base comes from BEATs_iter3.pt)"
        )
    indices = sorted({int(m.group(1)) for k in state if (m := _FUSION_KEY.fullmatch(k))})
    if indices != list(range(len(indices))):
        raise CheckpointError(f"its fusion layers are numbered {indices}, expected 0..{len(indices) - 1}")
    first = state.get(f"{FUSION_PREFIX}0.norm_q.weight")
    if not isinstance(first, Tensor) or first.ndim != 1:
        raise CheckpointError(
            f"its state_dict lacks {STATE_PREFIX}{FUSION_PREFIX}0.norm_q.weight (a [C] tensor)"
        )
    dim = int(first.shape[0])
    gate = state.get(f"{FUSION_PREFIX}0.ffn.gate_proj.weight")
    if isinstance(gate, Tensor) and gate.ndim == 2 and gate.shape[0] != fusion.hidden_dim_multiplier * dim:
        raise CheckpointError(
            f"gate_proj.weight is {tuple(gate.shape)} but hidden_dim_multiplier {fusion.hidden_dim_multiplier} "
            f"of width {dim} gives {fusion.hidden_dim_multiplier * dim} rows"
        )
    if dim % fusion.num_heads:
        raise CheckpointError(f"fusion width {dim} is not a multiple of num_heads {fusion.num_heads}")
    model_id = str(model_cfg.get("model_id", BASE_NAME))
    return Release(fusion, len(indices), dim, model_id), state


# ----------------------------------------------------------------------------------------------
# Finding the base and loading


def _nassl_cache() -> Path:
    return Path(os.environ.get("NASSL_CACHE_DIR", Path.home() / ".cache" / "nassl"))


def base_file(checkpoint: Path, base: str | os.PathLike | None, model_id: str = BASE_NAME) -> Path:
    """The base BEATs file: ``base`` (path or URL) when given; else ``<model_id>.pt`` beside the
    checkpoint, in the kit cache (``urls/``, where a download of the release lands) or in MERL's cache;
    else downloaded from the release (beside a release checkpoint, else into the kit cache)."""
    if base is not None:
        return resolve_checkpoint(base)
    name = f"{model_id}.pt"
    for folder in (checkpoint.parent, DEFAULT_CACHE / "urls", _nassl_cache()):
        if (folder / name).is_file():
            return folder / name
    if model_id != BASE_NAME:
        raise CheckpointNotFoundError(
            f"{checkpoint} names the base {model_id!r}, but {name} is neither beside it, in {DEFAULT_CACHE / 'urls'} "
            f"nor in {_nassl_cache()}: pass its path as base=..."
        )
    released = checkpoint.name in {f"{r}.ckpt" for r in RELEASES}
    cache = checkpoint.parent.parent if released and checkpoint.parent.name == "urls" else None
    try:
        return resolve_checkpoint(BASE_URL, cache)
    except CheckpointError as err:
        raise CheckpointError(
            f"the base {name} of {checkpoint} is not beside it nor cached, and downloading it failed: {err}. "
            f"Download {BASE_URL} elsewhere and pass base=<its path>"
        ) from err


def from_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None, **options) -> NABEATs:
    """Load a NA-BEATs release: the Lightning ``.ckpt`` at ``path`` (or the one ``.ckpt`` in a folder)
    with its base BEATs file (see :func:`base_file`), strictly: every fusion tensor present with the
    shape the base's sizes imply, nothing else. ``options``: BEATs' training-time fields
    (``beats.REGULARISATION_FIELDS``) for the base (which runs in eval mode anyway)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.ckpt"))
        if len(found) != 1:
            raise CheckpointError(
                f"{path}: expected one NA-BEATs .ckpt in this folder, found {[p.name for p in found]}"
            )
        path = found[0]
    elif not path.is_file():
        raise CheckpointNotFoundError(f"nabeats checkpoint not found: {path}")
    try:
        release, state = filter_state(read_lightning(path, keep=("state_dict", "hyper_parameters")))
    except CheckpointError as err:
        message = str(err)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from err
    base_path = base_file(path, base, release.model_id)
    base_model = beats.from_checkpoint(base_path, **options)
    config = base_model.config
    if (config.encoder_embed_dim, config.encoder_layers) != (release.dim, release.layers):
        raise CheckpointError(
            f"the base {base_path} (BEATs with {config.encoder_layers} layers of width "
            f"{config.encoder_embed_dim}) does not match {path} ({release.layers} fusion layers of width "
            f"{release.dim}): NA-BEATs has one fusion block per BEATs layer at the encoder's width; pass "
            "the base the checkpoint was trained on (BEATs_iter3.pt of the same release)"
        )
    model = NABEATs(base_model, release.fusion)
    loading.strict_load(
        model.fusion_layers, {k[len(FUSION_PREFIX) :]: v for k, v in state.items()}, path, "NA-BEATs fusion"
    )
    model.pretrained = True
    return model.eval()


__all__ = [
    "BASE_URL",
    "CONFIGS",
    "NABEATs",
    "RELEASES",
    "build",
    "filter_state",
    "from_checkpoint",
    "read_lightning",
]
