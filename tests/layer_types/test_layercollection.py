"""LayerCollection: layout (order, offsets, sizes) and the collection algebra."""
import pytest
import torch
from torch import nn

from nngeometry.layercollection import Conv2dLayer, LayerCollection, LinearLayer


class Net(nn.Module):
    """Nested modules: the layout must follow ``named_modules()`` (definition order), not the
    order in which forward() calls them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.block = nn.Sequential(nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(self.block(h))


def test_layout_follows_named_modules():
    model = Net()
    lc = LayerCollection.from_model(model)
    assert lc.layer_ids() == ["conv", "block.0", "block.2", "head"]
    sizes = {"conv": 3 * 2 * 9 + 3, "block.0": 48 * 5 + 5, "block.2": 5 * 4, "head": 4 * 2 + 2}
    pos = 0
    for lid, layer in lc:
        assert lc.p_pos[lid] == pos
        assert layer.numel() == sizes[lid]
        assert lc.slice(lid) == slice(pos, pos + sizes[lid])
        pos += sizes[lid]
    assert lc.numel() == pos == sum(p.numel() for p in model.parameters())
    assert len(lc) == 4 and "head" in lc and "nope" not in lc
    assert lc["conv"] == Conv2dLayer(2, 3, 3, bias=True)
    assert lc["block.2"] == LinearLayer(5, 4, bias=False)
    assert lc["block.2"].bias is None and lc["head"].has_bias()


def test_flat_layout_is_weight_then_bias_row_major():
    model = Net()
    lc = LayerCollection.from_model(model)
    modules = lc.get_layerid_module_map(model)
    flat = torch.cat([p.reshape(-1) for p in lc.parameters(modules)])
    expected = torch.cat([model.conv.weight.reshape(-1), model.conv.bias,
                          model.block[0].weight.reshape(-1), model.block[0].bias,
                          model.block[2].weight.reshape(-1),
                          model.head.weight.reshape(-1), model.head.bias])
    assert torch.equal(flat, expected)


def test_add_layer_and_add_layer_from_model():
    model = Net()
    lc = LayerCollection()
    lc.add_layer_from_model(model, model.head)
    lc.add_layer_from_model(model, model.conv)
    # insertion order, not model order
    assert lc.layer_ids() == ["head", "conv"]
    assert lc.p_pos == {"head": 0, "conv": 10}
    assert lc.numel() == 10 + 57
    with pytest.raises(ValueError, match="already in the collection"):
        lc.add_layer("head", LinearLayer(4, 2))
    with pytest.raises(TypeError, match="layer spec"):
        lc.add_layer("x", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a submodule"):
        lc.add_layer_from_model(model, nn.Linear(2, 2))
    lc2 = LayerCollection()
    lc2.add_layer("a", LinearLayer(3, 4))
    lc2.add_layer("b", LinearLayer(4, 2, bias=False))
    assert lc2.p_pos == {"a": 0, "b": 16} and lc2.numel() == 24


def test_get_layerid_module_map():
    model = Net()
    lc = LayerCollection.from_model(model)
    m = lc.get_layerid_module_map(model)
    assert list(m) == lc.layer_ids()
    assert m["block.0"] is model.block[0] and m["head"] is model.head
    other = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="not a module of the model"):
        lc.get_layerid_module_map(other)
    wrong = LayerCollection([("0", LinearLayer(3, 5))])
    with pytest.raises(ValueError, match="does not match"):
        wrong.get_layerid_module_map(other)


def test_equality_merge_sub_last_layer():
    a, b = Net(), Net()
    lca, lcb = LayerCollection.from_model(a), LayerCollection.from_model(b)
    assert lca == lcb and not (lca != lcb) and hash(lca) == hash(lcb)
    sub = lca.sub(["head", "conv"])
    assert sub.layer_ids() == ["conv", "head"]  # the collection's order
    assert sub.p_pos == {"conv": 0, "head": 57} and sub.numel() == 67
    assert sub != lca
    assert lca.last_layer().layer_ids() == ["head"]
    assert lca.last_layer() == LayerCollection([("head", LinearLayer(4, 2))])
    with pytest.raises(KeyError, match="not in the collection"):
        lca.sub(["missing"])
    with pytest.raises(ValueError, match="empty"):
        LayerCollection().last_layer()

    first = lca.sub(["conv", "block.0"])
    second = lca.sub(["block.2", "head"])
    merged = first.merge(second)
    assert merged == lca
    assert merged.p_pos == lca.p_pos
    # the union: common layers are kept once, where the first collection has them
    assert first.merge(first) == first
    assert first.merge(lca) == LayerCollection(
        [(lid, lca[lid]) for lid in ["conv", "block.0", "block.2", "head"]])
    assert lca.merge(second) == lca
    clash = LayerCollection([("head", LinearLayer(4, 3))])
    with pytest.raises(ValueError, match="merge: layer 'head'"):
        lca.merge(clash)
    # same ids, different shapes: not equal
    assert LayerCollection([("0", LinearLayer(3, 4))]) != LayerCollection([("0", LinearLayer(3, 5))])
    assert LayerCollection([("0", LinearLayer(3, 4))]) != LayerCollection([("1", LinearLayer(3, 4))])
    assert LayerCollection([("0", LinearLayer(3, 4))]) != LayerCollection([("0", LinearLayer(3, 4, bias=False))])


def test_ignore_unsupported_layers():
    model = nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 2), nn.Linear(2, 2))
    lc = LayerCollection.from_model(model, ignore_unsupported_layers=True)
    assert lc.layer_ids() == ["0", "2"]
    assert lc.p_pos == {"0": 0, "2": 16}


def test_root_module_is_a_layer():
    model = nn.Linear(3, 2)
    lc = LayerCollection.from_model(model)
    assert lc.layer_ids() == [""] and lc.numel() == 8
    assert lc.get_layerid_module_map(model)[""] is model
