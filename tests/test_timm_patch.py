"""The timm ViT patch (runs where timm is installed, e.g. on the GPU machine; timm is optional)."""

import pytest
import torch

from hf_distrattn import DistrConfig
from hf_distrattn.patches import timm_vit

try:
    import timm
except Exception as error:  # noqa: BLE001 - a torchvision built for another torch fails with RuntimeError
    pytest.skip(f"timm is not usable here: {error}", allow_module_level=True)


@torch.no_grad()
def test_patch_apply_and_revert():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ref = model(x)
    assert timm_vit.apply(model, DistrConfig(group_size=1)) == 12
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    timm_vit.apply(model, DistrConfig(grouping="lsh", group_size=4))
    assert (model(x) - ref).abs().max() > 1e-4
    assert timm_vit.revert(model) == 12
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
