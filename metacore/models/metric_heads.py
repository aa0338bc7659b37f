"""Backbones and plumbing for the metric-based algorithms (metacore.algorithms.protonet,
relation, siamese).

  relation_embedding  Sung et al. 2018, Omniglot embedding module: conv blocks
                      [3x3 conv 64, BN, ReLU] with a 2x2 max-pool after the first two; the
                      first two convolutions unpadded, the last two padded by 1 (the authors'
                      code, LearningToCompare_FSL/omniglot): 28 -> 26 -> 13 -> 11 -> 5 -> 5 -> 5,
                      so a 5 x 5 x 64 feature map.
  relation_module     Sung et al. 2018: 2 x [3x3 conv 64 (padding 1), BN, ReLU, 2x2 max-pool]
                      on the 2*64-channel pair map (5 -> 2 -> 1), flattened (64), then
                      fully connected 64 -> 8 (ReLU) -> 1. The sigmoid is applied by the
                      algorithm, which owns the loss.
  JointParams         several models (and raw parameter blocks) in one flat vector.
  backward_with_input_grad  Model.backward that also returns d loss / d input (Model.backward
                      drops it, its input being data), needed when a model's input is the
                      output of another model (the relation module on embeddings).

Shape letters: T tasks, B images (or pairs) per task, P parameters.
Every constructor takes the sizes as arguments so that tests can build tiny versions.
"""
from metacore.network import BatchNorm, Conv2d, Flatten, Linear, MaxPool2d, Model, ReLU
from metacore.params import ParamLayout

# Sung et al.'s Omniglot embedding: (padding, max-pool after the block) for the 4 blocks
RELATION_EMBED_BLOCKS = (("valid", True), ("valid", True), ("same", False), ("same", False))


def relation_embedding(image_shape=(28, 28, 1), channels=64, blocks=RELATION_EMBED_BLOCKS,
                       bn_mode="batch"):
    """The embedding module f_phi: blocks = ((padding, pool), ...), one per conv block."""
    layers, c = [], image_shape[2]
    for padding, pool in blocks:
        layers += [Conv2d(c, channels, stride=1, padding=padding),
                   BatchNorm(channels, mode=bn_mode), ReLU()]
        if pool:
            layers.append(MaxPool2d())
        c = channels
    return Model("relation_embedding", layers, in_shape=image_shape, loss=None)


def relation_module(feature_shape=(5, 5, 64), channels=64, depth=2, hidden=8,
                    bn_mode="batch"):
    """The relation module g_phi on pair maps (H, W, 2C) with C = feature_shape[2]:
    depth x [conv 3x3 'same', BN, ReLU, max-pool], flatten, linear -> hidden, ReLU,
    linear -> 1 (the relation score's logit)."""
    H, W, C = feature_shape
    layers, c, shape = [], 2 * C, (H, W, 2 * C)
    for _ in range(depth):
        block = [Conv2d(c, channels, stride=1, padding="same"),
                 BatchNorm(channels, mode=bn_mode), ReLU(), MaxPool2d()]
        for layer in block:
            shape = layer.out_shape(shape)          # raises if the map gets too small to pool
        layers += block
        c = channels
    d = shape[0] * shape[1] * shape[2]
    layers += [Flatten(), Linear(d, hidden), ReLU(), Linear(hidden, 1)]
    return Model("relation_module", layers, in_shape=(H, W, 2 * C), loss=None)


def backward_with_input_grad(model, dout, caches, T):
    """As Model.backward, but the first layer's input gradient is kept.
    dout: (T, B, *out_shape) -> dx (T, B, *in_shape), grad (T, P)."""
    grad, dx = model.backward(dout, caches, T, return_dx=True)
    return dx, grad


class JointParams:
    """Named parts laid end to end in one flat vector, each part contiguous.

    parts: list of (prefix, Model) or (prefix, [(name, shape), ...]) for raw blocks.
    layout: the ParamLayout of all blocks, named 'prefix/block'; part(theta, prefix) is the
    (..., P_part) view of one part; size the total length.
    """

    def __init__(self, parts):
        blocks, self.ranges, offset = [], {}, 0
        self.models = {}
        for prefix, part in parts:
            if isinstance(part, Model):
                self.models[prefix] = part
                sub = list(zip(part.layout.names, part.layout.shapes))
                n = part.num_params
            else:
                sub = list(part)
                n = ParamLayout(sub).size
            blocks += [(f"{prefix}/{name}", shape) for name, shape in sub]
            self.ranges[prefix] = slice(offset, offset + n)
            offset += n
        self.layout = ParamLayout(blocks)
        self.size = self.layout.size

    def part(self, theta, prefix):
        """theta (..., P) -> view (..., P_prefix)."""
        return theta[..., self.ranges[prefix]]

    def block(self, theta, name):
        """theta (P,) -> view of one named block, in its shape."""
        i = self.layout.names.index(name)
        return theta[self.layout.slice(name)].reshape(self.layout.shapes[i])
