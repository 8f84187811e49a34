"""Train a small DDPM UNet2DModel (noise prediction) on scikit-learn's digits or a folder of images.

With no options it trains on scikit-learn's bundled 8x8 handwritten digits (1,797 images, no
download) upscaled to 16x16, on the CPU in a few minutes, and writes into --out:

  unet/                  the model, diffusers format (diffusers' UNet2DModel.from_pretrained loads it;
                         the EMA weights with --ema)
  checkpoint/            the last training state (model, optimizer, LR schedule, EMA, RNG and data order),
                         what --resume continues from; every save is atomic (temp dir, then rename)
  samples.png            a grid of DDPM ancestral samples drawn with the training noise schedule
  loss.png               the loss curve
  metrics.json           losses, wall time and the sample-quality measure: the mean distance of each sample
                         to its nearest training image against the same for noise images, and (digits) the
                         mean max-class confidence of a logistic-regression digit classifier on samples,
                         noise and real digits
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.unet_2d import UNet2DModel

# Test hook: after this many optimizer steps (and the periodic save that falls on it) the run stops as if
# killed, without writing its final outputs; tests/cli uses it to interrupt a run and resume it.
INTERRUPT_ENV = "FASTUNET_TRAIN_INTERRUPT_AT"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="train on the images in DIR (searched recursively, read with pillow, converted to RGB) "
                        "instead of scikit-learn's digits")
    p.add_argument("--resolution", type=int, default=16,
                   help="image height and width the data is resized to (digits: 16 or 32; default: 16)")
    p.add_argument("--out", type=Path, default=Path("runs/digits"), metavar="DIR",
                   help="output directory (default: runs/digits)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps in total (default: 400)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak AdamW learning rate, reached after a linear warm-up and followed by cosine "
                        "decay to 10%% of it (default: 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear learning-rate warm-up steps (default: 50)")
    p.add_argument("--block-out-channels", type=int, nargs="+", default=[32, 64], metavar="C",
                   help="UNet width per resolution level; the deeper levels get self-attention "
                        "(default: 32 64)")
    p.add_argument("--timesteps", type=int, default=250,
                   help="diffusion steps T of the noise schedule, for training and sampling (default: 250)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="cosine",
                   help="noise schedule: DDPM's linear betas (rescaled to T steps) or the cosine alpha-bar "
                        "schedule of Nichol & Dhariwal (default: cosine)")
    p.add_argument("--scheduler", choices=["fastunet", "diffusers"], default="fastunet",
                   help="who implements the schedule: fastunet's own (this file), or diffusers' DDPMScheduler "
                        "with the same --schedule and --timesteps (needs diffusers; default: fastunet)")
    p.add_argument("--ema", action="store_true",
                   help="keep an exponential moving average of the weights; unet/ and the samples use it")
    p.add_argument("--ema-decay", type=float, default=0.995, help="EMA decay, with warm-up (default: 0.995)")
    p.add_argument("--device", default=None,
                   help="torch device to train on, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast the forward pass to bf16 or fp16 (fp16 with gradient scaling; default: no)")
    p.add_argument("--compile", action="store_true", help="train through torch.compile of the model")
    p.add_argument("--save-every", type=int, default=100,
                   help="write the resumable checkpoint every N steps (and at the end; 0: only at the end; "
                        "default: 100)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint (weights, optimizer, LR schedule, EMA, RNG state, data "
                        "order) up to --steps")
    p.add_argument("--num-samples", type=int, default=64, help="images sampled at the end (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the data order and the noise (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads torch may use (default: half the cores, at least 1: spinning OpenMP threads "
                        "that outnumber the free cores slow training several-fold on a machine other jobs share)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# -- noise schedule ---------------------------------------------------------------------------------------


class NoiseSchedule:
    """A DDPM noise schedule over ``T`` steps: ``betas``, ``alphas_cumprod`` (float64 tensors of shape (T,)).

    ``linear``: DDPM's betas 1e-4 .. 0.02 for 1,000 steps, scaled by 1000 / T so that fewer steps keep the
    same total noise (clipped at 0.999 for very short schedules). ``cosine``: ``alpha_bar(t) = cos((t/T + s) / (1 + s) * pi/2)^2`` with s = 0.008,
    betas clipped at 0.999.
    """

    def __init__(self, kind: str, T: int):
        if T < 2:
            raise ValueError(f"the schedule needs at least 2 timesteps, got {T}")
        self.kind, self.T = kind, T
        if kind == "linear":
            scale = 1000 / T
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64).clamp(max=0.999)
        elif kind == "cosine":
            s = 0.008
            t = torch.arange(T + 1, dtype=torch.float64) / T
            abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"schedule must be 'linear' or 'cosine', got {kind!r}")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; x0, noise (B, C, H, W), t (B,) int64."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)[:, None, None, None]
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One ancestral DDPM step x_t -> x_{t-1} from the predicted noise ``eps`` (x0 clipped to [-1, 1],
        posterior variance beta-tilde)."""
        abar = self.alphas_cumprod[t].item()
        abar_prev = self.alphas_cumprod[t - 1].item() if t > 0 else 1.0
        beta = self.betas[t].item()
        x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        mean = (beta * math.sqrt(abar_prev) / (1 - abar)) * x0 + ((1 - abar_prev) * math.sqrt(1 - beta) / (1 - abar)) * x
        if t == 0:
            return mean
        var = beta * (1 - abar_prev) / (1 - abar)
        z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
        return mean + math.sqrt(var) * z


