"""Training-free synthetic shortcuts: linearly separable patches (LSP) and autoregressive (AR) noise.

Neither method looks at a network: each draws one random pattern *generator* per class and
gives every image a perturbation from its class's generator. The class-to-pattern map is an easy
shortcut that a victim learns instead of the image content.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from fuse_lightning.baselines.base import Perturbation, seeded_per_index

__all__ = [
    "AutoregressivePerturbation",
    "LinearSeparablePatches",
    "ar_filter_response",
    "ar_generate",
    "ar_generate_reference",
    "draw_ar_coefficients",
]


# ----------------------------------------------------------------------------------------- LSP
class LinearSeparablePatches(Perturbation):
    """LSP-style synthetic shortcut of Yu et al. (KDD 2022), class-wise random colour patches.

    Reference: D. Yu, H. Zhang, W. Chen, J. Yin, T.-Y. Liu, "Availability Attacks Create
    Shortcuts", KDD 2022.

    Each class has a random centroid in a low-dimensional space with one value per colour channel
    and patch (C x G x G, G = image_size / patch_size): a hypercube vertex with coordinates
    +-`class_sep`. Every image draws a point around its class centroid (isotropic Gaussian,
    `noise_std`; the original uses scikit-learn's `make_classification` with random per-class
    covariances), the point is upsampled by repeating each value over a `patch_size` square, and
    the result is scaled to the per-image L2 norm `l2_rms / 255 * sqrt(C H W)` (the original's
    `sqrt(d) * 6/255`, i.e. an RMS of 6/255 per pixel). The points are linearly separable by
    class, hence the name used in later benchmarks.

    Budget: the L2 norm above is the method's own budget. The export additionally clips every
    pixel to the L-infinity cap `eps` (default 8, the budget of the other methods): with
    +-10 centroids and unit spread the patch values vary by about 10 %, so the largest pixel is
    about 8.5/255 and the cap changes ~0.04 % of the pixels (on 3x32x32); it is recorded in the
    manifest (`eps_255`).

    Spectrum: piecewise constant on `patch_size` squares, so the energy sits at low spatial
    frequencies (below 1 / patch_size cycles per pixel, plus the sinc side lobes of the squares):
    the opposite of EM and AR, and untouched by a low-pass filter.

    Args:
        eps: L-infinity export cap in 0-255 units.
        l2_rms: Per-image L2 budget expressed as an RMS per pixel in 0-255 units
            (L2 = l2_rms / 255 * sqrt(C H W); 6 gives 1.30 on 3x32x32).
        patch_size: Side of the constant patches; None scales it with the resolution as
            image_size // 4 (8 on 32x32, as in the paper).
        class_sep: Half side of the hypercube whose vertices are the class centroids.
        noise_std: Per-image spread around the centroid (0 makes the method purely class-wise).
        seed: Seed of the centroids and of the per-image spread.
    """

    name = "lsp"

    def __init__(
        self,
        eps: float = 8.0,
        l2_rms: float = 6.0,
        patch_size: int | None = None,
        class_sep: float = 10.0,
        noise_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, seed=seed)
        if l2_rms <= 0 or class_sep <= 0 or noise_std < 0:
            raise ValueError("l2_rms and class_sep must be > 0, noise_std >= 0")
        if patch_size is not None and patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.l2_rms = l2_rms
        self.patch_size = patch_size
        self.class_sep = class_sep
        self.noise_std = noise_std
        self.centroids: torch.Tensor | None = None  # (K, C, G, G)
        self._patch = 0
        self._shape: tuple[int, int, int] | None = None

    def l2_budget(self, shape: tuple[int, ...]) -> float:
        """Per-image L2 budget in the [0, 1] scale for images of shape (C, H, W)."""
        return self.l2_rms / 255 * math.sqrt(math.prod(shape))

    def fit(self, datamodule) -> None:
        """Draw the class centroids for the DataModule's number of classes and image shape."""
        self.setup(datamodule.num_classes, tuple(datamodule.image_shape))

    def setup(self, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        """Draw the class centroids (what `fit` does, without a DataModule)."""
        c, h, w = image_shape
        self._patch = self.patch_size or max(1, h // 4)
        grid = (math.ceil(h / self._patch), math.ceil(w / self._patch))
        gen = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (num_classes, c, *grid), generator=gen) * 2 - 1
        self.centroids = self.class_sep * signs.float()
        self._shape = (c, h, w)
        self.fit_info = {"patch_size": self._patch, "grid": list(grid), "l2_budget": self.l2_budget(image_shape)}

    def perturb_fn(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        if self.centroids is None:
            raise RuntimeError("LinearSeparablePatches.perturb_fn needs fit() first")
        c, h, w = images.shape[1:]
        grid = tuple(self.centroids.shape[1:])
        points = self.centroids[labels.cpu()]
        if self.noise_std > 0:
            points = points + self.noise_std * seeded_per_index(self.seed, indices.cpu(), grid, "normal")
        patches = points.repeat_interleave(self._patch, 2).repeat_interleave(self._patch, 3)
        patches = patches[:, :, :h, :w]
        norms = patches.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = patches / norms * self.l2_budget((c, h, w))
        delta = delta.clamp(-self.eps / 255, self.eps / 255)
        return delta.to(device=images.device, dtype=images.dtype)


# ------------------------------------------------------------------------------------------ AR
def ar_generate_reference(coefficients: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Straightforward pixel-by-pixel AR recursion (slow; the definition `ar_generate` matches).

    Args:
        coefficients: (C, 3, 3) per-channel weights of the 8 causal neighbours (centre unused).
        init: (C, H, W) starting signal; the first two rows and columns are kept.

    Returns:
        (C, H, W) signal with x[c, i, j] = sum_{(a, b) != (2, 2)} w[c, a, b] x[c, i-2+a, j-2+b]
        for i, j >= 2.
    """
    x = init.clone()
    w = coefficients.clone()
    w[:, 2, 2] = 0
    for i in range(2, x.shape[1]):
        for j in range(2, x.shape[2]):
            x[:, i, j] = (w * x[:, i - 2 : i + 1, j - 2 : j + 1]).sum(dim=(1, 2))
    return x


@contextlib.contextmanager
def _single_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run CPU work on one intra-op thread, restoring the setting afterwards.

    Why: the AR recursion is hundreds of tiny element-wise ops; splitting each across threads
    costs more in synchronisation than it saves, and collapses (100x slower) when the cores are
    shared with other processes.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def ar_generate(coefficients: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """Batched 2-D AR recursion over a 3x3 causal window, by anti-diagonal wavefronts.

    Why: pixel (i, j) depends only on pixels (i', j') with i' <= i, j' <= j, (i', j') != (i, j),
    all of which have i' + j' < i + j; so every pixel on an anti-diagonal i + j = t can be
    computed at once, which turns H*W sequential steps into H + W. The image is first sheared so
    that anti-diagonal t becomes the contiguous slice `s[t]` (s[i + j, ..., i] = x[..., i, j]);
    each neighbour term is then a plain row-shifted slice of an earlier diagonal, with no gather.

    Args:
        coefficients: (B, C, 3, 3) weights per sample and channel (centre unused).
        init: (B, C, H, W) starting signal; the first two rows and columns are kept.

    Returns:
        (B, C, H, W) signal, equal to `ar_generate_reference` applied per sample.
    """
    with _single_cpu_thread(init.device):
        return _ar_generate(coefficients, init)


def _ar_generate(coefficients: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    b, c, h, w = init.shape
    sheared = init.new_zeros(h + w - 1, b, c, h)
    for i in range(h):
        sheared[i : i + w, :, :, i] = init[:, :, i, :].permute(2, 0, 1)
    weights = coefficients.to(init.dtype)[..., None]  # (B, C, 3, 3, 1)
    for t in range(4, h + w - 1):
        lo, hi = max(2, t - (w - 1)), min(h - 1, t - 2)
        if lo > hi:
            continue
        acc = torch.zeros(b, c, hi - lo + 1, dtype=init.dtype, device=init.device)
        for a in range(3):
            for k in range(3):
                if a == 2 and k == 2:
                    continue
                # neighbour (i - 2 + a, j - 2 + k) lies on diagonal t - 4 + a + k, row i - 2 + a
                acc += weights[:, :, a, k] * sheared[t - 4 + a + k, :, :, lo - 2 + a : hi - 1 + a]
        sheared[t, :, :, lo : hi + 1] = acc
    out = torch.empty_like(init)
    for i in range(h):
        out[:, :, i, :] = sheared[i : i + w, :, :, i].permute(1, 2, 0)
    return out


def draw_ar_coefficients(
    num_classes: int,
    channels: int,
    generator: torch.Generator,
    max_crest: float = 5.0,
    probe_size: int = 36,
    crop: int = 4,
    probes: int = 8,
    max_tries: int = 100000,
) -> torch.Tensor:
    """Random stable AR coefficients, one 3x3 causal filter per class and channel.

    As in the original: Gaussian weights with the centre set to 0, normalised to sum to 1, so the
    AR filter (weights with -1 at the centre) sums to zero. A draw is kept only if its process,
    run from `probes` Gaussian starts on a `probe_size` square (first `crop` rows/columns
    dropped), is finite and has a median crest factor (max |x| / RMS) of at most `max_crest`.

    Why the crest factor: the perturbations are scaled to an L-infinity budget, so a process whose
    energy piles up in a few pixels (a growing or bursty recursion) would leave almost every
    pixel near zero. White Gaussian noise has a crest factor of about 3.5 on 3x32x32; about 30 %
    of the random draws pass 5.

    Returns:
        (num_classes, channels, 3, 3) float64 coefficients.
    """
    kept: list[torch.Tensor] = []
    for _ in range(max_tries):
        b = torch.randn(3, 3, generator=generator, dtype=torch.float64)
        b[2, 2] = 0
        total = b.sum()
        if total.abs() < 1e-1:  # normalising by a near-zero sum gives huge weights
            continue
        b = b / total
        start = torch.randn(probes, 1, probe_size, probe_size, generator=generator, dtype=torch.float64)
        signal = ar_generate(b.view(1, 1, 3, 3).expand(probes, 1, 3, 3), start)[:, :, crop:, crop:]
        flat = signal.flatten(1)
        if not torch.isfinite(flat).all():
            continue
        crest = flat.abs().amax(dim=1) / flat.pow(2).mean(dim=1).sqrt().clamp_min(1e-300)
        if crest.median() <= max_crest:
            kept.append(b)
            if len(kept) == num_classes * channels:
                return torch.stack(kept).view(num_classes, channels, 3, 3)
    raise RuntimeError(f"could not draw {num_classes * channels} AR filters in {max_tries} tries")


class AutoregressivePerturbation(Perturbation):
    """AR-style perturbations of Sandoval-Segura et al. (NeurIPS 2022), one AR process per class.

    Reference: P. Sandoval-Segura, V. Singla, J. Geiping, M. Goldblum, T. Goldstein,
    D. W. Jacobs, "Autoregressive Perturbations for Data Poisoning", NeurIPS 2022.

    Each class gets a random, stable 2-D AR process with a 3x3 causal window per channel
    (`draw_ar_coefficients`). An image's perturbation runs its class's recursion from Gaussian
    initial values seeded by the image index, on an (H + crop) x (W + crop) canvas whose first
    `crop` rows and columns (containing the random start) are dropped. The matching AR filter
    (weights with -1 at the centre) maps the perturbation to exactly zero, while other classes'
    filters do not: a simple, class-separable shortcut.

    Budget: the paper scales each perturbation to L2 norm 1 on CIFAR-10 (an RMS of 4.6/255 per
    pixel); here it is scaled to the L-infinity budget `eps` (its largest pixel equals eps/255),
    so it is comparable with EM and FUSE. (The original code supports this L-infinity scaling
    too.) The RMS is then about eps / 5 (~1.7/255 at eps 8), weaker than the paper's L2 setting;
    processes with a high crest factor are rejected (`max_crest`) so that the scaling is not
    dominated by a few peak pixels.

    Spectrum: AR filters sum to zero, so the processes are high-pass-like textures with most of
    their energy at mid-to-high spatial frequencies; low-pass filtering strongly weakens them.

    Args:
        eps: L-infinity budget in 0-255 units.
        crop: Rows/columns dropped at the start of the recursion (4 as in the paper at 32x32).
        max_crest: Keep only AR processes whose peak is at most this multiple of their RMS.
        seed: Seed of the AR filters and of the per-image initial values.
    """

    name = "ar"

    def __init__(self, eps: float = 8.0, crop: int = 4, max_crest: float = 5.0, seed: int = 0) -> None:
        super().__init__(eps=eps, seed=seed)
        if crop < 0:
            raise ValueError(f"crop must be >= 0, got {crop}")
        if max_crest <= 1:
            raise ValueError(f"max_crest must be > 1, got {max_crest}")
        self.crop = crop
        self.max_crest = max_crest
        self.coefficients: torch.Tensor | None = None  # (K, C, 3, 3) float64

    def fit(self, datamodule) -> None:
        """Draw one AR process per class and channel."""
        self.setup(datamodule.num_classes, datamodule.image_shape[0])

    def setup(self, num_classes: int, channels: int = 3) -> None:
        """Draw the AR coefficients (what `fit` does, without a DataModule)."""
        gen = torch.Generator().manual_seed(self.seed)
        self.coefficients = draw_ar_coefficients(
            num_classes, channels, gen, max_crest=self.max_crest, crop=self.crop
        )
        self.fit_info = {"num_processes": num_classes}

    def filters(self) -> torch.Tensor:
        """AR filters (K, C, 3, 3): the coefficients with -1 at the centre; they annihilate
        perturbations of their own class."""
        if self.coefficients is None:
            raise RuntimeError("call fit() first")
        f = self.coefficients.clone()
        f[:, :, 2, 2] = -1
        return f

    def perturb_fn(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> torch.Tensor:
        if self.coefficients is None:
            raise RuntimeError("AutoregressivePerturbation.perturb_fn needs fit() first")
        c, h, w = images.shape[1:]
        canvas = (c, h + self.crop, w + self.crop)
        init = seeded_per_index(self.seed, indices.cpu(), canvas, "normal").double()
        dev = images.device
        # float64: the recursion multiplies many terms; scaling happens only at the end.
        signal = ar_generate(self.coefficients[labels.cpu()].to(dev), init.to(dev))
        signal = signal[:, :, self.crop :, self.crop :]
        peak = signal.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = signal / peak * (self.eps / 255)
        return delta.to(dtype=images.dtype)


def ar_filter_response(delta: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Mean absolute response of each AR filter on each perturbation.

    Args:
        delta: Perturbations (B, C, H, W).
        filters: AR filters (K, C, 3, 3).

    Returns:
        (B, K) mean |depthwise conv| over channels and valid positions.
    """
    b, c = delta.shape[:2]
    out = []
    for f in filters.to(delta.dtype):
        resp = F.conv2d(delta, f.view(c, 1, 3, 3), groups=c)
        out.append(resp.abs().flatten(1).mean(dim=1))
    return torch.stack(out, dim=1)
