"""The one training engine behind the SFT, reward and policy stages.

- `loop.fit`: the training loop (accumulation, clipping, cosine warm-up, bf16 autocast, periodic
  reports and checkpoints, exact resume at an optimiser-step boundary); its parts are
  `batching` (sampler and data position), `state` (what a checkpoint holds, save and resume),
  `early_stopping` and `collectives`.
- `checkpoints`: the checkpoint format, its verified write and its safe (`weights_only`) load.
- `sessions`: where the loop runs and reports to: a Ray Train worker, a Ray Tune trial, or one
  plain process. A session also hands the loop its examples, so the loop never knows whether
  they came from Ray Data or from a file. `faults` wraps one for the resume tests.
- `parallel`: DDP or FSDP2.
"""
