"""Small transformer building blocks shared by the tokenizer's pixel stream and the connector."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention on `F.scaled_dot_product_attention`."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = hidden_states.shape
        qkv = self.qkv(hidden_states).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, heads, D/heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, D/heads)

        # A boolean key mask (B, T) broadcasts over heads and query positions.
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # (B, heads, T, D/heads)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-norm transformer encoder block: self-attention then a GELU MLP, both residual."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, int(hidden_size * mlp_ratio)),
            nn.GELU(approximate="tanh"),
            nn.Linear(int(hidden_size * mlp_ratio), hidden_size),
        )

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), attention_mask)
        return hidden_states + self.mlp(self.norm2(hidden_states))


def sincos_position_embedding(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Build fixed 2D sine-cosine position embeddings of shape `(height * width, dim)`.

    Half of the channels encode the row and half the column, so any grid size works without
    interpolating a learned table.
    """
    if dim % 4 != 0:
        raise ValueError(f"`dim` must be divisible by 4 for 2D sine-cosine embeddings. Got {dim}.")
    quarter = dim // 4
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / quarter)  # (D/4,)
    rows = torch.arange(height, device=device)[:, None] * frequencies  # (H, D/4)
    cols = torch.arange(width, device=device)[:, None] * frequencies  # (W, D/4)
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=-1)[:, None, :].expand(height, width, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=-1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_emb, col_emb], dim=-1).reshape(height * width, dim).to(dtype)  # (H*W, D)


def build_mlp(in_features: int, hidden_features: int, out_features: int, num_layers: int = 3) -> nn.Sequential:
    """Build a SiLU MLP with `num_layers` linear layers (REPA's projector shape for `num_layers=3`)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(num_layers - 1):
        layers += [nn.Linear(width, hidden_features), nn.SiLU()]
        width = hidden_features
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)
