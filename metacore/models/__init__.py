"""The backbones of the papers, as metacore.network.Model instances.

  sinusoid_mlp     Finn et al. 2017, regression: 1-40-40-1, ReLU, MSE; weights from a
                   truncated normal with sd 0.01 as in the authors' code.
  bn_mlp           Finn et al. 2017, non-convolutional Omniglot model: 784-256-128-64-64-N,
                   each hidden layer linear + batch norm + ReLU; softmax cross-entropy.
  conv4_maml       Finn et al. 2017, Omniglot: 4 x [3x3 conv 64, stride 2, 'same', BN, ReLU],
                   spatial mean, linear N-way head; softmax cross-entropy. 28 -> 14 -> 7 -> 4 -> 2.
                   head="flatten": the 2x2x64 map flattened instead (Nichol et al. 2018).
  conv4_protonet   Snell et al. 2017 / Vinyals et al. 2016: 4 x [3x3 conv 64, padding 1, BN,
                   ReLU, 2x2 max-pool], flattened to a 64-d embedding (28 -> 14 -> 7 -> 3 -> 1);
                   no loss of its own (the metric-learning loss sits on the embedding).

Every constructor takes the sizes as arguments so that tests can build tiny versions.
"""
from metacore.network import (BatchNorm, Conv2d, Flatten, Linear, MaxPool2d, MeanPool, Model,
                              ReLU)


def sinusoid_mlp(hidden=(40, 40)):
    layers, d = [], 1
    for h in hidden:
        layers += [Linear(d, h, init="truncated_normal", init_std=0.01), ReLU()]
        d = h
    layers.append(Linear(d, 1, init="truncated_normal", init_std=0.01))
    return Model("sinusoid_mlp", layers, in_shape=(1,), loss="mse")


def bn_mlp(n_way=5, in_features=784, hidden=(256, 128, 64, 64), bn_mode="batch"):
    """Input (T, N, in_features), or images (T, N, H, W, C) given in_features=(H, W, C)."""
    if isinstance(in_features, tuple):
        layers, in_shape = [Flatten()], in_features
        d = in_shape[0] * in_shape[1] * in_shape[2]
    else:
        layers, in_shape, d = [], (in_features,), in_features
    for h in hidden:
        layers += [Linear(d, h), BatchNorm(h, mode=bn_mode), ReLU()]
        d = h
    layers.append(Linear(d, n_way))
    return Model("bn_mlp", layers, in_shape=in_shape, loss="softmax_ce")


def conv4_maml(n_way=5, image_shape=(28, 28, 1), channels=64, depth=4, bn_mode="batch",
               head="mean", bn_eps=1e-5):
    """head "mean": spatial mean before the linear layer (Finn et al.'s code); "flatten":
    the (h, w, channels) map flattened (Nichol et al.'s OmniglotModel). bn_eps: batch norm's
    epsilon (1e-5 here; TensorFlow's default 1e-3 for Reptile's protocol)."""
    if head not in ("mean", "flatten"):
        raise ValueError(f"conv4_maml: head must be 'mean' or 'flatten', got {head!r}")
    layers, c = [], image_shape[2]
    h, w = image_shape[:2]
    for _ in range(depth):
        layers += [Conv2d(c, channels, stride=2, padding="same"),
                   BatchNorm(channels, mode=bn_mode, eps=bn_eps), ReLU()]
        c, h, w = channels, -(-h // 2), -(-w // 2)               # 'same', stride 2: ceil
    if head == "mean":
        layers += [MeanPool(), Linear(channels, n_way)]
    else:
        layers += [Flatten(), Linear(h * w * channels, n_way)]
    return Model("conv4_maml", layers, in_shape=image_shape, loss="softmax_ce")


def conv4_protonet(image_shape=(28, 28, 1), channels=64, depth=4, bn_mode="batch"):
    layers, c = [], image_shape[2]
    for _ in range(depth):
        layers += [Conv2d(c, channels, stride=1, padding="same"),
                   BatchNorm(channels, mode=bn_mode), ReLU(), MaxPool2d()]
        c = channels
    layers.append(Flatten())
    return Model("conv4_protonet", layers, in_shape=image_shape, loss=None)


MODELS = {"sinusoid_mlp": sinusoid_mlp, "bn_mlp": bn_mlp, "conv4_maml": conv4_maml,
          "conv4_protonet": conv4_protonet}
