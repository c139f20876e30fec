"""python -m flowmap_ref COMMAND ... (see each module's docstring)."""
import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m flowmap_ref", description="PyTorch reference side of flowmap's GPU check")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time the PyTorch twin of flowmap's bench section")
    b.add_argument("--flowmap-json", required=True, help="flowmap's bench JSON (sizes and config)")
    b.add_argument("--parity-json", help="flowmap's parity JSON (the VAE weights to time)")
    b.add_argument("--inception", help="Inception TorchScript file to time")
    b.add_argument("--variant", choices=["eager", "compiled"], default="eager")
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    b.add_argument("--device", default="cuda")
    b.add_argument("--threads", type=int, help="intra-op CPU threads")
    b.add_argument("--out", required=True)
    p = sub.add_parser("parity", help="load flowmap's weights, recompute its outputs")
    p.add_argument("--flowmap-json", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", required=True)
    r = sub.add_parser("report", help="merge one run's JSON files into report.json and report.md")
    r.add_argument("out")
    i = sub.add_parser("inception", help="Inception TorchScript files: pack / unpack (fp16 storage), random (torchvision)")
    i.add_argument("action", choices=["pack", "unpack", "roundtrip", "random", "compare"])
    i.add_argument("src", help="source file (random: the output file)")
    i.add_argument("dst", nargs="?")
    sub.add_parser("cuda", help="exit 0 when torch sees a CUDA device, print its name")
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "bench":
        from . import bench

        bench.run(args)
        return 0
    if args.command == "parity":
        from . import parity

        return parity.run(args)
    if args.command == "report":
        from . import report

        return report.run(args)
    if args.command == "inception":
        from . import inception_weights as iw

        if args.action == "pack":
            print(f"{iw.pack(args.src, args.dst)} float32 storages stored as float16 in {args.dst}")
        elif args.action == "unpack":
            print(f"{iw.unpack(args.src, args.dst)} storages restored to float32 in {args.dst}")
        elif args.action == "roundtrip":
            iw.pack(args.src, args.dst + ".fp16")
            print(f"{iw.unpack(args.dst + '.fp16', args.dst)} storages through float16 and back into {args.dst}")
        elif args.action == "compare":
            print(f"max |features difference| / max |features|: {iw.compare(args.src, args.dst):.3e}")
        else:
            iw.random_torchscript(args.src)
            print(f"random-weight Inception-v3 (torchvision) in {args.src}")
        return 0
    if args.command == "cuda":
        import torch

        if torch.cuda.is_available():
            print(torch.cuda.get_device_name(0))
            return 0
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
