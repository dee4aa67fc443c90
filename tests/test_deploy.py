"""MONAI Deploy, the part that needs no SDK: ``monai.bundle ckpt_export`` of the network with its configs (the
application itself is tested in the SDK's environment: ``tests/test_deploy_app.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ckpt_export

from custom_components.network import build_network

REPO = Path(__file__).resolve().parents[1]


def export_untrained(folder: Path) -> tuple[Path, torch.nn.Module]:
    """``folder/model.pt`` and ``folder/model.ts`` exported as the docs say (``ckpt_export network_def --ckpt_file
    model.pt --meta_file configs/metadata.json --config_file configs/inference.json``, lean preset) from an untrained
    network whose noduleness prior is raised to 0.5 so that it reports detections; returns ``model.ts`` and the eager
    network."""
    torch.manual_seed(0)
    network = build_network("lean", prior=0.5)
    torch.save(network.state_dict(), folder / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(folder / "model.ts"),
        ckpt_file=str(folder / "model.pt"),
        meta_file=str(REPO / "configs" / "metadata.json"),
        config_file=str(REPO / "configs" / "inference.json"),
        network_preset="lean",
    )
    return folder / "model.ts", network.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return export_untrained(tmp_path_factory.mktemp("models"))


def test_export_embeds_configs_and_scripts_the_network(exported: tuple[Path, torch.nn.Module]) -> None:
    """The TorchScript file holds the metadata and the inference config, keeps the attributes the detector reads,
    and computes what the eager network computes."""
    path, network = exported
    extra = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(path), _extra_files=extra)
    metadata = json.loads(extra["metadata.json"])
    expected = json.loads((REPO / "configs" / "metadata.json").read_text())
    assert metadata["version"] == expected["version"]
    assert metadata["network_data_format"] == expected["network_data_format"]
    assert json.loads(extra["inference.json"]) == json.loads((REPO / "configs" / "inference.json").read_text())
    assert scripted.anchor_sizes == network.anchor_sizes and tuple(scripted.strides) == network.strides
    x = torch.rand(1, 1, 40, 36, 28)  # not a multiple of 16: the padding and cropping are scripted too
    with torch.no_grad():
        for got, want in zip(scripted(x), network(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_detector_runs_a_torchscript_network_in_float32_whatever_amp(exported: tuple[Path, torch.nn.Module]) -> None:
    """TorchScript's autocast casts every convolution, the heads' float32 one too (bf16 logits); so the detector runs a
    scripted network without autocast: its detections with ``amp="bfloat16"`` are the eager network's in fp32."""
    from custom_components.detector import NoduleDetector

    path, network = exported
    scripted = torch.jit.load(str(path))
    x = torch.rand(1, 1, 48, 64, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert scripted(x)[0].dtype == torch.bfloat16, "TorchScript's own autocast (what the detector avoids)"
    got = NoduleDetector(scripted, score_thresh=0.0, amp="bfloat16")(x)[0]
    want = NoduleDetector(network, score_thresh=0.0, amp=False)(x)[0]
    assert len(want["label_scores"]) > 0
    for key in ("cube", "label_scores"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
