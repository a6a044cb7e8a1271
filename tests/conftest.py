import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def drop_key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so
    AdamW turns its float round-off into +-lr steps that differ between any two summation orders: leave it out."""
    if name.endswith("attn.qkv.bias"):
        q, k, v = t.chunk(3)
        return torch.cat([q, v])
    return t


def broken_huffman_copy(src, dst) -> None:
    """Copy a JPEG with the code counts of its first Huffman table overwritten: markers and header
    still parse (the dataset scan passes it), but no decoder accepts it."""
    data = bytearray(Path(src).read_bytes())
    dht = data.index(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16
    Path(dst).write_bytes(bytes(data))


@pytest.fixture
def tiny_model():
    from mae_fast.model import build_model

    torch.manual_seed(0)
    return build_model("mae_vit_tiny_patch8")
