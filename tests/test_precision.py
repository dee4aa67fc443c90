"""Mixed precision: which dtype ``amp`` selects, and that the network (only the network) runs in it."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedTrainer

from custom_components import precision
from custom_components.anchors import RegressionAnchors
from custom_components.boxes import CubeCoder
from custom_components.detector import NoduleDetector
from custom_components.loss import DetectionLoss
from custom_components.network import build_network
from custom_components.train_iteration import detection_iteration


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test CPU\nflags\t\t: {flags}\n")
    return path


def test_native_bf16_needs_the_cpu_flag_and_avx512_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision.cpu_has_native_bf16.__wrapped__(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512_bf16"))
    assert not precision.cpu_has_native_bf16.__wrapped__(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f"))
    assert not precision.cpu_has_native_bf16.__wrapped__(tmp_path / "missing")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not precision.cpu_has_native_bf16.__wrapped__(_cpuinfo(tmp_path, "fpu avx2 avx512f avx512_bf16"))


def test_amp_values_resolve_per_device(monkeypatch):
    assert precision.default_amp("cuda") == "float16"
    for off in (False, None, "none", "false", ""):
        assert precision.autocast_dtype(off, "cpu") is None
    assert precision.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert precision.autocast_dtype(torch.float16, "cuda") is torch.float16
    assert precision.needs_grad_scaler("float16", "cuda") and not precision.needs_grad_scaler("bfloat16", "cuda")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.default_amp("cpu") == "none"
    with pytest.raises(ValueError, match="no native mixed precision"):
        precision.autocast_dtype(True, "cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype(True, "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="amp must be"):
        precision.autocast_dtype("int8", "cpu")


def _record_conv_dtypes(network):
    """Output dtypes of the body's convs (``seen``) and of the heads' last convs (``heads``), as they run."""
    seen, heads = [], []
    last = {network.head0[-1], network.head1[-1]}
    for module in network.modules():
        if isinstance(module, torch.nn.Conv3d):
            record = heads if module in last else seen
            module.register_forward_hook(lambda m, i, o, record=record: record.append(o.dtype))
    return seen, heads


def test_detector_runs_the_network_in_bf16_and_decodes_in_fp32():
    torch.manual_seed(0)
    network = build_network("lean")
    seen, heads = _record_conv_dtypes(network)
    image = torch.rand(1, 1, 48, 64, 40, generator=torch.Generator().manual_seed(1))
    fp32 = NoduleDetector(network, score_thresh=0.0, amp=False)(image)[0]
    assert set(seen) == set(heads) == {torch.float32}
    seen.clear()
    bf16 = NoduleDetector(network, score_thresh=0.0, amp="bfloat16")(image)[0]
    assert set(seen) == {torch.bfloat16} and set(heads) == {torch.float32}
    assert bf16["label_scores"].dtype == torch.float32 and bf16["cube"].dtype == torch.float32
    assert len(bf16["label_scores"]) == len(fp32["label_scores"]) > 0
    # an untrained network's noduleness is near its prior everywhere; bf16 moves it by well under 1%
    torch.testing.assert_close(bf16["label_scores"].max(), fp32["label_scores"].max(), rtol=0.02, atol=0)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_training_iteration_autocasts_the_forward_only(dtype):
    torch.manual_seed(0)
    network = build_network("lean")
    seen, heads = _record_conv_dtypes(network)
    loss = DetectionLoss(RegressionAnchors(network.anchor_sizes, network.strides), CubeCoder())
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[0], network=network, optimizer=optimizer,
        loss_function=loss, iteration_update=detection_iteration, amp=False, amp_kwargs={"dtype": dtype},
    )
    before = [p.detach().clone() for p in network.parameters()]
    batch = {
        "image": torch.rand(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2)),
        "boxes": [torch.tensor([[15.5, 16.0, 15.0, 8.0]]), torch.zeros(0, 4)],
        "ignore": [torch.zeros(0, 4), torch.zeros(0, 4)],
    }
    out = detection_iteration(trainer, batch)
    assert set(seen) == {dtype or torch.float32} and set(heads) == {torch.float32}
    assert out["num_pos"] > 0 and torch.isfinite(torch.tensor(out["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))
