#!/usr/bin/env python3
"""msad against the reference PyTorch training loop, same data and same initial weights.

1. Converts the embedded digits (data/digits.bin; sklearn's load_digits) to the CIFAR-10
   binary format: 8x8 images enlarged 4x to 32x32 by pixel repetition, gray levels
   round(v * 255 / 16); the images with index % 3 == 0 go to test_batch.bin (msad's digits
   split), the others to data_batch_1..5.bin.
2. Writes a randomly initialised torchvision ResNet-18 (seeded) as init.pth.
3. Runs, per normal class, the reference procedure in PyTorch: the Mean-Shifted Contrastive
   code's loop (eval-mode ResNet, center from the pretrained features, MoCo v2 views,
   `contrastive_loss` on features minus the center, SGD lr / weight decay 5e-5, kNN k=2 ROC-AUC
   after each epoch), at 32 px. This is a re-implementation following the authors' main.py and
   utils.py, not their file.
4. Runs msad's `one_class` example on the same directory and checkpoint, and compares the
   ROC-AUC before training and after the last epoch.

    .venv/bin/python scripts/side_by_side.py [--classes 0 3 8] [--epochs 2] [--lr 1e-5]

Build the example first: cargo build --release --features ndarray --example one_class.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

from bench_loss import contrastive_loss  # the reference's loss, verbatim

ROOT = Path(__file__).resolve().parent.parent


def load_digits_bin():
    raw = (ROOT / "data" / "digits.bin").read_bytes()
    assert raw[:8] == b"MSADDIG1"
    n = int.from_bytes(raw[8:12], "little")
    records = np.frombuffer(raw[12:], dtype=np.uint8).reshape(n, 65)
    labels = records[:, 0]
    pixels = ((records[:, 1:].astype(np.uint16) * 255 + 8) // 16).astype(np.uint8).reshape(n, 8, 8)
    return pixels, labels


def write_cifar(directory: Path):
    pixels, labels = load_digits_bin()
    big = np.kron(pixels, np.ones((4, 4), dtype=np.uint8))  # n x 32 x 32
    planes = np.repeat(big[:, None, :, :], 3, axis=1).reshape(len(big), 3072)
    records = np.concatenate([labels[:, None], planes], axis=1).astype(np.uint8)
    test = np.arange(len(records)) % 3 == 0
    (directory / "test_batch.bin").write_bytes(records[test].tobytes())
    train = records[~test]
    for i, part in enumerate(np.array_split(train, 5)):
        (directory / f"data_batch_{i + 1}.bin").write_bytes(part.tobytes())
    return big, labels, test


class GaussianBlur:
    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, x):
        import random

        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


NORMALIZE = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
EVAL = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), NORMALIZE])


def moco(size):
    """The reference's two-view training transform (MoCo v2) at `size` pixels."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur([0.1, 2.0])], p=0.5),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        NORMALIZE,
    ])


MOCO = moco(32)


class Model(torch.nn.Module):
    def __init__(self, checkpoint):
        super().__init__()
        self.backbone = torchvision.models.resnet18()
        self.backbone.load_state_dict(torch.load(checkpoint))
        self.backbone.fc = torch.nn.Identity()

    def forward(self, x):
        return F.normalize(self.backbone(x), dim=-1)


def features(model, images):
    with torch.no_grad():
        out = [model(torch.stack([EVAL(im) for im in images[i:i + 64]])) for i in range(0, len(images), 64)]
    return torch.cat(out)


def knn_auroc(model, train, test, anomalous):
    bank = features(model, train)
    query = features(model, test)
    d = torch.cdist(query.double(), bank.double()) ** 2
    scores = d.topk(2, largest=False).values.sum(1).numpy()
    return float(roc_auc_score(anomalous, scores))


def reference_run(checkpoint, big, labels, test_mask, normal, epochs, lr, batch, seed):
    torch.manual_seed(seed)
    import random

    random.seed(seed)
    to_img = lambda a: Image.fromarray(np.stack([a] * 3, -1), "RGB")
    train = [to_img(a) for a, l, t in zip(big, labels, test_mask) if not t and l == normal]
    test = [to_img(a) for a, t in zip(big, test_mask) if t]
    anomalous = [int(l != normal) for l, t in zip(labels, test_mask) if t]
    model = Model(checkpoint).eval()
    history = [{"epoch": 0, "loss": None, "auroc": knn_auroc(model, train, test, anomalous)}]
    center = features(model, train).mean(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=5e-5)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train)).tolist()
        total, seen = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            x1 = torch.stack([MOCO(train[j]) for j in idx])
            x2 = torch.stack([MOCO(train[j]) for j in idx])
            out_1, out_2 = model(x1) - center, model(x2) - center
            loss = contrastive_loss(out_1, out_2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        history.append({"epoch": epoch, "loss": total / seen, "auroc": knn_auroc(model, train, test, anomalous)})
    return history


def msad_run(data_dir, checkpoint, normal, epochs, lr, batch, seed):
    exe = ROOT / "target" / "release" / "examples" / "one_class"
    cmd = [str(exe), "--data", str(data_dir), "--dataset", "cifar10", "--class", str(normal),
           "--arch", "resnet18", "--weights", str(checkpoint), "--epochs", str(epochs),
           "--batch", str(batch), "--lr", str(lr), "--image-size", "32", "--device", "flex",
           "--seed", str(seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["epochs"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big, labels, test_mask = write_cifar(tmp)
        torch.manual_seed(1234)
        checkpoint = tmp / "init.pth"
        torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
        rows = []
        for normal in args.classes:
            t0 = time.perf_counter()
            ref = reference_run(checkpoint, big, labels, test_mask, normal, args.epochs, args.lr, args.batch, args.seed)
            t1 = time.perf_counter()
            ours = msad_run(tmp, checkpoint, normal, args.epochs, args.lr, args.batch, args.seed)
            t2 = time.perf_counter()
            rows.append((normal, ref, ours, t1 - t0, t2 - t1))
            print(f"class {normal}: before ref {ref[0]['auroc']:.4f} msad {ours[0]['auroc']:.4f} | "
                  f"after {args.epochs} epochs ref {ref[-1]['auroc']:.4f} msad {ours[-1]['auroc']:.4f} | "
                  f"time ref {t1 - t0:.0f}s msad {t2 - t1:.0f}s", flush=True)
        before = max(abs(r[1][0]["auroc"] - r[2][0]["auroc"]) for r in rows)
        after = max(abs(r[1][-1]["auroc"] - r[2][-1]["auroc"]) for r in rows)
        mean = lambda which, i: float(np.mean([r[which][i]["auroc"] for r in rows]))
        summary = {
            "lr": args.lr, "epochs": args.epochs, "classes": args.classes,
            "max_diff_before": before, "max_diff_after": after,
            "mean_before": {"reference": mean(1, 0), "msad": mean(2, 0)},
            "mean_after": {"reference": mean(1, -1), "msad": mean(2, -1)},
        }
        print(json.dumps(summary))
        ok = before <= 0.002 and after <= 0.01
        print("within tolerance (0.002 before, 0.01 after):", ok)
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
