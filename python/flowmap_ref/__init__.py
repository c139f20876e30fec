"""PyTorch reference of flowmap's networks and training steps, for the GPU acceptance run
(scripts/gpu_check.sh): the same DiT (adaLN-Zero, two time embedders) and SD-VAE decoder, loading
flowmap's safetensors weights under the same names, and the same measurements on the same device.

Needs only torch (and, for a random-weight Inception, torchvision): the GPU machine it runs on has
no network. `python -m flowmap_ref --help` lists the commands.
"""
