"""Compress a whole transformers checkpoint, streamed from its safetensors shards, resumable, spread over
``torchrun`` ranks: ``python -m mpo_core.compress_checkpoint IN_DIR OUT_DIR --max-bond 64``.

- :mod:`.files`: safetensors folders read and written lazily (headers checked, tensors one at a time);
- :mod:`.plan`: settings, units of work and their split across ranks, the manifest and the ledger;
- :mod:`.run`: :func:`compress_checkpoint`, the streamed, resumable, distributed run;
- :mod:`.merge`: :func:`merge_checkpoint`, back to a plain dense checkpoint with its error;
- :mod:`.report`: progress and the summary; :mod:`.cli`: the command line.

The output loads with :func:`mpo_core.lightweight.load_mpo_model` (``mpo_layout.json`` + sharded
``model.safetensors.index.json``).
"""
from mpo_core.compress_checkpoint.merge import merge_checkpoint
from mpo_core.compress_checkpoint.plan import Settings
from mpo_core.compress_checkpoint.run import compress_checkpoint

__all__ = ["Settings", "compress_checkpoint", "merge_checkpoint"]
