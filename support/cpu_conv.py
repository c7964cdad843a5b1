"""An opt-in speed-up for training on the CPU (train.py --cpu-conv-kernel; the demo uses it).

The ConvNeXt blocks' depthwise 7x7 convolution is cheap, but oneDNN computes its kernel gradient
about 3x slower than the convolution itself on this project's CPU, which made it a tenth of the
demo's training step. That gradient is itself a depthwise convolution:
grad_w[d, i, j] = sum_{b,h,w} x_pad[b, d, h + i, w + j] g[b, d, h, w], the input convolved with
the output gradient as the kernel, one group per (image, channel), summed over the images; this
module computes it so. The numbers are those of F.conv2d's own backward up to float rounding
(tests/test_dimr.py); nothing changes on other devices.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class DepthwiseConvCPU(torch.autograd.Function):
    """F.conv2d(x, w, b, padding=k // 2, groups=D) with the backward above. Under CPU autocast it
    runs in float32."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias):                               # x: (B, D, H, W)
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=x.shape[1])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, g):                                            # g: (B, D, H, W)
        x, weight = ctx.saved_tensors
        (B, D, H, W), k = x.shape, weight.shape[-1]
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, g, padding=k // 2, groups=D)
        grad_w = F.conv2d(x.reshape(1, B * D, H, W), g.reshape(B * D, 1, H, W), padding=k // 2,
                          groups=B * D)                              # (1, B*D, k, k)
        grad_w = torch.empty_like(weight).copy_(grad_w.view(B, D, 1, k, k).sum(0))  # w's strides
        return grad_x, grad_w, g.sum((0, 2, 3))


class DepthwiseConv2dCPU(nn.Conv2d):
    """nn.Conv2d whose depthwise convolution takes DepthwiseConvCPU on CPU tensors."""

    def _conv_forward(self, x, weight, bias):
        if x.is_cpu:
            return DepthwiseConvCPU.apply(x, weight, bias)
        return super()._conv_forward(x, weight, bias)


def use_fast_depthwise_backward(model):
    """Switch every depthwise convolution of `model` (groups = channels, 'same' padding) to
    DepthwiseConv2dCPU, in place; the parameters and their names stay. Their kernels are stored
    channels-last, the layout of their gradients (the blocks' inputs are channels-last), so that
    DDP's gradient buckets need no copies."""
    for m in model.modules():
        if type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels > 1 \
                and m.padding == (m.kernel_size[0] // 2, m.kernel_size[1] // 2):
            m.__class__ = DepthwiseConv2dCPU
            m.weight.data = m.weight.data.to(memory_format=torch.channels_last)
    return model
