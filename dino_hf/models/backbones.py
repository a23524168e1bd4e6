"""What a backbone family is to dino_hf: how it is built, loaded, run on a crop batch, regularised,
grouped for the optimiser and exported.

Every family is a ``transformers`` model class that plain ``AutoModel`` loads, and an export is the same
class as the input. A family is one :class:`BackboneFamily` entry of :data:`FAMILIES` (adding a family is
adding an entry):

| ``model_type`` | DINO embedding | stochastic depth | crops | mask token (iBOT) |
| --- | --- | --- | --- | --- |
| ``vit``, ``deit`` | CLS of ``last_hidden_state`` (fast path: :mod:`dino_hf.models.vit_forward`) | hooks | multiple of the patch | built with ``use_mask_token=True``, dropped on export |
| ``dinov2``, ``dinov2_with_registers`` | CLS of ``last_hidden_state`` (registers excluded) | native | multiple of the patch | the model's own |
| ``dinov3_vit`` | CLS of ``last_hidden_state`` (registers excluded) | native | any size (RoPE) | the model's own |
| ``convnext``, ``dinov3_convnext`` | the pooled output | native | at least the network's stride | none (no patch tokens) |
| ``resnet`` | the pooled output | none | any size | none |

Attention maps exist for the transformers (:attr:`BackboneFamily.has_attention`), not for the ConvNets.
An export (:func:`save_backbone`) is the stock class of the input (``ViTModel``, ``Dinov2Model``...) that
plain ``AutoModel.from_pretrained(folder)`` loads with nothing missing or unexpected; a ViT or DeiT,
which DINO trains without a pooler, gets an identity pooler (``pooler_act="linear"``, weights I, bias 0),
so that ``pooler_output`` and ``pipeline("image-feature-extraction", pool=True)`` are the DINO embedding
in every family. How a person loads and uses an export of each family, the code the model card shows
and the tools follow, is :meth:`BackboneFamily.usage` (:class:`BackboneUsage`).

The patch tokens (the iBOT input) are ``last_hidden_state`` after the prefix tokens (CLS, DeiT's
distillation token, registers): :meth:`BackboneFamily.embed_tokens`.

The module also runs a backbone of any family on an image batch (:func:`backbone_forward`,
:func:`backbone_embedding`) and writes exports (:func:`save_backbone`); loading one for the tools is
:mod:`dino_hf.eval.loading`.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    PreTrainedConfig,
    PreTrainedModel,
    ViTImageProcessor,
)
from transformers.image_utils import PILImageResampling
from transformers.models.auto.modeling_auto import MODEL_MAPPING, MODEL_MAPPING_NAMES

from dino_hf.base.run_folder import PROCESSOR_CONFIG_NAME
from dino_hf.data.augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dino_hf.models.vit_forward import add_stochastic_depth, embed_class_token, encode_tokens

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "BackboneFamily",
    "BackboneUsage",
    "backbone_embedding",
    "backbone_forward",
    "build_image_processor",
    "config_image_size",
    "config_patch_size",
    "family_of",
    "save_backbone",
]



@dataclass(frozen=True)
class BackboneFamily:
    """One family of transformers backbones and what DINO training needs to know about it.

    Attributes:
        model_types: the ``config.model_type`` values of the family.
        embedding: ``"class_token"`` (the CLS token of ``last_hidden_state``, after the final norm) or
            ``"pooled"`` (``pooler_output``, flattened).
        stochastic_depth: ``"hooks"`` (drop-path hooks on each block, the weights stay stock),
            ``"config"`` (the model's own ``drop_path_rate``) or ``None`` (the family has none).
        crops: ``"patch_multiple"`` (crop sides must be multiples of the patch size), ``"stride"``
            (at least the network's total stride) or ``"any"``.
        fast_embedding: the backbone has ViT-style blocks: :func:`embed_class_token` applies (unless
            its blocks are sharded by FSDP, whose hooks fire only through the modules' own forward).
        has_attention: attention maps exist (and the attention implementation can be switched).
        load_kwargs: extra constructor arguments of a backbone in training (no pooler for ViT), and of
            ``from_pretrained`` for a folder without the export's identity pooler (:meth:`from_pretrained_kwargs`).
        block_pattern: regular expression whose first group is a parameter's block index (for
            layer-wise learning-rate decay); parameters before the first block (embeddings) are 0,
            after the last (final norms) ``num_blocks + 1``.
        mask_token: how the family replaces masked patches (``bool_masked_pos``, the iBOT input):
            ``"native"`` (the model has ``embeddings.mask_token``, unless its config says
            ``use_mask_token=False``), ``"constructor"`` (only when built with ``use_mask_token=True``;
            exports drop it, so that they stay the stock model) or ``None`` (no patch tokens).
        channels_last: feed the crops to the network in channels-last memory order (NHWC; the weights stay
            as they are, so checkpoints and exports do not change). oneDNN's convolutions, batch norms and
            max pooling then run without converting layouts at every layer: a ResNet's forward and backward
            on 28 px crops measured 1.1-1.7x faster on a 2-core CPU. ConvNeXt blocks permute to NHWC
            themselves and measured no faster (slower in bf16), so they keep NCHW.
    """

    model_types: tuple[str, ...]
    embedding: str
    stochastic_depth: str | None
    crops: str
    fast_embedding: bool = False
    has_attention: bool = True
    load_kwargs: Mapping[str, Any] = None  # type: ignore[assignment]
    block_pattern: str = r"(?:^|\.)(?:layers|layer)\.(\d+)\."
    mask_token: str | None = None
    names: tuple[str, ...] = ()
    pooler: str | None = None
    channels_last: bool = False

    # ---- what a person calls it ---------------------------------------------------------------------
    def name_of(self, model_type: str) -> str:
        """The family's name for ``model_type`` as the card and the tools' messages say it (``"DINOv2 ViT"``)."""
        names = dict(zip(self.model_types, self.names, strict=False))
        return names.get(model_type, model_type)

    def usage(self, config: PreTrainedConfig | Mapping[str, Any]) -> BackboneUsage:
        """How plain ``transformers`` loads and uses an export of this family whose ``config.json`` is ``config``
        (a config or its dict): the class, the ``from_pretrained`` and pipeline calls, the embedding."""
        values = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
        model_type = str(values.get("model_type"))
        identity_pooler = self.pooler == "identity" and has_identity_pooler(values)
        no_pooler = self.pooler == "identity" and not identity_pooler  # an export of an earlier dino_hf
        view = _AttributeView(values)
        prefix = self.num_prefix_tokens(view)
        notes = []
        if self.embedding == "class_token":
            embedding_code = "outputs.last_hidden_state[:, 0]"
            text = "the CLS token of `last_hidden_state` (after the final layer norm)"
            others = prefix - 1 - int(model_type == "deit")
            if model_type == "deit":
                notes.append("The distillation token that follows it is not part of it.")
            if others:
                notes.append(f"The {others} register tokens that follow it are not part of it.")
            if identity_pooler:
                notes.append("`pooler_output` is the same vector: the export's pooler is the identity.")
            elif not no_pooler:
                notes.append("`pooler_output` is the same vector.")
        else:
            embedding_code = "outputs.pooler_output" + (".flatten(1)" if model_type == "resnet" else "")
            if model_type == "resnet":
                text = "the pooled output (`pooler_output`: the last stage's feature map averaged over space, flattened)"
            elif model_type == "convnext":
                text = ("the pooled output (`pooler_output`: the last stage's feature map averaged over space, then "
                        "layer-normalised)")
            else:
                text = "the pooled output (`pooler_output`: the last stage's feature map averaged over space)"
                notes.append("It is also the first token of `last_hidden_state`.")
        kwargs = dict(self.load_kwargs or {}) if no_pooler else {}
        if no_pooler:
            pipeline_call, pipeline_kwargs = 'extractor("image.jpg", return_tensors=True)[:, 0]', kwargs
        else:
            pipeline_call = 'extractor("image.jpg", pool=True, return_tensors=True)' + (
                ".flatten(1)" if model_type == "resnet" else "")
            pipeline_kwargs = {}
        return BackboneUsage(
            model_type=model_type, name=self.name_of(model_type),
            model_class=MODEL_MAPPING_NAMES.get(model_type, "AutoModel"),
            embedding=text, embedding_notes=" ".join(notes), embedding_code=embedding_code,
            embedding_size=self.embedding_size(view),
            from_pretrained_kwargs=kwargs, pipeline_kwargs=pipeline_kwargs, pipeline_call=pipeline_call,
            has_attention=self.has_attention, num_prefix_tokens=prefix,
            interpolate_pos_encoding=self.fast_embedding, crops=self.crops,
            patch_size=config_patch_size(view)[0] if self.embedding == "class_token" else None,
            min_input_size=_total_stride(view) if self.crops == "stride" else None,
        )

    def from_pretrained_kwargs(self, config: PreTrainedConfig | Mapping[str, Any]) -> dict[str, Any]:
        """Arguments ``from_pretrained`` needs for a folder of this family so that nothing is missing, unexpected
        or random: ``add_pooling_layer=False`` for a ViT/DeiT folder without a pooler, nothing otherwise."""
        if self.pooler == "identity" and has_identity_pooler(config):
            return {}
        return dict(self.load_kwargs or {})

    # ---- building -----------------------------------------------------------------------------------
    def build(self, config: PreTrainedConfig, drop_path_rate: float = 0.0, mask_token: bool = False) -> PreTrainedModel:
        """A freshly initialised backbone of ``config``, with ``drop_path_rate`` of stochastic depth and,
        with ``mask_token``, the mask token that masked patches receive (see :meth:`check_masking`)."""
        if self.stochastic_depth == "config":
            config = copy.deepcopy(config)
            config.drop_path_rate = float(drop_path_rate)
        kwargs = dict(self.load_kwargs or {})
        if mask_token:
            self.check_masking(config, "mask_token")
            if self.mask_token == "constructor":
                kwargs["use_mask_token"] = True
        model_class = MODEL_MAPPING[type(config)]
        backbone = model_class(config, **kwargs)
        if self.stochastic_depth == "hooks":
            add_stochastic_depth(backbone, drop_path_rate)
        return backbone

    def load(self, model_name_or_path: str | Path, **kwargs: Any) -> PreTrainedModel:
        """``AutoModel.from_pretrained`` with the family's arguments (:meth:`from_pretrained_kwargs`: no random
        pooler for a ViT/DeiT, no unexpected one for an export carrying the identity pooler)."""
        config = kwargs.pop("config", None)
        if config is None:
            config = AutoConfig.from_pretrained(model_name_or_path, **{key: kwargs[key] for key in
                                                                       ("revision", "token", "cache_dir") if key in kwargs})
        return AutoModel.from_pretrained(model_name_or_path, config=config,
                                         **{**self.from_pretrained_kwargs(config), **kwargs})

    def state_dict_for_loading(self, backbone: PreTrainedModel) -> dict[str, torch.Tensor]:
        """The weights a DINO network takes from a loaded backbone (without a pooler DINO does not use)."""
        return {key: value for key, value in backbone.state_dict().items() if not key.startswith("pooler.")}

    def load_weights(self, backbone: PreTrainedModel, state: Mapping[str, torch.Tensor]) -> None:
        """Load ``state`` (:meth:`state_dict_for_loading` of another backbone) into ``backbone``, strictly
        but for a mask token the source lacks (a stock ViT export): that one keeps its initial value."""
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        missing = [key for key in missing if key != MASK_TOKEN_KEY or self.mask_token != "constructor"]
        if missing or unexpected:
            raise ValueError(f"the backbone's weights do not fit: missing {missing}, unexpected {list(unexpected)}.")

    def export_state_dict(self, backbone: PreTrainedModel) -> dict[str, torch.Tensor] | None:
        """The state dict an export writes when it differs from the backbone's own (``None`` otherwise):
        without the mask token a ``"constructor"`` family was built with, so that plain ``AutoModel``
        loads the export as the stock model, without an unexpected key."""
        state = backbone.state_dict()
        if self.mask_token != "constructor" or MASK_TOKEN_KEY not in state:
            return None
        return {key: value for key, value in state.items() if key != MASK_TOKEN_KEY}

    # ---- masking (iBOT) -----------------------------------------------------------------------------------
    def supports_masking(self, config: PreTrainedConfig) -> bool:
        """Whether patches of this backbone can be masked (``bool_masked_pos`` with a mask token)."""
        if self.mask_token == "native":
            return bool(getattr(config, "use_mask_token", True))
        return self.mask_token == "constructor"

    def check_masking(self, config: PreTrainedConfig, flag: str) -> None:
        """``ValueError`` naming ``flag`` when the backbone cannot mask patches (the iBOT input)."""
        if self.mask_token is None:
            raise ValueError(
                f"{flag}: iBOT masks patch tokens, and {config.model_type} backbones have none (a ConvNet): "
                "use a ViT, DeiT, DINOv2 or DINOv3 ViT backbone, or --ibot_loss_weight 0."
            )
        if not self.supports_masking(config):
            raise ValueError(
                f"{flag}: the {config.model_type} backbone is configured without a mask token (use_mask_token=false), "
                "which masking needs: set backbone_config.use_mask_token=true or use --ibot_loss_weight 0."
            )

    # ---- the DINO embedding ---------------------------------------------------------------------------
    def embed(self, backbone: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, embedding_size)``, the DINO embedding of a crop batch."""
        if self._uses_fast_path(backbone):
            return embed_class_token(backbone, pixel_values)
        return self.embedding_of(backbone_forward(backbone, self._network_input(backbone, pixel_values)))

    def embed_tokens(
        self, backbone: PreTrainedModel, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The DINO embedding and the patch tokens of a crop batch, masked patches replaced by the
        backbone's own mask token (``bool_masked_pos``).

        Args:
            pixel_values: ``(N, 3, H, W)``.
            bool_masked_pos: ``(N, P)`` bool, ``P = (H / patch) * (W / patch)`` in row-major order, or
                ``None``.
        Returns:
            ``(N, hidden)`` CLS embeddings and ``(N, P, hidden)`` patch tokens of ``last_hidden_state``
            (after the final norm; CLS, distillation token and registers excluded).
        """
        if self.embedding != "class_token":
            raise ValueError(f"{backbone.config.model_type} backbones have no patch tokens (a ConvNet).")
        if self._uses_fast_path(backbone):
            hidden_states = encode_tokens(backbone, pixel_values, bool_masked_pos)
        else:
            pixel_values = pixel_values.to(next(backbone.parameters()).dtype)
            kwargs = {} if bool_masked_pos is None else {"bool_masked_pos": bool_masked_pos}
            hidden_states = backbone_forward(backbone, pixel_values, **kwargs).last_hidden_state
        return hidden_states[:, 0], hidden_states[:, self.num_prefix_tokens(backbone.config):]

    def embed_map(self, backbone: PreTrainedModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DINO embedding and the spatial feature map of a crop batch, from one forward pass.

        Returns:
            ``(N, embedding_size)`` and ``(N, C, h, w)``: a transformer's patch tokens on its patch grid
            (``C = hidden_size``, ``h = H / patch``), a ConvNet's last stage before pooling
            (``C = hidden_sizes[-1]``).
        """
        if self.embedding == "class_token":
            embedding, patches = self.embed_tokens(backbone, pixel_values)
            patch_height, patch_width = config_patch_size(backbone.config)
            height, width = pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width
            return embedding, patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], height, width)
        output = backbone_forward(backbone, self._network_input(backbone, pixel_values))
        return self.embedding_of(output), output.last_hidden_state

    def _network_input(self, backbone: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` crops in the backbone's dtype and, for a family that prefers it, channels-last order."""
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        return pixel_values.to(next(backbone.parameters()).dtype, memory_format=memory_format)

    def _uses_fast_path(self, backbone: PreTrainedModel) -> bool:
        """The ViT fast path runs the blocks' modules directly: not on blocks sharded by FSDP."""
        return self.fast_embedding and not _has_sharded_blocks(backbone)

    def embedding_of(self, output: Any) -> torch.Tensor:
        """The DINO embedding in a backbone's output: ``(N, embedding_size)``."""
        if self.embedding == "class_token":
            return output.last_hidden_state[:, 0]
        return output.pooler_output.flatten(1)

    def embedding_size(self, config: PreTrainedConfig) -> int:
        """Width of the embedding (what the projection head takes)."""
        if self.embedding == "class_token":
            return int(config.hidden_size)
        return int(config.hidden_sizes[-1])

    def num_prefix_tokens(self, config: PreTrainedConfig) -> int:
        """Tokens before the patches in ``last_hidden_state`` (CLS, distillation, registers); 0 for ConvNets."""
        if self.embedding != "class_token":
            return 0
        return 1 + int(config.model_type == "deit") + int(getattr(config, "num_register_tokens", 0) or 0)

    # ---- checks -----------------------------------------------------------------------------------------
    def check(self, config: PreTrainedConfig) -> None:
        """``ValueError`` (one sentence) for an impossible architecture."""
        heads = getattr(config, "num_attention_heads", None)
        if self.has_attention and heads and config.hidden_size % heads != 0:
            raise ValueError(
                f"backbone_config.hidden_size ({config.hidden_size}) must be divisible by "
                f"backbone_config.num_attention_heads ({heads})."
            )
        image_size, patch_size = getattr(config, "image_size", None), getattr(config, "patch_size", None)
        if (
            self.crops == "patch_multiple"
            and isinstance(image_size, int)
            and isinstance(patch_size, int)
            and image_size % patch_size
        ):
            raise ValueError(
                f"backbone_config.image_size ({image_size}) must be a multiple of backbone_config.patch_size "
                f"({patch_size})."
            )

    def check_crop_size(self, config: PreTrainedConfig, size: int, flag: str) -> None:
        """``ValueError`` naming ``flag`` when crops of ``size`` pixels cannot go through the backbone."""
        if self.crops == "patch_multiple":
            patch = config_patch_size(config)[0]
            if size % patch != 0:
                raise ValueError(f"{flag} {size} is not a multiple of the backbone's patch size {patch}.")
        elif self.crops == "stride":
            stride = _total_stride(config)
            if size < stride:
                raise ValueError(
                    f"{flag} {size} is smaller than the backbone's total stride {stride} ({config.model_type} "
                    f"with {len(config.hidden_sizes)} stages): use crops of at least {stride} pixels or fewer stages."
                )

    # ---- optimiser ----------------------------------------------------------------------------------------
    def block_index(self, parameter_name: str, num_blocks: int) -> int:
        """0 for the embeddings, ``i + 1`` for block ``i``, ``num_blocks + 1`` after the last block."""
        match = re.search(self.block_pattern, parameter_name)
        if match is not None:
            return int(match.group(1)) + 1
        if parameter_name.startswith(("embeddings.", "embedder.", "model.embeddings.")):
            return 0
        return num_blocks + 1

    def num_blocks(self, config: PreTrainedConfig) -> int:
        """Blocks counted by :meth:`block_index` (transformer layers, or ConvNet stages)."""
        if self.embedding == "class_token":
            return int(config.num_hidden_layers)
        return len(config.hidden_sizes)


#: The state-dict key of a ViT-style mask token.
MASK_TOKEN_KEY = "embeddings.mask_token"


@dataclass(frozen=True)
class BackboneUsage:
    """How plain ``transformers`` loads and uses one export (:meth:`BackboneFamily.usage`): what the model
    card shows, as code that runs without dino_hf.

    Attributes:
        model_type, name, model_class: ``"dinov2"``, ``"DINOv2 ViT"``, ``"Dinov2Model"``.
        embedding: what the DINO embedding is, in words (Markdown, a phrase: "the CLS token of ...").
        embedding_notes: sentences that complete it (registers, distillation token, ``pooler_output``).
        embedding_code: the embedding as an expression on the model's ``outputs``.
        embedding_size: its width.
        from_pretrained_kwargs: what ``AutoModel.from_pretrained`` needs besides the repository ({} for an
            export of this dino_hf: plain loading reports nothing).
        pipeline_kwargs: the ``model_kwargs`` of ``pipeline("image-feature-extraction", ...)``.
        pipeline_call: the embedding from the pipeline ``extractor`` of an image file ``"image.jpg"``.
        has_attention: self-attention maps exist (the transformers, not the ConvNets).
        num_prefix_tokens: tokens before the patches in ``last_hidden_state`` (CLS, distillation, registers).
        interpolate_pos_encoding: other resolutions need ``interpolate_pos_encoding=True`` (ViT, DeiT).
        crops: the family's rule for input sides (:attr:`BackboneFamily.crops`).
        patch_size: the patch side of a transformer (``None`` for a ConvNet).
        min_input_size: the smallest input side of a ConvNeXt-style network (its total stride).
    """

    model_type: str
    name: str
    model_class: str
    embedding: str
    embedding_notes: str
    embedding_code: str
    embedding_size: int
    from_pretrained_kwargs: Mapping[str, Any]
    pipeline_kwargs: Mapping[str, Any]
    pipeline_call: str
    has_attention: bool
    num_prefix_tokens: int
    interpolate_pos_encoding: bool
    crops: str = "any"
    patch_size: int | None = None
    min_input_size: int | None = None

    @staticmethod
    def _arguments(values: Mapping[str, Any]) -> str:
        return "".join(f", {key}={_python(value)}" for key, value in values.items())

    def resolution(self, input_size: int | None) -> str:
        """What input sizes the model takes, in one or two sentences (``input_size``: the processor's)."""
        trained = f"the processor resizes to {input_size} px, the training resolution" if input_size else ""
        if self.interpolate_pos_encoding:
            return ("The position embeddings are sized for " + (f"{input_size} px inputs " if input_size else "the "
                    "configured input size ") + f"(the processor resizes to that); for other sizes (multiples of the "
                    f"{self.patch_size} px patch) pass `interpolate_pos_encoding=True` to the model.")
        if self.crops == "patch_multiple":
            text = (f"The model interpolates its position embeddings to other input sizes (multiples of the "
                    f"{self.patch_size} px patch) by itself")
        elif self.patch_size:
            text = f"Rotary position embeddings: the model takes any input size (multiples of the {self.patch_size} px patch)"
        elif self.min_input_size:
            text = f"A ConvNet: the model takes any input of at least {self.min_input_size} px"
        else:
            text = "A ConvNet: the model takes any input size"
        return f"{text}; {trained}." if trained else f"{text}."

    def load_snippet(self, repo_id: str) -> str:
        """Python that loads the export and computes one image's DINO embedding (``image.jpg``)."""
        return "\n".join([
            "import torch",
            "from PIL import Image",
            "from transformers import AutoImageProcessor, AutoModel",
            "",
            f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
            f'model = AutoModel.from_pretrained("{repo_id}"{self._arguments(self.from_pretrained_kwargs)}).eval()'
            f"  # {self.model_class}",
            "",
            'image = Image.open("image.jpg").convert("RGB")',
            'inputs = processor(images=image, return_tensors="pt")',
            "with torch.inference_mode():",
            "    outputs = model(**inputs)",
            f"embedding = {self.embedding_code}  # (1, {self.embedding_size}): the DINO embedding",
        ])

    def pipeline_snippet(self, repo_id: str) -> str:
        """Python that computes the same embedding with ``pipeline("image-feature-extraction")``."""
        model_kwargs = f", model_kwargs={_python(dict(self.pipeline_kwargs))}" if self.pipeline_kwargs else ""
        return "\n".join([
            "from transformers import pipeline",
            "",
            f'extractor = pipeline("image-feature-extraction", model="{repo_id}"{model_kwargs})',
            f"embedding = {self.pipeline_call}  # (1, {self.embedding_size}): the DINO embedding",
        ])

    def attention_snippet(self, repo_id: str) -> str | None:
        """Python, after :meth:`load_snippet`, that returns the last layer's CLS attention per head (``None``
        for a family without attention)."""
        if not self.has_attention:
            return None
        kwargs = {**self.from_pretrained_kwargs, "attn_implementation": "eager"}
        return "\n".join([
            f'model = AutoModel.from_pretrained("{repo_id}"{self._arguments(kwargs)}).eval()',
            "with torch.inference_mode():",
            "    outputs = model(**inputs, output_attentions=True)",
            f"cls_attention = outputs.attentions[-1][0, :, 0, {self.num_prefix_tokens}:]"
            "  # (heads, patches): where the CLS token looks",
        ])


def _python(value: Any) -> str:
    """``value`` as Python source, strings in double quotes (``{"add_pooling_layer": False}``)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_python(key)}: {_python(item)}" for key, item in value.items()) + "}"
    return repr(value)


class _AttributeView:
    """A config dict read as attributes (``view.hidden_size``), for the methods that take a config."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        return None


def has_identity_pooler(config: PreTrainedConfig | Mapping[str, Any]) -> bool:
    """Whether a ViT/DeiT config describes the identity pooler an export gets (``pooler_act="linear"``,
    as wide as the model): its folder holds the pooler's weights."""
    values = config.to_dict() if isinstance(config, PreTrainedConfig) else dict(config)
    return values.get("pooler_act") == "linear" and values.get("pooler_output_size") in (None, values.get("hidden_size"))


def _has_sharded_blocks(backbone: nn.Module) -> bool:
    """Whether FSDP2 (``fully_shard``) manages the backbone's blocks."""
    layers = getattr(backbone, "layers", None)
    if not layers:
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(layers[0], FSDPModule)


def _total_stride(config: PreTrainedConfig) -> int:
    """Downsampling of a ConvNeXt-style backbone: its stem, then 2 per further stage."""
    stem = int(getattr(config, "patch_size", 4) or 4)
    return stem * 2 ** (len(config.hidden_sizes) - 1)


_VIT_KWARGS = {"add_pooling_layer": False}

#: The families dino_hf trains, one entry each (see the table at the top of this module).
FAMILIES: tuple[BackboneFamily, ...] = (
    BackboneFamily(("vit", "deit"), "class_token", "hooks", "patch_multiple", fast_embedding=True,
                   load_kwargs=_VIT_KWARGS, mask_token="constructor", names=("ViT", "DeiT"), pooler="identity"),
    BackboneFamily(("dinov2", "dinov2_with_registers"), "class_token", "config", "patch_multiple",
                   mask_token="native", names=("DINOv2 ViT", "DINOv2 ViT with registers")),
    BackboneFamily(("dinov3_vit",), "class_token", "config", "any", mask_token="native", names=("DINOv3 ViT",)),
    BackboneFamily(("convnext", "dinov3_convnext"), "pooled", "config", "stride", has_attention=False,
                   block_pattern=r"stages\.(\d+)\.", names=("ConvNeXt", "DINOv3 ConvNeXt")),
    BackboneFamily(("resnet",), "pooled", None, "any", has_attention=False, block_pattern=r"stages\.(\d+)\.",
                   names=("ResNet",), channels_last=True),
)
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def family_of(config_or_model_type: PreTrainedConfig | str) -> BackboneFamily:
    """The family of a backbone config (or ``model_type``).

    Raises:
        ValueError: one sentence listing the families dino_hf trains.
    """
    model_type = getattr(config_or_model_type, "model_type", config_or_model_type)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"dino_hf does not train {model_type!r} backbones: use one of {', '.join(SUPPORTED_MODEL_TYPES)}."
        )
    return _BY_MODEL_TYPE[model_type]


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def build_image_processor(image_size: int | Sequence[int]) -> ViTImageProcessor:
    """The processor of an exported backbone trained from scratch: resize to ``image_size`` (bicubic, as
    DINO's crops) and the training crops' ImageNet mean/std (``ViTImageProcessor`` would otherwise
    default to 0.5/0.5)."""
    height, width = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": int(height), "width": int(width)},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def save_backbone(
    backbone: PreTrainedModel,
    output_dir: str | Path,
    image_size: int | None = None,
    image_processor: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``backbone`` with ``save_pretrained`` and its ``preprocessor_config.json``.

    A ViT or DeiT built with a mask token for iBOT is written without it, and gets an identity pooler
    (:func:`has_identity_pooler`): the folder is the stock model that plain ``AutoModel.from_pretrained``
    loads with no missing or unexpected key, whose ``pooler_output`` is the DINO embedding.

    The processor is the one the backbone came with (``image_processor``, the dict of its
    ``preprocessor_config.json``: a DINOv2 keeps its own resize rule and mean/std) or, for a backbone
    trained from scratch, :func:`build_image_processor` at ``image_size`` (default: the config's
    ``image_size``, else 224).
    """
    output_dir = Path(output_dir)
    family = _BY_MODEL_TYPE.get(getattr(backbone.config, "model_type", None))
    if family is not None and family.pooler == "identity":
        backbone = _with_identity_pooler(backbone)
    state_dict = family.export_state_dict(backbone) if family is not None else None
    backbone.save_pretrained(output_dir, state_dict=state_dict)
    if image_processor is not None:
        (output_dir / PROCESSOR_CONFIG_NAME).write_text(json.dumps(dict(image_processor), indent=2) + "\n")
    else:
        size = image_size or getattr(backbone.config, "image_size", None) or 224
        build_image_processor(size).save_pretrained(output_dir)
    return output_dir


class _IdentityPooler(nn.Module):
    """``ViTPooler``'s parameters (``dense``) holding the identity, with the identity activation."""

    def __init__(self, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            self.dense.weight.copy_(torch.eye(width, dtype=like.dtype))
            self.dense.bias.zero_()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states[:, 0])


def _with_identity_pooler(backbone: PreTrainedModel) -> PreTrainedModel:
    """A shallow copy of a ViT/DeiT (the weights shared, nothing of ``backbone`` changed) whose pooler is the
    identity and whose config says so (``pooler_act="linear"``, ``pooler_output_size=hidden_size``)."""
    config = copy.deepcopy(backbone.config)
    config.pooler_act = "linear"
    config.pooler_output_size = config.hidden_size
    exported = copy.copy(backbone)
    exported._modules = dict(backbone._modules)  # the copy's own module table: the original keeps its pooler
    exported.config = config
    exported.pooler = _IdentityPooler(config.hidden_size, next(backbone.parameters()))
    return exported


def image_processor_dict(model_name_or_path: str | Path, **hub_options: Any) -> dict[str, Any] | None:
    """The ``preprocessor_config.json`` a local folder or Hub model comes with, as a dict (else ``None``);
    ``hub_options``: ``revision``, ``token``, ``cache_dir``."""
    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path, **hub_options).to_dict()
    except (OSError, ValueError, KeyError) as error:
        logger.info("%s has no image processor (%s); exports will get an ImageNet one.", model_name_or_path, error)
        return None


# --------------------------------------------------------------------------------------------------
# Running any backbone
# --------------------------------------------------------------------------------------------------
def backbone_embedding(backbone: nn.Module, output: Any) -> torch.Tensor:
    """The DINO embedding in ``backbone``'s output, ``(N, D)``: its family's, or for another model the
    CLS token of a token sequence, else its pooled output."""
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type].embedding_of(output)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None and hidden.ndim == 3:
        return hidden[:, 0]
    return output.pooler_output.flatten(1)


def config_patch_size(config: PreTrainedConfig) -> tuple[int, int]:
    """``config.patch_size`` as (height, width)."""
    patch_size = getattr(config, "patch_size", 16)
    if isinstance(patch_size, Sequence):
        return int(patch_size[0]), int(patch_size[1])
    return int(patch_size), int(patch_size)


def config_image_size(config: PreTrainedConfig) -> int:
    """``config.image_size`` (its first side when it is a pair; 224 when the config has none)."""
    image_size = getattr(config, "image_size", 224)
    return int(image_size[0] if isinstance(image_size, Sequence) else image_size)


def _accepts_keyword(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def backbone_forward(backbone: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """``backbone(pixel_values=..., **kwargs)``, asking for position-embedding interpolation when the
    input resolution differs from ``backbone.config.image_size`` and the model supports it."""
    config = getattr(backbone, "config", None)
    if (
        config is not None
        and tuple(pixel_values.shape[-2:]) != (config_image_size(config),) * 2
        and _accepts_keyword(backbone, "interpolate_pos_encoding")
    ):
        kwargs.setdefault("interpolate_pos_encoding", True)
    return backbone(pixel_values=pixel_values, **kwargs)
