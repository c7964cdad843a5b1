"""Scripts around the paper's code, each run from the project's root as `python -m tools.NAME`:
bench (speed and memory), check_images (unreadable files of an image folder), convert (the
authors' checkpoints), count (parameters and MACs), digits (the demo's metrics), extract_latents
(VAE latents of ImageNet), figures (docs/figures), frechet_forms (the Fréchet distance two ways),
imagenet64 (ImageNet 64 as one .npy),
sampler_error (how accurately each sampler solves the ODE), table5 (the ablation in miniature)."""
