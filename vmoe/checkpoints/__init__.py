"""vmoe.checkpoints: checkpoint file formats, knowing nothing of models.

* ``vmoe.checkpoints.official_reader``: Google's official V-MoE checkpoints
  (``PREFIX.index`` + MessagePack data shards), read one array at a time with numpy + msgpack;
  ``vmoe.checkpoints.official_format`` holds the format's building blocks.
* ``vmoe.checkpoints.safetensors_stream``: a ``.safetensors`` writer that takes one tensor
  at a time, and a checked reader of a ``.safetensors`` header.
* ``vmoe.checkpoints.download``: resumable, verified HTTPS fetching of the official files
  (``.part`` + Range, size and ``x-goog-hash`` checks, an atomic rename), with
  ``vmoe.checkpoints.crc32c``.

The mapping of official parameter names onto vmoe's model is in ``vmoe.models.official``.
"""

from .official_format import ArrayInfo, CheckpointFormatError, Chunk
from .official_reader import iter_checkpoint_arrays, read_checkpoint, read_checkpoint_index
from .safetensors_stream import SafetensorsStreamWriter, TensorEntry, read_safetensors_header

__all__ = [
    "CheckpointFormatError",
    "ArrayInfo",
    "Chunk",
    "read_checkpoint_index",
    "iter_checkpoint_arrays",
    "read_checkpoint",
    "SafetensorsStreamWriter",
    "TensorEntry",
    "read_safetensors_header",
]
