"""A small class-conditional DCGAN (Radford et al. 2016; conditioned as in Mirza & Osindero 2014), torch only.

    settings = GanSettings(image_size=28, epochs=200, width=32, latent_dim=64, batch_size=64, lr=2e-4)
    generator, history = train_dcgan(images, labels, num_classes=2, settings=settings, seed=0)
    fakes = generate(generator, np.array([1, 1, 1]), seed=0, image_size=28)     # uint8 (3, 28, 28, C)

The generator takes noise + a one-hot class; the discriminator sees the image with one constant plane per
class stacked on its channels. Sizes: 28 px (7 -> 14 -> 28) and 64 px (4 -> 8 -> 16 -> 32 -> 64). Input
images of any size are resized (bilinear, antialiased) to `image_size` first. Training and generation draw
from their own seeded generators inside `torch.random.fork_rng`, so a trial's own random stream is the same
whether its GAN was trained now or read from the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STEMS = {28: (7, 2), 64: (4, 4)}  # image side -> (side of the first feature map, number of 2x up-sampling blocks)
REAL_TARGET = 0.9  # one-sided label smoothing (Salimans et al. 2016): steadier discriminator on small data


@dataclass(frozen=True)
class GanSettings:
    image_size: int  # 28 or 64 (STEMS)
    epochs: int
    width: int  # channels of the widest-resolution block; doubled at each lower resolution
    latent_dim: int
    batch_size: int
    lr: float

    def as_dict(self) -> dict:
        return asdict(self)


class Generator(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, width: int, latent_dim: int):
        super().__init__()
        side, ups = STEMS[image_size]
        self.num_classes, self.latent_dim, self.side = num_classes, latent_dim, side
        self.first = width * 2 ** (ups - 1)
        self.project = nn.Sequential(nn.Linear(latent_dim + num_classes, self.first * side * side, bias=False),
                                     nn.BatchNorm1d(self.first * side * side), nn.ReLU(True))
        blocks, wide = [], self.first
        for _ in range(ups - 1):
            blocks += [nn.ConvTranspose2d(wide, wide // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(wide // 2), nn.ReLU(True)]
            wide //= 2
        blocks += [nn.ConvTranspose2d(wide, channels, 4, 2, 1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, latent) noise and (N,) class indices -> (N, C, S, S) images in [-1, 1]."""
        onehot = F.one_hot(labels, self.num_classes).to(noise.dtype)
        hidden = self.project(torch.cat([noise, onehot], 1)).view(-1, self.first, self.side, self.side)
        return self.blocks(hidden)


class Discriminator(nn.Module):
    def __init__(self, num_classes: int, channels: int, image_size: int, width: int):
        super().__init__()
        side, ups = STEMS[image_size]
        self.num_classes = num_classes
        layers, wide, inputs = [], width, channels + num_classes
        for block in range(ups):
            layers += [nn.Conv2d(inputs, wide, 4, 2, 1, bias=block == 0)]
            layers += [nn.BatchNorm2d(wide)] if block else []  # DCGAN: no batch norm on the input block
            layers += [nn.LeakyReLU(0.2, True)]
            inputs, wide = wide, wide * 2
        self.features = nn.Sequential(*layers)
        self.score = nn.Linear(inputs * side * side, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) images in [-1, 1] and (N,) classes -> (N,) real/fake logits."""
        planes = F.one_hot(labels, self.num_classes).to(images.dtype)[:, :, None, None]
        planes = planes.expand(-1, -1, images.shape[2], images.shape[3])
        return self.score(self.features(torch.cat([images, planes], 1)).flatten(1)).squeeze(1)


def to_gan_scale(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, S, S) in [-1, 1], resized (bilinear, antialiased) to `image_size`."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if tensor.shape[-1] != image_size or tensor.shape[-2] != image_size:
        tensor = F.interpolate(tensor, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False).clamp(-1.0, 1.0)
    return tensor


def to_uint8(images: torch.Tensor, image_size: int | None = None) -> np.ndarray:
    """float (N, C, S, S) in [-1, 1] -> uint8 (N, H, W, C), resized to `image_size` when given (bilinear,
    antialiased: 64 px GAN images become 128 or 224 px ones by up-sampling, 28 px ones become 16 px ones)."""
    images = images.detach().float().cpu()
    if image_size is not None and images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False)
    return ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def auto_epochs(count: int, batch_size: int, steps: int = 2000) -> int:
    """Epochs that make about `steps` generator updates over `count` images."""
    per_epoch = max(count // batch_size, 1)
    return max(1, round(steps / per_epoch))


def train_dcgan(images: np.ndarray, labels: np.ndarray, *, num_classes: int, settings: GanSettings, seed: int,
                device: torch.device | str = "cpu") -> tuple[Generator, dict]:
    """Train on uint8 (N, H, W, C) `images` with class `labels`; returns (generator in eval mode on the CPU,
    {"g_loss": [...], "d_loss": [...]} per step). One discriminator then one generator update per batch."""
    device = torch.device(device)
    real_all = to_gan_scale(images, settings.image_size)
    labels_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    channels, count = real_all.shape[1], len(real_all)
    batch = min(settings.batch_size, count)
    history = {"g_loss": [], "d_loss": []}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(num_classes, channels, settings.image_size, settings.width, settings.latent_dim).to(device)
        critic = Discriminator(num_classes, channels, settings.image_size, settings.width).to(device)
        draws = torch.Generator().manual_seed(seed + 1)
        g_opt = torch.optim.Adam(generator.parameters(), lr=settings.lr, betas=(0.5, 0.999))
        d_opt = torch.optim.Adam(critic.parameters(), lr=settings.lr, betas=(0.5, 0.999))
        bce = nn.BCEWithLogitsLoss()
        for _ in range(settings.epochs):
            order = torch.randperm(count, generator=draws)
            for start in range(0, count - batch + 1, batch):  # whole batches only: batch norm needs 2+ images
                rows = order[start:start + batch]
                real, classes = real_all[rows].to(device), labels_all[rows].to(device)
                noise = torch.randn(len(rows), settings.latent_dim, generator=draws).to(device)
                fake = generator(noise, classes)
                d_loss = (bce(critic(real, classes), torch.full((len(rows),), REAL_TARGET, device=device))
                          + bce(critic(fake.detach(), classes), torch.zeros(len(rows), device=device)))
                d_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                d_opt.step()
                g_loss = bce(critic(fake, classes), torch.ones(len(rows), device=device))
                g_opt.zero_grad(set_to_none=True)
                g_loss.backward()
                g_opt.step()
                history["d_loss"].append(d_loss.item())
                history["g_loss"].append(g_loss.item())
    return generator.cpu().eval(), history


@torch.inference_mode()
def generate(generator: Generator, labels: np.ndarray, *, seed: int, image_size: int | None = None,
             batch: int = 512) -> np.ndarray:
    """uint8 (N, H, W, C) images of classes `labels` (N,), from seeded noise, resized to `image_size` if given."""
    generator.eval()
    draws = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    parts = [to_uint8(generator(torch.randn(len(chunk), generator.latent_dim, generator=draws), chunk), image_size)
             for chunk in labels.split(batch)]
    return np.concatenate(parts) if parts else np.empty((0,), np.uint8)