class DiffusersSchedule:
    """The same interface over diffusers' ``DDPMScheduler`` (``--scheduler diffusers``)."""

    def __init__(self, kind: str, T: int):
        try:
            from diffusers import DDPMScheduler
        except ImportError as e:
            raise SystemExit(f"error: --scheduler diffusers needs diffusers installed ({e})") from e
        beta_schedule = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[kind]
        scale = 1000 / T if kind == "linear" else 1.0
        self.scheduler = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule,
                                       beta_start=min(1e-4 * scale, 0.999), beta_end=min(0.02 * scale, 0.999), clip_sample=True, variance_type="fixed_small")
        self.kind, self.T = kind, T
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()

    def add_noise(self, x0, noise, t):
        return self.scheduler.add_noise(x0, noise, t)

    def step(self, eps, t, x, generator):
        return self.scheduler.step(eps, t, x, generator=generator).prev_sample


def make_schedule(args) -> NoiseSchedule | DiffusersSchedule:
    cls = DiffusersSchedule if args.scheduler == "diffusers" else NoiseSchedule
    return cls(args.schedule, args.timesteps)


# -- data and model ---------------------------------------------------------------------------------------


def load_digits_images(resolution: int) -> torch.Tensor:
    """scikit-learn's 1,797 digits as (N, 1, resolution, resolution) float32 in [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()[:, None] / 16 * 2 - 1
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)


def load_folder_images(directory: Path, resolution: int) -> torch.Tensor:
    """Every image under ``directory`` as (N, 3, resolution, resolution) float32 in [-1, 1]."""
    from PIL import Image

    if not directory.is_dir():
        raise SystemExit(f"error: --data {directory}: not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"error: --data {directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    images = []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
                images.append(torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1))
        except OSError as e:
            raise SystemExit(f"error: cannot read image {path}: {e}") from e
    return (torch.stack(images) / 255 * 2 - 1).clamp(-1, 1)


def build_model(channels: int, resolution: int, block_out_channels: list[int]) -> UNet2DModel:
    """A DDPM UNet: plain resnet blocks at full resolution, self-attention on the deeper levels."""
    n = len(block_out_channels)
    if resolution % 2 ** (n - 1):
        raise SystemExit(f"error: --resolution {resolution} must be divisible by 2^{n - 1} for {n} UNet levels")
    groups = math.gcd(8, *block_out_channels)
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=tuple(block_out_channels), norm_num_groups=groups, attention_head_dim=16,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
    )


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """The data indices of optimizer step ``step``: epochs are seeded permutations, so the order is a pure
    function of (seed, step) and a resumed run reads exactly the batches the interrupted one would have."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size:(k + 1) * batch_size] if n >= batch_size else perm.repeat(-(-batch_size // n))[:batch_size]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class EMA:
    """An exponential moving average of a model's floating-point parameters, decay ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    def copy_to(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(self.shadow[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], state["shadow"]


# -- checkpoints ------------------------------------------------------------------------------------------


def atomic_directory_write(final: Path, write) -> None:
    """Call ``write(tmp_dir)``, then move ``tmp_dir`` to ``final`` (replacing it): an interruption leaves the
    previous complete directory (as ``final`` or, in the instant between two renames, ``final.old``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f"{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, model, optimizer, scheduler, scaler, ema, step: int, losses: list[float], args) -> None:
    state = {
        "step": step, "losses": losses, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict(), "ema": ema.state_dict() if ema else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run"},
    }

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "unet")
        torch.save(state, tmp / "training_state.pt")

    atomic_directory_write(out / "checkpoint", write)


def find_checkpoint(out: Path) -> Path | None:
    for candidate in (out / "checkpoint", out / "checkpoint.old"):
        if (candidate / "training_state.pt").is_file() and (candidate / "unet" / "config.json").is_file():
            return candidate
    return None


