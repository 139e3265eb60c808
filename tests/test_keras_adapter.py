"""fastadam.keras.Adam against keras.optimizers.Adam on the same model and data."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")
fk = pytest.importorskip("fastadam.keras")

pytestmark = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="the kernel path needs KERAS_BACKEND=torch")


def data(n=512, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 20)).astype("float32"), rng.integers(0, 3, n)


def make_model(optimizer, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(3)])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(optimizer, epochs=6, **kwargs):
    model = make_model(optimizer)
    x, y = data()
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=False, **kwargs)
    return model, history


def assert_weights_close(a, b, tol=2e-6):
    for wa, wb in zip(a.weights, b.weights):
        np.testing.assert_allclose(wa.numpy(), wb.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True}, {"weight_decay": 0.05},
                                    {"amsgrad": True, "weight_decay": 0.05}],
                         ids=["plain", "amsgrad", "weight_decay", "amsgrad-weight_decay"])
def test_parity_with_keras_adam(kwargs):
    ours, _ = fit(fk.Adam(**kwargs))
    theirs, _ = fit(keras.optimizers.Adam(**kwargs))
    assert ours.optimizer.kernel_steps == 48  # every step ran through fastadam's kernels
    assert_weights_close(ours, theirs)


@pytest.mark.parametrize("kwargs", [{"clipnorm": 0.5}, {"global_clipnorm": 0.5}, {"clipvalue": 0.01},
                                    {"gradient_accumulation_steps": 2}, {"use_ema": True},
                                    {"loss_scale_factor": 128.0},
                                    {"learning_rate": keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)}],
                         ids=["clipnorm", "global_clipnorm", "clipvalue", "accumulation", "ema",
                              "loss_scale", "schedule"])
def test_keras_machinery_around_the_update(kwargs):
    ours, _ = fit(fk.Adam(**kwargs), epochs=2)
    theirs, _ = fit(keras.optimizers.Adam(**kwargs), epochs=2)
    assert ours.optimizer.kernel_steps > 0
    assert_weights_close(ours, theirs)


def test_excluded_variables_get_no_weight_decay():
    ours = fk.Adam(weight_decay=0.1)
    theirs = keras.optimizers.Adam(weight_decay=0.1)
    for opt in (ours, theirs):
        opt.exclude_from_weight_decay(var_names=["bias"])
    a, _ = fit(ours, epochs=2)
    b, _ = fit(theirs, epochs=2)
    assert_weights_close(a, b)


def test_loss_falls_and_defaults_are_keras():
    opt = fk.Adam()
    assert (opt.beta_1, opt.beta_2, opt.epsilon, opt.amsgrad) == (0.9, 0.999, 1e-7, False)
    assert float(opt.learning_rate) == pytest.approx(0.001)
    _, history = fit(opt)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_config_round_trip_and_model_save_load(tmp_path):
    opt = fk.Adam(learning_rate=0.01, beta_1=0.8, amsgrad=True, weight_decay=0.01, num_threads=1)
    config = opt.get_config()
    clone = fk.Adam.from_config(config)
    assert clone.get_config() == config and clone.num_threads == 1
    model, _ = fit(opt, epochs=1)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the class is registered
    assert isinstance(loaded.optimizer, fk.Adam)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    x, y = data(seed=1)
    loaded.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    assert_weights_close(loaded, model)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_policies_run_through_the_kernels(policy):
    # float32 variables computed in 16 bits (mixed_float16 wraps the optimizer in Keras's
    # LossScaleOptimizer): the update is fastadam's, with Keras's numbers
    keras.config.set_dtype_policy(policy)
    try:
        ours, _ = fit(fk.Adam(), epochs=2)
        theirs, _ = fit(keras.optimizers.Adam(), epochs=2)
    finally:
        keras.config.set_dtype_policy("float32")
    inner = getattr(ours.optimizer, "inner_optimizer", ours.optimizer)
    assert isinstance(inner, fk.Adam) and inner.kernel_steps == 16
    assert_weights_close(ours, theirs)


def test_variables_the_kernels_cannot_update_use_keras_math():
    # float16 variables: Keras computes their update in float16 itself, fastadam would in
    # float32 (torch's opmath), so Keras's own update keeps its numbers
    keras.config.set_dtype_policy("float16")
    try:
        ours, _ = fit(fk.Adam(), epochs=1)
    finally:
        keras.config.set_dtype_policy("float32")
    assert ours.optimizer.kernel_steps == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"beta_1": 1.0}, r"beta_1 must be in \[0, 1\)"),
    ({"beta_2": -0.5}, r"beta_2 must be in \[0, 1\)"),
    ({"epsilon": -1.0}, r"epsilon must be >= 0.0"),
    ({"weight_decay": -0.1}, r"weight_decay must be >= 0.0"),
    ({"learning_rate": -1.0}, r"learning_rate must be >= 0.0"),
    ({"num_threads": 0}, r"num_threads must be None or a positive integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fk.Adam(**kwargs)


def test_importing_fastadam_does_not_import_keras():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sys, fastadam; print('keras' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_jit_compile_compiles_the_train_step_once():
    # Keras's jit_compile=True on torch is torch.compile of the train step; the kernel
    # update runs in it as one eager call, so no step's numbers trigger a recompilation.
    torch = pytest.importorskip("torch")
    from torch._dynamo.utils import counters

    model = make_model(fk.Adam())
    model.compile(optimizer=model.optimizer, jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    torch._dynamo.reset()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    graphs = counters["stats"]["unique_graphs"]
    model.fit(x, y, batch_size=64, epochs=2, verbose=0, shuffle=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert model.optimizer.kernel_steps == 24
    reference = make_model(keras.optimizers.Adam())
    reference.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False)
    assert_weights_close(model, reference)


def test_steps_take_the_compiled_gather_and_follow_moved_storage(monkeypatch):
    # Every step after the first runs through the compiled per-tensor loop; a variable
    # whose memory moved sends one step through the general path, which rebuilds.
    ours = make_model(fk.Adam())
    x, y = data()
    ours.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    calls = []
    real = fk.Adam._general_update
    monkeypatch.setattr(fk.Adam, "_general_update",
                        lambda self, *a: calls.append(1) or real(self, *a))
    ours.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    assert calls == []
    kernel = ours.layers[0].kernel.value
    kernel.data = kernel.data.clone()  # the same values in new memory
    ours.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
    assert calls == [1]
    theirs = make_model(keras.optimizers.Adam())
    theirs.fit(x, y, batch_size=64, epochs=3, verbose=0, shuffle=False)
    assert_weights_close(ours, theirs)
    assert ours.optimizer.kernel_steps == 24
