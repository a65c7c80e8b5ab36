"""Sampling front end: typed settings (config), loading a checkpoint for sampling (load), classifier-free guidance
(guidance), grids (grid: `disploss sample` and the grids of training runs) and many images to an ADM .npz (ddp)."""
