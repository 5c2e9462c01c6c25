"""A compact DDPM-style UNet denoiser for images (Ho et al. 2020, Appendix B).

Residual blocks with GroupNorm and SiLU, a sinusoidal time embedding that scales and
shifts the normalised features inside every residual block, stride-2 convolutions down,
nearest-neighbour upsampling up, skip connections concatenated, and optional single-head
self-attention at the lowest resolution. It follows canonwrap's denoiser contract:
``unet(z_t, t) -> eps_hat``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from canonwrap.nn._inputs import check_input_placement, checked_times

__all__ = ["UNet", "sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Transformer-style embedding of times ``t [B]`` (in ``[0, 1]``): returns ``[B, dim]``.

    ``emb = [sin(s t w_i), cos(s t w_i)]`` with ``w_i = 10000^(-i / (dim / 2))`` and
    ``s = scale`` (so that ``t`` in ``[0, 1]`` spans the range of DDPM's integer steps).
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float64, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * steps / max(half, 1))
    args = scale * t.double()[:, None] * freqs[None, :]  # float64, cast by the caller
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ResBlock(nn.Module):
    """``skip(x) + conv(SiLU(GN(h) (1 + a) + b))`` with ``h = conv(SiLU(GN(x)))``.

    ``(a, b) = W SiLU(emb)`` is a per-channel scale and shift from the time embedding,
    applied after the normalisation (improved DDPM's scale-shift norm), so that it
    survives GroupNorm even when a group holds a single channel.
    """

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, 2 * c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.time(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the ``H * W`` positions, with a residual connection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2)[:, None], k.transpose(1, 2)[:, None], v.transpose(1, 2)[:, None]
        )  # [B, 1, HW, C]
        return x + self.proj(out[:, 0].transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """UNet noise predictor ``unet(x [B, C, H, W], t [B]) -> [B, C, H, W]``.

    Level ``i`` has width ``base_width * channel_mults[i]`` and ``num_res_blocks``
    residual blocks; levels are separated by stride-2 convolutions, so the grid shrinks by
    ``2^(len(channel_mults) - 1)``. Inputs of any size are zero-padded (split as evenly as
    possible between both sides) to a multiple of that factor and the output is cropped
    back, so 28x28 and 29x29 both work. With ``attention`` a self-attention block follows
    each residual block of the lowest-resolution level and sits in the middle block.

    Parameters
    ----------
    in_channels
        Image channels ``C`` (also the output channels unless ``out_channels`` is given).
    base_width
        Width of the first level.
    channel_mults
        Width multiplier per level.
    num_res_blocks
        Residual blocks per level on the way down (one more on the way up, as in DDPM).
    attention
        Self-attention at the lowest resolution.
    dropout
        Dropout inside residual blocks.
    groups
        GroupNorm groups (reduced to a divisor of each width).
    out_channels
        Output channels; defaults to ``in_channels``.

    Examples
    --------
    >>> import torch
    >>> net = UNet(in_channels=1, base_width=8, channel_mults=(1, 2), num_res_blocks=1)
    >>> net(torch.randn(2, 1, 29, 29), torch.rand(2)).shape
    torch.Size([2, 1, 29, 29])
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_width: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention: bool = True,
        dropout: float = 0.0,
        groups: int = 32,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        if not channel_mults:
            raise ValueError("channel_mults must have at least one level")
        self.in_channels = int(in_channels)
        self.base_width = int(base_width)
        self.factor = 2 ** (len(channel_mults) - 1)
        t_dim = 4 * self.base_width
        self.time_mlp = nn.Sequential(
            nn.Linear(self.base_width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim)
        )
        self.conv_in = nn.Conv2d(self.in_channels, self.base_width, 3, padding=1)

        last = len(channel_mults) - 1
        widths = [self.base_width]
        ch = self.base_width
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                out = self.base_width * int(mult)
                self.down.append(ResBlock(ch, out, t_dim, groups, dropout))
                ch = out
                if attention and i == last:
                    self.down.append(Attention(ch, groups))
                widths.append(ch)
            if i != last:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                widths.append(ch)

        mid = [ResBlock(ch, ch, t_dim, groups, dropout)]
        if attention:
            mid.append(Attention(ch, groups))
        mid.append(ResBlock(ch, ch, t_dim, groups, dropout))
        self.mid = nn.ModuleList(mid)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = self.base_width * int(mult)
                self.up.append(ResBlock(ch + widths.pop(), out, t_dim, groups, dropout))
                ch = out
                if attention and i == last:
                    self.up.append(Attention(ch, groups))
            if i != 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2.0, mode="nearest"),
                        nn.Conv2d(ch, ch, 3, padding=1),
                    )
                )
        self.norm_out = _norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, int(out_channels or in_channels), 3, padding=1)

    @staticmethod
    def _run(block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        return block(h, emb) if isinstance(block, ResBlock) else block(h)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Predicted noise for ``x [B, C, H, W]`` at times ``t`` (``[B]``, or one value).

        Returns
        -------
        Tensor
            ``[B, out_channels, H, W]``.
        """
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must be a tensor [B, C, H, W]; got {shape}")
        check_input_placement(self, x, "x", "UNet")
        b, _, height, width = x.shape
        t = checked_times(t, b, "UNet", dtype=x.dtype, device=x.device)
        emb = self.time_mlp(sinusoidal_embedding(t, self.base_width).to(x.dtype))

        ph, pw = -height % self.factor, -width % self.factor
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            if isinstance(block, Attention):
                skips[-1] = h  # the skip of a level with attention is taken after it
            else:
                skips.append(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return h[..., ph // 2 : ph // 2 + height, pw // 2 : pw // 2 + width]
