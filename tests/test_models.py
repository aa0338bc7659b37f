"""Models: shapes and parameter counts of the papers' backbones, tasks that never mix, bad
input refused with a message that names what is wrong."""
import numpy as np
import pytest

from metacore import models
from metacore.params import ParamLayout, tile_tasks


def test_paper_parameter_counts():
    assert models.sinusoid_mlp().num_params == (1 * 40 + 40) + (40 * 40 + 40) + (40 + 1)
    # Conv-4 (MAML): 4 conv blocks of 64 filters with BN (gamma, beta), then a 64 -> 5 head
    conv = (9 * 1 * 64 + 64) + 3 * (9 * 64 * 64 + 64) + 4 * 2 * 64
    assert models.conv4_maml(n_way=5).num_params == conv + 64 * 5 + 5
    assert models.conv4_protonet().num_params == conv
    bn_mlp = sum(a * b + b + 2 * b for a, b in [(784, 256), (256, 128), (128, 64), (64, 64)])
    assert models.bn_mlp(n_way=5).num_params == bn_mlp + 64 * 5 + 5


@pytest.mark.parametrize("name,model,in_shape,out_shape", [
    ("sinusoid", models.sinusoid_mlp(), (1,), (1,)),
    ("bn_mlp", models.bn_mlp(n_way=20), (784,), (20,)),
    ("bn_mlp_images", models.bn_mlp(n_way=5, in_features=(28, 28, 1)), (28, 28, 1), (5,)),
    ("conv4_maml", models.conv4_maml(n_way=5), (28, 28, 1), (5,)),
    ("conv4_protonet", models.conv4_protonet(), (28, 28, 1), (64,)),
])
def test_output_shapes(name, model, in_shape, out_shape):
    rng = np.random.default_rng(0)
    theta = tile_tasks(model.init_params(rng, np.float32), 2)
    x = rng.standard_normal((2, 3) + in_shape).astype(np.float32)
    out, _ = model.forward(theta, x)
    assert out.shape == (2, 3) + out_shape and out.dtype == np.float32


