"""Support code: what the paper's six files (dimr.py, td_ln.py, diffusion.py, train.py, sample.py,
fid.py) need but the paper does not describe. One module per job:

- checkpoints: atomic writes, safe checkpoint reads, our checkpoints and the authors' release
- cli: one-line errors, checked flags, flags from a dataclass
- depthwise: the depthwise convolutions' kernel layout, and an opt-in faster CPU backward
- data: training data (ImageNet 64, image folders, latents) in the model's space
- digits: the digits demo's data and metrics (class accuracy, FID against the real digits)
- distributed: torch.distributed helpers that work with and without torchrun; the thread rule
- images: image sets on disk (ADM's .npz layout, image folders)
- inception_weights: where the FID Inception's weights come from
- progress: progress lines of long work
- run_folder: the folder of one training run
- sample_parts: resumable sampling, the finished batches of a sample.py run
- vae: the Stable Diffusion autoencoder of the latent models
"""
