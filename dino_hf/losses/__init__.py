"""The objectives, one a file, pure torch: DINO's multi-crop cross-entropy with centering or
Sinkhorn-Knopp, DINOv2's iBOT masked-patch loss and KoLeo regulariser.

- ``dino``: :class:`~dino_hf.losses.dino.DinoLoss` (``DinoLossOutput``, ``LOSS_STATISTICS``);
- ``ibot``: :class:`~dino_hf.losses.ibot.IBOTPatchLoss` (``IBOTPatchLossOutput``);
- ``koleo``: :class:`~dino_hf.losses.koleo.KoLeoLoss`;
- ``cross_entropy``: the multi-crop cross-entropy without the pair loop and its autograd function
  (``cross_entropy_sum``, ``MultiCropCrossEntropy``), for ``DinoLoss``;
- ``sinkhorn_knopp``: the Sinkhorn-Knopp teacher of both losses (and ``distributed_world_size``);
- ``precision``: ``compute_dtype`` and ``full_precision``, at least float32 also under autocast;
- ``validation``: the argument and tensor checks, and ``CENTERING_METHODS``.

Imports: nothing else of dino_hf.
"""