@pytest.mark.parametrize("model,T,N", [
    (models.sinusoid_mlp(), 4, 5),
    (models.bn_mlp(n_way=3, in_features=10, hidden=(6, 5)), 3, 4),
    (models.conv4_maml(n_way=3, image_shape=(8, 8, 1), channels=4, depth=2), 3, 4),
])
def test_tasks_never_mix(model, T, N):
    """Loss, gradient and HVP of a batch of T tasks equal those of each task alone."""
    rng = np.random.default_rng(3)
    theta = np.stack([model.init_params(rng) for _ in range(T)])
    theta += 0.2 * rng.standard_normal(theta.shape)
    x = rng.standard_normal((T, N) + model.in_shape)
    if model.loss_name == "mse":
        y = rng.standard_normal((T, N, 1))
    else:
        y = rng.integers(0, model.out_shape[0], (T, N))
    v = rng.standard_normal(theta.shape)
    loss, grad, hv = model.hvp(theta, x, y, v)
    for t in range(T):
        l1, g1, h1 = model.hvp(theta[t:t + 1], x[t:t + 1], y[t:t + 1], v[t:t + 1])
        np.testing.assert_allclose(loss[t], l1[0], rtol=1e-13)
        np.testing.assert_allclose(grad[t], g1[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(hv[t], h1[0], rtol=1e-12, atol=1e-15)
    l2, g2 = model.loss_and_grad(theta, x, y)
    np.testing.assert_array_equal(l2, loss)
    np.testing.assert_array_equal(g2, grad)


def test_sinusoid_init_is_truncated_normal_sd_001():
    theta = models.sinusoid_mlp().init_params(np.random.default_rng(0))
    layout = models.sinusoid_mlp().layout
    w = theta[layout.slice("2.linear.w")]
    assert np.abs(w).max() <= 0.02 and 0.007 < w.std() < 0.01
    assert np.all(theta[layout.slice("2.linear.b")] == 0)


def test_param_layout_views_write_through():
    layout = ParamLayout([("a", (2, 3)), ("b", (4,))])
    theta = np.zeros((2, layout.size))
    layout.views(theta)["b"][1] = [1, 2, 3, 4]
    assert theta[1, 6:].tolist() == [1, 2, 3, 4] and theta[0].sum() == 0
    with pytest.raises(ValueError, match="duplicate"):
        ParamLayout([("a", (1,)), ("a", (2,))])


def test_running_mode_batchnorm_does_not_depend_on_other_points():
    """In running-statistics mode one point's output is independent of its batch-mates."""
    model = models.bn_mlp(n_way=3, in_features=6, hidden=(5,), bn_mode="running")
    rng = np.random.default_rng(0)
    theta = tile_tasks(model.init_params(rng), 1)
    x = rng.standard_normal((1, 4, 6))
    out_all, _ = model.forward(theta, x)
    out_one, _ = model.forward(theta, x[:, :1])
    np.testing.assert_allclose(out_all[:, :1], out_one, rtol=1e-14)
    batch_model = models.bn_mlp(n_way=3, in_features=6, hidden=(5,), bn_mode="batch")
    b_all, _ = batch_model.forward(theta, x)
    b_two, _ = batch_model.forward(theta, x[:, :2])
    assert not np.allclose(b_all[:, :1], b_two[:, :1])      # batch mode does depend on them


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def sin():
    m = models.sinusoid_mlp()
    rng = np.random.default_rng(0)
    return m, tile_tasks(m.init_params(rng), 2), rng.standard_normal((2, 5, 1)), \
        rng.standard_normal((2, 5, 1))


def test_wrong_parameter_count_names_both(sin):
    m, theta, x, y = sin
    with pytest.raises(ValueError, match=r"theta has 1760 parameters per task, the model has 1761"):
        m.loss(theta[:, :-1], x, y)


def test_mixed_dtypes_refused(sin):
    m, theta, x, y = sin
    with pytest.raises(TypeError, match=r"x has dtype float32, expected float64"):
        m.loss(theta, x.astype(np.float32), y)


def test_wrong_input_shape_names_expected(sin):
    m, theta, x, y = sin
    with pytest.raises(ValueError, match=r"x must have shape \(2, \*, 1\), got \(3, 5, 1\)"):
        m.loss(theta, np.zeros((3, 5, 1)), y)
    with pytest.raises(ValueError, match=r"targets must have shape \(2, 5, 1\)"):
        m.loss(theta, x, y[:, :4])


def test_non_finite_refused(sin):
    m, theta, x, y = sin
    x = x.copy()
    x[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"x contains 1 non-finite"):
        m.loss_and_grad(theta, x, y)
    theta = theta.copy()
    theta[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"theta contains 1 non-finite"):
        m.loss(theta, np.zeros((2, 5, 1)), y)


def test_hvp_direction_must_match(sin):
    m, theta, x, y = sin
    with pytest.raises(ValueError, match=r"v must have shape \(2, 1761\)"):
        m.hvp(theta, x, y, np.zeros((2, 1760)))


def test_labels_checked():
    m = models.bn_mlp(n_way=3, in_features=4, hidden=(5,))
    rng = np.random.default_rng(0)
    theta, x = tile_tasks(m.init_params(rng), 1), rng.standard_normal((1, 6, 4))
    with pytest.raises(ValueError, match=r"labels has value 3, must be < 3"):
        m.loss(theta, x, np.full((1, 6), 3))
    with pytest.raises(TypeError, match=r"labels must have an integer dtype, got float64"):
        m.loss(theta, x, np.zeros((1, 6)))


def test_bce_targets_must_be_probabilities():
    from metacore.network import Linear, Model
    m = Model("logit", [Linear(3, 1)], in_shape=(3,), loss="bce_logits")
    theta = tile_tasks(m.init_params(np.random.default_rng(0)), 1)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        m.loss(theta, np.zeros((1, 2, 3)), np.array([[[0.5], [1.5]]]))


def test_bad_layer_configuration():
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        models.conv4_maml().layers[0].__class__(1, 4, stride=3)
    with pytest.raises(ValueError, match="padding must be 'same' or 'valid'"):
        models.conv4_maml().layers[0].__class__(1, 4, padding="full")
    with pytest.raises(ValueError, match=r"'valid' padding needs H, W >= 3"):
        from metacore.network import Conv2d, Model
        Model("m", [Conv2d(1, 2, padding="valid")], in_shape=(2, 2, 1))
    with pytest.raises(ValueError, match="mode must be 'batch' or 'running'"):
        models.bn_mlp(bn_mode="train")


def test_running_stats_update_and_buffers_round_trip():
    model = models.bn_mlp(n_way=3, in_features=4, hidden=(5,))
    rng = np.random.default_rng(0)
    theta = tile_tasks(model.init_params(rng), 2)
    x = rng.standard_normal((2, 6, 4)) * 3 + 1
    out, caches = model.forward(theta, x)
    model.update_running_stats(caches, momentum=0.5)
    (name, bn_layer), = model.batchnorm_layers()
    pre = np.matmul(x, model.layout.views(theta)["0.linear.w"]) + model.layout.views(theta)["0.linear.b"][:, None]
    np.testing.assert_allclose(bn_layer.running_mean, 0.5 * pre.mean(axis=1).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(bn_layer.running_var, 0.5 + 0.5 * pre.var(axis=1).mean(axis=0), rtol=1e-12)
    saved = model.buffers()
    other = models.bn_mlp(n_way=3, in_features=4, hidden=(5,))
    other.load_buffers(saved)
    other.set_bn_mode("running")
    model.set_bn_mode("running")
    np.testing.assert_array_equal(other.forward(theta, x)[0], model.forward(theta, x)[0])
    with pytest.raises(ValueError, match="running mode; its forward pass has no batch statistics"):
        model.update_running_stats(model.forward(theta, x)[1])
    with pytest.raises(ValueError, match=r"buffer '1.batchnorm.running_var' missing"):
        other.load_buffers({"1.batchnorm.running_mean": np.zeros(5)})
