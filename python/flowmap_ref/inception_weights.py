"""Inception-v3 TorchScript files for the GPU check.

* `pack` / `unpack`: the FID Inception file (pt_inception-2015-12-05.pt, 87 MB) with its float32
  storages stored as float16 (44 MB), so that `make bundle` with FLOWMAP_BUNDLE_WEIGHTS=fp16 fits
  the 64 MiB a GPU machine's carry allows; `unpack` restores an ordinary float32 TorchScript file
  (the weights rounded to float16 once: about 0.04 % on an FID, toolchain.md). The zip's other
  entries (code, pickles) are copied unchanged; which entries were converted is listed in
  `flowmap_fp16.json` inside the packed file.
* `random`: torchvision's Inception-v3 with random weights, pool3 output (N, 2048), traced, for
  timing on machines without the real file (its features mean nothing for FID).
"""
import ctypes
import io
import json
import pickle
import zipfile

import torch

MANIFEST = "flowmap_fp16.json"
FP16_MAX = 65504.0


class _Any:
    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        pass

    def __call__(self, *a, **k):
        return _Any()


def float_storages(z):
    """Names of the zip entries holding float32 storages, from the persistent ids in data.pkl."""
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise ValueError(f"expected one data.pkl in the TorchScript zip, found {pkl}")
    prefix = pkl[0][: -len("data.pkl")]
    found = []

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch" and name.endswith("Storage"):
                return name
            if module.startswith("__torch__"):
                return type(name, (_Any,), {})
            return _Any()

        def persistent_load(self, pid):
            # ('storage', storage type, key, location, numel)
            if isinstance(pid, tuple) and pid and pid[0] == "storage":
                found.append((pid[1], str(pid[2]), int(pid[4])))
            return _Any()

    Unpickler(io.BytesIO(z.read(pkl[0]))).load()
    names = []
    for kind, key, numel in found:
        if kind != "FloatStorage":
            continue
        name = f"{prefix}data/{key}"
        if z.getinfo(name).file_size != 4 * numel:
            raise ValueError(f"{name}: {z.getinfo(name).file_size} bytes for {numel} float32 values")
        names.append(name)
    return names


def _rewrite(src, dst, names, transform, manifest):
    """Copies the zip entry by entry, passing the entries in `names` through `transform`."""
    targets = set(names)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            if info.filename == MANIFEST:
                continue
            data = zin.read(info.filename)
            if info.filename in targets:
                data = transform(data)
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=info.date_time), data)
        if manifest is not None:
            zout.writestr(zipfile.ZipInfo(MANIFEST, date_time=(1980, 1, 1, 0, 0, 0)), json.dumps(manifest))


def _convert(data, src_dtype, dst_dtype):
    t = torch.frombuffer(bytearray(data), dtype=src_dtype).to(dst_dtype).contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())  # no numpy needed


def pack(src, dst):
    """float32 storages -> float16; refuses values float16 cannot hold. Returns the entry count."""
    with zipfile.ZipFile(src) as z:
        names = float_storages(z)
        for n in names:
            t = torch.frombuffer(bytearray(z.read(n)), dtype=torch.float32)
            if t.numel() and t.abs().max().item() > FP16_MAX:
                raise ValueError(f"{n}: values beyond float16's range ({t.abs().max().item()})")
    _rewrite(src, dst, names, lambda d: _convert(d, torch.float32, torch.float16), {"fp16_entries": names})
    return len(names)


def unpack(src, dst):
    """Restores the float32 TorchScript file from a packed one. Returns the entry count."""
    with zipfile.ZipFile(src) as z:
        names = json.loads(z.read(MANIFEST))["fp16_entries"]
    _rewrite(src, dst, names, lambda d: _convert(d, torch.float16, torch.float32), None)
    return len(names)


def compare(a, b, device="cpu"):
    """max |f_a - f_b| / max |f_a| on a fixed random batch, for the two TorchScript files."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 299, 299, device=device) * 2 - 1
    ma = torch.jit.load(a, map_location=device).eval()
    mb = torch.jit.load(b, map_location=device).eval()
    with torch.no_grad():
        fa, fb = ma(x).double(), mb(x).double()
    return (fa - fb).abs().max().item() / fa.abs().max().item()


def random_torchscript(dst, device="cpu"):
    """torchvision's Inception-v3 (random weights, no auxiliary head, fc replaced by identity):
    (N, 3, 299, 299) -> (N, 2048), traced to TorchScript."""
    import torchvision  # only on machines that have it (the GPU machines do)

    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    model.fc = torch.nn.Identity()
    model = model.eval().to(device)
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.rand(2, 3, 299, 299, device=device))
    traced.save(dst)
