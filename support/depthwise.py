"""The ConvNeXt blocks' depthwise convolutions, as train.py runs them (no change to the numbers).

- `channels_last_kernels`: the blocks' inputs are channels-last (B, H, W, D) permuted to
  (B, D, H, W), so their kernels' gradients come out channels-last; storing the kernels in that
  layout keeps DDP's gradient buckets in step with them (no "grad strides do not match" copies).
- `use_fast_depthwise_backward`, opt-in (train.py --cpu-conv-kernel; the demo uses it): on the
  CPU oneDNN computes the kernel's gradient slowly, about 3x the time of this module's way for the
  demo's convolution forward and backward (docs/speed.md). That gradient is itself a depthwise
  convolution: grad_w[d, i, j] = sum_{b,h,w} x_pad[b, d, h + i, w + j] g[b, d, h, w], the input
  convolved with the output gradient as the kernel, one group per (image, channel), summed over
  the images. Equal to F.conv2d's own backward up to float rounding (tests/test_dimr.py); nothing
  changes on other devices.
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


def depthwise_convs(model):
    """The depthwise convolutions of `model` (groups = channels, 'same' padding)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)
            and m.groups == m.in_channels == m.out_channels > 1
            and m.padding == (m.kernel_size[0] // 2, m.kernel_size[1] // 2)]


def channels_last_kernels(model):
    """Store every depthwise kernel channels-last, in place (values and names unchanged)."""
    for m in depthwise_convs(model):
        m.weight.data = m.weight.data.to(memory_format=torch.channels_last)
    return model


def use_fast_depthwise_backward(model):
    """Switch every depthwise convolution of `model` to DepthwiseConv2dCPU, in place; the
    parameters and their names stay."""
    for m in depthwise_convs(model):
        m.__class__ = DepthwiseConv2dCPU
    return model
