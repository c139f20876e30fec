#!/usr/bin/env python3
"""Extracts the 1008-way classifier matrix of the FID Inception network for Inception Score in
`flowmap evaluate --inception-logits FILE.npz`.

    inception_logits.py WEIGHTS OUT.npz

WEIGHTS is a file you already have that holds the TF inception-2015-12-05 classifier:
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth` (both state dicts with `fc.weight` (1008, 2048)).
No package registry ships these (the registry copy flowmap uses had its classifier removed), and
this script downloads nothing. OUT.npz holds `weight` (1008, 2048) float32; the ADM evaluator
multiplies by it without the bias, and so does flowmap.
"""
import sys

import numpy as np
import torch

sd = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
for key in ("fc.weight", "output.weight", "softmax.weight"):
    if key in sd:
        w = sd[key].float().numpy()
        break
else:
    sys.exit(f"{sys.argv[1]}: no fc.weight (keys: {list(sd)[-6:]})")
assert w.shape == (1008, 2048), w.shape
np.savez(sys.argv[2], weight=w)
print(f"{sys.argv[2]}: weight {w.shape}")
