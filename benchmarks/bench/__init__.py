"""The benchmark harness (`python -m benchmarks.bench`, and `disploss bench` in a checkout): its configuration
(config), the sections it times (sections, sampling, meanflow), the timing harness and MFU (harness), the reference
code run side by side (reference), a synthetic latent cache (latents) and the command line (cli). Its results live
beside it, in benchmarks/. Built on the public API of the disploss library; not part of the installed package."""
