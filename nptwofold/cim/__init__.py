"""The compute-in-memory side of nptwofold: a trained model on the simulated array.

Module map (docs/architecture.md follows one flag through it):
- `calibration`: the activation clips and ADC partial-sum ranges of a network, and the file
  that caches them beside a checkpoint (`CKPT.cim.h5`), keyed by digests of the weights, the
  images and the settings they were computed from.
"""
