"""A transformer denoiser for point clouds: dense attention within each sample.

Each point (atom) is a token ``[pos_i, x_i]``. A stack of pre-norm transformer blocks
attends over the points of the same sample only (padding masked; nothing crosses samples
of a batch); the diffusion time conditions every block through adaptive LayerNorm (shift,
scale and a zero-initialised residual gate regressed from the time embedding, as in DiT,
Peebles & Xie 2023). Optionally, every attention head adds a learned function of the
pairwise distance ``|pos_i - pos_j|`` to its logits: a rotation- and translation-invariant
bias that lets the network see bond lengths directly instead of reconstructing them from
raw coordinates.

There is no positional index, so the network is permutation-equivariant; it is not
rotation-equivariant (the coordinates enter as plain numbers), which is what a
canonicalizer in front of it is for.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canonwrap.nn._inputs import checked_times
from canonwrap.nn.gnn import _read_batch
from canonwrap.pointclouds import remove_mean

__all__ = ["TransformerDenoiser", "DistanceBias", "AdaLNBlock", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of normalised times ``t [B]`` in ``[0, 1]``, ``[B, dim]``.

    Frequencies are geometric between 1 and ``1 / max_period`` (Vaswani et al. 2017);
    ``t`` is scaled by 1000 first so that the usual range of the formula is covered.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / half
    )
    args = 1000.0 * t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class DistanceBias(nn.Module):
    """Per-head attention bias from pairwise distances: ``b_h(d) = sum_k w_hk phi_k(d)``.

    ``phi_k`` are Gaussian radial basis functions with centres spread evenly over
    ``[0, cutoff]``; ``w`` is learned. The bias depends on distances only, so it is
    invariant to rotations, reflections and translations of each sample.

    Parameters
    ----------
    heads : int
        Number of attention heads (one bias per head).
    num_basis : int
        Number of radial basis functions.
    cutoff : float
        Largest centre, in the units of ``pos``.
    """

    def __init__(self, heads: int, num_basis: int = 16, cutoff: float = 8.0) -> None:
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, cutoff, num_basis), persistent=False)
        self.width = cutoff / max(num_basis - 1, 1)
        self.proj = nn.Linear(num_basis, heads)

    def basis(self, dist: Tensor) -> Tensor:
        """The radial basis ``phi(d)``, ``[B, n, n, num_basis]`` for ``dist [B, n, n]``."""
        centres = self.centres.to(dist.dtype)
        return torch.exp(-((dist[..., None] - centres) / self.width).pow(2))

    def project(self, rbf: Tensor) -> Tensor:
        """Bias ``[B, heads, n, n]`` from a basis computed by ``basis`` (shareable between
        biases with the same ``num_basis`` and ``cutoff``)."""
        return self.proj(rbf).permute(0, 3, 1, 2)

    def forward(self, dist: Tensor) -> Tensor:
        """Bias ``[B, heads, n, n]`` from distances ``dist [B, n, n]``."""
        return self.project(self.basis(dist))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block with time-adaptive LayerNorm and gated residuals.

    ``h <- h + g1 * Attn(LN(h) (1 + s1) + b1)`` then ``h <- h + g2 * MLP(LN(h) (1 + s2) + b2)``
    where ``(b1, s1, g1, b2, s2, g2)`` are a linear function of the conditioning vector
    (zero-initialised, so every block starts as the identity).

    Parameters
    ----------
    hidden : int
        Token width ``H`` (divisible by ``heads``).
    heads : int
        Attention heads.
    mlp_ratio : float
        Width of the feed-forward layer relative to ``H``.
    dropout : float
        Dropout on attention weights and in the feed-forward layer.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = float(dropout)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout),
            nn.Linear(inner, hidden),
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(
        self, h: Tensor, cond: Tensor, attn_bias: Tensor, packing: _Packing | None = None
    ) -> Tensor:
        """Update tokens given ``cond [B, H]`` and an attention bias ``[B, heads|1, n, n]``.

        Dense tokens ``h [B, n, H]`` by default. With ``packing`` the tokens are packed,
        ``h [N, H]`` (the points of all samples, no padding): the linear layers then run on
        the ``N`` real tokens only, and just the attention itself is laid out densely,
        ``[B, heads, n, n]``. ``attn_bias`` is added to the attention logits; ``-inf``
        entries mask keys.
        """
        mods = self.modulation(cond)
        mods = mods[:, None] if packing is None else mods[packing.batch]
        b1, s1, g1, b2, s2, g2 = mods.chunk(6, dim=-1)
        x = self.norm1(h) * (1 + s1) + b1
        qkv = self.qkv(x)
        if packing is not None:
            qkv = packing.to_dense(qkv)
        bsz, n, width = qkv.shape[0], qkv.shape[1], h.shape[-1]
        q, k, v = qkv.view(bsz, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        drop = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop)
        att = att.transpose(1, 2).reshape(bsz, n, width)
        if packing is not None:
            att = packing.to_packed(att)
        h = h + g1 * self.out(att)
        return h + g2 * self.mlp(self.norm2(h) * (1 + s2) + b2)


class _Packing:
    """Maps packed per-point rows ``[N, C]`` to the dense layout ``[B, n_max, C]`` and back.

    Point ``i`` of sample ``b`` sits at row ``b * n_max + i`` of the flattened dense
    layout; padding rows are zero.
    """

    def __init__(self, batch: Tensor, num_samples: int) -> None:
        counts = torch.bincount(batch, minlength=num_samples)
        starts = torch.cumsum(counts, 0) - counts
        self.batch = batch
        self.num_samples = num_samples
        self.n_max = int(counts.max()) if batch.numel() else 0
        position = torch.arange(batch.numel(), device=batch.device) - starts[batch]
        self.index = batch * self.n_max + position
        self.mask = torch.zeros(num_samples * self.n_max, dtype=torch.bool, device=batch.device)
        self.mask[self.index] = True
        self.mask = self.mask.view(num_samples, self.n_max)

    def to_dense(self, rows: Tensor) -> Tensor:
        dense = rows.new_zeros(self.num_samples * self.n_max, rows.shape[-1])
        dense = dense.index_copy(0, self.index, rows)
        return dense.view(self.num_samples, self.n_max, rows.shape[-1])

    def to_packed(self, dense: Tensor) -> Tensor:
        return dense.reshape(-1, dense.shape[-1]).index_select(0, self.index)


class TransformerDenoiser(nn.Module):
    """Noise predictor ``denoiser(z_t, t) -> [N, 3 + F]`` with dense attention per sample.

    Tokens are ``Linear([pos_i, x_i])``; the time ``t`` enters through a sinusoidal
    embedding and an MLP, and conditions every ``AdaLNBlock``. With
    ``distance_bias=True`` each block adds its own ``DistanceBias`` of the noisy
    pairwise distances to the attention logits. The output head (adaptive LayerNorm,
    then a zero-initialised linear layer) gives ``[3 + F]`` per token: position noise,
    projected to zero centre of mass per sample, then feature noise.

    Properties (tested): equivariant to permutations of the points of a sample; each
    sample's output independent of the other samples in the batch and of how much
    padding the batch needs; works in float32 and float64.

    Parameters
    ----------
    num_features : int
        ``F``, the width of ``z_t.x`` (QM9 with charges: 6; 0 for bare point clouds).
    hidden : int
        Token width.
    layers : int
        Number of transformer blocks.
    heads : int
        Attention heads per block.
    mlp_ratio : float
        Feed-forward width relative to ``hidden``.
    distance_bias : bool
        Add a learned per-head function of pairwise distances to the attention logits.
    num_basis
        Radial basis of the distance bias, see ``DistanceBias``.
    cutoff
        Radial basis of the distance bias, see ``DistanceBias``.
    dropout : float
        Dropout in attention and feed-forward layers.

    Notes
    -----
    Call as ``denoiser(z_t, t)`` with ``z_t`` a ``Data``/``Batch`` carrying ``pos [N, 3]``,
    ``x [N, F]`` and ``batch [N]``, and ``t`` the normalised time, float ``[B]`` (or a
    scalar shared by all samples). The linear layers (embedding, attention projections,
    feed-forward, head) run on the ``N`` points of the batch only, without padding; only the
    attention scores and the distance bias are laid out per sample, ``O(B n_max^2)`` for the
    largest sample size ``n_max`` in the batch.
    """

    def __init__(
        self,
        num_features: int = 6,
        hidden: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        distance_bias: bool = True,
        num_basis: int = 16,
        cutoff: float = 8.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_features = int(num_features)
        self.heads = int(heads)
        self.hidden = int(hidden)
        self.embed = nn.Linear(3 + self.num_features, hidden)
        self.time_mlp = nn.Sequential(
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.blocks = nn.ModuleList(
            AdaLNBlock(hidden, heads, mlp_ratio, dropout) for _ in range(layers)
        )
        self.biases = (
            nn.ModuleList(DistanceBias(heads, num_basis, cutoff) for _ in range(layers))
            if distance_bias
            else None
        )
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.head = nn.Linear(hidden, 3 + self.num_features)
        for layer in (self.final_modulation[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z_t: Any, t: Tensor | float) -> Tensor:
        """Predicted noise ``[N, 3 + F]`` for noisy samples ``z_t`` at times ``t [B]``."""
        pos, feats, batch, b = _read_batch(self, z_t, self.num_features)
        t = checked_times(t, b, "TransformerDenoiser", dtype=pos.dtype, device=pos.device)
        if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
            raise ValueError(
                "TransformerDenoiser: the batch vector must be sorted (as in every "
                "torch_geometric Batch); sort the nodes by sample first"
            )
        packing = _Packing(batch, b)
        cond = self.time_mlp(timestep_embedding(t, self.hidden))
        # the linear layers run on the N real points only ("packed"); attention alone is
        # laid out per sample, [B, heads, n_max, n_max], with the padding keys masked
        h = self.embed(torch.cat([pos, feats], dim=-1))
        key_mask = torch.zeros(packing.mask.shape, dtype=h.dtype, device=h.device)
        key_mask = key_mask.masked_fill(~packing.mask, float("-inf"))[:, None, None, :]
        rbf = None
        if self.biases is not None:
            dense_pos = packing.to_dense(pos)
            diff = dense_pos[:, :, None] - dense_pos[:, None, :]
            dist = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()  # finite gradient at 0
            rbf = self.biases[0].basis(dist)  # every block's bias has the same basis
        for i, block in enumerate(self.blocks):
            bias = key_mask if rbf is None else key_mask + self.biases[i].project(rbf)
            h = block(h, cond, bias, packing)
        shift, scale = self.final_modulation(cond)[batch].chunk(2, dim=-1)
        out = self.head(self.final_norm(h) * (1 + scale) + shift)  # [N, 3 + F]
        return torch.cat([remove_mean(out[:, :3], batch, b), out[:, 3:]], dim=-1)
