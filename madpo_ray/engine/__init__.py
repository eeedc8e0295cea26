"""The one training engine behind the SFT, reward and policy stages.

- `loop.fit`: DDP-ready training loop (accumulation, clipping, cosine warm-up, bf16 autocast,
  periodic reports and checkpoints, exact resume at an optimiser-step boundary).
- `checkpoints`: the checkpoint format, its verified write and its safe (`weights_only`) load.
- `sessions`: where the loop runs and reports to: a Ray Train worker, a Ray Tune trial, or one
  plain process. A session also hands the loop its examples, so the loop never knows whether
  they came from Ray Data or from a file.
"""
