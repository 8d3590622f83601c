"""ResNet-20 for CIFAR (He et al. 2016) built from the layers, with PyTorch parameter names."""
import numpy as np

from .kernels.elementwise import add, add_relu_forward, relu_backward
from .layers import BatchNorm, Conv3x3, GlobalAvgPool, Linear, Module, Sequential, ShortcutA

STAGE_CHANNELS = (16, 32, 64)
BLOCKS_PER_STAGE = 3  # 6n+2 layers with n = 3 gives ResNet-20


def conv_bn_forward(conv, bn, x):
    """conv -> batch norm (-> its ReLU). In inference the batch norm is folded into the
    convolution and the ReLU applied to its output blocks (one pass instead of three), unless a
    forward hook (the CIM simulator) owns the convolution."""
    if conv.training or conv.forward_op is not None:
        return bn.forward(conv.forward(x))
    return conv.folded_forward(x, bn)


class BasicBlock(Module):
    """conv-bn-relu-conv-bn (the first ReLU fused into its batch norm), plus the option-A
    shortcut, then ReLU."""

    def __init__(self, in_channels, out_channels, stride, rng, dtype):
        super().__init__()
        self.conv1 = Conv3x3(in_channels, out_channels, stride, rng, dtype)
        self.bn1 = BatchNorm(out_channels, dtype, relu=True)
        self.conv2 = Conv3x3(out_channels, out_channels, 1, rng, dtype)
        self.bn2 = BatchNorm(out_channels, dtype)
        self.shortcut = ShortcutA(in_channels, out_channels, stride)

    def forward(self, x):
        branch = conv_bn_forward(self.conv2, self.bn2, conv_bn_forward(self.conv1, self.bn1, x))
        y = add_relu_forward(branch, self.shortcut.forward(x))
        self.y = y if self.training else None  # inference keeps no activations
        return y

    def backward(self, dy):
        dsum = relu_backward(dy, self.y)
        dbranch = self.conv1.backward(self.bn1.backward(self.conv2.backward(
            self.bn2.backward(dsum))))
        return add(dbranch, self.shortcut.backward(dsum))


class ResNet20(Module):
    """Input NHWC float pixel/255; output logits (N, 10)."""

    def __init__(self, rng, num_classes=10, dtype=np.float32):
        super().__init__()
        self.conv1 = Conv3x3(3, STAGE_CHANNELS[0], 1, rng, dtype, first=True)
        self.bn1 = BatchNorm(STAGE_CHANNELS[0], dtype, relu=True)
        in_channels = STAGE_CHANNELS[0]
        for stage, channels in enumerate(STAGE_CHANNELS, start=1):
            blocks = []
            for index in range(BLOCKS_PER_STAGE):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks.append(BasicBlock(in_channels, channels, stride, rng, dtype))
                in_channels = channels
            setattr(self, f"layer{stage}", Sequential(*blocks))
        self.pool = GlobalAvgPool()
        self.fc = Linear(STAGE_CHANNELS[-1], num_classes, rng, dtype)

    def forward(self, x):
        x = conv_bn_forward(self.conv1, self.bn1, x)
        x = self.layer3.forward(self.layer2.forward(self.layer1.forward(x)))
        return self.fc.forward(self.pool.forward(x))

    def backward(self, dlogits):
        dx = self.layer1.backward(self.layer2.backward(self.layer3.backward(
            self.pool.backward(self.fc.backward(dlogits)))))
        self.conv1.backward(self.bn1.backward(dx))
