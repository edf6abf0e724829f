"""The README's picture of models beyond CNN classifiers: ``python scripts/figures_beyond_cnn.py``.

Writes ``docs/beyond_cnn.png``: one photo from ``skimage.data`` explained by a ViT (Grad-CAM and
attention rollout), a Swin, a Faster R-CNN detection, an FCN segmentation region and a regression
head. Nothing is downloaded: no ImageNet / COCO / VOC weights for these models ship here, so the
transformers, the detector and the segmenter have RANDOM weights (seed 0) and their maps show the
mechanics, not what a trained model sees — every panel says so. The regression head is built by
hand (the mean brightness of the image's left third), so its map has a known right answer: the
bright pixels of the left third.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from skimage import data, transform  # noqa: E402
from torch import nn  # noqa: E402

import camlens  # noqa: E402
from camlens.viz.overlay import overlay  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


class LeftBrightness(nn.Module):
    """A regression head with a known answer: the mean brightness (channel mean, ReLU'd after a 1x1
    conv) over the image's left third; ``(B,)`` values."""

    def __init__(self) -> None:
        super().__init__()
        self.lum = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.lum.weight.fill_(1 / 3)
            self.lum.bias.zero_()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.act(self.lum(x))
        return f[..., : x.shape[-1] // 3].mean((1, 2, 3))


def _seed_head(net: nn.Module) -> nn.Module:
    """Re-draw weights that the library initialises to zero (a zero head has no gradient at all)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            w = getattr(m, "weight", None)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and isinstance(w, torch.Tensor) and w.numel() and not w.any():
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
    return net.eval()


def main() -> Path:
    torch.manual_seed(0)
    img = transform.resize(data.chelsea(), (224, 224), anti_aliasing=True)  # float (224, 224, 3) in [0, 1]
    x = torch.from_numpy(((img - MEAN) / STD).transpose(2, 0, 1)).float()[None]
    raw = torch.from_numpy(img.transpose(2, 0, 1)).float()[None]  # detectors normalise themselves

    vit = _seed_head(timm.create_model("vit_tiny_patch16_224", pretrained=False))
    swin = _seed_head(torchvision.models.swin_t(weights=None))
    det = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=224, max_size=224, box_score_thresh=0.0).eval()
    seg = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=5).eval()
    reg = LeftBrightness().eval()

    panels = []
    e = camlens.explain(vit, x)
    panels.append((e.maps[0, 0], f"ViT-Tiny Grad-CAM\nlayer=None: {e.layers[0]}\nRANDOM weights", None))
    e = camlens.explain(vit, x, method="attention_rollout")
    panels.append((e.maps[0, 0], "ViT-Tiny attention rollout\n(12 blocks, class token)\nRANDOM weights", None))
    e = camlens.explain(swin, x)
    panels.append((e.maps[0, 0], f"Swin-T Grad-CAM\nlayer=None: {e.layers[0]} (channels-last)\nRANDOM weights", None))
    e = camlens.explain(det, raw)  # targets=None: the top detection
    d = e.targets[0][0].detection
    panels.append((e.maps[0, 0], f"Faster R-CNN, top detection\nlayer=None: {e.layers[0]}\nRANDOM weights", d.box))
    box = (40, 40, 180, 200)
    with torch.no_grad():  # the class the model predicts most inside the box
        cls = int(seg(x)["out"].argmax(1)[0, box[1]:box[3], box[0]:box[2]].flatten().bincount().argmax())
    e = camlens.explain(seg, x, camlens.Target.region(box, cls=cls))
    panels.append((e.maps[0, 0], f"FCN-ResNet50, class {cls} in the box\nlayer=None: {e.layers[0]}\nRANDOM weights",
                   box))
    e = camlens.explain(reg, raw, layer="act", method="hirescam")  # element-wise: only where the head looks
    panels.append((e.maps[0, 0], "regression head (B,): brightness of\nthe left third, HiResCAM — known\nanswer "
                   "(hand-built weights)", (0, 0, 224 // 3, 224)))

    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 3.8))
    for ax, (m, title, b) in zip(axes, panels):
        ax.imshow(overlay(img, m.detach().cpu().numpy(), alpha=0.5))
        if b is not None:
            x0, y0, x1, y1 = (float(v) for v in b)
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    out = ROOT / "docs" / "beyond_cnn.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
    sys.exit(0)
