"""Support code: what the paper's six files (dimr.py, td_ln.py, diffusion.py, train.py, sample.py,
fid.py) need but the paper does not describe. One module per job:

- checkpoints: atomic writes, safe checkpoint reads, our checkpoints and the authors' release
- cli: one-line errors, checked flags, flags from a dataclass
- depthwise: the depthwise convolutions' kernel layout, and an opt-in faster CPU backward
- data: training data (ImageNet 64, image folders, latents) in the model's space
- digits: the digits demo's data and metrics (class accuracy, confidence, its FID reference)
- distributed: torch.distributed helpers that work with and without torchrun; the thread rule
- images: pixels to uint8, labelled grids, image sets on disk (ADM's .npz layout, folders)
- inception: the FID Inception-v3 network and where its weights come from
- progress: progress lines of long work
- provenance: the command, commit and wall time behind a number in docs/data/
- run_folder: the folder of one training run
- sample_parts: resumable sampling, the finished batches of a sample.py run
- vae: the Stable Diffusion autoencoder of the latent models
"""