# -- evaluation -------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(model, schedule, n: int, shape: tuple, device, seed: int, quiet: bool) -> torch.Tensor:
    """``n`` DDPM ancestral samples (n, C, H, W) in [-1, 1]."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed + 12345)
    x = torch.randn((n, *shape), generator=g).to(device)
    if isinstance(schedule, DiffusersSchedule):
        schedule.scheduler.set_timesteps(schedule.T)
    model.eval()
    for t in tqdm(range(schedule.T - 1, -1, -1), desc="sampling", disable=quiet, leave=False):
        eps = model(x, torch.full((n,), t, device=device, dtype=torch.long)).sample.float()
        x = schedule.step(eps.cpu(), t, x.cpu(), g).to(device)
    model.train()
    return x.clamp(-1, 1).cpu()


def quality(samples: torch.Tensor, data: torch.Tensor, digits: bool, seed: int) -> dict:
    """How much more the samples resemble the data than noise does.

    * ``nn_distance``: mean L2 distance (pixels in [-1, 1]) from each image to its nearest training image, for
      the samples, for noise images (Gaussian per pixel with the data's per-pixel mean and std, clipped to
      [-1, 1]: noise with the data's first two moments) and, as the floor, for training images to the nearest
      *other* training image. Lower is closer to the data.
    * digits only, ``classifier_confidence``: mean max-class probability of a logistic-regression classifier
      trained on the 8x8 digits (samples and noise are averaged down to 8x8), with the mean entropy (nats).
    """
    g = torch.Generator().manual_seed(seed + 999)
    n = samples.shape[0]
    flat = data.flatten(1)
    mean, std = flat.mean(0), flat.std(0)
    noise = (mean + std * torch.randn((n, flat.shape[1]), generator=g)).clamp(-1, 1)
    ref = flat[torch.randperm(flat.shape[0], generator=g)[:n]]

    def nn_dist(x: torch.Tensor, exclude_self: bool = False) -> float:
        d = torch.cdist(x.double(), flat.double())
        if exclude_self:
            d[d == 0] = math.inf
        return d.min(1).values.mean().item()

    result = {"nn_distance": {"samples": nn_dist(samples.flatten(1)), "noise": nn_dist(noise),
                              "data": nn_dist(ref, exclude_self=True)}}
    if digits:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        X, y = load_digits(return_X_y=True)
        clf = LogisticRegression(max_iter=2000).fit(X / 16, y)
        side = samples.shape[-1]

        def confidence(images: torch.Tensor) -> tuple[float, float]:
            small = F.adaptive_avg_pool2d(images.reshape(-1, 1, side, side).float(), 8)
            p = clf.predict_proba(((small.flatten(1) + 1) / 2).clamp(0, 1).numpy())
            entropy = -(p * np.log(np.clip(p, 1e-12, 1))).sum(1)
            return float(p.max(1).mean()), float(entropy.mean())

        conf = {name: confidence(x) for name, x in (("samples", samples), ("noise", noise), ("data", ref))}
        result["classifier_confidence"] = {k: v[0] for k, v in conf.items()}
        result["classifier_entropy"] = {k: v[1] for k, v in conf.items()}
        preds = clf.predict(((F.adaptive_avg_pool2d(samples.float(), 8).flatten(1) + 1) / 2).clamp(0, 1).numpy())
        result["sample_class_counts"] = {str(c): int((preds == c).sum()) for c in range(10)}
    d = result["nn_distance"]
    result["samples_closer_than_noise"] = d["samples"] < d["noise"]
    return result


def save_grid(images: torch.Tensor, path: Path) -> None:
    """A square PNG grid of (N, C, H, W) images in [-1, 1]."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((c, rows * (h + 2) + 2, cols * (w + 2) + 2), -1.0)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + k * (w + 2):2 + k * (w + 2) + w] = images[i]
    array = ((grid + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array[..., 0] if c == 1 else array)
    scale = max(1, 512 // max(image.size))
    image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST).save(path)


def save_loss_plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, label="loss per step")
    k = max(1, len(losses) // 30)
    if len(losses) >= k:
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(range(k, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("noise-prediction MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run ----------------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: no CUDA GPU is available on this machine (torch {torch.__version__})")
    return device


def validate(args) -> None:
    for name in ("steps", "batch_size", "timesteps", "num_samples"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.save_every < 0 or args.warmup_steps < 0:
        raise SystemExit("error: --save-every and --warmup-steps must be >= 0")
    if args.lr <= 0:
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")
    if args.data is None and args.resolution not in (16, 32):
        raise SystemExit(f"error: the digits are trained at --resolution 16 or 32, got {args.resolution}")


def run(args) -> int:
    """``fastunet train``; torch's thread count is restored afterwards (the tests call this in-process)."""
    validate(args)
    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise SystemExit(f"error: --threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return train(args, device)
    finally:
        torch.set_num_threads(before)


def train(args, device: torch.device) -> int:
    from tqdm import tqdm

    out: Path = args.out
    interrupt_at = int(os.environ.get(INTERRUPT_ENV, "0") or 0)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = load_folder_images(args.data, args.resolution) if args.data else load_digits_images(args.resolution)
    schedule = make_schedule(args)
    model = build_model(data.shape[1], args.resolution, args.block_out_channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.steps))
    fp16 = args.mixed_precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    ema = EMA(model, args.ema_decay) if args.ema else None
    start, losses = 0, []

    if args.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None:
            raise SystemExit(f"error: --resume: no checkpoint in {out / 'checkpoint'}")
        loaded = UNet2DModel.from_pretrained(ckpt / "unet")
        try:
            model.load_state_dict(loaded.state_dict(), strict=True)
        except RuntimeError as e:
            raise SystemExit(f"error: --resume: {ckpt} was trained with another model shape: {e}") from e
        state = torch.load(ckpt / "training_state.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        scaler.load_state_dict(state["grad_scaler"])
        if ema is not None:
            if state["ema"] is None:
                raise SystemExit("error: --resume --ema: the checkpoint was trained without --ema")
            ema.load_state_dict(state["ema"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        start, losses = state["step"], list(state["losses"])
        if start >= args.steps:
            print(f"checkpoint {ckpt} is at step {start}, --steps is {args.steps}: nothing to train")
        else:
            print(f"resuming from {ckpt} at step {start}")

    train_model = torch.compile(model) if args.compile else model
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    alphas_on_device = schedule.alphas_cumprod.to(device)
    model.train()
    began = time.perf_counter()
    bar = tqdm(range(start, args.steps), desc="training", initial=start, total=args.steps, disable=args.quiet)
    for step in bar:
        x0 = data[batch_indices(len(data), args.batch_size, step, args.seed)].to(device)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + 7919 * step + 1)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=g).to(device)
        abar = alphas_on_device[t].float()[:, None, None, None]
        noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = train_model(noisy, t).sample
        loss = F.mse_loss(pred.float(), noise)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: the loss is {loss.item()} at step {step + 1}; lower --lr or drop --mixed-precision")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()
        if ema is not None:
            ema.update(model)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
        done = step + 1
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save_checkpoint(out, model, optimizer, lr_scheduler, scaler, ema, done, losses, args)
        if interrupt_at and done == interrupt_at:
            bar.close()
            print(f"{INTERRUPT_ENV}={interrupt_at}: stopping after step {done} as if interrupted", file=sys.stderr)
            return 130
    bar.close()
    train_time = time.perf_counter() - began
    save_checkpoint(out, model, optimizer, lr_scheduler, scaler, ema, args.steps, losses, args)

    final = model
    if ema is not None:
        final = build_model(data.shape[1], args.resolution, args.block_out_channels).to(device)
        ema.copy_to(final)
    atomic_directory_write(out / "unet", lambda tmp: final.save_pretrained(tmp))

    began_sampling = time.perf_counter()
    samples = sample(final, schedule, args.num_samples, tuple(data.shape[1:]), device, args.seed, args.quiet)
    sampling_time = time.perf_counter() - began_sampling
    save_grid(samples, out / "samples.png")
    save_loss_plot(losses, out / "loss.png")
    k = max(1, min(50, len(losses) // 10))
    metrics = {
        "steps": args.steps, "resumed_from": start if args.resume else None,
        "loss_first": float(np.mean(losses[:k])), "loss_last": float(np.mean(losses[-k:])), "loss_window": k,
        "train_seconds": train_time, "sampling_seconds": sampling_time, "device": str(device),
        "data": str(args.data) if args.data else f"sklearn digits {args.resolution}x{args.resolution}",
        "num_images": len(data), "schedule": args.schedule, "scheduler": args.scheduler, "timesteps": args.timesteps,
        "ema": args.ema, "mixed_precision": args.mixed_precision,
        "quality": quality(samples, data, digits=args.data is None, seed=args.seed),
        "losses": losses,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    q = metrics["quality"]
    print(f"loss {metrics['loss_first']:.4f} (first {k} steps) -> {metrics['loss_last']:.4f} (last {k})")
    d = q["nn_distance"]
    print(f"nearest-training-image distance: samples {d['samples']:.3f}, noise {d['noise']:.3f}, "
          f"data {d['data']:.3f}")
    if "classifier_confidence" in q:
        c = q["classifier_confidence"]
        print(f"digit-classifier confidence: samples {c['samples']:.3f}, noise {c['noise']:.3f}, data {c['data']:.3f}")
    print(f"wrote {out / 'unet'}, {out / 'samples.png'}, {out / 'loss.png'}, {out / 'metrics.json'}")
    return 0
