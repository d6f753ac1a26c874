"""core.packed.plan_packed: its named columns, on a batch small enough to write down."""

import torch

from aptvit.core.layout import from_boxes
from aptvit.core.packed import HostTable, groups_of, plan_packed


def test_plan_of_a_known_batch():
    """Two 32x32 images, sizes (16, 32), one prefix token: image 0 is one 32-px patch, image 1 four 16-px ones."""
    images = torch.zeros(2, 3, 32, 32)
    y, x, size = (torch.tensor(v) for v in ([0, 0, 0, 16, 16], [0, 0, 16, 0, 16], [32, 16, 16, 16, 16]))
    layout = from_boxes((16, 32), ((32, 32),) * 2, y, x, size, torch.tensor([0, 1, 5], dtype=torch.int32))
    packed = plan_packed(layout, groups_of(images), num_prefix=1, pad_to=5)
    # bank: base grid (2 images x 4 cells, rows 0-7), 32-px grid (2 x 1, rows 8-9), then the prefix row 10;
    # position bank: base (4 rows), 32 px (1 row), zero row 5. Packed: [cls, patch] [cls, 4 patches] [3 padding]
    assert packed.token_src.tolist() == [10, 8, 10, 4, 5, 6, 7, 0, 0, 0]
    assert packed.pos_src.tolist() == [5, 4, 5, 0, 1, 2, 3, 5, 5, 5]
    assert packed.seq.tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert packed.pool_seq.tolist() == [3, 0, 3, 1, 1, 1, 1, 3, 3, 3]
    assert packed.pool_weight.tolist() == [0, 1, 0, 0.25, 0.25, 0.25, 0.25, 0, 0, 0]
    assert packed.offsets == (0, 2, 7, 10) and packed.cu_seqlens.tolist() == [0, 2, 7, 10]
    assert packed.patch_pos.tolist() == [1, 3, 4, 5, 6] and packed.prefix_pos.tolist() == [[0], [2]]
    log4 = torch.tensor(4.0).log().item()  # the 32-px patch covers 4 cells; prefix, base and padding rows: log 1
    assert packed.key_bias.tolist() == [0, log4, 0, 0, 0, 0, 0, 0, 0, 0] and packed.key_bias.dtype == torch.float32
    pooled = plan_packed(layout, groups_of(images), num_prefix=1, pad_to=5, pool_prefix=True)  # prefix area 1
    assert pooled.key_bias.tolist() == packed.key_bias.tolist()
    assert torch.equal(pooled.pool_weight, torch.tensor([1, 4, 1, 1, 1, 1, 1, 0, 0, 0]) / 5.0)  # 4 cells + the prefix


def test_host_table_gives_every_part_back_by_name():
    table = HostTable()
    table.add("a", [1, 2, 3])
    table.add("empty", [])
    table.add("b", (7,))
    got = table.to("cpu")
    assert {k: v.tolist() for k, v in got.items()} == {"a": [1, 2, 3], "empty": [], "b": [7]}
