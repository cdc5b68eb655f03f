"""Helpers (no tests) for the package-runtime tests: six small real models, converted with ``ct.convert``.

Each builder returns ``(torch model, example input)``; ``convert_model`` traces and converts it for a
deployment target (fp16 compute precision, coremltools' default) and saves the package.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from coreml_opt import zoo


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


class LeNet5(nn.Module):
    """LeNet5-style CNN: 5x5 convs, tanh, average pools, three linears (flatten by view)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(16 * 5 * 5, 120)
        self.f2 = nn.Linear(120, 84)
        self.f3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.avg_pool2d(torch.tanh(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        x = x.view(x.shape[0], -1)
        return self.f3(torch.relu(self.f2(torch.relu(self.f1(x)))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, each with BN; residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    """MobileNetV2-style net: stem conv, inverted residuals with depthwise convs and relu6, global pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1))
        self.post_bn = nn.BatchNorm2d(24)  # after a residual add: cannot fold, stays a batch_norm op
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.post_bn(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(self.pool(x)))))


class EfficientNetish(nn.Module):
    """EfficientNet-style net: SiLU, depthwise conv, squeeze-excite, hard-swish, adaptive avg pool, dropout-free head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.SiLU())
        self.dw = nn.Conv2d(16, 16, 5, 1, 2, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16)
        self.proj = nn.Conv2d(16, 32, 1)
        self.act = nn.Hardswish()
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.se(nn.functional.silu(self.bn(self.dw(x))))
        x = self.pool(self.act(self.proj(x)))
        return self.fc(torch.flatten(x, 1))


class TinyEncoder(nn.Module):
    """Transformer encoder on int token ids: embedding + positions, two stock encoder layers, mean-pool head."""

    def __init__(self, vocab: int = 50, d: int = 32, seq: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(ids) + self.pos)
        return self.head(self.norm(h[:, 0] + h.mean(dim=1)))


class UpNet(nn.Module):
    """Encoder-decoder with ConvTranspose2d, nearest and bilinear upsampling and a channel concat."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, 2, 1)
        self.up = nn.ConvTranspose2d(8, 8, 4, 2, 1)
        self.up2 = nn.ConvTranspose2d(8, 4, 3, 1, 1)
        self.mix = nn.Conv2d(8 + 3 + 4, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = torch.relu(self.down(x))
        u = torch.relu(self.up(d))
        v = nn.functional.interpolate(torch.relu(self.up2(d)), scale_factor=2, mode="bilinear",
                                      align_corners=False)
        n = nn.functional.interpolate(nn.functional.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        return self.out(torch.relu(self.mix(torch.cat([u, n, v], dim=1))))


def digits() -> tuple[nn.Module, torch.Tensor]:
    return zoo.digits_cnn().eval(), torch.rand(1, *zoo.EXAMPLE_INPUT_SHAPE[1:])


def lenet5() -> tuple[nn.Module, torch.Tensor]:
    _seeded(1)
    return LeNet5().eval(), torch.rand(1, 1, 28, 28)


def _randomize_bn(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def mobilenet() -> tuple[nn.Module, torch.Tensor]:
    _seeded(2)
    return _randomize_bn(MobileNetV2ish()).eval(), torch.rand(1, 3, 32, 32)


def efficientnet() -> tuple[nn.Module, torch.Tensor]:
    _seeded(3)
    return _randomize_bn(EfficientNetish()).eval(), torch.rand(1, 3, 32, 32)


def encoder() -> tuple[nn.Module, torch.Tensor]:
    _seeded(4)
    return TinyEncoder().eval(), torch.randint(0, 50, (1, 12), dtype=torch.int32)


def upnet() -> tuple[nn.Module, torch.Tensor]:
    _seeded(6)
    return UpNet().eval(), torch.rand(1, 3, 16, 16)


MODELS = {"digits": digits, "lenet5": lenet5, "mobilenet": mobilenet, "efficientnet": efficientnet,
          "encoder": encoder, "upnet": upnet}


def convert_model(model: nn.Module, example: torch.Tensor, path: Path, target: str = "iOS18",
                  fold_bn: bool = False) -> Path:
    """Trace ``model`` on ``example`` and save an fp16 ML Program at ``path`` (BN folded by coremltools' passes)."""
    import coremltools as ct

    if fold_bn:
        from coreml_opt.model.convert import fold_batchnorm
        model = fold_batchnorm(model)
    torch.backends.mha.set_fastpath_enabled(False)  # the fast path traces to an op ct.convert lacks
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, example)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    dtype = None if example.dtype.is_floating_point else example.numpy().dtype
    inputs = [ct.TensorType(name="x", shape=tuple(example.shape), dtype=dtype)]
    mlmodel = ct.convert(traced, inputs=inputs, convert_to="mlprogram",
                         minimum_deployment_target=getattr(ct.target, target))
    mlmodel.save(str(path))
    return path



class OpMix(nn.Module):
    """Op semantics the six models leave out: same/asymmetric padding, dilation, groups, ceil-mode and
    exclude-padding pooling, output_padding, reflect pad, chunk/split, softmax, matmul with transposes,
    instance norm, leaky relu, elu, hard sigmoid, division, rsqrt-style ops."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(4, 8, 4, padding="same")          # even kernel: asymmetric pads
        self.dil = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.inorm = nn.InstanceNorm2d(4, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.leaky_relu(self.same(x), 0.1)
        y = nn.functional.elu(self.dil(y))
        y = nn.functional.avg_pool2d(y, 3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        y = nn.functional.max_pool2d(nn.functional.pad(y, (1, 1, 1, 1), mode="reflect"), 2, 1)
        y = self.strided(y)
        a, b = torch.chunk(y, 2, dim=1)
        y = torch.cat([a * torch.sigmoid(b), nn.functional.hardsigmoid(a) / (b.abs() + 1.0)], dim=1)
        z = self.inorm(self.up(y))
        flat = z.flatten(2)                                      # (N, 4, HW)
        attn = torch.softmax(flat @ flat.transpose(1, 2) / 8.0, dim=-1)
        return (attn @ flat).mean(dim=2) + torch.sqrt(flat.pow(2).mean(dim=2) + 1e-3)


def opmix() -> tuple[nn.Module, torch.Tensor]:
    _seeded(8)
    return OpMix().eval(), torch.rand(1, 4, 15, 15)
