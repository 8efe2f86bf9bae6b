"""SaviorEnc stage 1 (paper 3.2, eq. 2): a multimodal item encoder.

    z_i = g_proj(g([f_v(v_i); f_t(t_i)]))

f_v and f_t are open_clip vision and text towers returning token sequences; g is a 3-layer fusion
transformer over [CLS; image tokens; text tokens] with modality embeddings and a padding mask, so
an item with no image or no title is still embedded from what it has; g_proj is an MLP projection
head. Towers are built from open_clip configs (random init), or the text tower from a local
Hugging Face folder; no weights are fetched at run time.
"""

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from torch import nn

CLS, IMAGE, TEXT = 0, 1, 2  # modality ids


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture only: everything needed to rebuild the module from code and a weights file."""

    vision: dict = field(default_factory=dict)  # CLIPVisionCfg fields
    text: dict = field(default_factory=dict)  # CLIPTextCfg fields; `hf_model_name` = a local folder
    tower_dim: int = 64  # the towers' pooled projection (used by the CLIP domain-adaptation loss)
    fusion_width: int = 64
    fusion_layers: int = 3  # paper 4.1.4
    fusion_heads: int = 2
    embedding_dim: int = 64  # z

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EncoderConfig":
        return cls(**values)


def with_text_tower(config: EncoderConfig, hf_folder: str) -> EncoderConfig:
    """`config` with its text tower read from a local Hugging Face model folder (weights included)."""
    text = dict(hf_model_name=hf_folder, hf_model_pretrained=True, hf_pooler_type="mean_pooler", context_length=32)
    return dataclasses.replace(config, text=text)


class SaviorEnc(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        vision_cfg = CLIPVisionCfg(**{**config.vision, "output_tokens": True})
        text_cfg = CLIPTextCfg(**{**config.text, "output_tokens": True})
        self.vision = _build_vision_tower(config.tower_dim, vision_cfg)
        self.text = _build_text_tower(config.tower_dim, text_cfg)
        self.text_pad_id = self.text.config.pad_token_id if text_cfg.hf_model_name else text_cfg.pad_id
        text_width = self.text.config.hidden_size if text_cfg.hf_model_name else text_cfg.width

        width = config.fusion_width
        self.image_in = nn.Linear(vision_cfg.width, width)
        self.text_in = nn.Linear(text_width, width)
        self.modality = nn.Embedding(3, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(
            width, config.fusion_heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.fusion = nn.TransformerEncoder(layer, config.fusion_layers, enable_nested_tensor=False)
        self.fusion_norm = nn.LayerNorm(width)
        self.proj = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, config.embedding_dim))
        # CLIP's learnable temperature, used only by the domain-adaptation loss.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def image_size(self) -> int:
        return self.vision.image_size[0]

    def forward(self, images: torch.Tensor, has_image: torch.Tensor, tokens: torch.Tensor, has_title: torch.Tensor) -> torch.Tensor:
        """z for a batch of items, L2-normalised. Missing images/titles are masked out of fusion, so
        a tower that no item of the batch needs is not run and its tokens are left out: the result
        is the same, and `images` may then hold no pixels at all."""
        batch = has_image.shape[0]
        sequence = [self.cls.expand(batch, -1, -1) + self.modality.weight[CLS]]
        keep = [torch.ones(batch, 1, dtype=torch.bool, device=has_image.device)]
        if has_image.any():
            _, image_tokens = self.vision(images)
            sequence.append(self.image_in(image_tokens) + self.modality.weight[IMAGE])
            keep.append(has_image[:, None].expand(-1, image_tokens.shape[1]))
        if has_title.any():
            _, text_tokens = self.text(tokens)
            sequence.append(self.text_in(text_tokens) + self.modality.weight[TEXT])
            keep.append((tokens[:, : text_tokens.shape[1]] != self.text_pad_id) & has_title[:, None])
        fused = self.fusion_norm(self.fusion(torch.cat(sequence, dim=1), src_key_padding_mask=~torch.cat(keep, dim=1)))
        return F.normalize(self.proj(fused[:, 0]), dim=-1)

    def tower_embeddings(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The towers' own pooled image and text embeddings, for the CLIP loss."""
        image, _ = self.vision(images)
        text, _ = self.text(tokens)
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def info_nce(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, item_a=None, item_b=None) -> torch.Tensor:
    """Eq. 3 over a batch of positive pairs (z_a[n], z_b[n]), both sides L2-normalised.

    Each of the 2N embeddings is an anchor; its positive is its pair partner and its negatives are
    the other 2N - 2 embeddings of the batch (k != i, j). When item ids are given, a candidate that
    is the anchor's own item or its positive's item is not used as a negative.
    """
    z = torch.cat([z_a, z_b])
    n = z_a.shape[0]
    logits = z @ z.T / temperature
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    exclude = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    if item_a is not None:
        items = torch.cat([item_a, item_b]).to(z.device)
        same_item = (items[:, None] == items[None, :]) | (items[partner][:, None] == items[None, :])
        exclude |= same_item
        exclude[torch.arange(2 * n), partner] = False
    logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, partner)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric image-title contrastive loss (the domain-adaptation phase)."""
    logits = logit_scale.exp().clamp(max=100) * image @ text.T
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
