"""The GPT-2-shaped model and the toy task the distributed examples train
(fsdp2_offload.py, deepspeed_offload.py)."""

from __future__ import annotations

from _requirements import require

torch = require("torch")
from torch import nn  # noqa: E402

SHAPES = {  # layers, width, heads, vocabulary, sequence
    "gpt2": (12, 768, 12, 50257, 1024),
    "quick": (2, 64, 4, 512, 32),
}


class GPT(nn.Module):
    """GPT-2's shapes (pre-norm blocks, GELU MLP of 4x the width, learned positions) with
    an untied output layer."""

    def __init__(self, layers: int, width: int, heads: int, vocabulary: int, sequence: int):
        super().__init__()
        self.tokens = nn.Embedding(vocabulary, width)
        self.positions = nn.Embedding(sequence, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(n, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(n, device=tokens.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def batch(generator: torch.Generator, size: int, vocabulary: int, sequence: int) -> torch.Tensor:
    """``size`` sequences of ``sequence + 1`` tokens of a task a model learns in a few
    steps: each token is followed by the next one (mod the vocabulary)."""
    start = torch.randint(vocabulary, (size, 1), generator=generator)
    return (start + torch.arange(sequence + 1)) % vocabulary


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits of ``tokens[:, :-1]`` against ``tokens[:, 1:]``."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                       tokens[:, 1:].reshape(-1))
