#!/usr/bin/env python3
"""Independent reference for flowmap's ADM suite (used by crates/experiments/tests/adm_metrics.rs).

    adm_reference.py suite INCEPTION.pt SAMPLES.npz REF.npz OUT.json [LOGITS_W.npz]
        torch-fidelity 0.4.0's own InceptionV3 feature extractor (its TF1 resize, its network code),
        loaded with the weights of flowmap's TorchScript file (the same TF inception-2015-12-05
        weights; renamed below, every tensor used), run on arr_0 of both batches. Writes
          fid            torch-fidelity fid_statistics_to_metric on its pool3 features
          fid_pytorch_fid  pytorch-fid calculate_frechet_distance (scipy sqrtm) on the same statistics
          sfid           torch-fidelity fid_statistics_to_metric on mixed_6/conv[..., :7] (NHWC,
                         flattened), read from torch-fidelity's Mixed_6d.branch1x1 with a forward hook
          sfid_pytorch_fid  pytorch-fid calculate_frechet_distance on the same statistics (only with
                         FLOWMAP_REFERENCE_SQRTM=1: scipy's sqrtm of a 2023x2023 matrix takes a minute)
          inception_score   torch-fidelity isc_features_to_metric (10 splits, no shuffle) on
                         logits_unbiased = pool3 @ W.T, with W from LOGITS_W.npz (`weight`)
          precision, recall   torch-fidelity prc_features_to_metric (k = 3) on its pool3 features
    adm_reference.py prc FEATURES.npz OUT.json
        torch-fidelity's precision/recall on given float64 `reference` and `samples` arrays (the
        very features flowmap used); torch-fidelity's isc on `logits` when present.

Nothing is downloaded: torch-fidelity gets a weights file built here from the TorchScript file.
Exit code 3 means a package is missing (the Rust test fails and names `make setup`).
"""
import json
import os
import sys
import tempfile

try:
    import numpy as np
    import torch
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
except ImportError as e:
    print(f"missing python dependency: {e} (run `make setup`)", file=sys.stderr)
    sys.exit(3)

torch.set_num_threads(int(os.environ.get("FLOWMAP_REFERENCE_THREADS", "2")))

# TorchScript (NVIDIA's naming of the TF graph) -> torch-fidelity (torchvision's naming).
STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
           "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2", "tower.conv_2": "branch3x3dbl_3"}
BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
           "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
           "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"}
BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
           "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a", "tower_mixed_conv_1": "branch3x3_2b",
           "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
           "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
BLOCKS = {"mixed": ("Mixed_5b", BLOCK_A), "mixed_1": ("Mixed_5c", BLOCK_A), "mixed_2": ("Mixed_5d", BLOCK_A), "mixed_3": ("Mixed_6a", BLOCK_B),
          "mixed_4": ("Mixed_6b", BLOCK_C), "mixed_5": ("Mixed_6c", BLOCK_C), "mixed_6": ("Mixed_6d", BLOCK_C), "mixed_7": ("Mixed_6e", BLOCK_C),
          "mixed_8": ("Mixed_7a", BLOCK_D), "mixed_9": ("Mixed_7b", BLOCK_E), "mixed_10": ("Mixed_7c", BLOCK_E)}


def torch_fidelity_state_dict(torchscript_path, logits_weight):
    params = dict(torch.jit.load(torchscript_path, map_location="cpu").named_parameters())
    convs = {}
    for name in params:
        assert name.startswith("net.layers."), name
        layer, field = name[len("net.layers."):].rsplit(".", 1)
        convs.setdefault(layer, {})[field] = params[name].detach()
    sd = {}
    for layer, p in convs.items():
        head, _, rest = layer.partition(".")
        target = STEM[layer] if layer in STEM else f"{BLOCKS[head][0]}.{BLOCKS[head][1][rest]}"
        sd[f"{target}.conv.weight"] = p["weight"]
        sd[f"{target}.bn.weight"] = torch.ones_like(p["beta"])  # the TF graph's batch norm has no scale
        sd[f"{target}.bn.bias"] = p["beta"]
        sd[f"{target}.bn.running_mean"] = p["mean"]
        sd[f"{target}.bn.running_var"] = p["var"]
        sd[f"{target}.bn.num_batches_tracked"] = torch.tensor(0)
    sd["fc.weight"] = torch.as_tensor(logits_weight, dtype=torch.float32) if logits_weight is not None else torch.zeros(1008, 2048)
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def extractor(torchscript_path, logits_weight):
    features = ["2048"] + (["logits_unbiased"] if logits_weight is not None else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.pth")
        torch.save(torch_fidelity_state_dict(torchscript_path, logits_weight), path)
        fe = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=path)
    spatial = []
    fe.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: spatial.append(out[:, :7].permute(0, 2, 3, 1).reshape(out.shape[0], -1).double()))
    return fe, spatial


def activations(fe, spatial, images_nhwc, batch=50):
    pool, logits = [], []
    spatial.clear()
    with torch.no_grad():
        for i in range(0, len(images_nhwc), batch):
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc[i:i + batch])).permute(0, 3, 1, 2).contiguous()
            out = fe(x)
            pool.append(out[0])
            if len(out) > 1:
                logits.append(out[1])
    return torch.cat(pool), torch.cat(spatial).numpy(), (torch.cat(logits) if logits else None)


def stats64(a):
    return np.mean(a, axis=0), np.cov(a, rowvar=False)


def suite(ts_path, samples_path, ref_path, out_path, logits_path=None):
    w = np.load(logits_path)["weight"] if logits_path else None
    fe, spatial = extractor(ts_path, w)
    s_pool, s_spatial, s_logits = activations(fe, spatial, np.load(samples_path)["arr_0"])
    r_pool, r_spatial, _ = activations(fe, spatial, np.load(ref_path)["arr_0"])
    out = {"num_samples": len(s_pool), "num_reference": len(r_pool)}
    out["fid"] = fid_statistics_to_metric(fid_features_to_statistics(s_pool), fid_features_to_statistics(r_pool), False)["frechet_inception_distance"]
    (m1, c1), (m2, c2) = stats64(s_pool.double().numpy()), stats64(r_pool.double().numpy())
    out["fid_pytorch_fid"] = float(calculate_frechet_distance(m1, c1, m2, c2))
    (m1, c1), (m2, c2) = stats64(s_spatial), stats64(r_spatial)
    out["sfid"] = fid_statistics_to_metric({"mu": m1, "sigma": c1}, {"mu": m2, "sigma": c2}, False)["frechet_inception_distance"]
    if os.environ.get("FLOWMAP_REFERENCE_SQRTM") == "1":  # scipy sqrtm of 2023x2023: about a minute on 2 cores
        out["sfid_pytorch_fid"] = float(calculate_frechet_distance(m1, c1, m2, c2))
    if s_logits is not None:
        out["inception_score"] = isc_features_to_metric(s_logits, splits=10, shuffle=False)["inception_score_mean"]
    pr = prc_features_to_metric(s_pool, r_pool, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    out["precision"], out["recall"] = pr["precision"], pr["recall"]
    json.dump(out, open(out_path, "w"), indent=1)


def prc(features_path, out_path):
    f = np.load(features_path)
    pr = prc_features_to_metric(torch.from_numpy(f["samples"]), torch.from_numpy(f["reference"]), prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    out = {"precision": pr["precision"], "recall": pr["recall"]}
    if "logits" in f.files:
        out["inception_score"] = isc_features_to_metric(torch.from_numpy(f["logits"]), splits=10, shuffle=False)["inception_score_mean"]
    json.dump(out, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"suite": suite, "prc": prc}[cmd](*args)
