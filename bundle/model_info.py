"""``python -m bundle model-info``: parameters, FLOPs, CPU timings and output grids of the network presets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bundle.timing import time_runs
from custom_components.network import PRESETS, build_network


def count_flops(network: nn.Module, shape: Sequence[int]) -> int:
    """FLOPs (2 x multiply-adds) of the Conv3d/ConvTranspose3d layers for one input of spatial ``shape``.

    Counted analytically from each layer's input/output sizes via forward hooks: a convolution does
    ``C_in/groups * prod(kernel)`` multiply-adds per output element, a transposed one ``C_out/groups * prod(kernel)``
    per input element. Norms, activations and additions (a few % more) are not counted.
    """
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
        if isinstance(module, nn.ConvTranspose3d):
            macs += inputs[0].numel() * module.out_channels // module.groups * kernel
        else:
            macs += output.numel() * module.in_channels // module.groups * kernel

    convs = [m for m in network.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        with torch.inference_mode():
            network.eval()(torch.zeros(1, 1, *shape))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * macs


def model_info(patch: int = 96, timing_patch: int = 64, batch: int = 2, repeats: int = 3, presets: str = "") -> None:
    """Print, for each preset (comma-separated ``presets``, default all): parameters, GFLOPs per ``patch``^3, forward
    and forward+backward ms per ``timing_patch``^3 patch (median of ``repeats`` runs of a batch of ``batch``, divided by
    ``batch``; on a CPU batch 1 runs PyTorch's slow native conv3d) and the two heads' output grids for ``patch``^3."""
    torch.manual_seed(0)
    names = [p.strip() for p in presets.split(",") if p.strip()] or list(PRESETS)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; patch {patch}^3, timing {batch} x {timing_patch}^3")
    print(f"{'preset':<8} {'params':>10} {'GFLOPs/patch':>13} {'fwd ms':>8} {'fwd+bwd ms':>11}  "
          "outputs (A*5)xIxJxK: head 0 (s2), head 1 (s4)")
    for name in names:
        net = build_network(name)
        params = sum(p.numel() for p in net.parameters())
        flops = count_flops(net, (patch,) * 3)
        x = torch.rand(batch, 1, *(timing_patch,) * 3)

        def forward() -> None:
            with torch.inference_mode():
                net(x)

        def forward_backward() -> None:
            sum(o.sum() for o in net(x)).backward()

        net.eval()
        fwd = time_runs(forward, repeats=repeats)["median_s"] / batch
        net.train()
        fwd_bwd = time_runs(forward_backward, repeats=repeats)["median_s"] / batch
        net.eval()
        with torch.inference_mode():
            grids = [tuple(o.shape[1:]) for o in net(torch.zeros(1, 1, patch, patch, patch))]
        print(
            f"{name:<8} {params:>10,} {flops / 1e9:>13.2f} {fwd * 1e3:>8.0f} {fwd_bwd * 1e3:>11.0f}  "
            + ", ".join(f"{g[0]}x{g[1]}x{g[2]}x{g[3]}" for g in grids)
        )
