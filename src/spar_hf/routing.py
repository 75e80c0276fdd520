"""Dynamic Token Routing (DTR): per-token mixing of several MLLM layers.

For every token, a router reads the token's own normalised states across the selected layers and
predicts softmax weights over those layers. The output is the weighted sum of the per-layer
normalised states. A gate (one value), initialised to zero, blends this mixture with the last selected
layer, so a freshly built router returns exactly the last layer and learns to depart from it.
"""

import torch
from torch import nn

ROUTING_MODES = ("dtr", "last", "mean")


class DynamicTokenRouter(nn.Module):
    """Mix `K` hidden-state layers per token.

    Args:
        hidden_size (`int`): Width `D` of the MLLM hidden states.
        num_layers (`int`): Number `K` of routed layers.
        mode (`str`): `"dtr"` (learned per-token weights), `"last"` (the last routed layer) or
            `"mean"` (uniform weights), the latter two for ablations.
    """

    def __init__(self, hidden_size: int, num_layers: int, mode: str = "dtr") -> None:
        super().__init__()
        if mode not in ROUTING_MODES:
            raise ValueError(f"`mode` must be one of {ROUTING_MODES}. Got {mode!r}.")
        self.mode = mode
        self.num_layers = num_layers
        self.layer_norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        if mode == "dtr":
            self.router = nn.Linear(hidden_size * num_layers, num_layers)
            # Zero weights give uniform router logits, and the zero gate makes the output exactly the
            # last layer. The gate's gradient is non-zero, so routing starts to learn at step one.
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)
            self.router._is_hf_initialized = True  # keeps the zeros through a parent model's `post_init`
            # Shape (1,) rather than a 0-dim scalar, which FSDP2's `fully_shard` rejects.
            self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, hidden_states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route a list of `K` tensors of shape `(B, T, D)`.

        Returns:
            `(routed, weights, probabilities)`. `routed` has shape `(B, T, D)`. `weights` are the
            effective per-token layer weights of shape `(B, T, K)`, whose rows sum to one.
            `probabilities` is the router's own softmax of the same shape, equal to `weights` for
            `last` and `mean`.
        """
        if len(hidden_states) != self.num_layers:
            raise ValueError(f"Expected {self.num_layers} hidden-state layers, got {len(hidden_states)}.")
        normed = torch.stack([norm(h) for norm, h in zip(self.layer_norms, hidden_states)], dim=2)  # (B, T, K, D)
        B, T, K, D = normed.shape
        last = torch.zeros(K, dtype=normed.dtype, device=normed.device)
        last[-1] = 1
        if self.mode == "last":
            weights = probabilities = last.expand(B, T, K)  # (B, T, K)
        elif self.mode == "mean":
            weights = probabilities = torch.full((B, T, K), 1.0 / K, dtype=normed.dtype, device=normed.device)
        else:
            probabilities = self.router(normed.reshape(B, T, K * D)).softmax(dim=-1)  # (B, T, K)
            # NOTE: the gate is not bounded, so once it leaves [0, 1] the effective weights can
            # extrapolate (a weight below 0 or above 1) while still summing to one.
            weights = self.gate * probabilities + (1 - self.gate) * last  # (B, T, K)
        routed = torch.einsum("btk,btkd->btd", weights, normed)  # (B, T, D)
        return routed, weights, probabilities


def routing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of per-token routing weights of shape `(..., K)`; 0 means one layer per token."""
    probabilities = weights.clamp_min(1e-12)
    return -(weights * probabilities.log()).sum(-1).mean()
