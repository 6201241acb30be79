"""The FID Inception-v3: TensorFlow's 2015-12-05 Inception graph, as FID and Inception Score use it.

This is the network of the original TF FID / IS code, in the layout of torch-fidelity's
`FeatureExtractorInceptionV3` (whose weight file `weights-inception-2015-12-05-6726825d.pth` is a
plain state dict converted from the TF graph). Written here from the architecture, so that neither
torch-fidelity nor torchvision (whose wheels pin a CUDA torch) is needed. What differs from
torchvision's Inception3, each a property of the TF graph:

- input: uint8 RGB of any size -> float32 in [0, 255] -> TF1 bilinear resize to 299x299
  (`resize_bilinear_tf1`: no half-pixel offset, unlike torch's `interpolate`) -> (x - 128) / 128;
- BatchNorm eps 1e-3; the 3x3 average pools inside the A, C and E blocks do not count the zero
  padding (TF's SAME average pool); the last E block (Mixed_7c) max-pools its pool branch;
- 1008 classes; `logits_unbiased` (pool features @ fc.weight^T, no bias) are the Inception Score's
  logits, as in the original IS code.

Outputs (float32): `pool` [N, 2048] (the FID features) and `logits_unbiased` [N, 1008].
tests/test_inception.py checks this network against torch-fidelity's on the same random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF 1.x `resize_bilinear(align_corners=False)` of [N, C, H, W] float32 to size x size.

    The output pixel i reads source position i * (in / out) (no half-pixel centre), computed in
    float32 as TF does; the bilinear weights and the lerp order (rows first, then columns) are TF's,
    so uint8 inputs give the same float32 values as torch-fidelity's TF-compatible resize."""
    def axis(n_in: int):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size,
                                                                                     dtype=torch.float32)
        lo = pos.long()                        # floor: positions are >= 0
        hi = (lo + 1).clamp_max(n_in - 1)      # the last row / column repeats the edge
        return lo, hi, pos - lo.float()

    y_lo, y_hi, dy = axis(x.shape[2])
    x_lo, x_hi, dx = axis(x.shape[3])
    top, bottom = x.index_select(2, y_lo), x.index_select(2, y_hi)
    top_l, top_r = top.index_select(3, x_lo), top.index_select(3, x_hi)
    bot_l, bot_r = bottom.index_select(3, x_lo), bottom.index_select(3, x_hi)
    top = top_l + (top_r - top_l) * dx
    bottom = bot_l + (bot_r - bot_l) * dx
    return top + (bottom - top) * dy.view(-1, 1)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU; keys `.conv`, `.bn`."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    """TF's 3x3 stride-1 SAME average pool: the mean over the window's pixels inside the image."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_out channels."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_out, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], 1)


class BlockB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 768 channels."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):
    """17x17 block (Mixed_6b-e) with factorised 7x7 convolutions of width c7 -> 768 channels."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_same(x))], 1)


class BlockD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 1280 channels."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):
    """8x8 block (Mixed_7b avg-pools its pool branch, Mixed_7c max-pools it, as the TF graph) -> 2048."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg_pool_same(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """uint8 [N, 3, H, W] -> (pool [N, 2048], logits_unbiased [N, 1008]), float32, in eval mode."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_FEATURES, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 takes uint8 RGB images [N, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
        x = (x - 128) / 128                    # TF graph: (x - 128) * 0.0078125; the same in float32
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, 2)              # 147 -> 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, 2)              # 71 -> 35
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return pool, pool @ self.fc.weight.T


def expected_keys() -> dict[str, tuple]:
    """The weight file's keys and shapes: the network's state dict without BatchNorm's
    num_batches_tracked counters (the converted TF weights have none; loading accepts either)."""
    with torch.device("meta"):  # shapes only: no 24M-parameter random init
        own = FIDInceptionV3().state_dict()
    return {k: tuple(v.shape) for k, v in own.items() if not k.endswith("num_batches_tracked")}


def read_inception_weights(path, what: str = "Inception weights") -> dict:
    """The state dict of `path` (weights_only, memory-mapped where the format allows), checked against
    the network: the error names the first missing / unexpected key or wrong shape. `what` names the
    setting in the errors (e.g. "ddpm.inception_weights")."""
    path = Path(path)
    hint = f"give torch-fidelity's {WEIGHTS_FILE} (download it once from {WEIGHTS_URL})"
    if not path.is_file():
        raise ValueError(f"{what}: {path} does not exist; {hint}")
    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # mmap needs torch.save's zip format; a legacy-format file loads without it
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"{what}: {path} is not a state dict readable with weights_only=True ({e}); "
                         f"{hint}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict; {hint}")
    own = expected_keys()
    state = {k: v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(getattr(state[k], "shape", ())) != own[k]]
    if missing or unexpected or shapes:
        first = (f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'" if unexpected
                 else f"'{shapes[0]}' has shape {tuple(state[shapes[0]].shape)}, expected {own[shapes[0]]}")
        raise ValueError(f"{what}: {path} is not the FID Inception-v3 state dict ({first}; {len(missing)} "
                         f"missing, {len(unexpected)} unexpected, {len(shapes)} of another shape); {hint}")
    return state


def load_inception(path, what: str = "Inception weights") -> FIDInceptionV3:
    """FIDInceptionV3 with the checked weights of `path`, in eval mode, without gradients."""
    state = read_inception_weights(path, what)
    net = FIDInceptionV3()
    net.load_state_dict(state, strict=False)  # strict on every key above; only the BN counters may be absent
    return net.eval().requires_grad_(False)
